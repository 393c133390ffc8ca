"""Evaluation limits (``eval.max_valid_tokens``, ``eval.max_test_tokens``), stated in the record; progress lines for
every evaluation phase; and the blocked language-model loss, which gives the whole-logits numbers."""
from __future__ import annotations

import json
import math
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from seqbench import models
from seqbench.harness import lm_protocol
from seqbench.harness.loss import sequence_nll
from seqbench.tasks.base import Shape
from seqbench.tasks.batching import Batch
from seqbench.tasks.lm import LMTask
from tests.conftest import ROOT


def run(args: list[str], out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "run.py", *args, "device=cpu", "data.download=false",
                           f"hydra.run.dir={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def text_folder(folder: Path, valid_lines: int = 30, test_lines: int = 40) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    words = "the cat sat on a mat and the dog ran to it".split()
    line = lambda i: " ".join(words[(i + k) % len(words)] for k in range(6))  # noqa: E731
    for split, n in (("train", 60), ("valid", valid_lines), ("test", test_lines)):
        (folder / f"{split}.txt").write_text("".join(line(i) + "\n" for i in range(n)))
    return folder


def test_limits_cut_validation_evaluation_and_influence_and_the_record_says_so(tmp_path):
    """``eval.max_valid_tokens=50`` (tokens) and ``eval.max_test_tokens=0.5`` (a fraction): the valid split is scored
    on its first 50 of 209 tokens (validation during training too), the test split on the first half; each split's
    metrics carry tokens_evaluated, tokens_total, limited and the setting, a warning is logged, and every phase
    logs its work at the start and its time at the end."""
    folder = text_folder(tmp_path / "text")  # valid: 30 lines x 7 tokens = 210 tokens (209 predicted); test: 279
    out = run(["model=transformer_tiny", "task=text_files", f"task.path={folder}", "task.bptt=16", "trainer=smoke",
               "trainer.max_steps=2", "eval.max_valid_tokens=50", "eval.max_test_tokens=0.5"], tmp_path / "out")
    assert out.returncode == 0, out.stderr[-3000:]
    rec = json.loads((tmp_path / "out" / "record.json").read_text())
    valid, test = rec["metrics"]["valid"], rec["metrics"]["test"]
    assert (valid["tokens_evaluated"], valid["tokens_total"], valid["limited"]) == (50, 209, True)
    assert valid["tokens"] == 50 and valid["limit"] == "eval.max_valid_tokens=50"
    assert (test["tokens_evaluated"], test["tokens_total"], test["limited"]) == (140, 279, True)
    assert test["limit"] == "eval.max_test_tokens=0.5" and "not comparable" in test["warning"]
    assert rec["analysis"]["influence_settings"]["max_valid_tokens"] == 50
    nll = json.loads((tmp_path / "out" / "test.nll.json").read_text())
    assert sum(nll["tokens"]) == 140
    log = (tmp_path / "out" / "run.log").read_text()
    for start, end in (("valid loss: 50 tokens", r"valid loss: done, 50 tokens in [\d.]+s"),
                       ("valid evaluation (chunks): 50 tokens", r"valid evaluation \(chunks\): done, 50 tokens in [\d.]+s"),
                       ("test evaluation (chunks): 140 tokens", r"test evaluation \(chunks\): done, 140 tokens in [\d.]+s"),
                       ("influence analysis: 50 positions", r"influence analysis: done, 50 positions in [\d.]+s")):
        assert start in log and re.search(end, log), start
    assert log.count("valid loss: done, 50 tokens") == 1  # validation during training (at step 2) read 50 too
    assert "scored on its first 50 of 209 tokens" in log
    assert "[first 140 of 279 tokens: eval.max_test_tokens=0.5]" in out.stdout  # the summary line says so too


def test_bad_limits_are_refused_naming_the_settings(tmp_path):
    """Both at once, before any data is read (the settings check lists every problem)."""
    out = run(["model=transformer_tiny", "task=text_files", f"task.path={tmp_path / 'nowhere'}", "trainer=smoke",
               "eval.max_valid_tokens=1.5", "eval.max_test_tokens=abc"], tmp_path / "out")
    assert out.returncode != 0
    message = out.stdout + out.stderr
    for shown in ("eval.max_valid_tokens=1.5", "eval.max_test_tokens='abc'"):
        line = next(line for line in message.splitlines() if shown in line)
        assert "fraction" in line and "positive integer" in line and "null" in line
    assert "not found" not in message  # refused before the (missing) data is looked for


def test_the_smoke_trainer_limits_evaluation_and_a_user_can_lift_it():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        smoke = compose("config", overrides=["trainer=smoke"])
        lifted = compose("config", overrides=["trainer=smoke", "eval.max_valid_tokens=null"])
        default = compose("config")
    assert smoke.eval.max_valid_tokens == smoke.eval.max_test_tokens == 10000
    assert lifted.eval.max_valid_tokens is None and lifted.eval.max_test_tokens == 10000
    assert default.eval.max_valid_tokens is None and default.eval.max_test_tokens is None
    assert smoke.trainer.max_steps == 4 and "max_valid_tokens" not in smoke.trainer  # the trainer's own settings


def test_limits_count_tokens_or_a_fraction_of_the_split():
    words = " ".join(f"w{i % 7}" for i in range(100))
    task = LMTask("t", {"train": [words], "valid": [words], "test": [words]}, bptt=8)  # 101 tokens: 100 predicted
    assert lm_protocol.valid_limit(None) and lm_protocol.valid_limit(7) and lm_protocol.valid_limit(0.25)
    assert not any(lm_protocol.valid_limit(v) for v in (0, -1, 0.0, 1.5, True, "7", math.nan))
    for limit, scored in ((None, 100), (30, 30), (1000, 100), (0.25, 25), (1.0, 100), (0.001, 1)):
        lm_protocol.limit_evaluation(task, {"max_valid_tokens": limit})
        for name in ("chunks", "sliding"):
            batches = lm_protocol.batches(task, "valid", 32, lm_protocol.Protocol(name, stride=4))
            assert sum(b.n_tokens for b in batches) == scored, (limit, name)


@pytest.mark.parametrize("arch", ["transformer", "lstm"])
def test_the_blocked_loss_equals_the_loss_of_the_whole_logits(arch):
    """The head runs a block of positions at a time (an 8 MiB block over a large vocabulary, here a few positions):
    the same per-sequence sums and counts as the whole logits give, carried state included."""
    torch.manual_seed(0)
    extra = {"n_heads": 2, "d_ff": 32} if arch == "transformer" else {}
    model = models.build({"name": arch, "d_model": 16, "n_layers": 2, **extra}, Shape("lm", {"lm": 40}))
    model.eval()
    tokens = torch.randint(0, 40, (3, 12))
    target = torch.randint(0, 40, (3, 12))
    target[1, :5] = -100
    batch = Batch({"tokens": tokens}, target, int((target != -100).sum()), ignore_index=-100)
    with torch.no_grad():
        expected = sequence_nll(model(tokens), target, -100)
        nll = lm_protocol.token_nll(model.head, _hidden(model, tokens), target, -100, block=40 * 5)  # 5 per block
        sums, counts, _ = lm_protocol.sequence_sums(model, batch)
        assert sums == pytest.approx(expected[0], rel=1e-6) and counts == expected[1]
        assert nll.sum(1).tolist() == pytest.approx(expected[0], rel=1e-6)
        per_token = F.cross_entropy(model(tokens).flatten(0, 1), target.flatten(), ignore_index=-100,
                                    reduction="none").view_as(target)
        torch.testing.assert_close(nll, per_token, rtol=1e-6, atol=1e-6)
        if arch == "lstm":
            state = model.init_state(3)
            logits, final = model(tokens, state=state)
            s2, _, carried = lm_protocol.sequence_sums(model, batch, state=state)
            assert s2 == pytest.approx(sequence_nll(logits, target, -100)[0], rel=1e-6)
            assert all(torch.equal(a, b) for a, b in zip(carried, final))
    assert "head" not in vars(model)  # the method is back


def _hidden(model, tokens):
    x = model.embed(tokens)
    for block in model.mixing_blocks():
        x = block(x)
    return x
