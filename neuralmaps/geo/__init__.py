"""neuralmaps.geo: CRS and regions, OSM layers, rasterizing, orthophotos, Zarr stores, GIS export.

Every bad input raises `GeoInputError` (a ValueError) whose message names the file and the problem.
"""

import rioxarray  # noqa: F401  (registers the `.rio` accessor on every xarray object)

from .crs import heading_to_yaw, utm_crs_for, yaw_to_heading
from .errors import GeoInputError
from .export import export_map  # geopandas and pystac load on first use
from .ortho import read_orthophoto, write_geotiff
from .osm import OSMLayers, read_osm
from .rasterize import rasterize_osm
from .region import Region, Tile
from .zarr_io import open_zarr, write_zarr

__all__ = [
    "GeoInputError",
    "export_map",
    "OSMLayers",
    "Region",
    "Tile",
    "heading_to_yaw",
    "open_zarr",
    "rasterize_osm",
    "read_orthophoto",
    "read_osm",
    "utm_crs_for",
    "write_geotiff",
    "write_zarr",
    "yaw_to_heading",
]
