"""read_osm on the real Helsinki extract."""

import geopandas as gpd
import numpy as np
import pytest
import shapely

from neuralmaps.geo import GeoInputError, OSMLayers, Region, read_osm

CENTRE_BBOX = (24.9470, 60.1685, 24.9545, 60.1715)  # cathedral, Senate Square, Aleksanterinkatu


@pytest.fixture(scope="module")
def centre(helsinki_pbf) -> OSMLayers:
    return read_osm(helsinki_pbf, Region.from_bbox(*CENTRE_BBOX))


def test_whole_extract_matches_scouted_counts(helsinki_pbf):
    layers = read_osm(helsinki_pbf)
    assert layers.region.crs.to_epsg() == 32635
    assert layers.crs.to_epsg() == 32635 and all(g.crs == layers.crs for g in layers.layers().values())
    b = layers.buildings
    assert 470 <= len(b) <= 486  # a few degenerate polygons at the extract edge are dropped
    assert b.geometry.is_valid.all()
    assert ((b.height_source != "default").mean()) == pytest.approx(0.35, abs=0.1)
    fw = layers.footways.kind.value_counts()
    assert 150 <= fw["sidewalk"] <= 200 and 150 <= fw["crossing"] <= 179
    pts = layers.points.kind.value_counts()
    assert pts["tree"] == 649 and pts["street_light"] == 586 and pts["traffic_light"] == 135
    assert pts["crossing"] >= 600
    assert (layers.areas.kind == "grass").sum() >= 80
    assert (layers.rails.kind == "tram").sum() > 50


def test_region_clip_and_attributes(centre):
    r = centre.region
    clip = shapely.box(*r.bounds).buffer(centre.margin_m + 1e-6, join_style="mitre")
    for name, g in centre.layers().items():
        assert len(g) > 0, name
        assert g.crs.to_epsg() == 32635
        assert g.within(clip).all(), name
    b = centre.buildings
    names = b.name.fillna("")
    cathedral = b[names.str.contains("tuomiokirkko", case=False)]
    assert len(cathedral) == 1
    assert cathedral.geometry.iloc[0].contains(shapely.Point(r.lonlat_to_xy(24.9522, 60.1704)))
    assert set(b.height_source) <= {"height", "levels", "default"}
    assert (b.height_m > 0).all()
    levels = b[b.height_source == "levels"]
    assert len(levels) > 0
    roads = centre.roads
    assert (roads.width_m > 0).all() and roads.drivable.dtype == bool
    assert not roads[roads.highway == "pedestrian"].drivable.any()
    assert roads[roads.highway == "secondary"].drivable.all()
    assert set(centre.points.kind) <= {"tree", "street_light", "traffic_light", "traffic_sign", "pole", "crossing"}
    assert centre.points.geom_type.eq("Point").all()
    assert centre.roads.geom_type.isin(["LineString", "MultiLineString"]).all()


def test_height_and_width_rules_from_dict():
    # Raw OSM tags in a dict of GeoDataFrames (EPSG:4326), classified by the same rules.
    lon, lat = 24.9522, 60.1704
    sq = shapely.box(lon, lat, lon + 2e-4, lat + 1e-4)
    line = shapely.LineString([(lon, lat - 3e-4), (lon + 4e-4, lat - 3e-4)])
    raw = gpd.GeoDataFrame(
        {
            "building": ["house", "apartments", "yes", "shed", None, None, None, None],
            "height": ["12 m", None, None, None, None, None, None, None],
            "building:levels": [None, "4", None, None, None, None, None, None],
            "highway": [None, None, None, None, "primary", "residential", "footway", "street_lamp"],
            "lanes": [None, None, None, None, None, "2", None, None],
            "footway": [None, None, None, None, None, None, "sidewalk", None],
        },
        geometry=[sq, sq, sq, sq, line, line, line, shapely.Point(lon, lat)],
        crs=4326,
    )
    layers = read_osm({"osm": raw})
    b = layers.buildings
    assert list(b.height_m) == pytest.approx([12.0, 13.0, 15.0, 3.0])
    assert list(b.height_source) == ["height", "levels", "default", "default"]
    assert list(b.kind) == ["house", "apartments", "building", "shed"]
    assert sorted(layers.roads.width_m) == pytest.approx([6.5, 10.0])
    assert list(layers.footways.kind) == ["sidewalk"]
    assert list(layers.points.kind) == ["street_light"]
    # pre-classified layers are kept (and their missing columns filled)
    pre = {"buildings": gpd.GeoDataFrame({"height_m": [21.0]}, geometry=[sq], crs=4326)}
    pre["roads"] = gpd.GeoDataFrame({"width_m": [12.0]}, geometry=[line], crs=4326)
    pre2 = read_osm(pre)
    b2 = pre2.buildings
    assert b2.height_m.iloc[0] == 21.0 and b2.kind.iloc[0] == "building"
    assert pre2.roads.highway.iloc[0] == "road" and pre2.roads.width_m.iloc[0] == 12.0


def test_geopackage_round_trip(centre, tmp_path):
    path = tmp_path / "centre.gpkg"
    for name, g in centre.layers().items():
        g.to_file(path, layer=name, driver="GPKG")
    again = read_osm(path, centre.region)
    assert again.counts() == centre.counts()
    np.testing.assert_allclose(again.buildings.height_m, centre.buildings.height_m)


def test_bad_osm_input(helsinki_pbf, tmp_path):
    missing = tmp_path / "missing.osm.pbf"
    with pytest.raises(GeoInputError, match="missing.osm.pbf"):
        read_osm(missing)
    corrupt = tmp_path / "corrupt.osm.pbf"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(GeoInputError, match="corrupt.osm.pbf"):
        read_osm(corrupt)
    far = Region.from_bbox(10.0, 50.0, 10.002, 50.002)  # Germany, far from the Helsinki extract
    with pytest.raises(GeoInputError, match="Helsinki.osm.pbf"):
        read_osm(helsinki_pbf, far)
    junk = tmp_path / "junk.gpkg"
    junk.write_bytes(b"SQLite format 3\x00" + bytes(200))
    with pytest.raises(GeoInputError, match="junk.gpkg"):
        read_osm(junk)
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(GeoInputError, match="notes.txt.*unsupported"):
        read_osm(txt)
    with pytest.raises(GeoInputError, match="no CRS"):
        read_osm({"x": gpd.GeoDataFrame({"building": ["yes"]}, geometry=[shapely.box(0, 0, 1, 1)])})
