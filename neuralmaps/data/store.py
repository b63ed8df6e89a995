"""The training-chunk store, in one place: its format (schema, attrs, variables read by the
dataset), and how it is created, opened, checked, written and locked.

A store is a Zarr v3 group (xarray layout, CRS in `spatial_ref`) with one entry per map-scene /
query pair along `pair` (`schema`; docs/architecture.md). Writers (`neuralmaps.synth.chunks`)
produce pairs; this module puts them on disk under the rules of `neuralmaps.storage`:

- **Recognised by its attrs.** `neuralmaps_store == "training-chunks"` (or the title of stores
  written before that attribute) marks a store neuralmaps wrote; only such a folder is ever
  resumed or replaced (`check_output`). Anything else at the output path is refused, untouched.
- **Created whole.** `create_store` writes the template (metadata, no data) under a unique temp
  name and renames it into place, so a crash never leaves a half-made template.
- **Written pair chunk by pair chunk, marker last.** `StoreWriter.write` writes every variable of a
  chunk of pairs, then its `pair_done` marker. Only pairs whose marker is set hold data; a rerun
  of the same call resumes after the last marked chunk.
- **One writer.** Writers hold `writer_lock(out)` (re-exported from `neuralmaps.storage`).
- **Replaced only after the new inputs are validated.** `--overwrite` builds the new store aside
  (`storage.temp_sibling`) and swaps it in when complete (`storage.swap_into_place`).

Import-light (numpy, json; zarr/xarray inside functions) so Dataset workers stay small.
"""

from __future__ import annotations

import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..config import CLASS_NAMES, Config
from ..grids import Grid2D
from ..storage import (
    StorageError,
    StoreInUseError,
    check_writable_parent,
    remove_stale_temps,
    swap_into_place,
    temp_sibling,
    writer_lock,
)

__all__ = [
    "STORE_KIND",
    "STORE_FORMAT_VERSION",
    "SPLIT_NAMES",
    "CAMERA_MODELS",
    "PAIR_DONE_SEMANTICS",
    "ITEM_VARIABLES",
    "VARIABLE_DOCS",
    "schema",
    "format_attrs",
    "check_store_attrs",
    "read_store_attrs",
    "store_config_dict",
    "is_training_store",
    "check_output",
    "create_store",
    "open_existing",
    "StoreWriter",
    "StorageError",
    "StoreInUseError",
    "writer_lock",
    "remove_stale_temps",
    "swap_into_place",
    "temp_sibling",
]

STORE_KIND = "training-chunks"  # attrs["neuralmaps_store"]: what recognises a store neuralmaps wrote
STORE_TITLE = "neuralmaps training chunks (map scene / query pairs)"
STORE_FORMAT_VERSION = 1
SPLIT_NAMES = ("train", "val", "test")
CAMERA_MODELS = ("pinhole", "fisheye")
PAIR_DONE_SEMANTICS = (
    "pair_done[i] is written after every other variable of pair i's chunk; only pairs with "
    "pair_done == True hold valid data (others are template fill)"
)
# The variables `SceneDataset` reads for one item.
ITEM_VARIABLES = (
    "map_image", "map_T_scene_view", "map_camera", "map_view_mask", "aerial", "semantic",
    "query_image", "query_T_scene_cam", "query_camera", "scene_origin",
)


# -- format ----------------------------------------------------------------------------------------
def schema(config: Config) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], str, Any]]:
    """name -> (dims without `pair`, shape without pair, dtype, fill) of every per-pair variable."""
    Vn, (H, W) = config.scene.num_views, config.scene.image_hw
    X, Y = Grid2D(tuple(config.scene.size_m[:2]), config.scene.cell_m).num_cells
    K = len(CLASS_NAMES)
    return {
        "map_image": (("view", "y_img", "x_img", "rgb"), (Vn, H, W, 3), "uint8", 0),
        "map_T_scene_view": (("view", "row", "col"), (Vn, 4, 4), "float64", np.nan),
        "map_camera": (("view", "intrinsic"), (Vn, 8), "float64", np.nan),
        "map_camera_model": (("view",), (Vn,), "int8", -1),
        "map_run": (("view",), (Vn,), "int16", -1),
        "map_frame": (("view",), (Vn,), "int32", -1),
        "map_camera_name": (("view",), (Vn,), "int8", -1),
        "map_vehicle": (("view",), (Vn,), "int8", -1),
        "map_time_days": (("view",), (Vn,), "float64", np.nan),
        "map_view_mask": (("view",), (Vn,), "bool", False),
        "scene_origin": (("en",), (2,), "float64", np.nan),
        "aerial": (("band", "y", "x"), (3, Y, X), "uint8", 0),
        "semantic": (("class", "y", "x"), (K, Y, X), "uint8", 0),
        "query_image": (("y_img", "x_img", "rgb"), (H, W, 3), "uint8", 0),
        "query_depth": (("y_img", "x_img"), (H, W), "float32", np.nan),
        "query_labels": (("y_img", "x_img"), (H, W), "uint8", 0),
        "query_T_scene_cam": (("row", "col"), (4, 4), "float64", np.nan),
        "query_camera": (("intrinsic",), (8,), "float64", np.nan),
        "query_camera_model": ((), (), "int8", -1),
        "query_run": ((), (), "int16", -1),
        "query_frame": ((), (), "int32", -1),
        "query_camera_name": ((), (), "int8", -1),
        "query_vehicle": ((), (), "int8", -1),
        "query_time_days": ((), (), "float64", np.nan),
        "query_time_delta_days": ((), (), "float32", np.nan),
        "query_overlap": ((), (), "float32", np.nan),
        "query_observed": ((), (), "float32", np.nan),
        "split": ((), (), "int8", -1),
        "block": (("ij",), (2,), "int32", 0),
    }


VARIABLE_DOCS = {
    "map_image": "map-run views, uint8 RGB (y_img, x_img, rgb); padding views are zero",
    "map_T_scene_view": "camera-to-scene poses (OpenCV camera frame; scene frame x east, y north, z up, SW corner)",
    "map_camera": "intrinsics [w, h, fx, fy, cx, cy, k1, k2] (pixels; pixel centres at +0.5)",
    "map_camera_model": "index into attrs camera_models; -1 = padding",
    "map_run": "index into attrs runs; -1 = padding",
    "map_camera_name": "index into attrs camera_names (rig camera); -1 = padding",
    "map_vehicle": "index into attrs vehicle_types; -1 = padding",
    "query_vehicle": "index into attrs vehicle_types",
    "query_run": "index into attrs runs (never the run of a map view of the pair)",
    "map_time_days": "capture time (days since the POSIX epoch)",
    "scene_origin": "CRS easting, northing (m) of the scene's SW corner",
    "aerial": "orthophoto of the scene, north-up (row 0 north), cell_m, fixed 'aerial' appearance",
    "semantic": "class raster of the scene {0,1}, north-up, channels = attrs class_names",
    "query_depth": "renderer depth of the query view (m), NaN/inf where no hit",
    "query_labels": "renderer per-pixel labels of the query view",
    "query_T_scene_cam": "ground-truth query camera-to-scene pose",
    "query_time_delta_days": "min |query time - map view time| (days)",
    "query_overlap": "area fraction of the query BEV frustum (query_depth_m, query_hfov_deg) inside the scene",
    "query_observed": "area fraction of the query BEV frustum inside the scene and seen by a map view (ground)",
    "split": "index into attrs split_names; assigned by split block (attrs split_blocks)",
    "block": "(bx, by) split block: CRS x in [bx, bx+1) * split_block_m, same for y",
    "pair_done": "True once every other variable of the pair's chunk is written (written last)",
}


def format_attrs(config: Config) -> dict[str, Any]:
    """The attrs every store carries whatever wrote it: kind, format version, tables of codes."""
    return {
        "neuralmaps_store": STORE_KIND,
        "title": STORE_TITLE,
        "store_format_version": STORE_FORMAT_VERSION,
        "class_names": list(CLASS_NAMES),
        "pair_done_semantics": PAIR_DONE_SEMANTICS,
        "split_names": list(SPLIT_NAMES),
        "camera_models": list(CAMERA_MODELS),
    }


def check_store_attrs(attrs: dict, path: str | Path, expect: dict | None = None) -> None:
    """Raise ValueError if the store at `path` has another format version, or (when `expect` is
    given) differs from it in any of its keys."""
    v = attrs.get("store_format_version")
    if v != STORE_FORMAT_VERSION:
        raise ValueError(
            f"{path}: training-chunk store format version {v!r}, this neuralmaps reads version "
            f"{STORE_FORMAT_VERSION}; regenerate it with `neuralmaps synth`"
        )
    for key, want in (expect or {}).items():
        got = attrs.get(key)
        if got != want:
            raise ValueError(
                f"{path}: existing store was written with {key}={got!r}, not {want!r}; "
                "use another --out or pass --overwrite"
            )


def read_store_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """The root attributes of the training-chunk store at `path` (format version checked).

    Raises FileNotFoundError when there is no store, ValueError when it is not a readable
    training-chunk store of this format version."""
    import zarr

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"training-chunk store not found: {path}")
    try:
        attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception as e:  # not a zarr group
        raise ValueError(f"{path}: not a readable training-chunk store ({type(e).__name__}: {e})") from None
    check_store_attrs(attrs, path)
    return attrs


def store_config_dict(attrs: dict) -> dict:
    """The generator config (Config.to_dict()) recorded in a store's attrs."""
    return json.loads(attrs["config"])


def _root_attrs(path: Path) -> dict | None:
    """The attributes in `path/zarr.json` (Zarr v3 group metadata), or None when unreadable."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    return attrs if isinstance(attrs, dict) else None


def is_training_store(path: str | os.PathLike) -> bool:
    """Whether `path` is a training-chunk store that neuralmaps wrote (any format version), by its
    own attrs: never a guess from the folder's name or contents."""
    attrs = _root_attrs(Path(path))
    if attrs is None:
        return False
    title = attrs.get("title")
    return attrs.get("neuralmaps_store") == STORE_KIND or (isinstance(title, str) and title.startswith(STORE_TITLE))


# -- paths -----------------------------------------------------------------------------------------
def check_output(out: str | os.PathLike, overwrite: bool = False) -> tuple[Path, str]:
    """Check the output path of a store before any work: (absolute path, state), state "new"
    (nothing there, or an empty folder) or "store" (a training-chunk store neuralmaps wrote: resume
    it, or replace it with `overwrite`). Raises StorageError (one line, what to do) for an empty
    path, the current folder or one above it, a path under a regular file, an unwritable folder,
    a file, and a folder that is not a neuralmaps store (even with `overwrite`: it is never
    touched)."""
    p = check_writable_parent(out, "output")
    cwd = Path.cwd().resolve()
    rp = p.resolve()
    if rp == cwd or rp in cwd.parents:
        raise StorageError(f"output {out}: is the current folder or contains it; write the store to a new "
                           "path such as out/chunks.zarr")
    if not (p.exists() or p.is_symlink()):
        return p, "new"
    if not p.is_dir():
        raise StorageError(f"output {out}: exists and is a file, not a training-chunk store; choose another "
                           "path (nothing was touched)")
    if not os.access(p, os.W_OK | os.X_OK):
        raise StorageError(f"output {out}: folder is not writable (permission denied); choose another path")
    if is_training_store(p):
        return p, "store"
    if not any(p.iterdir()):
        return p, "new"
    raise StorageError(
        f"output {out}: exists and is not a neuralmaps training-chunk store (no neuralmaps attrs in its "
        f"zarr.json){'; --overwrite replaces only stores neuralmaps wrote' if overwrite else ''}; nothing was "
        "touched: choose another path"
    )


# -- create ----------------------------------------------------------------------------------------
def _template(num_pairs: int, config: Config, crs: Any, attrs: dict, pairs_per_chunk: int):
    import dask.array as da
    import xarray as xr

    data_vars = {}
    for name, (dims, shape, dtype, fill) in schema(config).items():
        arr = da.zeros((num_pairs, *shape), dtype=dtype, chunks=(pairs_per_chunk, *shape))
        data_vars[name] = (("pair", *dims), arr, {"description": VARIABLE_DOCS.get(name, "")})
    data_vars["pair_done"] = (("pair",), da.zeros((num_pairs,), bool, chunks=(pairs_per_chunk,)),
                              {"description": VARIABLE_DOCS["pair_done"]})
    ds = xr.Dataset(data_vars, attrs=attrs)
    ds = ds.rio.write_crs(crs)
    # An explicit encoding replaces rioxarray's grid_mapping: put it back on every variable so
    # `open_zarr(decode_coords="all").rio.crs` finds the CRS (DESIGN.md §6).
    encoding = {name: {"fill_value": fill, "grid_mapping": "spatial_ref"}
                for name, (_, _, _, fill) in schema(config).items()}
    encoding["pair_done"] = {"fill_value": False, "grid_mapping": "spatial_ref"}
    return ds, encoding


def create_store(path: str | os.PathLike, num_pairs: int, config: Config, crs: Any, attrs: dict,
                 pairs_per_chunk: int = 1) -> Path:
    """Create an empty store (the template: metadata, every `pair_done` False) at `path`, which must
    not exist or be an empty folder. `attrs` (the writer's: config, seed, source, runs ...) are
    stored with `format_attrs(config)`. Written under a unique temp name, then renamed into place,
    so a crash never leaves a half-made template at `path`."""
    import rioxarray  # noqa: F401  (.rio)

    path = Path(path)
    ds, encoding = _template(int(num_pairs), config, crs, {**attrs, **format_attrs(config)}, int(pairs_per_chunk))
    tmp = temp_sibling(path, "tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)
            ds.to_zarr(str(tmp), compute=False, mode="w-", zarr_format=3, encoding=encoding, consolidated=True)
        os.replace(tmp, path)  # onto nothing or an empty folder
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# -- open / check ----------------------------------------------------------------------------------
def open_existing(path: str | os.PathLike, expect: dict) -> np.ndarray:
    """`pair_done` (N,) bool of the store at `path`, after checking that it was written by the same
    call (`expect`: attrs that must match). Raises ValueError (use another path or overwrite) for
    another format version, other parameters or an unreadable store."""
    import zarr

    path = Path(path)
    try:
        g = zarr.open_group(str(path), mode="r")
        attrs = dict(g.attrs)
    except Exception as e:  # unreadable metadata
        raise ValueError(f"{path}: exists but is not a readable training-chunk store ({type(e).__name__}: {e}); "
                         "use another --out or pass --overwrite") from None
    check_store_attrs(attrs, path, expect)
    try:
        done = np.asarray(g["pair_done"][:], dtype=bool)
        missing = [name for name in [*schema(Config.from_dict(json.loads(attrs["config"]))), "pair_done"]
                   if name not in g]
    except Exception as e:  # a store damaged by hand or by an old concurrent writer
        raise ValueError(f"{path}: training-chunk store is damaged ({type(e).__name__}: {e}); "
                         "use another --out or pass --overwrite") from None
    if missing or done.shape != (int(attrs.get("num_pairs", -1)),):
        raise ValueError(f"{path}: training-chunk store is damaged (missing {missing or 'pair_done entries'}); "
                         "use another --out or pass --overwrite")
    return done


# -- write -----------------------------------------------------------------------------------------
class StoreWriter:
    """Writes chunks of pairs into an existing store: every variable, then the `pair_done` marker.

    `write(start, items)` writes pairs [start, start + len(items)), which must be exactly one chunk
    along `pair` (or the last, partial one): the chunk is the unit of writing and of resume. The
    variables of a chunk are written concurrently (threads over zarr's public array API), the
    marker only after all of them finished.
    """

    def __init__(self, path: str | os.PathLike, config: Config):
        import zarr

        self.path = Path(path)
        self.schema = schema(config)
        g = zarr.open_group(str(self.path), mode="r+")
        self.arrays = {name: g[name] for name in [*self.schema, "pair_done"]}  # opened once
        self.pairs_per_chunk = int(self.arrays["pair_done"].chunks[0])
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="neuralmaps-store")

    def write(self, start: int, items: Sequence[dict[str, np.ndarray]]) -> None:
        n = len(items)
        if start % self.pairs_per_chunk or (n != self.pairs_per_chunk and start + n != self.arrays["pair_done"].shape[0]):
            raise ValueError(f"pairs [{start}, {start + n}) are not one chunk of {self.pairs_per_chunk} pairs")
        sl = slice(start, start + n)
        data = {name: np.stack([it[name] for it in items]).astype(dtype).reshape(n, *shape)
                for name, (_, shape, dtype, _) in self.schema.items()}
        self._write_data(sl, data)
        self._mark_done(sl)

    def _write_data(self, sl: slice, data: dict[str, np.ndarray]) -> None:
        futures = [self._pool.submit(self.arrays[name].__setitem__, sl, a) for name, a in data.items()]
        for f in futures:
            f.result()  # re-raises a failed write; the marker is not written then

    def _mark_done(self, sl: slice) -> None:
        self.arrays["pair_done"][sl] = np.ones(sl.stop - sl.start, bool)  # last: the pairs are now valid

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
