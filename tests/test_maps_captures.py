"""CaptureSet: reading mapping teams' tables, rotation conventions, GeoParquet round trip, clear errors."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from neuralmaps import geometry
from neuralmaps.geo.crs import lonlat_to_crs, utm_crs_for
from neuralmaps.maps.captures import CaptureSet, hpr_from_rotation, rotation_from_hpr


def _images(root, n, size=(64, 32)):
    (root / "img").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((size[1], size[0], 3), 10 * i, np.uint8)).save(root / "img" / f"{i}.jpg")
    return [f"img/{i}.jpg" for i in range(n)]


def _table(root, n=3):
    return pd.DataFrame({
        "image": _images(root, n), "run": ["a"] * n, "timestamp": ["2024-05-01T10:00:00Z"] * n,
        "latitude": 60.1695 + 1e-4 * np.arange(n), "longitude": [24.952] * n, "altitude": [2.0] * n,
        "heading": [0.0, 90.0, 200.0][:n], "pitch": [0.0, 5.0, -3.0][:n], "roll": [0.0, 0.0, 2.0][:n],
        "width": [64] * n, "height": [32] * n, "fx": [32.0] * n,
    })


def test_hpr_rotation_conventions():
    # heading 90 (east), level: optical axis +x, image right = south (-y), image down = -z.
    R = rotation_from_hpr(90.0, 0.0, 0.0)
    np.testing.assert_allclose(R[:, 2], [1, 0, 0], atol=1e-12)
    np.testing.assert_allclose(R[:, 0], [0, -1, 0], atol=1e-12)
    np.testing.assert_allclose(R[:, 1], [0, 0, -1], atol=1e-12)
    # Same as the project's BEV convention (yaw CCW from east, pitch up positive).
    yaw, pitch = math.radians(30.0), math.radians(7.0)
    T = geometry.bev_pose_to_camera(geometry.Transform2D(torch.tensor(yaw, dtype=torch.float64),
                                                         torch.zeros(2, dtype=torch.float64)), 2.0, pitch)
    np.testing.assert_allclose(rotation_from_hpr(90.0 - 30.0, 7.0, 0.0), T.R.numpy(), atol=1e-9)
    rng = np.random.default_rng(0)
    h, p, r = rng.uniform(0, 360, 50), rng.uniform(-60, 60, 50), rng.uniform(-90, 90, 50)
    h2, p2, r2 = hpr_from_rotation(rotation_from_hpr(h, p, r))
    np.testing.assert_allclose(h2, h, atol=1e-9)
    np.testing.assert_allclose(p2, p, atol=1e-9)
    np.testing.assert_allclose(r2, r, atol=1e-9)


def test_from_table_latlon_csv(tmp_path):
    csv = tmp_path / "poses.csv"
    _table(tmp_path).to_csv(csv, index=False)
    cs = CaptureSet.from_table(csv, tmp_path)
    assert len(cs) == 3 and cs.crs == utm_crs_for(24.952, 60.1695)
    x, y = lonlat_to_crs(24.952, 60.1695, cs.crs)
    T = cs.T_world_cam()
    np.testing.assert_allclose(T[0, :3, 3], [x, y, 2.0], atol=1e-6)
    np.testing.assert_allclose(T[1, :3, 2], rotation_from_hpr(90.0, 5.0, 0.0)[:, 2], atol=1e-9)
    np.testing.assert_allclose(cs.frame["heading_deg"], [0.0, 90.0, 200.0], atol=1e-9)
    assert cs.cameras()[0].tolist() == [64, 32, 32, 32, 32, 16, 0, 0]
    assert str(cs.frame["time"].iloc[0]) == "2024-05-01 10:00:00+00:00"
    # GeoParquet round trip (geometry = camera position, CRS kept).
    cs.write(tmp_path / "set")
    back = CaptureSet.open(tmp_path / "set")
    assert back.crs == cs.crs and back.fingerprint() == cs.fingerprint()
    assert back.frame.geometry.x.tolist() == pytest.approx(cs.frame["x"].tolist())
    assert list(back.within((x - 1, y - 1, x + 1, y + 1))) == [0]


def test_from_table_colmap(tmp_path):
    R_wc = rotation_from_hpr(45.0, 0.0, 0.0)
    c = np.array([386000.0, 6672000.0, 1.8])
    R_cw = R_wc.T
    t = -R_cw @ c
    from scipy.spatial.transform import Rotation

    qx, qy, qz, qw = Rotation.from_matrix(R_cw).as_quat()
    df = pd.DataFrame({"image": _images(tmp_path, 1), "qw": [qw], "qx": [qx], "qy": [qy], "qz": [qz],
                       "tx": [t[0]], "ty": [t[1]], "tz": [t[2]], "width": [64], "height": [32], "fx": [30.0]})
    cs = CaptureSet.from_table(df, tmp_path, crs="EPSG:32635")
    np.testing.assert_allclose(cs.T_world_cam()[0, :3, 3], c, atol=1e-6)
    assert cs.frame["heading_deg"].iloc[0] == pytest.approx(45.0)


def test_from_table_errors(tmp_path):
    df = _table(tmp_path)
    with pytest.raises(ValueError, match=r"missing column.*'width'"):
        CaptureSet.from_table(df.drop(columns=["width"]), tmp_path)
    with pytest.raises(ValueError, match="heading"):
        CaptureSet.from_table(df.drop(columns=["heading"]), tmp_path)
    with pytest.raises(FileNotFoundError, match="1 image file"):
        CaptureSet.from_table(df.assign(image=["img/0.jpg", "img/nope.jpg", "img/2.jpg"]), tmp_path)
    with pytest.raises(ValueError, match=r"size disagrees.*64x32 px, camera 100x32"):
        CaptureSet.from_table(df.assign(width=[100, 64, 64]), tmp_path)
    xy = df.drop(columns=["latitude", "longitude"]).assign(x=[1.0, 2, 3], y=[1.0, 2, 3])
    with pytest.raises(ValueError, match="need a CRS"):
        CaptureSet.from_table(xy, tmp_path)
    with pytest.raises(ValueError, match="unknown CRS"):
        CaptureSet.from_table(xy, tmp_path, crs="EPSG:99999999")
    with pytest.raises(ValueError, match="geographic"):
        CaptureSet.from_table(xy, tmp_path, crs="EPSG:4326")
    with pytest.raises(FileNotFoundError, match="capture index not found"):
        CaptureSet.open(tmp_path / "missing")
