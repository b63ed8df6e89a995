"""neuralmaps: SNAP neural maps in PyTorch + GIS."""

from typing import Any

__version__ = "0.1.0"

# The product API, imported lazily so that `import neuralmaps` stays light (no torch / Dask).
_LAZY = {"build_map": "neuralmaps.maps.build", "NeuralMap": "neuralmaps.maps.store", "CaptureSet": "neuralmaps.maps.captures"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'neuralmaps' has no attribute {name!r}")
