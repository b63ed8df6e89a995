"""Train SNAP on a training-chunk store: localization (self-supervised), then semantics.

    python training/train.py --data demo/chunks.zarr --preset cpu-tiny --out outputs/cpu-tiny \
        --steps 3000 --semantic-steps 500

Writes `<out>/localization_last.pt`, `<out>/semantics_last.pt` (= the final model), `config.yaml`,
`log.jsonl` and `metrics.json`. A killed run resumes when started again with the same arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from neuralmaps.config import preset  # noqa: E402
from neuralmaps.data import SceneDataset  # noqa: E402
from neuralmaps.models import SNAP  # noqa: E402
from neuralmaps.training import evaluate_localization, train  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="training-chunk store (neuralmaps synth --out)")
    ap.add_argument("--preset", default="cpu-tiny")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=None, help="localization steps (default: config)")
    ap.add_argument("--semantic-steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = preset(args.preset)
    try:
        train_set = SceneDataset(args.data, "train", config=cfg)
        val_set = SceneDataset(args.data, "val", config=cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    model = SNAP(cfg)
    steps = args.steps or cfg.train.steps
    common = dict(out_dir=out, batch_size=args.batch_size, num_workers=args.workers, seed=args.seed)
    train(model, train_set, steps=steps, stage="localization", val_set=val_set if len(val_set) else None,
          eval_every=max(steps // 5, 1), lr=args.lr, **common)
    if args.semantic_steps:
        train(model, train_set, steps=args.semantic_steps, stage="semantics", **common)
    metrics = {}
    for name, ds in (("train", train_set), ("val", val_set)):
        if len(ds):
            metrics[name] = evaluate_localization(model, ds).summary()
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
