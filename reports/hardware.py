"""Fair hardware, checked: runs that got less of the machine than the runs they are compared with.

A run's CPU utilisation (the record's ``costs.cpu_utilization``: process CPU seconds over training seconds x
threads, harness/utilization.py) falls when another process takes its cores; it then trains slower and, under a
time budget, takes fewer updates, so its throughput and budget-bound quality are not comparable with the others'.
A finished training run is flagged when its utilisation is below ``RELATIVE`` x the median of its group (the
finished runs of the same task on the same device, the runs one table compares) or below ``FLOOR``, or when
the CPUs it kept busy training (threads x utilisation) are below ``RELATIVE`` x its group's median: a run that
found the CPUs busy at its start takes fewer threads (``trainer.threads=auto``) and keeps them busy, so its
utilisation alone looks fine while it had half the machine. Runs whose records hold no utilisation (older
records) are counted as unknown, never flagged; without a thread count only the utilisation is checked.
"""
from __future__ import annotations

import pandas as pd

RELATIVE = 0.8  # flagged below this fraction of the group's median utilisation
FLOOR = 0.5  # or below this utilisation, whatever the group's
GROUP = ["task", "device_name"]
COLUMNS = ["task", "device", "architecture", "seed", "job", "CPU utilisation", "group median", "threads", "why"]


def _numbers(runs: pd.DataFrame, column: str) -> pd.Series:
    """A column of the runs as numbers (NaN where a record has none, or where the column is missing)."""
    return pd.to_numeric(runs[column], errors="coerce") if column in runs else pd.Series(float("nan"), index=runs.index)


def utilization(runs: pd.DataFrame) -> pd.Series:
    """Each run's CPU utilisation as a number (NaN where the record has none)."""
    return _numbers(runs, "cpu_utilization")


def threads(runs: pd.DataFrame) -> pd.Series:
    """Each run's intra-op thread count (the record's ``environment.threads``; NaN where it has none)."""
    return _numbers(runs, "threads")


def busy_cpus(runs: pd.DataFrame) -> pd.Series:
    """The CPUs each run kept busy training, on average: threads x utilisation (CPU seconds / training seconds)."""
    return threads(runs) * utilization(runs)


def _median(values: pd.Series, runs: pd.DataFrame) -> pd.Series:
    return values.groupby([runs[c].fillna("?").astype(str) for c in GROUP]).transform("median")


def group_median(runs: pd.DataFrame) -> pd.Series:
    """Per run, the median utilisation of its group (the runs with a known utilisation)."""
    return _median(utilization(runs), runs)


def flag(runs: pd.DataFrame) -> pd.Series:
    """Per run (``runs``: finished training runs), why it got too little of the machine to compare, or None."""
    def why(util: float, median: float, n: float, busy: float, busy_median: float) -> str | None:
        if util < FLOOR:
            return f"CPU utilisation {util:.2f}, below {FLOOR}"
        if util < RELATIVE * median:
            return f"CPU utilisation {util:.2f}, below {RELATIVE} x its group's median {median:.2f}"
        if busy < RELATIVE * busy_median:
            return (f"{n:g} threads x CPU utilisation {util:.2f} = {busy:.2f} CPUs training, below {RELATIVE} x its "
                    f"group's median {busy_median:.2f} (fewer threads: the CPUs were busy at its start, or "
                    "trainer.threads differed)")
        return None  # fine, or unknown (NaN compares false)
    busy = busy_cpus(runs)
    return pd.Series([why(*row) for row in zip(utilization(runs), group_median(runs), threads(runs), busy,
                                                 _median(busy, runs))], index=runs.index, dtype=object)


def flagged(runs: pd.DataFrame) -> pd.DataFrame:
    """The flagged runs (``runs``: finished training runs) as a table for the report, in the runs' order."""
    if runs.empty:
        return pd.DataFrame(columns=COLUMNS)
    util, median, why = utilization(runs), group_median(runs), flag(runs)
    bad = why.notna()
    return pd.DataFrame({"task": runs["task"], "device": runs["device_name"], "architecture": runs["arch"],
                         "seed": runs["seed"], "job": runs["job"], "CPU utilisation": util.round(2),
                         "group median": median.round(2), "threads": threads(runs),
                         "why": why})[bad].reset_index(drop=True)


def row_warning(seeds: str) -> str:
    """The warning beside a summary row whose runs (``seeds``, e.g. ``seed 2 (0.31)``) were flagged."""
    return f"WARNING: low hardware utilisation ({seeds}): throughput and budget-bound quality not comparable"


def unknown(runs: pd.DataFrame) -> int:
    """How many of the finished training runs ``runs`` record no utilisation."""
    return int(utilization(runs).isna().sum()) if len(runs) else 0


# costs.peak_memory_kind values that measure the job's own peak (harness/environment.py, MEMORY_KINDS)
PER_JOB_MEMORY = ("cuda_allocated", "job_peak_rss", "job_sampled_rss")


def memory_not_per_job(done: pd.DataFrame) -> list[str]:
    """The finished runs whose peak memory is not the job's own: the process's lifetime peak (``process_max_rss``,
    what records before per-job measurement hold, or where the platform cannot measure per job), which in a sweep
    run in one process includes the earlier jobs' memory."""
    if done.empty or "peak_memory_bytes" not in done:
        return []
    kind = done["peak_memory_kind"] if "peak_memory_kind" in done else pd.Series(None, index=done.index)
    has = pd.to_numeric(done["peak_memory_bytes"], errors="coerce").notna()
    return sorted(done.loc[has & ~kind.isin(PER_JOB_MEMORY), "job"].astype(str))
