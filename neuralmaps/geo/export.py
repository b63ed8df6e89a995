"""GIS export of a neural map: COG layers, QGIS styles and project, STAC Item, GeoPackage polygons.

`export_map(ds, out_dir)` turns a neural-map store (DESIGN.md §5; north-up, dims (y, x), coordinates
at pixel centres, CRS on `ds.rio.crs`) into files that QGIS and STAC tools read, all in the map's CRS:

| file | content |
|---|---|
| `<name>_pca.tif` | PCA-RGB picture of `features`: uint8 RGB, 0 = nodata (valid pixels are 1..255) |
| `<name>_matching.tif` | `matching` as half-float bands (TIFF NBITS=16), NaN = nodata |
| `<name>_semantic_class.tif` | class index (uint8, 255 = nodata) with a colour table; `.qml` + RAT `.aux.xml` |
| `<name>_semantic_prob.tif` | per-class probabilities, one band per class (description = class name) |
| `<name>_valid.tif`, `<name>_observations.tif`, `<name>_confidence.tif` | masks and counts |
| `<name>_semantic.gpkg` | layer `semantic_class`: class polygons (`class_id`, `class_name`, `area_m2`) |
| `<name>.qgs` | QGIS project opening every layer with its style (relative paths) |
| `<name>.json` | STAC Item (projection, raster and classification extensions), an asset per file |

Every raster also gets a `<file>.qml` style sidecar, which QGIS loads as the layer's default style
(QGIS < 3.30 reads class names only from there, not from a RAT).

Memory is bounded whatever the map's size: each layer is written window by window (a window holds at
most `WINDOW_MB` of samples, or one store chunk; `.values` is only ever taken on one window) into a
tiled GTiff, its overview levels are written window by window too and attached through a VRT, and
that is copied to a COG with `rasterio.shutil.copy(driver="COG")` under a `GDAL_CACHE_MB` block cache
(`rasterio.open(driver="COG")` would buffer the whole raster, DESIGN.md §6; the COG driver's own
overview generation holds a full-width strip). The PCA is fitted on a
strided subsample of at most `PCA_SAMPLE` valid pixels. Polygons are traced per window and the pieces
that touch an inner window edge are merged afterwards, so a polygon never ends at a window seam.

No torch here (geo/ must stay importable without it).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import rasterio
import rasterio.features
import rasterio.shutil
import xarray as xr
from rasterio.enums import ColorInterp
from rasterio.windows import Window

from .errors import GeoInputError
from .region import Region
from ..storage import atomic_path, atomic_write_bytes

__all__ = [
    "export_map",
    "export_seconds_per_km2",
    "synthetic_map_dataset",
    "default_class_colors",
    "TAG_PREFIX",
]

WINDOW_MB = 64.0  # samples held per window (one layer at a time); bounds the export's memory
GDAL_CACHE_MB = 64  # GDAL block cache while writing and copying to COG
# Metadata of every layer: NEURALMAPS_LAYER (its key) and the map's attrs (model checksum, checkpoint,
# ...), so that a matching COG alone is enough to localize (`NeuralMap.open`).
TAG_PREFIX = "NEURALMAPS_"
BLOCK_PX = 512  # COG tile size
PCA_SAMPLE = 200_000  # at most this many pixels fit the PCA
CLASS_NODATA = 255
QGIS_VERSION = "3.22.0-Białowieża"  # the Debian QGIS that tests read the project with

# Cityscapes-like colours for the project's class names; other names get `_PALETTE` colours.
_KNOWN_COLORS: dict[str, tuple[int, int, int]] = {
    "crosswalk": (255, 255, 255), "sidewalk": (244, 35, 232), "road": (128, 64, 128),
    "terrain": (152, 251, 152), "building": (70, 70, 70), "fence": (190, 153, 153),
    "pole": (153, 153, 153), "tree": (107, 142, 35), "traffic_sign": (220, 220, 0),
    "traffic_light": (250, 170, 30), "street_light": (0, 0, 142), "void": (0, 0, 0),
}
_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
_VIRIDIS = ["#440154", "#3b528b", "#21918c", "#5ec962", "#fde725"]


def default_class_colors(class_names: Sequence[str]) -> list[tuple[int, int, int]]:
    """One RGB colour per class: fixed colours for the project's class names, a palette otherwise."""
    return [_KNOWN_COLORS.get(n, _PALETTE[i % len(_PALETTE)]) for i, n in enumerate(class_names)]


# ---------------------------------------------------------------------------------------------
# Layers and the streaming COG writer
# ---------------------------------------------------------------------------------------------
@dataclass
class _Layer:
    """One raster output: how to read a window of it, and how to write and style it."""

    key: str  # file suffix and STAC asset key
    title: str
    count: int
    dtype: str  # numpy dtype written (float16 is written as Float32 with NBITS=16)
    read: Callable[[Window], np.ndarray]  # window -> (count, h, w) array of `dtype`
    nodata: float | int | None
    resampling: str  # overview resampling
    descriptions: list[str]
    roles: list[str]
    style: str  # "rgb" | "paletted" | "gray" | "pseudocolor"
    colormap: dict[int, tuple[int, int, int, int]] | None = None
    read_bytes_per_px: int = 0  # bytes read per pixel when more than the output (the PCA's features)
    chunks: tuple[int, int] | None = None  # (y, x) chunk of the source when dask-backed
    stats: list[tuple[float, float]] = field(default_factory=list)  # per band (min, max) of data
    path: Path | None = None
    tags: dict[str, str] = field(default_factory=dict)  # GeoTIFF metadata (dataset domain)


def _window_shape(bytes_per_px: int, chunks: tuple[int, int] | None) -> tuple[int, int]:
    """(rows, cols) of the windows of a layer, holding at most WINDOW_MB where possible.

    Dask-backed sources are read in whole chunks (k x k of them): a chunk is decompressed whole
    anyway, and re-reading one per window was several times slower. So the bound is
    max(WINDOW_MB, one chunk) -- the store's chunk is its tile, a few tens of MB. Numpy-backed
    sources get squares of a multiple of BLOCK_PX (whole COG tiles) or of 64 px (least 64).
    """
    budget_px = WINDOW_MB * 2**20 / max(bytes_per_px, 1)
    if chunks is not None:
        cy, cx = chunks
        k = max(1, int(math.sqrt(budget_px / (cy * cx))))
        return cy * k, cx * k
    side = int(math.sqrt(budget_px))
    side = side // BLOCK_PX * BLOCK_PX if side >= BLOCK_PX else max(64, side // 64 * 64)
    return side, side


def _layer_window(layer: "_Layer") -> tuple[int, int]:
    itemsize = 4 if layer.dtype == "float16" else np.dtype(layer.dtype).itemsize
    # x3: the source window, its float32 copy and the output
    return _window_shape(max(layer.count * itemsize, layer.read_bytes_per_px) * 3, layer.chunks)


def _yx_chunks(da: xr.DataArray) -> tuple[int, int] | None:
    """The (y, x) chunk size of a dask-backed (..., y, x) array (its first chunk), else None."""
    if da.chunks is None:
        return None
    return int(da.chunks[-2][0]), int(da.chunks[-1][0])


def _windows(h: int, w: int, shape: tuple[int, int]) -> Iterator[Window]:
    wy, wx = shape
    for r in range(0, h, wy):
        for c in range(0, w, wx):
            yield Window(c, r, min(wx, w - c), min(wy, h - r))


def _sub(da: xr.DataArray, win: Window) -> np.ndarray:
    """The window of a (..., y, x) DataArray as numpy (computes only that window when dask-backed)."""
    r, c = int(win.row_off), int(win.col_off)
    return np.asarray(da.isel(y=slice(r, r + int(win.height)), x=slice(c, c + int(win.width))).values)


def _atomic_target(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def _write_cog(layer: _Layer, region: Region, path: Path, bar: Any) -> None:
    """Stream `layer` window by window into a tiled GTiff, then copy it to a COG at `path`."""
    half = layer.dtype == "float16"
    gtiff_dtype = "float32" if half else layer.dtype
    wshape = _layer_window(layer)
    fd, tmp = tempfile.mkstemp(suffix=".tif", prefix=f".{path.stem}.stream-", dir=path.parent)
    os.close(fd)
    profile: dict[str, Any] = dict(
        driver="GTiff", width=region.width, height=region.height, count=layer.count, dtype=gtiff_dtype,
        crs=region.crs_string, transform=region.transform, nodata=layer.nodata, tiled=True,
        blockxsize=BLOCK_PX, blockysize=BLOCK_PX, compress="deflate", zlevel=1, bigtiff="if_safer",
        interleave="pixel",  # as the COG: band interleave made the copy re-read every block per band
    )
    if half:
        profile["nbits"] = 16  # IEEE half floats in the TIFF; GDAL reads them back as Float32
    if layer.style == "rgb":
        profile["photometric"] = "RGB"
    lo = np.full(layer.count, np.inf)
    hi = np.full(layer.count, -np.inf)
    try:
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB * 2**20):
            with rasterio.open(tmp, "w", **profile) as dst:
                for win in _windows(region.height, region.width, wshape):
                    data = layer.read(win)
                    if data.shape != (layer.count, int(win.height), int(win.width)):
                        raise GeoInputError(f"{layer.key}: window read gave shape {data.shape}")
                    dst.write(data.astype(gtiff_dtype, copy=False), window=win)
                    lo, hi = _minmax(data, layer.nodata, lo, hi)
                    if bar is not None:
                        bar.update(1)
                dst.descriptions = tuple(layer.descriptions)
                if layer.colormap is not None:
                    dst.write_colormap(1, layer.colormap)
                if layer.style == "rgb":
                    dst.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
            ovrs = _build_overviews(tmp, layer, profile, wshape)
            vrt = _vrt_with_overviews(tmp, ovrs, layer, region, gtiff_dtype)
            opts: dict[str, Any] = dict(
                compress="deflate", predictor="yes", blocksize=BLOCK_PX, bigtiff="if_safer",
                overviews="FORCE_USE_EXISTING", num_threads=1,
            )
            if half:
                opts["nbits"] = 16
            with atomic_path(path, suffix=".tif") as final_tmp:
                try:
                    rasterio.shutil.copy(vrt, final_tmp, driver="COG", **opts)
                finally:
                    Path(str(final_tmp) + ".aux.xml").unlink(missing_ok=True)
    finally:
        for p in [tmp, *_stream_siblings(tmp)]:
            Path(p).unlink(missing_ok=True)
            Path(p + ".aux.xml").unlink(missing_ok=True)
    layer.stats = [(float(a), float(b)) if np.isfinite(a) else (math.nan, math.nan) for a, b in zip(lo, hi)]
    layer.path = path


def _ovr_path(base: str, level: int) -> str:
    return f"{base[:-4]}.ovr{level}.tif"


def _stream_siblings(base: str) -> list[str]:
    """The overview GTiffs and the VRT made next to a stream GTiff (to clean up)."""
    return [base[:-4] + ".vrt"] + [str(p) for p in Path(base).parent.glob(Path(base).stem + ".ovr*.tif")]


def _build_overviews(base: str, layer: _Layer, profile: dict[str, Any], wshape: tuple[int, int]) -> list[str]:
    """Overview levels (factor 2, 4, ... until one COG tile holds the level) of the GTiff `base`,
    each written window by window from the previous level with the layer's resampling.

    GDAL's own overview generation (in the COG driver) holds a strip of tile rows x the full width x
    all bands: its memory grew with the map's width (measured: +113 MB from 1024 to 4096 px wide,
    16 bands). Here a level costs one window, whatever the map's size.
    """
    from rasterio.enums import Resampling

    resampling = Resampling[layer.resampling]
    paths: list[str] = []
    src_path, h, w = base, int(profile["height"]), int(profile["width"])
    # windows of the output level: at most the layer's window and whole tiles
    wy, wx = (max(BLOCK_PX, v // 2 // BLOCK_PX * BLOCK_PX) for v in wshape)
    while max(h, w) > BLOCK_PX:
        oh, ow = (h + 1) // 2, (w + 1) // 2
        path = _ovr_path(base, len(paths))
        prof = {**profile, "height": oh, "width": ow,
                "transform": profile["transform"] * rasterio.Affine.scale(profile["width"] / ow,
                                                                           profile["height"] / oh)}
        with rasterio.open(src_path) as src, rasterio.open(path, "w", **prof) as dst:
            for win in _windows(oh, ow, (wy, wx)):
                r, c, wh, ww = int(win.row_off), int(win.col_off), int(win.height), int(win.width)
                swin = Window(2 * c, 2 * r, min(2 * ww, w - 2 * c), min(2 * wh, h - 2 * r))
                dst.write(src.read(window=swin, out_shape=(layer.count, wh, ww), resampling=resampling),
                          window=win)
        paths.append(path)
        src_path, h, w = path, oh, ow
    return paths


_GDAL_TYPES = {"uint8": "Byte", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32", "int32": "Int32",
               "float32": "Float32", "float64": "Float64"}


def _vrt_with_overviews(base: str, ovrs: list[str], layer: _Layer, region: Region, dtype: str) -> str:
    """A VRT of `base` that declares `ovrs` as its overviews, with the layer's metadata tags, nodata,
    band descriptions, colour interpretation and colour table (the COG copies them from its source)."""
    root = ET.Element("VRTDataset", rasterXSize=str(region.width), rasterYSize=str(region.height))
    ET.SubElement(root, "SRS").text = region.crs.to_wkt()
    t = region.transform
    ET.SubElement(root, "GeoTransform").text = ", ".join(repr(float(v)) for v in (t.c, t.a, t.b, t.f, t.d, t.e))
    if layer.tags:
        md = ET.SubElement(root, "Metadata")
        for k, v in layer.tags.items():
            ET.SubElement(md, "MDI", key=k).text = v
    for b in range(1, layer.count + 1):
        band = ET.SubElement(root, "VRTRasterBand", dataType=_GDAL_TYPES[dtype], band=str(b))
        if layer.nodata is not None:
            ET.SubElement(band, "NoDataValue").text = "nan" if isinstance(layer.nodata, float) and math.isnan(
                layer.nodata) else repr(layer.nodata)
        ET.SubElement(band, "Description").text = layer.descriptions[b - 1]
        if layer.style == "rgb":
            ET.SubElement(band, "ColorInterp").text = ("Red", "Green", "Blue")[b - 1]
        elif layer.colormap is not None:
            ET.SubElement(band, "ColorInterp").text = "Palette"
            table = ET.SubElement(band, "ColorTable")
            for i in range(max(layer.colormap) + 1):
                c = layer.colormap.get(i, (0, 0, 0, 0))
                ET.SubElement(table, "Entry", c1=str(c[0]), c2=str(c[1]), c3=str(c[2]), c4=str(c[3]))
        else:
            ET.SubElement(band, "ColorInterp").text = "Gray"
        src = ET.SubElement(band, "SimpleSource")
        ET.SubElement(src, "SourceFilename", relativeToVRT="1").text = Path(base).name
        ET.SubElement(src, "SourceBand").text = str(b)
        for ovr in ovrs:
            o = ET.SubElement(band, "Overview")
            ET.SubElement(o, "SourceFilename", relativeToVRT="1").text = Path(ovr).name
            ET.SubElement(o, "SourceBand").text = str(b)
    path = base[:-4] + ".vrt"
    Path(path).write_bytes(ET.tostring(root, encoding="utf-8"))
    return path


def _minmax(data: np.ndarray, nodata: float | int | None, lo: np.ndarray, hi: np.ndarray):
    """Running per-band (min, max) of a (bands, h, w) window, ignoring nodata and NaN."""
    for b in range(data.shape[0]):
        band = data[b]
        if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
            band = band[band != nodata]
        elif band.dtype.kind == "f":
            band = band[~np.isnan(band)]
        if band.size:
            lo[b] = min(lo[b], float(band.min()))
            hi[b] = max(hi[b], float(band.max()))
    return lo, hi


# ---------------------------------------------------------------------------------------------
# Input checks and per-variable readers
# ---------------------------------------------------------------------------------------------
def _yx_last(da: xr.DataArray, name: str) -> xr.DataArray:
    if "y" not in da.dims or "x" not in da.dims:
        raise GeoInputError(f"export_map: variable {name!r} has dims {da.dims}, expected (..., y, x)")
    if da.ndim > 3:
        raise GeoInputError(f"export_map: variable {name!r} has {da.ndim} dims, expected at most 3")
    return da.transpose(..., "y", "x")


def _check(ds: xr.Dataset) -> Region:
    if not isinstance(ds, xr.Dataset):
        raise GeoInputError(f"export_map: expected an xarray Dataset, got {type(ds).__name__}")
    missing = [v for v in ("features", "valid") if v not in ds.data_vars]
    if missing:
        raise GeoInputError(f"export_map: the map lacks the variables {missing} (has {sorted(ds.data_vars)})")
    if ds.rio.crs is None:
        raise GeoInputError("export_map: the map carries no CRS (open the store with "
                            "xr.open_zarr(path, decode_coords='all'))")
    if ds.rio.crs.is_geographic:
        raise GeoInputError(f"export_map: the map's CRS {ds.rio.crs} is geographic; a projected CRS is needed")
    for axis in ("x", "y"):
        c = np.asarray(ds[axis].values, dtype=np.float64)
        if c.size < 2:
            raise GeoInputError(f"export_map: the map needs at least 2 pixels along {axis}")
        d = np.diff(c)
        if not np.allclose(d, d[0], rtol=1e-6, atol=1e-9 * max(1.0, abs(c).max())):
            raise GeoInputError(f"export_map: the {axis} coordinates are not regularly spaced")
    if ds["y"].values[1] > ds["y"].values[0]:
        raise GeoInputError("export_map: the map is not north-up (y increases with the row)")
    return Region.from_xarray(ds)


def _fit_pca(feat: xr.DataArray, valid: xr.DataArray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """PCA of the features on a strided subsample of valid pixels.

    Returns (mean (D,), components (D, 3), lo (3,), hi (3,)): RGB = (x - mean) @ components, stretched
    from [lo, hi] (1st/99th percentiles of the sample) to 1..255. The sample is strided over the whole
    map (one read of the features, chunk by chunk). Component signs are fixed (largest
    loading positive), so equal maps give equal pictures.
    """
    h, w = valid.sizes["y"], valid.sizes["x"]
    # at most PCA_SAMPLE pixels, and at most WINDOW_MB of float64 samples (x4 for the copies)
    n = max(10_000, min(PCA_SAMPLE, int(WINDOW_MB * 2**20 / (feat.shape[0] * 8 * 4))))
    step = max(1, int(math.ceil(math.sqrt(h * w / n))))
    sel = dict(y=slice(step // 2, None, step), x=slice(step // 2, None, step))
    f = np.asarray(feat.isel(sel).values, dtype=np.float64)  # (D, h', w'), bounded by PCA_SAMPLE
    m = np.asarray(valid.isel(sel).values, dtype=bool)
    x = f.reshape(f.shape[0], -1).T[m.ravel()]
    x = x[np.isfinite(x).all(axis=1)]
    d = f.shape[0]
    if len(x) < 2:
        return np.zeros(d), np.zeros((d, 3)), np.zeros(3), np.ones(3)
    mean = x.mean(axis=0)
    xc = x - mean
    evals, evecs = np.linalg.eigh(xc.T @ xc / (len(x) - 1))
    comps = evecs[:, ::-1][:, :3]
    comps = comps * np.sign(comps[np.abs(comps).argmax(axis=0), np.arange(comps.shape[1])])
    if comps.shape[1] < 3:  # fewer than 3 feature channels: grey channels for the missing ones
        comps = np.concatenate([comps, np.repeat(comps[:, :1], 3 - comps.shape[1], axis=1)], axis=1)
    proj = xc @ comps
    lo, hi = np.percentile(proj, 1, axis=0), np.percentile(proj, 99, axis=0)
    hi = np.where(hi - lo > 1e-12, hi, lo + 1.0)
    return mean, comps, lo, hi


def _names_for(da: xr.DataArray, class_names: Sequence[str] | None, prefix: str) -> list[str]:
    """Band names of a (band, y, x) array: the given names when their count fits, else string coords."""
    n, dim = da.shape[0], da.dims[0]
    if class_names is not None and len(class_names) == n:
        return [str(c) for c in class_names]
    if dim in da.coords and da[dim].dtype.kind in "US O":
        return [str(v) for v in da[dim].values]
    return [f"{prefix}_{i}" for i in range(n)]


def _float_out(dtype: np.dtype) -> str:
    return "float16" if dtype == np.float16 else "float32"


def _build_layers(ds: xr.Dataset, class_names: list[str] | None,
                  colors: list[tuple[int, int, int]] | None) -> list[_Layer]:
    valid = _yx_last(ds["valid"], "valid")

    def vwin(win: Window) -> np.ndarray:
        return _sub(valid, win).astype(bool)

    layers: list[_Layer] = []
    feat = _yx_last(ds["features"], "features")
    if feat.ndim == 2:
        feat = feat.expand_dims("feature")
    mean, comps, lo, hi = _fit_pca(feat, valid)

    proj = comps.T.astype(np.float32)  # (3, D)
    offset = (proj @ mean.astype(np.float32) + lo.astype(np.float32))[:, None, None]
    scale = (254 / (hi - lo)).astype(np.float32)[:, None, None]

    def read_pca(win: Window) -> np.ndarray:
        f = _sub(feat, win)  # (D, h, w); no copies of it: it is the biggest array of the export
        p = np.tensordot(proj, f, 1)  # NaN where any feature is NaN
        ok = vwin(win) & np.isfinite(p).all(axis=0)
        rgb = 1 + np.clip((p - offset) * scale, 0, 254)
        return np.where(ok[None], np.rint(rgb), 0).astype(np.uint8)

    layers.append(_Layer("pca", "features (PCA RGB)", 3, "uint8", read_pca, 0, "average",
                         ["pca_1", "pca_2", "pca_3"], ["visual"], "rgb",
                         read_bytes_per_px=feat.shape[0] * 4, chunks=_yx_chunks(feat)))

    def masked_float(da: xr.DataArray, out: str) -> Callable[[Window], np.ndarray]:
        def read(win: Window) -> np.ndarray:
            a = _sub(da, win)
            a = a[None] if a.ndim == 2 else a
            if a.dtype.kind != "f":
                a = a.astype(np.float32)
            return np.where(vwin(win)[None], a, np.array(np.nan, a.dtype)).astype(out, copy=False)
        return read

    if "matching" in ds:
        m = _yx_last(ds["matching"], "matching")
        m = m.expand_dims("band") if m.ndim == 2 else m
        layers.append(_Layer("matching", "matching features", m.shape[0], "float16",
                             masked_float(m, "float16"), math.nan, "average",
                             [f"matching_{i}" for i in range(m.shape[0])], ["data"], "gray",
                             read_bytes_per_px=m.shape[0] * m.dtype.itemsize, chunks=_yx_chunks(m)))
    if "semantic_class" in ds:
        sc = _yx_last(ds["semantic_class"], "semantic_class")
        if sc.ndim != 2:
            raise GeoInputError(f"export_map: semantic_class must be (y, x), got {sc.dims}")

        def read_class(win: Window) -> np.ndarray:
            c = _sub(sc, win)
            if np.issubdtype(c.dtype, np.floating):
                c = np.where(np.isfinite(c), c, CLASS_NODATA)
            return np.where(vwin(win), c, CLASS_NODATA).astype(np.uint8)[None]

        names = class_names or []
        cmap = {i: (*colors[i], 255) for i in range(len(names))} if colors else {}
        cmap[CLASS_NODATA] = (0, 0, 0, 0)
        layers.append(_Layer("semantic_class", "semantic classes", 1, "uint8", read_class, CLASS_NODATA,
                             "nearest", ["semantic_class"], ["data"], "paletted", colormap=cmap,
                             chunks=_yx_chunks(sc)))
    if "semantic_prob" in ds:
        sp = _yx_last(ds["semantic_prob"], "semantic_prob")
        sp = sp.expand_dims("class") if sp.ndim == 2 else sp
        out = _float_out(sp.dtype)
        layers.append(_Layer("semantic_prob", "class probabilities", sp.shape[0], out,
                             masked_float(sp, out), math.nan, "average",
                             _names_for(sp, class_names, "class"), ["data"], "gray", chunks=_yx_chunks(sp)))
    layers.append(_Layer("valid", "valid", 1, "uint8", lambda win: vwin(win).astype(np.uint8)[None],
                         None, "nearest", ["valid"], ["data-mask"], "gray", chunks=_yx_chunks(valid)))
    if "observations" in ds:
        ob = _yx_last(ds["observations"], "observations")
        kind, size = ob.dtype.kind, ob.dtype.itemsize
        odt = ("uint16" if size <= 2 else "uint32") if kind in "ub" else ("int16" if size <= 2 else "int32")
        if kind == "f":
            odt = "float32"
        layers.append(_Layer("observations", "observation count", 1, odt,
                             lambda win: _sub(ob, win).astype(odt)[None], None, "nearest",
                             ["observations"], ["data"], "pseudocolor", chunks=_yx_chunks(ob)))
    if "confidence" in ds:
        cf = _yx_last(ds["confidence"], "confidence")
        if cf.ndim != 2:
            raise GeoInputError(f"export_map: confidence must be (y, x), got {cf.dims}")
        layers.append(_Layer("confidence", "confidence", 1, "float32", masked_float(cf, "float32"),
                             math.nan, "average", ["confidence"], ["data"], "pseudocolor",
                             chunks=_yx_chunks(cf)))
    return layers


# ---------------------------------------------------------------------------------------------
# Class polygons (GeoPackage)
# ---------------------------------------------------------------------------------------------
POLYGON_FLUSH = 50_000  # polygons held before they are appended to the GeoPackage


def _write_polygons(ds: xr.Dataset, region: Region, class_names: list[str], path: Path, bar: Any) -> int:
    """Polygonize semantic_class (4-connected) into a GeoPackage layer `semantic_class`.

    Traced per window and appended to the file every POLYGON_FLUSH polygons, so memory does not grow
    with the map. Pieces touching an inner window edge are held back, unioned per class at the end and
    split into parts again, so polygons do not stop at window seams. Returns the polygon count.
    """
    import geopandas as gpd
    import shapely

    sc = _yx_last(ds["semantic_class"], "semantic_class")
    valid = _yx_last(ds["valid"], "valid")
    wshape = _window_shape(8, _yx_chunks(sc))
    res = region.resolution
    xmin, ymin, xmax, ymax = region.bounds
    eps = res * 1e-3
    tmp = _atomic_target(path).with_suffix(".gpkg")
    pending: list[tuple[int, Any]] = []
    edge: dict[int, list[Any]] = {}
    count = 0

    def flush(final: bool = False) -> None:
        nonlocal count, pending
        if not pending and (count or not final):
            return
        ids = np.asarray([v for v, _ in pending], dtype=np.int32)
        gdf = gpd.GeoDataFrame(
            {"class_id": ids, "class_name": [class_names[v] if v < len(class_names) else f"class_{v}" for v in ids],
             "area_m2": np.asarray([p.area for _, p in pending], dtype=np.float64)},
            geometry=gpd.GeoSeries([p for _, p in pending], crs=region.crs_string), crs=region.crs_string,
        )
        kw = dict(layer="semantic_class", driver="GPKG", engine="pyogrio", geometry_type="Polygon")
        if count:
            gdf.to_file(tmp, mode="a", **kw)
        else:  # GeoPackage 1.4 (GDAL's default) makes QGIS 3.22's GDAL 3.6 warn
            gdf.to_file(tmp, VERSION="1.2", **kw)
        count += len(gdf)
        pending = []

    try:
        for win in _windows(region.height, region.width, wshape):
            c = _sub(sc, win)
            if np.issubdtype(c.dtype, np.floating):
                c = np.where(np.isfinite(c), c, CLASS_NODATA)
            c = np.where(_sub(valid, win).astype(bool), c, CLASS_NODATA).astype(np.uint8)
            wt = rasterio.windows.transform(win, region.transform)
            wx0, wy1 = wt.c, wt.f
            wx1, wy0 = wx0 + int(win.width) * res, wy1 - int(win.height) * res
            inner = [(wx0, xmin), (wx1, xmax), (wy0, ymin), (wy1, ymax)]
            for geom, val in rasterio.features.shapes(c, mask=c != CLASS_NODATA, transform=wt, connectivity=4):
                poly = shapely.geometry.shape(geom)
                bx0, by0, bx1, by1 = poly.bounds
                if any(abs(b - w) < eps and abs(w - outer) > eps
                       for b, (w, outer) in zip((bx0, bx1, by0, by1), inner)):
                    edge.setdefault(int(val), []).append(poly)
                else:
                    pending.append((int(val), poly))
            if len(pending) >= POLYGON_FLUSH:
                flush()
            if bar is not None:
                bar.update(1)
        for val, polys in edge.items():
            parts = shapely.get_parts(shapely.union_all(polys))
            pending.extend((val, p) for p in parts if isinstance(p, shapely.Polygon) and p.area > 0)
        flush(final=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return count


# ---------------------------------------------------------------------------------------------
# QGIS styles (.qml) and project (.qgs)
# ---------------------------------------------------------------------------------------------
def _hex(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*[int(v) for v in rgb[:3]])


def _sub_el(parent: ET.Element, tag: str, text: Any = None, **attrib: Any) -> ET.Element:
    el = ET.SubElement(parent, tag, {k: str(v) for k, v in attrib.items()})
    if text is not None:
        el.text = str(text)
    return el


def _contrast(parent: ET.Element, tag: str, lo: float, hi: float) -> None:
    ce = _sub_el(parent, tag)
    _sub_el(ce, "minValue", repr(float(lo)))
    _sub_el(ce, "maxValue", repr(float(hi)))
    _sub_el(ce, "algorithm", "StretchToMinimumMaximum")


def _finite_range(stats: Sequence[tuple[float, float]], band: int, default=(0.0, 1.0)) -> tuple[float, float]:
    if band < len(stats) and all(np.isfinite(stats[band])):
        lo, hi = stats[band]
        return (lo, hi) if hi > lo else (lo, lo + 1.0)
    return default


def _raster_pipe(layer: _Layer, class_names: list[str], colors: list[tuple[int, int, int]]) -> ET.Element:
    """The `<pipe>` of a raster layer (renderer, brightness, hue, resampler) shared by .qml and .qgs."""
    pipe = ET.Element("pipe")
    common = dict(opacity="1", alphaBand="-1", nodataColor="")
    if layer.style == "paletted":
        r = _sub_el(pipe, "rasterrenderer", type="paletted", band="1", **common)
        _sub_el(r, "rasterTransparency")
        pal = _sub_el(r, "colorPalette")
        for i, (n, c) in enumerate(zip(class_names, colors)):
            _sub_el(pal, "paletteEntry", value=i, color=_hex(c), label=n, alpha=255)
    elif layer.style == "rgb":
        r = _sub_el(pipe, "rasterrenderer", type="multibandcolor", redBand="1", greenBand="2",
                    blueBand="3", **common)
        _sub_el(r, "rasterTransparency")
        for tag in ("redContrastEnhancement", "greenContrastEnhancement", "blueContrastEnhancement"):
            _contrast(r, tag, 1, 255)
    elif layer.style == "gray":
        lo, hi = _finite_range(layer.stats, 0)
        r = _sub_el(pipe, "rasterrenderer", type="singlebandgray", grayBand="1", gradient="BlackToWhite",
                    **common)
        _sub_el(r, "rasterTransparency")
        _contrast(r, "contrastEnhancement", lo, hi)
    else:  # pseudocolor (viridis)
        lo, hi = _finite_range(layer.stats, 0)
        r = _sub_el(pipe, "rasterrenderer", type="singlebandpseudocolor", band="1",
                    classificationMin=repr(lo), classificationMax=repr(hi), **common)
        _sub_el(r, "rasterTransparency")
        shader = _sub_el(_sub_el(r, "rastershader"), "colorrampshader", colorRampType="INTERPOLATED",
                         classificationMode="1", clip="0", minimumValue=repr(lo), maximumValue=repr(hi))
        for k, col in enumerate(_VIRIDIS):
            v = lo + (hi - lo) * k / (len(_VIRIDIS) - 1)
            _sub_el(shader, "item", value=repr(v), color=col, label=f"{v:.4g}", alpha=255)
    _sub_el(pipe, "brightnesscontrast", brightness="0", contrast="0", gamma="1")
    _sub_el(pipe, "huesaturation", saturation="0", grayscaleMode="0", colorizeOn="0", colorizeRed="255",
            colorizeGreen="128", colorizeBlue="128", colorizeStrength="100")
    _sub_el(pipe, "rasterresampler", maxOversampling="2")
    return pipe


def _vector_renderer(class_names: list[str], colors: list[tuple[int, int, int]]) -> ET.Element:
    """Categorized fill renderer on `class_name`, the classes' colours, thin dark outlines."""
    r = ET.Element("renderer-v2", type="categorizedSymbol", attr="class_name", symbollevels="0",
                   enableorderby="0", forceraster="0")
    cats = _sub_el(r, "categories")
    syms = _sub_el(r, "symbols")
    for i, (n, c) in enumerate(zip(class_names, colors)):
        _sub_el(cats, "category", render="true", symbol=i, value=n, label=n)
        sym = _sub_el(syms, "symbol", type="fill", name=i, alpha="1", clip_to_extent="1", force_rhr="0")
        lay = _sub_el(sym, "layer", **{"class": "SimpleFill", "enabled": "1", "locked": "0", "pass": "0"})
        for k, v in (("color", "{},{},{},255".format(*c)), ("outline_color", "35,35,35,255"),
                     ("outline_style", "solid"), ("outline_width", "0.1"), ("outline_width_unit", "MM"),
                     ("style", "solid"), ("joinstyle", "bevel")):
            _sub_el(lay, "prop", k=k, v=v)
    return r


def _xml_bytes(root: ET.Element) -> bytes:
    ET.indent(root)
    return b"<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n" + ET.tostring(root, encoding="utf-8")


def _write_bytes(path: Path, data: bytes) -> Path:
    atomic_write_bytes(path, data)
    return path


def _qml(body: list[ET.Element]) -> bytes:
    root = ET.Element("qgis", version=QGIS_VERSION, styleCategories="AllStyleCategories")
    for el in body:
        root.append(el)
    _sub_el(root, "blendMode", "0")
    return _xml_bytes(root)


def _srs(parent: ET.Element, region: Region) -> None:
    s = _sub_el(parent, "spatialrefsys", nativeFormat="Wkt")
    _sub_el(s, "wkt", region.crs.to_wkt())
    _sub_el(s, "srsid", "0")
    _sub_el(s, "srid", region.epsg or 0)
    if region.epsg is not None:
        _sub_el(s, "authid", f"EPSG:{region.epsg}")
    _sub_el(s, "description", region.crs.name)
    _sub_el(s, "projectionacronym", "")
    _sub_el(s, "ellipsoidacronym", "")
    _sub_el(s, "geographicflag", "false")


def _extent(parent: ET.Element, tag: str, bounds: Sequence[float]) -> None:
    e = _sub_el(parent, tag)
    for k, v in zip(("xmin", "ymin", "xmax", "ymax"), bounds):
        _sub_el(e, k, repr(float(v)))


def _qgs(name: str, region: Region, layers: list[tuple[str, str, str, ET.Element, bool]]) -> bytes:
    """A QGIS project: `layers` = (title, relative datasource, kind "raster"/"vector", style, visible),
    listed top first. Paths are relative to the project file."""
    root = ET.Element("qgis", projectname=name, version=QGIS_VERSION)
    _sub_el(root, "homePath", path="")
    _sub_el(root, "title", name)
    _srs(_sub_el(root, "projectCrs"), region)
    ids = [re.sub(r"\W", "_", f"{name}_{t}") + f"_{i}" for i, (t, *_rest) in enumerate(layers)]
    tree = _sub_el(root, "layer-tree-group")
    _sub_el(tree, "customproperties")
    for lid, (title, src, kind, _style, vis) in zip(ids, layers):
        node = _sub_el(tree, "layer-tree-layer", id=lid, name=title, source=src,
                       providerKey="gdal" if kind == "raster" else "ogr",
                       checked="Qt::Checked" if vis else "Qt::Unchecked", expanded="0")
        _sub_el(node, "customproperties")
    canvas = _sub_el(root, "mapcanvas", name="theMapCanvas", annotationsVisible="1")
    _sub_el(canvas, "units", "meters")
    _extent(canvas, "extent", region.bounds)
    _sub_el(canvas, "rotation", "0")
    _srs(_sub_el(canvas, "destinationsrs"), region)
    _sub_el(canvas, "rendermaptile", "0")
    plist = _sub_el(root, "projectlayers")
    for lid, (title, src, kind, style, _vis) in zip(ids, layers):
        attrs = dict(type=kind, autoRefreshEnabled="0", refreshOnNotifyEnabled="0",
                     hasScaleBasedVisibilityFlag="0", styleCategories="AllStyleCategories")
        if kind == "vector":
            attrs.update(geometry="Polygon", wkbType="Polygon")
        ml = _sub_el(plist, "maplayer", **attrs)
        _extent(ml, "extent", region.bounds)
        _sub_el(ml, "id", lid)
        _sub_el(ml, "datasource", src)
        _sub_el(ml, "layername", title)
        _srs(_sub_el(ml, "srs"), region)
        if kind == "raster":
            _sub_el(ml, "provider", "gdal")
            ml.append(style)
        else:
            _sub_el(ml, "provider", "ogr", encoding="UTF-8")
            ml.append(style)
            _sub_el(ml, "layerOpacity", "0.6")
        _sub_el(ml, "blendMode", "0")
    order = _sub_el(root, "layerorder")
    for lid in ids:
        _sub_el(order, "layer", id=lid)
    props = _sub_el(root, "properties")
    paths = _sub_el(props, "Paths")
    _sub_el(paths, "Absolute", "false", type="bool")
    # QGIS 3.22 ignores <projectCrs> unless this is set
    _sub_el(_sub_el(props, "SpatialRefSys"), "ProjectionsEnabled", "1", type="int")
    return _xml_bytes(root)


def _rat_aux_xml(class_names: list[str], colors: list[tuple[int, int, int]]) -> bytes:
    """GDAL PAM sidecar holding a thematic raster attribute table: Value, Class, Red, Green, Blue."""
    root = ET.Element("PAMDataset")
    band = _sub_el(root, "PAMRasterBand", band="1")
    rat = _sub_el(band, "GDALRasterAttributeTable", tableType="thematic")
    # GDAL field types 0 = integer, 2 = string; usages 5 = MinMax, 2 = Name, 6/7/8 = Red/Green/Blue
    for i, (fname, ftype, usage) in enumerate((("Value", 0, 5), ("Class", 2, 2), ("Red", 0, 6),
                                               ("Green", 0, 7), ("Blue", 0, 8))):
        fd = _sub_el(rat, "FieldDefn", index=i)
        _sub_el(fd, "Name", fname)
        _sub_el(fd, "Type", ftype)
        _sub_el(fd, "Usage", usage)
    for i, (n, c) in enumerate(zip(class_names, colors)):
        row = _sub_el(rat, "Row", index=i)
        for v in (i, n, *c[:3]):
            _sub_el(row, "F", v)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# STAC Item
# ---------------------------------------------------------------------------------------------
def _jsonable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return str(v)


def _stac_nodata(v: float | int | None) -> Any:
    if v is None:
        return None
    if isinstance(v, float) and math.isnan(v):
        return "nan"  # JSON has no NaN (DESIGN.md §6)
    return v


def _write_stac(path: Path, name: str, region: Region, layers: list[_Layer], extra: dict[str, tuple[Path, str, list[str], str]],
                attrs: Mapping[str, Any], class_names: list[str], colors: list[tuple[int, int, int]]) -> Path:
    import pystac
    from pystac.extensions.classification import Classification, ClassificationExtension
    from pystac.extensions.projection import ProjectionExtension
    from pystac.extensions.raster import DataType, RasterBand, RasterExtension, Statistics

    created = attrs.get("created") or attrs.get("datetime")
    try:
        when = _dt.datetime.fromisoformat(str(created)) if created else None
    except ValueError:
        when = None
    when = when or _dt.datetime.now(_dt.timezone.utc)
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    geom = region.geometry_lonlat
    props: dict[str, Any] = {f"neuralmaps:{k}": _jsonable(v) for k, v in attrs.items()}
    props["gsd"] = region.resolution
    item = pystac.Item(id=name, geometry=json.loads(json.dumps(geom.__geo_interface__)),
                       bbox=list(geom.bounds), datetime=when, properties=props)
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    proj.apply(code=f"EPSG:{region.epsg}" if region.epsg else None,
               wkt2=None if region.epsg else region.crs.to_wkt(),
               shape=[region.height, region.width], transform=[float(v) for v in tuple(region.transform)[:6]],
               bbox=[float(v) for v in region.bounds])
    RasterExtension.add_to(item)
    media_cog = pystac.MediaType.COG
    for layer in layers:
        assert layer.path is not None
        asset = pystac.Asset(href=f"./{layer.path.name}", media_type=media_cog, title=layer.title,
                             roles=list(layer.roles))
        item.add_asset(layer.key, asset)
        bands = []
        for b in range(layer.count):
            st = layer.stats[b] if b < len(layer.stats) else (math.nan, math.nan)
            stats = Statistics.create(minimum=st[0], maximum=st[1]) if all(np.isfinite(st)) else None
            bands.append(RasterBand.create(nodata=_stac_nodata(layer.nodata), data_type=DataType(layer.dtype),
                                           spatial_resolution=region.resolution, statistics=stats))
        RasterExtension.ext(asset).apply(bands)
        if layer.style == "paletted" and class_names:
            ClassificationExtension.ext(asset, add_if_missing=True).apply(classes=[
                Classification.create(value=i, name=re.sub(r"[^-.\w]", "_", n), description=n,
                                      color_hint=_hex(c)[1:].upper())
                for i, (n, c) in enumerate(zip(class_names, colors))])
    for key, (p, media, roles, title) in extra.items():
        item.add_asset(key, pystac.Asset(href=f"./{p.name}", media_type=media, roles=roles, title=title))
    d = item.to_dict(include_self_link=False, transform_hrefs=False)
    return _write_bytes(path, json.dumps(d, indent=1, allow_nan=False).encode())


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def _class_setup(ds: xr.Dataset, class_names, class_colors) -> tuple[list[str], list[tuple[int, int, int]]]:
    if class_names is None:
        class_names = ds.attrs.get("class_names")
        if isinstance(class_names, str):
            class_names = json.loads(class_names) if class_names.startswith("[") else class_names.split(",")
    if class_names is None and "semantic_prob" in ds:
        sp = ds["semantic_prob"]
        dim = sp.dims[0]
        if dim in sp.coords and sp[dim].dtype.kind in "USO":
            class_names = [str(v) for v in sp[dim].values]
    class_names = [str(n) for n in (class_names or [])]
    if len(class_names) > CLASS_NODATA:
        raise GeoInputError(f"export_map: {len(class_names)} classes do not fit uint8 with 255 = nodata")
    if class_colors is None:
        class_colors = ds.attrs.get("class_colors")
    if class_colors is None:
        colors = default_class_colors(class_names)
    else:
        colors = [tuple(int(v) for v in c[:3]) for c in class_colors]
        if len(colors) != len(class_names) or any(not 0 <= v <= 255 for c in colors for v in c):
            raise GeoInputError(f"export_map: need one (r, g, b) colour in 0..255 per class "
                                f"({len(class_names)} classes), got {list(class_colors)!r}")
    return class_names, colors  # type: ignore[return-value]


def export_map(
    ds: xr.Dataset, out_dir: str | os.PathLike, *, name: str = "map",
    class_names: Sequence[str] | None = None, class_colors: Sequence[tuple[int, int, int]] | None = None,
    attrs: dict | None = None, progress: bool = True,
) -> dict[str, Path]:
    """Export a neural map to COGs, QGIS styles and project, a STAC Item and class polygons.

    ds: the neural-map store (lazy/dask-backed is fine, any size): north-up, dims (y, x) with
        coordinates at pixel centres, a projected CRS on `ds.rio.crs`; variables `features`
        (feature, y, x), `matching` (band, y, x), `valid` (y, x) bool, `observations` (y, x) and
        optionally `confidence` (y, x), `semantic_class` (y, x) uint8 (255 = nodata), `semantic_prob`
        (class, y, x). Only `features` and `valid` are required; layers are written for what exists.
    out_dir: created if needed; files are `<name>_<layer>.tif` etc. (see the module docstring),
        each written to a temporary name and renamed.
    class_names, class_colors: names and (r, g, b) 0..255 colours of the class values 0..K-1;
        default: `ds.attrs["class_names"]` / `["class_colors"]`, else the `semantic_prob` class
        coordinate and `default_class_colors`.
    attrs: map metadata (model checksum, config, inputs, ...) put into the STAC Item's properties
        as `neuralmaps:<key>`; `attrs["created"]` (ISO time) is the Item's datetime (else now).
    Returns {asset key: path} for every file written (COG keys are the layer names; `qml_<layer>`,
    `semantic_class_rat`, `polygons`, `qgis_project`, `stac_item`).
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise GeoInputError(f"export_map: name {name!r} must be a plain file stem (letters, digits, _ . -)")
    import dask

    # One window (one chunk) at a time: the threaded scheduler read chunks in parallel (one per
    # core, tens of MB each), and the peak RSS grew with the map (measured 516 -> 408 MB at 2048 px).
    with dask.config.set(scheduler="synchronous"):
        return _export(ds, out_dir, name, class_names, class_colors, attrs, progress)


def _export(ds: xr.Dataset, out_dir: str | os.PathLike, name: str, class_names: Sequence[str] | None,
            class_colors: Sequence[tuple[int, int, int]] | None, attrs: dict | None,
            progress: bool) -> dict[str, Path]:
    region = _check(ds)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names, colors = _class_setup(ds, class_names, class_colors)
    if "semantic_class" in ds and not names:
        raise GeoInputError("export_map: semantic_class needs class_names (argument or ds.attrs['class_names'])")
    layers = _build_layers(ds, names, colors)
    for layer in layers:
        layer.tags = {f"{TAG_PREFIX}LAYER": layer.key,
                      **{f"{TAG_PREFIX}{k.upper()}": str(v) for k, v in (attrs or {}).items()
                         if isinstance(v, (str, int, float)) and k != "created"}}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum(len(list(_windows(region.height, region.width, _layer_window(l)))) for l in layers)
        if "semantic_class" in ds:
            total += len(list(_windows(region.height, region.width,
                                       _window_shape(8, _yx_chunks(ds["semantic_class"])))))
        bar = tqdm(total=total, desc=f"export {name}", unit="window")
    files: dict[str, Path] = {}
    extra: dict[str, tuple[Path, str, list[str], str]] = {}
    try:
        for layer in layers:
            _write_cog(layer, region, out / f"{name}_{layer.key}.tif", bar)
            files[layer.key] = layer.path  # type: ignore[assignment]
        if "semantic_class" in ds:
            gpkg = out / f"{name}_semantic.gpkg"
            _write_polygons(ds, region, names, gpkg, bar)
            extra["polygons"] = (gpkg, "application/geopackage+sqlite3", ["data"], "semantic class polygons")
    finally:
        if bar is not None:
            bar.close()
    import pystac

    qgs_layers: list[tuple[str, str, str, ET.Element, bool]] = []
    if "polygons" in extra:
        vr = _vector_renderer(names, colors)
        qml = _write_bytes(out / f"{name}_semantic.qml", _qml([vr]))
        extra["qml_polygons"] = (qml, pystac.MediaType.XML, ["metadata"], "QGIS style of the polygons")
        qgs_layers.append(("semantic polygons", f"./{extra['polygons'][0].name}|layername=semantic_class",
                           "vector", _vector_renderer(names, colors), False))
    # top first: the classes (half transparent) over the PCA picture; the other layers start hidden
    visible = {"semantic_class", "pca"}
    order = {"semantic_class": 0, "pca": 1}
    for layer in sorted(layers, key=lambda l: order.get(l.key, 2)):
        assert layer.path is not None
        qml = _write_bytes(layer.path.with_suffix(".qml"), _qml([_raster_pipe(layer, names, colors)]))
        extra[f"qml_{layer.key}"] = (qml, pystac.MediaType.XML, ["metadata"], f"QGIS style of {layer.key}")
        pipe = _raster_pipe(layer, names, colors)
        if layer.key == "semantic_class" and "pca" in files:
            pipe.find("rasterrenderer").set("opacity", "0.55")  # type: ignore[union-attr]
        qgs_layers.append((layer.title, f"./{layer.path.name}", "raster", pipe, layer.key in visible))
        if layer.key == "semantic_class":
            rat = _write_bytes(Path(str(layer.path) + ".aux.xml"), _rat_aux_xml(names, colors))
            extra["semantic_class_rat"] = (rat, pystac.MediaType.XML, ["metadata"], "raster attribute table")
    qgs = _write_bytes(out / f"{name}.qgs", _qgs(name, region, qgs_layers))
    extra["qgis_project"] = (qgs, "application/x-qgis", ["metadata"], "QGIS project")
    item = _write_stac(out / f"{name}.json", name, region, layers, extra, dict(attrs or {}), names, colors)
    files.update({k: v[0] for k, v in extra.items()})
    files["stac_item"] = item
    return files


# ---------------------------------------------------------------------------------------------
# Synthetic maps and the speed measurement (benchmarks, tests)
# ---------------------------------------------------------------------------------------------
def synthetic_map_dataset(height: int, width: int, *, res_m: float = 0.5, crs: str = "EPSG:32635",
                          origin: tuple[float, float] = (385_000.0, 6_673_000.0), num_features: int = 16,
                          num_matching: int = 8, class_names: Sequence[str] = ("a", "b", "c", "d", "e"),
                          chunk: int = 512, seed: int = 0) -> xr.Dataset:
    """A lazy (dask) neural map of any size, computed chunk by chunk (never held whole in memory).

    `origin` is the (easting, northing) of the north-west corner. Features are smooth waves plus
    noise; classes are diagonal bands; the first 3 % of columns are invalid.
    """
    import dask.array as da

    k = len(class_names)
    x = origin[0] + (np.arange(width) + 0.5) * res_m
    y = origin[1] - (np.arange(height) + 0.5) * res_m

    def block(d: int, kind: str):
        def f(block_info=None):
            (r0, r1), (c0, c1) = block_info[None]["array-location"][-2:]
            rr, cc = np.mgrid[r0:r1, c0:c1].astype(np.float32)
            rng = np.random.default_rng([seed, r0, c0, d])
            if kind == "feat":
                ph = np.arange(d, dtype=np.float32)[:, None, None]
                return (np.sin(rr[None] / 37.0 + ph) + np.cos(cc[None] / 53.0 * (1 + ph / d))
                        + 0.1 * rng.standard_normal((d, *rr.shape), dtype=np.float32))
            if kind == "cls":
                return (((rr + cc) // 97) % k).astype(np.uint8)
            if kind == "valid":
                return cc >= int(0.03 * width)
            if kind == "obs":
                return ((rr * 7 + cc * 3) % 11).astype(np.int32)
            if kind == "prob":
                cls = (((rr + cc) // 97) % k).astype(int)
                return (np.arange(d)[:, None, None] == cls[None]).astype(np.float16) * 0.8 + 0.2 / d
            raise AssertionError(kind)
        return f

    def arr(kind, d, dtype):
        shape = (d, height, width) if d else (height, width)
        chunks = ((d,) if d else ()) + (chunk, chunk)
        return da.map_blocks(block(d, kind), dtype=dtype, chunks=da.core.normalize_chunks(chunks, shape),
                             meta=np.empty((0,) * len(shape), dtype))

    ds = xr.Dataset(
        {
            "features": (("feature", "y", "x"), arr("feat", num_features, np.float32)),
            "matching": (("band", "y", "x"), arr("feat", num_matching, np.float32).astype(np.float16)),
            "valid": (("y", "x"), arr("valid", 0, bool)),
            "observations": (("y", "x"), arr("obs", 0, np.int32)),
            "semantic_class": (("y", "x"), arr("cls", 0, np.uint8)),
            "semantic_prob": (("class", "y", "x"), arr("prob", k, np.float16)),
        },
        coords={"x": x, "y": y, "class": list(class_names)},
        attrs={"class_names": list(class_names)},
    )
    return ds.rio.write_crs(crs)


def export_seconds_per_km2(ds: xr.Dataset, out_dir: str | os.PathLike | None = None, **kw: Any) -> float:
    """Wall-clock seconds that `export_map(ds, ...)` takes per km² of map (into a temp dir by default)."""
    region = _check(ds)
    area_km2 = region.height * region.width * region.resolution**2 / 1e6
    kw.setdefault("progress", False)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        t0 = time.perf_counter()
        export_map(ds, tmp, **kw)
        return (time.perf_counter() - t0) / area_km2
