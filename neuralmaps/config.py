"""Dataclass configs with named presets (`paper`, `cpu-tiny`) and YAML io.

A `Config` is saved next to every checkpoint, every training store and every map, so that a
reader can refuse data made with an incompatible setup (see `Config.fingerprint`).

Sections and their owners:
- `scene`: the map-scene grid and the cameras; shared by the digital twin, the stores and the model.
- `model`: the SNAP network (encoders, BEV mapper, localizer, semantic net).
- `synth`: the digital twin's capture simulation.
- `train`: optimisation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

# Semantic classes live in neuralmaps.classes; re-exported here for `from neuralmaps.config import ...`.
from .classes import AREA_CLASSES, BINARY_CLASSES, CLASS_NAMES, OBJECT_CLASSES  # noqa: F401


def _added_later(default: Any, absent: Any, *, neutral: bool = False) -> Any:
    """A config field that configs written before it existed lack: `default` for new configs,
    `absent` (what the code did before the field existed) when a saved config is read without it.
    neutral: at its `absent` value the field is left out of hashes (`Config.hash_dict`), so that
    fingerprints and model checksums of data made before it existed still match."""
    meta = {"absent": absent, "neutral": neutral}
    if isinstance(default, (list, tuple, dict)):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class SceneConfig:
    """Map scene and cameras. Scene frame: x east, y north, z up, metres, origin at the SW corner
    of the scene grid at ground level."""

    size_m: tuple[float, float, float] = (24.0, 32.0, 12.0)  # x, y, z extent of the voxel grid
    cell_m: float = 0.2  # voxel / BEV cell size
    num_views: int = 8  # map views per scene
    image_hw: tuple[int, int] = (256, 512)  # street-level image height, width (pixels)
    hfov_deg: float = 90.0  # horizontal field of view of the rig cameras
    map_camera_height_m: float = 2.0  # car roof rig
    query_camera_height_m: float = 1.6  # pedestrian
    query_depth_m: float = 16.0  # query BEV frustum depth
    query_hfov_deg: float = 72.0  # query BEV frustum HFOV
    max_view_distance_m: float = 24.0  # views farther from the scene centre are dropped


@dataclass
class EncoderConfig:
    """ResNet + FPN image encoder."""

    depth: int = 50  # 18, 34 or 50
    width: int = 64  # channels of the first stage
    norm: str = "group"  # "group" (BiT: GroupNorm + weight standardisation) or "batch"
    num_levels: int = 4  # pyramid levels used by the FPN
    out_dim: int = 128
    output_stride: int = 4  # stride of the FPN output w.r.t. the input image


@dataclass
class ModelConfig:
    """The SNAP network. Filled in by the model code; see neuralmaps/models."""

    image_encoder: EncoderConfig = field(default_factory=EncoderConfig)
    aerial_encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig(depth=50))
    # SNAP's semantic-raster encoder: root-less BiT R26 at width x2 (128 channels in the first stage).
    semantic_encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig(depth=26, width=128))
    feature_dim: int = 128
    matching_dim: int = 32
    num_depth_bins: int = 32
    min_depth_m: float = 1.0
    max_depth_m: float = 32.0
    top_k_views: int = 4  # SNAP: top_k_view_selection=4
    max_view_distance_m: float | None = None  # voxels whose nearest observing view is farther are invalid
    fusion_minmax: bool = False  # also pool min/max over views (SNAP default: mean + variance only)
    pooling: str = "max"  # vertical pooling: max, mean, sum, weighted, softmax, mlp
    z_offset_m: float = -4.0  # bottom of the vertical pooling range w.r.t. the camera height
    z_jitter_m: float = 2.0  # training-time jitter of the query z offset (SNAP: scene_z_offset_range ±2 m)
    use_streetview: bool = True
    use_aerial: bool = True
    use_semantic: bool = True
    modality_dropout: float = 0.3
    # Map confidence head (sigmoid). Off as in SNAP: the localization loss does not train it.
    confidence_head: bool = False
    # Point scores are multiplied by exp(temperature), a learned scalar initialised here (SNAP:
    # init_temperature=2.0, so the starting scale is e^2 ~ 7.4).
    temperature_init: float = 2.0
    num_pose_samples: int = 20000
    # RANSAC poses sampled per query in training only (a cost knob); None: `num_pose_samples`.
    train_pose_samples: int | None = _added_later(None, None, neutral=True)
    num_pose_retries: int = 8
    refine_grid: int = 5
    # Localizer knobs (no weights depend on them; saved with every checkpoint).
    num_query_points: int | None = None  # query cells scored per query; None: every valid frustum cell (SNAP)
    # Query cells scored per query in training only (a cost knob); None: `num_query_points`.
    train_query_points: int | None = _added_later(None, None, neutral=True)
    # Pose score over the query points: "mean" (SNAP) or "sum". The sum is SNAP's score times the
    # number of points, i.e. a temperature N times larger; on a CPU budget of ~1e3 steps it learns
    # far faster (cpu-tiny fit test, 100 steps on 24 pairs: NLL 7.7 -> 5.9 with the mean, 35 -> 2.5
    # with the sum over 256 points), since the learned temperature moves ~1e-3 per step.
    score_reduction: str = "mean"
    # Point scores: "raw" tau·ReLU(f·m) (SNAP) or "log_ratio", the per-point log-softmax over the
    # map cells plus log(#valid cells): 0 for an uninformative match, a contrastive signal per
    # point (the voting mode scores this way too).
    point_scores: str = "raw"
    # Point-to-cell similarity: "relu" tau·ReLU(f·m) (SNAP) or "linear" tau·(f·m). With ReLU a
    # modality whose features all point away from the query's (f·m < 0 everywhere) scores 0 and
    # gets no gradient: it can never learn to localize alone (measured on run 4: aerial-only maps
    # at cos -0.9 to street view's, 0 % recall). Log-ratio scores need no clamp.
    similarity: str = _added_later("relu", "relu", neutral=True)
    # RANSAC matches: "softmax" draws (point, cell) from the full joint softmax (SNAP); "local_maxima"
    # from each point's `num_matches` best 3x3 local maxima; "mixed" half of the poses each. With
    # ~1e3 steps instead of SNAP's 4e5, the untrained temperature leaves the full softmax nearly
    # uniform and its poses nearly random: easy negatives that teach little.
    proposals: str = "softmax"
    num_matches: int = 8
    # Training NLL: also count the refined candidates (the poses the estimate comes from) in the
    # partition over poses. The sampled poses alone miss the best wrong poses: with distractor
    # scenes (TrainConfig.distractor_scenes) the run-7 weights scored NLL 0.3 while their estimate
    # was 7.7 m off (SNAP: the samples only).
    refined_negatives: bool = _added_later(False, False, neutral=True)
    num_coarse_points: int = 64  # voting: query cells of the coarse level
    coarse_cells: int = 32  # voting: coarse grid cells along the map's longer side
    num_candidates: int = 8  # K poses refined and returned in `topk`
    keep_candidates: int = 2  # candidates refined past the first local-grid iteration
    final_step_cells: float = 0.25  # local refinement stops below these steps
    final_step_deg: float = 0.25
    # Evaluation: an exhaustive grid of ±refine_range_m, ±refine_range_deg around the best
    # candidates before the local refinement (SNAP: ±4 m, ±5°); 0 disables it.
    refine_range_m: float = 4.0
    refine_range_deg: float = 5.0
    # Semantic-raster encoder: class embedding size before its ResNet (SNAP: 8).
    semantic_embedding_dim: int = 8
    # Semantic net (decoder over the frozen map): "mlp" (SNAP default) or "resnet".
    semantic_decoder: str = "mlp"
    semantic_dim: int = 128
    semantic_layers: int = 2
    # The "resnet" decoder's normalisation: "encoder" (as image_encoder.norm), "batch" or "none".
    # GroupNorm statistics span the whole decoded grid, so a tiled build's classes would depend on
    # where tiles fall; batch norm at inference (running statistics) and "none" are local.
    semantic_norm: str = _added_later("encoder", "encoder", neutral=True)
    # Class frequencies for the loss weights (SNAP's, from its cities): AREA_CLASSES order, and
    # OBJECT_CLASSES + BINARY_CLASSES + void. `neuralmaps.models.semantic.class_frequencies`
    # measures them on a training set.
    area_frequencies: tuple[float, ...] = (0.036434, 0.226553, 0.446990, 0.085374, 0.204649)
    object_frequencies: tuple[float, ...] = (0.006257, 0.001172, 0.001924, 0.000960, 0.000559, 0.000738, 0.988391)


# The twin's building styles (neuralmaps.synth.styles.STYLES holds their definitions).
BUILDING_STYLES = ("stucco", "brick", "panel", "glass", "wood", "industrial")


QUERY_PLACEMENTS = ("ahead", "anywhere")  # SynthConfig.query_placement


@dataclass
class SynthConfig:
    """Digital-twin capture simulation, and how much the twin varies (docs/architecture.md,
    "Digital twin"). Stores written before the variation knobs existed read back without
    variation (no styles, no tag dropout), which is what their twins had."""

    min_views_in_scene: int = 4
    max_pairs_per_scene: int = 1
    query_max_time_delta_days: float = 365.0
    occluders: bool = True
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train, val, test, by area
    # Building styles drawn per building (facade / roof palettes, wall texture, window pattern,
    # height when OSM has none); () keeps the single original palette and OSM's default heights.
    building_styles: tuple[str, ...] = _added_later(BUILDING_STYLES, ())
    # Mean fraction of optional OSM tags (neuralmaps.geo.osm.OPTIONAL_TAGS: sidewalk / crossing
    # subtypes, crossing nodes, lanes, width, building:levels, height, building type) dropped per
    # feature where the twin reads OSM; the class rasters follow the dropped tags.
    tag_dropout: float = _added_later(0.3, 0.0)
    # Side (m) of the CRS-aligned districts over which the style mix and the dropout rate vary
    # (rich and sparse districts, districts of one or two styles); 0: the same everywhere.
    district_m: float = _added_later(200.0, 0.0)
    # Where a pair's scene lies around its query camera. "ahead": the scene centre a few metres in
    # front of the camera, so every query looks into its scene (stores before this field): the
    # scene's edges then tell the pose, which no map of a city does, and a model trained on it
    # localizes at chance with a 15 m prior on a built map (docs/results.md). "anywhere": the
    # camera uniform over the scene (1 m from its edges), its heading free. Neutral: old stores keep
    # their fingerprints.
    query_placement: str = _added_later("anywhere", "ahead", neutral=True)

    def __post_init__(self) -> None:  # one spelling per value, so that fingerprints agree
        self.building_styles = tuple(str(v) for v in self.building_styles)
        self.tag_dropout, self.district_m = float(self.tag_dropout), float(self.district_m)
        if self.query_placement not in QUERY_PLACEMENTS:
            raise ValueError(f"synth.query_placement must be one of {QUERY_PLACEMENTS}, got {self.query_placement!r}")


@dataclass
class TrainConfig:
    batch_size: int = 8
    lr: float = 1e-4
    steps: int = 200_000
    num_workers: int = 4
    seed: int = 0
    # Learning-rate schedule (SNAP): constant for `constant_fraction` of the steps, then cosine
    # decay to 0; `warmup_steps` of linear warm-up first (0 in SNAP).
    constant_fraction: float = 0.5
    warmup_steps: int = 0
    grad_clip: float | None = None  # max gradient norm; None: no clipping (SNAP)
    semantic_steps: int = 20_000
    semantic_lr: float | None = None  # None: `lr`
    ckpt_every: int = 100  # steps between checkpoints (what a kill can lose at most)
    eval_every: int = 500  # steps between validation evaluations
    val_limit: int | None = 64  # validation pairs evaluated during training (None: all)
    # Training negatives from elsewhere (beyond SNAP): each query is localized in a row of its own
    # scene and this many other scenes of the batch, as a wide prior on a city map asks it to
    # (SNAP: 0, the scene is the whole search area). See SNAP.loss.
    distractor_scenes: int = _added_later(0, 0, neutral=True)


@dataclass
class Config:
    name: str = "paper"
    scene: SceneConfig = field(default_factory=SceneConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # -- io ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        """The config of a saved dict (strict: unknown keys are refused). A field missing from `d`
        takes its default, or, for fields added later (`_added_later`), the value that reproduces
        what the code did before the field existed."""
        return _from_dict(cls, d)

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load_yaml(cls, path: str | Path) -> "Config":
        return cls.from_dict(yaml.safe_load(Path(path).read_text()))

    def with_overrides(self, overrides: "list[str] | dict[str, Any]") -> "Config":
        """A copy with dotted overrides applied: ["model.matching_dim=16", "train.batch_size=8"]
        or {"model.matching_dim": 16}. Values are parsed as YAML; unknown keys are refused."""
        d = self.to_dict()
        items = overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in overrides]
        for key, value in items:
            node, parts = d, key.split(".")
            for i, part in enumerate(parts):
                if not isinstance(node, dict) or part not in node:
                    known = sorted(node) if isinstance(node, dict) else []
                    raise ValueError(f"unknown config key {'.'.join(parts[: i + 1])!r} in override {key!r}; "
                                     f"known here: {known}")
                if i < len(parts) - 1:
                    node = node[part]
            if isinstance(node[parts[-1]], dict):
                raise ValueError(f"override {key!r} names a section; give one of its fields")
            node[parts[-1]] = value
        return Config.from_dict(d)

    def hash_dict(self) -> dict[str, Any]:
        """`to_dict` without the fields added later that hold their `absent` value and are marked
        neutral: what fingerprints and model checksums hash, so that adding such a field does not
        orphan the stores and maps made before it."""
        return _hash_dict(self)

    def fingerprint(self, *sections: str) -> str:
        """Short sha256 of the given sections (all when none), to detect incompatible data."""
        d = self.hash_dict()
        if sections:
            d = {k: d[k] for k in sections}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _hash_dict(obj: Any) -> dict[str, Any]:
    out = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if is_dataclass(v):
            out[f.name] = _hash_dict(v)
        elif not (f.metadata.get("neutral") and _to_plain(v) == _to_plain(f.metadata["absent"])):
            out[f.name] = _to_plain(v)
    return out


def _split_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like section.field=value (e.g. model.matching_dim=16)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ValueError(f"override {item!r}: cannot parse the value ({e})") from None
    return key.strip(), value


def _to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def _from_dict(cls: type, d: dict[str, Any]) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = set(d) - set(known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {sorted(unknown)}")
    kwargs = {}
    defaults = cls()
    for name, value in d.items():
        current = getattr(defaults, name)
        if is_dataclass(current):
            kwargs[name] = _from_dict(type(current), value)
        elif isinstance(current, tuple):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    for name, f in known.items():  # fields added after `d` was written: what the code did then
        if name not in d and "absent" in f.metadata:
            kwargs[name] = f.metadata["absent"]
    return cls(**kwargs)


def _paper() -> Config:
    return Config(name="paper")


def _cpu_tiny() -> Config:
    # Sizes chosen so that a training run fits in ~90 min on 2 CPU cores (see docs/architecture.md).
    return Config(
        name="cpu-tiny",
        scene=SceneConfig(
            size_m=(24.0, 32.0, 12.0),
            cell_m=0.5,
            num_views=8,
            image_hw=(128, 256),
        ),
        # Model sized by measurement (benchmarks/bench_model.py, 2 threads, shared machine): a
        # training step (B=4 scenes of 8 views + 4 queries, forward + backward + Adam) takes 1.8 s
        # wall at load 1.7 (2.3-4.8 s at load 3-6), peak RSS ~1.8 GB, so ~3000 steps fit in
        # 90 min when the machine is not shared. The cost
        # is ~60% lifting (48x64x24 voxels x top-3 views x feature_dim), ~15% image encoder, the
        # rest localizer and query. Hence: R18 at width 16 with 3 levels (stride 4 on 128x256
        # views), 32-d features (lifting cost is linear in it), 16-d matching. GroupNorm (BiT, as
        # SNAP) everywhere: the same speed as BatchNorm here, and no dependence on the small batch
        # (4 rasters, 4 query images). The full 32 depth bins cost nothing extra (2 are gathered).
        model=ModelConfig(
            image_encoder=EncoderConfig(depth=18, width=16, norm="group", num_levels=3, out_dim=32),
            aerial_encoder=EncoderConfig(depth=18, width=16, norm="group", num_levels=3, out_dim=32),
            semantic_encoder=EncoderConfig(depth=18, width=16, norm="group", num_levels=3, out_dim=32),
            feature_dim=32,
            matching_dim=16,
            # Training samples 2048 RANSAC poses a query; evaluation 8192 (held-out pairs, run-10
            # weights, every query cell: 9.0 / 31.0 / 40.0 % with 2048, 10.5 / 34.0 / 44.5 % with 8192,
            # 10.5 / 35.0 / 43.5 % with SNAP's 20000; 0.30 / 0.45 / 0.74 s a query).
            num_pose_samples=8192,
            train_pose_samples=2048,
            num_pose_retries=4,
            # Training scores a random 256 of the ~750 valid frustum cells (1/3 of the scoring cost);
            # evaluation every one, as SNAP: on the 200 held-out pairs (run-10 weights, RANSAC)
            # 9.0 / 31.0 / 40.0 % at (1 m, 1°) / (3 m, 3°) / (5 m, 5°) against 5.5 / 28.5 / 35.5 % with
            # 256, at 2.3x the time a query (0.30 vs 0.13 s; docs/results.md).
            num_query_points=None,
            train_query_points=256,
            score_reduction="sum",
            # `python -m training.fit` (from scratch, 100 steps on 24 train pairs; recall@3 m of
            # those pairs, median error): raw scores + full-softmax proposals (SNAP) 58 %, 2.3 m;
            # log-ratio + mixed 50 %, 3.0 m; log-ratio + local maxima 71 %, 1.3 m. On val (80
            # warm-started steps) the three are within noise (docs/results.md): a deviation kept for
            # the fit test and because the shipped model was trained with it, not yet shown on val.
            point_scores="log_ratio",
            # Run 4 left the aerial branch dead under the ReLU (see ModelConfig.similarity); from
            # run 5 on, linear similarities (a no-op wherever f·m > 0, as on every street-view cell).
            similarity="linear",
            proposals="local_maxima",
            # 3x3 context instead of SNAP's per-cell MLP: on the held-out "anywhere" pairs (demo area,
            # blocks B; run-9 maps, 400 decoder steps) area mIoU 47.5 % (MLP, ~2000 steps over runs) ->
            # 66.2 % (GroupNorm) -> 68.4 % (batch norm, which is also local: tiled builds stay exact).
            semantic_decoder="resnet",
            semantic_norm="batch",
            semantic_dim=64,
        ),
        train=TrainConfig(batch_size=4, lr=1e-3, steps=3000, num_workers=1, warmup_steps=50,
                          semantic_steps=400, ckpt_every=50, eval_every=250, val_limit=48),
    )


PRESETS = {"paper": _paper, "cpu-tiny": _cpu_tiny}


def preset(name: str) -> Config:
    """A fresh copy of a named preset: "paper" (SNAP's defaults) or "cpu-tiny" (trains on 2 CPU cores)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
