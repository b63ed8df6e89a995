"""The digital twin's static world: extruded buildings, street furniture and a painted ground raster.

Local frame: UTM coordinates (~4e5, ~7e6) lose precision in float32 ray casting, so the world lives
in a local frame whose origin is the region's south-west corner: x = E - origin_E, y = N - origin_N,
z up, z = 0 on the (flat) ground. `crs_to_local` / `local_to_crs` (behind `World.to_local` /
`World.to_crs`) are the only places that apply this offset.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import shapely
import shapely.ops
import trimesh
from tqdm.auto import tqdm

from neuralmaps.classes import AREA_CLASSES, VOID, class_id
from neuralmaps.storage import atomic_path

from .materials import FaceMat, GroundMat
from .noise import NoiseTexture
from .raycast import MeshRayCasting, RayScene
from .styles import NO_VARIATION, STYLED_HEIGHT_KINDS, BuildingStyles, variation_knobs

if TYPE_CHECKING:  # pragma: no cover
    from neuralmaps.config import SynthConfig
    from neuralmaps.geo import OSMLayers, Region

    from .appearance import Appearance
    from .render import RenderOutput

__all__ = ["World", "WorldBuilder", "BuildingStyles"]

_LABEL_TO_MAT = {  # ground material under each area class
    "crosswalk": GroundMat.ASPHALT, "sidewalk": GroundMat.PAVING, "road": GroundMat.ASPHALT,
    "building": GroundMat.FOOTPRINT, "terrain": GroundMat.GRASS,
}
_AREA_TO_MAT = {
    "grass": GroundMat.GRASS, "park": GroundMat.GRASS, "garden": GroundMat.GRASS,
    "playground": GroundMat.SAND, "pitch": GroundMat.GRASS, "water": GroundMat.WATER,
    "parking": GroundMat.PARKING, "pedestrian": GroundMat.PLAZA, "scrub": GroundMat.FOREST,
    "wood": GroundMat.FOREST, "sand": GroundMat.SAND, "rock": GroundMat.BARE,
}
TRAM_GAUGE_M = 1.435
MAX_GROUND_PIXELS = 1_000_000_000  # 2 GB of ground rasters (Helsinki's 1.1 x 1.7 km at 0.1 m: 0.18 G px)


# -- unit primitives (built once) ------------------------------------------------------------
def _template(mesh: trimesh.Trimesh) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(mesh.vertices, np.float32), np.asarray(mesh.faces, np.int32)


_CYL = _template(trimesh.creation.cylinder(radius=1.0, height=1.0, sections=8))  # centred at 0, z in [-.5, .5]
_SPHERE = _template(trimesh.creation.icosphere(subdivisions=1, radius=1.0))
_BOX = _template(trimesh.creation.box((1.0, 1.0, 1.0)))


class WorldBuilder:
    """Accumulates triangles (with class, material, colour and owner) and the ground raster.

    Coordinates are world-local metres (see the module docstring). `build()` returns the World."""

    def __init__(self, crs: Any, origin: tuple[float, float], size_m: tuple[float, float], seed: int = 0):
        self.crs, self.origin, self.size_m, self.seed = crs, np.asarray(origin, np.float64), tuple(size_m), int(seed)
        self._v: list[np.ndarray] = []
        self._f: list[np.ndarray] = []
        self._cls: list[np.ndarray] = []
        self._mat: list[np.ndarray] = []
        self._col: list[np.ndarray] = []
        self._own: list[np.ndarray] = []
        self._nv = 0
        self.building_ids: list[int] = []
        self.building_heights: list[float] = []
        self.ground_mat: np.ndarray | None = None
        self.ground_label: np.ndarray | None = None
        self.ground_res = 0.1

    # -- low level ---------------------------------------------------------------------------
    def add_mesh(self, vertices: np.ndarray, faces: np.ndarray, cls: int, mat: int, color, owner: int = -1) -> None:
        """Triangles (V, 3) / (F, 3) of one class and material; `color` (3,) or (F, 3) linear RGB."""
        nf = len(faces)
        if nf == 0:
            return
        self._v.append(np.asarray(vertices, np.float32))
        self._f.append(np.asarray(faces, np.int64) + self._nv)
        self._nv += len(vertices)
        self._cls.append(np.full(nf, cls, np.uint8))
        self._mat.append(np.full(nf, mat, np.uint8))
        self._col.append(np.broadcast_to(np.asarray(color, np.float32), (nf, 3)))
        self._own.append(np.full(nf, owner, np.int32))

    def _add_template(self, tpl, scale, offset, cls, mat, color) -> None:
        v, f = tpl
        self.add_mesh(v * np.asarray(scale, np.float32) + np.asarray(offset, np.float32), f, cls, mat, color)

    # -- features ----------------------------------------------------------------------------
    def add_building(self, polygon: shapely.Polygon, height_m: float, building_id: int) -> int:
        """Extrude a footprint (local metres) to `height_m`; walls get the facade material, the top
        the roof material. Returns the number of triangles added (0 for degenerate footprints)."""
        polys = [polygon] if polygon.geom_type == "Polygon" else list(getattr(polygon, "geoms", []))
        owner = len(self.building_ids)
        added = 0
        for p in polys:
            if p.is_empty or p.area < 1.0:
                continue
            p = shapely.orient_polygons(p) if hasattr(shapely, "orient_polygons") else shapely.geometry.polygon.orient(p)
            try:
                m = trimesh.creation.extrude_polygon(p, float(height_m))
            except Exception:  # noqa: BLE001 (triangulation of a degenerate ring)
                continue
            n = m.face_normals
            keep = n[:, 2] > -0.5  # the bottom faces lie on the ground: never visible
            faces = np.asarray(m.faces)[keep]
            roof = n[keep, 2] > 0.5
            v = np.asarray(m.vertices, np.float32)
            bcls = class_id("building")
            self.add_mesh(v, faces[~roof], bcls, FaceMat.FACADE, (0.6, 0.6, 0.6), owner)
            self.add_mesh(v, faces[roof], bcls, FaceMat.ROOF, (0.3, 0.3, 0.3), owner)
            added += int(keep.sum())
        if added:
            self.building_ids.append(int(building_id))
            self.building_heights.append(float(height_m))
        return added

    def add_tree(self, x: float, y: float, height_m: float = 8.0, crown_radius_m: float = 2.5, tint: float = 1.0) -> None:
        trunk_h = height_m - 1.6 * crown_radius_m
        tree = class_id("tree")
        self._add_template(_CYL, (0.15 + 0.02 * height_m, 0.15 + 0.02 * height_m, trunk_h + 0.5),
                           (x, y, (trunk_h + 0.5) / 2), tree, FaceMat.PLAIN, (0.22, 0.16, 0.11))
        self._add_template(_SPHERE, (crown_radius_m, crown_radius_m, 1.2 * crown_radius_m),
                           (x, y, height_m - 1.2 * crown_radius_m), tree, FaceMat.FOLIAGE, (tint, tint, tint))

    def add_pole(self, x: float, y: float, height_m: float, radius_m: float, cls: int, color=(0.35, 0.35, 0.36)) -> None:
        self._add_template(_CYL, (radius_m, radius_m, height_m), (x, y, height_m / 2), cls, FaceMat.PLAIN, color)

    def add_box(self, center, size, cls: int, color, yaw: float = 0.0) -> None:
        """An axis-aligned box of `size` (x, y, z) metres centred at `center`, rotated by `yaw` about z."""
        v, f = _BOX
        c, s = math.cos(yaw), math.sin(yaw)
        R = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], np.float32)
        self.add_mesh((v * np.asarray(size, np.float32)) @ R.T + np.asarray(center, np.float32), f, cls, FaceMat.PLAIN, color)

    def add_street_light(self, x: float, y: float, yaw: float = 0.0) -> None:
        sl = class_id("street_light")
        self.add_pole(x, y, 6.5, 0.08, sl)
        self.add_box((x + 0.4 * math.cos(yaw), y + 0.4 * math.sin(yaw), 6.45), (0.9, 0.3, 0.18), sl, (0.75, 0.75, 0.7), yaw)

    def add_traffic_light(self, x: float, y: float, yaw: float = 0.0) -> None:
        tl = class_id("traffic_light")
        self.add_pole(x, y, 3.2, 0.07, tl, (0.15, 0.16, 0.15))
        self.add_box((x, y, 2.9), (0.32, 0.3, 0.95), tl, (0.08, 0.09, 0.08), yaw)

    def add_traffic_sign(self, x: float, y: float, yaw: float = 0.0, color=(0.15, 0.25, 0.6)) -> None:
        ts = class_id("traffic_sign")
        self.add_pole(x, y, 2.6, 0.04, ts, (0.5, 0.5, 0.52))
        self.add_box((x, y, 2.3), (0.06, 0.65, 0.65), ts, color, yaw)

    def add_fence(self, line_xy: np.ndarray, height_m: float = 1.2, color=(0.30, 0.28, 0.25)) -> None:
        """A thin vertical wall (two triangles per segment, hit from both sides) along a polyline (N, 2)."""
        p = np.asarray(line_xy, np.float32)
        if len(p) < 2:
            return
        n = len(p)
        v = np.concatenate([np.c_[p, np.zeros(n)], np.c_[p, np.full(n, height_m)]]).astype(np.float32)
        i = np.arange(n - 1)
        f = np.concatenate([np.c_[i, i + 1, n + i + 1], np.c_[i, n + i + 1, n + i]])
        self.add_mesh(v, f, class_id("fence"), FaceMat.PLAIN, color)

    def mesh_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What was added so far as (vertices (V, 3) float32, faces (F, 3) int32, colours (F, 3) float32)."""
        if not self._f:
            return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32), np.zeros((0, 3), np.float32)
        return (np.concatenate(self._v).astype(np.float32), np.concatenate(self._f).astype(np.int32),
                np.concatenate(self._col).astype(np.float32))

    def set_ground(self, mat: np.ndarray, label: np.ndarray, resolution_m: float) -> None:
        """Ground raster, north-up (row 0 north), covering exactly (0, 0)-(size_m) in local metres."""
        h, w = mat.shape
        if label.shape != mat.shape:
            raise ValueError(f"ground material {mat.shape} and label {label.shape} rasters differ in shape")
        if not (math.isclose(w * resolution_m, self.size_m[0], rel_tol=1e-6) and math.isclose(h * resolution_m, self.size_m[1], rel_tol=1e-6)):
            raise ValueError(f"ground raster {h}x{w} px at {resolution_m} m does not cover the world {self.size_m} m")
        self.ground_mat, self.ground_label, self.ground_res = mat.astype(np.uint8), label.astype(np.uint8), float(resolution_m)

    def build(self, styles: BuildingStyles | None = None, variation: dict | None = None) -> "World":
        """The World of what was added. styles: one per added building (in `building_ids` order);
        None draws the original palette from (ids, seed). variation: what the world records of
        the twin-variation knobs it was built with (`World.variation`)."""
        if styles is not None and len(styles) != len(self.building_ids):
            raise ValueError(f"{len(styles)} building styles for {len(self.building_ids)} buildings")
        if self.ground_mat is None:
            from neuralmaps.geo.region import RasterGrid

            res = self.ground_res
            shape = RasterGrid.from_bounds((0.0, 0.0, *self.size_m), res).shape
            self.ground_mat = np.full(shape, GroundMat.BARE, np.uint8)
            self.ground_label = np.full(shape, VOID, np.uint8)
            self.size_m = (shape[1] * res, shape[0] * res)
        cat = lambda xs, shape, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(shape, dt)  # noqa: E731
        v = cat(self._v, (0, 3), np.float32)
        f = cat(self._f, (0, 3), np.int32)
        if styles is None:
            styles = BuildingStyles.draw(np.asarray(self.building_ids, np.int64), self.seed)
        return World(
            crs=self.crs, origin=self.origin, size_m=tuple(float(s) for s in self.size_m), seed=self.seed,
            vertices=v, faces=f,
            face_class=cat(self._cls, (0,), np.uint8), face_mat=cat(self._mat, (0,), np.uint8),
            face_color=cat(self._col, (0, 3), np.float32), face_owner=cat(self._own, (0,), np.int32),
            styles=styles, building_ids=np.asarray(self.building_ids, np.int64),
            building_heights=np.asarray(self.building_heights, np.float32),
            ground_mat=self.ground_mat, ground_label=self.ground_label, ground_res=self.ground_res,
            variation=NO_VARIATION if variation is None else dict(variation),
        )


@dataclass(eq=False)
class World(MeshRayCasting):
    """A static digital twin in world-local metres (x east, y north, z up; origin = region SW corner).

    Mesh: vertices (V, 3) float32, faces (F, 3) int32 with per-face `face_class` (CLASS_NAMES index),
    `face_mat` (FaceMat), `face_color` (F, 3) linear RGB and `face_owner` (building index or -1).
    Ground: `ground_mat` (GroundMat) and `ground_label` (class index, 255 void), (H, W) uint8,
    north-up, `ground_res` metres per pixel, covering [0, size_m[0]] x [0, size_m[1]].
    `layers`: the OSMLayers it was built from (CRS coordinates, after tag dropout), used by the
    capture simulation and by the class rasters of the stores.
    `variation`: the twin-variation knobs it was built with ({"building_styles", "tag_dropout",
    "district_m"}, as `SynthConfig`) and, from OSM, the tags dropped ("dropped_tags").
    """

    crs: Any
    origin: np.ndarray  # (2,) float64: CRS easting, northing of the local frame's origin
    size_m: tuple[float, float]  # (width east, height north) of the region, metres
    seed: int
    vertices: np.ndarray
    faces: np.ndarray
    face_class: np.ndarray
    face_mat: np.ndarray
    face_color: np.ndarray
    face_owner: np.ndarray
    styles: BuildingStyles
    building_ids: np.ndarray
    building_heights: np.ndarray
    ground_mat: np.ndarray
    ground_label: np.ndarray
    ground_res: float
    layers: "OSMLayers | None" = None
    region: "Region | None" = None
    build_seconds: float = float("nan")
    variation: dict = field(default_factory=lambda: dict(NO_VARIATION))
    _scene: RayScene | None = field(default=None, repr=False)
    _normals: np.ndarray | None = field(default=None, repr=False)
    _texture: NoiseTexture | None = field(default=None, repr=False)
    _tangents: np.ndarray | None = field(default=None, repr=False)
    _facade_table: np.ndarray | None = field(default=None, repr=False)

    # -- the one place of the local-frame offset ---------------------------------------------
    def to_local(self, xy_crs: np.ndarray) -> np.ndarray:
        """CRS (easting, northing) (..., 2) float64 -> world-local (x, y) (..., 2) float64."""
        return crs_to_local(xy_crs, self.origin)

    def to_crs(self, xy_local: np.ndarray) -> np.ndarray:
        """World-local (x, y) (..., 2) -> CRS (easting, northing) (..., 2) float64."""
        return local_to_crs(xy_local, self.origin)

    def lines_local(self, geom) -> list[np.ndarray]:
        """The parts of a (Multi)LineString in CRS coordinates as local polylines (N, 2) float64."""
        return _parts_local(geom, self.origin)

    @property
    def bounds_local(self) -> tuple[float, float, float, float]:
        """(xmin, ymin, xmax, ymax) of the region in local metres."""
        return (0.0, 0.0, float(self.size_m[0]), float(self.size_m[1]))

    # -- ray casting ---------------------------------------------------------------------------
    @property
    def face_tangents(self) -> np.ndarray:
        """Unit horizontal tangents (F, 2) float32 of the faces (along walls; arbitrary on flat faces)."""
        if self._tangents is None:
            n = self.face_normals
            t = np.stack([-n[:, 1], n[:, 0]], 1)
            self._tangents = (t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-6)).astype(np.float32)
        return self._tangents

    FACADE_COLUMNS = ("storey_m", "bay_m", "half_win_w", "win_bottom", "win_top", "max_window_z", "shop",
                      "line_u_m", "line_u_frac", "line_v_m", "line_v_frac", "line_dark", "tex_amp", "tex_scale",
                      "storey_dark")

    @property
    def facade_table(self) -> np.ndarray:
        """Per-building facade parameters (B, 15) float32 in the renderer's layout
        (`FACADE_COLUMNS`): storey height, bay width, half window width (fraction of the bay),
        window bottom and top (fractions of the storey), highest window position (m), has shop
        windows (0/1), wall-texture line period and width fraction along (u) and up (v) the wall,
        line darkness, texture noise amplitude and scale, storey-line darkness."""
        if self._facade_table is None:
            st = self.styles
            self._facade_table = np.stack([
                st.storey_m, st.bay_m, st.win_w / 2, st.win_bottom, st.win_bottom + st.win_h,
                self.building_heights - 0.7, st.ground_floor.astype(np.float32), st.line_u_m, st.line_u_frac,
                st.line_v_m, st.line_v_frac, st.line_dark, st.tex_amp, st.tex_scale, st.storey_dark,
            ], 1).astype(np.float32).reshape(-1, len(self.FACADE_COLUMNS))
        return self._facade_table

    @property
    def texture(self) -> NoiseTexture:
        """The world's periodic noise texture (surface texture of ground, facades, roofs, foliage)."""
        if self._texture is None:
            self._texture = NoiseTexture(self.seed + 11)
        return self._texture

    @property
    def ground_grid(self):
        """The ground rasters' north-up grid in local metres (`neuralmaps.geo.region.RasterGrid`):
        `ground_res` pixels from (0, 0) to `size_m`, row 0 north."""
        from neuralmaps.geo.region import RasterGrid

        h, w = self.ground_mat.shape
        return RasterGrid(0.0, h * self.ground_res, self.ground_res, (h, w))

    def ground_lookup(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ground (material, label) at local points (N,) each; outside the raster: (BARE, 255)."""
        r, c, inside = self.ground_grid.index(x, y)
        mat = np.where(inside, self.ground_mat[r, c], GroundMat.BARE).astype(np.uint8)
        lab = np.where(inside, self.ground_label[r, c], VOID).astype(np.uint8)
        return mat, lab

    def ground_dataset(self):
        """The ground rasters as an xarray Dataset (`material`, `label`) carrying the CRS."""
        from neuralmaps.geo import Region

        (x0, y0), (x1, y1) = self.to_crs(np.array([[0.0, 0.0], self.size_m]))
        region = Region.from_bounds((x0, y0, x1, y1), self.crs, self.ground_res)
        import xarray as xr

        return xr.Dataset({"material": region.to_xarray(self.ground_mat), "label": region.to_xarray(self.ground_label)})

    # -- rendering (see render.py) -----------------------------------------------------------
    def render(self, camera, T_world_cam, appearance: "Appearance | None" = None) -> "RenderOutput":
        """Render one camera (PinholeCamera / FisheyeCamera) at `T_world_cam` (Transform3D, camera to
        world-local). See `neuralmaps.synth.render.render_view`."""
        from .render import render_view

        return render_view(self, camera, T_world_cam, appearance)

    def render_orthophoto(self, bounds_local, resolution_m: float, appearance: "Appearance | None" = None,
                          supersample: int | None = None, progress: bool = False) -> np.ndarray:
        """North-up top-down orthophoto (H, W, 3) uint8 of `bounds_local` (xmin, ymin, xmax, ymax,
        local metres). See `neuralmaps.synth.render.render_orthophoto`."""
        from .render import render_orthophoto

        return render_orthophoto(self, bounds_local, resolution_m, appearance, progress=progress, supersample=supersample)

    def __repr__(self) -> str:
        return (f"World(origin=({self.origin[0]:.1f}, {self.origin[1]:.1f}), size={self.size_m[0]:.0f}x{self.size_m[1]:.0f} m, "
                f"{len(self.building_ids)} buildings, {len(self.faces)} triangles, ground {self.ground_mat.shape} @ {self.ground_res} m)")

    # -- construction from OSM ---------------------------------------------------------------
    @classmethod
    def from_osm(
        cls, path_or_layers: Any, region: "Region | None" = None, seed: int = 0, ground_resolution_m: float = 0.1,
        progress: bool = True, cache_dir: "str | Path | None" = None, variation: "SynthConfig | None" = None,
    ) -> "World":
        """Build the world of an OSM extract (.pbf / GeoPackage path, dict of GeoDataFrames or
        OSMLayers) inside `region` (None: the whole extract). Deterministic in `seed`.

        variation: a `SynthConfig` whose `building_styles`, `tag_dropout` and `district_m` say how
        the twin varies (None: `SynthConfig()`'s defaults). Tags are dropped where OSM is read, so
        the world's `layers` (and every class raster made of them) are the sparser ones.
        cache_dir: if given and the source is a file, the built world is pickled there under a key
        of (file path, size, mtime, region, seed, ground resolution, variation, code version) and
        reloaded by later calls (written atomically, so a crash never leaves a half-written cache).
        Raises neuralmaps.geo.GeoInputError for unreadable input, and when no building could be
        extruded although the input has buildings (e.g. a missing triangulation engine)."""
        knobs = variation_knobs(variation)
        key = _cache_key(path_or_layers, region, seed, ground_resolution_m, knobs) if cache_dir is not None else None
        if key is not None:
            path = Path(cache_dir) / f"world-{key}.pkl"
            if path.is_file():
                with open(path, "rb") as f:
                    return pickle.load(f)
        world = cls._build(path_or_layers, region, seed, ground_resolution_m, progress, knobs)
        if key is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                pickle.dump(world, f, protocol=pickle.HIGHEST_PROTOCOL)
        return world

    @classmethod
    def _build(cls, path_or_layers: Any, region: "Region | None", seed: int, ground_resolution_m: float,
               progress: bool, knobs: dict) -> "World":
        from neuralmaps.geo import GeoInputError, Region, read_osm
        from neuralmaps.geo.osm import TagDropout, polygonal

        t0 = time.perf_counter()
        dropout = TagDropout(knobs["tag_dropout"], int(seed), knobs["district_m"]) if knobs["tag_dropout"] > 0 else None
        layers = read_osm(path_or_layers, region=region, dropout=dropout)
        region = layers.region if region is None else region
        name = getattr(layers, "source", "<layers>")
        ground_region = Region.from_bounds(region.bounds, region.crs, ground_resolution_m)
        npx = ground_region.shape[0] * ground_region.shape[1]
        if npx > MAX_GROUND_PIXELS:
            raise GeoInputError(
                f"{name}: the ground raster of {ground_region.shape[1]} x {ground_region.shape[0]} px at "
                f"{ground_resolution_m} m would need {2 * npx / 1e9:.1f} GB; crop the region or raise ground_resolution_m"
            )
        xmin, ymin, xmax, ymax = ground_region.bounds
        b = WorldBuilder(region.crs, (xmin, ymin), (xmax - xmin, ymax - ymin), seed)

        # Buildings, each with its style (drawn for every OSM building, kept for the extruded ones).
        bl = layers.buildings
        ids = bl["id"].to_numpy() if "id" in bl.columns else np.arange(len(bl))
        int_ids = np.array([_as_int_id(v) for v in ids], np.int64)
        b_geoms = shapely.make_valid(shapely.transform(bl.geometry.values, lambda xy: crs_to_local(xy, b.origin))) if len(bl) else []
        heights = bl["height_m"].to_numpy(np.float64) if len(bl) else np.zeros(0)
        centroids = shapely.get_coordinates(shapely.centroid(bl.geometry.values)) if len(bl) else np.zeros((0, 2))
        styles = None  # None: the original palette, drawn by the builder for the extruded buildings
        if knobs["building_styles"]:
            styles = BuildingStyles.draw_styled(int_ids, seed, knobs["building_styles"], centroids, knobs["district_m"])
        if styles is not None and len(bl):  # untagged heights of generic buildings: the style's
            untagged = (bl["height_source"].to_numpy() == "default") & bl["kind"].isin(STYLED_HEIGHT_KINDS).to_numpy()
            heights = np.where(untagged, styles.default_heights(), heights)
        added = []
        for k, (g, h, bid) in enumerate(tqdm(list(zip(b_geoms, heights, int_ids)), desc="buildings", disable=not progress,
                                             leave=False)):
            g = polygonal(g)
            if g.is_empty:
                continue
            h = float(h) if np.isfinite(h) and h > 0 else 12.0
            if b.add_building(g, float(np.clip(h, 2.5, 150.0)), int(bid)):
                added.append(k)
        if len(bl) and not b.building_ids:
            raise GeoInputError(
                f"{name}: {len(bl)} buildings in the region but none could be extruded "
                "(is `mapbox_earcut` installed? trimesh needs it to triangulate footprints)"
            )

        _add_points(b, layers, seed)
        for line in _lines_local(layers.fences, b.origin):
            b.add_fence(line)

        mat, label = _ground_raster(layers, ground_region, progress)
        b.set_ground(mat, label, ground_resolution_m)
        record = dict(knobs, dropped_tags=None if layers.dropped_tags is None else
                      {t: list(v) for t, v in layers.dropped_tags.items()})
        world = b.build(styles=None if styles is None else styles.take(added), variation=record)
        world.layers, world.region = layers, region
        world.build_seconds = time.perf_counter() - t0
        return world


# -- helpers ------------------------------------------------------------------------------------
CACHE_VERSION = 3  # bump when the world's construction changes (3: building styles, tag dropout)


def _cache_key(source: Any, region: "Region | None", seed: int, ground_res: float, knobs: dict) -> str | None:
    """Cache key of a file source (None for in-memory sources, which are not cached)."""
    if not isinstance(source, (str, os.PathLike)) or not Path(source).is_file():
        return None
    st = Path(source).stat()
    parts = [str(Path(source).resolve()), st.st_size, st.st_mtime_ns, None if region is None else region.to_dict(),
             int(seed), float(ground_res), {k: list(v) if isinstance(v, tuple) else v for k, v in knobs.items()},
             CACHE_VERSION]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def crs_to_local(xy_crs: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """CRS (E, N) (..., 2) -> local (x, y) (..., 2), float64: the one place of the origin offset."""
    return np.asarray(xy_crs, np.float64) - np.asarray(origin, np.float64)


def local_to_crs(xy_local: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """Local (x, y) (..., 2) -> CRS (E, N) (..., 2), float64 (inverse of `crs_to_local`)."""
    return np.asarray(xy_local, np.float64) + np.asarray(origin, np.float64)


def _parts_local(g, origin: np.ndarray) -> list[np.ndarray]:
    if g is None or g.is_empty:
        return []
    out = []
    for part in getattr(g, "geoms", [g]):
        c = crs_to_local(np.asarray(part.coords)[:, :2], origin)
        if len(c) >= 2:
            out.append(c)
    return out

def _as_int_id(v: Any) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return int.from_bytes(str(v).encode()[:8].ljust(8, b"\0"), "little") & 0x7FFFFFFFFFFFFFFF


def _lines_local(frame, origin: np.ndarray) -> list[np.ndarray]:
    """Polylines (N, 2) float64 in local metres of a GeoDataFrame of (Multi)LineStrings."""
    if frame is None or len(frame) == 0:
        return []
    return [c for g in frame.geometry.values for c in _parts_local(g, origin)]


def _point_rng(seed: int, x: float, y: float) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(round(x * 10)) & 0xFFFFFFFF, int(round(y * 10)) & 0xFFFFFFFF, 3])


def _add_points(b: WorldBuilder, layers: "OSMLayers", seed: int) -> None:
    """Trees, street lights, traffic lights, signs and poles from the point layer, sizes from the seed."""
    pts = layers.points
    if len(pts) == 0:
        return
    xy = crs_to_local(np.c_[shapely.get_x(pts.geometry.values), shapely.get_y(pts.geometry.values)], b.origin)
    W, H = b.size_m
    for (x, y), kind in zip(xy, pts["kind"].to_numpy()):
        if not (-5 <= x <= W + 5 and -5 <= y <= H + 5):
            continue
        r = _point_rng(seed, x, y)
        yaw = float(r.uniform(0, 2 * math.pi))
        if kind == "tree":
            h = float(r.uniform(5.0, 14.0))
            b.add_tree(x, y, h, crown_radius_m=float(r.uniform(0.22, 0.35)) * h, tint=float(r.uniform(0.8, 1.2)))
        elif kind == "street_light":
            b.add_street_light(x, y, yaw)
        elif kind == "traffic_light":
            b.add_traffic_light(x, y, yaw)
        elif kind == "traffic_sign":
            col = [(0.15, 0.25, 0.6), (0.7, 0.1, 0.08), (0.8, 0.7, 0.1), (0.8, 0.8, 0.8)][int(r.integers(4))]
            b.add_traffic_sign(x, y, yaw, col)
        elif kind == "pole":
            b.add_pole(x, y, float(r.uniform(6.0, 9.0)), 0.12, class_id("pole"), (0.30, 0.25, 0.20))


def _ground_raster(layers: "OSMLayers", ground_region: "Region", progress: bool):
    """(material, label) uint8 rasters (H, W), north-up, of the ground region.

    Labels are `geo.rasterize.area_label`, the area classes of the model's semantic raster, pixel
    for pixel; materials add area kinds (water, parking, ...) and the painted markings (dashed lane
    lines, zebra stripes along the rasterizer's crossing shapes, tram rails). Built in row strips
    so that the temporaries stay small whatever the region's size."""
    from neuralmaps.geo import GeoInputError
    from neuralmaps.geo.rasterize import area_label

    h, w = ground_region.shape
    label = np.full((h, w), VOID, np.uint8)
    mat = np.full((h, w), GroundMat.BARE, np.uint8)
    paint = _ground_paint(layers)
    strip = max(1, int(16_000_000 // max(w, 1)))  # rows per strip: bounds the multi-hot raster's memory
    road, terrain, crosswalk = class_id("road"), class_id("terrain"), class_id("crosswalk")
    for r0 in tqdm(range(0, h, strip), desc="ground", disable=not progress, leave=False):
        sub = ground_region.window(slice(r0, min(h, r0 + strip)), slice(0, w))
        lab, m = label[r0:r0 + sub.shape[0]], mat[r0:r0 + sub.shape[0]]
        try:
            lab[:] = area_label(layers, sub)
        except GeoInputError:  # no OSM feature in this strip: it stays unlabelled bare ground
            pass
        for name in AREA_CLASSES:
            m[lab == class_id(name)] = _LABEL_TO_MAT[name]
        # Area kinds override unlabelled / terrain pixels (and road pixels for parking lots).
        am = paint.burn("areas", sub, fill=255)
        if am is not None:
            sel = (am != 255) & ((lab == VOID) | (lab == terrain) | ((am == GroundMat.PARKING) & (lab == road)))
            m[sel] = am[sel]
        dash = paint.burn("lanes", sub)
        if dash is not None:
            m[(dash > 0) & (lab == road)] = GroundMat.LANE
        zebra = paint.burn("zebra", sub)
        if zebra is not None:
            m[(zebra > 0) & ((lab == road) | (lab == crosswalk))] = GroundMat.ZEBRA
        rail = paint.burn("rails", sub, all_touched=True)
        if rail is not None:
            m[rail > 0] = GroundMat.RAIL
    return mat, label


class _GroundPaint:
    """Shapes (in the CRS) painted into the ground raster, by layer, with their bounds for culling."""

    def __init__(self, shapes: dict[str, list]):
        self.shapes = {k: v for k, v in shapes.items() if v}
        self.bounds = {k: shapely.bounds(np.array([g for g, _ in v], dtype=object)) for k, v in self.shapes.items()}

    def burn(self, name: str, region: "Region", fill: int = 0, all_touched: bool = False) -> np.ndarray | None:
        """(H, W) uint8 raster of the layer's shapes on `region` (later shapes win), None if none there."""
        from rasterio import features

        if name not in self.shapes:
            return None
        x0, y0, x1, y1 = region.bounds
        b = self.bounds[name]
        near = np.flatnonzero((b[:, 2] >= x0) & (b[:, 0] <= x1) & (b[:, 3] >= y0) & (b[:, 1] <= y1))
        if len(near) == 0:
            return None
        shapes = [self.shapes[name][i] for i in near]
        return features.rasterize(shapes, out_shape=region.shape, transform=region.transform, fill=fill,
                                  dtype="uint8", all_touched=all_touched)


def _ground_paint(layers: "OSMLayers") -> _GroundPaint:
    shapes: dict[str, list] = {"areas": [], "lanes": [], "zebra": [], "rails": []}
    areas = layers.areas
    for g, k in zip(areas.geometry.values, areas["kind"] if len(areas) else []):
        if k in _AREA_TO_MAT and g is not None and not g.is_empty:
            shapes["areas"].append((g, int(_AREA_TO_MAT[k])))
    # Dashed centre lines on drivable roads wide enough for two lanes.
    roads = layers.roads
    for g, width, drivable in zip(roads.geometry.values, roads["width_m"], roads["drivable"]) if len(roads) else []:
        if drivable and width >= 5.5 and g is not None:
            for part in getattr(g, "geoms", [g]):
                shapes["lanes"] += [(d, 1) for d in _dashes(part, dash=3.0, gap=6.0, width=0.15)]
    # Zebra crossings: stripes across the walking direction, 0.5 m paint / 0.5 m gap.
    fw = layers.footways
    for g, kind, width in zip(fw.geometry.values, fw["kind"], fw["width_m"]) if len(fw) else []:
        if kind == "crossing" and g is not None:
            for part in getattr(g, "geoms", [g]):
                shapes["zebra"] += [(d, 1) for d in _dashes(part, dash=0.5, gap=0.5, width=max(float(width), 2.5))]
    shapes["zebra"] += [(d, 1) for d in _crossing_nodes(layers)]
    # Tram rails: two thin dark lines a gauge apart.
    for g in layers.rails.geometry.values:
        for part in getattr(g, "geoms", [g]) if g is not None else []:
            for off in (-TRAM_GAUGE_M / 2, TRAM_GAUGE_M / 2):
                o = part.offset_curve(off)
                if not o.is_empty:
                    shapes["rails"].append((o.buffer(0.04, cap_style="flat"), 1))
    return _GroundPaint(shapes)


def _dashes(line: shapely.LineString, dash: float, gap: float, width: float) -> list:
    """Rectangles of length `dash` every `dash + gap` metres along a line, `width` metres wide."""
    length = line.length
    if length < dash:
        return []
    starts = np.arange(0.5 * gap, length - dash + 1e-9, dash + gap)
    segs = [shapely.ops.substring(line, s, s + dash) for s in starts]
    return [s.buffer(width / 2, cap_style="flat") for s in segs if s.length > 0]


def _crossing_nodes(layers: "OSMLayers") -> list:
    """Zebra stripes for the crossing nodes that no crossing way draws: along the rasterizer's
    walks across the road (`crossing_node_walks`), so every such crosswalk label is painted."""
    from neuralmaps.geo.rasterize import CROSSING_WIDTH_M, crossing_node_walks

    walks, _ = crossing_node_walks(layers)
    return [d for w in walks for d in _dashes(w, dash=0.5, gap=0.5, width=CROSSING_WIDTH_M)]

