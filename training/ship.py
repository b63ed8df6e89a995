"""Ship a trained run as the package's pretrained model.

    python -m training.ship --run outputs/run2 --data data/helsinki.zarr

Copies `<run>/semantics_last.pt` (else `localization_last.pt`) to
`neuralmaps/weights/snap-cpu-tiny.pt` and writes `snap-cpu-tiny.json` beside it: the sha256, the
run's schedule (`runs.jsonl`), and the 150 m split blocks of the training pairs, so that tests can
build held-out sets in areas the model never saw.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import zarr

from neuralmaps.data.store import SPLIT_NAMES
from neuralmaps.models import SNAP
from neuralmaps.storage import atomic_write_bytes, atomic_write_text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--data", required=True, help="the training store of the run")
    ap.add_argument("--name", default="snap-cpu-tiny")
    ap.add_argument("--max-mb", type=float, default=20.0)
    args = ap.parse_args(argv)
    run = Path(args.run)
    ckpt = next((run / f for f in ("semantics_last.pt", "localization_last.pt") if (run / f).is_file()), None)
    if ckpt is None:
        print(f"error: {run} holds no checkpoint", file=sys.stderr)
        return 2
    data = ckpt.read_bytes()
    if len(data) > args.max_mb * 2**20:
        print(f"error: {ckpt} is {len(data) / 2**20:.1f} MB, over {args.max_mb} MB", file=sys.stderr)
        return 2
    SNAP.load(ckpt)  # refuses anything that is not a loadable checkpoint
    g = zarr.open_group(str(args.data), mode="r")
    blocks, split, done = (np.asarray(g[k][:]) for k in ("block", "split", "pair_done"))
    used = {s: sorted({tuple(int(v) for v in b) for b in blocks[(split == i) & done.astype(bool)]})
            for i, s in enumerate(SPLIT_NAMES)}
    dest = SNAP.pretrained_path(args.name)
    runs = [json.loads(line) for line in (run / "runs.jsonl").read_text().splitlines() if line.strip()] \
        if (run / "runs.jsonl").is_file() else []
    if runs and runs[0].get("init") == "pretrained" and dest.with_suffix(".json").is_file():
        # Warm-started from the shipped weights: their schedule comes first (training accumulates).
        previous = json.loads(dest.with_suffix(".json").read_text())
        runs = [dict(r, shipped_as=previous.get("sha256", "")[:12]) for r in previous.get("runs", [])] + runs
    info = {
        "name": args.name, "sha256": hashlib.sha256(data).hexdigest(), "source": str(ckpt), "runs": runs,
        "training_store": str(args.data), "num_pairs": {s: int(((split == i) & done.astype(bool)).sum())
                                                       for i, s in enumerate(SPLIT_NAMES)},
        "training_blocks": [list(b) for b in used["train"]],
        "held_out_blocks": {s: [list(b) for b in used[s]] for s in ("val", "test")},
    }
    atomic_write_bytes(dest, data)
    atomic_write_text(dest.with_suffix(".json"), json.dumps(info, indent=1) + "\n")
    print(f"shipped {ckpt} -> {dest} ({len(data) / 2**20:.2f} MB, sha256 {info['sha256'][:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
