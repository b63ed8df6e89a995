"""Building styles of the digital twin: facade / roof palettes, wall textures, window patterns and
the height of a building whose OSM tags give none.

A style is a family (stucco, brick, panel, glass, wood, industrial) of parameter ranges; every
building draws its style and its parameters from (world seed, building id), so a building looks
the same in every crop and every run. Where the styles mix varies over districts
(`district_m`), each district draws its own mixture, so a town has quarters of one or two styles.
`BuildingStyles.draw` is the single original palette (the twin before styles existed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Sequence

import numpy as np

from neuralmaps.config import BUILDING_STYLES

if TYPE_CHECKING:  # pragma: no cover
    from neuralmaps.config import SynthConfig

__all__ = ["Style", "STYLES", "BuildingStyles", "check_style_names", "variation_knobs", "STYLED_HEIGHT_KINDS",
           "NO_VARIATION"]

RGB = tuple[float, float, float]
Range = tuple[float, float]

# Buildings of these OSM kinds whose height is not tagged take their style's height; other kinds
# keep the kind's default of neuralmaps.geo.osm (a shed stays a shed, a church a church).
STYLED_HEIGHT_KINDS = frozenset({"building", "residential"})
BASE_HEIGHT_M = 1.0  # above the top storey (parapet), as geo.osm's levels rule
DISTRICT_ALPHA = 0.6  # Dirichlet concentration of a district's style mixture (< 1: one or two dominate)


@dataclass(frozen=True)
class Style:
    """Parameter ranges of one building style; linear RGB colours, metres.

    facade / roof / window: palettes (one colour drawn, then jittered per channel); storey_m, bay_m:
    storey height and window spacing; win_w, win_h: window width / height as fractions of the bay /
    storey, win_bottom: sill height as a fraction of the storey; shop: probability of shop windows on
    the ground floor; levels: storeys when OSM gives no height; wall texture: grid lines every
    line_u_m along the wall and / or line_v_m up it (None: none), `line_frac` of the period wide,
    `line_dark` times the facade colour (courses, boards, panel joints, corrugation); tex_amp /
    tex_scale: noise amplitude and scale; storey_dark: the storey line's darkness (1: none);
    roof_seam_m: seam spacing of the roof (None: a flat membrane), roof_tex: roof noise amplitude."""

    facade: tuple[RGB, ...]
    roof: tuple[RGB, ...]
    window: tuple[RGB, ...] = ((0.08, 0.10, 0.13),)
    window_gain: Range = (0.7, 1.6)
    storey_m: Range = (3.0, 3.8)
    bay_m: Range = (2.2, 3.6)
    win_w: Range = (0.35, 0.6)
    win_h: Range = (0.4, 0.6)
    win_bottom: float = 0.3
    shop: float = 0.5
    levels: tuple[int, int] = (4, 7)
    line_u_m: Range | None = None
    line_v_m: Range | None = None
    line_frac: float = 0.0
    line_dark: Range = (1.0, 1.0)
    tex_amp: float = 0.12
    tex_scale: float = 0.5
    storey_dark: float = 0.72
    roof_seam_m: Range | None = (0.5, 0.7)
    roof_seam_frac: float = 0.15
    roof_seam_dark: float = 0.85
    roof_tex: float = 0.12


_LEGACY_FACADE = (
    (0.62, 0.55, 0.45), (0.70, 0.66, 0.58), (0.55, 0.35, 0.27), (0.72, 0.62, 0.40),
    (0.45, 0.47, 0.50), (0.78, 0.75, 0.70), (0.60, 0.42, 0.32), (0.50, 0.55, 0.50),
    (0.68, 0.50, 0.42), (0.36, 0.33, 0.30),
)
_LEGACY_ROOF = (
    (0.18, 0.18, 0.19), (0.35, 0.16, 0.12), (0.25, 0.42, 0.36), (0.30, 0.30, 0.32),
    (0.45, 0.44, 0.42), (0.12, 0.12, 0.13), (0.40, 0.25, 0.18),
)

STYLES: dict[str, Style] = {
    # Plastered city blocks (the original palette): regular windows, shops, 4-7 storeys.
    "stucco": Style(facade=_LEGACY_FACADE, roof=_LEGACY_ROOF),
    # Red / brown / yellow brick: mortar courses, narrower windows.
    "brick": Style(
        facade=((0.42, 0.17, 0.11), (0.52, 0.24, 0.15), (0.60, 0.44, 0.28), (0.33, 0.16, 0.13), (0.47, 0.30, 0.22)),
        roof=((0.20, 0.20, 0.21), (0.36, 0.14, 0.09), (0.28, 0.26, 0.25)),
        storey_m=(3.0, 3.5), bay_m=(2.0, 3.0), win_w=(0.3, 0.5), win_h=(0.45, 0.6), win_bottom=0.28, shop=0.3,
        levels=(3, 6), line_v_m=(0.22, 0.3), line_frac=0.14, line_dark=(0.7, 0.82), tex_amp=0.15, tex_scale=0.5,
        storey_dark=0.9, roof_seam_m=(0.3, 0.4), roof_seam_frac=0.2, roof_seam_dark=0.8, roof_tex=0.15,
    ),
    # Prefabricated concrete panels (suburban blocks): panel joints, low storeys, up to 8 of them.
    "panel": Style(
        facade=((0.56, 0.56, 0.54), (0.63, 0.60, 0.54), (0.50, 0.52, 0.55), (0.67, 0.63, 0.52), (0.58, 0.50, 0.44)),
        roof=((0.16, 0.16, 0.17), (0.24, 0.24, 0.25), (0.30, 0.29, 0.27)),
        storey_m=(2.75, 3.0), bay_m=(2.4, 3.6), win_w=(0.35, 0.55), win_h=(0.4, 0.5), shop=0.1, levels=(3, 8),
        line_u_m=(3.0, 4.2), line_frac=0.025, line_dark=(0.6, 0.72), tex_amp=0.06, tex_scale=1.0, storey_dark=0.62,
        roof_seam_m=None, roof_tex=0.08,
    ),
    # Curtain walls: glass between thin mullions, tall storeys, shops.
    "glass": Style(
        facade=((0.18, 0.20, 0.22), (0.34, 0.36, 0.38), (0.55, 0.56, 0.58), (0.25, 0.22, 0.18)),
        roof=((0.40, 0.40, 0.40), (0.50, 0.50, 0.48), (0.30, 0.30, 0.31)),
        window=((0.10, 0.16, 0.20), (0.12, 0.14, 0.16), (0.08, 0.14, 0.12)), window_gain=(0.8, 2.2),
        storey_m=(3.5, 4.2), bay_m=(1.2, 1.8), win_w=(0.82, 0.95), win_h=(0.55, 0.66), shop=0.7, levels=(4, 10),
        tex_amp=0.04, tex_scale=1.0, storey_dark=0.5, roof_seam_m=None, roof_tex=0.06,
    ),
    # Painted wooden houses: horizontal boards, small windows, one or two storeys.
    "wood": Style(
        facade=((0.42, 0.09, 0.06), (0.76, 0.56, 0.22), (0.80, 0.80, 0.76), (0.46, 0.56, 0.40), (0.45, 0.52, 0.60),
                (0.80, 0.72, 0.46)),
        roof=((0.36, 0.12, 0.08), (0.12, 0.12, 0.13), (0.34, 0.35, 0.36), (0.20, 0.30, 0.24)),
        storey_m=(2.7, 3.1), bay_m=(2.6, 4.5), win_w=(0.22, 0.38), win_h=(0.35, 0.5), win_bottom=0.32, shop=0.05,
        levels=(1, 2), line_v_m=(0.15, 0.22), line_frac=0.16, line_dark=(0.75, 0.85), tex_amp=0.08,
        storey_dark=1.0, roof_seam_m=(0.45, 0.6), roof_seam_frac=0.1, roof_seam_dark=0.75, roof_tex=0.1,
    ),
    # Sheds and halls: corrugated metal, a few high strip windows, tall storeys.
    "industrial": Style(
        facade=((0.70, 0.72, 0.74), (0.52, 0.58, 0.64), (0.78, 0.76, 0.70), (0.33, 0.40, 0.48), (0.60, 0.22, 0.18)),
        roof=((0.38, 0.38, 0.39), (0.50, 0.50, 0.50), (0.25, 0.27, 0.30)),
        storey_m=(4.0, 6.0), bay_m=(5.0, 9.0), win_w=(0.15, 0.35), win_h=(0.15, 0.25), win_bottom=0.62, shop=0.0,
        levels=(1, 2), line_u_m=(0.2, 0.35), line_frac=0.45, line_dark=(0.82, 0.9), tex_amp=0.05, tex_scale=1.0,
        storey_dark=1.0, roof_seam_m=(0.8, 1.2), roof_seam_frac=0.1, roof_seam_dark=0.85, roof_tex=0.05,
    ),
}
assert tuple(STYLES) == BUILDING_STYLES, "config.BUILDING_STYLES must list the styles defined here"


def check_style_names(names: Sequence[str]) -> tuple[str, ...]:
    """The style names as a tuple; ValueError naming the unknown ones and the known ones."""
    names = tuple(str(n) for n in names)
    unknown = [n for n in names if n not in STYLES]
    if unknown:
        raise ValueError(f"unknown building style(s) {unknown}; known: {list(STYLES)} (or none, for the original look)")
    if len(set(names)) != len(names):
        raise ValueError(f"building styles listed twice: {list(names)}")
    return names


# What a world built without variation records (WorldBuilder worlds, configs before variation).
NO_VARIATION = {"building_styles": (), "tag_dropout": 0.0, "district_m": 0.0}


def variation_knobs(synth: "SynthConfig | None") -> dict:
    """The twin-variation knobs of a SynthConfig (None: its defaults), checked:
    {"building_styles": tuple, "tag_dropout": float, "district_m": float}."""
    if synth is None:
        from neuralmaps.config import SynthConfig

        synth = SynthConfig()
    p, d = float(synth.tag_dropout), float(synth.district_m)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"synth.tag_dropout must be in [0, 1], got {synth.tag_dropout}")
    if not (math.isfinite(d) and d >= 0):
        raise ValueError(f"synth.district_m must be >= 0 (0: no districts), got {synth.district_m}")
    return {"building_styles": check_style_names(synth.building_styles), "tag_dropout": p, "district_m": d}


def _building_rng(seed: int, bid: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(bid) & 0xFFFFFFFF, int(bid) >> 32 & 0xFFFFFFFF, salt])


@dataclass
class BuildingStyles:
    """Per-building facade / roof parameters, (B,) arrays ((B, 3) for colours), drawn from
    (building id, seed); field meanings as in `Style` (one value drawn from each range).

    style: index into the style names drawn from (-1: the original palette); levels: storeys the
    style gives a building without a height tag; win_w / win_h / win_bottom: fractions of bay /
    storey; line_u_m / line_v_m: wall-texture periods (their `line_*_frac` 0: none); roof_dir: roof
    seam direction (radians), roof_seam_frac 0: no seams; ground_floor: shop windows."""

    storey_m: np.ndarray
    bay_m: np.ndarray
    win_w: np.ndarray
    win_h: np.ndarray
    win_bottom: np.ndarray
    facade: np.ndarray
    window: np.ndarray
    roof: np.ndarray
    roof_dir: np.ndarray
    ground_floor: np.ndarray
    style: np.ndarray
    levels: np.ndarray
    line_u_m: np.ndarray
    line_u_frac: np.ndarray
    line_v_m: np.ndarray
    line_v_frac: np.ndarray
    line_dark: np.ndarray
    tex_amp: np.ndarray
    tex_scale: np.ndarray
    storey_dark: np.ndarray
    roof_seam_m: np.ndarray
    roof_seam_frac: np.ndarray
    roof_seam_dark: np.ndarray
    roof_tex: np.ndarray

    _DTYPES = {"ground_floor": bool, "style": np.int16, "levels": np.int16}
    _RGB = ("facade", "window", "roof")

    def __len__(self) -> int:
        return len(self.storey_m)

    def take(self, rows: np.ndarray) -> "BuildingStyles":
        """The styles of buildings `rows` (indices), in that order."""
        rows = np.asarray(rows, np.int64)
        return BuildingStyles(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    @classmethod
    def _from_lists(cls, out: dict[str, list]) -> "BuildingStyles":
        arr = {}
        n = len(out["storey_m"])
        for k, v in out.items():
            shape = (n, 3) if k in cls._RGB else (n,)
            a = np.asarray(v).reshape(shape) if n else np.zeros(shape)
            arr[k] = a.astype(cls._DTYPES.get(k, np.float32))
        for k in ("facade", "roof"):
            arr[k] = np.clip(arr[k], 0, 1)
        return cls(**arr)

    @classmethod
    def draw(cls, ids: np.ndarray, seed: int) -> "BuildingStyles":
        """The original look (before styles): one palette, the same random draws per building."""
        legacy = STYLES["stucco"]
        facade_palette, roof_palette = np.array(legacy.facade, np.float32), np.array(legacy.roof, np.float32)
        out: dict[str, list] = {f.name: [] for f in fields(cls)}
        for bid in np.asarray(ids, np.int64):
            r = _building_rng(seed, bid, 7)
            out["storey_m"].append(r.uniform(2.8, 3.8))
            out["bay_m"].append(r.uniform(1.8, 4.0))
            out["win_w"].append(r.uniform(0.3, 0.7))
            out["win_h"].append(r.uniform(0.35, 0.6))
            out["facade"].append(facade_palette[r.integers(len(facade_palette))] * r.uniform(0.8, 1.15, 3))
            out["window"].append(np.array((0.08, 0.10, 0.13)) * r.uniform(0.7, 1.6) + r.uniform(0, 0.05, 3))
            out["roof"].append(roof_palette[r.integers(len(roof_palette))] * r.uniform(0.85, 1.15, 3))
            out["roof_dir"].append(r.uniform(0, math.pi))
            out["ground_floor"].append(r.random() < 0.5)
            for k, v in (("win_bottom", 0.3), ("style", -1), ("levels", 0), ("line_u_m", 1.0), ("line_u_frac", 0.0),
                         ("line_v_m", 1.0), ("line_v_frac", 0.0), ("line_dark", 1.0), ("tex_amp", 0.12),
                         ("tex_scale", 0.5), ("storey_dark", 0.72), ("roof_seam_m", 0.6), ("roof_seam_frac", 0.15),
                         ("roof_seam_dark", 0.85), ("roof_tex", 0.12)):
                out[k].append(v)
        return cls._from_lists(out)

    @classmethod
    def draw_styled(cls, ids: np.ndarray, seed: int, names: Sequence[str], xy: np.ndarray | None = None,
                    district_m: float = 0.0) -> "BuildingStyles":
        """Styles drawn from `names` (STYLES keys) for buildings `ids` (B,) at CRS points `xy` (B, 2)
        (their centroids; only used when `district_m` > 0). Deterministic in (seed, id, district):
        the same building gets the same style and parameters in every crop of the extract.

        Each building picks a style from its district's mixture (Dirichlet(DISTRICT_ALPHA) drawn from
        (seed, district)) or uniformly when `district_m` is 0, then every parameter from the style."""
        names = check_style_names(names)
        if not names:
            return cls.draw(ids, seed)
        styles = [STYLES[n] for n in names]
        ids = np.asarray(ids, np.int64)
        uniform = np.full(len(styles), 1.0 / len(styles))
        mixtures: dict[tuple[int, int], np.ndarray] = {}
        out: dict[str, list] = {f.name: [] for f in fields(cls)}
        for k, bid in enumerate(ids):
            p = uniform
            if district_m > 0 and xy is not None and len(styles) > 1 and np.isfinite(xy[k]).all():
                d = (int(math.floor(xy[k, 0] / district_m)), int(math.floor(xy[k, 1] / district_m)))
                if d not in mixtures:
                    rd = np.random.default_rng([int(seed) & 0xFFFFFFFF, d[0] & 0xFFFFFFFF, d[1] & 0xFFFFFFFF, 0x57])
                    mixtures[d] = rd.dirichlet(np.full(len(styles), DISTRICT_ALPHA))
                p = mixtures[d]
            r = _building_rng(seed, bid, 8)
            si = int(min(np.searchsorted(np.cumsum(p), r.random() * p.sum(), side="right"), len(styles) - 1))
            s = styles[si]
            pick = lambda palette: np.asarray(palette[r.integers(len(palette))], np.float64)  # noqa: E731
            out["style"].append(si)
            out["storey_m"].append(r.uniform(*s.storey_m))
            out["bay_m"].append(r.uniform(*s.bay_m))
            out["win_w"].append(r.uniform(*s.win_w))
            out["win_h"].append(r.uniform(*s.win_h))
            out["win_bottom"].append(s.win_bottom)
            out["facade"].append(pick(s.facade) * r.uniform(0.85, 1.15, 3))
            out["window"].append(pick(s.window) * r.uniform(*s.window_gain) + r.uniform(0, 0.04, 3))
            out["roof"].append(pick(s.roof) * r.uniform(0.85, 1.15, 3))
            out["roof_dir"].append(r.uniform(0, math.pi))
            out["ground_floor"].append(r.random() < s.shop)
            out["levels"].append(r.integers(s.levels[0], s.levels[1] + 1))
            for axis, rng_m in (("u", s.line_u_m), ("v", s.line_v_m)):
                out[f"line_{axis}_m"].append(r.uniform(*rng_m) if rng_m else 1.0)
                out[f"line_{axis}_frac"].append(s.line_frac if rng_m else 0.0)
            out["line_dark"].append(r.uniform(*s.line_dark))
            out["tex_amp"].append(s.tex_amp)
            out["tex_scale"].append(s.tex_scale)
            out["storey_dark"].append(s.storey_dark)
            out["roof_seam_m"].append(r.uniform(*s.roof_seam_m) if s.roof_seam_m else 1.0)
            out["roof_seam_frac"].append(s.roof_seam_frac if s.roof_seam_m else 0.0)
            out["roof_seam_dark"].append(s.roof_seam_dark)
            out["roof_tex"].append(s.roof_tex)
        return cls._from_lists(out)

    def default_heights(self) -> np.ndarray:
        """Heights (B,) float32 of the buildings' styles for buildings without a height tag:
        levels x storey + BASE_HEIGHT_M (NaN for the original palette, which keeps OSM's defaults)."""
        h = self.levels.astype(np.float32) * self.storey_m + np.float32(BASE_HEIGHT_M)
        return np.where(self.style >= 0, h, np.nan).astype(np.float32)
