"""Learning curves of a training run from its log.jsonl (or log.csv): loss, learning rate, validation
recall and the training error metric over steps, one line per stage.

    python training/plot.py RUN/log.jsonl --out RUN/curves.png

Each record is one JSON object per line with at least `step`; `stage` (localization, semantics),
`loss`, `lr`, `median_*` and `val/...recall...` keys are drawn when present. Records of a resumed
run that repeat a step replace the earlier ones.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from neuralmaps.storage import atomic_write_bytes

os.environ.setdefault("MPLBACKEND", "Agg")


class LogError(ValueError):
    pass


def _value(v):
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def read_log(path: str | os.PathLike) -> list[dict]:
    """Records of a log.jsonl (one JSON object a line) or log.csv (a header row); LogError if none."""
    path = Path(path)
    if not path.is_file():
        raise LogError(f"log not found: {path}")
    text = path.read_text()
    records: list[dict] = []
    if path.suffix == ".csv":
        records = [{k: _value(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(io.StringIO(text))]
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                # A run killed mid-write leaves a partial last line: skip it, refuse anything else.
                if n == len(text.splitlines()):
                    continue
                raise LogError(f"{path}:{n}: not a JSON record") from None
            if isinstance(rec, dict):
                records.append(rec)
    records = [r for r in records if isinstance(r.get("step"), (int, float))]
    if not records:
        raise LogError(f"{path}: no records with a 'step'")
    # Keep the last record of each (stage, step): a resumed run may repeat steps.
    last: dict[tuple, dict] = {}
    for r in records:
        last[(str(r.get("stage", "")), int(r["step"]))] = r
    return [last[k] for k in sorted(last, key=lambda k: (k[0] != "localization", k[0], k[1]))]


def _series(records: list[dict], key: str) -> dict[str, tuple[list[float], list[float]]]:
    out: dict[str, tuple[list[float], list[float]]] = {}
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs, ys = out.setdefault(str(r.get("stage", "")) or "run", ([], []))
            xs.append(float(r["step"]))
            ys.append(float(v))
    return out


def plot_log(records: list[dict], out: str | os.PathLike, title: str = "") -> Path:
    """Draw loss, lr, validation recall and the training metric panels to the PNG `out` (atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in records for k in r})
    recall_keys = [k for k in keys if k.startswith("val") and "recall" in k]
    metric_keys = [k for k in keys if k.startswith("median_")]
    panels = [("loss", ["loss"], True), ("learning rate", ["lr"], False),
              ("validation recall (%)", recall_keys, False), ("training metric", metric_keys, False)]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (name, ks, logy) in zip(axes.flat, panels):
        drawn = False
        for k in ks:
            for stage, (xs, ys) in _series(records, k).items():
                if "recall" in name:
                    ys = [100 * y if y <= 1.0 else y for y in ys]
                label = k if stage == "run" else f"{k} ({stage})"
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=label)
                drawn = True
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if drawn:
            if logy and all(y > 0 for k in ks for _, ys in _series(records, k).values() for y in ys):
                ax.set_yscale("log")
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not in the log", ha="center", va="center", transform=ax.transAxes, color="grey")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log", help="a run's log.jsonl (or log.csv)")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--title", default=None)
    args = ap.parse_args(argv)
    try:
        records = read_log(args.log)
    except LogError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = plot_log(records, args.out, args.title if args.title is not None else str(Path(args.log).parent))
    print(f"wrote {path} ({len(records)} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
