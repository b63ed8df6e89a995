"""Street-view lifting: features rendered from a known 3D scene must come back at the surfaces."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neuralmaps import geometry
from neuralmaps.models.streetview import lift_views_to_points, sample_patches, view_patches, voxel_centers

CELL = 0.25
SCENE = (10.0, 10.0, 3.0)
BOX_LO = np.array([4.125, 4.125, -1.0])  # faces on voxel-centre planes
BOX_HI = np.array([5.625, 6.125, 1.75])
NUM_BINS, DMIN, DMAX = 32, 1.0, 32.0
H, W = 120, 160


def world_features(p: np.ndarray) -> np.ndarray:
    """Smooth feature field f(x, y, z) (..., 3) -> (..., 3)."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    return np.stack([np.sin(0.7 * x + 0.2), np.cos(0.5 * y) + 0.3 * z, np.sin(0.3 * x + 0.4 * y - 0.6 * z)], -1)


def make_views(model: str):
    poses = [((2.0, 0.5), 80.0), ((6.0, 0.5), 100.0), ((9.5, 6.0), 180.0), ((0.5, 8.0), -20.0)]
    Ts = [
        geometry.bev_pose_to_camera(
            geometry.Transform2D(torch.tensor(math.radians(yaw), dtype=torch.float64),
                                 torch.tensor(xy, dtype=torch.float64)),
            1.5, pitch=-0.35,
        )
        for xy, yaw in poses
    ]
    T = geometry.Transform3D.stack(Ts)
    if model == "pinhole":
        cam = geometry.PinholeCamera.from_fov(W, H, 70.0, dtype=torch.float64)
    else:
        cam = geometry.FisheyeCamera.from_fov(W, H, 75.0, k1=-0.05, dtype=torch.float64)
    cams = geometry.Camera.stack([cam] * len(poses))
    return T, cams


def render(T: geometry.Transform3D, cams) -> tuple[np.ndarray, np.ndarray]:
    """Ray-cast ground plane z=0 + box: features (V, 3, H, W) and optical-axis depth (V, H, W)."""
    V = T.shape[0]
    u, v = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    pix = torch.from_numpy(np.stack([u, v], -1).reshape(1, -1, 2)).expand(V, -1, -1)
    rays_cam = cams.unproject(pix).numpy()  # V,N,3
    R, o = T.R.numpy(), T.t.numpy()
    d = np.einsum("vij,vnj->vni", R, rays_cam)
    o = o[:, None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        t_ground = np.where(d[..., 2] < -1e-9, -o[..., 2] / d[..., 2], np.inf)
        t1, t2 = (BOX_LO - o) / d, (BOX_HI - o) / d
        tmin = np.nanmax(np.minimum(t1, t2), -1)
        tmax = np.nanmin(np.maximum(t1, t2), -1)
    t_box = np.where((tmax >= tmin) & (tmin > 0), tmin, np.inf)
    t = np.minimum(t_ground, t_box)
    hit = np.isfinite(t)
    pts = o + np.where(hit, t, 0)[..., None] * d
    feats = np.where(hit[..., None], world_features(pts), 0.0)
    depth = np.where(hit, t * rays_cam[..., 2], np.inf)
    return feats.reshape(V, H, W, 3).transpose(0, 3, 1, 2), depth.reshape(V, H, W)


def depth_scores(depth: np.ndarray, alpha: float = 4.0) -> np.ndarray:
    """Scores peaked at the true log-depth bin: -alpha (b - b*)^2, (V, S, H, W)."""
    b_true = (NUM_BINS - 1) * np.log(np.clip(depth, DMIN, 1e6) / DMIN) / math.log(DMAX / DMIN)
    b = np.arange(NUM_BINS)[None, :, None, None]
    return -alpha * (b - b_true[:, None]) ** 2


def expected_clean(xyz: np.ndarray, T, cams, depth: np.ndarray):
    """Voxels seen without ambiguity: every view whose frustum holds the voxel either sees its
    surface (the 4 bilinear neighbours' depths within 2%) or is clearly occluded (< 0.85x: its score is >= 8 lower).
    Returns (in_some_frustum (N,), clean (N,))."""
    V = T.shape[0]
    p = torch.from_numpy(xyz)[None].expand(V, -1, -1)
    p_cam = T.inv().transform(p)
    p2d, vis = cams.project(p_cam)
    p2d, vis, z = p2d.numpy(), vis.numpy(), p_cam[..., 2].numpy()
    lo = np.clip(np.floor(p2d - 0.5), 0, [W - 1, H - 1]).astype(int)
    hi = np.minimum(lo + 1, [W - 1, H - 1])
    sees = np.zeros_like(vis)
    ambiguous = np.zeros_like(vis)
    for v in range(V):
        ds = np.stack([depth[v, y, x] for x in (lo[v, :, 0], hi[v, :, 0]) for y in (lo[v, :, 1], hi[v, :, 1])], -1)
        ok = np.all(np.abs(ds - z[v, :, None]) < 0.02 * z[v, :, None], -1)
        occ = np.all(ds < 0.85 * z[v, :, None], -1)
        sees[v] = vis[v] & ok & (z[v] > 1.1 * DMIN)
        ambiguous[v] = vis[v] & ~ok & ~occ
    return vis.any(0), sees.any(0) & ~ambiguous.any(0)


@pytest.mark.parametrize("model", ["pinhole", "fisheye"])
def test_lifted_features_match_surfaces(model):
    T, cams = make_views(model)
    feats, depth = render(T, cams)
    axes = [(torch.arange(round(e / CELL)) + 0.5) * CELL for e in SCENE[:2]]
    xy = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
    xyz = voxel_centers(xy.double(), torch.tensor([-CELL / 2], dtype=torch.float64), SCENE[2], CELL)[0]
    xyz = xyz.reshape(-1, 3)

    fov_kwargs = {"max_fov_deg": cams.max_fov_deg[None].float()} if model == "fisheye" else {}
    stats, valid = lift_views_to_points(
        torch.from_numpy(feats)[None].float(),
        torch.from_numpy(depth_scores(depth))[None].float(),
        T.float()[None],
        geometry.camera_from_tensor(cams.to_tensor()[None].float(), model, **fov_kwargs),
        torch.ones(1, T.shape[0], dtype=torch.bool),
        xyz[None].float(),
        top_k=T.shape[0],
        depth_min_max=(DMIN, DMAX),
    )
    stats, valid = stats[0].numpy(), valid[0].numpy()
    assert stats.shape == (len(xyz), 3 * 2 + 1)  # mean, variance, max score

    pts = xyz.numpy()
    in_frustum, clean = expected_clean(pts, T, cams, depth)
    np.testing.assert_array_equal(valid, in_frustum)  # unseen voxels are invalid, seen ones valid
    assert (~valid).sum() > 100 and valid.sum() > 1000
    assert np.all(stats[~valid] == 0)

    on_ground = np.isclose(pts[:, 2], 0.0) & ~np.all((pts >= BOX_LO) & (pts <= BOX_HI), -1)
    on_box = np.all((pts >= BOX_LO - 1e-6) & (pts <= BOX_HI + 1e-6), -1) & (
        np.isclose(pts[:, :2], BOX_LO[:2]).any(-1) | np.isclose(pts[:, :2], BOX_HI[:2]).any(-1)
        | np.isclose(pts[:, 2], BOX_HI[2])
    )
    # Tolerance: bilinear sampling across a box edge mixes two faces (f has a kink there).
    for surface, min_count, tol in ((on_ground, 150, 0.02), (on_box, 20, 0.05)):
        sel = surface & clean
        assert sel.sum() >= min_count, (model, sel.sum())
        err = np.abs(stats[sel, :3] - world_features(pts[sel]))
        assert err.max() < tol, (model, err.max())
        assert stats[sel, 3:6].max() < 0.01  # views agree: low variance

    # Free-space voxels in view take the features of whatever surface the rays hit: not f there.
    air = valid & (pts[:, 2] > 2.5)
    assert np.abs(stats[air, :3] - world_features(pts[air])).mean() > 0.1


def test_sampling_is_bilinear_in_pixels_and_linear_in_log_depth():
    B, V, h, w = 1, 2, 5, 7
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    maps = torch.stack([xx, yy], 0).expand(B, V, 2, h, w) * torch.tensor([1.0, 10.0])[:, None, None]
    scores = torch.arange(NUM_BINS, dtype=torch.float32)[:, None, None].expand(B, V, NUM_BINS, h, w)
    patches = view_patches(maps, scores)
    p2d = torch.tensor([[[[2.25, 3.75], [0.1, 0.2]], [[6.5, 4.5], [3.0, 1.0]]]])  # B,K=2,N=2,2
    view_idx = torch.tensor([[[0, 1], [1, 0]]])
    valid = torch.tensor([[[True, True], [True, False]]])
    depth = torch.tensor([[[DMIN, math.sqrt(DMIN * DMAX)], [100.0, 5.0]]])
    feats, sc = sample_patches(patches, p2d, view_idx, valid, depth, (DMIN, DMAX))
    # A linear image is reproduced exactly inside; points beyond a border pixel centre clamp to it.
    expected = torch.tensor([[[[2.25, 37.5], [0.5, 5.0]], [[6.5, 45.0], [0.0, 0.0]]]])
    torch.testing.assert_close(feats, expected)
    # score = bin index: the first bin at DMIN, the middle of the log range halfway, clamped beyond.
    torch.testing.assert_close(sc, torch.tensor([[[0.0, (NUM_BINS - 1) / 2], [NUM_BINS - 1.0, 0.0]]]))


def test_chunked_and_checkpointed_lifting_matches_one_pass():
    """Chunking over z-slices and recomputing chunks in backward must not change the result."""
    from models_helpers import tiny_batch, tiny_config

    from neuralmaps.models import SNAP

    cfg = tiny_config()
    torch.manual_seed(0)
    model = SNAP(cfg).train()
    sv = model.mapper.streetview
    batch = tiny_batch(cfg)
    xyz = voxel_centers(model.mapper.map_xy, torch.zeros(2), cfg.scene.size_m[2], cfg.scene.cell_m)
    args = (batch["map_images"], batch["map_T_scene_view"], batch["map_cameras"], batch["map_view_mask"], xyz)
    results = []
    for chunk_bytes, checkpoint_bytes in ((2**40, 2**40), (1, 0)):  # one pass; one slice per chunk, recomputed
        sv.chunk_bytes, sv.checkpoint_bytes = chunk_bytes, checkpoint_bytes
        model.zero_grad()
        torch.manual_seed(1)
        vol, valid = sv(*args)
        (vol * torch.linspace(-1, 1, vol.shape[-1])).sum().backward()
        results.append((vol.detach(), valid, [p.grad.clone() for p in sv.parameters()]))
    (v1, m1, g1), (v2, m2, g2) = results
    assert torch.equal(m1, m2) and m1.any() and not m1.all()
    torch.testing.assert_close(v1, v2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)  # summation order differs
