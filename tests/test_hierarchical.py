"""Architectures compared with seeds and test items resampled (reports/hierarchical.py): a real difference between
architectures is found, one that seed noise makes is not, the resamples grow with the family so Holm can reject,
a difference that rounds to zero is never significant, and a single seed draws no architecture-level conclusion."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.multitest import multipletests

from seqbench import reports
from seqbench.reports import hierarchical, significance, stats
from tests.test_reports import record

CHUNKS, TOKENS = 1000, 64  # a large test stream: 64,000 tokens


def lm_runs(root: Path, levels: dict[str, list[float]]) -> pd.DataFrame:
    """The runs table of language models on one test stream: ``levels`` maps a model to its seeds' NLL per token.

    Every chunk has a difficulty all models share (as real test text does) and each run its own small per-chunk
    noise, so two runs differ by about the difference of their levels, measured very precisely on 1,000 chunks."""
    rng = np.random.default_rng(0)
    difficulty = rng.normal(0.0, 1.0, CHUNKS)
    for model, per_seed in levels.items():
        for seed, level in enumerate(per_seed, start=1):
            per_token = level + difficulty + rng.normal(0.0, 0.2, CHUNKS)
            rec = record(model, "wikitext2", seed, scores=(math.exp(float(per_token.mean())),))
            folder = root / rec["job"]["name"]
            folder.mkdir(parents=True)
            (folder / "record.json").write_text(json.dumps(rec), encoding="utf-8")
            (folder / "test.nll.json").write_text(json.dumps({"nll": (TOKENS * per_token).tolist(),
                                                              "tokens": [TOKENS] * CHUNKS}), encoding="utf-8")
    return reports.load([root]).runs


def family(p: float, n: int, m: int, delta: float = 1.0, seeds: int = 3) -> pd.DataFrame:
    """``m`` tested pairs of systems of one task and metric (BLEU), each with ``p`` from ``n`` resamples."""
    rows = [{"task": "t", "metric": "bleu", "a": f"A{k}", "b": f"B{k}", "n_seeds_a": seeds, "n_seeds_b": seeds,
             "delta": delta, "p": p, "n_samples": n} for k in range(m)]
    return pd.DataFrame(rows, columns=hierarchical.COLUMNS)


# ---------------------------------------------------------------- (a) and (b): architectures, not trained models

def test_a_real_difference_between_architectures_is_found(tmp_path):
    """The transformer is better than the LSTM in every seed by 0.6 nats per token, more than either's seed spread
    (0.1): every resample of seeds and chunks agrees, so p is the floor 2/1001 and Holm (one test) keeps it."""
    runs = lm_runs(tmp_path, {"transformer": [3.0, 3.1, 3.05], "lstm": [3.6, 3.7, 3.65]})
    (row,) = hierarchical.architectures(runs).itertuples()
    assert (row.a, row.b, row.n_seeds_a, row.n_seeds_b, row.seeds_a) == ("transformer-tiny", "lstm-tiny", 3, 3,
                                                                         "1, 2, 3")
    assert row.delta == pytest.approx(-0.6, abs=0.02) and row.ci_low <= row.delta <= row.ci_high < 0
    assert row.p == pytest.approx(stats.floor(1000, two_level=True)) and row.p_holm < stats.ALPHA
    assert row.significant and row.verdict == "yes: transformer-tiny better" and pd.isna(row.note)


def test_a_difference_seed_noise_makes_is_not_found_though_every_seed_pair_differs(tmp_path):
    """Both architectures' four seeds drawn from one distribution, N(4, 0.3²) nats per token (rounded draws of
    default_rng(7)): each seed pair differs by 0.1 nats or more, which 1,000 chunks measure precisely, so the
    per-seed-pair test calls every pair significant; the means differ by 0.06, well inside the seed spread, and the
    two-level test does not call the architectures different."""
    levels = {"transformer": [4.00, 4.09, 3.92, 3.73], "lstm": [3.86, 3.70, 4.02, 4.40]}
    runs = lm_runs(tmp_path, levels)
    detail = significance.pairwise(runs)
    assert len(detail) == 4 and detail["significant"].astype(bool).all()
    assert (detail["p_holm"] < stats.ALPHA).all()
    (row,) = hierarchical.architectures(runs).itertuples()
    assert row.delta == pytest.approx(np.mean(levels["transformer"]) - np.mean(levels["lstm"]), abs=0.02)
    assert row.ci_low < 0 < row.ci_high and row.p > 0.2 and row.p_holm >= stats.ALPHA
    assert not row.significant and row.verdict == f"no (Holm-adjusted p ≥ {stats.ALPHA:g})"


def test_one_seed_each_resamples_test_items_only_as_the_paired_test_does():
    """With a single seed per system the seed draws always repeat it: the two-level interval is the paired
    bootstrap's own."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(50, 100, 300)
    a, b = (stats.bootstrap_nll(rng.gamma(2.0, 2.5, 300) * tokens, tokens) for _ in range(2))
    two_level, paired = stats.hierarchical([a], [b]), stats.paired(a, b)
    assert (two_level.delta, two_level.low, two_level.high) == (paired.delta, paired.low, paired.high)


# ---------------------------------------------------------------- (c) resolution: the resamples grow with the family

def test_sixty_tests_get_enough_resamples_for_holm_to_reject_and_1000_could_not():
    n = stats.resamples(60)
    assert n == 12_000 and stats.floor(n, two_level=True) <= stats.ALPHA / (stats.MARGIN * 60)
    rejected = lambda p: multipletests([p] * 60, alpha=stats.ALPHA, method="holm")[0]  # noqa: E731
    assert rejected(stats.floor(n, two_level=True)).all()
    assert not rejected(stats.floor(1000, two_level=True)).any()  # 60 x 2/1001 = 0.12
    assert not rejected(stats.floor(1000)).any()  # even the paired test's 1/1001: 60/1001 = 0.06
    # the rule's ends: small families keep sacreBLEU's 1,000, huge ones stop at the cap
    assert [stats.resamples(m) for m in (1, 5, 6, 51, 100, 10_000)] == [1000, 1000, 2000, 11_000, 20_000, 20_000]
    with pytest.raises(ValueError, match="tests=0"):
        stats.resamples(0)


def test_a_clear_difference_in_a_family_of_sixty_is_rejected_at_the_chosen_resamples_only():
    """Three seeds each, A better by 1 point in every seed and resample: p is the floor of its resamples. In a
    family of 60 such tests Holm rejects at 12,000 resamples; at 1,000 it cannot, and the verdict says so."""
    def seeds(level: float, n: int) -> list[stats.Scores]:
        return [stats.Scores(level + s, np.full(n, level + s)) for s in (0.0, 0.1, 0.2)]
    for n, found in ((stats.resamples(60), True), (1000, False)):
        result = stats.hierarchical(seeds(31.0, n), seeds(30.0, n))
        assert result.delta == pytest.approx(1.0) and result.p == pytest.approx(stats.floor(n, two_level=True))
        tested = hierarchical.holm(family(result.p, n, 60))
        assert tested["significant"].tolist() == [found] * 60
        expected = ("yes: A0 better" if found else f"no (Holm-adjusted p ≥ {stats.ALPHA:g}, p at the floor of "
                                                   f"{n:,} resamples: resolution limits this conclusion)")
        assert tested["verdict"].iloc[0] == expected


def test_the_seed_pair_table_says_when_resolution_limits_it():
    tested = pd.DataFrame({"delta": [1.0, 1.0], "significant": [False, False], "p": [1 / 1001, 1 / 1001],
                           "n_samples": [1000, 1000]})
    assert significance.verdict("bleu", tested, "A", "B") == (
        "no (0 of 2 seed pairs Holm-adjusted p < 0.05; 2 with p at the floor of 1,000 resamples: resolution limits "
        "this conclusion)")
    assert significance.verdict("bleu", tested.assign(p=[0.3, 0.4]), "A", "B") == (
        "no (0 of 2 seed pairs Holm-adjusted p < 0.05)")


def test_the_resamples_of_a_task_come_from_its_largest_family():
    """Five systems of three seeds: 10 pairs x 3 seed pairs = 30 tests in the seed-pair family (the two-level family
    has 10), so every run of the task is resampled 6,000 times; a lone system is a family of one."""
    found = {f"s{k}": [{}] * 3 for k in range(5)}
    assert significance.resamples_for(found) == stats.resamples(30) == 6000
    assert significance.resamples_for({"only": [{}] * 3}) == 1000


# ---------------------------------------------------------------- (d) a difference that reads +0.00

def test_a_difference_that_rounds_to_zero_is_never_significant():
    tested = hierarchical.holm(pd.concat([family(1e-4, 20_000, 1, delta=0.0024),
                                          family(1e-4, 20_000, 1, delta=0.5).assign(a="C", b="D")],
                                         ignore_index=True))
    assert tested["p_holm"].tolist() == pytest.approx([2e-4, 2e-4])
    assert tested["significant"].tolist() == [False, True]
    assert tested["verdict"].tolist() == ["no (the difference rounds to 0.00)", "yes: C better"]
    nll = hierarchical.holm(family(1e-4, 20_000, 1, delta=-0.00004).assign(metric="nll"))
    assert not nll["significant"].iloc[0] and nll["verdict"].iloc[0] == "no (the difference rounds to 0.0000)"


# ---------------------------------------------------------------- (e) a single seed

def test_a_single_seed_system_gets_the_note_and_no_architecture_level_verdict(tmp_path):
    """The transformer ran once, the LSTM three times, far apart: the test runs (its p is the floor, Holm keeps it)
    but the seed variance of the transformer is unknown, so no architecture is called better."""
    runs = lm_runs(tmp_path, {"transformer": [3.0], "lstm": [3.6, 3.7, 3.65]})
    (row,) = hierarchical.architectures(runs).itertuples()
    assert (row.n_seeds_a, row.n_seeds_b) == (1, 3) and row.delta == pytest.approx(-0.65, abs=0.02)
    assert row.p_holm < stats.ALPHA and not row.significant
    assert row.verdict == "– (no conclusion about architectures: a system has one seed)"
    assert row.note == ("seed variance could not be estimated (A has one seed with test outputs): this compares "
                        "trained models, not architectures")
    shown = hierarchical.display(hierarchical.architectures(runs), "wikitext2")
    assert shown[["seeds (A / B)", "architecture-level verdict"]].values.tolist() == [
        ["1 / 3", "– (no conclusion about architectures: a system has one seed)"]]


def test_runs_without_outputs_are_left_out_and_a_system_without_any_is_not_tested(tmp_path):
    runs = lm_runs(tmp_path, {"transformer": [3.0, 3.1, 3.05], "lstm": [3.6, 3.7, 3.65], "gru": [3.3]})
    (tmp_path / "lstm-tiny_wikitext2_s3" / "test.nll.json").unlink()
    (tmp_path / "gru-tiny_wikitext2_s1" / "test.nll.json").unlink()
    got = hierarchical.architectures(runs).set_index(["a", "b"])
    kept = got.loc[("transformer-tiny", "lstm-tiny")]
    assert (kept["n_seeds_a"], kept["n_seeds_b"], kept["seeds_b"]) == (3, 2, "1, 2")
    assert kept["note"].startswith("1 run(s) without usable test outputs left out") and kept["significant"]
    untested = got.loc[("transformer-tiny", "gru-tiny")]
    assert pd.isna(untested["p"]) and untested["verdict"] == "– (not tested)"
    assert untested["note"].startswith("not tested: no run of B has usable test outputs")
