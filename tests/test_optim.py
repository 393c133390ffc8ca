"""The trainer's optimizers and schedules (harness/optim.py, harness/train.py) and the papers' trainer presets."""
from __future__ import annotations

import math

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from seqbench.harness import job, optim, train
from seqbench.harness.settings import problems
from seqbench.harness.train import TrainConfig, lr_factor
from tests.conftest import ROOT

CPU = torch.device("cpu")
TINY_COPY = ["model=transformer_tiny", "task=copy", "task.n_train=60", "task.n_valid=4", "task.n_test=4",
             "trainer=smoke", "trainer.threads=1", "trainer.warmup_steps=0", "eval.splits=[test]",
             "eval.decoding.beam=1"]


def record_steps(monkeypatch) -> list[tuple[str, float]]:
    """(optimizer class, learning rate) of every optimizer step the trainer takes from now on."""
    steps, build = [], optim.build

    def recording(*args, **kwargs):
        opt = build(*args, **kwargs)
        opt.register_step_pre_hook(lambda o, *_: steps.append((type(o).__name__, o.param_groups[0]["lr"])))
        return opt

    monkeypatch.setattr(optim, "build", recording)
    return steps


def script_validation(monkeypatch, nll_by_step: dict[int, float]) -> None:
    """Validation losses fixed by step, so that the plateau schedule's decisions are known in advance."""
    def validate(self):
        nll = nll_by_step[self.p.step]
        return {"step": self.p.step, "train_seconds": round(self.p.train_seconds, 3), "tokens": self.p.tokens,
                "valid_nll": nll, "valid_ppl": math.exp(nll)}

    monkeypatch.setattr(train.Trainer, "_validate", validate)


# -- the optimizers --------------------------------------------------------------------------------

def one_step(cfg: TrainConfig, kind: str) -> float:
    """w = 1 and the loss 2w (gradient 2): the weight after one step of the optimizer ``kind``."""
    w = torch.nn.Parameter(torch.ones(1))
    opt = optim.build([w], cfg, CPU, kind)
    (2 * w).sum().backward()
    opt.step()
    return w.item()


def test_sgd_with_nesterov_momentum_takes_the_hand_computed_step():
    """Nesterov, momentum 0.99, lr 0.25, gradient 2: the buffer starts at the gradient, and the step is
    lr * (g + mu * buf) = 0.25 * 2 * 1.99 = 0.995, so w = 1 - 0.995 = 0.005. Without Nesterov: 1 - 0.25 * 2 = 0.5."""
    nag = TrainConfig(max_steps=1, optimizer="sgd", lr=0.25, momentum=0.99, nesterov=True)
    assert one_step(nag, "sgd") == pytest.approx(0.005, abs=1e-6)
    assert one_step(TrainConfig(max_steps=1, optimizer="sgd", lr=0.25), "sgd") == pytest.approx(0.5, abs=1e-7)


def test_adamw_decays_the_weights_apart_from_the_gradient_and_adam_through_it():
    """w = 1, gradient 2, lr 0.01, weight decay 0.5. Adam's first step moves w by lr whatever the gradient; AdamW
    shrinks w by lr x decay first (1 - 0.005) and then takes Adam's step (- 0.01): 0.985. Adam's L2 adds the decay
    to the gradient (2 + 0.5), which its normalisation cancels: still 1 - 0.01 = 0.99."""
    settings = {"max_steps": 1, "lr": 0.01, "weight_decay": 0.5, "betas": (0.9, 0.999), "eps": 1e-8}
    assert one_step(TrainConfig(optimizer="adamw", **settings), "adamw") == pytest.approx(0.985, abs=1e-6)
    assert one_step(TrainConfig(optimizer="adam", **settings), "adam") == pytest.approx(0.99, abs=1e-6)
    assert optim.phase(TrainConfig(max_steps=1, optimizer="adamw"), 5) == ("adamw", 0)


def test_adam_then_sgd_uses_each_learning_rate_in_its_phase():
    """Adam's first step moves a weight by lr whatever the gradient (1 - 0.01); SGD's by sgd_lr * g (1 - 0.5 * 2)."""
    cfg = TrainConfig(max_steps=1, optimizer="adam_then_sgd", lr=0.01, sgd_lr=0.5, switch_step=3, betas=(0.9, 0.999),
                      eps=1e-8)
    assert [optim.phase(cfg, s) for s in (0, 2, 3, 9)] == [("adam", 0), ("adam", 0), ("sgd", 3), ("sgd", 3)]
    assert one_step(cfg, "adam") == pytest.approx(0.99, abs=1e-6)
    assert one_step(cfg, "sgd") == pytest.approx(0.0, abs=1e-7)


def test_adam_then_sgd_switches_after_switch_step_steps(make_cfg, tmp_path, monkeypatch):
    steps = record_steps(monkeypatch)
    rec = job.run(make_cfg(*TINY_COPY, "trainer.max_steps=5", "trainer.optimizer=adam_then_sgd", "trainer.lr=1e-3",
                           "trainer.sgd_lr=0.5", "trainer.switch_step=3", "trainer.schedule=constant"), tmp_path)
    assert rec["status"] == "ok"
    assert steps == [("Adam", 1e-3)] * 3 + [("SGD", 0.5)] * 2


# -- the plateau schedule --------------------------------------------------------------------------

def test_plateau_factor_equals_hand_computed_values():
    """After warm-up: lr_shrink ** (validations that did not improve); during warm-up, times the warm-up's s / w."""
    cfg = TrainConfig(max_steps=10, schedule="plateau", lr_shrink=0.1, warmup_steps=4)
    assert lr_factor(cfg, 10, shrinks=0) == 1.0
    assert lr_factor(cfg, 10, shrinks=2) == pytest.approx(0.01)
    assert lr_factor(cfg, 1, shrinks=1) == pytest.approx(0.5 * 0.1)  # step 2 of 4 of the warm-up


PLATEAU = ["trainer.max_steps=8", "trainer.optimizer=sgd", "trainer.lr=0.5", "trainer.schedule=plateau",
           "trainer.lr_shrink=0.1"]
# validations every 2 steps: 3.0 (best), 3.5 (worse: shrink), 2.5 (best), 2.5 (not below the best: shrink)
NLL = {2: 3.0, 4: 3.5, 6: 2.5, 8: 2.5}


def test_plateau_schedule_shrinks_the_lr_after_a_validation_that_does_not_improve(make_cfg, tmp_path, monkeypatch):
    """Steps 1-4 at 0.5; the validation at step 4 is worse than step 2's: steps 5-8 at 0.05 (step 6 improves, so
    no shrink there); the one at step 8 equals the best, which is no improvement: the next lr would be 0.005."""
    steps = record_steps(monkeypatch)
    script_validation(monkeypatch, NLL)
    rec = job.run(make_cfg(*TINY_COPY, *PLATEAU), tmp_path)
    assert rec["status"] == "ok" and [r["valid_nll"] for r in rec["curves"]["valid"]] == [3.0, 3.5, 2.5, 2.5]
    assert [lr for _, lr in steps] == pytest.approx([0.5] * 4 + [0.05] * 4, rel=1e-12)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["progress"]["lr_shrinks"] == 2
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.005, rel=1e-12)


def test_training_stops_once_the_shrunk_lr_falls_below_stop_lr(make_cfg, tmp_path, monkeypatch):
    """Shrinks after the validations at steps 4 and 6: 0.5 -> 0.05 -> 0.005 < stop_lr 0.01, so step 6 is the last."""
    steps = record_steps(monkeypatch)
    script_validation(monkeypatch, {2: 3.0, 4: 3.5, 6: 3.2})
    rec = job.run(make_cfg(*TINY_COPY, *PLATEAU, "trainer.stop_lr=0.01"), tmp_path)
    assert rec["status"] == "ok" and rec["curves"]["train"][-1]["step"] == 6
    assert [lr for _, lr in steps] == pytest.approx([0.5] * 4 + [0.05] * 2, rel=1e-12)


# -- resuming ---------------------------------------------------------------------------------------

RESUMED = {
    "nesterov_plateau": [*PLATEAU, "trainer.momentum=0.99", "trainer.nesterov=true", "trainer.clip_norm=0.1"],
    "adam_then_sgd": ["trainer.max_steps=8", "trainer.optimizer=adam_then_sgd", "trainer.lr=3e-3",
                      "trainer.sgd_lr=0.1", "trainer.switch_step=3", "trainer.schedule=constant"],
}


@pytest.mark.parametrize("name,split", [("nesterov_plateau", 4), ("adam_then_sgd", 2), ("adam_then_sgd", 4)])
def test_a_run_resumed_from_last_pt_equals_the_uninterrupted_run(make_cfg, tmp_path, monkeypatch, name, split):
    """Stopped at step ``split`` (an evaluation: last.pt) and resumed to 8: the same losses and learning rates as
    one run of 8 steps; momentum buffers, the plateau's shrinks and the phase of adam_then_sgd (switching after
    step 3: before the split at 4, after the one at 2) all come back from last.pt."""
    steps = record_steps(monkeypatch)
    script_validation(monkeypatch, NLL)
    settings = [*TINY_COPY, "trainer.eval_every=2", *RESUMED[name]]
    full = job.run(make_cfg(*settings), tmp_path / "full")
    full_steps = list(steps)
    steps.clear()
    job.run(make_cfg(*settings, f"trainer.max_steps={split}"), tmp_path / "split")
    resumed = job.run(make_cfg(*settings), tmp_path / "split")
    assert resumed["resumed_from_step"] == split
    assert [(r["step"], r["loss"]) for r in resumed["curves"]["train"]] == \
        [(r["step"], r["loss"]) for r in full["curves"]["train"]]
    assert steps == full_steps and len(steps) == 8
    if name == "adam_then_sgd":
        assert [kind for kind, _ in steps] == ["Adam"] * 3 + ["SGD"] * 5


# -- settings ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("override,message", [
    ("trainer.optimizer=rmsprop", "trainer.optimizer='rmsprop'; valid: adam, adamw, sgd, adam_then_sgd"),
    ("trainer.momentum=1.0", "trainer.momentum=1.0 must be a finite number in [0, 1)"),
    ("trainer.nesterov=yes", "trainer.nesterov='yes' must be true or false"),
    ("trainer.sgd_lr=0", "trainer.sgd_lr=0 must be a finite number > 0"),
    ("trainer.switch_step=0", "trainer.switch_step=0 must be a positive integer or null"),
    ("trainer.lr_shrink=1.0", "trainer.lr_shrink=1.0 must be a finite number in (0, 1)"),
    ("trainer.stop_lr=-1", "trainer.stop_lr=-1 must be a finite number >= 0"),
])
def test_bad_optimizer_settings_are_named_at_start_up(make_cfg, override, message):
    assert any(p.startswith(message) for p in problems(make_cfg(override))), problems(make_cfg(override))


@pytest.mark.parametrize("settings,message", [
    ({"optimizer": "adam_then_sgd", "sgd_lr": 0.5}, "adam_then_sgd needs trainer.switch_step"),
    ({"optimizer": "adam_then_sgd", "switch_step": 10}, "and trainer.sgd_lr"),
    ({"optimizer": "sgd", "switch_step": 10}, "apply to trainer.optimizer=adam_then_sgd only, not sgd"),
    ({"optimizer": "adam", "momentum": 0.9}, "trainer.momentum and trainer.nesterov apply to SGD only"),
    ({"optimizer": "sgd", "nesterov": True}, "trainer.nesterov=true needs a trainer.momentum above 0"),
    ({"schedule": "reduce"}, "trainer.schedule='reduce'; valid: inverse_sqrt, constant, cosine, plateau"),
])
def test_optimizer_settings_that_do_not_fit_together_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(max_steps=1, **settings)


def test_a_paper_lr_without_d_model_is_a_clear_error(make_cfg):
    found = problems(make_cfg("trainer=paper", "~model.d_model"))
    assert any(p.startswith("trainer.lr cannot be computed:") and "model.d_model" in p and
               p.endswith("give trainer.lr a value") for p in found), found


# -- the papers' trainers ---------------------------------------------------------------------------

# setup -> model preset, optimizer, lr, schedule, max_steps, clip_norm, label smoothing, checkpoints averaged
PAPERS = {
    "transformer_base": ("transformer_base", "adam", 512**-0.5 * 4000**-0.5, "inverse_sqrt", 100_000, 0.0, 0.1, 5),
    "transformer_big": ("transformer_big", "adam", 1024**-0.5 * 4000**-0.5, "inverse_sqrt", 300_000, 0.0, 0.1, 20),
    "convs2s": ("convs2s_wmt_en_de", "sgd", 0.25, "plateau", 100_000, 0.1, 0.0, 5),
    "bytenet": ("bytenet_mt", "adam", 3e-4, "constant", 100_000, 0.0, 0.0, 5),
    "gnmt": ("lstm_gnmt", "adam_then_sgd", 2e-4, "constant", 100_000, 5.0, 0.0, 5),
}


@pytest.mark.parametrize("setup", sorted(PAPERS))
def test_paper_wmt14_trains_each_architecture_with_its_papers_trainer(make_cfg, setup):
    preset, optimizer, lr, schedule, steps, clip, smoothing, average = PAPERS[setup]
    cfg = make_cfg("experiment=paper_wmt14", f"paper_setup={setup}")
    assert problems(cfg) == []
    assert f"{cfg.model.name}_{cfg.model.preset}" == preset
    t = TrainConfig(**OmegaConf.to_container(cfg.trainer, resolve=True))
    assert (t.optimizer, t.schedule, t.max_steps, t.clip_norm, t.label_smoothing) == (
        optimizer, schedule, steps, clip, smoothing)
    assert t.lr == pytest.approx(lr, rel=1e-12)
    assert (cfg.eval.decoding.max_len_a, cfg.eval.decoding.max_len_b) == (1, 50)  # up to |s| + 50
    assert (cfg.eval.checkpoint, cfg.eval.average_last) == ("average", average)
    if setup == "convs2s":
        assert (t.momentum, t.nesterov, t.lr_shrink, t.stop_lr, t.warmup_steps) == (0.99, True, 0.1, 1e-4, 0)
    if setup == "gnmt":
        assert (t.switch_step, t.sgd_lr, t.betas) == (60_000, 0.5, (0.9, 0.999))


def test_paper_wmt14_sweeps_every_setup():
    sweep = yaml.safe_load((ROOT / "conf" / "experiment" / "paper_wmt14.yaml").read_text())
    swept = sweep["hydra"]["sweeper"]["params"]["paper_setup"].split(",")
    assert sorted(swept) == sorted(p.stem for p in (ROOT / "conf" / "paper_setup").glob("*.yaml")) == sorted(PAPERS)


@pytest.mark.parametrize("preset,d_model,peak", [("transformer_base", 512, 7.0e-4), ("transformer_big", 1024, 4.9e-4)])
def test_paper_trainer_follows_eq_3_for_the_models_width(make_cfg, preset, d_model, peak):
    """lr(s) = d_model^-0.5 * min(s^-0.5, s * 4000^-1.5): the peak, at s = 4000, is 7.0e-4 (base), 4.9e-4 (big)."""
    cfg = make_cfg("trainer=paper", f"model={preset}")
    t = TrainConfig(**OmegaConf.to_container(cfg.trainer, resolve=True))
    assert round(t.lr, 5) == peak
    for s in (1, 100, 4000, 4001, 20000):
        assert t.lr * lr_factor(t, s - 1) == pytest.approx(d_model**-0.5 * min(s**-0.5, s * 4000**-1.5), rel=1e-12)
