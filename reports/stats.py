"""Uncertainty over seeds and significance between two systems, for the report (torch-free).

- ``t_interval``: the mean of a metric over seeds with its sample standard deviation and the 95% confidence
  interval of the mean, Student's t with n - 1 degrees of freedom (scipy), which is what a handful of seeds
  allows: a normal interval would be too narrow at n = 3 (t = 4.30, not 1.96).
- ``bootstrap_scores`` / ``paired``: sacreBLEU's paired bootstrap resampling (Koehn 2004, as its ``--paired-bs``
  runs it; sacrebleu.significance): sentences are drawn with replacement ``N_SAMPLES`` times with sacreBLEU's
  seed, each system is scored on every resample, and the p-value is sacreBLEU's. Every system of one test set is
  resampled once with the same draws, so any two are paired, and a pair's difference gets its 95% interval from
  the same resamples. This is ``PairedTest(test_type="bs")`` taken apart (tests/test_stats.py checks the two
  agree): ``PairedTest`` rescores the baseline's resamples for every pair and reports each system's interval,
  not the difference's; resampling each run once makes all pairs of a 15-run sweep about ten times cheaper.
- ``bootstrap_nll``: the same test on the per-token NLL of two language models, resampling the chunks of the
  test stream (numpy; no library has it): a resample's NLL is its summed NLL over its summed tokens.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import numpy as np

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE  # a difference with p below it is significant
N_SAMPLES = 1000  # bootstrap resamples, sacreBLEU's default for --paired-bs
SEED = 12345  # sacreBLEU's default bootstrap seed (SACREBLEU_SEED), used for every test here
BLOCK = 100  # NLL resamples drawn at once (memory: BLOCK x chunks indices)
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

    The resamples depend only on the number of sentences (sacreBLEU's generator, seeded with ``SEED``), so the
    scores of two systems on one test set are paired resample by resample.
    """
    from sacrebleu import metrics, significance

    scorer = getattr(metrics, SACREBLEU[metric])()
    stats = scorer._extract_corpus_statistics(hyps, [refs])
    with _sacrebleu_seed():
        _, samples = significance._bootstrap_resample(stats, scorer, n_samples)
    return Scores(scorer._aggregate_and_compute(stats).score, np.array([s.score for s in samples]))


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


@contextmanager
def _sacrebleu_seed():
    """sacreBLEU's resampling seeded with ``SEED``, whatever SACREBLEU_SEED says (``none`` would unpair systems)."""
    before = os.environ.get("SACREBLEU_SEED")
    os.environ["SACREBLEU_SEED"] = str(SEED)
    try:
        yield
    finally:
        if before is None:
            del os.environ["SACREBLEU_SEED"]
        else:
            os.environ["SACREBLEU_SEED"] = before
