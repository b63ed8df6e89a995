"""Benchmark of the digital twin and the training-chunk writer on the Helsinki extract.

    OMP_NUM_THREADS=1 python benchmarks/bench_synth.py [--pairs 48] [--views 40]

Single-threaded (torch.set_num_threads(1)). The LAST line printed is one JSON object with
`views_per_s_128x256`, `views_per_s_256x512`, `s_per_km2_ortho_0p2m`, `pairs_per_min` (the whole
chunk writer with the world already built: sampling, 8 map views + query + aerial + semantics,
Zarr writes) and `peak_rss_mb`, plus the world build time. Targets: >= 30 views/s at 128x256 and
>= 120 pairs/min on one core.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--osm", default="helsinki", help="OSM .pbf path or 'helsinki'")
    p.add_argument("--pairs", type=int, default=48, help="pairs written for pairs_per_min")
    p.add_argument("--views", type=int, default=40, help="views rendered per resolution")
    p.add_argument("--preset", default="cpu-tiny")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from neuralmaps.geo.osm import resolve_osm
    from neuralmaps.config import preset
    from neuralmaps.synth import World, simulate_runs, write_training_chunks
    from neuralmaps.testing import benchmark_ortho, benchmark_render

    osm = resolve_osm(args.osm)
    t0 = time.perf_counter()
    world = World.from_osm(osm, seed=0, progress=False)
    world_s = time.perf_counter() - t0
    print(f"world: {world} built in {world_s:.1f} s", file=sys.stderr)

    v_small = benchmark_render(world, (128, 256), args.views)
    v_large = benchmark_render(world, (256, 512), max(4, args.views // 4))
    ortho = benchmark_ortho(world, 0.2, 250_000.0)
    print(f"render: {v_small:.1f} views/s 128x256, {v_large:.1f} views/s 256x512, ortho {ortho:.2f} s/km2 @0.2m",
          file=sys.stderr)

    config = preset(args.preset)
    t0 = time.perf_counter()
    runs = simulate_runs(world, 12, 8, 0, config=config)
    runs_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.zarr"
        t0 = time.perf_counter()
        write_training_chunks(osm, out, args.pairs, seed=0, config=config, world=world, runs=runs, progress=False)
        write_s = time.perf_counter() - t0
    result = {
        "views_per_s_128x256": round(v_small, 2),
        "views_per_s_256x512": round(v_large, 2),
        "s_per_km2_ortho_0p2m": round(ortho, 3),
        "pairs_per_min": round(60.0 * args.pairs / write_s, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "world_build_s": round(world_s, 1),
        "simulate_runs_s": round(runs_s, 2),
        "pairs": args.pairs,
        "preset": args.preset,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
