"""Orthophotos: warp any GeoTIFF onto a Region grid, and write GeoTIFFs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import xarray as xr
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import RasterioIOError
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds

from ..storage import atomic_path
from .errors import GeoInputError
from .region import Region

__all__ = ["read_orthophoto", "write_geotiff"]


def read_orthophoto(path: str | os.PathLike, region: Region, resampling: str = "bilinear") -> xr.DataArray:
    """The GeoTIFF (or any GDAL raster) at `path`, warped onto `region`'s grid.

    Any source CRS; only the window covering the region is read (GDAL warped VRT).
    Returns dims ("band", "y", "x") float32, CRS attached. 8-bit input is scaled to [0, 1],
    16-bit by 1/65535, floats are kept. Pixels the source does not cover (or its nodata/mask)
    are NaN; use `.fillna(0)` before feeding a network.
    Raises GeoInputError (naming the file) when it is missing/unreadable, has no CRS, or does
    not overlap the region.
    """
    path = Path(path)
    if not path.is_file():
        raise GeoInputError(f"{path}: orthophoto file not found")
    try:
        rs = Resampling[resampling]
    except KeyError:
        raise GeoInputError(f"unknown resampling {resampling!r}") from None
    try:
        src = rasterio.open(path)
    except RasterioIOError as e:
        raise GeoInputError(f"{path}: not a readable raster ({e})") from None
    with src:
        if src.crs is None:
            raise GeoInputError(f"{path}: the raster has no CRS; georeference it first (e.g. gdal_edit -a_srs)")
        if src.transform.is_identity and src.gcps[1] is None:
            raise GeoInputError(f"{path}: the raster has no geotransform")
        sb = transform_bounds(src.crs, region.crs.to_wkt(), *src.bounds, densify_pts=21)
        rb = region.bounds
        if sb[0] >= rb[2] or sb[2] <= rb[0] or sb[1] >= rb[3] or sb[3] <= rb[1]:
            raise GeoInputError(
                f"{path}: the orthophoto (bounds {tuple(round(v, 1) for v in sb)} in EPSG:{region.epsg}) "
                f"does not overlap the region {region}"
            )
        scale = {"uint8": 1 / 255, "uint16": 1 / 65535}.get(src.dtypes[0], 1.0)
        h, w = region.shape
        # The coverage mask comes from an alpha band: the source's own, or one the warp adds.
        has_alpha = any(ci == ColorInterp.alpha for ci in src.colorinterp)
        try:
            with WarpedVRT(
                src, crs=region.crs.to_wkt(), transform=region.transform, width=w, height=h,
                resampling=rs, add_alpha=not has_alpha,
            ) as vrt:
                bands = [i for i in range(1, vrt.count + 1) if vrt.colorinterp[i - 1].name != "alpha"]
                data = vrt.read(bands).astype(np.float32)
                mask = vrt.dataset_mask() > 0
        except rasterio.errors.RasterioError as e:
            raise GeoInputError(f"{path}: could not warp the raster onto the region ({e})") from None
        descriptions = [src.descriptions[i - 1] if i <= src.count else None for i in bands]
    data *= np.float32(scale)
    data[:, ~mask] = np.nan
    da = region.to_xarray(data, dims=("band", "y", "x"), coords={"band": np.arange(1, len(bands) + 1)},
                          name="orthophoto", attrs={"source": str(path), "scale": scale})
    if any(descriptions):
        da = da.assign_coords(band_name=("band", [d or "" for d in descriptions]))
    return da.rio.write_nodata(np.nan, encoded=False)


def write_geotiff(
    da: xr.DataArray, path: str | os.PathLike, nodata: Any = None, compress: str = "deflate",
    blocksize: int = 256, descriptions: list[str] | None = None,
) -> Path:
    """Write a (y, x) or (band, y, x) DataArray carrying a CRS (rioxarray) as a tiled GeoTIFF.

    The band descriptions are the first dimension's coordinate values (e.g. class names) unless
    given. Written to a temporary file and renamed, so a crash leaves no half-written file.
    """
    path = Path(path)
    if da.rio.crs is None:
        raise GeoInputError(f"{path}: cannot write a GeoTIFF from an array without a CRS")
    if da.ndim == 2:
        da = da.expand_dims("band")
    if da.ndim != 3 or da.dims[1:] != ("y", "x"):
        raise GeoInputError(f"{path}: expected dims (band, y, x) or (y, x), got {da.dims}")
    region = Region.from_xarray(da)
    data = np.asarray(da.values)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    if nodata is None and np.issubdtype(data.dtype, np.floating):
        nodata = np.nan
    if descriptions is None:
        dim = da.dims[0]
        descriptions = [str(v) for v in da[dim].values] if dim in da.coords else None
    bs = max(16, int(blocksize) // 16 * 16)
    profile = dict(
        driver="GTiff", height=region.shape[0], width=region.shape[1], count=data.shape[0],
        dtype=data.dtype.name, crs=region.crs_string,
        transform=region.transform, nodata=nodata, compress=compress, tiled=True,
        blockxsize=bs, blockysize=bs, interleave="band" if data.shape[0] > 4 else "pixel",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".tif") as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(data)
            if descriptions:
                for i, d in enumerate(descriptions[: data.shape[0]], start=1):
                    dst.set_band_description(i, d)
    return path
