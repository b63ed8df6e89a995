"""GIS export of a neural map (neuralmaps.geo.export): COGs, styles, RAT, STAC Item, GeoPackage, QGIS.

One small synthetic map (300 x 200 px at 0.5 m in EPSG:32635, in Helsinki, dask-backed) is exported
once per module with tiny windows and COG blocks, so that the windowed writing, the polygon merging
across window seams and the COG overviews are all exercised on a map that takes seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
import xarray as xr
from rasterio.transform import from_origin
from scipy import ndimage

import neuralmaps.geo.export as gx
from neuralmaps.config import AREA_CLASSES
from neuralmaps.geo import GeoInputError, export_map

H, W, RES = 200, 300, 0.5
E0, N0 = 385_000.0, 6_673_000.0  # NW corner (Helsinki centre is at about E 385 500, N 6 672 000)
CRS = "EPSG:32635"
NAMES = list(AREA_CLASSES)
COLORS = [(255, 255, 255), (244, 35, 232), (128, 64, 128), (152, 251, 152), (70, 70, 70)]
LANDMARK = 4  # "building": an L whose corner pixel is at (L_ROW, L_COL), arms 12 px east and 8 px south
L_ROW, L_COL = 60, 60  # crosses the 64-px window seams of the polygon pass both ways
INVALID = (slice(0, 20), slice(250, 300))  # top-right patch with no valid data
CLASS_HOLE = (slice(150, 160), slice(20, 40))  # valid pixels with no class (255)


def _pixel_centre(row: int, col: int) -> tuple[float, float]:
    return E0 + (col + 0.5) * RES, N0 - (row + 0.5) * RES


def make_map() -> xr.Dataset:
    """The test map, as numpy-backed data wrapped into dask chunks of 64 px (a store opened lazily)."""
    rng = np.random.default_rng(0)
    rr, cc = np.mgrid[0:H, 0:W].astype(np.float32)
    cls = ((cc // 40 + rr // 50) % 4).astype(np.uint8)  # classes 0..3 in a checkerboard-like pattern
    cls[L_ROW, L_COL:L_COL + 12] = LANDMARK
    cls[L_ROW:L_ROW + 8, L_COL] = LANDMARK
    cls[CLASS_HOLE] = 255
    valid = np.ones((H, W), bool)
    valid[INVALID] = False
    feats = np.stack([np.sin(rr / 17 + k) + np.cos(cc / 23 * (k + 1)) for k in range(6)]).astype(np.float32)
    feats += 0.05 * rng.standard_normal(feats.shape, dtype=np.float32)
    feats[:, ~valid] = np.nan
    matching = rng.standard_normal((4, H, W)).astype(np.float16)
    prob = rng.dirichlet(np.ones(len(NAMES)), size=(H, W)).transpose(2, 0, 1).astype(np.float32)
    conf = rng.random((H, W), dtype=np.float32)
    obs = ((rr + 2 * cc) % 9).astype(np.int32)
    ds = xr.Dataset(
        {
            "features": (("feature", "y", "x"), feats),
            "matching": (("band", "y", "x"), matching),
            "valid": (("y", "x"), valid),
            "observations": (("y", "x"), obs),
            "confidence": (("y", "x"), conf),
            "semantic_class": (("y", "x"), cls),
            "semantic_prob": (("class", "y", "x"), prob),
        },
        coords={"x": E0 + (np.arange(W) + 0.5) * RES, "y": N0 - (np.arange(H) + 0.5) * RES,
                "class": NAMES},
    )
    return ds.rio.write_crs(CRS).chunk({"y": 64, "x": 64})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    ds = make_map()
    assert ds["features"].chunks is not None  # dask-backed, as a store opened with xr.open_zarr
    mp = pytest.MonkeyPatch()
    mp.setattr(gx, "WINDOW_MB", 0.05)  # 64-px windows: many windows per layer
    mp.setattr(gx, "POLYGON_FLUSH", 5)  # appends to the GeoPackage many times
    mp.setattr(gx, "BLOCK_PX", 128)  # 128-px COG tiles (GDAL's least), so a 300 x 200 map gets overviews
    try:
        files = export_map(ds, out, name="hki", class_names=NAMES, class_colors=COLORS, progress=False,
                           attrs={"model_sha256": "ab" * 32, "config": {"preset": "cpu-tiny", "cell_m": 0.5},
                                  "created": "2026-12-03T00:00:00+00:00"})
    finally:
        mp.undo()
    return ds, out, files


def _read(path, band=None, **kw):
    with rasterio.open(path) as src:
        return src.read(band, **kw)


# ---------------------------------------------------------------------------------------------
def test_every_cog_validates_and_is_georeferenced(exported):
    from rio_cogeo.cogeo import cog_validate

    _, out, files = exported
    tifs = sorted(p for p in out.iterdir() if p.suffix == ".tif")
    assert {p.stem.removeprefix("hki_") for p in tifs} == {
        "pca", "matching", "semantic_class", "semantic_prob", "valid", "observations", "confidence"}
    for p in tifs:
        ok, errors, warnings = cog_validate(p, quiet=True)
        assert ok and not errors and not warnings, (p.name, errors, warnings)
        with rasterio.open(p) as src:
            assert src.crs.to_epsg() == 32635
            assert src.transform.almost_equals(from_origin(E0, N0, RES, RES))
            assert (src.height, src.width) == (H, W)
            assert src.block_shapes[0] == (128, 128)
            assert src.overviews(1) == [2, 4], p.name  # 300 px -> 150 -> 75 (fits one 128-px tile)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_landmark_found_at_its_easting_northing(exported):
    """The L is asymmetric: a flip of either axis or an off-by-one in the transform moves it."""
    _, out, _ = exported
    with rasterio.open(out / "hki_semantic_class.tif") as src:
        data = src.read(1)
        e, n = _pixel_centre(L_ROW, L_COL)
        assert src.index(e, n) == (L_ROW, L_COL)
        assert data[src.index(e, n)] == LANDMARK
        assert data[src.index(e + 5.0, n)] == LANDMARK  # east arm (10 px)
        assert data[src.index(e, n - 3.0)] == LANDMARK  # south arm (6 px)
        assert data[src.index(e - 1.0, n)] != LANDMARK  # nothing west
        assert data[src.index(e, n + 1.0)] != LANDMARK  # nothing north
        # the pixel's edge, not its centre, is on the 0.5-m grid
        assert src.index(E0 + L_COL * RES + 0.01, N0 - L_ROW * RES - 0.01) == (L_ROW, L_COL)


def test_classes_colour_table_qml_and_rat(exported):
    ds, out, _ = exported
    cls = ds["semantic_class"].values
    valid = ds["valid"].values
    with rasterio.open(out / "hki_semantic_class.tif") as src:
        got = src.read(1)
        assert src.dtypes[0] == "uint8" and src.nodata == 255
        cmap = src.colormap(1)
        assert [cmap[i][:3] for i in range(len(NAMES))] == COLORS
        # nearest overviews: only class values, never an average of two
        ov = src.read(1, out_shape=(H // 2, W // 2))
        assert set(np.unique(ov)) <= set(range(len(NAMES))) | {255}
        blocks = got.reshape(H // 2, 2, W // 2, 2)  # each overview pixel is one of its 2 x 2 pixels
        assert (blocks == ov[:, None, :, None]).any(axis=(1, 3)).all()
    np.testing.assert_array_equal(got, np.where(valid, cls, 255))
    assert (got[INVALID] == 255).all() and (got[CLASS_HOLE] == 255).all()
    assert set(np.unique(got)) == {0, 1, 2, 3, 4, 255}

    qml = ET.parse(out / "hki_semantic_class.qml").getroot()
    r = qml.find("pipe/rasterrenderer")
    assert r.get("type") == "paletted"
    entries = r.findall("colorPalette/paletteEntry")
    assert [e.get("label") for e in entries] == NAMES
    assert [int(e.get("value")) for e in entries] == list(range(5))
    assert [e.get("color") for e in entries] == ["#{:02x}{:02x}{:02x}".format(*c) for c in COLORS]

    rat = ET.parse(out / "hki_semantic_class.tif.aux.xml").getroot().find("PAMRasterBand/GDALRasterAttributeTable")
    assert [f.findtext("Name") for f in rat.findall("FieldDefn")] == ["Value", "Class", "Red", "Green", "Blue"]
    rows = [[f.text for f in row.findall("F")] for row in rat.findall("Row")]
    assert rows == [[str(i), n, *map(str, c)] for i, (n, c) in enumerate(zip(NAMES, COLORS))]


def test_float_layers_values_nodata_and_average_overviews(exported):
    ds, out, _ = exported
    valid = ds["valid"].values
    with rasterio.open(out / "hki_matching.tif") as src:
        assert src.count == 4 and np.isnan(src.nodata)
        assert src.tags(1, "IMAGE_STRUCTURE").get("NBITS") == "16"  # half floats in the file
        m = src.read()
    want = ds["matching"].values.astype(np.float32)
    np.testing.assert_array_equal(m[:, valid], want[:, valid])  # float16 in, float16 out: exact
    assert np.isnan(m[:, ~valid]).all()

    with rasterio.open(out / "hki_semantic_prob.tif") as src:
        assert src.descriptions == tuple(NAMES)
        p = src.read()
    np.testing.assert_array_equal(p[:, valid], ds["semantic_prob"].values[:, valid])
    assert np.isnan(p[:, ~valid]).all()

    with rasterio.open(out / "hki_confidence.tif") as src:
        c = src.read(1)
        ov = src.read(1, out_shape=(H // 2, W // 2))
    conf = ds["confidence"].values
    np.testing.assert_array_equal(c[valid], conf[valid])
    # average overviews: each overview pixel is the mean of its 2 x 2 block (here: all valid)
    block = conf[100:102, 10:12]
    assert ov[50, 5] == pytest.approx(block.mean(), abs=1e-6)
    assert abs(ov[50, 5] - block[0, 0]) > 1e-3  # and not nearest (random data: they differ)

    v = _read(out / "hki_valid.tif", 1)
    np.testing.assert_array_equal(v, valid.astype(np.uint8))
    o = _read(out / "hki_observations.tif", 1)
    np.testing.assert_array_equal(o, ds["observations"].values)


def test_pca_picture(exported):
    ds, out, _ = exported
    valid = ds["valid"].values
    with rasterio.open(out / "hki_pca.tif") as src:
        assert src.count == 3 and src.dtypes == ("uint8",) * 3 and src.nodata == 0
        assert [ci.name for ci in src.colorinterp] == ["red", "green", "blue"]
        rgb = src.read()
    assert (rgb[:, ~valid] == 0).all()
    assert (rgb[:, valid] >= 1).all()  # valid pixels never look like nodata
    # a 1-99 % stretch of the principal components: each channel spans most of 1..255
    for ch in rgb:
        lo, hi = np.percentile(ch[valid], [5, 95])
        assert hi - lo > 120
    # the first component follows the features' dominant pattern: correlation with it is high
    f = ds["features"].values[:, valid].T
    fc = f - f.mean(0)
    pc1 = fc @ np.linalg.svd(fc, full_matrices=False)[2][0]
    r = np.corrcoef(pc1, rgb[0][valid].astype(float))[0, 1]
    assert abs(r) > 0.95


def test_stac_item(exported):
    import pystac

    _, out, files = exported
    path = out / "hki.json"
    d = json.loads(path.read_text())  # strict JSON: no NaN literals anywhere
    json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    for key in ("type", "stac_version", "id", "geometry", "bbox", "properties", "links", "assets"):
        assert key in d
    assert d["type"] == "Feature" and d["id"] == "hki" and d["geometry"]["type"] == "Polygon"
    assert any("projection" in e for e in d["stac_extensions"])
    assert any("raster" in e for e in d["stac_extensions"])
    props = d["properties"]
    assert props["datetime"].startswith("2026-12-03T00:00:00")
    assert props["proj:code"] == "EPSG:32635"
    assert props["proj:shape"] == [H, W]
    assert props["proj:transform"] == [RES, 0.0, E0, 0.0, -RES, N0]
    assert props["neuralmaps:model_sha256"] == "ab" * 32
    assert props["neuralmaps:config"] == {"preset": "cpu-tiny", "cell_m": 0.5}
    lon0, lat0, lon1, lat1 = d["bbox"]  # in Helsinki
    assert 24.8 < lon0 < lon1 < 25.1 and 60.1 < lat0 < lat1 < 60.3
    # the footprint, back in UTM, is the map's rectangle (edges densified, so it follows the grid)
    foot = gpd.GeoSeries([shapely.geometry.shape(d["geometry"])], crs=4326).to_crs(CRS)[0]
    rect = shapely.box(E0, N0 - H * RES, E0 + W * RES, N0)
    assert foot.symmetric_difference(rect).area < 1e-4 * rect.area

    assets = d["assets"]
    on_disk = {p.name for p in out.iterdir() if p.name != "hki.json"}
    assert {Path(a["href"]).name for a in assets.values()} == on_disk  # an asset for every file
    assert all(a["href"].startswith("./") for a in assets.values())  # relative: the folder can move
    cog = "image/tiff; application=geotiff; profile=cloud-optimized"
    for key in ("pca", "matching", "semantic_class", "semantic_prob", "valid", "observations", "confidence"):
        assert assets[key]["type"] == cog and assets[key]["roles"]
        assert len(assets[key]["raster:bands"]) == {"pca": 3, "matching": 4, "semantic_prob": 5}.get(key, 1)
    assert assets["pca"]["roles"] == ["visual"]
    assert assets["matching"]["raster:bands"][0]["nodata"] == "nan"
    assert assets["confidence"]["raster:bands"][0]["nodata"] == "nan"
    assert assets["semantic_class"]["raster:bands"][0]["nodata"] == 255
    assert assets["semantic_class"]["raster:bands"][0]["data_type"] == "uint8"
    assert [c["description"] for c in assets["semantic_class"]["classification:classes"]] == NAMES
    assert assets["polygons"]["type"] == "application/geopackage+sqlite3"
    assert assets["qgis_project"]["href"] == "./hki.qgs"
    st = assets["confidence"]["raster:bands"][0]["statistics"]
    assert 0 <= st["minimum"] < 0.01 and 0.99 < st["maximum"] <= 1

    item = pystac.Item.from_file(str(path))  # round trip
    assert item.id == "hki" and item.properties["proj:code"] == "EPSG:32635"
    assert Path(item.assets["semantic_class"].get_absolute_href()) == out / "hki_semantic_class.tif"
    back = item.to_dict(include_self_link=False, transform_hrefs=False)
    assert back["assets"] == d["assets"] and back["properties"] == d["properties"]
    for key, p in files.items():
        assert p.exists(), key


def test_polygons_match_pixel_counts(exported):
    ds, out, _ = exported
    gdf = gpd.read_file(out / "hki_semantic.gpkg", layer="semantic_class")
    assert gdf.crs.to_epsg() == 32635
    assert list(gdf.columns) == ["class_id", "class_name", "area_m2", "geometry"]
    assert (gdf.geom_type == "Polygon").all() and gdf.is_valid.all()
    assert (gdf["class_name"] == [NAMES[i] for i in gdf["class_id"]]).all()
    np.testing.assert_allclose(gdf["area_m2"], gdf.area, rtol=1e-9)
    cls = np.where(ds["valid"].values, ds["semantic_class"].values, 255)
    for k, name in enumerate(NAMES):
        mask = cls == k
        sub = gdf[gdf["class_id"] == k]
        assert sub["area_m2"].sum() == pytest.approx(mask.sum() * RES**2, rel=1e-9), name
        # one polygon per 4-connected region: the pieces cut at window seams were merged
        assert len(sub) == ndimage.label(mask)[1], name
    (lm,) = gdf[gdf["class_id"] == LANDMARK].geometry
    e, n = _pixel_centre(L_ROW, L_COL)
    assert lm.area == pytest.approx(19 * RES**2)
    assert lm.bounds == pytest.approx((e - RES / 2, n - 7.5 * RES, e + 11.5 * RES, n + RES / 2))
    assert not gdf.intersects(gpd.GeoSeries.from_xy([E0 + 260], [N0 - 5], crs=CRS)[0]).any()  # invalid patch


def test_qgis_project_file(exported):
    _, out, _ = exported
    root = ET.parse(out / "hki.qgs").getroot()
    sources = [m.findtext("datasource") for m in root.iter("maplayer")]
    assert all(s.startswith("./") for s in sources)  # relative paths
    assert {s.split("|")[0][2:] for s in sources} == {p.name for p in out.iterdir()
                                                      if p.suffix in (".tif", ".gpkg")}
    assert root.find("projectCrs/spatialrefsys/authid").text == CRS


def test_bad_input_is_refused(tmp_path):
    ds = make_map()
    with pytest.raises(GeoInputError, match="no CRS"):
        export_map(ds.drop_vars("spatial_ref"), tmp_path, class_names=NAMES, progress=False)
    with pytest.raises(GeoInputError, match="valid"):
        export_map(ds.drop_vars("valid"), tmp_path, class_names=NAMES, progress=False)
    with pytest.raises(GeoInputError, match="colour"):
        export_map(ds, tmp_path, class_names=NAMES, class_colors=COLORS[:2], progress=False)
    with pytest.raises(GeoInputError, match="north-up"):
        export_map(ds.isel(y=slice(None, None, -1)), tmp_path, class_names=NAMES, progress=False)
    with pytest.raises(GeoInputError, match="name"):
        export_map(ds, tmp_path, name="../x", class_names=NAMES, progress=False)
    assert not list(tmp_path.iterdir())


def test_geo_export_imports_no_torch():
    code = "import sys, neuralmaps.geo.export; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})


# ---------------------------------------------------------------------------------------------
# QGIS 3.22 (Debian's python3-qgis) is the client. The project venv cannot import qgis, so the
# check runs with the system interpreter; it is skipped where that has no PyQGIS.
SYSTEM_PYTHON = "/usr/bin/python3"


def _has_pyqgis() -> bool:
    if not Path(SYSTEM_PYTHON).exists():
        return False
    try:
        r = subprocess.run([SYSTEM_PYTHON, "-c", "import qgis.core"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


@pytest.mark.skipif(not _has_pyqgis(), reason="PyQGIS not importable by /usr/bin/python3 "
                    "(apt-get install python3-qgis qgis-providers)")
def test_qgis_opens_and_renders_the_project(exported, tmp_path):
    _, out, _ = exported
    png = tmp_path / "render.png"
    probes = {"invalid": (E0 + 140, N0 - 4), "valid": (E0 + 50, N0 - 50)}
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "XDG_RUNTIME_DIR": str(tmp_path)}
    env.pop("PYTHONPATH", None)
    args = [SYSTEM_PYTHON, str(Path(__file__).with_name("qgis_check.py")), str(out / "hki.qgs"), str(png)]
    args += [f"{k}={e},{n}" for k, (e, n) in probes.items()]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["read"] and res["project_crs"] == CRS
    layers = res["layers"]
    assert len(layers) == 8  # 7 rasters + the class polygons
    xmin, ymin, xmax, ymax = E0, N0 - H * RES, E0 + W * RES, N0
    for name, info in layers.items():
        assert info["valid"], name
        assert info["crs"] == CRS, name
        assert os.path.dirname(info["source"].split("|")[0]) == str(out)  # relative path resolved
        if info["renderer"] != "categorizedSymbol":
            assert info["extent"] == pytest.approx([xmin, ymin, xmax, ymax]), name
        else:  # the polygons' extent: the class pixels, inside the map
            x0, y0, x1, y1 = info["extent"]
            assert xmin <= x0 < x1 <= xmax and ymin <= y0 < y1 <= ymax
    sem = layers["semantic classes"]
    assert sem["renderer"] == "paletted"
    assert sem["labels"] == NAMES and sem["legend"] == NAMES
    assert sem["rat_classes"] == NAMES  # QGIS's GDAL (3.6) reads the RAT sidecar
    assert sem["colors"] == ["#{:02x}{:02x}{:02x}".format(*c) for c in COLORS]
    assert layers["features (PCA RGB)"]["renderer"] == "multibandcolor"
    assert layers["semantic polygons"]["renderer"] == "categorizedSymbol"
    assert layers["semantic polygons"]["labels"] == NAMES
    assert layers["observation count"]["renderer"] == "singlebandpseudocolor"
    assert layers["matching features"]["renderer"] == "singlebandgray"
    rend = res["render"]
    assert png.exists() and not rend["errors"]
    assert rend["distinct_colors"] > 1000  # a picture, not a blank or flat image
    # where the map has no data QGIS shows the white background; elsewhere, the picture
    assert res["probes"]["invalid"] == "#ffffff"
    assert res["probes"]["valid"] != "#ffffff"
    if os.environ.get("NEURALMAPS_KEEP_RENDER"):
        shutil.copy(png, os.environ["NEURALMAPS_KEEP_RENDER"])


def test_minimal_numpy_map_without_semantics(tmp_path):
    """Only features + valid, in memory (no dask): the layers that exist, no polygons, a valid COG."""
    from rio_cogeo.cogeo import cog_validate

    ds = make_map().compute()[["features", "valid"]]
    files = export_map(ds, tmp_path, name="m", progress=True)
    assert {k for k in files if not k.startswith("qml_")} == {"pca", "valid", "qgis_project", "stac_item"}
    assert cog_validate(files["pca"], quiet=True)[0]
    d = json.loads(files["stac_item"].read_text())
    assert set(d["assets"]) == {"pca", "valid", "qml_pca", "qml_valid", "qgis_project"}
    root = ET.parse(files["qgis_project"]).getroot()
    assert [m.findtext("datasource") for m in root.iter("maplayer")] == ["./m_pca.tif", "./m_valid.tif"]
