"""Data and model fit together: cpu-tiny trained for 100 steps on two dozen digital-twin pairs.

The localization loss must fall and the recall on those pairs must rise; the checkpoint written by
the loop must reload and a rerun must resume instead of starting over. This is the end-to-end proof
that the store, SceneDataset, the SNAP model and the training loop agree on frames and shapes.
(~3 min on 2 CPU cores.)
"""

from __future__ import annotations

import json

import pytest
import torch
from test_chunks import write_small
from torch.utils.data import ConcatDataset

from neuralmaps.config import preset
from neuralmaps.data import SceneDataset
from neuralmaps.models import SNAP
from neuralmaps.training import evaluate_localization, train

NUM_PAIRS = 24
STEPS = 100


@pytest.mark.slow
def test_cpu_tiny_learns_to_localize_on_twin_pairs(tmp_path):
    store = write_small(tmp_path / "fit.zarr", num_pairs=NUM_PAIRS)
    pairs = ConcatDataset([SceneDataset(store, s) for s in ("train", "val", "test")])
    assert len(pairs) == NUM_PAIRS

    torch.manual_seed(0)
    model = SNAP(preset("cpu-tiny"))
    before = evaluate_localization(model, pairs)
    out = tmp_path / "run"
    records = train(model, pairs, steps=STEPS, batch_size=2, lr=1e-3, log_every=10, out_dir=out, progress=False)
    after = evaluate_localization(model, pairs)

    losses = [r["loss"] for r in records]
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    assert after.recall(3.0) >= before.recall(3.0) + 0.3, (before.summary(), after.summary())
    assert after.recall(1.0) > before.recall(1.0), (before.summary(), after.summary())
    assert after.summary()["median_err_xy_m"] < before.summary()["median_err_xy_m"]

    # The loop's artefacts: log, config, checkpoint that reloads to the same weights, resumable state.
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(10, STEPS + 1, 10))
    assert (out / "config.yaml").is_file()
    reloaded = SNAP.load(out / "localization_last.pt")
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert train(model, pairs, steps=STEPS, batch_size=2, out_dir=out, progress=False) == []
