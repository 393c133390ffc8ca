"""trainer.stop_at: training ends at the first validation that reaches a target (Zoology stops MQAR at 0.99
accuracy), the record says so, a target that cannot be checked fails naming the metrics there are, and the
setting leaves older jobs' config digests and checkpoints usable."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from seqbench.harness import checkpoint, job, settings
from seqbench.harness.train import TrainConfig, target_reached

MQAR_SMALL = ("model=transformer_tiny", "task=mqar", "task.n_train=64", "task.n_valid=16", "task.n_test=16",
              "task.vocab_size=256", "task.seq_len=32", "task.num_kv_pairs=4", "trainer=smoke",
              "trainer.max_steps=8", "eval.splits=[valid]", "eval.influence=false")


def test_a_target_is_reached_from_the_right_side():
    assert target_reached({"valid_accuracy": 0.99}, {"valid_accuracy": 0.995})
    assert not target_reached({"valid_accuracy": 0.99}, {"valid_accuracy": 0.98})
    assert target_reached({"valid_nll": 1.0}, {"valid_nll": 0.5})  # a loss is reached from above
    assert not target_reached({"valid_nll": 1.0}, {"valid_nll": 1.5})
    assert not target_reached({"valid_accuracy": 0.5, "valid_nll": 1.0}, {"valid_accuracy": 0.6, "valid_nll": 2.0})
    assert not target_reached(None, {"valid_accuracy": 1.0}) and not target_reached({"valid_accuracy": 0.5}, None)
    with pytest.raises(ValueError, match=r"(?s)valid_bleu.*valid_accuracy.*trainer\.stop_at"):
        target_reached({"valid_bleu": 30.0}, {"step": 2, "valid_accuracy": 0.4, "valid_nll": 3.0})


@pytest.mark.parametrize("bad", [{}, {"accuracy": 0.99}, {"valid_accuracy": "high"}, {"valid_accuracy": float("nan")},
                                 [0.99], 0.99])
def test_a_bad_target_is_named_with_the_fix(bad, make_cfg):
    with pytest.raises(ValueError, match=r"trainer\.stop_at=.*valid_accuracy"):
        TrainConfig(max_steps=10, stop_at=bad)
    if isinstance(bad, dict):  # the settings check refuses it before any data is read
        found = settings.problems(make_cfg("model=transformer_tiny", "task=copy", f"trainer.stop_at={_hydra(bad)}"))
        assert any(f.startswith("trainer.stop_at=") and "valid_accuracy" in f for f in found), found


def _hydra(d: dict) -> str:
    return "{" + ",".join(f"{k}:{v!r}" if isinstance(v, str) else f"{k}:{v}" for k, v in d.items()) + "}"


def test_a_target_and_a_ladder_are_refused_together():
    with pytest.raises(ValueError, match=r"trainer\.stop_at.*trainer\.ladder"):
        TrainConfig(schedule="wsd", ladder=[1e9, 3e9], stop_at={"valid_accuracy": 0.9})


def test_training_ends_at_the_first_validation_that_reaches_the_target(make_cfg, tmp_path):
    reached = job.run(make_cfg(*MQAR_SMALL, "trainer.stop_at={valid_accuracy:0.0}"), tmp_path / "reached")
    assert reached["status"] == "ok" and reached["costs"]["ended_by"] == "stop_at"
    assert reached["costs"]["steps"] == 2  # the first validation (eval_every=2) reaches any accuracy >= 0
    assert [e["step"] for e in reached["curves"]["valid"]] == [2]  # not validated again after the loop
    never = job.run(make_cfg(*MQAR_SMALL, "trainer.stop_at={valid_accuracy:1.01}"), tmp_path / "never")
    assert never["costs"]["ended_by"] == "max_steps" and never["costs"]["steps"] == 8


def test_a_target_the_task_does_not_report_fails_naming_what_it_does(make_cfg, tmp_path):
    rec = job.run(make_cfg(*MQAR_SMALL, "trainer.stop_at={valid_bleu:30}"), tmp_path / "run", raise_errors=False)
    assert rec["status"] == "failed"
    assert "valid_bleu" in rec["error"] and "valid_accuracy" in rec["error"]
    assert (tmp_path / "run" / "last.pt").is_file()  # the steps trained so far are kept


def test_an_unset_target_leaves_the_config_digest_of_older_jobs(make_cfg):
    cfg = make_cfg("model=transformer_tiny", "task=copy")
    assert cfg.trainer.stop_at is None
    older = cfg.copy()
    OmegaConf.set_struct(older, False)
    del older.trainer["stop_at"]  # a config of a commit before the setting existed
    assert job.config_digest(cfg) == job.config_digest(older)
    assert job.config_digest(make_cfg("model=transformer_tiny", "task=copy",
                                      "trainer.stop_at={valid_accuracy:0.99}")) != job.config_digest(cfg)


def test_a_run_may_resume_with_another_target_but_not_with_another_lr(tmp_path):
    saved = {"model": "m", "config": {"trainer": {"lr": 1e-3, "stop_at": None}}}
    assert checkpoint.mismatch(tmp_path, saved, {"model": "m", "config": {
        "trainer": {"lr": 1e-3, "stop_at": {"valid_accuracy": 0.99}}}}) is None
    assert "trainer.lr" in checkpoint.mismatch(tmp_path, saved, {"model": "m", "config": {
        "trainer": {"lr": 3e-3, "stop_at": None}}})
