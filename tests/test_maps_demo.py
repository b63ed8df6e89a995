"""`neuralmaps demo` (neuralmaps.maps.demo): bad input is one line and exit 2 before any work, and
the whole demo runs end to end at a tiny size (one car run, one pedestrian run, a few photos)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from neuralmaps.cli import main

TINY_BBOX = "24.9445,60.1693,24.9460,60.1700"


@pytest.mark.parametrize("args, message", [
    (["--bbox", "1,2,3"], "--bbox must be W,S,E,N"),
    (["--bbox", "24.95,60.17,24.94,60.16"], "empty or inverted"),
    (["--bbox", "24.90,60.15,24.99,60.19"], "km^2"),  # too large for a demo
    (["--osm", "/nonexistent/city.osm.pbf", "--bbox", TINY_BBOX], "OSM file not found"),
    (["--osm", "NOTPBF", "--bbox", TINY_BBOX], "not a valid OSM .pbf"),
    (["--osm", "NOTPBF"], "--bbox W,S,E,N is needed"),
    (["--bbox", "25.30,60.30,25.302,60.301"], "no OSM features inside the region"),  # outside the extract
    (["--map-runs", "0", "--bbox", TINY_BBOX], "at least one map run"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    bad = tmp_path / "city.osm.pbf"
    bad.write_text("not a pbf")
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--quiet"] + [str(bad) if a == "NOTPBF" else a for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("neuralmaps demo: error: ") and message in err[-1], err
    assert not out.exists()  # nothing left behind


def test_refuses_a_folder_that_is_not_a_demo(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep")
    assert main(["demo", "--out", str(tmp_path), "--bbox", TINY_BBOX, "--quiet"]) == 2
    assert "not a neuralmaps demo" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_tiny_demo_end_to_end(tmp_path, capsys):
    from neuralmaps.maps.demo import run_demo
    from neuralmaps.storage import StorageError

    out = tmp_path / "demo"
    s = run_demo(out, "helsinki", [float(v) for v in TINY_BBOX.split(",")], map_runs=1, query_runs=1, max_queries=4,
                 sequence_length=2, progress=False, log=lambda line: None)
    j = json.loads((out / "summary.json").read_text())
    assert j["num_queries"] == s["num_queries"] and j["files"] == s["files"]
    for k in ("recall_1m_1deg", "recall_3m_3deg", "recall_5m_5deg", "median_error_m", "num_queries", "area_m2",
              "build_seconds", "files"):
        assert k in j, k
    assert j["num_queries"] == 4 and 0 <= j["recall_1m_1deg"] <= j["recall_3m_3deg"] <= j["recall_5m_5deg"] <= 1
    assert j["sequence"]["num_queries"] == 4 and j["area_m2"] > 0 and j["build_seconds"] > 0
    assert set(j["stage_seconds"]) == {"capture", "build", "export", "localize", "previews"}
    # every file written is listed, relative to DIR, and nothing else
    on_disk = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert j["files"] == on_disk
    for f in ("summary.json", "localization.csv", "map_pca.png", "map_semantics.png", "localization.png",
              "export/map.qgs", "export/map.json", "export/map_pca.tif", "captures/queries.parquet", "demo.json"):
        assert f in j["files"], f
    csv = pd.read_csv(out / "localization.csv")
    assert len(csv) == 4 and {"error_m", "error_deg", "prior_error_m", "seq_error_m"} <= set(csv.columns)
    # a miss counts as a miss: recalls are over all photos, from the CSV's errors
    ok = (csv["error_m"] <= 3) & (csv["error_deg"] <= 3)
    assert j["recall_3m_3deg"] == pytest.approx(ok.mean())
    # RANSAC instead of voting: its own column and errors
    r = j["ransac"]
    assert r["num_queries"] == 4 and r["recall_3m_3deg"] == pytest.approx(((csv["ransac_error_m"] <= 3)
                                                                         & (csv["ransac_error_deg"] <= 3)).mean())
    # with a compass: every estimate within the heading prior around the simulated reading
    c = j["compass"]
    assert c["num_queries"] == 4 and c["heading_range_deg"] == 30
    off = (csv["compass_heading_deg"] - csv["true_heading_deg"] + 180) % 360 - 180
    assert (off.abs() <= c["heading_range_deg"]).all()
    est = (csv["compass_estimate_heading_deg"] - csv["compass_heading_deg"] + 180) % 360 - 180
    assert (est.abs() <= c["heading_range_deg"] + 1e-3).all(), est
    assert c["recall_3m_3deg"] == pytest.approx(((csv["compass_error_m"] <= 3) & (csv["compass_error_deg"] <= 3)).mean())
    # with the GPS fix's accuracy (the simulated noise) as the prior's std: its own column and errors
    g = j["gps_accuracy"]
    assert g["num_queries"] == 4 and g["prior_sigma_m"] == j["prior"]["gps_noise_m"] == 5.0
    assert g["recall_3m_3deg"] == pytest.approx(((csv["gps_accuracy_error_m"] <= 3) & (csv["gps_accuracy_error_deg"] <= 3)).mean())
    b = j["compass_and_gps_accuracy"]  # both priors, as a phone photo's EXIF gives them
    assert b["num_queries"] == 4 and b["prior_sigma_m"] == 5.0 and b["noise_deg"] == c["noise_deg"]
    assert b["recall_3m_3deg"] == pytest.approx(((csv["compass_gps_accuracy_error_m"] <= 3)
                                                 & (csv["compass_gps_accuracy_error_deg"] <= 3)).mean())
    # the split by distance to the nearest map image covers every photo, with the CSV's distances
    d = j["by_distance_to_map_images"]
    near = csv["nearest_map_image_m"] <= d["threshold_m"]
    assert (csv["nearest_map_image_m"] >= 0).all() and d["median_distance_m"] == pytest.approx(csv["nearest_map_image_m"].median())
    assert (d["near"]["num_queries"], d["far"]["num_queries"]) == (near.sum(), (~near).sum())
    for part, rows in (("near", near), ("far", ~near)):
        if rows.any():
            assert d[part]["recall_3m_3deg"] == pytest.approx(ok[rows].mean())
    assert j["median_error_m"] is None or math.isclose(j["median_error_m"], csv["error_m"].median())
    # semantics against OSM over the cells the map holds
    assert j["semantics"]["num_cells"] > 0 and set(j["semantics"]["iou"]) == {"crosswalk", "sidewalk", "road",
                                                                             "terrain", "building"}
    assert "R@(3 m, 3 deg)" in capsys.readouterr().out  # the recall table on stdout
    # the same folder with other parameters is refused before any work
    with pytest.raises(StorageError, match="other parameters"):
        run_demo(out, "helsinki", [float(v) for v in TINY_BBOX.split(",")], map_runs=1, query_runs=1, seed=1)


def test_sequences_cover_every_photo_once_in_walk_order():
    from types import SimpleNamespace

    from neuralmaps.maps.demo import _sequences

    # two walks (57 and 50 photos, rows shuffled), as the default demo's
    t = pd.Timestamp("2025-01-01")
    rows = [("a", k) for k in range(57)] + [("b", k) for k in range(50)]
    f = pd.DataFrame({"run_id": [r for r, _ in rows], "time": [t + pd.Timedelta(seconds=k) for _, k in rows],
                      "image": [f"{r}{k:03d}" for r, k in rows]})
    f = f.sample(frac=1.0, random_state=0).reset_index(drop=True)
    seqs = _sequences(SimpleNamespace(frame=f), 8)
    assert sorted(i for s in seqs for i in s) == list(range(len(f)))
    assert [len(s) for s in seqs] == [8] * 6 + [9] + [8] * 5 + [10]  # a short tail joins its neighbour
    for s in seqs:
        g = f.iloc[s]
        assert g["run_id"].nunique() == 1 and g["time"].is_monotonic_increasing
