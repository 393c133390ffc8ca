"""``python -m seqbench.reports <record dirs...> --out <dir> [--wandb]``: build the comparison report (and its wandb run)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import build_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqbench.reports", description=__doc__.split(":", 1)[1].strip())
    parser.add_argument("dirs", nargs="+", type=records_path,
                        help="folders searched recursively for record.json (or record files)")
    parser.add_argument("--out", required=True, type=out_folder,
                        help="output folder for report.md, report.html, plots/ and tables (made if missing)")
    parser.add_argument("--wandb", action="store_true",
                        help="also log the report as a wandb run (job_type report) in the records' group: offline "
                             "without WANDB_API_KEY; a rebuild updates the same run")
    parser.add_argument("--wandb-group", help="the report run's group (default: the records' sweep name, several "
                                              "joined by +)")
    parser.add_argument("--wandb-project", default="seqbench", help="the report run's project (default: seqbench)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        report = build_report(args.dirs, args.out)
    except FileNotFoundError as err:
        parser.error(str(err))
    print(f"[seqbench] report: {report.html}")
    print(f"[seqbench] markdown: {report.html.with_suffix('.md')}")
    logged = True
    if args.wandb:
        from .wandb_run import log_report

        logged = log_report(report, group=args.wandb_group, logger={"project": args.wandb_project})
    if report.records.runs.empty:  # a mistyped or wrong folder: an empty report is no success
        print(f"[seqbench] error: no result record (record.json) found under {', '.join(args.dirs)}; name the folder "
              "of a run or sweep (e.g. results/<sweep_name>)", file=sys.stderr)
        return 1
    return 0 if logged else 1


def records_path(value: str) -> str:
    """A folder of records (or a record file): an empty path is an error (it would read the current folder)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("an empty path (it would read the current folder): name a folder of records")
    return value


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
