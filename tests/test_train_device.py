"""The training loop on the model's device (CPU here; CUDA too where there is one), and a run
resumed on another device. Needs only torch: no store, no GIS stack."""

from __future__ import annotations

import math

import torch

from models_helpers import tiny_batch, tiny_config
from neuralmaps.models import SNAP
from neuralmaps.training import evaluate_localization, train


def _pairs(cfg, n: int = 4) -> list[dict]:
    batch = tiny_batch(cfg, B=n, seed=5)
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def test_train_runs_on_the_models_device_and_resumes_on_another(tmp_path, device):
    cfg = tiny_config(norm="batch")
    cfg.train.distractor_scenes = 1  # the rows draw from the loop's generator (a CUDA one on a GPU)
    cfg.model.refined_negatives = True
    pairs, out = _pairs(cfg), tmp_path / "run"
    torch.manual_seed(0)
    model = SNAP(cfg).to(device)
    common = dict(batch_size=2, out_dir=out, ckpt_every=2, log_every=1, eval_every=0, progress=False, seed=3)
    records = train(model, pairs, steps=4, **common)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in records), records
    assert {p.device.type for p in model.parameters()} == {torch.device(device).type}
    state = torch.load(out / "localization_state.pt", weights_only=True, map_location="cpu")
    assert state["step"] == 4 and state["generator_device"] == torch.device(device).type
    # The checkpoint holds the weights trained on the device, as CPU tensors.
    saved = SNAP.load(out / "localization_last.pt").state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(saved[name], value.cpu()), name
    metrics = evaluate_localization(model, pairs, batch_size=2)
    assert metrics.summary()["num_queries"] == 4 and all(math.isfinite(e) for e in metrics.err_xy_m)

    # Resume on the CPU (another device when the first part ran on CUDA): the weights and the
    # optimiser come along, the loop continues at step 5, and the semantic stage runs after it.
    resumed = SNAP(cfg)
    more = train(resumed, pairs, steps=6, **common)
    assert [r["step"] for r in more] == [5, 6]
    sem = train(resumed, pairs, steps=2, stage="semantics", **common)
    assert [r["step"] for r in sem] == [1, 2] and all(math.isfinite(r["loss"]) for r in sem)


def test_the_training_loop_imports_without_the_gis_stack():
    """A GPU machine with torch alone can run the loop on in-memory batches (as the test above)."""
    import subprocess
    import sys

    code = ("import sys, neuralmaps.training; heavy = {'rasterio', 'pyproj', 'rioxarray', 'zarr', 'dask', 'geopandas'}; "
            "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


def test_train_cli_refuses_a_device_it_does_not_have(tmp_path, capsys):
    import pytest

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from training.train import main  # the CLI reads stores: it needs the GIS stack

    assert main(["--data", str(tmp_path / "none.zarr"), "--out", str(tmp_path / "run"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sees no CUDA device" in err[0], err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_device_name_resolves_one_way_and_a_bad_one_gets_one_clear_error():
    import pytest

    from neuralmaps.devices import DeviceError, resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    with pytest.raises(DeviceError, match="'gpu'.*use cpu, cuda, cuda:N or auto"):
        resolve_device("gpu")
    with pytest.raises(DeviceError, match="'cuda:99'"):
        resolve_device("cuda:99")  # no CUDA here, or fewer than 100 devices


def test_evaluation_and_map_builds_refuse_a_bad_device_before_reading_anything(tmp_path, capsys):
    import pytest

    from neuralmaps.devices import DeviceError
    from neuralmaps.maps.workers import model_from_bytes
    from training.evaluate import main as evaluate

    # The store does not exist: the device is refused before it (or the checkpoint) is opened.
    code = evaluate(["--checkpoint", "pretrained", "--data", str(tmp_path / "none.zarr"),
                     "--out", str(tmp_path / "ev"), "--device", "cuda:99", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --device 'cuda:99'"), err
    assert not (tmp_path / "ev").exists()
    with pytest.raises(DeviceError, match="'tpu'"):
        model_from_bytes(b"", "tpu", None)  # a Dask worker told the wrong device: before the payload is read
