"""neuralmaps: SNAP neural maps in PyTorch + GIS."""

from .lazy import lazy_exports

__version__ = "0.1.0"

# The product API, imported lazily so that `import neuralmaps` stays light (no torch / Dask).
_LAZY = {"build_map": "neuralmaps.maps.build", "NeuralMap": "neuralmaps.maps.store", "CaptureSet": "neuralmaps.maps.captures"}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
