"""Ray-cast renderer: depth, labels, shadows, sky, orthophoto orientation, camera consistency."""

from __future__ import annotations

import math

import numpy as np
import pytest
import shapely
import torch

from neuralmaps.geometry import FisheyeCamera, PinholeCamera, Transform3D
from neuralmaps.synth.appearance import Appearance, Occluders
from neuralmaps.synth.materials import VOID, GroundMat, class_id
from neuralmaps.synth.render import camera_pose, render_orthophoto, render_view, tonemap
from neuralmaps.synth.world import World, WorldBuilder

CAM = PinholeCamera.from_fov(256, 128, 90.0, dtype=torch.float64)
NOON = Appearance(sun_azimuth_deg=180.0, sun_elevation_deg=45.0, cloud_cover=0.0)  # sun due south


@pytest.fixture(scope="module")
def box_world() -> World:
    """100 x 100 m, one 20 x 20 x 15 m building at x, y in [40, 60] x [60, 80] (north-east of the
    centre), a road strip y in [30, 40] and a tree at (15, 15)."""
    b = WorldBuilder("EPSG:32635", (386000.0, 6672000.0), (100.0, 100.0), seed=0)
    assert b.add_building(shapely.box(40, 60, 60, 80), 15.0, building_id=7) == 10
    b.add_tree(15.0, 15.0, 8.0, 2.5)
    mat = np.full((1000, 1000), GroundMat.BARE, np.uint8)
    lab = np.full((1000, 1000), VOID, np.uint8)
    rows = slice(1000 - 400, 1000 - 300)  # y in [30, 40] m (row 0 is north)
    mat[rows], lab[rows] = GroundMat.ASPHALT, class_id("road")
    b.set_ground(mat, lab, 0.1)
    return b.build()


def unproject_depth(cam, T: Transform3D, depth: np.ndarray, ij: np.ndarray) -> np.ndarray:
    """World points (N, 3) of pixels ij (N, 2) = (row, col) from a z-depth map."""
    p2d = torch.tensor(ij[:, ::-1] + 0.5, dtype=torch.float64)
    rays = cam.unproject(p2d)
    z = torch.tensor(depth[ij[:, 0], ij[:, 1]], dtype=torch.float64)
    return T.transform(rays / rays[:, 2:] * z[:, None]).numpy()


def test_facade_depth_and_label(box_world):
    T = camera_pose(50.0, 40.0, 2.0, yaw=math.pi / 2)  # 20 m south of the south facade, looking north
    out = render_view(box_world, CAM, T, NOON)
    assert out.rgb.shape == (128, 256, 3) and out.rgb.dtype == np.uint8
    assert out.depth.dtype == np.float32 and out.labels.dtype == np.uint8
    # A fronto-parallel wall has the same z-depth at every pixel: 20 m.
    wall = out.labels == class_id("building")
    assert wall[64, 100:156].all()
    np.testing.assert_allclose(out.depth[wall], 20.0, atol=2e-3)
    # The wall is 20 m wide: columns where the centre row sees it span 2 * 128 * 10 / 20 px.
    assert wall[64].sum() == pytest.approx(256 * 10 / 20, abs=1)


def test_ground_depth_looking_down(box_world):
    h = 3.0
    T = camera_pose(20.0, 35.0, h, yaw=0.0, pitch=-math.pi / 2)
    out = render_view(box_world, CAM, T, NOON)
    assert out.depth[63:65, 127:129] == pytest.approx(h, abs=1e-4)
    np.testing.assert_allclose(out.depth, h, atol=1e-3)  # flat ground: constant z-depth
    assert out.labels[64, 128] == class_id("road")


def test_sky_is_void_above_the_horizon(box_world):
    T = camera_pose(50.0, 40.0, 2.0, yaw=-math.pi / 2)  # looking south, away from the building
    out = render_view(box_world, CAM, T, NOON)
    sky = out.labels[:63] == VOID
    assert sky.all() and np.isinf(out.depth[:63]).all()
    assert np.isfinite(out.depth[65:]).all()  # below the horizon: the ground plane
    # The sky is not a constant colour (gradient + noise), and changes with the appearance.
    assert out.rgb[:63].reshape(-1, 3).std(0).max() > 2
    other = render_view(box_world, CAM, T, Appearance.sample(5))
    assert np.abs(other.rgb[:63].astype(float) - out.rgb[:63]).mean() > 5


def test_building_shadow_is_darker(box_world):
    # Sun due south at 45 deg: the 15 m building shadows the ground 0-15 m north of it (y 80-95).
    ortho = render_orthophoto(box_world, (0, 0, 100, 100), 0.5, NOON)
    px = lambda x, y: ortho[int((100 - y) / 0.5), int(x / 0.5)].astype(float)  # noqa: E731
    shade, sun = px(50, 88), px(50, 50)
    assert shade.sum() < 0.6 * sun.sum()
    # Street level: the same ground, seen from the west, is darker in the shadow.
    T = camera_pose(25.0, 88.0, 2.0, yaw=0.0)  # looking east along y = 88
    out = render_view(box_world, CAM, T, NOON)
    # Without the building the same pixels are lit.
    no_bld = WorldBuilder("EPSG:32635", box_world.origin, (100.0, 100.0))
    no_bld.set_ground(box_world.ground_mat, box_world.ground_label, 0.1)
    lit = render_view(no_bld.build(), CAM, T, NOON)
    # Ground straight ahead with x in 42-58 m (15-35 m east of the camera) lies in the shadow.
    ground = (out.labels == VOID) & np.isfinite(out.depth) & (out.depth > 17) & (out.depth < 33)
    ground[:, :118] = ground[:, 138:] = False
    assert ground.sum() > 50
    assert out.rgb[ground].mean() < 0.7 * lit.rgb[ground].mean()


def test_orthophoto_north_up_and_roof_colour(box_world):
    ortho = render_orthophoto(box_world, (0, 0, 100, 100), 0.25, NOON)
    assert ortho.shape == (400, 400, 3)
    # Roof pixels: the building spans x 40-60 (cols 160-240), y 60-80 (rows 80-160).
    roof = ortho[90:150, 170:230].reshape(-1, 3).astype(float)
    ground = ortho[300:340, 300:340].reshape(-1, 3).astype(float)
    alb = box_world.styles.roof[0]
    chroma = lambda c: c / c.sum()  # noqa: E731  (texture changes brightness, not hue)
    expected = chroma(tonemap(alb[None] * 1.5, NOON).astype(float)[0])
    assert np.abs(chroma(roof.mean(0)) - expected).max() < 0.03
    assert np.abs(roof.mean(0) - ground.mean(0)).max() > 10 or np.abs(chroma(roof.mean(0)) - chroma(ground.mean(0))).max() > 0.03
    # The building is in the north-east of the centre: top half of the image, right of centre.
    diff = np.abs(ortho.astype(float) - ground.mean(0)).sum(-1) > 40
    diff[:, :150] = False  # ignore the tree (south-west) and the road strip
    rows, cols = np.nonzero(diff[:200])
    assert rows.mean() < 200 and cols.mean() > 160


def test_project_unproject_consistency(box_world):
    T = camera_pose(30.0, 45.0, 1.7, yaw=math.radians(70), pitch=math.radians(-5))
    out = render_view(box_world, CAM, T, NOON)
    ij = np.argwhere(np.isfinite(out.depth))[::97]
    pw = unproject_depth(CAM, T, out.depth, ij)
    p2d, valid = CAM.project(T.inv().transform(torch.from_numpy(pw)))
    assert valid.all()
    np.testing.assert_allclose(p2d.numpy(), ij[:, ::-1] + 0.5, atol=1e-3)
    # The 3D points lie on the surfaces they are labelled with.
    lab = out.labels[ij[:, 0], ij[:, 1]]
    np.testing.assert_allclose(pw[lab != class_id("building"), 2], 0.0, atol=2e-3)  # ground
    bld = pw[lab == class_id("building")]
    assert len(bld) > 10
    on_face = np.minimum.reduce([np.abs(bld[:, 0] - 40), np.abs(bld[:, 0] - 60), np.abs(bld[:, 1] - 60),
                                 np.abs(bld[:, 1] - 80), np.abs(bld[:, 2] - 15)])
    assert on_face.max() < 2e-3


def test_fisheye_matches_pinhole_geometry(box_world):
    T = camera_pose(50.0, 40.0, 2.0, yaw=math.pi / 2)
    fish = FisheyeCamera.from_fov(256, 128, 150.0, k1=0.02, max_fov_deg=150.0, dtype=torch.float64)
    out = render_view(box_world, fish, T, NOON)
    # Centre of the image: the south facade at 20 m (z-depth), as with the pinhole.
    assert out.labels[64, 128] == class_id("building")
    assert out.depth[63:65, 127:129] == pytest.approx(20.0, abs=2e-3)
    # Image corners lie outside the 150 deg field of view: void, no depth, black.
    assert out.labels[0, 0] == VOID and np.isinf(out.depth[0, 0]) and not out.rgb[0, 0].any()
    ij = np.argwhere(np.isfinite(out.depth))[::53]
    pw = unproject_depth(fish, T, out.depth, ij)
    p2d, valid = fish.project(T.inv().transform(torch.from_numpy(pw)))
    assert valid.all()
    np.testing.assert_allclose(p2d.numpy(), ij[:, ::-1] + 0.5, atol=1e-2)


def test_occluders_render_and_cast_shadows(box_world):
    from neuralmaps.synth.world import WorldBuilder as Builder

    ob = Builder(box_world.crs, box_world.origin, box_world.size_m)
    ob.add_box((20.0, 50.0, 1.0), (2.0, 2.0, 2.0), VOID, (0.8, 0.1, 0.1))
    occ = Occluders(*ob.mesh_arrays(), num_objects=1)
    with_occ = NOON.with_occluders(occ)
    T = camera_pose(10.0, 50.0, 1.0, yaw=0.0)  # 9 m west of the box's west face
    a = render_view(box_world, CAM, T, with_occ)
    b = render_view(box_world, CAM, T, NOON)
    assert a.labels[64, 128] == VOID and a.depth[64, 128] == pytest.approx(9.0, abs=2e-3)
    assert b.depth[64, 128] > 50  # without occluders: the ray goes on to the ground far away
    assert int(a.rgb[64, 128, 0]) > int(a.rgb[64, 128, 2]) + 30  # red box
    # Its shadow (sun due south): ground just north of the box is darker with the occluder.
    oa = render_orthophoto(box_world, (15, 45, 25, 55), 0.25, with_occ)
    ob_ = render_orthophoto(box_world, (15, 45, 25, 55), 0.25, NOON)
    r, c = int((55 - 52.5) / 0.25), int((20 - 15) / 0.25)
    assert oa[r, c].astype(float).sum() < 0.6 * ob_[r, c].astype(float).sum()


def test_render_is_deterministic(box_world):
    T = camera_pose(30.0, 20.0, 2.0, yaw=1.0)
    app = Appearance.sample(11)
    a, b = render_view(box_world, CAM, T, app), render_view(box_world, CAM, T, Appearance.sample(11))
    np.testing.assert_array_equal(a.rgb, b.rgb)
    np.testing.assert_array_equal(a.depth, b.depth)


def test_bad_inputs_raise_clear_errors(box_world):
    with pytest.raises(TypeError, match="PinholeCamera"):
        render_view(box_world, "camera", camera_pose(0, 0, 2, 0.0))
    with pytest.raises(ValueError, match="4, 4"):
        render_view(box_world, CAM, np.eye(3))
    with pytest.raises(ValueError, match="resolution"):
        render_orthophoto(box_world, (0, 0, 10, 10), 0.0)


def test_helsinki_street_view(helsinki_pbf):
    from neuralmaps.geo import Region
    from neuralmaps.geo.crs import lonlat_to_crs, utm_crs_for

    crs = utm_crs_for(24.952, 60.1695)
    x, y = lonlat_to_crs(24.952, 60.1695, crs)  # Senate Square
    w = World.from_osm(helsinki_pbf, Region.from_bounds((x - 150, y - 100, x + 50, y + 100), crs, 0.2), progress=False)
    road = np.argwhere(w.ground_label == class_id("road"))
    rng = np.random.default_rng(0)
    seen = set()
    for k in rng.choice(len(road), 6, replace=False):
        r, c = road[k]
        x, y = (c + 0.5) * w.ground_res, (w.ground_mat.shape[0] - r - 0.5) * w.ground_res
        out = w.render(CAM, camera_pose(x, y, 2.0, yaw=float(rng.uniform(-3, 3))), Appearance.sample(int(k)))
        seen |= set(np.unique(out.labels).tolist())
        # Bottom row, centre: flat ground 2 m below, z-depth h f / (v - cy) (unless a pole is in the way).
        if out.labels[-1, 128] in (class_id("road"), class_id("sidewalk"), class_id("crosswalk"), VOID):
            assert out.depth[-1, 128] == pytest.approx(2.0 * 128 / 63.5, rel=1e-4)
    assert {class_id("road"), class_id("building"), VOID} <= seen


def test_orthophoto_supersampling_averages_stripes():
    """A 0.5 m stripe pattern seen at 1 m per pixel: point sampling aliases to all-white or all-black
    pixels, area sampling gives the grey average."""
    b = WorldBuilder("EPSG:32635", (386000.0, 6672000.0), (20.0, 20.0), seed=0)
    mat = np.full((40, 40), GroundMat.ASPHALT, np.uint8)
    mat[:, ::2] = GroundMat.ZEBRA  # 0.5 m ground pixels: alternate columns
    b.set_ground(mat, np.full((40, 40), VOID, np.uint8), 0.5)
    w = b.build()
    point = render_orthophoto(w, (0, 0, 20, 20), 1.0, NOON, supersample=1).astype(float).mean(-1)
    area = render_orthophoto(w, (0, 0, 20, 20), 1.0, NOON, supersample=4).astype(float).mean(-1)
    white = render_orthophoto(w, (0, 0, 0.5, 20), 0.5, NOON, supersample=1).astype(float).mean()
    assert point.std() < 6 and area.std() < 6  # both uniform: no stripe pattern at 1 m
    asphalt = point.mean()  # pixel centres (x = 0.5 + k m) fall on the asphalt columns
    assert asphalt < 0.6 * white
    assert asphalt + 20 < area.mean() < white - 20  # area sampling: the average of both


def test_occluder_ray_culling_changes_nothing(box_world, monkeypatch):
    """The coarse-grid culling of occluder rays (primary and shadow) is exact: same image without it."""
    ob = WorldBuilder(box_world.crs, box_world.origin, box_world.size_m)
    rng = np.random.default_rng(0)
    for x, y in rng.uniform(5, 95, (12, 2)):
        ob.add_box((x, y, 0.8), (4.3, 1.8, 1.6), VOID, rng.uniform(0, 1, 3), yaw=float(rng.uniform(0, 3)))
    low_sun = Appearance(sun_azimuth_deg=250.0, sun_elevation_deg=12.0, occluders=Occluders(*ob.mesh_arrays(), 12))
    T = camera_pose(50.0, 20.0, 1.5, yaw=1.3, pitch=-0.2)
    ortho = render_orthophoto(box_world, (0, 0, 100, 100), 0.5, low_sun, supersample=1)
    view = render_view(box_world, CAM, T, low_sun).rgb
    monkeypatch.setattr(Occluders, "near", lambda self, xy, *a, **k: np.ones(len(xy), bool))
    np.testing.assert_array_equal(ortho, render_orthophoto(box_world, (0, 0, 100, 100), 0.5, low_sun, supersample=1))
    np.testing.assert_array_equal(view, render_view(box_world, CAM, T, low_sun).rgb)


def test_noise_is_smooth_periodic_and_seeded():
    from neuralmaps.synth.noise import NoiseTexture, value_noise

    x = np.linspace(-50, 50, 2001)
    y = np.full_like(x, 3.3)
    a = value_noise(x, y, 4.0, seed=1)
    assert a.min() >= -1 and a.max() <= 1 and a.std() > 0.2
    assert np.abs(np.diff(a)).max() < 0.1  # 5 cm steps on a 4 m lattice: continuous
    np.testing.assert_array_equal(a, value_noise(x, y, 4.0, seed=1))
    assert not np.allclose(a, value_noise(x, y, 4.0, seed=2))
    np.testing.assert_allclose(value_noise(x + 8 * 4.0, y, 4.0, 1, period=8), value_noise(x, y, 4.0, 1, period=8), atol=1e-6)
    tex = NoiseTexture(seed=3, size=64, res=0.1, cells_px=(16, 4), gains=(0.6, 0.4))
    xc, yc = np.arange(-500, 500) * 0.1 + 0.05, np.full(1000, 3.35)  # texel centres: no rounding ties
    np.testing.assert_array_equal(tex.lookup(xc, yc), tex.lookup(xc + 6.4, yc - 6.4))  # period 64 texels


def test_sensor_noise_and_vignetting(box_world):
    import dataclasses

    T = camera_pose(50.0, 40.0, 2.0, yaw=math.pi / 2)
    clean = render_view(box_world, CAM, T, NOON).rgb.astype(float)
    noisy_app = dataclasses.replace(NOON, sensor_noise=2.0)
    noisy = render_view(box_world, CAM, T, noisy_app).rgb.astype(float)
    diff = (noisy - clean)[clean.max(-1) < 240]  # away from clipping
    assert abs(diff.mean()) < 0.2 and 1.6 < diff.std() < 2.4
    np.testing.assert_array_equal(noisy, render_view(box_world, CAM, T, noisy_app).rgb)  # deterministic
    T2 = camera_pose(50.0, 40.5, 2.0, yaw=math.pi / 2)
    n2 = render_view(box_world, CAM, T2, noisy_app).rgb.astype(float) - render_view(box_world, CAM, T2, NOON).rgb
    assert np.corrcoef(diff.ravel()[:5000], n2[clean.max(-1) < 240].ravel()[:5000])[0, 1] < 0.2  # new pose, new noise
    vig = render_view(box_world, CAM, T, dataclasses.replace(NOON, vignetting=0.3)).rgb.astype(float)
    assert np.abs(vig[60:68, 124:132] - clean[60:68, 124:132]).max() <= 1  # centre untouched
    assert vig[:4, :4].mean() < 0.92 * clean[:4, :4].mean()  # corners darker
