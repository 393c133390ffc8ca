"""Uncertainty and significance: the t-interval over seeds, the paired bootstraps (sacreBLEU's for BLEU and chrF, the
chunk bootstrap of the NLL), the outputs jobs leave for them, and the report's pairwise significance table."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.significance import PairedTest

from seqbench import models
from seqbench import reports
from seqbench import tasks
from seqbench.harness import job
from seqbench.harness.evaluate import chunk_nll, evaluate_lm
from seqbench.reports import significance, stats
from tests.test_models import preset
from tests.test_reports import record

T_2, T_1 = 4.303, 12.706  # Student's t, 97.5th percentile, 2 and 1 degrees of freedom (a printed t table)
ONE_IN = 1 / (stats.N_SAMPLES + 1)  # the smallest p-value of 1,000 resamples: (0 + 1) / (1000 + 1)
REFS = [f"a small {colour} dog runs across the {place}" for colour in ("brown", "black", "white", "grey", "red")
        for place in ("grass", "beach", "road", "park")]
UNRELATED = ["xq vz jf" for _ in REFS]  # no letter in common with any reference: BLEU = chrF = 0


# ---------------------------------------------------------------- the t-interval over seeds

def test_t_interval_matches_a_t_table():
    three = stats.t_interval([20.0, 22.0, 24.0])  # mean 22, s = 2
    assert (three.mean, three.std, three.n) == (22.0, pytest.approx(2.0), 3)
    assert three.low == pytest.approx(22 - T_2 * 2 / math.sqrt(3), abs=2e-3) == pytest.approx(17.032, abs=2e-3)
    assert three.high == pytest.approx(22 + T_2 * 2 / math.sqrt(3), abs=2e-3)
    two = stats.t_interval([100.0, 110.0, float("nan")])  # NaN left out: n = 2, s = 7.071
    assert two.n == 2 and (two.low, two.high) == (pytest.approx(105 - T_1 * 5, abs=5e-3),
                                                  pytest.approx(105 + T_1 * 5, abs=5e-3))
    one = stats.t_interval([30.0])
    assert (one.mean, one.n) == (30.0, 1) and all(math.isnan(v) for v in (one.std, one.low, one.high))
    assert stats.t_interval([]).n == 0
    assert stats.t_band([20.0, 22.0, 24.0]) == (three.low, three.high) and all(map(math.isnan, stats.t_band([1.0])))


# ---------------------------------------------------------------- sacreBLEU's paired bootstrap

@pytest.mark.parametrize("metric", ["bleu", "chrf"])
def test_a_perfect_against_an_unrelated_system_differs_by_100_in_every_resample(metric):
    """Every resample of the references scores 100 for the copy of them and 0 for the unrelated output: the
    difference is 100 with a 95% interval of (100, 100), and no resampled difference exceeds it: p = 1/1001."""
    perfect, unrelated = (stats.bootstrap_scores(metric, hyps, REFS) for hyps in (REFS, UNRELATED))
    assert (perfect.score, unrelated.score, len(perfect.samples)) == (pytest.approx(100), 0, stats.N_SAMPLES)
    result = stats.paired(perfect, unrelated)
    assert (result.delta, result.low, result.high) == (pytest.approx(100),) * 3
    assert result.p == pytest.approx(ONE_IN) and result.significant
    backwards = stats.paired(unrelated, perfect)
    assert backwards.delta == pytest.approx(-100) and backwards.significant


def drop_words(refs: list[str], every: int) -> list[str]:
    """The references with every ``every``-th word left out: a worse system, deterministically."""
    return [" ".join(w for i, w in enumerate(r.split()) if i % every) for r in refs]


@pytest.mark.parametrize("metric", ["bleu", "chrf"])
def test_identical_systems_have_p_1_and_a_clearly_better_one_p_below_005(metric, data_root):
    refs = (data_root / "multi30k" / "test_2016_flickr.de").read_text(encoding="utf-8").splitlines()[:300]
    good, bad = drop_words(refs, 9), drop_words(refs, 3)  # the first of every nine words left out, or of three
    scored = {name: stats.bootstrap_scores(metric, hyps, refs) for name, hyps in (("good", good), ("bad", bad))}
    same = stats.paired(scored["good"], stats.bootstrap_scores(metric, list(good), refs))
    assert (same.delta, same.low, same.high, same.p, same.significant) == (0, 0, 0, 1.0, False)
    better = stats.paired(scored["good"], scored["bad"])
    assert better.delta > 5 and 0 < better.low < better.delta < better.high and better.p < 0.05 and better.significant
    # the same p-value, scores and resamples as sacreBLEU's own PairedTest (the bad system against the good)
    scorer = {"bleu": BLEU, "chrf": CHRF}[metric]()
    _, table = PairedTest([("good", good), ("bad", bad)], {metric: scorer}, [refs], test_type="bs",
                          n_samples=stats.N_SAMPLES)()
    base, system = next(v for k, v in table.items() if k != "System")
    assert (base.score, system.score) == (pytest.approx(better.a), pytest.approx(better.b))
    assert system.p_value == pytest.approx(better.p)
    assert system.mean == pytest.approx(scored["bad"].samples.mean(), rel=1e-5)


def test_equally_good_systems_with_different_errors_are_not_significant(data_root):
    """One system drops the first word of the first half of the sentences, the other of the second: as good, not
    alike."""
    refs = (data_root / "multi30k" / "test_2016_flickr.de").read_text(encoding="utf-8").splitlines()[:300]
    half = len(refs) // 2
    a = [" ".join(r.split()[1:]) if i < half else r for i, r in enumerate(refs)]
    b = [r if i < half else " ".join(r.split()[1:]) for i, r in enumerate(refs)]
    result = stats.paired(*(stats.bootstrap_scores("bleu", hyps, refs) for hyps in (a, b)))
    assert abs(result.delta) < 1 and result.low < 0 < result.high and result.p > 0.05 and not result.significant


@pytest.mark.parametrize("metric", ["bleu", "chrf", "ter"])
def test_resamples_drawn_in_blocks_are_sacrebleus_own(metric, monkeypatch, data_root):
    """250 resamples, two full blocks and a part of one: the same draws and scores as sacreBLEU drawing them all at
    once (a different number of resamples than PairedTest's default, which the test above checks)."""
    from sacrebleu import metrics, significance as sacrebleu_significance

    monkeypatch.setenv("SACREBLEU_SEED", str(stats.SEED))
    refs = (data_root / "multi30k" / "test_2016_flickr.de").read_text(encoding="utf-8").splitlines()[:100]
    hyps = drop_words(refs, 3)
    scorer = getattr(metrics, stats.SACREBLEU[metric])()
    _, theirs = sacrebleu_significance._bootstrap_resample(scorer._extract_corpus_statistics(hyps, [refs]), scorer,
                                                           250)
    ours = stats.bootstrap_scores(metric, hyps, refs, n_samples=250)
    assert 250 % stats.BLOCK and len(ours.samples) == 250
    assert ours.samples.tolist() == [score.score for score in theirs] and ours.samples.std() > 0


def test_the_seed_is_fixed_whatever_sacrebleu_seed_says(monkeypatch):
    monkeypatch.setenv("SACREBLEU_SEED", "None")  # sacreBLEU would draw other resamples for each system
    refs = [f"{r} {k}" for k, r in enumerate(REFS)]
    a, b = (stats.bootstrap_scores("bleu", drop_words(refs, 4), refs) for _ in range(2))
    assert np.array_equal(a.samples, b.samples)
    assert os.environ["SACREBLEU_SEED"] == "None"  # and the user's setting is back


# ---------------------------------------------------------------- the NLL bootstrap over chunks

def test_nll_bootstrap_resamples_chunks_and_pools_their_tokens():
    """Two chunks of 1 and 3 tokens, NLL differences 2 and 0: a resample of chunks {1, 1} differs by 4/2 = 2 nats
    per token, {1, 2} by 2/4 = 0.5, {2, 2} by 0/6 = 0, with chances 1/4, 1/2, 1/4; the observed difference is 0.5
    (pooled tokens, not the mean of the chunks' 2 and 0)."""
    tokens = [1, 3]
    a, b = stats.bootstrap_nll([2.0, 3.0], tokens), stats.bootstrap_nll([0.0, 3.0], tokens)
    assert (a.score, b.score) == (5 / 4, 3 / 4)
    result = stats.paired(a, b)
    deltas = a.samples - b.samples
    assert set(np.round(deltas, 12)) == {0.0, 0.5, 2.0}
    assert [np.mean(np.isclose(deltas, d)) for d in (0.0, 0.5, 2.0)] == pytest.approx([0.25, 0.5, 0.25], abs=0.05)
    assert (result.delta, result.low, result.high) == (0.5, 0.0, 2.0)
    assert not result.significant  # |0.5| never exceeded by more than the resamples' mean: p is large
    # a constant difference of 0.5 nats per token in every chunk: every resample differs by exactly 0.5
    counts = [5, 7, 11, 13]
    worse, better = (stats.bootstrap_nll([n * x for n in counts], counts) for x in (2.5, 2.0))
    steady = stats.paired(better, worse)
    assert (steady.delta, steady.low, steady.high) == (pytest.approx(-0.5),) * 3
    assert steady.p == pytest.approx(ONE_IN) and steady.significant


def test_nll_bootstrap_identical_models_p_1_and_a_clearly_better_one_below_005():
    rng = np.random.default_rng(0)
    tokens = rng.integers(50, 129, size=200)
    base = rng.gamma(2.0, 2.5, size=200) * tokens  # per-chunk NLL sums, about 5 nats per token
    same = stats.paired(stats.bootstrap_nll(base, tokens), stats.bootstrap_nll(base.copy(), tokens))
    assert (same.delta, same.p, same.significant) == (0, 1.0, False)
    better = stats.paired(stats.bootstrap_nll(base * 0.9, tokens), stats.bootstrap_nll(base, tokens))
    assert better.delta < 0 and better.low <= better.delta <= better.high < 0 and better.p < 0.05


def test_chunk_nll_is_the_nll_of_each_window_of_the_stream(data_root):
    """The per-chunk sums a language-model job saves are the NLL of each bptt window, in stream order, whatever the
    batch size; their total over their tokens is the recorded NLL."""
    task = tasks.build({"name": "ptb", "bptt": 40}, {"root": data_root, "download": False})
    task.streams["test"] = task.streams["test"][:1001]  # 25 windows of 40 tokens
    torch.manual_seed(0)
    model = models.build(preset("transformer_tiny"), task).eval()
    sums, counts = chunk_nll(model, task, "test", torch.device("cpu"), max_tokens=280)  # batches of 7 chunks
    stream = torch.from_numpy(task.streams["test"])
    expected = []
    with torch.no_grad():
        for s in range(0, 1000, 40):
            x, y = stream[s : s + 40], stream[s + 1 : s + 41]
            expected.append(-F.log_softmax(model(x[None])[0].double(), -1)[torch.arange(40), y].sum().item())
    assert counts == [40] * 25 and sums == pytest.approx(expected, rel=1e-5)
    got = evaluate_lm(model, task, "test", torch.device("cpu"), max_tokens=400)
    assert got["nll"] == pytest.approx(sum(expected) / 1000, rel=1e-6) and got["tokens"] == 1000


# ---------------------------------------------------------------- the report's pairwise table

def with_outputs(root, rec, outputs: dict) -> None:
    folder = root / rec["job"]["name"]
    folder.mkdir(parents=True)
    (folder / "record.json").write_text(json.dumps(rec), encoding="utf-8")
    for name, content in outputs.items():
        (folder / name).write_text(json.dumps(content) if name.endswith(".json") else "\n".join(content) + "\n",
                                   encoding="utf-8")


@pytest.fixture(scope="module")
def paired_report(tmp_path_factory):
    """multi30k: gru and transformer copy the references (BLEU 100), lstm writes unrelated text (BLEU 0), two seeds
    each, and a bytenet run without outputs; wikitext2: two LMs whose chunk NLLs differ by 1 nat per token."""
    root = tmp_path_factory.mktemp("paired")
    for model, hyps, bleu in (("gru", REFS, 100.0), ("transformer", REFS, 100.0), ("lstm", UNRELATED, 0.0)):
        for seed in (1, 2):
            with_outputs(root, record(model, "multi30k", seed, scores=(bleu, bleu)),
                         {"test.hyp": hyps, "test.ref": REFS})
    with_outputs(root, record("bytenet", "multi30k", 1, scores=(50.0, 50.0)), {})
    tokens = [128] * 30 + [17]
    for model, per_token in (("transformer", 4.0), ("lstm", 5.0)):
        with_outputs(root, record(model, "wikitext2", 1, scores=(math.exp(per_token),)),
                     {"test.nll.json": {"nll": [per_token * n for n in tokens], "tokens": tokens}})
    out = tmp_path_factory.mktemp("paired_report")
    reports.build([root], out)
    return root, out


def test_significance_table_holds_the_hand_computed_differences(paired_report):
    _, out = paired_report
    pairs = pd.read_csv(out / "significance.csv")
    tested = pairs[pairs["note"].isna()]
    key = lambda r: (r["task"], r["metric"], r["a"], r["b"], r["seed_a"], r["seed_b"])
    got = {key(r): (r["delta"], r["ci_low"], r["ci_high"], r["p"], r["p_holm"], r["significant"])
           for _, r in tested.iterrows()}
    # multi30k's family: 3 pairs of two-seed systems x 2 seed pairs + 3 pairs with one-seed bytenet = 9 tests, which
    # get 2,000 resamples (stats.resamples); wikitext2's single test keeps 1,000
    assert stats.resamples(9) == 2000
    one_in = 1 / 2001
    expected = {}
    for metric in ("bleu", "chrf"):
        for seed in (1, 2):
            # systems best first by mean BLEU (gru and transformer tie, in name order), so A is never the worse.
            # Holm over the metric's 6 tests: the four p = 1/2001 get 6/2001 (6, 5, 4, 3 times it, made monotone),
            # the two p = 1 stay 1 (capped)
            expected[("multi30k", metric, "gru-tiny", "transformer-tiny", seed, seed)] = (0, 0, 0, 1.0, 1.0, False)
            for a in ("gru-tiny", "transformer-tiny"):
                expected[("multi30k", metric, a, "lstm-tiny", seed, seed)] = (*[pytest.approx(100)] * 3,
                                                                            pytest.approx(one_in),
                                                                            pytest.approx(6 * one_in), True)
    expected[("wikitext2", "nll", "transformer-tiny", "lstm-tiny", 1, 1)] = (-1, -1, -1, pytest.approx(ONE_IN),
                                                                             pytest.approx(ONE_IN), True)
    assert got == expected
    assert set(tested["units"]) == {len(REFS), 31}
    assert dict(zip(tested["task"], tested["n_samples"])) == {"multi30k": 2000, "wikitext2": 1000}
    # bytenet (BLEU 50, second best) has no outputs: its pairs are listed with why, not tested
    untested = pairs[pairs["note"].notna()]
    assert len(untested) == 2 * 3 and ((untested["a"] == "bytenet-tiny") | (untested["b"] == "bytenet-tiny")).all()
    assert untested["note"].str.contains("bytenet-tiny_multi30k_s1: no test.hyp (jobs of this version write it",
                                         regex=False).all()


def test_the_report_marks_differences_that_are_not_significant(paired_report):
    _, out = paired_report
    md = (out / "report.md").read_text()
    section = md.split("### Task multi30k")[1].split("### Task")[0]
    assert ("| BLEU | gru-tiny | transformer-tiny | 2 | +0.00 | s1/s1: +0.00 (CI 0.00, 0.00) p=1.000 (Holm 1.000); "
            "s2/s2: +0.00 (CI 0.00, 0.00) p=1.000 (Holm 1.000) | "
            "no (0 of 2 seed pairs Holm-adjusted p &lt; 0.05) |") in section
    assert ("| chrF | gru-tiny | lstm-tiny | 2 | +100.00 | s1/s1: +100.00 (CI 100.00, 100.00) p=5.0e-04 (Holm 0.003); "
            "s2/s2: +100.00 (CI 100.00, 100.00) p=5.0e-04 (Holm 0.003) | yes: gru-tiny better |") in section
    assert "Paired bootstrap on the test set, 2,000 resamples" in section
    assert ("seed pairs not tested: no test outputs (test.hyp and test.ref, or test.nll.json) beside the "
            "record.json of 1 run(s); jobs of this version write them: ") in section
    assert "bytenet-tiny_multi30k_s1" in section
    lm = md.split("### Task wikitext2")[1].split("## ")[0]
    assert ("| NLL per token | transformer-tiny | lstm-tiny | 1 | -1.0000 | s1/s1: -1.0000 (CI -1.0000, -1.0000) "
            "p=0.001 (Holm 0.001) | yes: transformer-tiny better |") in lm
    assert "a negative Δ means A has the lower (better) perplexity" in lm


def test_the_report_compares_architectures_before_the_seed_pairs(paired_report):
    """Above each task's seed-pair table: the two-level test, one row per pair of systems. gru and lstm have two
    seeds each and differ by 100 in every resample: p = 2/2001, Holm over the 3 tested pairs of multi30k's 6. The
    language models ran one seed each: tested, but no conclusion about architectures."""
    _, out = paired_report
    md = (out / "report.md").read_text()
    section = md.split("### Task multi30k")[1].split("### Task")[0]
    assert section.index("*Architectures compared (seeds and test items resampled): a two-level bootstrap, 2,000 "
                         "resamples") < section.index("*Paired bootstrap on the test set")
    assert ("| chrF | gru-tiny | lstm-tiny | 2 / 2 | +100.00 | 100.00, 100.00 | 0.001 | 0.003 | yes: gru-tiny better "
            "|  |") in section
    assert ("| BLEU | gru-tiny | transformer-tiny | 2 / 2 | +0.00 | 0.00, 0.00 | 1.000 | 1.000 | "
            "no (Holm-adjusted p ≥ 0.05) |  |") in section
    assert ("| BLEU | gru-tiny | bytenet-tiny | 2 / 0 | – | – | – | – | – (not tested) | not tested: no run of B has "
            "usable test outputs") in section
    lm = md.split("### Task wikitext2")[1].split("\n## ")[0]
    assert ("| NLL per token | transformer-tiny | lstm-tiny | 1 / 1 | -1.0000 | -1.0000, -1.0000 | 0.002 | 0.002 | "
            "– (no conclusion about architectures: a system has one seed) | seed variance could not be estimated (A "
            "and B have one seed with test outputs): this compares trained models, not architectures |") in lm


def test_holm_adjusts_each_task_and_metric_as_one_family():
    """Holm's step-down by hand: p = 0.01, 0.04, 0.03 (m = 3) sorted 0.01, 0.03, 0.04 -> 3 x 0.01 = 0.03,
    2 x 0.03 = 0.06, 1 x 0.04 = 0.04 raised to the running maximum 0.06. Another metric is its own family; an
    untested row (a note, no p) stays out of every family."""
    rows = [{"task": "t", "metric": "bleu", "p": p} for p in (0.01, 0.04, 0.03)]
    rows += [{"task": "t", "metric": "chrf", "p": 0.04}, {"task": "t", "metric": "bleu", "p": None, "note": "x"}]
    out = significance.holm(pd.DataFrame(rows, columns=significance.COLUMNS))
    assert out["p_holm"].iloc[:4].tolist() == pytest.approx([0.03, 0.06, 0.06, 0.04])
    assert out["significant"].iloc[:4].tolist() == [True, False, False, True]
    assert pd.isna(out["p_holm"].iloc[4]) and pd.isna(out["significant"].iloc[4])


def test_runs_on_different_references_are_not_paired(tmp_path):
    root = tmp_path / "runs"
    with_outputs(root, record("gru", "multi30k", 1, scores=(100.0, 100.0)), {"test.hyp": REFS, "test.ref": REFS})
    with_outputs(root, record("lstm", "multi30k", 1, scores=(0.0, 0.0)),
                 {"test.hyp": UNRELATED, "test.ref": REFS[::-1]})
    with_outputs(root, record("transformer", "multi30k", 1, scores=(90.0, 90.0)),
                 {"test.hyp": REFS[:-1], "test.ref": REFS})
    pairs = significance.pairwise(reports.load([root]).runs)
    notes = dict(zip(zip(pairs["a"], pairs["b"], pairs["metric"]), pairs["note"]))
    assert "not the same test items" in notes[("gru-tiny", "lstm-tiny", "bleu")]
    assert "test.hyp has 19 lines, test.ref 20" in notes[("gru-tiny", "transformer-tiny", "bleu")]
    assert pairs["delta"].isna().all()


def test_jobs_leave_the_outputs_the_paired_tests_read(make_cfg, tmp_path):
    """A translation job writes test.ref beside test.hyp, a language-model job its chunks' NLL: the report pairs
    two real jobs of each kind from them."""
    text = tmp_path / "text"
    text.mkdir()
    words = ("the", "cat", "sat", "on", "a", "mat", "dog", "ran")
    for split, n in (("train", 80), ("valid", 8), ("test", 30)):
        lines = [" ".join(words[(k * 7 + i * 3) % len(words)] for i in range(3 + k % 6)) for k in range(n)]
        (text / f"{split}.txt").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    for model in ("transformer", "lstm"):
        job.run(make_cfg(f"model={model}_tiny", "task=copy", "task.n_train=60", "task.n_valid=8", "task.n_test=12",
                         "trainer=smoke", "trainer.max_steps=2", "eval.splits=[test]", "eval.decoding.beam=1"),
                tmp_path / "runs" / f"copy_{model}")
        job.run(make_cfg(f"model={model}_tiny", "task=text_files", f"task.path={text}", "task.bptt=16",
                         "trainer=smoke", "trainer.max_steps=2", "eval.splits=[test]"),
                tmp_path / "runs" / f"lm_{model}")
    copy = tmp_path / "runs" / "copy_lstm"
    rec = json.loads((copy / "record.json").read_text())
    task = tasks.build(rec["config"]["task"], rec["config"]["data"])
    assert (copy / "test.ref").read_text(encoding="utf-8") == "\n".join(task.references("test")) + "\n"
    assert len((copy / "test.hyp").read_text(encoding="utf-8").split("\n")) == 12 + 1
    lm = tmp_path / "runs" / "lm_lstm"
    saved, metrics = json.loads((lm / "test.nll.json").read_text()), json.loads((lm / "record.json").read_text())
    tokens = metrics["metrics"]["test"]["tokens"]
    assert sum(saved["tokens"]) == tokens and set(saved["tokens"][:-1]) == {16} and saved["bptt"] == 16
    assert sum(saved["nll"]) / tokens == pytest.approx(metrics["metrics"]["test"]["nll"], rel=1e-9)
    pairs = significance.pairwise(reports.load([tmp_path / "runs"]).runs).sort_values("metric")
    assert pairs["note"].isna().all() and pairs["metric"].tolist() == ["bleu", "chrf", "nll"]
    assert pairs["units"].tolist() == [12, 12, math.ceil(tokens / 16)] and pairs["p"].between(0, 1).all()
