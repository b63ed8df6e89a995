"""neuralmaps.synth: digital twin from OSM (world, renderer, capture runs) and the pairs it writes
to training-chunk stores (the store format itself is `neuralmaps.data.store`).

Names are imported lazily so that `import neuralmaps.synth` stays light (no Embree / trimesh) for
code that only needs one part.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "World": ".world",
    "RenderOutput": ".render",
    "Appearance": ".appearance",
    "simulate_runs": ".capture",
    "Run": ".capture",
    "Frame": ".capture",
    "write_training_chunks": ".chunks",
    "write_previews": "..data.preview",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
