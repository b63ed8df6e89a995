"""`build_map`: a neural map of a region from captures (+ orthophoto, + OSM), one Dask task per tile.

Once per build (driver): fixed GroupNorm statistics for the aerial / semantic-raster encoders
(`norm_statistics`, on training-sized windows of the region; kept in the store's `norm_stats`), so
that their features do not depend on where tile edges fall (each tile's own statistics did).

Per tile (`_build_tile`, on a worker, with `inference_model`: weight standardisation folded, the
build's GroupNorm statistics):
1. the map views whose camera lies within the tile + halo + `view_radius_m` (spatial index on the
   capture index, done by the driver); each 16 m block of the tile (on the region's global grid) is
   lifted from its own nearest `max_views` views within `view_radius_m` (those whose frustum misses
   the block dropped: they see none of its voxels), so results do not depend on where tile edges fall;
   images are encoded in fixed-size batches through a per-process cache;
2. the orthophoto window (`read_orthophoto`) and the rasterized OSM (`rasterize_osm`) of the
   tile + halo;
3. the BEV mapper run directly on the tile's grid (the model maps grids of any size at
   `scene.cell_m`; no need to cut 24 x 32 m scene windows): street-view lifting over the inner tile
   only (voxels are independent), aerial / semantic encoders over tile + halo (their receptive
   fields need the context), max fusion, heads, semantic net;
4. the halo cropped, the tile's chunks written into the store, `tile_inputs`, then `tile_done` last.

The tile grid is the store's chunk grid, so parallel writes never share a chunk (DESIGN.md §6).
Reruns skip tiles whose `tile_done` is set; `update=True` rebuilds the tiles whose views changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from collections import OrderedDict

import numpy as np

from .captures import CaptureSet, sha256_of
from .store import STORE_FORMAT, NeuralMap, create_store, read_attrs, store_variables
from ..storage import StoreInUseError, writer_lock
from .workers import (ModelPlugin, checkpoint_bytes, dask_client, load_model, model_sha256, torch_threads_default,
                      worker_addresses, worker_model)

__all__ = ["build_map", "StoreLockedError", "DEFAULT_TILE_M", "DEFAULT_HALO_M"]

DEFAULT_TILE_M = 64.0  # 128 px at cpu-tiny's 0.5 m: ~1-3 s per tile on one core
DEFAULT_HALO_M = 16.0  # context for the aerial / semantic CNNs (seams: docs/architecture.md)
DEFAULT_MAX_VIEWS = 48  # per block: bounds the lifting's memory (projections are voxels x views)
GRID_MULTIPLE = 16  # compute grids are padded to this many cells (encoder strides)
BLOCK_PX = 32  # street-view view-selection blocks on a CRS-anchored grid (16 m at 0.5 m)
ENCODE_BATCH = 8  # images per encoder call, always this many (padded): see _encoded_views


class StoreLockedError(StoreInUseError):
    """Another build holds the store's writer lock."""


_INFERENCE_MODELS: "OrderedDict[tuple[str, str], Any]" = OrderedDict()  # (model key, norm digest) -> SNAP


def inference_model(model, norm: dict | None):
    """An inference copy of `model` for map building: weight standardisation folded into plain
    convolutions (bit-identical outputs, `fold_weight_standardization`) and, with `norm`
    (`norm_statistics`), the GroupNorms of the aerial / semantic-raster encoders fixed to the build's
    statistics (`fix_group_norms`), so that their features do not depend on where tile edges fall."""
    import copy

    from ..models.encoders import fix_group_norms, fold_weight_standardization

    m = fold_weight_standardization(copy.deepcopy(model)).eval()
    for name in ("aerial", "semantic"):
        enc = getattr(m.mapper, name, None)
        if enc is not None and (norm or {}).get(name):
            fix_group_norms(enc, norm[name])
    return m


def _tile_model(job: "TileJob", payload: bytes | None = None):
    """The worker's inference model for `job` (cached per model and statistics)."""
    k = (job.model_key, hashlib.sha256(job.norm.encode()).hexdigest())
    if k not in _INFERENCE_MODELS:
        base = worker_model(job.model_key, payload, job.device)
        _INFERENCE_MODELS[k] = inference_model(base, json.loads(job.norm) if job.norm else None)
        while len(_INFERENCE_MODELS) > 2:
            _INFERENCE_MODELS.popitem(last=False)
    _INFERENCE_MODELS.move_to_end(k)
    return _INFERENCE_MODELS[k]


# -- tile task -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileViews:
    """The map views of one tile: absolute image paths, T_world_cam (N, 4, 4) float64 in the
    region's CRS, intrinsics (N, 8), their keys (`CaptureSet.row_keys`) and a hash of them."""

    paths: tuple[str, ...]
    T_world_cam: np.ndarray
    cameras: np.ndarray
    digest: int
    keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class TileJob:
    """Everything a tile task needs, as plain data (pickles cheaply)."""

    store: str
    tile: Any  # geo.Tile
    views: TileViews
    aerial: str | None
    model_key: str
    camera_model: str
    semantics: bool
    confidence: bool
    device: str = "auto"
    view_radius_m: float = 32.0
    max_views: int = 48
    norm: str = ""  # JSON of `norm_statistics` ("" = each tile's own GroupNorm statistics)


def _load_images(paths: Sequence[str]):
    import torch
    from PIL import Image

    ims = []
    for p in paths:
        with Image.open(p) as im:
            ims.append(np.asarray(im.convert("RGB")))
    if len({a.shape for a in ims}) > 1:
        raise ValueError("images of one tile have different sizes; the street-view encoder needs one size per batch")
    a = np.stack(ims)  # V, H, W, 3
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 1))).float().div_(255.0)


_FEATURE_CACHE: "OrderedDict[tuple[str, str], tuple[Any, Any]]" = OrderedDict()  # (model, image) -> maps
FEATURE_CACHE_BYTES = 256 * 2**20  # per worker process; neighbouring tiles share most of their views


def _encoded_views(model, model_key: str, paths: Sequence[str], upcoming: Sequence[str] = ()):
    """The street-view feature maps and depth scores of the images as `ViewPatches` (B = 1, V =
    len(paths)), through a per-process LRU cache of each image's lookup tables: each image is seen by
    several blocks and tiles (tile + radius boxes overlap).

    Missing images are encoded ENCODE_BATCH at a time, the last batch filled up with missing images of
    `upcoming` (needed next), else padded with black images: with a fixed batch size an image's
    features do not depend on the others in its batch (GroupNorm is per image), so they are
    bit-identical whatever the cache holds and resumed builds equal fresh ones."""
    import torch

    from ..models.streetview import ViewPatches, view_patches

    enc = model.mapper.streetview
    dev = next(model.parameters()).device
    missing = [p for p in dict.fromkeys(paths) if (model_key, p) not in _FEATURE_CACHE]
    if len(missing) % ENCODE_BATCH:
        have = set(missing)
        fill = [p for p in dict.fromkeys(upcoming) if p not in have and (model_key, p) not in _FEATURE_CACHE]
        missing += fill[:ENCODE_BATCH - len(missing) % ENCODE_BATCH]
    for b0 in range(0, len(missing), ENCODE_BATCH):
        batch = missing[b0:b0 + ENCODE_BATCH]
        images = _load_images(batch)
        if len(batch) < ENCODE_BATCH:
            images = torch.cat([images, images.new_zeros((ENCODE_BATCH - len(batch), *images.shape[1:]))])
        images = images.to(dev)
        maps, scores = enc.encode_images(images[None], torch.ones((1, ENCODE_BATCH), dtype=torch.bool, device=dev))
        for k, p in enumerate(batch):
            t = view_patches(maps[:, k:k + 1], scores[:, k:k + 1])  # this image's tables (copies), lookup order
            _FEATURE_CACHE[(model_key, p)] = (t.feats, t.scores, t.shape[2:], t.num_bins)
    out = []
    for p in paths:
        _FEATURE_CACHE.move_to_end((model_key, p))
        out.append(_FEATURE_CACHE[(model_key, p)])
    (h, w), S = out[0][2], out[0][3]
    patches = ViewPatches(torch.cat([f for f, *_ in out]), torch.cat([s for _, s, *_ in out]), (1, len(out), h, w), S)
    per = (out[0][0].numel() + out[0][1].numel()) * out[0][0].element_size()
    while len(_FEATURE_CACHE) * per > FEATURE_CACHE_BYTES and len(_FEATURE_CACHE) > len(paths):
        _FEATURE_CACHE.popitem(last=False)
    return patches


def _streetview_plane(model, model_key, paths, T, cams, mask, xy, z_bottom, upcoming: Sequence[str] = ()):
    """`BEVMapper.streetview_plane` with cached image encodings (same computation: the encoder
    works per image, the lifting per voxel). upcoming: images needed next (see `_encoded_views`)."""
    from .. import geometry
    from ..models.streetview import voxel_centers

    mapper = model.mapper
    sv = mapper.streetview
    patches = _encoded_views(model, model_key, paths, upcoming)
    xyz = voxel_centers(xy, z_bottom, mapper.scene.size_m[2], mapper.scene.cell_m)
    cameras = geometry.camera_from_tensor(cams.float(), model.camera_model).scale(1.0 / sv.image_encoder.stride)
    volume, valid = sv.lift(patches, None, geometry.Transform3D.from_matrix(T.float()), cameras, mask, xyz)
    return mapper.pooling(volume, valid)


def _streetview_blocks(model, job: TileJob, xy, origin, area, offset, H: int):
    """Street-view plane over `area` (rows r0:r1, cols c0:c1 of the compute grid), lifted block by block.

    Blocks are BLOCK_PX squares of a global pixel grid anchored at CRS multiples of their size (offset:
    global row/col of the compute grid's row/col 0, rows counted southward); each uses the views within `view_radius_m` of the block (at most `max_views`,
    nearest first, ties by key) and their median height. A cell's features thus depend only on its block,
    never on where tile edges fall. Returns the FeaturePlane (1, D, W, H) and observations (r1-r0, c1-c0).
    """
    import torch

    from ..models.bev import FeaturePlane

    cfg, v = model.config, job.views
    dev = xy.device
    c = cfg.scene.cell_m
    W = xy.shape[0]
    T = v.T_world_cam.copy()
    T[:, 0, 3] -= origin[0]  # CRS -> tile scene frame (origin at the compute grid's SW corner)
    T[:, 1, 3] -= origin[1]
    keys = np.asarray(v.keys, dtype=object).astype(str) if v.keys else np.asarray(v.paths, dtype=str)
    Tt = torch.from_numpy(T).float().to(dev)
    cams = torch.from_numpy(v.cameras).float().to(dev)
    feats = torch.zeros((1, cfg.model.feature_dim, W, H), device=dev)
    valid = torch.zeros((1, W, H), dtype=torch.bool, device=dev)
    r0, r1, c0, c1 = area
    R0, C0 = offset
    nz = model.mapper.num_z
    obs = np.zeros((r1 - r0, c1 - c0), np.uint16)
    Bp = BLOCK_PX
    blocks = []  # (rows, cols of the part to lift, selected views, z_bottom): geometry first, then features
    for gr in range((R0 + r0) // Bp * Bp, R0 + r1, Bp):
        for gc in range((C0 + c0) // Bp * Bp, C0 + c1, Bp):
            br0, br1 = max(gr - R0, r0), min(gr + Bp - R0, r1)  # the part of the block to lift
            bc0, bc1 = max(gc - C0, c0), min(gc + Bp - C0, c1)
            # Views are chosen for the whole block (scene frame), whatever part of it this tile holds.
            x0, x1, y0, y1 = (gc - C0) * c, (gc - C0 + Bp) * c, (H - (gr - R0 + Bp)) * c, (H - (gr - R0)) * c
            dx = np.maximum(np.maximum(x0 - T[:, 0, 3], T[:, 0, 3] - x1), 0)
            dy = np.maximum(np.maximum(y0 - T[:, 1, 3], T[:, 1, 3] - y1), 0)
            d = np.hypot(dx, dy)
            sel = np.flatnonzero(d <= job.view_radius_m)
            if not len(sel):
                continue
            sel = sel[np.lexsort((keys[sel], d[sel]))][: job.max_views]
            sel = np.sort(sel)
            si, sj = slice(bc0, bc1), slice(H - br1, H - br0)
            # The block's height (median of its views), then only the views whose frustum meets the
            # block's voxels or ground: the others see none of them, so they change nothing.
            z_bottom = Tt[sel][None, :, 2, 3].median(-1).values + cfg.model.z_offset_m
            sel = sel[_frustum_culled(Tt[sel], cams[sel], xy[si, sj], z_bottom, nz * c, c, model.camera_model)]
            if len(sel):
                blocks.append(((br0, br1), (bc0, bc1), sel, z_bottom))
    for b, ((br0, br1), (bc0, bc1), sel, z_bottom) in enumerate(blocks):
        si, sj = slice(bc0, bc1), slice(H - br1, H - br0)
        Ts, cs = Tt[sel][None], cams[sel][None]
        mask = torch.ones((1, len(sel)), dtype=torch.bool, device=dev)
        # The next blocks' views fill the last encoder batch of this one (no padding but at the end).
        upcoming = [v.paths[k] for nb in blocks[b + 1:b + 4] for k in nb[2]]
        plane = _streetview_plane(model, job.model_key, [v.paths[k] for k in sel], Ts, cs, mask, xy[si, sj], z_bottom,
                                  upcoming)
        feats[:, :, si, sj], valid[:, si, sj] = plane.features, plane.valid
        obs[br0 - r0:br1 - r0, bc0 - c0:bc1 - c0] = _count_observations(xy[si, sj], Ts[0], cs[0], cfg,
                                                                        model.camera_model)
    return FeaturePlane(feats, valid), obs


def _frustum_culled(T, cams, xy, z_bottom, height_m: float, cell_m: float, camera_model: str) -> np.ndarray:
    """(V,) bool: the views whose frustum may meet the box around the voxel centres over `xy` (X, Y, 2)
    (z from z_bottom (1,), `height_m` high) and their ground points (z = 0). A view is dropped only
    when all 8 corners lie outside one face of its pinhole frustum (grown by a pixel), so it sees no
    voxel (PinholeCamera ignores distortion); other camera models keep every view."""
    import torch

    V = T.shape[0]
    if camera_model != "pinhole" or not V:
        return np.ones(V, bool)
    zb = float(z_bottom.reshape(-1)[0])
    lo = [float(xy[..., 0].min()), float(xy[..., 1].min()), min(zb + 0.5 * cell_m, 0.0)]
    hi = [float(xy[..., 0].max()), float(xy[..., 1].max()), max(zb + height_m - 0.5 * cell_m, 0.0)]
    corners = torch.tensor([[(lo, hi)[i][0], (lo, hi)[j][1], (lo, hi)[k][2]]
                            for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=T.dtype, device=T.device)
    p = (corners[None] - T[:, None, :3, 3]) @ T[:, :3, :3]  # (V, 8, 3) in each camera frame: R^T (c - t)
    x, y, z = p.unbind(-1)
    w, h, fx, fy, cx, cy = (cams[:, i, None] for i in range(6))
    out = ((z <= 1e-3).all(1) | (fx * x + (cx + 1) * z < 0).all(1) | (fx * x + (cx - w - 1) * z > 0).all(1)
           | (fy * y + (cy + 1) * z < 0).all(1) | (fy * y + (cy - h - 1) * z > 0).all(1))
    return (~out).cpu().numpy()


def compute_region(tile) -> Any:
    """The tile + halo, padded east/south to a multiple of GRID_MULTIPLE cells (encoder strides)."""
    H, W = tile.region.shape
    Hp, Wp = -(-H // GRID_MULTIPLE) * GRID_MULTIPLE, -(-W // GRID_MULTIPLE) * GRID_MULTIPLE
    return tile.region.window(slice(0, Hp), slice(0, Wp))


def map_tile(model, job: TileJob, osm_layers: Any = None) -> dict[str, np.ndarray]:
    """Run the mapper on one tile; returns north-up arrays of the inner tile (no halo)."""
    import torch

    from ..geo import rasterize_osm
    from ..grids import Grid2D, grid_to_raster, raster_to_grid
    from ..models.bev import FeaturePlane, fuse_modalities
    from ..models.snap import NeuralMapTile

    cfg = model.config
    mapper = model.mapper
    dev = next(model.parameters()).device
    region = compute_region(job.tile)
    H, W = region.shape
    c = cfg.scene.cell_m
    xmin, ymin, _, _ = region.bounds
    xy = Grid2D((W * c, H * c), c).cell_centers(dtype=torch.float32, device=dev)  # X=W, Y=H
    rows, cols = job.tile.crop
    # Inner tile in the model grid: i = column, j = H - 1 - row.
    gi = slice(cols.start, cols.stop)
    gj = slice(H - rows.stop, H - rows.start)
    planes: list[FeaturePlane] = []
    observations = np.zeros((rows.stop - rows.start, cols.stop - cols.start), np.uint16)
    with torch.no_grad():
        v = job.views
        if cfg.model.use_streetview and len(v.paths):
            # Voxels are independent: lift only the inner tile and the cells a CNN decoder reads around it.
            m = getattr(getattr(model, "semantic_net", None), "reach_cells", 0)
            area = (max(0, rows.start - m), min(H, rows.stop + m), max(0, cols.start - m), min(W, cols.stop + m))
            # Global pixel index of the compute grid's row/col 0: blocks sit on CRS multiples of their size.
            offset = (int(round(-region.bounds[3] / c)), int(round(xmin / c)))
            plane, obs = _streetview_blocks(model, job, xy, (xmin, ymin), area, offset, H)
            planes.append(plane)
            observations = obs[rows.start - area[0]:rows.stop - area[0], cols.start - area[2]:cols.stop - area[2]]
        if mapper.aerial is not None and job.aerial is not None:
            a = _read_aerial(job.aerial, region)
            a = raster_to_grid(torch.from_numpy(np.ascontiguousarray(a))).contiguous()[None].to(dev)
            f = mapper.aerial(a)
            planes.append(FeaturePlane(f, torch.ones_like(f[:, 0], dtype=torch.bool)))
        if mapper.semantic is not None and osm_layers is not None:
            s = np.asarray(rasterize_osm(osm_layers, region).values, np.float32)
            s = raster_to_grid(torch.from_numpy(s)).contiguous()[None].to(dev)
            f = mapper.semantic(s)
            planes.append(FeaturePlane(f, torch.ones_like(f[:, 0], dtype=torch.bool)))
        if not planes:
            plane = FeaturePlane(torch.zeros((1, cfg.model.feature_dim, W, H), device=dev),
                                 torch.zeros((1, W, H), dtype=torch.bool, device=dev))
        else:
            plane = fuse_modalities(planes, 0.0)
        matching, confidence = mapper.heads(plane)
        out = {}

        def inner(t: torch.Tensor) -> np.ndarray:  # (..., X, Y) grid -> (..., rows, cols) raster
            return grid_to_raster(t[..., gi, gj]).cpu().numpy()

        valid = inner(plane.valid[0])
        out["features"] = np.where(valid, inner(plane.features[0].float()), np.nan).astype(np.float32)
        out["matching"] = np.where(valid, inner(matching[0].float()), np.nan).astype(np.float16)
        out["valid"] = valid
        out["observations"] = observations
        if job.confidence:
            out["confidence"] = np.where(valid, inner(confidence[0]), np.nan).astype(np.float32)
        if job.semantics:
            sem = model.semantics(NeuralMapTile(plane.features, matching, plane.valid, confidence, c))
            cls, prob = composite_classes(sem, model.semantic_net.log_balance())
            out["semantic_class"] = np.where(valid, inner(cls[0]), 255).astype(np.uint8)
            out["semantic_prob"] = np.where(valid, inner(prob[0]), np.nan).astype(np.float16)
    return out


def _read_aerial(path: str, region, fill: bool = True) -> np.ndarray:
    """(3, H, W) float32 in [0, 1] of the orthophoto on `region`; zeros where (or when) it has no
    coverage, as `read_orthophoto`'s NaN filled for the network (NaN there with fill=False)."""
    import rasterio
    from rasterio.warp import transform_bounds

    from ..geo import read_orthophoto

    with rasterio.open(path) as src:
        l, b, r, t = transform_bounds(src.crs, region.crs.to_wkt(), *src.bounds, densify_pts=21)
    x0, y0, x1, y1 = region.bounds
    if l >= x1 or r <= x0 or b >= y1 or t <= y0:
        return np.full((3, *region.shape), 0.0 if fill else np.nan, np.float32)
    a = read_orthophoto(path, region)
    return (a.fillna(0.0) if fill else a).values[:3].astype(np.float32)


NORM_WINDOWS = 5  # per side: 5 x 5 training-sized windows estimate the fixed GroupNorm statistics


def norm_windows(region, cfg, n: int = NORM_WINDOWS) -> list:
    """Up to n x n windows of the training scene's size (`scene.size_m`, here north-up: rows = y) on
    a regular lattice over `region` (whole cells, deterministic; they may reach beyond a region
    smaller than a window)."""
    c = cfg.scene.cell_m
    h, w = int(round(cfg.scene.size_m[1] / c)), int(round(cfg.scene.size_m[0] / c))
    H, W = region.shape
    rows = sorted({int(v) for v in np.linspace(0, max(H - h, 0), n).round()})
    cols = sorted({int(v) for v in np.linspace(0, max(W - w, 0), n).round()})
    return [region.window(slice(r, r + h), slice(q, q + w)) for r in rows for q in cols]


def norm_statistics(model, region, aerial: str | None, osm_layers: Any = None) -> dict:
    """Fixed GroupNorm statistics of the aerial and semantic-raster encoders for one build
    (`group_norm_statistics` over `norm_windows` of the region: each window normalised as in
    training, the statistics averaged). Aerial windows the orthophoto does not fully cover are left
    out (all are used when none is covered). Returns {"windows": [n_aerial, n_semantic], "aerial":
    {...}, "semantic": {...}} (an encoder without input is absent)."""
    import torch

    from ..geo import rasterize_osm
    from ..grids import raster_to_grid
    from ..models.encoders import group_norm_statistics

    mapper = model.mapper
    wins = norm_windows(region, model.config)
    out: dict[str, Any] = {"windows": [0, 0]}
    if mapper.aerial is not None and aerial is not None:
        rasters = [_read_aerial(aerial, w, fill=False) for w in wins]
        full = [a for a in rasters if np.isfinite(a).all()] or rasters
        x = torch.stack([raster_to_grid(torch.from_numpy(np.nan_to_num(a, nan=0.0))) for a in full])
        out["aerial"] = group_norm_statistics(mapper.aerial, x.to(next(model.parameters()).device))
        out["windows"][0] = len(full)
    if mapper.semantic is not None and osm_layers is not None:
        x = torch.stack([raster_to_grid(torch.from_numpy(np.asarray(rasterize_osm(osm_layers, w).values, np.float32)))
                         for w in wins])
        out["semantic"] = group_norm_statistics(mapper.semantic, x.to(next(model.parameters()).device))
        out["windows"][1] = len(wins)
    return out


def composite_classes(sem: dict, log_balance: dict | None = None) -> tuple[Any, Any]:
    """One class per cell and per-class probabilities (B, K, X, Y) in CLASS_NAMES order.

    The class is the area argmax, overridden by the object argmax where it is not void, overridden by
    the most probable binary class where one has p > 0.5 (the rasterizer's "objects on top"). The
    decoder's losses are class-balanced, so its object and binary probabilities overstate rare classes
    (a sign everywhere p > 0.5); with `log_balance` (`SemanticNet.log_balance()`) the overrides use them
    with the balancing undone (the training frequencies as priors). The probabilities returned are the
    decoder's, as trained."""
    import torch

    from ..config import AREA_CLASSES, OBJECT_CLASSES

    na, no = len(AREA_CLASSES), len(OBJECT_CLASSES)
    pa, po, pb = sem["areas_prob"], sem["objects_prob"], sem["binary_prob"]
    prob = torch.cat([pa, po[:, :no], pb], 1).float()
    if log_balance is not None:
        lb = {k: v.to(sem["objects"].device)[None, :, None, None] for k, v in log_balance.items()}
        po = torch.softmax(sem["objects"].float() - lb["objects"], 1)
        pb = torch.sigmoid(sem["binary"].float() - lb["binary"])
    cls = pa.argmax(1)
    oc = po.argmax(1)
    cls = torch.where(oc < no, na + oc, cls)
    bmax, bc = pb.max(1)
    cls = torch.where(bmax > 0.5, na + no + bc, cls)
    return cls.to(torch.uint8), prob


def _count_observations(xy, T_scene_view, cameras, cfg, camera_model: str) -> np.ndarray:
    """(rows, cols) uint16: views whose image contains the cell's ground point within max_depth_m
    (no occlusion test) over the grid `xy` (X, Y, 2)."""
    import torch

    from .. import geometry
    from ..grids import grid_to_raster
    from ..models.streetview import project_to_views

    X, Y = xy.shape[:2]
    pts = torch.cat([xy.reshape(-1, 2), torch.zeros_like(xy.reshape(-1, 2)[:, :1])], 1)  # N, 3
    T = geometry.Transform3D.from_matrix(T_scene_view.float()[None])
    cams = geometry.camera_from_tensor(cameras.float()[None], camera_model)
    mask = torch.ones(T.shape, dtype=torch.bool, device=pts.device)
    _, vis, _, dist = project_to_views(pts[None], T, cams, mask)  # (1, V, N)
    count = (vis & (dist <= cfg.model.max_depth_m)).sum(1, dtype=torch.int32)[0]
    return grid_to_raster(count.reshape(X, Y)).cpu().numpy().astype(np.uint16)


def _build_tile(job: TileJob, osm_layers: Any = None, payload: bytes | None = None) -> dict[str, Any]:
    """The Dask task: map one tile and write it (data chunks, `tile_inputs`, then `tile_done`)."""
    import zarr

    t0 = time.perf_counter()
    model = _tile_model(job, payload)
    out = map_tile(model, job, osm_layers)
    g = zarr.open_group(job.store, mode="r+")
    ys, xs = job.tile.inner
    for name, arr in out.items():
        if arr.ndim == 3:
            g[name][:, ys, xs] = arr
        else:
            g[name][ys, xs] = arr
    ty, tx = job.tile.index
    g["tile_inputs"][ty, tx] = np.uint64(job.views.digest)
    g["tile_done"][ty, tx] = True  # last: a killed task leaves the tile to redo
    return {"tile": job.tile.index, "seconds": time.perf_counter() - t0, "views": len(job.views.paths)}


# -- driver ----------------------------------------------------------------------------------------
def _as_region(region: Any, captures: CaptureSet, cell_m: float):
    """A Region at the model's cell size from a Region, a (W, S, E, N) lon/lat box, a shapely
    geometry in lon/lat, a GeoSeries/GeoDataFrame with a CRS, or None (the captures' extent)."""
    from ..geo import Region

    if region is None:
        return Region.from_bounds(captures.bounds, captures.crs, cell_m)
    if isinstance(region, Region):
        if math.isclose(region.resolution, cell_m):
            return region
        return Region.from_bounds(region.bounds, region.crs, cell_m)
    if hasattr(region, "geometry") and hasattr(region, "crs") and hasattr(region, "union_all"):
        return Region.from_geometry(region.union_all(), region.crs, cell_m)
    if hasattr(region, "geom_type"):
        return Region.from_geometry(region, "EPSG:4326", cell_m)
    box = [float(v) for v in region]
    if len(box) != 4:
        raise ValueError(f"region must be a Region, a (W, S, E, N) lon/lat box or a polygon, got {region!r}")
    return Region.from_bbox(*box, resolution=cell_m)


def _tile_views(captures: CaptureSet, tile, radius_m: float, index: tuple[np.ndarray, np.ndarray] | None = None
                ) -> TileViews:
    """The views whose camera lies within the inner tile + radius (the halo only gives the CNNs
    context: street-view voxels are lifted on the inner tile, each block from its own nearest views).
    index: (absolute paths, row keys) of all captures, computed once by the caller."""
    paths, keys = index if index is not None else (np.array([str(p) for p in captures.paths()], dtype=object),
                                                   np.array(captures.row_keys(), dtype=object))
    xmin, ymin, xmax, ymax = tile.region.window(*tile.crop).bounds
    # A superset of every block's views: blocks may reach one block size beyond the tile.
    m = radius_m + BLOCK_PX * tile.region.resolution
    rows = captures.within((xmin - m, ymin - m, xmax + m, ymax + m))
    h = hashlib.sha256("\n".join(sorted(keys[rows])).encode()).digest()
    digest = int.from_bytes(h[:8], "little") or 1  # 0 is the store's "never built"
    return TileViews(tuple(paths[rows]), captures.T_world_cam(rows), captures.cameras(rows), digest,
                     tuple(keys[rows]))


@contextlib.contextmanager
def _writer_lock(out: Path):
    """The store's exclusive writer lock (neuralmaps.storage.writer_lock); a second concurrent
    build is refused at once with StoreLockedError naming the holder."""
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(writer_lock(out, what="neural map"))
    except StoreInUseError as e:
        raise StoreLockedError(f"{e}; stop it and rerun to resume") from None
    with stack:
        yield


def _inputs(captures: CaptureSet, captures_path: Any, aerial: Any, osm: Any) -> dict[str, Any]:
    return {
        "captures": {"path": str(captures_path) if captures_path else str(captures.root),
                     "fingerprint": captures.fingerprint(), "images": len(captures)},
        "aerial": None if aerial is None else {"path": str(aerial), "sha256": sha256_of(aerial)},
        "osm": None if osm is None else {"path": str(osm), "sha256": sha256_of(osm)},
    }


def build_map(
    region: Any = None,
    captures: CaptureSet | str | os.PathLike | None = None,
    aerial: str | os.PathLike | None = None,
    osm: str | os.PathLike | None = None,
    checkpoint: Any = "pretrained",
    out: str | os.PathLike = "map.zarr",
    client: Any = None,
    tile_m: float = DEFAULT_TILE_M,
    halo_m: float = DEFAULT_HALO_M,
    *,
    workers: int = 1,
    scheduler: str | None = None,
    threads_per_worker: int = 1,
    processes: bool | None = None,
    update: bool = False,
    overwrite: bool = False,
    view_radius_m: float | None = None,
    max_views: int = DEFAULT_MAX_VIEWS,
    device: str = "auto",
    resources: dict[str, float] | None = None,
    retries: int = 2,
    progress: bool = True,
    norm_from: str | os.PathLike | NeuralMap | None = None,
) -> NeuralMap:
    """Build (or resume, or update) the neural map `out` of `region`. Returns the `NeuralMap`.

    region: a `geo.Region`, a (W, S, E, N) WGS84 box, a polygon (lon/lat) or GeoSeries; default the
        captures' extent. The map grid is the region at the model's `scene.cell_m`.
    captures: a `CaptureSet` or a capture directory (`captures.parquet`).
    aerial: orthophoto GeoTIFF (any CRS); osm: OSM .pbf/.gpkg (rasterized per tile).
    checkpoint: a path (`SNAP.save`), "pretrained" (`SNAP.from_pretrained`), or a SNAP instance.
    client: any `distributed.Client`; else `scheduler` (address), else an embedded LocalCluster of
        `workers` workers on 127.0.0.1 with the dashboard off (threads in-process for one worker).
    tile_m / halo_m: tile side (= the store's chunk) and halo, metres (rounded to cells).
    update: rebuild only the tiles whose set of views changed (new captures); without it a store
        built from other captures is refused. overwrite: delete an existing store first.
    view_radius_m: views up to this far outside the tile are used (default model.max_depth_m);
        max_views caps the views of each 16 m block (nearest first), bounding worker memory.
    device: "auto" (CUDA when the worker has it), "cpu" or "cuda"; resources: Dask task resources,
        e.g. {"GPU": 1} for GPU workers. retries: per-task retries (lost workers, transient errors).
    norm_from: an existing map (path or NeuralMap) built with the same model whose fixed GroupNorm
        statistics to use instead of estimating them on this region (`norm_statistics`), so that
        adjacent or overlapping maps have the same features where they meet.
    Raises StoreLockedError when another build writes `out`, ValueError for incompatible stores or
    bad input, RuntimeError when tiles failed after their retries.
    """
    import shutil

    from tqdm.auto import tqdm

    from ..config import CLASS_NAMES

    out = Path(out)
    if captures is None:
        raise ValueError("build_map needs captures (a CaptureSet or a capture directory)")
    captures_path = None
    if not isinstance(captures, CaptureSet):
        captures_path = Path(captures)
        captures = CaptureSet.open(captures_path)
    for name, p in (("aerial", aerial), ("osm", osm)):
        if p is not None and not Path(p).is_file():
            raise FileNotFoundError(f"{name} file not found: {p}")
    model = load_model(checkpoint)
    cfg = model.config
    cell = cfg.scene.cell_m
    region = _as_region(region, captures, cell)
    captures = captures.to_crs(region.crs)
    tile_px = max(1, int(round(tile_m / cell / GRID_MULTIPLE))) * GRID_MULTIPLE
    halo_px = max(0, int(round(halo_m / cell)))
    radius = float(cfg.model.max_depth_m if view_radius_m is None else view_radius_m)
    tiles = region.tiles(tile_px, halo_px)
    semantics = hasattr(model, "semantic_net")
    confidence = model.mapper.confidence is not None
    msha = model_sha256(model)
    inputs = _inputs(captures, captures_path, aerial, osm)
    build = {"view_radius_m": radius, "max_views": int(max_views), "tile_m": tile_px * cell, "halo_m": halo_px * cell,
             "grid_multiple": GRID_MULTIPLE, "norm": {"group_norm": "fixed", "windows": NORM_WINDOWS}}
    attrs = {
        "format": STORE_FORMAT, "model_sha256": msha, "config": json.dumps(cfg.to_dict(), sort_keys=True),
        "checkpoint": str(checkpoint) if not hasattr(checkpoint, "state_dict") else "<in-memory SNAP>",
        "camera_model": model.camera_model, "inputs": json.dumps(inputs, sort_keys=True),
        "region": json.dumps(region.to_dict()), "tile_px": tile_px, "halo_px": halo_px,
        "class_names": list(CLASS_NAMES), "build": json.dumps(build, sort_keys=True),
        "neuralmaps_version": __import__("neuralmaps").__version__,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with _writer_lock(out):
        if overwrite and out.exists():
            if read_attrs(out) is None:
                raise ValueError(f"{out}: exists and is not a neural-map store; refusing to delete it")
            shutil.rmtree(out)
        layers = None
        given = _norm_from(norm_from, msha)
        if out.exists():
            _check_compatible(out, attrs, update)
            norm = read_attrs(out)["norm_stats"]  # the statistics the store was started with
            if given is not None and json.loads(given) != json.loads(norm):
                raise ValueError(f"{out}: the existing map was built with other GroupNorm statistics than "
                                 f"{norm_from}; use another --out, or --overwrite")
        else:
            layers = _read_layers(osm, region)
            norm = given or json.dumps(norm_statistics(model, region, None if aerial is None else str(aerial), layers),
                                       sort_keys=True)
            attrs["norm_stats"] = norm
            variables = store_variables(cfg.model.feature_dim, cfg.model.matching_dim, len(CLASS_NAMES),
                                        confidence=confidence, semantics=semantics)
            sizes = {"feature": cfg.model.feature_dim, "band": cfg.model.matching_dim}
            if semantics:
                sizes["class"] = len(CLASS_NAMES)
            create_store(out, region, tile_px, variables, sizes, CLASS_NAMES, attrs)
        import zarr

        g = zarr.open_group(str(out), mode="r+")
        done = np.asarray(g["tile_done"][:], bool)
        built_from = np.asarray(g["tile_inputs"][:], np.uint64)
        index = (np.array([str(p) for p in captures.paths()], dtype=object), np.array(captures.row_keys(), dtype=object))
        views = {t.index: _tile_views(captures, t, radius, index) for t in tiles}
        if update:
            stale = [t.index for t in tiles if done[t.index] and np.uint64(views[t.index].digest) != built_from[t.index]]
            for ty, tx in stale:  # cleared before rebuilding: a kill now leaves them to redo
                g["tile_done"][ty, tx] = False
                done[ty, tx] = False
            g.attrs["inputs"] = attrs["inputs"]
        todo = [t for t in tiles if not done[t.index]]
        if todo:
            if layers is None:
                layers = _read_layers(osm, region)
            _run_tiles(todo, views, out, model, msha, aerial, layers, norm, semantics, confidence, radius, max_views,
                       client, workers,
                       scheduler, threads_per_worker, processes, device, resources, retries, progress, len(tiles), tqdm)
    return NeuralMap.open(out)


def _norm_from(source: Any, msha: str) -> str | None:
    """The `norm_stats` attribute of the map `source` (None: no source), checked to come from the
    same model."""
    if source is None:
        return None
    path = Path(source.path if isinstance(source, NeuralMap) else source)
    attrs = read_attrs(path)
    if attrs is None or "norm_stats" not in attrs:
        raise ValueError(f"norm_from={path}: not a neural map with GroupNorm statistics")
    if attrs.get("model_sha256") != msha:
        raise ValueError(f"norm_from={path}: built with another model; its statistics do not apply")
    return attrs["norm_stats"]


def _check_compatible(out: Path, attrs: dict, update: bool) -> None:
    old = read_attrs(out)
    if old is None:
        raise ValueError(f"{out}: exists and is not a neural-map store; choose another --out")
    diff = [k for k in ("model_sha256", "config", "region", "tile_px", "halo_px", "build", "camera_model")
            if json.dumps(old.get(k), sort_keys=True) != json.dumps(attrs.get(k), sort_keys=True)]
    oi, ni = json.loads(old["inputs"]), json.loads(attrs["inputs"])
    for k in ("aerial", "osm"):
        if (oi.get(k) or {}).get("sha256") != (ni.get(k) or {}).get("sha256"):
            diff.append(f"inputs.{k}")
    if diff:
        raise ValueError(f"{out}: the existing map was built with other settings ({', '.join(diff)}); "
                         "use another --out, or --overwrite to rebuild it")
    if oi["captures"]["fingerprint"] != ni["captures"]["fingerprint"] and not update:
        raise ValueError(f"{out}: the existing map was built from other captures; pass --update (update=True) "
                         "to rebuild the tiles the new captures touch, or --overwrite")


def _read_layers(osm: Any, region) -> Any:
    """The OSM layers of the region (+ 50 m), read once by the driver; tasks crop them."""
    if osm is None:
        return None
    from ..geo import read_osm

    return read_osm(str(osm), region=region, margin_m=50.0)


def _run_tiles(todo, views, out, model, msha, aerial, layers, norm, semantics, confidence, radius, max_views, client,
               workers, scheduler,
               threads_per_worker, processes, device, resources, retries, progress, n_tiles, tqdm) -> None:
    from distributed import as_completed

    payload = checkpoint_bytes(model)
    key = msha
    with dask_client(client, workers, scheduler, threads_per_worker, processes) as c:
        threads = None if torch_threads_default(c) else 1
        c.register_plugin(ModelPlugin(key, payload, device, threads), name=f"neuralmaps-model-{key[:12]}")
        layers_f = c.scatter(layers, broadcast=True) if layers is not None else None
        token = hashlib.sha256(f"{out.resolve()}|{time.time_ns()}".encode()).hexdigest()[:10]
        futures = []
        for t, (addr, rank) in zip(todo, _worker_strips(todo, worker_addresses(c) if resources is None else [])):
            job = TileJob(str(out), t, views[t.index], None if aerial is None else str(aerial), key,
                          model.camera_model, semantics, confidence, device, radius, max_views, norm)
            where = {} if addr is None else {"workers": [addr], "allow_other_workers": True}
            futures.append(c.submit(_build_tile, job, layers_f, key=f"neuralmaps-tile-{t.tile_y}-{t.tile_x}-{token}",
                                    retries=retries, resources=resources, pure=False, priority=-rank, **where))
        errors = []
        bar = tqdm(total=n_tiles, initial=n_tiles - len(todo), desc="tiles", unit="tile", disable=not progress)
        for f in as_completed(futures):
            if f.status == "error":
                errors.append((f.key, f.exception()))
            bar.update(1)
        bar.close()
        if errors:
            k, e = errors[0]
            raise RuntimeError(f"{len(errors)} of {len(todo)} tiles failed after {retries} retries "
                               f"(first: {k}: {type(e).__name__}: {e}); rerun to resume the others")


def _worker_strips(tiles: Sequence[Any], workers: Sequence[str]) -> list[tuple[str | None, int]]:
    """(preferred worker, rank within its strip) of each tile, in `tiles`' order. The tiles, walked
    row by row in a serpentine, are cut into one contiguous strip per worker, each walked in order
    (dask priority = -rank): a worker then builds neighbouring tiles one after another and its
    image-encoding cache serves them, where dask's round robin would hand neighbours to different
    workers and encode each image on every one of them. Idle workers may still steal (or retry) any
    tile; the result does not depend on which worker builds what (`_encoded_views`)."""
    if len(workers) < 2:
        return [(None, i) for i in range(len(tiles))]
    order = sorted(range(len(tiles)), key=lambda i: (tiles[i].tile_y,
                                                     tiles[i].tile_x if tiles[i].tile_y % 2 == 0 else -tiles[i].tile_x))
    out: list[tuple[str | None, int]] = [(None, 0)] * len(tiles)
    taken = dict.fromkeys(workers, 0)  # tiles given to each strip so far = the next tile's rank
    for pos, i in enumerate(order):
        w = workers[pos * len(workers) // len(order)]
        out[i] = (w, taken[w])
        taken[w] += 1
    return out
