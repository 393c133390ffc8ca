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

from seqbench import reports
from seqbench.harness import job
from seqbench.harness import tuned as harness_tuned
from seqbench.harness.settings import SettingError
from seqbench.reports import tuning
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


@pytest.mark.slow  # a whole tuning experiment: about half a minute
def test_experiment_tune_runs_end_to_end_and_chooses_the_best_validation_score(tmp_path, data_root):
    text, sweep = write_text_folder(tmp_path / "words"), tmp_path / "sweep"
    env = {**os.environ, "SEQBENCH_DATA_ROOT": str(data_root), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    out = subprocess.run([sys.executable, "run.py", "-m", "experiment=tune", "model=transformer_tiny,lstm_tiny",
                          "task=text_files", f"task.path={text}", "trainer=smoke", "trainer.lr=1e-3,1e-2",
                          "trainer.warmup_steps=2", "device=cpu", "data.download=false", f"hydra.sweep.dir={sweep}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/record.json"))]
    assert len(records) == 4 and {r["status"] for r in records} == {"ok"}
    assert all(set(r["metrics"]) == {"valid"} for r in records)  # chosen on validation: the test set never decoded
    clip = {r["model"]["name"]: r["config"]["trainer"]["clip_norm"] for r in records}
    assert clip == {"lstm": 5.0, "transformer": 0.0}  # the LSTM's paper clips at 5; the Transformer's does not
    # the choice, derived from the records alone: per model, the lr of the lowest validation perplexity
    best = {}
    for r in records:
        key, ppl = f"{r['model']['name']}-{r['model']['preset']}", r["metrics"]["valid"]["perplexity"]
        if key not in best or ppl < best[key][0]:
            best[key] = (ppl, r["config"]["trainer"]["lr"])
    assert len({ppl for ppl, _ in best.values()}) == 2
    chosen = yaml.safe_load((sweep / "tuned.yaml").read_text())["words"]
    for arch, (ppl, lr) in best.items():
        model, preset = arch.split("-")
        assert chosen[arch]["overrides"] == [f"model={model}_{preset}", f"trainer.lr={lr}", "trainer.warmup_steps=2",
                                             f"trainer.clip_norm={int(clip[model])}"]
        assert chosen[arch]["valid_ppl"] == pytest.approx(ppl) and chosen[arch]["seeds"] == 1
        assert f"words {arch} (valid ppl {ppl:.4g}, 1 seeds): {' '.join(chosen[arch]['overrides'])}" in out.stdout
    md = (sweep / "report" / "report.md").read_text()
    assert "## Tuning: one grid for every architecture" in md
    assert "| architecture | warm-up | clip | lr 0.001 | lr 0.01 |" in md
    # the compare sweep reads the file: one command, each architecture with its own chosen settings
    out = subprocess.run([sys.executable, "run.py", "-m", "model=transformer_tiny,lstm_tiny", "task=text_files",
                          f"task.path={text}", "trainer=smoke", f"tuned={sweep / 'tuned.yaml'}", "device=cpu",
                          "eval.splits=[valid]", "data.download=false", f"hydra.sweep.dir={tmp_path / 'compare'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    compared = [json.loads(p.read_text()) for p in sorted((tmp_path / "compare").glob("*/record.json"))]
    assert len(compared) == 2 and {r["status"] for r in compared} == {"ok"}
    for r in compared:
        model = r["model"]["name"]
        trainer = r["config"]["trainer"]
        assert (trainer["lr"], trainer["warmup_steps"], trainer["clip_norm"]) == (
            best[f"{model}-tiny"][1], 2, clip[model])


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
    assert tuning.tuned(chosen)["multi30k"]["lstm-tiny"] == {
        "overrides": ["model=lstm_tiny", "trainer.lr=0.001", "trainer.warmup_steps=150", "trainer.clip_norm=5"],
        "valid_bleu": 10.0, "seeds": 1}


def test_report_shows_the_grid_and_the_choice_per_architecture(tmp_path):
    reports.build([write_records(tmp_path / "records", grid_records())], tmp_path / "report")
    section = (tmp_path / "report" / "report.md").read_text().split("## Tuning")[1].split("## Results")[0]
    assert "| architecture | warm-up | clip | lr 0.001 | lr 0.002 | lr 0.004 |" in section
    assert "| transformer-tiny | 150 | 0 | 22.00 (n=2) | 23.00 (n=2) ✓ | – (1 failed) |" in section
    assert "| lstm-tiny | 150 | 5 | 10.00 ✓ | 10.00 | – |" in section
    assert "| wikitext2 | transformer-tiny | 0.002 | 150 | 0 | perplexity 100.00 | model=transformer_tiny " \
           "trainer.lr=0.002 trainer.warmup_steps=150 trainer.clip_norm=0 |" in section


def test_records_of_one_setting_per_architecture_get_no_tuning_section(tmp_path):
    recs = [record("transformer", "multi30k", s, scores=(20.0, 50.0)) for s in (1, 2)]
    reports.build([write_records(tmp_path / "records", recs)], tmp_path / "report")
    assert "## Tuning" not in (tmp_path / "report" / "report.md").read_text()


def test_tuning_cli_writes_tuned_yaml_and_names_a_missing_folder(tmp_path, capsys):
    write_records(tmp_path / "sweep", grid_records())
    assert tuning.main([str(tmp_path / "sweep")]) == 0
    printed = capsys.readouterr().out
    assert ("multi30k transformer-tiny (valid bleu 23, 2 seeds): model=transformer_tiny trainer.lr=0.002 "
            "trainer.warmup_steps=150 trainer.clip_norm=0") in printed
    assert yaml.safe_load((tmp_path / "sweep" / "tuned.yaml").read_text())["wikitext2"]["transformer-tiny"][
        "valid_ppl"] == 100.0
    (tmp_path / "empty").mkdir()
    assert tuning.main([str(tmp_path / "empty")]) == 0
    assert "no finished runs with a validation score: nothing chosen" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "empty" / "tuned.yaml").read_text()) == {}
    with pytest.raises(SystemExit):
        tuning.main([str(tmp_path / "missing")])
    assert "missing: no such folder; give the folder of an experiment=tune sweep" in capsys.readouterr().err


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
