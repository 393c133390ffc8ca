"""``python -m reports <record dirs...> --out <dir>``: build the comparison report."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reports", description=__doc__.split(":", 1)[1].strip())
    parser.add_argument("dirs", nargs="+", help="folders searched recursively for record.json (or record files)")
    parser.add_argument("--out", required=True, type=out_folder,
                        help="output folder for report.md, report.html, plots/ and tables (made if missing)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        path = build(args.dirs, args.out)
    except FileNotFoundError as err:
        parser.error(str(err))
    print(f"[seqbench] report: {path}")
    print(f"[seqbench] markdown: {path.with_suffix('.md')}")
    return 0


def out_folder(value: str) -> Path:
    """``--out``: a folder, or a path where one can be made; a file on the way is an error naming it."""
    path = Path(value)
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            raise argparse.ArgumentTypeError(f"{value}: {part} is a file, not a folder; give a folder for the "
                                             "report (it is made if missing)")
    return path


if __name__ == "__main__":
    sys.exit(main())
