"""Orthophoto warping from another CRS, GeoTIFF writing, Zarr stores that keep their CRS."""

import numpy as np
import pytest
import rasterio
from pyproj import Transformer
from rasterio.transform import from_origin

from neuralmaps.geo import GeoInputError, Region, open_zarr, read_orthophoto, write_geotiff, write_zarr

LON, LAT = 24.9522, 60.1704


def _synthetic_ortho(path, epsg: int, crs: bool = True, shift_m: float = 0.0):
    """A 100 m × 100 m 8-bit RGB GeoTIFF in `epsg`, dark, with a bright 10 m square centred
    on (LON, LAT) (+ shift_m east)."""
    x, y = Transformer.from_crs(4326, epsg, always_xy=True).transform(LON, LAT)
    x += shift_m
    res, n = 0.25, 400
    data = np.full((3, n, n), 40, np.uint8)
    data[:, 180:220, 180:220] = 250  # 40 px × 0.25 m = 10 m, centred on the image centre
    profile = dict(driver="GTiff", height=n, width=n, count=3, dtype="uint8",
                   transform=from_origin(x - 50, y + 50, res, res))
    if crs:
        profile["crs"] = f"EPSG:{epsg}"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


@pytest.mark.parametrize("epsg", [3067, 3879])  # ETRS-TM35FIN; GK25 (rotated w.r.t. UTM 35N)
def test_orthophoto_square_lands_on_the_right_pixels(tmp_path, epsg):
    path = _synthetic_ortho(tmp_path / f"ortho_{epsg}.tif", epsg)
    region = Region.from_bbox(LON - 0.0006, LAT - 0.0003, LON + 0.0006, LAT + 0.0003, resolution=0.5)
    da = read_orthophoto(path, region)
    assert da.dims == ("band", "y", "x") and da.dtype == np.float32 and da.shape[0] == 3
    assert da.rio.crs.to_epsg() == 32635
    assert float(da.min()) == pytest.approx(40 / 255, abs=1e-3)
    assert float(da.max()) == pytest.approx(250 / 255, abs=1e-3)
    rows, cols = np.nonzero((da.isel(band=0) > 0.5).values)
    # size 10 m = 20 px (± 1 px at the threshold)
    assert rows.max() - rows.min() + 1 == pytest.approx(20, abs=1)
    assert cols.max() - cols.min() + 1 == pytest.approx(20, abs=1)
    # The square's brightness-weighted centroid (continuous pixel coordinates, centres at +0.5)
    # lies at the lon/lat. Measured errors: at most 0.0027 px (EPSG:3879), 0.0007 px (3067), and
    # an area of 399.8-400.0 px; a georeferencing shifted by half a pixel is off by 0.50 px.
    v = (da.isel(band=0).values - 40 / 255) / (210 / 255)  # 0 dark, 1 inside the square
    rr, cc = np.mgrid[: v.shape[0], : v.shape[1]] + 0.5
    r, c = region.lonlat_to_pixel(LON, LAT)
    assert (v * rr).sum() / v.sum() == pytest.approx(float(r), abs=0.006)
    assert (v * cc).sum() / v.sum() == pytest.approx(float(c), abs=0.006)
    assert v.sum() == pytest.approx(400, abs=0.4)


def test_orthophoto_partial_cover_is_nan_and_geotiff_round_trip(tmp_path):
    path = _synthetic_ortho(tmp_path / "ortho.tif", 3067, shift_m=60.0)  # covers the east half only
    region = Region.from_bbox(LON - 0.0006, LAT - 0.0003, LON + 0.0006, LAT + 0.0003, resolution=0.5)
    da = read_orthophoto(path, region)
    nan = np.isnan(da.values[0])
    assert nan[:, 0].all() and not nan[:, -1].any()
    out = write_geotiff(da, tmp_path / "warped.tif")
    with rasterio.open(out) as src:
        assert src.crs.to_epsg() == 32635 and src.transform == region.transform
        assert src.profile["tiled"] and np.isnan(src.nodata)
        np.testing.assert_array_equal(src.read(), da.values)


def test_orthophoto_alpha_band_masks(tmp_path):
    """An RGBA source: its own alpha (west half transparent) is the coverage mask."""
    x, y = Transformer.from_crs(4326, 3067, always_xy=True).transform(LON, LAT)
    data = np.full((4, 400, 400), 100, np.uint8)
    data[3] = 255
    data[3, :, :200] = 0
    path = tmp_path / "rgba.tif"
    with rasterio.open(path, "w", driver="GTiff", height=400, width=400, count=4, dtype="uint8",
                       crs="EPSG:3067", transform=from_origin(x - 50, y + 50, 0.25, 0.25),
                       photometric="RGB", alpha="YES") as dst:
        dst.write(data)
    region = Region.from_bbox(LON - 0.0005, LAT - 0.0003, LON + 0.0005, LAT + 0.0003, resolution=0.5)
    da = read_orthophoto(path, region)
    assert da.shape[0] == 3  # alpha is not returned as a colour band
    x_east = region.coords()[0] > region.lonlat_to_xy(LON, LAT)[0] + 1.0
    x_west = region.coords()[0] < region.lonlat_to_xy(LON, LAT)[0] - 1.0
    assert np.isnan(da.values[:, :, x_west]).all()
    np.testing.assert_allclose(da.values[:, :, x_east], 100 / 255, atol=1e-6)


def test_zarr_round_trip_keeps_crs_transform_and_region_writes(tmp_path):
    region = Region.from_bbox(LON - 0.0006, LAT - 0.0003, LON + 0.0006, LAT + 0.0003, resolution=0.5)
    feats = np.zeros((4,) + region.shape, np.float32)
    ds = region.to_xarray(feats, dims=("c", "y", "x"), name="features").to_dataset()
    ds["valid"] = region.to_xarray(np.zeros(region.shape, bool))
    path = tmp_path / "map.zarr"
    tile = 64
    write_zarr(ds, path, encoding={"features": {"chunks": (4, tile, tile)}, "valid": {"chunks": (tile, tile)}},
               compute=False)
    for t in region.tiles(tile, halo_px=4):
        sub = ds.isel(y=t.inner[0], x=t.inner[1]).copy(deep=True)
        sub["features"][:] = 1 + t.tile_y * 10 + t.tile_x
        sub["valid"][:] = True
        write_zarr(sub, path, region={"y": t.inner[0], "x": t.inner[1]})
    back = open_zarr(path)
    assert back.rio.crs.to_epsg() == 32635 and back["features"].rio.crs.to_epsg() == 32635
    assert back.rio.transform() == region.transform
    assert Region.from_xarray(back) == region
    assert bool(back["valid"].all())
    f = back["features"].values
    last_ty, last_tx = (len(back.y) - 1) // tile, (len(back.x) - 1) // tile
    assert f[0, 0, 0] == 1 and f[0, -1, -1] == 1 + 10 * last_ty + last_tx
    assert f[0, tile, tile - 1] == 1 + 10 * 1 + 0  # tile boundaries land exactly on chunk edges
    np.testing.assert_allclose(back.x.values, region.coords()[0])
    # region="auto": the slices come from the x/y coordinates
    t = region.tiles(tile)[1]
    sub = ds.isel(y=t.inner[0], x=t.inner[1]).copy(deep=True)
    sub["features"][:] = 99
    write_zarr(sub[["features"]], path, region="auto")
    again = open_zarr(path)["features"]
    assert (again.isel(y=t.inner[0], x=t.inner[1]) == 99).all() and int((again == 99).sum()) == sub["features"].size

    # append along a new dim keeps the CRS too
    runs = tmp_path / "runs.zarr"
    for i in range(2):
        one = region.to_xarray(np.full((1,) + region.shape, i, np.uint8), dims=("run", "y", "x"), name="img")
        write_zarr(one.to_dataset(), runs, mode="a", append_dim="run")
    back = open_zarr(runs)
    assert back.sizes["run"] == 2 and back.rio.crs.to_epsg() == 32635
    assert back["img"].isel(run=1).values.min() == 1


def test_bad_orthophoto_input(tmp_path):
    region = Region.from_bbox(LON - 0.0006, LAT - 0.0003, LON + 0.0006, LAT + 0.0003, resolution=0.5)
    with pytest.raises(GeoInputError, match="nothere.tif"):
        read_orthophoto(tmp_path / "nothere.tif", region)
    no_crs = _synthetic_ortho(tmp_path / "no_crs.tif", 3067, crs=False)
    with pytest.raises(GeoInputError, match="no_crs.tif.*no CRS"):
        read_orthophoto(no_crs, region)
    far = _synthetic_ortho(tmp_path / "far.tif", 3067, shift_m=5000.0)
    with pytest.raises(GeoInputError, match="far.tif.*does not overlap"):
        read_orthophoto(far, region)
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"not a tiff at all" * 100)
    with pytest.raises(GeoInputError, match="junk.tif"):
        read_orthophoto(junk, region)
    with pytest.raises(GeoInputError, match="missing.zarr"):
        open_zarr(tmp_path / "missing.zarr")
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(GeoInputError, match="empty.zarr"):
        open_zarr(tmp_path / "empty.zarr")
