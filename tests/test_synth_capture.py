"""Capture simulation: routes on the road / footway graph, rig geometry, appearance, occluders."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neuralmaps.config import preset
from neuralmaps.geo import Region
from neuralmaps.geo.crs import lonlat_to_crs, utm_crs_for
from neuralmaps.synth.capture import Run, simulate_runs
from neuralmaps.synth.materials import VOID, class_id
from neuralmaps.synth.render import camera_pose, render_orthophoto
from neuralmaps.synth.world import World

CFG = preset("cpu-tiny")


@pytest.fixture(scope="module")
def world(helsinki_pbf) -> World:
    crs = utm_crs_for(24.952, 60.1695)
    x, y = lonlat_to_crs(24.952, 60.1695, crs)  # Senate Square; the extract ends ~100 m east
    return World.from_osm(helsinki_pbf, Region.from_bounds((x - 200, y - 150, x + 100, y + 150), crs, 0.2),
                          seed=0, progress=False)


@pytest.fixture(scope="module")
def runs(world) -> list[Run]:
    return simulate_runs(world, num_map_runs=2, num_query_runs=2, seed=0, config=CFG,
                         map_run_length_m=200.0, query_run_length_m=80.0)


def _labels_at(world: World, xy: np.ndarray) -> np.ndarray:
    return world.ground_lookup(xy[:, 0], xy[:, 1])[1]


def test_run_structure(runs):
    assert [r.kind for r in runs] == ["map", "map", "query", "query"]
    assert [r.vehicle for r in runs] == ["car", "car", "pedestrian", "pedestrian"]
    assert len({r.run_id for r in runs}) == 4
    assert len({str(r.time) for r in runs}) == 4  # different dates / times of day
    h, w = CFG.scene.image_hw
    for r in runs:
        assert len(r.frames) >= 5
        ts = np.array([f.timestamp for f in r.frames])
        assert np.all(np.diff(ts) > np.timedelta64(0, "ms")) and ts[0] >= r.time
        names = {"front", "left", "rear", "right"} if r.kind == "map" else {"front"}
        for f in r.frames:
            assert set(f.views) == names
            cam = f.views["front"][0]
            assert cam.size.tolist() == [w, h]
            hfov = 2 * math.degrees(math.atan(w / 2 / float(cam.f[0])))
            assert hfov == pytest.approx(CFG.scene.hfov_deg)


def test_frame_spacing_and_heights(runs):
    for r in runs:
        xy = r.trajectory
        step = np.linalg.norm(np.diff(xy, axis=0), axis=1)
        assert 2.0 <= np.median(step) <= 4.0 and step.max() < 5.0, r.run_id
        for f in r.frames:
            for cam, T in f.views.values():
                z = float(T.t[2])
                if r.kind == "map":
                    assert z == pytest.approx(CFG.scene.map_camera_height_m)
                else:
                    assert abs(z - CFG.scene.query_camera_height_m) < 0.15


def test_cars_on_roads_pedestrians_on_footways(world, runs):
    for r in runs:
        lab = _labels_at(world, r.trajectory)
        if r.kind == "map":
            on_road = np.isin(lab, [class_id("road"), class_id("crosswalk")])
            assert on_road.mean() > 0.9, r.run_id
        else:
            walkable = np.isin(lab, [class_id("sidewalk"), class_id("crosswalk")])
            assert walkable.mean() > 0.7, r.run_id


def test_cars_keep_right(world, runs):
    """Right-hand traffic: the lane is offset to the right of the road centreline."""
    import shapely

    r = world.layers.roads
    r = r[r["drivable"] & (r["highway"] != "service")]
    roads = [shapely.LineString(c) for g in r.geometry.values for c in world.lines_local(g)]
    tree = shapely.STRtree(roads)
    sides = []
    for f in runs[0].frames:
        p = shapely.Point(f.T_world_rig.t[:2].tolist())
        road = roads[tree.nearest(p)]
        s = road.project(p)
        a, b = road.interpolate(max(s - 1, 0)), road.interpolate(min(s + 1, road.length))
        d = np.array([b.x - a.x, b.y - a.y])
        fwd = f.T_world_rig.R[:2, 0].numpy()
        off = np.array([p.x - a.x, p.y - a.y])
        cross = d[0] * off[1] - d[1] * off[0]  # > 0: left of the road's direction
        sides.append(np.sign(cross) * np.sign(d @ fwd))  # relative to the driving direction
    assert np.mean(np.array(sides) < 0) > 0.8  # right of the centreline


def test_rig_geometry(runs):
    f = runs[0].frames[len(runs[0].frames) // 2]
    R_rig = f.T_world_rig.R
    fwd, left = R_rig[:, 0], R_rig[:, 1]
    axes = {name: T.R[:, 2] for name, (cam, T) in f.views.items()}  # optical axes in the world
    torch.testing.assert_close(axes["front"], fwd, atol=1e-9, rtol=0)
    torch.testing.assert_close(axes["rear"], -fwd, atol=1e-9, rtol=0)
    torch.testing.assert_close(axes["left"], left, atol=1e-9, rtol=0)
    torch.testing.assert_close(axes["right"], -left, atol=1e-9, rtol=0)
    for cam, T in f.views.values():  # level cameras: image y points down
        torch.testing.assert_close(T.R[:, 1], torch.tensor([0.0, 0.0, -1.0], dtype=T.R.dtype), atol=1e-9, rtol=0)
    # Query cameras: small yaw / pitch jitter around the walking direction.
    for f in runs[2].frames:
        z = f.views["front"][1].R[:, 2]
        fwd = f.T_world_rig.R[:, 0]
        assert math.degrees(math.acos(float(z @ fwd))) < 25
        assert abs(math.degrees(math.asin(float(z[2])))) < 15


def test_deterministic_by_seed(world, runs):
    again = simulate_runs(world, num_map_runs=2, num_query_runs=2, seed=0, config=CFG,
                          map_run_length_m=200.0, query_run_length_m=80.0)
    for a, b in zip(runs, again):
        assert a.run_id == b.run_id and a.time == b.time
        np.testing.assert_array_equal(a.trajectory, b.trajectory)
        assert a.appearance.sun_azimuth_deg == b.appearance.sun_azimuth_deg
        np.testing.assert_array_equal(a.appearance.occluders.vertices, b.appearance.occluders.vertices)
    cam, T = runs[2].frames[3].views["front"]
    ra, rb = world.render(cam, T, runs[2].appearance), world.render(cam, T, again[2].appearance)
    np.testing.assert_array_equal(ra.rgb, rb.rgb)
    other = simulate_runs(world, num_map_runs=1, num_query_runs=0, seed=1, config=CFG, map_run_length_m=200.0)
    assert not np.array_equal(other[0].trajectory[:5], runs[0].trajectory[:5])


def test_runs_look_different(world, runs):
    cam, T = runs[0].frames[len(runs[0].frames) // 2].views["front"]
    means = [world.render(cam, T, r.appearance.with_occluders(None)).rgb.reshape(-1, 3).mean(0) for r in runs]
    for i in range(len(means)):
        for j in range(i + 1, len(means)):
            assert np.abs(means[i] - means[j]).max() > 2.0, (i, j)


def test_occluders_in_their_run_only(world, runs):
    a, b = runs[0].appearance, runs[1].appearance
    assert len(a.occluders) > 5 and len(b.occluders) > 5
    # The first parked car of run A (its body is the first box: 8 vertices, 4.3 x 1.8 x 1.0 m).
    centre = a.occluders.vertices[:8].mean(0)
    d_b = np.linalg.norm(b.occluders.vertices[:, :2] - centre[:2], axis=1).min()
    assert d_b > 3.0  # run B has no car there
    # Look at it from 8 m away at its mid-height, from the first direction with a clear view.
    cam = runs[0].frames[0].views["front"][0]
    h, w = int(cam.size[1]), int(cam.size[0])
    for ang in np.arange(0, 2 * math.pi, math.pi / 4):
        eye = centre[:2] - 8.0 * np.array([math.cos(ang), math.sin(ang)])
        T = camera_pose(float(eye[0]), float(eye[1]), float(centre[2]), float(ang))
        ra = world.render(cam, T, a)
        if ra.labels[h // 2, w // 2] == VOID and ra.depth[h // 2, w // 2] < 8.0:
            break
    # The near face is 0.9-2.15 m from the centre (half width / half length, or in between).
    assert ra.labels[h // 2, w // 2] == VOID and 5.8 < ra.depth[h // 2, w // 2] < 7.2
    rb = world.render(cam, T, b)
    assert not (rb.labels[h // 2, w // 2] == VOID and rb.depth[h // 2, w // 2] < 8.0)
    # Shadow of the occluders: darker ground around the car with the occluders than without.
    box = (centre[0] - 6, centre[1] - 6, centre[0] + 6, centre[1] + 6)
    with_occ = render_orthophoto(world, box, 0.25, a).astype(float)
    without = render_orthophoto(world, box, 0.25, a.with_occluders(None)).astype(float)
    changed = np.abs(with_occ - without).sum(-1) > 30
    assert changed.mean() > 0.05


def test_solar_position_and_season():
    from neuralmaps.synth.appearance import season_of, solar_position

    az, el = solar_position(np.datetime64("2024-06-21T10:20:00"), 24.95, 60.17)  # Helsinki, solar noon
    assert el == pytest.approx(90 - 60.17 + 23.44, abs=1.0) and az == pytest.approx(180.0, abs=5.0)
    az, el = solar_position(np.datetime64("2024-03-20T06:00:00"), 24.95, 60.17)  # morning, equinox
    assert 90 < az < 150 and 5 < el < 30
    assert [season_of(np.datetime64(f"2024-{m:02d}-15")) for m in (1, 4, 7, 10)] == ["winter", "spring", "summer", "autumn"]
    assert season_of(np.datetime64("2024-01-15"), lat_deg=-33.9) == "summer"


def test_winter_is_snowy(world):
    from neuralmaps.synth.appearance import Appearance

    summer = Appearance(season="summer", cloud_cover=0.0)
    winter = Appearance(season="winter", cloud_cover=0.0)
    b = (0.0, 0.0, 300.0, 300.0)
    s, w = render_orthophoto(world, b, 1.0, summer).astype(float), render_orthophoto(world, b, 1.0, winter).astype(float)
    roof = world.ground_lookup(*np.meshgrid(np.arange(300) + 0.5, 300 - np.arange(300) - 0.5))[1] == class_id("building")
    assert w[roof].mean() > s[roof].mean() + 20  # snow on the roofs
    # Same geometry: only the colours change with the season.
    assert np.abs(w - s).sum(-1).mean() > 10


def test_runs_pickle(world, runs):
    """Runs (with their occluders' Embree scene already built) travel to worker processes."""
    import pickle

    cam, T = runs[0].frames[2].views["left"]
    before = world.render(cam, T, runs[0].appearance).rgb  # builds the occluder scene
    again = pickle.loads(pickle.dumps(runs[0]))
    assert again.run_id == runs[0].run_id and len(again.frames) == len(runs[0].frames)
    cam2, T2 = again.frames[2].views["left"]
    np.testing.assert_array_equal(world.render(cam2, T2, again.appearance).rgb, before)
