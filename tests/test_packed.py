"""Packs (`neuralmaps.data.packed`, `python -m training.pack`): the pairs of a store in portable files
that serve the same items, and that `training.train` trains on without the geo stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from neuralmaps.data import SceneDataset
from neuralmaps.data.packed import PackedPairs, is_pack, write_pack

ROOT = Path(__file__).resolve().parent.parent
# The geo stack a lent GPU machine lacks: a pack must train without any of it.
GEO_STACK = ("zarr", "rioxarray", "xarray", "pyproj", "rasterio", "geopandas", "shapely", "dask", "pyrosm")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    from test_chunks import small_store_path

    return small_store_path(tmp_path_factory)


def _sources(store: Path):
    return [(SceneDataset(store, s), s) for s in ("train", "val", "test") if len(SceneDataset(store, s))]


def test_a_pack_serves_the_items_of_its_store(store, tmp_path):
    sources = _sources(store)
    # a shard budget below one pair: every pair in its own shard, the splits apart
    m = write_pack(sources, tmp_path / "p", quality=95, shard_mb=0.01, progress=False)
    assert is_pack(tmp_path / "p") and not is_pack(tmp_path)
    assert [s["pairs"] for s in m["shards"]] == [1] * sum(len(ds) for ds, _ in sources)
    for ds, split in sources:
        packed = PackedPairs(tmp_path / "p", split)
        assert len(packed) == len(ds)
        for k in range(len(ds)):
            a, b = ds[k], packed[k]
            assert a.keys() == b.keys()
            for key in a:
                assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
                if key in ("map_images", "query_image"):  # JPEG: the one loss
                    assert (a[key] - b[key]).abs().mean() < 0.012, key  # measured 0.007-0.009
                else:
                    assert torch.equal(a[key], b[key]), key
        # unused map views stay zeros
        a = ds[0]
        assert torch.equal(packed[0]["map_images"][~a["map_view_mask"]], a["map_images"][~a["map_view_mask"]])


def test_a_pack_filters_blocks_and_refuses_a_broken_copy(store, tmp_path):
    import zarr

    # every pair of the store packed as "train": three split blocks to filter
    parts = [SceneDataset(store, s) for s in ("train", "val", "test")]
    m = write_pack([(ds, "train") for ds in parts], tmp_path / "p", quality=80, progress=False)
    all_blocks = np.asarray(zarr.open_group(str(store), mode="r")["block"][:])
    blocks = [tuple(int(v) for v in all_blocks[i]) for ds in parts for i in ds.indices]
    assert len(set(blocks)) >= 2
    one = blocks[0]
    kept = PackedPairs(tmp_path / "p", "train", only_blocks={one})
    assert len(kept) == blocks.count(one) and kept.num_held_out == len(blocks) - blocks.count(one)
    assert sorted(int(kept[k]["index"]) for k in range(len(kept))) == sorted(
        int(i) for ds in parts for i in ds.indices if tuple(int(v) for v in all_blocks[i]) == one)
    train = parts[0]
    with pytest.raises(FileExistsError, match="not empty"):
        write_pack([(train, "train")], tmp_path / "p", progress=False)
    shard = tmp_path / "p" / m["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        PackedPairs(tmp_path / "p", "train")
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="shard of the pack missing"):
        PackedPairs(tmp_path / "p", "train")


def test_a_pack_that_fails_midway_leaves_nothing(store, tmp_path, monkeypatch):
    import neuralmaps.data.packed as packed

    calls = []
    real = packed._jpeg

    def failing(image, quality):
        calls.append(1)
        if len(calls) > 30:  # three pairs in: their shards are on disk by now
            assert list(tmp_path.glob(".p.tmp-*/train-00*.npz"))
            raise OSError("disk full")
        return real(image, quality)

    monkeypatch.setattr(packed, "_jpeg", failing)
    with pytest.raises(OSError, match="disk full"):
        write_pack(_sources(store), tmp_path / "p", shard_mb=0.01, progress=False)
    assert list(tmp_path.iterdir()) == []  # no pack, no shard, no temporary


def test_training_runs_on_a_pack_without_the_geo_stack(store, tmp_path):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    pack = tmp_path / "pack"
    made = subprocess.run([sys.executable, "-m", "training.pack", "--data", str(store), "--out", str(pack),
                           "--quality", "85", "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    n_train = len(SceneDataset(store, "train"))
    assert f"train: {n_train} pairs" in made.stdout
    # a fresh interpreter where every geo package fails to import, as on a machine with torch alone
    block = "import sys; [sys.modules.__setitem__(m, None) for m in %r]; " % (GEO_STACK,)
    run = ("import runpy; sys.argv = ['train'] + sys.argv[1:]; runpy.run_module('training.train', run_name='__main__')")
    out = tmp_path / "run"
    args = ["--data", str(pack), "--out", str(out), "--steps", "2", "--semantic-steps", "1", "--threads", "1",
            "--quiet", "--batch-size", "2", "--set", "train.val_limit=2"]
    done = subprocess.run([sys.executable, "-c", block + run, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "semantics_last.pt").is_file()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["stage"] == "localization"] == [2]
    assert json.loads((out / "runs.jsonl").read_text().splitlines()[0])["train_pairs"] == n_train
    # holdout areas are applied when packing, never silently skipped on a pack
    bad = subprocess.run([sys.executable, "-m", "training.train", *args, "--holdout", str(store)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "training.pack --holdout" in bad.stderr
