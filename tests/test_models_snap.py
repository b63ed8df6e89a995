"""SNAP end to end on tiny configs: gradients, bfloat16 autocast, checkpoints, devices."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models_helpers import tiny_batch, tiny_config

from neuralmaps.config import preset
from neuralmaps.devices import to_device
from neuralmaps.models import SNAP, NeuralMapTile
from neuralmaps.models.bev import query_grid



def _model(cfg, device="cpu", seed=0) -> SNAP:
    torch.manual_seed(seed)
    return SNAP(cfg).to(device)


def test_localization_loss_reaches_every_mapper_parameter(device):
    cfg = tiny_config(norm="group", pooling="softmax")
    cfg.model.modality_dropout = 0.0  # else a dropped modality's encoder gets no gradient this step
    model = _model(cfg, device).train()
    out = model.loss(to_device(tiny_batch(cfg), device), generator=torch.Generator(device).manual_seed(0))
    assert out["total"].ndim == 0 and torch.isfinite(out["total"])
    assert out["nll"].shape == (2,) and out["err_xy_m"].shape == (2,)
    out["total"].backward()
    no_grad = sorted(n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0)
    # Only the semantic net is outside the localization loss (it is trained on the frozen map).
    assert no_grad and all(n.startswith("semantic_net.") for n in no_grad), no_grad
    assert model.localizer.log_temperature.grad.abs() > 0
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name


def test_semantic_loss_trains_only_the_decoder_and_leaves_the_map_frozen():
    cfg = tiny_config(norm="batch")
    model = _model(cfg).train()
    batch = tiny_batch(cfg)
    bn_before = {k: v.clone() for k, v in model.mapper.state_dict().items() if "running" in k}
    out = model.semantic_loss(batch)
    out["total"].backward()
    for name, p in model.named_parameters():
        has = p.grad is not None and p.grad.abs().sum() > 0
        assert has == name.startswith("semantic_net."), name
    for k, v in model.mapper.state_dict().items():
        if k in bn_before:
            assert torch.equal(v, bn_before[k]), f"{k} changed: the map must stay frozen"
    assert model.mapper.training  # mode restored
    for key in ("area/accuracy", "area/iou/road", "object/recall/void", "binary/iou/street_light"):
        assert key in out


def test_bfloat16_autocast_matches_float32(device):
    cfg = tiny_config(norm="group")
    model = _model(cfg, device).eval()
    batch = to_device(tiny_batch(cfg), device)
    with torch.no_grad():
        ref, q_ref = model.map(batch), model.query(batch)
        with torch.autocast(device, dtype=torch.bfloat16):
            low, q_low = model.map(batch), model.query(batch)
            loc = model.localize(batch, low, generator=torch.Generator(device).manual_seed(0))
    assert torch.equal(ref.valid, low.valid) and torch.equal(q_ref.valid, q_low.valid)
    rel = (ref.features - low.features.float()).norm() / ref.features.norm()
    assert rel < 0.08, rel
    for a, b, v in ((ref.matching, low.matching, ref.valid), (q_ref.features, q_low.features, q_ref.valid)):
        cos = F.cosine_similarity(a, b.float(), dim=1)[v]
        assert cos.mean() > 0.995 and torch.quantile(cos, 0.01) > 0.97, (cos.mean(), cos.min())
    assert torch.isfinite(loc.score).all() and torch.isfinite(loc.T_map_query.t).all()
    # A bfloat16 map is usable outside autocast too (semantics, localizing a float32 query).
    with torch.no_grad():
        sem = model.semantics(low)
        loc32 = model.localize(batch, low, generator=torch.Generator(device).manual_seed(0))
    assert (sem["areas_class"] == model.semantics(ref)["areas_class"]).float().mean() > 0.95
    assert torch.isfinite(loc32.score).all()


def test_save_load_round_trip_gives_identical_outputs(tmp_path, device):
    cfg = tiny_config(norm="batch", pooling="mlp")
    model = _model(cfg, device)
    model.train()
    model.loss(to_device(tiny_batch(cfg, seed=1), device))  # move the BatchNorm statistics off init
    model.eval()
    path = tmp_path / "ckpt" / "snap.pt"
    model.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["snap.pt"]  # no temporary left behind
    loaded = SNAP.load(path, map_location=device)
    assert loaded.config.to_dict() == cfg.to_dict() and not loaded.training
    batch = to_device(tiny_batch(cfg), device)
    with torch.no_grad():
        a, b = model.map(batch), loaded.map(batch)
        sa, sb = model.semantics(a), loaded.semantics(b)
        qa, qb = model.query(batch), loaded.query(batch)
    for x, y in ((a.features, b.features), (a.matching, b.matching), (qa.features, qb.features),
                 (sa["areas_prob"], sb["areas_prob"])):
        assert torch.equal(x, y)
    # Runtime knobs may differ from the checkpoint.
    run_cfg = tiny_config(norm="batch", pooling="mlp")
    run_cfg.model.num_pose_samples = 64
    assert SNAP.load(path, config=run_cfg).localizer.num_pose_samples == 64


def test_load_rejects_mismatched_configs(tmp_path):
    cfg = tiny_config()
    path = tmp_path / "snap.pt"
    _model(cfg).save(path)
    other = tiny_config()
    other.model.feature_dim = 32
    other.model.pooling = "mean"
    with pytest.raises(ValueError, match=r"model\.feature_dim: 16 != 32.*model\.pooling: 'max' != 'mean'"):
        SNAP.load(path, config=other)
    # A checkpoint whose stored config disagrees with its weights names the mismatching tensors.
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["model"]["matching_dim"] = 4
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"snap\.pt: weights do not match.*mapper\.matching\.proj\.weight"):
        SNAP.load(path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: not a readable SNAP checkpoint"):
        SNAP.load(tmp_path / "junk.pt")


def test_map_outputs_shapes_and_invariants():
    cfg = tiny_config()
    cfg.model.confidence_head = True
    model = _model(cfg).eval()
    with torch.no_grad():
        nm = model.map(tiny_batch(cfg))
        sem = model.semantics(nm)
    assert isinstance(nm, NeuralMapTile) and nm.cell_m == 0.5
    assert nm.features.shape == (2, 16, 16, 16) and nm.matching.shape == (2, 8, 16, 16)
    assert nm.valid.all()  # aerial and semantic rasters cover the whole scene
    torch.testing.assert_close(nm.matching.norm(dim=1), torch.ones(2, 16, 16))
    assert ((nm.confidence > 0) & (nm.confidence < 1)).all()
    assert sem["areas_class"].shape == (2, 16, 16) and sem["areas_class"].dtype == torch.uint8
    torch.testing.assert_close(sem["objects_prob"].sum(1), torch.ones(2, 16, 16))
    assert sem["binary_prob"].shape == (2, 3, 16, 16)


def test_streetview_only_map_is_invalid_where_no_view_looks():
    cfg = tiny_config()
    cfg.model.use_aerial = cfg.model.use_semantic = False
    model = _model(cfg).eval()
    batch = tiny_batch(cfg)
    with torch.no_grad():
        nm = model.map(batch)
    # Views stand on the south edge looking north: cells behind them (y < 0.5 m) are unseen.
    assert not nm.valid[:, :, 0].any() and nm.valid.float().mean() > 0.3
    assert (nm.features[~nm.valid[:, None].expand_as(nm.features)] == 0).all()
    assert (nm.matching.norm(dim=1)[~nm.valid] == 0).all()


def test_query_grid_is_the_frustum():
    scene = preset("paper").scene
    xy, inside = query_grid(scene)
    assert xy.shape == (80, 120, 2)  # 16 m forward x 24 m wide at 0.2 m
    torch.testing.assert_close(xy[0, 0], torch.tensor([0.1, -11.9]))
    torch.testing.assert_close(xy[-1, -1], torch.tensor([15.9, 11.9]))
    angle = torch.rad2deg(torch.atan2(xy[..., 1], xy[..., 0]).abs())
    assert torch.equal(inside, angle <= 36.0 + 1e-4)


def test_modality_dropout_never_drops_everything():
    cfg = tiny_config()
    cfg.model.use_streetview = False
    cfg.model.modality_dropout = 0.9
    model = _model(cfg).train()
    batch = tiny_batch(cfg, B=2)
    g = torch.Generator().manual_seed(0)
    kept = []
    for _ in range(12):
        nm = model.map(batch, generator=g)
        assert nm.valid.flatten(1).all(1).all()  # never all modalities dropped
        kept.append(nm.features.detach())
    # With p = 0.9 most steps keep one modality at random: the fused maps differ between steps.
    assert any(not torch.equal(kept[0], k) for k in kept[1:])



def test_shared_modality_dropout_keeps_the_same_inputs_in_every_item():
    """fuse_modalities(shared=True): every item of the batch keeps the same modalities (the scenes
    of a distractor row are then alike, as a city map's are); per item they differ."""
    from neuralmaps.models.bev import FeaturePlane, fuse_modalities

    B = 64
    planes = [FeaturePlane(torch.full((B, 1, 2, 2), float(k + 1)), torch.ones(B, 2, 2, dtype=torch.bool))
              for k in range(3)]
    g = torch.Generator().manual_seed(0)
    for shared in (True, False):
        fused = [fuse_modalities(planes, 0.5, g, shared=shared).features[:, 0, 0, 0] for _ in range(8)]
        same = [bool((f == f[0]).all()) for f in fused]
        assert all(same) if shared else not any(same)


def test_presets_construct():
    tiny = SNAP(preset("cpu-tiny"))
    paper = SNAP(preset("paper"))
    n_tiny = sum(p.numel() for p in tiny.parameters())
    n_paper = sum(p.numel() for p in paper.parameters())
    assert n_paper > 20 * n_tiny
    assert paper.query_xy.shape == (80, 120, 2)
    assert math.isclose(paper.config.scene.cell_m, 0.2)


@pytest.mark.parametrize("yaw_deg", [0.0, 90.0, 180.0])
def test_query_bev_and_map_agree_through_the_ground_truth_pose(yaw_deg):
    """Frames end to end: lifting the query image into the query BEV grid, or (as the only map
    view) into the scene grid, must give the same features at the same places, where the query
    cell is mapped into the scene by T_gt = camera_pose_to_bev(query_T_scene_cam). The pose is
    chosen so that query cells land exactly on scene cells (no interpolation)."""
    from neuralmaps import geometry

    cfg = tiny_config(norm="group")
    cfg.scene.size_m = (16.0, 16.0, 4.0)
    cfg.model.use_aerial = cfg.model.use_semantic = False
    model = _model(cfg).eval()
    batch = tiny_batch(cfg, B=1)
    T_bev = geometry.Transform2D(torch.tensor([math.radians(yaw_deg)]), torch.tensor([[8.0, 8.0]]))
    T_scene_cam = geometry.bev_pose_to_camera(T_bev, 1.7, pitch=0.1)
    batch["query_T_scene_cam"] = T_scene_cam.matrix()
    map_batch = {
        "map_images": batch["query_image"][:, None],
        "map_T_scene_view": T_scene_cam.matrix()[:, None],
        "map_cameras": batch["query_camera"][:, None],
        "map_view_mask": torch.ones(1, 1, dtype=torch.bool),
    }
    with torch.no_grad():
        scene_plane = model.mapper.map_planes(map_batch)[0]
        q = model.mapper.query_plane(batch["query_image"], model.query_T_bev_cam(batch), batch["query_camera"])
    T_gt = geometry.camera_pose_to_bev(T_scene_cam)
    assert torch.cos(T_gt.angle - T_bev.angle).item() > 1 - 1e-6
    xy_scene = T_gt[0].transform(model.query_xy.reshape(-1, 2)).reshape(*model.query_xy.shape)
    ij = xy_scene / cfg.scene.cell_m - 0.5
    torch.testing.assert_close(ij, ij.round(), atol=1e-4, rtol=0)  # lands on cell centres
    ij = ij.round().long()
    inside = ((ij >= 0) & (ij < 32)).all(-1) & q.valid[0]
    assert inside.sum() > 100
    i, j = ij[inside].unbind(-1)
    assert scene_plane.valid[0, i, j].all()
    torch.testing.assert_close(q.features[0][:, inside], scene_plane.features[0][:, i, j], atol=1e-4, rtol=1e-4)


def test_map_tiles_of_another_size_follow_their_rasters():
    """Mapping a larger tile: the street-view grid follows the rasters' size, and the cells that
    the scene-sized map covers get the same street-view features."""
    cfg = tiny_config(norm="group")
    model = _model(cfg).eval()
    batch = tiny_batch(cfg, B=1)
    big = {k: v for k, v in batch.items() if k != "semantic"}
    big["aerial"] = torch.rand(1, 3, 24, 20)  # 12 m x 10 m tile instead of 8 x 8
    with torch.no_grad():
        planes = model.mapper.map_planes(batch)
        planes_big = model.mapper.map_planes(big)
        nm = model.map(big)
    assert nm.features.shape[-2:] == (24, 20) and planes_big[0].features.shape[-2:] == (24, 20)
    torch.testing.assert_close(planes_big[0].features[..., :16, :16], planes[0].features, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="map modalities disagree"):
        model.mapper.map_planes(dict(big, semantic=batch["semantic"]))  # only aerial is resized


def test_localize_fills_the_loss_only_with_ground_truth_and_when_training_or_asked():
    cfg = tiny_config()
    model = _model(cfg).eval()
    batch = tiny_batch(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        nm = model.map(batch)
        assert model.localize(batch, nm, generator=g).loss is None
        out = model.localize(batch, nm, with_loss=True, generator=g)
        assert out.loss.shape == (2,) and torch.isfinite(out.loss).all()
        no_gt = {k: v for k, v in batch.items() if k != "query_T_scene_cam"}
        model.train()
        blind = model.localize(no_gt, nm, generator=g)  # a level camera at the nominal height
        assert blind.loss is None and blind.T_map_query.shape == (2,)
        with pytest.raises(KeyError, match="query_T_scene_cam"):
            model.localize(no_gt, nm, with_loss=True)


def test_fisheye_model_maps_and_keeps_its_camera_model(tmp_path):
    cfg = tiny_config()
    cfg.model.use_aerial = cfg.model.use_semantic = False
    torch.manual_seed(0)
    model = SNAP(cfg, camera_model="fisheye").eval()
    batch = tiny_batch(cfg, B=1)
    batch["map_cameras"][..., 6] = -0.05  # k1: barrel distortion
    with torch.no_grad():
        nm = model.map(batch)
        pinhole = SNAP(cfg).eval()
        pinhole.load_state_dict(model.state_dict())
        nm_pinhole = pinhole.map(batch)
    assert nm.valid.any() and not torch.equal(nm.features, nm_pinhole.features)
    model.save(tmp_path / "f.pt")
    assert SNAP.load(tmp_path / "f.pt").camera_model == "fisheye"


def test_edge_cases_give_clear_errors_or_sane_maps(tmp_path):
    cfg = tiny_config()
    model = _model(cfg).eval()
    batch = tiny_batch(cfg)
    batch["map_view_mask"][1] = False  # the second scene has no street-level view at all
    with torch.no_grad():
        planes = model.mapper.map_planes(batch)
        nm = model.map(batch)
    assert planes[0].valid[0].any() and not planes[0].valid[1].any()
    assert (planes[0].features[1] == 0).all()
    assert nm.valid.all()  # aerial and semantic still cover it
    with pytest.raises(ValueError, match=r"\(B, V, 3, H, W\)"):
        model.map(dict(batch, map_images=batch["map_images"][:, :, :1]))
    with pytest.raises(KeyError, match="map_cameras"):
        model.map({k: v for k, v in batch.items() if k != "map_cameras"})
    with pytest.raises(KeyError, match="query_camera"):
        model.query({k: v for k, v in batch.items() if k != "query_camera"})
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        SNAP.load(tmp_path / "nothere.pt")
    with pytest.raises(ValueError, match="at least one of use_streetview"):
        cfg2 = tiny_config()
        cfg2.model.use_streetview = cfg2.model.use_aerial = cfg2.model.use_semantic = False
        SNAP(cfg2)


def test_a_neutral_field_added_later_keeps_old_checksums():
    # `model.similarity` came after maps had been built with the shipped model: a checkpoint whose
    # config lacks it reads back as "relu" and hashes as before, so those maps still open; "linear"
    # is another model.
    import hashlib
    import json

    from neuralmaps.config import Config
    from neuralmaps.maps.workers import model_sha256

    old = tiny_config().to_dict()
    del old["model"]["similarity"]
    del old["train"]["distractor_scenes"]  # neutral fields added later still
    del old["model"]["refined_negatives"]
    old["model"]["num_query_points"] = 256  # before train_query_points: one knob for both
    del old["model"]["train_query_points"]
    del old["model"]["train_pose_samples"]
    cfg = Config.from_dict(old)
    assert cfg.model.similarity == "relu" and cfg.hash_dict() == old
    assert cfg.fingerprint() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    model = SNAP(cfg)
    linear = SNAP(cfg.with_overrides({"model.similarity": "linear"}))
    linear.load_state_dict(model.state_dict())
    assert model_sha256(linear) != model_sha256(model)



def test_distractor_row_holds_each_scene_once_and_the_truth_where_its_scene_went():
    """`with_distractor_scenes`: every item's row holds its own map at the returned offset, the
    other scenes of the batch in the other slots, empty gaps between them, and a scene whose
    origin lies near the item's own is left empty (it may show the same place)."""
    from neuralmaps.models.snap import with_distractor_scenes

    B, D, X, Y, cell, G = 3, 4, 6, 5, 0.5, 4  # G: a 2 m gap
    feats = torch.randn(B, D, X, Y)
    tile = NeuralMapTile(feats, F.normalize(feats, dim=1), torch.ones(B, X, Y, dtype=torch.bool),
                         torch.rand(B, X, Y), cell)
    origin = torch.tensor([[0.0, 0.0], [500.0, 0.0], [10.0, 20.0]], dtype=torch.float64)  # 2 is near 0
    slots = set()
    for seed in range(12):
        row, dx = with_distractor_scenes(tile, origin, 2, 2.0, torch.Generator().manual_seed(seed))
        assert row.matching.shape == (B, D, 3 * X + 2 * G, Y) and row.valid.shape == (B, 3 * X + 2 * G, Y)
        for b in range(B):
            found = {}
            for s in range(3):
                cells = slice(s * (X + G), s * (X + G) + X)
                k = next(k for k in range(B) if torch.equal(row.features[b, :, cells], tile.features[k]))
                found[k] = s
                torch.testing.assert_close(row.matching[b, :, cells], tile.matching[k])
                near = k != b and {b, k} == {0, 2}
                assert bool(row.valid[b, cells].all()) is not near and bool(row.valid[b, cells].any()) is not near
                if s < 2:  # the gap after it: no features, never valid
                    gap = slice(s * (X + G) + X, (s + 1) * (X + G))
                    assert not row.valid[b, gap].any() and not row.matching[b, :, gap].any()
            assert sorted(found) == [0, 1, 2]  # each scene once
            assert dx[b].item() == found[b] * (X + G) * cell  # the own scene's offset
            slots.add(found[b])
    assert slots == {0, 1, 2}  # the own scene is not always first
    with pytest.raises(ValueError, match=r"count must be in \[1, B-1\] = \[1, 2\]"):
        with_distractor_scenes(tile, origin, 3, 2.0)


def test_loss_with_distractor_scenes_finds_the_truth_where_its_scene_went(device):
    """A perfect map (each scene lifted from its own query image, as in the frames test): in a row
    of its scene and another, the estimate lands on the ground truth moved with its scene (< 1 m),
    not in the other scene. In training mode the loss is finite and reaches the mapper. On CUDA the
    generator is a CUDA one, as a GPU training run passes."""
    from neuralmaps import geometry

    cfg = tiny_config(norm="group")
    cfg.scene.size_m = (16.0, 16.0, 4.0)
    cfg.model.use_aerial = cfg.model.use_semantic = False
    cfg.model.modality_dropout = 0.0
    model = _model(cfg, device)
    batch = tiny_batch(cfg, B=2)
    T_bev = geometry.Transform2D(torch.tensor([0.3, 2.0]), torch.tensor([[5.0, 8.0], [9.0, 7.0]]))
    T_scene_cam = geometry.bev_pose_to_camera(T_bev, 1.7, pitch=0.1).matrix()
    batch |= {
        "query_T_scene_cam": T_scene_cam,
        "map_images": batch["query_image"][:, None],
        "map_T_scene_view": T_scene_cam[:, None],
        "map_cameras": batch["query_camera"][:, None],
        "map_view_mask": torch.ones(2, 1, dtype=torch.bool),
        "scene_origin": torch.tensor([[0.0, 0.0], [300.0, 0.0]], dtype=torch.float64),
    }
    batch = to_device(batch, device)
    model.eval()
    for seed in range(3):
        with torch.no_grad():
            out = model.loss(batch, generator=torch.Generator(device).manual_seed(seed), distractors=1)
        assert out["err_xy_m"].max() < 1.0 and out["err_yaw_deg"].max() < 2.0, (out["err_xy_m"], out["err_yaw_deg"])
    model.train()
    out = model.loss(batch, generator=torch.Generator(device).manual_seed(0), distractors=1)
    assert torch.isfinite(out["total"]) and out["nll"].shape == (2,)
    out["total"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if n.startswith("mapper."))


def test_refined_negatives_put_the_best_wrong_poses_into_the_partition():
    """ModelConfig.refined_negatives: the NLL's partition also counts the refined candidates, with
    gradients: the same search, an NLL never below the samples-only one and above it where a
    refined pose adds mass, and the temperature learns from it."""
    cfg = tiny_config(norm="group")
    cfg.model.modality_dropout = 0.0
    model = _model(cfg).train()
    batch = tiny_batch(cfg, B=4, seed=3)
    nll, score = {}, {}
    for flag in (False, True):
        model.localizer.refined_negatives = flag
        out = model.localize(batch, model.map(batch), with_loss=True, generator=torch.Generator().manual_seed(0))
        nll[flag], score[flag] = out.loss, out.score
    torch.testing.assert_close(score[False], score[True])  # the same search
    assert (nll[True] >= nll[False] - 1e-4).all() and (nll[True] > nll[False] + 1e-3).any()
    nll[True].sum().backward()
    assert model.localizer.log_temperature.grad.abs() > 0
