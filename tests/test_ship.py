"""`python -m training.ship`: the shipped model's record keeps the whole schedule of its lineage."""

from __future__ import annotations

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
