"""Capture simulation: mapping runs (cars with a 4-camera rig on drivable roads) and query runs
(pedestrians with one forward camera on footways), each with its own time, appearance and
dynamic occluders. Deterministic in the seed.

Frames: the rig frame is x forward, y left, z up, with its origin on the ground under the vehicle;
`T_world_rig` and the views' `T_world_cam` are in the world-local frame (see world.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from neuralmaps.config import Config
from neuralmaps.geometry import Camera, PinholeCamera, Transform2D, Transform3D, bev_pose_to_camera

from .appearance import Appearance, Occluders, solar_position
from .materials import VOID, class_id

if TYPE_CHECKING:  # pragma: no cover
    from .world import World

__all__ = ["Frame", "Run", "simulate_runs", "RIG_YAWS_DEG"]

RIG_YAWS_DEG = {"front": 0.0, "left": 90.0, "rear": 180.0, "right": -90.0}  # counter-clockwise from forward
CAR_SPEED_MPS = 8.0
WALK_SPEED_MPS = 1.4
MAX_LANE_OFFSET_M = 1.75
QUERY_YAW_JITTER_DEG = 5.0
QUERY_PITCH_JITTER_DEG = 3.0
OCCLUDER_CLEARANCE_M = 3.5
CAR_AVOID_HIGHWAYS = {"service", "track", "living_street"}  # no occluder this close to the run's own trajectory


@dataclass
class Frame:
    """One capture instant: `timestamp` (numpy datetime64[ms], UTC), `T_world_rig` (Transform3D),
    and `views` {camera name: (camera, T_world_cam)}."""

    timestamp: np.datetime64
    T_world_rig: Transform3D
    views: dict[str, tuple[Camera, Transform3D]]


@dataclass
class Run:
    """A capture run. kind: "map" | "query"; vehicle: "car" | "pedestrian"; time: start (datetime64, UTC)."""

    run_id: str
    kind: str
    vehicle: str
    time: np.datetime64
    appearance: Appearance
    frames: list[Frame] = field(default_factory=list)

    @property
    def trajectory(self) -> np.ndarray:
        """Rig positions (N, 2) float64, world-local metres."""
        return np.array([f.T_world_rig.t[:2].tolist() for f in self.frames]).reshape(-1, 2)


def simulate_runs(
    world: "World",
    num_map_runs: int = 4,
    num_query_runs: int = 4,
    seed: int = 0,
    config: Config | None = None,
    map_run_length_m: float = 400.0,
    query_run_length_m: float = 150.0,
    frame_spacing_m: tuple[float, float] = (2.0, 4.0),
    occluders: bool | None = None,
    progress: bool = False,
) -> list[Run]:
    """Simulate capture runs over a world built from OSM (needs `world.layers`).

    Map runs drive random routes on the drivable road graph, in the right-hand lane, a frame every
    `frame_spacing_m` metres, with the 4-camera rig (front, left, rear, right) of
    `config.scene` (image_hw, hfov_deg, map_camera_height_m). Query runs walk footways/sidewalks
    with one forward camera at `query_camera_height_m` with small yaw/pitch jitter. Each run has
    its own date/time, appearance and (if `occluders`, default `config.synth.occluders`) parked cars
    and pedestrians. Runs come back in the order map runs, then query runs; all deterministic in `seed`.
    """
    cfg = config if config is not None else Config()
    use_occ = cfg.synth.occluders if occluders is None else bool(occluders)
    if world.layers is None:
        raise ValueError("simulate_runs: the world has no OSM layers (build it with World.from_osm)")
    h, w = cfg.scene.image_hw
    cam = PinholeCamera.from_fov(w, h, cfg.scene.hfov_deg, dtype=torch.float64)
    roads = _road_network(world, drivable=True)
    walks = _foot_network(world)
    if num_map_runs and not roads.edges:
        raise ValueError(f"simulate_runs: no drivable roads inside the world {world!r}")
    if num_query_runs and not walks.edges:
        raise ValueError(f"simulate_runs: no footways or roads to walk inside the world {world!r}")
    lon, lat = _world_lonlat(world)
    T_rig_cams = {name: _rig_camera(math.radians(a), cfg.scene.map_camera_height_m) for name, a in RIG_YAWS_DEG.items()}
    runs = []
    jobs = [("map", i) for i in range(num_map_runs)] + [("query", i) for i in range(num_query_runs)]
    for kind, i in tqdm(jobs, desc="runs", disable=not progress, leave=False):
        rng = np.random.default_rng([int(seed), 0 if kind == "map" else 1, i])
        t0 = _sample_time(rng, lon, lat)
        if kind == "map":
            path = roads.random_walk(rng, map_run_length_m)
            xy, yaw, s = _sample_poses(path, rng, frame_spacing_m, lane=True)
            speed, vehicle = CAR_SPEED_MPS, "car"
        else:
            path = walks.random_walk(rng, query_run_length_m)
            xy, yaw, s = _sample_poses(path, rng, frame_spacing_m, lane=False)
            speed, vehicle = WALK_SPEED_MPS, "pedestrian"
        occ = _sample_occluders(world, rng, roads, walks, avoid=path.dense(0.5)) if use_occ else None
        app = Appearance.sample(int(rng.integers(2**31)), t0, (lon, lat), occluders=occ)
        frames = []
        for k in range(len(xy)):
            ts = t0 + np.timedelta64(int(1000 * s[k] / speed), "ms")
            T_rig = Transform2D(torch.tensor(yaw[k], dtype=torch.float64), torch.from_numpy(xy[k])).to_3d(0.0)
            if kind == "map":
                views = {name: (cam, T_rig @ T_rc) for name, T_rc in T_rig_cams.items()}
            else:
                dyaw = math.radians(rng.normal(0, QUERY_YAW_JITTER_DEG))
                pitch = math.radians(rng.normal(0, QUERY_PITCH_JITTER_DEG))
                height = cfg.scene.query_camera_height_m + rng.normal(0, 0.03)
                views = {"front": (cam, T_rig @ _rig_camera(dyaw, height, pitch))}
            frames.append(Frame(ts, T_rig, views))
        runs.append(Run(f"s{seed}-{kind}-{i:03d}", kind, vehicle, t0, app, frames))
    return runs


def _rig_camera(yaw: float, height: float, pitch: float = 0.0) -> Transform3D:
    """T_rig_cam of a camera at `height` m looking `yaw` radians left of forward, tilted up by `pitch`."""
    T = Transform2D(torch.tensor(float(yaw), dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    return bev_pose_to_camera(T, float(height), float(pitch))


def _world_lonlat(world: "World") -> tuple[float, float]:
    from neuralmaps.geo.crs import crs_to_lonlat

    c = world.to_crs(np.array([world.size_m[0] / 2, world.size_m[1] / 2]))
    lon, lat = crs_to_lonlat(c[0], c[1], world.crs)
    return float(lon), float(lat)


def _sample_time(rng: np.random.Generator, lon: float, lat: float) -> np.datetime64:
    """A UTC time in 2023-2025 with the sun at least 12 deg up when possible (else the best of 48 draws)."""
    best, best_el = None, -90.0
    base = np.datetime64("2023-01-01T00:00:00", "ms")
    for _ in range(48):
        t = base + np.timedelta64(int(rng.integers(0, 3 * 365 * 86400)), "s")
        el = solar_position(t, lon, lat)[1]
        if el >= 12.0:
            return t
        if el > best_el:
            best, best_el = t, el
    return best


# -- networks and walks ---------------------------------------------------------------------------
class _Path:
    """A polyline (N, 2) in local metres with the carriageway width of each segment (N - 1,)."""

    def __init__(self, xy: np.ndarray, width: np.ndarray):
        self.xy, self.width = xy, width
        seg = np.linalg.norm(np.diff(xy, axis=0), axis=1)
        self.s = np.concatenate([[0.0], np.cumsum(seg)])

    @property
    def length(self) -> float:
        return float(self.s[-1])

    def at(self, s: np.ndarray) -> np.ndarray:
        """Points (M, 2) at arc lengths s (M,)."""
        return np.stack([np.interp(s, self.s, self.xy[:, 0]), np.interp(s, self.s, self.xy[:, 1])], -1)

    def width_at(self, s: np.ndarray) -> np.ndarray:
        i = np.clip(np.searchsorted(self.s, s, side="right") - 1, 0, len(self.width) - 1)
        return self.width[i]

    def dense(self, step: float) -> np.ndarray:
        return self.at(np.arange(0.0, self.length + step, step))


class _Network:
    """Undirected graph of polyline vertices (snapped to 0.5 m), with per-edge width."""

    def __init__(self, lines: list[np.ndarray], widths: list[float], bounds: tuple[float, float, float, float], offset: float = 0.0):
        self.nodes: dict[tuple[int, int], int] = {}
        self.xy: list[np.ndarray] = []
        self.adj: dict[int, list[tuple[int, float]]] = {}
        self.edges: list[tuple[int, int, float]] = []
        self.edge_width: list[float] = []
        self.offset = offset
        xmin, ymin, xmax, ymax = bounds
        for line, wd in zip(lines, widths):
            inside = (line[:, 0] > xmin) & (line[:, 0] < xmax) & (line[:, 1] > ymin) & (line[:, 1] < ymax)
            for a, b, ia, ib in zip(line[:-1], line[1:], inside[:-1], inside[1:]):
                if not (ia and ib) or np.allclose(a, b):
                    continue
                na, nb = self._node(a), self._node(b)
                if na == nb:
                    continue
                self.adj.setdefault(na, []).append((nb, wd))
                self.adj.setdefault(nb, []).append((na, wd))
                self.edges.append((na, nb, float(np.linalg.norm(b - a))))
                self.edge_width.append(float(wd))
        self.edge_len = np.array([e[2] for e in self.edges]) if self.edges else np.zeros(0)

    def edge_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Edge start points (E, 2), unit directions (E, 2) and widths (E,)."""
        xy = np.asarray(self.xy)
        ab = np.array([(a, b) for a, b, _ in self.edges], np.int64).reshape(-1, 2)
        a = xy[ab[:, 0]]
        d = (xy[ab[:, 1]] - a) / np.maximum(self.edge_len, 1e-9)[:, None]
        return a, d, np.asarray(self.edge_width)

    def _node(self, p: np.ndarray) -> int:
        key = (int(round(p[0] * 2)), int(round(p[1] * 2)))
        if key not in self.nodes:
            self.nodes[key] = len(self.xy)
            self.xy.append(np.asarray(p, np.float64))
        return self.nodes[key]

    def random_walk(self, rng: np.random.Generator, length_m: float) -> _Path:
        """A walk of about `length_m` (shorter at dead ends), preferring to go straight; never an
        immediate U-turn unless at a dead end. Starts on an edge drawn by length."""
        e = int(rng.choice(len(self.edges), p=self.edge_len / self.edge_len.sum()))
        a, b, _ = self.edges[e]
        if rng.random() < 0.5:
            a, b = b, a
        width = dict(self.adj[a]).get(b, 6.0)
        nodes, widths, total = [a, b], [width], float(np.linalg.norm(self.xy[b] - self.xy[a]))
        turns = 0
        while total < length_m and len(nodes) < 10_000:
            prev, cur = nodes[-2], nodes[-1]
            d_in = self.xy[cur] - self.xy[prev]
            d_in /= max(np.linalg.norm(d_in), 1e-9)
            options = [(n, wd) for n, wd in self.adj[cur] if n != prev]
            if not options:
                if turns >= 2:
                    break
                options, turns = [(prev, widths[-1])], turns + 1  # dead end: turn around
            dirs = np.array([self.xy[n] - self.xy[cur] for n, _ in options])
            cos = dirs @ d_in / np.maximum(np.linalg.norm(dirs, axis=1), 1e-9)
            wgt = np.exp(1.2 * cos)  # mostly straight on, but turns at junctions
            k = int(rng.choice(len(options), p=wgt / wgt.sum()))
            nxt, wd = options[k]
            total += float(np.linalg.norm(self.xy[nxt] - self.xy[cur]))
            nodes.append(nxt)
            widths.append(wd)
        return _Path(np.array([self.xy[n] for n in nodes]), np.array(widths, np.float64))


def _road_network(world: "World", drivable: bool) -> _Network:
    roads = world.layers.roads
    if drivable and len(roads):
        roads = roads[roads["drivable"].astype(bool)]
        public = roads[~roads["highway"].isin(CAR_AVOID_HIGHWAYS)]
        if len(public):  # mapping cars drive the public network, not driveways or parking aisles
            roads = public
    lines, widths = [], []
    for g, wd in zip(roads.geometry.values, roads["width_m"].to_numpy(float) if len(roads) else []):
        for line in world.lines_local(g):
            lines.append(line)
            widths.append(float(wd) if np.isfinite(wd) else 6.0)
    return _Network(lines, widths, _inner_bounds(world))


def _foot_network(world: "World") -> _Network:
    """Footways (sidewalks, crossings, paths) if the world has any, else the sides of the roads."""
    fw = world.layers.footways
    if len(fw):
        fw = fw[fw["kind"] != "steps"]
    lines, widths = [], []
    for g, wd in zip(fw.geometry.values, fw["width_m"].to_numpy(float) if len(fw) else []):
        for line in world.lines_local(g):
            lines.append(line)
            widths.append(float(wd) if np.isfinite(wd) else 2.0)
    net = _Network(lines, widths, _inner_bounds(world))
    if net.edges:
        return net
    roads = _road_network(world, drivable=False)
    roads.offset = 1.5  # walk beside the carriageway
    return roads


def _inner_bounds(world: "World", margin: float = 5.0) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = world.bounds_local
    return (x0 + margin, y0 + margin, x1 - margin, y1 - margin)


def _sample_poses(path: _Path, rng: np.random.Generator, spacing: tuple[float, float], lane: bool):
    """Positions (K, 2), yaws (K,) (radians, counter-clockwise from east) and arc lengths (K,) along a
    path, a frame every U(spacing) metres. Cars keep right of the centreline by a quarter of the
    carriageway (at most MAX_LANE_OFFSET_M); pedestrians drift a little around the footway's line."""
    steps = rng.uniform(spacing[0], spacing[1], size=int(path.length / spacing[0]) + 2)
    s = np.concatenate([[min(1.0, path.length / 2)], min(1.0, path.length / 2) + np.cumsum(steps)])
    s = s[s <= max(path.length - 1.0, s[0])]
    ahead, behind = path.at(np.minimum(s + 2.0, path.length)), path.at(np.maximum(s - 2.0, 0.0))
    tangent = ahead - behind
    tangent /= np.maximum(np.linalg.norm(tangent, axis=1, keepdims=True), 1e-9)
    right = np.stack([tangent[:, 1], -tangent[:, 0]], -1)
    if lane:
        off = np.minimum(path.width_at(s) / 4, MAX_LANE_OFFSET_M)
    else:
        drift = np.cumsum(rng.normal(0, 0.05, len(s)))
        off = np.clip(drift + rng.uniform(-0.3, 0.3), -0.5, 0.5)
    xy = path.at(s) + right * off[:, None]
    yaw = np.arctan2(tangent[:, 1], tangent[:, 0])
    return xy, yaw, s


# -- occluders ------------------------------------------------------------------------------------
_CAR_COLORS = np.array([(0.8, 0.8, 0.8), (0.05, 0.05, 0.06), (0.35, 0.36, 0.38), (0.6, 0.05, 0.04),
                        (0.05, 0.15, 0.45), (0.55, 0.56, 0.58), (0.9, 0.9, 0.92), (0.1, 0.3, 0.15)], np.float32)
CAR_SIZE_M = (4.3, 1.8, 1.0)  # body length, width, height (the cabin sits on top)


def _slots(rng: np.random.Generator, net: _Network, first: float, spacing: tuple[float, float], end_margin: float,
           p_keep: float) -> tuple[np.ndarray, np.ndarray]:
    """Random slots along every edge of a network: (edge index (K,), arc length on the edge (K,))."""
    L = net.edge_len
    if len(L) == 0:
        return np.zeros(0, np.int64), np.zeros(0)
    start = rng.uniform(0, first, len(L))
    step = rng.uniform(*spacing)
    n = np.where(L - end_margin >= start, np.floor((L - end_margin - start) / step).astype(np.int64) + 1, 0)
    e = np.repeat(np.arange(len(L)), n)
    k = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    s = start[e] + k * step
    keep = rng.random(len(e)) < p_keep
    return e[keep], s[keep]


def _instances(tpl: tuple[np.ndarray, np.ndarray], scale: np.ndarray, yaw: np.ndarray, offset: np.ndarray):
    """K copies of a template mesh, scaled (K, 3), rotated about z by yaw (K,), moved to offset (K, 3):
    vertices (K * V, 3) float32, faces (K * F, 3) int64 (indices local to these vertices)."""
    tv, tf = tpl
    v = tv[None] * scale[:, None, :]
    c, s = np.cos(yaw)[:, None], np.sin(yaw)[:, None]
    x, y = v[..., 0] * c - v[..., 1] * s, v[..., 0] * s + v[..., 1] * c
    v = np.stack([x, y, v[..., 2]], -1) + offset[:, None, :]
    f = tf[None] + (np.arange(len(scale)) * len(tv))[:, None, None]
    return v.reshape(-1, 3).astype(np.float32), f.reshape(-1, 3)


def _sample_occluders(world: "World", rng: np.random.Generator, roads: _Network, walks: _Network,
                      avoid: np.ndarray) -> Occluders:
    """Parked cars along the edges of drivable roads and pedestrians on footways, not within
    OCCLUDER_CLEARANCE_M of `avoid` (N, 2) (the run's own trajectory) and only on fitting ground
    (cars on road pixels, pedestrians on sidewalk / crosswalk / terrain / unlabelled ground)."""
    from scipy.spatial import cKDTree

    from .world import _BOX, _CYL, _SPHERE

    tree = cKDTree(avoid) if len(avoid) else None
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(v: np.ndarray, f: np.ndarray, col: np.ndarray, faces_per: int) -> None:
        parts.append((v, f, np.repeat(col.astype(np.float32), faces_per, axis=0)))

    def ok(p: np.ndarray, labels: set[int]) -> np.ndarray:
        good = np.isin(world.ground_lookup(p[:, 0], p[:, 1])[1], list(labels))
        if tree is not None and len(p):
            good &= tree.query(p)[0] > OCCLUDER_CLEARANCE_M
        return good

    # Parked cars: a slot every 6-9 m on each edge, 30 % taken, on a random side at the kerb.
    n_cars = 0
    e, s = _slots(rng, roads, 8.0, (6.0, 9.0), 2.5, 0.3)
    if len(e):
        a, d, wd = roads.edge_arrays()
        d, right = d[e], np.stack([d[e, 1], -d[e, 0]], -1)
        side = np.where(rng.random(len(e)) < 0.5, 1.0, -1.0)
        p = a[e] + d * (s + 2.2)[:, None] + right * (side * np.maximum(wd[e] / 2 - 1.0, 1.0))[:, None]
        yaw = np.arctan2(d[:, 1], d[:, 0])
        col = np.clip(_CAR_COLORS[rng.integers(len(_CAR_COLORS), size=len(e))] * rng.uniform(0.85, 1.1, (len(e), 1)), 0, 1)
        keep = ok(p, {class_id("road")})
        p, yaw, col, d = p[keep], yaw[keep], col[keep], d[keep]
        n_cars = len(p)
        if n_cars:
            z = np.zeros((n_cars, 1))
            body = _instances(_BOX, np.tile(CAR_SIZE_M, (n_cars, 1)), yaw, np.c_[p, z + 0.75])
            add(*body, col, len(_BOX[1]))
            cab = p - d * 0.3
            cabin = _instances(_BOX, np.tile((2.3, 1.6, 0.55), (n_cars, 1)), yaw, np.c_[cab, z + 1.5])
            add(*cabin, np.tile((0.06, 0.07, 0.09), (n_cars, 1)), len(_BOX[1]))
    # Pedestrians: a slot every 8-15 m of footway, 35 % taken, up to 0.6 m off the line.
    n_peds = 0
    e, s = _slots(rng, walks, 10.0, (8.0, 15.0), 0.0, 0.35)
    if len(e):
        a, d, _ = walks.edge_arrays()
        side = walks.offset + rng.uniform(-0.6, 0.6, len(e))
        p = a[e] + d[e] * s[:, None] + np.stack([d[e, 1], -d[e, 0]], -1) * side[:, None]
        hgt = rng.uniform(1.55, 1.95, len(e))
        cloth = rng.uniform(0.03, 0.7, (len(e), 3))
        keep = ok(p, {class_id("sidewalk"), class_id("crosswalk"), class_id("terrain"), VOID})
        p, hgt, cloth = p[keep], hgt[keep], cloth[keep]
        n_peds = len(p)
        if n_peds:
            zero = np.zeros(n_peds)
            body_h = hgt - 0.25
            body = _instances(_CYL, np.c_[np.full((n_peds, 2), 0.2), body_h], zero, np.c_[p, body_h / 2])
            add(*body, cloth, len(_CYL[1]))
            head = _instances(_SPHERE, np.tile((0.12, 0.12, 0.13), (n_peds, 1)), zero, np.c_[p, hgt - 0.12])
            add(*head, np.tile((0.55, 0.42, 0.33), (n_peds, 1)), len(_SPHERE[1]))
    if not parts:
        return Occluders.empty()
    vs, fs, cs, base = [], [], [], 0
    for v, f, c in parts:
        vs.append(v)
        fs.append(f + base)
        cs.append(c)
        base += len(v)
    return Occluders(np.concatenate(vs), np.concatenate(fs).astype(np.int32), np.concatenate(cs),
                     num_objects=n_cars + n_peds)
