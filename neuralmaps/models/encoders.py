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
    return cls(cin, cout, k, stride=stride, padding=k // 2, bias=False)


def _norm(norm: str, channels: int) -> nn.Module:
    if norm == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"EncoderConfig.norm must be 'group' or 'batch', got {norm!r}")


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
