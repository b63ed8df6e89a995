"""CRS helpers and the heading/yaw convention.

Conventions (written here and nowhere else):
- Headings (public API) are degrees clockwise from north.
- Yaw (internal) is radians counter-clockwise from +x (east) in the region's projected CRS.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
import pyproj
from pyproj.aoi import AreaOfInterest
from pyproj.database import query_utm_crs_info

from .errors import GeoInputError

__all__ = [
    "utm_crs_for",
    "heading_to_yaw",
    "yaw_to_heading",
    "to_crs",
    "lonlat_to_crs",
    "crs_to_lonlat",
    "transformer",
    "epsg_of",
]

WGS84 = pyproj.CRS.from_epsg(4326)


def to_crs(crs: Any) -> pyproj.CRS:
    """Any CRS-like value (EPSG int, "EPSG:xxxx", WKT, pyproj/rasterio CRS) as a pyproj.CRS."""
    if crs is None:
        raise GeoInputError("a CRS is required but None was given")
    if isinstance(crs, pyproj.CRS):
        return crs
    if hasattr(crs, "to_wkt"):  # rasterio / odc-geo CRS objects
        return pyproj.CRS.from_wkt(crs.to_wkt())
    try:
        return pyproj.CRS.from_user_input(crs)
    except pyproj.exceptions.CRSError as e:
        raise GeoInputError(f"not a valid CRS: {crs!r} ({e})") from None


def epsg_of(crs: Any) -> int | None:
    """The EPSG code of a CRS, or None when it has none."""
    return to_crs(crs).to_epsg()


def utm_crs_for(lon: float, lat: float) -> pyproj.CRS:
    """The WGS84 / UTM CRS (EPSG 326xx north, 327xx south) of the zone containing (lon, lat) degrees."""
    lon, lat = float(lon), float(lat)
    if not (-180.0 <= lon <= 180.0 and -80.0 <= lat <= 84.0):
        raise GeoInputError(f"lon/lat ({lon}, {lat}) is outside the UTM domain")
    return _utm_crs_for(round(lon, 9), round(lat, 9))


@lru_cache(maxsize=256)
def _utm_crs_for(lon: float, lat: float) -> pyproj.CRS:
    infos = query_utm_crs_info(
        datum_name="WGS 84",
        area_of_interest=AreaOfInterest(lon, lat, lon, lat),
    )
    # Only the plain "WGS 84 / UTM zone NNx" codes (326xx / 327xx), never national variants.
    codes = sorted(
        int(i.code)
        for i in infos
        if i.auth_name == "EPSG" and (32601 <= int(i.code) <= 32660 or 32701 <= int(i.code) <= 32760)
    )
    if not codes:
        raise GeoInputError(f"no WGS84 UTM zone found for lon/lat ({lon}, {lat})")
    # On a zone boundary two zones match; take the one whose central meridian is closest.
    def dist(code: int) -> float:
        zone = code % 100
        return abs(((lon - (zone * 6 - 183) + 180) % 360) - 180)

    return pyproj.CRS.from_epsg(min(codes, key=dist))


@lru_cache(maxsize=64)
def _transformer(src_wkt: str, dst_wkt: str) -> pyproj.Transformer:
    return pyproj.Transformer.from_crs(src_wkt, dst_wkt, always_xy=True)


def transformer(src: Any, dst: Any) -> pyproj.Transformer:
    """A cached pyproj Transformer src -> dst with always_xy=True (x/lon first)."""
    return _transformer(to_crs(src).to_wkt(), to_crs(dst).to_wkt())


def lonlat_to_crs(lon, lat, crs: Any) -> tuple[Any, Any]:
    """WGS84 lon/lat degrees -> (x, y) in `crs`. Scalars or arrays of the same shape."""
    return transformer(WGS84, crs).transform(lon, lat)


def crs_to_lonlat(x, y, crs: Any) -> tuple[Any, Any]:
    """(x, y) in `crs` -> WGS84 lon/lat degrees. Scalars or arrays of the same shape."""
    return transformer(crs, WGS84).transform(x, y)


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def heading_to_yaw(heading_deg):
    """Heading (degrees clockwise from north) -> yaw (radians counter-clockwise from east).

    North (0°) -> π/2, east (90°) -> 0. Result wrapped to (-π, π]. Works on floats, numpy
    arrays and torch tensors (returns the same kind).
    """
    if _is_torch(heading_deg):
        import torch

        yaw = torch.deg2rad(90.0 - heading_deg)
        return torch.atan2(torch.sin(yaw), torch.cos(yaw))
    if isinstance(heading_deg, np.ndarray):
        yaw = np.deg2rad(90.0 - heading_deg)
        return np.arctan2(np.sin(yaw), np.cos(yaw))
    yaw = math.radians(90.0 - float(heading_deg))
    return math.atan2(math.sin(yaw), math.cos(yaw))


def yaw_to_heading(yaw_rad):
    """Yaw (radians counter-clockwise from east) -> heading (degrees clockwise from north) in [0, 360).

    Inverse of `heading_to_yaw`. Works on floats, numpy arrays and torch tensors.
    """
    if _is_torch(yaw_rad):
        import torch

        return torch.remainder(90.0 - torch.rad2deg(yaw_rad), 360.0)
    if isinstance(yaw_rad, np.ndarray):
        return np.mod(90.0 - np.rad2deg(yaw_rad), 360.0)
    h = (90.0 - math.degrees(float(yaw_rad))) % 360.0
    return 0.0 if h == 360.0 else h
