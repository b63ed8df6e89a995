"""SNAP localizer: point-to-map scores, RANSAC pose sampling and exhaustive (coarse-to-fine) voting.

A port of google-research/snap `bev_localizer.py`, `pose_estimation.py` and
`pose_exhaustive_voting.py`, made fast on CPU.

Frames and units (docs/architecture.md):
- query BEV frame: metres, x forward, y left, origin at the camera;
- map frame: metres from the map grid's south-west corner, x east, y north;
- a pose `T_map_query` maps query-frame points to map-frame points: p_map = R(angle) p_q + t,
  angle in radians counter-clockwise from +x;
- model grids `(B, C, X, Y)`: cell (i, j) has its centre at ((i+0.5)·cell, (j+0.5)·cell) metres,
  continuous grid coordinates are `xy / cell` (`neuralmaps.grids`).

Scores. N valid query cells (`num_points`: all valid frustum cells by default, as SNAP; in training
`train_points` when set, a cost knob) with
L2-normalised features f_n at query-frame points p_n; m(x) the L2-normalised map features:

    r_n(x) = tau · ReLU(f_n · m(x))                              tau = exp(log_temperature)
    score(T) = (1/N) sum_n r_n(T p_n)                            bilinear, clamped to the map edge

(`score_reduction="sum"` drops the 1/N: SNAP's score at N times the temperature; cpu-tiny uses it.
`similarity="linear"` drops the ReLU, so that a map whose features all point away from the
query's still gets a gradient; cpu-tiny uses it.
`point_scores="log_ratio"` replaces r_n by the per-point log-likelihood ratio l_n below, 0 off the
map; cpu-tiny uses it.)

(SNAP's `pose_scoring` with `mask_score_out_of_bounds=False`: a point pushed off the map takes the
value of the nearest edge cell; invalid map cells have zero features, so r_n = 0 there.)

RANSAC (SNAP): (point, cell) matches are drawn from the joint distribution softmax_x(r_n)(x) / N
over every valid point and every map cell (`proposals="softmax"`; "local_maxima" draws a point
uniformly, then one of its `num_matches` best 3x3 local maxima; "mixed" half and half); pairs of matches give 2-point Kabsch poses; of
`num_pose_retries` pairs the one with the best length ratio ||p1-p2|| / ||m1-m2|| is kept;
`num_pose_samples` poses (in training `train_pose_samples` when set) are scored with `score`, the
best `num_candidates` refined. Loss: the NLL
of T_gt among the samples, -(score(T_gt) - logsumexp(score(T_gt), score(samples))).

Refinement: in eval mode the best `keep_candidates` poses are first searched exhaustively over
±`refine_range_m`, ±`refine_range_deg` (SNAP: ±4 m, ±5° at evaluation) at steps of one cell and
1°, then every candidate goes through iterative 5x5x5 local grids whose steps halve down to
`final_step_cells` / `final_step_deg`.

Voting uses log-likelihood ratios against a uniform match instead of r_n,
    l_n(x) = log_softmax_x(r_n)(x) + log(#valid map cells),
which are 0 for an uninformative match, so that poses over unobserved map cells or off the map
are neither rewarded nor penalised (large maps with holes).

Voting (exhaustive, coarse-to-fine): with stride s = ceil(max(X, Y) / coarse_cells), the per-point
maps r_n of `num_coarse_points` points are max-pooled over windows 2s wide around each coarse
cell (so the true pose's coarse cell cannot lose its matches to discretisation), turned into
log-ratios over the coarse cells, and every (rotation 2πk/R, coarse cell) pose is scored by
summing them at the rotated points, rotating about the query centroid. The volume's best local
maxima are refined at full resolution on local grids (angles between the R rotations included)
with `score` on all N points, computed from bilinearly interpolated (re-normalised) features, the
per-point normaliser estimated on up to 4096 valid map cells, so voting and RANSAC scores are
comparable up to that estimate and to where the ReLU is taken. `prob_volume` is the softmax of the
coarse volume, re-indexed by camera cell (B, R, X, Y); the loss is the NLL of T_gt in it
(trilinear, periodic in angle). At s = 1 (maps up to `coarse_cells` cells) the volume is at cell
resolution.

Beyond SNAP: optional sparse query points, a coarse exhaustive grid followed by iterative 5x5x5
local grids instead of one 41x41x41 grid, the pose prior, and voting over point score maps rather
than dense template correlation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from ..geometry import Transform2D
from ..grids import interpolate_nd

__all__ = [
    "PosePrior", "LocalizerOutput", "Localizer", "kabsch_2d", "pose_volume_index",
]


@dataclass
class PosePrior:
    """Optional search limits, in the map frame."""

    xy: Tensor  # (B, 2) metres from the map grid's SW corner
    radius_m: float | Tensor  # scalar or (B,)
    yaw: Tensor | None = None  # (B,) radians CCW from +x
    yaw_range: float | None = None  # ± radians around `yaw`
    # Standard deviation (m) of an isotropic Gaussian position prior around `xy` (a GPS fix's
    # accuracy), scalar or (B,): its log density is added to every pose score (a posterior, not a
    # likelihood); None: uniform within `radius_m`.
    sigma_m: float | Tensor | None = None


@dataclass
class LocalizerOutput:
    T_map_query: Transform2D  # (B,) best pose: maps query-BEV-frame metres to map-frame metres
    score: Tensor  # (B,) log-score of the best pose
    topk: Transform2D  # (B, K) best poses, best first
    topk_scores: Tensor  # (B, K)
    loss: Tensor | None  # (B,) NLL of T_gt, when given
    prob_volume: Tensor | None  # (B, R, X, Y) voting only: P(angle = 2πr/R, t = cell (i, j) centre)


# ------------------------------------------------------------------------------------------------
# Pure geometry helpers
# ------------------------------------------------------------------------------------------------
def wrap_angle(a: Tensor) -> Tensor:
    """Angles (...,) radians -> [-π, π)."""
    return torch.remainder(a + math.pi, 2 * math.pi) - math.pi


def transform_points(angle: Tensor, t: Tensor, p: Tensor) -> Tensor:
    """Apply poses to query points: angle (B, P), t (B, P, 2), p (B, N, 2) -> (B, P, N, 2).

    Equal to `Transform2D(angle, t).transform(p[:, None])`, written elementwise because it runs on
    millions of pose-point pairs per query."""
    c, s = torch.cos(angle)[..., None], torch.sin(angle)[..., None]
    px, py = p[:, None, :, 0], p[:, None, :, 1]
    return torch.stack([c * px - s * py + t[..., None, 0], s * px + c * py + t[..., None, 1]], -1)


def kabsch_2d(p1: Tensor, p2: Tensor, m1: Tensor, m2: Tensor) -> tuple[Tensor, Tensor]:
    """Closed-form 2-point Kabsch (least-squares SE(2)) mapping query points p to map points m.

    All inputs (..., 2) metres. Returns angle (...,) radians and t (..., 2) such that
    R(angle) p_k + t ≈ m_k; the rotation aligns p2 - p1 with m2 - m1 exactly and the translation
    maps the midpoints onto each other (the SVD solution for two points)."""
    vp, vm = p2 - p1, m2 - m1
    angle = torch.atan2(vp[..., 0] * vm[..., 1] - vp[..., 1] * vm[..., 0], (vp * vm).sum(-1))
    mid_p, mid_m = (p1 + p2) / 2, (m1 + m2) / 2
    c, s = torch.cos(angle), torch.sin(angle)
    t = mid_m - torch.stack([c * mid_p[..., 0] - s * mid_p[..., 1], s * mid_p[..., 0] + c * mid_p[..., 1]], -1)
    return angle, t


def pose_volume_index(angle: Tensor, t: Tensor, num_rotations: int, cell_m: float) -> Tensor:
    """Continuous index (..., 3) = (r, i, j) of poses in a (R, X, Y) pose volume.

    Volume entry (r, i, j) is the pose with angle 2πr/R and camera position at the centre of
    map cell (i, j), i.e. t = ((i+0.5)·cell, (j+0.5)·cell)."""
    r = torch.remainder(angle, 2 * math.pi) * (num_rotations / (2 * math.pi))
    return torch.cat([r[..., None], t / cell_m - 0.5], -1)


def _in_prior(angle: Tensor, t: Tensor, prior: PosePrior | None) -> Tensor | None:
    """Whether poses angle (B, P), t (B, P, 2) satisfy the prior; None when there is none."""
    if prior is None:
        return None
    radius = torch.as_tensor(prior.radius_m, dtype=t.dtype, device=t.device).reshape(-1, 1)
    ok = (t - prior.xy.to(t)[:, None]).norm(dim=-1) <= radius
    if prior.yaw is not None and prior.yaw_range is not None:
        ok = ok & (wrap_angle(angle - prior.yaw.to(angle)[:, None]).abs() <= prior.yaw_range)
    return ok


def _log_prior(t: Tensor, prior: PosePrior | None) -> Tensor | None:
    """Log density (up to a constant) of the Gaussian position prior at camera positions t (B, P, 2)
    -> (B, P); None without a prior or without `sigma_m`."""
    if prior is None or prior.sigma_m is None:
        return None
    sigma = torch.as_tensor(prior.sigma_m, dtype=t.dtype, device=t.device).reshape(-1, 1)
    return -0.5 * ((t - prior.xy.to(t)[:, None]) ** 2).sum(-1) / sigma**2


def _with_log_prior(score_fn, prior: PosePrior | None):
    """`score_fn(angle (B, P), t (B, P, 2)) -> (B, P)` plus the prior's log density, if it has one."""
    if prior is None or prior.sigma_m is None:
        return score_fn
    return lambda a, t: score_fn(a, t) + _log_prior(t, prior)


def _prior_rotations(prior: PosePrior | None, R: int, margin: int = 1) -> Tensor | None:
    """Indices of the voting rotations 2πk/R a heading prior leaves, over the batch, with `margin`
    rotations more on each side (the peak search compares neighbours); None when there is no heading
    prior or it leaves every rotation."""
    if prior is None or prior.yaw is None or prior.yaw_range is None:
        return None
    step = 2 * math.pi / R
    ang = torch.arange(R, device=prior.yaw.device, dtype=torch.float32) * step
    near = (wrap_angle(ang[None] - prior.yaw.float()[:, None]).abs() <= prior.yaw_range + margin * step + 1e-6).any(0)
    return None if bool(near.all()) else near.nonzero()[:, 0]


def _prior_volume_mask(prior: PosePrior, R: int, X: int, Y: int, cell_m: float, like: Tensor) -> Tensor:
    """`_in_prior` of every entry of a (B, R, X, Y) pose volume (angle 2πr/R, camera at cell (i, j)'s
    centre), from the distance on the (X, Y) cells and the angle on the R rotations (separable)."""
    xy = _cell_centres(X, Y, cell_m, like)  # (X, Y, 2)
    radius = torch.as_tensor(prior.radius_m, dtype=xy.dtype, device=xy.device).reshape(-1, 1, 1)
    ok = ((xy[None] - prior.xy.to(xy)[:, None, None]).norm(dim=-1) <= radius)[:, None]  # (B, 1, X, Y)
    if prior.yaw is not None and prior.yaw_range is not None:
        ang = torch.arange(R, device=xy.device, dtype=xy.dtype) * (2 * math.pi / R)
        ok_r = wrap_angle(ang[None] - prior.yaw.to(xy)[:, None]).abs() <= prior.yaw_range  # (B, R)
        return ok & ok_r[:, :, None, None]
    return ok.expand(ok.shape[0], R, X, Y)


# ------------------------------------------------------------------------------------------------
# The module
# ------------------------------------------------------------------------------------------------
class Localizer(nn.Module):
    """SNAP's BEV localizer: query BEV (B, D, Xq, Yq) + map (B, D, X, Y) -> T_map_query.

    The scores are multiplied by tau = exp(log_temperature), the parameter initialised at
    `cfg.temperature_init` (SNAP: `temperature`, init 2.0, so tau starts at e^2 ~ 7.4).

    The knobs come from ModelConfig (`num_query_points`, `num_pose_samples`, and in training mode
    `train_query_points`, `train_pose_samples` when set; `num_coarse_points`, `coarse_cells`,
    `num_candidates`, `keep_candidates`, `final_step_cells`, `final_step_deg`, `refine_range_m`,
    `refine_range_deg`, see there; voting refines with at most `max_refine_points` = 512 query cells
    when `num_query_points` is None); they are copied to attributes that may be changed after
    construction (tests and benchmarks do).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.log_temperature = nn.Parameter(torch.tensor(float(cfg.temperature_init)))
        self.num_pose_samples = cfg.num_pose_samples
        self.train_pose_samples = cfg.train_pose_samples  # in training mode; None: num_pose_samples
        self.num_pose_retries = cfg.num_pose_retries
        self.refine_grid = cfg.refine_grid
        self.num_points = cfg.num_query_points  # None: all valid query cells
        self.train_points = cfg.train_query_points  # in training mode; None: num_points
        self.num_coarse_points = cfg.num_coarse_points
        self.coarse_cells = cfg.coarse_cells
        self.num_candidates = cfg.num_candidates
        self.keep_candidates = cfg.keep_candidates
        self.final_step_cells = cfg.final_step_cells
        self.final_step_deg = cfg.final_step_deg
        self.refine_range_m = cfg.refine_range_m
        self.refine_range_deg = cfg.refine_range_deg
        if cfg.score_reduction not in ("mean", "sum"):
            raise ValueError(f"ModelConfig.score_reduction must be 'mean' or 'sum', got {cfg.score_reduction!r}")
        self.score_reduction = cfg.score_reduction
        if cfg.point_scores not in ("raw", "log_ratio"):
            raise ValueError(f"ModelConfig.point_scores must be 'raw' or 'log_ratio', got {cfg.point_scores!r}")
        if cfg.proposals not in ("softmax", "local_maxima", "mixed"):
            raise ValueError("ModelConfig.proposals must be 'softmax', 'local_maxima' or 'mixed', "
                             f"got {cfg.proposals!r}")
        if cfg.similarity not in ("relu", "linear"):
            raise ValueError(f"ModelConfig.similarity must be 'relu' or 'linear', got {cfg.similarity!r}")
        self.clamp = cfg.similarity == "relu"
        self.point_scores = cfg.point_scores
        self.proposals = cfg.proposals
        self.num_matches = cfg.num_matches
        self.refined_negatives = cfg.refined_negatives
        self.chunk = 1 << 19  # point samples per scoring chunk (bounds memory)
        # Voting refines with at most this many query points when `num_points` is None (all cells):
        # a local grid's argmax needs no 16,000 points (129² query: 2.8 s of a 3.4 s query).
        self.max_refine_points = 512

    @property
    def temperature(self) -> Tensor:
        return self.log_temperature.exp()

    # -- inputs ------------------------------------------------------------------------------
    def _check(self, map_feats, map_valid, query_feats, query_valid, query_xy, cell_m, mode) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"Localizer.forward: {msg}")

        if mode not in ("ransac", "voting"):
            raise bad(f"mode must be 'ransac' or 'voting', got {mode!r}")
        if map_feats.dim() != 4 or query_feats.dim() != 4:
            raise bad(f"map_feats and query_feats must be (B, D, X, Y), got {tuple(map_feats.shape)} "
                      f"and {tuple(query_feats.shape)}")
        B, D, X, Y = map_feats.shape
        if query_feats.shape[:2] != (B, D):
            raise bad(f"query_feats {tuple(query_feats.shape)} does not match map_feats (B, D) = {(B, D)}")
        if map_valid.shape != (B, X, Y):
            raise bad(f"map_valid must be {(B, X, Y)}, got {tuple(map_valid.shape)}")
        Xq, Yq = query_feats.shape[2:]
        if query_valid.shape != (B, Xq, Yq):
            raise bad(f"query_valid must be {(B, Xq, Yq)}, got {tuple(query_valid.shape)}")
        if query_xy.shape != (Xq, Yq, 2):
            raise bad(f"query_xy must be {(Xq, Yq, 2)}, got {tuple(query_xy.shape)}")
        if not cell_m > 0:
            raise bad(f"cell_m must be > 0, got {cell_m}")
        if not bool(query_valid.reshape(B, -1).any(-1).all()):
            raise bad("a batch item has no valid query cell")
        if not bool(map_valid.reshape(B, -1).any(-1).all()):
            raise bad("a batch item has no valid map cell")

    def _points(self) -> int | None:
        """Query cells scored per query: `train_points` in training mode when set, else `num_points`."""
        return self.train_points if self.training and self.train_points is not None else self.num_points

    def _sample_points(
        self, query_feats: Tensor, query_valid: Tensor, query_xy: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Valid query cells in a random order, valid ones first: f (B, N, D) normalised, p (B, N, 2)
        metres, w (B, N) {0, 1}. N = `_points()` (None: the most valid cells of any batch item)."""
        B, D = query_feats.shape[:2]
        valid = query_valid.reshape(B, -1)
        n = int(valid.sum(1).max())
        k = self._points()
        if k is not None:
            n = min(k, n)
        key = torch.rand(valid.shape, generator=generator, device=valid.device)
        idx = torch.where(valid, key, key - 2).topk(n, dim=1).indices  # valid cells rank first
        w = valid.gather(1, idx)
        f = query_feats.reshape(B, D, -1).gather(2, idx[:, None].expand(B, D, n)).transpose(1, 2)
        p = query_xy.reshape(-1, 2).to(query_feats)[idx]
        return F.normalize(f, dim=-1), p, w

    def _relu_sims(self, f: Tensor, m: Tensor) -> Tensor:
        """r_n(x) = tau · ReLU(f_n · m(x)) (tau · f_n · m(x) with `similarity="linear"`): f (B, N, D),
        m (B, D, X, Y) -> (B, N, X, Y)."""
        B, D, X, Y = m.shape
        return self._act(torch.bmm(f * self.temperature, m.reshape(B, D, X * Y))).reshape(B, -1, X, Y)  # tau > 0

    def _act(self, sims: Tensor) -> Tensor:
        """The similarity's clamp (`ModelConfig.similarity`), in place."""
        return sims.relu_() if self.clamp else sims

    # -- scoring -----------------------------------------------------------------------------
    def _score_maps(self, r: Tensor, p: Tensor, w: Tensor, angle: Tensor, t: Tensor, cell_m: float) -> Tensor:
        """SNAP's pose score (1/N) sum_n w_n r_n(T p_n), N = sum_n w_n (without 1/N for
        `score_reduction="sum"`): r (B, N, X, Y) per-point
        score maps, bilinear with points clamped to the outer cell centres; poses (B, P) -> (B, P)."""
        B, N, X, Y = r.shape
        P = angle.shape[1]
        out = []
        step = max(1, self.chunk // max(B * N, 1))
        values = r.reshape(B * N, 1, X, Y)
        lo = torch.tensor([0.5, 0.5], dtype=p.dtype, device=p.device)
        hi = torch.tensor([X - 0.5, Y - 0.5], dtype=p.dtype, device=p.device)
        wn = w / w.sum(1, keepdim=True).clamp(min=1) if self.score_reduction == "mean" else w
        clamp = self.point_scores == "raw"  # log-ratios are 0 (uninformative) off the map
        for s in range(0, P, step):
            q = transform_points(angle[:, s : s + step], t[:, s : s + step], p) / cell_m  # (B, P', N, 2)
            if clamp:
                q = torch.maximum(torch.minimum(q, hi), lo)
            q = q.transpose(1, 2).reshape(B * N, -1, 2)
            v, _ = interpolate_nd(values, q)  # (B*N, P', 1), 0 off the map
            out.append((v.reshape(B, N, -1) * wn[..., None]).sum(1))
        return torch.cat(out, 1)

    def _score_feats(self, m: Tensor, vmask: Tensor | None, f: Tensor, c: Tensor, p: Tensor, w: Tensor,
                     angle: Tensor, t: Tensor, cell_m: float) -> Tensor:
        """sum_n w_n a_n(T p_n) (tau ReLU(f_n · m(T p_n)) - c_n), the log-ratio score from features.

        m (B, D, X, Y) unit or 0 on invalid cells; m(T p_n) is bilinear and re-normalised to unit
        length so that invalid cells drop out instead of shrinking the similarity; a_n is the
        bilinear fraction of valid cells (vmask (B, 1, X, Y) float, None when all are valid) and 0
        off the map; c_n (B, N) the per-point log-mean-exp constant. f (B, N, D); poses (B, P) -> (B, P)."""
        B, N = w.shape
        P = angle.shape[1]
        out = []
        step = max(1, self.chunk // max(B * N, 1))
        for s in range(0, P, step):
            q = transform_points(angle[:, s : s + step], t[:, s : s + step], p) / cell_m  # (B, P', N, 2)
            Pc = q.shape[1]
            q = q.reshape(B, Pc * N, 2)
            # frac is 0 wherever `inside` is False, so v need not be zeroed there (12 % of a query).
            v, inside = interpolate_nd(m, q, zero_invalid=False)  # (B, P'*N, D), (B, P'*N)
            frac = inside.to(m.dtype) if vmask is None else interpolate_nd(vmask, q)[0][..., 0]
            v = v.reshape(B, Pc, N, -1)
            # cos(f_n, v); mul + sum is much faster than vector_norm over a short last dim.
            sq = (v * v).sum(-1).clamp_min(1e-12)
            sims = self._act((v * f[:, None]).sum(-1) * torch.rsqrt(sq))
            ell = (sims * self.temperature - c[:, None]) * frac.reshape(B, Pc, N)
            out.append((ell * w[:, None]).sum(-1))
        return torch.cat(out, 1)

    def _point_constants(self, f: Tensor, m: Tensor, map_valid: Tensor) -> Tensor:
        """c_n = log mean over valid map cells of exp(r_n) (B, N), from up to 4096 valid cells
        (evenly strided in a random order fixed per call) to stay cheap on large maps."""
        B, D, X, Y = m.shape
        valid = map_valid.reshape(B, -1)
        n = min(4096, X * Y)
        # Deterministic spread: rank valid cells by a hash of their index, keep the first n.
        key = (torch.arange(X * Y, device=m.device) * 2654435761) % 4294967291
        idx = torch.where(valid, key, key - 4294967291).topk(n, dim=1).indices  # (B, n)
        ok = valid.gather(1, idx).to(m.dtype)  # fewer valid cells than n: the rest masked
        cells = m.reshape(B, D, -1).gather(2, idx[:, None].expand(B, D, n))  # (B, D, n)
        r = self._act(torch.bmm(f * self.temperature, cells))  # (B, N, n)
        return _masked_log_mean_exp(r, ok[:, None])

    def _refine(self, score_fn, angle: Tensor, t: Tensor, centre: Tensor, step_t: float, step_r: float,
                cell_m: float, prior: PosePrior | None) -> tuple[Tensor, Tensor, Tensor]:
        """Local grid search around K candidates (B, K), rotating about the query point `centre` (B, 2).

        Each iteration scores a refine_grid^3 grid of (angle, x, y) offsets (steps step_r radians,
        step_t metres) and moves each candidate to its best grid pose; the steps halve from the
        second iteration on until they are below `final_step_cells` cells and `final_step_deg`.
        Only the best `keep_candidates` go past the first iteration (the others keep their pose).
        Returns angle, t (B, K), scores (B, K), sorted best first."""
        g = self.refine_grid
        lin = torch.arange(g, dtype=t.dtype, device=t.device) - (g - 1) / 2
        dr, dx, dy = torch.meshgrid(lin, lin, lin, indexing="ij")
        dr, dxy = dr.reshape(-1), torch.stack([dx, dy], -1).reshape(-1, 2)
        G = dr.shape[0]
        ratio = max(step_t / (self.final_step_cells * cell_m), step_r / math.radians(self.final_step_deg), 1.0)
        iters = 2 + math.ceil(math.log2(ratio))
        done_a, done_t, done_s = [], [], []
        for it in range(iters):
            B, K = angle.shape
            if it >= 2:
                step_t, step_r = step_t / 2, step_r / 2
            # Rotate about the query centroid: c = R p_c + t stays put under a pure rotation offset.
            c = transform_points(angle, t, centre[:, None])[:, :, 0, None]  # (B, K, 1, 2)
            a_new = angle[..., None] + dr * step_r  # (B, K, G)
            rc = transform_points(a_new.reshape(B, -1), torch.zeros_like(t).repeat_interleave(G, 1),
                                  centre[:, None]).reshape(B, K, G, 2)  # R(a_new) p_c
            t_new = c + dxy * step_t - rc  # (B, K, G, 2)
            s = score_fn(a_new.reshape(B, K * G), t_new.reshape(B, K * G, 2)).reshape(B, K, G)
            ok = _in_prior(a_new.reshape(B, -1), t_new.reshape(B, -1, 2), prior)
            if ok is not None:
                s = torch.where(ok.reshape(B, K, G), s, torch.full_like(s, -torch.inf))
                mid = s[..., G // 2]  # the current pose: keep it available even when outside
                s[..., G // 2] = torch.where(torch.isinf(mid), torch.full_like(mid, -1e30), mid)
            best = s.argmax(-1)  # (B, K)
            scores = s.gather(-1, best[..., None])[..., 0]
            angle = a_new.gather(-1, best[..., None])[..., 0]
            t = t_new.gather(2, best[..., None, None].expand(B, K, 1, 2))[:, :, 0]
            order = scores.argsort(1, descending=True)
            angle, scores = angle.gather(1, order), scores.gather(1, order)
            t = t.gather(1, order[..., None].expand(B, K, 2))
            if it == 0 and K > self.keep_candidates:
                k = self.keep_candidates
                done_a.append(angle[:, k:]), done_t.append(t[:, k:]), done_s.append(scores[:, k:])
                angle, t, scores = angle[:, :k], t[:, :k], scores[:, :k]
        angle = torch.cat([angle, *done_a], 1)
        return wrap_angle(angle), torch.cat([t, *done_t], 1), torch.cat([scores, *done_s], 1)

    # -- forward -----------------------------------------------------------------------------
    def forward(
        self,
        map_feats: Tensor,
        map_valid: Tensor,
        query_feats: Tensor,
        query_valid: Tensor,
        query_xy: Tensor,
        cell_m: float,
        *,
        mode: str = "ransac",
        T_gt: Transform2D | None = None,
        prior: PosePrior | None = None,
        num_rotations: int = 64,
        generator: torch.Generator | None = None,
    ) -> LocalizerOutput:
        """Localize query BEVs in maps.

        Args:
            map_feats: (B, D, X, Y) matching features, model-grid layout.
            map_valid: (B, X, Y) bool.
            query_feats: (B, D, Xq, Yq) query BEV matching features.
            query_valid: (B, Xq, Yq) bool.
            query_xy: (Xq, Yq, 2) metres, cell centres in the query BEV frame.
            cell_m: cell size of both grids, metres.
            mode: "ransac" (SNAP) or "voting" (exhaustive, coarse-to-fine).
            T_gt: (B,) ground-truth T_map_query; gives `loss`.
            prior: optional search limits; every returned pose satisfies them.
            num_rotations: R, voting only.
            generator: for the random query points and RANSAC samples.
        Returns:
            LocalizerOutput: the best pose and score (B,); the `num_candidates` best refined
            candidates (B, K), best first (with a prior, candidates that could not be placed
            inside it score -1e30; the best one always lies inside); `loss` (B,) when T_gt is
            given; for voting `prob_volume` (B, R, X, Y), summing to 1 per item, entry (r, i, j)
            the pose with angle 2πr/R and the camera at map cell (i, j)'s centre
            (`pose_volume_index`).
        """
        self._check(map_feats, map_valid, query_feats, query_valid, query_xy, cell_m, mode)
        if num_rotations < 1:
            raise ValueError(f"Localizer.forward: num_rotations must be >= 1, got {num_rotations}")
        # Stored maps are float16: score in float32 (or float64 when given).
        dtype = torch.float64 if map_feats.dtype == torch.float64 else torch.float32
        map_feats, query_feats = map_feats.to(dtype), query_feats.to(dtype)
        map_valid, query_valid = map_valid.bool(), query_valid.bool()
        f, p, w = self._sample_points(query_feats, query_valid, query_xy, generator)
        m = _normalize_masked(map_feats, map_valid)
        if mode == "ransac":
            return self._ransac(m, map_valid, f, p, w, cell_m, T_gt, prior, generator)
        return self._voting(m, map_valid, f, p, w, cell_m, T_gt, prior, num_rotations)

    # -- RANSAC ------------------------------------------------------------------------------
    def _ransac(self, m, map_valid, f, p, w, cell_m, T_gt, prior, generator) -> LocalizerOutput:
        if prior is not None and prior.sigma_m is not None and not (
                self.point_scores == "log_ratio" and self.score_reduction == "sum"):
            raise ValueError("PosePrior.sigma_m needs log-likelihood pose scores: mode='voting', or RANSAC with "
                             "point_scores='log_ratio' and score_reduction='sum'")
        B, D, X, Y = m.shape
        r = self._relu_sims(f, m)  # (B, N, X, Y), 0 on invalid map cells
        with torch.no_grad():
            angle, t = self._sample_poses(r.detach(), map_valid, p, w, cell_m, prior, generator)
        if self.point_scores == "log_ratio":
            r = _log_ratio(r, map_valid)
        score_fn = _with_log_prior(lambda a, tt: self._score_maps(r, p, w, a, tt, cell_m), prior)
        scores = score_fn(angle, t)
        ok = _in_prior(angle, t, prior)
        if ok is not None:
            scores = torch.where(ok, scores, torch.full_like(scores, -torch.inf))

        s_gt = None
        if T_gt is not None:
            s_gt = score_fn(T_gt.angle.to(t)[:, None], T_gt.t.to(t)[:, None])

        K = min(self.num_candidates, scores.shape[1])
        with torch.no_grad():  # the search: the same scores, no graph
            top = scores.detach().topk(K, dim=1).indices
            a0, t0 = angle.gather(1, top), t.gather(1, top[..., None].expand(B, K, 2))
            centre = (p * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)
            wide = not self.training and (self.refine_range_m > 0 or self.refine_range_deg > 0)
            if wide:  # the local grids then start at half the wide grid's steps
                a0, t0 = self._wide_search(score_fn, a0, t0, centre, cell_m, prior)
            a, tt, s = self._refine(score_fn, a0, t0, centre, step_t=cell_m / (2 if wide else 1),
                                    step_r=math.radians(0.5 if wide else 1.0), cell_m=cell_m, prior=prior)
        loss = None
        if s_gt is not None:
            parts = [s_gt, scores]
            if self.refined_negatives:  # the refined candidates' scores, with gradients
                parts.append(score_fn(a, tt).masked_fill(s <= -1e29, -torch.inf))
            loss = -(s_gt[:, 0] - torch.logsumexp(torch.cat(parts, 1), 1))
        return self._output(a, tt, s, loss, None)

    def _sample_poses(self, r, map_valid, p, w, cell_m, prior, generator) -> tuple[Tensor, Tensor]:
        """2-point RANSAC hypotheses with retries (SNAP `sample_transforms_ransac`).

        Matches (query point, map cell) come from `_matches_softmax` (SNAP) and/or
        `_matches_local_maxima`, as `proposals` says; r (B, N, X, Y), only valid map cells and,
        with a prior, cells reachable from a pose inside it. Consecutive matches make pairs; of
        `num_pose_retries` pairs the one with the best length ratio gives a 2-point Kabsch pose.
        Returns angle (B, P), t (B, P, 2) (plus the prior's centre pose when a prior is given)."""
        B, N, X, Y = r.shape
        allowed = map_valid[:, None]  # (B, 1, X, Y)
        if prior is not None:  # a match must be reachable from a pose inside the prior
            dist = (_cell_centres(X, Y, cell_m, p)[None] - prior.xy.to(p)[:, None, None]).norm(dim=-1)  # (B, X, Y)
            radius = torch.as_tensor(prior.radius_m, dtype=p.dtype, device=p.device).reshape(-1, 1, 1, 1)
            allowed = allowed & (dist[:, None] <= radius + p.norm(dim=-1)[..., None, None] + cell_m)
        P = self.train_pose_samples if self.training and self.train_pose_samples is not None else self.num_pose_samples
        Rt = self.num_pose_retries
        n_local = {"softmax": 0, "local_maxima": P, "mixed": P // 2}[self.proposals]
        parts = []
        if P - n_local:
            parts.append(self._matches_softmax(r, allowed, w, (P - n_local) * Rt * 2, generator))
        if n_local:
            parts.append(self._matches_local_maxima(r, allowed, w, n_local * Rt * 2, generator))
        n = torch.cat([x[0] for x in parts], 1)  # (B, P*Rt*2) point indices
        cell = torch.cat([x[1] for x in parts], 1)  # (B, P*Rt*2) flat cell indices
        pq = p.gather(1, n[..., None].expand(-1, -1, 2))
        pm = (torch.stack([cell // Y, cell % Y], -1).to(p.dtype) + 0.5) * cell_m
        shape = (B, P, Rt, 2, 2)
        pq, pm = pq.reshape(shape), pm.reshape(shape)
        p1, p2, m1, m2 = pq[..., 0, :], pq[..., 1, :], pm[..., 0, :], pm[..., 1, :]
        d_p, d_m = (p2 - p1).norm(dim=-1), (m2 - m1).norm(dim=-1)
        ratio = torch.maximum(d_p / d_m.clamp(min=1e-5), d_m / d_p.clamp(min=1e-5))
        sel = ratio.argmin(-1)[..., None, None].expand(B, P, 1, 2)
        p1, p2, m1, m2 = (x.gather(2, sel)[:, :, 0] for x in (p1, p2, m1, m2))
        angle, t = kabsch_2d(p1, p2, m1, m2)
        if prior is not None:  # always offer one hypothesis inside the prior
            angle, t = _with_prior_centre(angle, t, prior)
        return angle, t

    def _matches_softmax(self, r, allowed, w, count, generator) -> tuple[Tensor, Tensor]:
        """`count` matches per item drawn from softmax_x(r_n)(x) / N over the valid points n and the
        allowed cells x (SNAP's prob_points). r (B, N, X, Y), allowed (B, 1 or N, X, Y) bool.
        Returns point indices and flat cell indices, both (B, count).

        Each point's softmax sums to 1, so the point of a match is uniform over the valid points
        that have an allowed cell, and its cell is then drawn from that point's softmax alone: only
        the drawn points' rows are normalised, a chunk at a time. (One (B, N·X·Y) cumulative sum in
        float64 took 17 GB at 129² query cells × 256² map cells.)"""
        B, N, X, Y = r.shape
        flat, ok = r.reshape(B, N, X * Y), allowed.reshape(B, -1, X * Y)
        has_cell = ok.any(-1).expand(B, N)  # a point whose cells are all masked draws none
        weight = (w > 0) & has_cell
        weight = torch.where(weight.any(1, keepdim=True), weight, w > 0).to(r.dtype)  # none: valid points
        rows_per_chunk = max(1, (1 << 24) // (X * Y))
        n_out, cell_out = [], []
        for b in range(B):
            every_cell = bool(ok[b].all())  # no prior, every map cell valid: nothing to mask
            n = torch.multinomial(weight[b], count, replacement=True, generator=generator)  # (count,)
            order = n.argsort(stable=True)
            n_sorted = n[order]
            pts, counts = torch.unique_consecutive(n_sorted, return_counts=True)
            k = int(counts.max())
            drawn = torch.empty(len(pts), k, dtype=torch.long, device=r.device)
            for s in range(0, len(pts), rows_per_chunk):
                rows = pts[s : s + rows_per_chunk]
                logits = flat[b, rows]
                if not every_cell:
                    mask = ok[b, rows if ok.shape[1] > 1 else torch.zeros_like(rows)]
                    logits = logits.masked_fill_(~mask & has_cell[b, rows, None], -torch.inf)
                drawn[s : s + len(rows)] = torch.multinomial(torch.softmax(logits, -1), k, replacement=True,
                                                             generator=generator)
            # The j-th occurrence of a point (in sorted order) takes that point's j-th draw.
            group = torch.repeat_interleave(torch.arange(len(pts), device=r.device), counts)
            start = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
            rank = torch.arange(count, device=r.device) - start
            cell = torch.empty(count, dtype=torch.long, device=r.device)
            cell[order] = drawn[group, rank]
            n_out.append(n), cell_out.append(cell)
        return torch.stack(n_out), torch.stack(cell_out)

    def _matches_local_maxima(self, r, allowed, w, count, generator) -> tuple[Tensor, Tensor]:
        """`count` matches per item: a valid point drawn uniformly, then one of its `num_matches`
        best 3x3 local maxima of r (B, N, X, Y) over the allowed cells, drawn by softmax(r) among
        them. Returns point indices and flat cell indices, both (B, count)."""
        B, N, X, Y = r.shape
        r = r.masked_fill(~allowed, -1.0)  # below any allowed score (r >= 0)
        # Exact 3x3 non-maximum suppression from a short list: a higher neighbour of a listed cell
        # is itself listed, so comparing within the list suffices.
        L = min(8 * self.num_matches, X * Y)
        vals, cells = r.reshape(B, N, -1).topk(L, dim=-1)  # (B, N, L), sorted
        ci, cj = cells // Y, cells % Y
        near = ((ci[..., :, None] - ci[..., None, :]).abs() <= 1) & ((cj[..., :, None] - cj[..., None, :]).abs() <= 1)
        higher = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)  # [j, i]: i listed before j
        keep = ~(near & higher).any(-1) & (vals >= 0)
        k = min(self.num_matches, L)
        order = (keep.to(vals.dtype) * 2 - torch.arange(L, device=r.device) / L).topk(k, dim=-1).indices
        vals, cells, keep = vals.gather(2, order), cells.gather(2, order), keep.gather(2, order)
        cdf = torch.softmax(vals.masked_fill(~keep, -torch.inf), -1).nan_to_num(0.0).cumsum(-1)  # (B, N, k)
        cdf[..., -1] = 1.0 + 1e-6
        u = torch.rand(B, count, 2, generator=generator, device=r.device, dtype=r.dtype)
        nv = w.sum(1, keepdim=True)  # valid points come first
        n = (u[..., 0] * nv).long().clamp_(max=N - 1)  # (B, count)
        c = cdf.gather(1, n[..., None].expand(-1, -1, k))  # (B, count, k)
        j = torch.searchsorted(c, u[..., 1:].contiguous()).clamp_(max=k - 1)
        cell = cells.gather(1, n[..., None].expand(-1, -1, k)).gather(2, j)[..., 0]
        return n, cell

    def _wide_search(self, score_fn, angle: Tensor, t: Tensor, centre: Tensor, cell_m: float,
                     prior: PosePrior | None) -> tuple[Tensor, Tensor]:
        """Exhaustive grid of ±refine_range_m (steps of one cell) and ±refine_range_deg (steps of
        1°) around the best `keep_candidates` of the poses angle (B, K), t (B, K, 2), rotating about
        the query point `centre` (B, 2). Each searched candidate moves to its best grid pose."""
        k = min(self.keep_candidates, angle.shape[1])
        if k == 0 or (self.refine_range_m <= 0 and self.refine_range_deg <= 0):
            return angle, t
        nt = int(self.refine_range_m // cell_m)
        nr = int(self.refine_range_deg // 1.0)
        lt = torch.arange(-nt, nt + 1, dtype=t.dtype, device=t.device) * cell_m
        lr = torch.deg2rad(torch.arange(-nr, nr + 1, dtype=t.dtype, device=t.device))
        dr, dx, dy = torch.meshgrid(lr, lt, lt, indexing="ij")
        dr, dxy = dr.reshape(-1), torch.stack([dx, dy], -1).reshape(-1, 2)
        B, G = angle.shape[0], dr.shape[0]
        a_sel, t_sel = angle[:, :k], t[:, :k]
        c = transform_points(a_sel, t_sel, centre[:, None])[:, :, 0, None]  # (B, k, 1, 2)
        a_new = a_sel[..., None] + dr  # (B, k, G)
        rc = transform_points(a_new.reshape(B, -1), torch.zeros(B, k * G, 2, dtype=t.dtype, device=t.device),
                              centre[:, None]).reshape(B, k, G, 2)
        t_new = c + dxy - rc
        s = score_fn(a_new.reshape(B, -1), t_new.reshape(B, -1, 2)).reshape(B, k, G)
        ok = _in_prior(a_new.reshape(B, -1), t_new.reshape(B, -1, 2), prior)
        if ok is not None:
            s = s.masked_fill(~ok.reshape(B, k, G), -torch.inf)
            s[..., G // 2] = torch.where(torch.isinf(s[..., G // 2]), torch.full_like(s[..., G // 2], -1e30),
                                         s[..., G // 2])
        best = s.argmax(-1)  # (B, k)
        a_best = a_new.gather(-1, best[..., None])[..., 0]
        t_best = t_new.gather(2, best[..., None, None].expand(B, k, 1, 2))[:, :, 0]
        return torch.cat([a_best, angle[:, k:]], 1), torch.cat([t_best, t[:, k:]], 1)

    # -- voting ------------------------------------------------------------------------------
    def _voting(self, m, map_valid, f, p, w, cell_m, T_gt, prior, R) -> LocalizerOutput:
        B, D, X, Y = m.shape
        Nc = min(self.num_coarse_points, f.shape[1])
        fc, pc, wc = f[:, :Nc], p[:, :Nc], w[:, :Nc]
        s = max(1, math.ceil(max(X, Y) / self.coarse_cells))
        centre = (pc * wc[..., None]).sum(1) / wc.sum(1, keepdim=True).clamp(min=1)  # (B, 2) m

        # Coarse per-point score maps: max over a window 2s wide around each coarse cell, so that
        # a point displaced by up to s/2 cells (pose discretisation) still finds its match.
        r = _window_max(self._relu_sims(fc, m), s)  # (B, Nc, Xc, Yc)
        Xc, Yc = r.shape[-2:]
        # Log-ratio vs uniform at the coarse level (so that points off the map / on unobserved
        # cells, which count 0, are neither rewarded nor penalised): a coarse cell is valid when
        # its window holds a valid cell, and the constant is the log-mean-exp over valid cells.
        cvalid = _window_max(map_valid[:, None].to(r.dtype), s)  # (B, 1, Xc, Yc) in {0, 1}
        r = (r - _masked_log_mean_exp(r.flatten(2), cvalid.flatten(2))[..., None, None]) * cvalid
        # With a heading prior, only the rotations it leaves are voted (the others would be masked out).
        ks = _prior_rotations(prior, R) if T_gt is None else None
        vol = _shift_sum(r, wc, pc - centre[:, None], R, s * cell_m, ks)  # (B, R, Xc, Yc) centroid-indexed
        if ks is not None:
            vol = vol.new_full((B, R, Xc, Yc), -torch.inf).index_copy_(1, ks, vol)

        # Pose of each coarse cell: the query centroid lands on the cell centre.
        ang = torch.arange(R, device=m.device, dtype=m.dtype) * (2 * math.pi / R)
        cxy = _cell_centres(Xc, Yc, s * cell_m, m)  # (Xc, Yc, 2)
        rc = transform_points(ang[None], torch.zeros(1, R, 2, dtype=m.dtype, device=m.device), centre[:, None])[:, :, 0]
        t_cell = cxy[None, None] - rc[:, :, None, None]  # (B, R, Xc, Yc, 2) camera positions
        log_prior = _log_prior(t_cell.reshape(B, -1, 2), prior)
        if log_prior is not None:
            vol = vol + log_prior.reshape(B, R, Xc, Yc)
        prob_volume, loss = self._volume_outputs(vol, centre, s, X, Y, cell_m, T_gt, prior)

        with torch.no_grad():
            v = vol.detach()
            ok = _in_prior(ang.expand(B, R)[..., None, None].expand(B, R, Xc, Yc).reshape(B, -1),
                           t_cell.reshape(B, -1, 2), prior)
            if ok is not None:
                v = v.masked_fill(~ok.reshape(B, R, Xc, Yc), -torch.inf)
            pooled = F.max_pool2d(v, kernel_size=3, stride=1, padding=1)
            pooled = torch.maximum(pooled, torch.maximum(pooled.roll(1, 1), pooled.roll(-1, 1)))
            peaks = v.masked_fill(pooled > v, -torch.inf).reshape(B, -1)  # NMS over (r, x, y)
            K = min(self.num_candidates, peaks.shape[1])
            top = peaks.topk(K, dim=1).indices
            a0 = ang[top // (Xc * Yc)]
            t0 = t_cell.reshape(B, -1, 2).gather(1, top[..., None].expand(B, K, 2))
            if prior is not None:  # the prior's centre: a candidate inside it even if no cell is
                a0, t0 = _with_prior_centre(a0, t0, prior)
            if self._points() is None and f.shape[1] > self.max_refine_points:  # random cells, valid first
                f, p, w = f[:, : self.max_refine_points], p[:, : self.max_refine_points], w[:, : self.max_refine_points]
            full_centre = (p * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)
            c = self._point_constants(f, m, map_valid)
            vmask = None if bool(map_valid.all()) else map_valid[:, None].to(m.dtype)
            score_fn = _with_log_prior(lambda a, tt: self._score_feats(m, vmask, f, c, p, w, a, tt, cell_m), prior)
            a, t, sc = self._refine(score_fn, a0, t0, full_centre, step_t=s * cell_m / 2,
                                    step_r=math.pi / R, cell_m=cell_m, prior=prior)
        return self._output(a, t, sc, loss, prob_volume)

    def _volume_outputs(self, vol, centre, s, X, Y, cell_m, T_gt, prior) -> tuple[Tensor, Tensor | None]:
        """Coarse centroid-indexed scores (B, R, Xc, Yc) -> camera-indexed probabilities (B, R, X, Y)
        and the NLL of T_gt (trilinear in the volume, periodic in angle).

        Fine entry (r, i, j) takes the probability of the coarse cell holding the query centroid
        when the camera is at cell (i, j) with angle 2πr/R, shared evenly by the fine cells of that
        coarse cell; entries whose centroid falls off the map are 0, and the rest renormalised.
        With a prior, entries outside it are 0 (uniform over the prior if it holds no mass)."""
        B, R, Xc, Yc = vol.shape
        ang = torch.arange(R, device=vol.device, dtype=centre.dtype) * (2 * math.pi / R)
        zeros = torch.zeros(1, R, 2, dtype=centre.dtype, device=vol.device)
        off = torch.round(transform_points(ang[None], zeros, centre[:, None])[:, :, 0] / cell_m).long()  # (B, R, 2)
        # Coarse row / column of each fine row / column, -1 (-> a zero border) when off the map.
        ci = torch.arange(X, device=vol.device) + off[..., 0:1]  # (B, R, X) centroid cell
        cj = torch.arange(Y, device=vol.device) + off[..., 1:2]
        ci = torch.where((ci >= 0) & (ci < X), torch.div(ci, s, rounding_mode="floor"), -1) + 1
        cj = torch.where((cj >= 0) & (cj < Y), torch.div(cj, s, rounding_mode="floor"), -1) + 1
        prob = torch.softmax(vol.reshape(B, -1), -1).reshape(B, R, Xc, Yc)
        prob = F.pad(prob, (1, 0, 1, 0))  # index 0 = off the map
        # Surviving mass, from how many fine rows / columns use each coarse row / column.
        cnt_i = torch.zeros(B, R, Xc + 1, dtype=prob.dtype, device=prob.device).scatter_add_(2, ci, torch.ones_like(ci, dtype=prob.dtype))
        cnt_j = torch.zeros(B, R, Yc + 1, dtype=prob.dtype, device=prob.device).scatter_add_(2, cj, torch.ones_like(cj, dtype=prob.dtype))
        mass = torch.einsum("brij,bri,brj->b", prob, cnt_i, cnt_j).clamp(min=1e-30)
        prob = prob / mass[:, None, None, None]
        rows = prob.gather(2, ci[..., None].expand(B, R, X, Yc + 1))  # (B, R, X, Yc+1)
        fine = rows.gather(3, cj[:, :, None, :].expand(B, R, X, Y))  # (B, R, X, Y)
        if prior is not None:
            ok = _prior_volume_mask(prior, R, X, Y, cell_m, centre).to(fine.dtype)
            fine = fine * ok
            mass = fine.sum((1, 2, 3), keepdim=True)
            empty = mass <= 1e-30
            fine = torch.where(empty, ok / ok.sum((1, 2, 3), keepdim=True).clamp(min=1), fine / mass.clamp(min=1e-30))
        loss = None
        if T_gt is not None:
            idx = pose_volume_index(T_gt.angle.to(centre), T_gt.t.to(centre), R, cell_m)  # (B, 3)
            loss = -torch.log(_interp_volume(fine, idx).clamp(min=1e-30))
        return fine, loss

    # -- output ------------------------------------------------------------------------------
    def _output(self, angle, t, scores, loss, prob_volume) -> LocalizerOutput:
        order = scores.argsort(dim=1, descending=True)[:, : self.num_candidates]
        angle, scores = angle.gather(1, order), scores.gather(1, order)
        t = t.gather(1, order[..., None].expand(*order.shape, 2))
        topk = Transform2D(angle, t)
        return LocalizerOutput(T_map_query=topk[:, 0], score=scores[:, 0], topk=topk, topk_scores=scores,
                               loss=loss, prob_volume=prob_volume)


def _cell_centres(X: int, Y: int, cell_m: float, like: Tensor) -> Tensor:
    """Metric centres (X, Y, 2) of a model grid's cells (the model-grid convention of neuralmaps.grids)."""
    from ..grids import Grid2D

    return Grid2D((X * cell_m, Y * cell_m), cell_m).cell_centers(dtype=like.dtype, device=like.device)


def _with_prior_centre(angle: Tensor, t: Tensor, prior: PosePrior) -> tuple[Tensor, Tensor]:
    """Append the prior's centre pose (its yaw, or 0) to poses angle (B, P), t (B, P, 2)."""
    a0 = prior.yaw.to(angle) if prior.yaw is not None else torch.zeros_like(angle[:, 0])
    return torch.cat([angle, a0[:, None]], 1), torch.cat([t, prior.xy.to(t)[:, None]], 1)


def _log_ratio(r: Tensor, valid: Tensor) -> Tensor:
    """l_n = log_softmax_x(r_n)(x) + log(#valid cells) over the valid map cells, 0 on invalid ones:
    the log-likelihood ratio of a match at x against a uniform one. r (B, N, X, Y) >= 0,
    valid (B, X, Y) -> (B, N, X, Y)."""
    B, N, X, Y = r.shape
    c = _masked_log_mean_exp(r.reshape(B, N, -1), valid.reshape(B, 1, -1).to(r.dtype))  # (B, N)
    return (r - c[..., None, None]) * valid[:, None].to(r.dtype)


def _masked_log_mean_exp(r: Tensor, valid: Tensor) -> Tensor:
    """log mean over valid entries of exp(r) along the last dim: r (..., M), valid (..., M) {0, 1}
    broadcastable -> (...). Empty rows give 0."""
    r = r.masked_fill(valid <= 0, -torch.inf)
    lse = torch.logsumexp(r, -1)
    count = valid.expand_as(r).sum(-1)
    return torch.where(count > 0, lse - count.clamp(min=1).log(), torch.zeros_like(lse))


def _normalize_masked(feats: Tensor, valid: Tensor) -> Tensor:
    """L2-normalise (B, D, X, Y) over D and zero invalid cells (B, X, Y) (einsum: a fast reduction)."""
    sq = torch.einsum("bdxy,bdxy->bxy", feats, feats).clamp_min(1e-24)
    return feats * (torch.rsqrt(sq) * valid.to(feats.dtype))[:, None]


def _window_max(r: Tensor, s: int) -> Tensor:
    """Coarse cell u of stride s takes the max of r over a window centred on its centre (fine
    index u·s + (s-1)/2) reaching s cells either side: [u·s - s/2, u·s + 3s/2) for even s, 2s+1
    cells [u·s - (s+1)/2, u·s + (3s+1)/2) for odd s. So a point displaced by up to s/2 cells from
    where the coarse pose puts it still finds its best match.
    (B, N, X, Y) -> (B, N, ceil(X/s), ceil(Y/s))."""
    if s == 1:
        return r
    B, N, X, Y = r.shape
    Xc, Yc = -(-X // s), -(-Y // s)
    if s % 2:
        out = F.max_pool2d(r, kernel_size=2 * s + 1, stride=s, padding=(s + 1) // 2, ceil_mode=True)
        out = out[..., :Xc, :Yc]
        return F.pad(out, (0, Yc - out.shape[-1], 0, Xc - out.shape[-2]))  # 0: no evidence
    # Block maxima over [k·s - h, (k+1)·s - h), then a 2x2 max of neighbouring blocks. Pooling pads
    # with -inf, the same as "no evidence" (0) here since r >= 0 and every block holds a cell.
    blocks = F.max_pool2d(r, kernel_size=s, stride=s, padding=s // 2, ceil_mode=True)
    bx, by = blocks.shape[-2:]
    blocks = F.pad(blocks[..., : Xc + 1, : Yc + 1], (0, max(0, Yc + 1 - by), 0, max(0, Xc + 1 - bx)))
    return F.max_pool2d(blocks, kernel_size=2, stride=1)


def _shift_sum(r: Tensor, w: Tensor, p: Tensor, R: int, cell: float, rotations: Tensor | None = None) -> Tensor:
    """Exhaustive voting on a grid: vol[b, k, u] = sum_n w_n r[b, n, u + round(R_k p_n / cell)].

    r: (B, N, X, Y) per-point score maps (0 = no evidence; off the grid counts 0);
    w: (B, N) point weights; p: (B, N, 2) metres relative to the rotation centre; R rotations of
    2π/R CCW (only the indices `rotations` (K,) when given); cell: metres per cell of r.
    Returns (B, R, X, Y) (B, K, X, Y with `rotations`)."""
    B, N, X, Y = r.shape
    ang = torch.arange(R, device=r.device, dtype=p.dtype) * (2 * math.pi / R)
    if rotations is not None:
        ang = ang[rotations.to(r.device)]
    R = ang.shape[0]
    zeros = torch.zeros(B, R, 2, dtype=p.dtype, device=p.device)
    d = torch.floor(transform_points(ang.expand(B, R), zeros, p) / cell + 0.5).long()  # (B, R, N, 2)
    pad = int(d.abs().max()) if d.numel() else 0
    rp = F.pad(r * w[..., None, None].to(r.dtype), (pad, pad, pad, pad))  # zeros off the grid
    Xp, Yp = X + 2 * pad, Y + 2 * pad
    if not (torch.is_grad_enabled() and rp.requires_grad):
        # Inference: per point, index an as_strided view of its (2·pad+1)^2 shifted windows and
        # accumulate in place (1.8x faster than one gather of (B, R, N, X, Y) then a sum, at 64
        # points x 64 rotations x 101^2 cells; no index tensor, memory O(R·X·Y)).
        sX, sY = rp.stride()[-2:]
        dd = d + pad
        out = torch.zeros(B, R, X, Y, dtype=r.dtype, device=r.device)
        for b in range(B):
            for n in range(N):
                win = rp[b, n].as_strided((2 * pad + 1, 2 * pad + 1, X, Y), (sX, sY, sX, sY))
                out[b] += win[dd[b, :, n, 0], dd[b, :, n, 1]]
        return out
    # Training: a differentiable gather (its index is saved for backward).
    flat = rp.reshape(B, N, Xp * Yp)
    base = (torch.arange(X, device=r.device)[:, None] * Yp + torch.arange(Y, device=r.device)[None]).reshape(-1)
    off = (d[..., 0] + pad) * Yp + (d[..., 1] + pad)  # (B, R, N)
    out = []
    step = max(1, (1 << 22) // max(B * N * X * Y, 1))  # rotations per chunk
    for k in range(0, R, step):
        idx = off[:, k : k + step, :, None] + base  # (B, R', N, X*Y)
        g = flat[:, None].expand(B, idx.shape[1], N, Xp * Yp).gather(3, idx)
        out.append(g.sum(2))
    return torch.cat(out, 1).reshape(B, R, X, Y)


def _interp_volume(vol: Tensor, idx: Tensor) -> Tensor:
    """Trilinear interpolation of (B, R, X, Y) at continuous indices (B, 3) = (r, i, j); the angle
    axis wraps around, positions clamp to the volume. -> (B,)"""
    B, R, X, Y = vol.shape
    r, i, j = idx.unbind(-1)
    i, j = i.clamp(0, X - 1), j.clamp(0, Y - 1)
    r0, i0, j0 = r.floor(), i.floor().clamp(max=X - 2 if X > 1 else 0), j.floor().clamp(max=Y - 2 if Y > 1 else 0)
    fr, fi, fj = r - r0, i - i0, j - j0
    out = torch.zeros(B, dtype=vol.dtype, device=vol.device)
    b = torch.arange(B, device=vol.device)
    for dr in (0, 1):
        for di in (0, 1):
            for dj in (0, 1):
                wgt = (fr if dr else 1 - fr) * (fi if di else 1 - fi) * (fj if dj else 1 - fj)
                rr = (r0.long() + dr) % R
                ii = (i0.long() + di).clamp(max=X - 1)
                jj = (j0.long() + dj).clamp(max=Y - 1)
                v = vol[b, rr, ii, jj]
                out = out + wgt * v
    return out
