"""The tuning protocol's choice (``experiment=tune``): per task and architecture, the best grid point on the
validation set.

    python -m seqbench.reports.tuning results/tune/<date>     # writes <sweep>/tuned.yaml and prints the overrides to use

The grid is what a sweep's training runs vary among ``trainer.lr``, ``trainer.warmup_steps`` and
``trainer.clip_norm``. A grid point's score is the mean over its seeds of the task's first metric
(harness/metrics.py: BLEU, perplexity, WER, accuracy) on the validation set, as the record's ``metrics.valid``
holds it for the evaluated checkpoint; the test set is never read. A point is scored only when every one of its
seeds finished with a score: one seed that failed, diverged or did not finish leaves the point unscored (the
mean of the survivors would favour a setting that is unstable on some seeds), so it is never chosen. Ties go to
the first point in grid order (the smaller learning rate, then the shorter warm-up).

A choice at the smallest or largest learning rate tried does not bracket the optimum: the file and the summary
say on which edge it sits (``edge: upper``). At the end of a tuning sweep the grid may have been extended past
that edge (reports/tune_extend.py), which ``tune_extension.yaml`` in the sweep's folder records; the choice,
the file and the report then say so. Torch-free, like the rest of the report.
"""
from __future__ import annotations

import argparse
import json
import math
import numbers
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from seqbench.harness.metrics import METRICS
from seqbench.harness.schema import BUDGET_KEYS

from . import tables
from .load import NO_METRICS, TUNED_KEYS, load
from .render import Note, Section, Table

TUNED_NAME = "tuned.yaml"
EXTENSION_NAME = "tune_extension.yaml"  # reports/tune_extend.py: the points added past an edge, and why it stopped
LABELS = {"lr": "lr", "warmup_steps": "warm-up", "clip_norm": "clip"}
PRESETS = Path(__file__).resolve().parents[1] / "conf" / "model"
DIVERGED = ("Diverged", "NonFiniteLoss")  # a record's error that names a diverged run (harness/evaluate.py, train.py)
COST = ("train_flops", "train_seconds", "job_seconds")  # summed over a grid point's runs: what tuning cost
GRID = ["task", "architecture", "model", "preset", *TUNED_KEYS, "metric", "valid", "seeds", "failed", "diverged",
        "unfinished", "seed_list", "budget", "runs", *COST]
SIDES = {"upper": ("above", "upward"), "lower": ("below", "downward")}  # edge -> where the optimum may lie, direction


def grid(runs: pd.DataFrame) -> pd.DataFrame:
    """Per task, architecture and grid point (in grid order): the mean validation score over seeds (None unless
    every seed finished with a score), the seeds scored, the runs that failed (of them, diverged) or did not
    finish, every seed run, the trainer budget the runs trained at (JSON), and what the point cost: its runs
    (finished or not) and their counted training FLOPs, training seconds and job seconds (set-up and evaluation
    included), summed over the runs that state them."""
    if runs.empty:
        return pd.DataFrame(columns=GRID)
    train = runs[runs["kind"] == "train"]
    rows = []
    for (task, arch), group in train.groupby(["task", "arch"], sort=True):
        metrics = tables.task_metrics(group)
        if not metrics:
            continue
        for point, at in group.groupby(list(TUNED_KEYS), dropna=False, sort=True):
            values = pd.to_numeric(at[f"valid_{metrics[0].name}"], errors="coerce")
            scored = (at["status"] == "ok") & np.isfinite(values)
            ended = at["status"].isin(["ok", "failed", NO_METRICS])  # the others: running, interrupted, ...
            failed = ended & ~scored
            errors = at["error"].fillna("").astype(str)
            diverged = failed & errors.map(lambda e: e.startswith(DIVERGED))
            complete = bool(scored.all())
            rows.append({"task": task, "architecture": arch, "model": at["model"].iloc[0],
                         "preset": at["preset"].iloc[0], **dict(zip(TUNED_KEYS, point)), "metric": metrics[0].name,
                         "valid": values[scored].mean() if complete else None, "seeds": int(scored.sum()),
                         "failed": int(failed.sum()), "diverged": int(diverged.sum()),
                         "unfinished": int((~ended).sum()), "seed_list": _seeds(at["seed"]),
                         "budget": json.dumps(budget(at.iloc[0]), sort_keys=True), "runs": len(at),
                         **{k: float(pd.to_numeric(at[k], errors="coerce").sum()) if k in at else 0.0 for k in COST}})
    return pd.DataFrame(rows, columns=GRID)


def budget(run) -> dict:
    """The trainer budget a run trained at (``harness.schema.BUDGET_KEYS`` that are set): what the choice holds for."""
    return {k: _plain(run[k]) for k in BUDGET_KEYS if k in run and pd.notna(run[k])}


def is_grid(points: pd.DataFrame) -> bool:
    """Whether some architecture was trained at more than one grid point on one task (a tuning sweep)."""
    return bool(len(points)) and points.groupby(["task", "architecture"]).size().max() > 1


def choose(points: pd.DataFrame) -> pd.DataFrame:
    """Per task and architecture, the scored grid point with the best validation score (the first of equals).
    An architecture none of whose points is scored has no row."""
    scored = points[pd.to_numeric(points["valid"], errors="coerce").notna()]
    best = []
    for _, group in scored.groupby(["task", "architecture"], sort=True):
        values = pd.to_numeric(group["valid"])
        best.append(values.idxmax() if METRICS[group["metric"].iloc[0]].higher_is_better else values.idxmin())
    return scored.loc[best].reset_index(drop=True)


def edge(lrs: Iterable[float], chosen: float | None) -> str | None:
    """``"upper"`` or ``"lower"`` when ``chosen`` is the largest or smallest of two or more distinct learning rates
    tried (failed points included: a diverging rate above the choice brackets it as well as a worse one), else
    None (interior, a single rate, or nothing chosen)."""
    tried = sorted({float(lr) for lr in lrs if pd.notna(lr)})
    if chosen is None or pd.isna(chosen) or len(tried) < 2:
        return None
    if math.isclose(float(chosen), tried[-1], rel_tol=1e-9):
        return "upper"
    if math.isclose(float(chosen), tried[0], rel_tol=1e-9):
        return "lower"
    return None


@dataclass
class Outcome:
    """One task's and architecture's result of the protocol: its choice (None: no point was scored), the learning
    rates tried, the edge the choice sits on, the tuning runs' seeds and budget, and the grid's extension."""
    task: str
    architecture: str
    metric: str
    chosen: pd.Series | None
    lrs: list[float]
    edge: str | None
    seeds: list[int]
    budget: dict
    extension: dict | None
    failed: int = 0  # runs of the grid that failed or diverged
    unfinished: int = 0  # runs of the grid that have not finished (running, interrupted)
    cost: dict | None = None  # the grid's runs and their summed COST (extension included)


def outcomes(points: pd.DataFrame, extensions: dict | None = None) -> list[Outcome]:
    """Per task and architecture in ``points``: its :class:`Outcome`; ``extensions`` as ``tune_extension.yaml``
    holds them (task -> architecture -> direction, added, stopped)."""
    chosen = {(r["task"], r["architecture"]): r for _, r in choose(points).iterrows()}
    out = []
    for (task, arch), rows in points.groupby(["task", "architecture"], sort=True):
        row = chosen.get((task, arch))
        # the rates that bracket a choice: a point scored, or one with a failed or diverged run; a point whose runs
        # have not finished (a sweep stopped part-way, an interrupted extension) says nothing yet
        ended = rows[pd.to_numeric(rows["valid"], errors="coerce").notna() | (rows["failed"] > 0)]
        lrs = sorted({float(v) for v in ended["lr"] if pd.notna(v)})
        seeds = sorted({s for seen in rows["seed_list"] for s in seen})
        out.append(Outcome(str(task), str(arch), str(rows["metric"].iloc[0]), row, lrs,
                           edge(lrs, None if row is None else row["lr"]), seeds,
                           json.loads((rows["budget"].iloc[0] if row is None else row["budget"]) or "{}"),
                           ((extensions or {}).get(str(task)) or {}).get(str(arch)),
                           int(rows["failed"].sum()), int(rows["unfinished"].sum()), grid_cost(rows)))
    return out


def grid_cost(rows: pd.DataFrame) -> dict:
    """What grid points ``rows`` cost together: runs, counted training FLOPs, training and job seconds."""
    return {"runs": int(rows["runs"].sum()), **{k: _plain(round(float(rows[k].sum()), 1)) for k in COST}}


def cost_text(cost: dict | None) -> str:
    """``20 runs, 9.0e+14 training FLOPs, 2.6 h training (2.9 h with set-up and evaluation)``."""
    if not cost or not cost.get("runs"):
        return "no runs"
    text = f"{cost['runs']} run{'s' * (cost['runs'] != 1)}, {cost.get('train_flops') or 0:.2g} training FLOPs, " \
           f"{(cost.get('train_seconds') or 0) / 3600:.2g} h training"
    return text + (f" ({cost['job_seconds'] / 3600:.2g} h with set-up and evaluation)" if cost.get("job_seconds") else "")


def overrides(row) -> list[str]:
    """The command-line overrides that train ``row``'s architecture with its chosen settings."""
    preset = row["model"] if row["preset"] == "small" else f"{row['model']}_{row['preset']}"
    model = [f"model={preset}"] if (PRESETS / f"{preset}.yaml").is_file() else []
    return model + [f"trainer.{k}={_value(row[k])}" for k in TUNED_KEYS if pd.notna(row[k])]


def tuned(results: list[Outcome]) -> dict:
    """tuned.yaml's content: task -> architecture -> the overrides (null: nothing chosen, with ``no_choice`` saying
    why), validation score, seeds scored, the tuning runs' seeds (harness/tuned.py refuses to apply the choice to
    a run of one of them), the edge the choice sits on, the learning rates tried, the grid's extension and the
    trainer budget of the tuning runs, and what the grid cost (runs, training FLOPs, training and job seconds)."""
    out: dict = {}
    for o in results:
        entry: dict = {"tuning_seeds": o.seeds, "lrs_tried": o.lrs, "edge": o.edge, "extension": o.extension,
                       "budget": o.budget, "cost": o.cost}
        if o.chosen is None:
            entry.update(overrides=None, no_choice=no_choice(o))
        else:
            entry.update({"overrides": overrides(o.chosen), f"valid_{o.metric}": float(o.chosen["valid"]),
                          "seeds": int(o.chosen["seeds"])})
        out.setdefault(o.task, {})[o.architecture] = entry
    return out


def no_choice(o: Outcome) -> str:
    """Why ``o`` has no choice: no grid point had every seed finish with a score (unfinished runs: the sweep is
    not over, and finishing it is the fix; else runs failed or diverged)."""
    if o.unfinished and not o.failed:
        return (f"no grid point of {o.architecture} on {o.task} has finished on every seed yet ({o.unfinished} "
                f"run{'s' * (o.unfinished != 1)} unfinished): finish the sweep (the same command with "
                "hydra.sweep.dir=<this sweep's folder> resumes it) and the choice is made")
    return (f"every grid point of {o.architecture} on {o.task} failed, diverged or did not finish on some seed "
            f"(lr tried: {', '.join(lr_text(lr) for lr in o.lrs)}): nothing to choose; lower the learning rates "
            "(trainer.lr=...) or set trainer.clip_norm, and tune again")


def bracket(o: Outcome) -> str:
    """Where the choice sits in the learning rates tried: interior, or on an edge with where the optimum may lie;
    and how the grid was extended."""
    if o.chosen is None:
        return "no choice"
    if len(o.lrs) < 2:
        return f"one learning rate tried ({lr_text(o.lrs[0])}): the optimum is not bracketed" if o.lrs else "–"
    text = "interior" if o.edge is None else (
        f"on the grid's {o.edge} edge: the optimum may lie {SIDES[o.edge][0]} {lr_text(o.chosen['lr'])}")
    ext = o.extension or {}
    if ext.get("added"):
        added = [float(lr) for lr in ext["added"]]
        far = max(added) if ext.get("direction") == "upward" else min(added)
        text += (f"; grid extended {ext.get('direction')} by {len(added)} point{'s' if len(added) > 1 else ''} to "
                 f"{lr_text(far)}")
    if o.edge is not None and ext.get("stopped"):
        text += f" (extension stopped: {ext['stopped']})"
    return text


def read_extensions(sweep: Path) -> dict:
    """``<sweep>/tune_extension.yaml`` (task -> architecture -> direction, added, stopped), or {} without one."""
    path = Path(sweep) / EXTENSION_NAME
    if not path.is_file():
        return {}
    content = yaml.safe_load(path.read_text(encoding="utf-8"))
    return content if isinstance(content, dict) else {}


def write(sweep: str | Path) -> tuple[Path, list[Outcome]]:
    """Choose from the records under ``sweep``; write ``<sweep>/tuned.yaml``; return it and the outcomes."""
    sweep = Path(sweep)
    results = outcomes(grid(load([sweep]).runs), read_extensions(sweep))
    path = sweep / TUNED_NAME
    header = ("# Chosen on the validation set by `python -m seqbench.reports.tuning`: per task and architecture, the "
              "grid point with the best mean validation score over seeds,\n# every seed of it finished. edge: the "
              "choice is the smallest (lower) or largest (upper) lr tried. tuning_seeds: seeds a run applying\n# these "
              "settings must not use. budget: the trainer budget the choice was made at.\n")
    path.write_text(header + yaml.safe_dump(tuned(results), sort_keys=True, allow_unicode=True), encoding="utf-8")
    return path, results


def lines(results: list[Outcome]) -> list[str]:
    """One line per task and architecture: its validation score and the overrides to use, where the choice sits
    in the grid; or why nothing was chosen."""
    out = []
    for o in results:
        if o.chosen is None:
            out.append(f"{o.task} {o.architecture}: no choice: {no_choice(o)}")
            continue
        row = o.chosen
        seeds = ", ".join(map(str, o.seeds))
        text = (f"{o.task} {o.architecture} (valid {o.metric} {row['valid']:.4g}, {row['seeds']} seeds): "
                + " ".join(overrides(row)) + f"  [tuning seeds {seeds}; {bracket(o)}; grid: {cost_text(o.cost)}]")
        out.append(text)
    return out


def sections(runs: pd.DataFrame) -> list[Section]:
    """The report's tuning section: for records that hold a grid, per task the grid with each point's validation
    score and the chosen one marked, then the choice per architecture; for runs that applied tuned settings
    (``tuned=``), the budget those were tuned at against the runs' own."""
    points = grid(runs)
    used = tuned_use(runs)
    if not is_grid(points):
        return [Section("Tuned settings", used)] if used else []
    results = outcomes(points, _extensions_near(runs))
    blocks = [Note("Every architecture was tuned on the same grid at the same budget, and chosen on the validation "
                   "set alone: per task and architecture, the grid point with the best mean validation score over "
                   "seeds (ties: the smaller learning rate, then the shorter warm-up). A point any of whose seeds "
                   "failed, diverged or did not finish is not scored and never chosen (the mean of the survivors "
                   "would favour a setting unstable on some seeds). A choice at the smallest or largest learning "
                   "rate tried does not bracket the optimum: the choice table says so. ✓ marks the choice; "
                   f"python -m seqbench.reports.tuning on the sweep's folder writes it to {TUNED_NAME}.", "note")]
    for task in sorted(points["task"].unique()):
        metric = METRICS[points.loc[points["task"] == task, "metric"].iloc[0]]
        blocks.append(Table(grid_display(points, results, task),
                            f"Task {task}: validation {metric.label} per grid point (mean over seeds)"))
    blocks.append(Table(choice_display(results), "The choice per task and architecture, and the overrides to use"))
    blocks += [Note(f"{o.task} {o.architecture}: {bracket(o)}.", "warning") for o in results if o.edge is not None]
    blocks += [Note(f"{o.task} {o.architecture}: no choice: {no_choice(o)}.", "warning")
               for o in results if o.chosen is None]
    budgets = sorted({json.dumps(o.budget, sort_keys=True) for o in results})
    seeds = sorted({s for o in results for s in o.seeds})
    blocks.append(Note(f"Tuned at {' / '.join(budget_text(json.loads(b)) for b in budgets)} on seeds "
                       f"{', '.join(map(str, seeds))}: a run that applies these settings must use other seeds "
                       "(tuned= refuses these), and a run at another budget takes the setting tuned at this one.",
                       "note"))
    for task in sorted({o.task for o in results}):
        total = grid_cost(points[points["task"] == task])
        blocks.append(Note(f"Tuning {task} cost {cost_text(total)} in all, every architecture's grid and its "
                           "extension (per architecture: the choice table's last column).", "note"))
    return [Section("Tuning: one grid for every architecture", blocks + used)]


def tuned_use(runs: pd.DataFrame) -> list[Note]:
    """For each tuned.yaml that finished training runs applied (``tuned=``): the budget it was tuned at, and whether
    the runs train at that budget (each budget tuned) or at others (one setting serves every rung of a ladder)."""
    if runs.empty:
        return []
    by_file: dict[str, set[str]] = {}
    for _, run in runs[(runs["kind"] == "train") & (runs["status"] == "ok")].iterrows():
        config = _config(run["record"])
        if not config.get("tuned"):
            continue
        ladder = (config.get("trainer") or {}).get("ladder")
        spent = budget(run)
        if ladder:  # a rung's max_flops is the rung: the ladder's runs train at the ladder, every rung alike
            spent.pop("max_flops", None)
            own = ", ".join(filter(None, [budget_text(spent) if spent else "",
                                          f"ladder {', '.join(f'{r:g}' for r in ladder)}"]))
        else:
            own = budget_text(spent)
        by_file.setdefault(str(config["tuned"]), set()).add((own, bool(ladder)))
    notes = []
    for name, trained in sorted(by_file.items()):
        at = _tuned_budgets(name)
        if not at:
            continue
        tuned_at, own = " / ".join(sorted(at)), {text for text, _ in trained}
        if own <= at:
            notes.append(Note(f"tuned={name}: tuned at {tuned_at}, the budget its runs train at: each budget tuned.",
                              "note"))
        else:  # by design on a ladder (tuned at one rung); a warning where runs without one train at another budget
            notes.append(Note(f"tuned={name}: tuned at {tuned_at}; one setting serves every rung of a ladder (its "
                              f"runs train at {' / '.join(sorted(own))}).",
                              "note" if all(is_ladder for _, is_ladder in trained) else "warning"))
    return notes


def budget_text(spent: dict) -> str:
    """A budget as the report writes it: ``max_flops=4.5e+13, max_tokens=4096`` ("no budget set" when empty). A
    number reads the same whether a record holds it as an int or a float (45000000000000 and 4.5e13 are one
    budget), so a tuned.yaml's budget and its runs' compare as numbers."""
    return ", ".join(f"{k}={tables.number_text(v)}" for k, v in sorted(spent.items())) or "no budget set"


def lr_text(lr: float) -> str:
    """A learning rate as a person writes it: 0.004 -> ``4e-3``, 0.0016 -> ``1.6e-3``."""
    mantissa, exponent = f"{float(lr):.6e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def grid_display(points: pd.DataFrame, results: list[Outcome], task: str) -> pd.DataFrame:
    """One task's grid: a row per architecture (with the settings it keeps fixed, e.g. its paper's clipping), a
    column per point of the settings it varies."""
    rows = points[points["task"] == task]
    varying = [k for k in TUNED_KEYS if rows.groupby("architecture")[k].nunique(dropna=False).max() > 1]
    picked = {_point(o.chosen) for o in results if o.task == task and o.chosen is not None}
    table: dict[str, dict] = {}
    for _, r in rows.iterrows():
        row = table.setdefault(r["architecture"], {"architecture": r["architecture"],
                                                   **{LABELS[k]: _value(r[k]) for k in TUNED_KEYS if k not in varying}})
        column = ", ".join(f"{LABELS[k]} {_value(r[k])}" for k in varying)
        row[column] = _cell(r) + (" ✓" if _point(r) in picked else "")
    frame = pd.DataFrame(list(table.values()))
    kept = {"architecture", *(LABELS[k] for k in TUNED_KEYS if k not in varying)}
    fixed = [c for c in frame.columns if c in kept]
    frame = frame[fixed + sorted((c for c in frame.columns if c not in fixed), key=_column_order)]
    return frame.fillna("–")


def choice_display(results: list[Outcome]) -> pd.DataFrame:
    rows = []
    for o in results:
        r = o.chosen
        rows.append({"task": o.task, "architecture": o.architecture,
                     **{LABELS[k]: "–" if r is None else _value(r[k]) for k in TUNED_KEYS},
                     "validation score": "no choice" if r is None else f"{METRICS[o.metric].label} {_cell(r)}",
                     "in the grid": bracket(o), "overrides": "–" if r is None else " ".join(overrides(r)),
                     "grid cost": cost_text(o.cost)})
    return pd.DataFrame(rows)


def _cell(r) -> str:
    """A grid point's score as the report shows it: the value, the seeds when not one; a point with runs that
    failed, diverged or did not finish has no score, only those counts."""
    notes = [f"n={r['seeds']}"] if r["seeds"] not in (0, 1) else []
    if r["failed"]:
        plain = r["failed"] - r["diverged"]
        notes += [f"{r['diverged']} diverged"] if r["diverged"] else []
        notes += [f"{plain} failed"] if plain else []
    notes += [f"{r['unfinished']} unfinished"] if r["unfinished"] else []
    score = "–" if pd.isna(r["valid"]) else METRICS[r["metric"]].fmt.format(r["valid"])
    if pd.isna(r["valid"]) and r["seeds"] and (r["failed"] or r["unfinished"]):
        score = "not scored"  # some seeds finished, others not: the survivors' mean is not the point's score
    return score + (f" ({', '.join(notes)})" if notes else "")


def _column_order(column: str) -> tuple:
    """Grid columns in numeric order of their settings (``lr 0.0005`` before ``lr 0.001``; extension points fall in
    place)."""
    parts = []
    for part in column.split(", "):
        value = part.rpartition(" ")[2]
        try:
            parts.append((0, float(value), ""))
        except ValueError:
            parts.append((1, 0.0, value))
    return tuple(parts)


def _extensions_near(runs: pd.DataFrame) -> dict:
    """The grid extensions recorded in the sweep folders that hold these runs' job folders (task -> architecture)."""
    merged: dict = {}
    for folder in sorted({Path(p).parent.parent for p in runs["record"].dropna()}):
        for task, archs in read_extensions(folder).items():
            merged.setdefault(task, {}).update(archs or {})
    return merged


def _config(record: str) -> dict:
    """A record's config (empty when unreadable: the loader has reported it)."""
    try:
        rec = json.loads(Path(record).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return rec.get("config") or {} if isinstance(rec, dict) else {}


def _tuned_budgets(name: str) -> set[str]:
    """The budgets a tuned.yaml records (as :func:`budget_text` writes them); empty when the file is gone or
    predates recording them."""
    from seqbench.harness.tuned import locate  # noqa: PLC0415 (torch-free; the path as the jobs found it)

    try:
        content = yaml.safe_load(locate(name).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return set()
    entries = [e for archs in (content or {}).values() if isinstance(archs, dict) for e in archs.values()]
    return {budget_text(e["budget"]) for e in entries if isinstance(e, dict) and isinstance(e.get("budget"), dict)}


def _plain(v) -> int | float | str:
    """A record's number as YAML writes it: whole numbers as ints, others as floats (not numpy scalars)."""
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        return int(v) if float(v).is_integer() else float(v)
    return str(v)


def _seeds(column: pd.Series) -> list[int]:
    return sorted({int(s) for s in column.dropna()})


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
    path, results = write(args.sweep)
    print(f"[seqbench] tuned settings, chosen on the validation set: {path}")
    for line in lines(results) or ["no finished runs with a validation score: nothing chosen"]:
        print(f"[seqbench]   {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
