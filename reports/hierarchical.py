"""Architectures compared: the systems of each task tested with seeds and test items resampled (two-level bootstrap).

``significance.pairwise`` compares two trained models, seed pair by seed pair: its bootstrap measures how much the
test set's sample moves one model's score, so with a large test set any two seeds of one architecture differ
"significantly". Whether one architecture beats another is a question about seed-to-seed variance as well. Here
each pair of systems of a task (the same systems: ``load.system_key`` via ``tables.with_groups``, so rows of any
kind the runs table holds, ladder rungs included, are systems alike) is tested by ``stats.hierarchical``: every
resample draws the seeds of each system with replacement, independently, and scores them on one resample of the
test items, the same draws for both (sentences with sacreBLEU's resampling, or chunks of the test stream for the
NLL of language models; ``significance.run_scores``). The p-values of one task and metric (every pair of systems)
are one family, adjusted by Holm's method; the resamples are ``significance.resamples_for``'s, chosen from the
task's largest family, so the smallest p-value leaves Holm room to reject. A difference is an architecture-level
conclusion only when its adjusted p < 0.05, it does not round to zero at the precision shown
(``significance.negligible``), and both systems have at least two seeds with test outputs: with one, the seed
variance is unknown and the test compares a trained model, which the row's note says. A p-value at the floor of
its resamples that Holm did not reject is marked: resolution, not the data, limits that conclusion.
"""
from __future__ import annotations

from itertools import combinations

import pandas as pd

from . import significance, stats, tables
from .load import shorten

COLUMNS = ["task", "metric", "a", "b", "seeds_a", "seeds_b", "n_seeds_a", "n_seeds_b", "a_score", "b_score", "delta",
           "ci_low", "ci_high", "p", "p_holm", "significant", "verdict", "units", "n_samples", "note"]
TITLE = "Architectures compared (seeds and test items resampled)"
ONE_SEED = ("seed variance could not be estimated ({which} one seed with test outputs): this compares trained "
            "models, not architectures")


def architectures(runs: pd.DataFrame, cache: dict | None = None) -> pd.DataFrame:
    """One row per task, metric and pair of systems (better mean first), as in ``COLUMNS``.

    ``delta`` is the mean over A's seeds minus the mean over B's, on the full test set (NLL per token in nats for
    language models), with the two-level bootstrap's 95% interval, p-value, Holm-adjusted p-value and ``verdict``.
    ``runs`` is the table ``significance.pairwise`` takes; ``cache`` (a dict shared with it) keeps each run's
    resampled scores so that both tables draw them once. A pair that cannot be tested has no numbers and a ``note``
    saying why.
    """
    if runs.empty or tables.ok(runs).empty:
        return pd.DataFrame(columns=COLUMNS)
    done = tables.with_groups(tables.ok(runs))
    rows, cache = [], {} if cache is None else cache
    for task, group in done.groupby("task", sort=True):
        names = significance.testable(group)
        found = significance.systems(group, names)
        n = significance.resamples_for(found)
        for name in names:
            for a, b in combinations(found, 2):
                rows.append({"task": task, "metric": name, "a": a, "b": b,
                             **_compare(name, found[a], found[b], n, cache)})
    return holm(pd.DataFrame(rows, columns=COLUMNS))


def holm(pairs: pd.DataFrame) -> pd.DataFrame:
    """``pairs`` with ``p_holm`` (Holm over each task and metric's tested pairs, ``significance.holm``),
    ``significant`` (never for a system with a single seed) and ``verdict``.

    Pairs with a single-seed system stay in the family: their p-values are shown, and a family without them would
    make the other tests look stronger than the tests that were run."""
    pairs = significance.holm(pairs)
    single = (pd.to_numeric(pairs["n_seeds_a"]) < 2) | (pd.to_numeric(pairs["n_seeds_b"]) < 2)
    pairs.loc[pairs["p"].notna() & single, "significant"] = False
    return pairs.assign(verdict=[verdict(r) for r in pairs.itertuples()])


def verdict(row) -> str:
    """``yes: <better system> better`` for an architecture-level difference, else why not (a row of ``COLUMNS``)."""
    if pd.isna(row.p):
        return "– (not tested)"
    if row.n_seeds_a < 2 or row.n_seeds_b < 2:
        return "– (no conclusion about architectures: a system has one seed)"
    if row.p_holm < stats.ALPHA and significance.negligible(row.metric, row.delta):
        return f"no (the difference rounds to {significance.number(row.metric, 0.0)})"
    if row.significant:
        return f"yes: {significance.better(row.metric, row.delta, row.a, row.b)} better"
    if stats.at_floor(row.p, int(row.n_samples), two_level=True):
        return (f"no (Holm-adjusted p ≥ {stats.ALPHA:g}, p at the floor of {int(row.n_samples):,} resamples: "
                "resolution limits this conclusion)")
    return f"no (Holm-adjusted p ≥ {stats.ALPHA:g})"


def _compare(name: str, runs_a: list[dict], runs_b: list[dict], n: int, cache: dict) -> dict:
    """The two-level test of two systems' runs (each with its outputs, ``n`` resamples) as the row's numbers and
    note; runs without usable outputs are left out and counted in the note."""
    sides, left_out = [], []
    for runs in (runs_a, runs_b):
        got = []
        for run in runs:
            try:
                got.append((run, *significance.run_scores(name, run, n, cache)))
            except significance.Missing as err:
                left_out.append(str(err))
        sides.append(got)
    counts = {"n_seeds_a": len(sides[0]), "n_seeds_b": len(sides[1])}
    if not all(sides):
        which = " and ".join(s for s, got in zip("AB", sides) if not got)
        return {**counts, "note": f"not tested: no run of {which} has usable test outputs (the notes under the "
                                  f"seed-pair table say why)"}
    first = sides[0][0][3]
    if any(items != first for side in sides for _, _, _, items in side):
        return {**counts, "note": f"not tested: the runs do not share the same test "
                                  f"{'references' if name != significance.NLL else 'chunks'}"}
    result = stats.hierarchical([s for _, s, _, _ in sides[0]], [s for _, s, _, _ in sides[1]])
    notes = []
    if left_out:
        notes.append(f"{len(left_out)} run(s) without usable test outputs left out (the notes under the seed-pair "
                     f"table say why)")
    single = [s for s, got in zip("AB", sides) if len(got) == 1]
    if single:
        notes.append(ONE_SEED.format(which=" and ".join(single) + (" have" if len(single) == 2 else " has")))
    return {**counts, "seeds_a": _seeds(sides[0]), "seeds_b": _seeds(sides[1]), "a_score": result.a,
            "b_score": result.b, "delta": result.delta, "ci_low": result.low, "ci_high": result.high, "p": result.p,
            "units": sides[0][0][2], "n_samples": n, "note": "; ".join(notes) or None}


def _seeds(side: list[tuple]) -> str:
    return ", ".join(str(tables._plain(run["seed"])) for run, *_ in side)


# ---------------------------------------------------------------- the report's table

def display(pairs: pd.DataFrame, task: str) -> pd.DataFrame:
    """One task's pairs of systems as the report shows them, one row per metric and pair."""
    rows = []
    for r in pairs[pairs["task"] == task].itertuples():
        tested = not pd.isna(r.p)
        rows.append({"metric": significance.label(r.metric), "A": shorten(r.a, significance.NAME_LIMIT),
                     "B": shorten(r.b, significance.NAME_LIMIT), "seeds (A / B)": f"{r.n_seeds_a} / {r.n_seeds_b}",
                     "Δ (A − B)": significance.number(r.metric, r.delta, sign=True) if tested else "–",
                     "95% CI": (f"{significance.number(r.metric, r.ci_low)}, {significance.number(r.metric, r.ci_high)}"
                                if tested else "–"),
                     "p": significance.pvalue(r.p) if tested else "–",
                     "Holm p": significance.pvalue(r.p_holm) if tested else "–",
                     "architecture-level verdict": r.verdict, "note": "" if pd.isna(r.note) else r.note})
    return pd.DataFrame(rows, columns=["metric", "A", "B", "seeds (A / B)", "Δ (A − B)", "95% CI", "p", "Holm p",
                                       "architecture-level verdict", "note"])


def caption(pairs: pd.DataFrame, task: str) -> str:
    """What the task's architecture table shows and how it was computed."""
    shown = pairs[pairs["task"] == task]
    n = significance.resamples_shown(shown, task)
    lm = (" NLL is per token in nats: a negative Δ means A has the lower (better) perplexity."
          if (shown["metric"] == significance.NLL).any() else "")
    return (f"{TITLE}: a two-level bootstrap, {n:,} resamples ({significance.RESAMPLE_RULE}), seed {stats.SEED}. Each "
            f"resample draws the {significance.SPLIT} items (sentences as sacreBLEU resamples them; test chunks for "
            f"NLL), the same for both systems, and, independently for A and B, their seeds with replacement; a "
            f"system scores the mean of its drawn seeds on those items. Δ = mean over A's seeds − mean over B's on "
            f"the full {significance.SPLIT} set, its 95% percentile interval, the two-sided p-value (twice the share "
            f"of resampled differences on the other side of zero, (count + 1) / (resamples + 1)), and the p-value "
            f"adjusted by Holm's method over every pair of systems in this table for that metric. 'yes' only when the "
            f"adjusted p < {stats.ALPHA:g}, the difference does not round to zero at the precision shown, and both "
            f"systems have two seeds or more: a single seed leaves the seed-to-seed variance unknown, so its row "
            f"draws no conclusion about architectures. The seed pairs of the table below test the trained models "
            f"only.{lm}")
