"""Material ids of the digital twin's ground raster and mesh faces, and their base albedos.

Albedos are linear RGB in [0, 1]; `Appearance` (season) modulates them at render time.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

# Class ids and VOID live in neuralmaps.classes; re-exported for the twin's modules.
from neuralmaps.classes import VOID, class_id  # noqa: F401


class GroundMat(IntEnum):
    BARE = 0  # unmapped ground: packed earth / gravel
    ASPHALT = 1
    PAVING = 2  # sidewalk slabs
    ZEBRA = 3  # crossing stripe paint
    LANE = 4  # lane-marking paint
    RAIL = 5  # tram rail steel
    GRASS = 6
    WATER = 7
    PARKING = 8
    FOOTPRINT = 9  # under buildings (only visible through gaps)
    PLAZA = 10  # pedestrian areas, squares (cobbles)
    FOREST = 11
    SAND = 12


GROUND_ALBEDO = np.array(
    [
        (0.30, 0.27, 0.23),  # BARE
        (0.13, 0.13, 0.14),  # ASPHALT
        (0.42, 0.40, 0.38),  # PAVING
        (0.80, 0.80, 0.78),  # ZEBRA
        (0.78, 0.77, 0.70),  # LANE
        (0.06, 0.06, 0.06),  # RAIL
        (0.20, 0.36, 0.12),  # GRASS (season-tinted)
        (0.05, 0.10, 0.16),  # WATER
        (0.20, 0.20, 0.21),  # PARKING
        (0.25, 0.25, 0.25),  # FOOTPRINT
        (0.36, 0.31, 0.27),  # PLAZA
        (0.12, 0.24, 0.08),  # FOREST (season-tinted)
        (0.55, 0.50, 0.38),  # SAND
    ],
    dtype=np.float32,
)
# How much each ground material takes the season's vegetation tint (1) / snow cover (per material).
GROUND_VEGETATION = np.zeros(len(GroundMat), np.float32)
GROUND_VEGETATION[[GroundMat.GRASS, GroundMat.FOREST]] = 1.0
GROUND_SNOW = np.array([0.8, 0.25, 0.6, 0.2, 0.2, 0.3, 1.0, 0.0, 0.35, 0.0, 0.6, 0.9, 0.9], np.float32)


class FaceMat(IntEnum):
    PLAIN = 0  # the face's own colour
    FACADE = 1  # procedural windows / storeys from the building's parameters
    ROOF = 2  # building roof colour with a seam pattern
    FOLIAGE = 3  # tree crowns: season colour times the face's variation
