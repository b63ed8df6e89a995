"""Resume after a real SIGKILL of `neuralmaps synth` (issue 7): killed between a pair's data and its
done marker, and at random moments, then rerun; the store equals an uninterrupted one."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from test_cli import ENV, SMALL_BBOX

# Kills the writer with SIGKILL right after pair 1's data is written, before its done marker.
KILL_BEFORE_MARKER = """
import os, signal, sys
from neuralmaps.data import store
write_marker = store.StoreWriter._mark_done
def mark(self, sl):
    if sl.start == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    write_marker(self, sl)
store.StoreWriter._mark_done = mark
from neuralmaps.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _read(path) -> tuple[dict, dict]:
    import zarr

    g = zarr.open_group(str(path), mode="r")
    return dict(g.attrs), {name: np.asarray(a[...]) for name, a in g.arrays()}


@pytest.mark.slow
@pytest.mark.timeout(1800)  # five short `neuralmaps synth` runs (about 20 s each on a quiet 2-core machine)
def test_sigkill_then_resume_equals_an_uninterrupted_store(tmp_path):
    from neuralmaps.data import SceneDataset
    from neuralmaps.data.store import SPLIT_NAMES

    def args(out):
        return ["synth", "--osm", "helsinki", "--bbox", SMALL_BBOX, "--out", str(out), "--pairs", "3", "--seed", "0",
                "--map-runs", "3", "--query-runs", "2", "--quiet"]

    cli = [sys.executable, "-m", "neuralmaps.cli"]
    t = time.monotonic()
    r = subprocess.run([*cli, *args(tmp_path / "ref.zarr")], capture_output=True, text=True, env=ENV, timeout=900)
    assert r.returncode == 0, r.stderr
    full_s = time.monotonic() - t

    out = tmp_path / "c.zarr"
    r = subprocess.run([sys.executable, "-c", KILL_BEFORE_MARKER, *args(out)], capture_output=True, text=True,
                       env=ENV, timeout=900)
    assert r.returncode == -signal.SIGKILL, r.stderr
    _, a = _read(out)
    assert a["pair_done"].tolist() == [True, False, False] and a["query_image"][1].any()  # data, no marker
    served = [int(SceneDataset(out, s)[k]["index"]) for s in SPLIT_NAMES for k in range(len(SceneDataset(out, s)))]
    assert served == [0]  # a pair without its marker is never served

    rng = np.random.default_rng()
    moments = sorted(rng.uniform(0.1, 1.0, 2) * full_s)
    for delay in moments:  # anywhere: imports, world build, template, pair data, markers
        p = subprocess.Popen([*cli, *args(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    r = subprocess.run([*cli, *args(out)], capture_output=True, text=True, env=ENV, timeout=900)
    assert r.returncode == 0, (moments, r.stderr)

    (ref_attrs, ref), (got_attrs, got) = _read(tmp_path / "ref.zarr"), _read(out)
    assert got["pair_done"].all()
    assert set(got) == set(ref)
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=f"{name} (kills at {moments} s)")
    assert got_attrs == ref_attrs
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".c.zarr.lock", ".ref.zarr.lock", "c.zarr", "ref.zarr"], left  # no temp left behind
