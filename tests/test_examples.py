"""The scripts in examples/ run end to end at a tiny size, as subprocesses (as a user runs them).

One twin capture of a ~80 x 80 m box (one car run, one pedestrian run) is shared by the module and
one map built by build_and_export.py serves localize_photo.py, to keep CI time down.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SCRIPTS = ("build_and_export.py", "localize_photo.py", "dask_cluster.py", "bring_your_own_data.py")
TINY_BBOX = (24.9445, 60.1693, 24.9460, 60.1700)


def run(script: str, *args: object, cwd: Path) -> str:
    """Run an example with this checkout's neuralmaps; returns stdout, fails with its stderr."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{script} exited {p.returncode}:\n{p.stderr[-4000:]}"
    return p.stdout


@pytest.fixture(scope="module")
def tiny_capture(tmp_path_factory, helsinki_pbf) -> Path:
    from neuralmaps.maps import capture_twin

    return capture_twin(helsinki_pbf, tmp_path_factory.mktemp("capture"), TINY_BBOX, num_map_runs=1,
                        num_query_runs=1, seed=0, progress=False)


@pytest.fixture(scope="module")
def tiny_map(tmp_path_factory, tiny_capture) -> Path:
    out = tmp_path_factory.mktemp("build_and_export")
    bbox = ",".join(map(str, TINY_BBOX))
    run("build_and_export.py", "--captures", tiny_capture, "--bbox", bbox, "--out", out, cwd=out)
    return out


def test_every_example_says_what_to_change_for_real_data():
    for name in SCRIPTS:
        doc = ast.get_docstring(ast.parse((EXAMPLES / name).read_text()))
        assert doc and "python examples/" + name in doc, name
        assert any(w in doc for w in ("real", "your own", "For your")), f"{name}: no word on real data"


def test_build_and_export(tiny_map):
    from neuralmaps import NeuralMap

    assert NeuralMap.open(tiny_map / "map.zarr").is_complete
    exp = tiny_map / "export"
    for f in ("map.qgs", "map.json", "map_pca.tif", "map_pca.qml", "map_semantic_class.tif", "map_semantic.gpkg"):
        assert (exp / f).is_file(), f


def test_localize_photo(tiny_map, tiny_capture, tmp_path):
    from neuralmaps.maps.query import read_exif

    photo, png = tmp_path / "photo.jpg", tmp_path / "result.png"
    out = run("localize_photo.py", "--map", tiny_map / "map.zarr", "--twin-query", tiny_capture, "--photo", photo,
              "--out", png, cwd=tmp_path)
    exif = read_exif(photo)
    assert exif.lat is not None and exif.focal_35mm == 18  # the twin camera: 90 deg across 256 px
    res, _ = json.JSONDecoder().raw_decode(out[out.index("{"):])
    assert res["prior_source"] == "exif" and res["prior_lat"] == pytest.approx(exif.lat, abs=1e-7)
    assert {"easting", "northing", "heading_deg", "ellipse_major_m", "confidence"} <= set(res)
    assert "error:" in out and png.stat().st_size > 10_000


def test_dask_cluster(tiny_capture, tmp_path):
    from neuralmaps import NeuralMap

    run("dask_cluster.py", "--captures", tiny_capture, "--out", tmp_path / "map.zarr", "--workers", "1", cwd=tmp_path)
    assert NeuralMap.open(tmp_path / "map.zarr").is_complete


def test_bring_your_own_data(tiny_capture, tmp_path):
    import pandas as pd

    from neuralmaps import NeuralMap

    run("bring_your_own_data.py", "--from-twin", tiny_capture, "--out", tmp_path, cwd=tmp_path)
    table = pd.read_csv(tmp_path / "poses.csv")
    assert {"image", "lat", "lon", "altitude", "heading", "hfov_deg"} <= set(table.columns)
    nm = NeuralMap.open(tmp_path / "map.zarr")
    assert nm.is_complete and json.loads(nm.attrs["inputs"])["captures"]["images"] == len(table)
    assert (tmp_path / "export" / "map.qgs").is_file()
