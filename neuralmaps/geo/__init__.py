"""neuralmaps.geo: CRS and regions, OSM layers, rasterizing, orthophotos, Zarr stores."""

from .crs import heading_to_yaw, utm_crs_for, yaw_to_heading
from .errors import GeoInputError
from .osm import OSMLayers, read_osm
from .region import Region, Tile

__all__ = [
    "GeoInputError",
    "OSMLayers",
    "Region",
    "Tile",
    "heading_to_yaw",
    "read_osm",
    "utm_crs_for",
    "yaw_to_heading",
]
