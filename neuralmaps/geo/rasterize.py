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

from ..config import CLASS_NAMES
from .osm import OSMLayers, read_osm
from .region import Region

__all__ = ["rasterize_osm", "AREA_PRIORITY", "OBJECT_PRIORITY", "burn", "crossing_node_shapes"]

AREA_PRIORITY = ("terrain", "road", "sidewalk", "crosswalk", "building")  # later wins
OBJECT_PRIORITY = ("tree", "fence", "pole")  # later wins
TERRAIN_KINDS = {"grass", "park", "garden", "playground", "pitch", "scrub", "wood", "sand", "rock"}
SIDEWALK_FOOTWAYS = {"sidewalk", "footway", "cycleway", "path", "steps"}
CROSSING_NODE_RADIUS_M = 1.5  # crossing nodes off any road
CROSSING_WIDTH_M = 3.0  # along the road, for crossing nodes on a road
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


def crossing_node_shapes(layers: OSMLayers) -> list[BaseGeometry]:
    """Crosswalk footprints of `highway=crossing` nodes that no crossing way already draws.

    A node on (within 3 m of) a drivable road becomes a rectangle across that road: its width
    + 1 m long, CROSSING_WIDTH_M wide along the road. Other nodes become CROSSING_NODE_RADIUS_M discs.
    """
    p, f, r = layers.points, layers.footways, layers.roads
    nodes = p[p.kind == "crossing"].geometry
    if len(nodes) == 0:
        return []
    ways = f[f.kind == "crossing"].geometry
    if len(ways):  # the node where a crossing way meets the road is drawn by the way
        near, _ = ways.sindex.query(nodes.values, predicate="dwithin", distance=1.0)
        nodes = nodes[~np.isin(np.arange(len(nodes)), near)]
    roads = r[r.drivable.astype(bool)].reset_index(drop=True)
    out: list[BaseGeometry] = []
    if len(roads) == 0 or len(nodes) == 0:
        return out + list(nodes.buffer(CROSSING_NODE_RADIUS_M, quad_segs=4).values)
    (i_node, i_road), dist = roads.sindex.nearest(nodes.values, max_distance=3.0, return_distance=True)
    on_road = np.zeros(len(nodes), bool)
    on_road[i_node] = True
    for n, k in zip(i_node, i_road):
        pt, line, width = nodes.values[n], roads.geometry.values[k], float(roads.width_m.values[k])
        d = line.project(pt)
        a, b = line.interpolate(max(d - 1.0, 0.0)), line.interpolate(min(d + 1.0, line.length))
        t = np.array([b.x - a.x, b.y - a.y])
        if not np.linalg.norm(t) > 0:
            out.append(pt.buffer(CROSSING_NODE_RADIUS_M, quad_segs=4))
            continue
        t /= np.linalg.norm(t)
        nrm = np.array([-t[1], t[0]])
        c = np.array([pt.x, pt.y])
        ht, hn = CROSSING_WIDTH_M / 2, width / 2 + 0.5
        corners = [c + ht * t + hn * nrm, c - ht * t + hn * nrm, c - ht * t - hn * nrm, c + ht * t - hn * nrm]
        out.append(shapely.Polygon(corners))
    out += list(nodes[~on_road].buffer(CROSSING_NODE_RADIUS_M, quad_segs=4).values)
    return out


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


def rasterize_osm(source: Any, region: Region) -> xr.DataArray:
    """Multi-hot class raster of OSM `source` on `region`'s grid.

    source: anything `read_osm` takes (.pbf / .gpkg path, dict of GeoDataFrames) or an OSMLayers.
    Returns a DataArray, dims ("class", "y", "x"), uint8 {0, 1}, `class` = config.CLASS_NAMES,
    x/y at pixel centres in region.crs (metres), CRS and transform attached (rioxarray).
    Priorities (later wins) - areas: terrain < road < sidewalk < crosswalk < building;
    objects: tree < fence < pole; traffic_sign / traffic_light / street_light independent.
    """
    # Already-read layers are only cropped: an empty tile or strip of them rasterizes to zeros.
    layers = source.crop(region, margin_m=5.0) if isinstance(source, OSMLayers) else read_osm(source, region)
    idx = {c: i for i, c in enumerate(CLASS_NAMES)}
    out = np.zeros((len(CLASS_NAMES),) + region.shape, np.uint8)

    # Exclusive areas: one label raster, burnt in priority order, then one-hot.
    label = np.zeros(region.shape, np.uint8)
    for value, (name, geoms) in enumerate(
        sorted(_area_shapes(layers).items(), key=lambda kv: AREA_PRIORITY.index(kv[0])), start=1
    ):
        burn(geoms, region, value, out=label)
    for value, name in enumerate(AREA_PRIORITY, start=1):
        out[idx[name]] = label == value

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
