"""Is localization limited by the search or by the scores? RANSAC vs voting vs their union, per query.

For each held-out pair: one map (street view + aerial) and one query BEV, then on the same query
points (every valid query cell)
- `ransac`, `voting`: the localizer's two modes as `training.evaluate` runs them;
- `union_maps`: both modes' refined top-k candidates pooled and refined again under RANSAC's
  objective (per-point log-ratio maps, bilinear), the best kept;
- `union_feats`: the same pool refined under voting's objective (map features interpolated, then
  the cosine), the best kept;
- `ransac_feats`: RANSAC's candidates re-refined under voting's objective;
- `oracle`: a query counts when RANSAC or voting is right (what a perfect arbiter would reach).
If a union falls well short of the oracle, the wrong pose scores higher than the right one that the
other mode found: the model's scores, not the search, are the limit.

This reaches into `Localizer`'s internals (`_sample_points`, `_ransac`, `_voting`, `_refine`,
`_score_maps`, `_score_feats`) on purpose: it asks what the localizer's pieces would do if combined.

    python benchmarks/search_vs_score.py --data outputs/heltestB_any.zarr outputs/demoarea_any.zarr --limit 100

Progress goes to stderr; the LAST stdout line is one JSON object: recall at (1 m, 1°), (3 m, 3°),
(5 m, 5°) per method, and the query count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

THRESHOLDS = (1.0, 3.0, 5.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", required=True, help="stores made by `neuralmaps synth` (split all)")
    ap.add_argument("--checkpoint", default="pretrained")
    ap.add_argument("--limit", type=int, default=100, help="pairs per store")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from neuralmaps.evaluation import _loader, _true_pose, build_map, load_model, open_eval_data, pose_errors
    from neuralmaps.geometry import Transform2D
    from neuralmaps.models.localizer import _log_ratio, _normalize_masked

    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint).eval()
    loc = model.localizer
    errors: dict[str, list[tuple[float, float]]] = {}

    def add(name: str, T_gt, angle, t) -> None:
        d_m, d_deg = pose_errors(T_gt, Transform2D(angle, t))
        errors.setdefault(name, []).append((float(d_m[0]), float(d_deg[0])))

    with torch.no_grad():
        for path in args.data:
            data = open_eval_data(path, "all", config=model.config)
            loader, n = _loader(data, args.limit)
            for k, batch in enumerate(loader):
                idx = int(batch["index"][0])
                nmap = build_map(model, batch, ["streetview", "aerial"])
                T_gt = _true_pose(batch)
                q = model.query(batch, torch.Generator().manual_seed(idx))
                mv, cell = nmap.valid.bool(), nmap.cell_m
                f, p, w = loc._sample_points(q.features.float(), q.valid.bool(), model.query_xy,
                                             torch.Generator().manual_seed(idx))
                m = _normalize_masked(nmap.matching.float(), mv)
                out_r = loc._ransac(m, mv, f, p, w, cell, None, None, torch.Generator().manual_seed(idx))
                out_v = loc._voting(m, mv, f, p, w, cell, None, None, 64)
                add("ransac", T_gt, out_r.T_map_query.angle, out_r.T_map_query.t)
                add("voting", T_gt, out_v.T_map_query.angle, out_v.T_map_query.t)

                centre = (p * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)
                r = loc._relu_sims(f, m)
                if loc.point_scores == "log_ratio":
                    r = _log_ratio(r, mv)
                c = loc._point_constants(f, m, mv)
                vmask = None if bool(mv.all()) else mv[:, None].to(m.dtype)
                objectives = {
                    "maps": lambda a, tt: loc._score_maps(r, p, w, a, tt, cell),
                    "feats": lambda a, tt: loc._score_feats(m, vmask, f, c, p, w, a, tt, cell),
                }
                pool_a = torch.cat([out_r.topk.angle, out_v.topk.angle], 1)
                pool_t = torch.cat([out_r.topk.t, out_v.topk.t], 1)
                starts = {"union_maps": ("maps", pool_a, pool_t), "union_feats": ("feats", pool_a, pool_t),
                          "ransac_feats": ("feats", out_r.topk.angle, out_r.topk.t)}
                for name, (obj, a0, t0) in starts.items():
                    a, t, _ = loc._refine(objectives[obj], a0, t0, centre, step_t=cell / 2,
                                          step_r=math.radians(0.5), cell_m=cell, prior=None)
                    add(name, T_gt, a[:, 0], t[:, 0])
                print(f"{Path(path).name} {k + 1}/{n}", file=sys.stderr, flush=True)

    def recall(errs, th) -> float:
        return sum(e_m < th and e_deg < th for e_m, e_deg in errs) / len(errs)

    out: dict[str, object] = {"num_queries": len(errors["ransac"]), "checkpoint": args.checkpoint}
    for th in THRESHOLDS:
        tag = f"{th:g}m_{th:g}deg"
        for name, errs in errors.items():
            out[f"{name}_recall_{tag}"] = round(recall(errs, th), 3)
        both = zip(errors["ransac"], errors["voting"])
        out[f"oracle_recall_{tag}"] = round(
            sum((a[0] < th and a[1] < th) or (b[0] < th and b[1] < th) for a, b in both) / len(errors["ransac"]), 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
