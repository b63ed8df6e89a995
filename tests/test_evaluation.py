"""Evaluation (neuralmaps.evaluation, python -m training.evaluate, training/plot.py): metrics on
constructed errors, no semantic leakage into the evaluated map, the baselines (prior at chance, the
inverse perspective mapping of the aerial-RGB baseline), the CLI end to end and its errors.

Uses the shared small store of test_chunks (6 Helsinki pairs over train, val and test) and a
random cpu-tiny SNAP.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from neuralmaps import evaluation as ev
from neuralmaps import geometry
from neuralmaps.config import AREA_CLASSES, CLASS_NAMES, preset
from neuralmaps.models import SNAP

from test_chunks import NUM_PAIRS, small_store_path

ROOT = Path(__file__).resolve().parents[1]
CONTRACT_KEYS = ("recall_1m_1deg", "recall_3m_3deg", "recall_5m_5deg", "median_error_m", "median_error_deg",
                 "num_queries", "modalities")


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Path:
    return small_store_path(tmp_path_factory)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "random.pt"
    SNAP(preset("cpu-tiny")).save(path)
    return path


@pytest.fixture(scope="session")
def model(checkpoint) -> SNAP:
    return SNAP.load(checkpoint)


def _batch(data: ev.EvalData, k: int = 0) -> dict:
    return {key: v[None] for key, v in data.dataset[k].items()}


# -- metrics on constructed errors -----------------------------------------------------------------
def test_recall_summary_thresholds_are_inclusive_and_joint():
    err_m = [0.5, 1.0, 2.9, 3.0, 4.0, 20.0]
    err_deg = [0.2, 1.5, 2.0, 3.0, 0.1, 90.0]
    s = ev.recall_summary(err_m, err_deg)
    assert s["recall_0.5m"] == pytest.approx(1 / 6) and s["recall_1m"] == pytest.approx(2 / 6)
    assert s["recall_5m"] == pytest.approx(5 / 6) and s["recall_1deg"] == pytest.approx(2 / 6)
    assert s["recall_1m_1deg"] == pytest.approx(1 / 6)  # (1.0, 1.5) fails on heading
    assert s["recall_3m_3deg"] == pytest.approx(4 / 6)  # (4.0, 0.1) fails on position
    assert s["recall_5m_5deg"] == pytest.approx(5 / 6)
    assert s["median_error_m"] == pytest.approx(2.95) and s["median_error_deg"] == pytest.approx(1.75)
    assert s["num_queries"] == 6
    assert math.isnan(ev.recall_summary([], [])["recall_1m_1deg"])


def test_pose_errors_position_and_wrapped_heading():
    T_gt = geometry.Transform2D(torch.tensor([0.3, 3.0]), torch.tensor([[1.0, 2.0], [5.0, 5.0]]))
    T_est = geometry.Transform2D(torch.tensor([0.3 + math.radians(10), -3.0]), torch.tensor([[4.0, 6.0], [5.0, 5.0]]))
    d_m, d_deg = ev.pose_errors(T_gt, T_est)
    assert d_m.tolist() == pytest.approx([5.0, 0.0], abs=1e-5)
    assert d_deg.tolist() == pytest.approx([10.0, 360 - math.degrees(6.0)], abs=1e-3)


def test_semantic_confusion_iou_recall_accuracy():
    from neuralmaps.models.semantic import NUM_AREA

    K, X, Y = len(CLASS_NAMES), 4, 5
    sem = torch.zeros(1, K, X, Y)
    sem[0, AREA_CLASSES.index("road"), :2] = 1  # 10 road cells
    sem[0, AREA_CLASSES.index("building"), 2:] = 1  # 10 building cells
    areas = torch.zeros(1, NUM_AREA, X, Y)
    areas[0, AREA_CLASSES.index("road")] = 1.0
    areas[0, AREA_CLASSES.index("building"), 3:] = 2.0  # predicts building on 5 of 10 building cells
    logits = {"areas": areas, "objects": torch.zeros(1, 4, X, Y), "binary": -torch.ones(1, 3, X, Y)}
    valid = torch.ones(1, X, Y, dtype=torch.bool)
    c = ev.SemanticConfusion()
    c.add(logits, sem, valid)
    s = c.summary()["areas"]
    assert s["iou"]["road"] == pytest.approx(10 / 15) and s["iou"]["building"] == pytest.approx(5 / 10)
    assert s["recall"]["road"] == pytest.approx(1.0) and s["recall"]["building"] == pytest.approx(0.5)
    assert s["accuracy"] == pytest.approx(15 / 20) and s["num_cells"] == 20
    assert s["iou"]["crosswalk"] is None  # absent from prediction and ground truth: out of the mean
    assert s["miou"] == pytest.approx((10 / 15 + 0.5) / 2)
    # Invalid map cells do not count.
    c2 = ev.SemanticConfusion()
    valid2 = valid.clone()
    valid2[0, 2:] = False
    c2.add(logits, sem, valid2)
    assert c2.summary()["areas"]["num_cells"] == 10 and c2.summary()["areas"]["miou"] == pytest.approx(1.0)


# -- data, modalities, leakage -----------------------------------------------------------------------
def test_open_eval_data_splits_and_metadata(store):
    everything = ev.open_eval_data(store, "all")
    assert len(everything) == NUM_PAIRS
    assert [int(everything.dataset[k]["index"]) for k in range(NUM_PAIRS)] == list(range(NUM_PAIRS))
    n = 0
    for s in ("train", "val", "test"):
        try:
            d = ev.open_eval_data(store, s)
        except ev.EvaluationError:
            continue
        n += len(d)
        for k in range(len(d)):
            idx = int(d.dataset[k]["index"])
            assert d.pair_split[idx] == s
    assert n == NUM_PAIRS
    assert set(everything.pair_query_type) <= {"car", "pedestrian"}
    assert all("," in b for b in everything.pair_block)


@pytest.mark.parametrize("modalities, changed", [
    (("streetview", "aerial"), ("semantic",)),
    (("aerial",), ("semantic", "map_images")),
    (("streetview",), ("semantic", "aerial")),
])
def test_map_ignores_inputs_of_modalities_not_evaluated(store, model, modalities, changed):
    """No leakage: the map that is localized against and decoded for semantics does not change when the
    inputs of the other modalities (the semantic raster above all) are replaced."""
    data = ev.open_eval_data(store, "all", config=model.config)
    batch = _batch(data)
    with torch.no_grad():
        ref = ev.build_map(model, batch, modalities)
        other = dict(batch)
        for k in changed:
            other[k] = torch.rand_like(batch[k]) if k != "semantic" else 1 - batch[k]
        alt = ev.build_map(model, other, modalities)
        with_sem = ev.build_map(model, other, modalities + ("semantic",))
    assert torch.equal(ref.features, alt.features) and torch.equal(ref.matching, alt.matching)
    # ... while the inputs of an evaluated modality do reach the map (the test can fail).
    assert (with_sem.features - alt.features).abs().max() > 1e-3


def test_evaluate_model_on_device_is_reproducible(store, checkpoint, device):
    """A direct run (one query, both modes, semantics) on each reachable device: the RANSAC result is
    the same for a given seed, and every output is filled."""
    model = SNAP.load(checkpoint)
    data = ev.open_eval_data(store, "all", config=model.config)
    runs = [ev.evaluate_model(model, data, limit=1, seed=3, progress=False, device=device) for _ in range(2)]
    r0, r1 = runs[0]["results"], runs[1]["results"]
    assert [r.mode for r in r0] == ["ransac", "voting"]
    assert r0[0].err_m == pytest.approx(r1[0].err_m, abs=1e-4) and r0[0].err_deg == pytest.approx(r1[0].err_deg, abs=1e-3)
    assert r0[0].query_type in ("car", "pedestrian") and r0[0].time_s > 0
    assert runs[0]["semantic"].areas.sum() > 0 and len(runs[0]["scenes"]) == 1


def test_unknown_modality_is_refused():
    with pytest.raises(ev.EvaluationError, match="modalities"):
        ev.parse_modalities("streetview,lidar")
    assert ev.parse_modalities("aerial,streetview") == ("streetview", "aerial")


# -- baselines --------------------------------------------------------------------------------------
def test_prior_baseline_is_at_chance(store):
    data = ev.open_eval_data(store, "all")
    data.dataset = [data.dataset[k] for k in range(len(data))]  # read the pairs once for the 40 draws
    errs_m, errs_deg, dist = [], [], []
    for seed in range(40):
        res = ev.evaluate_prior(data, seed=seed, progress=False)["results"]
        errs_m += [r.err_m for r in res]
        errs_deg += [r.err_deg for r in res]
        dist += [r.dist_to_centre_m for r in res]
    # Position: exactly the distance of the query to the scene centre.
    assert np.allclose(errs_m, dist, atol=1e-4)
    # Heading: uniform on [0, 180] -> mean 90, and joint recall at (5 m, 45 deg) = P(d <= 5 m) / 4.
    n = len(errs_deg)
    assert abs(np.mean(errs_deg) - 90) < 4 * 52 / math.sqrt(n)
    p = ev.prior_chance_recall(dist, 5.0, 45.0)
    assert 0 < p < 1
    got = np.mean([(m <= 5) and (d <= 45) for m, d in zip(errs_m, errs_deg)])
    assert abs(got - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-9


def test_ground_projection_aligns_with_the_aerial_at_the_true_pose(store):
    """Inverse perspective mapping: the query's ground colours correlate with the orthophoto at the true
    pose far better than at poses rotated by 40 deg or shifted by 3 m (measured: ~0.4 vs ~0.1)."""
    from neuralmaps.models.bev import camera_in_query_bev, query_grid

    data = ev.open_eval_data(store, "all")
    scene = data.store_config.scene
    qxy, inside = query_grid(scene)
    gt, off = [], []
    for k in range(len(data)):
        b = _batch(data, k)
        T = geometry.Transform3D.from_matrix(b["query_T_scene_cam"])
        rgb, valid = ev.ground_rgb(b["query_image"], b["query_camera"], camera_in_query_bev(T).matrix(), qxy)
        valid = valid & inside
        assert valid.sum() > 0.8 * inside.sum()  # a level camera sees most of the frustum's ground
        fq = ev.rgb_features(rgb, valid)[0]
        fm = ev.rgb_features(b["aerial"], torch.ones(1, *b["aerial"].shape[-2:], dtype=torch.bool))[0]
        T_gt = geometry.camera_pose_to_bev(T)[0]

        def corr(Tp):
            p = Tp.transform(qxy[valid[0]]) / scene.cell_m
            X, Y = fm.shape[-2:]
            ok = (p[:, 0] >= 0) & (p[:, 0] < X) & (p[:, 1] >= 0) & (p[:, 1] < Y)
            i = p[ok].floor().long()
            return float((fm[:, i[:, 0], i[:, 1]] * fq[:, valid[0]][:, ok]).sum(0).mean())

        gt.append(corr(T_gt))
        off += [corr(geometry.Transform2D(T_gt.angle + math.radians(40), T_gt.t)),
                corr(geometry.Transform2D(T_gt.angle, T_gt.t + torch.tensor([3.0, -3.0])))]
    assert np.mean(gt) > 0.2 and np.mean(gt) > np.mean(off) + 0.1, (gt, off)


# -- the command line -------------------------------------------------------------------------------
def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-m", "training.evaluate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _check_metrics(m: dict, n: int) -> None:
    for k in CONTRACT_KEYS:
        assert k in m, k
    for k in ("recall_1m_1deg", "recall_3m_3deg", "recall_5m_5deg"):
        assert 0.0 <= m[k] <= 1.0
    assert m["recall_1m_1deg"] <= m["recall_3m_3deg"] <= m["recall_5m_5deg"]
    assert m["median_error_m"] >= 0 and 0 <= m["median_error_deg"] <= 180
    assert m["num_queries"] == n


def test_cli_end_to_end_with_a_checkpoint(store, checkpoint, tmp_path, capsys):
    from training.evaluate import main

    out = tmp_path / "eval"
    assert main(["--checkpoint", str(checkpoint), "--data", str(store), "--split", "all", "--out", str(out),
                 "--limit", "3", "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    _check_metrics(m, 3)
    assert m["modalities"] == ["streetview", "aerial"]
    assert set(m["modes"]) == {"ransac", "voting"} and m["primary_mode"] == "ransac"
    assert m["recall_3m_3deg"] == m["modes"]["ransac"]["recall_3m_3deg"]
    for mode in ("ransac", "voting"):
        s = m["modes"][mode]
        assert s["time_per_query_s_median"] > 0
        assert sum(v["num_queries"] for v in s["per_query_type"].values()) == 3
        assert sum(v["num_queries"] for v in s["per_split"].values()) == 3
    assert 0 <= m["semantic_miou"] <= 1 and set(m["semantic_iou_per_class"]) == set(AREA_CLASSES)
    for png in ("recall_curves.png", "semantics.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "queries.csv").read_text().splitlines()) == 1 + 2 * 3
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["num_queries"] == 3


def test_python_m_training_evaluate_runs_as_a_module(tmp_path):
    r = _run_cli("--baseline", "prior", "--data", str(tmp_path / "missing.zarr"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.startswith("error: training-chunk store not found"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_modalities_and_mode(store, checkpoint, tmp_path):
    from training.evaluate import main

    out = tmp_path / "aerial"
    assert main(["--checkpoint", str(checkpoint), "--data", str(store), "--split", "all", "--out", str(out),
                 "--modalities", "aerial", "--mode", "voting", "--limit", "2", "--no-semantics", "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    _check_metrics(m, 2)
    assert m["modalities"] == ["aerial"] and list(m["modes"]) == ["voting"] and "semantic_miou" not in m


def test_cli_set_evaluates_a_localizer_variant_of_the_same_weights(store, checkpoint, tmp_path, capsys):
    from neuralmaps.evaluation import load_model
    from training.evaluate import main

    base, variant = load_model(checkpoint), load_model(checkpoint, ["model.proposals=softmax", "model.num_pose_samples=64"])
    assert (variant.localizer.proposals, variant.localizer.num_pose_samples) == ("softmax", 64)
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), variant.state_dict().values()))
    out = tmp_path / "softmax"
    assert main(["--checkpoint", str(checkpoint), "--data", str(store), "--split", "all", "--out", str(out), "--limit", "2",
                 "--mode", "ransac", "--no-semantics", "--quiet", "--set", "model.proposals=softmax"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    _check_metrics(m, 2)
    assert m["overrides"] == ["model.proposals=softmax"]
    capsys.readouterr()
    # a field the weights depend on is refused, in one line
    assert main(["--checkpoint", str(checkpoint), "--data", str(store), "--out", str(tmp_path / "x"),
                 "--set", "model.feature_dim=8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --set model.feature_dim: only knobs that no weight") and len(err.splitlines()) == 1


@pytest.mark.parametrize("baseline", ["prior", "aerial-rgb"])
def test_cli_baselines(store, tmp_path, baseline, capsys):
    from training.evaluate import main

    out = tmp_path / baseline
    assert main(["--baseline", baseline, "--data", str(store), "--split", "all", "--out", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    _check_metrics(m, NUM_PAIRS)
    assert m["method"] == baseline
    assert main(["--table", f"{baseline}={out}"]) == 0
    assert f"| {baseline} |" in capsys.readouterr().out
    if baseline == "prior":
        # Chance predicts P(d <= 3 m) * 3/180 <= 1.7 %: with 6 queries, no hit is by far the likeliest.
        assert m["chance"]["recall_3m_3deg"] <= 3 / 180 and m["recall_3m_3deg"] <= 1 / NUM_PAIRS
        assert m["modalities"] == []
    assert (out / "recall_curves.png").is_file()


def _empty_split_store(store: Path, tmp_path: Path) -> Path:
    import zarr

    copy = tmp_path / "nodone.zarr"
    shutil.copytree(store, copy)
    g = zarr.open_group(str(copy), mode="r+")
    done = np.asarray(g["pair_done"][:])
    done[np.asarray(g["split"][:]) == 2] = False  # no finished test pair
    g["pair_done"][:] = done
    return copy


def test_cli_errors_are_one_line_exit_2(store, checkpoint, tmp_path, capsys):
    from training.evaluate import main

    cases = [
        (["--checkpoint", str(checkpoint), "--data", str(tmp_path / "missing.zarr")], "not found"),
        (["--checkpoint", str(tmp_path / "missing.pt"), "--data", str(store)], "not found"),
        (["--checkpoint", str(checkpoint), "--data", str(store), "--split", "tset"], "unknown split"),
        (["--baseline", "prior", "--data", str(_empty_split_store(store, tmp_path)), "--split", "test"], "no finished"),
    ]
    for args, msg in cases:
        assert main([*args, "--out", str(tmp_path / "o"), "--quiet"]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and msg in err and "\n" not in err, err


def test_plot_learning_curves(tmp_path):
    from training.plot import main

    log = tmp_path / "log.jsonl"
    recs = [{"stage": "localization", "step": s, "loss": 3.0 / s, "lr": 1e-3, "median_err_xy_m": 9.0 / s}
            | ({"val/recall@3m": s / 100} if s % 20 == 0 else {}) for s in range(10, 101, 10)]
    recs += [{"stage": "semantics", "step": s, "loss": 1.0 / s, "lr": 1e-4} for s in (10, 20)]
    log.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"stage": "sem')  # killed mid-write
    png = tmp_path / "curves.png"
    assert main([str(log), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert main([str(tmp_path / "none.jsonl"), "--out", str(png)]) == 2
