"""Burn OSM layers into a multi-hot class raster on a Region grid.

Rules (the class raster every store and the semantic net train on):
- Area classes are exclusive, burnt in priority order, later wins:
  terrain < road < sidewalk < crosswalk < building.
  terrain: grass/park/garden/playground/pitch/scrub/wood/sand/rock areas;
  road: drivable roads buffered by half their width, parking areas;
  sidewalk: sidewalk/footway/cycleway/path/steps ways buffered by half their width, pedestrian
  streets (non-drivable roads) and pedestrian areas/squares;
  crosswalk: crossing ways buffered by half their width; crossing nodes without a crossing way
  as 3 m wide rectangles across the nearest road (1.5 m discs when no road is within 3 m);
  building: footprints.
- Object classes are exclusive, later wins: tree < fence < pole.
  tree: 2 m discs (trunk + crown footprint); fence: fences/walls as 1-pixel lines;
  pole: 0.3 m discs at poles and at the posts of street lights, traffic lights and signs.
- traffic_sign, traffic_light, street_light are independent binary classes (0.4-0.5 m discs).
Every point object covers at least the pixel containing it.
"""

from __future__ import annotations

from typing import Any, Iterable

import geopandas as gpd
import numpy as np
import shapely
import xarray as xr
from rasterio.features import rasterize as _rio_rasterize
from shapely.geometry.base import BaseGeometry

from ..classes import AREA_PRIORITY, CLASS_NAMES, OBJECT_PRIORITY, VOID, class_id
from .osm import OSMLayers, read_osm
from .region import Region

__all__ = [
    "rasterize_osm", "area_label", "AREA_PRIORITY", "OBJECT_PRIORITY", "burn", "crossing_node_shapes",
    "crossing_node_walks", "CROSSING_WAY_COVER_M", "CROSSING_WIDTH_M",
]

TERRAIN_KINDS = {"grass", "park", "garden", "playground", "pitch", "scrub", "wood", "sand", "rock"}
SIDEWALK_FOOTWAYS = {"sidewalk", "footway", "cycleway", "path", "steps"}
CROSSING_NODE_RADIUS_M = 1.5  # crossing nodes off any road
CROSSING_WIDTH_M = 3.0  # along the road, for crossing nodes on a road
CROSSING_WAY_COVER_M = 1.0  # a crossing node this close to a crossing way is drawn by the way
CROSSING_NODE_ROAD_M = 3.0  # a crossing node this close to a drivable road crosses it
POINT_RADII_M = {  # point kind -> (class, disc radius in metres)
    "tree": ("tree", 2.0),
    "pole": ("pole", 0.3),
    "street_light": ("street_light", 0.4),
    "traffic_sign": ("traffic_sign", 0.4),
    "traffic_light": ("traffic_light", 0.5),
}
POLE_CARRIERS = {"street_light", "traffic_sign", "traffic_light"}  # these stand on a pole
POLE_RADIUS_M = 0.3


def burn(geoms: Iterable[BaseGeometry], region: Region, value: int = 1, out: np.ndarray | None = None,
         all_touched: bool = False) -> np.ndarray:
    """Burn shapely geometries (in region.crs) into a uint8 (H, W) raster; later shapes win."""
    shapes = [(g, value) for g in geoms if g is not None and not g.is_empty]
    if out is None:
        out = np.zeros(region.shape, np.uint8)
    if shapes:
        _rio_rasterize(shapes, out=out, transform=region.transform, all_touched=all_touched, dtype=np.uint8)
    return out


def _buffered(g: gpd.GeoDataFrame, half_width: Any) -> list[BaseGeometry]:
    if len(g) == 0:
        return []
    return list(g.geometry.buffer(half_width, quad_segs=4).values)


def _discs(pts: gpd.GeoDataFrame, radius: float) -> list[BaseGeometry]:
    """Discs around points plus the points themselves (so each covers at least its own pixel)."""
    if len(pts) == 0:
        return []
    return list(pts.geometry.buffer(radius, quad_segs=4).values) + list(pts.geometry.values)


def crossing_node_walks(layers: OSMLayers) -> tuple[list[shapely.LineString], list[shapely.Point]]:
    """The `highway=crossing` nodes that no crossing way already draws, as walking lines.

    A node is drawn by a crossing way when one passes within CROSSING_WAY_COVER_M. A node within
    CROSSING_NODE_ROAD_M of a drivable road crosses the nearest one: its walk is the 2-point line
    through the node across the road (the road's width + 1 m long, perpendicular to the road's
    direction over +-1 m). Returns (walks, off-road nodes); the crosswalk is the walk widened to
    CROSSING_WIDTH_M along the road, an off-road node a CROSSING_NODE_RADIUS_M disc. The twin
    paints its zebra stripes along the same walks."""
    p, f, r = layers.points, layers.footways, layers.roads
    nodes = p[p.kind == "crossing"].geometry if len(p) else p.geometry
    if len(nodes) == 0:
        return [], []
    ways = f[f.kind == "crossing"].geometry if len(f) else f.geometry
    if len(ways):  # the node where a crossing way meets the road is drawn by the way
        near, _ = ways.sindex.query(nodes.values, predicate="dwithin", distance=CROSSING_WAY_COVER_M)
        nodes = nodes[~np.isin(np.arange(len(nodes)), near)]
    roads = r[r.drivable.astype(bool)].reset_index(drop=True) if len(r) else r
    if len(roads) == 0 or len(nodes) == 0:
        return [], list(nodes.values)
    (i_node, i_road), dist = roads.sindex.nearest(nodes.values, max_distance=CROSSING_NODE_ROAD_M,
                                                  return_distance=True)
    on_road = np.zeros(len(nodes), bool)
    on_road[i_node] = True
    walks: list[shapely.LineString] = []
    off: list[shapely.Point] = []
    for n, k in zip(i_node, i_road):
        pt, line, width = nodes.values[n], roads.geometry.values[k], float(roads.width_m.values[k])
        d = line.project(pt)
        a, b = line.interpolate(max(d - 1.0, 0.0)), line.interpolate(min(d + 1.0, line.length))
        t = np.array([b.x - a.x, b.y - a.y])
        if not np.linalg.norm(t) > 0:
            off.append(pt)
            continue
        t /= np.linalg.norm(t)
        nrm = np.array([-t[1], t[0]])
        c, hn = np.array([pt.x, pt.y]), width / 2 + 0.5
        walks.append(shapely.LineString([c - hn * nrm, c + hn * nrm]))
    return walks, off + list(nodes[~on_road].values)


def crossing_node_shapes(layers: OSMLayers) -> list[BaseGeometry]:
    """Crosswalk footprints of the crossing nodes that no crossing way already draws
    (`crossing_node_walks`): rectangles across roads, CROSSING_WIDTH_M wide along the road, and
    CROSSING_NODE_RADIUS_M discs for the others."""
    walks, off = crossing_node_walks(layers)
    return ([w.buffer(CROSSING_WIDTH_M / 2, cap_style="flat") for w in walks]
            + [pt.buffer(CROSSING_NODE_RADIUS_M, quad_segs=4) for pt in off])


def _area_shapes(layers: OSMLayers) -> dict[str, list[BaseGeometry]]:
    a, r, f, p = layers.areas, layers.roads, layers.footways, layers.points
    drivable = r[r.drivable.astype(bool)]
    pedestrian = r[~r.drivable.astype(bool)]
    crossings = f[f.kind == "crossing"]
    walks = f[f.kind.isin(SIDEWALK_FOOTWAYS)]
    return {
        "terrain": list(a[a.kind.isin(TERRAIN_KINDS)].geometry.values),
        "road": _buffered(drivable, drivable.width_m / 2) + list(a[a.kind == "parking"].geometry.values),
        "sidewalk": _buffered(walks, walks.width_m / 2) + _buffered(pedestrian, pedestrian.width_m / 2)
        + list(a[a.kind == "pedestrian"].geometry.values),
        "crosswalk": _buffered(crossings, crossings.width_m / 2) + crossing_node_shapes(layers),
        "building": list(layers.buildings.geometry.values),
    }


def _layers(source: Any, region: Region) -> OSMLayers:
    # Already-read layers are only cropped: an empty tile or strip of them rasterizes to zeros.
    return source.crop(region, margin_m=5.0) if isinstance(source, OSMLayers) else read_osm(source, region)


def _area_label(layers: OSMLayers, region: Region) -> np.ndarray:
    label = np.full(region.shape, VOID, np.uint8)
    shapes = _area_shapes(layers)
    for name in AREA_PRIORITY:  # later wins
        burn(shapes[name], region, class_id(name), out=label)
    return label


def area_label(source: Any, region: Region) -> np.ndarray:
    """The exclusive area class of each pixel: (H, W) uint8, `class_id(name)` or VOID where none.

    The area channels of `rasterize_osm` one-hot encode exactly this; the twin's ground raster
    is labelled with it. source: as for `rasterize_osm`."""
    return _area_label(_layers(source, region), region)


def rasterize_osm(source: Any, region: Region) -> xr.DataArray:
    """Multi-hot class raster of OSM `source` on `region`'s grid.

    source: anything `read_osm` takes (.pbf / .gpkg path, dict of GeoDataFrames) or an OSMLayers.
    Returns a DataArray, dims ("class", "y", "x"), uint8 {0, 1}, `class` = config.CLASS_NAMES,
    x/y at pixel centres in region.crs (metres), CRS and transform attached (rioxarray).
    Priorities (later wins) - areas: terrain < road < sidewalk < crosswalk < building;
    objects: tree < fence < pole; traffic_sign / traffic_light / street_light independent.
    """
    layers = _layers(source, region)
    idx = {c: class_id(c) for c in CLASS_NAMES}
    out = np.zeros((len(CLASS_NAMES),) + region.shape, np.uint8)

    # Exclusive areas: one label raster, burnt in priority order, then one-hot.
    label = _area_label(layers, region)
    for name in AREA_PRIORITY:
        out[idx[name]] = label == idx[name]

    # Exclusive objects, same scheme.
    p = layers.points
    objects = {
        "tree": _discs(p[p.kind == "tree"], POINT_RADII_M["tree"][1]),
        "fence": list(layers.fences.geometry.values),
        "pole": _discs(p[p.kind.isin({"pole"} | POLE_CARRIERS)], POLE_RADIUS_M),
    }
    label[:] = 0
    for value, name in enumerate(OBJECT_PRIORITY, start=1):
        burn(objects[name], region, value, out=label, all_touched=name == "fence")
    for value, name in enumerate(OBJECT_PRIORITY, start=1):
        out[idx[name]] = label == value

    # Independent binary classes.
    for kind in sorted(POLE_CARRIERS):
        cls, radius = POINT_RADII_M[kind]
        burn(_discs(p[p.kind == kind], radius), region, 1, out=out[idx[cls]])

    da = region.to_xarray(
        out, dims=("class", "y", "x"), coords={"class": list(CLASS_NAMES)}, name="semantic",
        attrs={
            "description": "multi-hot OSM class raster (1 = class present)",
            "area_priority": " < ".join(AREA_PRIORITY) + " (exclusive, later wins)",
            "object_priority": " < ".join(OBJECT_PRIORITY) + " (exclusive, later wins)",
            "binary_classes": "traffic_sign, traffic_light, street_light (independent)",
            "source": layers.source,
        },
    )
    return da
