"""Semantic classes: names, groups, channel order, ids, void, burn priorities and colours.

The one home of the class semantics (ground floor: no torch, no GIS). Everything that labels,
rasterizes, renders, trains on or draws classes imports them from here.

- Three groups, as in SNAP: AREA_CLASSES are exclusive per pixel (a ground surface);
  OBJECT_CLASSES are exclusive with an implicit "void" (no object); BINARY_CLASSES are
  independent.
- CLASS_NAMES = areas + objects + binary is the channel order of every multi-hot class raster
  (rasterize_osm, training stores, SceneDataset, the semantic net) and `class_id(name)` is a
  class's index in it, which is also its label value in the twin's ground raster and renders.
- VOID (255) is the label of "no class": sky, dynamic occluders, unmapped ground, unobserved map
  cells in predicted class maps.
- Burn priorities (rasterizing OSM, later wins): areas terrain < road < sidewalk < crosswalk <
  building; objects tree < fence < pole.
"""

from __future__ import annotations

__all__ = [
    "AREA_CLASSES", "OBJECT_CLASSES", "BINARY_CLASSES", "CLASS_NAMES", "VOID", "VOID_NAME",
    "OBJECT_CLASSES_VOID", "AREA_PRIORITY", "OBJECT_PRIORITY", "CLASS_COLORS", "NO_CLASS_COLOR", "class_id",
]

# The order is the channel order of every class raster.
AREA_CLASSES = ("crosswalk", "sidewalk", "road", "terrain", "building")
OBJECT_CLASSES = ("fence", "pole", "tree")  # exclusive, plus an implicit "void"
BINARY_CLASSES = ("traffic_sign", "traffic_light", "street_light")
CLASS_NAMES = AREA_CLASSES + OBJECT_CLASSES + BINARY_CLASSES

VOID = 255  # label value of "no class" (sky, occluders, unmapped ground, unobserved cells)
VOID_NAME = "void"
OBJECT_CLASSES_VOID = OBJECT_CLASSES + (VOID_NAME,)  # the object group's softmax classes

# Rasterizing: within a group, shapes of a later class overwrite earlier ones.
AREA_PRIORITY = ("terrain", "road", "sidewalk", "crosswalk", "building")
OBJECT_PRIORITY = ("tree", "fence", "pole")

# One colour per class, RGB in [0, 1] (previews, legends, QGIS styles).
CLASS_COLORS = {
    "crosswalk": (1.00, 1.00, 1.00),
    "sidewalk": (0.85, 0.60, 0.85),
    "road": (0.35, 0.35, 0.40),
    "terrain": (0.45, 0.75, 0.30),
    "building": (0.80, 0.30, 0.20),
    "fence": (0.65, 0.50, 0.20),
    "pole": (0.10, 0.10, 0.10),
    "tree": (0.05, 0.45, 0.10),
    "traffic_sign": (1.00, 0.85, 0.00),
    "traffic_light": (0.00, 0.80, 0.90),
    "street_light": (1.00, 0.50, 0.00),
}
NO_CLASS_COLOR = (0.93, 0.93, 0.86)  # cells without any class (unmapped ground)

_IDS = {name: i for i, name in enumerate(CLASS_NAMES)}


def class_id(name: str) -> int:
    """Index of a class in CLASS_NAMES: its channel in class rasters and its label value in renders."""
    try:
        return _IDS[name]
    except KeyError:
        raise ValueError(f"unknown class {name!r}; the classes are {CLASS_NAMES}") from None


assert set(AREA_PRIORITY) == set(AREA_CLASSES) and set(OBJECT_PRIORITY) == set(OBJECT_CLASSES)
assert set(CLASS_COLORS) == set(CLASS_NAMES) and len(CLASS_NAMES) < VOID
