"""Twin variation (issue 6): building styles, tag dropout, and `neuralmaps synth` on a town never
trained on (pyrosm's `test_pbf`, a sparsely tagged Finnish town)."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

from neuralmaps.classes import AREA_CLASSES, VOID, class_id
from neuralmaps.config import BUILDING_STYLES, Config, SynthConfig, preset
from neuralmaps.geo import Region, read_osm
from neuralmaps.geo.osm import OPTIONAL_TAGS, TagDropout
from neuralmaps.geometry import PinholeCamera
from neuralmaps.synth.appearance import Appearance
from neuralmaps.synth.materials import GroundMat
from neuralmaps.synth.render import camera_pose
from neuralmaps.synth.styles import BuildingStyles
from neuralmaps.synth.world import World

from test_synth_world import CRS, X0, Y0, helsinki_region, toy_frames

NO_VARIATION = SynthConfig(building_styles=(), tag_dropout=0.0, district_m=0.0)
TOY_REGION = Region.from_bounds((X0, Y0, X0 + 100, Y0 + 100), CRS, 0.5)
# A 64 x 128 view from the sidewalk (y = 46 m) up at the toy building's south wall (y = 60 m).
CAMERA = PinholeCamera(torch.tensor([128, 64, 64.0, 64.0, 64, 32, 0, 0], dtype=torch.float64))
POSE = camera_pose(70.0, 46.0, 1.6, np.pi / 2, pitch=0.35)
APPEARANCE = Appearance(seed=1)


@functools.lru_cache(maxsize=None)
def toy_world(styles: tuple[str, ...], seed: int = 3, height: str | None = "12") -> World:
    """The toy world of test_synth_world with one building style (cached: treat it as read-only)."""
    frames = toy_frames()
    frames["buildings"]["height"] = [height]
    return World.from_osm(frames, TOY_REGION, seed=seed, ground_resolution_m=0.5, progress=False,
                          variation=SynthConfig(building_styles=styles, tag_dropout=0.0))


def facade(world: World) -> np.ndarray:
    r = world.render(CAMERA, POSE, APPEARANCE)
    wall = r.labels == class_id("building")
    assert wall.mean() > 0.5  # the wall fills most of the view
    return r.rgb.astype(np.float32), wall


def test_styles_change_the_rendered_facades_deterministically():
    """Each style renders the same 12 m building (tagged height: the geometry is the same) with its
    own facade: colours, windows and wall texture differ between every two styles; a rebuild with
    the same seed renders the same pixels, another seed other ones."""
    views = {}
    for s in BUILDING_STYLES:
        w = toy_world((s,))
        assert w.building_heights[0] == pytest.approx(12.0) and list(w.styles.style) == [0]
        views[s] = facade(w)
    for i, a in enumerate(BUILDING_STYLES):
        for b in BUILDING_STYLES[i + 1:]:
            both = views[a][1] & views[b][1]
            diff = np.abs(views[a][0] - views[b][0])[both].mean()
            assert diff > 8.0, (a, b, diff)  # measured 20-103 levels
    rgb, wall = views["brick"]
    np.testing.assert_array_equal(facade(toy_world.__wrapped__(("brick",)))[0], rgb)  # a rebuild
    other = facade(toy_world(("brick",), seed=4))[0]
    assert np.abs(other - rgb)[wall].mean() > 3.0  # measured 13


def test_wall_lines_show_up_close_and_blend_at_a_distance():
    """Courses, boards and corrugation darken lines of the wall seen from 3 m (a few % of its
    pixels by more than 8 levels), and are box-filtered over the pixel footprint from 14 m: no
    line pixel stands out (no moire), while the wall darkens on average by about as much."""
    close_cam = PinholeCamera(torch.tensor([128, 128, 128.0, 128.0, 64, 64, 0, 0], dtype=torch.float64))
    close_pose = camera_pose(70.0, 57.0, 4.0, np.pi / 2)
    for s in ("brick", "wood", "industrial"):
        darker = {}
        for name, cam, pose in (("close", close_cam, close_pose), ("far", CAMERA, POSE)):
            w = toy_world((s,))
            lined = w.render(cam, pose, APPEARANCE)
            saved = w.styles.line_u_frac.copy(), w.styles.line_v_frac.copy()
            try:  # the same building without its lines
                w.styles.line_u_frac[:], w.styles.line_v_frac[:] = 0, 0
                w._facade_table = None
                plain = w.render(cam, pose, APPEARANCE)
            finally:
                (w.styles.line_u_frac[:], w.styles.line_v_frac[:]), w._facade_table = saved, None
            d = (plain.rgb.astype(np.float32) - lined.rgb).mean(-1)[lined.labels == class_id("building")]
            darker[name] = (float((d > 8).mean()), float(d.mean()))
        (close_frac, close_mean), (far_frac, far_mean) = darker["close"], darker["far"]
        assert close_frac > 0.04 and far_frac < 0.01, (s, darker)  # measured 0.08-0.36 and 0
        assert 0.5 < far_mean / close_mean < 2.0, (s, darker)  # measured 0.76-1.12


def test_style_heights_fill_in_missing_height_tags():
    """A building without height tags takes its style's storeys (wooden houses 1-2, glass 4-10);
    the original palette keeps OSM's default, and a tagged height wins under any style."""
    wood = [toy_world(("wood",), seed=s, height=None).building_heights[0] for s in range(3)]
    glass = [toy_world(("glass",), seed=s, height=None).building_heights[0] for s in range(3)]
    assert max(wood) <= 2 * 3.1 + 1 + 1e-4 and min(glass) >= 4 * 3.5 + 1 - 1e-4, (wood, glass)
    assert toy_world((), height=None).building_heights[0] == pytest.approx(15.0)  # geo.osm's default


def test_style_draws_are_per_building_and_districts_mix_styles():
    """Styles depend on (seed, building id, district) only: a subset in another order draws the same;
    with 200 m districts two districts hold different mixtures, without districts the styles are
    uniform."""
    ids = np.arange(1000, 3000, dtype=np.int64)
    xy = np.where(ids[:, None] % 2 == 0, [[100.0, 100.0]], [[500.0, 100.0]])  # two districts
    st = BuildingStyles.draw_styled(ids, 0, BUILDING_STYLES, xy, district_m=200.0)
    sub = BuildingStyles.draw_styled(ids[::-7], 0, BUILDING_STYLES, xy[::-7], district_m=200.0)
    np.testing.assert_array_equal(sub.style, st.style[::-7])
    np.testing.assert_array_equal(sub.facade, st.facade[::-7])
    hist = [np.bincount(st.style[k::2], minlength=len(BUILDING_STYLES)) / 1000 for k in (0, 1)]
    assert np.abs(hist[0] - hist[1]).sum() > 0.3, hist  # different mixtures per district
    flat = BuildingStyles.draw_styled(ids, 0, BUILDING_STYLES, xy, district_m=0.0)
    assert np.abs(np.bincount(flat.style) / len(ids) - 1 / len(BUILDING_STYLES)).max() < 0.04
    with pytest.raises(ValueError, match="unknown building style.*known"):
        BuildingStyles.draw_styled(ids, 0, ("stucco", "gothic"))


def test_tag_dropout_removes_tags_at_about_the_rate(helsinki_pbf):
    """Helsinki read with 30 % dropout (no districts) loses ~30 % of each frequent optional tag,
    and the layers show it: fewer sidewalk / crossing ways and crossing nodes, fewer heights from
    tags. The same feature loses the same tags in a crop."""
    full = read_osm(helsinki_pbf)
    sparse = read_osm(helsinki_pbf, dropout=TagDropout(0.3, seed=0))
    counts = sparse.dropped_tags
    assert set(counts) == set(OPTIONAL_TAGS)
    present, dropped = (sum(v[i] for v in counts.values()) for i in (0, 1))
    assert present > 1500 and abs(dropped / present - 0.3) < 0.03, counts  # measured 584 / 1926 = 0.303
    for tag, (n, d) in counts.items():
        if n >= 150:
            assert abs(d / n - 0.3) < 0.06, (tag, n, d)  # measured 0.28-0.34

    def kinds(layers):
        fw, pts = layers.footways, layers.points
        return {"sidewalk": int((fw.kind == "sidewalk").sum()), "crossing": int((fw.kind == "crossing").sum()),
                "node": int((pts.kind == "crossing").sum()),
                "tagged": int((layers.buildings.height_source != "default").sum())}

    k_full, k_sparse = kinds(full), kinds(sparse)
    for name in k_full:
        assert 0.6 < k_sparse[name] / k_full[name] < 0.8, (name, k_full, k_sparse)  # measured 0.66-0.73
    # Lanes / widths dropped: road widths fall back to the class defaults, features stay.
    assert len(sparse.roads) == len(full.roads) and len(sparse.buildings) == len(full.buildings)
    crop = read_osm(helsinki_pbf, helsinki_region(), dropout=TagDropout(0.3, seed=0))
    ids = set(crop.footways.id[crop.footways.kind == "crossing"])
    assert ids and ids <= set(sparse.footways.id[sparse.footways.kind == "crossing"])


def test_district_dropout_rates_average_the_rate():
    """Over districts the rate varies from ~0 to ~1 with mean `rate`: rich and sparse quarters."""
    x, y = np.meshgrid(np.arange(100) * 200.0 + 50, np.arange(100) * 200.0 + 50)
    for p in (0.1, 0.3, 0.6):
        r = TagDropout(p, seed=5, district_m=200.0).rates_at(x.ravel(), y.ravel())
        assert abs(r.mean() - p) < 0.015 and (r < 0.1).mean() > 0.02 and (r > 0.7).mean() > 0.02, (p, r.mean())
    same = TagDropout(0.3, seed=5, district_m=200.0).rates_at(np.array([10.0, 190.0, 210.0]), np.array([5.0, 5.0, 5.0]))
    assert same[0] == same[1] != same[2]
    assert np.all(TagDropout(0.3, seed=5).rates_at(x.ravel(), y.ravel()) == 0.3)


def test_labels_follow_the_dropped_tags(helsinki_pbf):
    """With every optional tag dropped, the Senate Square world has no crosswalk anywhere, neither
    in its ground labels nor painted (no zebra), while the fully tagged rasterizer has thousands of
    crosswalk pixels there; and its ground labels remain the rasterizer's classes of the world's
    own (sparse) layers, pixel for pixel."""
    from neuralmaps.geo.rasterize import rasterize_osm

    region = helsinki_region()
    w = World.from_osm(helsinki_pbf, region, seed=0, ground_resolution_m=0.2, progress=False,
                       variation=SynthConfig(tag_dropout=1.0))
    assert all(n == d for n, d in w.variation["dropped_tags"].values())
    reg = Region.from_xarray(w.ground_dataset())
    hot = np.asarray(rasterize_osm(w.layers, reg))
    for c in AREA_CLASSES:
        np.testing.assert_array_equal(w.ground_label == class_id(c), hot[class_id(c)] > 0, err_msg=c)
    np.testing.assert_array_equal(w.ground_label == VOID, hot[[class_id(c) for c in AREA_CLASSES]].sum(0) == 0)
    assert not (w.ground_label == class_id("crosswalk")).any() and not (w.ground_mat == GroundMat.ZEBRA).any()
    tagged = np.asarray(rasterize_osm(read_osm(helsinki_pbf, region), reg))
    assert tagged[class_id("crosswalk")].sum() > 2000


def test_configs_without_variation_knobs_read_back_without_variation(helsinki_pbf, tmp_path):
    """Stores and checkpoints written before the knobs existed had no variation: their configs
    read back so; new configs vary by default; a pre-built world that disagrees with the config is
    refused before anything is written."""
    d = preset("cpu-tiny").to_dict()
    for k in ("building_styles", "tag_dropout", "district_m"):
        d["synth"].pop(k)
    old = Config.from_dict(d).synth
    assert (old.building_styles, old.tag_dropout, old.district_m) == ((), 0.0, 0.0)
    new = preset("cpu-tiny").synth
    assert new.building_styles == BUILDING_STYLES and new.tag_dropout > 0 and new.district_m > 0
    cfg = preset("cpu-tiny").with_overrides(["synth.tag_dropout=0", "synth.building_styles=[]"])
    same = preset("cpu-tiny")
    same.synth.tag_dropout, same.synth.building_styles = 0.0, ()
    assert cfg.fingerprint() == same.fingerprint()  # one spelling per value: 0 and 0.0 agree
    from neuralmaps.synth import write_training_chunks

    legacy = toy_world(())
    with pytest.raises(ValueError, match="pre-built world has twin variation"):
        write_training_chunks(helsinki_pbf, tmp_path / "s.zarr", 1, config=preset("cpu-tiny"), world=legacy,
                              progress=False)
    with pytest.raises(ValueError, match="unknown building style"):
        write_training_chunks(helsinki_pbf, tmp_path / "s.zarr", 1,
                              config=preset("cpu-tiny").with_overrides(["synth.building_styles=[adobe]"]))
    assert not (tmp_path / "s.zarr").exists()


# A ~290 m box of the other town whose 3 map runs and 2 query runs (seed 0) give a train and a test pair.
OTHER_TOWN_BBOX = "26.955451,60.529692,26.960732,60.532298"


def test_synth_on_a_town_never_trained_on(tmp_path):
    """`neuralmaps synth` on pyrosm's other extract (sparse tags: no sidewalks or crossings mapped
    as ways, 10 of 2208 buildings with levels) writes a store whose semantic rasters, images and
    recorded variation are those of that town."""
    import pyrosm
    import xarray as xr

    from neuralmaps.cli import main
    from neuralmaps.data import SceneDataset
    from neuralmaps.data.store import SPLIT_NAMES

    out = tmp_path / "other.zarr"
    code = main(["synth", "--osm", pyrosm.get_data("test_pbf"), "--bbox", OTHER_TOWN_BBOX, "--out", str(out),
                 "--pairs", "2", "--map-runs", "3", "--query-runs", "2", "--quiet"])
    assert code == 0
    ds = xr.open_zarr(out, decode_coords="all")
    assert ds.rio.crs.to_epsg() == 32635
    assert sum(len(SceneDataset(out, split=s)) for s in SPLIT_NAMES) == 2
    variation = json.loads(ds.attrs["twin_variation"])
    assert variation["building_styles"] == list(BUILDING_STYLES) and variation["tag_dropout"] == 0.3
    assert variation["dropped_tags"]["building"][0] > 0  # building=residential etc.
    sem = ds["semantic"].values
    assert sem[:, class_id("road")].sum() > 0 and ds["query_image"].values.std() > 10
