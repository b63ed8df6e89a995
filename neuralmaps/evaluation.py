"""Evaluation of SNAP and baselines on training-chunk stores: visual positioning and semantic mapping.

`training/evaluate.py` is the command-line front end; tests and benchmarks call these functions.

Localization. Every query of a store's split is localized against the map built from its own
scene, in the scene frame (x east, y north, metres from the scene grid's SW corner). The error of
an estimate `T_map_query` (Transform2D) against the ground truth
`geometry.camera_pose_to_bev(T_scene_cam)` is the position error in metres and the heading error
in degrees in [0, 180]. Reported per localizer mode (`ransac`, `voting`), per split area (split name
and 150 m split block "bx,by") and per query type (the query run's vehicle: "pedestrian" or
"car"), with the time per query.

Semantics. The semantic net decodes the map built from the evaluated modalities, which never
include the semantic raster unless asked for (it is the target: decoding it back would be
leakage). Confusion matrices are accumulated over every valid map cell of the split: per-class
IoU, recall and accuracy, and the mIoU over the area classes (classes absent from both prediction
and ground truth are left out of the mean).

Baselines (`BASELINES`), evaluated with the same metrics:
- `prior`: the scene centre with a uniformly random heading; its expected joint recall at
  (r m, a deg) is `P(|t_gt - centre| <= r) * a / 180` (`prior_chance_recall`).
- `aerial-rgb`: no learning. The query image is projected onto the ground plane (inverse
  perspective mapping at the query BEV cell centres, z = 0 in the query BEV frame), the aerial
  orthophoto is the map; both become per-cell features of normalised colour (luminance and
  chromaticity, standardised per image so exposure and white balance cancel) plus local contrast
  (luminance minus its 5x5-cell mean, over its std), L2-normalised. The same `Localizer` (voting
  and/or RANSAC) matches them with a fixed temperature `AERIAL_RGB_TEMPERATURE`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from . import geometry
from .config import AREA_CLASSES, BINARY_CLASSES, CLASS_NAMES, OBJECT_CLASSES, Config
from .data import SceneDataset
from .data.store import SPLIT_NAMES, read_store_attrs
from .devices import DeviceError, model_device, resolve_device, to_device
from .models import MODALITIES, MODALITY_FLAGS, SEMANTIC_MODALITIES, SNAP, select_modalities
from .models import parse_modalities as _parse_modalities
from .storage import atomic_write_bytes, json_safe

__all__ = [
    "EvaluationError", "MODALITIES", "DEFAULT_MODALITIES", "MODES", "BASELINES",
    "POSITION_THRESHOLDS_M", "HEADING_THRESHOLDS_DEG", "JOINT_THRESHOLDS",
    "EvalData", "QueryResult", "SemanticConfusion", "open_eval_data", "load_model", "parse_modalities",
    "map_batch_for", "pose_errors", "recall_summary", "prior_chance_recall", "ground_rgb",
    "rgb_features", "evaluate_model", "evaluate_prior", "evaluate_aerial_rgb", "build_metrics",
    "plot_recall_curves", "plot_semantics", "write_outputs", "run_evaluation", "class_colors", "results_table",
]

DEFAULT_MODALITIES = SEMANTIC_MODALITIES  # street view + aerial: the semantic raster is never an input by default
MODES = ("ransac", "voting")
BASELINES = ("prior", "aerial-rgb")
POSITION_THRESHOLDS_M = (0.5, 1.0, 2.0, 5.0)
HEADING_THRESHOLDS_DEG = (0.5, 1.0, 2.0, 5.0)
JOINT_THRESHOLDS = ((1.0, 1.0), (3.0, 3.0), (5.0, 5.0))
# Scale of the correlation scores in [-1, 1] (softmax sharpness). Swept on a 12-pair Helsinki crop
# store (seed 0, split all, both modes): recall@5m 42 / 42 / 42 / 42 / 8 / 0 % (RANSAC) at
# tau = 1 / 2 / 3 / 5 / 10 / 30; heading recall@5deg 75 % up to tau = 5.
AERIAL_RGB_TEMPERATURE = 3.0
AERIAL_RGB_CONTRAST_CELLS = 5  # window of the local-contrast feature, cells
NUM_SEMANTIC_SCENES = 4  # scenes drawn in semantics.png


class EvaluationError(ValueError):
    """Bad evaluation input (store, split, checkpoint, modalities): the CLI prints it on one line."""


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------
@dataclass
class EvalData:
    """The pairs of a split (or of all splits) and their per-pair metadata.

    dataset: SceneDataset items in store pair-index order (all splits' for split "all").
    split / block / query_type: by store pair index (str arrays of the store's length).
    """

    path: Path
    split: str
    dataset: Dataset
    store_config: Config
    pair_split: np.ndarray
    pair_block: np.ndarray
    pair_query_type: np.ndarray

    def __len__(self) -> int:
        return len(self.dataset)


def open_eval_data(path: str | os.PathLike, split: str, config: Config | None = None) -> EvalData:
    """Open split `split` ("train", "val", "test" or "all") of the training-chunk store `path`.

    `config`: the model's config; its scene section must match the store's. Raises
    EvaluationError for a missing or unreadable store, an unknown split, or an empty one."""
    import zarr

    path = Path(path)
    if split != "all" and split not in SPLIT_NAMES:
        raise EvaluationError(f"unknown split {split!r}; choose one of {SPLIT_NAMES + ('all',)}")
    try:
        attrs = read_store_attrs(path)
        parts = [SceneDataset(path, s, config=config) for s in (SPLIT_NAMES if split == "all" else (split,))]
    except FileNotFoundError as e:
        raise EvaluationError(str(e)) from None
    except ValueError as e:
        raise EvaluationError(str(e)) from None
    parts = [p for p in parts if len(p)]
    if not parts:
        raise EvaluationError(f"{path}: split {split!r} holds no finished pairs; pick another split or write more pairs")
    g = zarr.open_group(str(path), mode="r")
    n = int(g["split"].shape[0])
    split_names = list(attrs.get("split_names", SPLIT_NAMES))
    splits = np.asarray(g["split"][:]).astype(int)
    pair_split = np.array([split_names[s] if 0 <= s < len(split_names) else "?" for s in splits], dtype=object)
    if "block" in g:
        blocks = np.asarray(g["block"][:]).reshape(n, -1)
        pair_block = np.array([",".join(str(int(v)) for v in b) for b in blocks], dtype=object)
    else:
        pair_block = np.full(n, "?", dtype=object)
    vehicle_types = list(attrs.get("vehicle_types", []))
    if "query_vehicle" in g and vehicle_types:
        qv = np.asarray(g["query_vehicle"][:]).astype(int)
        pair_query_type = np.array([vehicle_types[v] if 0 <= v < len(vehicle_types) else "?" for v in qv], dtype=object)
    else:
        pair_query_type = np.full(n, "?", dtype=object)
    if len(parts) == 1:
        dataset: Dataset = parts[0]
    else:  # every split, in store pair order (so --limit N takes the store's first N pairs)
        order = np.argsort(np.concatenate([p.indices for p in parts]), kind="stable")
        dataset = torch.utils.data.Subset(ConcatDataset(parts), order.tolist())
    return EvalData(path, split, dataset, parts[0].store_config, pair_split, pair_block, pair_query_type)


def load_model(checkpoint: str | os.PathLike, overrides: Sequence[str] = ()):
    """`"pretrained"` (the shipped weights, offline) or a checkpoint path -> SNAP in eval mode.
    overrides: `model.FIELD=VALUE` of knobs no weight depends on (`RUNTIME_FIELDS`: the localizer's
    proposals, point scores, samples, refinement ...), to evaluate a variant of the same weights.
    Raises EvaluationError when it is missing or unreadable, or an override is not such a knob."""
    from .models.snap import RUNTIME_FIELDS

    try:
        model = SNAP.from_pretrained() if str(checkpoint) == "pretrained" else SNAP.load(checkpoint)
        if overrides:
            keys = [o.partition("=")[0].strip() for o in overrides]
            bad = [k for k in keys if k not in RUNTIME_FIELDS]
            if bad:
                raise EvaluationError(f"--set {', '.join(bad)}: only knobs that no weight depends on can change "
                                      f"(one of {', '.join(sorted(RUNTIME_FIELDS))})")
            variant = SNAP(model.config.with_overrides(list(overrides)), camera_model=model.camera_model)
            variant.load_state_dict(model.state_dict())
            model = variant
    except (FileNotFoundError, ValueError) as e:
        raise EvaluationError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    return model.eval()


def parse_modalities(text: str | Sequence[str]) -> tuple[str, ...]:
    """"streetview,aerial" (or a sequence) -> a tuple in MODALITIES order; EvaluationError if bad."""
    try:
        return _parse_modalities(text)
    except ValueError as e:
        raise EvaluationError(f"{e} (a comma-separated subset)") from None


# A shallow copy of a batch without the keys of the map modalities not listed (query keys kept).
map_batch_for = select_modalities


def build_map(model, batch: dict, modalities: Sequence[str]):
    """`model.map` from the given modalities only (`SNAP.map` never reads the others)."""
    return model.map(batch, modalities=tuple(modalities))


def check_modalities(model, modalities: Sequence[str]) -> None:
    cfg = model.config.model
    off = [m for m in modalities if not getattr(cfg, MODALITY_FLAGS[m], True)]
    if off:
        raise EvaluationError(
            f"the checkpoint has no encoder for {off} ({', '.join(f'model.{MODALITY_FLAGS[m]}=False' for m in off)}); "
            "pick other --modalities"
        )


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------
def pose_errors(T_gt: geometry.Transform2D, T_est: geometry.Transform2D) -> tuple[torch.Tensor, torch.Tensor]:
    """Position error (m) and heading error (deg, [0, 180]) of estimates (B,) against ground truth (B,)."""
    d_deg, d_m = (T_gt.inv() @ T_est.to(T_gt.t)).magnitude()
    return d_m, d_deg


@dataclass
class QueryResult:
    """One query localized in one mode: errors, time, and where it comes from."""

    index: int
    mode: str
    err_m: float
    err_deg: float
    time_s: float
    split: str
    block: str
    query_type: str
    dist_to_centre_m: float


def recall_summary(err_m: Sequence[float], err_deg: Sequence[float]) -> dict[str, Any]:
    """Recall at each position threshold, heading threshold and joint threshold (fractions), median
    errors and the count. NaN recalls / medians when there are no queries."""
    e_m = np.asarray(err_m, dtype=float)
    e_d = np.asarray(err_deg, dtype=float)
    n = len(e_m)

    def frac(ok: np.ndarray) -> float:
        return float(ok.mean()) if n else float("nan")

    out: dict[str, Any] = {}
    for t in POSITION_THRESHOLDS_M:
        out[f"recall_{t:g}m"] = frac(e_m <= t)
    for t in HEADING_THRESHOLDS_DEG:
        out[f"recall_{t:g}deg"] = frac(e_d <= t)
    for tm, td in JOINT_THRESHOLDS:
        out[f"recall_{tm:g}m_{td:g}deg"] = frac((e_m <= tm) & (e_d <= td))
    out["median_error_m"] = float(np.median(e_m)) if n else float("nan")
    out["median_error_deg"] = float(np.median(e_d)) if n else float("nan")
    out["num_queries"] = n
    return out


def prior_chance_recall(dist_to_centre_m: Sequence[float], max_m: float, max_deg: float) -> float:
    """Expected joint recall of the prior-only baseline (scene centre, uniform heading): the share of
    queries within `max_m` of the centre times the chance max_deg / 180 of a heading error <= max_deg."""
    d = np.asarray(dist_to_centre_m, dtype=float)
    if len(d) == 0:
        return float("nan")
    return float((d <= max_m).mean() * min(max_deg / 180.0, 1.0))


@dataclass
class SemanticConfusion:
    """Confusion counts over map cells: areas (5x5), exclusive objects + void (4x4), and per binary
    class [tp, fp, fn, tn]. Rows: ground truth, columns: prediction."""

    areas: np.ndarray = field(default_factory=lambda: np.zeros((len(AREA_CLASSES),) * 2, np.int64))
    objects: np.ndarray = field(default_factory=lambda: np.zeros((len(OBJECT_CLASSES) + 1,) * 2, np.int64))
    binary: np.ndarray = field(default_factory=lambda: np.zeros((len(BINARY_CLASSES), 4), np.int64))

    def add(self, logits: dict[str, torch.Tensor], semantic: torch.Tensor, valid: torch.Tensor) -> None:
        """logits: `SNAP.semantics` output (areas (B, 5, X, Y), objects (B, 4, X, Y), binary (B, 3, X, Y));
        semantic: ground-truth raster (B, K, X, Y); valid: map cells (B, X, Y) bool."""
        from .models.semantic import semantic_labels

        lab = semantic_labels(semantic.to(valid.device))
        for name, n, gt, v in (
            ("areas", len(AREA_CLASSES), lab["areas"], valid & lab["areas_valid"]),
            ("objects", len(OBJECT_CLASSES) + 1, lab["objects"], valid),
        ):
            pred = logits[name].argmax(1)
            idx = gt[v].long() * n + pred[v].long()
            getattr(self, name)[:] += torch.bincount(idx, minlength=n * n).reshape(n, n).cpu().numpy()
        pred_b = logits["binary"] > 0
        gt_b = lab["binary"]
        vb = valid[:, None].expand_as(gt_b)
        for k in range(len(BINARY_CLASSES)):
            p, g = pred_b[:, k][vb[:, k]], gt_b[:, k][vb[:, k]]
            counts = torch.stack([(p & g).sum(), (p & ~g).sum(), (~p & g).sum(), (~p & ~g).sum()])
            self.binary[k] += counts.cpu().numpy().astype(np.int64)

    @staticmethod
    def _multiclass(cm: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
        tp = np.diag(cm).astype(float)
        gt = cm.sum(1).astype(float)
        pr = cm.sum(0).astype(float)
        total = float(cm.sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(gt + pr - tp > 0, tp / (gt + pr - tp), np.nan)
            recall = np.where(gt > 0, tp / gt, np.nan)
            # Per-class (one-vs-rest) accuracy: correct decisions about this class over all cells.
            acc_c = (total - (gt + pr - 2 * tp)) / total if total else np.full(len(names), np.nan)
        return {
            "iou": {n: _num(v) for n, v in zip(names, iou)},
            "recall": {n: _num(v) for n, v in zip(names, recall)},
            "class_accuracy": {n: _num(v) for n, v in zip(names, acc_c)},
            "accuracy": _num(tp.sum() / total) if total else None,
            "miou": _num(np.nanmean(iou)) if np.isfinite(iou).any() else None,
            "num_cells": int(total),
        }

    def summary(self) -> dict[str, Any]:
        out = {
            "areas": self._multiclass(self.areas, AREA_CLASSES),
            "objects": self._multiclass(self.objects, OBJECT_CLASSES + ("void",)),
        }
        b: dict[str, Any] = {"iou": {}, "recall": {}, "class_accuracy": {}}
        for k, name in enumerate(BINARY_CLASSES):
            tp, fp, fn, tn = (float(x) for x in self.binary[k])
            b["iou"][name] = _num(tp / (tp + fp + fn)) if tp + fp + fn else None
            b["recall"][name] = _num(tp / (tp + fn)) if tp + fn else None
            b["class_accuracy"][name] = _num((tp + tn) / (tp + fp + fn + tn)) if tp + fp + fn + tn else None
        out["binary"] = b
        return out


def _num(v: Any) -> float | None:
    """JSON-friendly float: None for NaN / inf."""
    v = float(v)
    return v if math.isfinite(v) else None


# ------------------------------------------------------------------------------------------------
# Runners
# ------------------------------------------------------------------------------------------------
def _loader(data: EvalData, limit: int | None) -> tuple[DataLoader, int]:
    ds = data.dataset
    n = len(ds) if limit is None else min(limit, len(ds))
    if limit is not None:
        ds = torch.utils.data.Subset(ds, range(n))
    return DataLoader(ds, batch_size=1, shuffle=False, num_workers=0), n


def _progress(it: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc=desc, disable=not enabled, dynamic_ncols=True)


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock times measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _true_pose(batch: dict) -> geometry.Transform2D:
    return geometry.camera_pose_to_bev(geometry.Transform3D.from_matrix(batch["query_T_scene_cam"].double())).float()


def _map_size_m(batch: dict, cell_m: float) -> tuple[float, float]:
    X, Y = batch["aerial"].shape[-2:]
    return X * cell_m, Y * cell_m


def _result(data: EvalData, batch: dict, mode: str, d_m: torch.Tensor, d_deg: torch.Tensor, time_s: float,
            cell_m: float) -> QueryResult:
    idx = int(batch["index"][0])
    T_gt = _true_pose(batch)
    cx, cy = _map_size_m(batch, cell_m)
    dist = float(torch.linalg.norm(T_gt.t[0].cpu() - torch.tensor([cx / 2, cy / 2])))
    return QueryResult(idx, mode, float(d_m[0]), float(d_deg[0]), time_s, str(data.pair_split[idx]),
                       str(data.pair_block[idx]), str(data.pair_query_type[idx]), dist)


@torch.no_grad()
def evaluate_model(
    model,
    data: EvalData,
    *,
    modalities: Sequence[str] = DEFAULT_MODALITIES,
    modes: Sequence[str] = MODES,
    semantics: bool = True,
    limit: int | None = None,
    seed: int = 0,
    num_rotations: int = 64,
    progress: bool = True,
    keep_scenes: int = NUM_SEMANTIC_SCENES,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Localize every query of `data` with the learned model in each of `modes`, against the map
    built from `modalities` only; decode that map's semantics (when `semantics`).

    Returns {"results": [QueryResult], "map_times_s": [...], "semantic": SemanticConfusion | None,
    "scenes": [(aerial (3,X,Y), gt areas (X,Y), pred areas (X,Y), valid (X,Y))] for plots}.
    RANSAC's samples use a generator seeded from (seed, pair index), so a query's result does not
    depend on which other queries are evaluated. `device`: where to run (default: the model's)."""
    check_modalities(model, modalities)
    for m in modes:
        if m not in MODES:
            raise EvaluationError(f"unknown mode {m!r}; choose from {MODES}")
    model.eval()
    dev = resolve_device(device) if device is not None else model_device(model)
    model.to(dev)
    cell_m = model.config.scene.cell_m
    loader, n = _loader(data, limit)
    results: list[QueryResult] = []
    map_times: list[float] = []
    conf = SemanticConfusion() if semantics else None
    scenes: list[tuple] = []
    from .models.semantic import semantic_labels

    for batch in _progress(loader, n, "evaluate", progress):
        idx = int(batch["index"][0])
        batch = to_device(batch, dev)
        t0 = time.perf_counter()
        nmap = build_map(model, batch, modalities)
        _sync(dev)
        map_times.append(time.perf_counter() - t0)
        T_gt = _true_pose(batch)
        for mode in modes:
            g = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + idx)
            t0 = time.perf_counter()
            out = model.localize(batch, nmap, mode=mode, with_loss=False, num_rotations=num_rotations, generator=g)
            _sync(dev)
            dt = time.perf_counter() - t0
            d_m, d_deg = pose_errors(T_gt, out.T_map_query)
            results.append(_result(data, batch, mode, d_m, d_deg, dt, cell_m))
        if conf is not None:
            sem = model.semantics(nmap)
            conf.add(sem, batch["semantic"], nmap.valid)
            if len(scenes) < keep_scenes:
                lab = semantic_labels(batch["semantic"])
                scenes.append((
                    batch["aerial"][0].cpu().numpy(), lab["areas"][0].cpu().numpy(),
                    lab["areas_valid"][0].cpu().numpy(), sem["areas"].argmax(1)[0].cpu().numpy(),
                    nmap.valid[0].cpu().numpy(), idx,
                ))
    return {"results": results, "map_times_s": map_times, "semantic": conf, "scenes": scenes}


@torch.no_grad()
def evaluate_prior(data: EvalData, *, limit: int | None = None, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Prior-only baseline: every query is placed at its scene's centre with a uniformly random
    heading (generator seeded from (seed, pair index))."""
    cell_m = data.store_config.scene.cell_m
    loader, n = _loader(data, limit)
    results = []
    for batch in _progress(loader, n, "prior", progress):
        idx = int(batch["index"][0])
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(seed * 1_000_003 + idx)
        angle = (torch.rand(1, generator=g, dtype=torch.float64) * 2 - 1) * math.pi
        sx, sy = _map_size_m(batch, cell_m)
        T_est = geometry.Transform2D(angle.float(), torch.tensor([[sx / 2, sy / 2]]))
        dt = time.perf_counter() - t0
        d_m, d_deg = pose_errors(_true_pose(batch), T_est)
        results.append(_result(data, batch, "prior", d_m, d_deg, dt, cell_m))
    return {"results": results, "map_times_s": [], "semantic": None, "scenes": []}


def ground_rgb(
    image: torch.Tensor, camera: torch.Tensor, T_bev_cam: torch.Tensor, query_xy: torch.Tensor,
    camera_model: str = "pinhole",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse perspective mapping: the colour of the query image at the ground points of the query
    BEV grid.

    image (B, 3, H, W) in [0, 1]; camera (B, 8) intrinsics; T_bev_cam (B, 4, 4) the camera in its
    query BEV frame (x forward, y left, z up, origin on the ground below the camera); query_xy
    (Xq, Yq, 2) metres. Returns rgb (B, 3, Xq, Yq) and valid (B, Xq, Yq) (in front of the camera and
    inside the image)."""
    B = image.shape[0]
    Xq, Yq = query_xy.shape[:2]
    p = torch.cat([query_xy.reshape(-1, 2).float(), torch.zeros(Xq * Yq, 1)], -1)  # ground, z = 0
    M = torch.linalg.inv(T_bev_cam.double()).float()  # T_cam_bev (B, 4, 4)
    p_cam = p[None] @ M[:, :3, :3].transpose(1, 2) + M[:, None, :3, 3]  # (B, N, 3)
    cam = geometry.Camera.from_tensor(camera.float(), camera_model)
    p2d, valid = cam.project(p_cam)  # (B, N, 2) pixels (centres at half-integers)
    wh = camera[:, None, :2].float()
    grid = (2 * p2d / wh - 1)[:, :, None]  # align_corners=False: pixel edges at -1, 1
    rgb = F.grid_sample(image.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return rgb[..., 0].reshape(B, 3, Xq, Yq), valid.reshape(B, Xq, Yq)


def _box_mean(x: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of x (B, 1, X, Y) over k x k windows, weighted by w (same shape)."""
    num = F.avg_pool2d(x * w, k, 1, k // 2, count_include_pad=False)
    den = F.avg_pool2d(w, k, 1, k // 2, count_include_pad=False)
    return num / den.clamp(min=1e-6)


def rgb_features(rgb: torch.Tensor, valid: torch.Tensor, contrast_cells: int = AERIAL_RGB_CONTRAST_CELLS) -> torch.Tensor:
    """Hand-made matching features of colour rasters (B, 3, X, Y), valid (B, X, Y) -> (B, 4, X, Y):
    luminance, two chromaticities (r, g over r + g + b) and local contrast, each standardised over
    the valid cells of its raster (so exposure and white balance cancel), then L2-normalised per
    cell (zero where invalid). Dot products are correlations in [-1, 1]."""
    w = valid[:, None].float()
    lum = rgb.mean(1, keepdim=True)
    chroma = rgb[:, :2] / rgb.sum(1, keepdim=True).clamp(min=1e-3)
    mu = _box_mean(lum, w, contrast_cells)
    sd = _box_mean((lum - mu) ** 2, w, contrast_cells).sqrt()
    contrast = (lum - mu) / (sd + 0.02)
    f = torch.cat([lum, chroma, contrast], 1)
    n = w.sum((2, 3), keepdim=True).clamp(min=1)
    mean = (f * w).sum((2, 3), keepdim=True) / n
    std = (((f - mean) ** 2 * w).sum((2, 3), keepdim=True) / n).sqrt()
    f = (f - mean) / (std + 1e-3) * w
    return F.normalize(f, dim=1)


@torch.no_grad()
def evaluate_aerial_rgb(
    data: EvalData,
    *,
    modes: Sequence[str] = MODES,
    limit: int | None = None,
    seed: int = 0,
    num_rotations: int = 64,
    temperature: float = AERIAL_RGB_TEMPERATURE,
    progress: bool = True,
) -> dict[str, Any]:
    """Non-learned baseline: the query image projected to the ground (`ground_rgb`) matched against
    the raw aerial orthophoto with `rgb_features` by the SNAP `Localizer` (same modes, no weights but
    a fixed temperature)."""
    from .models.bev import camera_in_query_bev, query_grid
    from .models.localizer import Localizer

    cfg = data.store_config
    cell_m = cfg.scene.cell_m
    query_xy, inside = query_grid(cfg.scene)
    loc = Localizer(cfg.model)
    loc.log_temperature.data.fill_(math.log(temperature))
    loc.eval()
    camera_model = _store_camera_model(data)
    loader, n = _loader(data, limit)
    results = []
    for batch in _progress(loader, n, "aerial-rgb", progress):
        idx = int(batch["index"][0])
        T_gt = _true_pose(batch)
        t0 = time.perf_counter()
        aerial = batch["aerial"].float()
        map_valid = torch.ones(aerial.shape[0], *aerial.shape[-2:], dtype=torch.bool)
        map_f = rgb_features(aerial, map_valid)
        T_bev_cam = camera_in_query_bev(geometry.Transform3D.from_matrix(batch["query_T_scene_cam"].float())).matrix()
        q_rgb, q_valid = ground_rgb(batch["query_image"], batch["query_camera"], T_bev_cam, query_xy, camera_model)
        q_valid = q_valid & inside
        q_f = rgb_features(q_rgb, q_valid)
        t_feat = time.perf_counter() - t0
        for mode in modes:
            g = torch.Generator().manual_seed(seed * 1_000_003 + idx)
            t0 = time.perf_counter()
            out = loc(map_f, map_valid, q_f, q_valid, query_xy, cell_m, mode=mode,
                      num_rotations=num_rotations, generator=g)
            dt = time.perf_counter() - t0 + t_feat
            d_m, d_deg = pose_errors(T_gt, out.T_map_query)
            results.append(_result(data, batch, mode, d_m, d_deg, dt, cell_m))
    return {"results": results, "map_times_s": [], "semantic": None, "scenes": []}


def _store_camera_model(data: EvalData) -> str:
    """The store's query camera model (pinhole unless it says otherwise)."""
    import zarr

    attrs = read_store_attrs(data.path)
    models = list(attrs.get("camera_models", ["pinhole"]))
    g = zarr.open_group(str(data.path), mode="r")
    if "query_camera_model" in g:
        codes = np.unique(np.asarray(g["query_camera_model"][:]))
        names = {models[int(c)] for c in codes if 0 <= int(c) < len(models)}
        if len(names) > 1:
            raise EvaluationError(f"{data.path}: queries mix camera models {sorted(names)}; evaluate one at a time")
        if names:
            return names.pop()
    return "pinhole"


# ------------------------------------------------------------------------------------------------
# metrics.json
# ------------------------------------------------------------------------------------------------
def _group(results: Sequence[QueryResult], key: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for name in sorted({getattr(r, key) for r in results}):
        sel = [r for r in results if getattr(r, key) == name]
        out[name] = recall_summary([r.err_m for r in sel], [r.err_deg for r in sel])
    return out


def _mode_summary(results: Sequence[QueryResult]) -> dict[str, Any]:
    s = recall_summary([r.err_m for r in results], [r.err_deg for r in results])
    t = np.asarray([r.time_s for r in results])
    s["time_per_query_s_median"] = float(np.median(t)) if len(t) else None
    s["time_per_query_s_mean"] = float(t.mean()) if len(t) else None
    s["queries_per_s"] = float(1.0 / t.mean()) if len(t) and t.mean() > 0 else None
    s["per_split"] = _group(results, "split")
    s["per_block"] = _group(results, "block")
    s["per_query_type"] = _group(results, "query_type")
    return s


def build_metrics(
    run: dict[str, Any], *, method: str, modalities: Sequence[str], modes: Sequence[str], data: EvalData,
    checkpoint: str | None = None, seed: int = 0,
) -> dict[str, Any]:
    """The metrics.json dict: the contract keys (`recall_1m_1deg`, `recall_3m_3deg`,
    `recall_5m_5deg`, `median_error_m`, `median_error_deg`, `num_queries`, `modalities`, and with
    semantics `semantic_miou`, `semantic_iou_per_class`) from the primary mode (the first of
    `modes`: ransac when both), then every breakdown."""
    results: list[QueryResult] = run["results"]
    by_mode = {m: [r for r in results if r.mode == m] for m in modes}
    primary = modes[0]
    summaries = {m: _mode_summary(rs) for m, rs in by_mode.items()}
    top = summaries[primary]
    metrics: dict[str, Any] = {
        "recall_1m_1deg": top["recall_1m_1deg"],
        "recall_3m_3deg": top["recall_3m_3deg"],
        "recall_5m_5deg": top["recall_5m_5deg"],
        "median_error_m": top["median_error_m"],
        "median_error_deg": top["median_error_deg"],
        "num_queries": top["num_queries"],
        "modalities": list(modalities),
    }
    conf: SemanticConfusion | None = run.get("semantic")
    if conf is not None:
        sem = conf.summary()
        metrics["semantic_miou"] = sem["areas"]["miou"]
        metrics["semantic_iou_per_class"] = sem["areas"]["iou"]
        metrics["semantic_recall_per_class"] = sem["areas"]["recall"]
        metrics["semantic_accuracy"] = sem["areas"]["accuracy"]
        metrics["semantic_accuracy_per_class"] = sem["areas"]["class_accuracy"]
        metrics["semantic"] = sem
        if "semantic" in modalities:
            metrics["semantic_warning"] = ("the semantic raster was a map input: the decoder can read its own "
                                           "labels back, so these semantic metrics are not a mapping result")
    metrics |= {
        "method": method,
        "primary_mode": primary,
        "modes": summaries,
        "map_time_per_scene_s_median": float(np.median(run["map_times_s"])) if run.get("map_times_s") else None,
        "store": str(data.path),
        "split": data.split,
        "checkpoint": checkpoint,
        "seed": seed,
    }
    if method == "prior":
        d = [r.dist_to_centre_m for r in by_mode[primary]]
        metrics["chance"] = {f"recall_{a:g}m_{b:g}deg": prior_chance_recall(d, a, b) for a, b in JOINT_THRESHOLDS}
    for k in ("recall_1m_1deg", "recall_3m_3deg", "recall_5m_5deg", "median_error_m", "median_error_deg"):
        metrics[k] = _num(metrics[k]) if metrics[k] is not None else None
    return metrics


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------
def class_colors() -> dict[str, tuple[float, float, float]]:
    """Class name -> RGB in [0, 1]: the project's class colours (neuralmaps.config / classes when they
    define them, else the preview palette)."""
    from . import config as _config

    candidates = [getattr(_config, "CLASS_COLORS", None)]
    try:
        from . import classes as _classes  # type: ignore[attr-defined]

        candidates.append(getattr(_classes, "CLASS_COLORS", None))
    except ImportError:
        pass
    for colors in candidates:
        try:
            out = _as_rgb01(colors) if colors else {}
        except (TypeError, ValueError):
            out = {}
        if all(c in out for c in AREA_CLASSES):
            return out
    from .classes import CLASS_COLORS

    return _as_rgb01(CLASS_COLORS)


def _as_rgb01(colors: Any) -> dict[str, tuple[float, float, float]]:
    """Colours as {name: (r, g, b) in [0, 1]} from a dict or a CLASS_NAMES-ordered sequence of
    0-1 or 0-255 triples or matplotlib colour strings."""
    from matplotlib.colors import to_rgb

    if not isinstance(colors, dict):
        colors = dict(zip(CLASS_NAMES, colors))
    out = {}
    for k, c in colors.items():
        if isinstance(c, str):
            out[k] = tuple(to_rgb(c))
            continue
        c = tuple(float(v) for v in c)[:3]
        out[k] = tuple(v / 255.0 for v in c) if max(c) > 1.0 else c
    return out


def _atomic_savefig(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _atomic_write_bytes(path, buf.getvalue())


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


def plot_recall_curves(results: Sequence[QueryResult], path: Path, title: str = "") -> None:
    """Cumulative recall of the position error (0-10 m) and heading error (0-10 deg), one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode in sorted({r.mode for r in results}):
        sel = [r for r in results if r.mode == mode]
        for ax, vals, xmax in ((axes[0], [r.err_m for r in sel], 10.0), (axes[1], [r.err_deg for r in sel], 10.0)):
            x = np.linspace(0, xmax, 201)
            v = np.asarray(vals)
            ax.plot(x, [(v <= t).mean() * 100 for t in x], label=f"{mode} (n={len(v)})")
    axes[0].set_xlabel("position error threshold (m)")
    axes[1].set_xlabel("heading error threshold (deg)")
    for ax in axes:
        ax.set_ylabel("recall (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    if title:
        fig.suptitle(title)
    _atomic_savefig(fig, path)
    plt.close(fig)


def plot_semantics(scenes: Sequence[tuple], path: Path, title: str = "") -> None:
    """Rows of scenes: aerial | ground-truth area classes | predicted area classes, north-up.
    Cells without ground truth / outside the map are light grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .grids import grid_to_raster

    colors = class_colors()
    palette = np.array([colors[c] for c in AREA_CLASSES], np.float32)
    grey = np.array([0.85, 0.85, 0.85], np.float32)
    n = max(len(scenes), 1)
    fig, axes = plt.subplots(n, 3, figsize=(9, 3.6 * n), squeeze=False)
    for row, (aerial, gt, gt_valid, pred, valid, idx) in zip(axes, scenes):
        gt_rgb = np.where(gt_valid[..., None], palette[gt], grey)
        pr_rgb = np.where(valid[..., None], palette[pred], grey)
        imgs = (np.moveaxis(aerial, 0, -1), gt_rgb, pr_rgb)
        for ax, img, name in zip(row, imgs, ("aerial", "ground truth", "prediction")):
            ax.imshow(np.clip(grid_to_raster(np.moveaxis(img, -1, 0)).transpose(1, 2, 0), 0, 1), interpolation="nearest")
            ax.set_title(f"pair {idx}: {name}", fontsize=9)
            ax.axis("off")
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(facecolor=palette[i], edgecolor="black", label=c) for i, c in enumerate(AREA_CLASSES)],
               loc="lower center", ncol=len(AREA_CLASSES), fontsize=8)
    if title:
        fig.suptitle(title)
    _atomic_savefig(fig, path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Outputs and the whole run
# ------------------------------------------------------------------------------------------------
def write_outputs(out_dir: str | os.PathLike, metrics: dict[str, Any], run: dict[str, Any], title: str = "") -> list[Path]:
    """Write metrics.json, queries.csv (one row per query and mode), recall_curves.png and (with
    semantics) semantics.png into `out_dir`, atomically; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    p = out / "metrics.json"
    _atomic_write_bytes(p, (json.dumps(json_safe(metrics), indent=2, allow_nan=False) + "\n").encode())
    paths.append(p)
    buf = io.StringIO()
    w = csv.writer(buf)
    fields = ("index", "mode", "err_m", "err_deg", "time_s", "split", "block", "query_type", "dist_to_centre_m")
    w.writerow(fields)
    for r in run["results"]:
        w.writerow([getattr(r, f) for f in fields])
    p = out / "queries.csv"
    _atomic_write_bytes(p, buf.getvalue().encode())
    paths.append(p)
    p = out / "recall_curves.png"
    plot_recall_curves(run["results"], p, title)
    paths.append(p)
    if run.get("scenes"):
        p = out / "semantics.png"
        miou = metrics.get("semantic_miou")
        plot_semantics(run["scenes"], p, f"{title}  area mIoU {miou:.3f}" if miou is not None else title)
        paths.append(p)
    return paths


def results_table(metrics_files: dict[str, str | os.PathLike]) -> str:
    """A Markdown table of evaluations (e.g. the modality ablation beside the baselines): one row per
    {row name: metrics.json path}, with the joint recalls (%), median errors, the primary mode, the
    voting recall at (3 m, 3 deg) when evaluated, and the area mIoU (%)."""
    head = ("| run | modalities | mode | queries | R@1m,1° | R@3m,3° | R@5m,5° | median m | median ° "
            "| voting R@3m,3° | area mIoU |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def pct(v: Any) -> str:
        return "–" if v is None else f"{100 * v:.1f}"

    for name, path in metrics_files.items():
        m = json.loads(Path(path).read_text())
        voting = m.get("modes", {}).get("voting", {}).get("recall_3m_3deg")
        lines.append(
            f"| {name} | {'+'.join(m['modalities']) or '–'} | {m.get('primary_mode', '?')} | {m['num_queries']} "
            f"| {pct(m['recall_1m_1deg'])} | {pct(m['recall_3m_3deg'])} | {pct(m['recall_5m_5deg'])} "
            f"| {m['median_error_m']:.2f} | {m['median_error_deg']:.1f} | {pct(voting)} | {pct(m.get('semantic_miou'))} |"
        )
    return "\n".join(lines) + "\n"


def run_evaluation(
    *,
    data_path: str | os.PathLike,
    split: str,
    out_dir: str | os.PathLike,
    checkpoint: str | None = None,
    baseline: str | None = None,
    modalities: Sequence[str] = DEFAULT_MODALITIES,
    mode: str = "both",
    limit: int | None = None,
    seed: int = 0,
    num_rotations: int = 64,
    semantics: bool = True,
    progress: bool = True,
    device: str | None = None,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Evaluate a checkpoint ("pretrained" or a path) or a baseline (`BASELINES`) on a store's split
    and write the outputs (`write_outputs`); `overrides` as in `load_model`. Returns the metrics dict."""
    if (checkpoint is None) == (baseline is None):
        raise EvaluationError("give either a checkpoint or a baseline")
    modes = MODES if mode == "both" else (mode,)
    if mode != "both" and mode not in MODES:
        raise EvaluationError(f"unknown mode {mode!r}; choose ransac, voting or both")
    if limit is not None and limit < 1:
        raise EvaluationError(f"--limit must be >= 1, got {limit}")
    if baseline is not None:
        if baseline not in BASELINES:
            raise EvaluationError(f"unknown baseline {baseline!r}; choose one of {BASELINES}")
        data = open_eval_data(data_path, split)
        if baseline == "prior":
            run = evaluate_prior(data, limit=limit, seed=seed, progress=progress)
            modes, mods = ("prior",), []
        else:
            run = evaluate_aerial_rgb(data, modes=modes, limit=limit, seed=seed, num_rotations=num_rotations,
                                      progress=progress)
            mods = ["aerial"]
        metrics = build_metrics(run, method=baseline, modalities=mods, modes=modes, data=data, seed=seed)
        title = f"baseline {baseline} on {Path(data_path).name} ({split})"
    else:
        modalities = parse_modalities(modalities)
        try:  # before anything is read
            dev = resolve_device(device) if device is not None else None
        except DeviceError as e:
            raise EvaluationError(f"--{e}") from None
        model = load_model(checkpoint, overrides)
        data = open_eval_data(data_path, split, config=model.config)
        run = evaluate_model(model, data, modalities=modalities, modes=modes, semantics=semantics, limit=limit,
                             seed=seed, num_rotations=num_rotations, progress=progress, device=dev)
        metrics = build_metrics(run, method="snap", modalities=modalities, modes=modes, data=data,
                                checkpoint=str(checkpoint), seed=seed)
        if overrides:
            metrics["overrides"] = list(overrides)
        title = f"SNAP {'+'.join(modalities)} on {Path(data_path).name} ({split})"
    write_outputs(out_dir, metrics, run, title)
    return metrics


@torch.no_grad()
def quick_scores(model, dataset, modalities: Sequence[str] = DEFAULT_MODALITIES, seed: int = 0) -> dict[str, float]:
    """Joint recall at (3 m, 3°) (RANSAC) and the area-class mIoU of any torch Dataset of pairs
    (a SceneDataset, a Subset, ...), on maps built from `modalities`; for tests and model cards."""
    model.eval()
    loader = DataLoader(dataset, batch_size=1, shuffle=False)
    errs_m, errs_deg = [], []
    conf = SemanticConfusion()
    for k, batch in enumerate(loader):
        nmap = build_map(model, batch, modalities)
        g = torch.Generator().manual_seed(seed * 1_000_003 + k)
        out = model.localize(batch, nmap, mode="ransac", with_loss=False, generator=g)
        d_m, d_deg = pose_errors(_true_pose(batch), out.T_map_query)
        errs_m += d_m.tolist()
        errs_deg += d_deg.tolist()
        conf.add(model.semantics(nmap), batch["semantic"], nmap.valid)
    ok = [m <= 3.0 and d <= 3.0 for m, d in zip(errs_m, errs_deg)]
    miou = conf.summary()["areas"]["miou"]
    return {"recall_3m_3deg": sum(ok) / max(len(ok), 1), "semantic_miou": float("nan") if miou is None else miou,
            "median_error_m": float(np.median(errs_m)) if errs_m else float("nan")}
