"""Street-view encoder: lift multi-view image features into a 3D feature volume (SNAP).

Every voxel centre is projected into every view; the `top_k` nearest views that see it are kept,
their features are sampled bilinearly, weighted by a per-pixel log-depth score evaluated at the
voxel's depth, pooled (weighted mean and variance, optionally min/max) and fused by an MLP.

Frames: points and view poses are in one frame (the scene frame for the map, the query BEV frame
for the query), x/y/z in metres; `T_scene_view` maps view (OpenCV camera) points to that frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import geometry
from ..config import ModelConfig
from ..grids import Grid3D
from .encoders import ImageEncoder


def voxel_centers(xy: torch.Tensor, z_bottom: torch.Tensor, height_m: float, cell_m: float) -> torch.Tensor:
    """Voxel centres of a vertical stack of cells over a horizontal grid.

    Args:
        xy: (X, Y, 2) horizontal cell centres, metres.
        z_bottom: (B,) bottom of the column per batch item, metres (z up).
        height_m: column height; Z = round(height_m / cell_m) voxels.
        cell_m: voxel size.
    Returns:
        (B, X, Y, Z, 3) voxel centres.
    """
    num_z = Grid3D((cell_m, cell_m, height_m), cell_m).num_cells[2]
    z = z_bottom[:, None] + (torch.arange(num_z, device=xy.device, dtype=xy.dtype) + 0.5) * cell_m  # B,Z
    B, (X, Y) = len(z_bottom), xy.shape[:2]
    xy_ = xy[None, :, :, None, :].expand(B, X, Y, num_z, 2)
    z_ = z[:, None, None, :, None].expand(B, X, Y, num_z, 1)
    return torch.cat([xy_, z_.to(xy.dtype)], dim=-1)


def depth_to_bin(depth: torch.Tensor, num_bins: int, min_m: float, max_m: float) -> torch.Tensor:
    """Continuous log-depth bin index in [0, num_bins - 1] (bin i's centre at i)."""
    t = torch.log(depth.clamp(min_m, max_m) / min_m) / math.log(max_m / min_m)
    return t * (num_bins - 1)


@dataclass
class ViewPatches:
    """Per-view maps flattened into lookup tables for fused bilinear gathers (`weighted_gather`:
    the 4 corners' gather and weighted sum in one kernel), prepared once per batch of views.

    feats: (B*V*h*w, C), row = ((b*V + v)*h + y)*w + x; scores: (B*V*h*w*S, 1) or None.
    """

    feats: torch.Tensor
    scores: torch.Tensor | None
    shape: tuple[int, int, int, int]  # B, V, h, w
    num_bins: int


class _WeightedGather(torch.autograd.Function):
    """out[m] = sum_j weights[m, j] * table[rows[m, j]]: (R, C), (M, J), (M, J) -> (M, C).

    Forward is `F.embedding_bag`; the backward scatters with `index_add_`, several times faster
    on CPU than embedding_bag's sort-based dense backward.
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(table, rows, weights)
        return F.embedding_bag(rows, table, per_sample_weights=weights, mode="sum")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        table, rows, weights = ctx.saved_tensors
        g_table = g_weights = None
        if ctx.needs_input_grad[0]:
            g_table = torch.zeros_like(table)
            for j in range(rows.shape[1]):  # per corner: (M, C) temporaries instead of (M, J, C)
                g_table.index_add_(0, rows[:, j], (grad * weights[:, j : j + 1]).to(table.dtype))
        if ctx.needs_input_grad[2]:
            g_weights = (table[rows] * grad[:, None, :]).sum(-1)
        return g_table, None, g_weights


def weighted_gather(table: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Rows of `table` (R, C) combined with weights: rows/weights (..., J) -> (..., C)."""
    J = rows.shape[-1]
    out = _WeightedGather.apply(table, rows.reshape(-1, J), weights.reshape(-1, J).to(table.dtype))
    return out.reshape(*rows.shape[:-1], table.shape[1])


def view_patches(maps: torch.Tensor, depth_scores: torch.Tensor | None) -> ViewPatches:
    """maps (B, V, C, h, w), depth_scores (B, V, S, h, w) or None -> ViewPatches."""
    B, V, C, h, w = maps.shape
    scores, S = None, 0
    if depth_scores is not None:
        S = depth_scores.shape[2]
        scores = depth_scores.permute(0, 1, 3, 4, 2).reshape(-1, 1)
    return ViewPatches(maps.permute(0, 1, 3, 4, 2).reshape(-1, C), scores, (B, V, h, w), S)


def sample_patches(
    patches: ViewPatches,
    p2d: torch.Tensor,
    view_idx: torch.Tensor,
    valid: torch.Tensor,
    depth: torch.Tensor | None = None,
    depth_min_max: tuple[float, float] = (1.0, 32.0),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Bilinear sampling of a few selected views per point, without touching the others.

    Args:
        p2d: (B, K, N, 2) pixel coordinates (x, y) in the maps, pixel centres at half-integers.
        view_idx: (B, K, N) which view each observation comes from.
        valid: (B, K, N) observations to sample; others return zeros.
        depth: (B, K, N) metres along the optical axis, to evaluate the log-depth scores at.
    Returns:
        features (B, K, N, C); depth scores (B, K, N) (bilinear in the image, linear in
        log-depth bins; None without scores or depth).
    """
    B, V, h, w = patches.shape
    # Points between a border pixel's centre and the image border are clamped (as SNAP).
    p = torch.where(valid[..., None], p2d, torch.zeros_like(p2d)).nan_to_num(0.0) - 0.5
    size = torch.tensor([w - 1, h - 1], device=p.device, dtype=p.dtype)
    p = torch.minimum(p.clamp(min=0), size)
    lo = p.floor()
    fx, fy = (p - lo).unbind(-1)
    x0, y0 = lo.long().unbind(-1)
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
    base = (torch.arange(B, device=p.device)[:, None, None] * V + view_idx) * (h * w)
    rows = torch.stack([base + y0 * w + x0, base + y0 * w + x1, base + y1 * w + x0, base + y1 * w + x1], -1)
    wts = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], -1) * valid[..., None]
    out = weighted_gather(patches.feats, rows, wts)
    if patches.scores is None or depth is None:
        return out, None
    S = patches.num_bins
    b = depth_to_bin(depth, S, *depth_min_max)
    b_lo = b.floor().long().clamp(0, S - 1)
    b_hi = (b_lo + 1).clamp(max=S - 1)
    wb = (b - b_lo.to(b.dtype))[..., None]
    idx = torch.cat([rows * S + b_lo[..., None], rows * S + b_hi[..., None]], -1)  # B,K,N,8
    w8 = torch.cat([wts * (1 - wb), wts * wb], -1)
    return out, weighted_gather(patches.scores, idx, w8)[..., 0]


def pool_observations(
    feats: torch.Tensor,
    valid: torch.Tensor,
    scores: torch.Tensor | None,
    use_variance: bool = True,
    add_minmax: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Statistics of the multi-view observations of each point (SNAP `pool_multiview_features`).

    Args:
        feats: (B, K, N, C) observations; valid: (B, K, N); scores: (B, K, N) log-weights or None
            (uniform weights).
    Returns:
        stats (B, N, P) with P = C * (1 + use_variance + 2 * add_minmax) + (scores is not None):
        weighted mean, weighted variance, [max, min], [max score]; zeros where invalid.
        valid_any (B, N).
    """
    valid_any = valid.any(1)
    # Double-where: rows with no observation use all, then get zeroed, so gradients stay finite.
    valid_ = torch.where(valid_any[:, None], valid, torch.ones_like(valid))
    if scores is None:
        scores = torch.zeros(valid.shape, device=feats.device, dtype=torch.float32)
        add_score = False
    else:
        add_score = True
    logits = scores.float().masked_fill(~valid_, float("-inf"))
    weights = torch.softmax(logits, dim=1).to(feats.dtype)[..., None]  # B,K,N,1
    mean = (weights * feats).sum(1)
    stats = [mean]
    if use_variance:
        stats.append((weights * (feats - mean[:, None]) ** 2).sum(1))
    if add_minmax:
        m = valid_[..., None]
        stats.append(feats.masked_fill(~m, float("-inf")).amax(1))
        stats.append(feats.masked_fill(~m, float("inf")).amin(1))
    if add_score:
        stats.append(scores.masked_fill(~valid_, float("-inf")).amax(1)[..., None].to(feats.dtype))
    out = torch.cat(stats, -1)
    out = out.masked_fill(~valid_any[..., None], 0)
    return out, valid_any


def project_to_views(
    xyz: torch.Tensor, T_scene_view: "geometry.Transform3D", cameras, view_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Project points into all views.

    Args:
        xyz: (B, N, 3) points in the scene frame; T_scene_view: (B, V) view-to-scene poses;
        cameras: (B, V) cameras at the resolution of the maps to sample; view_mask: (B, V).
    Returns:
        p2d (B, V, N, 2) pixels, visible (B, V, N), depth (B, V, N) metres along the optical
        axis, distance (B, V, N) metres from the camera centre.
    """
    p_view = _to_view(T_scene_view, xyz)
    p2d, visible = cameras.project(p_view)
    depth = p_view[..., 2]
    visible = visible & view_mask[..., None] & (depth > 1e-3)
    distance = torch.linalg.norm(p_view, dim=-1)
    return p2d, visible, depth, distance


def _to_view(T_scene_view: "geometry.Transform3D", xyz: torch.Tensor) -> torch.Tensor:
    """(B, V) poses, (B, N, 3) scene points -> (B, V, N, 3) points in each view frame."""
    V = T_scene_view.t.shape[1]
    return T_scene_view.inv().transform(xyz[:, None].expand(-1, V, -1, -1))


def lift_views_to_points(
    maps: torch.Tensor,
    depth_scores: torch.Tensor | None,
    T_scene_view: "geometry.Transform3D",
    cameras,
    view_mask: torch.Tensor,
    xyz: torch.Tensor,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample and pool the views observing each point: the parameter-free core of the encoder.

    Args:
        maps: (B, V, C, h, w) per-view features; depth_scores: (B, V, S, h, w) log-depth scores over
            S bins spanning `depth_min_max` (log-spaced), or None for uniform weights.
        T_scene_view: (B, V) view-to-scene poses; cameras: (B, V) at the maps' resolution.
        view_mask: (B, V) real views; xyz: (B, N, 3) points, scene frame.
        kwargs: see `lift_patches_to_points` (top_k, depth_min_max, max_view_distance, ...).
    Returns:
        stats (B, N, P) (see `pool_observations`), valid (B, N).
    """
    return lift_patches_to_points(view_patches(maps, depth_scores), T_scene_view, cameras, view_mask, xyz, **kwargs)


def lift_patches_to_points(
    patches: ViewPatches,
    T_scene_view: "geometry.Transform3D",
    cameras,
    view_mask: torch.Tensor,
    xyz: torch.Tensor,
    *,
    top_k: int,
    depth_min_max: tuple[float, float] = (1.0, 32.0),
    max_view_distance: float | None = None,
    use_variance: bool = True,
    add_minmax: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`lift_views_to_points` on prepared `view_patches` (prepared once, reused over chunks).

    top_k: number of nearest visible views kept per point; max_view_distance: points whose
    nearest observing view is farther (metres) are invalid.
    """
    p2d, visible, depth, distance = project_to_views(xyz, T_scene_view, cameras, view_mask)
    k = min(top_k, patches.shape[1])
    dist = distance.masked_fill(~visible, float("inf"))
    d_k, idx = torch.topk(dist, k, dim=1, largest=False)  # B,K,N
    vis_k = torch.isfinite(d_k)
    p_k = torch.gather(p2d, 1, idx[..., None].expand(-1, -1, -1, 2))
    depth_k = torch.gather(depth, 1, idx)
    feats, scores = sample_patches(patches, p_k, idx, vis_k, depth_k, depth_min_max)
    stats, valid = pool_observations(feats, vis_k, scores, use_variance, add_minmax)
    if max_view_distance is not None:
        valid = valid & (d_k[:, 0] <= max_view_distance)
        stats = stats.masked_fill(~valid[..., None], 0)
    return stats, valid


def pooled_dim(feature_dim: int, use_variance: bool, add_minmax: bool, with_scores: bool) -> int:
    return feature_dim * (1 + use_variance + 2 * add_minmax) + with_scores


def mlp(dims: list[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last), as SNAP's `layers.MLP`."""
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class StreetViewEncoder(nn.Module):
    """Multi-view images -> 3D feature volume (SNAP `StreetViewEncoder`, weighted fusion).

    forward(images (B, V, 3, H, W), T_scene_view (B, V, 4, 4), cameras (B, V, 8), view_mask (B, V),
    xyz (B, X, Y, Z, 3), camera_model="pinhole") -> (volume (B, D, X, Y, Z), valid (B, X, Y, Z)),
    D = cfg.feature_dim. The volume is computed in chunks of z-slices (each optionally
    checkpointed while training) so that the paper grid (120x160x60) fits in CPU memory.
    """

    def __init__(self, cfg: ModelConfig, chunk_bytes: int = 256 * 2**20, checkpoint_bytes: int = 2 * 2**30):
        super().__init__()
        self.cfg = cfg
        self.image_encoder = ImageEncoder(cfg.image_encoder)
        D, S = cfg.feature_dim, cfg.num_depth_bins
        # One linear layer gives both the fusion features and the depth scores (input activation).
        self.proj = nn.Sequential(nn.ReLU(), nn.Conv2d(cfg.image_encoder.out_dim, D + S, 1))
        P = pooled_dim(D, True, cfg.fusion_minmax, True)
        self.fusion = mlp([P, 2 * D, D])
        # Bound on the temporaries of one chunk of z-slices, and the estimated activation memory of
        # a whole volume above which chunks are recomputed in backward (`torch.utils.checkpoint`)
        # instead of stored: 0 = always recompute, which costs one more forward of the lifting.
        self.chunk_bytes = chunk_bytes
        self.checkpoint_bytes = checkpoint_bytes

    def encode_images(
        self, images: torch.Tensor, view_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, V, 3, H, W) -> features (B, V, D, h, w), depth scores (B, V, S, h, w).

        Padding views (view_mask False) are not encoded; their maps are zeros.
        """
        B, V = images.shape[:2]
        real = self.proj(self.image_encoder(images[view_mask]))
        out = real.new_zeros((B, V, *real.shape[1:]))
        out = out.masked_scatter(view_mask[:, :, None, None, None], real) if real.numel() else out
        D = self.cfg.feature_dim
        return out[:, :, :D], out[:, :, D:]

    def forward(
        self,
        images: torch.Tensor,
        T_scene_view: torch.Tensor,
        cameras: torch.Tensor,
        view_mask: torch.Tensor,
        xyz: torch.Tensor,
        camera_model: str = "pinhole",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if images.ndim != 5 or images.shape[2] != 3:
            raise ValueError(f"street-view images must be (B, V, 3, H, W), got {tuple(images.shape)}")
        if xyz.ndim != 5 or xyz.shape[-1] != 3:
            raise ValueError(f"voxel centres must be (B, X, Y, Z, 3), got {tuple(xyz.shape)}")
        if not bool(view_mask.any()):
            raise ValueError("street-view encoder: no valid view in the batch (view_mask all False)")
        maps, scores = self.encode_images(images, view_mask)
        stride = self.image_encoder.stride
        # Geometry stays in float32 (also under autocast): pixel coordinates need the precision.
        cams = geometry.camera_from_tensor(cameras.float(), camera_model).scale(1.0 / stride)
        T = geometry.Transform3D.from_matrix(T_scene_view.float())
        return self.lift(maps, scores, T, cams, view_mask, xyz)

    def lift(
        self, maps, scores, T_scene_view, cameras, view_mask, xyz: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunked `lift_views_to_points` + fusion MLP over a (B, X, Y, Z, 3) voxel grid. `maps` may be
        `ViewPatches` prepared by the caller (`scores` is then ignored)."""
        B, X, Y, Z, _ = xyz.shape
        cfg = self.cfg
        patches = maps if isinstance(maps, ViewPatches) else view_patches(maps, scores)
        k = min(cfg.top_k_views, patches.shape[1])
        C, D = patches.feats.shape[1], cfg.feature_dim
        per_slice = B * X * Y * k * (10 * C + 16) * 4  # bytes: gathered rows + temporaries
        zc = max(1, min(Z, self.chunk_bytes // max(per_slice, 1)))
        # Stored for backward: ~6 (B, K, N, C) tensors + indices per observation, the MLP per voxel.
        saved = B * X * Y * Z * (k * (6 * C + 12) + 2 * C + 4 * D) * 4
        use_checkpoint = torch.is_grad_enabled() and self.training and saved > self.checkpoint_bytes

        def run(xyz_chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            pts = xyz_chunk.reshape(B, -1, 3)
            stats, valid = lift_patches_to_points(
                patches, T_scene_view, cameras, view_mask, pts,
                top_k=cfg.top_k_views,
                depth_min_max=(cfg.min_depth_m, cfg.max_depth_m),
                max_view_distance=cfg.max_view_distance_m,
                add_minmax=cfg.fusion_minmax,
            )
            f = self.fusion(stats)
            f = f.masked_fill(~valid[..., None], 0)
            return f, valid

        feats, valids = [], []
        for z0 in range(0, Z, zc):
            chunk = xyz[:, :, :, z0 : z0 + zc]
            if use_checkpoint:
                f, v = checkpoint(run, chunk, use_reentrant=False)
            else:
                f, v = run(chunk)
            n = chunk.shape[3]
            feats.append(f.reshape(B, X, Y, n, -1))
            valids.append(v.reshape(B, X, Y, n))
        volume = torch.cat(feats, 3).permute(0, 4, 1, 2, 3)  # B,D,X,Y,Z
        return volume, torch.cat(valids, 3)
