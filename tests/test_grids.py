"""Tests of neuralmaps.grids: grid conventions, interpolation against scipy, grid <-> raster."""

import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

from neuralmaps.grids import (
    Grid2D,
    Grid3D,
    grid_to_raster,
    interpolate_nd,
    interpolate_nd_with_mask,
    raster_to_grid,
)

torch.set_num_threads(1)



# ------------------------------------------------------------------------------------------------
# Grids
# ------------------------------------------------------------------------------------------------
def test_grid2d_convention():
    g = Grid2D((24.0, 32.0), 0.2)
    assert g.num_cells == (120, 160)
    assert g.bounds == (0.0, 0.0, 24.0, 32.0)
    centers = g.cell_centers(dtype=torch.float64)
    assert centers.shape == (120, 160, 2)
    torch.testing.assert_close(centers[0, 0], torch.tensor([0.1, 0.1], dtype=torch.float64))
    torch.testing.assert_close(centers[3, 7], torch.tensor([0.7, 1.5], dtype=torch.float64))  # i east, j north
    torch.testing.assert_close(centers[-1, -1], torch.tensor([23.9, 31.9], dtype=torch.float64))
    # The centre of cell (i, j) sits at continuous index (i + 0.5, j + 0.5).
    torch.testing.assert_close(g.xy_to_index(centers[3, 7]), torch.tensor([3.5, 7.5], dtype=torch.float64))
    torch.testing.assert_close(g.index_to_xy(g.xy_to_index(centers)), centers)
    assert g.contains(torch.tensor([[0.0, 0.0], [24.0, 32.0], [24.1, 1.0]])).tolist() == [True, True, False]
    assert Grid2D((24, 32), 0.2) == g  # value semantics


def test_grid3d_convention():
    g = Grid3D((24.0, 32.0, 12.0), 0.5)
    assert g.num_cells == (48, 64, 24)
    assert g.bounds == (0.0, 0.0, 0.0, 24.0, 32.0, 12.0)
    c = g.cell_centers()
    assert c.shape == (48, 64, 24, 3)
    torch.testing.assert_close(c[1, 2, 3], torch.tensor([0.75, 1.25, 1.75]))
    assert g.bev() == Grid2D((24.0, 32.0), 0.5)


def test_grid_bad_input_raises():
    with pytest.raises(ValueError, match="whole number"):
        Grid2D((24.0, 32.1), 0.2)
    with pytest.raises(ValueError, match="positive"):
        Grid2D((24.0, 32.0), 0.0)
    with pytest.raises(ValueError, match="3 values"):
        Grid3D((24.0, 32.0), 0.5)


# ------------------------------------------------------------------------------------------------
# Interpolation
# ------------------------------------------------------------------------------------------------
def _inside_points(gen, B, N, sizes, dtype=torch.float64):
    """Random continuous grid coordinates within [0.5, S - 0.5] (between cell centres)."""
    s = torch.tensor(sizes, dtype=dtype)
    return 0.5 + torch.rand(B, N, len(sizes), generator=gen, dtype=dtype) * (s - 1)


def _scipy_reference(values: torch.Tensor, points: torch.Tensor) -> np.ndarray:
    v, p = values.cpu().double().numpy(), points.cpu().double().numpy()
    out = np.zeros((v.shape[0], p.shape[1], v.shape[1]))
    for b in range(v.shape[0]):
        for c in range(v.shape[1]):
            # Array index = continuous grid coordinate - 0.5 (cell centres at i + 0.5).
            out[b, :, c] = map_coordinates(v[b, c], (p[b] - 0.5).T, order=1)
    return out


@pytest.mark.parametrize("sizes", [(7, 11), (5, 6, 4)])
def test_interpolate_matches_scipy(sizes, device):
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(2, 3, *sizes, generator=gen, dtype=torch.float64)
    points = _inside_points(gen, 2, 64, sizes)
    # Include the exact extremes of the valid range.
    points[0, 0] = 0.5
    points[0, 1] = torch.tensor(sizes, dtype=torch.float64) - 0.5
    out, valid = interpolate_nd(values.to(device), points.to(device))
    assert out.shape == (2, 64, 3) and valid.shape == (2, 64) and valid.all()
    np.testing.assert_allclose(out.cpu().numpy(), _scipy_reference(values, points), atol=1e-12)
    # Cell centres return the cell values exactly: cell (1, 2[, 3]) is at (1.5, 2.5[, 3.5]).
    idx = (1, 2, 3)[: len(sizes)]
    p = torch.tensor([[[i + 0.5 for i in idx]]], dtype=torch.float64).expand(2, 1, -1)
    out, _ = interpolate_nd(values.to(device), p.to(device))
    torch.testing.assert_close(out[:, 0].cpu(), values[(slice(None), slice(None), *idx)])


def test_interpolate_float32_and_index_alignment():
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(1, 2, 9, 8, generator=gen)
    points = _inside_points(gen, 1, 50, (9, 8), dtype=torch.float32)
    out, _ = interpolate_nd(values, points)
    np.testing.assert_allclose(out.numpy(), _scipy_reference(values, points), atol=1e-5)
    out_idx, valid_idx = interpolate_nd(values, points - 0.5, align="index")
    torch.testing.assert_close(out_idx, out)
    assert valid_idx.all()
    with pytest.raises(ValueError, match="align"):
        interpolate_nd(values, points, align="corner")


def test_interpolate_cell_bounds_match_snap_nearest_mode():
    gen = torch.Generator().manual_seed(4)
    values = torch.randn(1, 2, 6, 5, 4, generator=gen, dtype=torch.float64)
    # Anywhere in [0, S): includes the outer half cells that the default bounds reject.
    points = torch.rand(1, 80, 3, generator=gen, dtype=torch.float64) * torch.tensor([6.0, 5.0, 4.0])
    points[0, 0] = 0.0
    points[0, 1] = torch.tensor([5.9999, 4.9999, 3.9999], dtype=torch.float64)
    out, valid = interpolate_nd(values, points, bounds="cells")
    assert valid.all()
    v, p = values.numpy(), points.numpy()
    for c in range(2):
        ref = map_coordinates(v[0, c], (p[0] - 0.5).T, order=1, mode="nearest")
        np.testing.assert_allclose(out[0, :, c].numpy(), ref, atol=1e-12)
    _, valid = interpolate_nd(values, torch.tensor([[[6.0, 1.0, 1.0], [-0.01, 1.0, 1.0]]], dtype=torch.float64),
                              bounds="cells")
    assert not valid.any()
    with pytest.raises(ValueError, match="bounds"):
        interpolate_nd(values, points, bounds="inside")


def test_interpolate_outside_is_invalid_and_zero():
    values = torch.ones(1, 2, 4, 5)
    points = torch.tensor([[[0.49, 2.0], [2.0, 4.51], [-3.0, 1.0], [2.0, 100.0], [0.5, 4.5], [2.0, 2.0]]])
    out, valid = interpolate_nd(values, points)
    assert valid.tolist() == [[False, False, False, False, True, True]]
    assert (out[0, :4] == 0).all() and (out[0, 4:] == 1).all()
    # unmasked (for callers that weight invalid points by 0): the same where valid, grid_sample's
    # blend with its zero padding where not (0.01 cell past the centres: 0.99 of the edge value)
    raw, valid2 = interpolate_nd(values, points, zero_invalid=False)
    assert torch.equal(valid2, valid) and torch.equal(raw[valid], out[valid])
    assert raw[0, 0].tolist() == pytest.approx([0.99, 0.99]) and (raw[0, 2:4] == 0).all()


def test_interpolate_gradients():
    gen = torch.Generator().manual_seed(2)
    values = torch.randn(1, 2, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    points = _inside_points(gen, 1, 8, (5, 6)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v, p: interpolate_nd(v, p)[0], (values, points))
    values3 = torch.randn(1, 1, 4, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    points3 = _inside_points(gen, 1, 5, (4, 4, 4)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v, p: interpolate_nd(v, p)[0], (values3, points3))
    # Gradient w.r.t. a point is the finite slope of a linear ramp along x.
    ramp = torch.arange(6.0)[:, None].expand(6, 4)[None, None]  # value = array index along x
    p = torch.tensor([[[2.3, 1.7]]], requires_grad=True)
    out, _ = interpolate_nd(ramp, p)
    out.sum().backward()
    torch.testing.assert_close(out[0, 0, 0], torch.tensor(1.8))
    torch.testing.assert_close(p.grad, torch.tensor([[[1.0, 0.0]]]))


def test_interpolate_bfloat16_autocast(device):
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(2, 4, 16, 12, generator=gen).to(device)
    points = _inside_points(gen, 2, 32, (16, 12), dtype=torch.float32).to(device)
    ref, _ = interpolate_nd(values, points)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        v = (values * 1.0).to(torch.bfloat16)
        out, valid = interpolate_nd(v, points)
    assert out.dtype == torch.bfloat16 and valid.all()
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.02)
    v = values.to(torch.bfloat16).requires_grad_(True)
    out, _ = interpolate_nd(v, points)
    out.float().sum().backward()
    assert v.grad is not None and v.grad.dtype == torch.bfloat16


def test_interpolate_with_mask():
    values = torch.arange(30.0).reshape(1, 1, 5, 6)
    mask = torch.ones(1, 5, 6, dtype=torch.bool)
    mask[0, 2, 3] = False  # cell centre at (2.5, 3.5)
    points = torch.tensor([[
        [2.0, 3.0],  # between cells (1..2, 2..3): touches (2, 3)
        [3.0, 4.0],  # touches (2, 3)
        [2.5, 4.2],  # x on a centre, y between 3.5 and 4.5: touches (2, 3) and (2, 4)
        [1.5, 1.5],  # far from it
        [3.5, 3.2],  # between (3, 2) and (3, 3), x exactly on cell 3's centre: no weight on (2, 3)
        [0.2, 1.0],  # outside the valid range
    ]])
    out, valid = interpolate_nd_with_mask(values, mask, points)
    assert valid.tolist() == [[False, False, False, True, True, False]]
    ref, _ = interpolate_nd(values, points)
    torch.testing.assert_close(out[valid], ref[valid])
    assert (out[~valid] == 0).all()
    with pytest.raises(ValueError, match="mask"):
        interpolate_nd_with_mask(values, mask[:, :4], points)


def test_interpolate_bad_shapes_raise():
    with pytest.raises(ValueError, match="values"):
        interpolate_nd(torch.zeros(1, 2, 3, 4), torch.zeros(1, 5, 3))
    with pytest.raises(ValueError, match="values"):
        interpolate_nd(torch.zeros(2, 2, 3, 4), torch.zeros(1, 5, 2))


# ------------------------------------------------------------------------------------------------
# Grid <-> raster
# ------------------------------------------------------------------------------------------------
def test_grid_to_raster_known_pixels_and_round_trip(device):
    X, Y = 4, 3
    grid = torch.zeros(2, X, Y, device=device)
    grid[:, 0, Y - 1] = 1  # north-west cell
    grid[:, X - 1, 0] = 2  # south-east cell
    raster = grid_to_raster(grid)
    assert raster.shape == (2, Y, X)
    assert (raster[:, 0, 0] == 1).all() and (raster[:, Y - 1, X - 1] == 2).all()
    assert raster.sum() == grid.sum()
    torch.testing.assert_close(raster_to_grid(raster), grid)
    # North-up: the northing of cell centres decreases down the rows, easting increases along columns.
    centers = Grid2D((X * 1.0, Y * 1.0), 1.0).cell_centers().permute(2, 0, 1)  # (2, X, Y)
    r = grid_to_raster(centers)
    assert (r[1, :-1] > r[1, 1:]).all() and (r[0, :, :-1] < r[0, :, 1:]).all()


def test_grid_to_raster_numpy():
    gen = np.random.default_rng(0)
    grid = gen.normal(size=(3, 5, 7))
    raster = grid_to_raster(grid)
    assert isinstance(raster, np.ndarray) and raster.shape == (3, 7, 5)
    assert raster[1, 0, 0] == grid[1, 0, 6]
    np.testing.assert_array_equal(raster_to_grid(raster), grid)
    # Same answer as torch.
    np.testing.assert_array_equal(grid_to_raster(torch.from_numpy(grid)).numpy(), raster)
    with pytest.raises(TypeError, match="grid_to_raster"):
        grid_to_raster([[1, 2]])


def test_no_hidden_cpu_tensors_meta_device():
    d = "meta"
    out, valid = interpolate_nd_with_mask(torch.zeros(2, 3, 4, 5, 6, device=d),
                                          torch.ones(2, 4, 5, 6, dtype=torch.bool, device=d), torch.zeros(2, 7, 3, device=d))
    assert out.shape == (2, 7, 3) and out.device.type == valid.device.type == d
    assert Grid2D((4.0, 4.0), 1.0).cell_centers(device=d).device.type == d
    assert grid_to_raster(torch.zeros(3, 4, device=d)).shape == (4, 3)
