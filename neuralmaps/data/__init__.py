"""neuralmaps.data: datasets over training-chunk stores."""

import rioxarray  # noqa: F401  (stores opened with plain xarray get `.rio.crs`)

from .chunk_store import SPLIT_NAMES, STORE_FORMAT_VERSION
from .scene_dataset import ITEM_KEYS, SceneDataset

__all__ = ["ITEM_KEYS", "SPLIT_NAMES", "STORE_FORMAT_VERSION", "SceneDataset"]
