"""One tuning protocol for every architecture: ``experiment=tune`` end to end through run.py's multirun, and the
choice (reports/tuning.py) against values derived by hand from the records."""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from omegaconf import DictConfig, OmegaConf

from seqbench import reports
from seqbench.harness import job
from seqbench.harness import tuned as harness_tuned
from seqbench.harness.settings import SettingError
from seqbench.reports import tune_extend, tuning
from seqbench.reports.load import load
from tests.conftest import ROOT
from tests.test_reports import record, write_records


def write_text_folder(folder: Path) -> Path:
    """A small word-level language-modelling folder (train/valid/test.txt), fixed by its seed."""
    rng = random.Random(0)
    words = "the cat dog sat on mat a big small red runs jumps over under house tree".split()
    folder.mkdir(parents=True)
    for split, n in (("train", 400), ("valid", 40), ("test", 40)):
        lines = (" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(n))
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.mark.slow  # a whole tuning experiment with its extension and a comparison: about a minute
def test_experiment_tune_extends_past_the_edge_chooses_on_validation_and_guards_its_seeds(tmp_path, data_root):
    text, sweep = write_text_folder(tmp_path / "words"), tmp_path / "sweep"
    env = {**os.environ, "SEQBENCH_DATA_ROOT": str(data_root), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    common = [f"task.path={text}", "task=text_files", "trainer=smoke", "device=cpu", "data.download=false"]
    # two learning rates: the choice sits on one edge or the other, so the grid is extended by one point
    out = subprocess.run([sys.executable, "run.py", "-m", "experiment=tune", "model=transformer_tiny,lstm_tiny",
                          *common, "trainer.lr=1e-3,1e-2", "trainer.warmup_steps=2", "tune.extend.max_points=1",
                          "tune.extend.lr_max=null", f"hydra.sweep.dir={sweep}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/record.json"))]
    assert all(set(r["metrics"]) == {"valid"} for r in records)  # chosen on validation: the test set never decoded
    assert {r["status"] for r in records} == {"ok"} and {r["seed"] for r in records} == {101}  # tune.yaml's seed
    clip = {r["model"]["name"]: r["config"]["trainer"]["clip_norm"] for r in records}
    assert clip == {"lstm": 5.0, "transformer": 0.0}  # the LSTM's paper clips at 5; the Transformer's does not
    grid = [r for r in records if not r["job"]["output_dir"].split("/")[-1].startswith("extend_")]
    added = [r for r in records if r not in grid]
    assert len(grid) == 4 and len(added) == 2
    assert "trainer.lr=1e-3,1e-2" in (sweep / "multirun.yaml").read_text()  # the grid's own command line, kept
    chosen = yaml.safe_load((sweep / "tuned.yaml").read_text())["words"]
    md = (sweep / "report" / "report.md").read_text()  # built once the grid was final
    assert "## Tuning: one grid for every architecture" in md
    for model in ("transformer", "lstm"):
        arch = f"{model}-tiny"
        mine = [r for r in records if r["model"]["name"] == model]
        ppl = {r["config"]["trainer"]["lr"]: r["metrics"]["valid"]["perplexity"] for r in mine}
        first = min((ppl[lr], lr) for lr in (1e-3, 1e-2))[1]  # the choice on the grid alone: always on an edge
        extra = 1e-1 if first == 1e-2 else 1e-4  # one more point at the grid's ratio (10) past that edge
        assert set(ppl) == {1e-3, 1e-2, extra}
        best_ppl, best = min((v, lr) for lr, v in ppl.items())
        entry = chosen[arch]
        assert entry["overrides"] == [f"model={model}_tiny", f"trainer.lr={best}", "trainer.warmup_steps=2",
                                      f"trainer.clip_norm={int(clip[model])}"]
        assert entry["valid_ppl"] == pytest.approx(best_ppl) and entry["tuning_seeds"] == [101]
        assert entry["extension"]["added"] == [extra] and entry["extension"]["direction"] == (
            "upward" if extra > 1e-2 else "downward")
        assert entry["edge"] == (None if best != extra else "upper" if extra > 1e-2 else "lower")
        assert entry["budget"] == {"max_steps": 4, "max_tokens": 512}
        assert f"extending the grid {entry['extension']['direction']} to lr {tuning.lr_text(extra)}" in out.stdout
        assert f"grid extended {entry['extension']['direction']} by 1 point to {tuning.lr_text(extra)}" in out.stdout
        assert f"lr {extra:g} |" in md
    # the compare sweep reads the file on its own seed; a tuning seed is refused by name
    out = subprocess.run([sys.executable, "run.py", "-m", "model=transformer_tiny,lstm_tiny", *common,
                          f"tuned={sweep / 'tuned.yaml'}", "eval.splits=[valid]",
                          f"hydra.sweep.dir={tmp_path / 'cmp'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    compared = [json.loads(p.read_text()) for p in sorted((tmp_path / "cmp").glob("*/record.json"))]
    assert len(compared) == 2 and {r["status"] for r in compared} == {"ok"} and {r["seed"] for r in compared} == {1}
    for r in compared:
        assert f"trainer.lr={r['config']['trainer']['lr']}" in chosen[f"{r['model']['name']}-tiny"]["overrides"]
    out = subprocess.run([sys.executable, "run.py", "model=lstm_tiny", *common, "seed=101",
                          f"tuned={sweep / 'tuned.yaml'}", f"hydra.run.dir={tmp_path / 'same_seed'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode != 0 and "seed=101 is one of the seeds" in out.stderr


def grid_records() -> list[dict]:
    """Translation: the Transformer at lr 1e-3 (valid BLEU 20 and 24: mean 22), 2e-3 (23 and 23: mean 23) and 4e-3
    (failed); its test BLEU favours 1e-3, which must not count. The LSTM at 1e-3 and 2e-3 ties at 10: the smaller
    lr wins. Language model: perplexity, lower is better: 120 at 1e-3, 100 at 2e-3."""
    def run(model, task, seed, lr, valid, test, status="ok"):
        rec = record(model, task, seed, scores=(test, 50.0) if task == "multi30k" else (test,), status=status,
                     name=f"{model}_{task}_lr{lr}_s{seed}")
        rec["config"]["trainer"].update(lr=lr, warmup_steps=150, clip_norm=5.0 if model == "lstm" else 0.0)
        if status == "ok":
            rec["metrics"]["valid"] = {"bleu": valid, "chrf": 50.0} if task == "multi30k" else {"perplexity": valid}
        return rec
    return [run("transformer", "multi30k", 1, 1e-3, 20.0, 30.0), run("transformer", "multi30k", 2, 1e-3, 24.0, 30.0),
            run("transformer", "multi30k", 1, 2e-3, 23.0, 10.0), run("transformer", "multi30k", 2, 2e-3, 23.0, 10.0),
            run("transformer", "multi30k", 1, 4e-3, None, None, status="failed"),
            run("lstm", "multi30k", 1, 1e-3, 10.0, 12.0), run("lstm", "multi30k", 1, 2e-3, 10.0, 12.0),
            run("transformer", "wikitext2", 1, 1e-3, 120.0, 90.0),
            run("transformer", "wikitext2", 1, 2e-3, 100.0, 95.0)]


def test_the_choice_is_the_best_mean_validation_score_per_architecture(tmp_path):
    runs = load([write_records(tmp_path, grid_records())]).runs
    points = tuning.grid(runs)
    assert tuning.is_grid(points)
    chosen = tuning.choose(points)
    picked = {(r.task, r.architecture): (r.lr, r.valid, r.seeds) for r in chosen.itertuples()}
    assert picked == {("multi30k", "lstm-tiny"): (1e-3, 10.0, 1), ("multi30k", "transformer-tiny"): (2e-3, 23.0, 2),
                      ("wikitext2", "transformer-tiny"): (2e-3, 100.0, 1)}
    failed = points[(points["architecture"] == "transformer-tiny") & (points["lr"] == 4e-3)].iloc[0]
    assert failed["failed"] == 1 and failed["seeds"] == 0 and pd.isna(failed["valid"])
    results = {(o.task, o.architecture): o for o in tuning.outcomes(points)}
    # a failed rate above the choice brackets it; a tie at the smallest rate, and the best at the largest, do not
    assert {k: o.edge for k, o in results.items()} == {("multi30k", "lstm-tiny"): "lower",
                                                       ("multi30k", "transformer-tiny"): None,
                                                       ("wikitext2", "transformer-tiny"): "upper"}
    assert tuning.tuned(list(results.values()))["multi30k"]["lstm-tiny"] == {
        "overrides": ["model=lstm_tiny", "trainer.lr=0.001", "trainer.warmup_steps=150", "trainer.clip_norm=5"],
        "valid_bleu": 10.0, "seeds": 1, "tuning_seeds": [1], "lrs_tried": [1e-3, 2e-3], "edge": "lower",
        "extension": None, "budget": {"max_seconds": 60, "max_tokens": 4096},
        "cost": {"runs": 2, "train_flops": 2e12, "train_seconds": 120, "job_seconds": 0}}
    assert tuning.bracket(results["wikitext2", "transformer-tiny"]) == (
        "on the grid's upper edge: the optimum may lie above 2e-3")
    assert tuning.bracket(results["multi30k", "transformer-tiny"]) == "interior"


def test_the_grid_states_what_it_cost_per_architecture_and_in_all(tmp_path):
    recs = grid_records()
    for rec, (start, end) in zip(recs[:2], (("12:00:00", "12:10:00"), ("12:10:00", "12:25:30"))):
        rec["job"].update(started=f"2026-12-06T{start}+00:00", finished=f"2026-12-06T{end}+00:00")
    recs[2]["costs"].update(train_seconds=1800.0, train_flops=3e12)
    runs = load([write_records(tmp_path / "records", recs)]).runs
    assert sorted(runs["job_seconds"].dropna()) == [600.0, 930.0]  # finished - started; none without both
    results = {(o.task, o.architecture): o for o in tuning.outcomes(tuning.grid(runs))}
    # the Transformer's translation grid: five runs, the failed one included; its FLOPs and seconds where stated
    assert results["multi30k", "transformer-tiny"].cost == {
        "runs": 5, "train_flops": 1e12 + 1e12 + 3e12 + 1e12, "train_seconds": 60 + 60 + 1800 + 60,
        "job_seconds": 600 + 930}
    assert tuning.tuned(list(results.values()))["multi30k"]["transformer-tiny"]["cost"]["runs"] == 5
    choice = tuning.choice_display(list(results.values())).set_index(["task", "architecture"])
    assert "5 runs" in choice.loc[("multi30k", "transformer-tiny"), "grid cost"]
    notes = [b.text for s in tuning.sections(runs) for b in s.blocks if hasattr(b, "text")]
    total = [n for n in notes if n.startswith("Tuning multi30k cost")]
    # 5 + 2 LSTM runs; 6e12 + 2e12 FLOPs; (1,980 + 120) s = 0.58 h of training; 1,530 s = 0.42 h of jobs
    assert len(total) == 1 and "7 runs" in total[0] and "8e+12 training FLOPs" in total[0]
    assert "0.58 h training" in total[0] and "0.42 h with set-up and evaluation" in total[0]


@pytest.mark.parametrize("lrs,chosen,expected", [
    ([5e-4, 1e-3, 2e-3, 4e-3], 4e-3, "upper"), ([5e-4, 1e-3, 2e-3, 4e-3], 5e-4, "lower"),
    ([5e-4, 1e-3, 2e-3, 4e-3], 1e-3, None), ([4e-3, 1e-3, 1e-3], 0.004, "upper"), ([1e-3], 1e-3, None),
    ([1e-3, 2e-3], None, None)])
def test_an_edge_is_the_smallest_or_largest_rate_tried(lrs, chosen, expected):
    assert tuning.edge(lrs, chosen) == expected


def test_the_next_point_continues_the_grids_ratio_past_its_edge():
    grid = [5e-4, 1e-3, 2e-3, 4e-3]
    assert tune_extend.next_lr(grid, "upper") == 8e-3 and tune_extend.next_lr(grid, "lower") == 2.5e-4
    assert tune_extend.next_lr([*grid, 8e-3], "upper") == 1.6e-2
    assert tune_extend.next_lr([1e-3, 3e-3, 9e-3], "upper") == 2.7e-2  # ratio 3
    with pytest.raises(tune_extend.ExtensionError, match="one learning rate tried"):
        tune_extend.next_lr([1e-3], "upper")


GRID_LRS = [5e-4, 1e-3, 2e-3, 4e-3]


@pytest.mark.parametrize("lrs,chosen,bounds,expected", [
    (GRID_LRS, 4e-3, tune_extend.Limits(2), (8e-3, "upward", "the choice 4e-3 is on the grid's upper edge")),
    (GRID_LRS, 5e-4, tune_extend.Limits(2), (2.5e-4, "downward", "the choice 5e-4 is on the grid's lower edge")),
    ([*GRID_LRS, 8e-3], 8e-3, tune_extend.Limits(2), (1.6e-2, "upward", "the choice 8e-3 is on the grid's upper edge")),
    (GRID_LRS, 2e-3, tune_extend.Limits(2), (None, None, "the choice is interior")),
    ([*GRID_LRS, 8e-3], 4e-3, tune_extend.Limits(2), (None, None, "the choice is interior")),
    (GRID_LRS, None, tune_extend.Limits(2), (None, None, "no grid point was scored")),
    ([*GRID_LRS, 8e-3, 1.6e-2], 1.6e-2, tune_extend.Limits(2),
     (None, "upward", "tune.extend.max_points=2 reached")),
    (GRID_LRS, 4e-3, tune_extend.Limits(0), (None, "upward", "tune.extend.max_points=0 reached")),
    (GRID_LRS, 4e-3, tune_extend.Limits(2, lr_max=5e-3),
     (None, "upward", "the next point 8e-3 is above tune.extend.lr_max=5e-3")),
    (GRID_LRS, 5e-4, tune_extend.Limits(2, lr_min=3e-4),
     (None, "downward", "the next point 2.5e-4 is below tune.extend.lr_min=3e-4")),
    (GRID_LRS, 4e-3, tune_extend.Limits(2, lr_min=3e-4, lr_max=8e-3), (8e-3, "upward",
                                                                      "the choice 4e-3 is on the grid's upper edge")),
])
def test_each_step_adds_the_next_point_or_says_why_it_stops(lrs, chosen, bounds, expected):
    s = tune_extend.step(lrs, chosen, GRID_LRS, bounds)
    assert (s.lr, s.direction, s.reason) == expected


@pytest.mark.parametrize("node,message", [
    ({"max_points": -1}, "tune.extend.max_points=-1: give a whole number >= 0"),
    ({"max_points": 1.5}, "tune.extend.max_points=1.5"),
    ({"max_points": 2, "lr_max": 0}, "tune.extend.lr_max=0: give a positive learning rate, or null"),
    ({"max_points": 2, "lr_min": "x"}, "tune.extend.lr_min='x'"),
    ({"max_points": 2, "lr_min": 1e-2, "lr_max": 1e-3}, "tune.extend.lr_min=0.01 is not below tune.extend.lr_max"),
])
def test_bad_extension_limits_are_named_with_the_fix(node, message):
    with pytest.raises(tune_extend.ExtensionError, match=re.escape(message)):
        tune_extend.limits(node)
    assert tune_extend.limits({"max_points": 2, "lr_min": 1e-4, "lr_max": None}) == tune_extend.Limits(2, 1e-4, None)


def test_a_grid_point_with_a_failed_or_diverged_seed_is_never_chosen(tmp_path):
    """lr 1e-3: seed 1 scores 30 (the best of all), seed 2 diverged: not the mean of its survivor. lr 2e-3: 20, 22.
    lr 4e-3: one seed failed, one did not finish."""
    recs = [tune_record("transformer", 1, 1e-3, 30.0), tune_record("transformer", 2, 1e-3, None, status="failed",
                                                                   error="Diverged: the model diverged"),
            tune_record("transformer", 1, 2e-3, 20.0), tune_record("transformer", 2, 2e-3, 22.0),
            tune_record("transformer", 1, 4e-3, None, status="failed", error="RuntimeError: CUDA out of memory"),
            tune_record("transformer", 2, 4e-3, None, status="interrupted", error="Interrupted: SIGTERM")]
    points = tuning.grid(load([write_records(tmp_path / "records", recs)]).runs)
    diverged = points[points["lr"] == 1e-3].iloc[0]
    assert pd.isna(diverged["valid"]) and (diverged["seeds"], diverged["failed"], diverged["diverged"]) == (1, 1, 1)
    assert tuning._cell(diverged) == "not scored (1 diverged)"
    other = points[points["lr"] == 4e-3].iloc[0]
    assert tuning._cell(other) == "– (1 failed, 1 unfinished)"
    [o] = tuning.outcomes(points)
    assert (o.chosen["lr"], o.chosen["valid"], o.edge) == (2e-3, 21.0, None)  # bracketed by failures on both sides
    assert o.seeds == [1, 2]
    reports.build([tmp_path / "records"], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| transformer-tiny | 150 | 0 | not scored (1 diverged) | 21.00 (n=2) ✓ | – (1 failed, 1 unfinished) |" in md


def test_an_architecture_whose_every_point_failed_has_no_choice(tmp_path, make_cfg, capsys):
    recs = [tune_record("gru", 1, lr, None, status="failed", error="Diverged: the model diverged")
            for lr in (1e-3, 2e-3)] + [tune_record("lstm", 1, 1e-3, 12.0), tune_record("lstm", 1, 2e-3, 11.0)]
    sweep = write_records(tmp_path / "sweep", recs)
    assert tuning.main([str(sweep)]) == 0
    printed = capsys.readouterr().out
    assert "multi30k gru-tiny: no choice: every grid point of gru-tiny on multi30k failed" in printed
    assert "multi30k lstm-tiny (valid bleu 12, 1 seeds): model=lstm_tiny trainer.lr=0.001" in printed
    entry = yaml.safe_load((sweep / "tuned.yaml").read_text())["multi30k"]["gru-tiny"]
    assert entry["overrides"] is None and "lower the learning rates" in entry["no_choice"]
    reports.build([sweep], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| multi30k | gru-tiny | – | – | – | no choice | no choice | – |" in md
    with pytest.raises(SettingError, match=re.escape("the tuning chose no settings for gru-tiny on multi30k: every")):
        harness_tuned.apply(make_cfg("model=gru_tiny", "task=multi30k", f"tuned={sweep / 'tuned.yaml'}", "seed=1"),
                            given=set())


def test_a_grid_not_yet_finished_says_to_finish_the_sweep_not_to_lower_the_rates(tmp_path):
    recs = [tune_record("gru", 1, lr, None, status="interrupted", error="Interrupted: SIGTERM") for lr in (1e-3, 2e-3)]
    sweep = write_records(tmp_path / "sweep", recs)
    assert tuning.main([str(sweep)]) == 0
    entry = yaml.safe_load((sweep / "tuned.yaml").read_text())["multi30k"]["gru-tiny"]
    assert entry["overrides"] is None and "2 runs unfinished" in entry["no_choice"]
    assert "hydra.sweep.dir" in entry["no_choice"] and "lower the learning rates" not in entry["no_choice"]


def tune_record(model: str, seed: int, lr: float, valid: float | None, *, status: str = "ok", error=None,
                warmup: int = 150, task: str = "multi30k", budget: dict | None = None) -> dict:
    """A tuning run's record: translation, validation BLEU ``valid``."""
    rec = record(model, task, seed, scores=(valid or 0.0, 50.0), status=status, error=error, budget=budget,
                 name=f"{model}-tiny_{task}_s{seed}_lr{lr}_w{warmup}")
    rec["config"]["trainer"].update(lr=lr, warmup_steps=warmup, clip_norm=0.0)
    if status == "ok":
        rec["metrics"]["valid"] = {"bleu": valid, "chrf": 50.0}
    return rec


def write_sweep(sweep: Path, recs: list[dict], folders: str = "") -> Path:
    """Records in a sweep's job folders, each with the overrides Hydra saves (.hydra/overrides.yaml)."""
    for rec in recs:
        trainer = rec["config"]["trainer"]
        job = sweep / f"{folders}{rec['job']['name']}"
        (job / ".hydra").mkdir(parents=True)
        rec["job"]["output_dir"] = str(job)
        (job / "record.json").write_text(json.dumps(rec))
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([
            "experiment=tune", f"model={rec['model']['name']}_tiny", f"task={rec['task']['name']}",
            f"trainer.lr={trainer['lr']}", f"trainer.warmup_steps={trainer['warmup_steps']}"]))
    return sweep


def sweep_config(sweep: Path, **extend) -> DictConfig:
    """The config an experiment=tune sweep's end-of-sweep callback gets (what extension reads of it)."""
    return OmegaConf.create({
        "tune": {"extend": {"enabled": True, "max_points": 2, "lr_min": None, "lr_max": None, **extend}},
        "trainer": {"lr": 2e-3},
        "hydra": {"sweep": {"dir": str(sweep)}, "sweeper": {"params": {"trainer.lr": "5e-4,1e-3,2e-3,4e-3"}},
                  "overrides": {"task": ["experiment=tune", "model=transformer_tiny,lstm_tiny"],
                                "hydra": ["hydra/launcher=slurm", f"hydra.sweep.dir={sweep}", "hydra.mode=MULTIRUN"]}}})


def test_the_grid_is_extended_past_the_edge_until_the_choice_is_interior(tmp_path):
    """The Transformer's best is the largest rate (4e-3): 8e-3 is run (both warm-ups, both seeds) and is worse, so 4e-3
    is interior; the LSTM's best is interior from the start and runs nothing more."""
    sweep = tmp_path / "sweep"
    recs = [tune_record("transformer", seed, lr, 10.0 * k + seed / 100 + w / 1000, warmup=w)
            for k, lr in enumerate(GRID_LRS) for seed in (101, 102) for w in (50, 150)]
    recs += [tune_record("lstm", 101, lr, v, warmup=50) for lr, v in zip(GRID_LRS, (5.0, 9.0, 7.0, 6.0))]
    write_sweep(sweep, recs)
    (sweep / "multirun.yaml").write_text("the grid's own\n")
    launched = []

    def run(command, folder):
        launched.append(list(command))
        line = dict(o.split("=", 1) for o in command[2:] if "=" in o)
        assert line["hydra.sweep.dir"] == f"'{sweep.resolve()}'"
        lr = float(line["trainer.lr"])
        write_sweep(folder, [tune_record("transformer", int(seed), lr, 1.0, warmup=int(w))
                             for seed in line.get("seed", "101").split(",")
                             for w in line["trainer.warmup_steps"].split(",")], folders="extend_")
        return 0

    ledger = tune_extend.extend_sweep(sweep_config(sweep), sweep, run=run, program=["python", "run.py"])
    assert len(launched) == 1
    assert launched[0] == ["python", "run.py", "--multirun", "experiment=tune", "model=transformer_tiny",
                           "task=multi30k", "trainer.warmup_steps=50,150", "trainer.lr=0.008",
                           "hydra/launcher=slurm", f"hydra.sweep.dir='{sweep.resolve()}'",
                           f"hydra.sweep.subdir={tune_extend.SUBDIR}", "~hydra.callbacks.report"]
    assert ledger == {"multi30k": {"transformer-tiny": {"direction": "upward", "added": [8e-3],
                                                        "stopped": "the choice is interior"}}}
    path, results = tuning.write(sweep)
    entry = yaml.safe_load(path.read_text())["multi30k"]["transformer-tiny"]
    assert entry["edge"] is None and entry["extension"] == ledger["multi30k"]["transformer-tiny"]
    assert entry["lrs_tried"] == [*GRID_LRS, 8e-3] and entry["tuning_seeds"] == [101, 102]
    assert "trainer.lr=0.004" in entry["overrides"] and "trainer.warmup_steps=150" in entry["overrides"]
    assert tuning.bracket(results[1]) == "interior; grid extended upward by 1 point to 8e-3"


def test_an_unfinished_point_past_the_edge_brackets_nothing_and_is_run_again(tmp_path):
    """An extension point that was interrupted (a stopped sweep) neither brackets the choice nor counts as tried:
    the choice stays on the edge and the extension runs that point again (into its folder: it resumes)."""
    recs = [tune_record("gru", 101, lr, 10.0 * k) for k, lr in enumerate(GRID_LRS)]
    recs.append(tune_record("gru", 101, 8e-3, None, status="interrupted"))
    runs = load([write_records(tmp_path, recs)]).runs
    [o] = tuning.outcomes(tuning.grid(runs))
    assert o.unfinished == 1 and o.lrs == GRID_LRS and o.edge == "upper"
    assert tune_extend.step(o.lrs, 4e-3, GRID_LRS, tune_extend.Limits(max_points=2)).lr == 8e-3
    failed = [*recs[:-1], tune_record("gru", 101, 8e-3, None, status="failed", error="NonFiniteLoss: nan")]
    [o] = tuning.outcomes(tuning.grid(load([write_records(tmp_path / "failed", failed)]).runs))
    assert o.lrs == [*GRID_LRS, 8e-3] and o.edge is None  # a diverged rate above the choice brackets it


@pytest.mark.parametrize("launcher,side_by_side", [
    ({"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": 2}, 2),
    (None, 1)])  # the basic launcher: one job at a time, so one child sweep at a time
def test_children_of_one_step_run_side_by_side_as_far_as_the_launcher_does(tmp_path, launcher, side_by_side):
    """Two architectures on the upper edge, each child sweep one job: under joblib with two jobs at a time both
    children run at once (each waits for the other to start), with the basic launcher one after the other."""
    import threading
    import time

    sweep = tmp_path / "sweep"
    recs = [tune_record(model, 101, lr, 10.0 * k, warmup=50) for model in ("transformer", "lstm")
            for k, lr in enumerate(GRID_LRS)]
    write_sweep(sweep, recs)
    (sweep / "multirun.yaml").write_text("the grid's own\n")
    config = sweep_config(sweep, max_points=1)
    if launcher is not None:
        config.hydra.launcher = launcher
    running, most, lock = [0], [0], threading.Lock()

    def run(command, folder):
        model = dict(o.split("=", 1) for o in command if "=" in o)["model"].removesuffix("_tiny")
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        deadline = time.monotonic() + 5
        while side_by_side == 2 and most[0] < 2 and time.monotonic() < deadline:  # wait for the other child
            time.sleep(0.01)
        (folder / "multirun.yaml").write_text(f"child {model}\n")
        write_sweep(folder, [tune_record(model, 101, 8e-3, 1.0, warmup=50)], folders=f"extend_{model}_")
        with lock:
            running[0] -= 1
        return 0

    ledger = tune_extend.extend_sweep(config, sweep, run=run, program=["seqbench"])
    assert most[0] == side_by_side
    assert {arch: e["added"] for arch, e in ledger["multi30k"].items()} == {"transformer-tiny": [8e-3],
                                                                          "lstm-tiny": [8e-3]}
    assert (sweep / "multirun.yaml").read_text() == "the grid's own\n"  # whatever the children left there


def test_the_extension_stops_at_max_points_and_says_so(tmp_path, capsys):
    """Each added rate is the best so far: 8e-3, then 1.6e-2, then max_points=2 stops it, still on the edge."""
    sweep = tmp_path / "sweep"
    write_sweep(sweep, [tune_record("gru", 101, lr, 10.0 * k) for k, lr in enumerate(GRID_LRS)])
    launched = []

    def run(command, folder):
        lr = float(dict(o.split("=", 1) for o in command if "=" in o)["trainer.lr"])
        launched.append(lr)
        write_sweep(folder, [tune_record("gru", 101, lr, 40.0 + 10 * len(launched))], folders="extend_")
        return 0

    ledger = tune_extend.extend_sweep(sweep_config(sweep), sweep, run=run, program=["seqbench"])
    assert launched == [8e-3, 1.6e-2]
    assert ledger["multi30k"]["gru-tiny"] == {"direction": "upward", "added": [8e-3, 1.6e-2],
                                              "stopped": "tune.extend.max_points=2 reached"}
    assert tuning.main([str(sweep)]) == 0
    assert ("[tuning seeds 101; on the grid's upper edge: the optimum may lie above 1.6e-2; grid extended upward by 2 "
            "points to 1.6e-2 (extension stopped: tune.extend.max_points=2 reached); grid: 6 runs") in capsys.readouterr().out
    entry = yaml.safe_load((sweep / "tuned.yaml").read_text())["multi30k"]["gru-tiny"]
    assert entry["edge"] == "upper" and entry["extension"]["added"] == [8e-3, 1.6e-2]


def test_a_failed_extension_sweep_stops_that_architecture_and_a_disabled_one_runs_nothing(tmp_path):
    sweep = tmp_path / "sweep"
    write_sweep(sweep, [tune_record("gru", 101, lr, 10.0 * k) for k, lr in enumerate(GRID_LRS)])
    calls = []
    ledger = tune_extend.extend_sweep(sweep_config(sweep), sweep, run=lambda c, f: calls.append(c) or 2,
                                      program=["seqbench"])
    assert len(calls) == 1
    assert ledger["multi30k"]["gru-tiny"] == {"direction": "upward", "added": [],
                                              "stopped": "the sweep at 8e-3 exited with status 2"}
    assert tune_extend.extend_sweep(sweep_config(sweep, enabled=False), sweep, run=calls.append) == {}
    assert len(calls) == 1


def test_jobs_that_form_a_grid_are_one_sweep_others_one_command_each():
    jobs = [["model=lstm", "trainer.lr=0.004", "trainer.warmup_steps=50", "seed=1"],
            ["model=lstm", "trainer.lr=0.004", "trainer.warmup_steps=150", "seed=1"],
            ["model=lstm", "trainer.lr=0.004", "seed=2", "trainer.warmup_steps=50"],
            ["model=lstm", "trainer.lr=0.004", "trainer.warmup_steps=150", "seed=2"]]
    assert tune_extend.sweep_overrides(jobs, 0.008) == [
        ["model=lstm", "trainer.warmup_steps=50,150", "seed=1,2", "trainer.lr=0.008"]]
    assert tune_extend.sweep_overrides(jobs[:3], 0.008) == [
        ["model=lstm", "trainer.warmup_steps=50", "seed=1", "trainer.lr=0.008"],
        ["model=lstm", "trainer.warmup_steps=150", "seed=1", "trainer.lr=0.008"],
        ["model=lstm", "seed=2", "trainer.warmup_steps=50", "trainer.lr=0.008"]]


def test_the_grid_comes_from_the_command_line_else_the_sweeper(tmp_path):
    config = sweep_config(tmp_path)
    assert tune_extend.grid_lrs(config) == GRID_LRS
    config.hydra.overrides.task.append("trainer.lr=1e-3,3e-3")
    assert tune_extend.grid_lrs(config) == [1e-3, 3e-3]
    config.hydra.overrides.task[-1] = "trainer.lr=interval(1e-4,1e-2)"
    with pytest.raises(tune_extend.ExtensionError, match="a continuous sweep has no grid to extend"):
        tune_extend.grid_lrs(config)


def test_a_child_sweep_leaves_the_grids_multirun_yaml_as_it_was(tmp_path):
    (tmp_path / "multirun.yaml").write_text("grid\n")
    child = [sys.executable, "-c", f"open({str(tmp_path / 'multirun.yaml')!r}, 'w').write('child'); exit(3)"]
    assert tune_extend.launch(child, tmp_path) == 3
    assert (tmp_path / "multirun.yaml").read_text() == "grid\n"


def test_report_shows_the_grid_and_the_choice_per_architecture(tmp_path):
    reports.build([write_records(tmp_path / "records", grid_records())], tmp_path / "report")
    section = (tmp_path / "report" / "report.md").read_text().split("## Tuning")[1].split("## Results")[0]
    assert "| architecture | warm-up | clip | lr 0.001 | lr 0.002 | lr 0.004 |" in section
    assert "| transformer-tiny | 150 | 0 | 22.00 (n=2) | 23.00 (n=2) ✓ | – (1 failed) |" in section
    assert "| lstm-tiny | 150 | 5 | 10.00 ✓ | 10.00 | – |" in section
    assert ("| wikitext2 | transformer-tiny | 0.002 | 150 | 0 | perplexity 100.00 | on the grid's upper edge: the "
            "optimum may lie above 2e-3 | model=transformer_tiny trainer.lr=0.002 trainer.warmup_steps=150 "
            "trainer.clip_norm=0 |") in section
    assert "multi30k lstm-tiny: on the grid's lower edge: the optimum may lie below 1e-3." in section
    assert "Tuned at max_seconds=60, max_tokens=4096 on seeds 1, 2:" in section


def test_runs_applying_tuned_settings_at_another_budget_say_one_setting_serves_every_rung(tmp_path):
    tuned_file = tmp_path / "tuned.yaml"
    tuned_file.write_text(yaml.safe_dump({"multi30k": {"lstm-tiny": {
        "overrides": ["model=lstm_tiny", "trainer.lr=0.004"], "tuning_seeds": [101],
        "budget": {"max_steps": 200, "max_tokens": 4096}}}}))
    def compared(seed, budget):
        rec = record("lstm", "multi30k", seed, scores=(20.0, 50.0), budget=budget)
        rec["config"]["tuned"] = str(tuned_file)
        return rec
    same = {"max_seconds": None, "max_steps": 200}
    write_records(tmp_path / "same", [compared(1, same), compared(2, same)])
    [note] = tuning.tuned_use(load([tmp_path / "same"]).runs)
    assert note.text == (f"tuned={tuned_file}: tuned at max_steps=200, max_tokens=4096, the budget its runs train "
                         "at: each budget tuned.")
    write_records(tmp_path / "ladder", [compared(1, {"max_seconds": None, "max_flops": 1e15})])
    [section] = tuning.sections(load([tmp_path / "ladder"]).runs)
    assert section.blocks[0].text == (f"tuned={tuned_file}: tuned at max_steps=200, max_tokens=4096; one setting "
                                      "serves every rung of a ladder (its runs train at max_flops=1e+15, "
                                      "max_tokens=4096).")
    assert section.blocks[0].kind == "warning"  # a run without a ladder, trained at another budget than tuned
    rungs = []
    for rung in (1e15, 3e15):  # a ladder's rung records: max_flops is the rung, config.trainer.ladder the ladder
        rungs.append(compared(1, {"max_seconds": None, "max_flops": rung}))
        rungs[-1]["config"]["trainer"]["ladder"] = [1e15, 3e15]
    write_records(tmp_path / "rungs", rungs)
    [note] = tuning.tuned_use(load([tmp_path / "rungs"]).runs)
    assert note.kind == "note" and note.text == (
        f"tuned={tuned_file}: tuned at max_steps=200, max_tokens=4096; one setting serves every rung of a ladder "
        "(its runs train at max_tokens=4096, ladder 1e+15, 3e+15).")


def test_a_budget_held_as_an_int_and_as_a_float_is_one_budget(tmp_path):
    """A tuned.yaml written by hand (or by another YAML writer) holds 4.5e+13 where the runs' records hold
    45000000000000: the same budget, so the runs are at the budget they were tuned at."""
    tuned_file = tmp_path / "tuned.yaml"
    tuned_file.write_text("multi30k:\n  lstm-tiny:\n    overrides: [model=lstm_tiny, trainer.lr=0.004]\n"
                          "    budget: {max_flops: 4.5e+13, max_tokens: 4096}\n")
    rec = record("lstm", "multi30k", 1, scores=(20.0, 50.0), budget={"max_seconds": None, "max_flops": 45000000000000})
    rec["config"]["tuned"] = str(tuned_file)
    write_records(tmp_path / "runs", [rec])
    [note] = tuning.tuned_use(load([tmp_path / "runs"]).runs)
    assert note.kind == "note" and "max_flops=4.5e+13" in note.text and "each budget tuned" in note.text


def test_tuning_cli_writes_tuned_yaml_and_names_a_missing_folder(tmp_path, capsys):
    write_records(tmp_path / "sweep", grid_records())
    assert tuning.main([str(tmp_path / "sweep")]) == 0
    printed = capsys.readouterr().out
    assert ("multi30k transformer-tiny (valid bleu 23, 2 seeds): model=transformer_tiny trainer.lr=0.002 "
            "trainer.warmup_steps=150 trainer.clip_norm=0  [tuning seeds 1, 2; interior; grid: 5 runs") in printed
    assert "wikitext2 transformer-tiny (valid ppl 100, 1 seeds)" in printed
    assert "[tuning seeds 1; on the grid's upper edge: the optimum may lie above 2e-3; grid: 2 runs" in printed
    assert yaml.safe_load((tmp_path / "sweep" / "tuned.yaml").read_text())["wikitext2"]["transformer-tiny"][
        "valid_ppl"] == 100.0
    (tmp_path / "empty").mkdir()
    assert tuning.main([str(tmp_path / "empty")]) == 0
    assert "no finished runs with a validation score: nothing chosen" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "empty" / "tuned.yaml").read_text()) == {}
    with pytest.raises(SystemExit):
        tuning.main([str(tmp_path / "missing")])
    assert "missing: no such folder; give the folder of an experiment=tune sweep" in capsys.readouterr().err


def test_tune_uses_seeds_of_its_own_and_a_log_spaced_grid_that_can_extend(make_cfg):
    cfg = make_cfg("experiment=tune")
    assert cfg.seed == 101 and cfg.tune.extend.enabled
    assert tune_extend.limits(OmegaConf.to_container(cfg.tune.extend)) == tune_extend.Limits(2, 1e-4, 2e-2)
    params = yaml.safe_load((ROOT / "conf" / "experiment" / "tune.yaml").read_text())["hydra"]["sweeper"]["params"]
    lrs = [float(v) for v in params["trainer.lr"].split(",")]
    assert len(lrs) >= 4 and len({round(b / a, 9) for a, b in zip(lrs, lrs[1:])}) == 1  # log-spaced


@pytest.mark.parametrize("model,clip", [("convs2s", 0.1), ("lstm", 5.0), ("gru", 5.0), ("transformer", 0.0),
                                        ("bytenet", 0.0), ("convs2s_tiny", 0.1)])
def test_tune_clips_where_the_architectures_paper_does(make_cfg, model, clip):
    cfg = make_cfg("experiment=tune", f"model={model}")
    assert cfg.trainer.clip_norm == clip and list(cfg.eval.splits) == ["valid"]


def test_an_explicit_clip_norm_overrides_the_papers(make_cfg):
    assert make_cfg("experiment=tune", "model=convs2s", "trainer.clip_norm=1.0").trainer.clip_norm == 1.0


def write_tuned(path: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "multi30k": {"lstm-tiny": {"overrides": ["model=lstm_tiny", "trainer.lr=0.004", "trainer.warmup_steps=50",
                                                 "trainer.clip_norm=5"], "valid_bleu": 20.0, "seeds": 1},
                     "transformer-tiny": {"overrides": ["model=transformer_tiny", "trainer.lr=0.002",
                                                        "trainer.warmup_steps=100", "trainer.clip_norm=0"]}},
        "mytexts": {"gru-tiny": {"overrides": ["model=gru_tiny", "trainer.lr=0.001"]}}}))
    return path


def test_a_job_given_tuned_takes_its_own_architectures_settings(make_cfg, tmp_path):
    path = write_tuned(tmp_path / "tuned.yaml")
    for model, expected in (("lstm_tiny", (0.004, 50, 5)), ("transformer_tiny", (0.002, 100, 0))):
        cfg = harness_tuned.apply(make_cfg(f"model={model}", "task=multi30k", f"tuned={path}"), given=set())
        assert (cfg.trainer.lr, cfg.trainer.warmup_steps, cfg.trainer.clip_norm) == expected
    untouched = make_cfg("model=lstm_tiny", "task=multi30k")
    assert harness_tuned.apply(untouched, given=set()) is untouched
    # a folder task goes by its folder's name (or task.label), as in its record and in tuned.yaml
    folder = make_cfg("model=gru_tiny", "task=text_files", f"task.path={tmp_path / 'mytexts'}", f"tuned={path}")
    assert harness_tuned.apply(folder, given=set()).trainer.lr == 0.001
    labelled = make_cfg("model=gru_tiny", "task=text_files", f"task.path={tmp_path / 'x'}", "task.label=mytexts",
                        f"tuned={path}")
    assert harness_tuned.apply(labelled, given=set()).trainer.lr == 0.001


def test_a_run_on_a_tuning_seed_is_refused_naming_the_seed_and_the_fix(make_cfg, tmp_path):
    path = tmp_path / "tuned.yaml"
    path.write_text(yaml.safe_dump({"multi30k": {"lstm-tiny": {
        "overrides": ["model=lstm_tiny", "trainer.lr=0.004"], "tuning_seeds": [101, 102]}}}))
    with pytest.raises(SettingError, match=re.escape(
            f"seed=102 is one of the seeds tuned={path} was tuned on for lstm-tiny on multi30k (tuning seeds: 101, "
            "102)")) as err:
        harness_tuned.apply(make_cfg("model=lstm_tiny", "task=multi30k", f"tuned={path}", "seed=102"), given=set())
    assert "Run the comparison on other seeds (e.g. seed=1,2,3)" in str(err.value)
    cfg = harness_tuned.apply(make_cfg("model=lstm_tiny", "task=multi30k", f"tuned={path}", "seed=3"), given=set())
    assert cfg.trainer.lr == 0.004


@pytest.mark.parametrize("overrides,given,message", [
    (["model=gru_tiny", "task=multi30k"], set(),
     "has no settings for gru-tiny on multi30k (it has: lstm-tiny, transformer-tiny); tune this architecture too"),
    (["model=lstm_tiny", "task=wikitext2"], set(),
     "has no settings for task 'wikitext2' (it has: multi30k, mytexts); tune this task too"),
    (["model=lstm_tiny", "task=multi30k"], {"trainer.lr", "seed"},
     "trainer.lr given on the command line and by tuned="),
])
def test_tuned_settings_that_do_not_fit_the_job_are_refused_by_name(make_cfg, tmp_path, overrides, given, message):
    path = write_tuned(tmp_path / "tuned.yaml")
    with pytest.raises(SettingError, match=re.escape(message)):
        harness_tuned.apply(make_cfg(*overrides, f"tuned={path}"), given=given)


def test_a_missing_or_broken_tuned_file_is_named_with_the_fix(make_cfg, tmp_path):
    with pytest.raises(SettingError, match="no such file; give the tuned.yaml a tuning sweep wrote"):
        harness_tuned.apply(make_cfg(f"tuned={tmp_path / 'nope.yaml'}"), given=set())
    (tmp_path / "bad.yaml").write_text("multi30k: [unclosed\n")
    with pytest.raises(SettingError, match="not a YAML file"):
        harness_tuned.apply(make_cfg(f"tuned={tmp_path / 'bad.yaml'}"), given=set())
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(SettingError, match="holds no choices"):
        harness_tuned.apply(make_cfg(f"tuned={tmp_path / 'empty.yaml'}"), given=set())


def test_a_job_with_a_bad_tuned_file_fails_with_a_record_naming_it(make_cfg, tmp_path):
    rec = job.run(make_cfg("model=lstm_tiny", "task=multi30k", "trainer=smoke", f"tuned={tmp_path / 'nope.yaml'}"),
                  tmp_path / "out", raise_errors=False)
    assert rec["status"] == "failed" and "no such file" in rec["error"]
    assert json.loads((tmp_path / "out" / "record.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("model", ["transformer", "lstm", "gru", "convs2s", "bytenet"])
def test_the_equal_updates_preset_trains_each_architecture_with_the_choice_it_ships(make_cfg, model, tmp_path,
                                                                                    monkeypatch):
    """experiment=equal_updates (the README's comparison) reads conf/tuned_settings/multi30k_200_updates.yaml, found
    from the project root whatever the working directory: each small preset gets its own tuned lr, warm-up, clip."""
    shipped = yaml.safe_load((ROOT / "conf" / "tuned_settings" / "multi30k_200_updates.yaml").read_text())
    expected = dict(o.split("=") for o in shipped["multi30k"][f"{model}-small"]["overrides"])
    assert expected["model"] == model
    cfg = make_cfg("experiment=equal_updates", f"model={model}")
    monkeypatch.chdir(tmp_path)  # the relative path is the project's, not the working directory's
    cfg = harness_tuned.apply(cfg, given=set())
    assert cfg.tuned == "conf/tuned_settings/multi30k_200_updates.yaml"
    assert (cfg.trainer.max_steps, cfg.trainer.max_seconds, cfg.task.name) == (200, None, "multi30k")
    assert (cfg.trainer.lr, cfg.trainer.warmup_steps, cfg.trainer.clip_norm) == (
        float(expected["trainer.lr"]), int(expected["trainer.warmup_steps"]), float(expected["trainer.clip_norm"]))


def test_the_settings_check_names_a_bad_grid_extension_before_the_sweep_runs(make_cfg):
    from seqbench.harness import settings

    found = settings.problems(make_cfg("experiment=tune", "tune.extend.max_points=-1", "tune.extend.lr_min=1e-2",
                                       "tune.extend.lr_max=1e-3"))
    assert any(f.startswith("tune.extend.max_points") for f in found), found
    assert any("tune.extend.lr_min" in f and "tune.extend.lr_max" in f and "lr_min < lr_max" in f for f in found), found
    assert settings.problems(make_cfg("experiment=tune")) == []
