"""SNAP: neural maps from street-level, aerial and semantic inputs; localization; semantics.

Batches follow the SceneDataset contract (docs/architecture.md). Map grids are in the scene
frame (x east, y north, origin at the SW corner, model-grid layout (..., X, Y)); estimated query
poses `T_map_query` are `Transform2D`s of the query BEV frame in that frame.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .. import __version__, geometry
from ..config import Config
from ..storage import atomic_write_bytes
from .bev import BEVMapper, FeaturePlane, camera_in_query_bev, fuse_modalities
from .localizer import Localizer, LocalizerOutput, PosePrior
from .semantic import SemanticNet

CHECKPOINT_FORMAT = "neuralmaps.SNAP/1"

PRETRAINED_NAME = "snap-cpu-tiny"

MODALITIES = ("streetview", "aerial", "semantic")
# The batch keys that carry each map modality (the SceneDataset contract).
MODALITY_KEYS = {
    "streetview": ("map_images", "map_T_scene_view", "map_cameras", "map_view_mask"),
    "aerial": ("aerial",),
    "semantic": ("semantic",),
}
# The ModelConfig flag that gives the model each modality's encoder.
MODALITY_FLAGS = {"streetview": "use_streetview", "aerial": "use_aerial", "semantic": "use_semantic"}
# Maps decoded into classes are built without the semantic raster (it is the target).
SEMANTIC_MODALITIES = ("streetview", "aerial")


def parse_modalities(modalities: str | Sequence[str]) -> tuple[str, ...]:
    """"streetview,aerial" or ["streetview", "aerial"] -> a checked tuple in MODALITIES order."""
    items = modalities.replace("+", ",").split(",") if isinstance(modalities, str) else list(modalities)
    items = [m.strip() for m in items if m.strip()]
    unknown = sorted(set(items) - set(MODALITIES))
    if unknown or not items:
        raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {list(items)}")
    return tuple(m for m in MODALITIES if m in items)


def select_modalities(batch: dict, modalities: Sequence[str] | None) -> dict:
    """A shallow copy of a scene batch without the inputs of the modalities not listed."""
    if modalities is None:
        return batch
    keep = parse_modalities(modalities)
    drop = {k for m in MODALITIES if m not in keep for k in MODALITY_KEYS[m]}
    return {k: v for k, v in batch.items() if k not in drop}

# Model fields that do not change the weights: they may differ between a checkpoint and the
# config it is loaded with (sampling, training and view-selection knobs).
RUNTIME_FIELDS = frozenset({
    "model.num_pose_samples", "model.train_pose_samples", "model.num_pose_retries", "model.refine_grid", "model.modality_dropout",
    "model.z_jitter_m", "model.top_k_views", "model.max_view_distance_m", "model.temperature_init",
    "model.area_frequencies", "model.object_frequencies", "model.num_query_points", "model.train_query_points",
    "model.num_coarse_points",
    "model.coarse_cells", "model.num_candidates", "model.keep_candidates", "model.final_step_cells",
    "model.final_step_deg", "model.refine_range_m", "model.refine_range_deg", "model.score_reduction",
    "model.point_scores", "model.proposals", "model.num_matches", "model.similarity", "model.refined_negatives",
})
# Scene fields that define what the weights mean (voxel size, column height).
SCENE_ARCH_FIELDS = ("cell_m",)


@dataclass
class NeuralMapTile:
    """A neural map over a scene grid (model-grid layout, scene frame).

    features (B, D, X, Y), matching (B, M, X, Y) L2-normalised, valid (B, X, Y) bool,
    confidence (B, X, Y) in [0, 1], cell_m: cell size in metres.
    """

    features: torch.Tensor
    matching: torch.Tensor
    valid: torch.Tensor
    confidence: torch.Tensor
    cell_m: float

    def detach(self) -> "NeuralMapTile":
        return NeuralMapTile(self.features.detach(), self.matching.detach(), self.valid,
                             self.confidence.detach(), self.cell_m)


# Distractor scenes (training only): other scenes are unrelated places only when their origins lie
# at least this far apart (two 24 x 32 m scenes closer than their diagonals plus a query's 16 m reach
# may show the same street).
DISTRACTOR_MIN_SEPARATION_M = 64.0


def with_distractor_scenes(
    tile: NeuralMapTile, scene_origin: torch.Tensor | None, count: int, gap_m: float,
    generator: torch.Generator | None = None,
) -> tuple[NeuralMapTile, torch.Tensor]:
    """Each item's map becomes a row along x of its own scene and `count` other scenes of the batch
    (items b+1, ..., b+count mod B), `gap_m` of empty map between neighbours, its own scene at a
    random slot. A query is then localized against places elsewhere in the city too, as a wide
    prior on a city map makes it (beyond SNAP, whose scene is the whole search area).

    tile: (B, *, X, Y) maps; scene_origin: (B, 2) CRS easting, northing of each scene, or None (the
    scenes are then taken as unrelated); another scene closer than DISTRACTOR_MIN_SEPARATION_M is
    left empty (invalid) in the row. Needs B > count.
    Returns the row tile (B, *, (count+1)·X + count·G, Y), G = round(gap_m / cell_m) cells, and the
    x offset (B,) in metres of each item's own scene in it."""
    B, X = tile.valid.shape[0], tile.valid.shape[1]
    if not 0 < count < B:
        raise ValueError(f"with_distractor_scenes: count must be in [1, B-1] = [1, {B - 1}] for a batch of {B}, "
                         f"got {count}")
    G = round(gap_m / tile.cell_m)
    # Drawn on the generator's device (a CUDA generator cannot fill a CPU tensor), then moved.
    slot = torch.randint(count + 1, (B,), generator=generator,
                         device=generator.device if generator else tile.valid.device).to(tile.valid.device)
    idx = torch.arange(B, device=tile.valid.device)
    others = (idx[:, None] + torch.arange(1, count + 1, device=idx.device)[None]) % B  # (B, count): j-th distractor
    keep = torch.ones(B, count, dtype=torch.bool, device=idx.device)
    if scene_origin is not None:
        o = scene_origin.to(idx.device).double()
        keep = (o[others] - o[:, None]).norm(dim=-1) >= DISTRACTOR_MIN_SEPARATION_M
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("features", "matching", "valid", "confidence")}
    j = torch.zeros(B, dtype=torch.long, device=idx.device)  # next distractor of each item
    for s in range(count + 1):
        own = slot == s
        jj = j.clamp(max=count - 1)[:, None]  # items whose own scene is here take no distractor
        src = torch.where(own, idx, others.gather(1, jj)[:, 0])
        ok = own | keep.gather(1, jj)[:, 0]
        j = j + (~own).long()
        for k in parts:
            v = getattr(tile, k)[src]
            if k == "valid":
                v = v & ok[:, None, None]
            if s and G:
                parts[k].append(v.new_zeros(*v.shape[:-2], G, v.shape[-1]))
            parts[k].append(v)
    row = NeuralMapTile(*(torch.cat(parts[k], dim=-2) for k in ("features", "matching", "valid", "confidence")),
                        cell_m=tile.cell_m)
    return row, slot.to(torch.float64) * (X + G) * tile.cell_m


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def architecture_fields(config: Config) -> dict[str, Any]:
    """The config fields that define the network's weights, flattened ("model.feature_dim": 128)."""
    flat = _flatten(config.to_dict())
    arch = {k: v for k, v in flat.items() if k.startswith("model.") and k not in RUNTIME_FIELDS}
    scene = config.to_dict()["scene"]
    arch |= {f"scene.{k}": scene[k] for k in SCENE_ARCH_FIELDS}
    arch["scene.size_m[2]"] = scene["size_m"][2]
    return arch


def architecture_diff(a: Config, b: Config) -> list[str]:
    """Human-readable differences of the architecture fields of two configs."""
    fa, fb = architecture_fields(a), architecture_fields(b)
    return [f"{k}: {fa.get(k)!r} != {fb.get(k)!r}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


class SNAP(nn.Module):
    """The full model. `SNAP(config)` with `config = neuralmaps.config.preset("cpu-tiny")` etc.

    camera_model: "pinhole" (the digital twin) or "fisheye", for all views of a batch.
    """

    def __init__(self, config: Config, camera_model: str = "pinhole"):
        super().__init__()
        self.config = config
        self.camera_model = camera_model
        self.mapper = BEVMapper(config.model, config.scene)
        self.localizer = Localizer(config.model)
        self.semantic_net = SemanticNet(config.model)

    # -- mapping -------------------------------------------------------------------------------
    def map(
        self,
        scene_batch: dict,
        generator: torch.Generator | None = None,
        *,
        modalities: Sequence[str] | None = None,
        dropout: float | None = None,
        shared_dropout: bool = False,
    ) -> NeuralMapTile:
        """Neural map of a batch of scenes: street-view volumes pooled vertically, aerial and
        semantic planes, max-fused, plus the heads.

        modalities: the inputs used, a subset of MODALITIES ("streetview", "aerial", "semantic");
            None: every input the model has and the batch holds. The inputs left out are never
            read, so nothing of them can reach the map.
        dropout: modality-dropout probability; None: the config's while training, 0 in eval mode.
        shared_dropout: drop the same modalities in every item of the batch."""
        batch = select_modalities(scene_batch, modalities)
        planes = self.mapper.map_planes(batch, self.camera_model)
        if dropout is None:
            dropout = self.config.model.modality_dropout if self.training else 0.0
        plane = fuse_modalities(planes, dropout, generator, shared=shared_dropout)
        matching, confidence = self.mapper.heads(plane)
        return NeuralMapTile(plane.features, matching, plane.valid, confidence, self.config.scene.cell_m)

    # -- query ---------------------------------------------------------------------------------
    def query_T_bev_cam(self, query_batch: dict) -> torch.Tensor:
        """The query camera in its BEV frame (B, 4, 4): from `query_T_bev_cam` if given, else from
        the gravity direction and height of `query_T_scene_cam` (its yaw and x-y are dropped),
        else a level camera at `scene.query_camera_height_m`."""
        if "query_T_bev_cam" in query_batch:
            return query_batch["query_T_bev_cam"].float()
        if "query_T_scene_cam" in query_batch:
            T = geometry.Transform3D.from_matrix(query_batch["query_T_scene_cam"].float())
            return camera_in_query_bev(T).matrix()
        image = query_batch["query_image"]
        T_bev = geometry.Transform2D.identity((image.shape[0],), device=image.device)
        return geometry.bev_pose_to_camera(T_bev, self.config.scene.query_camera_height_m).matrix()

    def query(self, query_batch: dict, generator: torch.Generator | None = None) -> FeaturePlane:
        """Query BEV matching features (B, M, Xq, Yq) and validity (B, Xq, Yq) over `query_xy`."""
        missing = [k for k in ("query_image", "query_camera") if k not in query_batch]
        if missing:
            raise KeyError(f"query batch lacks {missing}; it has {sorted(query_batch)}")
        plane = self.mapper.query_plane(
            query_batch["query_image"], self.query_T_bev_cam(query_batch), query_batch["query_camera"],
            self.camera_model, generator,
        )
        return FeaturePlane(self.mapper.matching(plane), plane.valid)

    @property
    def query_xy(self) -> torch.Tensor:
        """(Xq, Yq, 2) query BEV cell centres, metres (x forward, y left)."""
        return self.mapper.query_xy

    # -- localization --------------------------------------------------------------------------
    def localize(
        self,
        query_batch: dict,
        neural_map: NeuralMapTile,
        mode: str = "ransac",
        prior: PosePrior | None = None,
        *,
        with_loss: bool | None = None,
        num_rotations: int = 64,
        generator: torch.Generator | None = None,
    ) -> LocalizerOutput:
        """Pose of each query in the map frame -> `LocalizerOutput` (T_map_query (B,), ...).

        The loss is filled when `query_T_scene_cam` is in the batch and the model is training, or
        when `with_loss=True` (which needs it)."""
        q = self.query(query_batch, generator)
        T_gt = None
        if with_loss is None:
            with_loss = self.training and "query_T_scene_cam" in query_batch
        if with_loss:
            if "query_T_scene_cam" not in query_batch:
                raise KeyError("localize(with_loss=True) needs 'query_T_scene_cam' in the query batch")
            T_gt = geometry.camera_pose_to_bev(
                geometry.Transform3D.from_matrix(query_batch["query_T_scene_cam"].float())
            )
        # Scores in float32 (as SNAP), also for maps or queries computed under autocast.
        return self.localizer(
            neural_map.matching.float(), neural_map.valid, q.features.float(), q.valid, self.query_xy,
            neural_map.cell_m,
            mode=mode, T_gt=T_gt, prior=prior, num_rotations=num_rotations, generator=generator,
        )

    def loss(self, batch: dict, generator: torch.Generator | None = None, *,
             modalities: Sequence[str] | None = None, distractors: int = 0) -> dict[str, torch.Tensor]:
        """Localization training loss: map from the scene inputs (`modalities`, as in `map`), query
        BEV from the query view, NLL of the ground-truth pose. Returns `total` (scalar), `nll` (B,),
        and detached pose errors `err_xy_m`, `err_yaw_deg` (B,) of the estimate.

        distractors: localize each query in a row of its own scene and this many other scenes of
        the batch (`with_distractor_scenes`; skipped when the batch is not larger)."""
        rows = bool(distractors) and batch["query_T_scene_cam"].shape[0] > distractors
        # In a row, the scenes share their modalities (as the scenes of a city map do).
        neural_map = self.map(batch, generator, modalities=modalities, shared_dropout=rows)
        if rows:
            # Gaps as deep as a query sees: the truth's frustum never reaches another scene.
            neural_map, dx = with_distractor_scenes(neural_map, batch.get("scene_origin"), distractors,
                                                    self.config.scene.query_depth_m, generator)
            T = batch["query_T_scene_cam"].clone()
            T[:, 0, 3] += dx.to(T)
            batch = {**batch, "query_T_scene_cam": T}
        out = self.localize(batch, neural_map, with_loss=True, generator=generator)
        T_gt = geometry.camera_pose_to_bev(geometry.Transform3D.from_matrix(batch["query_T_scene_cam"].float()))
        d_yaw, d_xy = (T_gt.inv() @ out.T_map_query.detach().to(T_gt.device)).magnitude()
        return {"total": out.loss.mean(), "nll": out.loss, "err_xy_m": d_xy.detach(), "err_yaw_deg": d_yaw.detach()}

    # -- semantics -----------------------------------------------------------------------------
    def semantics(self, neural_map: NeuralMapTile) -> dict[str, torch.Tensor]:
        """Logits, probabilities and class maps per group (see `SemanticNet.predict`)."""
        logits = self.semantic_net(neural_map.features, neural_map.valid)
        return self.semantic_net.predict(logits, neural_map.valid)

    def semantic_loss(self, batch: dict, modalities: Sequence[str] = SEMANTIC_MODALITIES) -> dict[str, torch.Tensor]:
        """Semantic-net loss on the frozen map: the mapper runs in eval mode, without gradients
        and without modality dropout, on `modalities` only (default street view + aerial, as
        SNAP: the semantic raster is the target, so it must not be an input of the decoded map).
        Returns the losses (`total` scalar, per-group (B,)) and the metrics."""
        if "semantic" in modalities:
            raise ValueError("semantic_loss: the semantic raster is the target; it cannot be a map input")
        was_training = self.mapper.training
        self.mapper.eval()
        try:
            with torch.no_grad():
                neural_map = self.map(batch, modalities=modalities, dropout=0.0)
        finally:
            self.mapper.train(was_training)
        logits = self.semantic_net(neural_map.features, neural_map.valid)
        losses, metrics = self.semantic_net.loss(logits, batch["semantic"], neural_map.valid)
        return {"total": losses["total"].mean()} | {k: v for k, v in losses.items() if k != "total"} | metrics

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """One file with the weights, `config.to_dict()` and the neuralmaps version (atomic)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": CHECKPOINT_FORMAT,
            "version": __version__,
            "camera_model": self.camera_model,
            "config": self.config.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
        }
        buf = io.BytesIO()
        torch.save(payload, buf)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def pretrained_path(cls, name: str = PRETRAINED_NAME) -> Path:
        """Path of a checkpoint shipped in the package (`neuralmaps/weights/<name>.pt`)."""
        return Path(__file__).resolve().parent.parent / "weights" / f"{name}.pt"

    @classmethod
    def pretrained_training_blocks(cls, name: str = PRETRAINED_NAME) -> frozenset[tuple[int, int]] | None:
        """The (bx, by) 150 m split blocks a shipped checkpoint was trained on (its card,
        `<name>.json`, written by `training.ship`), or None when the card does not say."""
        import json

        try:
            card = json.loads(cls.pretrained_path(name).with_suffix(".json").read_text())
            return frozenset((int(b[0]), int(b[1])) for b in card["training_blocks"])
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return None

    @classmethod
    def from_pretrained(cls, name: str = PRETRAINED_NAME, map_location: Any = "cpu") -> "SNAP":
        """The model shipped with the package (no network): `snap-cpu-tiny`, trained on the
        Helsinki digital twin (see MODEL_CARD.md), with its localization and semantic heads."""
        path = cls.pretrained_path(name)
        if not path.is_file():
            shipped = sorted(p.stem for p in path.parent.glob("*.pt"))
            raise FileNotFoundError(f"no shipped checkpoint {name!r} (looked for {path}); shipped: {shipped or 'none'}")
        return cls.load(path, map_location=map_location)

    @classmethod
    def load(cls, path: str | Path, map_location: Any = "cpu", config: Config | None = None) -> "SNAP":
        """Load a checkpoint written by `save` (weights only, no pickled code), in eval mode.

        `config`: run with this config instead of the saved one; its architecture fields must match
        the checkpoint's (runtime knobs such as `num_pose_samples` may differ)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"SNAP checkpoint not found: {path}")
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: not a readable SNAP checkpoint ({type(e).__name__}: {e})") from None
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: not a SNAP checkpoint (expected format {CHECKPOINT_FORMAT!r})")
        try:
            saved = Config.from_dict(ckpt["config"])
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: checkpoint config is invalid: {e}") from None
        if config is not None:
            diff = architecture_diff(saved, config)
            if diff:
                raise ValueError(
                    f"{path}: the given config does not match the checkpoint's architecture "
                    f"(checkpoint != given): {'; '.join(diff)}"
                )
        model = cls(config or saved, camera_model=ckpt.get("camera_model", "pinhole"))
        state = ckpt["state_dict"]
        own = model.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = [f"{k}: {tuple(state[k].shape)} in file, {tuple(own[k].shape)} in model"
                  for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            parts = []
            if shapes:
                parts.append("shape mismatches: " + "; ".join(shapes[:10]))
            if missing:
                parts.append(f"missing weights: {missing[:10]}")
            if unexpected:
                parts.append(f"unexpected weights: {unexpected[:10]}")
            raise ValueError(
                f"{path}: weights do not match the architecture of its config "
                f"(version {ckpt.get('version')}): " + " | ".join(parts)
            )
        model.load_state_dict(state)
        model.eval()  # ready for inference; call .train() to fine-tune
        return model.to(map_location) if isinstance(map_location, (str, torch.device)) else model
