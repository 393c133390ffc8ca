"""Plots (seaborn on matplotlib Figures, no pyplot state), each saved as PNG and SVG.

Every plot colours an architecture the same way (``colour``); a plot whose data is absent
is skipped with the reason, which the report shows in its place.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from .load import Records

# one colour per architecture in every plot (seaborn's colour-blind palette); recurrent in blues
PALETTE = {"lstm": "#0173b2", "gru": "#56b4e9", "convs2s": "#029e73", "bytenet": "#de8f05",
           "transformer": "#d55e00"}
FALLBACK = ("#cc78bc", "#949494", "#ca9161", "#fbafe4", "#ece133")  # unknown names, picked by a stable hash
QUALITY = {"translation": ("test_bleu", "test BLEU", True), "lm": ("test_ppl", "test perplexity", False)}
CURVE = {"translation": ("valid_bleu_greedy", "valid BLEU (greedy)"), "lm": ("valid_ppl", "valid perplexity")}


@dataclass
class Plot:
    name: str
    title: str
    caption: str = ""
    png: Path | None = None
    svg: Path | None = None
    skipped: str | None = None  # why the plot is absent


def colour(name) -> str:
    name = str(name)
    return PALETTE.get(name.lower()) or FALLBACK[zlib.crc32(name.encode()) % len(FALLBACK)]


def palette(names) -> dict:
    return {n: colour(n) for n in names}


def make_all(records: Records, out_dir: Path) -> list[Plot]:
    runs = records.runs[records.runs["status"] == "ok"] if len(records.runs) else records.runs
    makers = [
        ("learning_curves", "Quality against wall-clock (validation curves)", lambda: learning_curves(records.curves)),
        ("pareto", "Pareto front: final quality against training cost", lambda: pareto(runs)),
        ("quality_vs_parameters", "Quality against parameters", lambda: quality_vs_parameters(runs)),
        ("throughput", "Training throughput per architecture", lambda: throughput(runs)),
        ("quality_by_length", "Quality by source-length bucket", lambda: quality_by_length(records.by_length)),
        ("path_length", "Maximum path length against n", lambda: path_length(records.path_length)),
    ]
    plots = []
    for name, title, make in makers:
        fig, note = make()
        plot = Plot(name, title, caption=note if fig is not None else "", skipped=None if fig is not None else note)
        if fig is not None:
            plot.png, plot.svg = save(fig, out_dir, name)
        plots.append(plot)
    return plots


def save(fig: Figure, out_dir: Path, name: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    png, svg = out_dir / f"{name}.png", out_dir / f"{name}.svg"
    fig.savefig(png, dpi=100)
    fig.savefig(svg, metadata={"Date": None})
    return png, svg


def learning_curves(curves: pd.DataFrame):
    panels = []
    for task, d in _by_task(curves):
        y, label = CURVE.get(d["family"].iloc[0], CURVE["lm"])
        d = _numeric(d, "train_seconds", y)
        if len(d):
            panels.append((task, d, y, label))
    if not panels:
        return None, "no validation curves (curves.valid) in the records"
    fig, axes = _grid(len(panels))
    for ax, (task, d, y, label) in zip(axes, panels):
        sns.lineplot(d, x="train_seconds", y=y, hue="model", style="preset", units="job", estimator=None,
                     palette=palette(d["model"].unique()), marker="o", ax=ax)
        _label(ax, task, "train seconds (wall-clock)", label)
    return fig, "one line per run (seed); colour = architecture, line style = preset"


def pareto(runs: pd.DataFrame):
    panels = []
    for task, d in _by_task(runs):
        y, label, higher = QUALITY.get(d["family"].iloc[0], QUALITY["lm"])
        cost = "train_flops" if d["train_flops"].notna().all() else "train_seconds"
        d = _numeric(d, cost, y)
        if len(d):
            panels.append((task, d, cost, y, label, higher))
    if not panels:
        return None, "no finished runs with a test score and a training cost"
    fig, axes = _grid(len(panels))
    for ax, (task, d, cost, y, label, higher) in zip(axes, panels):
        sns.scatterplot(d, x=cost, y=y, hue="model", style="preset", palette=palette(d["model"].unique()), s=60,
                        ax=ax)
        front = front_of(d, cost, y, higher)
        xs, ys = [*front[cost], d[cost].max()], [*front[y], front[y].iloc[-1]]  # carried on to the costliest run
        ax.step(xs, ys, where="post", color="black", linestyle="--", linewidth=1, label="Pareto front")
        ax.scatter(front[cost], front[y], s=160, facecolors="none", edgecolors="black", linewidths=1)
        ax.legend(fontsize="small")
        _log_x(ax, d[cost])
        _label(ax, task, "training FLOPs" if cost == "train_flops" else "train seconds", label)
    return fig, "each point is one run; the dashed line is the Pareto front (no run is both cheaper and better)"


def front_of(d: pd.DataFrame, cost: str, quality: str, higher_is_better: bool) -> pd.DataFrame:
    """The runs that no other run beats on both cost (lower) and quality."""
    sign = 1 if higher_is_better else -1
    rows = d.assign(_q=sign * d[quality]).sort_values([cost, "_q"], ascending=[True, False])
    best, keep = -math.inf, []
    for idx, q in rows["_q"].items():
        if q > best:
            best = q
            keep.append(idx)
    return d.loc[keep]


def quality_vs_parameters(runs: pd.DataFrame):
    panels = []
    for task, d in _by_task(runs):
        y, label, _ = QUALITY.get(d["family"].iloc[0], QUALITY["lm"])
        d = _numeric(d, "parameters", y)
        if len(d):
            panels.append((task, d, y, label))
    if not panels:
        return None, "no finished runs with a parameter count and a test score"
    fig, axes = _grid(len(panels))
    for ax, (task, d, y, label) in zip(axes, panels):
        sns.scatterplot(d, x="parameters", y=y, hue="model", style="preset", palette=palette(d["model"].unique()),
                        s=60, ax=ax)
        _log_x(ax, d["parameters"])
        _label(ax, task, "parameters", label)
    return fig, "each point is one run"


def throughput(runs: pd.DataFrame):
    panels = []
    for task, d in _by_task(runs):
        d = _numeric(d, "train_tokens_per_second")
        if len(d):
            several = d["device_name"].nunique() > 1
            d = d.assign(label=[f"{a}\n{dev}" if several else a for a, dev in zip(d["arch"], d["device_name"])])
            panels.append((task, d))
    if not panels:
        return None, "no finished runs with training throughput"
    fig, axes = _grid(len(panels))
    for ax, (task, d) in zip(axes, panels):
        sns.barplot(d, x="label", y="train_tokens_per_second", hue="model", palette=palette(d["model"].unique()),
                    errorbar="sd", dodge=False, legend=False, ax=ax)
        ax.tick_params(axis="x", labelrotation=30, labelsize="small")
        _label(ax, task, "", "train tokens/s")
    return fig, "mean over seeds, error bar = standard deviation; separate bars per device"


def quality_by_length(by_length: pd.DataFrame):
    if by_length.empty or _numeric(by_length, "bleu").empty:
        return None, "no records carry metrics.test.by_length"
    panels = [(task, _numeric(d, "bleu")) for task, d in _by_task(by_length)]
    fig, axes = _grid(len(panels))
    for ax, (task, d) in zip(axes, panels):
        order = list(dict.fromkeys(d["bucket"]))
        d = d.assign(bucket=pd.Categorical(d["bucket"], categories=order, ordered=True))
        sns.lineplot(d, x="bucket", y="bleu", hue="model", style="preset", palette=palette(d["model"].unique()),
                     errorbar="sd", marker="o", ax=ax)
        _label(ax, task, "source length bucket", "test BLEU")
    return fig, "mean over seeds, band = standard deviation"


def path_length(paths: pd.DataFrame):
    if paths.empty or _numeric(paths, "n", "max_path_length").empty:
        return None, "no path-length records"
    d = _numeric(paths, "n", "max_path_length")
    fig, axes = _grid(1)
    sns.lineplot(d, x="n", y="max_path_length", hue="model", style="layer_type", palette=palette(d["model"].unique()),
                 errorbar=None, marker="o", ax=axes[0])
    axes[0].set(xscale="log", yscale="log")
    _label(axes[0], "maximum path length", "sequence length n", "maximum path length (steps)")
    return fig, "log-log axes; measured from each model's dependency pattern"


def _by_task(d: pd.DataFrame):
    if d.empty or "task" not in d:
        return []
    d = d.assign(task=d["task"].fillna("?").astype(str), family=d["family"].fillna("?").astype(str),
                 model=d["model"].fillna("?").astype(str), preset=d["preset"].fillna("?").astype(str))
    return list(d.groupby("task", sort=True))


def _numeric(d: pd.DataFrame, *cols: str) -> pd.DataFrame:
    d = d.assign(**{c: pd.to_numeric(d[c], errors="coerce") for c in cols})
    return d.dropna(subset=list(cols))


def _grid(n: int, cols: int = 3) -> tuple[Figure, list]:
    cols = min(n, cols)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(5.5 * cols, 4.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _log_x(ax, values: pd.Series) -> None:
    if (values > 0).all() and values.max() > 10 * values.min():
        ax.set_xscale("log")


def _label(ax, title: str, x: str, y: str) -> None:
    ax.set_title(_text(title))
    ax.set(xlabel=x, ylabel=y)
    if ax.get_legend() is not None:
        for t in ax.get_legend().get_texts():
            t.set_text(_text(t.get_text()))


def _text(s) -> str:
    """A user string as literal matplotlib text (a '$' would start mathtext)."""
    return str(s).replace("$", r"\$")
