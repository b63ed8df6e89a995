"""Packed training pairs: the pairs of training-chunk stores in a few portable files, for a machine
without the geo stack (a lent GPU with torch alone) or a transfer limit.

A pack is a folder: `pack.json` (written last: the stores' scene config, classes, CRS, split-block
size, and each shard's pair count and sha256) and shards `<split>-NNN.npz`. A shard holds every
pair's images as JPEG (query first, then the map views; an unused view is 0 bytes and reads as
zeros), the rasters as uint8 (the semantic one bit-packed) and the poses and cameras as stored.
JPEG is the only loss: at quality 90 the images differ from the store's by a few grey levels.

`PackedPairs` serves the items of `SceneDataset` (same keys, dtypes, layouts), with numpy and
Pillow alone.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import Config
from ..storage import atomic_write_bytes, atomic_write_text, swap_into_place, temp_sibling
from .scene_dataset import check_pairs_source, check_split, item_from_arrays

__all__ = ["PACK_FORMAT_VERSION", "PackedPairs", "is_pack", "write_pack"]

PACK_FORMAT_VERSION = 1
MANIFEST = "pack.json"
_POSES = ("map_T_scene_view", "map_camera", "map_view_mask", "query_T_scene_cam", "query_camera",
          "scene_origin")


def is_pack(path: str | os.PathLike) -> bool:
    """Whether `path` is a pack folder (by its manifest)."""
    return (Path(path) / MANIFEST).is_file()


def _jpeg(image: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _unjpeg(data: bytes, hw: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if not data:
        return np.zeros((*hw, 3), np.uint8)
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def write_pack(sources: Sequence[tuple[Any, str]], out: str | os.PathLike, *, quality: int = 90,
               shard_mb: float = 56.0, progress: bool = True) -> dict:
    """Pack the pairs of `sources` ((SceneDataset, split name) each, all of one scene config, CRS and
    split-block size) into the folder `out` (new or empty), shards of at most `shard_mb` MiB.
    Returns the manifest. The manifest is written last: a folder without one is not a pack."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: give a new folder for the pack")
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality {quality} is outside 1..100")
    if not sources:
        raise ValueError("nothing to pack: no source datasets")
    first = sources[0][0]
    for ds, _ in sources:
        if ds.crs_wkt != first.crs_wkt or ds.attrs["split_block_m"] != first.attrs["split_block_m"] \
                or ds.attrs["scene_fingerprint"] != first.attrs["scene_fingerprint"]:
            raise ValueError(f"{ds.path} differs from {first.path} in CRS, split-block size or scene config: "
                             "pack stores of one city and one scene config together")
    # Built aside and moved into place whole: a crash leaves no half pack at `out` (only a hidden
    # `.<name>.tmp-*` folder if the process was killed outright).
    out.parent.mkdir(parents=True, exist_ok=True)
    work = temp_sibling(out, "tmp")
    work.mkdir()
    try:
        manifest = _write_shards(sources, work, quality, shard_mb, progress)
        swap_into_place(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest


def _write_shards(sources: Sequence[tuple[Any, str]], out: Path, quality: int, shard_mb: float,
                  progress: bool) -> dict:
    from tqdm.auto import tqdm

    first = sources[0][0]
    shards: list[dict] = []
    budget = int(shard_mb * 2**20)
    total = sum(len(ds) for ds, _ in sources)
    bar = tqdm(total=total, desc="pack", unit="pair", disable=not progress)

    def flush(split: str, items: list[dict]) -> None:
        if not items:
            return
        name = f"{split}-{sum(s['split'] == split for s in shards):03d}.npz"
        blobs = [b for it in items for b in it["jpeg"]]
        lengths = np.array([[len(b) for b in it["jpeg"]] for it in items], np.int64)
        arrays = {k: np.stack([it[k] for it in items]) for k in items[0] if k != "jpeg"}
        buf = io.BytesIO()
        np.savez(buf, jpeg=np.frombuffer(b"".join(blobs), np.uint8), jpeg_lengths=lengths, **arrays)
        data = buf.getvalue()
        atomic_write_bytes(out / name, data)
        shards.append({"file": name, "split": split, "pairs": len(items), "bytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest()})

    import zarr

    items: list[dict] = []
    size, current = 0, sources[0][1]
    for src, (ds, split) in enumerate(sources):
        if split != current:  # a shard holds one split
            flush(current, items)
            items, size, current = [], 0, split
        arrays = ds._arrays()
        blocks = np.asarray(zarr.open_group(str(ds.path), mode="r")["block"][:], np.int32)
        for i in ds.indices:
            a = {name: np.asarray(arr[int(i)]) for name, arr in arrays.items()}
            mask = a["map_view_mask"].astype(bool)
            it = {
                "jpeg": [_jpeg(a["query_image"], quality)]
                        + [_jpeg(v, quality) if m else b"" for v, m in zip(a["map_image"], mask)],
                "aerial": a["aerial"].astype(np.uint8),
                "semantic": np.packbits(a["semantic"].astype(bool), axis=0),
                "index": np.int64(i), "source": np.int16(src), "block": blocks[int(i)],
                **{k: a[k] for k in _POSES},
            }
            n = sum(map(len, it["jpeg"])) + it["aerial"].nbytes + it["semantic"].nbytes + 2048
            if items and size + n > budget:
                flush(split, items)
                items, size = [], 0
            items.append(it)
            size += n
            bar.update()
    flush(current, items)
    bar.close()
    manifest = {
        "neuralmaps_pack": PACK_FORMAT_VERSION,
        "config": json.loads(first.attrs["config"]),
        "scene_fingerprint": first.attrs["scene_fingerprint"],
        "class_names": list(first.class_names),
        "num_classes": len(first.class_names),
        "crs_wkt": first.crs_wkt,
        "split_block_m": float(first.attrs["split_block_m"]),
        "sources": [{"path": str(ds.path), "split": split, "pairs": len(ds), "held_out": ds.num_held_out}
                    for ds, split in sources],
        "jpeg_quality": quality,
        "shards": shards,
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


class PackedPairs(Dataset):
    """The pairs of one split of a pack (see the module), as `SceneDataset` items.

    Args:
        path: the pack folder.
        split: "train", "val" or "test" (the shards of that split).
        config: when given, its `scene` section must match the pack's (else ValueError).
        only_blocks: when given, pairs outside these (bx, by) split blocks are dropped (counted in
            `num_held_out`), as in `SceneDataset`.
        verify: check each shard's sha256 against the manifest (a transfer that broke off).
    """

    def __init__(self, path: str | os.PathLike, split: str, config: Config | None = None,
                 only_blocks: Iterable[tuple[int, int]] | None = None, verify: bool = True):
        self.path = Path(path)
        if not is_pack(self.path):
            raise FileNotFoundError(f"{self.path} is not a pack (no {MANIFEST})")
        self.manifest = m = json.loads((self.path / MANIFEST).read_text())
        if m.get("neuralmaps_pack") != PACK_FORMAT_VERSION:
            raise ValueError(f"{self.path}: pack format {m.get('neuralmaps_pack')}, this code reads {PACK_FORMAT_VERSION}")
        check_split(split)
        self.store_config = Config.from_dict(m["config"])
        check_pairs_source(self.path, "pack", m["scene_fingerprint"], self.store_config, m["class_names"], config,
                           "pack stores of this config")
        self.split, self.crs_wkt, self.class_names = split, m["crs_wkt"], tuple(m["class_names"])
        self.hw = tuple(self.store_config.scene.image_hw)
        self._shards: list[dict[str, np.ndarray]] = []
        for s in (s for s in m["shards"] if s["split"] == split):
            f = self.path / s["file"]
            if not f.is_file():
                raise FileNotFoundError(f"{f}: shard of the pack missing (copy every file the manifest lists)")
            data = f.read_bytes()
            if verify and hashlib.sha256(data).hexdigest() != s["sha256"]:
                raise ValueError(f"{f}: checksum differs from the manifest's (a broken copy?)")
            with np.load(io.BytesIO(data)) as z:
                sh = {k: z[k] for k in z.files}
            ends = np.cumsum(sh["jpeg_lengths"].ravel()).reshape(sh["jpeg_lengths"].shape)
            sh["jpeg_ends"] = ends
            self._shards.append(sh)
        rows = [(k, j) for k, sh in enumerate(self._shards) for j in range(len(sh["index"]))]
        self.num_held_out = 0
        if only_blocks is not None:
            blocks = set(map(tuple, only_blocks))
            keep = [(k, j) for k, j in rows if tuple(int(v) for v in self._shards[k]["block"][j]) in blocks]
            self.num_held_out = len(rows) - len(keep)
            rows = keep
        self._rows = rows

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= k < len(self):
            raise IndexError(f"index {k} out of range for {len(self)} {self.split} pairs in {self.path}")
        s, j = self._rows[k]
        sh = self._shards[s]
        ends, lengths = sh["jpeg_ends"][j], sh["jpeg_lengths"][j]
        images = [_unjpeg(sh["jpeg"][e - n:e].tobytes(), self.hw) for e, n in zip(ends, lengths)]
        a = {name: sh[name][j] for name in _POSES + ("aerial",)}
        a["semantic"] = np.unpackbits(sh["semantic"][j], axis=0, count=len(self.class_names))
        a["query_image"], a["map_image"] = images[0], np.stack(images[1:])
        return item_from_arrays(a, int(sh["index"][j]))

    def __repr__(self) -> str:
        return f"PackedPairs({str(self.path)!r}, split={self.split!r}, {len(self)} pairs)"
