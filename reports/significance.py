"""Pairwise significance between the systems of each task, from the outputs each job leaves beside its record.

A translation job writes ``test.hyp`` and ``test.ref`` (hypotheses and references, one a line), a language-model
job ``test.nll.json`` (summed NLL and tokens of each test chunk) into its output folder, the folder of its
``record.json`` (harness/job.py). A system is one row of a task's summary table: every setting that can change a
result (``load.system_key``), so runs of one architecture at two learning rates or beam sizes are two systems,
never seeds of one. Two systems are compared seed pair by seed pair: the i-th seed of one with
the i-th seed of the other (seeds sorted; a system with more seeds has its extra ones left out), each pair by a
paired bootstrap on the test set (``stats``): sacreBLEU's for BLEU, chrF and TER, chunks of the test stream for
the per-token NLL of language models. The bootstrap measures how much the test set's sample moves one trained
model's score; the spread over seeds is the t-interval of the summary table. The p-values of one task and metric
(every pair of systems, every seed pair) are one family, adjusted by Holm's step-down method (statsmodels), which
holds the chance of any false "significant" in the family at 5%. A difference counts as significant only when
every seed pair is significant (adjusted p < 0.05) in the same direction, and never when the difference rounds
to zero at the precision the report shows (``negligible``: 0.0024 BLEU reads +0.00). Every run of a task is
resampled ``resamples_for`` times, a count chosen from the size of the task's largest family (``stats.resamples``:
1,000 resamples could never give Holm's method a p-value small enough over 51 tests or more); a seed pair whose p
is the smallest its resamples can give and still not significant is marked: resolution limits that conclusion.
This table is the detail; ``hierarchical`` compares the systems as architectures, seeds resampled too.
"""
from __future__ import annotations

import json
import math
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
from statsmodels.stats.multitest import multipletests

from seqbench.harness.metrics import METRICS

from . import stats, tables
from .load import shorten

SPLIT = "test"
NLL = "nll"  # the paired test of language models (perplexity and bits per character are both its exponent)
COLUMNS = ["task", "metric", "a", "b", "seed_a", "seed_b", "a_score", "b_score", "delta", "ci_low", "ci_high", "p",
           "p_holm", "significant", "units", "n_samples", "note"]
NAME_LIMIT = 200  # characters of a system's name (its architecture and the settings that set it apart)
NOTES = 5  # reasons for untested pairs shown per task
ABSENT = "(jobs of this version write it beside record.json)"  # ends the note of an output file not there
NOTE_SEPARATOR = "; "  # between the two runs' reasons in one note
RESAMPLE_RULE = (f"the count grows with the number of tests Holm's method adjusts together, so that the smallest "
                 f"p-value leaves room to reject: at least {stats.N_SAMPLES:,}, at most {stats.N_MAX:,}")


class Missing(Exception):
    """A run's outputs cannot be paired (absent, unreadable, or not on the same test items); the message says why."""


def pairwise(runs: pd.DataFrame, cache: dict | None = None) -> pd.DataFrame:
    """One row per task, metric, pair of systems (better mean first) and seed pair, as in ``COLUMNS``.

    ``delta`` is a - b on the test set (NLL per token in nats for language models); a pair that cannot be tested
    has no numbers and a ``note`` saying why. ``cache`` (any dict, shared with ``hierarchical.architectures`` of
    the same runs) keeps each run's resampled scores, so the test outputs are read and resampled once.
    """
    if runs.empty or tables.ok(runs).empty:
        return pd.DataFrame(columns=COLUMNS)
    done = tables.with_groups(tables.ok(runs))
    rows, cache = [], {} if cache is None else cache
    for task, group in done.groupby("task", sort=True):
        names = testable(group)
        found = systems(group, names)
        n = resamples_for(found)
        for name in names:
            for a, b in combinations(found, 2):
                for run_a, run_b in zip(found[a], found[b]):
                    rows.append({"task": task, "metric": name, "a": a, "b": b, "seed_a": run_a["seed"],
                                 "seed_b": run_b["seed"], **_compare(name, run_a, run_b, n, cache)})
    return holm(pd.DataFrame(rows, columns=COLUMNS))


def resamples_for(found: dict[str, list[dict]]) -> int:
    """The resamples of every run of one task (``systems``), from its largest family: the seed pairs of every pair
    of systems (``stats.resamples``). The two-level test of the same systems has one test per pair of systems, a
    family no larger, and reuses these resamples: both tests draw the same test items."""
    return stats.resamples(max(1, sum(min(len(a), len(b)) for a, b in combinations(found.values(), 2))))


def holm(pairs: pd.DataFrame) -> pd.DataFrame:
    """``pairs`` with ``p_holm``, each tested row's p-value adjusted by Holm's method over its family (the tested
    rows of its task and metric), and ``significant`` decided on it."""
    pairs = pairs.assign(p_holm=pd.to_numeric(pairs["p_holm"]), significant=pairs["significant"].astype(object))
    for _, family in pairs[pairs["p"].notna()].groupby(["task", "metric"], sort=False):
        adjusted = multipletests(family["p"].astype(float).to_numpy(), alpha=stats.ALPHA, method="holm")[1]
        pairs.loc[family.index, "p_holm"] = adjusted
        small = [negligible(name, d) for name, d in zip(family["metric"], family["delta"])]
        pairs.loc[family.index, "significant"] = (adjusted < stats.ALPHA) & ~np.array(small, dtype=bool)
    return pairs


def testable(rows: pd.DataFrame) -> list[str]:
    """The task's metrics that have a paired test: sacreBLEU's (translation), the NLL (language models)."""
    names = [m.name for m in tables.task_metrics(rows)]
    if (rows["family"] == "lm").all():
        return [NLL] if {"ppl", "bpc"} & set(names) else []
    return [n for n in names if n in stats.SACREBLEU]


def systems(group: pd.DataFrame, names: list[str]) -> dict[str, list[dict]]:
    """System name -> its runs sorted by seed, systems best first by their mean on the task's first metric.

    A system is ``load.system_key`` (the ``system`` column), named by ``system_name``; runs of two systems are
    never pooled, even where their names read alike (the key's start is appended then)."""
    first = group.groupby("system", sort=False)["system_name"].first()
    alike = first[first.duplicated(keep=False)].index
    name = group["system_name"].where(~group["system"].isin(alike),
                                      group["system_name"] + " #" + group["system"].str[:6])
    group = group.assign(_system=name)
    quality = tables.task_metrics(group)
    order = list(dict.fromkeys(group["_system"]))
    if names and quality:
        means = group.groupby("_system")[f"test_{quality[0].name}"].mean()
        order = list(means.sort_values(ascending=not quality[0].higher_is_better, kind="stable").index)
    return {s: group[group["_system"] == s].sort_values("seed", na_position="last").to_dict("records")
            for s in order}


def _compare(name: str, run_a: dict, run_b: dict, n: int, cache: dict) -> dict:
    """One seed pair's paired test on ``n`` resamples as the row's numbers, or a note saying why there is none."""
    found, missing = [], []
    for run in (run_a, run_b):
        try:
            found.append(run_scores(name, run, n, cache))
        except Missing as err:
            missing.append(str(err))
    if missing:
        return {"note": NOTE_SEPARATOR.join(missing)}
    (a, units_a, items_a), (b, _, items_b) = found
    if items_a != items_b:
        return {"note": f"not the same test items: {_folder(run_a)} and {_folder(run_b)} hold different "
                        f"{'references' if name != NLL else 'chunks'} (compare runs on the same test set)"}
    result = stats.paired(a, b)
    return {"a_score": result.a, "b_score": result.b, "delta": result.delta, "ci_low": result.low,
            "ci_high": result.high, "p": result.p, "significant": result.significant, "units": units_a,
            "n_samples": n}


def run_scores(name: str, run: dict, n: int, cache: dict) -> tuple[stats.Scores, int, tuple]:
    """A run's scores on ``name`` and on ``n`` bootstrap resamples, its number of sentences or chunks, and what
    identifies its test items; a ``Missing`` error says why there are none."""
    key = (run["record"], name, n)
    if key not in cache:
        try:
            cache[key] = _nll_scores(run, n) if name == NLL else _translation_scores(name, run, n)
        except Missing as err:
            cache[key] = err
    if isinstance(cache[key], Missing):
        raise cache[key]
    return cache[key]


def _translation_scores(name: str, run: dict, n: int) -> tuple[stats.Scores, int, tuple]:
    hyps, refs = (_lines(_folder(run) / f"{SPLIT}.{kind}") for kind in ("hyp", "ref"))
    if len(hyps) != len(refs):
        raise Missing(f"{_folder(run)}: {SPLIT}.hyp has {len(hyps)} lines, {SPLIT}.ref {len(refs)}")
    return stats.bootstrap_scores(name, hyps, refs, n), len(refs), tuple(refs)


def _nll_scores(run: dict, n: int) -> tuple[stats.Scores, int, tuple]:
    path = _folder(run) / f"{SPLIT}.nll.json"
    try:
        data = json.loads(_read(path))
        nll, tokens = data["nll"], data["tokens"]
        if len(nll) != len(tokens) or not nll:
            raise ValueError("nll and tokens are lists of different lengths, or empty")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in nll):
            raise ValueError("an NLL is not a finite number (a diverged model)")
    except (ValueError, TypeError, KeyError) as err:
        raise Missing(f"{path}: {err}") from None
    return stats.bootstrap_nll(nll, tokens, n), len(tokens), tuple(tokens)


def _folder(run: dict) -> Path:
    return Path(run["record"]).parent


def _read(path: Path) -> str:
    if not path.is_file():
        raise Missing(f"{path.parent}: no {path.name} {ABSENT}")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise Missing(f"{path}: cannot read it ({err})") from None


def _lines(path: Path) -> list[str]:
    """The file's lines as the job wrote them: split at newlines only, the last newline ending the last line."""
    lines = _read(path).split("\n")
    return lines[:-1] if lines[-1] == "" else lines


# ---------------------------------------------------------------- the report's table

def display(pairs: pd.DataFrame, task: str) -> pd.DataFrame:
    """One task's pairs as the report shows them: one row per metric and pair of systems, every seed pair in it."""
    rows = []
    for (name, a, b), group in pairs[pairs["task"] == task].groupby(["metric", "a", "b"], sort=False):
        tested = group[group["note"].isna()]
        rows.append({"metric": label(name), "A": shorten(a, NAME_LIMIT), "B": shorten(b, NAME_LIMIT),
                     "seed pairs": len(tested),
                     "mean Δ (A − B)": number(name, tested["delta"].mean(), sign=True) if len(tested) else "–",
                     "Δ (95% CI), p per seed pair": "; ".join(_pair(name, r) for r in tested.itertuples()),
                     "significant": verdict(name, tested, a, b)})
    return pd.DataFrame(rows, columns=["metric", "A", "B", "seed pairs", "mean Δ (A − B)",
                                       "Δ (95% CI), p per seed pair", "significant"])


def notes(pairs: pd.DataFrame, task: str) -> list[str]:
    """Why seed pairs of the task were not tested: runs without outputs in one note, other reasons once each (the
    first ``NOTES``)."""
    texts = pairs.loc[(pairs["task"] == task) & pairs["note"].notna(), "note"]
    reasons = list(dict.fromkeys(r for text in texts for r in text.split(NOTE_SEPARATOR) if r))
    absent = [r for r in reasons if r.endswith(ABSENT)]
    others = [r for r in reasons if not r.endswith(ABSENT)]
    shown = [f"seed pairs not tested: {reason}" for reason in others[:NOTES]]
    if len(others) > NOTES:
        shown.append(f"... and {len(others) - NOTES} more reasons (significance.csv lists every seed pair)")
    if absent:
        folders = sorted({r.split(": no ")[0] for r in absent})
        shown.append(f"seed pairs not tested: no test outputs ({SPLIT}.hyp and {SPLIT}.ref, or {SPLIT}.nll.json) "
                     f"beside the record.json of {len(folders)} run(s); jobs of this version write them: "
                     f"{'; '.join(folders[:3])}{' ...' if len(folders) > 3 else ''}")
    return shown


def caption(pairs: pd.DataFrame, task: str) -> str:
    """What the task's significance table shows and how it was computed."""
    names = pairs.loc[pairs["task"] == task, "metric"].unique()
    lm = (" NLL is per token in nats: a negative Δ means A has the lower (better) perplexity, by a factor exp(Δ)."
          if NLL in names else "")
    return (f"Paired bootstrap on the {SPLIT} set, {resamples_shown(pairs, task):,} resamples (sacreBLEU's for BLEU, "
            f"chrF and TER; test chunks for NLL; {RESAMPLE_RULE}), seed {stats.SEED}: "
            f"Δ = A − B for each seed pair (the i-th seed of A with the i-th "
            f"of B) with its 95% interval and p-value, and the p-value adjusted by Holm's method over every seed pair "
            f"of every pair of systems in this table for that metric. 'yes' only when every seed pair has an adjusted "
            f"p < {stats.ALPHA:g} in the same direction, and never for a mean difference that rounds to zero at the "
            f"precision shown; 'no' marks a difference that is not significant, and says when a seed pair's p is the "
            f"smallest its resamples can give (resolution limits that conclusion). A system is every setting that can "
            f"change a result (the rows of the table above): seeds of one system are never paired with another's.{lm}")


def verdict(name: str, tested: pd.DataFrame, a: str, b: str) -> str:
    """``yes: <better system> better`` when every seed pair is significant with one sign, else ``no (...)``."""
    if tested.empty:
        return "– (not tested)"
    significant = tested["significant"].astype(bool)
    signs = set((tested["delta"] > 0).tolist())
    if significant.all() and len(signs) == 1 and negligible(name, tested["delta"].mean()):
        return f"no (the mean difference rounds to {number(name, 0.0)})"
    if significant.all() and len(signs) == 1:
        return f"yes: {better(name, tested['delta'].iloc[0], a, b)} better"
    said = f"no ({int(significant.sum())} of {len(tested)} seed pairs Holm-adjusted p < {stats.ALPHA:g}"
    floored = sum(not s and stats.at_floor(p, int(n))
                  for s, p, n in zip(significant, tested["p"], tested["n_samples"]))
    if floored:
        return (f"{said}; {floored} with p at the floor of {int(tested['n_samples'].iloc[0]):,} resamples: "
                f"resolution limits this conclusion)")
    return said + ")"


def better(name: str, delta: float, a: str, b: str) -> str:
    """The better of systems ``a`` and ``b`` (shortened) given ``delta`` = a - b on metric ``name`` (or NLL)."""
    higher = METRICS[name].higher_is_better if name in METRICS else False  # lower NLL is better
    return shorten(a if (delta > 0) == higher else b, NAME_LIMIT)


def resamples_shown(pairs: pd.DataFrame, task: str) -> int:
    """The resamples the task's tested rows were drawn with (one count per task: ``resamples_for``)."""
    counts = pd.to_numeric(pairs.loc[pairs["task"] == task, "n_samples"], errors="coerce").dropna()
    return int(counts.max()) if len(counts) else stats.N_SAMPLES


def negligible(name: str, delta: float) -> bool:
    """Whether ``delta`` rounds to zero at the precision the report shows it (``number``)."""
    return not math.isnan(delta) and float(number(name, delta)) == 0


def _pair(name: str, r) -> str:
    return (f"s{tables._plain(r.seed_a)}/s{tables._plain(r.seed_b)}: {number(name, r.delta, sign=True)} "
            f"(CI {number(name, r.ci_low)}, {number(name, r.ci_high)}) p={pvalue(r.p)} (Holm {pvalue(r.p_holm)})")


def pvalue(p: float) -> str:
    """A p-value as the report shows it: three decimals, or two significant digits where those read 0.000 (the
    floor of 12,000 resamples would, as if no resample could contradict the difference)."""
    return f"{p:.3f}" if round(p, 3) > 0 else f"{p:.1e}"


def label(name: str) -> str:
    return "NLL per token" if name == NLL else METRICS[name].label


def number(name: str, value: float, sign: bool = False) -> str:
    fmt = "{:+.4f}" if name == NLL else "{:+.2f}"
    return (fmt if sign else fmt.replace("+", "")).format(value)
