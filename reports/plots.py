"""Plots (seaborn on matplotlib Figures, no pyplot state), each saved as PNG and SVG.

Colours are keyed by the model label (``load.model_label``): one hue per architecture in every plot,
and a variant of an architecture (``transformer_restricted(r=4)``) a darker or lighter shade of it. One
palette is built per report (``report_palette``), so a model has the same colour in every plot. A plot
whose data is absent is skipped with the reason, which the report shows in its place.

Curves over seeds are drawn as their mean with a band of the 95% confidence interval of the mean (Student t,
``stats.t_band``), the interval of the report's tables. Perplexity axes are logarithmic (one run far behind
would otherwise press the others into a line), and cost axes carry a few engineering-notation ticks (``3.2T``)
rather than one per measured value, so tick labels never overlap.
"""
from __future__ import annotations

import json
import math
import textwrap
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import to_hex, to_rgb
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter, \
    NullLocator

from seqbench.harness.metrics import METRICS

from . import stats, tables
from .load import Records

# one colour per architecture in every plot (seaborn's colour-blind palette); recurrent in blues
# (the 2017 set first; the modern mixers: Transformer++ near the Transformer, the state-space/linear ones apart)
PALETTE = {"lstm": "#0173b2", "gru": "#56b4e9", "convs2s": "#029e73", "bytenet": "#de8f05",
           "transformer": "#d55e00", "transformer_pp": "#cc78bc", "mamba": "#ca9161", "gla": "#fbafe4"}
FALLBACK = ("#949494", "#ece133", "#000000", "#8c564b", "#17becf")  # unknown names, picked by a stable hash
SHADES = (-0.35, 0.4, -0.6, 0.65, -0.15, 0.2)  # variants: towards black (<0) or white (>0), in this order
LOSS_CURVES = ("valid_nll", "valid_ppl")  # every run's; a task's own validation columns come first (Task.validate)
AXIS = {"train_flops": "training FLOPs", "train_seconds": "train seconds", "parameters": "parameters"}
TABLE1 = ("path_length", "throughput_by_length")  # plots of the analysis records, shown with Table 1
HEADLINE = "pareto"  # the overview's figure: final quality against training cost, per task
LEGEND_TITLES = {"label": "model", "layer_type": "layer type", "variant": "preset"}  # column names as legend titles
LOG_SCALE = ("valid_ppl", "test_ppl")  # drawn on a log axis
TICKS = 5  # at most about this many labelled ticks on an axis of numbers
BAND = "band = 95% confidence interval of the mean (Student t over seeds; none for one seed)"


@dataclass
class Plot:
    name: str
    title: str
    caption: str = ""
    png: Path | None = None
    svg: Path | None = None
    skipped: str | None = None  # why the plot is absent


# ---------------------------------------------------------------- colours

def architecture(label) -> str:
    """The architecture a model label belongs to: the longest known name it starts with (else the label)."""
    label = str(label)
    name = label.lower()
    known = [a for a in PALETTE if name == a or (name.startswith(a) and not name[len(a)].isalnum())]
    return max(known, key=len) if known else label


def colour(label) -> str:
    """The architecture's colour (a stable pick from FALLBACK for unknown names); variants are not shaded here."""
    arch = architecture(label)
    return PALETTE.get(arch.lower()) or FALLBACK[zlib.crc32(arch.encode()) % len(FALLBACK)]


def shade(hex_colour: str, amount: float) -> str:
    """The colour mixed towards white (amount > 0) or black (amount < 0) by |amount|."""
    r, g, b = to_rgb(hex_colour)
    target = 1.0 if amount > 0 else 0.0
    return to_hex(tuple(c + (target - c) * abs(amount) for c in (r, g, b)))


def palette(labels) -> dict:
    """label -> colour: each architecture's own colour for its plain name (or its first variant), then shades.

    Depends only on the set of labels given, so one call over all of a report's labels colours every plot alike.
    """
    out, by_arch = {}, {}
    for label in sorted({str(v) for v in labels}):
        by_arch.setdefault(architecture(label), []).append(label)
    for arch, variants in by_arch.items():
        variants.sort(key=lambda v: (v != arch, v))  # the plain architecture keeps the unshaded colour
        for k, label in enumerate(variants):
            base = colour(label)
            out[label] = base if k == 0 else shade(base, SHADES[(k - 1) % len(SHADES)])
    return out


def report_palette(records: Records) -> dict:
    """One palette over every model label in the records."""
    frames = (records.runs, records.curves, records.by_length, records.path_length, records.influence,
              records.by_distance)
    return palette(v for f in frames if "label" in f for v in f["label"].fillna("?"))


# ---------------------------------------------------------------- all plots

def make_all(records: Records, out_dir: Path) -> list[Plot]:
    runs = tables.ok(records.runs)  # finished training runs: analysis-only jobs have no quality to plot
    pal = report_palette(records)
    makers = [
        ("learning_curves", "Quality against wall-clock (validation curves)",
         lambda: learning_curves(_ok(records.curves), pal)),
        ("pareto", "Pareto front: final quality against training cost", lambda: pareto(runs, pal)),
        ("quality_vs_parameters", "Quality against parameters", lambda: quality_vs_parameters(runs, pal)),
        ("throughput", "Training throughput per architecture", lambda: throughput(runs, pal)),
        ("quality_by_length", "Quality by source-length bucket", lambda: quality_by_length(records.by_length, pal)),
        ("accuracy_by_distance", "Long-range accuracy by distance (probe tasks)",
         lambda: accuracy_by_distance(records.by_distance, pal)),
        ("influence_by_distance", "Influence by distance (input-gradient norm)",
         lambda: influence_by_distance(records.influence, pal)),
        ("path_length", "Maximum path length against n", lambda: path_length(records.path_length, pal)),
        ("throughput_by_length", "Forward throughput against sequence length",
         lambda: throughput_by_length(records.path_length, pal)),
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


def panels(data: pd.DataFrame, prepare, draw, missing: str, caption: str, by: str = "task", width: float = 5.5):
    """One panel per value of ``by``: ``prepare(d)`` gives a panel's data (None leaves it out), ``draw(ax, title, p)``.

    Returns (figure, caption), or (None, ``missing``) when no panel has data.
    """
    found = [(title, p) for title, d in _groups(data, by) if (p := prepare(d)) is not None]
    if not found:
        return None, missing
    fig, axes = _grid(len(found), width=width)
    for ax, (title, p) in zip(axes, found):
        draw(ax, title, p)
    return fig, caption


# ---------------------------------------------------------------- training runs

def curve_label(column: str) -> str:
    """``valid_bleu_greedy`` -> ``valid BLEU (greedy)``, ``valid_ppl`` -> ``valid perplexity``: the metric's label."""
    name = column.removeprefix("valid_")
    metric = name.removesuffix("_greedy")
    label = METRICS[metric].label if metric in METRICS else metric.replace("_", " ")
    return f"valid {label}" + (" (greedy)" if name.endswith("_greedy") else "")


def _lm(d: pd.DataFrame) -> bool:
    """Whether the runs' perplexities carry an LM protocol (their validation curves are always ``chunks``)."""
    return "lm_protocol" in d and bool(d["lm_protocol"].fillna("").astype(str).ne("").any())


def learning_curves(curves: pd.DataFrame, pal: dict | None = None):
    """Validation quality against training seconds: per model, the mean over its seeds with a 95% t-band."""
    def prepare(d):
        scored = {m.name for m in tables.task_metrics(d)}
        for y in [*(c for c in d if c.startswith("valid_") and c not in LOSS_CURVES), "valid_ppl"]:
            metric = y.removeprefix("valid_").removesuffix("_greedy")
            if y not in LOSS_CURVES and metric in METRICS and metric not in scored:  # e.g. greedy BLEU, error rates
                continue
            if y in d and len(line := _numeric(d, "train_seconds", y)):
                label = curve_label(y) + (" (chunks)" if y == "valid_ppl" and _lm(d) else "")
                return on_common_grid(with_variant(line), "train_seconds", y), y, label
        return None

    def draw(ax, task, p):
        d, y, label = p
        # a model whose runs were evaluated once each (an update budget): a point per seed, never a line joining
        # seeds; the others a line per model (a marker on each point, so a one-point line still shows)
        evaluations = d.groupby(["label", "variant", "record"]).size().groupby(["label", "variant"]).max()
        once = d.set_index(["label", "variant"]).index.isin(evaluations[evaluations == 1].index)
        style = _varied(d, "variant")
        if not once.all():
            lines = d[~once]
            sns.lineplot(lines, x="train_seconds", y=y, hue="label", style=style, palette=_pal(pal, lines),
                         errorbar=stats.t_band, marker="o", ax=ax)
        if once.any():
            points = d[once]
            sns.scatterplot(points, x="train_seconds", y=y, hue="label", style=style, palette=_pal(pal, points),
                            s=50, ax=ax)
        if once.any() and not once.all():  # one legend for both: each call replaced the other's
            _merged_legend(ax)
        if y in LOG_SCALE:
            _readable(ax.yaxis, log=True)
        _label(ax, task, "train seconds (wall-clock)", label)

    return panels(curves, prepare, draw, "no validation curves (curves.valid) in the records",
                  "per model: the mean over seeds, band = 95% confidence interval of the mean (Student t over "
                  "seeds; none for one seed), each seed's curve interpolated at the times the model's seeds all "
                  "reached (seeds whose curves share no span of time: each seed's own points; runs evaluated once "
                  "each: one point per run, no lines); colour = model, line "
                  "style = preset (and device); perplexity on a log axis")


def with_variant(d: pd.DataFrame) -> pd.DataFrame:
    """A ``variant`` column: the preset, with the device where the rows come from several (never pooled)."""
    several = d["device_name"].nunique() > 1
    d = d.assign(variant=[f"{p} on {dev}" if several else p for p, dev in zip(d["preset"], _devices(d))])
    return _by_system(d, "variant")


def on_common_grid(d: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Each run's curve (``record``) interpolated at its model's common x values, so seeds average point by point.

    A model's grid is every x of its runs within the range all of them cover; a lone run keeps its own points, and
    so do runs whose curves cover no common range (one evaluation each, at the end of an update budget the seeds
    reach at slightly different seconds): averaging them would leave nothing to draw.
    """
    out, same = [], ("record", "label", "variant", "preset", "device_name")  # one value per run
    for _, model in d.groupby(["label", "variant"], sort=True):
        runs = [run.sort_values(x) for _, run in model.groupby("record", sort=True)]
        low, high = max(r[x].min() for r in runs), min(r[x].max() for r in runs)
        grid = np.array(sorted({v for r in runs for v in r[x] if low <= v <= high}))
        if not len(grid):
            out.extend(run[[x, y, *same]] for run in runs)
            continue
        for run in runs:
            out.append(pd.DataFrame({x: grid, y: np.interp(grid, run[x], run[y]), **{c: run[c].iloc[0] for c in same}}))
    return pd.concat(out, ignore_index=True)


def quality_against(runs: pd.DataFrame, pal: dict | None, x_of, missing: str, caption: str, front: bool = False):
    """Final test quality (the task's first metric) against a cost column ``x_of(d)``, one point per run, one panel
    per task; the Pareto front follows the metric's direction."""
    def prepare(d):
        quality = tables.task_metrics(d)
        if not quality:
            return None
        y, label, higher = f"test_{quality[0].name}", f"test {quality[0].label}", quality[0].higher_is_better
        x = x_of(d)
        d = _numeric(d, x, y)
        return (d, x, y, label, higher) if len(d) else None

    def draw(ax, task, p):
        d, x, y, label, higher = p
        sns.scatterplot(d, x=x, y=y, hue="label", style=_varied(d, "preset"), palette=_pal(pal, d), s=60, ax=ax)
        if front:
            draw_front(ax, d, x, y, higher)
        _readable(ax.xaxis, log=d[x].min() > 0 and d[x].max() > 10 * d[x].min())
        if y in LOG_SCALE:
            _readable(ax.yaxis, log=True)
        _label(ax, task, AXIS.get(x, x), label)

    return panels(runs, prepare, draw, missing, caption)


def pareto(runs: pd.DataFrame, pal: dict | None = None):
    return quality_against(runs, pal, lambda d: "train_flops" if d["train_flops"].notna().all() else "train_seconds",
                           "no finished runs with a test score and a training cost",
                           "each point is one run; the dashed line is the Pareto front (no run is both cheaper "
                           "and better)", front=True)


def quality_vs_parameters(runs: pd.DataFrame, pal: dict | None = None):
    return quality_against(runs, pal, lambda d: "parameters",
                           "no finished runs with a parameter count and a test score", "each point is one run")


def draw_front(ax, d: pd.DataFrame, cost: str, quality: str, higher_is_better: bool) -> None:
    front = front_of(d, cost, quality, higher_is_better)
    xs, ys = [*front[cost], d[cost].max()], [*front[quality], front[quality].iloc[-1]]  # on to the costliest run
    ax.step(xs, ys, where="post", color="black", linestyle="--", linewidth=1, label="Pareto front")
    ax.scatter(front[cost], front[quality], s=160, facecolors="none", edgecolors="black", linewidths=1)
    ax.legend(fontsize="small")


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


def throughput(runs: pd.DataFrame, pal: dict | None = None):
    def prepare(d):
        d = _numeric(d, "train_tokens_per_second")
        several = d["device_name"].nunique() > 1
        return _by_system(d.assign(bar=[f"{a}\n{dev}" if several else a for a, dev in zip(d["arch"], _devices(d))]),
                          "bar") if len(d) else None

    def draw(ax, task, d):
        sns.barplot(d, x="bar", y="train_tokens_per_second", hue="label", palette=_pal(pal, d), errorbar="sd",
                    dodge=False, legend=False, ax=ax)
        ax.tick_params(axis="x", labelrotation=30, labelsize="small")
        _label(ax, task, "", "train tokens/s")

    return panels(runs, prepare, draw, "no finished runs with training throughput",
                  "mean over seeds, error bar = standard deviation; separate bars per device")


# ---------------------------------------------------------------- quality by length and distance

def quality_by_length(by_length: pd.DataFrame, pal: dict | None = None):
    def prepare(d):
        metric = next((m for m in [*tables.task_metrics(d), METRICS["bleu"]] if m.name in d
                       and len(_numeric(d, m.name))), None)
        if metric is None:
            return None
        d = _numeric(d, metric.name)
        order = list(dict.fromkeys(d["bucket"]))
        return d.assign(bucket=pd.Categorical(d["bucket"], categories=order, ordered=True)), metric

    def draw(ax, task, p):
        d, metric = p
        _mean_lines(ax, d, "bucket", metric.name, pal)
        _label(ax, task, "source length bucket", f"test {metric.label}")

    return panels(by_length, prepare, draw, "no records carry metrics.test.by_length",
                  f"mean over seeds, {BAND}")


def accuracy_by_distance(by_distance: pd.DataFrame, pal: dict | None = None):
    """Probe accuracy against the distance the answer lies back, per task (test split, else the first split)."""
    def prepare(d):
        d = _numeric(_ok(d), "distance", "accuracy")
        if d.empty:
            return None
        split = "test" if (d["split"] == "test").any() else sorted(d["split"].astype(str))[0]
        return d[d["split"] == split], split

    def draw(ax, task, p):
        d, split = p
        _mean_lines(ax, d, "distance", "accuracy", pal)
        _log_x(ax, d["distance"])
        _label(ax, task, "distance (positions back)", f"{split} accuracy")

    return panels(by_distance, prepare, draw, "no records carry metrics.<split>.accuracy_by_distance",
                  f"one line per model: mean over seeds, {BAND}")


def influence_by_distance(influence: pd.DataFrame, pal: dict | None = None, normalise: bool = True):
    """Input-gradient norm against distance, per task; ``normalise`` divides each run by its nearest distance."""
    dropped = 0

    def prepare(d):
        nonlocal dropped
        d = _numeric(_ok(d), "distance", "grad_norm")
        if normalise and len(d):
            nearest = d.sort_values("distance").groupby("record")["grad_norm"].transform("first")
            d = d.assign(grad_norm=d["grad_norm"] / nearest)
        # a log axis cannot show zero influence (an unreachable distance), nor a run with none at its nearest
        positive = d[(d["grad_norm"] > 0) & np.isfinite(d["grad_norm"])]
        dropped += len(d) - len(positive)
        return positive if len(positive) else None

    def draw(ax, task, d):
        _mean_lines(ax, d, "distance", "grad_norm", pal)
        _log_x(ax, d["distance"])
        ax.set_yscale("log")
        _label(ax, task, "distance (positions back)",
               "grad norm / grad norm at nearest distance" if normalise else "grad norm")

    fig, note = panels(influence, prepare, draw, "no records carry analysis.influence_by_distance",
                       f"one line per model: mean over seeds, {BAND}; "
                       + ("each run divided by its value at the nearest distance; " if normalise else "")
                       + "log y axis")
    if fig is not None and dropped:
        note += f"; {dropped} points with zero gradient (no influence) are not drawn on the log axis"
    return fig, note


# ---------------------------------------------------------------- path-length analysis (Table 1)

def path_length(paths: pd.DataFrame, pal: dict | None = None):
    d = _numeric(paths, "n", "max_path_length") if len(paths) else paths
    if d.empty:
        return None, "no path-length records"
    d = _filled(d)
    fig, axes = _grid(1, width=8)  # room for the legend beside the axes
    sns.lineplot(d, x="n", y="max_path_length", hue="label", style="layer_type", palette=_pal(pal, d),
                 errorbar=None, marker="o", ax=axes[0])
    axes[0].set(xscale="log", yscale="log")
    _ticks_at(axes[0].xaxis, d["n"])
    _legend_beside(axes[0])
    _label(axes[0], "maximum path length", "sequence length n", "maximum path length (steps)")
    return fig, "log-log axes; measured from each model's dependency pattern"


def throughput_by_length(paths: pd.DataFrame, pal: dict | None = None):
    """Tokens per second of one forward pass (batch 1) against n, from the latencies the path-length job timed."""
    def prepare(d):
        d = _numeric(d, "n", "latency_s")
        d = d[d["latency_s"] > 0]
        return d.assign(tokens_per_second=d["n"] / d["latency_s"]) if len(d) else None

    def draw(ax, device, d):
        sns.lineplot(d, x="n", y="tokens_per_second", hue="label", style=_varied(d, "preset"), palette=_pal(pal, d),
                     errorbar=None, marker="o", ax=ax)
        ax.set(xscale="log", yscale="log")
        _ticks_at(ax.xaxis, d["n"])
        _legend_beside(ax)
        _label(ax, f"forward pass on {device}", "sequence length n", "forward tokens/s (batch 1)")

    data = paths if "latency_s" in paths else pd.DataFrame()
    return panels(data, prepare, draw, "no path-length records with forward latency (latency_s)",
                  "n / median forward latency of one sequence, per device; log-log axes", by="device_name", width=8)


# ---------------------------------------------------------------- helpers

def _by_system(d: pd.DataFrame, column: str) -> pd.DataFrame:
    """``d`` with ``column`` (what a plot draws one line, bar or style per) set to a name of the system where the
    column would join runs of two systems (reports.load.system_key): never pooled as if seeds of one. The name is
    short: the settings in which the system differs from the usual value among its model's systems."""
    if "system" not in d or d.groupby(["label", column])["system"].nunique().max() <= 1:
        return d
    names = {}
    for _, model in d.groupby("label", sort=False):
        differs = {key: json.loads(text) if isinstance(text, str) else {}
                   for key, text in model.groupby("system", sort=False)["system_differs"].first().items()}
        usual = {k: pd.Series([v[k] for v in differs.values() if k in v], dtype=object).astype(str).mode().iloc[0]
                 for k in {k for v in differs.values() for k in v}}
        short = {key: ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in sorted(diff.items()) if str(v) != usual[k])
                 for key, diff in differs.items()}
        unique = len(set(short.values())) == len(short)
        for key, name in model.groupby("system", sort=False)["system_name"].first().items():
            names[key] = "\n".join(textwrap.wrap(short[key] or "usual settings" if unique else str(name), 28)) \
                if len(differs) > 1 else ""  # the model's only system: its name as it was
    return d.assign(**{column: [f"{v}\n{names[key]}" if names[key] else v for v, key in zip(d[column], d["system"])]})


def _mean_lines(ax, d: pd.DataFrame, x: str, y: str, pal: dict | None) -> None:
    """One line per model (and preset): the mean over runs, a band of the 95% t-interval of the mean; markers on
    few points, and always where a model has one point (a line through one point is invisible)."""
    d = _by_system(d, "preset")  # systems of one model and preset: a line each, never pooled
    lone = bool((d.groupby(["label", "preset"])[x].nunique() == 1).any()) if "preset" in d else True
    sns.lineplot(d, x=x, y=y, hue="label", style=_varied(d, "preset"), palette=_pal(pal, d), errorbar=stats.t_band,
                 marker="o" if lone or d[x].nunique() <= 20 else None, ax=ax)


def _devices(d: pd.DataFrame) -> list[str]:
    """The rows' devices by the short names the report's tables use (``H100``; the overview's legend spells them)."""
    short = tables.short_devices(d["device_name"])
    return [short[str(v)].replace(tables.NBSP, " ") for v in d["device_name"].fillna("?")]


def _merged_legend(ax) -> None:
    """One legend from every handle drawn on the panel, each label once."""
    handles = dict(zip(*reversed(ax.get_legend_handles_labels())))
    if handles:
        ax.legend(handles.values(), handles.keys())


def _varied(d: pd.DataFrame, column: str) -> str | None:
    """The column as a line style only when it varies (a legend entry for one value says nothing)."""
    return column if d[column].nunique() > 1 else None


def _pal(pal: dict | None, d: pd.DataFrame) -> dict:
    """The report's palette restricted to the labels in d (seaborn rejects extra keys for some plots)."""
    labels = d["label"].unique()
    full = pal if pal is not None and all(v in pal for v in labels) else palette(labels)
    return {v: full[v] for v in labels}


def _ok(d: pd.DataFrame) -> pd.DataFrame:
    return d[d["status"] == "ok"] if "status" in d else d


def _filled(d: pd.DataFrame) -> pd.DataFrame:
    """Identity columns as text, missing ones as '?', so grouping and legends never see NaN."""
    cols = [c for c in ("task", "family", "model", "label", "preset", "device_name") if c in d]
    return d.assign(**{c: d[c].fillna("?").astype(str) for c in cols})


def _groups(d: pd.DataFrame, by: str):
    if d.empty or by not in d:
        return []
    return list(_filled(d.assign(**{by: d[by].fillna("?").astype(str)})).groupby(by, sort=True))


def _numeric(d: pd.DataFrame, *cols: str) -> pd.DataFrame:
    d = d.assign(**{c: pd.to_numeric(d[c], errors="coerce") for c in cols})
    return d.dropna(subset=list(cols))


def _grid(n: int, cols: int = 3, width: float = 5.5) -> tuple[Figure, list]:
    cols = min(n, cols)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, 4.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _log_x(ax, values: pd.Series) -> None:
    """A log x axis when the values span more than a factor of 10 (symlog when they include 0)."""
    positive = values[values > 0]
    if (values < 0).any() or positive.empty or values.max() <= 10 * positive.min():
        return
    if len(positive) == len(values):
        ax.set_xscale("log")
    else:
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(left=0)  # the margin would otherwise reach into negative distances
    _ticks_at(ax.xaxis, values)


def _ticks_at(axis, values: pd.Series, most: int = 12) -> None:
    """Numbers written plainly (10, not 10¹); ticks at the measured values when there are few of them."""
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ticks = sorted(set(values.dropna()))
    if len(ticks) <= most:
        axis.set_major_locator(FixedLocator(ticks))
        axis.set_minor_locator(NullLocator())


def _readable(axis, log: bool) -> None:
    """An axis of measured numbers whose tick labels never overlap: at most about ``TICKS`` of them, in engineering
    notation (``3.2T``, ``150k``), none on minor ticks; ``log`` makes it logarithmic. Call it after drawing.

    On a log axis spanning most of a decade or more the ticks are 1, 2 and 5 times powers of ten (powers of ten
    alone over more than two decades, thinned by matplotlib); on a narrower one, evenly spaced round numbers.
    """
    if log:
        axis.axes.set(**{f"{axis.axis_name}scale": "log"})  # first: setting a scale resets locator and formatter
    low, high = sorted(getattr(axis.axes, f"get_{axis.axis_name}lim")())  # the view, bands and margins included
    decades = math.log10(high / low) if log and low > 0 else 0
    if decades >= 0.7:
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 2 else (1.0,), numticks=TICKS))
    else:
        axis.set_major_locator(MaxNLocator(nbins=TICKS, steps=[1, 2, 2.5, 5, 10]))
    axis.set_major_formatter(EngFormatter(sep=""))
    axis.set_minor_formatter(NullFormatter())


def _legend_beside(ax) -> None:
    """The legend to the right of the axes, never over the lines."""
    if ax.get_legend() is not None:
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1))


def _label(ax, title: str, x: str, y: str) -> None:
    ax.set_title("\n".join(textwrap.wrap(_text(title), 48)) or "")
    ax.set(xlabel=x, ylabel=y)
    legend = ax.get_legend()
    if legend is not None:
        for t in [legend.get_title(), *legend.get_texts()]:
            t.set_text(_text(LEGEND_TITLES.get(t.get_text(), t.get_text())))


def _text(s) -> str:
    """A user string as literal matplotlib text (a '$' would start mathtext)."""
    return str(s).replace("$", r"\$")
