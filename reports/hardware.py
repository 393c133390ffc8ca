"""Fair hardware, checked: runs that got less of the machine than the runs they are compared with.

A run's CPU utilisation (the record's ``costs.cpu_utilization``: process CPU seconds over training seconds x
threads, harness/utilization.py) falls when another process takes its cores; it then trains slower and, under a
time budget, takes fewer updates, so its throughput and budget-bound quality are not comparable with the others'.
A finished training run is flagged when its utilisation is below ``RELATIVE`` x the median of its group (the
finished runs of the same task on the same device, the runs one table compares) or below ``FLOOR``. Runs whose
records hold no utilisation (older records) are counted as unknown, never flagged.
"""
from __future__ import annotations

import pandas as pd

RELATIVE = 0.8  # flagged below this fraction of the group's median utilisation
FLOOR = 0.5  # or below this utilisation, whatever the group's
GROUP = ["task", "device_name"]
COLUMNS = ["task", "device", "architecture", "seed", "job", "CPU utilisation", "group median", "why"]


def utilization(runs: pd.DataFrame) -> pd.Series:
    """Each run's CPU utilisation as a number (NaN where the record has none)."""
    return pd.to_numeric(runs["cpu_utilization"], errors="coerce") if "cpu_utilization" in runs else \
        pd.Series(float("nan"), index=runs.index)


def group_median(runs: pd.DataFrame) -> pd.Series:
    """Per run, the median utilisation of its group (the runs with a known utilisation)."""
    return utilization(runs).groupby([runs[c].fillna("?").astype(str) for c in GROUP]).transform("median")


def flag(runs: pd.DataFrame) -> pd.Series:
    """Per run (``runs``: finished training runs), why its utilisation is too low to compare, or None."""
    def why(util: float, median: float) -> str | None:
        if util < FLOOR:
            return f"CPU utilisation {util:.2f}, below {FLOOR}"
        if util < RELATIVE * median:
            return f"CPU utilisation {util:.2f}, below {RELATIVE} x its group's median {median:.2f}"
        return None  # fine, or unknown (NaN compares false)
    return pd.Series([why(u, m) for u, m in zip(utilization(runs), group_median(runs))], index=runs.index,
                     dtype=object)


def flagged(runs: pd.DataFrame) -> pd.DataFrame:
    """The flagged runs (``runs``: finished training runs) as a table for the report, in the runs' order."""
    if runs.empty:
        return pd.DataFrame(columns=COLUMNS)
    util, median, why = utilization(runs), group_median(runs), flag(runs)
    bad = why.notna()
    return pd.DataFrame({"task": runs["task"], "device": runs["device_name"], "architecture": runs["arch"],
                         "seed": runs["seed"], "job": runs["job"], "CPU utilisation": util.round(2),
                         "group median": median.round(2), "why": why})[bad].reset_index(drop=True)


def row_warning(seeds: str) -> str:
    """The warning beside a summary row whose runs (``seeds``, e.g. ``seed 2 (0.31)``) were flagged."""
    return f"WARNING: low hardware utilisation ({seeds}): throughput and budget-bound quality not comparable"


def unknown(runs: pd.DataFrame) -> int:
    """How many of the finished training runs ``runs`` record no utilisation."""
    return int(utilization(runs).isna().sum()) if len(runs) else 0
