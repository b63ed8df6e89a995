"""Test and benchmark scaffolding (as `xarray.testing`): problems with known answers, error
measures and timing helpers used by `tests/` and `benchmarks/`. Not imported by the library.

- `make_exact_recovery_problem`: a query BEV cut out of a random smooth map at a known pose, for
  the localizer (frames as in `neuralmaps.models.localizer`); `pose_errors` measures the result.
- `benchmark_render`, `benchmark_ortho`: throughput of the twin's renderer (`benchmarks/bench_synth.py`).
- `AerialRGBMatcher`, `aerial_rgb_store`: the non-learned aerial-RGB baseline behind the query interface of
  `neuralmaps.maps.query`, and a neural-map store of orthophoto colours for it (`tests/test_maps_query.py`,
  `benchmarks/bench_query.py`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .classes import class_id
from .geometry import PinholeCamera, Transform2D, Transform3D
from .grids import interpolate_nd
from .synth.appearance import Appearance
from .synth.capture import simulate_runs
from .synth.render import camera_pose, render_orthophoto, render_view

if TYPE_CHECKING:  # pragma: no cover
    from .synth.world import World

__all__ = [
    "ExactRecoveryProblem", "make_exact_recovery_problem", "pose_errors", "benchmark_render", "benchmark_ortho",
    "street_pose", "AerialRGBMatcher", "aerial_rgb_store",
]


# ------------------------------------------------------------------------------------------------
# The localizer's exact-recovery problem (tests/test_localizer.py, benchmarks/bench_localizer.py)
# ------------------------------------------------------------------------------------------------
@dataclass
class ExactRecoveryProblem:
    """A query BEV cut out of a random smooth map at a known pose (every tensor batched)."""

    map_feats: Tensor  # (B, D, X, Y) L2-normalised
    map_valid: Tensor  # (B, X, Y) all True
    query_feats: Tensor  # (B, D, Xq, Yq) map features interpolated at T_gt(query_xy)
    query_valid: Tensor  # (B, Xq, Yq) the query cell lies on the map
    query_xy: Tensor  # (Xq, Yq, 2) metres, x forward 0..Xq·cell, y left centred on the axis
    cell_m: float
    T_gt: Transform2D  # (B,) T_map_query


def make_exact_recovery_problem(
    batch: int, dim: int, map_cells: int, query_cells: int, cell_m: float = 1.0, sigma_cells: float = 2.0,
    generator: torch.Generator | None = None,
) -> ExactRecoveryProblem:
    """Random smooth map (Gaussian-filtered noise, sigma in cells, L2-normalised over `dim`), and a
    query BEV cut from it at a random pose: any angle, a sub-cell translation, the BEV centre
    (query_cells/2 ahead of the camera) uniform over the central half of the map."""
    B, D, X, Xq = batch, dim, map_cells, query_cells
    noise = torch.randn(B * D, 1, X, X, generator=generator)
    k = 2 * int(3 * sigma_cells) + 1
    x = torch.arange(k, dtype=torch.float32) - k // 2
    ker = torch.exp(-(x**2) / (2 * sigma_cells**2))
    ker = ker / ker.sum()
    sm = F.conv2d(F.pad(noise, (k // 2,) * 4, mode="circular"), ker.view(1, 1, k, 1))
    sm = F.conv2d(sm, ker.view(1, 1, 1, k)).reshape(B, D, X, X)
    map_feats = F.normalize(sm, dim=1)

    i = (torch.arange(Xq, dtype=torch.float32) + 0.5) * cell_m
    query_xy = torch.stack(torch.meshgrid(i, i - Xq * cell_m / 2, indexing="ij"), -1)
    angle = torch.rand(B, generator=generator) * (2 * math.pi)
    centre = (torch.rand(B, 2, generator=generator) * 0.5 + 0.25) * (X * cell_m)
    ahead = torch.stack([torch.cos(angle), torch.sin(angle)], -1) * (Xq * cell_m / 2)
    T_gt = Transform2D(angle, centre - ahead)
    pts = T_gt.transform(query_xy.reshape(1, -1, 2).expand(B, -1, 2)) / cell_m
    q, valid = interpolate_nd(map_feats, pts)
    return ExactRecoveryProblem(
        map_feats=map_feats, map_valid=torch.ones(B, X, X, dtype=torch.bool),
        query_feats=q.transpose(1, 2).reshape(B, D, Xq, Xq), query_valid=valid.reshape(B, Xq, Xq),
        query_xy=query_xy, cell_m=cell_m, T_gt=T_gt,
    )


def pose_errors(T_est: Transform2D, T_gt: Transform2D, cell_m: float) -> tuple[Tensor, Tensor]:
    """Rotation error in degrees and translation error in cells, (B,) each."""
    dr, dt = (T_gt.inv() @ T_est).magnitude()
    return dr, dt / cell_m


# ------------------------------------------------------------------------------------------------
# Renderer throughput (benchmarks/bench_synth.py)
# ------------------------------------------------------------------------------------------------
def benchmark_render(world: "World", hw: tuple[int, int] = (128, 256), n: int = 50, appearance: Appearance | None = None,
                     seed: int = 0) -> float:
    """Views per second of `render_view` for n random pinhole views (90 deg HFOV) at 2 m height
    on road pixels of the world, with shading, shadows and (for a world built from OSM, when no
    appearance is given) the occluders of a simulated mapping run. Uses the current process's threads."""
    h, w = hw
    cam = PinholeCamera.from_fov(w, h, 90.0)
    rng = np.random.default_rng(seed)
    poses = [street_pose(world, rng) for _ in range(n)]
    app = appearance
    if app is None and world.layers is not None:
        app = simulate_runs(world, 1, 0, seed, map_run_length_m=50.0)[0].appearance
    elif app is None:
        app = Appearance.sample(seed)
    render_view(world, cam, poses[0], app)  # warm-up: builds the Embree scene and the ray cache
    t0 = time.perf_counter()
    for T in poses:
        render_view(world, cam, T, app)
    return n / (time.perf_counter() - t0)


def benchmark_ortho(world: "World", resolution: float = 0.2, area_m2: float = 250_000.0,
                    appearance: Appearance | None = None) -> float:
    """Seconds per km² of `render_orthophoto` at `resolution` m on a square of `area_m2` (clipped to
    the world) at the world's centre."""
    W, H = world.size_m
    side = min(math.sqrt(area_m2), W, H)
    cx, cy = W / 2, H / 2
    b = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    app = appearance if appearance is not None else Appearance.sample(0)
    world.scene  # noqa: B018  (build the Embree scene outside the timing)
    t0 = time.perf_counter()
    render_orthophoto(world, b, resolution, app)
    return (time.perf_counter() - t0) / (side * side / 1e6)


def street_pose(world: "World", rng: np.random.Generator, height: float = 2.0) -> Transform3D:
    """A random horizontal camera pose at `height` m over ground that is road if the world has roads."""
    hgt, wid = world.ground_mat.shape
    x, y = rng.uniform(0, world.size_m[0]), rng.uniform(0, world.size_m[1])
    for _ in range(10_000):  # rejection sampling: cheap on huge rasters
        r, c = int(rng.integers(hgt)), int(rng.integers(wid))
        if world.ground_label[r, c] == class_id("road"):
            x, y = (float(v) for v in world.ground_grid.pixel_to_xy(r + 0.5, c + 0.5))
            break
    return camera_pose(x, y, height, yaw=float(rng.uniform(-math.pi, math.pi)))


# ------------------------------------------------------------------------------------------------
# A non-learned matcher behind the query interface (tests/test_maps_query.py, benchmarks/bench_query.py)
# ------------------------------------------------------------------------------------------------
class AerialRGBMatcher(torch.nn.Module):
    """The evaluation's non-learned `aerial-rgb` baseline (`evaluation.ground_rgb` +
    `evaluation.rgb_features`, the SNAP `Localizer` at a fixed temperature) behind the part of the
    `SNAP` interface that `neuralmaps.maps.query` uses (`config`, `camera_model`, `query`,
    `query_xy`, `mapper.query_inside`, `localizer`). With `aerial_rgb_store` it makes a neural map
    of orthophoto colours that real photos can be localized in: the query geometry (cameras, image
    and map frames, windows, sequences) is then tested end to end on rendered photos, with a matcher
    whose accuracy does not depend on training."""

    def __init__(self, config, camera_model: str = "pinhole", temperature: float | None = None):
        from types import SimpleNamespace

        from .evaluation import AERIAL_RGB_TEMPERATURE
        from .models.bev import query_grid
        from .models.localizer import Localizer

        super().__init__()
        self.config = config
        self.camera_model = camera_model
        self.localizer = Localizer(config.model)
        self.localizer.log_temperature.data.fill_(math.log(temperature or AERIAL_RGB_TEMPERATURE))
        self.eval()
        xy, inside = query_grid(config.scene)
        self.query_xy = xy
        self.mapper = SimpleNamespace(query_inside=inside)

    def query(self, batch: dict, generator=None):
        from .evaluation import ground_rgb, rgb_features
        from .models.bev import FeaturePlane

        rgb, valid = ground_rgb(batch["query_image"].float(), batch["query_camera"].float(),
                                batch["query_T_bev_cam"].float(), self.query_xy, self.camera_model)
        valid = valid & self.mapper.query_inside[None]
        return FeaturePlane(rgb_features(rgb, valid), valid)


def aerial_rgb_store(aerial: str, path, matcher: AerialRGBMatcher, region=None):
    """A neural-map store (`maps.store` layout, one 4-band `matching`) of `evaluation.rgb_features`
    of the orthophoto `aerial` on `region` (default: the orthophoto's own grid at the matcher's cell
    size), for `AerialRGBMatcher`. Returns the `NeuralMap`."""
    import json

    import rasterio
    import zarr

    from .evaluation import rgb_features
    from .geo import Region, read_orthophoto
    from .maps.workers import model_sha256
    from .maps.store import STORE_FORMAT, NeuralMap, create_store, store_variables

    cell = matcher.config.scene.cell_m
    if region is None:
        with rasterio.open(aerial) as src:
            region = Region.from_bounds(tuple(src.bounds), src.crs, cell)
    rgb = read_orthophoto(aerial, region).values[:3].astype(np.float32)  # (3, H, W) north-up, NaN off it
    valid = np.isfinite(rgb).all(0)
    f = rgb_features(torch.from_numpy(np.nan_to_num(rgb))[None], torch.from_numpy(valid)[None])[0].numpy()
    attrs = {"format": STORE_FORMAT, "model_sha256": model_sha256(matcher),
             "config": json.dumps(matcher.config.to_dict()), "checkpoint": "<in-memory SNAP>",
             "camera_model": matcher.camera_model, "region": json.dumps(region.to_dict()), "tile_px": 128,
             "halo_px": 0, "class_names": []}
    path = Path(path)
    create_store(path, region, 128, store_variables(1, 4, 0, confidence=False, semantics=False),
                 {"feature": 1, "band": 4}, [], attrs)
    g = zarr.open_group(str(path), mode="r+")
    g["matching"][:] = np.where(valid, f, np.nan).astype(np.float16)
    g["valid"][:] = valid
    g["tile_done"][:] = True
    return NeuralMap.open(path)
