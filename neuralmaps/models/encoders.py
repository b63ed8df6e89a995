"""ResNet v2 + FPN image encoder (plain torch), as SNAP's BiT-style encoder.

Tensors are channels-first: images (B, C_in, H, W) -> features (B, out_dim, H/s, W/s). The same
module encodes street-level images (with the stride-4 root block) and map-resolution rasters
(aerial, semantic; root block skipped so the output is at map resolution, stride 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import EncoderConfig

# Blocks per stage and block type for each supported depth (26 is SNAP's semantic-raster encoder).
RESNET_SPECS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    26: ("bottleneck", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
ROOT_STRIDE = 4  # 7x7 stride-2 conv + stride-2 max pool


class StdConv2d(nn.Conv2d):
    """Conv2d with weight standardisation (BiT), to be followed by GroupNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (w - mean) / torch.sqrt(var + 1e-10)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _conv(norm: str, cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    cls = StdConv2d if norm == "group" else nn.Conv2d
    return cls(cin, cout, k, stride=stride, padding=k // 2, bias=norm == "none")


def _norm(norm: str, channels: int) -> nn.Module:
    if norm == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"EncoderConfig.norm must be 'group' or 'batch' ('none': the semantic decoder only), got {norm!r}")


class PreActBasic(nn.Module):
    """Pre-activation basic block (ResNet v2): two 3x3 convs."""

    expansion = 1

    def __init__(self, norm: str, cin: int, mid: int, stride: int):
        super().__init__()
        cout = mid * self.expansion
        self.norm1 = _norm(norm, cin)
        self.conv1 = _conv(norm, cin, mid, 3, stride)
        self.norm2 = _norm(norm, mid)
        self.conv2 = _conv(norm, mid, cout, 3)
        self.shortcut = _conv(norm, cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.norm2(out)))
        return out + skip


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck block (ResNet v2 / BiT): 1x1, 3x3 (strided), 1x1."""

    expansion = 4

    def __init__(self, norm: str, cin: int, mid: int, stride: int):
        super().__init__()
        cout = mid * self.expansion
        self.norm1 = _norm(norm, cin)
        self.conv1 = _conv(norm, cin, mid, 1)
        self.norm2 = _norm(norm, mid)
        self.conv2 = _conv(norm, mid, mid, 3, stride)
        self.norm3 = _norm(norm, mid)
        self.conv3 = _conv(norm, mid, cout, 1)
        self.shortcut = _conv(norm, cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.norm2(out)))
        out = self.conv3(F.relu(self.norm3(out)))
        return out + skip


class ImageEncoder(nn.Module):
    """ResNet v2 backbone (first `num_levels` stages) + FPN decoder.

    Args:
        cfg: depth (18/26/34/50/101), width (channels of the first stage), norm ("group" = GroupNorm
            + weight standardisation as BiT, "batch"), num_levels, out_dim, output_stride.
        in_channels: input channels (3 for RGB).
        skip_root: skip the stride-4 root block (aerial / semantic rasters at map resolution); the
            output is then at stride 1 and `cfg.output_stride` is ignored.
        normalize_input: map inputs from [0, 1] to [-1, 1] (images; not for class embeddings).

    forward(x (B, in_channels, H, W)) -> (B, out_dim, H/stride, W/stride), stride = `self.stride`.
    H and W need not be multiples of the stride: the FPN resizes to the tapped level's size
    (SNAP pads to a multiple and crops instead).

    FPN as SNAP's `FPNDecoder` (per level a 1x1 lateral on the normalised, activated stage output,
    bilinear upsampling and sum), with two differences: norm before ReLU on the laterals (the
    pre-activation order of the backbone) and a 3x3 smoothing block on the output, as in the
    standard FPN, against upsampling artefacts.
    """

    def __init__(
        self, cfg: EncoderConfig, in_channels: int = 3, skip_root: bool = False, normalize_input: bool = True
    ):
        super().__init__()
        self.normalize_input = normalize_input
        if cfg.depth not in RESNET_SPECS:
            raise ValueError(f"EncoderConfig.depth must be one of {sorted(RESNET_SPECS)}, got {cfg.depth}")
        kind, blocks = RESNET_SPECS[cfg.depth]
        if not 1 <= cfg.num_levels <= len(blocks):
            raise ValueError(f"EncoderConfig.num_levels must be in 1..{len(blocks)}, got {cfg.num_levels}")
        block = PreActBasic if kind == "basic" else PreActBottleneck
        norm, width = cfg.norm, cfg.width
        _norm(norm, 32)  # validate the norm name early

        if skip_root:
            self.root = _conv(norm, in_channels, width, 3)
            root_stride = 1
        else:
            self.root = nn.Sequential(
                _conv(norm, in_channels, width, 7, stride=2), nn.MaxPool2d(3, stride=2, padding=1)
            )
            root_stride = ROOT_STRIDE
        # Level l (0-based) runs at stride root_stride * 2**l.
        strides = [root_stride * 2**level for level in range(cfg.num_levels)]
        if skip_root:
            self.out_level = 0
        elif cfg.output_stride in strides:
            self.out_level = strides.index(cfg.output_stride)
        else:
            raise ValueError(f"EncoderConfig.output_stride must be one of {strides}, got {cfg.output_stride}")
        self.stride = strides[self.out_level]

        self.stages = nn.ModuleList()
        cin, dims = width, []
        for level in range(cfg.num_levels):
            mid = width * 2**level
            units = []
            for u in range(blocks[level]):
                units.append(block(norm, cin, mid, 2 if (u == 0 and level > 0) else 1))
                cin = mid * block.expansion
            self.stages.append(nn.Sequential(*units))
            dims.append(cin)
        # Pre-activation nets need a final norm + ReLU on every tapped output.
        self.lateral = nn.ModuleList(
            nn.Sequential(_norm(norm, d), nn.ReLU(), nn.Conv2d(d, cfg.out_dim, 1))
            for d in dims[self.out_level :]
        )
        self.out = nn.Sequential(
            nn.Conv2d(cfg.out_dim, cfg.out_dim, 3, padding=1, bias=False),
            _norm(norm, cfg.out_dim),
            nn.ReLU(),
            nn.Conv2d(cfg.out_dim, cfg.out_dim, 1),
        )
        self.out_dim = cfg.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize_input:
            x = x * 2 - 1  # images in [0, 1] -> [-1, 1], as BiT / SNAP
        x = self.root(x)
        taps = []
        for stage in self.stages:
            x = stage(x)
            taps.append(x)
        taps = taps[self.out_level :]
        y = self.lateral[-1](taps[-1])
        for lateral, tap in zip(reversed(self.lateral[:-1]), reversed(taps[:-1])):
            y = F.interpolate(y, size=tap.shape[-2:], mode="bilinear", align_corners=False) + lateral(tap)
        return self.out(y)


class SemanticRasterEncoder(nn.Module):
    """Class embeddings (1x1 conv on the multi-hot raster) followed by a root-less ResNet + FPN.

    forward(raster (B, K, X, Y) in {0, 1}) -> (B, out_dim, X, Y).
    """

    def __init__(self, cfg: EncoderConfig, num_classes: int, embedding_dim: int = 8):
        super().__init__()
        self.embed = nn.Conv2d(num_classes, embedding_dim, 1, bias=False)
        self.encoder = ImageEncoder(cfg, in_channels=embedding_dim, skip_root=True, normalize_input=False)
        self.out_dim = cfg.out_dim

    def forward(self, raster: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embed(raster.to(self.embed.weight.dtype)))


# -- inference-time variants (map building; the training path never uses them) ----------------------
class ShiftMaxPool2d(nn.Module):
    """`nn.MaxPool2d` (no dilation, no ceil mode) as a max over k x k strided slices of the padded
    input: the same values bit for bit (a max is exact), ~3x faster than the channels-first CPU
    kernel on small-channel maps."""

    def __init__(self, pool: nn.MaxPool2d):
        super().__init__()
        pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
        self.k, self.s, self.p = pair(pool.kernel_size), pair(pool.stride or pool.kernel_size), pair(pool.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (sh, sw), (ph, pw) = self.k, self.s, self.p
        x = F.pad(x, (pw, pw, ph, ph), value=float("-inf"))
        H, W = x.shape[-2:]
        oh, ow = (H - kh) // sh + 1, (W - kw) // sw + 1
        y = x[..., :, 0:(ow - 1) * sw + 1:sw]
        for j in range(1, kw):
            y = torch.maximum(y, x[..., :, j:j + (ow - 1) * sw + 1:sw])
        out = y[..., 0:(oh - 1) * sh + 1:sh, :]
        for i in range(1, kh):
            out = torch.maximum(out, y[..., i:i + (oh - 1) * sh + 1:sh, :])
        return out


def fold_weight_standardization(module: nn.Module) -> nn.Module:
    """Replace every `StdConv2d` in `module` (in place) by a plain `Conv2d` holding the standardised
    weights, computed once, and every plain `nn.MaxPool2d` by `ShiftMaxPool2d`: the same outputs bit
    for bit, without re-standardising the weights at every call (~40 % of a small encoder's CPU time).
    For frozen, inference-only copies."""
    for parent in list(module.modules()):
        for name, c in list(parent.named_children()):
            if (isinstance(c, nn.MaxPool2d) and c.dilation in (1, (1, 1)) and not c.ceil_mode
                    and not c.return_indices):
                setattr(parent, name, ShiftMaxPool2d(c))
            if isinstance(c, StdConv2d):
                conv = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation,
                                 c.groups, bias=c.bias is not None, device=c.weight.device, dtype=c.weight.dtype)
                with torch.no_grad():
                    w = c.weight
                    mean = w.mean(dim=(1, 2, 3), keepdim=True)
                    var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
                    conv.weight.copy_((w - mean) / torch.sqrt(var + 1e-10))
                    if c.bias is not None:
                        conv.bias.copy_(c.bias)
                conv.requires_grad_(False)
                setattr(parent, name, conv)
    return module


class FixedGroupNorm(nn.Module):
    """GroupNorm with fixed per-group statistics (mean, var (G,)) instead of each input's own: a
    per-channel affine map, so a convolutional encoder made of these is translation-equivariant
    (its output at a pixel depends only on the input within its receptive field)."""

    def __init__(self, gn: nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor):
        super().__init__()
        G, C = gn.num_groups, gn.num_channels
        if mean.shape != (G,) or var.shape != (G,):
            raise ValueError(f"FixedGroupNorm: statistics must be ({G},), got {tuple(mean.shape)}, {tuple(var.shape)}")
        dev = mean.device if gn.weight is None else gn.weight.device
        inv = torch.rsqrt(var.double().to(dev) + gn.eps).repeat_interleave(C // G)
        m = mean.double().to(dev).repeat_interleave(C // G)
        w = gn.weight.detach().double() if gn.affine else torch.ones(C, dtype=torch.float64, device=dev)
        b = gn.bias.detach().double() if gn.affine else torch.zeros(C, dtype=torch.float64, device=dev)
        dtype = gn.weight.dtype if gn.affine else torch.float32
        self.register_buffer("scale", (w * inv).to(dtype)[:, None, None])
        self.register_buffer("shift", (b - m * w * inv).to(dtype)[:, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def group_norm_statistics(module: nn.Module, x: torch.Tensor) -> dict[str, tuple[list[float], list[float]]]:
    """Fixed statistics for every GroupNorm of `module`, from one forward pass over the batch `x`
    (e.g. a few training-sized windows): per layer, per group, the mean over the batch of each
    sample's mean and variance, each layer normalising with these averages (the layers after it see
    what they will see once all are fixed). Returns {module name: (means, variances)} as floats."""
    stats: dict[str, tuple[list[float], list[float]]] = {}
    handles = []

    def hook(name):
        def fn(gn: nn.GroupNorm, inputs, output):
            v = inputs[0]
            B, G = v.shape[0], gn.num_groups
            g = v.float().reshape(B, G, -1)
            mean, var = g.mean(-1).mean(0), g.var(-1, unbiased=False).mean(0)
            stats[name] = (mean.tolist(), var.tolist())
            return FixedGroupNorm(gn, mean, var)(v)
        return fn

    for name, m in module.named_modules():
        if isinstance(m, nn.GroupNorm):
            handles.append(m.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in handles:
            h.remove()
    return stats


def fix_group_norms(module: nn.Module, stats: dict[str, tuple[list[float], list[float]]]) -> nn.Module:
    """Replace (in place) every GroupNorm of `module` by a `FixedGroupNorm` with `stats`
    (`group_norm_statistics`); every GroupNorm must have statistics."""
    names = {n for n, m in module.named_modules() if isinstance(m, nn.GroupNorm)}
    if names - set(stats):
        raise ValueError(f"fix_group_norms: no statistics for {sorted(names - set(stats))[:3]}...")
    for parent_name, parent in list(module.named_modules()):
        for name, c in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if isinstance(c, nn.GroupNorm):
                mean, var = (torch.tensor(s, dtype=torch.float32) for s in stats[full])
                setattr(parent, name, FixedGroupNorm(c, mean, var))
    return module
