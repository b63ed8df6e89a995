"""SceneDataset: item keys / shapes / dtypes (docs/architecture.md), layouts, done markers, workers."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from neuralmaps.config import CLASS_NAMES, preset
from neuralmaps.data import ITEM_KEYS, SceneDataset
from neuralmaps.data.store import SPLIT_NAMES

from test_chunks import NUM_PAIRS, small_store_path


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    return small_store_path(tmp_path_factory)


def _nonempty(store) -> SceneDataset:
    for s in SPLIT_NAMES:
        ds = SceneDataset(store, s)
        if len(ds):
            return ds
    raise AssertionError("no pairs in any split")


def test_item_follows_the_documented_table(store):
    c = preset("cpu-tiny").scene
    V, (H, W), K = c.num_views, c.image_hw, len(CLASS_NAMES)
    X, Y = round(c.size_m[0] / c.cell_m), round(c.size_m[1] / c.cell_m)
    expected = {
        "map_images": ((V, 3, H, W), torch.float32),
        "map_T_scene_view": ((V, 4, 4), torch.float32),
        "map_cameras": ((V, 8), torch.float32),
        "map_view_mask": ((V,), torch.bool),
        "aerial": ((3, X, Y), torch.float32),
        "semantic": ((K, X, Y), torch.float32),
        "query_image": ((3, H, W), torch.float32),
        "query_T_scene_cam": ((4, 4), torch.float32),
        "query_camera": ((8,), torch.float32),
        "scene_origin": ((2,), torch.float64),
        "index": ((), torch.int64),
    }
    assert set(expected) == set(ITEM_KEYS)
    ds = _nonempty(store)
    it = ds[0]
    assert set(it) == set(expected)
    for k, (shape, dtype) in expected.items():
        assert tuple(it[k].shape) == shape, k
        assert it[k].dtype == dtype, k
    for k in ("map_images", "query_image", "aerial"):
        assert 0.0 <= float(it[k].min()) and float(it[k].max()) <= 1.0 and float(it[k].max()) > 0.2, k
    assert set(torch.unique(it["semantic"]).tolist()) <= {0.0, 1.0}
    assert it["map_cameras"][it["map_view_mask"]][:, 0].eq(W).all()  # intrinsics start with w, h
    assert float(it["query_camera"][1]) == H
    # scene_origin is a UTM easting / northing (EPSG:32635 around Helsinki)
    assert 3e5 < float(it["scene_origin"][0]) < 5e5 and 6.6e6 < float(it["scene_origin"][1]) < 6.8e6


def test_rasters_are_in_model_grid_layout(store):
    """Grid cell (i, j) = the point ((i+.5) cell, (j+.5) cell) from the SW corner, i.e. raster
    row Y-1-j, column i of the north-up store."""
    import zarr

    ds = _nonempty(store)
    it = ds[0]
    i = int(it["index"])
    g = zarr.open_group(str(store), mode="r")
    aerial = np.asarray(g["aerial"][i])  # (3, Y, X) north-up
    sem = np.asarray(g["semantic"][i])
    Y, X = aerial.shape[1:]
    for (ci, cj) in [(0, 0), (X - 1, 0), (0, Y - 1), (5, 17)]:
        np.testing.assert_allclose(it["aerial"][:, ci, cj].numpy(), aerial[:, Y - 1 - cj, ci] / 255.0, atol=1e-6)
        np.testing.assert_array_equal(it["semantic"][:, ci, cj].numpy(), sem[:, Y - 1 - cj, ci])
    img = np.asarray(g["query_image"][i])  # (H, W, 3)
    np.testing.assert_allclose(it["query_image"][:, 10, 20].numpy(), img[10, 20] / 255.0, atol=1e-6)


def test_pairs_without_done_marker_are_never_served(store, tmp_path):
    import zarr

    p = tmp_path / "partial.zarr"
    shutil.copytree(store, p)
    before = {int(SceneDataset(p, s)[k]["index"]) for s in SPLIT_NAMES for k in range(len(SceneDataset(p, s)))}
    assert before == set(range(NUM_PAIRS))
    g = zarr.open_group(str(p), mode="r+")
    done = np.asarray(g["pair_done"][:])
    done[[0, 3]] = False
    g["pair_done"][:] = done
    after = {int(SceneDataset(p, s)[k]["index"]) for s in SPLIT_NAMES for k in range(len(SceneDataset(p, s)))}
    assert after == set(range(NUM_PAIRS)) - {0, 3}


def test_dataloader_with_workers(store):
    from torch.utils.data import DataLoader

    ds = _nonempty(store)
    n = len(ds)
    dl = DataLoader(ds, batch_size=2, num_workers=2, shuffle=False)
    batches = list(dl)
    assert sum(b["index"].shape[0] for b in batches) == n
    b = batches[0]
    c = preset("cpu-tiny").scene
    assert b["map_images"].shape == (min(2, n), c.num_views, 3, *c.image_hw)
    assert sorted(int(v) for bb in batches for v in bb["index"]) == sorted(int(v) for v in ds.indices)


def test_bad_input(store, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        SceneDataset(tmp_path / "missing.zarr", "train")
    with pytest.raises(ValueError, match="unknown split"):
        SceneDataset(store, "validation")
    (tmp_path / "junk").mkdir()
    with pytest.raises(ValueError, match="junk"):
        SceneDataset(tmp_path / "junk", "train")
    ds = _nonempty(store)
    with pytest.raises(IndexError):
        ds[len(ds)]
