"""The digital twin as a capture producer: renders simulated runs into the `CaptureSet` format.

`capture_twin` writes `DIR/captures.parquet` (map runs), `DIR/queries.parquet` (query runs with their
ground-truth poses, same schema), `DIR/images/*.jpg` and an orthophoto `DIR/aerial.tif` of the area,
so that every later step reads files exactly as it would for real photos.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .captures import INDEX_NAME, QUERIES_NAME, CaptureSet
from ..storage import atomic_path

__all__ = ["capture_twin"]

JPEG_QUALITY = 92


def capture_twin(
    osm: str | os.PathLike,
    out: str | os.PathLike,
    bbox: Sequence[float] | None = None,
    *,
    num_map_runs: int = 4,
    num_query_runs: int = 2,
    seed: int = 0,
    config: Any = None,
    map_run_length_m: float = 400.0,
    query_run_length_m: float = 150.0,
    aerial_resolution_m: float | None = None,
    progress: bool = True,
) -> Path:
    """Simulate capture runs over the twin of `osm` (inside the WGS84 `bbox` = (W, S, E, N), or the
    whole extract) and write them to `out` as a capture set. Deterministic in `seed`.

    The orthophoto is rendered at `aerial_resolution_m` (default: the config's map cell size); the
    twin varies as `config.synth` says (building styles, tag dropout), as `neuralmaps synth` does.
    Returns `out`. Raises FileNotFoundError / ValueError (GeoInputError) on bad input.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    from ..config import preset
    from ..geo import Region, write_geotiff
    from ..synth.capture import simulate_runs
    from ..synth.chunks import _aerial_appearance
    from ..synth.world import World

    config = config if config is not None else preset("cpu-tiny")
    osm, out = Path(osm), Path(out)
    if not osm.is_file():
        raise FileNotFoundError(f"OSM file not found: {osm}")
    if num_map_runs < 1 or num_query_runs < 0:
        raise ValueError(f"need num_map_runs >= 1 and num_query_runs >= 0, got {num_map_runs}, {num_query_runs}")
    region = None
    if bbox is not None:
        region = Region.from_bbox(*[float(v) for v in bbox], resolution=0.1)
    world = World.from_osm(str(osm), region=region, seed=seed, progress=progress, variation=config.synth)
    runs = simulate_runs(world, num_map_runs, num_query_runs, seed, config=config, progress=progress,
                         map_run_length_m=map_run_length_m, query_run_length_m=query_run_length_m)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    origin = np.asarray(world.origin, np.float64)[:2]
    crs = world.region.crs

    rows: dict[str, dict[str, list]] = {"map": _empty_rows(), "query": _empty_rows()}
    jobs = [(run, k, name) for run in runs for k, fr in enumerate(run.frames) for name in fr.views]
    for run, k, name in tqdm(jobs, desc="views", disable=not progress, leave=False):
        cam, T = run.frames[k].views[name]
        rel = f"images/{run.run_id}_{k:04d}_{name}.jpg"
        file = out / rel
        if not file.is_file():  # a rerun resumes: views depend only on (seed, run, frame)
            rgb = np.asarray(world.render(cam, T, run.appearance).rgb)
            with atomic_path(file) as tmp:
                Image.fromarray(rgb).save(tmp, format="JPEG", quality=JPEG_QUALITY)
        M = T.matrix().detach().cpu().numpy().astype(np.float64)
        M[:2, 3] += origin  # world-local -> CRS (the world's one offset, World.to_crs)
        r = rows["query" if run.kind == "query" else "map"]
        r["image"].append(rel)
        r["run_id"].append(run.run_id)
        r["time"].append(run.frames[k].timestamp)
        r["camera"].append(cam.to_tensor().detach().cpu().numpy().astype(np.float64)[:8])
        r["model"].append(getattr(cam, "model", "pinhole"))
        r["T"].append(M)
        r["camera_name"].append(name)
        r["vehicle"].append(run.vehicle)
    for kind, name in (("map", INDEX_NAME), ("query", QUERIES_NAME)):
        r = rows[kind]
        cs = CaptureSet.from_poses(
            r["image"], r["run_id"], np.asarray(r["time"], "datetime64[ms]"), np.reshape(r["camera"], (-1, 8)),
            r["model"], np.reshape(r["T"], (-1, 4, 4)), crs, out,
            extra={"camera_name": np.asarray(r["camera_name"], str), "vehicle": np.asarray(r["vehicle"], str)},
        )
        cs.write(out, name)

    res = float(aerial_resolution_m or config.scene.cell_m)
    aerial_region = Region.from_bounds(world.region.bounds, crs, res)
    xmin, ymin, xmax, ymax = aerial_region.bounds
    local = (xmin - origin[0], ymin - origin[1], xmax - origin[0], ymax - origin[1])
    rgb = world.render_orthophoto(local, res, _aerial_appearance(), progress=progress)
    write_geotiff(aerial_region.to_xarray(np.moveaxis(rgb, -1, 0), dims=("band", "y", "x"),
                                          coords={"band": ["red", "green", "blue"]}), out / "aerial.tif")
    return out


def _empty_rows() -> dict[str, list]:
    return {k: [] for k in ("image", "run_id", "time", "camera", "model", "T", "camera_name", "vehicle")}
