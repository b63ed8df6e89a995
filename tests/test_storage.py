"""neuralmaps.storage (atomic writes, swaps, the writer lock) and the store's output-path checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from neuralmaps.storage import (
    StorageError,
    StoreInUseError,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    check_writable_parent,
    lock_path,
    remove_stale_temps,
    swap_into_place,
    temp_sibling,
    writer_lock,
)


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- atomic files ------------------------------------------------------------------------------------
def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a.json"
    atomic_write_text(p, "old")
    atomic_write_bytes(p, b"new bytes")
    assert p.read_bytes() == b"new bytes"
    assert _entries(tmp_path) == ["a.json"]


def test_failed_write_keeps_the_old_file_and_removes_its_temp(tmp_path):
    p = tmp_path / "ckpt.pt"
    atomic_write_text(p, "good")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert p.read_text() == "good" and _entries(tmp_path) == ["ckpt.pt"]


def test_temp_names_are_unique_and_hidden_siblings(tmp_path):
    names = {temp_sibling(tmp_path / "s.zarr", "tmp") for _ in range(100)}
    assert len(names) == 100
    assert all(n.parent == tmp_path and n.name.startswith(".s.zarr.tmp-") for n in names)


# -- directories -------------------------------------------------------------------------------------
@pytest.mark.parametrize("exists", [False, True])
def test_swap_into_place(tmp_path, exists):
    target, new = tmp_path / "store", tmp_path / ".store.new-1"
    if exists:
        target.mkdir()
        (target / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    swap_into_place(new, target)
    assert _entries(target) == ["new.txt"] and _entries(tmp_path) == ["store"]


def test_remove_stale_temps_only_removes_its_targets_temps(tmp_path):
    for name in (".s.zarr.tmp-1", ".s.zarr.new-2", ".s.zarr.old-3", ".other.zarr.tmp-4", "s.zarr"):
        (tmp_path / name).mkdir()
    (tmp_path / ".s.zarr.tmp-5").write_text("file")
    remove_stale_temps(tmp_path / "s.zarr")
    assert _entries(tmp_path) == [".other.zarr.tmp-4", "s.zarr"]


# -- paths -------------------------------------------------------------------------------------------
def test_check_writable_parent(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError, match="is a file, not a folder"):
        check_writable_parent(tmp_path / "f" / "sub" / "s.zarr")
    with pytest.raises(StorageError, match="empty"):
        check_writable_parent("")
    assert check_writable_parent(tmp_path / "new" / "deeper" / "s.zarr") == tmp_path / "new" / "deeper" / "s.zarr"
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        with pytest.raises(StorageError, match="not writable"):
            check_writable_parent(ro / "s.zarr")


# -- the writer lock ---------------------------------------------------------------------------------
def test_second_writer_is_refused_at_once_naming_the_holder(tmp_path):
    target = tmp_path / "s.zarr"
    with writer_lock(target) as lp:
        assert lp == lock_path(target)
        t = time.perf_counter()
        with pytest.raises(StoreInUseError, match=rf"is in use.*pid {os.getpid()} on host"):
            with writer_lock(target):
                pass
        assert time.perf_counter() - t < 1.0
    with writer_lock(target):  # released: the next writer gets it
        pass
    assert not target.exists()  # the lock never creates the store


def test_lock_of_a_killed_writer_is_free(tmp_path):
    """The lock is an OS lock: a SIGKILLed holder leaves no stale lock (its holder note may stay)."""
    target = tmp_path / "s.zarr"
    code = ("import sys, os, signal; from neuralmaps.storage import writer_lock\n"
            "with writer_lock(sys.argv[1]):\n    print('held', flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    r = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=120)
    assert r.returncode == -9 and "held" in r.stdout
    assert json.loads((tmp_path / ".s.zarr.lock.holder").read_text())["pid"] != os.getpid()
    with writer_lock(target):
        pass


# -- the training store's output checks --------------------------------------------------------------
def test_check_output_recognises_only_neuralmaps_stores(tmp_path, monkeypatch):
    from neuralmaps.config import preset
    from neuralmaps.data.store import check_output, create_store

    assert check_output(tmp_path / "new.zarr") == (tmp_path / "new.zarr", "new")
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty")[1] == "new"
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("keep")
    for overwrite in (False, True):
        with pytest.raises(StorageError, match="not a neuralmaps training-chunk store.*nothing was touched"):
            check_output(data, overwrite)
    (data / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    with pytest.raises(StorageError, match="not a neuralmaps"):  # a zarr store, but not ours
        check_output(data, True)
    with pytest.raises(StorageError, match="is a file"):
        check_output(data / "notes.txt", True)
    with pytest.raises(StorageError, match="is a file, not a folder"):
        check_output(data / "notes.txt" / "s.zarr")
    with pytest.raises(StorageError, match="empty"):
        check_output("")
    monkeypatch.chdir(data)
    for p in (".", str(tmp_path)):
        with pytest.raises(StorageError, match="current folder"):
            check_output(p, True)
    s = create_store(tmp_path / "s.zarr", 2, preset("cpu-tiny"), "EPSG:32635", {"seed": 1})
    assert check_output(s, True) == (s, "store")
    assert (data / "notes.txt").read_text() == "keep" and _entries(tmp_path) == ["data", "empty", "s.zarr"]


def test_create_store_template_is_empty_and_reads(tmp_path):
    import xarray as xr

    from neuralmaps.config import preset
    from neuralmaps.data.store import STORE_KIND, StoreWriter, create_store, open_existing, schema

    cfg = preset("cpu-tiny")
    s = create_store(tmp_path / "s.zarr", 3, cfg, "EPSG:32635", {"seed": 1, "num_pairs": 3, "config": json.dumps(cfg.to_dict())},
                     pairs_per_chunk=2)
    ds = xr.open_zarr(s, decode_coords="all")
    assert ds.rio.crs.to_epsg() == 32635 and ds.attrs["neuralmaps_store"] == STORE_KIND and ds.sizes["pair"] == 3
    assert not open_existing(s, {"seed": 1}).any()
    with pytest.raises(ValueError, match="seed=1.*--overwrite"):
        open_existing(s, {"seed": 2})
    item = {name: np.ones(shape, dtype) for name, (_, shape, dtype, _) in schema(cfg).items()}
    with StoreWriter(s, cfg) as w:
        with pytest.raises(ValueError, match="not one chunk"):
            w.write(1, [item])
        w.write(2, [item])  # the last, partial chunk
    assert open_existing(s, {}).tolist() == [False, False, True]
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]  # no temp left
