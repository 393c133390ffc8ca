"""Uncertainty over seeds and significance between two systems, for the report (torch-free).

- ``t_interval``: the mean of a metric over seeds with its sample standard deviation and the 95% confidence
  interval of the mean, Student's t with n - 1 degrees of freedom (scipy), which is what a handful of seeds
  allows: a normal interval would be too narrow at n = 3 (t = 4.30, not 1.96).
- ``bootstrap_scores`` / ``paired``: sacreBLEU's paired bootstrap resampling (Koehn 2004, as its ``--paired-bs``
  runs it; sacrebleu.significance): sentences are drawn with replacement ``n_samples`` times with sacreBLEU's
  seed, each system is scored on every resample, and the p-value is sacreBLEU's. Every system of one test set is
  resampled once with the same draws, so any two are paired, and a pair's difference gets its 95% interval from
  the same resamples. This is ``PairedTest(test_type="bs")`` taken apart (tests/test_stats.py checks the two
  agree): ``PairedTest`` rescores the baseline's resamples for every pair and reports each system's interval,
  not the difference's; resampling each run once makes all pairs of a 15-run sweep about ten times cheaper.
  The draws are made ``BLOCK`` resamples at a time (sacreBLEU draws them all at once: resamples x sentences x
  statistics in memory, gigabytes at 20,000 resamples of a 3,000-sentence test set); numpy's generator gives the
  same stream either way, so the resamples are sacreBLEU's.
- ``bootstrap_nll``: the same test on the per-token NLL of two language models, resampling the chunks of the
  test stream (numpy; no library has it): a resample's NLL is its summed NLL over its summed tokens.
- ``hierarchical``: two architectures rather than two trained models: seeds of each system are resampled as well
  as test items, so the spread between seeds enters the interval and the p-value.
- ``resamples``: how many resamples a family of tests needs, so that the smallest p-value a bootstrap can give
  leaves Holm's method room to reject (``floor``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE  # a difference with p below it is significant
N_SAMPLES = 1000  # bootstrap resamples, sacreBLEU's default for --paired-bs: the fewest any test gets
N_MAX = 20_000  # the most: 20,000 sacreBLEU rescorings of a run take about a second, and Holm can still reject a
# two-level p at its floor in families of up to 500 tests (1,000 for the paired test)
STEP = 1000  # resample counts are multiples of it (round numbers in the report)
MARGIN = 5  # the smallest p-value sits at most 1/MARGIN of the smallest Holm threshold (ALPHA over the family's size)
SEED = 12345  # sacreBLEU's default bootstrap seed (SACREBLEU_SEED), used for every test here
BLOCK = 100  # resamples drawn at once (memory: BLOCK x sentences x statistics, or BLOCK x chunks, values)
SACREBLEU = {"bleu": "BLEU", "chrf": "CHRF", "ter": "TER"}  # the report's metric names -> sacrebleu.metrics


@dataclass(frozen=True)
class Interval:
    """A metric over seeds: mean, sample standard deviation, the t-interval of the mean, and the number of seeds."""
    mean: float
    std: float
    low: float
    high: float
    n: int


@dataclass(frozen=True)
class Scores:
    """One system on one test set: its score and its score on each bootstrap resample (the same draws for all)."""
    score: float
    samples: np.ndarray


@dataclass(frozen=True)
class Paired:
    """Two systems compared: ``delta`` = a - b, its 95% bootstrap interval, and the paired bootstrap p-value."""
    a: float
    b: float
    delta: float
    low: float
    high: float
    p: float

    @property
    def significant(self) -> bool:
        return self.p < ALPHA


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean, sample std and the Student-t confidence interval of the mean of ``values`` (NaNs left out).

    One value has no spread: std and interval are NaN. No value: everything NaN, n = 0.
    """
    from scipy import stats

    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n == 1:
        return Interval(mean, math.nan, math.nan, math.nan, 1)
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return Interval(mean, std, mean - half, mean + half, n)


def t_band(values: Sequence[float]) -> tuple[float, float]:
    """The 95% t-interval as (low, high), for seaborn's ``errorbar``: no band (NaN) for a single seed."""
    interval = t_interval(list(values))
    return interval.low, interval.high


def bootstrap_scores(metric: str, hyps: list[str], refs: list[str], n_samples: int = N_SAMPLES) -> Scores:
    """The sacreBLEU ``metric`` (bleu, chrf, ter) of ``hyps`` and of each of sacreBLEU's resamples of its sentences.

    The resamples depend only on the number of sentences (sacreBLEU's generator, seeded with ``SEED`` whatever
    SACREBLEU_SEED says: ``none`` would unpair systems), so the scores of two systems on one test set are paired
    resample by resample. Each resample is scored from its summed sentence statistics in float32, as
    ``sacrebleu.significance._bootstrap_resample`` does, ``BLOCK`` resamples at a time.
    """
    from sacrebleu import metrics

    scorer = getattr(metrics, SACREBLEU[metric])()
    stats = scorer._extract_corpus_statistics(hyps, [refs])
    table = np.array(stats, dtype="float32")
    rng, samples = np.random.default_rng(SEED), []
    for start in range(0, n_samples, BLOCK):
        idx = rng.choice(len(table), size=(min(BLOCK, n_samples - start), len(table)), replace=True)
        samples += [scorer._compute_score_from_stats(row).score for row in table[idx].sum(1)]
    return Scores(scorer._aggregate_and_compute(stats).score, np.array(samples))


def paired(a: Scores, b: Scores) -> Paired:
    """Compare two systems resampled on the same draws: a - b, its 95% interval, and the p-value.

    The p-value is sacreBLEU's paired bootstrap test (``_paired_bs_test``): the share of resampled absolute
    differences, centred on their mean, above the observed absolute difference ((count + 1) / (resamples + 1)).
    Where no resample differs at all (identical outputs), the difference is exactly 0 and p is 1; sacreBLEU's
    strict comparison would give 1 / (resamples + 1) there, calling two copies of one system different.
    """
    from sacrebleu import significance

    deltas = a.samples - b.samples
    observed = a.score - b.score
    low, high = np.percentile(deltas, [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)])
    if observed == 0 and not deltas.any():
        p = 1.0
    else:
        spread = np.abs(deltas)
        p = float(significance._compute_p_value(spread - spread.mean(), abs(observed)))
    return Paired(a.score, b.score, observed, float(low), float(high), p)


def bootstrap_nll(nll: Sequence[float], tokens: Sequence[int], n_samples: int = N_SAMPLES,
                  seed: int = SEED) -> Scores:
    """The per-token NLL of one model's chunks (summed NLL and token count per chunk) and of each resample of them.

    Chunks are drawn with replacement by ``default_rng(seed)``, ``BLOCK`` resamples at a time (a long character
    stream has tens of thousands of chunks), so the draws depend only on the number of chunks: two models on the
    same chunks are paired.
    """
    nll, tokens = np.asarray(nll, dtype=float), np.asarray(tokens, dtype=float)
    rng, samples = np.random.default_rng(seed), []
    for start in range(0, n_samples, BLOCK):
        idx = rng.choice(len(tokens), size=(min(BLOCK, n_samples - start), len(tokens)), replace=True)
        samples.append(nll[idx].sum(1) / tokens[idx].sum(1))
    return Scores(float(nll.sum() / tokens.sum()), np.concatenate(samples))


def hierarchical(a: Sequence[Scores], b: Sequence[Scores], seed: int = SEED) -> Paired:
    """Two systems as architectures: each given by its seeds' ``Scores``, all resampled on the same test-item draws.

    The two-level bootstrap: for each test-item resample r, the seeds of ``a`` and of ``b`` are drawn with
    replacement, independently (``default_rng(seed)``), and the resample's difference is the mean of the drawn
    seeds of ``a`` on r minus that of ``b``. The spread of these differences holds both the test set's noise and
    the seed-to-seed variance, so a difference one lucky seed makes does not pass for the architecture's. ``delta``
    is the mean over seeds of ``a`` minus that of ``b`` on the full test set, ``low``/``high`` the 2.5th and 97.5th
    percentiles of the resampled differences, and ``p`` the two-sided percentile-bootstrap p-value: twice the share
    of resampled differences on the other side of zero from ``delta`` (zero counted against it), as
    min(1, 2 (count + 1) / (resamples + 1)), so never 0 and below ``ALPHA`` exactly when the 95% interval leaves
    zero out; a ``delta`` of exactly 0 has p = 1. With one seed a system's draws always repeat it: the seed
    variance is then unknown, not zero, and the result describes that trained model only. With k seeds the
    bootstrap's variance of a mean is (k - 1) / k of the usual estimate: at 2 or 3 seeds the interval is narrow.
    """
    if not a or not b:
        raise ValueError("hierarchical: each system needs the scores of at least one seed")
    full_a, full_b = (np.array([s.score for s in side]) for side in (a, b))
    drawn_a, drawn_b = (np.stack([s.samples for s in side], axis=1) for side in (a, b))  # resamples x seeds
    if len(drawn_a) != len(drawn_b) or len({len(s.samples) for s in (*a, *b)}) != 1:
        raise ValueError("hierarchical: the seeds were resampled a different number of times; resample every run "
                         "of one test set with the same n_samples")
    n = len(drawn_a)
    rng, rows = np.random.default_rng(seed), np.arange(n)[:, None]
    pick_a, pick_b = rng.integers(len(a), size=(n, len(a))), rng.integers(len(b), size=(n, len(b)))
    deltas = drawn_a[rows, pick_a].mean(1) - drawn_b[rows, pick_b].mean(1)
    observed = float(full_a.mean() - full_b.mean())
    low, high = np.percentile(deltas, [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)])
    if observed == 0:
        p = 1.0
    else:
        against = int(np.sum(np.sign(observed) * deltas <= 0))
        p = min(1.0, 2 * (against + 1) / (n + 1))
    return Paired(float(full_a.mean()), float(full_b.mean()), observed, float(low), float(high), p)


def floor(n_samples: int, two_level: bool = False) -> float:
    """The smallest p-value ``n_samples`` resamples can give: 1 / (n + 1) for ``paired``, 2 / (n + 1) for the
    two-sided ``hierarchical`` test."""
    return (2 if two_level else 1) / (n_samples + 1)


def at_floor(p: float, n_samples: int, two_level: bool = False) -> bool:
    """Whether ``p`` is the smallest value its test could give: the data might support a smaller one."""
    return not math.isnan(p) and p <= floor(n_samples, two_level) * (1 + 1e-9)


def resamples(tests: int) -> int:
    """The resamples for a family of ``tests`` p-values, Holm-adjusted together.

    Holm's method rejects nothing unless the smallest p-value is below ``ALPHA / tests``, and a bootstrap's p-value
    is never below its floor (1,000 resamples: 1/1001 for sacreBLEU's test, 2/1001 for the two-level one, so over
    51 tests or more, 26 for the two-level test, no difference could ever be called significant). The rule: the
    smallest multiple of ``STEP`` resamples, at least ``N_SAMPLES``, whose two-level floor 2 / (n + 1) is at most
    ``ALPHA / (MARGIN x tests)``, and at most ``N_MAX`` (families of over 100 tests get less margin; the report
    flags every p-value at its floor that Holm did not reject). 60 tests get 12,000 resamples; up to 5 tests keep
    sacreBLEU's 1,000.
    """
    if tests < 1:
        raise ValueError(f"resamples: tests={tests}; a family holds at least one test")
    needed = math.ceil(2 * MARGIN * tests / ALPHA) - 1  # 2 / (n + 1) <= ALPHA / (MARGIN tests)
    return min(N_MAX, max(N_SAMPLES, math.ceil(needed / STEP) * STEP))
