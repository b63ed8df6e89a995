"""Benchmark of the GIS export (`neuralmaps.geo.export_map`): seconds per km² and peak memory.

    OMP_NUM_THREADS=1 python benchmarks/bench_export.py [--sizes 1024 2048] [--res 0.5] [--window-mb 16]

For each size S a synthetic neural map of S x S pixels (cpu-tiny layout: 32 features float32,
16 matching float16, 11 class probabilities float16, classes, valid, observations) is written to a
Zarr store chunk by chunk, then exported by a fresh process that opens it with `open_zarr` (dask,
larger than the windows), so each process's peak RSS is the export's alone. The LAST line printed
is one JSON object with `export_s_per_km2` (wall clock, of the largest map), `export_cpu_s_per_km2`
(process CPU time: the figure to compare on a shared machine), and per size the store's size on
disk, the export time, the RSS before the export (imports + open) and the peak RSS. Bounded memory
means the peak does not grow with the map.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

CHILD = r"""
import json, sys, time
import neuralmaps.geo.export as gx
from neuralmaps.geo import open_zarr
from neuralmaps.config import CLASS_NAMES
def hwm_mb():  # VmHWM: this process's peak RSS (ru_maxrss would count the parent's at fork time)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
store, out, window_mb = sys.argv[1], sys.argv[2], float(sys.argv[3])
gx.WINDOW_MB = window_mb
ds = open_zarr(store)
rss0 = hwm_mb()
t0, c0 = time.perf_counter(), time.process_time()
gx.export_map(ds, out, name="bench", class_names=list(CLASS_NAMES), progress=False)
dt, cpu = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({"seconds": dt, "cpu_seconds": cpu, "rss_before_mb": rss0,
                  "peak_rss_mb": hwm_mb()}))
"""


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="map sides in pixels")
    p.add_argument("--res", type=float, default=0.5, help="pixel size (m); cpu-tiny maps are 0.5 m")
    p.add_argument("--window-mb", type=float, default=16.0, help="export window budget (WINDOW_MB)")
    p.add_argument("--tmp", default=None, help="scratch folder (default: the system's)")
    args = p.parse_args(argv)

    from neuralmaps.config import CLASS_NAMES
    from neuralmaps.geo import write_zarr
    from neuralmaps.geo.export import synthetic_map_dataset

    runs = {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for size in args.sizes:
            store = Path(tmp) / f"map{size}.zarr"
            ds = synthetic_map_dataset(size, size, res_m=args.res, num_features=32, num_matching=16,
                                       class_names=CLASS_NAMES, chunk=512)
            write_zarr(ds, store)  # dask writes chunk by chunk
            env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
            r = subprocess.run([sys.executable, "-c", CHILD, str(store), str(Path(tmp) / f"out{size}"),
                                str(args.window_mb)], capture_output=True, text=True, env=env)
            if r.returncode:
                raise SystemExit(r.stderr[-3000:])
            res = json.loads(r.stdout.strip().splitlines()[-1])
            km2 = size * size * args.res**2 / 1e6
            res.update(km2=km2, cpu_s_per_km2=res["cpu_seconds"] / km2, store_mb=_du(store) / 2**20,
                       features_mb=32 * 4 * size * size / 2**20,
                       export_mb=_du(Path(tmp) / f"out{size}") / 2**20, s_per_km2=res["seconds"] / km2)
            runs[str(size)] = res
            print(f"{size} px ({km2:.3f} km²): {res['seconds']:.1f} s, {res['s_per_km2']:.0f} s/km² "
                  f"(CPU {res['cpu_seconds']:.1f} s, {res['cpu_s_per_km2']:.0f} s/km²), "
                  f"RSS before {res['rss_before_mb']:.0f} MB, peak {res['peak_rss_mb']:.0f} MB "
                  f"(features {res['features_mb']:.0f} MB in memory, store {res['store_mb']:.0f} MB)",
                  flush=True)
    last = runs[str(max(args.sizes))]
    out = {"export_s_per_km2": last["s_per_km2"], "export_cpu_s_per_km2": last["cpu_s_per_km2"],
           "res_m": args.res, "window_mb": args.window_mb,
           "runs": runs}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
