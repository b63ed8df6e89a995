"""neuralmaps.maps: the product. `CaptureSet` (captures on disk, real or twin), `build_map` (the Dask
build into a georeferenced Zarr store) and `NeuralMap` (the store, its export).

Names are imported lazily so that `import neuralmaps.maps` stays light (no torch / Dask).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CaptureSet": ".captures",
    "build_map": ".build",
    "StoreLockedError": ".build",
    "NeuralMap": ".store",
    "capture_twin": ".twin",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
