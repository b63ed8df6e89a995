"""Queries on a neural map (`neuralmaps.maps.query`): localize (single, Dask batch, sequence),
semantics_at, classes_in, the `neuralmaps localize` CLI.

Geometry is tested on a synthetic store whose matching features are a known smooth random field:
a query BEV sampled from that field at a known pose (the model's `query` swapped for it) must be
recovered to well under a cell. The real network (cpu-tiny, random weights) is run for plumbing
only (image -> query BEV -> localizer -> result), never for accuracy.

Store: 96 m x 96 m at 0.5 m in UTM 35N (Helsinki), 64 px chunks; the north-east quadrant
(x, y > 56 m from the SW corner) has no data; classes: road west of x = 48 m, building east of it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neuralmaps.cli import main
from neuralmaps.config import CLASS_NAMES, preset
from neuralmaps.geo import Region
from neuralmaps.geo.crs import heading_to_yaw
from neuralmaps.maps.workers import model_sha256
from neuralmaps.maps.store import STORE_FORMAT, NeuralMap, create_store, store_variables
from neuralmaps.maps.query import QueryError, relative_poses_from
from neuralmaps.models import SNAP
from neuralmaps.models.bev import FeaturePlane

torch.set_num_threads(1)

CRS = "EPSG:32635"
X0, Y0, SIDE, CELL = 385900.0, 6672000.0, 96.0, 0.5
HOLE = 56.0  # no data where x > HOLE and y > HOLE (metres from the SW corner)
SPLIT = 48.0  # road west of it, building east
CAM = {"width": 256, "height": 128, "fx": 128.0, "fy": 128.0, "cx": 128.0, "cy": 64.0}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("query")
    torch.manual_seed(0)
    ckpt = d / "tiny.pt"
    SNAP(preset("cpu-tiny")).save(ckpt)
    model = SNAP.load(ckpt)
    cfg = model.config
    region = Region.from_bounds((X0, Y0, X0 + SIDE, Y0 + SIDE), CRS, CELL)
    H, W = region.shape
    D = cfg.model.matching_dim
    # A smooth random field (sigma 2 cells), unit vectors: the map's matching features (north-up).
    noise = torch.randn(D, 1, H, W, generator=torch.Generator().manual_seed(1))
    x = torch.arange(13, dtype=torch.float32) - 6
    k = torch.exp(-(x**2) / 8)
    k = k / k.sum()
    f = F.conv2d(F.pad(noise, (6, 6, 6, 6), mode="reflect"), k.view(1, 1, 13, 1))
    f = F.normalize(F.conv2d(f, k.view(1, 1, 1, 13))[:, 0], dim=0).numpy()  # (D, H, W)
    xs, ys = region.coords()
    ex, ny = np.meshgrid(xs - X0, ys - Y0)  # metres from the SW corner, (H, W)
    valid = ~((ex > HOLE) & (ny > HOLE))
    road, building = CLASS_NAMES.index("road"), CLASS_NAMES.index("building")
    cls = np.where(ex < SPLIT, road, building).astype(np.uint8)
    prob = np.full((len(CLASS_NAMES), H, W), 0.01, np.float32)
    prob[road][cls == road] = 0.9
    prob[building][cls == building] = 0.9
    attrs = {"format": STORE_FORMAT, "model_sha256": model_sha256(model), "config": json.dumps(cfg.to_dict()),
             "checkpoint": str(ckpt), "camera_model": "pinhole", "region": json.dumps(region.to_dict()),
             "tile_px": 64, "halo_px": 0, "class_names": list(CLASS_NAMES)}
    variables = store_variables(cfg.model.feature_dim, D, len(CLASS_NAMES), confidence=False, semantics=True)
    path = d / "synth.zarr"
    create_store(path, region, 64, variables, {"feature": cfg.model.feature_dim, "band": D, "class": len(CLASS_NAMES)},
                 CLASS_NAMES, attrs)
    import zarr

    g = zarr.open_group(str(path), mode="r+")
    g["matching"][:] = np.where(valid, f, np.nan).astype(np.float16)
    g["valid"][:] = valid
    g["semantic_class"][:] = np.where(valid, cls, 255)
    g["semantic_prob"][:] = np.where(valid, prob, np.nan).astype(np.float16)
    g["tile_done"][:] = True
    raster = f.astype(np.float16).astype(np.float32)  # what the store holds
    return {"dir": d, "path": path, "nm": NeuralMap.open(path), "model": model, "raster": raster, "region": region,
            "ckpt": ckpt}


def _latlon(region: Region, e: float, n: float) -> tuple[float, float]:
    lon, lat = region.xy_to_lonlat(X0 + e, Y0 + n)
    return float(lat), float(lon)


def _query_features(synth: dict, e: float, n: float, heading: float) -> FeaturePlane:
    """The map's features seen from a camera at (e, n) m from the SW corner with `heading`: sampled
    (bilinear) from the north-up raster at the CRS points `Region.xy_to_pixel` gives, independently
    of the model-grid conversion the query code uses."""
    from scipy.ndimage import map_coordinates

    model, region, raster = synth["model"], synth["region"], synth["raster"]
    q = model.query_xy.double().numpy()  # (Xq, Yq, 2): x forward, y left
    yaw = heading_to_yaw(heading)
    c, s = math.cos(yaw), math.sin(yaw)
    wx = X0 + e + c * q[..., 0] - s * q[..., 1]
    wy = Y0 + n + s * q[..., 0] + c * q[..., 1]
    row, col = region.xy_to_pixel(wx, wy)  # continuous, pixel centres at +0.5
    coords = np.stack([row - 0.5, col - 0.5])
    feats = np.stack([map_coordinates(b, coords, order=1, mode="nearest") for b in raster])  # (D, Xq, Yq)
    H, W = region.shape
    on_map = (row >= 0.5) & (row <= H - 0.5) & (col >= 0.5) & (col <= W - 0.5)
    valid = torch.from_numpy(on_map)[None] & model.mapper.query_inside[None]
    return FeaturePlane(torch.from_numpy(feats).float()[None] * valid[:, None], valid)


def _with_features(monkeypatch, model, planes):
    """Make `model.query` return these query BEVs, in order (the geometry is tested, not the net)."""
    it = iter(planes)
    monkeypatch.setattr(model, "query", lambda batch, generator=None: next(it))


IMAGE = np.zeros((128, 256, 3), np.uint8)


def _errors(res, e: float, n: float, heading: float) -> tuple[float, float]:
    d_m = math.hypot(res.easting - (X0 + e), res.northing - (Y0 + n))
    d_deg = abs((res.heading_deg - heading + 180.0) % 360.0 - 180.0)
    return d_m, d_deg


# -- geometry ---------------------------------------------------------------------------------------
POSES = [(20.0, 24.0, 37.0), (30.5, 12.25, 200.0), (14.0, 40.0, 300.0)]  # (e, n) m from the SW corner, heading


def test_pose_recovered_from_known_features(synth, monkeypatch):
    nm, model, region = synth["nm"], synth["model"], synth["region"]
    _with_features(monkeypatch, model, [_query_features(synth, *p) for p in POSES])
    for e, n, h in POSES:
        prior = _latlon(region, e + 9.0, n - 6.0)  # 10.8 m off
        res = nm.localize(IMAGE, CAM, prior=prior, radius_m=20, model=model)
        d_m, d_deg = _errors(res, e, n, h)
        # Measured: <= 0.033 m, <= 0.09 deg (the store's float16 features).
        assert d_m < 0.1 and d_deg < 0.2, (e, n, h, d_m, d_deg)
        assert res.confident and res.message == "ok"
        # The posterior's 1 m blocks bound its spread from below: measured 0.54-0.73 m, 1.1-3.3 deg.
        assert res.uncertainty_m < 1.5 and res.heading_std_deg < 7.0 and res.confidence > 0.9
        assert res.covariance_m2.shape == (2, 2) and np.allclose(res.covariance_m2, res.covariance_m2.T)
        assert res.ellipse_minor_m <= res.ellipse_major_m == res.uncertainty_m
        # lat/lon <-> map CRS round trip, and the truth's lat/lon.
        x, y = region.lonlat_to_xy(res.lon, res.lat)
        assert abs(float(x) - res.easting) < 1e-3 and abs(float(y) - res.northing) < 1e-3
        lat, lon = _latlon(region, e, n)
        assert abs(res.lat - lat) < 2e-6 and abs(res.lon - lon) < 4e-6
        assert res.candidates[0].easting == res.easting and len(res.candidates) >= 2
        assert all(a.score >= b.score for a, b in zip(res.candidates, res.candidates[1:]))
        assert res.crs == CRS and res.prior_source == "argument" and res.radius_m == 20


def test_exported_matching_cog_localizes_like_the_store(synth, monkeypatch, tmp_path):
    """`NeuralMap.open` of the exported `*_matching.tif` (its tags name the model): the same poses
    as the store, bit for bit (both hold float16); everything but localization is refused clearly."""
    nm, model, region = synth["nm"], synth["model"], synth["region"]
    files = nm.export(tmp_path / "export", progress=False)
    cog = NeuralMap.open(files["matching"])
    assert cog.is_cog and cog.region == region and cog.attrs["model_sha256"] == nm.attrs["model_sha256"]
    _with_features(monkeypatch, model, [_query_features(synth, *p) for p in POSES for _ in range(2)])
    for e, n, h in POSES:
        prior = _latlon(region, e + 9.0, n - 6.0)
        a = nm.localize(IMAGE, CAM, prior=prior, radius_m=20, model=model)
        b = cog.localize(IMAGE, CAM, prior=prior, radius_m=20, model=model)
        assert (a.easting, a.northing, a.heading_deg, a.score) == (b.easting, b.northing, b.heading_deg, b.score)
        assert _errors(b, e, n, h)[0] < 0.1
    with pytest.raises(ValueError, match="matching COG: it serves localization only"):
        cog.semantics_at(*_latlon(region, 5.0, 5.0))
    with pytest.raises(ValueError, match="not a neuralmaps matching COG"):
        NeuralMap.open(files["pca"])  # another layer of the export


def test_ransac_method_recovers_the_pose_inside_the_priors(synth, monkeypatch):
    """method="ransac": SNAP's sampler and wide search give the estimate, voting's posterior the
    uncertainty; a heading prior still bounds it; an unknown method is one clear error."""
    nm, model, region = synth["nm"], synth["model"], synth["region"]
    _with_features(monkeypatch, model, [_query_features(synth, *p) for p in POSES]
                   + [_query_features(synth, *POSES[0])])
    modes, forward = [], type(model.localizer).forward

    def spy(self, *args, **kwargs):
        modes.append(kwargs["mode"])
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model.localizer), "forward", spy)
    for e, n, h in POSES:
        res = nm.localize(IMAGE, CAM, prior=_latlon(region, e + 9.0, n - 6.0), radius_m=20, model=model,
                          method="ransac")
        d_m, d_deg = _errors(res, e, n, h)
        assert d_m < 0.1 and d_deg < 0.2, (e, n, h, d_m, d_deg)
        assert res.confident and res.uncertainty_m < 1.5  # from the voting posterior
    e, n, h = POSES[0]
    res = nm.localize(IMAGE, CAM, prior=_latlon(region, e, n), radius_m=10, heading_prior=h + 90,
                      heading_range_deg=20, model=model, method="ransac")
    assert abs((res.heading_deg - (h + 90) + 180) % 360 - 180) <= 20.0 + 1e-3
    assert modes == ["voting", "ransac"] * 4
    with pytest.raises(QueryError, match="method must be one of 'voting', 'ransac'"):
        nm.localize(IMAGE, CAM, prior=_latlon(region, e, n), model=model, method="exhaustive")


def test_heading_prior_limits_the_search(synth, monkeypatch):
    nm, model, region = synth["nm"], synth["model"], synth["region"]
    e, n, h = POSES[0]
    _with_features(monkeypatch, model, [_query_features(synth, e, n, h)] * 2)
    res = nm.localize(IMAGE, CAM, prior=_latlon(region, e, n), radius_m=10, heading_prior=h + 10, model=model)
    assert _errors(res, e, n, h)[0] < 0.1  # the truth lies inside the ±30 deg prior
    res = nm.localize(IMAGE, CAM, prior=_latlon(region, e, n), radius_m=10, heading_prior=h + 90,
                      heading_range_deg=20, model=model)
    assert abs((res.heading_deg - (h + 90) + 180) % 360 - 180) <= 20.0 + 1e-3  # never outside the prior


def test_uninformative_query_says_low_confidence(synth, monkeypatch):
    nm, model, region = synth["nm"], synth["model"], synth["region"]
    e, n, h = POSES[0]
    plane = _query_features(synth, e, n, h)
    _with_features(monkeypatch, model, [FeaturePlane(torch.zeros_like(plane.features), plane.valid)])
    res = nm.localize(IMAGE, CAM, prior=_latlon(region, e, n), radius_m=20, model=model)
    assert not res.confident and res.message.startswith("low confidence")
    # A flat posterior over the 20 m disc: 1-sigma ~ 20 / 2 = 10 m per axis.
    assert 7.0 < res.uncertainty_m < 12.0 and res.confidence < 0.05 and res.heading_std_deg == 180.0


def test_gps_accuracy_makes_the_prior_gaussian(synth, monkeypatch, tmp_path):
    """`prior_sigma_m` (or the photo's EXIF GPSHPositioningError): positions are weighed by a
    Gaussian of that std around the fix. A query that says nothing then stays at the fix with the
    fix's own spread (the flat 20 m disc: ~10 m per axis); a clear match is not pulled off."""
    from neuralmaps.maps.query import QueryError, read_exif

    nm, model, region = synth["nm"], synth["model"], synth["region"]
    e, n, h = POSES[0]
    plane = _query_features(synth, e, n, h)
    flat = FeaturePlane(torch.zeros_like(plane.features), plane.valid)
    fix = _latlon(region, e + 2.0, n - 1.0)
    photo = _jpeg_with_exif(tmp_path / "p.jpg", *fix, None, accuracy_m=3.0)
    assert read_exif(photo).accuracy_m == 3.0
    _with_features(monkeypatch, model, [flat, flat, plane])
    res = nm.localize(photo, CAM, radius_m=20, model=model)  # prior and its accuracy from EXIF
    assert res.prior_source == "exif" and res.prior_sigma_m == 3.0
    # Measured: at the fix to 1e-9 m, 1-sigma 3.01 m (1.53 m with sigma 1.5: the 1 m posterior cells).
    assert math.hypot(res.easting - (X0 + e + 2.0), res.northing - (Y0 + n - 1.0)) < 0.05
    assert 2.85 < res.uncertainty_m < 3.15 and not res.confident
    res = nm.localize(IMAGE, CAM, prior=fix, radius_m=20, prior_sigma_m=1.5, model=model)
    assert res.prior_sigma_m == 1.5 and 1.4 < res.uncertainty_m < 1.65
    res = nm.localize(IMAGE, CAM, prior=fix, radius_m=20, prior_sigma_m=3.0, model=model)  # a clear match
    assert _errors(res, e, n, h)[0] < 0.1
    for bad in (0.0, -1.0, float("nan"), "near"):
        with pytest.raises(QueryError, match="prior_sigma_m"):
            nm.localize(IMAGE, CAM, prior=fix, radius_m=20, prior_sigma_m=bad, model=model)


def test_prob_tif(synth, monkeypatch, tmp_path):
    import rasterio

    nm, model, region = synth["nm"], synth["model"], synth["region"]
    e, n, h = POSES[1]
    _with_features(monkeypatch, model, [_query_features(synth, e, n, h)])
    tif = tmp_path / "p.tif"
    res = nm.localize(IMAGE, CAM, prior=_latlon(region, e + 5, n), radius_m=15, model=model, prob_tif=tif)
    assert res.prob_tif == str(tif)
    with rasterio.open(tif) as src:
        p = src.read(1)
        assert src.crs.to_epsg() == 32635 and src.res == (CELL, CELL)
        r, c = np.unravel_index(np.nanargmax(p), p.shape)
        x, y = src.xy(r, c)  # pixel centre, as QGIS shows it
    assert abs(np.nansum(p) - 1.0) < 1e-4
    assert math.hypot(x - (X0 + e), y - (Y0 + n)) <= 1.5  # the posterior's 1 m blocks


def test_sequence_recovers_an_uninformative_frame(synth, monkeypatch):
    """Frame 0 sees nothing useful; frames 1 and 2 (known motion) place it."""
    nm, model, region = synth["nm"], synth["model"], synth["region"]
    x = np.array([20.0, 22.1, 24.0])
    y = np.array([20.0, 22.1, 24.5])
    h = np.array([45.0, 45.0, 40.0])
    motion = relative_poses_from(x, y, h)
    assert np.allclose(motion[1], [math.hypot(2.1, 2.1), 0.0, 0.0], atol=1e-9)
    assert motion[2, 2] == pytest.approx(5.0)  # heading 45 -> 40 deg: a left turn, +5 deg of yaw
    planes = [_query_features(synth, x[k], y[k], h[k]) for k in range(3)]
    planes[0] = FeaturePlane(torch.zeros_like(planes[0].features), planes[0].valid)
    _with_features(monkeypatch, model, planes)
    res = nm.localize_sequence([IMAGE] * 3, CAM, motion, prior=_latlon(region, 28.0, 14.0), radius_m=15, model=model)
    assert len(res) == 3
    for k in range(3):
        d_m, d_deg = _errors(res[k], x[k], y[k], h[k])
        assert d_m < 0.05 and d_deg < 0.1, (k, d_m, d_deg)  # measured 0.016 m, 0.00 deg
        assert res[k].confident and res[k].extra == {"sequence_index": k, "sequence_length": 3}
    # Alone, frame 0 is a guess over the whole disc.
    _with_features(monkeypatch, model, planes[:1])
    alone = nm.localize(IMAGE, CAM, prior=_latlon(region, 28.0, 14.0), radius_m=15, model=model)
    assert not alone.confident and alone.uncertainty_m > 10 * res[0].uncertainty_m  # measured 7.5 m vs 0.28 m


# -- the real network (plumbing only) ---------------------------------------------------------------
def _jpeg_with_exif(path: Path, lat: float, lon: float, heading: float | None, accuracy_m: float | None = None) -> Path:
    from PIL import Image

    def dms(v: float) -> tuple[float, float, float]:
        d = int(v)
        m = int((v - d) * 60)
        return (float(d), float(m), (v - d - m / 60) * 3600)

    ex = Image.Exif()
    gps = ex.get_ifd(0x8825)
    gps[1], gps[2], gps[3], gps[4] = "N", dms(lat), "E", dms(lon)
    if heading is not None:
        gps[16], gps[17] = "T", heading
    if accuracy_m is not None:
        gps[31] = accuracy_m  # GPSHPositioningError
    rgb = (np.random.default_rng(0).random((128, 256, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(path, exif=ex, quality=95)
    return path


def test_real_model_with_exif_prior(synth, tmp_path):
    from neuralmaps.maps.query import _grid_north_offset_deg, read_exif

    nm, region = synth["nm"], synth["region"]
    lat, lon = _latlon(region, 25.0, 25.0)
    photo = _jpeg_with_exif(tmp_path / "p.jpg", lat, lon, 100.0)
    ex = read_exif(photo)
    assert abs(ex.lat - lat) < 1e-7 and abs(ex.lon - lon) < 1e-7 and ex.heading_deg == 100.0 and ex.heading_ref == "T"
    cam = tmp_path / "cam.json"
    cam.write_text(json.dumps({"w": 256, "h": 128, "hfov_deg": 90.0, "height_m": 1.6}))
    res = nm.localize(photo, cam, radius_m=12)  # the map's own checkpoint, the prior and heading from EXIF
    assert res.prior_source == "exif" and (res.prior_lat, res.prior_lon) == pytest.approx((lat, lon), abs=1e-9)
    assert math.hypot(res.easting - (X0 + 25), res.northing - (Y0 + 25)) <= 12 + 1e-6
    grid = (100.0 + _grid_north_offset_deg(lon, lat, CRS)) % 360
    # Helsinki is 2.06 deg west of zone 35's meridian: true north is 2.06 sin(60.17 deg) = 1.79 deg east of grid north.
    assert 1.75 < _grid_north_offset_deg(lon, lat, CRS) < 1.82
    assert res.heading_prior_deg == pytest.approx(grid)
    assert abs((res.heading_deg - grid + 180) % 360 - 180) <= 30 + 1e-3
    assert (res.heading_deg - res.heading_true_deg) % 360 == pytest.approx(1.79, abs=0.03)
    json.dumps(res.to_dict())  # JSON-safe
    assert all(math.isfinite(v) for v in (res.score, res.uncertainty_m, res.heading_std_deg))


@pytest.mark.parametrize("case, message", [
    ("outside", "outside the map"),
    ("swapped", "swapped?"),
    ("size", "but its camera says 256 x 128 px"),
    ("fx", "focal lengths must be > 0"),
    ("fov", "field of view"),
    ("principal", "principal point"),
    ("nomap", "no map here"),
    ("noprior", "no prior"),
    ("nocamera", "no camera given"),
    ("model", "weights differ"),
])
def test_bad_input_is_one_clear_line(synth, case, message):
    nm, region = synth["nm"], synth["region"]
    prior = _latlon(region, 20, 20)
    kw = dict(image=IMAGE, camera=dict(CAM), prior=prior, radius_m=10)
    if case == "outside":
        kw["prior"] = _latlon(region, -50, 20)
    elif case == "swapped":
        kw["prior"] = prior[::-1]
    elif case == "size":
        kw["image"] = np.zeros((100, 200, 3), np.uint8)
    elif case == "fx":
        kw["camera"]["fx"] = -5.0
    elif case == "fov":
        kw["camera"]["fx"] = kw["camera"]["fy"] = 1.0
    elif case == "principal":
        kw["camera"]["cx"] = 300.0
    elif case == "nomap":
        kw["prior"], kw["radius_m"] = _latlon(region, 88, 88), 2
    elif case == "noprior":
        kw["prior"] = None
    elif case == "nocamera":
        kw["camera"] = None
    elif case == "model":
        torch.manual_seed(5)
        kw["model"] = SNAP(preset("cpu-tiny")).eval()
    with pytest.raises(QueryError) as e:
        nm.localize(kw.pop("image"), kw.pop("camera"), **kw)
    assert isinstance(e.value, ValueError) and message in str(e.value) and "\n" not in str(e.value)


def test_cli_localize(synth, tmp_path, capsys):
    region = synth["region"]
    lat, lon = _latlon(region, 25.0, 25.0)
    photo = _jpeg_with_exif(tmp_path / "p.jpg", lat, lon, None)
    cam = tmp_path / "cam.json"
    cam.write_text(json.dumps(CAM))
    code = main(["localize", str(photo), "--map", str(synth["path"]), "--camera", str(cam), "--prior",
                 f"{lat},{lon}", "--radius", "8"])
    out = capsys.readouterr()
    assert code == 0
    lines = out.out.strip().splitlines()
    assert len(lines) == 1
    j = json.loads(lines[0])
    for k in ("lat", "lon", "heading_deg", "score", "uncertainty_m", "easting", "northing", "confident"):
        assert k in j
    assert len(j["candidates"]) == 1
    code = main(["localize", str(photo), "--map", str(synth["path"]), "--camera", str(cam), "--prior",
                 f"{lat},{lon}", "--radius", "8", "--method", "ransac"])
    r = json.loads(capsys.readouterr().out.strip())
    assert code == 0 and set(j) == set(r)  # the same JSON object, from RANSAC's estimate
    code = main(["localize", str(photo), "--map", str(synth["path"]), "--camera", str(cam), "--prior", "1,2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("neuralmaps localize: error:") and "outside the map" in err[0]
    code = main(["localize", str(tmp_path / "missing.jpg"), "--map", str(synth["path"]), "--camera", str(cam)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "image not found" in err[0]


def test_localize_many_on_a_capture_table(synth, tmp_path):
    """The queries.parquet schema of `neuralmaps capture`, through Dask (one in-process worker)."""
    from PIL import Image

    from neuralmaps.maps.captures import QUERIES_NAME, CaptureSet, rotation_from_hpr

    poses = [(20.0, 20.0, 30.0), (30.0, 15.0, 120.0), (12.0, 35.0, 250.0)]
    T = np.tile(np.eye(4), (3, 1, 1))
    for i, (e, n, h) in enumerate(poses):
        T[i, :3, :3] = rotation_from_hpr(h, 0.0, 0.0)
        T[i, :3, 3] = X0 + e, Y0 + n, 1.6
    (tmp_path / "images").mkdir()
    names = [f"images/q{i}.jpg" for i in range(3)]
    for name in names[:2]:  # the third image is missing: that row fails alone
        Image.fromarray(IMAGE).save(tmp_path / name)
    cams = np.tile([256, 128, 128, 128, 128, 64, 0, 0], (3, 1))
    cs = CaptureSet.from_poses(names, ["r"] * 3, np.arange(3).astype("datetime64[s]"), cams, ["pinhole"] * 3, T, CRS,
                               tmp_path)
    table = cs.write(tmp_path, QUERIES_NAME)
    from neuralmaps.maps.workers import dask_client

    with dask_client(None, 1, None, 1, None) as client:
        gdf = synth["nm"].localize_many(table, radius_m=15, progress=False, client=client)
        # A user's table: absolute image paths, a cam.json column, priors in columns, a heading prior.
        (tmp_path / "cam.json").write_text(json.dumps(CAM))
        lat, lon = _latlon(synth["region"], 22.0, 18.0)
        import pandas as pd

        user = pd.DataFrame({"image": [str(tmp_path / names[0])], "camera": ["cam.json"], "prior_lat": [lat],
                             "prior_lon": [lon], "heading_prior_deg": [30.0]})
        one = synth["nm"].localize_many(user, radius_m=5, progress=False, client=client, image_root=tmp_path)
    assert len(one) == 1 and one["error"].isna().all() and one["prior_source"].iloc[0] == "table"
    assert "err_m" not in one.columns  # no truth in that table
    assert abs((one["heading_deg"].iloc[0] - 30.0 + 180) % 360 - 180) <= 30.0 + 1e-3
    assert math.hypot(one["easting"].iloc[0] - (X0 + 22), one["northing"].iloc[0] - (Y0 + 18)) <= 5 + 1e-6
    assert len(gdf) == 3 and str(gdf.crs) == CRS and list(gdf["image"]) == [str(tmp_path / n) for n in names]
    ok = gdf.iloc[:2]
    assert ok["error"].isna().all() and gdf["error"].iloc[2].startswith("image not found")
    assert np.allclose(ok.geometry.x, ok["easting"]) and np.allclose(ok.geometry.y, ok["northing"])
    assert gdf.geometry.iloc[2] is None or gdf.geometry.iloc[2].is_empty
    truth = np.array([[X0 + e, Y0 + n] for e, n, _ in poses])
    assert np.allclose(gdf[["true_easting", "true_northing"]].to_numpy(), truth)
    assert np.allclose(gdf["true_heading_deg"], [h for *_, h in poses])
    # Simulated GPS priors within 10 m of the truth; estimates within the 15 m search disc around them.
    px, py = synth["region"].lonlat_to_xy(gdf["prior_lon"].iloc[:2].to_numpy(), gdf["prior_lat"].iloc[:2].to_numpy())
    assert (np.hypot(px - truth[:2, 0], py - truth[:2, 1]) <= 10.0 + 1e-6).all()
    assert (np.hypot(ok["easting"] - px, ok["northing"] - py) <= 15.0 + 1e-6).all()
    assert (ok["err_m"] <= 25.0 + 1e-6).all() and (ok["prior_source"] == "truth+noise").all()


# -- semantics ------------------------------------------------------------------------------------
def test_semantics_at(synth):
    nm, region = synth["nm"], synth["region"]
    s = nm.semantics_at(*_latlon(region, 10.25, 30.25))
    assert s.class_name == "road" and s.probabilities["road"] == pytest.approx(0.9, abs=1e-3)
    assert set(s.probabilities) == set(CLASS_NAMES) and s.probabilities["building"] == pytest.approx(0.01, abs=1e-3)
    assert nm.semantics_at(*_latlon(region, 60.25, 10.25)).class_name == "building"
    hole = nm.semantics_at(*_latlon(region, 80.0, 80.0))
    assert hole.class_name is None and hole.probabilities == {}
    with pytest.raises(QueryError, match="outside the map"):
        nm.semantics_at(*_latlon(region, 120.0, 10.0))


def test_classes_in(synth):
    import shapely
    from shapely.geometry import box

    from neuralmaps.geo.region import _reproject_geom

    nm = synth["nm"]
    square = box(X0 + 40, Y0 + 10, X0 + 60, Y0 + 30)  # 8 m of road, 12 m of building, 20 m tall
    gdf = nm.classes_in(_reproject_geom(square, CRS, "EPSG:4326"))  # lon/lat, crs=4326
    areas = dict(zip(gdf["class_name"], gdf["area_m2"]))
    assert areas == pytest.approx({"building": 240.0, "road": 160.0}, abs=1e-4)
    assert gdf["fraction"].sum() == pytest.approx(1.0) and str(gdf.crs) == CRS
    assert gdf.geometry.area.to_numpy() == pytest.approx(gdf["area_m2"].to_numpy())
    # Across the no-data quadrant and past the map's east edge: no_data takes the rest, areas sum up.
    poly = shapely.Polygon([(X0 + 50, Y0 + 50), (X0 + 110, Y0 + 52), (X0 + 70, Y0 + 80)])
    gdf = nm.classes_in(poly, crs=CRS)
    assert gdf["area_m2"].sum() == pytest.approx(poly.area, rel=1e-9)
    assert set(gdf["class_name"]) == {"building", "no_data"}
    with pytest.raises(QueryError, match="outside the map"):
        nm.classes_in(box(X0 + 200, Y0, X0 + 210, Y0 + 10), crs=CRS)


# -- real photos of the digital twin, through a non-learned matcher ---------------------------------
TWIN_BBOX = (24.9440, 60.1690, 24.9470, 60.1705)


@pytest.fixture(scope="module")
def twin(tmp_path_factory, helsinki_pbf) -> dict:
    """Twin photos (2 short pedestrian runs, ground-truth poses) and a map of the orthophoto's
    colour features (`testing.aerial_rgb_store`) queried by `testing.AerialRGBMatcher`."""
    import geopandas as gpd

    from neuralmaps.maps.twin import capture_twin
    from neuralmaps.testing import AerialRGBMatcher, aerial_rgb_store

    d = tmp_path_factory.mktemp("twin")
    cap = capture_twin(helsinki_pbf, d / "cap", TWIN_BBOX, num_map_runs=1, num_query_runs=2, seed=1,
                       map_run_length_m=20, query_run_length_m=60, progress=False)
    matcher = AerialRGBMatcher(preset("cpu-tiny"))
    nm = aerial_rgb_store(cap / "aerial.tif", d / "rgb.zarr", matcher)
    return {"cap": cap, "nm": nm, "matcher": matcher, "queries": gpd.read_parquet(cap / "queries.parquet")}


def test_twin_photos_localized_end_to_end(twin):
    """Photo files, their CaptureSet cameras (height, pitch) and a 30 m prior 7.8 m off: the second
    query run (textured ground in view) is found to decimetres."""
    nm, q = twin["nm"], twin["queries"]
    ok = 0
    for i in range(24, 40, 2):
        r = q.iloc[i]
        lon, lat = nm.region.xy_to_lonlat(r["x"] + 6, r["y"] - 5)
        res = nm.localize(twin["cap"] / r["image"], r, prior=(float(lat), float(lon)), radius_m=30, model=twin["matcher"])
        d_m = math.hypot(res.easting - r["x"], res.northing - r["y"])
        d_deg = abs((res.heading_deg - r["heading_deg"] + 180) % 360 - 180)
        ok += d_m <= 1.0 and d_deg <= 3.0
    assert ok >= 6  # measured 8 of 8 (0.04-0.51 m, 0.03-2.1 deg)


def test_twin_sequence(twin):
    """Frames 30-33 of the second run with their true relative motion: frame 33 alone is 17 m off
    (measured); jointly every frame is within decimetres."""
    nm, q = twin["nm"], twin["queries"]
    qq = q.iloc[30:34]
    motion = relative_poses_from(qq["x"], qq["y"], qq["heading_deg"])
    lon, lat = nm.region.xy_to_lonlat(qq["x"].iloc[0] + 6, qq["y"].iloc[0] - 5)
    res = nm.localize_sequence([twin["cap"] / p for p in qq["image"]], [qq.iloc[k] for k in range(4)], motion,
                               prior=(float(lat), float(lon)), radius_m=30, model=twin["matcher"])
    for k in range(4):
        d_m = math.hypot(res[k].easting - qq["x"].iloc[k], res[k].northing - qq["y"].iloc[k])
        d_deg = abs((res[k].heading_deg - qq["heading_deg"].iloc[k] + 180) % 360 - 180)
        assert d_m < 0.5 and d_deg < 1.0, (k, d_m, d_deg)  # measured <= 0.15 m, <= 0.31 deg


def test_semantic_iou_against_osm(synth, helsinki_pbf):
    """Window by window (64 px chunks) equals one pass over the whole map."""
    from neuralmaps.classes import AREA_CLASSES, class_id
    from neuralmaps.geo import read_osm
    from neuralmaps.geo.rasterize import area_label

    nm, region = synth["nm"], synth["region"]
    out = nm.semantic_iou(helsinki_pbf)
    gt = area_label(read_osm(helsinki_pbf, region, margin_m=20.0), region)
    xs, ys = region.coords()
    ex, ny = np.meshgrid(xs - X0, ys - Y0)
    valid = ~((ex > HOLE) & (ny > HOLE))
    pred = np.where(ex < SPLIT, class_id("road"), class_id("building"))
    labelled = valid & np.isin(gt, [class_id(a) for a in AREA_CLASSES])
    assert out["num_cells"] == int(labelled.sum()) > 1000
    for name in ("road", "building"):
        c = class_id(name)
        inter = np.sum(labelled & (gt == c) & (pred == c))
        union = np.sum(labelled & ((gt == c) | (pred == c)))
        assert out["iou"][name] == pytest.approx(inter / union)
    assert out["iou"]["sidewalk"] == 0.0  # OSM has sidewalks here, the map never says so
