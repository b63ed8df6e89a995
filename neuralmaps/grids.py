"""Model grids (SNAP's convention), N-d interpolation, and the model-grid <-> raster conversion.

Model grid: a tensor laid out `(..., C, X, Y)` (2D) or `(..., C, X, Y, Z)` (3D). Index (i, j[, k])
is the point ((i+0.5)·cell, (j+0.5)·cell[, (k+0.5)·cell]) metres from the grid origin, the
south-west (bottom) corner; i runs east (x), j north (y), k up (z).
Continuous grid coordinates are `xy / cell`, so cell (i, j)'s centre is at (i+0.5, j+0.5).

Raster: north-up `(..., Y, X)`, row 0 = north, column 0 = west (GeoTIFF, Zarr, xarray).
`grid_to_raster` / `raster_to_grid` are the only conversion between the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Grid2D",
    "Grid3D",
    "interpolate_nd",
    "interpolate_nd_with_mask",
    "grid_to_raster",
    "raster_to_grid",
]


def _num_cells(extent_m: tuple[float, ...], cell_m: float, name: str) -> tuple[int, ...]:
    if cell_m <= 0:
        raise ValueError(f"{name}: cell_m must be positive, got {cell_m}")
    cells = []
    for e in extent_m:
        n = round(e / cell_m)
        if n < 1 or abs(n * cell_m - e) > 1e-6 * max(abs(e), 1.0):
            raise ValueError(f"{name}: extent {extent_m} m is not a whole number of {cell_m} m cells")
        cells.append(int(n))
    return tuple(cells)


class _GridBase:
    extent_m: tuple[float, ...]
    cell_m: float
    ndim: int

    def __post_init__(self) -> None:
        extent = tuple(float(e) for e in self.extent_m)
        if len(extent) != self.ndim:
            raise ValueError(f"{type(self).__name__}: extent_m must have {self.ndim} values, got {self.extent_m}")
        object.__setattr__(self, "extent_m", extent)
        object.__setattr__(self, "cell_m", float(self.cell_m))
        object.__setattr__(self, "_cells", _num_cells(extent, self.cell_m, type(self).__name__))

    @property
    def num_cells(self) -> tuple[int, ...]:
        """Number of cells along each axis: (X, Y) or (X, Y, Z)."""
        return self._cells  # type: ignore[attr-defined]

    @property
    def bounds(self) -> tuple[float, ...]:
        """(min_x, min_y[, min_z], max_x, max_y[, max_z]) in metres from the grid origin."""
        return (0.0,) * self.ndim + self.extent_m

    def xy_to_index(self, xy: Tensor) -> Tensor:
        """Metres from the origin (..., d) -> continuous grid coordinates (..., d) (centres at i+0.5)."""
        return xy / self.cell_m

    def index_to_xy(self, ij: Tensor) -> Tensor:
        """Continuous grid coordinates (..., d) -> metres from the origin (..., d)."""
        return ij * self.cell_m

    def cell_centers(self, dtype: torch.dtype | None = None, device: Any = None) -> Tensor:
        """Metric centres of all cells, (X, Y, 2) or (X, Y, Z, 3)."""
        axes = [(torch.arange(n, dtype=dtype, device=device) + 0.5) * self.cell_m for n in self.num_cells]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)

    def contains(self, xy: Tensor) -> Tensor:
        """Whether metric points (..., d) lie inside the grid's extent (..., ) bool."""
        ext = torch.tensor(self.extent_m, dtype=xy.dtype, device=xy.device)
        return ((xy >= 0) & (xy <= ext)).all(-1)


@dataclass(frozen=True)
class Grid2D(_GridBase):
    """2D model grid of `extent_m` = (x, y) metres in square cells of `cell_m` metres."""

    extent_m: tuple[float, float]
    cell_m: float
    ndim = 2


@dataclass(frozen=True)
class Grid3D(_GridBase):
    """3D model grid of `extent_m` = (x, y, z) metres in cubic cells of `cell_m` metres."""

    extent_m: tuple[float, float, float]
    cell_m: float
    ndim = 3

    def bev(self) -> Grid2D:
        """The x-y grid of this volume."""
        return Grid2D(self.extent_m[:2], self.cell_m)


# ------------------------------------------------------------------------------------------------
# Interpolation
# ------------------------------------------------------------------------------------------------
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _check_interp_args(values: Tensor, points: Tensor, fname: str) -> int:
    d = points.shape[-1] if points.dim() == 3 else -1
    if d not in (2, 3) or values.dim() != 2 + d or points.shape[0] != values.shape[0]:
        raise ValueError(
            f"{fname}: expected values (B, C, *S) with len(S) = d in (2, 3) and points (B, N, d), "
            f"got values {tuple(values.shape)} and points {tuple(points.shape)}"
        )
    return d


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type without autocast (e.g. "meta")
        return False


def _sample(values: Tensor, points: Tensor, align: str, bounds: str) -> tuple[Tensor, Tensor]:
    """grid_sample for continuous grid coordinates: unmasked out (B, C, N), valid (B, N)."""
    if align == "center":
        shift = 0.0
    elif align == "index":  # cell i's centre at i: shift to the "center" convention
        shift = 0.5
    else:
        raise ValueError(f"interpolate_nd: align must be 'center' or 'index', got {align!r}")
    if bounds not in ("centers", "cells"):
        raise ValueError(f"interpolate_nd: bounds must be 'centers' or 'cells', got {bounds!r}")
    B, N, d = points.shape
    sizes = values.shape[2:]
    coords = points.unbind(-1)
    # With align_corners=False, g = -1 is the outer edge of cell 0 (our coordinate 0) and g = +1
    # the outer edge of the last cell (coordinate S). grid_sample's last coordinate indexes the
    # last dim, hence the reversed order. Per-axis python scalars are ~2x faster than broadcasting.
    g = torch.stack([coords[k] * (2.0 / sizes[k]) + (2.0 * shift / sizes[k] - 1.0) for k in reversed(range(d))], -1)
    valid = torch.ones((B, N), dtype=torch.bool, device=points.device)
    for k in range(d):
        if bounds == "centers":
            valid &= (coords[k] >= 0.5 - shift) & (coords[k] <= sizes[k] - 0.5 - shift)
        else:
            valid &= (coords[k] >= -shift) & (coords[k] < sizes[k] - shift)
    g = g.reshape(B, N, *([1] * (d - 1)), d)
    padding = "zeros" if bounds == "centers" else "border"
    out = F.grid_sample(values, g, mode="bilinear", padding_mode=padding, align_corners=False)
    return out.reshape(B, values.shape[1], N), valid  # (B, C, N)


def interpolate_nd(
    values: Tensor, points: Tensor, *, align: str = "center", bounds: str = "centers", zero_invalid: bool = True
) -> tuple[Tensor, Tensor]:
    """Bilinear (d = 2) or trilinear (d = 3) interpolation of a model grid.

    Args:
        values: (B, C, *S), S = (X, Y) or (X, Y, Z).
        points: (B, N, d) continuous grid coordinates. With align="center" (the model-grid
            convention) cell i's centre is at i + 0.5, so point p samples array index p - 0.5;
            with align="index" cell i's centre is at i.
    Returns:
        out: (B, N, C), zero where not valid, dtype of `values` (a transposed view of a
            contiguous (B, C, N) tensor). With zero_invalid=False the invalid points keep what
            grid_sample gives there (for callers that weight them by 0 anyway: the mask costs a
            pass over the whole output).
        valid: (B, N) bool. With bounds="centers" (default) the point lies within [0.5, S - 0.5]
            on every axis (between the outer cell centres). With bounds="cells" (SNAP's
            `interpolate_nd`) it lies within [0, S) and values beyond the outer centres are
            clamped to the edge cells (scipy mode="nearest").

    Differentiable w.r.t. values and points. Half/bfloat16 inputs (e.g. under autocast) are
    interpolated in float32 and returned in the input dtype.
    """
    _check_interp_args(values, points, "interpolate_nd")
    out_dtype = values.dtype
    compute = torch.promote_types(values.dtype, points.dtype)
    if compute in _LOW_PRECISION or not compute.is_floating_point:
        compute = torch.float32
    if _autocast_enabled(values.device.type):
        with torch.autocast(device_type=values.device.type, enabled=False):
            out, valid = _sample(values.to(compute), points.to(compute), align, bounds)
    else:
        out, valid = _sample(values.to(compute), points.to(compute), align, bounds)
    # Mask in the contiguous (B, C, N) layout; the (B, N, C) result is a transposed view.
    if zero_invalid:
        out = out.masked_fill(~valid[:, None], 0)
    return out.to(out_dtype).transpose(1, 2), valid


def interpolate_nd_with_mask(
    values: Tensor,
    mask: Tensor,
    points: Tensor,
    *,
    align: str = "center",
    bounds: str = "centers",
    tol: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """`interpolate_nd` where valid also requires every contributing corner cell to be valid.

    mask: (B, *S) bool, True where `values` are valid. A point is valid only if the bilinear
    weight it puts on invalid cells is at most `tol` (i.e. all corners with a non-zero weight are
    valid, up to float rounding at exact cell centres).
    Returns out (B, N, C) (zero where not valid) and valid (B, N).
    """
    _check_interp_args(values, points, "interpolate_nd_with_mask")
    if mask.shape != (values.shape[0], *values.shape[2:]):
        raise ValueError(
            f"interpolate_nd_with_mask: mask must be (B, *S) = {(values.shape[0], *values.shape[2:])}, "
            f"got {tuple(mask.shape)}"
        )
    out, valid = interpolate_nd(values, points, align=align, bounds=bounds)
    invalid = (~mask.bool())[:, None].to(torch.float32)
    with torch.no_grad():
        bad, _ = interpolate_nd(invalid, points.detach().float(), align=align, bounds=bounds)
    valid = valid & (bad[..., 0] <= tol)
    return out.masked_fill(~valid[..., None], 0), valid


# ------------------------------------------------------------------------------------------------
# Model grid <-> north-up raster
# ------------------------------------------------------------------------------------------------
ArrayT = TypeVar("ArrayT", Tensor, np.ndarray)


def grid_to_raster(a: ArrayT) -> ArrayT:
    """Model-grid layout (..., X, Y) -> north-up raster (..., Y, X) (row 0 = north, col 0 = west).

    raster[..., r, c] = grid[..., c, Y - 1 - r]. Torch tensors are copied (torch.flip); numpy
    arrays come back as a view."""
    if isinstance(a, Tensor):
        return a.transpose(-1, -2).flip(-2)
    if isinstance(a, np.ndarray):
        return np.flip(np.swapaxes(a, -1, -2), -2)
    raise TypeError(f"grid_to_raster: expected a torch.Tensor or numpy.ndarray, got {type(a).__name__}")


def raster_to_grid(r: ArrayT) -> ArrayT:
    """North-up raster (..., Y, X) -> model-grid layout (..., X, Y); inverse of `grid_to_raster`."""
    if isinstance(r, Tensor):
        return r.flip(-2).transpose(-1, -2)
    if isinstance(r, np.ndarray):
        return np.swapaxes(np.flip(r, -2), -1, -2)
    raise TypeError(f"raster_to_grid: expected a torch.Tensor or numpy.ndarray, got {type(r).__name__}")
