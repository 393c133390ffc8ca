"""Long-range probes (tasks/probes.py), accuracy by distance (harness/analysis/probes.py), influence by distance
(harness/analysis/influence.py) and the long_range experiment's equal parameter budgets."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf
from torch import nn

from seqbench import models
from seqbench import tasks
from seqbench.harness import job
from seqbench.harness.analysis import influence
from seqbench.harness.analysis.probes import accuracy_by_distance, evaluate_probe
from seqbench.models.common import LanguageModel
from seqbench.tasks.batching import Batch
from seqbench.tasks.probes import BLANK, GO, IGNORE, NO_ANSWER
from tests.conftest import ROOT
from seqbench.tasks.base import Shape

SMALL = {"n_train": 60, "n_valid": 30, "n_test": 40}
ARCHS = ("transformer", "lstm", "gru", "convs2s", "bytenet", "transformer_pp", "mamba", "gla")  # seqbench's own


def probe(name: str, **settings):
    return tasks.build({"name": name, **SMALL, **settings})


def answers(task, split: str):
    """(example, position, distance) of every answer of a split."""
    d = task.data[split]
    return [(n, p, d["distance"][n, p]) for n, p in zip(*np.nonzero(d["target"] != IGNORE))]


# ---------------------------------------------------------------- the tasks

def test_delayed_copy_answer_is_the_symbol_exactly_d_back():
    task = probe("delayed_copy", n_copy=3, distances=[3, 5, 9])
    for split in ("train", "valid", "test"):
        d = task.data[split]
        for n, length in enumerate(d["length"]):
            tokens, target, dist = (d[f][n, :length] for f in ("tokens", "target", "distance"))
            delay = length - 3
            assert delay in (3, 5, 9)
            assert tokens[delay] == GO and (tokens[3:delay] == BLANK).all() and (tokens[delay + 1 :] == BLANK).all()
            assert (tokens[:3] >= 2).all()  # symbols
            assert (target[:delay] == IGNORE).all() and (dist[:delay] == NO_ANSWER).all()
            positions = np.arange(delay, length)
            assert (dist[positions] == delay).all()
            assert (target[positions] == tokens[positions - delay]).all()  # answer i reads input i, d back
    seen = {int(d) for _, _, d in answers(task, "train")}
    assert seen == {3, 5, 9}


def test_assoc_recall_answer_is_the_queried_value_exactly_d_back():
    task = probe("assoc_recall", n_pairs=3, n_keys=5, n_values=4, distances=[2, 4, 7, 12])
    keys, values = range(2, 7), range(7, 11)
    seen = set()
    for split in ("train", "valid", "test"):
        d = task.data[split]
        found = answers(task, split)
        assert len(found) == len(d["length"])  # one query per example
        for n, p, dist in found:
            tokens = d["tokens"][n]
            assert p == d["length"][n] - 1 and tokens[p - 1] == GO
            pairs = tokens[:6].reshape(3, 2)
            assert set(pairs[:, 0]) <= set(keys) and len(set(pairs[:, 0])) == 3  # distinct keys
            assert set(pairs[:, 1]) <= set(values)
            assert d["target"][n, p] == tokens[p - dist]  # the value sits d back ...
            assert tokens[p - dist - 1] == tokens[p]  # ... right after the queried key
            assert (tokens[6 : p - 1] == BLANK).all()
            seen.add(int(dist))
    assert seen == {2, 4, 7, 12}


def test_probe_data_depend_only_on_the_data_seed():
    a, b, c = probe("assoc_recall"), probe("assoc_recall"), probe("assoc_recall", data_seed=7)
    assert all(np.array_equal(a.data["train"][f], b.data["train"][f]) for f in ("tokens", "target", "distance"))
    assert not np.array_equal(a.data["train"]["target"], c.data["train"]["target"])


def test_probe_batches_score_only_answers_and_carry_distances():
    task = probe("delayed_copy", distances=[4, 16])
    batches = task.batches("test", max_tokens=200)
    assert sorted(i for b in batches for i in b.index) == list(range(SMALL["n_test"]))  # each example once
    for b in batches:
        assert b.ignore_index == IGNORE and b.inputs["tokens"].shape == b.target.shape
        assert b.n_tokens == int((b.target != IGNORE).sum()) == 4 * len(b.index)
        dist = task.distances("test", b.index)
        assert torch.equal(dist != NO_ANSWER, b.target != IGNORE)
        assert b.inputs["tokens"].numel() <= 200
    assert task.describe()["family"] == task.family == "probe" and task.form == "lm"  # the model form it needs
    with pytest.raises(ValueError, match="distances >= 4"):
        probe("delayed_copy", distances=[2, 8])


# ---------------------------------------------------------------- accuracy by distance

def test_accuracy_by_distance_on_a_hand_made_case():
    target = torch.tensor([[IGNORE, 5, 6, IGNORE], [7, IGNORE, 8, 9]])
    predicted = torch.tensor([[5, 5, 0, 0], [7, 1, 8, 0]])
    distance = torch.tensor([[NO_ANSWER, 2, 2, NO_ANSWER], [4, NO_ANSWER, 2, 4]])
    rows = accuracy_by_distance(predicted, target, distance)
    assert rows == [{"distance": 2, "accuracy": 2 / 3, "n": 3}, {"distance": 4, "accuracy": 0.5, "n": 2}]


class ShiftLM(LanguageModel):
    """Predicts the token ``shift`` positions back: one-hot embedding, a shift block, logits = 10 x state."""

    def __init__(self, vocab: int, shift: int):
        super().__init__()
        self.vocab, self.shift = vocab, shift
        self.scale = nn.Parameter(torch.tensor(10.0))

    def embed(self, tokens):
        return F.one_hot(tokens, self.vocab).float()  # (B,T,V)

    def head(self, x):
        return self.scale * x

    def mixing_blocks(self):
        return [lambda x: F.pad(x, (0, 0, self.shift, 0))[:, : x.size(1)]]  # output i = input i - shift


def test_evaluate_probe_scores_a_model_that_reads_4_back():
    """Right at distance 4 (it reads the answer), always wrong at 8 (it reads a blank)."""
    task = probe("delayed_copy", distances=[4, 8])
    m = evaluate_probe(ShiftLM(task.vocab_size, 4), task, "test", torch.device("cpu"), max_tokens=256)
    n4 = 4 * int((task.data["test"]["length"] == 8).sum())
    assert m["accuracy_by_distance"] == [{"distance": 4, "accuracy": 1.0, "n": n4},
                                         {"distance": 8, "accuracy": 0.0, "n": 4 * SMALL["n_test"] - n4}]
    assert m["accuracy"] == pytest.approx(n4 / (4 * SMALL["n_test"])) and m["tokens"] == 4 * SMALL["n_test"]


# ---------------------------------------------------------------- influence by distance

class Stream:
    """An LM-form task stand-in: fixed random token batches, every position scored."""

    family = form = "lm"

    def __init__(self, vocab: int, shapes=((3, 12), (2, 12))):
        g = torch.Generator().manual_seed(0)
        self.data = [torch.randint(vocab, s, generator=g) for s in shapes]

    def batches(self, split, max_tokens):
        return [Batch({"tokens": x}, x.roll(-1, 1), x.numel(), ignore_index=-100) for x in self.data]


def test_influence_of_a_model_that_reads_3_back_is_nonzero_only_at_distance_3():
    model = ShiftLM(8, 3).train()
    rows = influence.influence_by_distance(model, Stream(8), "valid", torch.device("cpu"), max_tokens=64,
                                           n_positions=20, max_rows=2)
    assert model.training  # restored
    assert [r["distance"] for r in rows] == list(range(len(rows))) and len(rows) >= 4
    assert rows[0]["n"] == 20  # every sampled position counts at distance 0
    for r in rows:
        assert (r["grad_norm"] > 0) == (r["distance"] == 3), r
    # d log softmax(10 e_t)_y / d e_t = 10 (onehot(y) - softmax): norm ~ 10·√2 when the token 3 back is not y
    assert rows[3]["grad_norm"] > 1.0


def test_influence_counts_only_earlier_positions_and_is_switchable(make_cfg):
    model = ShiftLM(8, 1)
    rows = influence.influence_by_distance(model, Stream(8, shapes=((1, 6),)), "valid", torch.device("cpu"),
                                           max_tokens=64, n_positions=100)
    # all 6 positions sampled: distance d is seen from positions d..5, so n = 6 - d
    assert [(r["distance"], r["n"]) for r in rows] == [(d, 6 - d) for d in range(6)]
    cfg = make_cfg("task=delayed_copy")
    assert influence.job_entry(model, Shape("seq2seq", {"src": 8, "tgt": 8}), cfg, torch.device("cpu")) == {}
    off = make_cfg("task=delayed_copy", "eval.influence=false")
    assert influence.job_entry(model, Stream(8), off, torch.device("cpu")) == {}


def test_a_stop_signal_ends_the_influence_analysis_and_is_not_recorded_as_its_failure(make_cfg):
    """The stop check runs before every gradient round; a stop is raised (the job ends as interrupted), while any
    other error of the analysis is recorded and the job's metrics stay."""
    from seqbench.harness.train import Interrupted

    calls = []

    def stop_after_two():
        calls.append(1)
        if len(calls) > 2:
            raise Interrupted("stopped")

    with pytest.raises(Interrupted):
        influence.influence_by_distance(ShiftLM(8, 3), Stream(8), "valid", torch.device("cpu"), max_tokens=64,
                                        n_positions=20, max_rows=2, check_stop=stop_after_two)
    assert len(calls) == 3  # checked round by round, not once at the start
    cfg = make_cfg("task=delayed_copy")
    with pytest.raises(Interrupted):
        influence.job_entry(ShiftLM(8, 3), Stream(8), cfg, torch.device("cpu"), check_stop=stop_after_two)


# ---------------------------------------------------------------- presets and the experiment

def test_probe_presets_have_equal_parameter_budgets(make_cfg):
    """The long_range sweep's models are within 15% of each other's parameter count on both probes."""
    sweep = yaml.safe_load((ROOT / "conf" / "experiment" / "long_range.yaml").read_text())
    params = sweep["hydra"]["sweeper"]["params"]
    assert params["model"].startswith("${seqbench.models:_probe}")  # every registered architecture's probe preset
    presets, names = job.preset_list("_probe").split(","), params["task"].split(",")
    assert set(presets) >= {f"{a}_probe" for a in ARCHS} and sorted(names) == ["assoc_recall", "delayed_copy"]
    assert sweep["sweep_name"] == "long_range" and sweep["trainer"]["max_seconds"] <= 600
    single = make_cfg("experiment=long_range")
    assert (single.model.preset, single.task.name, single.eval.influence) == ("probe", "delayed_copy", True)
    for name in names:
        task = probe(name)
        counts = {}
        for preset in presets:
            cfg = make_cfg(f"model={preset}", f"task={name}")
            counts[preset] = models.count_parameters(models.build(OmegaConf.to_container(cfg.model), task))
        assert max(counts.values()) <= 1.15 * min(counts.values()), counts
        assert 100_000 < min(counts.values()), counts


@pytest.mark.parametrize("name", ["delayed_copy", "assoc_recall"])
def test_probe_job_end_to_end(make_cfg, tmp_path, name):
    cfg = make_cfg("model=transformer_tiny", f"task={name}", "task.n_train=120", "task.n_valid=20", "task.n_test=30",
                   "task.distances=[4,8,16]", "trainer=smoke", "trainer.max_tokens=256")
    rec = job.run(cfg, tmp_path)
    on_disk = json.loads((tmp_path / "record.json").read_text())
    assert rec["status"] == on_disk["status"] == "ok"
    assert on_disk["task"]["family"] == "probe" and on_disk["model"]["form"] == "lm"
    answers_per_example = 4 if name == "delayed_copy" else 1
    for split in ("valid", "test"):
        m = on_disk["metrics"][split]
        rows = m["accuracy_by_distance"]
        assert [r["distance"] for r in rows] == [4, 8, 16]
        assert sum(r["n"] for r in rows) == m["tokens"] == answers_per_example * (30 if split == "test" else 20)
        assert m["accuracy"] == pytest.approx(sum(r["accuracy"] * r["n"] for r in rows) / m["tokens"])
        assert 0.0 <= m["accuracy"] <= 1.0 and m["nll"] > 0 and m["perplexity"] == pytest.approx(np.exp(m["nll"]))
    infl = on_disk["analysis"]["influence_by_distance"]
    assert infl[0]["distance"] == 0 and infl[0]["n"] == min(64, answers_per_example * 20)  # valid answers sampled
    assert all(r["grad_norm"] >= 0 for r in infl) and infl[0]["grad_norm"] > 0
    assert max(r["distance"] for r in infl) <= 23  # within the longest example (24 positions)
    assert on_disk["curves"]["valid"] and np.isfinite(on_disk["curves"]["valid"][-1]["valid_nll"])
