"""neuralmaps.models: the SNAP network (encoders, street-view encoder, BEV mapper, localizer,
semantic net) in PyTorch."""

from .bev import BEVMapper, FeaturePlane, MatchingHead, VerticalPooling, fuse_modalities, query_grid
from .encoders import ImageEncoder, SemanticRasterEncoder
from .localizer import Localizer, LocalizerOutput, PosePrior
from .semantic import SemanticNet
from .snap import MODALITIES, MODALITY_FLAGS, SEMANTIC_MODALITIES, SNAP, NeuralMapTile, parse_modalities, select_modalities
from .streetview import StreetViewEncoder, lift_views_to_points

__all__ = [
    "SNAP",
    "MODALITIES",
    "MODALITY_FLAGS",
    "SEMANTIC_MODALITIES",
    "parse_modalities",
    "select_modalities",
    "NeuralMapTile",
    "Localizer",
    "LocalizerOutput",
    "PosePrior",
    "BEVMapper",
    "FeaturePlane",
    "MatchingHead",
    "VerticalPooling",
    "fuse_modalities",
    "query_grid",
    "ImageEncoder",
    "SemanticRasterEncoder",
    "SemanticNet",
    "StreetViewEncoder",
    "lift_views_to_points",
]
