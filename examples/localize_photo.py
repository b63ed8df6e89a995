"""Localize a photo in a neural map from its EXIF GPS position, and draw the result.

    python examples/localize_photo.py --map out/map.zarr --photo photo.jpg [--camera cam.json] [--out result.png]
    python examples/localize_photo.py --map out/map.zarr --twin-query out/captures --photo photo.jpg

The photo's EXIF GPS position is the prior (searched within --radius metres) and its 35 mm focal
length gives the camera. The result (position, heading clockwise from north, 1-sigma error
ellipse, confidence) is printed as JSON and drawn on the map's classes in --out.

--twin-query CAPTURE_DIR is the stand-in for a phone photo: the pedestrian photo of a twin capture
nearest the map's centre (from its queries.parquet, never used to build the map) is written to
--photo with a GPS fix a few metres off its true position and its 35 mm focal length in the EXIF;
the true pose is drawn too.

For your own photos: drop --twin-query and pass a JPEG with EXIF GPS. Give --camera cam.json
({"width": 4032, "height": 3024, "hfov_deg": 68} or "fx", optional "z": camera height in metres,
"pitch_deg") when the EXIF has no 35 mm focal length; the photo is shrunk to the model's image
size. The map must cover the place (build_and_export.py, bring_your_own_data.py).
"""

import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from neuralmaps import CaptureSet, NeuralMap
from neuralmaps.maps.demo import plot_localization


def write_twin_photo(capture_dir: Path, nm: NeuralMap, photo: Path, gps_error_m: float = 5.0) -> dict:
    """Copy the twin query photo nearest the map's centre to `photo` with EXIF GPS (its position moved
    by `gps_error_m`) and FocalLengthIn35mmFilm. Returns its true pose (CRS x, y, heading)."""
    queries = CaptureSet.open(capture_dir, "queries.parquet").to_crs(nm.crs)
    f = queries.frame
    x0, y0, x1, y1 = nm.region.bounds
    i = int(np.argmin(np.hypot(f["x"] - (x0 + x1) / 2, f["y"] - (y0 + y1) / 2)))
    row = f.iloc[i]
    angle = np.random.default_rng(0).uniform(0, 2 * math.pi)
    lon, lat = nm.region.xy_to_lonlat(row.x + gps_error_m * math.cos(angle), row.y + gps_error_m * math.sin(angle))

    def dms(v: float) -> tuple[float, float, float]:
        d, m = int(v), int((v - int(v)) * 60)
        return float(d), float(m), (v - d - m / 60) * 3600

    exif = Image.Exif()
    gps = exif.get_ifd(0x8825)  # GPSInfo
    gps[1], gps[2], gps[3], gps[4] = "N" if lat >= 0 else "S", dms(abs(lat)), "E" if lon >= 0 else "W", dms(abs(lon))
    exif.get_ifd(0x8769)[0xA405] = int(round(row.fx / max(row.width, row.height) * 36))  # FocalLengthIn35mmFilm
    with Image.open(queries.paths()[i]) as im:
        im.save(photo, exif=exif, quality=95)
    return {"x": [row.x], "y": [row.y], "heading": [row.heading_deg]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--map", required=True, help="neural map store (map.zarr)")
    p.add_argument("--photo", required=True, help="the photo (JPEG with EXIF GPS)")
    p.add_argument("--camera", default=None, help="camera JSON (default: from the EXIF 35 mm focal length)")
    p.add_argument("--radius", type=float, default=30.0, help="search radius around the GPS position, metres")
    p.add_argument("--out", default="localization.png", help="PNG of the result")
    p.add_argument("--twin-query", default=None, metavar="CAPTURE_DIR",
                   help="stand-in: write --photo from a twin query photo")
    args = p.parse_args()
    nm = NeuralMap.open(args.map)
    truth = write_twin_photo(Path(args.twin_query), nm, Path(args.photo)) if args.twin_query else None

    res = nm.localize(args.photo, camera=args.camera, radius_m=args.radius)  # prior and camera from the EXIF
    print(json.dumps({k: v for k, v in res.to_dict().items() if k != "candidates"}, indent=1))
    if not res.confident:
        print("warning:", res.message)
    if truth is not None:
        err = math.hypot(res.easting - truth["x"][0], res.northing - truth["y"][0])
        print(f"error: {err:.1f} m, {abs((res.heading_deg - truth['heading'][0] + 180) % 360 - 180):.1f} deg")

    px, py = nm.region.lonlat_to_xy(res.prior_lon, res.prior_lat)
    r = args.radius + 10
    plot_localization(nm, [res], args.out, truth=truth, priors=([px], [py]), radius_m=args.radius,
                      bounds=(px - r, py - r, px + r, py + r), title=f"{Path(args.photo).name}: {res.message}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
