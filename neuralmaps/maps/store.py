"""The neural-map store (`map.zarr`, DESIGN.md §5) and `NeuralMap`, its reader.

Layout (Zarr v3, north-up, x/y coordinates at pixel centres, CRS in `spatial_ref`):

| variable | dims, dtype | meaning |
|---|---|---|
| `features` | (feature, y, x) float32 | fused BEV features (NaN where not built) |
| `matching` | (band, y, x) float16 | L2-normalised matching features |
| `valid` | (y, x) bool | cells the model observed |
| `observations` | (y, x) uint16 | map views whose image contains the cell's ground point (< max_depth_m) |
| `confidence` | (y, x) float32 | map confidence in [0, 1] (only with a confidence head) |
| `semantic_class` | (y, x) uint8 | composite class index into `class`, 255 = no data |
| `semantic_prob` | (class, y, x) float16 | per-class probability |
| `tile_done` | (tile_y, tile_x) bool, chunk (1, 1) | the tile's data is complete (written last) |
| `tile_inputs` | (tile_y, tile_x) uint64, chunk (1, 1) | hash of the captures the tile was built from |

Data chunks are exactly one map tile (`tile_px`), so that each tile task writes whole chunks and no
parallel write can be lost (DESIGN.md §6). Attributes: `format`, `model_sha256`, `config` (JSON),
`checkpoint`, `inputs` (JSON: paths and sha256 of captures, aerial, OSM), `region` (JSON),
`tile_px`, `halo_px`, `class_names`, `build` (JSON: view radius, max views, ...).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["NeuralMap", "STORE_FORMAT", "create_store", "store_variables"]

STORE_FORMAT = "neuralmaps.NeuralMap/1"
NODATA_CLASS = 255


def store_variables(feature_dim: int, matching_dim: int, num_classes: int, *, confidence: bool, semantics: bool
                    ) -> dict[str, tuple[tuple[str, ...], str, Any]]:
    """name -> (dims, dtype, fill value) of the per-pixel variables."""
    out = {
        "features": (("feature", "y", "x"), "float32", np.nan),
        "matching": (("band", "y", "x"), "float16", np.nan),
        "valid": (("y", "x"), "bool", False),
        "observations": (("y", "x"), "uint16", 0),
    }
    if confidence:
        out["confidence"] = (("y", "x"), "float32", np.nan)
    if semantics:
        out["semantic_class"] = (("y", "x"), "uint8", NODATA_CLASS)
        out["semantic_prob"] = (("class", "y", "x"), "float16", np.nan)
    return out


def create_store(path: Path, region: Any, tile_px: int, variables: dict, sizes: dict[str, int],
                 class_names: Sequence[str], attrs: dict[str, Any]) -> None:
    """Write the empty store (metadata, coordinates, CRS; no data chunks) to a temporary folder and
    rename it into place, so that `path` either does not exist or is a complete template."""
    import dask.array as da
    import xarray as xr

    from ..geo import write_zarr

    H, W = region.shape
    n_ty, n_tx = -(-H // tile_px), -(-W // tile_px)
    data, enc = {}, {}
    for name, (dims, dtype, fill) in variables.items():
        shape = tuple(sizes[d] if d not in ("y", "x") else (H if d == "y" else W) for d in dims)
        chunks = tuple(tile_px if d in ("y", "x") else sizes[d] for d in dims)
        data[name] = (dims, da.full(shape, fill, chunks=chunks, dtype=dtype))
        enc[name] = {"chunks": chunks, "fill_value": fill}
    for name, dtype in (("tile_done", "bool"), ("tile_inputs", "uint64")):
        data[name] = (("tile_y", "tile_x"), da.zeros((n_ty, n_tx), chunks=(1, 1), dtype=dtype))
        enc[name] = {"chunks": (1, 1), "fill_value": 0}
    x, y = region.coords()
    coords = {"x": x, "y": y, "feature": np.arange(sizes["feature"]), "band": np.arange(sizes["band"])}
    if "class" in sizes:
        coords["class"] = np.array(list(class_names), dtype=object)
    ds = region.attach_crs(xr.Dataset(data, coords=coords, attrs=attrs))
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write_zarr(ds, tmp, compute=False, encoding=enc)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_attrs(path: Path) -> dict[str, Any] | None:
    """The store's attributes, or None when `path` is not a neural-map store."""
    import zarr

    try:
        attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception:
        return None
    return attrs if attrs.get("format") == STORE_FORMAT else None


class NeuralMap:
    """A neural map on disk. `NeuralMap.open(path)`; `.ds` is the lazily loaded xarray Dataset
    (dask backed, CRS on `.ds.rio.crs`); `.export(dir)` writes the GIS deliverables; `.localize`,
    `.localize_many`, `.localize_sequence`, `.semantics_at`, `.classes_in` query it
    (`neuralmaps.maps.query`)."""

    def __init__(self, path: Path, ds: Any, cog: dict[str, Any] | None = None):
        self.path = Path(path)
        self._ds = ds
        self._group = None
        self._cog = cog  # {"region", "attrs", "bands"} when opened from an exported matching COG

    @classmethod
    def open(cls, path: str | os.PathLike) -> "NeuralMap":
        """Open a store written by `build_map`, or, for localization alone, the matching COG that
        `export` writes (`<name>_matching.tif`: its tags carry the model checksum and checkpoint).
        Raises FileNotFoundError / ValueError."""
        from ..geo import open_zarr

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"neural map not found: {path}")
        if path.is_file():
            return cls._open_matching_cog(path)
        if read_attrs(path) is None:
            raise ValueError(f"{path}: not a neural-map store (no attribute format={STORE_FORMAT!r})")
        return cls(path, open_zarr(path))

    @classmethod
    def _open_matching_cog(cls, path: Path) -> "NeuralMap":
        import rasterio

        from ..geo import Region
        from ..geo.export import TAG_PREFIX

        try:
            with rasterio.open(path) as src:
                tags = src.tags()
                crs, transform, shape, count = src.crs, src.transform, (src.height, src.width), src.count
        except rasterio.errors.RasterioIOError as e:
            raise ValueError(f"{path}: neither a neural-map store nor a readable GeoTIFF ({e})") from None
        attrs = {k[len(TAG_PREFIX):].lower(): v for k, v in tags.items() if k.startswith(TAG_PREFIX)}
        if attrs.get("layer") != "matching":
            raise ValueError(f"{path}: not a neuralmaps matching COG (no {TAG_PREFIX}LAYER=matching tag); "
                             "open the map store, or the <name>_matching.tif that `neuralmaps export` writes")
        if crs is None:
            raise ValueError(f"{path}: the GeoTIFF has no CRS")
        return cls(path, None, cog={"region": Region(crs, transform, shape), "attrs": attrs, "bands": count})

    @property
    def is_cog(self) -> bool:
        """Opened from an exported matching COG (localization only)."""
        return self._cog is not None

    @property
    def ds(self):
        """The store as an xarray Dataset (ValueError for a map opened from a matching COG)."""
        if self._cog is not None:
            raise ValueError(f"{self.path.name} is a matching COG: it serves localization only; open the map store "
                             "(map.zarr) for its other layers, semantics and export")
        return self._ds

    # -- properties ------------------------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._cog["attrs"]) if self._cog is not None else dict(self.ds.attrs)

    @property
    def crs(self):
        return self.ds.rio.crs

    @property
    def region(self):
        from ..geo import Region

        if self._cog is not None:
            return self._cog["region"]
        return Region.from_dict(json.loads(self.ds.attrs["region"]))

    @property
    def config(self):
        from ..config import Config

        return Config.from_dict(json.loads(self.ds.attrs["config"]))

    @property
    def class_names(self) -> list[str]:
        return list(self.ds.attrs.get("class_names", []))

    @property
    def zarr_group(self):
        """The store's zarr group, read-only (opened once): windowed reads without xarray/Dask."""
        self.ds  # noqa: B018 (a matching COG has no group: its clear error)
        if self._group is None:
            import zarr

            self._group = zarr.open_group(str(self.path), mode="r")
        return self._group

    @property
    def num_matching_bands(self) -> int:
        """Channels of the matching features (store or matching COG)."""
        return int(self._cog["bands"]) if self._cog is not None else int(self.zarr_group["matching"].shape[0])

    def read_matching(self, rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray]:
        """Matching features (D, h, w) float32 (0 where invalid) and validity (h, w) bool of the
        pixel window rows x cols (inside the map), from the store or the matching COG."""
        if self._cog is not None:
            import rasterio
            from rasterio.windows import Window

            with rasterio.open(self.path) as src:
                m = src.read(window=Window(cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start),
                             out_dtype="float32")
            v = np.isfinite(m).all(0)
        else:
            g = self.zarr_group
            m = np.asarray(g["matching"][:, rows, cols], dtype=np.float32)
            v = np.asarray(g["valid"][rows, cols], dtype=bool) & np.isfinite(m).all(0)
        return np.where(v, m, 0.0).astype(np.float32), v

    @property
    def tile_done(self) -> np.ndarray:
        """(tile_y, tile_x) bool."""
        return np.asarray(self.ds["tile_done"].values, dtype=bool)

    @property
    def is_complete(self) -> bool:
        return bool(self.tile_done.all())

    def __repr__(self) -> str:
        if self._cog is not None:
            return f"NeuralMap({str(self.path)!r}, {self.region!r}, matching COG: localization only)"
        d = self.tile_done
        return (f"NeuralMap({str(self.path)!r}, {self.region!r}, tiles {int(d.sum())}/{d.size} done, "
                f"variables {sorted(v for v in self.ds.data_vars if not v.startswith('tile_'))})")

    # -- export ----------------------------------------------------------------------------------
    def export(self, out_dir: str | os.PathLike, name: str | None = None, progress: bool = True) -> dict[str, Path]:
        """Write the GIS layers (COGs, .qml, STAC Item, .gpkg, .qgs) of this map into `out_dir`
        through `neuralmaps.geo.export.export_map`. Returns {layer name: path}."""
        try:
            from ..geo import export as geo_export
        except ImportError:
            geo_export = None
        if geo_export is None or not hasattr(geo_export, "export_map"):
            raise RuntimeError("neuralmaps.geo.export.export_map is not available in this installation")
        if not self.is_complete:
            done = self.tile_done
            raise ValueError(f"{self.path}: the map is incomplete ({int(done.sum())}/{done.size} tiles built); "
                             "rerun the build to finish it before exporting")
        from ..classes import CLASS_COLORS

        names = self.class_names or None
        colors = [tuple(int(round(255 * c)) for c in CLASS_COLORS[n]) for n in names] if names else None
        attrs = {k: v for k, v in self.attrs.items() if k in ("model_sha256", "checkpoint", "format")}
        attrs["source"] = str(self.path)
        return geo_export.export_map(self.ds, Path(out_dir), name=name or self.path.stem, class_names=names,
                                     class_colors=colors, attrs=attrs, progress=progress)

    # -- queries (neuralmaps.maps.query) ---------------------------------------------------------
    def localize(self, image: Any, camera: Any = None, prior: Sequence[float] | None = None, radius_m: float = 30.0,
                 heading_prior: float | None = None, **kwargs: Any):
        """Where was this photo taken? Returns a `query.LocalizationResult` (lat, lon, easting,
        northing, heading_deg clockwise from grid north, score, covariance / `uncertainty_m`,
        heading spread, top-k candidates, `confident` + `message`).

        image: a path (JPEG/PNG; its EXIF GPS gives the prior and GPSImgDirection the heading prior
            when they are not given) or an (H, W, 3) array (uint8, or float in [0, 1]).
        camera: the `CaptureSet` camera format (a row, or `[w, h, fx, fy, cx, cy, k1, k2]`), a dict or
            a cam.json path (`width`, `height`, `fx` or `hfov_deg`, ...; optional height above ground
            `z`, `pitch_deg`, `roll_deg`); None: from the EXIF 35 mm focal length.
        prior: (lat, lon) WGS84; the search covers `radius_m` around it and reads only that window
            of the map (plus the query's 20 m reach). heading_prior: degrees clockwise from north,
            searched ± `heading_range_deg` (default 30). `prior_sigma_m=`: the GPS fix's accuracy
            (m); positions are then weighed by a Gaussian of that std around the prior (default:
            the EXIF GPSHPositioningError when the prior is the EXIF fix, else uniform in the disc).
        kwargs: `prob_tif=` path (the position probability map as a GeoTIFF), `model=` / `checkpoint=`
            (default: the map's own), `heading_range_deg`, `posterior_cell_m`, `seed`, `method=` ("voting",
            the default, or "ransac": SNAP's sampler for the estimate, ~2x the time; `query.METHODS`).
        Raises `query.QueryError` (a ValueError) for a prior outside the map, an image whose size
        disagrees with its camera, nonsense intrinsics, or "no map here"."""
        from .query import localize

        return localize(self, image, camera, prior, radius_m, heading_prior, **kwargs)

    def localize_many(self, table: Any, *, client: Any = None, **kwargs: Any):
        """Localize every row of a query table as a Dask job; returns a GeoDataFrame (map CRS), one
        row per query in table order, geometry = estimated position, with the result fields,
        `error` (None, or why that row failed) and, when the table has ground truth (`x`, `y` with a
        CRS, `heading_deg`), `err_m` / `err_deg`.

        table: a DataFrame / GeoDataFrame, or a .parquet / .csv path (images relative to its folder,
            or to `image_root=`); `neuralmaps capture`'s queries.parquet works as is. Columns: `image`;
            the camera as `CaptureSet` columns (`width`, `height`, `fx`, ..., optional `z`, `pitch_deg`,
            `roll_deg`) or a `camera` column (dict, JSON text or cam.json path); the prior as
            `prior_lat`, `prior_lon` (or `lat`, `lon`), else the truth `x`, `y` moved by a seeded
            random offset within `prior_noise_m` (default 10 m; a simulated GPS fix), else EXIF;
            optional `heading_prior_deg` and `prior_sigma_m` (the fix's accuracy, m; or the keyword
            `prior_sigma_m=` for every row).
        client: any `distributed.Client`; else `scheduler=` (address), else an embedded LocalCluster
            of `workers=` workers (default 1; the model is loaded once per worker). Other kwargs:
            `radius_m`, `heading_range_deg`, `batch_size`, `model`, `checkpoint`, `device`, `seed`,
            `progress`."""
        from .query import localize_many

        return localize_many(self, table, client=client, **kwargs)

    def localize_sequence(self, images: Sequence[Any], cameras: Any, relative_poses: Any,
                          prior: Sequence[float] | None = None, radius_m: float = 30.0,
                          heading_prior: float | None = None, **kwargs: Any):
        """Localize a sequence of photos jointly (beyond SNAP, as OrienterNet's sequential mode).

        relative_poses: (N, 3) `(forward_m, left_m, dyaw_deg)` of each frame in the first frame's
        ground frame (known motion from odometry; `query.relative_poses_from(x, y, heading_deg)`
        makes them from absolute poses). cameras: one for all frames, or one per frame. prior,
        radius_m, heading_prior: for the first frame (EXIF of the first image by default). Each
        frame's pose posterior is moved by its motion into the first frame's pose space and the
        log-posteriors summed; returns one `LocalizationResult` per frame, from the joint mode."""
        from .query import localize_sequence

        return localize_sequence(self, images, cameras, relative_poses, prior, radius_m, heading_prior, **kwargs)

    def semantics_at(self, lat: float, lon: float):
        """The map's class at (lat, lon) and the class probabilities there: a `query.SemanticsAt`
        (`class_name`, `probabilities` {name: p}; class None where the map has no data).
        QueryError outside the map."""
        from .query import semantics_at

        return semantics_at(self, lat, lon)

    def classes_in(self, polygon: Any, crs: Any = 4326):
        """Area per class inside `polygon` (shapely, GeoJSON dict, WKT, or a GeoSeries with its own
        CRS; else in `crs`, default WGS84 lon/lat): a GeoDataFrame in the map's CRS, one row per class
        with `class_id`, `class_name`, `area_m2`, `fraction` and the class polygons clipped to the
        polygon as geometry; `no_data` (class_id 255) for parts without map data or outside the map,
        so the areas sum to the polygon's area."""
        from .query import classes_in

        return classes_in(self, polygon, crs)

    def semantic_iou(self, osm: Any) -> dict[str, Any]:
        """Per-class IoU of the map's area classes against the OSM-derived class raster of the same
        area (`query.semantic_iou`): `iou`, `recall` {class: value}, `miou`, `accuracy`, `num_cells`."""
        from .query import semantic_iou

        return semantic_iou(self, osm)
