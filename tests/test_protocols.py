"""The papers' evaluation protocols: checkpoint averaging, FLOPs over a sample of batches, LM-form settings."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from seqbench import models
from seqbench.harness import checkpoint, job
from seqbench.harness.profile import count_flops, sample_batches, train_flops_per_token
from seqbench.harness.settings import problems
from seqbench.tasks.base import Shape
from seqbench.tasks.batching import Batch

TINY_COPY = ["model=transformer_tiny", "task=copy", "task.n_train=60", "task.n_valid=4", "task.n_test=4",
             "trainer=smoke", "trainer.threads=1", "eval.splits=[test]"]


# -- checkpoint averaging ------------------------------------------------------------------------

def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g, dtype=torch.float64),
            "count": torch.tensor(seed, dtype=torch.long)}


def test_averaging_copies_of_one_checkpoint_gives_that_checkpoint():
    state = _state(0)
    averaged = checkpoint.average_states([{k: v.clone() for k, v in state.items()} for _ in range(5)])
    for key, value in state.items():
        assert averaged[key].dtype == value.dtype and torch.equal(averaged[key], value)


def test_averaging_two_state_dicts_gives_their_mean_and_the_last_integer_buffers():
    a = {"w": torch.tensor([1.0, 2.0, -3.0]), "h": torch.tensor([0.25], dtype=torch.float16),
         "count": torch.tensor(3)}
    b = {"w": torch.tensor([2.0, 5.0, 4.0]), "h": torch.tensor([0.75], dtype=torch.float16),
         "count": torch.tensor(9)}
    averaged = checkpoint.average_states([a, b])
    assert torch.equal(averaged["w"], torch.tensor([1.5, 3.5, 0.5]))  # exact in fp32
    assert averaged["h"].dtype == torch.float16 and averaged["h"].item() == 0.5
    assert averaged["count"].item() == 9  # not floating point: the last checkpoint's


def test_average_last_loads_the_newest_checked_snapshots_and_warns_when_fewer(tmp_path):
    identity = {"model": {"name": "m"}, "task": "t", "vocab": {"lm": 5}}
    lin = torch.nn.Linear(2, 2, bias=False)
    weights = {}
    for step in (2, 4, 6):
        with torch.no_grad():
            lin.weight.fill_(float(step))
        weights[step] = lin.weight.clone()
        checkpoint.save_snapshot(tmp_path, model=lin, identity=identity, progress={"step": step, "train_seconds": 0.0},
                                 keep=2)
    assert [s for s, _ in checkpoint.snapshots(tmp_path / "ckpt")] == [4, 6]  # only the last 2 kept
    state, entry = checkpoint.average_last(tmp_path / "ckpt", 3, identity)
    assert entry["steps"] == [4, 6] and entry["files"] == ["ckpt/step_4.pt", "ckpt/step_6.pt"]
    assert "only 2 checkpoint(s)" in entry["warnings"][0]
    assert torch.equal(state["weight"], torch.full((2, 2), 5.0))
    with pytest.raises(checkpoint.CheckpointError, match="another model"):
        checkpoint.average_last(tmp_path / "ckpt", 2, {**identity, "task": "other"})


def test_average_settings_are_checked(make_cfg):
    assert any("eval.checkpoint=average" in p and "save_every" in p
               for p in problems(make_cfg("eval.checkpoint=average")))
    found = problems(make_cfg("eval.checkpoint=average", "eval.average_last=0", "+trainer.save_every=-1"))
    assert any(p.startswith("eval.average_last=0") for p in found)
    assert any(p.startswith("trainer.save_every=-1") for p in found)
    assert problems(make_cfg("eval.checkpoint=average", "+trainer.save_every_seconds=600")) == []


def test_paper_trainer_averages_the_last_five_checkpoints(make_cfg):
    cfg = make_cfg("trainer=paper", "model=transformer_base")
    assert (cfg.eval.checkpoint, cfg.eval.average_last, cfg.trainer.save_every) == ("average", 5, 1400)
    # eq. 3's peak for d_model 512 and 4000 warm-up steps: 512^-0.5 * 4000^-0.5 = 6.988e-4, the paper's 7e-4
    assert cfg.trainer.lr == pytest.approx(512**-0.5 * 4000**-0.5, rel=1e-12) and round(cfg.trainer.lr, 4) == 7e-4
    assert cfg.trainer.schedule == "inverse_sqrt"  # trainer/default.yaml's, under trainer


def test_a_job_evaluates_the_average_of_its_last_checkpoints(make_cfg, tmp_path):
    """4 steps, a snapshot every 3 and at the end: steps 3 and 4 are averaged, and the evaluated weights are
    their mean (the test metrics match a model loaded with that mean by hand)."""
    out = tmp_path / "run"
    cfg = make_cfg(*TINY_COPY, "eval.checkpoint=average", "eval.average_last=2", "+trainer.save_every=3")
    rec = job.run(cfg, out)
    assert rec["status"] == "ok"
    assert rec["eval_checkpoint"]["steps"] == [3, 4]
    assert rec["eval_checkpoint"]["files"] == ["ckpt/step_3.pt", "ckpt/step_4.pt"]
    three = torch.load(out / "ckpt" / "step_3.pt", weights_only=True)["model"]
    four = torch.load(out / "ckpt" / "step_4.pt", weights_only=True)["model"]
    last = torch.load(out / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(four[k], last[k]) for k in last)  # the final snapshot is the final model
    assert any(not torch.equal(three[k], four[k]) for k in four)
    _, task, model, identity = job._build(cfg, torch.device("cpu"))
    model.load_state_dict({k: ((three[k].double() + four[k].double()) / 2).to(four[k].dtype)
                           if four[k].is_floating_point() else four[k] for k in four})
    metrics, _ = job.evaluate(model, task, cfg, torch.device("cpu"))
    for key in ("bleu", "chrf", "samples"):  # decoded by the job, and here from the mean computed by hand
        assert metrics["test"][key] == rec["metrics"]["test"][key]


def test_checkpoints_saved_by_training_seconds_and_fewer_than_asked_are_averaged_with_a_warning(make_cfg, tmp_path):
    """Any training time since the last save is past 1e-9 s: every step saves, and all 3 are averaged."""
    rec = job.run(make_cfg(*TINY_COPY, "trainer.max_steps=3", "eval.checkpoint=average", "eval.average_last=5",
                           "+trainer.save_every_seconds=1e-9"), tmp_path / "run")
    assert rec["eval_checkpoint"]["steps"] == [1, 2, 3]
    assert "eval.average_last=5 but only 3 checkpoint(s)" in rec["eval_checkpoint"]["warnings"][0]


# -- FLOPs per token over a sample of batches ---------------------------------------------------

def _lm_batch(length: int, rows: int, vocab: int = 11) -> Batch:
    tokens = torch.randint(0, vocab, (rows, length + 1), generator=torch.Generator().manual_seed(length))
    return Batch({"tokens": tokens[:, :-1]}, tokens[:, 1:], rows * length, ignore_index=-100)


def test_flops_per_token_is_the_token_weighted_mean_over_batches_of_different_lengths():
    torch.manual_seed(0)
    model = models.MODELS["transformer"][1](11, d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0)
    batches = [_lm_batch(5, 4), _lm_batch(40, 1), _lm_batch(17, 3)]

    def one(batch):
        def step():
            logits = model(**batch.inputs)
            F.cross_entropy(logits.flatten(0, 1), batch.target.flatten()).backward()
        return count_flops(step)

    per_batch = [one(b) for b in batches]
    model.zero_grad(set_to_none=True)
    per_token = [f / b.n_tokens for f, b in zip(per_batch, batches)]
    assert len(set(per_token)) == 3  # attention grows with length: the batches' figures differ
    weighted = sum(p * b.n_tokens for p, b in zip(per_token, batches)) / sum(b.n_tokens for b in batches)
    assert train_flops_per_token(model, batches) == pytest.approx(weighted, rel=1e-12)
    assert train_flops_per_token(model, batches[:1]) == pytest.approx(per_token[0], rel=1e-12)


def test_sample_batches_is_spread_over_the_epoch():
    assert sample_batches(list(range(5)), 8) == [0, 1, 2, 3, 4]
    assert sample_batches(list(range(15)), 8) == [0, 2, 4, 6, 8, 10, 12, 14]


def test_the_record_states_the_flops_convention(make_cfg, tmp_path):
    rec = job.run(make_cfg(*TINY_COPY, "trainer.max_steps=1", "trainer.eval_every=1"), tmp_path / "run")
    assert "causal attention counted in full" in rec["costs"]["flops_convention"]
    assert rec["eval_checkpoint"] == {"kind": "best", "steps": [1], "files": ["best.pt"]}


# -- language-model form: seq2seq-only settings ---------------------------------------------------

def test_lm_form_warns_about_seq2seq_only_settings(caplog):
    cfg = {"name": "lstm", "d_model": 8, "n_layers": 1, "attention": "bahdanau", "input_feed": True,
           "bidirectional": True, "tie_output": False}
    with caplog.at_level(logging.WARNING, logger="seqbench"):
        model = models.build(cfg, Shape("lm", {"lm": 13}))
    assert len(model.warnings) == 2  # bidirectional=True is the default: nothing to say
    assert "model.attention='bahdanau'" in model.warnings[0] and "model.input_feed=True" in model.warnings[1]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == model.warnings
    assert models.build({"name": "bytenet", "d_model": 8, "n_layers": 1, "unfold_b": 5}, Shape("lm", {"lm": 13})).warnings[0] \
        .startswith("model.unfold_b=5 has no effect on ByteNetLM")
    assert models.build({"name": "transformer", "d_model": 8, "n_heads": 2, "d_ff": 8, "n_layers": 1},
                        Shape("lm", {"lm": 13})).warnings == []


def test_the_record_lists_ignored_model_settings(make_cfg, tmp_path):
    rec = job.run(make_cfg("model=lstm_tiny", "model.attention=bahdanau", "task=assoc_recall", "task.n_train=40",
                           "task.n_valid=4", "task.n_test=4", "trainer=smoke", "trainer.max_steps=1",
                           "trainer.threads=1", "eval.splits=[test]", "eval.influence=false"), tmp_path / "run")
    assert rec["status"] == "ok"
    assert len(rec["model"]["warnings"]) == 1 and rec["model"]["warnings"][0].startswith("model.attention='bahdanau'")
