"""`SceneDataset`: a torch Dataset over a training-chunk store (see docs/architecture.md).

Items are dicts of tensors in the model's layout: images (3, H, W) float32 in [0, 1], rasters in
the model-grid layout (C, X, Y) via `neuralmaps.grids.raster_to_grid`. Only pairs whose
`pair_done` marker is set are served. The Zarr store is opened lazily, once per process, so the
dataset pickles into DataLoader workers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import CLASS_NAMES, Config
from ..grids import raster_to_grid
from .store import ITEM_VARIABLES, SPLIT_NAMES, read_store_attrs

__all__ = ["SceneDataset", "ITEM_KEYS", "heldout_blocks", "item_from_arrays"]

ITEM_KEYS = (
    "map_images",
    "map_T_scene_view",
    "map_cameras",
    "map_view_mask",
    "aerial",
    "semantic",
    "query_image",
    "query_T_scene_cam",
    "query_camera",
    "scene_origin",
    "index",
)


def _image(a: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, -3))).float().div_(255.0)


def heldout_blocks(path: str | os.PathLike) -> tuple[str, float, frozenset[tuple[int, int]]]:
    """(CRS WKT, split block side in metres, the (bx, by) blocks of the val and test splits) of a
    store: the areas that training on any store of the same CRS must not touch."""
    import zarr

    attrs = read_store_attrs(Path(path))
    layout = json.loads(attrs["split_blocks"])
    blocks = frozenset(tuple(int(v) for v in key.split(",")) for key, split in layout.items() if split != "train")
    crs = str(zarr.open_group(str(path), mode="r")["spatial_ref"].attrs.get("crs_wkt", ""))
    return crs, float(attrs["split_block_m"]), blocks


class SceneDataset(Dataset):
    """Map-scene / query pairs of one split of a training-chunk store.

    Args:
        path: the Zarr store written by `neuralmaps synth` / `write_training_chunks`.
        split: "train", "val" or "test".
        config: when given, its `scene` section must match the store's (else ValueError).
        holdout: other stores whose val and test areas this dataset must not touch: pairs in a
            split block that is val or test there are dropped (stores of another CRS or block
            size cannot overlap block for block and are refused). Training on several stores of
            one city thus never sees the areas any of them evaluates on.
        only_blocks: when given, pairs outside these (bx, by) split blocks are dropped too (counted
            in `num_held_out`): a warm start keeps to the blocks its weights already trained on, so
            that every area they were evaluated on stays unseen (another store's split layout,
            which depends on its run counts, may deal those areas to train).
    """

    def __init__(self, path: str | os.PathLike, split: str, config: Config | None = None,
                 holdout: tuple[str | os.PathLike, ...] = (),
                 only_blocks: frozenset[tuple[int, int]] | None = None):
        import zarr

        self.path = Path(path)
        check_split(split)
        attrs = read_store_attrs(self.path)
        self.split = split
        self.store_config = Config.from_dict(json.loads(attrs["config"]))
        check_pairs_source(self.path, "store", attrs.get("scene_fingerprint"), self.store_config,
                           attrs.get("class_names", []), config, "regenerate the store with this config")
        self.class_names = tuple(attrs["class_names"])
        self.attrs = attrs
        g = zarr.open_group(str(self.path), mode="r")
        done = np.asarray(g["pair_done"][:], dtype=bool)
        splits = np.asarray(g["split"][:])
        keep = done & (splits == SPLIT_NAMES.index(split))
        self.crs_wkt = str(g["spatial_ref"].attrs.get("crs_wkt", ""))
        self.num_held_out = 0
        pair_blocks = [(int(bx), int(by)) for bx, by in np.asarray(g["block"][:])] \
            if holdout or only_blocks is not None else []
        for other in holdout:
            crs, block_m, blocks = heldout_blocks(other)
            if crs != self.crs_wkt or block_m != float(attrs["split_block_m"]):
                raise ValueError(f"holdout store {other} is in another CRS or split-block size than {self.path}; "
                                 "its areas cannot be matched block for block")
            hit = np.array([b in blocks for b in pair_blocks], dtype=bool) & keep
            self.num_held_out += int(hit.sum())
            keep &= ~hit
        if only_blocks is not None:
            out = np.array([b not in only_blocks for b in pair_blocks], dtype=bool) & keep
            self.num_held_out += int(out.sum())
            keep &= ~out
        self.indices = np.flatnonzero(keep)
        self._group: Any = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def _arrays(self) -> dict[str, Any]:
        """The Zarr arrays read per item, opened once per process (DataLoader workers get their own)."""
        if self._group is None or self._pid != os.getpid():
            import zarr

            g = zarr.open_group(str(self.path), mode="r")
            self._group = {name: g[name] for name in ITEM_VARIABLES}
            self._pid = os.getpid()
        return self._group

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_group"], state["_pid"] = None, None
        return state

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= k < len(self):
            raise IndexError(f"index {k} out of range for {len(self)} {self.split} pairs in {self.path}")
        i = int(self.indices[k])
        return item_from_arrays({name: np.asarray(arr[i]) for name, arr in self._arrays().items()}, i)

    def __repr__(self) -> str:
        return f"SceneDataset({str(self.path)!r}, split={self.split!r}, {len(self)} pairs)"


def check_split(split: str) -> None:
    if split not in SPLIT_NAMES:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLIT_NAMES}")


def check_pairs_source(path: Path, kind: str, scene_fingerprint: str | None, source_config: Config,
                       class_names: Any, config: Config | None, remedy: str) -> None:
    """What a source of pairs (a store, a pack) must match before it serves items: the scene config
    the caller trains with (when given) and the project's classes. Raises ValueError naming `kind`."""
    if config is not None and config.fingerprint("scene") != scene_fingerprint:
        raise ValueError(
            f"{path}: {kind} was written with scene config {scene_fingerprint} ({source_config.name!r}), "
            f"not {config.fingerprint('scene')} ({config.name!r}); {remedy}"
        )
    if list(class_names) != list(CLASS_NAMES):
        raise ValueError(f"{path}: {kind} classes {list(class_names)} != {list(CLASS_NAMES)}")


def item_from_arrays(a: dict[str, np.ndarray], index: int) -> dict[str, torch.Tensor]:
    """One pair's stored arrays (`ITEM_VARIABLES`, the store's dtypes and layouts) -> the item the
    model takes (`ITEM_KEYS`): the one place where a stored pair becomes tensors."""
    return {
        "map_images": _image(a["map_image"]),
        "map_T_scene_view": torch.from_numpy(a["map_T_scene_view"]).float(),
        "map_cameras": torch.from_numpy(a["map_camera"]).float(),
        "map_view_mask": torch.from_numpy(a["map_view_mask"].astype(bool)),
        "aerial": raster_to_grid(torch.from_numpy(a["aerial"]).float().div_(255.0)).contiguous(),
        "semantic": raster_to_grid(torch.from_numpy(a["semantic"]).float()).contiguous(),
        "query_image": _image(a["query_image"]),
        "query_T_scene_cam": torch.from_numpy(a["query_T_scene_cam"]).float(),
        "query_camera": torch.from_numpy(a["query_camera"]).float(),
        "scene_origin": torch.from_numpy(a["scene_origin"]).double(),
        "index": torch.tensor(index, dtype=torch.int64),
    }
