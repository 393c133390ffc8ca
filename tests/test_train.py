"""The training loop and the job: exact resume, records, end-to-end runs."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from seqbench.harness import job
from seqbench.harness.loss import smoothed_cross_entropy
from seqbench.harness.train import TrainConfig, lr_factor
from tests.conftest import ROOT
from tests.test_models import ARCHS


def losses(rec):
    return [(r["step"], r["loss"]) for r in rec["curves"]["train"]]


def test_resumed_run_logs_the_same_losses(make_cfg, tmp_path):
    common = ["model=transformer_tiny", "task=copy", "task.n_train=300", "task.n_valid=8", "task.n_test=8",
              "trainer=smoke", "trainer.max_tokens=256", "trainer.eval_every=3", "eval.splits=[test]"]
    full = job.run(make_cfg(*common, "trainer.max_steps=8"), tmp_path / "full")
    # stop after 5 steps (a different budget), then resume the same folder to 8
    part = job.run(make_cfg(*common, "trainer.max_steps=5"), tmp_path / "split")
    assert len(losses(part)) == 5
    resumed = job.run(make_cfg(*common, "trainer.max_steps=8"), tmp_path / "split")
    assert resumed["resumed_from_step"] == 5
    assert losses(resumed) == losses(full)
    assert resumed["metrics"]["test"]["bleu"] == full["metrics"]["test"]["bleu"]


def test_record_is_complete_and_written_atomically(make_cfg, tmp_path):
    rec = job.run(make_cfg("model=transformer_tiny", "task=copy", "task.n_train=200", "task.n_valid=8",
                           "task.n_test=8", "trainer=smoke"), tmp_path)
    on_disk = json.loads((tmp_path / "record.json").read_text())
    assert on_disk["status"] == "ok" and on_disk["schema_version"] == 1
    for key in ("config", "environment", "model", "task", "metrics", "costs", "curves", "job"):
        assert key in on_disk, key
    assert on_disk["environment"]["packages"]["torch"] == torch.__version__.split("+")[0] or \
        on_disk["environment"]["packages"]["torch"].startswith(torch.__version__.split("+")[0])
    assert on_disk["costs"]["train_flops"] > 0 and on_disk["costs"]["train_tokens_per_second"] > 0
    assert on_disk["model"]["parameters"] > 0
    assert {"bleu", "chrf", "bleu_signature", "sentences_per_second"} <= set(on_disk["metrics"]["test"])
    assert not list(tmp_path.glob(".*.tmp"))
    assert rec["status"] == "ok"


def test_failed_job_writes_a_failed_record(make_cfg, tmp_path):
    cfg = make_cfg("model=transformer_tiny", "model.n_heads=3", "task=copy", "task.n_train=50", "trainer=smoke")
    rec = job.run(cfg, tmp_path, raise_errors=False)
    assert rec["status"] == "failed" and "not divisible by model.n_heads=3" in rec["error"]
    assert json.loads((tmp_path / "record.json").read_text())["status"] == "failed"


def test_nan_loss_fails_the_job_with_the_step(make_cfg, tmp_path):
    cfg = make_cfg("model=transformer_tiny", "task=copy", "task.n_train=100", "trainer=smoke", "trainer.lr=1e30",
                   "trainer.warmup_steps=1")
    rec = job.run(cfg, tmp_path, raise_errors=False)
    assert rec["status"] == "failed" and "NonFiniteLoss" in rec["error"] and "at step" in rec["error"]


def test_no_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="no training budget"):
        TrainConfig(max_seconds=None)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_fused_loss_matches_cross_entropy_in_value_and_gradient(smoothing):
    torch.manual_seed(0)
    logits = torch.randn(5, 7, 11, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 11, (5, 7))
    target[0, :3] = target[4, 6] = 1  # ignored positions
    ref = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=1, label_smoothing=smoothing,
                          reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref * 0.3, logits)
    ours = smoothed_cross_entropy(logits, target, smoothing, ignore_index=1)
    (grad,) = torch.autograd.grad(ours * 0.3, logits)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-9)
    assert grad[0, :3].abs().max() == 0 and grad[4, 6].abs().max() == 0


def test_fused_loss_takes_low_precision_logits_and_refuses_a_second_backward():
    torch.manual_seed(0)
    logits = torch.randn(6, 9, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, 9, (6,))
    loss = smoothed_cross_entropy(logits, target, 0.1)
    ref = F.cross_entropy(logits.float(), target, label_smoothing=0.1, reduction="sum")
    torch.testing.assert_close(loss, ref)
    loss.backward(retain_graph=True)
    assert logits.grad.dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="runs once per forward"):
        loss.backward()
    with pytest.raises(ValueError, match=r"label smoothing must be in \[0, 1\)"):
        smoothed_cross_entropy(logits, target, 1.0)
    with pytest.raises(ValueError, match="disagree"):
        smoothed_cross_entropy(logits, target[:5], 0.1)


def test_inverse_sqrt_schedule_matches_the_paper():
    """lr = d^-0.5 * min(s^-0.5, s * w^-1.5) (Vaswani et al. eq. 3), written with its peak."""
    d, w = 512, 4000
    cfg = TrainConfig(lr=d**-0.5 * w**-0.5, warmup_steps=w, max_steps=10)
    for s in (1, 100, 3999, 4000, 4001, 20000):
        assert abs(cfg.lr * lr_factor(cfg, s - 1) - d**-0.5 * min(s**-0.5, s * w**-1.5)) < 1e-12


def test_cosine_schedule_follows_the_time_budget_without_max_steps():
    """Without max_steps the cosine anneals over max_seconds from the end of the warm-up: 1 there, 1/2 halfway to the
    budget's end, the floor at the end."""
    cfg = TrainConfig(lr=1e-3, schedule="cosine", warmup_steps=10, max_seconds=600, min_lr_ratio=0.1)
    assert lr_factor(cfg, 4, seconds=1.0, warm_end=(0.0, 0.0)) == pytest.approx(0.5)  # warm-up: no decay yet
    assert lr_factor(cfg, 50, seconds=0.0, warm_end=(0.0, 0.0)) == pytest.approx(1.0)
    assert lr_factor(cfg, 50, seconds=300.0, warm_end=(0.0, 0.0)) == pytest.approx(0.1 + 0.9 * 0.5)
    quarter = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))
    assert lr_factor(cfg, 50, seconds=150.0, warm_end=(0.0, 0.0)) == pytest.approx(quarter)
    assert lr_factor(cfg, 50, seconds=600.0, warm_end=(0.0, 0.0)) == pytest.approx(0.1)
    assert lr_factor(cfg, 50, seconds=900.0, warm_end=(0.0, 0.0)) == pytest.approx(0.1)  # past the budget
    # measured from the end of the warm-up: at 100 s of 600 the warm-up ended, so 350 s is half of the decay
    assert lr_factor(cfg, 50, seconds=350.0, warm_end=(100.0, 0.0)) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(cfg, 9, seconds=200.0, warm_end=None) == pytest.approx(1.0)  # the last warm-up step: no decay
    by_steps = TrainConfig(lr=1e-3, schedule="cosine", warmup_steps=10, max_steps=110, max_seconds=600)
    assert lr_factor(by_steps, 59, seconds=590.0) == pytest.approx(0.5)  # max_steps, when set, is the length


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_the_trainer_anneals_by_its_own_training_time(make_cfg, tmp_path):
    """The trainer's scheduler reads the run's training seconds (what the cosine over max_seconds needs)."""
    from seqbench.harness.train import Trainer

    cfg = make_cfg("model=transformer_tiny", "task=copy", "task.n_train=40", "task.n_valid=4", "task.n_test=4",
                   "trainer=smoke", "trainer.schedule=cosine", "trainer.max_steps=null", "trainer.max_seconds=100",
                   "trainer.warmup_steps=1")
    train_cfg, task, model, identity = job._build(cfg, torch.device("cpu"))
    trainer = Trainer(model, task, train_cfg, tmp_path, torch.device("cpu"), seed=1, identity=identity)
    trainer.p.warm_end = {"seconds": 20.0, "flops": 0.0}  # the warm-up ended at 20 s: the decay runs 20 -> 100 s
    trainer.p.train_seconds = 60.0
    trainer.sched.step()
    assert trainer.opt.param_groups[0]["lr"] == pytest.approx(train_cfg.lr * 0.5)
    trainer.p.train_seconds = 100.0
    trainer.sched.step()
    assert trainer.opt.param_groups[0]["lr"] == pytest.approx(0.0)


# every architecture on the copy task; on PTB the Transformer by default, the others with -m slow (seconds each)
END_TO_END = [pytest.param(arch, task, id=f"{task}-{arch}",
                           marks=pytest.mark.slow if task == "ptb" and arch != "transformer" else ())
              for task in ("copy", "ptb") for arch in ARCHS]


@pytest.mark.parametrize("arch, task", END_TO_END)
def test_every_model_runs_end_to_end(make_cfg, tmp_path, arch, task):
    extra = ["task.n_train=100", "task.n_valid=8", "task.n_test=8"] if task == "copy" else ["task.bptt=16"]
    rec = job.run(make_cfg(f"model={arch}_tiny", f"task={task}", "trainer=smoke", "trainer.max_steps=2", *extra),
                  tmp_path)
    assert rec["status"] == "ok"
    metric = "bleu" if task == "copy" else "perplexity"
    assert rec["metrics"]["test"][metric] >= 0


def test_run_py_command_line(tmp_path, data_root):
    """The command line as users type it: the data root comes from $SEQBENCH_DATA_ROOT (no data.root given)."""
    env = {**os.environ, "SEQBENCH_DATA_ROOT": str(data_root)}
    out = subprocess.run(
        [sys.executable, "run.py", "model=lstm_tiny", "task=ptb", "task.bptt=16", "trainer=smoke",
         "trainer.max_steps=2", "data.download=false", "device=cpu", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[seqbench] lstm-tiny_ptb_s1: ok | test ppl" in out.stdout
    run_log = (tmp_path / "run.log").read_text()
    assert "[seqbench] lstm-tiny_ptb_s1: ok | test ppl" in run_log  # the summary is in the job's log too
    assert "test evaluation (chunks): done" in run_log and "influence analysis: done" in run_log  # and the phases
    rec = json.loads((tmp_path / "record.json").read_text())
    assert rec["status"] == "ok"
    assert rec["task"]["name"] == "ptb"
