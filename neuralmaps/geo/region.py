"""`Region`: a georeferenced north-up pixel grid in one UTM CRS, and its Zarr-aligned tiles.

Raster convention (see docs/architecture.md): row 0 is north, x/y coordinates are pixel centres,
pixel (row, col) has its centre at continuous pixel coordinates (row + 0.5, col + 0.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pyproj
import shapely
from affine import Affine
from odc.geo.geobox import GeoBox, GeoboxTiles
from shapely.geometry import box
from shapely.geometry.base import BaseGeometry

from .crs import WGS84, crs_to_lonlat, epsg_of, lonlat_to_crs, to_crs, transformer, utm_crs_for
from .errors import GeoInputError

__all__ = ["Region", "Tile", "RasterGrid", "check_lonlat_box"]

_SNAP_TOL = 1e-6  # in pixels: bounds this close to a grid line are not pushed one pixel outward
UTM_LAT_RANGE = (-80.0, 84.0)  # latitudes UTM is defined for (polar regions use UPS)
# A region stays within 1 degree of longitude outside its 6-degree UTM zone: the scale error there
# stays below 0.25 % (k ~ 0.9996 * (1 + (dlon * cos(lat))^2 / 2)); anything wider is split.
MAX_LON_FROM_CENTRAL_MERIDIAN_DEG = 4.0


def check_lonlat_box(lon_min: float, lat_min: float, lon_max: float, lat_max: float) -> None:
    """Refuse, with the reason and what to do, a WGS84 box (degrees) that cannot be one UTM region."""
    box_s = f"({lon_min}, {lat_min}, {lon_max}, {lat_max})"
    try:
        v = [float(x) for x in (lon_min, lat_min, lon_max, lat_max)]
    except (TypeError, ValueError):
        raise GeoInputError(f"lon/lat box {box_s}: bounds must be numbers (degrees)") from None
    if not all(map(math.isfinite, v)):
        raise GeoInputError(f"lon/lat box {box_s}: bounds must be finite numbers (got inf or nan)")
    lon_min, lat_min, lon_max, lat_max = v
    if not (-180.0 <= lon_min <= 180.0 and -180.0 <= lon_max <= 180.0):
        raise GeoInputError(f"lon/lat box {box_s}: longitudes must lie in [-180, 180] degrees "
                            "(is the box given as lon_min, lat_min, lon_max, lat_max?)")
    if not (-90.0 <= lat_min <= 90.0 and -90.0 <= lat_max <= 90.0):
        raise GeoInputError(f"lon/lat box {box_s}: latitudes must lie in [-90, 90] degrees "
                            "(is the box given as lon_min, lat_min, lon_max, lat_max?)")
    if lat_max <= lat_min:
        raise GeoInputError(f"lon/lat box {box_s}: empty or inverted, need lat_min < lat_max")
    if lon_max == lon_min:
        raise GeoInputError(f"lon/lat box {box_s}: empty, need lon_min < lon_max")
    if lon_max < lon_min:
        raise GeoInputError(
            f"lon/lat box {box_s}: lon_min > lon_max, i.e. inverted or across the antimeridian (180 degrees); "
            "a region is one UTM zone and cannot cross it: give lon_min < lon_max, or make two regions, "
            "one on each side of 180 degrees")
    lo, hi = UTM_LAT_RANGE
    if lat_min < lo or lat_max > hi:
        raise GeoInputError(
            f"lon/lat box {box_s}: reaches beyond UTM's latitudes ({-lo:g}S to {hi:g}N), where neuralmaps has "
            "no projection; choose a box between them")
    # Width against the regular 6-degree zone of the centre (Norway's and Svalbard's wider zones
    # would otherwise refuse small boxes far from their central meridian).
    zone = min(int((lon_min + lon_max) / 2 + 180.0) // 6 + 1, 60)
    cm = zone * 6 - 183
    far = max(abs(lon_min - cm), abs(lon_max - cm))
    if far > MAX_LON_FROM_CENTRAL_MERIDIAN_DEG:
        raise GeoInputError(
            f"lon/lat box {box_s}: {lon_max - lon_min:.4g} degrees of longitude is too wide for one UTM region "
            f"(zone {zone}, central meridian {cm} degrees; a region may reach "
            f"{MAX_LON_FROM_CENTRAL_MERIDIAN_DEG:g} degrees from it, this one reaches {far:.4g}): split it "
            "into smaller regions")


def _snap_bounds(bounds: Sequence[float], res: float) -> tuple[float, float, float, float]:
    """Bounds snapped outward to multiples of `res` (ignoring float noise below _SNAP_TOL px)."""
    xmin, ymin, xmax, ymax = (float(b) for b in bounds)
    # round(.., 6): the nearest double to the decimal grid line, not k * res with its float noise
    f = lambda v: round(math.floor(v / res + _SNAP_TOL) * res, 6)  # noqa: E731
    c = lambda v: round(math.ceil(v / res - _SNAP_TOL) * res, 6)  # noqa: E731
    return f(xmin), f(ymin), c(xmax), c(ymax)


@dataclass(frozen=True)
class RasterGrid:
    """The north-up pixel <-> metre math, in any planar frame (a CRS, or the twin's local frame).

    `shape` (H, W) pixels of `res` metres; the west edge at x = `xmin`, the north edge at
    y = `ymax`; row 0 is north. Continuous pixel coordinates (row, col) put pixel (r, c)'s centre
    at (r + 0.5, c + 0.5). `Region`, the twin's ground raster and orthophotos all use it."""

    xmin: float
    ymax: float
    res: float
    shape: tuple[int, int]  # (H, W)

    @classmethod
    def from_bounds(cls, bounds: Sequence[float], res: float) -> "RasterGrid":
        """The grid of (xmin, ymin, xmax, ymax) at `res`: round(extent / res) pixels a side (at
        least 1), anchored at the north-west corner."""
        xmin, ymin, xmax, ymax = (float(b) for b in bounds)
        shape = (max(1, round((ymax - ymin) / res)), max(1, round((xmax - xmin) / res)))
        return cls(xmin, ymax, float(res), shape)

    def xy_to_pixel(self, x, y):
        """(x, y) metres -> continuous (row, col); `np.floor` gives the pixel containing the point."""
        return (self.ymax - np.asarray(y, dtype=float)) / self.res, (np.asarray(x, dtype=float) - self.xmin) / self.res

    def pixel_to_xy(self, row, col):
        """Continuous (row, col) -> (x, y) metres (inverse of `xy_to_pixel`)."""
        return self.xmin + np.asarray(col, dtype=float) * self.res, self.ymax - np.asarray(row, dtype=float) * self.res

    def index(self, x, y) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Integer (row, col) of the pixels containing (x, y), and whether they lie on the grid
        (rows/cols of points off the grid are clamped to 0)."""
        r, c = self.xy_to_pixel(x, y)
        row, col = np.floor(r).astype(np.int64), np.floor(c).astype(np.int64)
        inside = (row >= 0) & (row < self.shape[0]) & (col >= 0) & (col < self.shape[1])
        return np.where(inside, row, 0), np.where(inside, col, 0), inside

    def coords(self) -> tuple[np.ndarray, np.ndarray]:
        """Pixel-centre coordinates: x (W,) ascending, y (H,) descending, float64."""
        x, _ = self.pixel_to_xy(0, np.arange(self.shape[1]) + 0.5)
        _, y = self.pixel_to_xy(np.arange(self.shape[0]) + 0.5, 0)
        return x, y


@dataclass(frozen=True)
class Region:
    """A north-up grid: `shape` (H, W) pixels of `resolution` metres in the projected `crs`.

    Plain data (CRS, affine, shape), so it pickles cheaply into Dask tasks. Build it with
    `from_bbox`, `from_geometry` or `from_bounds`; `.geobox` gives the odc-geo GeoBox.
    """

    crs: pyproj.CRS
    transform: Affine  # north-up: Affine(res, 0, xmin, 0, -res, ymax)
    shape: tuple[int, int]  # (H, W)

    def __post_init__(self) -> None:
        t = self.transform
        if not (t.b == 0 and t.d == 0 and t.a > 0 and math.isclose(t.e, -t.a)):
            raise GeoInputError(f"Region needs a north-up square-pixel transform, got {tuple(t)[:6]}")
        if len(self.shape) != 2 or min(self.shape) <= 0:
            raise GeoInputError(f"Region needs a positive (H, W) shape, got {self.shape}")
        object.__setattr__(self, "shape", (int(self.shape[0]), int(self.shape[1])))
        object.__setattr__(self, "crs", to_crs(self.crs))

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_bounds(
        cls, bounds_xy: Sequence[float], crs: Any, resolution: float = 0.2
    ) -> "Region":
        """From (xmin, ymin, xmax, ymax) already in the projected `crs` (metres), snapped outward
        to multiples of `resolution`."""
        crs = to_crs(crs)
        if crs.is_geographic:
            raise GeoInputError(f"Region needs a projected CRS in metres, got geographic {crs.name}")
        res = float(resolution)
        if not res > 0:
            raise GeoInputError(f"resolution must be > 0 m, got {resolution}")
        xmin, ymin, xmax, ymax = (float(b) for b in bounds_xy)
        if not all(map(math.isfinite, (xmin, ymin, xmax, ymax))) or xmax <= xmin or ymax <= ymin:
            raise GeoInputError(f"empty or invalid bounds {tuple(bounds_xy)}")
        xmin, ymin, xmax, ymax = _snap_bounds((xmin, ymin, xmax, ymax), res)
        return cls(crs, Affine(res, 0.0, xmin, 0.0, -res, ymax), RasterGrid.from_bounds((xmin, ymin, xmax, ymax), res).shape)

    @classmethod
    def from_bbox(
        cls,
        lon_min: float,
        lat_min: float,
        lon_max: float,
        lat_max: float,
        resolution: float = 0.2,
    ) -> "Region":
        """From a WGS84 lon/lat box (degrees); the UTM zone is the one of the box centre.

        Raises GeoInputError, with the reason and what to do, for a box that cannot be one UTM
        region (`check_lonlat_box`): non-finite or inverted bounds, a box across the antimeridian,
        beyond UTM's latitudes (80°S to 84°N), or wider than MAX_LON_FROM_CENTRAL_MERIDIAN_DEG on
        either side of its zone's central meridian."""
        check_lonlat_box(lon_min, lat_min, lon_max, lat_max)
        return cls.from_geometry(box(lon_min, lat_min, lon_max, lat_max), WGS84, resolution)

    @classmethod
    def from_geometry(cls, geom: BaseGeometry, crs: Any, resolution: float = 0.2) -> "Region":
        """The bounding grid of a shapely geometry given in `crs` (any CRS), in the UTM zone of
        the geometry's centre."""
        if geom is None or geom.is_empty:
            raise GeoInputError("Region.from_geometry: the geometry is empty")
        crs = to_crs(crs)
        geom_ll = _reproject_geom(geom, crs, WGS84)
        c = geom_ll.envelope.centroid
        utm = utm_crs_for(c.x, c.y)
        geom_utm = _reproject_geom(geom, crs, utm)
        return cls.from_bounds(geom_utm.bounds, utm, resolution)

    # -- grid properties ---------------------------------------------------------------------
    @property
    def resolution(self) -> float:
        """Pixel size in metres."""
        return float(self.transform.a)

    @property
    def height(self) -> int:
        return self.shape[0]

    @property
    def width(self) -> int:
        return self.shape[1]

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(xmin, ymin, xmax, ymax) of the pixel edges, in the CRS."""
        t, (h, w) = self.transform, self.shape
        return (t.c, t.f - h * self.resolution, t.c + w * self.resolution, t.f)

    @property
    def epsg(self) -> int | None:
        return epsg_of(self.crs)

    @property
    def crs_string(self) -> str:
        """"EPSG:nnnn" when the CRS has a code, else its WKT."""
        epsg = self.epsg
        return f"EPSG:{epsg}" if epsg is not None else self.crs.to_wkt()

    @property
    def grid(self) -> RasterGrid:
        """The pixel <-> CRS-metre math of this grid."""
        return RasterGrid(float(self.transform.c), float(self.transform.f), self.resolution, self.shape)

    @property
    def geobox(self) -> GeoBox:
        """The same grid as an odc-geo GeoBox."""
        return GeoBox(self.shape, self.transform, self.crs_string)

    @property
    def geometry(self) -> shapely.Polygon:
        """The grid's outline as a polygon in its CRS."""
        return box(*self.bounds)

    @property
    def geometry_lonlat(self) -> shapely.Polygon:
        """The grid's outline in WGS84 lon/lat (edges densified, so it follows the projection)."""
        xmin, ymin, xmax, ymax = self.bounds
        outline = self.geometry.segmentize(max(xmax - xmin, ymax - ymin) / 16)
        return _reproject_geom(outline, self.crs, WGS84)

    @property
    def centre_lonlat(self) -> tuple[float, float]:
        xmin, ymin, xmax, ymax = self.bounds
        lon, lat = self.xy_to_lonlat((xmin + xmax) / 2, (ymin + ymax) / 2)
        return float(lon), float(lat)

    def coords(self) -> tuple[np.ndarray, np.ndarray]:
        """Pixel-centre coordinates: x (W,) ascending, y (H,) descending (row 0 is north), float64."""
        return self.grid.coords()

    # -- coordinate conversions --------------------------------------------------------------
    def lonlat_to_xy(self, lon, lat):
        """WGS84 lon/lat degrees -> (x, y) metres in the region's CRS."""
        return lonlat_to_crs(lon, lat, self.crs)

    def xy_to_lonlat(self, x, y):
        """(x, y) metres in the region's CRS -> WGS84 (lon, lat) degrees."""
        return crs_to_lonlat(x, y, self.crs)

    def xy_to_pixel(self, x, y):
        """(x, y) in the CRS -> continuous (row, col); pixel (r, c) has its centre at (r+0.5, c+0.5).
        Use `np.floor` to get the integer index of the pixel containing the point."""
        return self.grid.xy_to_pixel(x, y)

    def pixel_to_xy(self, row, col):
        """Continuous (row, col) -> (x, y) in the CRS (inverse of `xy_to_pixel`)."""
        return self.grid.pixel_to_xy(row, col)

    def lonlat_to_pixel(self, lon, lat):
        """WGS84 lon/lat -> continuous (row, col)."""
        return self.xy_to_pixel(*self.lonlat_to_xy(lon, lat))

    def contains_xy(self, x, y) -> np.ndarray | bool:
        xmin, ymin, xmax, ymax = self.bounds
        x, y = np.asarray(x), np.asarray(y)
        return (x >= xmin) & (x < xmax) & (y > ymin) & (y <= ymax)

    # -- sub-grids ---------------------------------------------------------------------------
    def window(self, rows: slice, cols: slice) -> "Region":
        """The sub-grid of pixel rows/cols (slices may extend beyond the grid: it is the same
        infinite pixel lattice, used for halos)."""
        r0, r1, c0, c1 = rows.start or 0, rows.stop, cols.start or 0, cols.stop
        if r1 is None:
            r1 = self.shape[0]
        if c1 is None:
            c1 = self.shape[1]
        if r1 <= r0 or c1 <= c0:
            raise GeoInputError(f"empty window rows={rows} cols={cols} of a {self.shape} region")
        return Region(self.crs, self.transform @ Affine.translation(c0, r0), (r1 - r0, c1 - c0))

    def crop(self, bounds_xy: Sequence[float]) -> "Region":
        """The part of this grid covering `bounds_xy` (xmin, ymin, xmax, ymax in the CRS), snapped
        outward to this grid's pixels and clipped to it."""
        xmin, ymin, xmax, ymax = (float(b) for b in bounds_xy)
        r0, c0 = self.xy_to_pixel(xmin, ymax)
        r1, c1 = self.xy_to_pixel(xmax, ymin)
        r0 = max(0, math.floor(float(r0) + _SNAP_TOL))
        c0 = max(0, math.floor(float(c0) + _SNAP_TOL))
        r1 = min(self.shape[0], math.ceil(float(r1) - _SNAP_TOL))
        c1 = min(self.shape[1], math.ceil(float(c1) - _SNAP_TOL))
        if r1 <= r0 or c1 <= c0:
            raise GeoInputError(f"crop bounds {tuple(bounds_xy)} do not overlap the region {self.bounds}")
        return self.window(slice(r0, r1), slice(c0, c1))

    def slices_of(self, other: "Region") -> tuple[slice, slice]:
        """(y_slice, x_slice) of `other` (a sub-grid on the same lattice) inside this region."""
        if other.crs != self.crs or not math.isclose(other.resolution, self.resolution):
            raise GeoInputError("slices_of: the regions are not on the same grid")
        r, c = self.xy_to_pixel(other.bounds[0], other.bounds[3])
        r, c = int(round(float(r))), int(round(float(c)))
        return slice(r, r + other.shape[0]), slice(c, c + other.shape[1])

    def tiles(self, tile_px: int, halo_px: int = 0) -> list["Tile"]:
        """Tiles of `tile_px` pixels aligned to a Zarr chunk grid of the same size (the last
        row/column of tiles may be smaller), each with a `halo_px` margin (the halo may extend
        beyond the region's edge)."""
        tile_px, halo_px = int(tile_px), int(halo_px)
        if tile_px <= 0 or halo_px < 0:
            raise GeoInputError(f"tiles: need tile_px > 0 and halo_px >= 0, got {tile_px}, {halo_px}")
        gt = GeoboxTiles(self.geobox, (tile_px, tile_px))
        ny, nx = gt.shape
        out = []
        for ty in range(ny):
            for tx in range(nx):
                ys, xs = gt.roi[ty, tx]
                inner = (slice(ys.start, ys.stop), slice(xs.start, xs.stop))
                reg = self.window(
                    slice(ys.start - halo_px, ys.stop + halo_px),
                    slice(xs.start - halo_px, xs.stop + halo_px),
                )
                crop = (slice(halo_px, halo_px + ys.stop - ys.start), slice(halo_px, halo_px + xs.stop - xs.start))
                out.append(Tile(ty, tx, reg, inner, crop))
        return out

    # -- xarray ------------------------------------------------------------------------------
    def to_xarray(self, data, dims: Sequence[str] = ("y", "x"), coords: dict | None = None, **kw):
        """Wrap `data` (..., H, W) as a DataArray with pixel-centre x/y coordinates and the CRS and
        transform attached (rioxarray). `dims` ends with ("y", "x")."""
        import xarray as xr

        dims = tuple(dims)
        if dims[-2:] != ("y", "x") or np.shape(data)[-2:] != self.shape:
            raise GeoInputError(f"to_xarray: data {np.shape(data)} / dims {dims} do not match region {self.shape}")
        x, y = self.coords()
        da = xr.DataArray(data, dims=dims, coords={**(coords or {}), "y": y, "x": x}, **kw)
        return self.attach_crs(da)

    def attach_crs(self, obj):
        """Write this region's CRS and transform onto a DataArray/Dataset (rioxarray)."""

        obj = obj.rio.write_crs(self.crs_string)
        return obj.rio.write_transform(self.transform)

    @classmethod
    def from_xarray(cls, obj) -> "Region":
        """The Region of a DataArray/Dataset carrying a CRS (rioxarray) and regular x/y coords."""

        crs = obj.rio.crs
        if crs is None:
            raise GeoInputError("from_xarray: the array carries no CRS")
        t = obj.rio.transform(recalc=True)
        return cls(to_crs(crs), t, (obj.sizes["y"], obj.sizes["x"]))

    # -- io ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (for store attributes)."""
        return {
            "crs": self.crs_string,
            "transform": [float(v) for v in tuple(self.transform)[:6]],
            "shape": [int(self.shape[0]), int(self.shape[1])],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Region":
        try:
            return cls(to_crs(d["crs"]), Affine(*d["transform"][:6]), tuple(d["shape"]))
        except (KeyError, TypeError) as e:
            raise GeoInputError(f"Region.from_dict: malformed region dict {d!r} ({e})") from None

    def __repr__(self) -> str:
        b = ", ".join(f"{v:.1f}" for v in self.bounds)
        return f"Region(EPSG:{self.epsg}, shape={self.shape}, res={self.resolution} m, bounds=({b}))"


@dataclass(frozen=True)
class Tile:
    """One tile of a Region's chunk-aligned tiling.

    `region` includes the halo; `inner` is the (y_slice, x_slice) of the tile without halo in the
    full raster (a valid Zarr `region=`); `crop` is the (y_slice, x_slice) of that inner part
    within the halo'd tile's raster."""

    tile_y: int
    tile_x: int
    region: Region
    inner: tuple[slice, slice]
    crop: tuple[slice, slice] = field(repr=False)

    @property
    def index(self) -> tuple[int, int]:
        return (self.tile_y, self.tile_x)


def _reproject_geom(geom: BaseGeometry, src: Any, dst: Any) -> BaseGeometry:
    """A shapely geometry from CRS `src` to `dst`."""
    src, dst = to_crs(src), to_crs(dst)
    if src == dst:
        return geom
    tr = transformer(src, dst)
    return shapely.transform(geom, lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1])))
