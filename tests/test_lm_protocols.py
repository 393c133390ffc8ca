"""Language-model evaluation protocols (chunks, carry, sliding) and training with carried recurrent state."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seqbench import models
from seqbench import reports
from seqbench.harness import job, lm_protocol
from seqbench.harness.bench import word_lm
from seqbench.harness.bench.baselines import WordLanguageModel
from seqbench.harness.evaluate import evaluate_lm
from seqbench.harness.lm_protocol import CarriedState, Protocol
from seqbench.harness.settings import problems
from seqbench.harness.train import Trainer
from seqbench.reports import tables
from seqbench.tasks.batching import lm_batches
from seqbench.tasks.lm import LMTask
from seqbench.tasks.streams import carried_batches, sliding_batches, sliding_windows
from tests.test_bench import transplant

CPU = torch.device("cpu")


def text(n_words: int, seed: int) -> list[str]:
    """Lines of random words from a 30-word vocabulary (every word appears in a long enough text)."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in rng.integers(0, 30, n_words)]
    return [" ".join(words[i : i + 9]) for i in range(0, n_words, 9)]


def lm_task(bptt: int, valid: list[str] | None = None) -> LMTask:
    train = text(2000, 0) + [" ".join(f"w{i}" for i in range(30))]
    return LMTask("words", {"train": train, "valid": valid or text(300, 1), "test": text(300, 2)}, bptt)


def lm(preset: str, task) -> torch.nn.Module:
    torch.manual_seed(0)
    return models.build(models.load_preset(preset), task).eval()


def one_pass_nll(model, stream: np.ndarray) -> tuple[float, int]:
    """Summed NLL of a stream scored in one forward pass from a zero state (fp64 log-softmax)."""
    x = torch.from_numpy(stream).long()
    with torch.no_grad():
        logp = F.log_softmax(model(x[None, :-1])[0].double(), -1)
    return -logp[torch.arange(len(x) - 1), x[1:]].sum().item(), len(x) - 1


# -- the batches -----------------------------------------------------------------------------------

def test_carried_batches_continue_each_stream_from_batch_to_batch():
    batches = carried_batches(np.arange(23), bptt=4, n_streams=2)  # rows 0..10 and 11..21; token 22 dropped
    assert [b.inputs["tokens"].tolist() for b in batches] == [[[0, 1, 2, 3], [11, 12, 13, 14]],
                                                              [[4, 5, 6, 7], [15, 16, 17, 18]],
                                                              [[8, 9], [19, 20]]]
    assert [b.target.tolist() for b in batches] == [[[1, 2, 3, 4], [12, 13, 14, 15]],
                                                    [[5, 6, 7, 8], [16, 17, 18, 19]],
                                                    [[9, 10], [20, 21]]]
    assert sum(b.n_tokens for b in batches) == 2 * (11 - 1)
    with pytest.raises(ValueError, match="cannot be cut into 12 streams"):
        carried_batches(np.arange(23), bptt=4, n_streams=12)


def test_sliding_windows_score_each_position_once_after_the_previous_window():
    # windows begin every 3 positions and hold up to 4; each scores what lies past the previous window's end
    assert sliding_windows(10, bptt=4, stride=3) == [(0, 4, 0), (3, 7, 4), (6, 10, 7)]
    assert sliding_windows(10, bptt=4, stride=4) == [(0, 4, 0), (4, 8, 4), (8, 10, 8)]
    assert sliding_windows(5, bptt=4, stride=1) == [(0, 4, 0), (1, 5, 4)]
    with pytest.raises(ValueError, match="stride must be in 1..bptt=4"):
        sliding_windows(10, bptt=4, stride=5)


@pytest.mark.parametrize("n,bptt,stride,rows", [(23, 4, 3, 2), (100, 16, 5, 3), (100, 16, 16, 4), (7, 8, 1, 2)])
def test_sliding_batches_score_every_predictable_token_exactly_once(n, bptt, stride, rows):
    stream = np.arange(100, 100 + n)  # distinct tokens: the scored targets say which positions were scored
    batches = sliding_batches(stream, bptt, stride, rows)
    scored = [t for b in batches for row in b.target.tolist() for t in row if t != b.ignore_index]
    assert sorted(scored) == list(stream[1:])  # every token but the first (it has no context), once
    assert sum(b.n_tokens for b in batches) == n - 1
    for b in batches:  # each input window is a stretch of at most bptt tokens of the stream, each target the next
        x, y, scored_here = b.inputs["tokens"], b.target, b.target != b.ignore_index
        assert x.size(1) <= bptt and torch.equal(x[:, 1:] - x[:, :-1], torch.ones_like(x[:, 1:]))
        assert torch.equal(y[scored_here], (x + 1)[scored_here])


def test_sliding_batches_with_stride_bptt_are_the_chunks():
    stream = np.arange(50, 127)
    for got, want in zip(sliding_batches(stream, 8, 8, 3), lm_batches(stream, 8, 3, False, 0, 0), strict=True):
        assert torch.equal(got.inputs["tokens"], want.inputs["tokens"]) and torch.equal(got.target, want.target)


# -- evaluation ------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["lstm_tiny", "gru_tiny"])
def test_carry_on_a_recurrent_lm_equals_one_pass_over_the_whole_stream(preset):
    task = lm_task(bptt=16)
    model = lm(preset, task)
    stream = task.streams["valid"]
    got = evaluate_lm(model, task, "valid", CPU, max_tokens=64, protocol=Protocol("carry", streams=1))
    nll, n = one_pass_nll(model, stream)
    assert got["tokens"] == n == len(stream) - 1
    assert got["nll"] == pytest.approx(nll / n, abs=1e-5)
    assert got["protocol"] == "carry" and got["protocol_settings"] == {"bptt": 16, "streams": 1}
    assert got["mean_context"] == pytest.approx(len(stream) / 2)  # position i has read i tokens: mean (n+1)/2
    chunks = evaluate_lm(model, task, "valid", CPU, max_tokens=64)
    assert abs(chunks["nll"] - got["nll"]) > 1e-3  # chunks start from zero every 16 tokens: another number

    # three streams: each is one pass over its third of the split (the last len % 3 tokens dropped)
    three = evaluate_lm(model, task, "valid", CPU, max_tokens=64, protocol=Protocol("carry", streams=3))
    length = len(stream) // 3
    parts = [one_pass_nll(model, stream[k * length : (k + 1) * length]) for k in range(3)]
    assert three["tokens"] == sum(n for _, n in parts) == 3 * (length - 1)
    assert three["nll"] == pytest.approx(sum(s for s, _ in parts) / three["tokens"], abs=1e-5)


def test_sliding_scores_each_token_with_its_window_of_context():
    # valid: 11 tokens ("a b c d e" <eos> "f g h i" <eos>), 10 predictions; bptt 4, stride 3: windows
    # [0,4) scoring positions 0-3, [3,7) scoring 4-6, [6,10) scoring 7-9 (hand-derived)
    task = lm_task(bptt=4, valid=["w1 w2 w3 w4 w5", "w6 w7 w8 w9"])
    model = lm("transformer_tiny", task)
    stream = torch.from_numpy(task.streams["valid"]).long()
    starts = [0, 0, 0, 0, 3, 3, 3, 6, 6, 6]
    nll = 0.0
    with torch.no_grad():
        for p, start in enumerate(starts):  # token p+1 read with the window's tokens start..p
            logp = F.log_softmax(model(stream[None, start : p + 1])[0, -1].double(), -1)
            nll -= logp[stream[p + 1]].item()
    got = evaluate_lm(model, task, "valid", CPU, max_tokens=8, protocol=Protocol("sliding", stride=3))
    assert got["tokens"] == len(stream) - 1 == 10
    assert got["nll"] == pytest.approx(nll / 10, abs=1e-5)
    assert got["mean_context"] == pytest.approx(sum(p - s + 1 for p, s in enumerate(starts)) / 10)  # 2.8
    assert got["protocol_settings"] == {"bptt": 4, "stride": 3}


@pytest.mark.parametrize("preset", ["transformer_tiny", "lstm_tiny", "convs2s_tiny", "bytenet_tiny"])
def test_sliding_with_stride_bptt_equals_chunks_and_a_smaller_stride_scores_the_same_tokens(preset):
    task = lm_task(bptt=16)
    model = lm(preset, task)
    chunks = evaluate_lm(model, task, "test", CPU, max_tokens=64)
    same = evaluate_lm(model, task, "test", CPU, max_tokens=64, protocol=Protocol("sliding", stride=16))
    assert same["nll"] == pytest.approx(chunks["nll"], rel=1e-12) and same["tokens"] == chunks["tokens"]
    assert chunks["protocol"] == "chunks" and chunks["mean_context"] == pytest.approx(8.5, abs=0.1)  # (1+16)/2
    half = evaluate_lm(model, task, "test", CPU, max_tokens=64, protocol=Protocol("sliding"))  # stride 16 // 2
    assert half["tokens"] == chunks["tokens"] == len(task.streams["test"]) - 1
    assert half["protocol_settings"] == {"bptt": 16, "stride": 8} and half["mean_context"] > 12


# -- settings --------------------------------------------------------------------------------------

def test_protocol_settings_are_checked(make_cfg):
    found = problems(make_cfg("task=wikitext2", "eval.lm_protocol=overlap", "eval.lm_stride=0",
                              "eval.lm_batch_size=0", "trainer.carry_state=maybe"))
    assert any(p.startswith("eval.lm_protocol='overlap'; valid: chunks, carry, sliding") for p in found)
    assert any(p.startswith("eval.lm_stride=0 must be a positive integer or null") for p in found)
    assert any(p.startswith("eval.lm_batch_size=0 must be a positive integer") for p in found)
    assert any(p.startswith("trainer.carry_state='maybe' must be true or false") for p in found)
    wide = problems(make_cfg("task=wikitext2", "task.bptt=64", "eval.lm_protocol=sliding", "eval.lm_stride=65"))
    assert wide == ["eval.lm_stride=65 is larger than task.bptt=64: windows of 64 tokens starting 65 apart would "
                    "leave tokens unscored; set eval.lm_stride to at most 64 (null: half of task.bptt)"]
    assert problems(make_cfg("model=gru", "task=ptb", "eval.lm_protocol=carry", "trainer.carry_state=true")) == []
    assert problems(make_cfg("model=transformer", "task=ptb", "eval.lm_protocol=sliding",
                             "eval.lm_stride=128")) == []


@pytest.mark.parametrize("arch", ["transformer", "convs2s", "bytenet"])
def test_models_without_state_reject_carrying_it_naming_the_setting_and_the_fix(make_cfg, arch):
    found = problems(make_cfg(f"model={arch}", "task=wikitext2", "eval.lm_protocol=carry", "trainer.carry_state=true"))
    assert len(found) == 2
    assert found[0].startswith("eval.lm_protocol=carry carries a recurrent language model's state")
    assert f"(model={arch}) has no state to carry; use eval.lm_protocol=sliding" in found[0]
    assert found[1].startswith("trainer.carry_state=true carries") and "set trainer.carry_state=false" in found[1]
    assert all("model=lstm" in p for p in found)


def test_carry_state_on_a_translation_task_is_an_error(make_cfg, tmp_path):
    cfg = make_cfg("model=lstm_tiny", "task=copy", "task.n_train=20", "task.n_valid=4", "task.n_test=4",
                   "trainer=smoke", "trainer.carry_state=true")
    train_cfg, task, model, identity = job._build(cfg, CPU)
    with pytest.raises(ValueError, match="task copy is not one .*set trainer.carry_state=false"):
        Trainer(model, task, train_cfg, tmp_path, CPU, seed=1, identity=identity)


def test_carry_state_does_not_run_data_parallel_and_other_tasks_ignore_the_protocol_with_a_warning(make_cfg):
    task = lm_task(bptt=8)
    with pytest.raises(ValueError, match=r"does not run data-parallel .*set trainer.carry_state=false"):
        CarriedState(lm("lstm_tiny", task), task, 32, distributed=True)
    copy_task = type("CopyTask", (), {"name": "copy"})()  # no text stream
    assert lm_protocol.ignored(make_cfg("eval.lm_protocol=sliding"), copy_task) == [
        "eval.lm_protocol=sliding applies to language-model tasks over a text stream; task copy scores its own way, "
        "so the setting has no effect"]
    assert lm_protocol.ignored(make_cfg("eval.lm_protocol=sliding"), task) == []


# -- training with carried state -------------------------------------------------------------------

@pytest.fixture
def words_folder(tmp_path):
    folder = tmp_path / "words"
    folder.mkdir()
    for split, seed, n in (("train", 0, 600), ("valid", 1, 90), ("test", 2, 90)):
        (folder / f"{split}.txt").write_text("\n".join(text(n, seed)) + "\n")
    return folder


def carry_cfg(make_cfg, folder, *extra):
    return make_cfg("model=lstm_tiny", "model.dropout=0.0", "task=text_files", f"task.path={folder}", "task.bptt=8",
                    "trainer=smoke", "trainer.max_tokens=32", "trainer.label_smoothing=0.0", "trainer.carry_state=true",
                    "eval.influence=false", *extra)


def test_carry_state_training_differs_from_chunk_training_only_in_the_carried_state(make_cfg, words_folder, tmp_path):
    out = tmp_path / "run"
    train_cfg, task, model, identity = job._build(carry_cfg(make_cfg, words_folder, "trainer.max_steps=1"), CPU)
    initial = copy.deepcopy(model)
    first = Trainer(model, task, train_cfg, out, CPU, seed=1, identity=identity)
    first.fit()
    rows = torch.from_numpy(task.streams["train"][: len(task.streams["train"]) // 4 * 4]).view(4, -1)  # 4 streams
    x1, y1, x2, y2 = rows[:, 0:8], rows[:, 1:9], rows[:, 8:16], rows[:, 9:17]
    # step 1: the first slice of the four streams, from a zero state: a chunk-training step on those chunks
    assert first.p.log[0]["loss"] == pytest.approx(F.cross_entropy(initial(x1).flatten(0, 1), y1.flatten()).item(),
                                                   rel=1e-6)
    with torch.no_grad():
        _, state = initial(x1, state=initial.init_state(4))  # the state step 1 ends in, before the update
    assert all(torch.allclose(got, want, atol=1e-6) for got, want in zip(first.p.carried_state, state, strict=True))
    updated = copy.deepcopy(first.model)
    with torch.no_grad():
        carried = F.cross_entropy(updated(x2, state=state)[0].flatten(0, 1), y2.flatten()).item()
        fresh = F.cross_entropy(updated(x2).flatten(0, 1), y2.flatten()).item()
    assert abs(carried - fresh) > 1e-4  # the carried state changes the loss of the next slice

    # step 2, in a resumed run: the next slice of each stream from the state step 1 ended in (kept in last.pt)
    train_cfg, task, model, identity = job._build(carry_cfg(make_cfg, words_folder, "trainer.max_steps=2"), CPU)
    second = Trainer(model, task, train_cfg, out, CPU, seed=1, identity=identity)
    progress = second.fit()
    assert second.resumed_from == 1 and [row["step"] for row in progress.log] == [1, 2]
    assert progress.log[1]["loss"] == pytest.approx(carried, rel=1e-5)


def test_a_job_records_the_protocol_of_every_perplexity_and_the_report_shows_it(make_cfg, words_folder, tmp_path,
                                                                                 capsys):
    cfg = carry_cfg(make_cfg, words_folder, "trainer.max_steps=2", "eval.lm_protocol=carry", "eval.lm_batch_size=2")
    rec = job.run(cfg, tmp_path / "carry")
    assert rec["status"] == "ok"
    assert f"test ppl {rec['metrics']['test']['perplexity']:.2f} (carry) |" in capsys.readouterr().out
    for split in ("valid", "test"):
        m, n = rec["metrics"][split], rec["task"]["tokens"][split]
        assert m["protocol"] == "carry" and m["protocol_settings"] == {"bptt": 8, "streams": 2}
        assert m["tokens"] == 2 * (n // 2 - 1)
    assert rec["config"]["trainer"]["carry_state"] is True
    chunks = job.run(make_cfg("model=transformer_tiny", "task=text_files", f"task.path={words_folder}", "task.bptt=8",
                              "trainer=smoke", "trainer.max_steps=1", "eval.influence=false"), tmp_path / "chunks")
    assert chunks["metrics"]["test"]["protocol"] == "chunks"
    runs = reports.load([tmp_path]).runs
    assert sorted(runs["lm_protocol"]) == ["carry (bptt 8, streams 2); unknown tokens 0.0%", "chunks (bptt 8); unknown tokens 0.0%"]  # with the test split's unknown-token rate
    shown = tables.summary_display(tables.summary(runs), "words")
    assert sorted(shown["perplexity protocol"]) == ["carry (bptt 8, streams 2); unknown tokens 0.0%", "chunks (bptt 8); unknown tokens 0.0%"]
    assert "eval.lm_protocol" in set(tables.differing_settings(runs)["setting"])
    warned = tables.fairness_warnings(runs)["words"]
    assert any("different perplexity protocols (eval.lm_protocol)" in w for w in warned)


def test_records_without_a_protocol_are_labelled_chunks_and_translation_has_none(tmp_path):
    old = {"status": "ok", "task": {"name": "ptb", "family": "lm", "bptt": 128},
           "metrics": {"test": {"nll": 5.0, "perplexity": math.exp(5.0), "tokens": 10}}}
    mt = {"status": "ok", "task": {"name": "multi30k", "family": "translation"}, "metrics": {"test": {"bleu": 30.0}}}
    for name, rec in (("old", old), ("mt", mt)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "record.json").write_text(json.dumps(rec))
    runs = reports.load([tmp_path]).runs.set_index("task")
    assert runs.loc["ptb", "lm_protocol"] == "chunks (bptt 128)" and runs.loc["multi30k", "lm_protocol"] == ""


# -- the peer: PyTorch's word_language_model example ------------------------------------------------

def test_carry_equals_the_word_lm_examples_evaluation_on_the_same_weights():
    """seqbench's carry protocol and the example's evaluate() (harness/bench/word_lm.py) give one number."""
    task = lm_task(bptt=7)
    ours = models.build({"name": "lstm", "d_model": 16, "n_layers": 2, "dropout": 0.2, "tie_output": False},
                        task).eval()
    theirs = WordLanguageModel(task.vocab_size, 16, 16, 2, 0.2)
    transplant("lm", ours, theirs)
    want = word_lm.evaluate(theirs, word_lm.batchify(task.streams["valid"], 3), bptt=7)
    got = evaluate_lm(ours, task, "valid", CPU, max_tokens=64, protocol=Protocol("carry", streams=3))
    assert got["nll"] == pytest.approx(want, abs=1e-5)


def test_the_word_lm_example_trains_and_tests_its_best_model():
    line = "w0 w1 w2 w3 w4"  # a text it can learn: the same line over and over
    task = LMTask("cycle", {"train": [line] * 300, "valid": [line] * 10, "test": [line] * 10}, 7)
    args = word_lm.parse(["--emsize", "16", "--nhid", "16", "--bptt", "7", "--epochs", "2", "--seconds", "60",
                          "--batch-size", "4", "--eval-batch-size", "3"])
    torch.manual_seed(args.seed)
    untrained = word_lm.evaluate(WordLanguageModel(task.vocab_size, 16, 16, 2, 0.2),
                                 word_lm.batchify(task.streams["valid"], 3), 7)
    result = word_lm.run(task.streams, task.vocab_size, args)
    assert result["epochs_finished"] == 2 and [row["epochs"] for row in result["curve"]] == [1, 2]
    assert result["train_tokens"] == 2 * 4 * (len(task.streams["train"]) // 4 - 1)
    assert result["valid_nll"] == min(row["valid_nll"] for row in result["curve"]) < untrained - 0.5
    assert result["test_perplexity"] == pytest.approx(math.exp(result["test_nll"]))
