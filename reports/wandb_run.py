"""The comparison on the wandb dashboard: a built report logged as one run of ``job_type="report"``.

The run sits in the sweep's group, beside the job runs, and logs one row holding
  summary/<task>      per task a table, one row per architecture (best first): n, seeds, the quality mean
                      and std (and any other column ``tables.summary`` computes), the costs, device, budget
  plots/<name>        every plot the report drew, as an image (the budget ladder's figure among them)
  ladder/<task>       per task the budget ladder's rung table (reports/ladder.py), when runs are ladder rungs
  failed_jobs         the failed and unfinished jobs with their errors (a table, empty when there are none)
  warnings            the fair-comparison and task warnings; differing_settings: settings that differ
and the artifact ``report-<group>`` (type ``report``): report.html, report.md, the plots and the tidy tables
(CSV, Parquet). Its run id is derived from the group, so rebuilding a group's report (a rerun sweep, a second
``python -m seqbench.reports ... --wandb``) continues that run instead of adding one. Offline without an API key, like
the job runs (``harness.tracking``); table cells, the run's config and the text files of the artifact are
scrubbed of secrets like every file a job writes.

Imported only when a report goes to wandb: ``import reports`` needs neither wandb nor torch.
"""
from __future__ import annotations

import hashlib
import logging
import re
import shlex
from pathlib import Path

import pandas as pd

from seqbench.harness.secrets import scrub
from seqbench.harness.tracking import WandbTracker

from . import Report, ladder, tables
from .load import for_display, shorten

JOB_TYPE = "report"
# summary columns a task's table leaves out: the table is the task's, and its architecture (arch) names the rest
IDENTITY = ("task", "family", "metrics", "model", "label", "preset")
TEXT_SUFFIXES = (".html", ".md", ".csv", ".svg")  # artifact files scrubbed of secrets before they are logged
GROUP_LIMIT = 128  # characters of a wandb group name
log = logging.getLogger("seqbench.reports")


def log_report(report: Report, *, group: str | None = None, logger: dict | None = None) -> bool:
    """``publish``, printing where the run is; a failure is logged with the command that retries it, and the
    report's files stay as they are. Returns whether the run was logged."""
    try:
        run = publish(report, group=group, logger=logger)
    except Exception:
        retry = ["python", "-m", "seqbench.reports", *map(str, report.dirs), "--out", str(report.out), "--wandb",
                 *(["--wandb-group", group] if group else []),
                 *(["--wandb-project", logger["project"]] if logger and logger.get("project") else [])]
        log.exception("the report is built, but its wandb run failed; log it again with: %s", shlex.join(retry))
        return False
    print(f"[seqbench] wandb report run {run.id}: {where(run)}")
    return True


def publish(report: Report, *, group: str | None = None, logger: dict | None = None):
    """Log ``report`` as the report run of ``group`` (default: the records' sweep); returns the finished run.

    ``logger``: the job runs' logger settings (``project``, ``entity``, ``mode``, ``tags``, ``init_timeout``).
    """
    logger, runs = logger or {}, report.records.runs
    group = group or group_name(runs)
    tracker = WandbTracker(project=logger.get("project") or "seqbench", entity=logger.get("entity"), group=group,
                           name=f"report {group}", config=scrub(run_config(report)),
                           tags=[*(logger.get("tags") or ()), JOB_TYPE], mode=logger.get("mode"),
                           dir=str(report.out), init_timeout=logger.get("init_timeout"), job_type=JOB_TYPE,
                           run_id=run_id(group))
    try:
        if len(runs):  # no records: the run holds the report files, which say so
            tracker.log(contents(report))
        tracker.summary({"runs": len(runs), "failed_jobs": len(tables.failures(runs)) if len(runs) else 0})
        tracker.log_files(artifact_name(group), JOB_TYPE, artifact_files(report))
    except BaseException:
        tracker.finish(exit_code=1)
        raise
    tracker.finish()
    return tracker.run


def run_id(group: str) -> str:
    """The report run's id: the same for every build of one group's report; a hash, valid whatever the name."""
    return f"report-{hashlib.sha256(group.encode('utf-8', 'surrogatepass')).hexdigest()[:16]}"


def artifact_name(group: str) -> str:
    """``report-<group>`` in the characters wandb allows in an artifact name."""
    return "report-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", group)[:100]


def group_name(runs: pd.DataFrame) -> str:
    """The records' sweep, which groups their job runs; records of several sweeps: the names joined by ``+``."""
    names = sorted(set(runs["sweep"].dropna().astype(str))) if "sweep" in runs else []
    return shorten("+".join(names), GROUP_LIMIT) if names else "seqbench"


def run_config(report: Report) -> dict:
    runs = report.records.runs
    return {"report": str(report.out), "runs": len(runs),
            "sweeps": sorted(set(runs["sweep"].dropna().astype(str))) if "sweep" in runs else []}


def contents(report: Report) -> dict:
    """The run's one row: the tables and images the module docstring lists (names cut as the report cuts them)."""
    import wandb

    runs = for_display(report.records).runs
    summ = tables.summary(runs)
    row = {f"summary/{str(task).replace('/', '_')}": table(task_table(rows))
           for task, rows in summ.groupby("task", sort=True)}
    row.update({f"plots/{p.name}": wandb.Image(str(p.png), caption=f"{p.title}: {p.caption}" if p.caption else p.title)
                for p in report.plots()})
    row.update({key: table(frame) for key, frame in ladder.rung_tables(report.sections).items()})
    row.update(failed_jobs=table(tables.failures(runs)), warnings=table(warnings(runs)),
               differing_settings=table(tables.differing_settings(runs)))
    return row


def task_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One task's summary rows as its dashboard table: ``architecture`` first, then every column with a value,
    best first by the task's first metric (the report's order)."""
    quality = tables.task_metrics(rows)
    if quality:
        rows = tables.best_first(rows, quality[0], f"test_{quality[0].name}_mean")
    frame = rows.drop(columns=[c for c in IDENTITY if c in rows]).rename(columns={"arch": "architecture"})
    unscored = [c for c in frame if c.endswith("_n") and frame.get(f"{c[:-2]}_mean", pd.Series([0])).isna().all()]
    frame = frame.drop(columns=unscored).dropna(axis=1, how="all")  # counts of metrics the task does not report
    return frame[["architecture", *(c for c in frame.columns if c != "architecture")]].reset_index(drop=True)


def warnings(runs: pd.DataFrame) -> pd.DataFrame:
    """The warnings the report shows above each task's table: runs on different devices or budgets, task notes."""
    found = tables.warnings_by_task(runs)
    return pd.DataFrame([(t, m) for t, msgs in sorted(found.items()) for m in msgs], columns=["task", "warning"])


def table(frame: pd.DataFrame):
    """``frame`` as a ``wandb.Table``: plain Python values, gaps as None, secrets redacted."""
    import wandb

    cells = frame.astype(object).where(frame.notna(), None).values.tolist()
    return wandb.Table(columns=[str(c) for c in frame.columns], data=scrub(cells))


def artifact_files(report: Report) -> dict[str, Path]:
    """The report's files (name in the artifact -> path); text files are scrubbed of secrets in place first."""
    out = report.out
    found = [out / "report.html", out / "report.md", *sorted(out.glob("*.csv")), *sorted(out.glob("*.parquet")),
             *(f for p in report.plots() for f in (p.png, p.svg) if f is not None)]
    found = [f for f in found if f.is_file()]
    for f in found:
        if f.suffix in TEXT_SUFFIXES:
            _scrub_file(f)
    return {f.relative_to(out).as_posix(): f for f in found}


def _scrub_file(path: Path) -> None:
    text = path.read_text(encoding="utf-8", errors="surrogateescape")
    clean = scrub(text)
    if clean != text:
        path.write_text(clean, encoding="utf-8", errors="surrogateescape")


def where(run) -> str:
    """Where the finished run is: its URL, or its offline folder and how to upload it."""
    if run.disabled:
        return "not logged (WANDB_MODE=disabled)"
    if run.offline:
        folder = Path(run.dir).parent
        return f"offline in {folder}; upload it with: wandb sync {folder}"
    return run.url
