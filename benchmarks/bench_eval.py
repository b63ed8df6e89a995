"""Evaluation benchmark: queries per second of `python -m training.evaluate`'s loop, per localizer mode.

    python benchmarks/bench_eval.py [--pairs 8] [--checkpoint pretrained|PATH] [--store STORE]

Writes a tiny Helsinki store (a 300 m crop, 3 map runs + 2 query runs, cpu-tiny; or uses --store),
then runs `neuralmaps.evaluation.evaluate_model` over every pair with the given checkpoint (default:
a random cpu-tiny SNAP; speed does not depend on the weights, only on the sizes) and the baselines.
Reported (2 threads, wall clock, after one warm-up query):
- `queries_per_s_ransac`, `queries_per_s_voting`: localization only (query BEV + localizer), per query;
- `map_s_per_scene`: `SNAP.map` of one scene (street view + aerial), once per pair in an evaluation;
- `end_to_end_queries_per_s`: whole evaluation with both modes and semantics (maps included) / queries;
- `queries_per_s_aerial_rgb_voting`, `queries_per_s_prior`: the baselines.
Progress goes to stderr; the LAST stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MPLBACKEND", "Agg")

THREADS = 2
# The crop of tests/test_chunks.py (EPSG:32635): four 150 m split blocks.
CROP_EPSG = 32635
CROP = (385650.0, 6672000.0, 385950.0, 6672300.0)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_tiny_store(out: Path, pairs: int, seed: int = 0) -> Path:
    import pyrosm

    from neuralmaps.config import preset
    from neuralmaps.geo import Region
    from neuralmaps.synth import World, simulate_runs, write_training_chunks

    osm = pyrosm.get_data("helsinki_pbf")
    cfg = preset("cpu-tiny")
    region = Region.from_bounds(CROP, f"EPSG:{CROP_EPSG}", 0.5)
    world = World.from_osm(osm, region=region, seed=seed, progress=False)
    runs = simulate_runs(world, 3, 2, seed, config=cfg)
    return write_training_chunks(osm, out, pairs, seed=seed, config=cfg, world=world, runs=runs, progress=False)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--checkpoint", default=None, help="'pretrained' or a path (default: random cpu-tiny)")
    ap.add_argument("--store", default=None, help="use this store (split all) instead of writing one")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(THREADS)
    from neuralmaps import evaluation as ev
    from neuralmaps.config import preset
    from neuralmaps.models import SNAP

    with tempfile.TemporaryDirectory() as tmp:
        if args.store:
            store = Path(args.store)
        else:
            t0 = time.perf_counter()
            store = write_tiny_store(Path(tmp) / "tiny.zarr", args.pairs)
            _log(f"store of {args.pairs} pairs written in {time.perf_counter() - t0:.1f} s")
        if args.checkpoint:
            model = ev.load_model(args.checkpoint)
        else:
            torch.manual_seed(0)
            model = SNAP(preset("cpu-tiny")).eval()
        data = ev.open_eval_data(store, "all", config=model.config)
        n = len(data)
        ev.evaluate_model(model, data, limit=1, progress=False)  # warm-up
        t0 = time.perf_counter()
        run = ev.evaluate_model(model, data, progress=False)
        total_s = time.perf_counter() - t0
        res = run["results"]
        per_mode = {m: [r.time_s for r in res if r.mode == m] for m in ev.MODES}
        ev.evaluate_aerial_rgb(data, modes=("voting",), limit=1, progress=False)
        rgb = ev.evaluate_aerial_rgb(data, modes=("voting",), progress=False)["results"]
        t0 = time.perf_counter()
        ev.evaluate_prior(data, progress=False)
        prior_s = time.perf_counter() - t0
    result = {
        "queries": n,
        "queries_per_s_ransac": round(1.0 / statistics.mean(per_mode["ransac"]), 3),
        "queries_per_s_voting": round(1.0 / statistics.mean(per_mode["voting"]), 3),
        "median_s_ransac": round(statistics.median(per_mode["ransac"]), 4),
        "median_s_voting": round(statistics.median(per_mode["voting"]), 4),
        "map_s_per_scene": round(statistics.median(run["map_times_s"]), 4),
        "end_to_end_queries_per_s": round(n / total_s, 3),
        "queries_per_s_aerial_rgb_voting": round(1.0 / statistics.mean(r.time_s for r in rgb), 3),
        "queries_per_s_prior": round(n / prior_s, 2),
        "checkpoint": args.checkpoint or "random cpu-tiny",
        "threads": THREADS,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "machine": platform.processor() or platform.machine(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
