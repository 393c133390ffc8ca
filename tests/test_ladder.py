"""The budget ladder (trainer.ladder with schedule=wsd): one run per architecture and seed holds several FLOP
budgets. The lr is constant after the warm-up; at each rung a cooldown branches off the stable phase, the cooled
weights are evaluated, and training goes on from the stable state as if the branch had not been taken.

The loop tests count FLOPs as tokens (``flops_per_token = 1``) on a tiny copy task, so rungs are token counts.
"""
from __future__ import annotations

import json

import pytest
import torch

from seqbench import models
from seqbench.harness import job, settings
from seqbench.harness.train import STABLE, Interrupted, Trainer, TrainConfig, lr_factor
from seqbench.tasks import synthetic

CPU = torch.device("cpu")
LADDER = [600, 1500, 3200]  # tokens (FLOPs per token 1); the copy task's batches hold up to 64
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")


def trainer(folder, **settings) -> Trainer:
    """A 2-layer Transformer of width 32 on a tiny copy task (seed 1, dropout 0.3: the random streams matter)."""
    task = synthetic.copy(n_train=24, n_valid=4, n_test=4, n_symbols=8, min_len=3, max_len=6)
    torch.manual_seed(0)
    model = models.build({**models.load_preset("transformer_tiny"), "dropout": 0.3}, task)
    cfg = TrainConfig(**{"max_tokens": 64, "schedule": "wsd", "ladder": LADDER, "warmup_steps": 2, "lr": 1e-3,
                         "log_every": 1, "eval_every": 1000, "progress": False, "threads": None,
                         "valid_bleu": False, "precision": "fp32", **settings})
    t = Trainer(model, task, cfg, folder, CPU, seed=1, identity={"test": 1})
    t.flops_per_token = 1.0
    return t


def weights(t: Trainer) -> dict:
    return {k: v.clone() for k, v in t.model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def evaluated(t: Trainer, seen: list) -> None:
    """Record what the trainer hands to each rung's evaluation: rung, FLOPs, the lrs logged since the warm-up, weights."""
    t.on_rung = lambda k: seen.append((k, t.flops(), [row["lr"] for row in t.p.log[2:]], weights(t))) or {
        "metrics": {"k": k}}


def test_wsd_is_constant_after_the_warm_up_and_decays_over_the_last_share():
    run = TrainConfig(max_steps=101, schedule="wsd", warmup_steps=10, cooldown=0.2, min_lr_ratio=0.1)
    assert lr_factor(run, 4) == pytest.approx(0.5)  # warm-up
    assert lr_factor(run, 50) == lr_factor(run, 79) == 1.0  # stable up to 80% of the run
    assert lr_factor(run, 89) == pytest.approx(1 - 0.9 * (90 / 101 - 0.8) / 0.2)
    assert lr_factor(run, 100) == pytest.approx(0.1)  # the floor at the end
    ladder = TrainConfig(schedule="wsd", ladder=[100.0, 1000.0], warmup_steps=0, cooldown=0.2)
    assert ladder.max_flops == 1000.0  # the top rung is the budget
    assert lr_factor(ladder, 5, flops=950.0) == 1.0  # outside a rung's cooldown: stable, whatever the FLOPs
    assert lr_factor(ladder, 5, flops=90.0, rung=100.0) == pytest.approx(0.5)  # half-way through rung 0's cooldown
    assert lr_factor(ladder, 5, flops=900.0, rung=1000.0) == pytest.approx(0.5)


@pytest.mark.parametrize(("settings", "named"), [
    ({"schedule": "cosine"}, "trainer.schedule=wsd"),
    ({"ladder": [700, 300]}, "increasing"),
    ({"ladder": [300, 320]}, "cooldown"),
    ({"max_seconds": 60.0}, "trainer.max_seconds=null"),
    ({"max_flops": 999.0}, "trainer.max_flops=null"),
    ({"cooldown": 1.0}, "trainer.cooldown"),
])
def test_a_bad_ladder_is_named_with_its_fix(settings, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        TrainConfig(**{"schedule": "wsd", "ladder": [300.0, 1000.0], **settings})


def test_the_settings_check_asks_for_the_last_weights_and_a_well_formed_ladder(make_cfg):
    base = ("model=transformer_tiny", "task=copy", "trainer.schedule=wsd", "trainer.max_seconds=null",
            "trainer.ladder=[1e8,3e8]")
    found = settings.problems(make_cfg(*base, "eval.checkpoint=best"))
    assert any("eval.checkpoint=last" in f for f in found), found
    assert settings.problems(make_cfg(*base, "eval.checkpoint=last")) == []
    found = settings.problems(make_cfg(*base[:-1], "trainer.ladder=[3e8,1e8]", "eval.checkpoint=last"))
    assert any(f.startswith("trainer.ladder") for f in found), found


def test_each_rung_is_evaluated_cooled_and_the_stable_phase_goes_on_as_if_no_branch_was_taken(tmp_path):
    seen = []
    laddered = trainer(tmp_path / "ladder")
    evaluated(laddered, seen)
    progress = laddered.fit()
    assert [k for k, *_ in seen] == [0, 1]  # the top rung is the run's own end, evaluated by the job
    for (k, flops, lr, _), entry in zip(seen, progress.ladder):
        assert LADDER[k] <= flops < LADDER[k] + 64 and entry["train_flops"] == flops
        branch = entry["cooldown_from_step"]  # constant up to the branch, then decaying
        assert set(lr[:branch - 3]) == {1e-3} and lr[branch - 3:] == sorted(lr[branch - 3:], reverse=True)
        assert lr[-1] < 0.5e-3
        assert entry["rung"] == k and entry["metrics"] == {"k": k}
        assert LADDER[k] * 0.8 <= entry["cooldown_from_flops"] < LADDER[k] * 0.8 + 64
    assert (tmp_path / "ladder" / STABLE).is_file()
    # the same run with its top rung alone: identical weights at the end (stable phase, data order, dropout)
    alone = trainer(tmp_path / "alone", ladder=[LADDER[-1]])
    alone.fit()
    assert alone.p.step == laddered.p.step and same(weights(alone), weights(laddered))
    assert not same(seen[0][3], seen[1][3])


@pytest.mark.parametrize("stop_at", ["cooldown", "evaluation"])
def test_a_run_stopped_mid_ladder_resumes_to_the_same_result(tmp_path, stop_at):
    whole, seen_whole = trainer(tmp_path / "whole"), []
    evaluated(whole, seen_whole)
    whole.fit()
    first, seen_first = trainer(tmp_path / "split"), []
    evaluated(first, seen_first)
    if stop_at == "cooldown":  # inside rung 1's cooldown branch
        first.should_stop = lambda: bool(first.p.branch) and first.p.branch["rung"] == 1
    else:  # rung 1's evaluation is cut
        def stop_in_evaluation(k):
            if k == 1:
                raise Interrupted("stop requested during the evaluation")
            return {"metrics": {"k": k}}
        first.on_rung = stop_in_evaluation
    with pytest.raises(Interrupted):
        first.fit()
    second, seen_second = trainer(tmp_path / "split"), []
    evaluated(second, seen_second)
    progress = second.fit()
    assert second.resumed_from is not None
    assert [k for k, *_ in seen_second] == [1]  # rung 0 is not evaluated again; rung 1 is
    assert same(seen_second[0][3], seen_whole[1][3])
    assert [e["rung"] for e in progress.ladder] == [0, 1]
    assert same(weights(second), weights(whole))


def test_a_job_writes_each_rung_as_a_run_of_its_own(make_cfg, tmp_path):
    from seqbench.reports.load import load as load_records

    cfg = make_cfg("model=transformer_tiny", "task=copy", "trainer=smoke", "trainer.max_steps=null",
                   "trainer.schedule=wsd", "trainer.ladder=[2e8,6e8]", "eval.checkpoint=last",
                   "eval.splits=[valid]", "eval.influence=false")
    rec = job.run(cfg, tmp_path / "run")
    assert rec["status"] == "ok", rec.get("error")
    rung = json.loads((tmp_path / "run" / "rung_0" / "record.json").read_text())
    assert rung["status"] == "ok" and rung["config"]["trainer"]["max_flops"] == 2e8
    assert 2e8 <= rung["costs"]["train_flops"] < rec["costs"]["train_flops"]
    assert rung["costs"]["ended_by"] == "ladder_rung" and "valid" in rung["metrics"]
    assert [e["folder"] for e in rec["ladder"]] == ["rung_0", "."]
    assert rec["ladder"][1]["metrics"] == rec["metrics"] and rec["config"]["trainer"]["max_flops"] == 6e8
    assert rung["ladder_rung"]["rung"] == 0 and rec["ladder_rung"]["rung"] == 1
    assert rung["ladder_rung"]["run"] == rec["ladder_rung"]["run"] == rec["job"]["name"]
    runs = load_records([tmp_path]).runs
    assert len(runs) == 2 and runs["system"].nunique() == 2  # two budgets: two systems of one architecture
