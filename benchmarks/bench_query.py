"""Query benchmark: localization latency and memory per photo with a 30 m prior, batch queries per
second through Dask with 1 and 2 workers, and recall of single-image vs sequential localization.

A tiny map is built first (once per shipped model; reused from --work): `neuralmaps capture` of a small Helsinki box
(the contract's build box) with the digital twin, then `neuralmaps build` of that box with the
shipped model (street view + the twin's orthophoto). The twin's query runs (pedestrian photos with ground-truth
poses, queries.parquet) are the queries; each prior is the truth moved by a seeded random offset
within 10 m (a GPS fix), searched within 30 m.

    python benchmarks/bench_query.py [--work DIR] [--bbox W,S,E,N] [--seq 4] [--latency-n 20]

Sequential: every `--seq-stride`-th query frame with the previous `--seq` - 1 frames of its run
(about 3 m apart), relative poses from the ground truth with simulated odometry noise (per step 2 %
of the step in translation per axis, 0.5 deg in heading), the prior on the first frame; the last
frame's error is compared with the same frame localized alone. Measured for the shipped model and
for the non-learned aerial-RGB matcher (`testing.AerialRGBMatcher`: the evaluation's baseline on a
map of the orthophoto's colours), whose recall does not depend on training.

Prints progress lines, then as its last line one JSON object with the keys localize_median_s,
localize_p90_s, localize_cpu_median_s (all at 1 thread), localize_median_s_2threads (the same
queries with 2 torch threads), localize_compass_median_s (with a heading prior ±30° around a compass
10° off), localize_peak_rss_mb, localize_many_per_s (1 worker), localize_many_per_s_2workers,
recall_1m_1deg / recall_3m_3deg / recall_5m_5deg (single, all queries, shipped model),
single_recall_* and seq_recall_* (the sequences' last frames), the same prefixed aerial_rgb_,
num_queries, num_sequences.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

BBOX = "24.9440,60.1690,24.9470,60.1705"
RADIUS_M = 30.0
PRIOR_NOISE_M = 10.0
THRESHOLDS = ((1.0, 1.0), (3.0, 3.0), (5.0, 5.0))


def _cli(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "neuralmaps.cli", *args], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"neuralmaps {args[0]} failed: {r.stderr.strip().splitlines()[-1:]}")


def _recall(err_m: np.ndarray, err_deg: np.ndarray) -> dict[str, float]:
    err_m, err_deg = np.nan_to_num(err_m, nan=1e9), np.nan_to_num(err_deg, nan=1e9)
    return {f"{a:g}m_{b:g}deg": float(np.mean((err_m <= a) & (err_deg <= b))) if len(err_m) else float("nan")
            for a, b in THRESHOLDS}


def _prior(region, x: float, y: float, seed: int, i: int) -> tuple[float, float]:
    rng = np.random.default_rng([seed, i])
    rho, phi = PRIOR_NOISE_M * math.sqrt(rng.random()), 2 * math.pi * rng.random()
    lon, lat = region.xy_to_lonlat(x + rho * math.cos(phi), y + rho * math.sin(phi))
    return float(lat), float(lon)


def _sequences(nm, model, queries, cap: Path, K: int, stride: int, seed: int) -> dict[str, np.ndarray]:
    """Frame j localized alone and as the last of the K frames ending at j (same run, every
    `stride`-th j); relative poses from the truth plus odometry noise; priors as in `_prior`."""
    from neuralmaps.maps.query import relative_poses_from

    rng = np.random.default_rng(seed + 7)
    region = nm.region
    out: dict[str, list[float]] = {"seq_m": [], "seq_deg": [], "single_m": [], "single_deg": []}
    for _, run in queries.sort_values("time").groupby("run_id", sort=True):
        rows = run.index.to_numpy()
        for e in range(K - 1, len(rows), stride):
            fr = rows[e - K + 1:e + 1]
            q = queries.loc[fr]
            x, y, h = q["x"].to_numpy(), q["y"].to_numpy(), q["heading_deg"].to_numpy()
            motion = relative_poses_from(x, y, h)
            steps = np.linalg.norm(np.diff(motion[:, :2], axis=0), axis=1, keepdims=True)
            motion[1:, :2] += np.cumsum(rng.normal(size=(K - 1, 2)) * 0.02 * steps, 0)
            motion[1:, 2] += np.cumsum(rng.normal(size=K - 1) * 0.5)
            i0, i1 = queries.index.get_loc(fr[0]), queries.index.get_loc(fr[-1])
            images = [str(cap / p) for p in q["image"]]
            seq = nm.localize_sequence(images, [q.loc[i] for i in fr], motion,
                                       prior=_prior(region, x[0], y[0], seed, i0), radius_m=RADIUS_M, model=model)
            one = nm.localize(images[-1], q.loc[fr[-1]], prior=_prior(region, x[-1], y[-1], seed, i1),
                              radius_m=RADIUS_M, model=model)
            for key, r in (("seq", seq[-1]), ("single", one)):
                out[f"{key}_m"].append(math.hypot(r.easting - x[-1], r.northing - y[-1]))
                out[f"{key}_deg"].append(abs((r.heading_deg - h[-1] + 180) % 360 - 180))
    return {k: np.asarray(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/neuralmaps-bench-query", help="scratch directory (capture and map reused)")
    ap.add_argument("--bbox", default=BBOX, help="twin capture area W,S,E,N")
    ap.add_argument("--seq", type=int, default=4, help="frames per sequence")
    ap.add_argument("--seq-stride", type=int, default=3, help="a sequence ends at every n-th frame of a run")
    ap.add_argument("--batch-n", type=int, default=36, help="queries of the 2-worker batch (1 worker: all)")
    ap.add_argument("--latency-n", type=int, default=20, help="queries timed one by one")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from neuralmaps.models import SNAP

    # One scratch map per shipped model: new weights build a new map instead of meeting the old one.
    weights = hashlib.sha256(SNAP.pretrained_path().read_bytes()).hexdigest()[:12]
    cap, store = work / "cap", work / f"map-{weights}.zarr"
    if not (cap / "queries.parquet").is_file():
        t = time.perf_counter()
        _cli("capture", "--osm", "helsinki", "--bbox", args.bbox, "--out", str(cap), "--seed", "1", "--quiet")
        print(f"capture: {time.perf_counter() - t:.0f} s", flush=True)
    t = time.perf_counter()
    _cli("build", "--captures", str(cap), "--aerial", str(cap / "aerial.tif"), "--bbox", args.bbox, "--out", str(store),
         "--quiet")
    print(f"build (or resume): {time.perf_counter() - t:.0f} s", flush=True)

    import geopandas as gpd
    import torch

    from neuralmaps.maps.store import NeuralMap

    torch.set_num_threads(1)
    nm = NeuralMap.open(store)
    queries = gpd.read_parquet(cap / "queries.parquet")
    region = nm.region
    n_q = len(queries)
    res: dict[str, float | int | None] = {"num_queries": n_q}
    print(f"map {region.shape} px, {n_q} query photos", flush=True)

    # 1. Latency, one query at a time (after a warm-up that loads the model).
    def one(i: int, compass: bool = False):
        r = queries.iloc[i]
        heading = float(r["heading_deg"] + np.random.default_rng([args.seed, i, 7]).normal(0.0, 10.0)) % 360 if compass else None
        return nm.localize(str(cap / r["image"]), r, prior=_prior(region, r["x"], r["y"], args.seed, i), radius_m=RADIUS_M,
                           heading_prior=heading)

    one(0)
    walls, cpus, compass_walls = [], [], []
    for i in np.linspace(0, n_q - 1, min(args.latency_n, n_q)).round().astype(int):
        t, c = time.perf_counter(), time.process_time()
        one(int(i))
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
        t = time.perf_counter()
        one(int(i), compass=True)  # a phone compass 10 deg off (1 sigma): heading prior ±30 deg
        compass_walls.append(time.perf_counter() - t)
    # The same queries with both cores (one query on the whole machine; Dask runs below keep 1 each).
    torch.set_num_threads(2)
    walls2 = []
    for i in np.linspace(0, n_q - 1, min(args.latency_n, n_q)).round().astype(int):
        t = time.perf_counter()
        one(int(i))
        walls2.append(time.perf_counter() - t)
    torch.set_num_threads(1)
    res["localize_median_s_2threads"] = round(float(np.median(walls2)), 3)
    res["localize_compass_median_s"] = round(float(np.median(compass_walls)), 3)
    res["localize_median_s"] = round(float(np.median(walls)), 3)
    res["localize_p90_s"] = round(float(np.percentile(walls, 90)), 3)
    res["localize_cpu_median_s"] = round(float(np.median(cpus)), 3)
    res["localize_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
    print(f"localize: median {res['localize_median_s']} s wall ({res['localize_cpu_median_s']} s CPU), "
          f"p90 {res['localize_p90_s']} s, peak RSS {res['localize_peak_rss_mb']} MB; with a compass heading prior "
          f"{res['localize_compass_median_s']} s; with 2 threads {res['localize_median_s_2threads']} s", flush=True)

    # 2. Batches through Dask (warm clusters: the rate excludes start-up, reported apart).
    from neuralmaps.maps.workers import dask_client

    single = None
    for workers in (1, 2):
        t = time.perf_counter()
        with dask_client(None, workers, None, 1, None) as c:
            nm.localize_many(queries.iloc[:workers], client=c, radius_m=RADIUS_M, progress=False, image_root=cap)
            start = time.perf_counter() - t
            t = time.perf_counter()
            n = n_q if workers == 1 else min(n_q, args.batch_n)  # 1 worker: every query (the recall below)
            gdf = nm.localize_many(queries.iloc[:n], client=c, radius_m=RADIUS_M, progress=False, image_root=cap,
                                   prior_noise_m=PRIOR_NOISE_M, seed=args.seed)
            dt = time.perf_counter() - t
        key = "localize_many_per_s" if workers == 1 else "localize_many_per_s_2workers"
        res[key] = round(n / dt, 2)
        res[f"localize_many_startup_s_{workers}worker{'s' if workers > 1 else ''}"] = round(start, 1)
        print(f"localize_many, {workers} worker(s): {n} queries in {dt:.1f} s ({n / dt:.2f}/s; start-up {start:.1f} s)",
              flush=True)
        if single is None:
            single = gdf
    assert single is not None and single["error"].isna().all(), single["error"].dropna().head()
    err_m, err_deg = single["err_m"].to_numpy(float), single["err_deg"].to_numpy(float)
    for k, v in _recall(err_m, err_deg).items():
        res[f"recall_{k}"] = round(v, 3)
    res["median_error_m"] = round(float(np.median(err_m)), 2)
    conf = single["confident"].to_numpy(bool)
    res["confident_share"] = round(float(conf.mean()), 3)  # and how often a confident answer is right (3 m, 3 deg):
    res["confident_precision"] = round(float(((err_m <= 3) & (err_deg <= 3))[conf].mean()), 3) if conf.any() else None
    print(f"single, all {n_q}: " + ", ".join(f"R@{k} {v:.3f}" for k, v in _recall(err_m, err_deg).items())
          + f", median {np.median(err_m):.1f} m", flush=True)

    # 3. Sequences vs single images, on the same frames: the shipped model, and the non-learned
    #    aerial-RGB matcher (testing.AerialRGBMatcher on an orthophoto-colour map of the same area).
    from neuralmaps.config import preset
    from neuralmaps.testing import AerialRGBMatcher, aerial_rgb_store

    matcher = AerialRGBMatcher(preset("cpu-tiny"))
    from neuralmaps.maps.workers import model_sha256

    rgb_store = work / f"aerial_rgb-{model_sha256(matcher)[:12]}.zarr"  # per matcher, as the map per model
    if not rgb_store.exists():
        aerial_rgb_store(cap / "aerial.tif", rgb_store, matcher, region=region)
    for name, nmap, model in (("", nm, None), ("aerial_rgb_", NeuralMap.open(rgb_store), matcher)):
        t = time.perf_counter()
        # The shipped model is at chance here (see the single recall): half as many of its sequences.
        stride = args.seq_stride * (2 if model is None else 1)
        out = _sequences(nmap, model, queries, cap, K=max(2, args.seq), stride=stride, seed=args.seed)
        dt = time.perf_counter() - t
        n_s = len(out["seq_m"])
        seq_r = _recall(out["seq_m"], out["seq_deg"])
        sin_r = _recall(out["single_m"], out["single_deg"])
        res[f"{name}num_sequences"] = n_s
        for k in seq_r:
            res[f"{name}single_recall_{k}"] = round(sin_r[k], 3)
            res[f"{name}seq_recall_{k}"] = round(seq_r[k], 3)
        res[f"{name}single_median_error_m"] = round(float(np.median(out["single_m"])), 2)
        res[f"{name}seq_median_error_m"] = round(float(np.median(out["seq_m"])), 2)
        print(f"{name or 'model_'}sequences: {n_s} of {max(2, args.seq)} frames ({dt:.0f} s): "
              + ", ".join(f"R@{k} single {sin_r[k]:.3f} / seq {seq_r[k]:.3f}" for k in seq_r)
              + f"; median error single {res[f'{name}single_median_error_m']} m / "
              f"seq {res[f'{name}seq_median_error_m']} m", flush=True)
    res["sequence_frames"] = max(2, args.seq)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
