"""The trainer's smaller rules (harness/train.py), each against values derived by hand: the learning-rate schedules
with their default arguments, the settings' error messages, what the ``Trainer`` builds (device, autocast, loss
scaler, first optimizer phase, ``torch.compile``), what validation and the loop hand to their helpers (device,
autocast, progress bar, device syncs), the loss window's start, the per-epoch batch cache and stale temporary files.

Each test uses a 2-layer Transformer of width 32 on a tiny copy task, for a few steps at most.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from seqbench.harness import train
from seqbench.harness.train import TrainConfig, lr_factor
from tests.test_trainer_loop import epoch_batches, fake_clock, trainer

CPU = torch.device("cpu")
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")


# -- lr_factor ---------------------------------------------------------------------------------------------------
def test_inverse_sqrt_rises_linearly_over_the_warm_up_then_decays_as_one_over_the_root():
    """warmup 4: steps 0..3 give 1/4, 2/4, 3/4, 1; step 15 (the 16th) gives sqrt(4/16) = 1/2."""
    cfg = TrainConfig(max_steps=100, warmup_steps=4, schedule="inverse_sqrt")
    assert [lr_factor(cfg, step) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(cfg, 15) == 0.5


def test_plateau_without_shrinks_keeps_the_full_rate():
    """No shrinks given: the rate after the warm-up is lr itself; two shrinks of 0.1 give 1/100 of it."""
    cfg = TrainConfig(max_steps=100, warmup_steps=2, schedule="plateau", lr_shrink=0.1)
    assert [lr_factor(cfg, step) for step in (0, 1, 9)] == [0.5, 1.0, 1.0]
    assert lr_factor(cfg, 9, shrinks=2) == pytest.approx(0.01)


def test_cosine_over_seconds_starts_at_the_peak_and_reaches_the_floor_at_max_seconds():
    """No max_steps: progress = (seconds - s0) / (max_seconds - s0) from the end of the warm-up at s0 (here 0 s of
    4 s); 0 s is the peak, 1 s gives (1 + cos(pi/4)) / 2, 2 s gives 1/2, 4 s and beyond the floor 0. Before the
    warm-up's end is recorded (the step that ends it), no decay."""
    cfg = TrainConfig(max_seconds=4.0, warmup_steps=1, schedule="cosine")
    start = (0.0, 0.0)
    assert lr_factor(cfg, 7, warm_end=start) == 1.0
    assert lr_factor(cfg, 7, seconds=1.0, warm_end=start) == pytest.approx((1 + math.sqrt(0.5)) / 2)
    assert lr_factor(cfg, 7, seconds=2.0, warm_end=start) == pytest.approx(0.5)
    assert lr_factor(cfg, 7, seconds=4.0, warm_end=start) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(cfg, 7, seconds=9.0, warm_end=start) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(cfg, 7, seconds=3.0, warm_end=(2.0, 0.0)) == pytest.approx(0.5)  # half of 2 -> 4 s
    assert lr_factor(cfg, 1, seconds=3.0, warm_end=None) == 1.0


def test_cosine_one_step_past_the_warm_up_is_already_at_the_floor():
    """max_steps 5, warmup 4: one decay step; the 5th step (index 4) is at the floor min_lr_ratio = 0.1."""
    cfg = TrainConfig(max_steps=5, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_factor(cfg, step) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(cfg, 4) == pytest.approx(0.1)


def test_the_trainers_cosine_follows_the_training_time_it_has_spent(tmp_path):
    """Seconds-based cosine over 4 s, the warm-up over at 0 s: after 2 s of training the next step runs at half the
    rate."""
    t = trainer(tmp_path, max_steps=None, max_seconds=4.0, schedule="cosine", warmup_steps=1, lr=1e-3)
    t.p.warm_end = {"seconds": 0.0, "flops": 0.0}
    t.p.train_seconds = 2.0
    t.sched.step()
    assert t.opt.param_groups[0]["lr"] == pytest.approx(0.5e-3)


# -- TrainConfig's messages --------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings, message", [
    ({}, "no training budget: set trainer.max_steps, trainer.max_epochs, trainer.max_seconds or trainer.max_flops"),
    ({"max_epochs": 1, "schedule": "cosine"},
     "trainer.schedule=cosine needs trainer.max_steps, trainer.max_flops or trainer.max_seconds (its length)"),
    ({"max_steps": 1, "threads": 0},
     "trainer.threads=0; valid: auto (the cores free at the start), null (torch's default) or a positive integer"),
])
def test_a_bad_setting_is_named_with_its_fix(settings, message):
    """The whole message, word for word."""
    with pytest.raises(ValueError) as caught:
        TrainConfig(**settings)
    assert str(caught.value) == message


# -- what the Trainer builds -------------------------------------------------------------------------------------
def test_the_trainer_moves_the_model_to_its_device(tmp_path):
    """The meta device (shapes only) stands in for an accelerator: every parameter lands there."""
    t = trainer(tmp_path, device=torch.device("meta"))
    assert {p.device.type for p in t.model.parameters()} == {"meta"}


@pytest.mark.parametrize("precision, scaled", [("fp32", False), ("bf16", False), ("fp16", True)])
def test_only_fp16_scales_the_loss(tmp_path, precision, scaled):
    """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none. torch's initial scale
    is 2**16."""
    t = trainer(tmp_path, precision=precision)
    assert t.scaler.is_enabled() is scaled
    if scaled:
        assert t.scaler.get_scale() == 2.0 ** 16


def test_bf16_runs_the_forward_under_cpu_autocast(tmp_path):
    """precision=bf16 on CPU: the trainer's autocast context is torch's CPU autocast in bfloat16."""
    t = trainer(tmp_path, precision="bf16")
    assert t.precision == "bf16"
    with t.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_fp16_clipping_bounds_the_unscaled_update(tmp_path):
    """fp16 scales the loss by 2**16; the gradients are unscaled before clipping, so plain SGD with lr 1 and
    clip_norm 1e-3 moves the weights by exactly 1e-3 (clipping the scaled gradients would move them 2**16 times
    less)."""
    t = trainer(tmp_path, precision="fp16", optimizer="sgd", lr=1.0, clip_norm=1e-3)
    start = torch.cat([p.detach().flatten().clone() for p in t.model.parameters()])
    t.train_step(epoch_batches(t.task, 0)[0])
    moved = (torch.cat([p.detach().flatten() for p in t.model.parameters()]) - start).norm().item()
    assert moved == pytest.approx(1e-3, rel=1e-3)


def test_adam_takes_the_first_step_even_when_sgd_takes_over_after_one(tmp_path):
    """adam_then_sgd with switch_step 1: step 0 is Adam's, at lr (warm-up 1)."""
    t = trainer(tmp_path, optimizer="adam_then_sgd", switch_step=1, sgd_lr=0.5, warmup_steps=1)
    assert type(t.opt) is torch.optim.Adam
    assert t.opt.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_compile_wraps_the_model_in_torch_compile(tmp_path, monkeypatch):
    """trainer.compile=true: the forward pass is torch.compile of the model itself; false: the model."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module: compiled.append(module) or "compiled")
    plain = trainer(tmp_path / "plain")
    assert plain.forward is plain.model and compiled == []
    t = trainer(tmp_path / "compiled", compile=True)
    assert compiled == [t.model] and t.forward == "compiled"


# -- what validation and the loop hand on ------------------------------------------------------------------------
def test_validation_scores_on_the_trainers_device_at_its_precision(tmp_path, monkeypatch):
    """The teacher-forced loss is asked for on valid, on the trainer's device, with its batch size and its
    autocast (bf16 here)."""
    t = trainer(tmp_path, max_tokens=48, precision="bf16")
    asked = []

    def mean_nll(model, task, split, device, max_tokens, autocast=None, check_stop=None):
        asked.append((model, task, split, device, max_tokens, autocast))
        return 2.0, 10

    monkeypatch.setattr(train, "mean_nll", mean_nll)
    monkeypatch.setattr(t.task, "validate", lambda model, ctx: {})
    row = t.validate()
    assert asked == [(t.model, t.task, "valid", CPU, 48, t.autocast)]
    assert row["valid_nll"] == 2.0 and row["valid_ppl"] == pytest.approx(math.exp(2.0))


def test_carried_state_restarts_from_zero_at_each_epoch(tmp_path):
    """trainer.carry_state: the first batch of an epoch starts from no state (None), a later one from the state
    the previous batch ended in."""
    t = trainer(tmp_path)
    starts = []
    t.carry = SimpleNamespace(forward=lambda forward, batch, start: starts.append(start) or ("logits", "ended"))
    t.p.carried_state = "previous"
    t.p.batch_in_epoch = 0
    assert t._carried(None) == "logits" and t.p.carried_state == "ended"
    t.p.carried_state, t.p.batch_in_epoch = "previous", 3
    t._carried(None)
    assert starts == [None, "previous"]


def test_an_epochs_batches_are_built_once(tmp_path, monkeypatch):
    """Asking twice for epoch 0 builds its batches once; epoch 1 builds its own."""
    t = trainer(tmp_path)
    built = []
    real = t.task.batches
    monkeypatch.setattr(t.task, "batches", lambda *a, **k: built.append(k["epoch"]) or real(*a, **k))
    first = t.epoch_batches(0)
    assert t.epoch_batches(0) is first and built == [0]
    t.epoch_batches(1)
    assert built == [0, 1]


def test_a_fit_on_the_meta_device_feeds_the_model_batches_on_that_device(tmp_path):
    """The meta device stands in for an accelerator (no evaluation: meta tensors have no values): each batch is
    moved to the model's device before the forward pass, which would fail on CPU inputs."""
    t = trainer(tmp_path, device=torch.device("meta"), max_steps=2, log_every=1000)
    seen = []
    real_step = t.train_step
    t.train_step = lambda batch, n_tokens=None: seen.append(batch.target.device.type) or real_step(batch, n_tokens)
    t.evaluate_and_save = lambda: None
    assert t.fit().step == 2 and seen == ["meta", "meta"]


def test_the_loss_window_lives_on_the_trainers_device_whatever_torchs_default(tmp_path):
    """Under a default device of meta (tensors without values), a CPU trainer still sums its losses on CPU: the
    logged losses are those of the same run without it."""
    expected = [row["loss"] for row in trainer(tmp_path / "plain", max_steps=3, log_every=1).fit().log]
    t = trainer(tmp_path / "meta", max_steps=3, log_every=1)
    t.epoch_batches(0)  # the epoch's batches (3), built on CPU beforehand
    t.evaluate_and_save = lambda: None  # validation builds its batches under the default device
    with torch.device("meta"):
        p = t.fit()
    assert [row["loss"] for row in p.log] == pytest.approx(expected, rel=1e-6)


class Bar:
    """A stand-in for tqdm that records how it is built and moved."""

    made: list = []

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.updates, self.closed = args, kwargs, [], False
        Bar.made.append(self)

    def update(self, n):
        self.updates.append(n)

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        self.closed = True


@pytest.mark.parametrize("progress", [True, False])
def test_the_progress_bar_counts_steps_from_the_resumed_one(tmp_path, monkeypatch, progress):
    """A run resumed at step 2 of 4: the bar "train" runs to 4 from 2, one update per step, redrawn at most every
    2 s and as wide as the terminal; trainer.progress=false hides it."""
    trainer(tmp_path, max_steps=2).fit()
    Bar.made = []
    monkeypatch.setattr(train, "tqdm", Bar)
    trainer(tmp_path, max_steps=4, progress=progress).fit()
    (bar,) = Bar.made
    assert bar.args == ()
    assert bar.kwargs == {"total": 4, "initial": 2, "disable": not progress, "dynamic_ncols": True, "desc": "train",
                          "mininterval": 2.0}
    assert bar.updates == [1, 1] and bar.closed


def test_each_log_window_starts_empty(tmp_path, monkeypatch):
    """A clock advancing 1 s per reading times each step as 1 s; windows of two steps log 2 s each, so their
    tokens per second are their tokens / 2, the first window's and the second's alike."""
    fake_clock(monkeypatch)
    t = trainer(tmp_path, max_steps=4, log_every=2)
    batches = epoch_batches(t.task, 0) + epoch_batches(t.task, 1)  # the steps cross into epoch 1
    p = t.fit()
    assert [row["tokens_per_second"] for row in p.log] == pytest.approx(
        [sum(b.n_tokens for b in batches[:2]) / 2.0, sum(b.n_tokens for b in batches[2:4]) / 2.0])


def test_the_device_is_synced_at_each_log_step_and_where_the_budget_ends(tmp_path, monkeypatch):
    """A step is timed to its end (sync) at every multiple of log_every and at the last step of the budget:
    steps 2, 4 and 5 of 5; with an epoch budget, at the multiples and at the epoch's last step."""
    synced = []
    monkeypatch.setattr(train, "sync", lambda device: synced.append((t.p.step, device)))
    t = trainer(tmp_path / "steps", max_steps=5, log_every=2)
    t.fit()
    assert synced == [(2, CPU), (4, CPU), (5, CPU)]
    synced.clear()
    t = trainer(tmp_path / "epochs", max_steps=None, max_epochs=1, log_every=2)
    n = len(epoch_batches(t.task, 0))
    assert n % 2 == 1  # the epoch ends between two multiples
    t.fit()
    assert [step for step, _ in synced] == [*range(2, n, 2), n]


def test_remaining_time_is_shown_in_tenths_of_a_minute(tmp_path):
    """The time budget left, or the step budget's share of the time so far, whichever is less; never negative."""
    t = trainer(tmp_path, max_steps=10, max_seconds=600.0)
    assert t.eta() == "10.0min"  # no step yet: the time budget alone
    t.p.step, t.p.train_seconds = 5, 30.0
    assert t.eta() == "0.5min"  # 5 steps left at 6 s each
    t.p.step, t.p.train_seconds = 9, 599.5
    assert t.eta() == "0.0min"  # half a second left
    t.p.train_seconds = 700.0
    assert t.eta() == "0.0min"
    assert trainer(tmp_path / "e", max_steps=None, max_epochs=1).eta() == "?"


def test_resuming_removes_only_the_temporary_files_of_interrupted_checkpoint_writes(tmp_path):
    """``.<name>.pt.<random>.tmp`` is what a checkpoint write leaves when killed, in the run folder and in its
    snapshot folder ckpt/; other temporary files there are not the trainer's to delete."""
    (tmp_path / "ckpt").mkdir(parents=True)
    stale = [tmp_path / ".last.pt.k3j.tmp", tmp_path / "ckpt" / ".step_4.pt.x9z.tmp"]
    others = [tmp_path / ".notes.tmp", tmp_path / "ckpt" / ".notes.tmp"]
    for path in stale + others:
        path.write_text("partial")
    trainer(tmp_path).maybe_resume()
    assert [path.exists() for path in stale + others] == [False, False, True, True]
