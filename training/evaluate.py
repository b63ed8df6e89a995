"""Evaluate SNAP (or a baseline) on a training-chunk store: visual positioning and semantic mapping.

    python -m training.evaluate --checkpoint pretrained --data STORE --split test --out DIR
    python -m training.evaluate --checkpoint RUN/semantics_last.pt --data STORE --split all --out DIR \
        --modalities streetview --mode voting --limit 50
    python -m training.evaluate --baseline prior --data STORE --split test --out DIR
    python -m training.evaluate --baseline aerial-rgb --data STORE --split test --out DIR
    python -m training.evaluate --table "street view=DIR1" "prior=DIR2" ...   # Markdown table of results

Writes DIR/metrics.json (recall_1m_1deg, recall_3m_3deg, recall_5m_5deg, median_error_m,
median_error_deg, num_queries, modalities; semantic_miou and semantic_iou_per_class with a semantic
head; per-mode, per-split-area and per-query-type breakdowns and timings), DIR/queries.csv,
DIR/recall_curves.png and DIR/semantics.png. The logic lives in `neuralmaps.evaluation`.
Exit status 2 with a one-line error for bad input (missing store or checkpoint, unknown or empty split).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MPLBACKEND", "Agg")

from neuralmaps.evaluation import (  # noqa: E402
    BASELINES, DEFAULT_MODALITIES, EvaluationError, parse_modalities, run_evaluation,
)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m training.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="'pretrained' (the shipped weights) or a SNAP checkpoint path")
    what.add_argument("--baseline", choices=BASELINES,
                      help="prior: scene centre + random heading; aerial-rgb: ground-projected query colours "
                           "matched to the raw orthophoto")
    what.add_argument("--table", nargs="+", metavar="NAME=DIR",
                      help="print a Markdown table of earlier evaluations (their DIR/metrics.json) and exit")
    ap.add_argument("--data", help="training-chunk store (neuralmaps synth --out), any city (required)")
    ap.add_argument("--split", default="test", help="train, val, test or all (default test)")
    ap.add_argument("--out", help="output folder (required)")
    ap.add_argument("--modalities", default=",".join(DEFAULT_MODALITIES),
                    help="map inputs, a comma-separated subset of streetview,aerial,semantic (default streetview,aerial)")
    ap.add_argument("--mode", default="both", choices=("ransac", "voting", "both"),
                    help="localizer mode(s); with both, the top-level metrics are RANSAC's")
    ap.add_argument("--rotations", type=int, default=64, help="voting rotations (default 64)")
    ap.add_argument("--limit", type=int, default=None, help="evaluate at most N queries (the first N pairs)")
    ap.add_argument("--no-semantics", action="store_true", help="skip the semantic-mapping evaluation")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N], for the learned model")
    ap.add_argument("--seed", type=int, default=0, help="seed of RANSAC samples and the prior's headings")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--set", nargs="+", default=[], metavar="model.FIELD=VALUE",
                    help="localizer knobs no weight depends on, e.g. model.proposals=softmax (a variant of the "
                         "same weights)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.table:
        return _table(args.table)
    missing = [f"--{k}" for k in ("data", "out") if getattr(args, k) is None]
    if missing:
        ap.error(f"the following arguments are required: {', '.join(missing)}")
    import torch

    torch.set_num_threads(max(1, args.threads))
    try:
        modalities = parse_modalities(args.modalities)
        metrics = run_evaluation(
            data_path=args.data, split=args.split, out_dir=args.out, checkpoint=args.checkpoint,
            baseline=args.baseline, modalities=modalities, mode=args.mode, limit=args.limit, seed=args.seed,
            num_rotations=args.rotations, semantics=not args.no_semantics, progress=not args.quiet,
            device=args.device, overrides=args.set,
        )
    except EvaluationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    keys = ("recall_1m_1deg", "recall_3m_3deg", "recall_5m_5deg", "median_error_m", "median_error_deg",
            "num_queries", "modalities", "semantic_miou")
    print(json.dumps({k: metrics[k] for k in keys if k in metrics}))
    return 0


def _table(items: list[str]) -> int:
    from pathlib import Path

    from neuralmaps.evaluation import results_table

    files = {}
    for item in items:
        name, sep, folder = item.partition("=")
        path = Path(folder if sep else name) / "metrics.json"
        if not path.is_file():
            print(f"error: {path} not found (give NAME=DIR of an evaluation's --out)", file=sys.stderr)
            return 2
        files[name] = path
    try:
        print(results_table(files), end="")
    except (KeyError, ValueError) as e:
        print(f"error: not an evaluation's metrics.json ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
