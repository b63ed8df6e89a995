"""Ship a trained run as the package's pretrained model.

    python -m training.ship --run outputs/run2 --data data/helsinki.zarr

Copies `<run>/semantics_last.pt` (else `localization_last.pt`) to
`neuralmaps/weights/snap-cpu-tiny.pt` and writes `snap-cpu-tiny.json` beside it: the sha256, the
run's schedule (`runs.jsonl`), and the 150 m split blocks of the training pairs (with those of the
shipped weights it was warm-started from), so that tests can build held-out sets in areas the
model never saw.

`--set model.num_query_points=null` changes runtime knobs of the shipped config (the fields no
weight depends on, `neuralmaps.models.snap.RUNTIME_FIELDS`), e.g. to ship a run that started
before a preset's knob changed; anything else is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import zarr

from neuralmaps.data import SceneDataset
from neuralmaps.data.store import SPLIT_NAMES
from neuralmaps.models import SNAP
from neuralmaps.models.snap import RUNTIME_FIELDS
from neuralmaps.storage import atomic_write_bytes, atomic_write_text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--data", required=True, nargs="+", help="the training store(s) of the run")
    ap.add_argument("--holdout", nargs="*", default=[], metavar="STORE", help="the run's --holdout stores")
    ap.add_argument("--name", default="snap-cpu-tiny")
    ap.add_argument("--max-mb", type=float, default=20.0)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="runtime config knobs of the shipped checkpoint, e.g. model.num_query_points=null")
    args = ap.parse_args(argv)
    run = Path(args.run)
    ckpt = next((run / f for f in ("semantics_last.pt", "localization_last.pt") if (run / f).is_file()), None)
    if ckpt is None:
        print(f"error: {run} holds no checkpoint", file=sys.stderr)
        return 2
    data = ckpt.read_bytes()
    model = SNAP.load(ckpt)  # refuses anything that is not a loadable checkpoint
    if args.set:
        bad = [kv for kv in args.set if kv.split("=", 1)[0] not in RUNTIME_FIELDS]
        if bad:
            print(f"error: --set takes runtime knobs only ({', '.join(sorted(RUNTIME_FIELDS))}); got {bad}",
                  file=sys.stderr)
            return 2
        try:
            cfg = model.config.with_overrides(args.set)
        except (ValueError, TypeError, KeyError) as e:
            print(f"error: --set: {e}", file=sys.stderr)
            return 2
        with tempfile.TemporaryDirectory() as tmp:  # SNAP.save writes atomically to a path
            SNAP.load(ckpt, config=cfg).save(Path(tmp) / "ckpt.pt")
            data = (Path(tmp) / "ckpt.pt").read_bytes()
    if len(data) > args.max_mb * 2**20:
        print(f"error: {ckpt} is {len(data) / 2**20:.1f} MB, over {args.max_mb} MB", file=sys.stderr)
        return 2
    dest = SNAP.pretrained_path(args.name)
    runs = [json.loads(line) for line in (run / "runs.jsonl").read_text().splitlines() if line.strip()] \
        if (run / "runs.jsonl").is_file() else []
    previous = None
    if runs and runs[0].get("init") == "pretrained" and dest.with_suffix(".json").is_file():
        previous = json.loads(dest.with_suffix(".json").read_text())
    # A warm start that kept to the shipped model's training blocks (training.train without
    # --new-areas) trained on no pair outside them: count its train pairs the same way.
    only = None
    if previous is not None and any(r.get("only_shipped_training_blocks") for r in runs):
        only = frozenset(tuple(int(v) for v in b) for b in previous.get("training_blocks", []))
    used: dict[str, set] = {s: set() for s in SPLIT_NAMES}
    num_pairs = dict.fromkeys(SPLIT_NAMES, 0)
    for d in args.data:  # the blocks each split used, as training.train selects them (holdout applied)
        blocks = np.asarray(zarr.open_group(str(d), mode="r")["block"][:])
        for s in SPLIT_NAMES:
            ds = SceneDataset(d, s, holdout=tuple(args.holdout) if s == "train" else (),
                              only_blocks=only if s == "train" else None)
            used[s] |= {tuple(int(v) for v in blocks[i]) for i in ds.indices}
            num_pairs[s] += len(ds)
    if previous is not None:
        # Warm-started from the shipped weights: their schedule comes first (training accumulates).
        # A run keeps the weights it first shipped in; the previous ship's own runs get its sha.
        runs = [{"shipped_as": previous.get("sha256", "")[:12], **r} for r in previous.get("runs", [])] + runs
        used["train"] |= {tuple(b) for b in previous.get("training_blocks", [])}
    info = {
        "name": args.name, "sha256": hashlib.sha256(data).hexdigest(), "source": str(ckpt), "runs": runs,
        "training_store": " ".join(str(d) for d in args.data), "num_pairs": num_pairs,
        "training_blocks": [list(b) for b in sorted(used["train"])],
        # areas no training pair came from (another store's val/test block may be a train block here)
        "held_out_blocks": {s: [list(b) for b in sorted(used[s] - used["train"])] for s in ("val", "test")},
    }
    atomic_write_bytes(dest, data)
    atomic_write_text(dest.with_suffix(".json"), json.dumps(info, indent=1) + "\n")
    print(f"shipped {ckpt} -> {dest} ({len(data) / 2**20:.2f} MB, sha256 {info['sha256'][:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
