"""neuralmaps.maps: the product. `CaptureSet` (captures on disk, real or twin), `build_map` (the Dask
build into a georeferenced Zarr store) and `NeuralMap` (the store, its export, and its queries: `neuralmaps.maps.query`).

Names are imported lazily so that `import neuralmaps.maps` stays light (no torch / Dask).
"""

from __future__ import annotations


from ..lazy import lazy_exports

_EXPORTS = {
    "CaptureSet": ".captures",
    "build_map": ".build",
    "StoreLockedError": ".build",
    "NeuralMap": ".store",
    "capture_twin": ".twin",
    "QueryError": ".query",
    "LocalizationResult": ".query",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
