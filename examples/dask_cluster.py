"""Build a neural map on an existing Dask cluster: pass its `Client` to `build_map`.

    python examples/dask_cluster.py --captures out/captures --out out/map.zarr --scheduler tcp://HOST:8786
    python examples/dask_cluster.py --captures out/captures --out out/map.zarr    # a local stand-in

Without --scheduler, a `LocalCluster` started here stands in for your cluster. On a real cluster:
- every worker needs neuralmaps installed (the same version), and must read the capture images and
  the orthophoto at the same paths as this script (a shared filesystem or mount), and the map
  store at --out (written tile by tile by the workers);
- the model travels to each worker once (a Dask WorkerPlugin), not with every task;
- GPU workers: start them with `dask worker ... --resources GPU=1` and pass
  `resources={"GPU": 1}` (and `device="cuda"`) to `build_map`;
- a build that stops (a lost worker, a killed script) resumes when run again: finished tiles are
  kept.
--captures is a capture set (`neuralmaps capture`, build_and_export.py, or your own, see
bring_your_own_data.py).
"""

import argparse
from pathlib import Path

from distributed import Client, LocalCluster

from neuralmaps import CaptureSet, build_map


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--captures", required=True, help="capture directory (captures.parquet, images/, aerial.tif)")
    p.add_argument("--out", default="out/dask_map.zarr", help="the map store to write")
    p.add_argument("--scheduler", default=None, help="address of your Dask scheduler, e.g. tcp://10.0.0.5:8786")
    p.add_argument("--workers", type=int, default=2, help="workers of the local stand-in cluster")
    p.add_argument("--bbox", default=None, help="W,S,E,N in degrees: map only this box (default: the captures' extent)")
    args = p.parse_args()
    cap_dir = Path(args.captures)
    captures = CaptureSet.open(cap_dir)
    aerial = cap_dir / "aerial.tif"
    region = [float(v) for v in args.bbox.split(",")] if args.bbox else None

    if args.scheduler:
        client = Client(args.scheduler)
    else:  # the stand-in: worker processes on this machine, one thread each, loopback only
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, host="127.0.0.1", dashboard_address=None)
        client = Client(cluster)
    with client:
        print(client)
        nm = build_map(region, captures, aerial=aerial if aerial.is_file() else None, out=args.out, client=client)
    if not args.scheduler:
        cluster.close()
    print(nm)


if __name__ == "__main__":
    main()
