"""A budget in counted training FLOPs (trainer.max_flops): training ends at the first step that reaches it, the
record says which budget ended training, and a cosine schedule decays over the FLOPs."""
from __future__ import annotations

import math

import pytest

from seqbench.harness import job, settings
from seqbench.harness.train import TrainConfig, lr_factor


def test_a_cosine_under_a_flop_budget_decays_over_the_flops_whatever_the_time():
    cfg = TrainConfig(max_flops=1e12, schedule="cosine", warmup_steps=0, min_lr_ratio=0.1)
    for flops, expected in ((0.0, 1.0), (5e11, 0.55), (1e12, 0.1), (2e12, 0.1)):
        assert lr_factor(cfg, 10, seconds=999.0, flops=flops, warm_end=(0.0, 0.0)) == pytest.approx(expected)
    # steps win over FLOPs when both are given (the schedule's length is the step budget), FLOPs over seconds
    both = TrainConfig(max_steps=100, max_flops=1e12, max_seconds=5.0, schedule="cosine", warmup_steps=0)
    assert lr_factor(both, 49, seconds=5.0, flops=1e12) == pytest.approx(0.5 * (1 + math.cos(math.pi * 49 / 99)))


def test_a_cosine_under_a_flop_budget_reaches_its_peak_after_the_warm_up(make_cfg, tmp_path):
    """The decay starts where the warm-up ends: the first step after it runs at the peak lr (the FLOPs spent in
    the warm-up are not already decayed away), and the last at the floor."""
    cfg = make_cfg("model=transformer_tiny", "task=copy", "trainer=smoke", "trainer.max_steps=null",
                   "trainer.max_flops=1.2e9", "trainer.schedule=cosine", "trainer.warmup_steps=3",
                   "trainer.log_every=1", "eval.splits=[valid]", "eval.influence=false")
    rec = job.run(cfg, tmp_path / "run")
    lrs = [row["lr"] for row in rec["curves"]["train"]]  # the lr each logged step leaves for the next
    peak = cfg.trainer.lr
    assert len(lrs) >= 6 and lrs[2] == pytest.approx(peak)  # left by step 3, the warm-up's last: the peak
    assert lrs[:3] == sorted(lrs[:3]) and lrs[2:] == sorted(lrs[2:], reverse=True) and lrs[-1] < 0.2 * peak


def test_a_flop_budget_is_a_budget_and_a_bad_one_is_named():
    TrainConfig(max_flops=3e13, max_seconds=None, schedule="cosine")  # the only budget: fine
    with pytest.raises(ValueError, match="trainer.max_flops=-1.0 is negative"):
        TrainConfig(max_flops=-1.0)


def test_the_settings_check_names_a_bad_flop_budget(make_cfg):
    found = settings.problems(make_cfg("model=transformer_tiny", "task=copy", "trainer.max_flops=-3e13"))
    assert any("trainer.max_flops=" in f and "negative" in f and "positive budget" in f for f in found), found
    assert settings.problems(make_cfg("model=transformer_tiny", "task=copy", "trainer.max_flops=3e13")) == []


def test_training_ends_at_the_first_step_that_reaches_the_flop_budget(make_cfg, tmp_path):
    cfg = make_cfg("model=transformer_tiny", "task=copy", "trainer=smoke", "trainer.max_steps=null",
                   "trainer.max_flops=3e8", "trainer.schedule=cosine", "eval.splits=[valid]", "eval.influence=false")
    rec = job.run(cfg, tmp_path / "run")
    costs = rec["costs"]
    assert rec["status"] == "ok" and costs["ended_by"] == "max_flops"
    per_step = costs["flops_per_token"] * cfg.trainer.max_tokens  # a step's FLOPs are at most this
    assert 3e8 <= costs["train_flops"] < 3e8 + per_step
    assert costs["steps"] >= 2
    assert rec["config"]["trainer"]["max_flops"] == 3e8


def test_a_step_budget_says_so_too(make_cfg, tmp_path):
    rec = job.run(make_cfg("model=transformer_tiny", "task=copy", "trainer=smoke", "eval.splits=[valid]",
                           "eval.influence=false"), tmp_path / "run")
    assert rec["costs"]["ended_by"] == "max_steps" and rec["costs"]["steps"] == 4
