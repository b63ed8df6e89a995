"""neuralmaps.data: datasets over training-chunk stores."""

from .chunk_store import SPLIT_NAMES, STORE_FORMAT_VERSION
from .scene_dataset import ITEM_KEYS, SceneDataset

__all__ = ["ITEM_KEYS", "SPLIT_NAMES", "STORE_FORMAT_VERSION", "SceneDataset"]
