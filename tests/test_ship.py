"""`python -m training.ship`: the shipped model's record keeps the whole schedule of its lineage."""

from __future__ import annotations

import hashlib
import json

from test_chunks import small_store_path

from neuralmaps.config import preset
from neuralmaps.models import SNAP


def test_ship_keeps_where_each_earlier_run_first_shipped(tmp_path, tmp_path_factory, monkeypatch):
    from training import ship

    store = small_store_path(tmp_path_factory)
    dest = tmp_path / "weights" / "snap-test.pt"
    dest.parent.mkdir()
    monkeypatch.setattr(SNAP, "pretrained_path", staticmethod(lambda name="snap-cpu-tiny": dest))
    shas = []
    for k in range(3):  # three runs, each warm-started from the weights shipped before it
        run = tmp_path / f"run{k}"
        run.mkdir()
        model = SNAP(preset("cpu-tiny"))
        model.save(run / "localization_last.pt")
        (run / "runs.jsonl").write_text(json.dumps({"started": f"run{k}", "init": "pretrained"}) + "\n")
        assert ship.main(["--run", str(run), "--data", str(store), "--name", "snap-test"]) == 0
        shas.append(json.loads(dest.with_suffix(".json").read_text())["sha256"][:12])
    runs = json.loads(dest.with_suffix(".json").read_text())["runs"]
    assert [r["started"] for r in runs] == ["run0", "run1", "run2"]
    assert [r.get("shipped_as") for r in runs] == [shas[0], shas[1], None]


def test_ship_sets_runtime_knobs_and_refuses_architecture(tmp_path, tmp_path_factory, monkeypatch, capsys):
    # A run started before cpu-tiny evaluated on every query cell ships with the new knob; its
    # weights are the run's. Anything the weights depend on cannot be changed at shipping.
    import torch

    from training import ship

    store = small_store_path(tmp_path_factory)
    dest = tmp_path / "weights" / "snap-test.pt"
    dest.parent.mkdir()
    monkeypatch.setattr(SNAP, "pretrained_path", staticmethod(lambda name="snap-cpu-tiny": dest))
    run = tmp_path / "run"
    run.mkdir()
    old = SNAP(preset("cpu-tiny").with_overrides(["model.num_query_points=256", "model.train_query_points=null"]))
    old.save(run / "localization_last.pt")
    argv = ["--run", str(run), "--data", str(store), "--name", "snap-test"]
    assert ship.main(argv + ["--set", "model.num_query_points=null", "model.train_query_points=256"]) == 0
    shipped = SNAP.load(dest)
    assert shipped.config.model.num_query_points is None and shipped.config.model.train_query_points == 256
    assert shipped.localizer.num_points is None and shipped.localizer.train_points == 256
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), shipped.state_dict().values()))
    assert json.loads(dest.with_suffix(".json").read_text())["sha256"] == hashlib.sha256(dest.read_bytes()).hexdigest()

    before = dest.read_bytes()
    assert ship.main(argv + ["--set", "model.matching_dim=8"]) == 2
    assert "runtime knobs only" in capsys.readouterr().err and dest.read_bytes() == before


def test_ship_counts_a_warm_starts_training_blocks_as_training_did(tmp_path, tmp_path_factory, monkeypatch):
    # training.train --init pretrained (without --new-areas) trains only on the shipped model's
    # training blocks; its ship must not list the store's other train blocks as trained on, or the
    # areas the model is evaluated on would be wrongly given up (session 10: the demo area).
    import zarr

    from neuralmaps.data import SceneDataset
    from training import ship

    store = small_store_path(tmp_path_factory)
    blocks = zarr.open_group(str(store), mode="r")["block"][:]
    train = sorted({tuple(int(v) for v in blocks[i]) for i in SceneDataset(store, "train").indices})
    elsewhere = (0, 0)  # the previous model's only training block, not in this store
    assert train and elsewhere not in train
    dest = tmp_path / "weights" / "snap-test.pt"
    dest.parent.mkdir()
    monkeypatch.setattr(SNAP, "pretrained_path", staticmethod(lambda name="snap-cpu-tiny": dest))
    card = dest.with_suffix(".json")
    for flag, want in ((True, [elsewhere]), (False, sorted([elsewhere, *train]))):
        SNAP(preset("cpu-tiny")).save(dest)
        card.write_text(json.dumps({"sha256": "0" * 64, "runs": [], "training_blocks": [list(elsewhere)]}))
        run = tmp_path / f"run-{flag}"
        run.mkdir()
        SNAP(preset("cpu-tiny")).save(run / "localization_last.pt")
        (run / "runs.jsonl").write_text(json.dumps({"init": "pretrained", "only_shipped_training_blocks": flag}) + "\n")
        assert ship.main(["--run", str(run), "--data", str(store), "--name", "snap-test"]) == 0
        assert [tuple(b) for b in json.loads(card.read_text())["training_blocks"]] == want
