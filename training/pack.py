"""Pack the train (and some val) pairs of training-chunk stores into a few portable files.

    python -m training.pack --data outputs/helany.zarr outputs/helany3.zarr --holdout outputs/helany.zarr \
        --only-shipped-blocks --out outputs/pack --quality 85 --shard-mb 56

For training where the stores cannot go: a lent GPU machine with torch alone (no zarr, no GDAL) or a
transfer limit per call. `python -m training.train --data PACK ...` trains on a pack as on the stores
it came from (`neuralmaps.data.packed`). The train pairs are filtered as `training.train` filters
them: `--holdout` areas out, and with `--only-shipped-blocks` only the split blocks the shipped
model trained on (what `--init pretrained` keeps). Validation pairs: the first store's val split,
the first `--val` of them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from neuralmaps.data import SceneDataset  # noqa: E402
from neuralmaps.data.packed import write_pack  # noqa: E402
from neuralmaps.models import SNAP  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, nargs="+", help="training-chunk stores (one city, one scene config)")
    ap.add_argument("--holdout", nargs="*", default=[], metavar="STORE",
                    help="stores whose val/test areas no packed train pair may lie in")
    ap.add_argument("--only-shipped-blocks", action="store_true",
                    help="only train pairs in the split blocks the shipped model trained on")
    ap.add_argument("--val", type=int, default=64, help="val pairs of the first store to pack (default 64)")
    ap.add_argument("--out", required=True, help="a new (or empty) folder")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality of the images (default 90)")
    ap.add_argument("--shard-mb", type=float, default=56.0, help="largest shard in MiB (default 56)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    try:
        only = (SNAP.pretrained_training_blocks() or frozenset()) if args.only_shipped_blocks else None
        sources = [(SceneDataset(d, "train", holdout=tuple(args.holdout), only_blocks=only), "train")
                   for d in args.data]
        val = SceneDataset(args.data[0], "val")
        val.indices = val.indices[: max(args.val, 0)]
        if len(val):
            sources.append((val, "val"))
        m = write_pack(sources, args.out, quality=args.quality, shard_mb=args.shard_mb, progress=not args.quiet)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for s in m["sources"]:
        print(f"{s['path']} {s['split']}: {s['pairs']} pairs ({s['held_out']} held out)")
    for s in m["shards"]:
        print(f"{args.out}/{s['file']}: {s['pairs']} pairs, {s['bytes'] / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
