"""Queries on a neural map: where was this photo taken (`localize`, `localize_many`,
`localize_sequence`) and what is at this place (`semantics_at`, `classes_in`). The `NeuralMap`
methods of the same names delegate here.

Frames (docs/architecture.md, "Queries"):
- the map store is north-up in its projected CRS (row 0 north, x/y at pixel centres);
- a query reads only a **window** of the store: the square of cells around the prior that holds
  every pose within `radius_m` of it plus the query BEV's reach (the farthest query cell from the
  camera, ~20 m for the 16 m x 72 deg frustum). The window lies on the store's pixel lattice (it
  may extend past the map's edge; those cells are invalid), and is turned into the model-grid
  layout (x east, y north, origin at the window's south-west corner: `grids.raster_to_grid`, the
  one north-up <-> model-grid conversion);
- the `Localizer` runs on that window in exhaustive **voting** mode with a `PosePrior` (the disc of
  `radius_m` around the prior, and the heading prior when given). Its estimate `T_map_query` maps
  the query BEV frame to the window frame: `t` is the camera's ground position (plus the window's
  SW corner = CRS easting/northing), the angle is the yaw (radians counter-clockwise from east);
- headings in results are degrees clockwise from the map CRS's grid north (as `heading_deg` of a
  `CaptureSet`); `heading_true_deg` is the same from true north (EXIF `GPSImgDirection` is read as
  true north, or magnetic north taken as true, and turned into grid north).

Uncertainty: the voting's pose posterior `prob_volume` P(angle_r, camera cell) over the window
(restricted to the prior) is marginalised over the angle; its covariance (2x2, m^2, east/north)
around its mean is `covariance_m2`, the 1-sigma error ellipse its eigen-decomposition, and
`uncertainty_m` the ellipse's semi-major axis (sqrt of the largest eigenvalue). `heading_std_deg`
is the circular standard deviation sqrt(-2 ln |E[exp(i angle)]|) of the angle marginal, capped at
180 (a uniform heading). `confidence` is the posterior mass within `CONFIDENT_RADIUS_M` of the
estimate; `confident` is confidence >= `CONFIDENT_MASS`. The posterior is the model's own (a
softmax of its voting scores at `posterior_cell_m` resolution, which also floors its spread at
~0.5 m): only as calibrated as the model.

Sequences (beyond SNAP, as OrienterNet): frames with known motion relative to the first frame
(odometry), `relative_poses[k] = (forward_m, left_m, dyaw_deg)` of frame k in frame 0's BEV frame.
Every frame's query BEV cells, moved by that motion into frame 0's BEV frame, make one larger
query, so the localizer scores a pose of frame 0 by the sum of the frames' log-likelihood ratios at
the poses the motion implies: the joint log-posterior of a rigid sequence (OrienterNet multiplies
per-frame probability volumes; the sum of log-ratio scores is the same up to normalisation). Its
voting posterior is the joint one, and the refinement is joint, at full resolution.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..storage import json_safe

if TYPE_CHECKING:  # pragma: no cover
    from .store import NeuralMap

__all__ = [
    "QueryError", "QueryCamera", "Candidate", "LocalizationResult", "SemanticsAt", "ExifInfo",
    "parse_camera", "read_exif", "localize", "localize_bev", "localize_many", "localize_sequence",
    "relative_poses_from", "semantics_at", "classes_in", "semantic_iou", "query_bev", "read_window", "map_model",
]

DEFAULT_RADIUS_M = 30.0
MAX_RADIUS_M = 500.0
DEFAULT_HEADING_RANGE_DEG = 30.0  # ± around a heading prior (a phone compass is often 10-30 deg off)
NUM_ROTATIONS = 64  # voting rotations (5.6 deg); the estimate is refined far below that
POSTERIOR_CELL_M = 1.0  # resolution of the pose posterior (voting's coarse level): 1.5 m is 30 % cheaper, but
# finds a third of the poses (aerial-RGB matcher on the twin's queries: 8 % vs 25 % at (3 m, 3 deg))
MAX_COARSE_CELLS = 128  # ... coarser on large windows, to bound time and memory
TOP_K = 4  # candidates refined and returned (8: +8 % CPU, same poses)
# "voting" (exhaustive; its posterior gives the uncertainty) or "ransac" (SNAP's sampler and wide
# search for the estimate, the voting posterior kept for the uncertainty: ~2x the time; on
# bench_query's 70 twin photos, run-10 weights, 11.4 % vs 2.9 % at (3 m, 3 deg); docs/results.md).
METHODS = ("voting", "ransac")
CONFIDENT_RADIUS_M = 3.0
CONFIDENT_MASS = 0.5
MIN_VALID_FRACTION = 0.05  # "no map here" below this share of valid cells in the searched disc
NO_DATA = "no_data"


class QueryError(ValueError):
    """Bad query input (image, camera, prior, place): the message is one line saying what to fix."""


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------
@dataclass
class Candidate:
    """One of the localizer's best refined poses (best first)."""

    lat: float
    lon: float
    easting: float
    northing: float
    heading_deg: float
    score: float


@dataclass
class LocalizationResult:
    """Where a photo was taken. Positions: WGS84 lat/lon and easting/northing in the map's `crs`;
    headings in degrees clockwise from grid north (`heading_true_deg`: from true north).

    `covariance_m2` (2x2, east/north, m^2) of the pose posterior's position marginal;
    `ellipse_major_m` / `ellipse_minor_m` its 1-sigma semi-axes, `ellipse_azimuth_deg` the major
    axis' direction clockwise from grid north; `uncertainty_m` = `ellipse_major_m`.
    `heading_std_deg`: circular std of the heading marginal. `confidence`: posterior mass within
    `CONFIDENT_RADIUS_M` of the estimate; `confident` = confidence >= `CONFIDENT_MASS`, else
    `message` says the result is unreliable."""

    lat: float
    lon: float
    easting: float
    northing: float
    heading_deg: float
    heading_true_deg: float
    score: float
    covariance_m2: np.ndarray
    uncertainty_m: float
    ellipse_major_m: float
    ellipse_minor_m: float
    ellipse_azimuth_deg: float
    heading_std_deg: float
    confidence: float
    confident: bool
    message: str
    candidates: list[Candidate]
    crs: str
    prior_lat: float
    prior_lon: float
    radius_m: float
    prior_source: str  # "argument", "exif" or "table"
    heading_prior_deg: float | None = None
    prior_sigma_m: float | None = None  # the Gaussian position prior's std (GPS accuracy), if one was used
    prob_tif: str | None = None
    time_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (floats, lists; NaN -> None)."""
        d = asdict(self)
        d["covariance_m2"] = np.asarray(self.covariance_m2, float).tolist()
        return json_safe(d)


@dataclass(frozen=True)
class SemanticsAt:
    """The map's semantics at one place: `class_name` (None where the map has no data there) and
    `probabilities` {class name: p} (empty without data)."""

    class_name: str | None
    probabilities: dict[str, float]
    lat: float
    lon: float
    easting: float
    northing: float



# ------------------------------------------------------------------------------------------------
# Inputs: camera, image, EXIF, prior
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QueryCamera:
    """A query camera: intrinsics `[w, h, fx, fy, cx, cy, k1, k2]` (pixels, pixel centres at
    half-integers), its model ("pinhole" | "fisheye"), and its gravity-known extrinsics: height above
    the ground (None: the model's `scene.query_camera_height_m`), pitch (up +) and roll (clockwise
    seen from behind), degrees, as the `CaptureSet` columns."""

    data: tuple[float, ...]
    model: str = "pinhole"
    height_m: float | None = None
    pitch_deg: float = 0.0
    roll_deg: float = 0.0

    @property
    def size(self) -> tuple[int, int]:
        return int(round(self.data[0])), int(round(self.data[1]))

    def scaled(self, s: float) -> "QueryCamera":
        w, h, fx, fy, cx, cy, k1, k2 = self.data
        data = (round(w * s), round(h * s), fx * s, fy * s, cx * s, cy * s, k1, k2)
        return QueryCamera(tuple(float(v) for v in data), self.model, self.height_m, self.pitch_deg, self.roll_deg)


def _check_intrinsics(data: Sequence[float], model: str, what: str) -> None:
    from .captures import CAMERA_MODELS

    if model not in CAMERA_MODELS:
        raise QueryError(f"{what}: unknown camera model {model!r}; expected one of {CAMERA_MODELS}")
    w, h, fx, fy, cx, cy, k1, k2 = data
    if not all(math.isfinite(v) for v in data):
        raise QueryError(f"{what}: intrinsics must be finite numbers, got {list(data)}")
    if w < 8 or h < 8 or w != round(w) or h != round(h):
        raise QueryError(f"{what}: image size must be whole pixels >= 8, got {w} x {h}")
    if fx <= 0 or fy <= 0:
        raise QueryError(f"{what}: focal lengths must be > 0 pixels, got fx={fx}, fy={fy}")
    if not 0.5 <= fx / fy <= 2.0:
        raise QueryError(f"{what}: fx/fy = {fx / fy:.2f} is implausible (pixels are nearly square)")
    if not (0 < cx < w and 0 < cy < h):
        raise QueryError(f"{what}: principal point ({cx}, {cy}) lies outside the {w:g} x {h:g} image")
    hfov = math.degrees(2 * math.atan(w / (2 * fx)))
    if model == "pinhole" and not 5.0 <= hfov <= 170.0:
        raise QueryError(f"{what}: fx={fx:g} px for a {w:g} px wide image is a {hfov:.1f} deg field of view "
                         "(expected 5-170 deg for a pinhole camera); is fx in pixels?")
    if abs(k1) > 10 or abs(k2) > 10:
        raise QueryError(f"{what}: distortion k1={k1}, k2={k2} is implausible")


def parse_camera(camera: Any, what: str = "camera") -> QueryCamera:
    """A `QueryCamera` from: a `QueryCamera`; a path to a JSON file (cam.json) or a dict with the
    `CaptureSet` intrinsics columns (`width`, `height`, `fx` or `hfov_deg`, optional `fy`, `cx`, `cy`,
    `k1`, `k2`, `camera_model`; their aliases as in `CaptureSet.from_table`) and optionally the
    camera's height above the ground (`z` / `height_m`), `pitch_deg`, `roll_deg`; a `CaptureSet`
    row (pandas Series); an 8-vector `[w, h, fx, fy, cx, cy, k1, k2]` (`CaptureSet.cameras()`); a
    `neuralmaps.geometry.Camera`. Raises QueryError for missing or nonsense intrinsics."""
    from .captures import _ALIASES

    if isinstance(camera, QueryCamera):
        _check_intrinsics(camera.data, camera.model, what)
        return camera
    if camera is None:
        raise QueryError(f"{what}: no camera given (pass camera=cam.json / a dict of width, height, fx, ...), "
                         "and the photo's EXIF has no 35 mm focal length")
    if isinstance(camera, (str, os.PathLike)):
        p = Path(camera)
        if not p.is_file():
            raise QueryError(f"{what}: camera file not found: {p}")
        try:
            camera = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise QueryError(f"{what}: {p} is not a readable JSON camera ({type(e).__name__}: {e})") from None
        what = f"{what} {p.name}"
    if hasattr(camera, "to_tensor") and hasattr(camera, "project"):  # geometry.Camera
        camera = [float(v) for v in camera.to_tensor().reshape(-1)[:8]]
    if hasattr(camera, "keys"):  # dict, pandas Series
        d = {_ALIASES.get(str(k).strip().lower(), str(k).strip().lower()): camera[k] for k in camera.keys()}

        def num(key: str, default: Any = None) -> float:
            v = d.get(key, default)
            if v is None:
                raise QueryError(f"{what}: missing {key!r} (camera keys: {sorted(d)})")
            try:
                return float(v)
            except (TypeError, ValueError):
                raise QueryError(f"{what}: {key!r} must be a number, got {v!r}") from None

        w, h = num("width"), num("height")
        if "fx" in d and d["fx"] is not None:
            fx = num("fx")
        elif "hfov_deg" in d:
            hfov = num("hfov_deg")
            if not 0 < hfov < 180:
                raise QueryError(f"{what}: hfov_deg must be in (0, 180), got {hfov}")
            fx = 0.5 * w / math.tan(math.radians(hfov) / 2)
        else:
            raise QueryError(f"{what}: missing 'fx' (or 'hfov_deg'); camera keys: {sorted(d)}")
        data = (w, h, fx, num("fy", fx), num("cx", w / 2), num("cy", h / 2), num("k1", 0.0), num("k2", 0.0))
        model = str(d.get("camera_model", "pinhole")).lower()
        z = d.get("z")
        height = None if z is None or (isinstance(z, float) and math.isnan(z)) else num("z")
        if height is not None and not 0.0 < height < 100.0:
            raise QueryError(f"{what}: camera height above ground must be in (0, 100) m, got {height}")
        out = QueryCamera(data, model, height, num("pitch_deg", 0.0), num("roll_deg", 0.0))
    else:
        try:
            v = np.asarray(camera, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise QueryError(f"{what}: expected a dict, a JSON path or [w, h, fx, fy, cx, cy, k1, k2], got "
                             f"{type(camera).__name__}") from None
        if v.shape != (8,):
            raise QueryError(f"{what}: expected 8 intrinsics [w, h, fx, fy, cx, cy, k1, k2], got {v.size} values")
        out = QueryCamera(tuple(float(x) for x in v))
    _check_intrinsics(out.data, out.model, what)
    if not (abs(out.pitch_deg) < 80 and abs(out.roll_deg) < 80):
        raise QueryError(f"{what}: pitch/roll must be within ±80 deg, got {out.pitch_deg}, {out.roll_deg}")
    return out


@dataclass(frozen=True)
class ExifInfo:
    """What a photo's EXIF says: GPS position (degrees), image direction (degrees clockwise from
    true north, or magnetic when `heading_ref` is "M"), 35 mm equivalent focal length (mm)."""

    lat: float | None = None
    lon: float | None = None
    heading_deg: float | None = None
    heading_ref: str | None = None
    focal_35mm: float | None = None
    accuracy_m: float | None = None  # GPSHPositioningError: the fix's horizontal error (m)


def _dms(v: Any) -> float:
    d = [float(x) for x in v] if isinstance(v, (tuple, list)) else [float(v)]
    d += [0.0] * (3 - len(d))
    return d[0] + d[1] / 60.0 + d[2] / 3600.0


def read_exif(path: str | os.PathLike) -> ExifInfo:
    """The GPS position, GPSImgDirection, GPSHPositioningError and FocalLengthIn35mmFilm of a
    photo's EXIF (None where absent or unreadable)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            exif = im.getexif()
            gps = dict(exif.get_ifd(0x8825))
            sub = dict(exif.get_ifd(0x8769))
    except Exception:
        return ExifInfo()
    lat = lon = heading = None
    try:
        if 2 in gps and 4 in gps:
            lat = _dms(gps[2]) * (-1.0 if str(gps.get(1, "N")).upper().startswith("S") else 1.0)
            lon = _dms(gps[4]) * (-1.0 if str(gps.get(3, "E")).upper().startswith("W") else 1.0)
        if 17 in gps:
            heading = float(gps[17]) % 360.0
    except (TypeError, ValueError, ZeroDivisionError):
        lat = lon = heading = None
    f35 = sub.get(0xA405)
    try:
        f35 = float(f35) if f35 else None
    except (TypeError, ValueError):
        f35 = None
    ref = str(gps.get(16)).upper()[:1] if 16 in gps else None
    try:
        acc = float(gps[31]) if 31 in gps else None
        acc = acc if acc is not None and math.isfinite(acc) and acc > 0 else None
    except (TypeError, ValueError, ZeroDivisionError):
        acc = None
    return ExifInfo(lat, lon, heading, ref, f35, acc)


def _camera_from_exif(exif: ExifInfo, width: int, height: int) -> QueryCamera | None:
    """Pinhole intrinsics from the 35 mm equivalent focal length (36 mm across the long side)."""
    if not exif.focal_35mm:
        return None
    f = exif.focal_35mm / 36.0 * max(width, height)
    return QueryCamera((float(width), float(height), f, f, width / 2, height / 2, 0.0, 0.0))


def _load_image(image: Any) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] from a path, a (H, W, 3) / (H, W) uint8 or float array in
    [0, 1], or a (3, H, W) torch tensor."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        p = Path(image)
        if not p.is_file():
            raise QueryError(f"image not found: {p}")
        try:
            with Image.open(p) as im:
                a = np.asarray(im.convert("RGB"))
        except Exception as e:
            raise QueryError(f"{p}: not a readable image ({type(e).__name__}: {e})") from None
    else:
        if hasattr(image, "detach"):  # torch (3, H, W)
            image = image.detach().cpu().numpy()
            if image.ndim == 3 and image.shape[0] in (1, 3):
                image = np.moveaxis(image, 0, -1)
        a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, -1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise QueryError(f"image must be (H, W, 3) RGB, got an array of shape {a.shape}")
    a = a[..., :3]
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    a = a.astype(np.float32)
    if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
        raise QueryError("a float image must hold values in [0, 1] (or pass uint8)")
    return a


def _prepare_image(a: np.ndarray, cam: QueryCamera, image_hw: tuple[int, int]) -> tuple[np.ndarray, QueryCamera]:
    """Check the image against its camera, then shrink both (antialiased) so that the image is no
    larger than the model's training size on its limiting side (features are scale-dependent)."""
    H, W = a.shape[:2]
    w, h = cam.size
    if (W, H) != (w, h):
        raise QueryError(f"the image is {W} x {H} px but its camera says {w} x {h} px (width x height); "
                         "pass the camera of this image (or resize the image to it)")
    s = max(image_hw[0] / H, image_hw[1] / W)
    if s < 0.9:
        from PIL import Image

        cam = cam.scaled(s)
        w, h = cam.size
        im = Image.fromarray(np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8)).resize((w, h), Image.LANCZOS)
        a = np.asarray(im, dtype=np.float32) / 255.0
    return a, cam


def _grid_north_offset_deg(lon: float, lat: float, crs: Any) -> float:
    """The direction of true north at (lon, lat), degrees clockwise from the CRS's grid north
    (meridian convergence): grid heading = true heading + this."""
    from ..geo.crs import lonlat_to_crs

    x0, y0 = lonlat_to_crs(lon, lat, crs)
    x1, y1 = lonlat_to_crs(lon, lat + 1e-4, crs)
    return math.degrees(math.atan2(float(x1) - float(x0), float(y1) - float(y0)))


# ------------------------------------------------------------------------------------------------
# The model of a map
# ------------------------------------------------------------------------------------------------
_MODELS: dict[str, Any] = {}  # checkpoint key -> SNAP, per process
_SHA: dict[int, tuple[Any, str]] = {}  # id(model) -> (model, sha256)
_LOCK = threading.RLock()  # localizer knobs are set per call on a shared model


def _sha_of(model: Any) -> str:
    from .workers import model_sha256

    with _LOCK:
        hit = _SHA.get(id(model))
        if hit is None or hit[0] is not model:
            hit = (model, model_sha256(model))
            _SHA[id(model)] = hit
        return hit[1]


def map_model(nm: "NeuralMap", model: Any = None, checkpoint: Any = None):
    """The SNAP that built `nm`: `model` if given, else `checkpoint` (a path or "pretrained"), else
    the store's `checkpoint` attribute. Refused (QueryError) when its weights differ from the map's
    (`model_sha256`): query features of another model do not match the map's."""
    from .workers import load_model

    if model is None:
        ck = checkpoint if checkpoint is not None else nm.attrs.get("checkpoint", "pretrained")
        key = str(ck)
        with _LOCK:
            model = _MODELS.get(key)
            if model is None:
                if key == "<in-memory SNAP>":
                    raise QueryError(f"{nm.path}: the map was built with an in-memory model; pass model= "
                                     "(or --checkpoint) to query it")
                try:
                    model = load_model(ck).eval()
                except (FileNotFoundError, ValueError) as e:
                    raise QueryError(f"{nm.path}: cannot load the map's model {key!r} ({e}); pass model= "
                                     "(or --checkpoint)") from None
                _MODELS[key] = model
    want = nm.attrs.get("model_sha256")
    if want and _sha_of(model) != want:
        raise QueryError(f"{nm.path}: the model's weights differ from the ones that built the map "
                         f"(model_sha256 {_sha_of(model)[:12]} != {want[:12]}); query with the map's checkpoint")
    return model


@contextlib.contextmanager
def _localizer_knobs(loc: Any, **knobs: Any):
    """Set Localizer attributes for one call (restored after; serialised by a lock)."""
    with _LOCK:
        old = {k: getattr(loc, k) for k in knobs}
        try:
            for k, v in knobs.items():
                setattr(loc, k, v)
            yield loc
        finally:
            for k, v in old.items():
                setattr(loc, k, v)


# ------------------------------------------------------------------------------------------------
# Map window
# ------------------------------------------------------------------------------------------------
@dataclass
class MapWindow:
    """Matching features of a square window of the map, model-grid layout: `matching` (D, X, Y)
    float32 torch, zero where invalid; `valid` (X, Y) bool; `region` the window's north-up grid
    (on the store's lattice, possibly past its edge); `origin` (easting, northing) of its SW
    corner, so that window-frame metres p are CRS (origin + p)."""

    matching: Any
    valid: Any
    region: Any
    origin: tuple[float, float]
    cell_m: float

    def to_window(self, x: float, y: float) -> tuple[float, float]:
        return x - self.origin[0], y - self.origin[1]

    def to_crs(self, x: Any, y: Any) -> tuple[Any, Any]:
        return self.origin[0] + x, self.origin[1] + y


def read_window(nm: "NeuralMap", centre_xy: tuple[float, float], half_m: float) -> MapWindow:
    """The window of cells within `half_m` (plus the cell holding the centre) of `centre_xy` (CRS),
    read straight from the store's Zarr arrays or the matching COG (only the blocks it touches)."""
    import torch

    from ..grids import raster_to_grid

    region = nm.region
    cell = region.resolution
    r, c = region.xy_to_pixel(*centre_xy)
    r, c = int(math.floor(float(r))), int(math.floor(float(c)))
    h = int(math.ceil(half_m / cell))
    r0, r1, c0, c1 = r - h, r + h + 1, c - h, c + h + 1
    win = region.window(slice(r0, r1), slice(c0, c1))
    H, W = win.shape
    D = nm.num_matching_bands
    match = np.zeros((D, H, W), np.float32)
    valid = np.zeros((H, W), bool)
    rr0, rr1, cc0, cc1 = max(r0, 0), min(r1, region.height), max(c0, 0), min(c1, region.width)
    if rr1 > rr0 and cc1 > cc0:
        m, v = nm.read_matching(slice(rr0, rr1), slice(cc0, cc1))
        match[:, rr0 - r0:rr1 - r0, cc0 - c0:cc1 - c0] = m
        valid[rr0 - r0:rr1 - r0, cc0 - c0:cc1 - c0] = v
    xmin, ymin, _, _ = win.bounds
    return MapWindow(raster_to_grid(torch.from_numpy(match)).contiguous(),
                     raster_to_grid(torch.from_numpy(valid)).contiguous(), win, (xmin, ymin), cell)


def _query_reach_m(model: Any) -> float:
    """Farthest valid query BEV cell centre from the camera, plus a cell."""
    xy = model.query_xy[model.mapper.query_inside]
    return float(xy.norm(dim=-1).max()) + model.config.scene.cell_m


def _prior_xy(nm: "NeuralMap", prior: Sequence[float], radius_m: float) -> tuple[float, float]:
    """(lat, lon) -> map CRS (x, y). Refused when the search disc (radius_m around it) does not
    reach the map: the prior lies outside the map."""
    try:
        lat, lon = (float(v) for v in prior)
    except (TypeError, ValueError):
        raise QueryError(f"prior must be (lat, lon) in degrees, got {prior!r}") from None
    if not (math.isfinite(lat) and math.isfinite(lon) and abs(lat) <= 90 and abs(lon) <= 180):
        raise QueryError(f"prior ({lat}, {lon}) is not a WGS84 (lat, lon) in degrees")
    if not (math.isfinite(radius_m) and 0 < radius_m <= MAX_RADIUS_M):
        raise QueryError(f"radius_m must be in (0, {MAX_RADIUS_M:g}] m, got {radius_m}")
    region = nm.region
    x, y = (float(v) for v in region.lonlat_to_xy(lon, lat))
    xmin, ymin, xmax, ymax = region.bounds
    dist = math.hypot(max(xmin - x, 0.0, x - xmax), max(ymin - y, 0.0, y - ymax))
    if dist >= radius_m:
        lo0, la0, lo1, la1 = region.geometry_lonlat.bounds
        swapped = region.lonlat_to_xy(lat, lon)
        hint = " (prior is (lat, lon); swapped?)" if region.contains_xy(*swapped) else ""
        raise QueryError(f"prior ({lat:.6f}, {lon:.6f}) lies outside the map {nm.path.name}, {dist:.0f} m from its edge "
                         f"(beyond the {radius_m:g} m search radius; the map covers lat {la0:.5f}..{la1:.5f}, "
                         f"lon {lo0:.5f}..{lo1:.5f}){hint}")
    return x, y


def _check_coverage(win: MapWindow, centre: tuple[float, float], radius: float, nm: "NeuralMap") -> None:
    """'No map here' when (almost) no valid cells lie within `radius` of `centre` (window frame)."""
    from ..grids import Grid2D

    X, Y = win.valid.shape
    xy = Grid2D((X * win.cell_m, Y * win.cell_m), win.cell_m).cell_centers().numpy()
    disc = np.hypot(xy[..., 0] - centre[0], xy[..., 1] - centre[1]) <= radius
    frac = float(win.valid.numpy()[disc].mean()) if disc.any() else 0.0
    if frac < MIN_VALID_FRACTION:
        raise QueryError(f"no map here: only {100 * frac:.1f} % of the map cells within {radius:.0f} m of the prior "
                         f"hold data in {nm.path.name} (need {100 * MIN_VALID_FRACTION:.0f} %); "
                         "build the map there, or check the prior")


# ------------------------------------------------------------------------------------------------
# Query BEV
# ------------------------------------------------------------------------------------------------
def query_bev(model: Any, image: np.ndarray, cam: QueryCamera):
    """The query BEV (`FeaturePlane`: matching (1, M, Xq, Yq), valid (1, Xq, Yq)) of an image
    (H, W, 3) float in [0, 1] taken by `cam`, through `SNAP.query` with the camera's gravity-known
    pose in its BEV frame (height, pitch, roll; `models.bev.camera_in_query_bev`)."""
    import torch

    from .. import geometry
    from ..models.bev import camera_in_query_bev
    from .captures import rotation_from_hpr

    if cam.model != model.camera_model:
        raise QueryError(f"the map's model works with {model.camera_model} cameras, the query camera is {cam.model}")
    height = model.config.scene.query_camera_height_m if cam.height_m is None else cam.height_m
    T = np.eye(4)
    T[:3, :3] = rotation_from_hpr(0.0, cam.pitch_deg, cam.roll_deg)
    T[2, 3] = height
    T_bev_cam = camera_in_query_bev(geometry.Transform3D.from_matrix(torch.from_numpy(T).float())).matrix()
    dev = next(model.parameters()).device
    batch = {
        "query_image": torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0)))[None].float().to(dev),
        "query_camera": torch.tensor([cam.data], dtype=torch.float32, device=dev),
        "query_T_bev_cam": T_bev_cam[None].to(dev),
    }
    with torch.no_grad():
        return model.query(batch)


def _prepared_query(model: Any, image: Any, camera: Any, exif: ExifInfo | None) -> tuple[np.ndarray, QueryCamera]:
    a = _load_image(image)
    if camera is None and exif is not None:
        cam = _camera_from_exif(exif, a.shape[1], a.shape[0])
        if cam is not None:
            camera = cam
    cam = parse_camera(camera)
    return _prepare_image(a, cam, tuple(model.config.scene.image_hw))


# ------------------------------------------------------------------------------------------------
# Localization
# ------------------------------------------------------------------------------------------------
def _coarse_stride(win: MapWindow, posterior_cell_m: float) -> int:
    n = max(win.valid.shape)
    return max(1, round(posterior_cell_m / win.cell_m), math.ceil(n / MAX_COARSE_CELLS))


def _run_localizer(model: Any, win: MapWindow, bev: Any, prior_xy: tuple[float, float], radius: float,
                   yaw: float | None, yaw_range: float | None, posterior_cell_m: float, seed: int = 0,
                   query_xy: Any = None, points: int = 1, sigma_m: float | None = None, method: str = "voting"):
    """The Localizer (voting) on the window with a PosePrior; the query points are drawn with a
    generator seeded by `seed` (results are reproducible). `query_xy`: the query cells' metres
    (default the model's grid); `points`: multiplies the query points scored (sequences);
    `sigma_m`: std of a Gaussian position prior around `prior_xy` (None: uniform in the disc).
    `method="ransac"`: the estimate and candidates from RANSAC, the posterior still from voting."""
    import dataclasses

    import torch

    from ..models.localizer import PosePrior

    dev = bev.features.device
    prior = PosePrior(xy=torch.tensor([prior_xy], dtype=torch.float32, device=dev), radius_m=float(radius),
                      yaw=None if yaw is None else torch.tensor([yaw], dtype=torch.float32, device=dev),
                      yaw_range=yaw_range, sigma_m=sigma_m)
    s = _coarse_stride(win, posterior_cell_m)
    loc = model.localizer
    knobs = {"coarse_cells": math.ceil(max(win.valid.shape) / s), "num_candidates": min(loc.num_candidates, TOP_K)}
    if points > 1:
        knobs["num_coarse_points"] = loc.num_coarse_points * points
        if loc.num_points is not None:
            knobs["num_points"] = loc.num_points * points
    g = torch.Generator(device=dev).manual_seed(seed)
    with _localizer_knobs(loc, **knobs), torch.no_grad():
        try:
            args = (win.matching[None].to(dev), win.valid[None].to(dev), bev.features.float(), bev.valid,
                    model.query_xy if query_xy is None else query_xy, win.cell_m)
            out = loc(*args, mode="voting", prior=prior, num_rotations=NUM_ROTATIONS, generator=g)
            if method == "ransac":
                est = loc(*args, mode="ransac", prior=prior, generator=g)
                out = dataclasses.replace(est, prob_volume=out.prob_volume)
            return out
        except ValueError as e:
            if "no valid query cell" in str(e):
                raise QueryError("the photo sees no ground in front of the camera (no valid query BEV cell); "
                                 "check the camera's pitch and height") from None
            if "sigma_m needs" in str(e):
                raise QueryError(f"method='ransac' with a GPS accuracy (prior_sigma_m) needs a model with log-ratio, "
                                 f"summed point scores (cpu-tiny); this model's are {loc.point_scores!r}, "
                                 f"{loc.score_reduction!r}: use method='voting'") from None
            raise


def _posterior_stats(prob: np.ndarray, cell: float, est_xy: tuple[float, float]) -> dict[str, Any]:
    """`_marginal_stats` of a pose posterior prob (R, X, Y) (window frame)."""
    return _marginal_stats(prob.sum(0), prob.sum((1, 2)), cell, est_xy)


def _marginal_stats(p_xy: np.ndarray, p_r: np.ndarray, cell: float, est_xy: tuple[float, float]) -> dict[str, Any]:
    """Covariance (around the mean), 1-sigma ellipse and mass within CONFIDENT_RADIUS_M of the
    estimate of a position marginal p_xy (X, Y) over the window's cells; circular std of the angle
    marginal p_r (R,) over angles 2πr/R."""
    p = np.asarray(p_xy, np.float64)
    tot = p.sum()
    p = p / tot if tot > 0 else np.full_like(p, 1.0 / p.size)
    X, Y = p.shape
    xs, ys = (np.arange(X) + 0.5) * cell, (np.arange(Y) + 0.5) * cell
    px, py = p.sum(1), p.sum(0)
    mx, my = float(px @ xs), float(py @ ys)
    dx, dy = xs - mx, ys - my
    cxy = float(dx @ p @ dy)
    cov = np.array([[float(px @ dx**2), cxy], [cxy, float(py @ dy**2)]])
    lam, vec = np.linalg.eigh(cov)
    lam = np.clip(lam, 0.0, None)
    major = vec[:, 1]
    azimuth = math.degrees(math.atan2(major[0], major[1])) % 180.0
    near = np.hypot(xs[:, None] - est_xy[0], ys[None, :] - est_xy[1]) <= CONFIDENT_RADIUS_M
    pr = np.asarray(p_r, np.float64)
    R = len(pr)
    pr = pr / pr.sum() if pr.sum() > 0 else np.full(R, 1.0 / R)
    ang = np.arange(R) * (2 * math.pi / R)
    rbar = float(np.hypot(pr @ np.cos(ang), pr @ np.sin(ang)))
    hstd = min(180.0, math.degrees(math.sqrt(max(0.0, -2.0 * math.log(max(rbar, 1e-12))))))  # inf when uniform
    return {"cov": cov, "major": math.sqrt(lam[1]), "minor": math.sqrt(lam[0]), "azimuth": azimuth,
            "heading_std": hstd, "mass": float(p[near].sum()), "p_xy": p}


def _result(nm: "NeuralMap", win: MapWindow, out: Any, stats: dict[str, Any], prior: tuple[float, float],
            radius: float, source: str, heading_prior: float | None, t0: float, k: int = 0,
            sigma_m: float | None = None) -> LocalizationResult:
    from ..geo.crs import yaw_to_heading

    region = nm.region
    crs = region.crs_string
    tk = out.topk.t[k].detach().cpu().double().numpy()
    ak = out.topk.angle[k].detach().cpu().double().numpy()
    sk = out.topk_scores[k].detach().cpu().double().numpy()
    e, n = win.to_crs(tk[:, 0], tk[:, 1])
    lon, lat = region.xy_to_lonlat(e, n)
    lon, lat = np.atleast_1d(lon), np.atleast_1d(lat)
    heading = np.atleast_1d(yaw_to_heading(ak))
    cands = [Candidate(float(lat[i]), float(lon[i]), float(e[i]), float(n[i]), float(heading[i]), float(sk[i]))
             for i in range(len(sk)) if sk[i] > -1e29]
    best = cands[0]
    conv = _grid_north_offset_deg(best.lon, best.lat, region.crs)
    confident = stats["mass"] >= CONFIDENT_MASS
    msg = "ok" if confident else (
        f"low confidence: only {100 * stats['mass']:.0f} % of the pose posterior lies within {CONFIDENT_RADIUS_M:g} m "
        f"of the estimate (1-sigma {stats['major']:.1f} m, heading ±{stats['heading_std']:.0f} deg); "
        "treat the position as unreliable")
    return LocalizationResult(
        lat=best.lat, lon=best.lon, easting=best.easting, northing=best.northing, heading_deg=best.heading_deg,
        heading_true_deg=(best.heading_deg - conv) % 360.0, score=best.score, covariance_m2=stats["cov"],
        uncertainty_m=stats["major"], ellipse_major_m=stats["major"], ellipse_minor_m=stats["minor"],
        ellipse_azimuth_deg=stats["azimuth"], heading_std_deg=stats["heading_std"], confidence=stats["mass"],
        confident=bool(confident), message=msg, candidates=cands, crs=crs, prior_lat=float(prior[0]),
        prior_lon=float(prior[1]), radius_m=float(radius), prior_source=source, heading_prior_deg=heading_prior,
        prior_sigma_m=sigma_m, time_s=time.perf_counter() - t0,
    )


def _write_prob_tif(win: MapWindow, p_xy: np.ndarray, path: str | os.PathLike) -> str:
    """The position marginal (X, Y) as a north-up float32 GeoTIFF over the window (sums to 1)."""
    from ..geo import write_geotiff
    from ..grids import grid_to_raster

    da = win.region.to_xarray(np.ascontiguousarray(grid_to_raster(p_xy.astype(np.float32))))
    da.name = "pose_probability"
    return str(write_geotiff(da, path, descriptions=["pose_probability"]))


def _heading_prior(nm: "NeuralMap", heading_prior: Any, exif: ExifInfo | None, prior: tuple[float, float]
                   ) -> tuple[float | None, str | None]:
    """Grid-north heading prior in degrees: `heading_prior` (grid north), else EXIF's true heading."""
    if heading_prior is not None:
        try:
            h = float(heading_prior)
        except (TypeError, ValueError):
            raise QueryError(f"heading_prior must be degrees clockwise from north, got {heading_prior!r}") from None
        if not math.isfinite(h):
            raise QueryError(f"heading_prior must be finite, got {h}")
        return h % 360.0, "argument"
    if exif is not None and exif.heading_deg is not None:
        return (exif.heading_deg + _grid_north_offset_deg(prior[1], prior[0], nm.region.crs)) % 360.0, "exif"
    return None, None


def _exif_of(image: Any) -> ExifInfo | None:
    """The EXIF of an image path (QueryError when the file is missing); None for arrays."""
    if not isinstance(image, (str, os.PathLike)):
        return None
    if not Path(image).is_file():
        raise QueryError(f"image not found: {image}")
    return read_exif(image)


def _resolve_prior(prior: Any, exif: ExifInfo | None) -> tuple[tuple[float, float], str]:
    if prior is not None:
        return tuple(prior), "argument"  # type: ignore[return-value]
    if exif is not None and exif.lat is not None:
        return (exif.lat, exif.lon), "exif"
    raise QueryError("no prior: pass prior=(lat, lon) (--prior LAT,LON), or a photo whose EXIF has a GPS position")


def _prior_sigma(sigma_m: Any, exif: ExifInfo | None, source: str) -> float | None:
    """The Gaussian position prior's std (m): `sigma_m` if given, else the EXIF fix's
    GPSHPositioningError when the prior is that fix; None (uniform in the disc) otherwise."""
    if sigma_m is None:
        return exif.accuracy_m if source == "exif" and exif is not None else None
    try:
        v = float(sigma_m)
    except (TypeError, ValueError):
        raise QueryError(f"prior_sigma_m must be metres (the GPS fix's accuracy), got {sigma_m!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise QueryError(f"prior_sigma_m must be a positive number of metres, got {sigma_m!r}")
    return v


def localize_bev(nm: "NeuralMap", model: Any, bev: Any, prior: Sequence[float], radius_m: float = DEFAULT_RADIUS_M,
                 heading_prior: float | None = None, *, heading_range_deg: float = DEFAULT_HEADING_RANGE_DEG,
                 prob_tif: str | os.PathLike | None = None, posterior_cell_m: float = POSTERIOR_CELL_M,
                 prior_source: str = "argument", seed: int = 0, t0: float | None = None,
                 prior_sigma_m: float | None = None, method: str = "voting") -> LocalizationResult:
    """Localize a query BEV (`query_bev`, or any `FeaturePlane` of the model's query grid) in the map
    around `prior` = (lat, lon) within `radius_m`; `heading_prior` (degrees clockwise from grid north)
    limits the heading to ± `heading_range_deg`; `prior_sigma_m` weighs positions by a Gaussian of
    that std around the prior (a GPS fix's accuracy); `method`: one of `METHODS`. The geometric
    core of `localize`."""
    from ..geo.crs import heading_to_yaw

    t0 = time.perf_counter() if t0 is None else t0
    _check_method(method)
    px, py = _prior_xy(nm, prior, radius_m)
    win = read_window(nm, (px, py), radius_m + _query_reach_m(model))
    centre = win.to_window(px, py)
    _check_coverage(win, centre, radius_m + _query_reach_m(model), nm)
    yaw = None if heading_prior is None else heading_to_yaw(float(heading_prior))
    yr = None if heading_prior is None else math.radians(heading_range_deg)
    sigma = _prior_sigma(prior_sigma_m, None, prior_source)
    out = _run_localizer(model, win, bev, centre, radius_m, yaw, yr, posterior_cell_m, seed, sigma_m=sigma,
                         method=method)
    prob = out.prob_volume[0].detach().cpu().double().numpy()
    est = out.T_map_query.t[0].detach().cpu().double().numpy()
    stats = _posterior_stats(prob, win.cell_m, (float(est[0]), float(est[1])))
    res = _result(nm, win, out, stats, (float(prior[0]), float(prior[1])), radius_m, prior_source, heading_prior, t0,
                  sigma_m=sigma)
    if prob_tif is not None:
        res.prob_tif = _write_prob_tif(win, stats["p_xy"], prob_tif)
    return res


def localize(nm: "NeuralMap", image: Any, camera: Any = None, prior: Sequence[float] | None = None,
             radius_m: float = DEFAULT_RADIUS_M, heading_prior: float | None = None, *,
             heading_range_deg: float = DEFAULT_HEADING_RANGE_DEG, prob_tif: str | os.PathLike | None = None,
             model: Any = None, checkpoint: Any = None, posterior_cell_m: float = POSTERIOR_CELL_M,
             seed: int = 0, prior_sigma_m: float | None = None, method: str = "voting") -> LocalizationResult:
    """Where was this photo taken? See `NeuralMap.localize`."""
    t0 = time.perf_counter()
    _check_method(method)
    exif = _exif_of(image)
    prior, source = _resolve_prior(prior, exif)
    model = map_model(nm, model, checkpoint)
    a, cam = _prepared_query(model, image, camera, exif)
    px, py = _prior_xy(nm, prior, radius_m)  # fail fast, before the network runs
    heading, _ = _heading_prior(nm, heading_prior, exif, prior)
    sigma = _prior_sigma(prior_sigma_m, exif, source)
    bev = query_bev(model, a, cam)
    return localize_bev(nm, model, bev, prior, radius_m, heading, heading_range_deg=heading_range_deg,
                        prob_tif=prob_tif, posterior_cell_m=posterior_cell_m, prior_source=source, seed=seed, t0=t0,
                        prior_sigma_m=sigma, method=method)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise QueryError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")


# ------------------------------------------------------------------------------------------------
# Sequences
# ------------------------------------------------------------------------------------------------
def relative_poses_from(x: Sequence[float], y: Sequence[float], heading_deg: Sequence[float]) -> np.ndarray:
    """Motion of each frame relative to the first, `(forward_m, left_m, dyaw_deg)` in frame 0's BEV
    frame (x along frame 0's heading, y to its left; dyaw counter-clockwise, a left turn is
    positive), from absolute poses in any metric frame with x east, y north and headings clockwise
    from north (odometry, or a capture table's `x`, `y`, `heading_deg`). Returns (N, 3)."""
    from ..geo.crs import heading_to_yaw

    x, y, h = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (x, y, heading_deg))
    if not (len(x) == len(y) == len(h)) or len(x) == 0:
        raise QueryError(f"x, y, heading_deg must have one equal, non-zero length, got {len(x)}, {len(y)}, {len(h)}")
    yaw = heading_to_yaw(h)
    c, s = math.cos(yaw[0]), math.sin(yaw[0])
    dx, dy = x - x[0], y - y[0]
    dyaw = np.degrees(np.angle(np.exp(1j * (yaw - yaw[0]))))
    return np.stack([c * dx + s * dy, -s * dx + c * dy, dyaw], -1)


def _normalised_motion(relative_poses: Any, n: int) -> np.ndarray:
    """(N, 3) (forward, left, dyaw_deg) relative to frame 0 (re-expressed if frame 0 is not at 0)."""
    try:
        m = np.asarray(relative_poses, dtype=np.float64).reshape(n, 3)
    except (TypeError, ValueError):
        raise QueryError(f"relative_poses must be {n} rows of (forward_m, left_m, dyaw_deg), got "
                         f"{np.shape(relative_poses) if relative_poses is not None else None}") from None
    if not np.isfinite(m).all():
        raise QueryError("relative_poses must be finite")
    a = np.radians(m[:, 2])
    c, s = math.cos(a[0]), math.sin(a[0])
    d = m[:, :2] - m[0, :2]
    out = np.stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1], np.degrees(np.angle(np.exp(1j * (a - a[0]))))], -1)
    return out


def _shift_planes(vol: Any, d: Any, fill: float) -> Any:
    """out[r, i, j] = vol[r, i + d[r, 0], j + d[r, 1]] (`fill` off the grid). vol (R, X, Y), d (R, 2) int."""
    import torch.nn.functional as F

    R, X, Y = vol.shape
    P = int(d.abs().max()) if d.numel() else 0
    if P == 0:
        return vol.clone()
    vp = F.pad(vol[None], (P, P, P, P), value=fill)[0]
    out = vol.new_empty(vol.shape)
    for r in range(R):
        i, j = int(d[r, 0]) + P, int(d[r, 1]) + P
        out[r] = vp[r, i:i + X, j:j + Y]
    return out


def _frame_offsets(motion_k: np.ndarray, R: int, cell: float, sign: float = 1.0):
    """Rotation shift (fractional index) and per-rotation cell offsets (R, 2) (times `sign`) of frame k
    relative to frame 0 whose angle is 2πr/R."""
    import torch

    ang = np.arange(R) * (2 * math.pi / R)
    fx, fy = motion_k[0], motion_k[1]
    dx = np.cos(ang) * fx - np.sin(ang) * fy
    dy = np.sin(ang) * fx + np.cos(ang) * fy
    d = torch.from_numpy(np.round(sign * np.stack([dx, dy], -1) / cell).astype(np.int64))
    return math.radians(motion_k[2]) * R / (2 * math.pi), d


def _rotate_index(vol: Any, delta: float) -> Any:
    """out[r] = vol at fractional angle index r + delta (periodic, linear)."""
    import torch

    a = math.floor(delta)
    f = delta - a
    return (1 - f) * torch.roll(vol, -a, 0) + f * torch.roll(vol, -(a + 1), 0)


def _compose(angle: Any, t: Any, motion: np.ndarray) -> tuple[Any, Any]:
    """Poses (angle (...,), t (..., 2)) composed with the motion (forward, left, dyaw_deg)."""
    import torch

    c, s = torch.cos(angle), torch.sin(angle)
    fx, fy = float(motion[0]), float(motion[1])
    t2 = torch.stack([t[..., 0] + c * fx - s * fy, t[..., 1] + s * fx + c * fy], -1)
    return angle + math.radians(float(motion[2])), t2


def localize_sequence(nm: "NeuralMap", images: Sequence[Any], cameras: Any, relative_poses: Any,
                      prior: Sequence[float] | None = None, radius_m: float = DEFAULT_RADIUS_M,
                      heading_prior: float | None = None, *, heading_range_deg: float = DEFAULT_HEADING_RANGE_DEG,
                      model: Any = None, checkpoint: Any = None, posterior_cell_m: float = POSTERIOR_CELL_M,
                      max_points_factor: int = 4, seed: int = 0,
                      prior_sigma_m: float | None = None) -> list[LocalizationResult]:
    """Localize a sequence of photos jointly. See `NeuralMap.localize_sequence`.

    The frames' query BEVs, moved by their known motion into the first frame's BEV frame, form one
    larger query: the localizer's score of a pose of frame 0 is then the sum over frames of their
    scores (log-likelihood ratios) at the poses the motion implies, i.e. the joint log-posterior
    of a rigid sequence; its voting posterior is the joint one, its refinement joint at full
    resolution. The localizer scores min(N, `max_points_factor`) times its usual query points."""
    import torch

    from ..geo.crs import heading_to_yaw
    from ..geometry import Transform2D
    from ..models.bev import FeaturePlane

    t0 = time.perf_counter()
    n = len(images)
    if n == 0:
        raise QueryError("localize_sequence needs at least one image")
    cams = list(cameras) if isinstance(cameras, (list, tuple)) else [cameras] * n
    if len(cams) != n:
        raise QueryError(f"{n} images but {len(cams)} cameras (give one camera, or one per image)")
    if relative_poses is None:
        raise QueryError("localize_sequence needs relative_poses (the frames' motion, e.g. from odometry: "
                         "relative_poses_from(x, y, heading_deg))")
    motion = _normalised_motion(relative_poses, n)
    exif = _exif_of(images[0])
    for im in images[1:]:
        _exif_of(im)  # fail fast on a missing file
    prior, source = _resolve_prior(prior, exif)
    model = map_model(nm, model, checkpoint)
    px, py = _prior_xy(nm, prior, radius_m)
    heading, _ = _heading_prior(nm, heading_prior, exif, prior)
    sigma = _prior_sigma(prior_sigma_m, exif, source)
    feats, valid, xys = [], [], []
    q = model.query_xy
    for k in range(n):
        a, cam = _prepared_query(model, images[k], cams[k], exif if k == 0 else None)
        bev = query_bev(model, a, cam)
        feats.append(bev.features), valid.append(bev.valid)
        ang, tt = _compose(torch.zeros(()), torch.zeros(2), motion[k])
        c, s = math.cos(float(ang)), math.sin(float(ang))
        xys.append(torch.stack([tt[0] + c * q[..., 0] - s * q[..., 1], tt[1] + s * q[..., 0] + c * q[..., 1]], -1))
    # One query of every frame's cells, in frame 0's BEV frame (cells stacked along the query's x axis).
    bev = FeaturePlane(torch.cat(feats, 2), torch.cat(valid, 1))
    query_xy = torch.cat(xys, 0).to(q)
    reach = float(query_xy[bev.valid[0]].norm(dim=-1).max()) + model.config.scene.cell_m if bev.valid.any() \
        else _query_reach_m(model)
    win = read_window(nm, (px, py), radius_m + reach)
    centre = win.to_window(px, py)
    _check_coverage(win, centre, radius_m + _query_reach_m(model), nm)
    yaw0 = None if heading is None else heading_to_yaw(heading)
    yr = None if heading is None else math.radians(heading_range_deg)
    out = _run_localizer(model, win, bev, centre, radius_m, yaw0, yr, posterior_cell_m, seed, query_xy=query_xy,
                         points=max(1, min(n, int(max_points_factor))), sigma_m=sigma)
    post = out.prob_volume[0].detach().cpu().float()
    R = post.shape[0]
    p_r0 = post.sum((1, 2))
    results = []
    for k in range(n):
        # Frame k: the joint estimate and candidates moved by its motion; its posterior likewise.
        ak, tk = _compose(out.topk.angle.detach().cpu().double(), out.topk.t.detach().cpu().double(), motion[k])
        out_k = SimpleNamespace(topk=Transform2D(ak, tk), topk_scores=out.topk_scores)
        delta, d = _frame_offsets(motion[k], R, win.cell_m, sign=-1.0)
        p_k = _shift_planes(post, d, 0.0).sum(0).double().numpy()
        p_rk = _rotate_index(p_r0[:, None, None], -delta)[:, 0, 0].double().numpy()
        est = tk[0, 0].numpy()
        stats = _marginal_stats(p_k, p_rk, win.cell_m, (float(est[0]), float(est[1])))
        res = _result(nm, win, out_k, stats, (float(prior[0]), float(prior[1])), radius_m, source, heading, t0,
                      sigma_m=sigma)
        res.extra = {"sequence_index": k, "sequence_length": n}
        results.append(res)
    dt = time.perf_counter() - t0
    for r in results:
        r.time_s = dt
    return results


# ------------------------------------------------------------------------------------------------
# Many queries (Dask)
# ------------------------------------------------------------------------------------------------
_CAMERA_COLUMNS = ("width", "height", "fx", "fy", "cx", "cy", "k1", "k2", "camera_model", "hfov_deg", "z",
                   "pitch_deg", "roll_deg")
_KEEP_COLUMNS = ("image", "run_id", "time", "camera_name", "vehicle")
_OPEN_MAPS: dict[str, Any] = {}  # per worker process: map path -> NeuralMap


def _read_table(table: Any, image_root: Any) -> tuple[Any, Path, Any]:
    """(DataFrame, image root, CRS of x/y or None) of a DataFrame / GeoDataFrame / .parquet / .csv."""
    import pandas as pd

    crs = None
    if isinstance(table, (str, os.PathLike)):
        p = Path(table)
        if not p.is_file():
            raise QueryError(f"query table not found: {p}")
        try:
            if p.suffix.lower() in (".parquet", ".pq"):
                try:
                    import geopandas as gpd

                    df = gpd.read_parquet(p)
                except Exception:
                    df = pd.read_parquet(p)
            else:
                df = pd.read_csv(p)
        except Exception as e:
            raise QueryError(f"{p}: not a readable Parquet/CSV table ({type(e).__name__}: {e})") from None
        root = Path(image_root) if image_root is not None else p.parent
    elif isinstance(table, pd.DataFrame):
        df = table
        root = Path(image_root) if image_root is not None else Path.cwd()
    else:
        raise QueryError(f"table must be a DataFrame or a .parquet/.csv path, got {type(table).__name__}")
    crs = getattr(df, "crs", None)
    if crs is None and "crs" in df.columns and len(df):
        crs = str(df["crs"].iloc[0])
    if "image" not in df.columns:
        raise QueryError(f"the query table needs an 'image' column (paths); columns are {sorted(map(str, df.columns))}")
    if len(df) == 0:
        raise QueryError("the query table has no rows")
    return df, root, crs


def _plan_rows(nm: "NeuralMap", df: Any, root: Path, crs: Any, radius_m: float, prior_noise_m: float, seed: int
               ) -> tuple[list[dict[str, Any]], dict[str, np.ndarray] | None]:
    """One task dict per row (image path, camera, prior (lat, lon) or None, heading prior), and the
    ground truth in the map CRS (x, y, heading) when the table has `x`, `y` with a CRS."""
    from ..geo.crs import transformer

    region = nm.region
    n = len(df)
    truth = None
    if "x" in df.columns and "y" in df.columns and crs is not None:
        x, y = df["x"].to_numpy(float), df["y"].to_numpy(float)
        import pyproj

        if pyproj.CRS.from_user_input(crs) != region.crs:
            x, y = transformer(crs, region.crs).transform(x, y)
        truth = {"x": np.asarray(x, float), "y": np.asarray(y, float),
                 "heading": df["heading_deg"].to_numpy(float) if "heading_deg" in df.columns else np.full(n, np.nan)}
    if {"prior_lat", "prior_lon"} <= set(df.columns):
        priors, source = df[["prior_lat", "prior_lon"]].to_numpy(float), "table"
    elif {"lat", "lon"} <= set(df.columns):
        priors, source = df[["lat", "lon"]].to_numpy(float), "table"
    elif truth is not None:
        # A simulated GPS fix: the truth moved by a seeded offset uniform in a disc of prior_noise_m.
        if not 0 <= prior_noise_m < radius_m:
            raise QueryError(f"prior_noise_m must be in [0, radius_m={radius_m:g}), got {prior_noise_m}")
        priors = np.empty((n, 2))
        for i in range(n):
            rng = np.random.default_rng([seed, i])
            rho, phi = prior_noise_m * math.sqrt(rng.random()), 2 * math.pi * rng.random()
            lon, lat = region.xy_to_lonlat(truth["x"][i] + rho * math.cos(phi), truth["y"][i] + rho * math.sin(phi))
            priors[i] = float(lat), float(lon)
        source = "truth+noise"
    else:
        priors, source = None, "exif"
    heads = df["heading_prior_deg"].to_numpy(float) if "heading_prior_deg" in df.columns else None
    sigmas = df["prior_sigma_m"].to_numpy(float) if "prior_sigma_m" in df.columns else None
    rows = []
    records = df.drop(columns=[c for c in ("geometry",) if c in df.columns]).to_dict("records")
    for i, rec in enumerate(records):
        img = Path(str(rec["image"]))
        cam = rec.get("camera")
        if cam is None or (isinstance(cam, float) and math.isnan(cam)):
            cam = {k: rec[k] for k in _CAMERA_COLUMNS if k in rec and not (isinstance(rec[k], float) and math.isnan(rec[k]))}
        elif isinstance(cam, str) and cam.strip().startswith("{"):
            cam = json.loads(cam)
        elif isinstance(cam, str) and not Path(cam).is_absolute():
            cam = str(root / cam)
        rows.append({
            "i": i, "image": str(img if img.is_absolute() else root / img), "camera": cam or None,
            "prior": None if priors is None else (float(priors[i, 0]), float(priors[i, 1])), "source": source,
            "heading_prior": None if heads is None or not math.isfinite(heads[i]) else float(heads[i]),
            "prior_sigma_m": None if sigmas is None or not math.isfinite(sigmas[i]) else float(sigmas[i]),
        })
    return rows, truth


def _localize_rows(map_path: str, rows: list[dict[str, Any]], model_key: str, opts: dict[str, Any]) -> list[dict]:
    """The Dask task: localize rows with the worker's model (loaded once per worker by the plugin)."""
    from .workers import worker_model
    from .store import NeuralMap

    model = worker_model(model_key)
    nm = _OPEN_MAPS.get(map_path)
    if nm is None:
        nm = _OPEN_MAPS[map_path] = NeuralMap.open(map_path)
    out = []
    for row in rows:
        t0 = time.perf_counter()
        try:
            sigma = row.get("prior_sigma_m")
            res = localize(nm, row["image"], row["camera"], row["prior"], opts["radius_m"], row["heading_prior"],
                           prior_sigma_m=opts["prior_sigma_m"] if sigma is None else sigma,
                           model=model, heading_range_deg=opts["heading_range_deg"],
                           posterior_cell_m=opts["posterior_cell_m"], seed=opts["seed"],
                           method=opts["method"])
            d = res.to_dict()
            d.pop("candidates", None)
            d.pop("extra", None)
            d["prior_source"] = row["source"] if row["prior"] is not None else d["prior_source"]
            d["error"] = None
        except (QueryError, FileNotFoundError) as e:
            d = {"error": " ".join(str(e).split()), "time_s": time.perf_counter() - t0}
        d["i"] = row["i"]
        out.append(d)
    return out


def localize_many(nm: "NeuralMap", table: Any, *, client: Any = None, workers: int = 1, scheduler: str | None = None,
                  threads_per_worker: int = 1, processes: bool | None = None, radius_m: float = DEFAULT_RADIUS_M,
                  heading_range_deg: float = DEFAULT_HEADING_RANGE_DEG, prior_noise_m: float = 10.0,
                  image_root: Any = None, model: Any = None, checkpoint: Any = None, device: str = "auto",
                  batch_size: int | None = None, posterior_cell_m: float = POSTERIOR_CELL_M, seed: int = 0,
                  progress: bool = True, prior_sigma_m: float | None = None, method: str = "voting"):
    """Localize every row of a query table as a Dask job. See `NeuralMap.localize_many`."""
    import geopandas as gpd
    import pandas as pd
    from distributed import as_completed
    from tqdm.auto import tqdm

    from .workers import ModelPlugin, checkpoint_bytes, dask_client, torch_threads_default

    _check_method(method)
    df, root, crs = _read_table(table, image_root)
    rows, truth = _plan_rows(nm, df, root, crs, radius_m, prior_noise_m, seed)
    model = map_model(nm, model, checkpoint)
    key = _sha_of(model)
    payload = checkpoint_bytes(model)
    opts = {"radius_m": float(radius_m), "heading_range_deg": float(heading_range_deg),
            "posterior_cell_m": float(posterior_cell_m), "seed": int(seed),
            "prior_sigma_m": None if prior_sigma_m is None else float(prior_sigma_m), "method": method}
    nw = max(1, int(workers))
    bs = batch_size or max(1, min(16, math.ceil(len(rows) / (4 * nw))))
    results: list[dict] = []
    with dask_client(client, nw, scheduler, threads_per_worker, processes) as c:
        threads = None if torch_threads_default(c) else 1
        c.register_plugin(ModelPlugin(key, payload, device, threads), name=f"neuralmaps-model-{key[:12]}")
        token = f"{time.time_ns():x}"
        futures = [c.submit(_localize_rows, str(nm.path.resolve()), rows[b:b + bs], key, opts,
                            key=f"neuralmaps-localize-{b}-{token}", retries=2, pure=False)
                   for b in range(0, len(rows), bs)]
        bar = tqdm(total=len(rows), desc="queries", unit="query", disable=not progress)
        for f in as_completed(futures):
            part = f.result()
            results.extend(part)
            bar.update(len(part))
        bar.close()
    results.sort(key=lambda d: d["i"])
    out = pd.DataFrame(results).drop(columns=["i"])
    for k in ("run_id", "time", "camera_name", "vehicle"):
        if k in df.columns:
            out.insert(0, k, df[k].to_numpy())
    out.insert(0, "image", [r["image"] for r in rows])
    for col in ("lat", "lon", "easting", "northing", "heading_deg", "score", "uncertainty_m", "confidence"):
        if col not in out.columns:
            out[col] = np.nan
    if truth is not None:
        out["true_easting"], out["true_northing"], out["true_heading_deg"] = truth["x"], truth["y"], truth["heading"]
        out["err_m"] = np.hypot(out["easting"].astype(float) - truth["x"], out["northing"].astype(float) - truth["y"])
        dh = (out["heading_deg"].astype(float) - truth["heading"] + 180.0) % 360.0 - 180.0
        out["err_deg"] = np.abs(dh)
    geom = gpd.points_from_xy(out["easting"].astype(float), out["northing"].astype(float))
    geom = [g if math.isfinite(e) else None for g, e in zip(geom, out["easting"].astype(float))]
    return gpd.GeoDataFrame(out, geometry=gpd.GeoSeries(geom, crs=nm.region.crs_string), crs=nm.region.crs_string)


# ------------------------------------------------------------------------------------------------
# Semantics
# ------------------------------------------------------------------------------------------------
def _semantic_arrays(nm: "NeuralMap") -> Any:
    g = nm.zarr_group
    if "semantic_class" not in g or "semantic_prob" not in g:
        raise QueryError(f"{nm.path.name}: the map has no semantic layers (built by a model without a semantic head)")
    return g


def semantics_at(nm: "NeuralMap", lat: float, lon: float) -> SemanticsAt:
    """The map's class and class probabilities at (lat, lon). See `NeuralMap.semantics_at`."""
    from .store import NODATA_CLASS

    region = nm.region
    try:
        lat, lon = float(lat), float(lon)
    except (TypeError, ValueError):
        raise QueryError(f"semantics_at needs (lat, lon) in degrees, got ({lat!r}, {lon!r})") from None
    if not (math.isfinite(lat) and math.isfinite(lon) and abs(lat) <= 90 and abs(lon) <= 180):
        raise QueryError(f"({lat}, {lon}) is not a WGS84 (lat, lon) in degrees")
    x, y = (float(v) for v in region.lonlat_to_xy(lon, lat))
    r, c, inside = region.grid.index(x, y)
    if not bool(inside):
        raise QueryError(f"({lat:.6f}, {lon:.6f}) lies outside the map {nm.path.name}")
    g = _semantic_arrays(nm)
    r, c = int(r), int(c)
    cls = int(g["semantic_class"][r, c])
    if cls == NODATA_CLASS or not bool(g["valid"][r, c]):
        return SemanticsAt(None, {}, lat, lon, x, y)
    names = nm.class_names
    prob = np.asarray(g["semantic_prob"][:, r, c], dtype=np.float64)
    probs = {names[k] if k < len(names) else f"class_{k}": float(p) for k, p in enumerate(prob)}
    return SemanticsAt(names[cls] if cls < len(names) else f"class_{cls}", probs, lat, lon, x, y)


MAX_CLASSES_IN_CELLS = 4096 * 4096


def classes_in(nm: "NeuralMap", polygon: Any, crs: Any = 4326):
    """Area per class inside a polygon, with the class polygons. See `NeuralMap.classes_in`."""
    import geopandas as gpd
    import rasterio.features
    import shapely
    from shapely.geometry import shape

    from ..geo.region import _reproject_geom
    from .store import NODATA_CLASS

    region = nm.region
    if hasattr(polygon, "union_all") and getattr(polygon, "crs", None) is not None:  # GeoSeries / GeoDataFrame
        crs, polygon = polygon.crs, polygon.union_all()
    elif isinstance(polygon, dict):
        polygon = shape(polygon.get("geometry", polygon))
    elif isinstance(polygon, str):
        try:
            polygon = shapely.from_wkt(polygon)
        except Exception:
            raise QueryError("polygon: a string must be WKT") from None
    if not hasattr(polygon, "geom_type") or polygon.geom_type not in ("Polygon", "MultiPolygon") or polygon.is_empty:
        raise QueryError(f"classes_in needs a (multi)polygon, got {getattr(polygon, 'geom_type', type(polygon).__name__)}")
    crs = f"EPSG:{crs}" if isinstance(crs, int) else crs
    try:
        poly = shapely.make_valid(_reproject_geom(polygon, crs, region.crs))
    except Exception as e:
        raise QueryError(f"polygon: cannot reproject from {crs!r} to the map's CRS ({e})") from None
    poly = shapely.union_all([p for p in shapely.get_parts(poly) if p.geom_type in ("Polygon", "MultiPolygon")])
    if poly.is_empty or poly.area <= 0:
        raise QueryError("classes_in: the polygon has no area")
    inside = poly.intersection(region.geometry)
    if inside.is_empty:
        raise QueryError(f"the polygon lies outside the map {nm.path.name}")
    win = region.crop(inside.bounds)
    if win.shape[0] * win.shape[1] > MAX_CLASSES_IN_CELLS:
        raise QueryError(f"the polygon covers {win.shape[0] * win.shape[1]} map cells (> {MAX_CLASSES_IN_CELLS}); "
                         "use the exported <map>_semantic.gpkg for areas this large")
    ys, xs = region.slices_of(win)
    g = _semantic_arrays(nm)
    cls = np.asarray(g["semantic_class"][ys, xs], dtype=np.uint8)
    valid = np.asarray(g["valid"][ys, xs], dtype=bool)
    cls = np.where(valid, cls, NODATA_CLASS).astype(np.uint8)
    pieces: dict[int, list[Any]] = {}
    for geom, val in rasterio.features.shapes(cls, transform=win.transform, connectivity=4):
        part = shape(geom).intersection(poly)
        if not part.is_empty and part.area > 0:
            pieces.setdefault(int(val), []).append(part)
    outside = poly.difference(region.geometry)
    if not outside.is_empty and outside.area > 0:
        pieces.setdefault(NODATA_CLASS, []).append(outside)
    names = nm.class_names
    total = poly.area
    recs = []
    for val, parts in pieces.items():
        area = float(sum(p.area for p in parts))
        name = NO_DATA if val == NODATA_CLASS else (names[val] if val < len(names) else f"class_{val}")
        recs.append({"class_id": val, "class_name": name, "area_m2": area, "fraction": area / total,
                     "geometry": shapely.union_all(parts)})
    recs.sort(key=lambda r: -r["area_m2"])
    return gpd.GeoDataFrame(recs, geometry="geometry", crs=region.crs_string)


def semantic_iou(nm: "NeuralMap", osm: Any) -> dict[str, Any]:
    """The map's area classes against the OSM-derived ones (`geo.rasterize.area_label`, the
    rasterizer's exclusive areas) over every valid map cell that OSM labels: per-class IoU, recall
    and accuracy, `miou` (mean over the area classes present in either), `accuracy`, `num_cells`
    (`evaluation.SemanticConfusion`'s definitions). The map's area class of a cell is the argmax of
    its area-class probabilities. Read window by window (the store's chunks). osm: a .pbf / .gpkg
    path, a dict of GeoDataFrames or `OSMLayers`."""
    from ..classes import AREA_CLASSES, class_id
    from ..evaluation import SemanticConfusion
    from ..geo import read_osm
    from ..geo.osm import OSMLayers
    from ..geo.rasterize import area_label

    region = nm.region
    g = _semantic_arrays(nm)
    names = nm.class_names
    missing = [a for a in AREA_CLASSES if a not in names]
    if missing:
        raise QueryError(f"{nm.path.name}: the map's classes lack {missing}")
    chan = [names.index(a) for a in AREA_CLASSES]
    lut = np.full(256, -1, np.int64)
    lut[[class_id(a) for a in AREA_CLASSES]] = np.arange(len(AREA_CLASSES))
    layers = osm if isinstance(osm, OSMLayers) else read_osm(osm, region, margin_m=20.0)
    n = len(AREA_CLASSES)
    cm = np.zeros((n, n), np.int64)
    H, W = region.shape
    step = int(nm.attrs.get("tile_px") or 512)
    for r0 in range(0, H, step):
        for c0 in range(0, W, step):
            r1, c1 = min(r0 + step, H), min(c0 + step, W)
            gt = lut[area_label(layers, region.window(slice(r0, r1), slice(c0, c1)))]
            prob = np.asarray(g["semantic_prob"][chan[0]:chan[-1] + 1, r0:r1, c0:c1], np.float32)[np.array(chan) - chan[0]]
            ok = np.asarray(g["valid"][r0:r1, c0:c1], bool) & (gt >= 0) & np.isfinite(prob).all(0)
            pred = prob[:, ok].argmax(0)
            cm += np.bincount(gt[ok] * n + pred, minlength=n * n).reshape(n, n)
    out = SemanticConfusion._multiclass(cm, AREA_CLASSES)
    return {"iou": out["iou"], "recall": out["recall"], "miou": out["miou"], "accuracy": out["accuracy"],
            "num_cells": out["num_cells"], "confusion": cm.tolist(), "classes": list(AREA_CLASSES)}
