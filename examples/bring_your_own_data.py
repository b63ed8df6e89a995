"""Your own photos: a pose CSV and a GeoTIFF orthophoto -> CaptureSet.from_table -> build -> export.

    python examples/bring_your_own_data.py --poses poses.csv --images photos/ --ortho ortho.tif --out out/mine
    python examples/bring_your_own_data.py --from-twin out/captures --out out/mine   # a stand-in

poses.csv has one row per photo (names as `CaptureSet.from_table` reads them), e.g.

    image,lat,lon,altitude,heading,pitch,roll,width,height,hfov_deg,run,timestamp
    cam0/000001.jpg,60.167012,24.948710,2.0,93.5,-1.0,0.0,256,128,90.0,drive1,2024-06-01T10:00:00Z

- image: path relative to --images; width, height: its size in pixels;
- lat, lon: WGS84 degrees (reprojected to the UTM zone of the data); altitude: camera height
  above the ground, metres;
- heading: direction of the optical axis, degrees clockwise from north; pitch: up positive;
  roll: clockwise seen from behind;
- hfov_deg (or fx, and optionally fy, cx, cy, k1, k2 in pixels); camera_model pinhole/fisheye;
- run (one id per drive), timestamp: optional.
x, y in a projected CRS (crs=...) or COLMAP poses (qw, qx, qy, qz, tx, ty, tz) work too.

The orthophoto may be any GeoTIFF in any CRS (it is warped onto the map grid; pixels it does not
cover are zeros). The shipped model was trained on 256 x 128 px pinhole images with a 90 degree
field of view from 1.6-2 m: resize your photos to about that size (and scale fx, cx, cy) first,
and expect it to work on real photos only after training on them (MODEL_CARD.md).

--from-twin CAPTURE_DIR is the stand-in: it writes OUT/poses.csv in this format from a twin
capture set (images of CAPTURE_DIR/images, orthophoto CAPTURE_DIR/aerial.tif).
"""

import argparse
from pathlib import Path

from neuralmaps import CaptureSet, build_map


def write_twin_table(capture_dir: Path, out: Path) -> Path:
    """A mapping team's pose table, written from a twin capture set (lat/lon, heading/pitch/roll, hfov)."""
    import numpy as np

    f = CaptureSet.open(capture_dir).frame
    lonlat = f.geometry.to_crs(4326)
    table = f.assign(lat=lonlat.y, lon=lonlat.x, altitude=f["z"], heading=f["heading_deg"], pitch=f["pitch_deg"],
                     roll=f["roll_deg"], hfov_deg=np.degrees(2 * np.arctan(f["width"] / (2 * f["fx"]))),
                     run=f["run_id"], timestamp=f["time"])
    cols = ["image", "lat", "lon", "altitude", "heading", "pitch", "roll", "width", "height", "hfov_deg", "run",
            "timestamp"]
    out.mkdir(parents=True, exist_ok=True)
    table[cols].to_csv(out / "poses.csv", index=False, float_format="%.9f")
    return out / "poses.csv"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--poses", default=None, help="the pose table (CSV or Parquet)")
    p.add_argument("--images", default=None, help="folder the table's image paths are relative to")
    p.add_argument("--ortho", default=None, help="orthophoto GeoTIFF (any CRS)")
    p.add_argument("--out", default="out/my_map", help="output folder")
    p.add_argument("--bbox", default=None, help="W,S,E,N in degrees: map only this box (default: the photos' extent)")
    p.add_argument("--from-twin", default=None, metavar="CAPTURE_DIR",
                   help="stand-in: a pose table from a twin capture")
    args = p.parse_args()
    out = Path(args.out)
    if args.from_twin:
        args.poses = write_twin_table(Path(args.from_twin), out)
        args.images, args.ortho = args.from_twin, Path(args.from_twin) / "aerial.tif"
    if not (args.poses and args.images):
        p.error("give --poses and --images (or --from-twin)")

    # Reads and checks the table (columns, CRS, every image file and its size).
    captures = CaptureSet.from_table(args.poses, args.images)
    print(captures)

    region = [float(v) for v in args.bbox.split(",")] if args.bbox else None
    nm = build_map(region, captures, aerial=args.ortho, out=out / "map.zarr")
    print(nm)
    files = nm.export(out / "export")
    print(f"open {files['qgis_project']} in QGIS")


if __name__ == "__main__":
    main()
