"""Region, CRS and heading conventions on real coordinates."""

import math
import pickle

import numpy as np
import pytest
import torch

from neuralmaps.geo import GeoInputError, Region, heading_to_yaw, utm_crs_for, yaw_to_heading

HELSINKI_BBOX = (24.9450, 60.1680, 24.9550, 60.1730)


def test_helsinki_is_utm_35n():
    assert utm_crs_for(24.9522, 60.1704).to_epsg() == 32635
    assert Region.from_bbox(*HELSINKI_BBOX).crs.to_epsg() == 32635
    # southern hemisphere and the other side of a zone boundary
    assert utm_crs_for(151.2, -33.87).to_epsg() == 32756
    assert utm_crs_for(-0.1, 51.5).to_epsg() == 32630
    assert utm_crs_for(0.1, 51.5).to_epsg() == 32631


def test_bbox_snapped_outward_and_covers():
    r = Region.from_bbox(*HELSINKI_BBOX, resolution=0.5)
    xmin, ymin, xmax, ymax = r.bounds
    for v in r.bounds:
        assert abs(v / 0.5 - round(v / 0.5)) < 1e-6
    assert r.shape == (round((ymax - ymin) / 0.5), round((xmax - xmin) / 0.5))
    assert r.geobox.shape == r.shape and r.geobox.crs.epsg == 32635
    # every corner of the lon/lat box is inside the grid
    for lon in HELSINKI_BBOX[0::2]:
        for lat in HELSINKI_BBOX[1::2]:
            assert r.contains_xy(*r.lonlat_to_xy(lon, lat))
    assert r.geometry_lonlat.contains(
        __import__("shapely").geometry.box(*HELSINKI_BBOX).buffer(-1e-6)
    )


def test_lonlat_pixel_round_trip():
    r = Region.from_bbox(*HELSINKI_BBOX, resolution=0.2)
    lon = np.array([24.9522, 24.9461, 24.9549])
    lat = np.array([60.1704, 60.1712, 60.1681])
    row, col = r.xy_to_pixel(*r.lonlat_to_xy(lon, lat))
    assert np.all((row > 0) & (row < r.shape[0]) & (col > 0) & (col < r.shape[1]))
    lon2, lat2 = r.xy_to_lonlat(*r.pixel_to_xy(row, col))
    np.testing.assert_allclose(lon2, lon, atol=1e-9)
    np.testing.assert_allclose(lat2, lat, atol=1e-9)


def test_pixel_centres_match_coords_and_transform():
    r = Region.from_bbox(*HELSINKI_BBOX, resolution=1.0)
    x, y = r.coords()
    assert x.shape == (r.shape[1],) and y.shape == (r.shape[0],)
    assert np.all(np.diff(y) < 0) and np.all(np.diff(x) > 0)
    row, col = r.xy_to_pixel(x[3], y[7])
    assert (row, col) == pytest.approx((7.5, 3.5))
    # rasterio's affine maps the pixel centre (col+0.5, row+0.5) to the same point
    assert r.transform @ (3.5, 7.5) == pytest.approx((x[3], y[7]))


def test_tiles_cover_exactly_once_and_align_to_chunks():
    r = Region.from_bounds((385000.0, 6671000.0, 385103.0, 6671047.0), 32635, 0.5)
    tile, halo = 64, 8
    tiles = r.tiles(tile, halo_px=halo)
    count = np.zeros(r.shape, int)
    for t in tiles:
        ys, xs = t.inner
        assert ys.start % tile == 0 and xs.start % tile == 0  # chunk aligned
        assert (ys.start // tile, xs.start // tile) == (t.tile_y, t.tile_x)
        count[ys, xs] += 1
        # the halo'd grid is on the same lattice, and the crop maps it back onto `inner`
        assert t.region.shape == (ys.stop - ys.start + 2 * halo, xs.stop - xs.start + 2 * halo)
        inner = t.region.window(*t.crop)
        assert r.slices_of(inner) == t.inner
        x, y = inner.coords()
        fx, fy = r.coords()
        np.testing.assert_allclose(x, fx[xs])
        np.testing.assert_allclose(y, fy[ys])
    assert count.min() == 1 and count.max() == 1
    assert len(tiles) == math.ceil(r.shape[0] / tile) * math.ceil(r.shape[1] / tile)


def test_crop_and_dict_round_trip():
    r = Region.from_bbox(*HELSINKI_BBOX)
    xmin, ymin, _, _ = r.bounds
    c = r.crop((xmin + 10.03, ymin + 20.01, xmin + 30.0, ymin + 50.0))
    assert c.resolution == r.resolution and c.crs == r.crs
    assert c.bounds[0] <= xmin + 10.03 and c.bounds[2] >= xmin + 30.0
    ys, xs = r.slices_of(c)
    np.testing.assert_allclose(r.coords()[0][xs], c.coords()[0])
    assert Region.from_dict(r.to_dict()) == r
    assert pickle.loads(pickle.dumps(r)) == r
    with pytest.raises(GeoInputError):
        r.crop((0, 0, 1, 1))


def test_from_geometry_any_crs():
    import shapely
    from pyproj import Transformer

    tr = Transformer.from_crs(4326, 3067, always_xy=True)
    x, y = tr.transform(24.9522, 60.1704)
    r = Region.from_geometry(shapely.Point(x, y).buffer(50), "EPSG:3067", resolution=0.5)
    assert r.crs.to_epsg() == 32635
    assert 199 <= r.shape[0] <= 202 and 199 <= r.shape[1] <= 202
    assert r.contains_xy(*r.lonlat_to_xy(24.9522, 60.1704))


def test_heading_yaw_convention():
    assert heading_to_yaw(0.0) == pytest.approx(math.pi / 2)  # north
    assert heading_to_yaw(90.0) == pytest.approx(0.0)  # east
    assert heading_to_yaw(180.0) == pytest.approx(-math.pi / 2)  # south
    assert yaw_to_heading(math.pi / 2) == pytest.approx(0.0)
    assert yaw_to_heading(0.0) == pytest.approx(90.0)
    h = np.array([0.0, 45.0, 90.0, 270.0, 359.0])
    np.testing.assert_allclose(yaw_to_heading(heading_to_yaw(h)), h, atol=1e-9)
    t = torch.tensor([0.0, 90.0, 200.0], dtype=torch.float64)
    y = heading_to_yaw(t)
    assert isinstance(y, torch.Tensor)
    torch.testing.assert_close(y[:2], torch.tensor([math.pi / 2, 0.0], dtype=torch.float64))
    torch.testing.assert_close(yaw_to_heading(y), t)
    # the unit vector of heading 90° points east (+x), of heading 0° north (+y)
    yaw = heading_to_yaw(np.array([0.0, 90.0]))
    np.testing.assert_allclose(np.c_[np.cos(yaw), np.sin(yaw)], [[0, 1], [1, 0]], atol=1e-12)


def test_bad_region_input():
    with pytest.raises(GeoInputError):
        Region.from_bbox(25.0, 60.0, 24.0, 61.0)
    with pytest.raises(GeoInputError):
        Region.from_bounds((0, 0, 10, 10), 4326, 0.2)  # geographic CRS
    with pytest.raises(GeoInputError):
        Region.from_bounds((0, 0, 10, 10), 32635, 0.0)


@pytest.mark.parametrize(
    "box, reason",
    [
        ((-170, -79, 170, 83), "too wide for one UTM region"),  # was accepted as one region of 340 degrees
        ((24.0, 60.0, 31.5, 60.5), "too wide"),  # 7.5 degrees: reaches 4.5 from zone 35's meridian
        ((179.0, 10.0, -179.0, 11.0), "antimeridian"),
        ((25.0, 60.0, 24.0, 61.0), "antimeridian"),  # inverted longitudes: the same message says both
        ((24.0, 61.0, 25.0, 60.0), "need lat_min < lat_max"),
        ((24.0, 60.0, 24.0, 61.0), "empty"),
        ((24.0, 83.5, 25.0, 84.5), "beyond UTM's latitudes"),
        ((24.0, -80.5, 25.0, -79.0), "beyond UTM's latitudes"),
        ((24.0, 60.0, 25.0, 95.0), "latitudes must lie in"),
        ((200.0, 60.0, 201.0, 61.0), "longitudes must lie in"),
        ((-math.inf, 60.0, 25.0, 61.0), "finite"),
        ((24.0, math.nan, 25.0, 61.0), "finite"),
    ],
)
def test_boxes_that_cannot_be_one_utm_region_are_refused_with_the_reason(box, reason):
    with pytest.raises(GeoInputError, match=reason) as e:
        Region.from_bbox(*box)
    assert "\n" not in str(e.value) and str(box[0]) in str(e.value)


def test_boxes_at_the_edges_of_the_rule_are_accepted():
    # a 5.9-degree box reaching 3.9 degrees from the central meridian of zone 35 (27 E), boxes at
    # both UTM latitude limits, and boxes touching the antimeridian from either side
    assert Region.from_bbox(25.0, 60.0, 30.9, 60.1, resolution=500).crs.to_epsg() == 32635
    assert Region.from_bbox(24.0, 83.9, 24.1, 84.0, resolution=50).crs.to_epsg() == 32635
    assert Region.from_bbox(24.0, -80.0, 24.1, -79.9, resolution=50).crs.to_epsg() == 32735
    assert Region.from_bbox(179.5, 0.0, 180.0, 0.5, resolution=50).crs.to_epsg() == 32660
    assert Region.from_bbox(-180.0, 0.0, -179.5, 0.5, resolution=50).crs.to_epsg() == 32601
