"""neuralmaps.synth: digital twin from OSM (world, renderer, capture runs) and the pairs it writes
to training-chunk stores (the store format itself is `neuralmaps.data.store`).

Names are imported lazily so that `import neuralmaps.synth` stays light (no Embree / trimesh) for
code that only needs one part.
"""

from __future__ import annotations


from ..lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
