"""Training pairs from the digital twin: sampling (which query, scene and map views, in which split)
and rendering. The store they go to (format, create, open, check, write, lock) is
`neuralmaps.data.store`; this module only produces pairs and hands them to its `StoreWriter`.

A pair (SNAP's pair-scene-view mode; docs/architecture.md): map views (images, `T_scene_view`,
intrinsics, run, time), the scene's aerial and semantic rasters (north-up, `cell_m`), one query
view from another run with its ground-truth `T_scene_query`, and the split. Frames: the scene
frame is x east, y north, z up with its origin at the scene's SW corner at ground level;
`scene_origin` is that corner's CRS easting/northing. World-local frame (the digital twin's) =
CRS − `world.origin`, ground at z = 0.

Splits are areas: a pair's split is the split of the 150 m block holding its scene, query and map
views (`assign_splits`, `plan_pairs`); there is no fallback to another split's block. Every pair
is planned before the store is touched, so a split without candidates is refused up front.
Pair i depends only on (seed, i), the world and the runs, so a resumed run yields the same data as
an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .. import __version__
from ..config import CLASS_NAMES, Config, preset
from ..data import store
from ..data.store import CAMERA_MODELS, SPLIT_NAMES

__all__ = [
    "SPLIT_BLOCK_M",
    "write_training_chunks",
    "assign_splits",
    "sampling_context",
    "plan_pairs",
    "pair_split",
    "default_run_counts",
    "block_of_xy",
    "T_scene_world",
    "data_fingerprint",
]

SPLIT_BLOCK_M = 150.0  # side of the square areas (aligned to CRS multiples) that are assigned a split
MAX_ATTEMPTS_PER_PAIR = 400
GOLDEN_FRACTION = (math.sqrt(5.0) - 1.0) / 2.0  # low-discrepancy split sequence
QUERY_RUN_FRACTION = 0.5  # share of queries drawn from pedestrian query runs (rest: other map runs)
MIN_QUERY_OVERLAP = 0.3  # fraction of the query's BEV frustum that must lie inside the scene
PLACEMENT_MARGIN_M = 1.0  # "anywhere" placement: the query camera at least this far inside its scene
MAX_VIEW_DEPTH_M = 32.0  # scene points farther than this from a camera do not count as covered
SOURCE_CHUNK = 1 << 20


# -- conventions ---------------------------------------------------------------------------------
def T_scene_world(scene_origin_en: Sequence[float], world_origin_en: Sequence[float]) -> np.ndarray:
    """(4, 4) float64 transform from the world-local frame to the scene frame.

    Both frames are x east, y north, z up with ground at z = 0; they differ by the translation
    between the scene's SW corner and the world origin (both CRS easting, northing in metres).
    """
    T = np.eye(4)
    T[0, 3] = float(world_origin_en[0]) - float(scene_origin_en[0])
    T[1, 3] = float(world_origin_en[1]) - float(scene_origin_en[1])
    return T


def default_run_counts(num_pairs: int) -> tuple[int, int]:
    """(map runs, query runs) simulated for `num_pairs` pairs: at least 24 and 12 (so that a small
    store of a whole extract still has a query-capable block for every split), and one map run per
    8 pairs (one query run per 16), so that pairs spread over the extract rather than repeating
    the few places where a dozen runs overlap."""
    return max(24, math.ceil(num_pairs / 8)), max(12, math.ceil(num_pairs / 16))


def block_of_xy(x: float | np.ndarray, y: float | np.ndarray, block_m: float = SPLIT_BLOCK_M):
    """Integer (bx, by) of the split block containing CRS point(s) (x, y)."""
    return np.floor(np.asarray(x) / block_m).astype(np.int64), np.floor(np.asarray(y) / block_m).astype(np.int64)


def _block_rank(bx: int, by: int) -> float:
    """A fixed pseudo-random number in [0, 1) of block (bx, by) (sha256; independent of the seed
    and of the extract), the order in which `assign_splits` deals blocks out."""
    h = hashlib.sha256(f"neuralmaps-split:{int(bx)}:{int(by)}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2.0**64


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
    f = np.asarray(fractions, dtype=float)
    if f.shape != (3,) or not np.isfinite(f).all() or (f < 0).any() or not math.isclose(f.sum(), 1.0, abs_tol=1e-6):
        raise ValueError(f"split_fractions must be 3 non-negative numbers summing to 1, got {tuple(fractions)}")
    return f


def assign_splits(weights: dict[tuple[int, int], float], fractions: Sequence[float]) -> dict[tuple[int, int], int]:
    """Split index (into SPLIT_NAMES) of every block in `weights` ({(bx, by): weight >= 0}, the
    number of views in the block that can be a pair's query).

    Blocks are dealt out heaviest first (ties in a fixed pseudo-random order, `_block_rank`), each
    to the split that lags its fraction of the total weight most; once only as many weighted blocks
    remain as splits (of non-zero fraction) still without one, each of those gets one (ties: the
    split that `pair_split` draws first, so 3 pairs of 2 blocks are train and test). So every
    split gets about its fraction of the places pairs can come from, and a split is empty only when
    fewer weighted blocks exist than splits. Blocks of weight 0 go to the split that lags most.
    A fixed hash per block (the rule before) left Helsinki's val area without one mapping road
    (issue 10): with ~60 usable blocks and a 10 % fraction, chance decided whether val got any.
    Deterministic in (weights, fractions).
    """
    f = _check_fractions(fractions)
    for b, w in weights.items():
        if not (math.isfinite(float(w)) and float(w) >= 0):
            raise ValueError(f"block {b}: weight must be finite and >= 0, got {w}")
    order = sorted(weights, key=lambda b: (-float(weights[b]), _block_rank(*b), b))
    total = float(sum(float(weights[b]) for b in order))
    live = f > 0
    weighted = [b for b in order if float(weights[b]) > 0]
    dealt = np.zeros(3)
    first_use = [next((i for i in range(10_000) if pair_split(i, f) == s), 10_000) for s in range(3)]
    out: dict[tuple[int, int], int] = {}
    for k, b in enumerate(order):
        w = float(weights[b])
        lag = np.where(live, f * total - dealt, -np.inf)
        empty = [s for s in range(3) if live[s] and s not in out.values()]
        if w > 0 and empty and len(weighted) - k <= len(empty):
            # the last weighted blocks: one per empty split, first to the split small stores need first
            s = max(empty, key=lambda s: (lag[s], -first_use[s]))
        else:
            s = int(np.argmax(lag))
        dealt[s] += w
        out[(int(b[0]), int(b[1]))] = s
    return out


def data_fingerprint(config: Config) -> str:
    """Fingerprint of the config sections that change the stored data (scene, synth)."""
    return config.fingerprint("scene", "synth")


def _sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(SOURCE_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# -- pose / camera adapters (the geometry module's types, as plain numpy) ---------------------------
def _pose_matrix(T: Any) -> np.ndarray:
    """(4, 4) float64 of a Transform3D, torch tensor or array."""
    if hasattr(T, "matrix"):
        T = T.matrix()
    if hasattr(T, "detach"):
        T = T.detach().cpu().numpy()
    return np.asarray(T, dtype=np.float64).reshape(4, 4)


def _bad_poses(T: np.ndarray) -> np.ndarray:
    """(N,) bool: which of the (N, 4, 4) poses are non-finite or not rigid (rotation, last row)."""
    T = T.reshape(-1, 4, 4)
    with np.errstate(invalid="ignore"):
        R = T[:, :3, :3]
        ortho = np.abs(R @ R.transpose(0, 2, 1) - np.eye(3)).max((1, 2)) < 1e-4
        det = np.abs(np.linalg.det(np.nan_to_num(R)) - 1.0) < 1e-4
        last = np.abs(T[:, 3] - (0, 0, 0, 1)).max(1) < 1e-9
    return ~(np.isfinite(T).all((1, 2)) & ortho & det & last)


def _check_pose(T: np.ndarray, what: str) -> None:
    """Reject a non-finite or non-rigid (4, 4) pose with a message naming `what`."""
    if not np.isfinite(T).all():
        raise ValueError(f"{what}: pose has non-finite values (NaN/inf); refusing to write it")
    if _bad_poses(T)[0]:
        raise ValueError(f"{what}: pose is not a rigid transform (rotation or last row invalid): {T.tolist()}")


def _intrinsics(camera: Any) -> np.ndarray:
    """(8,) float64 `[w, h, fx, fy, cx, cy, k1, k2]`."""
    t = camera.to_tensor()
    t = t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
    return np.asarray(t, dtype=np.float64).reshape(-1)[:8]


def _camera_model(camera: Any) -> int:
    """Index into CAMERA_MODELS of a geometry camera (its `model` name)."""
    model = getattr(camera, "model", "pinhole")
    if model not in CAMERA_MODELS:
        raise ValueError(f"unsupported camera model {model!r}; expected one of {CAMERA_MODELS}")
    return CAMERA_MODELS.index(model)


def _days(t: Any) -> float:
    """A run/frame time as days (float): datetimes via their POSIX timestamp, numbers as days."""
    if hasattr(t, "timestamp"):
        return float(t.timestamp()) / 86400.0
    if isinstance(t, np.datetime64):
        return float((t - np.datetime64("1970-01-01T00:00:00")) / np.timedelta64(1, "s")) / 86400.0
    return float(t)


# -- the table of all captured views ---------------------------------------------------------------
@dataclass
class _Views:
    """Every view of every frame of every run, flattened (N views)."""

    run: np.ndarray  # (N,) int, index into runs
    frame: np.ndarray  # (N,) int, frame index in its run
    name: np.ndarray  # (N,) int, index into camera_names
    T_world_cam: np.ndarray  # (N, 4, 4) float64, world-local frame
    time_days: np.ndarray  # (N,) float64
    is_query_run: np.ndarray  # (N,) bool
    cameras: list  # (N,) camera objects
    camera_names: list[str]
    vehicle: np.ndarray  # (N,) int, index into vehicle_types
    vehicle_types: list[str]

    @property
    def xy(self) -> np.ndarray:
        return self.T_world_cam[:, :2, 3]


def _run_time_days(run: Any, frame: Any) -> float:
    """Time of a frame in days since the POSIX epoch: its own timestamp when absolute (datetime),
    else the run's start time plus the frame's timestamp in seconds."""
    ts = getattr(frame, "timestamp", None)
    if isinstance(ts, (np.datetime64,)) or hasattr(ts, "timestamp"):
        return _days(ts)
    return _days(run.time) + (float(ts) / 86400.0 if ts is not None else 0.0)


def _view_table(runs: Sequence[Any]) -> _Views:
    """Flatten the runs' views, validating every pose (a NaN pose fails here, before any write)."""
    rows: list[tuple] = []
    names: list[str] = []
    vehicle_types = sorted({str(getattr(r, "vehicle", "")) for r in runs})
    for r, run in enumerate(runs):
        for f, frame in enumerate(run.frames):
            for name, (camera, T) in frame.views.items():
                M = _pose_matrix(T)
                if name not in names:
                    names.append(name)
                rows.append((r, f, names.index(name), M, _run_time_days(run, frame), run.kind == "query", camera,
                             vehicle_types.index(str(getattr(run, "vehicle", "")))))
    if not rows:
        raise ValueError("the simulated runs contain no views")
    run, frame, name, T, t, q, cams, veh = zip(*rows)
    bad = np.flatnonzero(_bad_poses(np.stack(T)))
    if len(bad):  # name the first bad view
        k = int(bad[0])
        _check_pose(T[k], f"run {runs[run[k]].run_id!r} frame {frame[k]} view {names[name[k]]!r}")
    return _Views(
        np.asarray(run), np.asarray(frame), np.asarray(name), np.stack(T), np.asarray(t, dtype=np.float64),
        np.asarray(q, dtype=bool), list(cams), names, np.asarray(veh), vehicle_types,
    )


# -- pair sampling -----------------------------------------------------------------------------------
@dataclass
class _PairPlan:
    scene_origin: np.ndarray  # (2,) CRS E, N of the SW corner
    views: np.ndarray  # (v,) indices into _Views, v <= num_views
    query: int  # index into _Views
    overlap: float
    observed: float
    block: tuple[int, int]
    split: int


def _scene_points(size_xy: tuple[float, float], n: tuple[int, int] = (6, 8), heights=(0.0, 1.5)) -> np.ndarray:
    """(P, 3) sample points of a scene (scene frame): a regular ground grid at a few heights."""
    xs = (np.arange(n[0]) + 0.5) / n[0] * size_xy[0]
    ys = (np.arange(n[1]) + 0.5) / n[1] * size_xy[1]
    g = np.stack(np.meshgrid(xs, ys, heights, indexing="ij"), -1).reshape(-1, 3)
    return g


def _frustum_points(depth_m: float, hfov_deg: float, n: int = 16) -> np.ndarray:
    """(P, 3) polar samples of a BEV frustum in the camera's ground frame: x forward, y left (m),
    and an area weight (∝ range) so that weighted sums are area fractions."""
    r = np.sqrt((np.arange(n) + 0.5) / n) * depth_m
    a = np.deg2rad(hfov_deg) * ((np.arange(2 * n) + 0.5) / (2 * n) - 0.5)
    rr, aa = np.meshgrid(r, a, indexing="ij")
    w = rr.reshape(-1)  # weight ∝ r so that the polar samples are area-uniform
    pts = np.stack([rr * np.cos(aa), rr * np.sin(aa)], -1).reshape(-1, 2)
    return np.concatenate([pts, w[:, None]], 1)


def _forward_xy(T_world_cam: np.ndarray) -> np.ndarray:
    """(..., 2) unit ground direction of the optical axis (camera +z) of (..., 4, 4) poses."""
    d = T_world_cam[..., :2, 2]
    return d / np.maximum(np.linalg.norm(d, axis=-1, keepdims=True), 1e-9)


def _visible(views: _Views, idx: np.ndarray, points_world: np.ndarray) -> np.ndarray:
    """(len(idx), P) bool: which world-local points (P, 3) project inside each view's image, in
    front of the camera and closer than MAX_VIEW_DEPTH_M (no occlusion test)."""
    import torch

    idx = np.asarray(idx, dtype=np.int64)
    out = np.zeros((len(idx), len(points_world)), dtype=bool)
    T = views.T_world_cam[idx]
    p_cam = np.einsum("npk,nkj->npj", points_world[None] - T[:, None, :3, 3], T[:, :3, :3])  # R^T (p - t)
    near = np.linalg.norm(p_cam, axis=-1) < MAX_VIEW_DEPTH_M
    groups: dict[int, list[int]] = {}
    for k, i in enumerate(idx):  # one batched projection per camera object (rig cameras are shared)
        groups.setdefault(id(views.cameras[i]), []).append(k)
    for ks in groups.values():
        cam = views.cameras[idx[ks[0]]]
        _, valid = cam.project(torch.from_numpy(p_cam[ks]).to(torch.float32))
        out[ks] = valid.numpy().astype(bool) & near[ks]
    return out


@dataclass
class _Context:
    config: Config
    views: _Views
    world_origin: np.ndarray  # (2,) CRS E, N of the world-local origin
    world_bounds: tuple[float, float, float, float]  # CRS bounds where scenes may lie
    fractions: tuple[float, float, float]
    block_m: float
    layout: dict[tuple[int, int], int]  # (bx, by) -> split of every block with roads or captures
    query_blocks: dict[int, list[tuple[np.ndarray, np.ndarray]]]  # split -> per block (query-run, map-run)
    # views that can be queries (see _query_pools, _group_by_split_block)


def _query_pools(
    views: _Views, config: Config, world_origin: np.ndarray, block_m: float
) -> tuple[np.ndarray, np.ndarray]:
    """Views that can be a pair's query, as (query-run views, map-run views): those with enough map
    views of other runs nearby, in the time window and the same split block (a necessary
    condition; `_sample_pair` checks the rest). Map-run views serve as queries too (their map views
    then come from other map runs): pedestrian runs alone rarely cross the map runs enough."""
    from scipy.spatial import cKDTree

    c = config
    V = views
    map_idx = np.flatnonzero(~V.is_query_run)
    if len(map_idx) == 0:
        raise ValueError("no map-run views: simulate at least one map run")
    xy = V.xy + world_origin
    bx, by = block_of_xy(xy[:, 0], xy[:, 1], block_m)
    tree = cKDTree(xy[map_idx])
    reach = c.scene.max_view_distance_m + 0.6 * c.scene.query_depth_m + 6.0
    pools = []
    for pool in (np.flatnonzero(V.is_query_run), map_idx):
        ok = np.zeros(len(pool), bool)
        for k, (q, near) in enumerate(zip(pool, tree.query_ball_point(xy[pool], reach))):
            n = map_idx[np.asarray(near, dtype=np.int64)]
            n = n[(V.run[n] != V.run[q]) & (bx[n] == bx[q]) & (by[n] == by[q])
                  & (np.abs(V.time_days[n] - V.time_days[q]) <= c.synth.query_max_time_delta_days)]
            ok[k] = len(n) >= c.synth.min_views_in_scene
        pools.append(pool[ok])
    if not (len(pools[0]) or len(pools[1])):
        raise ValueError(
            "no query view has enough map views of other runs nearby (same split block, within "
            f"{c.synth.query_max_time_delta_days} days): simulate more or longer capture runs"
        )
    return pools[0], pools[1]


def pair_split(i: int, fractions: Sequence[float]) -> int:
    """Split index that pair i is drawn for: a golden-ratio sequence over `fractions`, so that every
    prefix of the pairs holds the splits in proportion (12 pairs: 10 train, 1 val, 1 test) and
    pair i depends on i alone."""
    u = ((int(i) + 0.5) * GOLDEN_FRACTION) % 1.0
    return int(min(np.searchsorted(np.cumsum(np.asarray(fractions, float)), u, side="right"), 2))


def _group_by_split_block(
    pools: tuple[np.ndarray, np.ndarray], xy_crs: np.ndarray, layout: dict[tuple[int, int], int], block_m: float
) -> dict[int, list[tuple[np.ndarray, np.ndarray]]]:
    """Query candidates grouped as {split: [(query-run views, map-run views) of one block, ...]}, blocks
    sorted, so that pairs are spread over blocks instead of piling up where most runs overlap."""
    bx, by = block_of_xy(xy_crs[:, 0], xy_crs[:, 1], block_m)
    out: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {0: [], 1: [], 2: []}
    both = np.concatenate(pools)
    for kx, ky in sorted(set(zip(bx[both].tolist(), by[both].tolist()))):
        members = tuple(p[(bx[p] == kx) & (by[p] == ky)] for p in pools)
        out[layout[(kx, ky)]].append(members)
    return out


def sampling_context(world: Any, runs: Sequence[Any], config: Config, block_m: float = SPLIT_BLOCK_M) -> _Context:
    """Everything pair sampling needs (no rendering): the view table (poses validated), the split
    layout of the world's blocks (`assign_splits`, weighted by each block's query candidates) and
    the query candidates of each split's blocks. The layout depends on the runs (seed, run counts):
    it is stored in the store's attrs (`split_blocks`); take train and val pairs from one store."""
    views = _view_table(runs)
    world_origin = np.asarray(world.origin, dtype=np.float64)[:2]
    bounds = tuple(float(b) for b in world.region.bounds)
    fractions = tuple(float(v) for v in config.synth.split_fractions)
    xy = views.xy + world_origin
    pools = _query_pools(views, config, world_origin, block_m)
    # Weight of a block: its views that can be a query; every block of the world is in the layout.
    (bx0, by0), (bx1, by1) = (block_of_xy(bounds[0], bounds[1], block_m), block_of_xy(bounds[2], bounds[3], block_m))
    weights = {(bx, by): 0.0 for bx in range(int(bx0), int(bx1) + 1) for by in range(int(by0), int(by1) + 1)}
    both = np.concatenate(pools)
    for b in zip(*(v.tolist() for v in block_of_xy(xy[both, 0], xy[both, 1], block_m))):
        weights[b] = weights.get(b, 0.0) + 1.0
    layout = assign_splits(weights, fractions)
    return _Context(config, views, world_origin, bounds, fractions, block_m, layout,
                    _group_by_split_block(pools, xy, layout, block_m))


def plan_pairs(pairs: Sequence[int], seed: int, ctx: _Context) -> list[_PairPlan]:
    """The plans (query, scene, map views, split) of pairs `pairs`, without rendering anything.

    Pair i is drawn for split `pair_split(i)` and placed in a block of that split, never elsewhere.
    Raises ValueError, before any pair is rendered, when a split that the pairs need has no block
    with query candidates (the message names the split's blocks and what to do), or when a pair
    finds no placement in its split's blocks.
    """
    need = sorted({pair_split(i, ctx.fractions) for i in pairs})
    empty = [k for k in need if not ctx.query_blocks[k]]
    if empty:
        raise ValueError(_no_candidates_message(empty, ctx))
    return [_sample_pair(i, seed, ctx) for i in pairs]


def _no_candidates_message(empty: Sequence[int], ctx: _Context) -> str:
    parts = []
    for k in empty:
        blocks = sorted(b for b, s in ctx.layout.items() if s == k)
        where = ", ".join(f"({bx},{by})" for bx, by in blocks[:8]) + (" ..." if len(blocks) > 8 else "")
        parts.append(f"{SPLIT_NAMES[k]} ({len(blocks)} blocks of {ctx.block_m:.0f} m: {where or 'none'})")
    c = ctx.config.synth
    return (
        "the " + "; ".join(parts) + " area has no view that can be a query: no capture there has "
        f"{c.min_views_in_scene} map views of other runs in the same block within "
        f"{c.query_max_time_delta_days} days. A pair's split is the split of its area, so these "
        "pairs cannot be drawn: simulate more mapping runs (--map-runs), write more pairs (run "
        "counts grow with --pairs), or choose a larger --bbox"
    )


def _sample_pair(i: int, seed: int, ctx: _Context) -> _PairPlan:
    """Choose pair i's query view, scene placement and map views; depends only on (seed, i, ctx)."""
    cfg = ctx.config
    sx, sy = cfg.scene.size_m[:2]
    cell = cfg.scene.cell_m
    V = ctx.views
    rng = np.random.default_rng([int(seed), int(i), 0x5EED])
    # Draw the split first, then a block of that split, then a view in it. Never another split's
    # block (issue 10: that fallback silently left a 600-pair store without val pairs).
    split = pair_split(i, ctx.fractions)
    groups = ctx.query_blocks[split]
    if not groups:
        raise ValueError(_no_candidates_message([split], ctx))
    fr = _frustum_points(cfg.scene.query_depth_m, cfg.scene.query_hfov_deg)
    cam_xy_crs = V.xy + ctx.world_origin
    bvx, bvy = block_of_xy(cam_xy_crs[:, 0], cam_xy_crs[:, 1], ctx.block_m)
    pts_scene = _scene_points((sx, sy))
    x0, y0, x1, y1 = ctx.world_bounds
    for attempt in range(MAX_ATTEMPTS_PER_PAIR):
        ped, car = groups[int(rng.integers(len(groups)))]
        # Half the queries from pedestrian runs (when any qualify), half from other map runs.
        pool = ped if len(ped) and (not len(car) or rng.random() < QUERY_RUN_FRACTION) else car
        q = int(rng.choice(pool))
        Tq = V.T_world_cam[q]
        q_xy = Tq[:2, 3] + ctx.world_origin
        fwd = _forward_xy(Tq)
        if cfg.synth.query_placement == "ahead":  # the scene centre a few metres ahead of the query, jittered
            centre = q_xy + fwd * rng.uniform(2.0, 0.6 * cfg.scene.query_depth_m) + rng.normal(0.0, 3.0, 2)
        else:  # "anywhere": the camera uniform over the scene, PLACEMENT_MARGIN_M from its edges
            centre = q_xy + rng.uniform(-1.0, 1.0, 2) * (np.array([sx, sy]) / 2 - PLACEMENT_MARGIN_M)
        # SW corner snapped to the cell lattice.
        origin = np.round((centre - np.array([sx, sy]) / 2) / cell) * cell
        if origin[0] < x0 or origin[1] < y0 or origin[0] + sx > x1 or origin[1] + sy > y1:
            continue
        # The scene and the query camera must lie in one split block.
        bx0, by0 = block_of_xy(origin[0], origin[1], ctx.block_m)
        bx1, by1 = block_of_xy(origin[0] + sx - 1e-6, origin[1] + sy - 1e-6, ctx.block_m)
        bqx, bqy = block_of_xy(q_xy[0], q_xy[1], ctx.block_m)
        if not (bx0 == bx1 == bqx and by0 == by1 == bqy):
            continue
        # Overlap: area fraction of the query's BEV frustum inside the scene.
        left = np.array([-fwd[1], fwd[0]])
        pts = q_xy + fr[:, :1] * fwd + fr[:, 1:2] * left
        wgt = fr[:, 2]
        rel = pts - origin
        in_scene = (rel[:, 0] >= 0) & (rel[:, 0] < sx) & (rel[:, 1] >= 0) & (rel[:, 1] < sy)
        overlap = float((wgt * in_scene).sum() / wgt.sum())
        if overlap < MIN_QUERY_OVERLAP:
            continue
        # Map-view candidates: other runs, near the scene centre, same block, within the time window.
        c = origin + np.array([sx, sy]) / 2
        cand = np.flatnonzero(
            (V.run != V.run[q])
            & ~V.is_query_run
            & (np.linalg.norm(cam_xy_crs - c, axis=1) <= cfg.scene.max_view_distance_m)
            & (bvx == bqx) & (bvy == bqy)
            & (np.abs(V.time_days - V.time_days[q]) <= cfg.synth.query_max_time_delta_days)
        )
        if len(cand) < cfg.synth.min_views_in_scene:
            continue
        cand = cand[rng.permutation(len(cand))]
        pts_world = pts_scene + np.r_[origin - ctx.world_origin, 0.0]
        vis = _visible(V, cand, pts_world)
        chosen = _greedy_cover(vis, cand, V, cfg.scene.num_views)
        if len(chosen) < cfg.synth.min_views_in_scene:
            continue
        chosen_idx = cand[chosen]
        # Observed: frustum samples inside the scene and seen by a chosen map view (ground points).
        in_pts = np.c_[pts[in_scene] - ctx.world_origin, np.zeros(int(in_scene.sum()))]
        seen = _visible(V, chosen_idx, in_pts).any(0) if len(in_pts) else np.zeros(0, bool)
        observed = float((wgt[in_scene] * seen).sum() / wgt.sum())
        assert ctx.layout[(int(bqx), int(bqy))] == split  # the query's block is one of the split's
        return _PairPlan(origin, chosen_idx, q, overlap, observed, (int(bqx), int(bqy)), split)
    raise ValueError(
        f"pair {i} ({SPLIT_NAMES[split]}): found no valid scene/query placement in {MAX_ATTEMPTS_PER_PAIR} "
        f"attempts in the {len(groups)} {SPLIT_NAMES[split]} block(s) with captures: simulate more "
        "mapping runs (--map-runs) or choose a larger --bbox"
    )


def _greedy_cover(vis: np.ndarray, cand: np.ndarray, V: _Views, k: int) -> list[int]:
    """Up to k candidate positions (into `cand`) greedily covering the scene points, preferring
    views from different frames; candidates seeing nothing are never chosen."""
    covered = np.zeros(vis.shape[1], dtype=bool)
    chosen: list[int] = []
    used_frames: set[tuple[int, int]] = set()
    for _ in range(k):
        gain = (vis & ~covered).sum(1).astype(float)
        gain += 0.5 * (vis.sum(1) > 0)  # still useful when everything is covered
        for j in chosen:
            gain[j] = -1
        frames = [(int(V.run[c]), int(V.frame[c])) for c in cand]
        gain -= 0.25 * np.array([f in used_frames for f in frames])
        j = int(np.argmax(gain))  # ties: first in the (seeded) random order
        if gain[j] <= 0 or vis[j].sum() == 0:
            break
        chosen.append(j)
        covered |= vis[j]
        used_frames.add(frames[j])
    return chosen


# -- rendering one pair ------------------------------------------------------------------------------
def _image_u8(rgb: Any, hw: tuple[int, int], what: str) -> np.ndarray:
    a = np.asarray(rgb)
    if a.shape != (hw[0], hw[1], 3) or a.dtype != np.uint8:
        raise ValueError(f"{what}: renderer returned {a.dtype} {a.shape}, expected uint8 {(hw[0], hw[1], 3)}")
    return a


def _render_pair(i: int, plan: _PairPlan, ctx: _Context, world: Any, runs: Sequence[Any], class_raster: Any,
                 class_region: Any, aerial_appearance: Any) -> dict[str, np.ndarray]:
    """All arrays of pair i (no leading pair dim)."""
    from ..geo import Region

    cfg = ctx.config
    Vn, (H, W) = cfg.scene.num_views, cfg.scene.image_hw
    sx, sy = cfg.scene.size_m[:2]
    V = ctx.views
    T_sw = T_scene_world(plan.scene_origin, ctx.world_origin)

    out: dict[str, np.ndarray] = {
        "map_image": np.zeros((Vn, H, W, 3), np.uint8),
        "map_T_scene_view": np.tile(np.eye(4), (Vn, 1, 1)),
        "map_camera": np.zeros((Vn, 8)),
        "map_camera_model": np.full(Vn, -1, np.int8),
        "map_run": np.full(Vn, -1, np.int16),
        "map_frame": np.full(Vn, -1, np.int32),
        "map_camera_name": np.full(Vn, -1, np.int8),
        "map_vehicle": np.full(Vn, -1, np.int8),
        "map_time_days": np.zeros(Vn),
        "map_view_mask": np.zeros(Vn, bool),
    }
    for k, v in enumerate(plan.views):
        cam, run = V.cameras[v], runs[V.run[v]]
        T = T_sw @ V.T_world_cam[v]
        _check_pose(T, f"pair {i} map view {k}")
        r = world.render(cam, V.T_world_cam[v], run.appearance)
        out["map_image"][k] = _image_u8(r.rgb, (H, W), f"pair {i} map view {k}")
        out["map_T_scene_view"][k] = T
        out["map_camera"][k] = _intrinsics(cam)
        out["map_camera_model"][k] = _camera_model(cam)
        out["map_run"][k] = V.run[v]
        out["map_frame"][k] = V.frame[v]
        out["map_camera_name"][k] = V.name[v]
        out["map_vehicle"][k] = V.vehicle[v]
        out["map_time_days"][k] = V.time_days[v]
        out["map_view_mask"][k] = True

    q = plan.query
    cam, run = V.cameras[q], runs[V.run[q]]
    Tq = T_sw @ V.T_world_cam[q]
    _check_pose(Tq, f"pair {i} query")
    r = world.render(cam, V.T_world_cam[q], run.appearance)
    out["query_image"] = _image_u8(r.rgb, (H, W), f"pair {i} query")
    out["query_depth"] = np.asarray(r.depth, dtype=np.float32).reshape(H, W)
    out["query_labels"] = np.asarray(r.labels).astype(np.uint8).reshape(H, W)
    out["query_T_scene_cam"] = Tq
    out["query_camera"] = _intrinsics(cam)
    out["query_camera_model"] = np.int8(_camera_model(cam))
    out["query_run"] = np.int16(V.run[q])
    out["query_frame"] = np.int32(V.frame[q])
    out["query_camera_name"] = np.int8(V.name[q])
    out["query_vehicle"] = np.int8(V.vehicle[q])
    out["query_time_days"] = np.float64(V.time_days[q])
    out["query_time_delta_days"] = np.float32(np.abs(V.time_days[plan.views] - V.time_days[q]).min())
    out["query_overlap"] = np.float32(plan.overlap)
    out["query_observed"] = np.float32(plan.observed)

    # Rasters of the scene, north-up at cell_m: aerial rendered per scene, semantics cropped.
    scene_bounds = (plan.scene_origin[0], plan.scene_origin[1], plan.scene_origin[0] + sx, plan.scene_origin[1] + sy)
    scene_region = Region.from_bounds(scene_bounds, class_region.crs, cfg.scene.cell_m)
    ny, nx = round(sy / cfg.scene.cell_m), round(sx / cfg.scene.cell_m)
    if scene_region.shape != (ny, nx):
        raise ValueError(f"pair {i}: scene grid {scene_region.shape} != expected {(ny, nx)}")
    ys, xs = class_region.slices_of(scene_region)
    sem = np.asarray(class_raster[:, ys, xs]).astype(np.uint8)
    if sem.shape != (len(CLASS_NAMES), ny, nx):
        raise ValueError(f"pair {i}: scene lies outside the class raster ({sem.shape})")
    local = np.subtract(scene_bounds, np.r_[ctx.world_origin, ctx.world_origin])
    aerial = np.asarray(world.render_orthophoto(tuple(local), cfg.scene.cell_m, aerial_appearance))
    if aerial.shape != (ny, nx, 3):
        raise ValueError(f"pair {i}: orthophoto renderer returned {aerial.shape}, expected {(ny, nx, 3)}")
    out["aerial"] = np.ascontiguousarray(aerial.transpose(2, 0, 1))
    out["semantic"] = sem
    out["scene_origin"] = np.asarray(plan.scene_origin, np.float64)
    out["split"] = np.int8(plan.split)
    out["block"] = np.asarray(plan.block, np.int32)
    return out


# -- generator attrs (the format's own attrs: neuralmaps.data.store.format_attrs) -----------------
def _store_attrs(config: Config, seed: int, num_pairs: int, source: Path, source_sha: str, runs: Sequence[Any],
                 views: _Views, layout: dict[str, str], bounds: tuple, world_origin, pairs_per_chunk: int,
                 run_counts: tuple[int, int]) -> dict:
    return {
        "neuralmaps_version": __version__,
        "config": json.dumps(config.to_dict()),
        "config_fingerprint": config.fingerprint(),
        "data_fingerprint": data_fingerprint(config),
        "scene_fingerprint": config.fingerprint("scene"),
        "seed": int(seed),
        "num_pairs": int(num_pairs),
        "pairs_per_chunk": int(pairs_per_chunk),
        "source_path": str(source),
        "source_sha256": source_sha,
        "num_map_runs": int(run_counts[0]),
        "num_query_runs": int(run_counts[1]),
        "world_origin_en": [float(v) for v in world_origin],
        "scene_bounds_limit": [float(v) for v in bounds],
        "split_fractions": list(config.synth.split_fractions),
        "split_block_m": SPLIT_BLOCK_M,
        "split_block_rule": "block (bx, by) = floor(CRS (x, y) / split_block_m); a pair's scene, query "
                            "camera and map cameras all lie in one block, and its split is the block's; "
                            "blocks are dealt to the splits so that each holds its fraction of the views that "
                            "can be queries (neuralmaps.synth.chunks.assign_splits)",
        "split_num_pairs": [int(v) for v in np.bincount(
            [pair_split(i, config.synth.split_fractions) for i in range(num_pairs)], minlength=3)],
        "split_blocks": json.dumps(layout),
        "camera_names": list(views.camera_names),
        "vehicle_types": list(views.vehicle_types),
        "runs": json.dumps([
            {"index": k, "run_id": str(r.run_id), "kind": str(r.kind), "vehicle": str(getattr(r, "vehicle", "")),
             "time_days": _days(r.time), "num_frames": len(r.frames)}
            for k, r in enumerate(runs)
        ]),
        "aerial_appearance": json.dumps({k: v for k, v in dataclasses.asdict(_aerial_appearance()).items()
                                         if k != "occluders"}),
        "frames": "scene: x east, y north, z up, origin at SW corner at ground; cameras: OpenCV",
    }


# -- the entry point ---------------------------------------------------------------------------------
def write_training_chunks(
    osm: str | os.PathLike,
    out: str | os.PathLike,
    num_pairs: int,
    seed: int = 0,
    config: Config | None = None,
    preview_dir: str | os.PathLike | None = None,
    *,
    region: Any = None,
    overwrite: bool = False,
    world: Any = None,
    runs: Sequence[Any] | None = None,
    num_map_runs: int | None = None,
    num_query_runs: int | None = None,
    pairs_per_chunk: int = 1,
    progress: bool = True,
    on_pair_written: Callable[[int], None] | None = None,
    num_previews: int = 4,
) -> Path:
    """Write `num_pairs` map-scene/query pairs of the OSM extract `osm` to the Zarr store `out`.

    Pair i depends only on (seed, i), the world and the runs. An existing store written by the
    same call (format version, scene/synth config, seed, source sha256, N, chunking, crop, run
    counts) is resumed: done pairs are skipped; anything else is a ValueError unless `overwrite`.

    region: crop of the extract, a `neuralmaps.geo.Region` or a (lon_min, lat_min, lon_max,
        lat_max) WGS84 box; None for the whole extract.
    world, runs: pre-built `World` / `simulate_runs` output (benchmarks, tests); built from
        `osm`, `region`, `seed`, `config.synth` (the twin's variation) and `num_map_runs` /
        `num_query_runs` when None. A world built with other variation knobs than
        `config.synth`'s is refused (the store's config would not describe its data).
    num_map_runs, num_query_runs: simulated capture runs; None scales them with `num_pairs`
        (`default_run_counts`), so that large stores cover the whole extract.
    pairs_per_chunk: pairs per Zarr chunk along `pair` (the unit of writing and of resume).
    on_pair_written: called with i after pair i's chunk is marked done.
    preview_dir: when given, PNG previews of the first `num_previews` pairs are written there.
    overwrite: replace an existing store, but only one that neuralmaps wrote (recognised by its
        attrs), and only once the new one is complete: it is built aside and swapped in.
    Returns the (absolute) store path. Raises, before any expensive work: FileNotFoundError for a
    missing `osm`; `neuralmaps.storage.StorageError` for output paths that cannot be written or
    hold something other than a neuralmaps store (nothing is touched), `StoreInUseError` when
    another process writes the store; ValueError (or GeoInputError) for bad input, non-finite /
    non-rigid poses, a split without query candidates and incompatible stores.
    """
    config = config if config is not None else preset("cpu-tiny")
    from .styles import variation_knobs  # light: the world's heavy imports come after the lock

    knobs = variation_knobs(config.synth)  # bad knobs: before any work
    if world is not None:
        built = {k: getattr(world, "variation", {}).get(k) for k in knobs}
        if built != knobs:
            raise ValueError(f"the pre-built world has twin variation {built}, but config.synth says {knobs}; "
                             "build it with World.from_osm(..., variation=config.synth)")
    osm = Path(osm)
    if not osm.is_file():
        raise FileNotFoundError(f"OSM file not found: {osm}")
    num_pairs, pairs_per_chunk = int(num_pairs), int(pairs_per_chunk)
    if num_pairs <= 0 or pairs_per_chunk <= 0:
        raise ValueError(f"num_pairs and pairs_per_chunk must be positive, got {num_pairs}, {pairs_per_chunk}")
    out, state = store.check_output(out, overwrite)  # path problems: before any work
    if preview_dir is not None:
        from ..data.preview import check_preview_dir

        check_preview_dir(preview_dir)
    sx, sy = config.scene.size_m[:2]
    for s in (sx, sy):
        if not math.isclose(s / config.scene.cell_m, round(s / config.scene.cell_m), abs_tol=1e-6):
            raise ValueError(f"scene size {s} m is not a multiple of cell_m {config.scene.cell_m}")
    source_sha = _sha256_file(osm)
    if region is not None and not hasattr(region, "bounds"):
        from ..geo import Region

        region = Region.from_bbox(*region)  # (lon_min, lat_min, lon_max, lat_max)
    crop = None if region is None else [round(float(b), 3) for b in region.bounds]
    if runs is not None:
        num_map_runs = sum(r.kind != "query" for r in runs)
        num_query_runs = len(runs) - num_map_runs
    else:
        default_map, default_query = default_run_counts(num_pairs)
        num_map_runs = default_map if num_map_runs is None else int(num_map_runs)
        num_query_runs = default_query if num_query_runs is None else int(num_query_runs)
    expect = {"data_fingerprint": data_fingerprint(config), "seed": int(seed), "num_pairs": num_pairs,
              "source_sha256": source_sha, "pairs_per_chunk": pairs_per_chunk, "crop_bounds": crop,
              "num_map_runs": int(num_map_runs), "num_query_runs": int(num_query_runs)}

    with store.writer_lock(out):  # a second writer is refused here, at once
        out, state = store.check_output(out, overwrite)  # again: another writer may have made it meanwhile
        store.remove_stale_temps(out)  # of killed writers; no one else writes while we hold the lock
        done = store.open_existing(out, expect) if state == "store" and not overwrite else None
        if done is None or not done.all():
            _write_pairs(out, state, done, osm, source_sha, num_pairs, pairs_per_chunk, seed, config, region, crop,
                         world, runs, num_map_runs, num_query_runs, progress, on_pair_written)
    if preview_dir is not None:
        _previews(out, preview_dir, num_previews)
    return out


def _write_pairs(out: Path, state: str, done: np.ndarray | None, osm: Path, source_sha: str, num_pairs: int,
                 pairs_per_chunk: int, seed: int, config: Config, region: Any, crop: Any, world: Any, runs: Any,
                 num_map_runs: int, num_query_runs: int, progress: bool,
                 on_pair_written: Callable[[int], None] | None) -> None:
    """Build (or reuse) the world and runs, plan every pair still to do, and only then create the
    store (aside when it replaces one) and render and write the pairs."""
    from tqdm.auto import tqdm

    if world is None:
        from .world import World

        world = World.from_osm(str(osm), region=region, seed=seed, progress=progress, variation=config.synth)
    if runs is None:
        from .capture import simulate_runs

        runs = simulate_runs(world, num_map_runs, num_query_runs, seed, config=config, progress=progress)
    ctx = sampling_context(world, runs, config)  # validates every pose
    run_counts = (sum(r.kind != "query" for r in runs), sum(r.kind == "query" for r in runs))
    new_store = done is None
    done = np.zeros(num_pairs, bool) if done is None else done
    todo = [s for s in range(0, num_pairs, pairs_per_chunk) if not done[s:s + pairs_per_chunk].all()]
    # Every pair is planned before the store is touched: a split without candidates is refused here.
    pairs = [i for s in todo for i in range(s, min(s + pairs_per_chunk, num_pairs))]
    plans = dict(zip(pairs, plan_pairs(pairs, seed, ctx)))

    from ..geo import Region

    wreg = world.region
    class_region = Region.from_bounds(wreg.bounds, wreg.crs, config.scene.cell_m)
    target = out
    if new_store:
        # Replacing a store: build the new one aside and swap it in once complete (the old one
        # stays intact until then). A fresh store is written in place (a rerun resumes it).
        target = store.temp_sibling(out, "new") if state == "store" else out
        layout = {f"{bx},{by}": SPLIT_NAMES[k] for (bx, by), k in sorted(ctx.layout.items())}
        attrs = _store_attrs(config, seed, num_pairs, osm.resolve(), source_sha, runs, ctx.views, layout,
                             ctx.world_bounds, ctx.world_origin, pairs_per_chunk, run_counts)
        attrs["crop_bounds"] = crop
        attrs["twin_variation"] = json.dumps(getattr(world, "variation", None), default=list)
        store.create_store(target, num_pairs, config, wreg.crs, attrs, pairs_per_chunk)

    class_raster = _class_raster(world, class_region)
    aerial_appearance = _aerial_appearance()
    bar = tqdm(total=num_pairs, initial=int(done.sum()), desc="pairs", unit="pair", disable=not progress)
    with store.StoreWriter(target, config) as writer:
        for start in todo:
            stop = min(start + pairs_per_chunk, num_pairs)
            items = [_render_pair(i, plans[i], ctx, world, runs, class_raster, class_region, aerial_appearance)
                     for i in range(start, stop)]
            writer.write(start, items)
            bar.update(stop - start - int(done[start:stop].sum()))
            if on_pair_written is not None:
                for i in range(start, stop):
                    on_pair_written(i)
    bar.close()
    if target != out:
        store.swap_into_place(target, out)


def _class_raster(world: Any, region: Any) -> np.ndarray:
    """(K, H, W) uint8 class raster of the whole world on `region`'s grid (computed once)."""
    from ..geo import rasterize_osm

    r = np.asarray(rasterize_osm(world.layers, region))
    if r.shape != (len(CLASS_NAMES), *region.shape):
        raise ValueError(f"rasterize_osm returned {r.shape}, expected {(len(CLASS_NAMES), *region.shape)}")
    return r.astype(np.uint8)


def _aerial_appearance() -> Any:
    """The fixed look of every aerial crop: a clear spring midday, distinct from the runs' sampled
    appearances (so the aerial modality cannot be matched pixel-for-pixel to street views)."""
    from .appearance import Appearance

    return Appearance(seed=0xAE1, sun_azimuth_deg=165.0, sun_elevation_deg=50.0, season="spring",
                      exposure=1.05, cloud_cover=0.1, sun_strength=1.0, ambient=0.4)


def _previews(out: Path, preview_dir: str | os.PathLike, n: int) -> None:
    from ..data.preview import write_previews

    write_previews(out, preview_dir, max_pairs=n)
