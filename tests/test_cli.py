"""The `neuralmaps` CLI: `synth` end to end on a small crop, resume, and one-line errors (exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from neuralmaps.cli import build_parser, main
from neuralmaps.data import SceneDataset
from neuralmaps.data.store import SPLIT_NAMES

from test_chunks import CROP, CROP_EPSG

# A ~280 m x 300 m box of central Helsinki whose 3 map runs and 2 query runs of seed 0 give train
# and test pairs (a 3-pair store is 2 train, 1 test).
SMALL_BBOX = "24.939250,60.168895,24.944310,60.171578"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "MPLBACKEND": "Agg"}


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neuralmaps.cli", *args], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=600)


def _crop_bbox() -> str:
    """The test crop as a lon/lat box, shrunk a little so its UTM bounding grid stays inside it."""
    from neuralmaps.geo.crs import crs_to_lonlat

    x0, y0, x1, y1 = CROP
    lon0, lat0 = crs_to_lonlat(x0 + 5, y0 + 5, f"EPSG:{CROP_EPSG}")
    lon1, lat1 = crs_to_lonlat(x1 - 5, y1 - 5, f"EPSG:{CROP_EPSG}")
    return f"{lon0:.6f},{lat0:.6f},{lon1:.6f},{lat1:.6f}"


def test_parser_is_a_subcommand_registry():
    p = build_parser()
    args = p.parse_args(["synth", "--osm", "x.pbf", "--out", "o.zarr", "--pairs", "3"])
    assert args.command == "synth" and args.preset == "cpu-tiny" and args.seed == 0 and args.preview is None
    with pytest.raises(SystemExit):
        p.parse_args(["synth", "--osm", "x.pbf", "--out", "o.zarr", "--pairs", "3", "--preset", "huge"])


def test_missing_pbf_exits_2_with_one_line(tmp_path):
    r = _cli("synth", "--osm", str(tmp_path / "missing.osm.pbf"), "--out", str(tmp_path / "c.zarr"), "--pairs", "2")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.osm.pbf" in lines[0] and "not found" in lines[0]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "c.zarr").exists()


@pytest.mark.parametrize(
    "extra, message", [(["--pairs", "0"], "--pairs"), (["--pairs", "2", "--bbox", "1,2,3"], "--bbox")]
)
def test_bad_arguments_exit_2(tmp_path, capsys, helsinki_pbf, extra, message):
    code = main(["synth", "--osm", helsinki_pbf, "--out", str(tmp_path / "c.zarr"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]


def test_synth_end_to_end_and_resume(tmp_path):
    import matplotlib.image as mpimg
    import rioxarray  # noqa: F401
    import xarray as xr

    out, prev = tmp_path / "c.zarr", tmp_path / "prev"
    def synth(seed: int) -> list[str]:
        return ["synth", "--osm", "helsinki", "--bbox", _crop_bbox(), "--out", str(out), "--pairs", "3",
                "--seed", str(seed), "--preview", str(prev), "--map-runs", "3", "--query-runs", "2", "--quiet"]

    args = synth(3)
    r = _cli(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ds = xr.open_zarr(out, decode_coords="all")
    assert ds.rio.crs.to_epsg() == CROP_EPSG
    assert sum(len(SceneDataset(out, split=s)) for s in SPLIT_NAMES) == 3
    pngs = sorted(prev.glob("*.png"))
    assert len(pngs) == 6  # views + BEV for each of the 3 pairs
    img = mpimg.imread(pngs[0])
    assert img.ndim == 3 and img.shape[0] > 100 and np.ptp(img[..., :3]) > 0.1

    # Rerunning the same command finds every pair done and leaves the data unchanged.
    before = np.asarray(ds["query_image"].values)
    r = _cli(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(xr.open_zarr(out)["query_image"].values, before)

    # Another seed on the same store is refused with a one-line hint.
    r = _cli(*synth(4), cwd=tmp_path)
    assert r.returncode == 2 and "--overwrite" in r.stderr and "Traceback" not in r.stderr


# -- never lose a user's data (issue 7) ---------------------------------------------------------------
def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _tree(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_never_touches_what_is_not_a_store(tmp_path, capsys, monkeypatch, helsinki_pbf):
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("keep")
    before = _tree(tmp_path)
    base = ["synth", "--osm", helsinki_pbf, "--pairs", "2", "--overwrite"]
    assert main([*base, "--out", str(data)]) == 2
    assert "not a neuralmaps training-chunk store" in _one_line(capsys)
    monkeypatch.chdir(data)
    for out in (".", "", str(tmp_path)):
        assert main([*base, "--out", out]) == 2
        assert ("empty" if out == "" else "current folder") in _one_line(capsys)
    assert main([*base, "--out", str(data / "notes.txt")]) == 2
    assert "is a file" in _one_line(capsys)
    assert main([*base, "--out", str(data / "notes.txt" / "c.zarr")]) == 2
    assert "is a file, not a folder" in _one_line(capsys)
    assert main([*base, "--out", str(tmp_path / "c.zarr"), "--preview", str(data / "notes.txt")]) == 2
    assert "preview folder" in _one_line(capsys)
    assert _tree(tmp_path) == before and not (tmp_path / "c.zarr").exists()


def test_overwrite_with_bad_new_inputs_keeps_the_old_store(tmp_path, capsys, helsinki_pbf):
    from neuralmaps.config import preset
    from neuralmaps.data.store import create_store

    old = create_store(tmp_path / "c.zarr", 2, preset("cpu-tiny"), "EPSG:32635", {"seed": 9})
    before = _tree(tmp_path)
    base = ["synth", "--osm", helsinki_pbf, "--out", str(old), "--pairs", "2", "--overwrite"]
    for bad, why in ((["--bbox", "24.95,60.17,24.94,60.18"], "antimeridian"), (["--bbox=-inf,60,25,61"], "finite"),
                     (["--bbox=-170,-79,170,83"], "too wide"), (["--map-runs", "0"], "--map-runs")):
        assert main([*base, *bad]) == 2
        assert why in _one_line(capsys)
    assert _tree(tmp_path) == before


@pytest.mark.slow
def test_two_writers_on_one_store(tmp_path):
    """The second `neuralmaps synth` on one --out exits 2 at once, naming the first (its pid); the
    first completes and its store reads."""
    out = tmp_path / "c.zarr"
    args = [sys.executable, "-m", "neuralmaps.cli", "synth", "--osm", "helsinki", "--bbox", SMALL_BBOX, "--out",
            str(out), "--pairs", "2", "--map-runs", "3", "--query-runs", "2", "--quiet"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    holder = tmp_path / ".c.zarr.lock.holder"
    t0 = time.monotonic()
    while not holder.exists():
        assert first.poll() is None and time.monotonic() - t0 < 300, first.communicate()
        time.sleep(0.05)
    t = time.monotonic()
    second = _cli(*args[3:])
    assert second.returncode == 2 and time.monotonic() - t < 60, second.stderr
    line = second.stderr.strip()
    assert "\n" not in line and "is in use" in line and f"pid {first.pid}" in line, line
    assert first.wait(timeout=900) == 0, first.communicate()
    assert sum(len(SceneDataset(out, split=s)) for s in SPLIT_NAMES) == 2
