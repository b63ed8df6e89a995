"""Zarr stores that keep their CRS and transform (DESIGN.md §6).

xarray drops the CRS unless stores are reopened with `decode_coords="all"`, and an `encoding=`
given to `to_zarr` replaces `grid_mapping`; both are handled here, once.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import xarray as xr

from ..storage import swap_into_place, temp_sibling
from .errors import GeoInputError

__all__ = ["write_zarr", "open_zarr"]

GRID_MAPPING = "spatial_ref"  # rioxarray's CRS coordinate


def _as_dataset(obj: xr.Dataset | xr.DataArray) -> xr.Dataset:
    if isinstance(obj, xr.DataArray):
        return obj.to_dataset(name=obj.name or "data", promote_attrs=False)
    if not isinstance(obj, xr.Dataset):
        raise GeoInputError(f"write_zarr: expected an xarray Dataset or DataArray, got {type(obj).__name__}")
    return obj


def _with_grid_mapping(ds: xr.Dataset, encoding: Mapping[str, dict] | None) -> dict[str, dict]:
    """`encoding` with grid_mapping=spatial_ref put (back) on every spatial data variable."""
    enc = {k: dict(v) for k, v in (encoding or {}).items()}
    if GRID_MAPPING in ds.coords or GRID_MAPPING in ds.data_vars:
        for name, var in ds.data_vars.items():
            if name != GRID_MAPPING and {"y", "x"} <= set(var.dims):
                enc.setdefault(name, {})["grid_mapping"] = GRID_MAPPING
    return enc


def write_zarr(
    ds: xr.Dataset | xr.DataArray,
    path: str | os.PathLike,
    mode: str = "w",
    *,
    append_dim: str | None = None,
    region: Mapping[str, slice] | str | None = None,
    encoding: Mapping[str, dict] | None = None,
    compute: bool = True,
    **kw: Any,
):
    """Write `ds` (with its rioxarray CRS) to a Zarr v3 store at `path`.

    mode="w": a new store (written to a sibling temp dir, then renamed: no half-written store on
    a crash). mode="a" with `append_dim`: append along that dim; mode="a" alone adds variables.
    `region={"y": slice, "x": slice}` or "auto" (from the x/y coordinates), mode "r+": write into
    part of an existing store; variables without the region's dims (e.g. `spatial_ref`) are
    skipped. Parallel region writes must cover whole chunks (use `Region.tiles(chunk)`). `compute=False` initialises a template (returns the dask delayed).
    Other keyword arguments go to `xarray.Dataset.to_zarr`.
    """
    path = Path(path)
    ds = _as_dataset(ds)
    kw.setdefault("consolidated", False)  # not part of the Zarr v3 spec; zarr warns about it
    if region is not None:
        if not path.exists():
            raise GeoInputError(f"{path}: region write into a store that does not exist")
        dims = set(region) if isinstance(region, Mapping) else {"y", "x"} & set(ds.dims)
        ds = ds.drop_vars([n for n, v in ds.variables.items() if not dims & set(v.dims)])
        # encodings (and grid_mapping) are fixed by the existing store in region writes
        for v in ds.variables.values():
            v.encoding = {}
        return ds.to_zarr(path, mode="r+" if mode == "w" else mode, region=region, compute=compute,
                          zarr_format=3, **kw)
    enc = _with_grid_mapping(ds, encoding)
    if mode == "a" or append_dim is not None:
        if append_dim is not None and not path.exists():  # first write creates the store
            return write_zarr(ds, path, "w", encoding=encoding, compute=compute, **kw)
        # encodings are fixed by the existing store when appending
        return ds.to_zarr(path, mode="a", append_dim=append_dim, compute=compute, zarr_format=3, **kw)
    if mode != "w":
        return ds.to_zarr(path, mode=mode, encoding=enc, compute=compute, zarr_format=3, **kw)
    if not compute:  # a template for later region writes: the delayed write must target `path`
        return ds.to_zarr(path, mode="w", encoding=enc, compute=False, zarr_format=3, **kw)
    tmp = temp_sibling(path, "tmp")
    try:
        out = ds.to_zarr(tmp, mode="w", encoding=enc, zarr_format=3, **kw)
        swap_into_place(tmp, path)  # readers see the old store or the new one, never neither
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def open_zarr(path: str | os.PathLike, **kw: Any) -> xr.Dataset:
    """Open a store written by `write_zarr` lazily, with its CRS (`.rio.crs`) and transform."""
    path = Path(path)
    if not path.exists():
        raise GeoInputError(f"{path}: Zarr store not found")
    kw.setdefault("decode_coords", "all")
    kw.setdefault("consolidated", False)
    try:
        ds = xr.open_zarr(path, **kw)
    except Exception as e:  # zarr raises many kinds for a non-store directory
        raise GeoInputError(f"{path}: not a readable Zarr store ({type(e).__name__}: {e})") from None
    for name, var in ds.data_vars.items():
        if GRID_MAPPING in ds.coords and {"y", "x"} <= set(var.dims):
            var.encoding.setdefault("grid_mapping", GRID_MAPPING)
    return ds
