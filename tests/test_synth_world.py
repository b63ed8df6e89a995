"""Digital-twin world: building extrusion, street furniture and the painted ground raster."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
import shapely

from neuralmaps.classes import AREA_CLASSES, CLASS_NAMES, VOID, class_id
from neuralmaps.geo import GeoInputError, Region
from neuralmaps.geo.crs import lonlat_to_crs, utm_crs_for
from neuralmaps.synth.materials import FaceMat, GroundMat
from neuralmaps.synth.world import World

CRS = "EPSG:32635"
X0, Y0 = 386000.0, 6672000.0


def helsinki_region(size_m: float = 300.0) -> Region:
    """A square around the Senate Square / cathedral (shifted west: the extract ends ~100 m east)."""
    crs = utm_crs_for(24.952, 60.1695)
    x, y = lonlat_to_crs(24.952, 60.1695, crs)
    return Region.from_bounds((x - 2 * size_m / 3, y - size_m / 2, x + size_m / 3, y + size_m / 2), crs, 0.2)


@pytest.fixture(scope="module")
def helsinki_world(helsinki_pbf) -> World:
    return World.from_osm(helsinki_pbf, helsinki_region(), seed=0, progress=False)


def toy_frames() -> dict[str, gpd.GeoDataFrame]:
    """One 20 x 20 x 12 m building north of an east-west road with a sidewalk, a tree and a lamp."""
    b = gpd.GeoDataFrame({"building": ["yes"], "height": ["12"], "id": [42]},
                         geometry=[shapely.box(X0 + 60, Y0 + 60, X0 + 80, Y0 + 80)], crs=CRS)
    r = gpd.GeoDataFrame({"highway": ["residential"]}, geometry=[shapely.LineString([(X0, Y0 + 40), (X0 + 100, Y0 + 40)])], crs=CRS)
    f = gpd.GeoDataFrame({"kind": ["sidewalk", "crossing"], "width_m": [2.0, 3.0]},
                         geometry=[shapely.LineString([(X0, Y0 + 46), (X0 + 100, Y0 + 46)]),
                                   shapely.LineString([(X0 + 30, Y0 + 34), (X0 + 30, Y0 + 46)])], crs=CRS)
    p = gpd.GeoDataFrame({"kind": ["tree", "street_light"]},
                         geometry=[shapely.Point(X0 + 20, Y0 + 70), shapely.Point(X0 + 50, Y0 + 47)], crs=CRS)
    return {"buildings": b, "roads": r, "footways": f, "points": p}


@pytest.fixture(scope="module")
def toy_world() -> World:
    return World.from_osm(toy_frames(), Region.from_bounds((X0, Y0, X0 + 100, Y0 + 100), CRS, 0.2), seed=3, progress=False)


def test_helsinki_buildings(helsinki_world):
    w = helsinki_world
    assert len(w.building_ids) > 20
    assert np.all((w.building_heights >= 2.5) & (w.building_heights <= 150))
    assert 8 < np.median(w.building_heights) < 40
    bld = w.face_class == class_id("building")
    assert bld.sum() > 100
    # Walls are vertical facades, roofs horizontal tops at the building's height.
    n = w.face_normals
    assert np.all(np.abs(n[w.face_mat == FaceMat.FACADE, 2]) < 0.5)
    roof = w.face_mat == FaceMat.ROOF
    z_roof = w.vertices[w.faces[roof]][..., 2].mean(1)
    assert np.allclose(z_roof, w.building_heights[w.face_owner[roof]], atol=1e-3)
    # Street furniture from the points layer.
    for name in ("street_light", "traffic_sign", "traffic_light"):
        assert (w.face_class == class_id(name)).any(), name


def test_helsinki_ground_raster(helsinki_world):
    w = helsinki_world
    counts = {c: int((w.ground_label == class_id(c)).sum()) for c in ("road", "sidewalk", "crosswalk")}
    assert counts["road"] > 50_000 and counts["sidewalk"] > 50_000 and counts["crosswalk"] > 1_000, counts
    for m in (GroundMat.ASPHALT, GroundMat.PAVING, GroundMat.LANE, GroundMat.ZEBRA, GroundMat.RAIL):
        assert (w.ground_mat == m).any(), m.name
    # Markings are painted only on road / crosswalk ground.
    lane = w.ground_mat == GroundMat.LANE
    assert np.all(w.ground_label[lane] == class_id("road"))


def test_helsinki_ground_labels_are_the_rasterizers_classes(helsinki_world):
    """The twin's ground label is, pixel for pixel, the area class of rasterize_osm's raster of the
    same region (VOID where it has none): one set of shapes and priorities for both."""
    from neuralmaps.geo.rasterize import rasterize_osm

    w = helsinki_world
    reg = Region.from_xarray(w.ground_dataset())
    hot = np.asarray(rasterize_osm(w.layers, reg))
    assert hot.shape[1:] == w.ground_label.shape
    for c in AREA_CLASSES:
        np.testing.assert_array_equal(w.ground_label == class_id(c), hot[class_id(c)] > 0, err_msg=c)
    np.testing.assert_array_equal(w.ground_label == VOID, hot[[class_id(c) for c in AREA_CLASSES]].sum(0) == 0)


def test_helsinki_crossing_nodes_are_painted_where_labelled(helsinki_world):
    """Every crossing node the rasterizer labels as a crosswalk across a road gets zebra stripes
    (0.5 m paint / 0.5 m gap along its walk): about half of its crosswalk pixels or more."""
    from neuralmaps.geo.rasterize import crossing_node_walks

    w = helsinki_world
    walks, _ = crossing_node_walks(w.layers)
    checked = 0
    for walk in walks:
        s = np.linspace(0.0, walk.length, 200)
        xy = w.to_local(np.array([(p.x, p.y) for p in walk.interpolate(s)]))
        mat, lab = w.ground_lookup(xy[:, 0], xy[:, 1])
        on = lab == class_id("crosswalk")
        if on.sum() < 20:  # outside the world, or under a building / a crossing way's own label
            continue
        checked += 1
        frac = float((mat[on] == GroundMat.ZEBRA).mean())
        assert frac > 0.3, (walk.wkt, frac)  # measured 0.45-0.8 (crossings overlap)
    assert checked >= 10, checked


def test_crossing_node_near_a_crossing_way_is_painted_where_labelled():
    """A crossing node 1.5 m east of the toy's crossing way: the rasterizer draws its own 3 m
    crosswalk (x 30-33 m), so the twin paints zebra stripes there too (it used to count the node
    as covered by the way up to 2 m away and left x 31.5-33 m labelled crosswalk but unpainted)."""
    frames = toy_frames()
    frames["points"] = gpd.GeoDataFrame({"kind": ["crossing"]}, geometry=[shapely.Point(X0 + 31.5, Y0 + 40)], crs=CRS)
    w = World.from_osm(frames, Region.from_bounds((X0, Y0, X0 + 100, Y0 + 100), CRS, 0.5), seed=3,
                       ground_resolution_m=0.1, progress=False)
    y = np.arange(34.05, 46.0, 0.1)
    for x in (32.05, 32.55):
        mat, lab = w.ground_lookup(np.full_like(y, x), y)
        on = lab == class_id("crosswalk")
        assert on.sum() > 40, on.sum()
        assert 0.3 < float((mat[on] == GroundMat.ZEBRA).mean()) < 0.7


def test_local_frame_round_trip(helsinki_world):
    w, reg = helsinki_world, helsinki_region()
    assert np.allclose(w.origin, (reg.bounds[0], reg.bounds[1]))
    assert np.allclose(w.size_m, (reg.bounds[2] - reg.bounds[0], reg.bounds[3] - reg.bounds[1]))
    xy = np.array([[reg.bounds[0] + 12.25, reg.bounds[1] + 250.5], [reg.bounds[2], reg.bounds[3]]])
    local = w.to_local(xy)
    assert np.allclose(local[0], (12.25, 250.5)) and np.allclose(local[1], w.size_m)
    np.testing.assert_array_equal(w.to_crs(local), xy)
    # Mesh coordinates are local: small numbers inside the region (plus the OSM margin).
    assert np.abs(w.vertices[:, :2]).max() < 400


def test_toy_world_geometry_and_ground(toy_world):
    w = toy_world
    assert list(w.building_ids) == [42]
    assert w.building_heights[0] == pytest.approx(12.0)
    v = w.vertices[w.faces[w.face_owner == 0]].reshape(-1, 3)
    assert np.allclose(v.min(0), (60, 60, 0), atol=1e-4) and np.allclose(v.max(0), (80, 80, 12), atol=1e-4)
    # Ground: the road centreline at y = 40 is road, the sidewalk at y = 46 sidewalk, far away void.
    mat, lab = w.ground_lookup(np.array([10.0, 10.0, 10.0, 30.0]), np.array([40.0, 46.0, 90.0, 40.0]))
    assert list(lab[:3]) == [class_id("road"), class_id("sidewalk"), VOID]
    assert mat[0] in (GroundMat.ASPHALT, GroundMat.LANE) and mat[1] == GroundMat.PAVING
    assert lab[3] == class_id("crosswalk")
    assert set(np.unique(w.face_class)) == {class_id(c) for c in ("building", "tree", "street_light")}


def test_ground_labels_match_rasterize_osm(toy_world):
    from neuralmaps.geo.rasterize import rasterize_osm

    w = toy_world
    reg = Region.from_bounds((X0, Y0, X0 + 100, Y0 + 100), CRS, 0.1)
    hot = np.asarray(rasterize_osm(toy_frames(), reg))
    for c in ("road", "sidewalk", "crosswalk"):
        np.testing.assert_array_equal(w.ground_label == class_id(c), hot[CLASS_NAMES.index(c)] > 0)


def test_ground_dataset_carries_crs(toy_world):
    ds = toy_world.ground_dataset()
    assert ds.rio.crs.to_epsg() == 32635
    assert float(ds.x[0]) == pytest.approx(X0 + 0.05) and float(ds.y[0]) == pytest.approx(Y0 + 100 - 0.05)
    # One grid: the local ground grid is the CRS grid shifted by the world's origin.
    x, y = toy_world.ground_grid.coords()
    np.testing.assert_allclose(x + toy_world.origin[0], ds.x.values)
    np.testing.assert_allclose(y + toy_world.origin[1], ds.y.values)
    r, c, inside = toy_world.ground_grid.index(np.array([0.01, 99.99, -0.01]), np.array([99.99, 0.01, 50.0]))
    assert r.tolist() == [0, 999, 0] and c.tolist() == [0, 999, 0] and inside.tolist() == [True, True, False]


def test_building_styles_depend_on_seed_and_id():
    a = World.from_osm(toy_frames(), Region.from_bounds((X0, Y0, X0 + 100, Y0 + 100), CRS, 0.5), seed=1,
                       ground_resolution_m=0.5, progress=False)
    b = World.from_osm(toy_frames(), Region.from_bounds((X0, Y0, X0 + 100, Y0 + 100), CRS, 0.5), seed=1,
                       ground_resolution_m=0.5, progress=False)
    c = World.from_osm(toy_frames(), Region.from_bounds((X0, Y0, X0 + 100, Y0 + 100), CRS, 0.5), seed=2,
                       ground_resolution_m=0.5, progress=False)
    np.testing.assert_array_equal(a.styles.facade, b.styles.facade)
    np.testing.assert_array_equal(a.ground_mat, b.ground_mat)
    assert not np.allclose(a.styles.facade, c.styles.facade)


def test_helsinki_buildings_have_distinct_styles(helsinki_world):
    st = helsinki_world.styles
    key = np.round(np.c_[st.facade, st.bay_m, st.storey_m], 3)
    assert len(np.unique(key, axis=0)) == len(key)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(GeoInputError, match="not found"):
        World.from_osm(tmp_path / "nope.osm.pbf")


def test_zero_extruded_buildings_is_an_error(monkeypatch):
    import trimesh

    def broken(*a, **k):
        raise ValueError("no triangulation engine")

    monkeypatch.setattr(trimesh.creation, "extrude_polygon", broken)
    with pytest.raises(GeoInputError, match="mapbox_earcut"):
        World.from_osm(toy_frames(), Region.from_bounds((X0, Y0, X0 + 100, Y0 + 100), CRS, 0.5),
                       ground_resolution_m=0.5, progress=False)


def test_world_from_geopackage(tmp_path):
    path = tmp_path / "toy.gpkg"
    for name, frame in toy_frames().items():
        frame.to_file(path, layer=name, driver="GPKG")
    w = World.from_osm(path, Region.from_bounds((X0, Y0, X0 + 100, Y0 + 100), CRS, 0.5), ground_resolution_m=0.5,
                       progress=False)
    assert list(w.building_ids) == [42] and w.building_heights[0] == pytest.approx(12.0)
    assert (w.ground_label == class_id("sidewalk")).any()


def test_pickle_and_disk_cache(tmp_path, toy_world):
    import pickle

    from neuralmaps.synth.render import camera_pose

    from neuralmaps.geometry import PinholeCamera

    cam = PinholeCamera.from_fov(64, 32, 90.0)
    T = camera_pose(70.0, 40.0, 2.0, yaw=1.2)
    toy_world.scene  # noqa: B018  (an Embree scene exists and must not break pickling)
    again = pickle.loads(pickle.dumps(toy_world))
    np.testing.assert_array_equal(toy_world.render(cam, T).rgb, again.render(cam, T).rgb)

    path = tmp_path / "toy.gpkg"
    for name, frame in toy_frames().items():
        frame.to_file(path, layer=name, driver="GPKG")
    reg = Region.from_bounds((X0, Y0, X0 + 100, Y0 + 100), CRS, 0.5)
    a = World.from_osm(path, reg, ground_resolution_m=0.5, progress=False, cache_dir=tmp_path / "cache")
    files = list((tmp_path / "cache").glob("world-*.pkl"))
    assert len(files) == 1 and not list((tmp_path / "cache").glob("*.tmp*"))
    b = World.from_osm(path, reg, ground_resolution_m=0.5, progress=False, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(a.vertices, b.vertices)
    assert b.build_seconds == a.build_seconds  # loaded, not rebuilt
    World.from_osm(path, reg, seed=5, ground_resolution_m=0.5, progress=False, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("world-*.pkl"))) == 2  # another seed, another entry


def test_oversized_ground_raster_is_refused(monkeypatch):
    import neuralmaps.synth.world as world_mod

    monkeypatch.setattr(world_mod, "MAX_GROUND_PIXELS", 10_000)
    with pytest.raises(GeoInputError, match="crop the region"):
        World.from_osm(toy_frames(), Region.from_bounds((X0, Y0, X0 + 100, Y0 + 100), CRS, 0.5), progress=False)
