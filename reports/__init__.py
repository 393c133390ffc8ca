"""The comparison report: result records in, ``report.md`` / ``report.html`` / plots / tidy tables out.

    python -m seqbench.reports results/quick --out results/quick/report
    python -m seqbench.reports results/quick --out results/quick/report --wandb   # also as a wandb run (reports.wandb_run)
    reports.build(["results/quick"], "results/quick/report")   # -> Path to report.html

Reads only the records (``load``), so a report can be rebuilt at any time from any set of sweeps.

May import pandas, seaborn, scipy, sacrebleu and the torch-free ``harness`` modules (``schema``, ``secrets``,
``metrics``, ``io``); never torch (a report builds where pandas runs) and wandb only in ``wandb_run``.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pandas as pd

from . import hierarchical, significance, tables
from .load import Records, for_display, load
from .plots import Plot
from .render import Section, write_html, write_markdown
from .sections import all_sections

__all__ = ["build", "build_report", "load"]
TITLE = "seqbench comparison report"
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet reads a cell starting so as a formula


@dataclass
class Report:
    """A built report: the folder of its files, the folders and records it was built from, its sections."""
    out: Path
    dirs: list[Path]
    records: Records
    sections: list[Section]

    @property
    def html(self) -> Path:
        return self.out / "report.html"

    def plots(self) -> list[Plot]:
        """The plots drawn for this report (not the skipped ones), in the report's order."""
        return [b for s in self.sections for b in s.blocks if isinstance(b, Plot) and not b.skipped]


def build(record_dirs: Iterable[str | Path], out_dir: str | Path) -> Path:
    """Build the report of every ``record.json`` under ``record_dirs`` into ``out_dir``; returns report.html."""
    return build_report(record_dirs, out_dir).html


def build_report(record_dirs: Iterable[str | Path], out_dir: str | Path) -> Report:
    """``build``, returning what was built (for ``reports.wandb_run``, which logs it as a wandb run)."""
    record_dirs = [Path(d) for d in ([record_dirs] if isinstance(record_dirs, (str, Path)) else record_dirs)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = load(record_dirs)
    cache: dict = {}  # each run's resampled test scores, drawn once for both tests
    pairs = significance.pairwise(records.runs, cache)  # reads each run's test outputs: once, for tables and report
    archs = hierarchical.architectures(records.runs, cache)
    if len(records.runs):
        write_tables(records, out, pairs)
    sections = all_sections(for_display(records), record_dirs, out / "plots", pairs, archs)  # long names cut; tables keep them
    write_markdown(out / "report.md", TITLE, sections)
    write_html(out / "report.html", TITLE, sections)
    return Report(out, record_dirs, records, sections)


def write_tables(records: Records, out: Path, pairs: pd.DataFrame | None = None) -> None:
    """The tidy tables as CSV (and Parquet when pyarrow is installed); the analysis tables when records have them;
    ``significance`` (:func:`significance.pairwise`) when two systems of a task were compared."""
    frames = {"runs": records.runs, "curves": records.curves, "summary": tables.summary(records.runs)}
    extra = {"path_length": records.path_length,
             "accuracy_by_distance": tables.by_distance(records.by_distance, "accuracy"),
             "influence_by_distance": tables.by_distance(records.influence, "grad_norm"),
             "significance": pairs if pairs is not None else pd.DataFrame()}
    frames.update({name: frame for name, frame in extra.items() if len(frame)})
    for name, frame in frames.items():
        spreadsheet_safe(frame).to_csv(out / f"{name}.csv", index=False)
    if importlib.util.find_spec("pyarrow") is not None:
        runs = records.runs
        try:
            runs.to_parquet(out / "runs.parquet", index=False)
        except (TypeError, ValueError, ImportError):  # a column of mixed types: store it as text
            runs.astype({c: "string" for c in runs.columns if runs[c].dtype == object}).to_parquet(
                out / "runs.parquet", index=False)


def spreadsheet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame for a CSV file: text cells a spreadsheet would run as a formula get a leading ``'``.

    A record's strings (a preset named ``=HYPERLINK(...)``, an error starting with ``-``) would otherwise
    run when the CSV is opened in a spreadsheet (CSV injection; the prefix is OWASP's advice). Numbers
    stay numbers; the Parquet table keeps every string exactly.
    """
    def cell(v):
        return "'" + v if isinstance(v, str) and v.startswith(FORMULA_START) else v
    return frame.assign(**{c: frame[c].map(cell) for c in frame.columns
                           if not pd.api.types.is_numeric_dtype(frame[c])})
