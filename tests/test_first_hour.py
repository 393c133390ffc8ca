"""What a new user meets first: the sweep's plan and estimate, the progress line, the smoke check, one naming
rule for jobs, each job's own peak memory, and error rates under the names speech and MT tooling use."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from seqbench import models
from seqbench.harness import environment, metrics, schema

ROOT = Path(__file__).resolve().parents[1]


def env(data_root) -> dict:
    return {**os.environ, "SEQBENCH_DATA_ROOT": str(data_root), "WANDB_MODE": "disabled"}


def hydra_config(*overrides: str):
    """The composed config with its ``hydra`` node, as a run or a sweep sees it."""
    import seqbench.harness.job  # noqa: F401  registers the seqbench.job resolver, as run.py's import does

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def plan(*overrides: str) -> str:
    """What a sweep with these overrides prints at its start."""
    from seqbench.harness.cluster import launcher

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return launcher.describe_plan(compose("config", overrides=list(overrides), return_hydra_config=True))


# -- error rates --------------------------------------------------------------------------------------------------

HYPS = ["the cat sat", "a b c d", "", "ok"]
REFS = ["the cat sat on", "a x c", "hello", "ok"]


def test_error_rates_are_wer_ser_and_cer_as_speech_and_mt_tooling_name_them():
    """By hand: token edits 1 (deletion) + 2 (substitution, insertion) + 1 (deletion) + 0 over 4 + 3 + 1 + 1 reference
    tokens; 3 of 4 outputs differ from their reference; character edits 3 (" on") + 3 (b->x, " d") + 5 + 0 over
    14 + 5 + 5 + 2 reference characters (jiwer's corpus-level wer and cer give the same)."""
    scores = metrics.score(["wer", "ser", "cer"], HYPS, REFS)
    assert scores == {"wer": pytest.approx(4 / 9), "ser": pytest.approx(3 / 4), "cer": pytest.approx(11 / 26)}
    assert metrics.word_error_rate(["a b c d"], ["x"]) == pytest.approx(4)  # 1 substitution + 3 insertions over 1
    assert metrics.character_error_rate(["  abc "], ["abd"]) == pytest.approx(1 / 3)  # ends stripped
    assert not any(metrics.METRICS[n].higher_is_better for n in ("wer", "ser", "cer"))


def old_record(metrics_entry: dict, **extra) -> dict:
    """A finished translation record as written before the present metric names (no metrics_version)."""
    return {"schema_version": 1, "status": "ok", "error": None, "seed": 1,
            "config": {"model": {"name": "gru", "preset": "tiny"}, "task": {"name": "g2p", "metrics": "wer,ser"},
                       "trainer": {"max_steps": 4}, "seed": 1},
            "job": {"name": "gru-tiny_g2p_s1", "sweep": "old", "started": "2026-01-01T00:00:00+00:00"},
            "model": {"name": "gru", "preset": "tiny", "form": "seq2seq", "parameters": 1000},
            "task": {"name": "g2p", "family": "translation", "metrics": ["wer", "ser"]},
            "metrics": {"test": metrics_entry}, **extra}


def test_records_under_the_old_names_are_read_with_their_old_meaning(tmp_path):
    """Version 1 wrote 1 - exact match as ``wer`` and the token edit rate as ``ser``: the report reads them as the
    present ``ser`` and ``wer`` (never the numbers under the other name); a record written now keeps its names; a
    record whose metrics_version is not a number is refused, naming it."""
    from seqbench.reports.load import load

    old = old_record({"wer": 0.75, "ser": 1.4, "exact_match": 0.25,
                      "by_length": [{"bucket": "1-10", "wer": 0.5, "ser": 0.2, "n": 2}]})
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "record.json").write_text(json.dumps(old))
    schema.write(tmp_path / "new" / "record.json", {**old_record({"wer": 1.4, "ser": 0.75}), "schema_version": 1,
                                                    "job": {**old["job"], "name": "gru-tiny_g2p_s2"}, "seed": 2})
    assert json.loads((tmp_path / "new" / "record.json").read_text())["metrics_version"] == metrics.VERSION == 2
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "record.json").write_text(json.dumps(old_record({"wer": 0.1}, metrics_version="two")))
    records = load([tmp_path])
    runs = records.runs.set_index("job")
    for job in ("gru-tiny_g2p_s1", "gru-tiny_g2p_s2"):  # the same measurements, whichever version wrote them
        assert runs.loc[job, "test_ser"] == pytest.approx(0.75) and runs.loc[job, "test_wer"] == pytest.approx(1.4)
        assert runs.loc[job, "metrics"] == ("ser,wer" if job.endswith("s1") else "wer,ser")
    bucket = records.by_length.set_index("job").loc["gru-tiny_g2p_s1"]
    assert bucket["ser"] == pytest.approx(0.5) and bucket["wer"] == pytest.approx(0.2)
    bad = records.runs[records.runs["status"] == "unreadable"]
    assert len(bad) == 1 and "metrics_version" in bad["error"].iloc[0]


# -- peak memory --------------------------------------------------------------------------------------------------

def touch(n_bytes: int) -> bytearray:
    block = bytearray(n_bytes)
    for i in range(0, n_bytes, 4096):
        block[i] = 1
    return block


@pytest.mark.parametrize("reset", [True, False], ids=["high-water-mark", "sampled"])
def test_peak_memory_is_the_jobs_own_not_the_processs(monkeypatch, reset):
    """300 MB held and freed before the job starts is not the job's; the 60 MB it holds itself is. Where the
    kernel's mark cannot be reset, a sampling thread measures the same."""
    if not environment.STATUS.is_file():
        pytest.skip("no /proc/self/status here: only the process's lifetime peak can be measured")
    if not reset:
        monkeypatch.setattr(environment, "_reset_high_water_mark", lambda: False)
    earlier = touch(300 * 2**20)
    del earlier
    meter = environment.PeakMemory(torch.device("cpu"))
    start = environment._status_bytes("VmRSS")
    block = touch(60 * 2**20)
    if not reset:
        import time
        time.sleep(4 * environment.SAMPLE_SECONDS)
    del block
    got = meter.result()
    assert got["peak_memory_kind"] == ("job_peak_rss" if reset else "job_sampled_rss")
    assert got["peak_memory_kind"] in environment.PER_JOB and got["peak_memory_kind"] in environment.MEMORY_KINDS
    assert start + 50 * 2**20 <= got["peak_memory_bytes"] <= start + 120 * 2**20


def test_the_report_flags_peak_memory_that_is_not_the_jobs_own():
    from seqbench.reports import hardware, sections

    done = pd.DataFrame({"job": ["a_s1", "b_s1", "c_s1"], "task": "copy", "device_name": "cpu", "arch": "gru-tiny",
                         "seed": 1,
                         "cpu_utilization": 1.0, "threads": 1, "peak_memory_bytes": [2**30, 2**30, None],
                         "peak_memory_kind": ["process_max_rss", "job_peak_rss", None]})
    assert hardware.memory_not_per_job(done) == ["a_s1"]
    blocks, _ = sections.hardware_blocks(done)
    text = " ".join(getattr(b, "text", "") for b in blocks)
    assert "a_s1" in text and "lifetime peak" in text and "b_s1" not in text


def peak_mib(path: Path) -> float:
    costs = json.loads(path.read_text())["costs"]
    assert costs["peak_memory_kind"] == "job_peak_rss", costs
    return costs["peak_memory_bytes"] / 2**20


@pytest.mark.slow
def test_a_sweeps_jobs_record_their_own_peak_memory_as_run_alone(tmp_path, data_root):
    """A Transformer with 8192-wide feed-forward layers, then one with 64: in one sweep each records its own peak
    (the second far below the first's, which a lifetime peak would repeat), within 10% of the same job run alone
    (each job of a local sweep runs in a process forked from the sweep's: measured −8% to −1%)."""
    if not environment.STATUS.is_file():
        pytest.skip("no /proc/self/status here")
    common = ["experiment=smoke", "model=transformer_tiny", "task=copy", "model.d_model=256", "eval.influence=false"]
    subprocess.run([sys.executable, str(ROOT / "run.py"), "-m", *common, "model.d_ff=8192,64",
                    f"hydra.sweep.dir={tmp_path / 'sweep'}", "~hydra.callbacks.report"],
                   cwd=ROOT, env=env(data_root), check=True, capture_output=True, timeout=600)
    swept = [peak_mib(p) for p in sorted((tmp_path / "sweep").glob("*/record.json"))]
    alone = []
    for ff in (8192, 64):
        subprocess.run([sys.executable, str(ROOT / "run.py"), *common, f"model.d_ff={ff}",
                        f"hydra.run.dir={tmp_path / str(ff)}"],
                       cwd=ROOT, env=env(data_root), check=True, capture_output=True, timeout=600)
        alone.append(peak_mib(tmp_path / str(ff) / "record.json"))
    assert swept[1] < 0.8 * swept[0], (swept, alone)
    for in_sweep, solo in zip(swept, alone):
        assert abs(in_sweep - solo) <= 0.1 * solo, (swept, alone)


# -- one sweep as a user sees it: the plan, the progress line, the names ------------------------------------------

def test_the_main_job_is_about_a_quarter_of_an_hour_and_says_so():
    """``python run.py`` runs experiment=quick: its plan names the jobs and an estimate of at most 16 minutes;
    adding the language-model half is one override."""
    n = len(models.MODELS)  # every registered architecture: eight built in
    main = plan("experiment=quick")
    assert re.search(rf"sweep quick: {n} jobs, about (1[0-6]) min in all \(a rough estimate", main), main
    # (composed here as a sweep's parameter: a sweep's task=multi30k,wikitext2 on the command line replaces it alike)
    assert f"sweep quick: {2 * n} jobs" in plan("experiment=quick", "hydra.sweeper.params.task='multi30k,wikitext2'")
    assert re.search(rf"sweep smoke: {2 * n} jobs, about (\d+ s|1 min) in all", plan("experiment=smoke"))


@pytest.fixture
def revwords(tmp_path) -> Path:
    """A parallel_files task folder: reverse the words of a line."""
    folder = tmp_path / "revwords"
    folder.mkdir()
    lines = [" ".join("abcdefgh"[(i + k) % 8] for k in range(2 + i % 4)) for i in range(24)]
    for split, part in (("train", lines), ("valid", lines[:4]), ("test", lines[4:8])):
        (folder / f"{split}.src").write_text("\n".join(part) + "\n")
        (folder / f"{split}.tgt").write_text("\n".join(" ".join(reversed(x.split())) for x in part) + "\n")
    return folder


def test_a_single_runs_folder_is_named_like_its_job(revwords):
    """A parallel_files task on folder revwords is ``revwords`` (or its task.label) in the folder, with the preset,
    as in the job's name (which the record, the summary line and the report use) and a sweep's folders."""
    from seqbench.harness.job import job_name

    task = ["model=gru_tiny", "task=parallel_files", f"task.path={revwords}", "task.tokenizer=whitespace"]
    cfg = hydra_config(*task)
    assert re.fullmatch(r"results/runs/[\d_-]+_gru-tiny_revwords_s1", cfg.hydra.run.dir), cfg.hydra.run.dir
    assert job_name(cfg) == "gru-tiny_revwords_s1"
    labelled = hydra_config(*task, "task.label=rev", "seed=3").hydra.run.dir
    assert labelled.endswith("_gru-tiny_rev_s3")
    assert hydra_config("model=lstm_tiny", "task=copy").hydra.run.dir.endswith("_lstm-tiny_copy_s1")


@pytest.mark.slow
def test_one_name_for_the_job_in_its_folder_summary_record_and_plan(tmp_path, data_root, revwords):
    """In a sweep, the parallel_files task on folder revwords is ``revwords`` in the job's folder, summary line and
    record. The sweep prints its plan first, and the job's progress line has a total, the loss, the lr and an ETA."""
    task = ["model=gru_tiny", "task=parallel_files", f"task.path={revwords}", "task.tokenizer=whitespace"]
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "-m", *task, "trainer=smoke", "trainer.progress=true",
                           "eval.decoding.beam=1", f"hydra.sweep.dir={tmp_path / 'sweep'}", "~hydra.callbacks.report"],
                          cwd=ROOT, env=env(data_root), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert (tmp_path / "sweep" / "0_gru-tiny_revwords_s1" / "record.json").is_file(), list((tmp_path / "sweep").iterdir())
    rec = json.loads((tmp_path / "sweep" / "0_gru-tiny_revwords_s1" / "record.json").read_text())
    assert rec["job"]["name"] == "gru-tiny_revwords_s1" and rec["task"]["name"] == "revwords"
    assert "[seqbench] gru-tiny_revwords_s1: ok" in out
    assert re.search(r"\[seqbench\] sweep single: 1 job, about \d+ s in all \(a rough estimate", out), out[-3000:]
    assert out.index("[seqbench] sweep single") < out.index("[seqbench] gru-tiny_revwords_s1")
    line = re.findall(r"train: 100%\|.*\| 4/4 \[[^\]]*step=4, loss=\d+\.\d+, lr=[\d.e-]+, eta=0\.0min\]", out)
    assert line, out[-3000:]


@pytest.mark.slow
def test_the_smoke_check_runs_every_architecture_in_both_forms_and_builds_the_report(tmp_path, data_root):
    sweep = tmp_path / "smoke"
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "-m", "experiment=smoke", f"hydra.sweep.dir={sweep}"],
                          cwd=ROOT, env=env(data_root), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(p.read_text()) for p in sweep.glob("*/record.json")]
    assert {r["status"] for r in recs} == {"ok"} and len(recs) == 2 * len(models.MODELS)
    assert {(r["model"]["name"], r["model"]["form"]) for r in recs} == {
        (m, f) for m in models.MODELS for f in ("seq2seq", "lm")}
    assert (sweep / "report" / "report.html").is_file()
