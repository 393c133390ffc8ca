"""The budget ladder: which architecture wins at equal compute, and does the ranking hold as compute grows?

A ladder job (``trainer.schedule=wsd trainer.ladder=[F0, F1, ...]``, harness/job.py) trains one model per
architecture and seed once and evaluates its cooled weights at every rung; each rung is written as a run of its
own whose ``config.trainer.max_flops`` is the rung's FLOPs, so every (architecture, rung) is a system
(``load.system_key``) and the two-level test of ``hierarchical.architectures`` already compares them. This module
reads those rungs (the runs table's ``ladder_rung`` / ``ladder_flops`` columns) and shows, per task:

- the figure: the task's first metric on the test set against the rung's training FLOPs (log x), one line per
  architecture through the rungs' means over seeds, a band of the 95% t-interval over seeds (``stats.t_interval``,
  the summary tables' interval) and a marker per rung; beside it the same points against the mean wall-clock
  training seconds, where tokens or time per FLOP set architectures apart;
- a table per task: per rung, the architectures ranked by their mean (the metric's direction), with the interval,
  seeds, tokens seen, counted FLOPs and training seconds, and for each architecture and the next below it the
  verdict of the two-level test at that rung;
- where two architectures' means change order between consecutive rungs, and which conclusions (the two-level
  test's "yes", never a mean alone) hold at which rung.

An "architecture" here is a line: the runs of one task whose settings differ in nothing but the rung's budget.
"""
from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from seqbench.harness.metrics import METRICS, Metric

from . import plots, significance, stats, tables
from .load import Records, TEXT_LIMIT, shorten, system_name
from .render import Note, Section, Table

TITLE = "Budget ladder: which architecture wins at equal compute"
PLOT = "ladder"  # the figure's file name under plots/
RUNG_BUDGET = "trainer.max_flops"  # the setting that sets a line's rungs apart
LADDER_KEYS = (RUNG_BUDGET, "trainer.ladder")  # left out of a line's name where the name stays distinct without them
LINESTYLES = ("-", "--", ":", "-.")  # lines of one model label (variants of one architecture), in this order
TABLE_PREFIX = "ladder-"  # a rung table's name (its HTML id and, with the task, its wandb key)
ONE_SEED = "one seed: no conclusion"


# ---------------------------------------------------------------- the rungs and their points

def rung_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The finished training runs that are ladder rungs, with ``rung_flops`` (the rung's FLOPs) and ``line`` (the
    name of the architecture the rung belongs to: its system without the rung's budget)."""
    done = tables.ok(runs)
    if done.empty or "ladder_flops" not in done:
        return done.iloc[0:0].assign(rung_flops=[], line=[])
    flops = pd.to_numeric(done["ladder_flops"], errors="coerce")
    done = done[flops.notna()].assign(rung_flops=flops[flops.notna()])
    if done.empty:
        return done.assign(line=[])
    return done.assign(line=_line_names(done))


def _line_names(rungs: pd.DataFrame) -> pd.Series:
    """Each rung's line: runs whose settings agree but for ``trainer.max_flops`` share it. Named by the
    architecture and the settings that set it apart (``system_differs``) without the ladder's own settings, or
    with ``trainer.ladder`` where two lines of a task would otherwise read alike."""
    key = rungs["system_settings"].map(lambda text: json.dumps(
        {k: v for k, v in _json(text).items() if k != RUNG_BUDGET}, sort_keys=True))
    names = pd.Series(index=rungs.index, dtype=object)
    for _, group in rungs.assign(_key=key).groupby("task", sort=False):
        first = group.groupby("_key", sort=True)[["arch", "system_differs"]].first()
        for drop in (LADDER_KEYS, (RUNG_BUDGET,)):
            named = {k: system_name(r.arch, {s: v for s, v in _json(r.system_differs).items() if s not in drop})
                     for k, r in first.iterrows()}
            if len(set(named.values())) == len(named):
                break
        else:  # settings an older record lacks: numbered, never merged
            named = {k: f"{name} #{i}" for i, (k, name) in enumerate(named.items(), 1)}
        names[group.index] = group["_key"].map(named)
    return names


def points(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per task, line and rung (``rung_flops``): the task's first test metric over seeds (``mean``,
    ``low``/``high``: the 95% t-interval of the mean, NaN for one seed; ``n``, ``seeds``) and the mean costs
    (``tokens``, ``train_seconds``, ``train_flops``), with the model ``label`` (its colour), the rung's ``system``
    and ``metric`` (the metric's name). Rungs without a test score are left out."""
    columns = ["task", "line", "label", "system", "rung_flops", "metric", "mean", "low", "high", "n", "seeds",
               "tokens", "train_seconds", "train_flops"]
    rungs, rows = rung_runs(runs), []
    for task, group in rungs.groupby("task", sort=True):
        metric = tables.primary_metric(group)
        if metric is None:
            continue
        for (line, flops), seeds in group.groupby(["line", "rung_flops"], sort=True):
            values = pd.to_numeric(seeds[f"test_{metric.name}"], errors="coerce")
            scored = seeds[values.notna()]
            interval = stats.t_interval(values[values.notna()].tolist())
            if interval.n == 0:
                continue
            mean = {c: pd.to_numeric(scored[c], errors="coerce").mean() for c in ("tokens", "train_seconds",
                                                                                   "train_flops")}
            rows.append({"task": task, "line": line, "label": str(scored["label"].iloc[0]),
                         "system": scored["system"].iloc[0], "rung_flops": flops, "metric": metric.name,
                         "mean": interval.mean, "low": interval.low, "high": interval.high, "n": interval.n,
                         "seeds": ", ".join(str(tables._plain(s)) for s in sorted(scored["seed"].dropna())), **mean})
    return pd.DataFrame(rows, columns=columns)


# ---------------------------------------------------------------- the figure

def figure(pts: pd.DataFrame, pal: dict | None = None) -> Figure:
    """Per task a row of two panels: quality against the rung's FLOPs, and against the mean training seconds; one
    line per architecture through its rungs' means with a marker per rung and the band of the t-interval."""
    tasks = sorted(pts["task"].unique())
    fig = Figure(figsize=(12, 4.2 * len(tasks)), layout="constrained")
    axes = fig.subplots(len(tasks), 2, squeeze=False)
    for (by_flops, by_time), task in zip(axes, tasks):
        d = pts[pts["task"] == task]
        metric = METRICS[d["metric"].iloc[0]]
        shades: dict[str, int] = {}
        for line, rows in d.groupby("line", sort=True):
            rows = rows.sort_values("rung_flops")
            label = rows["label"].iloc[0]
            k = shades[label] = shades.get(label, -1) + 1
            colour = (pal or {}).get(label) or plots.colour(label)
            for ax, x in ((by_flops, "rung_flops"), (by_time, "train_seconds")):
                ax.plot(rows[x], rows["mean"], color=colour, linestyle=LINESTYLES[k % len(LINESTYLES)], marker="o",
                        label=plots._text(line))
                ax.fill_between(rows[x], rows["low"], rows["high"], color=colour, alpha=0.2, linewidth=0)
        for ax, x, axis in ((by_flops, "training FLOPs", "training FLOPs (the rung's budget)"),
                            (by_time, "training seconds", "training seconds (mean over seeds)")):
            plots._readable(ax.xaxis, log=True)
            if f"test_{metric.name}" in plots.LOG_SCALE:
                plots._readable(ax.yaxis, log=True)
            plots._label(ax, f"{task}: against {x}", axis, f"test {metric.label}")
        by_time.legend(title="architecture", fontsize="small")
        plots._legend_beside(by_time)
    return fig


def plot(pts: pd.DataFrame, plot_dir: Path, pal: dict | None = None) -> plots.Plot:
    """The figure saved as ``plots/ladder.png`` and ``.svg`` (``plots.save``), with its caption."""
    png, svg = plots.save(figure(pts, pal), plot_dir, PLOT)
    return plots.Plot(PLOT, "Quality against compute along the budget ladder",
                      caption="per task, the test quality at each rung of the ladder (a marker: the mean over seeds "
                              "of the cooled weights at that rung) against the rung's training FLOPs (left) and "
                              "against the mean wall-clock training seconds (right); " + plots.BAND,
                      png=png, svg=svg)


# ---------------------------------------------------------------- the rung table, crossings and conclusions

def tested_names(runs: pd.DataFrame, task: str) -> dict[str, str]:
    """System key -> the name ``hierarchical.architectures`` gives that system in ``task`` (``significance.systems``:
    its ``system_name``, numbered where two read alike)."""
    group = tables.with_groups(tables.ok(runs))
    group = group[group["task"] == task]
    return {run["system"]: shorten(name, TEXT_LIMIT) for name, found in significance.systems(group, []).items()
            for run in found}


def tested_metric(runs: pd.DataFrame, task: str, metric: Metric) -> str | None:
    """The metric of ``hierarchical.architectures``' rows that tests ``metric``: itself for sacreBLEU's metrics,
    the NLL per token for a language model's perplexity; None when it has no paired test."""
    group = tables.ok(runs)
    names = significance.testable(group[group["task"] == task])
    return metric.name if metric.name in names else significance.NLL if significance.NLL in names else None


class Verdicts:
    """The two-level test's rows of one task and metric, looked up by two rungs' ``points`` rows."""

    def __init__(self, runs: pd.DataFrame, archs: pd.DataFrame | None, task: str, metric: Metric):
        self.name = tested_metric(runs, task, metric)
        self.systems = tested_names(runs, task)
        rows = archs[(archs["task"] == task) & (archs["metric"] == self.name)] if archs is not None and len(archs) \
            else pd.DataFrame(columns=["a", "b"])
        rows = rows.assign(**{side: rows[side].map(lambda v: shorten(str(v), TEXT_LIMIT)) for side in ("a", "b")})
        self.pairs = {frozenset((r.a, r.b)): r for r in rows.itertuples()}  # names as the report's runs cut them
        self.label = metric.label

    def row(self, upper, lower):
        """The test of two points' systems (None where it is absent)."""
        return self.pairs.get(frozenset((self.systems.get(upper.system), self.systems.get(lower.system))))

    @staticmethod
    def tested(row) -> bool:
        """Whether a test's row holds a p-value (runs without usable test outputs have none)."""
        return row is not None and not pd.isna(row.p)

    def better(self, upper, lower) -> str | None:
        """The line the test calls better, when its verdict is a conclusion; else None."""
        r = self.row(upper, lower)
        if r is None or min(upper.n, lower.n) < 2 or not str(r.verdict).startswith("yes"):
            return None
        higher = METRICS[r.metric].higher_is_better if r.metric in METRICS else False  # a lower NLL is better
        won = r.a if (r.delta > 0) == higher else r.b
        return upper.line if won == self.systems.get(upper.system) else lower.line

    def cell(self, upper, lower) -> str:
        """The verdict between ``upper`` (ranked above) and ``lower`` at one rung, with Δ (upper − lower) and the
        Holm-adjusted p-value."""
        if min(upper.n, lower.n) < 2:
            return ONE_SEED
        if self.name is None:
            return f"– (no paired test of {self.label})"
        r = self.row(upper, lower)
        if not self.tested(r):
            return "– (not tested: the task's architectures table says why)"
        delta = r.delta if r.a == self.systems.get(upper.system) else -r.delta
        numbers = (f"Δ {significance.number(r.metric, delta, sign=True)}"
                   f"{' NLL' if r.metric == significance.NLL else ''}, Holm p {significance.pvalue(r.p_holm)}")
        won = self.better(upper, lower)
        verdict = f"yes: {won} better" if won is not None else str(r.verdict)
        return f"{verdict} ({numbers})"


def rank_table(pts: pd.DataFrame, task: str, verdicts: Verdicts) -> pd.DataFrame:
    """Per rung (FLOPs, smallest first), the task's lines best first by their mean (the metric's direction), and
    for each line the verdict against the next below it."""
    d = pts[pts["task"] == task]
    metric = METRICS[d["metric"].iloc[0]]
    head = f"test {metric.label} {tables.ARROWS[metric.higher_is_better]}"
    rows = []
    for flops, rung in d.groupby("rung_flops", sort=True):
        ranked = list(tables.best_first(rung, metric, "mean").itertuples())
        for k, p in enumerate(ranked):
            cell = {f"test_{metric.name}_{k2}": v for k2, v in (("mean", p.mean), ("n", p.n), ("ci_low", p.low),
                                                                 ("ci_high", p.high))}
            rows.append({"rung FLOPs": flops_text(flops), "rank": k + 1, "architecture": p.line,
                         head: tables.interval_cell(cell, f"test_{metric.name}", metric.fmt), "seeds": p.seeds,
                         "tokens seen": tables.num(p.tokens, "{:,.0f}"),
                         "train FLOPs (counted)": tables.num(p.train_flops, "{:.2e}"),
                         "train s": tables.num(p.train_seconds, "{:.1f}"),
                         "vs next (two-level test)": verdicts.cell(p, ranked[k + 1]) if k + 1 < len(ranked) else ""})
    return pd.DataFrame(rows, columns=["rung FLOPs", "rank", "architecture", head, "seeds", "tokens seen",
                                       "train FLOPs (counted)", "train s", "vs next (two-level test)"])


def crossings(pts: pd.DataFrame, task: str) -> list[str]:
    """Where two lines' means change order between consecutive rungs both reached: ``transformer-tiny overtakes
    gru-tiny between 4.5e13 and 1e14 FLOPs`` (rungs where the means tie are passed over)."""
    d = pts[pts["task"] == task]
    metric = METRICS[d["metric"].iloc[0]]
    way = 1 if metric.higher_is_better else -1
    means = d.pivot_table(index="rung_flops", columns="line", values="mean", aggfunc="first").sort_index()
    found = []
    for a, b in combinations(sorted(means.columns), 2):
        gap = (way * (means[a] - means[b])).dropna()
        gap = gap[gap != 0]
        for (low, before), (high, after) in zip(gap.items(), list(gap.items())[1:]):
            if (before > 0) != (after > 0):
                ahead, behind = (a, b) if after > 0 else (b, a)
                found.append(f"{ahead} overtakes {behind} between {flops_text(low)} and {flops_text(high)} FLOPs")
    return found


def crossing_note(pts: pd.DataFrame, task: str) -> str:
    """The crossings as a sentence, or that there are none (and why there could be none)."""
    d = pts[pts["task"] == task]
    if d["line"].nunique() < 2 or d["rung_flops"].nunique() < 2:
        return "Crossings: none possible (one architecture or one rung)."
    found = crossings(pts, task)
    if not found:
        return "Crossings of the means: none; every pair of architectures keeps its order at every rung both reached."
    return ("Crossings of the means: " + "; ".join(found) + ". A crossing of means is no conclusion by itself: "
            "the verdicts say whether the order on either side of it is.")


def conclusions(pts: pd.DataFrame, task: str, verdicts: Verdicts) -> str:
    """Which conclusions hold at which rung: every pair of lines at a rung whose two-level test says "yes", grouped
    by conclusion; rungs with none say so, and why (one seed, no test, or no difference significant)."""
    d = pts[pts["task"] == task]
    held: dict[tuple[str, str], list[float]] = {}
    empty = []
    for flops, rung in d.groupby("rung_flops", sort=True):
        pairs = [(u, v) for u, v in combinations(list(rung.itertuples()), 2) if min(u.n, v.n) >= 2]
        found = []
        for upper, lower in pairs:
            won = verdicts.better(upper, lower)
            if won is not None:
                found.append((won, lower.line if won == upper.line else upper.line))
        for pair in found:
            held.setdefault(pair, []).append(flops)
        if found:
            continue
        if len(rung) < 2:
            empty.append(f"{flops_text(flops)}: one architecture, nothing to compare")
        elif not pairs:
            empty.append(f"{flops_text(flops)}: {ONE_SEED}")
        elif not any(verdicts.tested(verdicts.row(u, v)) for u, v in pairs):
            empty.append(f"{flops_text(flops)}: not tested (the task's architectures table says why)")
        else:
            empty.append(f"{flops_text(flops)}: no difference is a conclusion")
    every = d["rung_flops"].nunique()
    said = [f"{won} better than {lost} " + ("at every rung" if len(at) == every and every > 1 else
                                            "at " + ", ".join(map(flops_text, at)) + " FLOPs")
            for (won, lost), at in sorted(held.items(), key=lambda kv: (kv[1][0], kv[0]))]
    text = ("Conclusions (two-level test, Holm-adjusted p < " + f"{stats.ALPHA:g}" + ", two seeds or more a side): "
            + ("; ".join(said) if said else "none") + ".")
    if empty:
        text += " Without a conclusion: " + "; ".join(empty) + "."
    return text


def tuning_notes(rungs: pd.DataFrame) -> list[Note]:
    """Which tuning the rungs trained with: a ladder's rungs are one training run, so one setting serves every rung;
    where that setting came from ``tuned=``, ``tuning.tuned_use`` adds the budget it was tuned at."""
    from . import tuning  # here, not at the top: `python -m seqbench.reports.tuning` runs it as __main__

    used = sorted({str(c["tuned"]) for c in map(tuning._config, rungs["record"]) if c.get("tuned")})
    if not used:
        return [Note("Tuning: no rung applied tuned settings (tuned=); each architecture trained at its configured "
                     "settings, and one setting serves every rung (a ladder's rungs are one training run).", "note")]
    return [Note(f"Tuning: tuned={', '.join(used)}: one setting serves every rung (a ladder's rungs are one training "
                 "run); at other rungs than the budget it was tuned at, an architecture may rank below its best.",
                 "note"), *tuning.tuned_use(rungs)]


def sections(records: Records, plot_dir: Path, archs: pd.DataFrame | None) -> list[Section]:
    """The ladder's section (the figure, the tuning note) and one sub-section per task (its rung table, crossings
    and conclusions); none when no run is a ladder rung. ``archs``: ``hierarchical.architectures`` of the runs."""
    runs = records.runs
    pts = points(runs)
    if pts.empty:
        return []
    intro = Note("Each ladder job trains an architecture once per seed and evaluates its cooled weights at every "
                 "rung (trainer.schedule=wsd, trainer.ladder): a rung is the run a FLOP budget of its size would "
                 "have made, and every architecture at every rung a system of its own. The rungs of one seed share "
                 "their training up to each rung, so they are not independent samples of the architecture; the "
                 "seeds are.", "text")
    blocks = [intro, plot(pts, plot_dir, plots.report_palette(records)), *tuning_notes(rung_runs(runs))]
    out = [Section(TITLE, blocks)]
    for task in sorted(pts["task"].unique()):
        metric = METRICS[pts.loc[pts["task"] == task, "metric"].iloc[0]]
        verdicts = Verdicts(runs, archs, task, metric)
        way = "higher" if metric.higher_is_better else "lower"
        nll = " Δ of language models is the NLL per token in nats (negative: the upper one is better)." \
            if verdicts.name == significance.NLL else ""
        caption = (f"Task {task}: at each rung of the ladder, the architectures ranked by their mean test "
                   f"{metric.label} over seeds ({way} is better), as mean (95% confidence interval of the mean, "
                   f"Student t; n seeds); tokens seen, counted training FLOPs and training seconds are means over "
                   f"seeds. 'vs next': the two-level bootstrap between the architecture and the next below it at the "
                   f"same rung (seeds and test items resampled, Holm-adjusted over every pair of systems of the task, "
                   f"rungs included); only its 'yes' is a conclusion.{nll}")
        out.append(Section(f"Ladder, task {task}", [
            Table(rank_table(pts, task, verdicts), caption, name=f"{TABLE_PREFIX}{task}"),
            Note(crossing_note(pts, task), "text"), Note(conclusions(pts, task, verdicts), "text")], level=3))
    return out


def rung_tables(built: list[Section]) -> dict[str, pd.DataFrame]:
    """The rung tables of a built report, ``ladder/<task>`` -> table (for its wandb run)."""
    return {f"ladder/{b.name.removeprefix(TABLE_PREFIX).replace('/', '_')}": b.frame for s in built for b in s.blocks
            if isinstance(b, Table) and b.name.startswith(TABLE_PREFIX)}


def flops_text(value: float) -> str:
    """FLOPs as the report writes a rung: ``4.5e13``, ``1e14`` (three significant digits, no ``+`` or zeros)."""
    text = f"{value:.3g}"
    if "e" not in text:
        return text
    mantissa, exponent = text.split("e")
    return f"{mantissa}e{int(exponent)}"


def _json(text) -> dict:
    return json.loads(text) if isinstance(text, str) and text else {}
