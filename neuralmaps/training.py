"""Training and evaluation loops for SNAP on training-chunk stores (two stages: localization, then
semantics on the frozen map).

`training/train.py` is the command-line front end; tests call these functions directly.
Checkpoints are written atomically (`SNAP.save`), with the config as YAML beside them, and the
optimiser state in `<out>/<stage>_opt.pt` so that a killed run resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .config import Config
from .data import SceneDataset
from .models import SNAP
from .storage import atomic_path

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
    model: SNAP, dataset: SceneDataset, batch_size: int = 4, max_batches: int | None = None, seed: int = 0,
) -> LocalizationMetrics:
    """Localize every query of `dataset` against the map built from its own scene (eval mode,
    the localizer's default RANSAC mode, as in `SNAP.loss`)."""
    was_training = model.training
    model.eval()
    metrics = LocalizationMetrics()
    g = torch.Generator().manual_seed(seed)
    loader = make_loader(dataset, batch_size, shuffle=False, num_workers=0, seed=seed)
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            out = model.loss(batch, generator=g)
            metrics.add(out["err_xy_m"], out["err_yaw_deg"])
    finally:
        model.train(was_training)
    return metrics


STAGES = ("localization", "semantics")


def _lr_factor(step: int, steps: int, warmup: int = 50) -> float:
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / max(steps, 1)))


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
    eval_every: int = 0,
    ckpt_every: int = 200,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Train one stage and return the log records (also appended to `<out_dir>/log.jsonl`).

    stage "localization": self-supervised, the NLL of the ground-truth query pose; all parameters.
    stage "semantics": the semantic decoder on the frozen map (only `model.semantic_net` learns).
    Resumes from `<out_dir>/<stage>_last.pt` + `<stage>_opt.pt` when they exist."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}")
    cfg: Config = model.config
    lr = lr or cfg.train.lr
    batch_size = batch_size or cfg.train.batch_size
    torch.manual_seed(seed)
    if stage == "localization":
        params, loss_fn, metric = list(model.parameters()), model.loss, "err_xy_m"
    else:
        params, loss_fn, metric = list(model.semantic_net.parameters()), model.semantic_loss, "area/accuracy"
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=1e-4)
    start = 0
    out = Path(out_dir) if out_dir is not None else None
    ckpt, opt_path = (out / f"{stage}_last.pt", out / f"{stage}_opt.pt") if out is not None else (None, None)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save_yaml(out / "config.yaml")
        if ckpt.is_file() and opt_path.is_file():
            state = torch.load(opt_path, weights_only=True)
            model.load_state_dict(SNAP.load(ckpt, config=cfg).state_dict())
            opt.load_state_dict(state["optimizer"])
            start = int(state["step"])
    # Warm-up over 50 steps, then cosine decay; offset by `start` when resuming.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s + start, steps))
    loader = make_loader(train_set, batch_size, shuffle=True, num_workers=num_workers, seed=seed + start)
    batches = _cycle(loader)
    g = torch.Generator().manual_seed(seed + start)
    records: list[dict] = []
    model.train()
    t0 = time.time()
    bar = tqdm(range(start, steps), desc=f"train {stage}", disable=not progress, initial=start, total=steps)
    window: list[tuple[float, float]] = []
    for step in bar:
        batch = next(batches)
        losses = loss_fn(batch, generator=g) if stage == "localization" else loss_fn(batch)
        loss = losses["total"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite {stage} loss at step {step}: {loss.item()}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
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
            window = []
            if val_set is not None and stage == "localization" and eval_every and ((step + 1) % eval_every == 0 or last):
                rec |= {f"val/{k}": v for k, v in evaluate_localization(model, val_set).summary().items()}
            records.append(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            if out is not None:
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
        if out is not None and ((step + 1) % ckpt_every == 0 or last):
            model.save(ckpt)
            with atomic_path(opt_path) as tmp:
                torch.save({"optimizer": opt.state_dict(), "step": step + 1}, tmp)
    return records
