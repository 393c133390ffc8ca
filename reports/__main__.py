"""``python -m reports <record dirs...> --out <dir>``: build the comparison report."""
from __future__ import annotations

import argparse
import logging
import sys

from . import build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reports", description=__doc__.split(":", 1)[1].strip())
    parser.add_argument("dirs", nargs="+", help="folders searched recursively for record.json (or record files)")
    parser.add_argument("--out", required=True, help="output folder for report.md, report.html, plots/ and tables")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        path = build(args.dirs, args.out)
    except FileNotFoundError as err:
        parser.error(str(err))
    print(f"[seqbench] report: {path}")
    print(f"[seqbench] markdown: {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
