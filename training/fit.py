"""Optimisation check of a model variant: train cpu-tiny from scratch on a few pairs, report how well
it then localizes those same pairs (memorisation, not generalisation: see `training.evaluate`).

    python -m training.fit --data outputs/hel2k.zarr --set model.point_scores=log_ratio model.proposals=local_maxima

Prints one JSON object: the logged losses and the recall / median errors on the fitted pairs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch.utils.data import Subset

from neuralmaps.config import preset
from neuralmaps.data import SceneDataset
from neuralmaps.models import SNAP
from neuralmaps.training import evaluate_localization, train


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="training-chunk store (neuralmaps synth --out)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="dotted config overrides")
    ap.add_argument("--pairs", type=int, default=24, help="train pairs, evenly spread over the train split")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="run folder for the log and checkpoint (default: none kept)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    try:
        cfg = preset("cpu-tiny").with_overrides(args.set)
        data = SceneDataset(args.data, "train")
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stride = max(1, -(-len(data) // args.pairs))
    pairs = Subset(data, list(range(0, len(data), stride))[: args.pairs])
    model = SNAP(cfg)
    t = time.time()
    records = train(model, pairs, steps=args.steps, batch_size=args.batch_size, lr=args.lr, log_every=10,
                    out_dir=args.out, progress=False)
    after = evaluate_localization(model, pairs).summary()
    print(json.dumps({"set": args.set, "pairs": len(pairs), "steps": args.steps,
                      "loss": [round(r["loss"], 2) for r in records], "after": after,
                      "seconds": round(time.time() - t, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
