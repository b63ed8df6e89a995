"""SNAP fidelity (google-research/snap): temperature, pose scores, RANSAC proposals, refinement
reach, and a semantic stage that never sees its own labels."""

from __future__ import annotations

import math

import pytest
import torch

from models_helpers import tiny_batch, tiny_config
from neuralmaps.config import ModelConfig
from neuralmaps.geometry import Transform2D
from neuralmaps.models import SNAP
from neuralmaps.models.localizer import Localizer
from neuralmaps.testing import make_exact_recovery_problem, pose_errors

torch.set_num_threads(1)


def test_temperature_starts_at_e_squared():
    # SNAP multiplies point scores by exp(temperature), the parameter initialised at 2.0.
    loc = Localizer(ModelConfig())
    assert loc.temperature.item() == pytest.approx(math.exp(2.0), rel=1e-6)
    f = torch.nn.functional.normalize(torch.randn(1, 3, 4), dim=-1)
    m = torch.nn.functional.normalize(torch.randn(1, 4, 5, 6), dim=1)
    ref = torch.einsum("bnd,bdxy->bnxy", f, m).relu() * math.exp(2.0)
    assert torch.allclose(loc._relu_sims(f, m), ref, atol=1e-5)


def test_pose_score_is_the_mean_over_valid_points_clamped_at_the_edge():
    loc = Localizer(ModelConfig())
    g = torch.Generator().manual_seed(0)
    X, Y = 6, 5
    r = torch.rand(1, 3, X, Y, generator=g)
    p = torch.tensor([[[1.5, 1.5], [2.5, 3.5], [0.5, 0.5]]])  # metres, cell 1 m: cell centres
    w = torch.tensor([[1.0, 1.0, 0.0]])  # the third point is not a valid query cell
    # Identity pose: the mean of the two valid points' values at their cells.
    s = loc._score_maps(r, p, w, torch.zeros(1, 1), torch.zeros(1, 1, 2), 1.0)
    assert s.item() == pytest.approx(((r[0, 0, 1, 1] + r[0, 1, 2, 3]) / 2).item(), abs=1e-6)
    # Shifted 10 m east: both points fall off the map and take the value of the nearest edge cell.
    s = loc._score_maps(r, p, w, torch.zeros(1, 1), torch.tensor([[[10.0, 0.0]]]), 1.0)
    assert s.item() == pytest.approx(((r[0, 0, X - 1, 1] + r[0, 1, X - 1, 3]) / 2).item(), abs=1e-6)


def test_ransac_proposes_matches_outside_the_top_local_maxima():
    # Each point's true cell scores just below 20 decoy peaks: a sampler restricted to the top-k
    # local maxima never proposes it; SNAP's full softmax does, and the true pose is sampled.
    loc = Localizer(ModelConfig(num_pose_samples=8000, num_pose_retries=4))
    X = Y = 40
    g = torch.Generator().manual_seed(3)
    p = torch.tensor([[[2.5, 0.5], [10.5, 4.5]]])
    T = Transform2D(torch.tensor([math.pi / 2]), torch.tensor([[17.0, 12.0]]))
    true = T.transform(p)[0]  # map metres of the true matches (cell centres)
    r = torch.zeros(1, 2, X, Y)
    for n in range(2):
        decoys = torch.randint(0, X, (20, 2), generator=g)
        r[0, n, decoys[:, 0], decoys[:, 1]] = 5.0
        i, j = (true[n] - 0.5).round().long().tolist()
        r[0, n, i, j] = 4.9
    valid = torch.ones(1, X, Y, dtype=torch.bool)
    angle, t = loc._sample_poses(r, valid, p, torch.ones(1, 2), 1.0, None, torch.Generator().manual_seed(0))
    err_t = (t[0] - T.t[0]).norm(dim=-1)
    err_r = (angle[0] - T.angle[0] + math.pi).remainder(2 * math.pi) - math.pi
    hits = ((err_t < 0.75) & (err_r.abs() < math.radians(3))).sum().item()
    # P(true cell | point) = e^4.9 / (20 e^5 + e^4.9 + 1579) ~ 0.029; a pair of true matches:
    # 2 (0.029 / 2)^2 ~ 4.2e-4 per draw, so ~13 of 8000 x 4 retries (a top-k sampler: 0).
    assert hits >= 5, hits
    # cpu-tiny's deviation (`proposals="local_maxima"`, top 8) cannot propose it: the price of
    # its far faster training (docs/results.md); "mixed" keeps half of SNAP's draws.
    for proposals, expected in (("local_maxima", 0), ("mixed", 1)):
        loc.proposals = proposals
        angle, t = loc._sample_poses(r, valid, p, torch.ones(1, 2), 1.0, None, torch.Generator().manual_seed(0))
        err_t = (t[0] - T.t[0]).norm(dim=-1)
        err_r = (angle[0] - T.angle[0] + math.pi).remainder(2 * math.pi) - math.pi
        n = ((err_t < 0.75) & (err_r.abs() < math.radians(3))).sum().item()
        assert (n == 0) if expected == 0 else (n >= 1), (proposals, n)


def test_local_maxima_proposals_find_the_true_pose_among_distinct_peaks():
    # Each point's true cell is its best local maximum, 7 weaker decoys around: the local-maxima
    # sampler draws the true match with probability softmax over 8 peaks, so many hypotheses hit.
    loc = Localizer(ModelConfig(num_pose_samples=512, num_pose_retries=2, proposals="local_maxima"))
    X = Y = 40
    g = torch.Generator().manual_seed(4)
    p = torch.tensor([[[2.5, 0.5], [10.5, 4.5], [6.5, -3.5]]])
    T = Transform2D(torch.tensor([0.7]), torch.tensor([[15.0, 18.0]]))
    true = T.transform(p)[0]
    r = torch.zeros(1, 3, X, Y)
    for n in range(3):
        decoys = torch.randint(2, X - 2, (7, 2), generator=g)
        r[0, n, decoys[:, 0], decoys[:, 1]] = 4.0
        i, j = (true[n] - 0.5).round().long().tolist()
        r[0, n, i, j] = 5.0
    valid = torch.ones(1, X, Y, dtype=torch.bool)
    angle, t = loc._sample_poses(r, valid, p, torch.ones(1, 3), 1.0, None, torch.Generator().manual_seed(0))
    assert angle.shape == (1, 512)
    err_t = (t[0] - T.t[0]).norm(dim=-1)
    err_r = (angle[0] - T.angle[0] + math.pi).remainder(2 * math.pi) - math.pi
    hits = ((err_t < 1.0) & (err_r.abs() < math.radians(8))).sum().item()
    # P(true | point) = e^5 / (e^5 + 7 e^4) ~ 0.28; a pair of true matches ~0.078 per draw, better
    # with 2 retries (ratio test): ~40-80 of 512.
    assert hits >= 25, hits  # measured 50 (seeds 0-4: 40-50)


def test_log_ratio_scores_are_zero_for_uninformative_matches_and_off_the_map():
    from neuralmaps.models.localizer import _log_ratio

    loc = Localizer(ModelConfig(point_scores="log_ratio", score_reduction="sum"))
    g = torch.Generator().manual_seed(0)
    X, Y = 6, 5
    r = torch.rand(1, 3, X, Y, generator=g) * 4
    valid = torch.ones(1, X, Y, dtype=torch.bool)
    valid[0, 0] = False
    ell = _log_ratio(r * valid[:, None], valid)
    # A log-likelihood ratio against a uniform match: mean of exp over valid cells is 1, 0 on invalid.
    assert torch.allclose(ell.exp()[..., valid[0]].mean(-1), torch.ones(1, 3), atol=1e-5)
    assert (ell[..., 0, :] == 0).all()
    flat = torch.zeros(1, 1, X, Y)  # the same score everywhere: no information, 0 everywhere
    assert _log_ratio(flat, torch.ones(1, X, Y, dtype=torch.bool)).abs().max() < 1e-6
    p = torch.tensor([[[1.5, 1.5], [2.5, 3.5], [0.5, 0.5]]])
    w = torch.tensor([[1.0, 1.0, 0.0]])
    s = loc._score_maps(ell, p, w, torch.zeros(1, 1), torch.zeros(1, 1, 2), 1.0)
    assert s.item() == pytest.approx((ell[0, 0, 1, 1] + ell[0, 1, 2, 3]).item(), abs=1e-5)
    # Pushed off the map, points count 0 (not the edge value, as SNAP's raw scores do).
    s = loc._score_maps(ell, p, w, torch.zeros(1, 1), torch.tensor([[[10.0, 0.0]]]), 1.0)
    assert s.item() == 0.0


def test_refinement_reaches_four_metres_and_five_degrees():
    # From a pose 3 m and 4 degrees off, eval-mode refinement (SNAP: ±4 m, ±5°) finds the truth.
    pb = make_exact_recovery_problem(4, 8, 64, 32, cell_m=0.5, generator=torch.Generator().manual_seed(1))
    loc = Localizer(ModelConfig()).eval()
    with torch.no_grad():
        f, p, w = loc._sample_points(pb.query_feats, pb.query_valid, pb.query_xy, torch.Generator().manual_seed(0))
        m = torch.nn.functional.normalize(pb.map_feats, dim=1)
        r = loc._relu_sims(f, m)
        score_fn = lambda a, t: loc._score_maps(r, p, w, a, t, pb.cell_m)  # noqa: E731
        centre = (p * w[..., None]).sum(1) / w.sum(1, keepdim=True)
        a0 = pb.T_gt.angle[:, None] + math.radians(4.0)
        t0 = pb.T_gt.t[:, None] + torch.tensor([2.1, -2.1])  # 2.97 m
        aw, tw = loc._wide_search(score_fn, a0, t0, centre, pb.cell_m, None)
        a, t, _ = loc._refine(score_fn, aw, tw, centre, pb.cell_m / 2, math.radians(0.5), pb.cell_m, None)
        dr, dt = pose_errors(Transform2D(a[:, 0], t[:, 0]), pb.T_gt, pb.cell_m)
    assert (dt < 0.3).all() and (dr < 0.5).all(), (dt, dr)  # measured: <= 0.14 cells, <= 0.25 deg


def _hooked_model(dropout: float) -> tuple[SNAP, dict]:
    cfg = tiny_config(norm="group")
    cfg.model.modality_dropout = dropout
    torch.manual_seed(0)
    model = SNAP(cfg).train()
    return model, tiny_batch(cfg)


def test_semantic_stage_never_reads_the_semantic_raster():
    # The semantic raster is the target of the semantic stage: if its encoder runs while the
    # decoded map is built, labels can flow into the prediction.
    model, batch = _hooked_model(0.0)
    calls = []
    model.mapper.semantic.register_forward_hook(lambda *a: calls.append(1))
    out = model.semantic_loss(batch)
    assert not calls, "the semantic raster was encoded into the map that the semantic net decodes"
    # And the map it decodes is the street view + aerial one, whatever the raster holds.
    batch2 = dict(batch, semantic=1.0 - batch["semantic"])
    logits = lambda b: model.semantic_net(*_map(model, b))  # noqa: E731
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(_flat(logits(batch)), _flat(logits(batch2))))
    assert torch.isfinite(out["total"])
    with pytest.raises(ValueError, match="target"):
        model.semantic_loss(batch, modalities=("streetview", "semantic"))


def _map(model, batch):
    nm = model.map(batch, modalities=("streetview", "aerial"), dropout=0.0)
    return nm.features, nm.valid


def _flat(x):
    return list(x.values()) if isinstance(x, dict) else [x]


def test_semantic_stage_map_is_deterministic_in_train_mode():
    # Modality dropout must not fire in the frozen map of the semantic stage.
    model, batch = _hooked_model(0.9)
    torch.manual_seed(1)
    a = model.semantic_loss(batch)["total"].item()
    b = model.semantic_loss(batch)["total"].item()
    assert a == b


def test_softmax_matches_follow_snaps_joint_distribution():
    # SNAP draws (point, cell) from softmax_x(r_n)(x) / N over valid points. The sampler draws only
    # the drawn points' rows; its frequencies must still match that joint law, with a per-point
    # allowed mask (a prior's reach), an invalid point, and a point with no allowed cell.
    loc = Localizer(ModelConfig())
    g = torch.Generator().manual_seed(5)
    B, N, X, Y = 2, 4, 3, 5
    r = torch.rand(B, N, X, Y, generator=g) * 3
    allowed = torch.rand(B, N, X, Y, generator=g) > 0.3
    allowed[1, 2] = False  # item 1, point 2: nothing reachable, never drawn
    w = torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])  # item 0, point 2: invalid
    count = 200_000
    n, cell = loc._matches_softmax(r, allowed, w, count, torch.Generator().manual_seed(0))
    assert n.shape == cell.shape == (B, count)
    for b in range(B):
        prob = torch.softmax(r[b].reshape(N, -1).masked_fill(~allowed[b].reshape(N, -1), -torch.inf), -1)
        keep = (w[b] > 0) & allowed[b].reshape(N, -1).any(-1)
        joint = (prob.nan_to_num(0.0) * keep[:, None] / keep.sum()).reshape(-1)
        freq = torch.bincount(n[b] * X * Y + cell[b], minlength=N * X * Y).double() / count
        assert freq[joint == 0].sum() == 0  # never a masked cell, an invalid point or an empty one
        sd = (joint * (1 - joint) / count).sqrt()
        assert ((freq - joint).abs() <= 5 * sd + 1e-9).all(), (freq - joint).abs().max()
