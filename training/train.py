"""Train SNAP on a training-chunk store: localization (self-supervised), then semantics.

    python -m training.train --preset cpu-tiny --data data/helsinki.zarr --out outputs/cpu-tiny \
        [--set model.matching_dim=16 train.batch_size=8] [--modalities streetview,aerial,semantic] \
        [--init pretrained|CKPT] [--steps N] [--semantic-steps N] [--device cpu|cuda|auto]

(`python training/train.py ...` is the same.) Writes `<out>/localization_last.pt`,
`<out>/semantics_last.pt` (= the final model), `config.yaml`, `log.jsonl`, `log.csv`,
`metrics.json` and `run.json` (the command, data, seeds and commit). A run killed at any moment
resumes when started again with the same arguments, losing at most `train.ckpt_every` steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if __package__ in (None, ""):  # run as a script: make `training` and `neuralmaps` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.utils.data import ConcatDataset  # noqa: E402

from neuralmaps.config import Config, preset  # noqa: E402
from neuralmaps.data import SceneDataset  # noqa: E402
from neuralmaps.data.packed import PackedPairs, is_pack  # noqa: E402
from neuralmaps.devices import DeviceError, resolve_device  # noqa: E402
from neuralmaps.models import MODALITIES, SNAP, parse_modalities  # noqa: E402
from neuralmaps.training import warm_start, train, validate  # noqa: E402


def build_config(preset_name: str, overrides: list[str], modalities: str | None) -> Config:
    """The preset, then `--modalities` (which inputs the map is built from), then `--set`."""
    cfg = preset(preset_name)
    if modalities:
        mods = parse_modalities(modalities)
        cfg = cfg.with_overrides({f"model.use_{m}": m in mods for m in MODALITIES})
    return cfg.with_overrides(overrides or [])


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, nargs="+",
                    help="training-chunk store(s) (neuralmaps synth --out) or packs of them (training.pack); "
                         "training takes the train pairs of all of them; validation uses the first one's val split")
    ap.add_argument("--holdout", nargs="*", default=[], metavar="STORE",
                    help="stores whose val/test areas no training pair may lie in: give the store you evaluate "
                         "on when --data has other stores of the same city (their splits differ)")
    ap.add_argument("--preset", default="cpu-tiny", help="config preset: cpu-tiny or paper")
    ap.add_argument("--out", required=True, help="run folder (checkpoints, logs, metrics)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="dotted config overrides, e.g. model.matching_dim=16 train.batch_size=8")
    ap.add_argument("--modalities", default=None,
                    help="map inputs trained with, any of streetview,aerial,semantic (default: the preset's)")
    ap.add_argument("--init", default=None, help="warm start: 'pretrained' (the shipped model) or a checkpoint path")
    ap.add_argument("--new-areas", action="store_true",
                    help="with --init pretrained: also train on split blocks the shipped model never trained on "
                         "(default: only its training_blocks, so that the areas it was evaluated on stay held out)")
    ap.add_argument("--steps", type=int, default=None, help="localization steps (default: train.steps)")
    ap.add_argument("--semantic-steps", type=int, default=None, help="semantic steps (default: train.semantic_steps)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0, help="data-loader processes")
    ap.add_argument("--device", default="cpu",
                    help="torch device to train on: cpu (default), cuda[:N], or auto (cuda where there is one); "
                         "a run may resume on another device")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=10, help="steps between log records")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    def fail(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 2

    try:
        device = resolve_device(args.device)
    except DeviceError as e:
        return fail(f"--{e}")
    try:
        cfg = build_config(args.preset, args.set, args.modalities)
        steps = cfg.train.steps if args.steps is None else args.steps
        sem_steps = cfg.train.semantic_steps if args.semantic_steps is None else args.semantic_steps
        only = None
        if args.init == "pretrained" and not args.new_areas:  # keep the shipped model's held-out areas unseen
            only = SNAP.pretrained_training_blocks() or frozenset()  # a card that does not say: nothing is known seen
        if args.holdout and any(map(is_pack, args.data)):
            return fail("--holdout applies to stores; a pack's held-out areas are left out when it is made "
                        "(python -m training.pack --holdout)")
        parts = [PackedPairs(d, "train", config=cfg, only_blocks=only) if is_pack(d) else
                 SceneDataset(d, "train", config=cfg, holdout=tuple(args.holdout), only_blocks=only) for d in args.data]
        train_set = parts[0] if len(parts) == 1 else ConcatDataset(parts)
        val_set = (PackedPairs if is_pack(args.data[0]) else SceneDataset)(args.data[0], "val", config=cfg)
        dropped = sum(p.num_held_out for p in parts)
        if len(train_set) == 0 and only is not None and dropped:
            return fail(f"--init pretrained trains only on the split blocks the shipped model trained on (so that "
                        f"its held-out areas stay unseen), and {args.data} has no train pair there (another city?): "
                        "add --new-areas to train on new areas")
        if len(train_set) == 0:
            return fail(f"{args.data} holds no finished train pairs")
        if only is not None and dropped:
            print(f"--init pretrained: {dropped} train pairs outside the shipped model's "
                  "training blocks or in a --holdout area left out (--new-areas keeps the former)", file=sys.stderr)
        model = SNAP(cfg)
        if args.init:
            init = SNAP.from_pretrained() if args.init == "pretrained" else SNAP.load(args.init)
            fresh = warm_start(model, init)
            if fresh and not sem_steps:
                return fail(f"--init {args.init}: its semantic decoder does not fit the config ({fresh}); "
                            "a new one needs --semantic-steps > 0")
            if fresh:
                print(f"--init {args.init}: semantic decoder from scratch ({fresh})", file=sys.stderr)
        model.to(device)
    except (FileNotFoundError, ValueError, KeyError) as e:
        return fail(str(e))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = {"argv": sys.argv if argv is None else ["training.train", *argv],
           "data": " ".join(str(d) for d in args.data), "holdout": [str(h) for h in args.holdout],
           "train_pairs": len(train_set), "train_pairs_dropped_as_held_out": dropped,
           "only_shipped_training_blocks": only is not None, "val_pairs": len(val_set), "seed": args.seed, "commit": _commit(),
           "steps": steps, "semantic_steps": sem_steps, "init": args.init, "device": str(device),
           "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with open(out / "runs.jsonl", "a") as f:  # one line per (re)start: the whole schedule of the run
        f.write(json.dumps(run) + "\n")
    common = dict(out_dir=out, batch_size=args.batch_size, num_workers=args.workers, seed=args.seed,
                  progress=not args.quiet, log_every=args.log_every)
    train(model, train_set, steps=steps, stage="localization", val_set=val_set if len(val_set) else None,
          lr=args.lr, **common)
    if sem_steps:
        train(model, train_set, steps=sem_steps, stage="semantics", **common)
    metrics = {}
    if len(val_set):
        metrics = validate(model, val_set)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
