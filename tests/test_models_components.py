"""Model components: encoders, vertical pooling, matching head, semantic net."""

from __future__ import annotations

import math

import pytest
import torch

from neuralmaps.config import CLASS_NAMES, EncoderConfig, ModelConfig
from neuralmaps.models.bev import FeaturePlane, MatchingHead, VerticalPooling, fuse_modalities
from neuralmaps.models.encoders import (
    FixedGroupNorm,
    ImageEncoder,
    SemanticRasterEncoder,
    ShiftMaxPool2d,
    fix_group_norms,
    fold_weight_standardization,
    group_norm_statistics,
)
from neuralmaps.models.semantic import SemanticNet, class_frequencies, semantic_labels


@pytest.mark.parametrize("depth,norm", [(18, "batch"), (50, "group"), (26, "group"), (34, "batch")])
def test_encoder_output_stride_and_size(depth, norm):
    cfg = EncoderConfig(depth=depth, width=8, norm=norm, num_levels=3, out_dim=12, output_stride=4)
    enc = ImageEncoder(cfg).eval()
    assert enc.stride == 4
    with torch.no_grad():
        assert enc(torch.rand(2, 3, 64, 96)).shape == (2, 12, 16, 24)
        # Sizes that are not multiples of the stride follow the first level's rounding.
        assert enc(torch.rand(1, 3, 30, 50)).shape == (1, 12, 8, 13)
    coarse = ImageEncoder(EncoderConfig(depth=depth, width=8, norm=norm, num_levels=3, out_dim=12, output_stride=8))
    assert coarse.stride == 8 and coarse.eval()(torch.rand(1, 3, 64, 96)).shape == (1, 12, 8, 12)


def test_rootless_encoder_keeps_map_resolution_and_sees_context():
    # BatchNorm in eval mode is local (GroupNorm would spread a change through its statistics).
    # The receptive field spans ~30 cells each way, so the raster must be larger than 60 cells for
    # its corner to be out of reach (at 40x56 a change reached every cell, the corner by chance ~0).
    torch.manual_seed(0)
    enc = ImageEncoder(EncoderConfig(depth=18, width=8, norm="batch", num_levels=3, out_dim=8), skip_root=True).eval()
    x = torch.zeros(1, 3, 64, 96)
    with torch.no_grad():
        base = enc(x)
        x[0, :, 32, 48] = 1.0  # a single bright cell
        diff = (enc(x) - base).abs().sum(1)[0]
    assert base.shape == (1, 8, 64, 96)
    assert diff[32, 48] > 0 and diff[32, 55] > 0  # the FPN spreads context beyond a 3x3 window
    assert diff[0, 0] == 0  # but not across the whole raster


def test_inference_folding_is_bit_identical():
    """Standardised weights computed once and the shifted-slice max pool: the same outputs bit for bit."""
    import copy

    torch.manual_seed(0)
    enc = ImageEncoder(EncoderConfig(depth=18, width=8, norm="group", num_levels=3, out_dim=8)).eval()
    folded = fold_weight_standardization(copy.deepcopy(enc))
    assert isinstance(folded.root[1], ShiftMaxPool2d) and type(folded.root[0]) is torch.nn.Conv2d
    x = torch.rand(2, 3, 40, 70)
    with torch.no_grad():
        assert torch.equal(enc(x), folded(x))
    for pool in (torch.nn.MaxPool2d(3, 2, 1), torch.nn.MaxPool2d(2), torch.nn.MaxPool2d((3, 2), (1, 2), (1, 0))):
        y = torch.randn(2, 3, 17, 23)
        assert torch.equal(pool(y), ShiftMaxPool2d(pool)(y))


def test_fixed_group_norm_makes_the_encoder_translation_equivariant():
    """With GroupNorm statistics fixed (estimated on a few windows), a root-less encoder's output at a cell
    depends only on the input within its receptive field: a crop shifted by 16 cells gives the same features
    inside (each input's own statistics shift them everywhere)."""
    import copy

    torch.manual_seed(0)
    enc = ImageEncoder(EncoderConfig(depth=18, width=8, norm="group", num_levels=3, out_dim=8), skip_root=True).eval()
    img = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 200, 200), 5, 1, 2)
    windows = torch.cat([img[..., i:i + 48, j:j + 64] for i in (0, 70, 140) for j in (0, 60, 120)])
    stats = group_norm_statistics(enc, windows)
    n_gn = sum(isinstance(m, torch.nn.GroupNorm) for m in enc.modules())
    assert len(stats) == n_gn and all(len(m) == len(v) for m, v in stats.values())
    fixed = fix_group_norms(copy.deepcopy(enc), stats)
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in fixed.modules())
    assert sum(isinstance(m, FixedGroupNorm) for m in fixed.modules()) == n_gn
    with torch.no_grad():
        a, b = fixed(img[..., 0:160, 0:160]), fixed(img[..., 16:176, 16:176])
        inner = (slice(None), slice(None), slice(48, 128), slice(48, 128))  # > receptive field from the borders
        assert (a[inner] - b[..., 32:112, 32:112]).abs().max() < 1e-5
        a, b = enc(img[..., 0:160, 0:160]), enc(img[..., 16:176, 16:176])
        assert (a[inner] - b[..., 32:112, 32:112]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="no statistics"):
        fix_group_norms(copy.deepcopy(enc), {})


def test_semantic_raster_encoder_embeds_classes():
    cfg = EncoderConfig(depth=18, width=8, norm="group", num_levels=2, out_dim=8)
    enc = SemanticRasterEncoder(cfg, len(CLASS_NAMES))
    raster = torch.zeros(1, len(CLASS_NAMES), 16, 16)
    raster[0, 2] = 1  # all road
    with torch.no_grad():
        a = enc(raster)
        raster[0, 2, :, 8:] = 0
        raster[0, 4, :, 8:] = 1  # east half building
        b = enc(raster)
    assert a.shape == (1, 8, 16, 16)
    assert not torch.allclose(a[..., 12:], b[..., 12:])


def test_encoder_rejects_bad_configs():
    with pytest.raises(ValueError, match="depth must be one of"):
        ImageEncoder(EncoderConfig(depth=42))
    with pytest.raises(ValueError, match="norm must be"):
        ImageEncoder(EncoderConfig(depth=18, norm="layer"))
    with pytest.raises(ValueError, match="output_stride must be one of"):
        ImageEncoder(EncoderConfig(depth=18, num_levels=2, output_stride=16))


def _volume():
    torch.manual_seed(0)
    f = torch.randn(2, 4, 3, 5, 6)
    valid = torch.rand(2, 3, 5, 6) > 0.4
    valid[0, 0, 0] = False  # an empty column
    return f, valid


@pytest.mark.parametrize("mode", ["max", "mean", "sum", "weighted", "softmax", "mlp"])
def test_vertical_pooling_respects_the_valid_mask(mode):
    f, valid = _volume()
    pool = VerticalPooling(mode, 4, num_z=6)
    plane = pool(f, valid)
    assert plane.features.shape == (2, 4, 3, 5)
    assert torch.equal(plane.valid, valid.any(-1))
    assert (plane.features[0, :, 0, 0] == 0).all()
    # Changing invalid voxels changes nothing.
    f2 = torch.where(valid[:, None], f, torch.randn_like(f) * 100)
    torch.testing.assert_close(pool(f2, valid).features, plane.features)
    m = valid[:, None].expand_as(f)
    if mode == "max":
        ref = f.masked_fill(~m, -math.inf).amax(-1).masked_fill(~plane.valid[:, None], 0)
        torch.testing.assert_close(plane.features, ref)
    elif mode == "mean":
        ref = (f * m).sum(-1) / m.sum(-1).clamp(min=1)
        torch.testing.assert_close(plane.features, ref)
    # Gradients stay finite through empty columns.
    fg = f.clone().requires_grad_()
    pool(fg, valid).features.sum().backward()
    assert torch.isfinite(fg.grad).all() and (fg.grad[~m] == 0).all()


def test_modality_fusion_is_max_over_available():
    a = FeaturePlane(torch.tensor([[[[1.0, 5.0]]]]), torch.tensor([[[True, False]]]))
    b = FeaturePlane(torch.tensor([[[[3.0, 2.0]]]]), torch.tensor([[[True, True]]]))
    fused = fuse_modalities([a, b])
    assert fused.features.flatten().tolist() == [3.0, 2.0] and fused.valid.all()


def test_matching_head_unit_variance_dot_products_before_normalisation():
    D, M = 128, 32
    torch.manual_seed(0)
    x, y = torch.randn(4096, D), torch.randn(4096, D)
    variances = []
    for _ in range(8):
        w = MatchingHead(D, M).proj.weight[:, :, 0, 0]
        variances.append(((x @ w.T) * (y @ w.T)).sum(-1).var().item())
    # SNAP init: E_W[var] = (D + M + 1) / D, i.e. unit variance up to the finite-D term (1.26 here).
    expected = (D + M + 1) / D
    assert abs(sum(variances) / len(variances) / expected - 1) < 0.1, variances
    out = MatchingHead(D, M)(FeaturePlane(torch.randn(2, D, 3, 4), torch.ones(2, 3, 4, dtype=torch.bool)))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2, 3, 4))


def _labelled_raster(X=24, Y=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = len(CLASS_NAMES)
    sem = torch.zeros(1, K, X, Y)
    area = torch.randint(0, 5, (X // 4, Y // 4), generator=g).repeat_interleave(4, 0).repeat_interleave(4, 1)
    sem[0, :5] = torch.nn.functional.one_hot(area, 5).permute(2, 0, 1).float()
    obj = torch.rand(X, Y, generator=g)
    sem[0, 5] = (obj < 0.1).float()  # fence
    sem[0, 7] = ((obj >= 0.1) & (obj < 0.2)).float()  # tree
    sem[0, 8] = (torch.rand(X, Y, generator=g) < 0.2).float()  # traffic sign
    return sem


def test_semantic_labels_and_frequencies():
    sem = _labelled_raster()
    lab = semantic_labels(sem)
    assert lab["areas_valid"].all()
    assert set(lab["objects"].unique().tolist()) <= {0, 2, 3}  # fence, tree, void
    areas, objects = class_frequencies(sem)
    assert len(areas) == 5 and math.isclose(sum(areas), 1.0, rel_tol=1e-6)
    assert len(objects) == 7 and objects[1] == 0.0 and 0.7 < objects[-1] < 0.9
    with pytest.raises(ValueError, match="CLASS_NAMES order"):
        semantic_labels(sem[:, :5])


def test_semantic_net_learns_classes_from_features():
    """A decoder on features that encode the labels (plus noise) must fit them: accuracy and
    IoU near 1 after a short training, starting near chance."""
    torch.manual_seed(0)
    sem = _labelled_raster()
    cfg = ModelConfig(feature_dim=len(CLASS_NAMES) + 4, semantic_dim=32)
    feats = torch.cat([sem * 2 - 1, torch.randn(1, 4, 24, 24)], 1) + 0.1 * torch.randn(1, cfg.feature_dim, 24, 24)
    valid = torch.ones(1, 24, 24, dtype=torch.bool)
    net = SemanticNet(cfg)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    _, before = net.loss(net(feats, valid), sem, valid)
    for _ in range(150):
        losses, metrics = net.loss(net(feats, valid), sem, valid)
        opt.zero_grad()
        losses["total"].mean().backward()
        opt.step()
    assert before["area/accuracy"] < 0.5
    assert metrics["area/accuracy"] > 0.95 and metrics["area/iou/average"] > 0.9
    assert metrics["object/recall/fence"] > 0.9 and metrics["object/recall/tree"] > 0.9
    assert metrics["binary/recall/traffic_sign"] > 0.9
    pred = SemanticNet.predict(net(feats, valid), valid)
    assert (pred["areas_class"] == semantic_labels(sem)["areas"]).float().mean() > 0.95


def test_resnet_semantic_decoder_uses_context():
    cfg = ModelConfig(feature_dim=8, semantic_decoder="resnet", semantic_dim=8, semantic_layers=1)
    cfg.image_encoder = EncoderConfig(norm="batch")
    net = SemanticNet(cfg).eval()
    feats = torch.zeros(1, 8, 12, 12)
    valid = torch.ones(1, 12, 12, dtype=torch.bool)
    with torch.no_grad():
        a = net(feats, valid)["areas"]
        feats[0, :, 6, 6] = 1.0
        b = net(feats, valid)["areas"]
    changed = (a - b).abs().sum(1)[0] > 0
    assert changed[6, 6] and changed[6, 8] and not changed[6, 11]  # 3x3 convs: a few cells around
    valid[0, :3] = False
    assert (net(feats, valid)["areas"][0, :, :3] == 0).all()
    with pytest.raises(ValueError, match="semantic_decoder"):
        SemanticNet(ModelConfig(semantic_decoder="transformer"))


@pytest.mark.parametrize("norm", ["batch", "none", "group"])
def test_resnet_semantic_decoder_reads_only_its_reach(norm):
    # A tiled build decodes each tile with `reach_cells` of context: the tile's classes must equal the
    # whole grid's. With batch norm (running statistics) or none, they do; GroupNorm's statistics span
    # the grid, so they do not (why cpu-tiny's decoder uses batch norm).
    cfg = ModelConfig(feature_dim=8, semantic_decoder="resnet", semantic_dim=8, semantic_layers=2, semantic_norm=norm)
    torch.manual_seed(0)
    net = SemanticNet(cfg)
    for m in net.modules():  # non-trivial running statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    net.eval()
    assert net.reach_cells == 4
    feats = torch.randn(1, 8, 40, 40)
    valid = torch.ones(1, 40, 40, dtype=torch.bool)
    k = net.reach_cells
    with torch.no_grad():
        whole = net(feats, valid)["areas"][0, :, 10:30, 10:30]
        tile = net(feats[..., 10 - k:30 + k, 10 - k:30 + k], valid[:, 10 - k:30 + k, 10 - k:30 + k])["areas"][0, :, k:-k, k:-k]
        short = net(feats[..., 10 - k + 1:30 + k - 1, 10 - k + 1:30 + k - 1],
                    valid[:, 10 - k + 1:30 + k - 1, 10 - k + 1:30 + k - 1])["areas"][0, :, k - 1:-(k - 1), k - 1:-(k - 1)]
    err = (whole - tile).abs().max().item()
    if norm == "group":
        assert err > 1e-3, err
    else:
        assert err < 1e-5, err
        assert (whole - short).abs().amax(0)[0].max() > 1e-4  # one cell less of context: the edge differs
    with pytest.raises(ValueError, match="semantic_norm"):
        SemanticNet(ModelConfig(semantic_decoder="resnet", semantic_norm="layer"))
