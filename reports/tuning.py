"""The tuning protocol's choice (``experiment=tune``): per task and architecture, the best grid point on the
validation set.

    python -m seqbench.reports.tuning results/tune/<date>     # writes <sweep>/tuned.yaml and prints the overrides to use

The grid is what a sweep's training runs vary among ``trainer.lr``, ``trainer.warmup_steps`` and
``trainer.clip_norm``. A grid point's score is the mean over its finished seeds of the task's first metric
(harness/metrics.py: BLEU, perplexity, WER, accuracy) on the validation set, as the record's ``metrics.valid``
holds it for the evaluated checkpoint; the test set is never read. Ties go to the first point in grid order
(the smaller learning rate, then the shorter warm-up). Torch-free, like the rest of the report.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import yaml

from seqbench.harness.metrics import METRICS

from . import tables
from .load import TUNED_KEYS, load
from .render import Note, Section, Table

TUNED_NAME = "tuned.yaml"
LABELS = {"lr": "lr", "warmup_steps": "warm-up", "clip_norm": "clip"}
PRESETS = Path(__file__).resolve().parents[1] / "conf" / "model"
GRID = ["task", "architecture", "model", "preset", *TUNED_KEYS, "metric", "valid", "seeds", "failed"]


def grid(runs: pd.DataFrame) -> pd.DataFrame:
    """Per task, architecture and grid point (in grid order): the mean validation score over seeds, the seeds
    scored, and the runs that did not finish (a learning rate that diverges shows here)."""
    if runs.empty:
        return pd.DataFrame(columns=GRID)
    train = runs[runs["kind"] == "train"]
    rows = []
    for (task, arch), group in train.groupby(["task", "arch"], sort=True):
        metrics = tables.task_metrics(group)
        if not metrics:
            continue
        for point, at in group.groupby(list(TUNED_KEYS), dropna=False, sort=True):
            done = at[at["status"] == "ok"]
            values = pd.to_numeric(done[f"valid_{metrics[0].name}"], errors="coerce").dropna()
            rows.append({"task": task, "architecture": arch, "model": at["model"].iloc[0],
                         "preset": at["preset"].iloc[0], **dict(zip(TUNED_KEYS, point)), "metric": metrics[0].name,
                         "valid": values.mean() if len(values) else None, "seeds": len(values),
                         "failed": len(at) - len(done)})
    return pd.DataFrame(rows, columns=GRID)


def is_grid(points: pd.DataFrame) -> bool:
    """Whether some architecture was trained at more than one grid point on one task (a tuning sweep)."""
    return bool(len(points)) and points.groupby(["task", "architecture"]).size().max() > 1


def choose(points: pd.DataFrame) -> pd.DataFrame:
    """Per task and architecture, the grid point with the best validation score (the first of equals)."""
    scored = points[pd.to_numeric(points["valid"], errors="coerce").notna()]
    best = []
    for _, group in scored.groupby(["task", "architecture"], sort=True):
        values = pd.to_numeric(group["valid"])
        best.append(values.idxmax() if METRICS[group["metric"].iloc[0]].higher_is_better else values.idxmin())
    return scored.loc[best].reset_index(drop=True)


def overrides(row) -> list[str]:
    """The command-line overrides that train ``row``'s architecture with its chosen settings."""
    preset = row["model"] if row["preset"] == "small" else f"{row['model']}_{row['preset']}"
    model = [f"model={preset}"] if (PRESETS / f"{preset}.yaml").is_file() else []
    return model + [f"trainer.{k}={_value(row[k])}" for k in TUNED_KEYS if pd.notna(row[k])]


def tuned(chosen: pd.DataFrame) -> dict:
    """tuned.yaml's content: task -> architecture -> overrides, validation score and seeds."""
    out: dict = {}
    for _, row in chosen.iterrows():
        out.setdefault(str(row["task"]), {})[str(row["architecture"])] = {
            "overrides": overrides(row), f"valid_{row['metric']}": float(row["valid"]), "seeds": int(row["seeds"])}
    return out


def write(sweep: str | Path) -> tuple[Path, pd.DataFrame]:
    """Choose from the records under ``sweep``; write ``<sweep>/tuned.yaml``; return it and the choice."""
    sweep = Path(sweep)
    chosen = choose(grid(load([sweep]).runs))
    path = sweep / TUNED_NAME
    header = ("# Chosen on the validation set by `python -m seqbench.reports.tuning`: per task and architecture, the grid point "
              "with the best mean validation score over seeds.\n")
    path.write_text(header + yaml.safe_dump(tuned(chosen), sort_keys=True, allow_unicode=True), encoding="utf-8")
    return path, chosen


def lines(chosen: pd.DataFrame) -> list[str]:
    """One line per task and architecture: its validation score and the overrides to use."""
    return [f"{row['task']} {row['architecture']} (valid {row['metric']} {row['valid']:.4g}, {row['seeds']} seeds): "
            + " ".join(overrides(row)) for _, row in chosen.iterrows()]


def sections(runs: pd.DataFrame) -> list[Section]:
    """The report's tuning section (only for records that hold a grid): per task the grid with each point's
    validation score and the chosen one marked, then the choice per architecture."""
    points = grid(runs)
    if not is_grid(points):
        return []
    chosen = choose(points)
    blocks = [Note("Every architecture was tuned on the same grid at the same budget, and chosen on the validation "
                   "set alone: per task and architecture, the grid point with the best mean validation score over "
                   "seeds (ties: the smaller learning rate, then the shorter warm-up). ✓ marks the choice; "
                   f"python -m seqbench.reports.tuning on the sweep's folder writes it to {TUNED_NAME}.", "note")]
    for task in sorted(points["task"].unique()):
        metric = METRICS[points.loc[points["task"] == task, "metric"].iloc[0]]
        blocks.append(Table(grid_display(points, chosen, task),
                            f"Task {task}: validation {metric.label} per grid point (mean over seeds)"))
    blocks.append(Table(choice_display(chosen), "The choice per task and architecture, and the overrides to use"))
    return [Section("Tuning: one grid for every architecture", blocks)]


def grid_display(points: pd.DataFrame, chosen: pd.DataFrame, task: str) -> pd.DataFrame:
    """One task's grid: a row per architecture (with the settings it keeps fixed, e.g. its paper's clipping), a
    column per point of the settings it varies."""
    rows = points[points["task"] == task]
    varying = [k for k in TUNED_KEYS if rows.groupby("architecture")[k].nunique(dropna=False).max() > 1]
    picked = {_point(r) for _, r in chosen[chosen["task"] == task].iterrows()}
    table: dict[str, dict] = {}
    for _, r in rows.iterrows():
        row = table.setdefault(r["architecture"], {"architecture": r["architecture"],
                                                   **{LABELS[k]: _value(r[k]) for k in TUNED_KEYS if k not in varying}})
        column = ", ".join(f"{LABELS[k]} {_value(r[k])}" for k in varying)
        row[column] = _cell(r) + (" ✓" if _point(r) in picked else "")
    return pd.DataFrame(list(table.values())).fillna("–")


def choice_display(chosen: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"task": chosen["task"], "architecture": chosen["architecture"],
                         **{LABELS[k]: chosen[k].map(_value) for k in TUNED_KEYS},
                         "validation score": [f"{METRICS[m].label} {_cell(r)}" for m, (_, r) in
                                              zip(chosen["metric"], chosen.iterrows())],
                         "overrides": [" ".join(overrides(r)) for _, r in chosen.iterrows()]})


def _cell(r) -> str:
    """A grid point's score as the report shows it: the value, the seeds when not one, the runs that failed."""
    notes = [f"n={r['seeds']}"] if r["seeds"] not in (0, 1) else []
    notes += [f"{r['failed']} failed"] if r["failed"] else []
    score = "–" if pd.isna(r["valid"]) else METRICS[r["metric"]].fmt.format(r["valid"])
    return score + (f" ({', '.join(notes)})" if notes else "")


def _point(r) -> tuple:
    return (r["architecture"], *(_value(r[k]) for k in TUNED_KEYS))


def _value(v):
    """A setting as written on the command line: whole floats as ints (pandas makes int columns with gaps float)."""
    if pd.isna(v):
        return "–"
    return int(v) if isinstance(v, float) and v.is_integer() else v


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqbench.reports.tuning", description=__doc__.split("\n")[0])
    parser.add_argument("sweep", type=Path, help="the tuning sweep's folder (searched for record.json)")
    args = parser.parse_args(argv)
    if not args.sweep.is_dir():
        parser.error(f"{args.sweep}: no such folder; give the folder of an experiment=tune sweep")
    path, chosen = write(args.sweep)
    print(f"[seqbench] tuned settings, chosen on the validation set: {path}")
    for line in lines(chosen) or ["no finished runs with a validation score: nothing chosen"]:
        print(f"[seqbench]   {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
