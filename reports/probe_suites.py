"""The Zoology and MAD suites' results (tasks/zoology.py; experiments mqar and mad): the best grid point per
architecture and cell, the MQAR accuracy-against-width figure and the MAD table, score and heatmap.

As both papers do, each (architecture, cell) keeps the grid point (learning rate, weight decay) with the best
mean test accuracy over seeds; its seeds then give the mean, the standard deviation and the count. An MQAR
cell is (sequence length, pairs, vocabulary, d_model); a MAD cell is the task with its settings. The MAD score of an
architecture is its mean best accuracy over the six tasks (shown only where all six ran).

    python -m seqbench.reports.probe_suites results/mad/<date> --out results/mad/<date>/suites

Reads only the records (``reports.load``); never torch.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .load import load
from .plots import Plot, palette, save
from .render import Note, Section, Table

MQAR = "mqar"
MAD_TASKS = ("mad_in_context_recall", "mad_fuzzy_in_context_recall", "mad_noisy_in_context_recall",
             "mad_selective_copying", "mad_compression", "mad_memorization")  # tasks.zoology's (torch-free here)
GRID = ("lr", "weight_decay")  # the settings a suite's grid varies per cell
PANEL = ("seq_len", "num_kv_pairs", "vocab_size")  # an MQAR figure panel; with d_model, an MQAR cell
SETTINGS = {"d_model": "model.d_model", "lr": "trainer.lr", "weight_decay": "trainer.weight_decay",
            "seq_len": "task.seq_len", "num_kv_pairs": "task.num_kv_pairs",
            "vocab_size": "task.vocab_size"}
SHORT = {"mad_in_context_recall": "recall", "mad_fuzzy_in_context_recall": "fuzzy recall",
         "mad_noisy_in_context_recall": "noisy recall", "mad_selective_copying": "selective copy",
         "mad_compression": "compression", "mad_memorization": "memorization"}


def suite_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The finished suite jobs of ``load(...).runs``, one row each, with the grid and cell settings as columns."""
    if runs.empty or "task" not in runs:
        return pd.DataFrame()
    done = runs[(runs["status"] == "ok") & (runs["kind"] == "train")
                & runs["task"].isin([MQAR, *MAD_TASKS])].copy()
    if done.empty:
        return done
    settings = done["system_settings"].map(json.loads)
    for column, key in SETTINGS.items():
        done[column] = settings.map(lambda s, key=key: json.loads(s[key]) if key in s else np.nan)
    done["weight_decay"] = done["weight_decay"].fillna(0.0)
    done["test_accuracy"] = pd.to_numeric(done["test_accuracy"], errors="coerce")
    return done.reset_index(drop=True)


def best_of_grid(frame: pd.DataFrame, cell: list[str]) -> pd.DataFrame:
    """Per (architecture, cell): the grid point of best mean test accuracy over seeds, with its mean, std, n.

    ``frame`` is :func:`suite_runs`; the architecture is the model label. Ties go to the smaller learning rate.
    """
    keys = ["label", *cell]
    columns = [*keys, *GRID, "accuracy", "std", "seeds", "grid_points"]
    frame = frame.dropna(subset=["test_accuracy"])
    if frame.empty:
        return pd.DataFrame(columns=columns)
    points = (frame.groupby([*keys, *GRID], dropna=False)["test_accuracy"]
              .agg(accuracy="mean", std="std", seeds="size").reset_index())
    points["grid_points"] = points.groupby(keys, dropna=False)["accuracy"].transform("size")
    points = points.sort_values([*keys, "accuracy", *GRID], ascending=[True] * len(keys) + [False, True, True])
    return points.groupby(keys, dropna=False, sort=True).head(1).reset_index(drop=True)[columns]


# ---------------------------------------------------------------- MQAR

def mqar_best(runs: pd.DataFrame) -> pd.DataFrame:
    """Best lr per (architecture, sequence length, pairs, vocabulary, d_model) of the MQAR runs."""
    frame = suite_runs(runs)
    frame = frame[frame["task"] == MQAR] if len(frame) else frame
    return best_of_grid(frame, [*PANEL, "d_model"])


def mqar_figure(best: pd.DataFrame) -> Figure:
    """Accuracy against d_model, one panel per (sequence length, pairs, vocabulary), one line per architecture."""
    cells = best[list(PANEL)].drop_duplicates().sort_values(list(PANEL))
    vocabularies = best["vocab_size"].nunique()
    fig = Figure(figsize=(3.2 * len(cells) + 1.5, 3.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(cells), sharey=True, squeeze=False)[0])
    pal = palette(best["label"])
    for ax, (_, (seq_len, pairs, vocab)) in zip(axes, cells.iterrows()):
        panel = best[(best["seq_len"] == seq_len) & (best["num_kv_pairs"] == pairs) & (best["vocab_size"] == vocab)]
        for label, line in panel.groupby("label"):
            line = line.sort_values("d_model")
            ax.errorbar(line["d_model"], line["accuracy"], yerr=line["std"].fillna(0.0), marker="o",
                        color=pal[str(label)], label=str(label), capsize=2)
        ax.set_xscale("log", base=2)
        ax.set_title(f"sequence length {seq_len:g}, {pairs:g} pairs"
                     + (f", vocabulary {vocab:g}" if vocabularies > 1 else ""), fontsize=9)
        ax.set_xlabel("model width (d_model)")
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("MQAR test accuracy (best lr)")
    lines = {}  # one legend entry per architecture, from whichever panels drew it
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            lines.setdefault(label, handle)
    fig.legend([lines[k] for k in sorted(lines)], sorted(lines), fontsize=7, loc="outside right upper")  # not over a line
    return fig


# ---------------------------------------------------------------- MAD

def mad_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Architecture x MAD task: best test accuracy over the lr/weight-decay grid (mean over seeds), and the MAD
    score (the mean over the six tasks; NaN where a task is missing)."""
    frame = suite_runs(runs)
    frame = frame[frame["task"].isin(MAD_TASKS)] if len(frame) else frame
    best = best_of_grid(frame, ["task"])
    if best.empty:
        return pd.DataFrame()
    table = best.pivot(index="label", columns="task", values="accuracy")
    table = table[[t for t in MAD_TASKS if t in table.columns]]
    table["MAD score"] = table.mean(axis=1, skipna=False) if len(table.columns) == len(MAD_TASKS) else np.nan
    return table.sort_values("MAD score", ascending=False, na_position="last")


def mad_heatmap(table: pd.DataFrame) -> Figure:
    """The MAD table as a heatmap (tasks as columns, the score last)."""
    fig = Figure(figsize=(1.2 * len(table.columns) + 2.5, 0.45 * len(table) + 1.6), layout="constrained")
    ax = fig.subplots()
    values = table.to_numpy(dtype=float)
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(table.columns)), [SHORT.get(c, c) for c in table.columns], rotation=30, ha="right")
    ax.set_yticks(range(len(table)), [str(i) for i in table.index])
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if v < 0.6 else "black")
    fig.colorbar(image, ax=ax, label="test accuracy (best lr, weight decay)")
    return fig


# ---------------------------------------------------------------- the report's sections

def _plot(fig: Figure, out_dir: Path, name: str, title: str, caption: str) -> Plot:
    png, svg = save(fig, out_dir, name)
    return Plot(name, title, caption, png, svg)


def sections(runs: pd.DataFrame, plot_dir: Path) -> list[Section]:
    """The suites' sections for the report: those of the suites that ran (none when neither did)."""
    out = []
    best = mqar_best(runs)
    if len(best):
        shown = best.rename(columns={"label": "architecture", "seq_len": "sequence length",
                                     "num_kv_pairs": "pairs", "vocab_size": "vocabulary", "lr": "best lr"})
        fig = _plot(mqar_figure(best), Path(plot_dir), "mqar_accuracy_vs_width", "MQAR: accuracy against width",
                    "best learning rate per architecture and cell (test accuracy, mean over seeds; bars: std)")
        out.append(Section("MQAR (Zoology)", [
            Note("Multi-query associative recall (Arora et al. 2023): per architecture, sequence length, pairs and "
                 "width, the learning rate of best test accuracy, as Zoology picks it."),
            fig, Table(shown, "best grid point per cell; seeds: runs at that point", name="mqar")]))
    table = mad_table(runs)
    if len(table):
        fig = _plot(mad_heatmap(table), Path(plot_dir), "mad_heatmap", "MAD: accuracy per task",
                    "best test accuracy over the lr x weight-decay grid, mean over seeds")
        shown = table.rename(columns=SHORT).reset_index().rename(columns={"label": "architecture"})
        out.append(Section("MAD suite", [
            Note("MAD (Poli et al. 2024): per architecture and task the best test accuracy over the learning-rate "
                 "and weight-decay grid; the MAD score is the mean over the six tasks."),
            Table(shown.round(3), "architecture x task (best grid point); MAD score: mean over tasks", name="mad"),
            fig]))
    return out


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m seqbench.reports.probe_suites", description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="+", help="folders of records (sweeps of experiment=mqar or experiment=mad)")
    parser.add_argument("--out", default=None, help="folder of the tables and figures (default: <first dir>/suites)")
    args = parser.parse_args(argv)
    out = Path(args.out or Path(args.dirs[0]) / "suites")
    out.mkdir(parents=True, exist_ok=True)
    runs = load(args.dirs).runs
    found = sections(runs, out)
    if not found:
        raise SystemExit(f"no finished mqar or mad_* records under {', '.join(args.dirs)}: run "
                         "`python run.py -m experiment=mqar` or `experiment=mad` first")
    best = mqar_best(runs)
    if len(best):
        best.to_csv(out / "mqar_best.csv", index=False)
    table = mad_table(runs)
    if len(table):
        table.to_csv(out / "mad_table.csv")
        print(table.round(3).to_string())
    print(f"tables and figures in {out}")


if __name__ == "__main__":
    main()
