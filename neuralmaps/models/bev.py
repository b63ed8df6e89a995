"""BEV mapper: vertical pooling, map modalities (street view, aerial, semantic raster), modality
fusion, matching and confidence heads, and the query BEV over the camera frustum.

Grids follow the model-grid convention (docs/architecture.md): (..., C, X, Y), cell (i, j) centred
at ((i + 0.5) c, (j + 0.5) c) from the grid's origin corner. The map grid lives in the scene frame
(x east, y north, z up); the query grid in the query BEV frame (x forward, y left, z up, origin at
the camera's ground point).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import geometry
from ..config import CLASS_NAMES, ModelConfig, SceneConfig
from ..grids import Grid2D, Grid3D
from .encoders import ImageEncoder, SemanticRasterEncoder
from .streetview import StreetViewEncoder, mlp, voxel_centers

POOLINGS = ("max", "mean", "sum", "weighted", "softmax", "mlp")


@dataclass
class FeaturePlane:
    """A BEV plane: features (B, C, X, Y), valid (B, X, Y)."""

    features: torch.Tensor
    valid: torch.Tensor


class VerticalPooling(nn.Module):
    """Pool a (B, C, X, Y, Z) volume over its last axis, respecting the valid mask (SNAP).

    Modes: max, mean, sum, weighted (softmax of log-sigmoid confidences), softmax (of raw
    confidences), mlp (concatenate the Z cells, needs `num_z`). Cells with no valid voxel get zeros
    and are invalid. forward(features (B, C, X, Y, Z), valid (B, X, Y, Z)) -> FeaturePlane.
    """

    def __init__(self, mode: str, dim: int, num_z: int | None = None):
        super().__init__()
        if mode not in POOLINGS:
            raise ValueError(f"ModelConfig.pooling must be one of {POOLINGS}, got {mode!r}")
        self.mode = mode
        if mode in ("weighted", "softmax"):
            self.score = nn.Linear(dim, 1)
        elif mode == "mlp":
            if not num_z:
                raise ValueError("mlp vertical pooling needs the number of z cells")
            self.mlp = mlp([dim * num_z, 2 * dim, dim])
            self.num_z = num_z

    def forward(self, features: torch.Tensor, valid: torch.Tensor) -> FeaturePlane:
        valid_any = valid.any(-1)
        # Double-where: columns with no valid voxel pool over all of them, then are zeroed.
        valid_ = torch.where(valid_any[..., None], valid, torch.ones_like(valid))[:, None]  # B,1,X,Y,Z
        if self.mode in ("weighted", "softmax"):
            scores = self.score(features.movedim(1, -1)).squeeze(-1).float()  # B,X,Y,Z
            if self.mode == "weighted":
                scores = F.logsigmoid(scores)
            w = torch.softmax(scores.masked_fill(~valid_[:, 0], float("-inf")), -1)
            w = w.masked_fill(~valid, 0).to(features.dtype)
            out = (features * w[:, None]).sum(-1)
        elif self.mode == "mlp":
            if features.shape[-1] != self.num_z:
                raise ValueError(f"mlp pooling built for {self.num_z} z cells, got {features.shape[-1]}")
            f = features.masked_fill(~valid[:, None], 0)
            out = self.mlp(f.movedim(1, -2).flatten(-2)).movedim(-1, 1)
        elif self.mode == "max":
            out = features.masked_fill(~valid_, float("-inf")).amax(-1)
        else:
            f = features.masked_fill(~valid_, 0)
            out = f.sum(-1)
            if self.mode == "mean":
                out = out / valid_.sum(-1).clamp(min=1).to(out.dtype)
        out = out.masked_fill(~valid_any[:, None], 0)
        return FeaturePlane(out, valid_any)


def fuse_modalities(
    planes: list[FeaturePlane], dropout: float = 0.0, generator: torch.Generator | None = None,
    shared: bool = False,
) -> FeaturePlane:
    """Max over the available modalities; with `dropout` > 0 each modality of each batch item (of
    the whole batch when `shared`) is dropped with that probability, but never all of them (then
    all are kept, as SNAP)."""
    if not planes:
        raise ValueError("no map modality to fuse")
    if dropout > 0 and len(planes) > 1:
        B = planes[0].valid.shape[0]
        device = planes[0].valid.device
        keep = torch.rand((len(planes), 1 if shared else B), generator=generator,
                          device=generator.device if generator else None).expand(len(planes), B)
        keep = (keep >= dropout).to(device)
        keep = torch.where(keep.any(0, keepdim=True), keep, torch.ones_like(keep))
        planes = [FeaturePlane(p.features, p.valid & k[:, None, None]) for p, k in zip(planes, keep)]
    if len(planes) == 1:
        return planes[0]
    feats = torch.stack([p.features for p in planes], -1)
    valid = torch.stack([p.valid for p in planes], -1)
    return VerticalPooling("max", feats.shape[1])(feats, valid)


class MatchingHead(nn.Module):
    """1x1 projection to `matching_dim`, L2-normalised, zero where invalid.

    Init (SNAP): weights ~ truncated normal of variance 1 / (sqrt(M) * D), so that for
    unit-variance input features the projected features have variance 1/sqrt(M) per channel and
    the dot product of two independent projected vectors has unit variance (M terms of variance
    1/M; (D + M + 1) / D exactly, in expectation over the weights). After the L2 normalisation
    the dot products lie in [-1, 1]; their scale is then set by the localizer's learned
    temperature.
    """

    def __init__(self, dim: int, matching_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, matching_dim, 1)
        # Truncation at 2 sigma shrinks the variance by 0.8796^2: compensate, as jax's variance_scaling.
        std = (1.0 / (math.sqrt(matching_dim) * dim)) ** 0.5 / 0.87962566103423978
        nn.init.trunc_normal_(self.proj.weight, std=std, a=-2 * std, b=2 * std)
        nn.init.zeros_(self.proj.bias)

    def forward(self, plane: FeaturePlane) -> torch.Tensor:
        f = F.normalize(self.proj(plane.features), dim=1)
        return f.masked_fill(~plane.valid[:, None], 0)


def scene_xy(scene: SceneConfig) -> torch.Tensor:
    """(X, Y, 2) cell centres of the map grid in the scene frame, metres."""
    return Grid2D(tuple(scene.size_m[:2]), scene.cell_m).cell_centers(dtype=torch.float32)


def query_grid(scene: SceneConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The query BEV grid: cell centres `query_xy` (Xq, Yq, 2) and the frustum mask (Xq, Yq).

    Query BEV frame: x forward (0 .. query_depth_m), y left (-W/2 .. W/2) with W/2 the frustum's
    half-width at full depth rounded up to a metre (24 m for 16 m at 72 degrees). Cells whose
    centre lies outside the horizontal field of view `query_hfov_deg`, or farther than the frustum depth, are invalid.
    """
    half_width = math.ceil(scene.query_depth_m * math.tan(math.radians(scene.query_hfov_deg) / 2))
    grid = Grid2D((scene.query_depth_m, 2.0 * half_width), scene.cell_m)
    xy = grid.cell_centers(dtype=torch.float32) - torch.tensor([0.0, half_width])  # centre y on the axis
    half = math.radians(scene.query_hfov_deg) / 2
    inside = (xy[..., 1].abs() <= xy[..., 0] * math.tan(half)) & (xy[..., 0] <= scene.query_depth_m)
    return xy, inside


def _require(batch: dict, keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"{what} batch lacks {missing}; it has {sorted(batch)}")


def camera_in_query_bev(T_scene_cam: "geometry.Transform3D") -> "geometry.Transform3D":
    """`T_bev_cam`: the camera in its own query BEV frame (keeps height, pitch and roll only)."""
    T_scene_bev = geometry.camera_pose_to_bev(T_scene_cam)
    return T_scene_bev.to_3d().inv() @ T_scene_cam


class BEVMapper(nn.Module):
    """Scene inputs -> neural map; query image -> query BEV (SNAP `BEVMapper`).

    Street-view volumes span z in [h + z_offset_m, h + z_offset_m + size_m[2]) where h is the median
    camera height (the query camera's height for the query, jittered by +-z_jitter_m in training).
    """

    def __init__(self, cfg: ModelConfig, scene: SceneConfig):
        super().__init__()
        self.cfg, self.scene = cfg, scene
        D = cfg.feature_dim
        self.num_z = Grid3D(tuple(scene.size_m), scene.cell_m).num_cells[2]
        if not (cfg.use_streetview or cfg.use_aerial or cfg.use_semantic):
            raise ValueError("ModelConfig: at least one of use_streetview/use_aerial/use_semantic must be True")
        self.streetview = StreetViewEncoder(cfg)  # also encodes the query, so always built
        self.pooling = VerticalPooling(cfg.pooling, D, self.num_z)
        self.aerial = None
        if cfg.use_aerial:
            self._check_dim("aerial_encoder", cfg.aerial_encoder.out_dim)
            self.aerial = ImageEncoder(cfg.aerial_encoder, in_channels=3, skip_root=True)
        self.semantic = None
        if cfg.use_semantic:
            self._check_dim("semantic_encoder", cfg.semantic_encoder.out_dim)
            self.semantic = SemanticRasterEncoder(cfg.semantic_encoder, len(CLASS_NAMES), cfg.semantic_embedding_dim)
        self.matching = MatchingHead(D, cfg.matching_dim)
        self.confidence = nn.Conv2d(D, 1, 1) if cfg.confidence_head else None
        self.register_buffer("map_xy", scene_xy(scene), persistent=False)
        q_xy, q_inside = query_grid(scene)
        self.register_buffer("query_xy", q_xy, persistent=False)
        self.register_buffer("query_inside", q_inside, persistent=False)

    def _check_dim(self, name: str, dim: int) -> None:
        if dim != self.cfg.feature_dim:
            raise ValueError(f"ModelConfig.{name}.out_dim ({dim}) must equal feature_dim ({self.cfg.feature_dim})")

    # -- street view ---------------------------------------------------------------------------
    def streetview_plane(
        self,
        images: torch.Tensor,
        T_frame_view: torch.Tensor,
        cameras: torch.Tensor,
        view_mask: torch.Tensor,
        xy: torch.Tensor,
        z_bottom: torch.Tensor,
        camera_model: str = "pinhole",
    ) -> tuple[FeaturePlane, torch.Tensor]:
        """Lift views into the voxel columns over `xy` (X, Y, 2) from z_bottom (B,), pool vertically.

        Returns the plane and the volume's valid mask (B, X, Y, Z)."""
        xyz = voxel_centers(xy, z_bottom, self.scene.size_m[2], self.scene.cell_m)
        volume, valid = self.streetview(images, T_frame_view, cameras, view_mask, xyz, camera_model)
        return self.pooling(volume, valid), valid

    def map_xy_for(self, batch: dict) -> torch.Tensor:
        """(X, Y, 2) map cell centres: the scene grid, or a tile of another size given by the
        batch's aerial / semantic raster (same cell size, same SW-corner origin)."""
        for key in ("aerial", "semantic"):
            if key in batch and tuple(batch[key].shape[-2:]) != tuple(self.map_xy.shape[:2]):
                X, Y = batch[key].shape[-2:]
                c = self.scene.cell_m
                return Grid2D((X * c, Y * c), c).cell_centers(dtype=torch.float32, device=self.map_xy.device)
        return self.map_xy

    def map_planes(self, batch: dict, camera_model: str = "pinhole") -> list[FeaturePlane]:
        """One FeaturePlane (B, D, X, Y) per available map modality. X, Y: the scene grid, or the
        size of the batch's rasters (to map tiles of any size at `scene.cell_m`)."""
        planes = []
        cfg = self.cfg
        map_xy = self.map_xy_for(batch)
        if cfg.use_streetview and "map_images" in batch:
            _require(batch, ("map_T_scene_view", "map_cameras", "map_view_mask"), "street-view map")
            T = batch["map_T_scene_view"].float()
            mask = batch["map_view_mask"].bool()
            heights = T[..., 2, 3].masked_fill(~mask, float("nan")).nanmedian(-1).values  # B
            heights = heights.nan_to_num(self.scene.map_camera_height_m)  # no real view: nominal rig height
            plane, _ = self.streetview_plane(
                batch["map_images"], T, batch["map_cameras"], mask, map_xy, heights + cfg.z_offset_m, camera_model
            )
            planes.append(plane)
        if self.aerial is not None and "aerial" in batch:
            f = self.aerial(batch["aerial"])
            planes.append(FeaturePlane(f, torch.ones_like(f[:, 0], dtype=torch.bool)))
        if self.semantic is not None and "semantic" in batch:
            f = self.semantic(batch["semantic"])
            planes.append(FeaturePlane(f, torch.ones_like(f[:, 0], dtype=torch.bool)))
        if not planes:
            raise ValueError(
                "map batch has no usable modality: expected 'map_images' (use_streetview), "
                f"'aerial' (use_aerial) or 'semantic' (use_semantic); got keys {sorted(batch)}"
            )
        X, Y = map_xy.shape[:2]
        for p in planes:
            if p.features.shape[-2:] != (X, Y):
                raise ValueError(
                    f"map modalities disagree: a plane of size {tuple(p.features.shape[-2:])} for a grid of "
                    f"{(X, Y)} cells (aerial and semantic rasters must have the same X, Y)"
                )
        return planes

    def heads(self, plane: FeaturePlane) -> tuple[torch.Tensor, torch.Tensor]:
        """Matching features (B, M, X, Y) and confidence in [0, 1] (B, X, Y) (ones without a head)."""
        matching = self.matching(plane)
        if self.confidence is not None:
            conf = torch.sigmoid(self.confidence(plane.features)[:, 0].float())
        else:
            conf = torch.ones_like(plane.valid, dtype=torch.float32)
        return matching, conf.masked_fill(~plane.valid, 0)

    # -- query ---------------------------------------------------------------------------------
    def query_plane(
        self,
        image: torch.Tensor,
        T_bev_cam: torch.Tensor,
        camera: torch.Tensor,
        camera_model: str = "pinhole",
        generator: torch.Generator | None = None,
    ) -> FeaturePlane:
        """Query image (B, 3, H, W), camera in its BEV frame (B, 4, 4), intrinsics (B, 8) ->
        query BEV plane over `query_xy` (cells outside the frustum invalid)."""
        B = image.shape[0]
        z_bottom = T_bev_cam[:, 2, 3].float() + self.cfg.z_offset_m
        if self.training and self.cfg.z_jitter_m > 0:
            u = torch.rand(B, generator=generator, device=generator.device if generator else None).to(z_bottom.device)
            z_bottom = z_bottom + (2 * u - 1) * self.cfg.z_jitter_m
        mask = torch.ones((B, 1), dtype=torch.bool, device=image.device)
        # Only the columns inside the frustum are lifted (about half of the grid), as a (N, 1) grid.
        inside = self.query_inside
        plane, _ = self.streetview_plane(
            image[:, None], T_bev_cam[:, None], camera[:, None], mask, self.query_xy[inside][:, None], z_bottom,
            camera_model,
        )
        feats = plane.features.new_zeros((B, plane.features.shape[1], *inside.shape))
        feats[:, :, inside] = plane.features[..., 0]
        valid = torch.zeros((B, *inside.shape), dtype=torch.bool, device=image.device)
        valid[:, inside] = plane.valid[..., 0]
        return FeaturePlane(feats, valid)
