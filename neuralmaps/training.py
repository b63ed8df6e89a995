"""Training and evaluation loops for SNAP on training-chunk stores (two stages: localization, then
semantics on the frozen map).

`training/train.py` is the command-line front end; tests call these functions directly.
Checkpoints are written atomically (`SNAP.save`), with the config as YAML beside them, and the
optimiser state in `<out>/<stage>_opt.pt` so that a killed run resumes where it stopped.
"""

from __future__ import annotations

import io
import json
import math
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .config import Config
from .devices import model_device
from .devices import to_device  # noqa: F401  (public here since session 11)
from .storage import atomic_write_bytes, atomic_write_text
from .models import MODALITY_FLAGS, SEMANTIC_MODALITIES, SNAP

if TYPE_CHECKING:  # the loop needs any map-style dataset of batches, not the GIS stack behind the store
    from .data import SceneDataset

RECALL_THRESHOLDS_M = (1.0, 3.0, 5.0)


@dataclass
class LocalizationMetrics:
    """Pose errors of a set of queries: position (m) and heading (deg)."""

    err_xy_m: list[float] = field(default_factory=list)
    err_yaw_deg: list[float] = field(default_factory=list)

    def add(self, err_xy_m: torch.Tensor, err_yaw_deg: torch.Tensor) -> None:
        self.err_xy_m += err_xy_m.flatten().tolist()
        self.err_yaw_deg += err_yaw_deg.flatten().tolist()

    def recall(self, max_xy_m: float, max_yaw_deg: float | None = None) -> float:
        n = len(self.err_xy_m)
        if n == 0:
            return float("nan")
        ok = [
            e <= max_xy_m and (max_yaw_deg is None or r <= max_yaw_deg)
            for e, r in zip(self.err_xy_m, self.err_yaw_deg)
        ]
        return sum(ok) / n

    def summary(self) -> dict[str, float]:
        out = {f"recall@{t:g}m": self.recall(t) for t in RECALL_THRESHOLDS_M}
        if self.err_xy_m:
            out["median_err_xy_m"] = float(torch.tensor(self.err_xy_m).median())
            out["median_err_yaw_deg"] = float(torch.tensor(self.err_yaw_deg).median())
        out["num_queries"] = len(self.err_xy_m)
        return out


def _cycle(loader: DataLoader) -> Iterator[dict]:
    while True:
        yield from loader


def make_loader(dataset: SceneDataset, batch_size: int, shuffle: bool, num_workers: int, seed: int) -> DataLoader:
    if len(dataset) == 0:
        raise ValueError(f"{dataset!r} holds no pairs: write more pairs or pick another split")
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=min(batch_size, len(dataset)), shuffle=shuffle, drop_last=shuffle,
        num_workers=num_workers, generator=g, persistent_workers=num_workers > 0,
    )


@torch.no_grad()
def evaluate_localization(
    model: SNAP, dataset, batch_size: int = 4, max_batches: int | None = None, seed: int = 0,
    modalities: Sequence[str] | None = None,
) -> LocalizationMetrics:
    """Localize every query of `dataset` against the map built from its own scene (eval mode,
    the localizer's default RANSAC mode, as in `SNAP.loss`), from `modalities` (None: all the
    model and the batch have), on the model's device."""
    was_training = model.training
    model.eval()
    metrics = LocalizationMetrics()
    dev = model_device(model)
    g = torch.Generator(dev).manual_seed(seed)
    loader = make_loader(dataset, batch_size, shuffle=False, num_workers=0, seed=seed)
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            out = model.loss(to_device(batch, dev), generator=g, modalities=modalities)
            metrics.add(out["err_xy_m"], out["err_yaw_deg"])
    finally:
        model.train(was_training)
    return metrics


STAGES = ("localization", "semantics")
LOG_FIELDS = ("stage", "step", "loss", "median_err_xy_m", "median_area_accuracy", "recall@3m", "lr", "elapsed_s",
              "val/recall@1m", "val/recall@3m", "val/recall@5m", "val/median_err_xy_m", "val/median_err_yaw_deg",
              "val_aerial/recall@3m", "val_aerial/median_err_xy_m")
# Validation maps: street view + aerial, the modalities of the targets and of the product's maps
# (the semantic raster is a training input, never one of a built map); and aerial alone, which is
# all a map holds where no street-view image reached.
VAL_MODALITIES = {"val": SEMANTIC_MODALITIES, "val_aerial": ("aerial",)}


def lr_factor(step: int, steps: int, constant_fraction: float = 0.5, warmup: int = 0) -> float:
    """SNAP's schedule: constant for `constant_fraction` of the steps, then cosine decay to 0,
    after an optional linear warm-up of `warmup` steps. step 0-based."""
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    start = constant_fraction * steps
    if step < start:
        return warm
    frac = min(1.0, (step - start) / max(steps - start, 1))
    return warm * 0.5 * (1 + math.cos(math.pi * frac))


def _subset(dataset, limit: int | None):
    if limit is None or len(dataset) <= limit:
        return dataset
    # Evenly spread over the split, the same pairs at every evaluation.
    idx = torch.linspace(0, len(dataset) - 1, limit).round().long().tolist()
    return torch.utils.data.Subset(dataset, idx)


def val_modalities(model: SNAP) -> dict[str, tuple[str, ...]]:
    """`VAL_MODALITIES` restricted to the model's inputs; a set left empty or equal to "val" is skipped."""
    out = {name: tuple(m for m in mods if getattr(model.config.model, MODALITY_FLAGS[m]))
           for name, mods in VAL_MODALITIES.items()}
    return {name: mods for name, mods in out.items() if mods and (name == "val" or mods != out["val"])}


def validate(model: SNAP, dataset, **kwargs) -> dict[str, dict]:
    """`evaluate_localization` summaries per validation set of modalities (`val_modalities`)."""
    return {name: evaluate_localization(model, dataset, modalities=mods, **kwargs).summary() | {"modalities": list(mods)}
            for name, mods in val_modalities(model).items()}


def warm_start(model: SNAP, init: SNAP | dict) -> str:
    """Copy `init`'s weights (a SNAP or its state dict) into `model`: a warm start across runs. Every
    weight must fit, except the semantic decoder's, which is trained last on the frozen map: when the
    config changes it (`model.semantic_decoder`, `semantic_norm`, `semantic_dim`, `semantic_layers`) it keeps its fresh
    initialisation. Returns "" or a short description of the decoder weights left fresh; ValueError
    for any other misfit."""
    own, theirs = model.state_dict(), init if isinstance(init, dict) else init.state_dict()
    fits = {k: v for k, v in theirs.items() if k in own and own[k].shape == v.shape}
    off = sorted((set(own) | set(theirs)) - set(fits))
    core = [k for k in off if not k.startswith("semantic_net.")]
    if core:
        raise ValueError(f"the warm-start weights do not fit the config: {core[:5]}"
                         f"{' ...' if len(core) > 5 else ''} (missing, unexpected or of another shape)")
    if off:  # the decoder is replaced whole: no mix of old and new layers
        fits = {k: v for k, v in fits.items() if not k.startswith("semantic_net.")}
    model.load_state_dict(fits, strict=False)
    return f"{len(off)} semantic_net tensors differ" if off else ""


def _append_log(out: Path, rec: dict) -> None:
    """One record to log.jsonl (all keys) and log.csv (LOG_FIELDS), flushed at once."""
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    csv_path = out / "log.csv"
    new = not csv_path.exists()
    with open(csv_path, "a") as f:
        if new:
            f.write(",".join(LOG_FIELDS) + "\n")
        f.write(",".join("" if rec.get(k) is None else str(rec[k]) for k in LOG_FIELDS) + "\n")


def _truncate_logs(out: Path, stage: str, step: int) -> None:
    """Drop the log records of `stage` after `step` (written after the checkpoint a killed run
    resumes from, they will be written again)."""
    path = out / "log.jsonl"
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    recs = []
    for line in lines:
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by the kill
            pass
    keep = [r for r in recs if not (r.get("stage") == stage and r.get("step", 0) > step)]
    if len(keep) != len(lines):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
        atomic_write_text(out / "log.csv", ",".join(LOG_FIELDS) + "\n" + "".join(
            ",".join("" if r.get(k) is None else str(r[k]) for k in LOG_FIELDS) + "\n" for r in keep))


def train(
    model: SNAP,
    train_set: SceneDataset,
    *,
    steps: int,
    stage: str = "localization",
    out_dir: str | Path | None = None,
    val_set: SceneDataset | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    num_workers: int = 0,
    log_every: int = 10,
    eval_every: int | None = None,
    ckpt_every: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Train one stage and return the log records (also appended to `<out_dir>/log.jsonl` and
    `log.csv`).

    stage "localization": self-supervised, the NLL of the ground-truth query pose; all parameters.
    stage "semantics": the semantic decoder on the frozen map built from street view + aerial
    (only `model.semantic_net` learns; the semantic raster is the target, never an input).
    Every `ckpt_every` steps the model, optimiser, step and RNG state go atomically to
    `<out_dir>/<stage>_state.pt` (and the model to `<stage>_last.pt`), so a run killed at any
    moment resumes from there and loses at most `ckpt_every` steps.

    Runs on the model's device (move the model first, e.g. `model.to("cuda")`); batches follow it,
    and the random generator lives there. A run may resume on another device: the weights and the
    optimiser move, and the generator, whose state does not carry across devices, is re-seeded."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}")
    cfg: Config = model.config
    tc = cfg.train
    lr = lr or (tc.semantic_lr or tc.lr if stage == "semantics" else tc.lr)
    batch_size = batch_size or tc.batch_size
    ckpt_every = ckpt_every or tc.ckpt_every
    eval_every = tc.eval_every if eval_every is None else eval_every
    torch.manual_seed(seed)
    if stage == "localization":
        params, loss_fn, metric = list(model.parameters()), partial(model.loss, distractors=tc.distractor_scenes), "err_xy_m"
    else:
        params, loss_fn, metric = list(model.semantic_net.parameters()), model.semantic_loss, "area/accuracy"
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=1e-4)
    start = 0
    out = Path(out_dir) if out_dir is not None else None
    dev = model_device(model)
    g = torch.Generator(dev)
    if out is not None:
        ckpt, state_path = out / f"{stage}_last.pt", out / f"{stage}_state.pt"
        out.mkdir(parents=True, exist_ok=True)
        cfg.save_yaml(out / "config.yaml")
        if state_path.is_file():
            # On the CPU: a generator state is a CPU tensor, and the weights and optimiser state are
            # copied onto the parameters' device by load_state_dict.
            state = torch.load(state_path, weights_only=True, map_location="cpu")
            start = int(state["step"])
            if start >= steps:  # a finished stage: only its weights
                if stage == "localization":  # the decoder, trained next, may have changed since
                    warm_start(model, state["model"])
                else:
                    model.load_state_dict(state["model"])
                return []
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            saved_on = state.get("generator_device", "cpu")  # states written before devices: CPU
            if saved_on == dev.type:
                g.set_state(state["generator"])
            else:
                g.manual_seed(seed + start)
                print(f"train: resumed on {dev.type} from a {saved_on} run at step {start}: random generator re-seeded",
                      file=sys.stderr)
            _truncate_logs(out, stage, start)
    if start == 0:
        g.manual_seed(seed)
    if start >= steps:
        return []
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s + start, steps, tc.constant_fraction, tc.warmup_steps))
    loader = make_loader(train_set, batch_size, shuffle=True, num_workers=num_workers, seed=seed + start)
    batches = _cycle(loader)
    val_subset = _subset(val_set, tc.val_limit) if val_set is not None and len(val_set) else None
    records: list[dict] = []
    model.train()
    t0 = time.time()
    bar = tqdm(range(start, steps), desc=f"train {stage}", disable=not progress, initial=start, total=steps)
    window: list[tuple[float, float]] = []
    for step in bar:
        batch = to_device(next(batches), dev)
        losses = loss_fn(batch, generator=g) if stage == "localization" else loss_fn(batch)
        loss = losses["total"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite {stage} loss at step {step}: {loss.item()}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        sched.step()
        window.append((loss.item(), losses[metric].float().median().item()))
        last = step + 1 == steps
        if (step + 1) % log_every == 0 or last:
            values = sorted(m for _, m in window)
            rec = {
                "stage": stage,
                "step": step + 1,
                "loss": sum(l for l, _ in window) / len(window),
                f"median_{metric.replace('/', '_')}": values[len(values) // 2],
                "lr": sched.get_last_lr()[0],
                "elapsed_s": round(time.time() - t0, 1),
            }
            if stage == "localization":
                rec["recall@3m"] = sum(m <= 3.0 for m in values) / len(values)
            window = []
            if val_subset is not None and stage == "localization" and eval_every and ((step + 1) % eval_every == 0 or last):
                for name, summary in validate(model, val_subset).items():
                    rec |= {f"{name}/{k}": v for k, v in summary.items()
                            if k != "modalities" and (name == "val" or f"{name}/{k}" in LOG_FIELDS)}
            records.append(rec)
            post = {"loss": f"{rec['loss']:.3f}"}
            if "recall@3m" in rec:
                post["R@3m"] = f"{rec['recall@3m']:.2f}"
            if "val/recall@3m" in rec:
                post["val R@3m"] = f"{rec['val/recall@3m']:.2f}"
            bar.set_postfix(post)
            if out is not None:
                _append_log(out, rec)
        if out is not None and ((step + 1) % ckpt_every == 0 or last):
            # One atomic file holds everything a resume needs; the SNAP checkpoint follows.
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step + 1,
                     "generator": g.get_state(), "generator_device": dev.type}
            atomic_write_bytes(state_path, _torch_bytes(state))
            model.save(ckpt)
    return records


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()
