"""The training-chunk store's format constants and compatibility checks (read by SceneDataset,
written by `neuralmaps.synth.chunks`). Kept free of heavy imports so Dataset workers stay light."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STORE_FORMAT_VERSION = 1
SPLIT_NAMES = ("train", "val", "test")
CAMERA_MODELS = ("pinhole", "fisheye")
PAIR_DONE_SEMANTICS = (
    "pair_done[i] is written after every other variable of pair i's chunk; only pairs with "
    "pair_done == True hold valid data (others are template fill)"
)

__all__ = [
    "STORE_FORMAT_VERSION",
    "SPLIT_NAMES",
    "CAMERA_MODELS",
    "PAIR_DONE_SEMANTICS",
    "check_store_attrs",
    "read_store_attrs",
]


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


def read_store_attrs(path: str | Path) -> dict[str, Any]:
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
