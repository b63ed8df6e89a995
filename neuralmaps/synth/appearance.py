"""Per-run appearance: sun, season, exposure, white balance, sky, and dynamic occluders.

Everything is drawn deterministically from a seed (`Appearance.sample`), so the same seed gives
identical renders.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from neuralmaps.geo.crs import heading_to_yaw

from .materials import GROUND_ALBEDO, GROUND_SNOW, GROUND_VEGETATION
from .raycast import MeshRayCasting, RayScene

SEASONS = ("spring", "summer", "autumn", "winter")

# Season palettes, linear RGB: vegetation on the ground, tree foliage, snow cover of the ground (0..1).
_SEASON = {
    "spring": dict(grass=(0.26, 0.40, 0.14), foliage=(0.30, 0.46, 0.16), snow=0.0),
    "summer": dict(grass=(0.17, 0.33, 0.09), foliage=(0.12, 0.28, 0.08), snow=0.0),
    "autumn": dict(grass=(0.30, 0.30, 0.12), foliage=(0.55, 0.28, 0.07), snow=0.0),
    "winter": dict(grass=(0.80, 0.82, 0.86), foliage=(0.24, 0.21, 0.19), snow=0.55),
}
_SNOW = np.array((0.85, 0.87, 0.90), np.float32)

MIN_SUN_ELEVATION_DEG = 10.0  # runs are never at night / at grazing sun (nothing would be visible)
MAX_SUN_ELEVATION_DEG = 60.0


def season_of(time: np.datetime64 | datetime, lat_deg: float = 60.0) -> str:
    """Meteorological season of a date (southern hemisphere shifted by six months)."""
    month = _as_datetime(time).month
    if lat_deg < 0:
        month = (month + 5) % 12 + 1
    return SEASONS[((month % 12) // 3 + 3) % 4]  # Mar-May spring, Jun-Aug summer, ...


def solar_position(time: np.datetime64 | datetime, lon_deg: float, lat_deg: float) -> tuple[float, float]:
    """Sun (azimuth degrees clockwise from north, elevation degrees) at a UTC time and place.

    NOAA's low-accuracy formulas (error < 1 deg), enough for shading."""
    t = _as_datetime(time)
    doy = t.timetuple().tm_yday
    hour = t.hour + t.minute / 60 + t.second / 3600
    g = 2 * math.pi / 365 * (doy - 1 + (hour - 12) / 24)
    eqtime = 229.18 * (0.000075 + 0.001868 * math.cos(g) - 0.032077 * math.sin(g)
                       - 0.014615 * math.cos(2 * g) - 0.040849 * math.sin(2 * g))
    decl = (0.006918 - 0.399912 * math.cos(g) + 0.070257 * math.sin(g) - 0.006758 * math.cos(2 * g)
            + 0.000907 * math.sin(2 * g) - 0.002697 * math.cos(3 * g) + 0.00148 * math.sin(3 * g))
    tst = hour * 60 + eqtime + 4 * lon_deg  # true solar time, minutes
    ha = math.radians(tst / 4 - 180)
    lat = math.radians(lat_deg)
    cos_zen = math.sin(lat) * math.sin(decl) + math.cos(lat) * math.cos(decl) * math.cos(ha)
    elevation = 90 - math.degrees(math.acos(max(-1.0, min(1.0, cos_zen))))
    az = math.degrees(math.atan2(math.sin(ha), math.cos(ha) * math.sin(lat) - math.tan(decl) * math.cos(lat)))
    return (az + 180) % 360, elevation


def _as_datetime(time: np.datetime64 | datetime) -> datetime:
    if isinstance(time, datetime):
        return time if time.tzinfo is None else time.astimezone(timezone.utc).replace(tzinfo=None)
    return np.datetime64(time, "s").astype(datetime)


@dataclass(eq=False)
class Occluders(MeshRayCasting):
    """Dynamic objects of one run (parked cars, pedestrians): a small mesh in world-local metres.

    vertices (V, 3) float32, faces (F, 3) int32, colors (F, 3) float32 linear albedo. Rendered with
    label void (255); they cast shadows. The Embree scene is built on first use."""

    vertices: np.ndarray
    faces: np.ndarray
    colors: np.ndarray
    num_objects: int = 0
    _scene: RayScene | None = field(default=None, repr=False)
    _normals: np.ndarray | None = field(default=None, repr=False)
    _grid: tuple | None = field(default=None, repr=False)

    @classmethod
    def empty(cls) -> "Occluders":
        return cls(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32), np.zeros((0, 3), np.float32))

    _GRID_M = 4.0  # cell of the coarse occupancy grid used to cull rays

    def near(self, xy: np.ndarray, toward: np.ndarray | None = None, reach_m: float = 0.0) -> np.ndarray:
        """Which points (N, 2) (local metres) may see an occluder within `reach_m` metres along the
        horizontal direction `toward` (2,) (or straight below/above when reach_m is 0): (N,) bool.
        Conservative: a coarse grid of occupied cells dilated by one cell."""
        if self._grid is None:
            g = self._GRID_M
            if len(self.vertices) == 0:
                self._grid = (np.zeros((1, 1), bool), np.zeros(2))
            else:
                lo = self.vertices[:, :2].min(0) - 2 * g
                ij = ((self.vertices[:, :2] - lo) // g).astype(np.int64)
                occ = np.zeros(tuple(ij.max(0) + 3), bool)
                occ[ij[:, 0], ij[:, 1]] = True
                dil = occ.copy()  # one-cell dilation covers faces spanning up to one cell between vertices
                for di in (-1, 0, 1):
                    for dj in (-1, 0, 1):
                        dil |= np.roll(np.roll(occ, di, 0), dj, 1)
                self._grid = (dil, lo)
        grid, lo = self._grid
        steps = [0.0] if reach_m <= 0 else np.linspace(0.0, reach_m, int(np.ceil(reach_m / (self._GRID_M / 2))) + 1)
        out = np.zeros(len(xy), bool)
        for s in steps:
            q = xy if s == 0 else xy + s * np.asarray(toward)[None]
            ij = ((q - lo) // self._GRID_M).astype(np.int64)
            inside = (ij[:, 0] >= 0) & (ij[:, 0] < grid.shape[0]) & (ij[:, 1] >= 0) & (ij[:, 1] < grid.shape[1])
            out[inside] |= grid[ij[inside, 0], ij[inside, 1]]
        return out

    @property
    def z_top(self) -> float:
        """Highest vertex (metres): rays above it and going up cannot hit an occluder."""
        return float(self.vertices[:, 2].max()) if len(self.vertices) else -np.inf

    def __len__(self) -> int:
        return self.num_objects


@dataclass(frozen=True, eq=False)
class Appearance:
    """How a run looks. Angles in degrees; colours linear RGB in [0, 1].

    sun_azimuth_deg: clockwise from north; sun_elevation_deg: above the horizon.
    exposure: global gain; white_balance: per-channel gains (R, G, B); vignetting and sensor_noise
    apply to street-level views only (the noise is a fixed function of the seed and the pose).
    sky_zenith / sky_horizon: sky gradient colours; cloud_cover in [0, 1]; seed drives the
    sky's cloud noise and the texture noise phase.
    """

    seed: int = 0
    sun_azimuth_deg: float = 135.0
    sun_elevation_deg: float = 40.0
    season: str = "summer"
    exposure: float = 1.0
    white_balance: tuple[float, float, float] = (1.0, 1.0, 1.0)
    sky_zenith: tuple[float, float, float] = (0.18, 0.32, 0.62)
    sky_horizon: tuple[float, float, float] = (0.62, 0.70, 0.80)
    cloud_cover: float = 0.3
    sun_strength: float = 1.0
    ambient: float = 0.35
    vignetting: float = 0.0  # fraction of light lost in the image corners (street-level views)
    sensor_noise: float = 0.0  # std of the per-pixel noise, in 8-bit levels (street-level views)
    occluders: Occluders | None = None

    def __post_init__(self) -> None:
        if self.season not in SEASONS:
            raise ValueError(f"Appearance: season must be one of {SEASONS}, got {self.season!r}")
        if not 0 < self.sun_elevation_deg <= 90:
            raise ValueError(f"Appearance: sun_elevation_deg must be in (0, 90], got {self.sun_elevation_deg}")

    @classmethod
    def sample(
        cls, seed: int, time: np.datetime64 | datetime | None = None, lonlat: tuple[float, float] = (24.95, 60.17),
        occluders: Occluders | None = None,
    ) -> "Appearance":
        """A random appearance for a capture at `time` (UTC) at `lonlat` degrees, deterministic in `seed`.

        The sun follows the real solar position (elevation clamped to [10, 60] deg); the season
        follows the date; exposure, white balance, sky and clouds are drawn from the seed."""
        rng = np.random.default_rng([int(seed), 0xA99E])
        if time is None:
            time = np.datetime64("2024-01-01T00:00:00") + np.timedelta64(int(rng.integers(0, 366 * 86400)), "s")
        az, el = solar_position(time, *lonlat)
        el = float(np.clip(el, MIN_SUN_ELEVATION_DEG, MAX_SUN_ELEVATION_DEG))
        season = season_of(time, lonlat[1])
        cloud = float(rng.uniform(0.0, 0.8))
        haze = rng.uniform(0.0, 0.25)
        zenith = np.array([0.16, 0.30, 0.62]) * (1 - haze) + haze * np.array([0.55, 0.58, 0.62])
        zenith = zenith * rng.uniform(0.85, 1.15, 3) ** 0.5
        horizon = np.array([0.66, 0.72, 0.80]) * rng.uniform(0.9, 1.1, 3) ** 0.5
        if el < 20:  # low sun: warm horizon
            horizon = horizon * np.array([1.15, 1.0, 0.82])
        return cls(
            seed=int(seed),
            sun_azimuth_deg=float(az),
            sun_elevation_deg=el,
            season=season,
            exposure=float(rng.uniform(0.75, 1.3)),
            white_balance=tuple(float(v) for v in rng.uniform(0.9, 1.1, 3)),
            sky_zenith=tuple(float(v) for v in np.clip(zenith, 0, 1)),
            sky_horizon=tuple(float(v) for v in np.clip(horizon, 0, 1)),
            cloud_cover=cloud,
            sun_strength=float((1.0 - 0.6 * cloud) * rng.uniform(0.9, 1.1)),
            ambient=float(0.3 + 0.25 * cloud),
            vignetting=float(rng.uniform(0.0, 0.35)),
            sensor_noise=float(rng.uniform(0.5, 3.0)),
            occluders=occluders,
        )

    def with_occluders(self, occluders: Occluders | None) -> "Appearance":
        return dataclasses.replace(self, occluders=occluders)

    # -- derived quantities used by the renderer ---------------------------------------------
    def sun_direction(self) -> np.ndarray:
        """Unit vector (3,) toward the sun in the world-local frame (x east, y north, z up), float32."""
        yaw = heading_to_yaw(self.sun_azimuth_deg)
        el = math.radians(self.sun_elevation_deg)
        return np.array([math.cos(yaw) * math.cos(el), math.sin(yaw) * math.cos(el), math.sin(el)], np.float32)

    def ground_albedo(self) -> np.ndarray:
        """Albedo per ground material (M, 3) float32 for this season (vegetation tint, snow cover)."""
        pal = _SEASON[self.season]
        alb = GROUND_ALBEDO.copy()
        veg = GROUND_VEGETATION[:, None]
        # Forest keeps its darkness relative to grass.
        tint = np.asarray(pal["grass"], np.float32)[None] * (GROUND_ALBEDO / GROUND_ALBEDO[6:7].clip(1e-3))
        alb = alb * (1 - veg) + tint * veg
        snow = pal["snow"] * GROUND_SNOW[:, None]
        return (alb * (1 - snow) + _SNOW[None] * snow).astype(np.float32)

    @property
    def snow_cover(self) -> float:
        """Fraction of snow on open ground and flat roofs, 0..1."""
        return float(_SEASON[self.season]["snow"])

    @staticmethod
    def snow_albedo() -> np.ndarray:
        return _SNOW

    def foliage(self) -> np.ndarray:
        """Tree-crown albedo (3,) float32 of this season."""
        return np.asarray(_SEASON[self.season]["foliage"], np.float32)
