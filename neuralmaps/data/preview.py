"""Preview PNGs of a training-chunk store (neuralmaps.data.store): map views, query, aerial, semantics and a BEV plot with
the camera frustums, to check by eye that frames and conventions agree."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import CLASS_NAMES
from ..storage import StorageError, atomic_path, check_writable_parent
from .store import CAMERA_MODELS, SPLIT_NAMES, read_store_attrs

from ..classes import CLASS_COLORS, NO_CLASS_COLOR  # noqa: E402  (re-exported)

__all__ = ["write_previews", "check_preview_dir", "CLASS_COLORS", "semantic_rgb", "frustum_xy"]

FRUSTUM_LENGTH_M = 10.0


def semantic_rgb(sem: np.ndarray) -> np.ndarray:
    """(K, y, x) {0,1} class raster -> (y, x, 3) float RGB; later classes paint over earlier ones,
    so objects show on top of areas. Cells without any class get NO_CLASS_COLOR."""
    out = np.empty((*sem.shape[1:], 3), np.float32)
    out[:] = NO_CLASS_COLOR
    for k, name in enumerate(CLASS_NAMES):
        out[sem[k] > 0] = CLASS_COLORS[name]
    return out


def frustum_xy(
    T_scene_cam: np.ndarray, intrinsics: np.ndarray, model: str, length_m: float = FRUSTUM_LENGTH_M
) -> np.ndarray:
    """(3, 2) scene-frame x-y of a camera's BEV frustum triangle: the camera centre and the points
    `length_m` along the rays through the left and right edge midpoints of the image."""
    import torch

    from ..geometry import camera_from_tensor

    cam = camera_from_tensor(torch.as_tensor(intrinsics, dtype=torch.float64), model)
    w, h = float(intrinsics[0]), float(intrinsics[1])
    rays = cam.unproject(torch.tensor([[0.5, h / 2], [w - 0.5, h / 2]], dtype=torch.float64)).numpy()
    d = rays @ T_scene_cam[:3, :3].T  # camera -> scene directions
    d_xy = d[:, :2] / np.maximum(np.linalg.norm(d[:, :2], axis=1, keepdims=True), 1e-9)
    c = T_scene_cam[:2, 3]
    return np.stack([c, c + length_m * d_xy[0], c + length_m * d_xy[1]])


def check_preview_dir(out_dir: str | os.PathLike) -> Path:
    """Check, before any work, that previews can be written to the folder `out_dir` (it need not
    exist). Raises StorageError (one line) for an empty path, a file, a path under a file or an
    unwritable folder."""
    p = check_writable_parent(out_dir, "preview folder")
    if (p.exists() or p.is_symlink()) and not p.is_dir():
        raise StorageError(f"preview folder {out_dir}: exists and is a file, not a folder; choose another path")
    if p.is_dir() and not os.access(p, os.W_OK | os.X_OK):
        raise StorageError(f"preview folder {out_dir}: not writable (permission denied); choose another path")
    return p


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")


def write_previews(store: str | os.PathLike, out_dir: str | os.PathLike, pairs: Sequence[int] | None = None,
                   max_pairs: int = 4) -> list[Path]:
    """Write `pair_XXXX_views.png` and `pair_XXXX_bev.png` for `pairs` (default: the first
    `max_pairs` done pairs) of a training-chunk store into `out_dir`. Returns the files."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import zarr
    from matplotlib.patches import Patch, Polygon, Rectangle

    attrs = read_store_attrs(store)
    cfg = json.loads(attrs["config"])
    sx, sy = cfg["scene"]["size_m"][:2]
    g = zarr.open_group(str(store), mode="r")
    done = np.flatnonzero(np.asarray(g["pair_done"][:], bool))
    pairs = [int(p) for p in (done[:max_pairs] if pairs is None else pairs) if p in set(done.tolist())]
    runs = json.loads(attrs["runs"])
    cam_names = attrs["camera_names"]
    out = check_preview_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    for i in pairs:
        a = {k: np.asarray(g[k][i]) for k in (
            "map_image", "map_T_scene_view", "map_camera", "map_camera_model", "map_view_mask", "map_run",
            "map_camera_name", "aerial", "semantic", "query_image", "query_T_scene_cam", "query_camera",
            "query_camera_model", "query_run", "query_overlap", "query_observed", "query_time_delta_days",
            "split", "scene_origin")}
        valid = np.flatnonzero(a["map_view_mask"])
        split = SPLIT_NAMES[int(a["split"])]
        qrun = runs[int(a["query_run"])]

        # -- views: map views in a grid, the query below ------------------------------------------
        ncol = 4
        nrow = int(np.ceil(max(len(valid), 1) / ncol))
        fig = plt.figure(figsize=(3.2 * ncol, 1.9 * (nrow + 2)))
        gs = fig.add_gridspec(nrow + 2, ncol)
        for k, v in enumerate(valid):
            ax = fig.add_subplot(gs[k // ncol, k % ncol])
            ax.imshow(a["map_image"][v])
            run = runs[int(a["map_run"][v])]
            ax.set_title(f"map {v}: {run['run_id']} / {cam_names[int(a['map_camera_name'][v])]}", fontsize=7)
            ax.axis("off")
        ax = fig.add_subplot(gs[nrow:, 1:3])
        ax.imshow(a["query_image"])
        ax.set_title(f"query: {qrun['run_id']} ({qrun['vehicle']}), overlap {float(a['query_overlap']):.2f}, "
                     f"observed {float(a['query_observed']):.2f}, Δt {float(a['query_time_delta_days']):.0f} d",
                     fontsize=8)
        ax.axis("off")
        fig.suptitle(f"pair {i} ({split})", fontsize=10)
        f = out / f"pair_{i:04d}_views.png"
        _save(fig, f)
        plt.close(fig)
        files.append(f)

        # -- rasters and BEV -------------------------------------------------------------------
        extent = (0.0, sx, 0.0, sy)  # north-up raster: row 0 at y = sy
        aerial = np.moveaxis(a["aerial"], 0, -1)
        sem_rgb = semantic_rgb(a["semantic"])
        fig, axs = plt.subplots(1, 3, figsize=(15, 6.5))
        axs[0].imshow(aerial, extent=extent)
        axs[0].set_title("aerial (north up)")
        axs[1].imshow(sem_rgb, extent=extent)
        axs[1].set_title("semantic raster")
        present = [n for k, n in enumerate(CLASS_NAMES) if a["semantic"][k].any()]
        handles = [Patch(facecolor=CLASS_COLORS[n], edgecolor="k", label=n + (" *" if n in present else ""))
                   for n in CLASS_NAMES]
        handles.append(Patch(facecolor=NO_CLASS_COLOR, edgecolor="k", label="(no class)"))
        axs[1].legend(handles=handles,
                      loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7,
                      title="classes (* = in this scene)",
                      title_fontsize=7)
        ax = axs[2]
        ax.imshow(aerial, extent=extent)
        ax.imshow(np.concatenate([sem_rgb, 0.45 * a["semantic"].any(0)[..., None]], -1), extent=extent)
        ax.add_patch(Rectangle((0, 0), sx, sy, fill=False, ec="yellow", lw=2, label="scene"))
        for n, v in enumerate(valid):
            tri = frustum_xy(a["map_T_scene_view"][v], a["map_camera"][v], CAMERA_MODELS[int(a["map_camera_model"][v])])
            ax.add_patch(Polygon(tri, closed=True, fill=False, ec="deepskyblue", lw=1.2,
                                 label="map views" if n == 0 else None))
            ax.plot(*tri[0], "o", color="deepskyblue", ms=3)
        tri = frustum_xy(a["query_T_scene_cam"], a["query_camera"], CAMERA_MODELS[int(a["query_camera_model"])])
        ax.add_patch(Polygon(tri, closed=True, fill=False, ec="red", lw=2, label="query"))
        ax.plot(*tri[0], "o", color="red", ms=4)
        pts = np.concatenate([a["map_T_scene_view"][valid, :2, 3], a["query_T_scene_cam"][None, :2, 3]])
        lo = np.minimum(pts.min(0), 0) - FRUSTUM_LENGTH_M
        hi = np.maximum(pts.max(0), (sx, sy)) + FRUSTUM_LENGTH_M
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_aspect("equal")
        ax.legend(loc="upper right", fontsize=7)
        ax.set_title("BEV: aerial + semantics + frustums")
        for ax in axs:
            ax.set_xlabel("x east (m)")
            ax.set_ylabel("y north (m)")
        E, N = a["scene_origin"]
        fig.suptitle(f"pair {i} ({split}): scene SW corner E {E:.1f} N {N:.1f}", fontsize=10)
        fig.tight_layout()
        f = out / f"pair_{i:04d}_bev.png"
        _save(fig, f)
        plt.close(fig)
        files.append(f)
    return files
