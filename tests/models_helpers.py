"""Tiny SNAP configs and synthetic batches for the model tests (not a test module)."""

from __future__ import annotations

import math

import torch

from neuralmaps import geometry
from neuralmaps.config import CLASS_NAMES, EncoderConfig, preset


def tiny_config(norm: str = "batch", pooling: str = "max"):
    """A SNAP config small enough for a forward + backward in about a second on one core."""
    cfg = preset("cpu-tiny")
    cfg.scene.size_m = (8.0, 8.0, 4.0)
    cfg.scene.cell_m = 0.5
    cfg.scene.image_hw = (32, 64)
    cfg.scene.num_views = 3
    cfg.scene.query_depth_m = 6.0
    enc = dict(depth=18, width=8, norm=norm, num_levels=2, out_dim=16)
    m = cfg.model
    m.image_encoder = EncoderConfig(**enc)
    m.aerial_encoder = EncoderConfig(**enc)
    m.semantic_encoder = EncoderConfig(**(enc | {"norm": "group"}))
    m.feature_dim, m.matching_dim, m.num_depth_bins = 16, 8, 8
    m.semantic_dim = 16
    m.pooling = pooling
    m.num_pose_samples, m.num_pose_retries, m.train_pose_samples = 256, 1, None
    return cfg


def tiny_batch(cfg, B: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A SceneDataset-like batch: views on the south edge looking north, a query inside."""
    g = torch.Generator().manual_seed(seed)
    V, (H, W) = cfg.scene.num_views, cfg.scene.image_hw
    sx, sy, _ = cfg.scene.size_m
    X, Y = round(sx / cfg.scene.cell_m), round(sy / cfg.scene.cell_m)
    f = 0.5 * W / math.tan(math.radians(cfg.scene.hfov_deg) / 2)
    cam = torch.tensor([W, H, f, f, W / 2, H / 2, 0.0, 0.0])
    Ts = []
    for b in range(B):
        for v in range(V):
            xy = torch.tensor([sx * (v + 0.5) / V, 0.5 + 0.5 * b])
            yaw = torch.tensor(math.radians(90.0 + 20 * (v - 1)))
            Ts.append(geometry.bev_pose_to_camera(geometry.Transform2D(yaw, xy), 2.0, pitch=-0.1).matrix())
    T_views = torch.stack(Ts).reshape(B, V, 4, 4)
    q_yaw = torch.rand(B, generator=g) * 2 * math.pi
    q_xy = torch.tensor([sx / 2, sy / 2]) + (torch.rand(B, 2, generator=g) - 0.5) * 2
    T_query = geometry.bev_pose_to_camera(geometry.Transform2D(q_yaw, q_xy), 1.6, pitch=0.05).matrix()
    mask = torch.ones(B, V, dtype=torch.bool)
    mask[-1, -1] = False  # one padding view
    images = torch.rand(B, V, 3, H, W, generator=g) * mask[:, :, None, None, None]
    return {
        "map_images": images,
        "map_T_scene_view": T_views,
        "map_cameras": cam.expand(B, V, 8).clone(),
        "map_view_mask": mask,
        "aerial": torch.rand(B, 3, X, Y, generator=g),
        "semantic": (torch.rand(B, len(CLASS_NAMES), X, Y, generator=g) > 0.7).float(),
        "query_image": torch.rand(B, 3, H, W, generator=g),
        "query_T_scene_cam": T_query,
        "query_camera": cam.expand(B, 8).clone(),
        "scene_origin": torch.zeros(B, 2, dtype=torch.float64),
    }
