"""Query benchmark: localization latency and memory per photo with a 30 m prior, batch queries per
second through Dask with 1 and 2 workers, and recall of single-image vs sequential localization.

A tiny map is built first (once; reused from --work): `neuralmaps capture` of a small Helsinki box
(the contract's build box) with the digital twin, then `neuralmaps build` of that box with the
shipped model (street view + the twin's orthophoto). The twin's query runs (pedestrian photos with ground-truth
poses, queries.parquet) are the queries; each prior is the truth moved by a seeded random offset
within 10 m (a GPS fix), searched within 30 m.

    python benchmarks/bench_query.py [--work DIR] [--bbox W,S,E,N] [--seq 4] [--latency-n 20]

Sequential: each query frame with the previous `--seq` - 1 frames of its run (about 3 m apart),
relative poses from the ground truth with simulated odometry noise (per step 2 % of the step in
translation per axis, 0.5 deg in heading), the prior on the first frame; the last frame's error is
compared with the same frame localized alone.

Prints progress lines, then as its last line one JSON object with the keys localize_median_s,
localize_p90_s, localize_cpu_median_s, localize_peak_rss_mb, localize_many_per_s (1 worker),
localize_many_per_s_2workers, recall_1m_1deg / recall_3m_3deg / recall_5m_5deg (single, all
queries), seq_* and single_* (the same frames), num_queries, num_sequences.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/neuralmaps-bench-query", help="scratch directory (capture and map reused)")
    ap.add_argument("--bbox", default=BBOX, help="twin capture area W,S,E,N")
    ap.add_argument("--seq", type=int, default=4, help="frames per sequence")
    ap.add_argument("--latency-n", type=int, default=20, help="queries timed one by one")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cap, store = work / "cap", work / "map.zarr"
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

    from neuralmaps.maps.query import relative_poses_from
    from neuralmaps.maps.store import NeuralMap

    torch.set_num_threads(1)
    nm = NeuralMap.open(store)
    queries = gpd.read_parquet(cap / "queries.parquet")
    region = nm.region
    n_q = len(queries)
    res: dict[str, float | int | None] = {"num_queries": n_q}
    print(f"map {region.shape} px, {n_q} query photos", flush=True)

    # 1. Latency, one query at a time (after a warm-up that loads the model).
    def one(i: int):
        r = queries.iloc[i]
        return nm.localize(str(cap / r["image"]), r, prior=_prior(region, r["x"], r["y"], args.seed, i), radius_m=RADIUS_M)

    one(0)
    walls, cpus = [], []
    for i in np.linspace(0, n_q - 1, min(args.latency_n, n_q)).round().astype(int):
        t, c = time.perf_counter(), time.process_time()
        one(int(i))
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    res["localize_median_s"] = round(float(np.median(walls)), 3)
    res["localize_p90_s"] = round(float(np.percentile(walls, 90)), 3)
    res["localize_cpu_median_s"] = round(float(np.median(cpus)), 3)
    res["localize_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
    print(f"localize: median {res['localize_median_s']} s wall ({res['localize_cpu_median_s']} s CPU), "
          f"p90 {res['localize_p90_s']} s, peak RSS {res['localize_peak_rss_mb']} MB", flush=True)

    # 2. Batches through Dask (warm clusters: the rate excludes start-up, reported apart).
    from neuralmaps.maps.build import _client

    single = None
    for workers in (1, 2):
        t = time.perf_counter()
        with _client(None, workers, None, 1, None) as c:
            nm.localize_many(queries.iloc[:workers], client=c, radius_m=RADIUS_M, progress=False, image_root=cap)
            start = time.perf_counter() - t
            t = time.perf_counter()
            gdf = nm.localize_many(queries, client=c, radius_m=RADIUS_M, progress=False, image_root=cap,
                                   prior_noise_m=PRIOR_NOISE_M, seed=args.seed)
            dt = time.perf_counter() - t
        key = "localize_many_per_s" if workers == 1 else "localize_many_per_s_2workers"
        res[key] = round(n_q / dt, 2)
        res[f"localize_many_startup_s_{workers}worker{'s' if workers > 1 else ''}"] = round(start, 1)
        print(f"localize_many, {workers} worker(s): {n_q} queries in {dt:.1f} s ({n_q / dt:.2f}/s; start-up {start:.1f} s)",
              flush=True)
        if single is None:
            single = gdf
    assert single is not None and single["error"].isna().all(), single["error"].dropna().head()
    err_m, err_deg = single["err_m"].to_numpy(float), single["err_deg"].to_numpy(float)
    for k, v in _recall(err_m, err_deg).items():
        res[f"recall_{k}"] = round(v, 3)
    res["median_error_m"] = round(float(np.median(err_m)), 2)
    print(f"single, all {n_q}: " + ", ".join(f"R@{k} {v:.3f}" for k, v in _recall(err_m, err_deg).items())
          + f", median {np.median(err_m):.1f} m", flush=True)

    # 3. Sequences: frame j with the previous seq-1 frames of its run; noisy odometry.
    K = max(2, args.seq)
    rng = np.random.default_rng(args.seed + 7)
    seq_err_m, seq_err_deg, idx = [], [], []
    t = time.perf_counter()
    for _, run in queries.sort_values("time").groupby("run_id", sort=True):
        rows = run.index.to_numpy()
        for e in range(K - 1, len(rows)):
            fr = rows[e - K + 1:e + 1]
            q = queries.loc[fr]
            x, y, h = q["x"].to_numpy(), q["y"].to_numpy(), q["heading_deg"].to_numpy()
            motion = relative_poses_from(x, y, h)
            steps = np.diff(motion[:, :2], axis=0)
            noise = rng.normal(size=(K - 1, 2)) * 0.02 * np.linalg.norm(steps, axis=1, keepdims=True)
            motion[1:, :2] += np.cumsum(noise, 0)
            motion[1:, 2] += np.cumsum(rng.normal(size=K - 1) * 0.5)
            i0 = queries.index.get_loc(fr[0])
            out = nm.localize_sequence([str(cap / p) for p in q["image"]], [q.loc[i] for i in fr], motion,
                                       prior=_prior(region, x[0], y[0], args.seed, i0), radius_m=RADIUS_M)
            last = out[-1]
            seq_err_m.append(math.hypot(last.easting - x[-1], last.northing - y[-1]))
            seq_err_deg.append(abs((last.heading_deg - h[-1] + 180) % 360 - 180))
            idx.append(queries.index.get_loc(fr[-1]))
    n_s = len(idx)
    dt = time.perf_counter() - t
    seq_r = _recall(np.array(seq_err_m), np.array(seq_err_deg))
    sin_r = _recall(err_m[idx], err_deg[idx])
    res["num_sequences"] = n_s
    res["sequence_frames"] = K
    res["seq_seconds_per_sequence"] = round(dt / max(n_s, 1), 3)
    for k in seq_r:
        res[f"single_recall_{k}"] = round(sin_r[k], 3)
        res[f"seq_recall_{k}"] = round(seq_r[k], 3)
    res["single_median_error_m"] = round(float(np.median(err_m[idx])), 2) if n_s else None
    res["seq_median_error_m"] = round(float(np.median(seq_err_m)), 2) if n_s else None
    print(f"{n_s} sequences of {K} ({dt / max(n_s, 1):.2f} s each): "
          + ", ".join(f"R@{k} single {sin_r[k]:.3f} / seq {seq_r[k]:.3f}" for k in seq_r)
          + f"; median error single {res['single_median_error_m']} m / seq {res['seq_median_error_m']} m", flush=True)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
