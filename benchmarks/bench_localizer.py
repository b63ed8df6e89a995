"""Localizer benchmark at OrienterNet's problem size: a 256x256-cell map, a 129x129-cell query BEV.

Methods: `voting` (ours: coarse-to-fine exhaustive voting), `ransac` (SNAP's sampler; rotations
do not apply), and `naive` (direct correlation: per rotation, F.conv2d of the full-resolution map
with the rotated query template; the baseline). Every query is an exact-recovery problem
(`neuralmaps.testing.make_exact_recovery_problem`): a query cut from a random smooth map
at a random pose; recall counts poses within 1 cell and 1 degree, measured on the timed runs.
Per-query time is one query (B = 1) localized end to end, after one untimed warm-up query.
RANSAC runs SNAP's settings (`paper`: every one of the ~16,600 valid query cells, 20000 x 8 samples
from the full softmax over 256² cells): ~40 s and ~5 GB a query here, so it times `--ransac-queries`. Voting refines on 512 of the query cells (`Localizer.max_refine_points`).

Each (method, rotations, dim) runs in its own subprocess so that its peak RSS is its own.
The naive baseline is slow (~25 s a query on this machine at D=8, 64 rotations): it runs on
`--naive-queries` queries at D=8 / 64 rotations; for the other settings its cost is measured on
the first `--naive-chunk` rotations and scaled linearly to all of them (its cost is exactly
linear in the rotations), which the run marks with `"extrapolated": true` and recall null.

    python benchmarks/bench_localizer.py [--queries 20] [--naive-queries 2] [--ransac-queries 2] [--quick]

Progress goes to stderr; the LAST stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

MAP_CELLS, QUERY_CELLS, CELL_M = 256, 129, 0.5
THREADS = 2


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# ------------------------------------------------------------------------------------------------
# Naive baseline: full-resolution direct correlation
# ------------------------------------------------------------------------------------------------
def naive_localize(map_feats, query_feats, query_valid, query_xy, cell_m, num_rotations, rotations=None):
    """Argmax over (rotation, cell) of conv2d(map, rotated query template). B = 1.

    The template for angle a is the query BEV resampled onto a map-aligned grid of the query's size,
    centred on the query grid's centre c (query frame); its score at map cell u is the pose that
    puts c on u's centre. Returns (angle, t (2,)) of the best pose, or None when `rotations`
    (a subset of indices, for timing only) is given."""
    import torch
    import torch.nn.functional as F

    from neuralmaps.grids import interpolate_nd

    _, D, Xq, Yq = query_feats.shape
    origin = query_xy[0, 0] - 0.5 * cell_m  # query-frame metres of the grid's corner
    c = query_xy.reshape(-1, 2).mean(0)
    hx, hy = Xq // 2, Yq // 2
    offs = torch.stack(torch.meshgrid(torch.arange(Xq) - hx, torch.arange(Yq) - hy, indexing="ij"), -1) * cell_m
    feats = query_feats * query_valid[:, None].to(query_feats.dtype)
    idx = range(num_rotations) if rotations is None else rotations
    angles = torch.tensor([2 * math.pi * k / num_rotations for k in idx])
    best = (-math.inf, None, None)
    for chunk in torch.split(torch.arange(len(angles)), 16):
        a = angles[chunk]
        cs, sn = torch.cos(a)[:, None, None], torch.sin(a)[:, None, None]
        # Query-frame point of template cell (i, j) at angle a: c + R(-a) offs.
        qx = c[0] + cs * offs[..., 0] + sn * offs[..., 1]
        qy = c[1] - sn * offs[..., 0] + cs * offs[..., 1]
        pts = (torch.stack([qx, qy], -1) - origin) / cell_m  # grid coordinates
        tmpl, _ = interpolate_nd(feats.expand(len(a), -1, -1, -1), pts.reshape(len(a), -1, 2))
        tmpl = tmpl.transpose(1, 2).reshape(len(a), D, Xq, Yq)
        scores = tiled_correlation(map_feats, tmpl)[0]  # (R', X, Y)
        v, flat = scores.reshape(len(a), -1).max(-1)
        k = int(v.argmax())
        if float(v[k]) > best[0]:
            best = (float(v[k]), float(a[k]), int(flat[k]))
    if rotations is not None:
        return None
    _, angle, flat = best
    Y = map_feats.shape[-1]
    u = torch.tensor([flat // Y, flat % Y], dtype=torch.float32)
    R = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return angle, (u + 0.5) * cell_m - R @ c


def tiled_correlation(map_feats, kernels, tile: int = 33):
    """conv2d(map (1, D, X, Y), kernels (R, D, kx, ky), padding=(kx//2, ky//2)) -> (1, R, X, Y),
    summed over tile x tile sub-kernels: the same direct correlation, but oneDNN has no fast path
    for 129x129 kernels (one rotation took 60 s here; 33x33 tiles run at ~30 GMAC/s)."""
    import torch.nn.functional as F

    _, _, X, Y = map_feats.shape
    kx, ky = kernels.shape[-2:]
    nx, ny = -(-kx // tile), -(-ky // tile)
    k = F.pad(kernels, (0, ny * tile - ky, 0, nx * tile - kx))
    m = F.pad(map_feats, (ky // 2, ky // 2 + ny * tile - ky, kx // 2, kx // 2 + nx * tile - kx))
    out = None
    for i in range(nx):
        for j in range(ny):
            part = F.conv2d(m[:, :, i * tile : i * tile + X + tile - 1, j * tile : j * tile + Y + tile - 1],
                            k[:, :, i * tile : (i + 1) * tile, j * tile : (j + 1) * tile])
            out = part if out is None else out + part
    return out


# ------------------------------------------------------------------------------------------------
# Worker: one (method, rotations, dim) in its own process
# ------------------------------------------------------------------------------------------------
def worker(method: str, rotations: int, dim: int, queries: int, naive_chunk: int) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    from neuralmaps.config import ModelConfig
    from neuralmaps.geometry import Transform2D
    from neuralmaps.models.localizer import Localizer
    from neuralmaps.testing import make_exact_recovery_problem, pose_errors

    extrapolate = method == "naive" and not (rotations == 64 and dim == 8)
    def problem(i: int):  # made one at a time (untimed) so that peak RSS is the method's own
        return make_exact_recovery_problem(1, dim, MAP_CELLS, QUERY_CELLS, CELL_M,
                                           generator=torch.Generator().manual_seed(1000 + i))

    loc = Localizer(ModelConfig())
    problem(0)
    base_rss = _rss_mb()  # imports + one problem
    times, hits = [], []
    for i in range(queries + 1):  # query 0 warms up
        pb = problem(i)
        t0 = time.perf_counter()
        with torch.no_grad():
            if method == "naive":
                sub = list(range(min(naive_chunk, rotations))) if extrapolate else None
                sub = [0] if i == 0 else sub  # a one-rotation warm-up: the baseline is slow
                res = naive_localize(pb.map_feats, pb.query_feats, pb.query_valid, pb.query_xy, CELL_M,
                                     rotations, sub)
                T = None if res is None else Transform2D(torch.tensor([res[0]]), res[1][None])
            else:
                out = loc(pb.map_feats, pb.map_valid, pb.query_feats, pb.query_valid, pb.query_xy, CELL_M,
                          mode=method, num_rotations=rotations, generator=torch.Generator().manual_seed(i))
                T = out.T_map_query
        dt = time.perf_counter() - t0
        if extrapolate and i > 0:
            dt *= rotations / min(naive_chunk, rotations)
        if i == 0:
            _log(f"  warm-up {dt:.3f} s")
            continue
        times.append(dt)
        if T is not None:
            dr, dc = pose_errors(T, pb.T_gt, CELL_M)
            hits.append(bool(dr[0] <= 1.0 and dc[0] <= 1.0))
            _log(f"  query {i}/{queries}: {dt:.3f} s, error {float(dr[0]):.2f} deg {float(dc[0]):.2f} cells")
        else:
            _log(f"  query {i}/{queries}: {dt:.3f} s (extrapolated from {naive_chunk} rotations)")
    run = {
        "method": method,
        "rotations": None if method == "ransac" else rotations,
        "dim": dim,
        "median_s": statistics.median(times),
        "peak_rss_mb": round(_rss_mb(), 1),
        "baseline_rss_mb": round(base_rss, 1),
        "recall_1cell_1deg": (sum(hits) / len(hits)) if hits else None,
        "queries": len(times),
    }
    if method == "ransac":
        run["pose_samples"] = f"{loc.num_pose_samples}x{loc.num_pose_retries}"
    if extrapolate:
        run["extrapolated"] = True
    return run


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPUs, {platform.system()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=20, help="timed queries per run of ours")
    ap.add_argument("--naive-queries", type=int, default=2, help="timed queries of the naive baseline")
    ap.add_argument("--ransac-queries", type=int, default=2, help="timed queries of RANSAC (slow at this size)")
    ap.add_argument("--naive-chunk", type=int, default=16, help="rotations timed for extrapolated naive runs")
    ap.add_argument("--quick", action="store_true", help="D=8 and 64 rotations only, 5 queries")
    ap.add_argument("--worker", nargs=4, metavar=("METHOD", "ROT", "DIM", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        method, rot, dim, n = args.worker
        print(json.dumps(worker(method, int(rot), int(dim), int(n), args.naive_chunk)))
        return

    rot_list, dim_list, queries = ([64], [8], 5) if args.quick else ([64, 256], [8, 32], args.queries)
    plan = []
    for dim in dim_list:
        plan.append(("ransac", rot_list[0], dim, min(queries, args.ransac_queries)))
        for rot in rot_list:
            plan.append(("voting", rot, dim, queries))
            plan.append(("naive", rot, dim, args.naive_queries if (rot, dim) == (64, 8) else 1))
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    load_start = os.getloadavg()
    runs = []
    for k, (method, rot, dim, n) in enumerate(plan):
        _log(f"[{k + 1}/{len(plan)}] {method}, {rot} rotations, D={dim}, {n} queries")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, str(rot), str(dim), str(n),
               "--naive-chunk", str(args.naive_chunk)]
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=None, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"bench_localizer: worker {method}/{rot}/{dim} failed (exit {proc.returncode})")
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        _log(f"  -> median {run['median_s']:.3f} s, peak RSS {run['peak_rss_mb']:.0f} MB, "
             f"recall {run['recall_1cell_1deg']}")
        runs.append(run)

    def median_of(method: str, rot: int | None, dim: int) -> float | None:
        for r in runs:
            if r["method"] == method and r["dim"] == dim and (r["rotations"] == rot or method == "ransac"):
                return r["median_s"]
        return None

    naive = median_of("naive", 64, 8)
    ours = [m for m in (median_of("voting", 64, 8), median_of("ransac", None, 8)) if m is not None]
    result = {
        "runs": runs,
        "speedup_vs_naive": round(naive / min(ours), 2) if naive and ours else None,
        "machine": _machine(),
        "threads": THREADS,
        "load_avg_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
        "problem": {"map_cells": MAP_CELLS, "query_cells": QUERY_CELLS, "cell_m": CELL_M},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
