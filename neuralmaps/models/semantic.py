"""Semantic net: decode a frozen neural map into class rasters (SNAP `SemanticNet`).

Three groups, in `neuralmaps.config.CLASS_NAMES` channel order:
- areas (crosswalk, sidewalk, road, terrain, building): multiclass softmax, class-balanced;
- exclusive objects (fence, pole, tree) + void: softmax;
- binary classes (traffic_sign, traffic_light, street_light): independent sigmoids.
Rasters are model grids (B, K, X, Y).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..classes import AREA_CLASSES, BINARY_CLASSES, OBJECT_CLASSES, OBJECT_CLASSES_VOID
from ..config import ModelConfig
from .encoders import PreActBasic, _norm

NUM_AREA, NUM_OBJECT, NUM_BINARY = len(AREA_CLASSES), len(OBJECT_CLASSES), len(BINARY_CLASSES)


def balancing_weights(frequencies: torch.Tensor, binary: bool = False, eps: float = 1e-3):
    """Per-class loss weights 1 / (N f) (SNAP); binary: (positive, negative) weights."""
    f = frequencies.double()
    n = len(f)
    if not binary:
        f = f / f.sum()
    f = f.clamp(min=eps)
    w = 1.0 / (f * n)
    if binary:
        return w.float(), (1.0 / ((1 - f).clamp(min=eps) * n)).float()
    return w.float()


def class_frequencies(semantic: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Class frequencies of class rasters (B, K, X, Y), in the config's format:
    (area frequencies (5,), object frequencies (fence, pole, tree, 3 binary classes, void) (7,))."""
    labels = semantic_labels(semantic)
    areas = torch.bincount(labels["areas"][labels["areas_valid"]], minlength=NUM_AREA).double()
    areas = areas / areas.sum().clamp(min=1)
    objects = torch.bincount(labels["objects"].flatten(), minlength=NUM_OBJECT + 1).double()
    binary = labels["binary"].double().mean((0, 2, 3))
    total = labels["objects"].numel()
    objects = objects / max(total, 1)
    obj = torch.cat([objects[:NUM_OBJECT], binary, objects[NUM_OBJECT:]])
    return tuple(areas.tolist()), tuple(obj.tolist())


def semantic_labels(semantic: torch.Tensor) -> dict[str, torch.Tensor]:
    """Labels of each group from a multi-hot raster (B, K, X, Y), K = len(CLASS_NAMES).

    Returns areas (B, X, Y) long + areas_valid (cells with any area class; the first class wins
    on overlaps), objects (B, X, Y) long with void = NUM_OBJECT, binary (B, 3, X, Y) bool.
    """
    K = NUM_AREA + NUM_OBJECT + NUM_BINARY
    if semantic.ndim != 4 or semantic.shape[1] != K:
        raise ValueError(f"semantic raster must be (B, {K}, X, Y) in CLASS_NAMES order, got {tuple(semantic.shape)}")
    m = semantic > 0.5
    areas, objects, binary = m.split([NUM_AREA, NUM_OBJECT, NUM_BINARY], 1)
    obj = objects.float().argmax(1).masked_fill(~objects.any(1), NUM_OBJECT)  # void where no object
    return {
        "areas": areas.float().argmax(1),
        "areas_valid": areas.any(1),
        "objects": obj,
        "binary": binary,
    }


def multiclass_metrics(
    logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, names: tuple[str, ...], prefix: str
) -> dict[str, torch.Tensor]:
    """Accuracy, per-class recall and IoU (over the whole batch; NaN for absent classes).

    logits (B, N, X, Y), labels (B, X, Y) long, valid (B, X, Y)."""
    pred = logits.argmax(1)[valid]
    gt = labels[valid]
    out = {f"{prefix}/accuracy": (pred == gt).float().mean() if gt.numel() else logits.new_tensor(float("nan"))}
    recalls, ious = [], []
    for i, name in enumerate(names):
        tp = ((pred == i) & (gt == i)).sum().float()
        n_gt = (gt == i).sum().float()
        union = ((pred == i) | (gt == i)).sum().float()
        recall = tp / n_gt if n_gt > 0 else tp.new_tensor(float("nan"))
        iou = tp / union if union > 0 else tp.new_tensor(float("nan"))
        out[f"{prefix}/recall/{name}"], out[f"{prefix}/iou/{name}"] = recall, iou
        recalls.append(recall)
        ious.append(iou)
    out[f"{prefix}/recall/average"] = torch.stack(recalls).nanmean()
    out[f"{prefix}/iou/average"] = torch.stack(ious).nanmean()
    return out


def binary_metrics(
    logits: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, names: tuple[str, ...], prefix: str
) -> dict[str, torch.Tensor]:
    """Per-class accuracy, recall and IoU of independent binary classes. logits/gt (B, N, X, Y)."""
    out = {}
    pred = logits > 0
    v = valid[:, None].expand_as(gt)
    for i, name in enumerate(names):
        p, g = pred[:, i][v[:, i]], gt[:, i][v[:, i]]
        tp = (p & g).sum().float()
        out[f"{prefix}/accuracy/{name}"] = (p == g).float().mean() if g.numel() else tp.new_tensor(float("nan"))
        out[f"{prefix}/recall/{name}"] = tp / g.sum() if g.any() else tp.new_tensor(float("nan"))
        union = (p | g).sum()
        out[f"{prefix}/iou/{name}"] = tp / union if union > 0 else tp.new_tensor(float("nan"))
    return out


def _masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of x (B, X, Y) over valid cells per item -> (B,)."""
    v = valid.to(x.dtype)
    return (x * v).sum((1, 2)) / v.sum((1, 2)).clamp(min=1)


class SemanticNet(nn.Module):
    """Decoder over the (frozen) neural map features.

    decoder "mlp": `semantic_layers` 1x1 conv + ReLU layers of `semantic_dim`, then the logits;
    "resnet": a 1x1 projection, a stage of `semantic_layers` pre-activation basic blocks (3x3
    context; `semantic_norm`), then the logits. forward(features (B, D, X, Y), valid (B, X, Y)) -> dict of logits
    `areas` (B, 5, X, Y), `objects` (B, 4, X, Y) (last = void), `binary` (B, 3, X, Y); zero where
    invalid.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, dim, n = cfg.feature_dim, cfg.semantic_dim, cfg.semantic_layers
        num_out = NUM_AREA + NUM_OBJECT + 1 + NUM_BINARY
        if cfg.semantic_decoder == "mlp":
            layers: list[nn.Module] = []
            cin = D
            for _ in range(n):
                layers += [nn.Conv2d(cin, dim, 1), nn.ReLU()]
                cin = dim
            layers.append(nn.Conv2d(cin, num_out, 1))
        elif cfg.semantic_decoder == "resnet":
            norm = cfg.image_encoder.norm if cfg.semantic_norm == "encoder" else cfg.semantic_norm
            if norm not in ("group", "batch", "none"):
                raise ValueError(f"ModelConfig.semantic_norm must be 'encoder', 'group', 'batch' or 'none', "
                                 f"got {cfg.semantic_norm!r}")
            layers = [nn.Conv2d(D, dim, 1)]
            layers += [PreActBasic(norm, dim, dim, 1) for _ in range(n)]
            layers += [_norm(norm, dim), nn.ReLU(), nn.Conv2d(dim, num_out, 1)]
        else:
            raise ValueError(f"ModelConfig.semantic_decoder must be 'mlp' or 'resnet', got {cfg.semantic_decoder!r}")
        self.decoder = nn.Sequential(*layers)
        # Cells each side of a decoded cell that its output reads (two 3x3 convs per basic block):
        # a tiled build lifts street view this far past a tile so that the tile's classes are exact.
        self.reach_cells = 0 if cfg.semantic_decoder == "mlp" else 2 * n
        if len(cfg.area_frequencies) != NUM_AREA or len(cfg.object_frequencies) != NUM_OBJECT + NUM_BINARY + 1:
            raise ValueError(
                f"ModelConfig.area_frequencies needs {NUM_AREA} values {AREA_CLASSES} and object_frequencies "
                f"{NUM_OBJECT + NUM_BINARY + 1} values {OBJECT_CLASSES + BINARY_CLASSES + ('void',)}"
            )
        area_f = torch.tensor(cfg.area_frequencies)
        obj_f = torch.tensor(cfg.object_frequencies)
        excl_f = torch.cat([obj_f[:NUM_OBJECT], obj_f[-1:]])  # fence, pole, tree, void
        bin_pos, bin_neg = balancing_weights(obj_f[NUM_OBJECT:-1], binary=True)
        self.register_buffer("w_areas", balancing_weights(area_f), persistent=False)
        self.register_buffer("w_objects", balancing_weights(excl_f), persistent=False)
        self.register_buffer("w_binary_pos", bin_pos, persistent=False)
        self.register_buffer("w_binary_neg", bin_neg, persistent=False)

    def forward(self, features: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        if not torch.is_autocast_enabled(features.device.type):  # e.g. a map made under autocast
            features = features.to(self.decoder[0].weight.dtype)
        logits = self.decoder(features).float()
        logits = torch.where(valid[:, None], logits, torch.zeros_like(logits))
        areas, objects, binary = logits.split([NUM_AREA, NUM_OBJECT + 1, NUM_BINARY], 1)
        return {"areas": areas, "objects": objects, "binary": binary}

    def log_balance(self) -> dict[str, torch.Tensor]:
        """What the class-balanced losses add to the logits at their optimum: log w_c of the exclusive
        objects + void (4,) and log(w_pos / w_neg) of the binary classes (3,). Subtracting them gives
        probabilities under the training frequencies (weighted CE is minimised by q_c ∝ w_c p_c)."""
        return {"objects": self.w_objects.log(), "binary": (self.w_binary_pos / self.w_binary_neg).log()}

    @staticmethod
    def predict(logits: dict[str, torch.Tensor], valid: torch.Tensor) -> dict[str, torch.Tensor]:
        """Probabilities and class maps per group: `{group}_prob` and `{group}_class` (uint8, 255 =
        no data), `binary_prob` (B, 3, X, Y) and `binary_mask` (bool)."""
        out = dict(logits)
        for g in ("areas", "objects"):
            p = torch.softmax(logits[g], 1)
            cls = p.argmax(1).to(torch.uint8)
            out[f"{g}_prob"] = p
            out[f"{g}_class"] = torch.where(valid, cls, torch.full_like(cls, 255))
        out["binary_prob"] = torch.sigmoid(logits["binary"])
        out["binary_mask"] = (logits["binary"] > 0) & valid[:, None]
        return out

    def loss(
        self, logits: dict[str, torch.Tensor], semantic: torch.Tensor, valid: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Class-balanced NLLs (B,) per group and their `total` (SNAP's weighting), and metrics
        (scalars over the batch): `area/accuracy`, `area/recall/<class>`, `area/iou/<class>`,
        `.../average`, the same for `object/` (with void), and `binary/{accuracy,recall,iou}/<class>`.

        semantic: ground-truth raster (B, K, X, Y); valid: map cells to supervise (B, X, Y)."""
        lab = semantic_labels(semantic)
        v_area = valid & lab["areas_valid"]
        nll_a = F.cross_entropy(logits["areas"], lab["areas"], reduction="none") * self.w_areas[lab["areas"]]
        nll_o = F.cross_entropy(logits["objects"], lab["objects"], reduction="none") * self.w_objects[lab["objects"]]
        gt_b = lab["binary"].float()
        bce = F.binary_cross_entropy_with_logits(logits["binary"], gt_b, reduction="none")
        w = torch.where(lab["binary"], self.w_binary_pos[:, None, None], self.w_binary_neg[:, None, None])
        nll_b = (bce * w).mean(1)
        losses = {
            "nll_areas": _masked_mean(nll_a, v_area),
            "nll_objects": _masked_mean(nll_o, valid),
            "nll_binary": _masked_mean(nll_b, valid),
        }
        losses["total"] = (losses["nll_areas"] + (losses["nll_objects"] + losses["nll_binary"]) / 2) / 2
        with torch.no_grad():
            metrics = multiclass_metrics(logits["areas"], lab["areas"], v_area, AREA_CLASSES, "area")
            metrics |= multiclass_metrics(logits["objects"], lab["objects"], valid, OBJECT_CLASSES_VOID, "object")
            metrics |= binary_metrics(logits["binary"], lab["binary"], valid, BINARY_CLASSES, "binary")
        return losses, metrics
