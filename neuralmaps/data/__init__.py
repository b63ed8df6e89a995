"""neuralmaps.data: the training-chunk store (`store`: format, create, open, check, write, lock),
its previews and the torch dataset over it."""

try:  # stores opened with plain xarray get `.rio.crs`
    import rioxarray  # noqa: F401
except ImportError:  # a machine with torch alone (a lent GPU) still trains from packs (`packed`)
    pass

from .scene_dataset import ITEM_KEYS, SceneDataset
from .store import SPLIT_NAMES, STORE_FORMAT_VERSION

__all__ = ["ITEM_KEYS", "SPLIT_NAMES", "STORE_FORMAT_VERSION", "SceneDataset"]
