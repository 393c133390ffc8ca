"""Bad input and lifecycle: how lines are split, long test lines, stop signals during evaluation and sweeps,
sweeps in which nothing succeeds, and settings checked at start-up.

Where a defect shows only to a user (exit status, a signal, a report at the end of a sweep), the test runs
``python run.py`` as a user would.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seqbench import models
from seqbench import tasks
from seqbench.harness import io, job, schema, settings
from seqbench.harness.cluster import launcher
from seqbench.harness.evaluate import evaluate_translation
from seqbench.tasks.data import read_lines
from tests.conftest import ROOT
from tests.test_reliability import ctrl_c_as_in_a_terminal, parallel, run_py, saved_step, temp_files, write_parallel

COPY = ["task=copy", "task.n_train=60", "task.n_valid=4", "task.n_test=4", "trainer=smoke", "trainer.max_steps=2",
        "trainer.threads=1"]


def strict_json(path: Path):
    """Parse as strict JSON: NaN and Infinity (Python's extension) are refused."""
    def refuse(name):
        raise ValueError(f"{path} holds {name}, which is not JSON")
    return json.loads(Path(path).read_text(encoding="utf-8"), parse_constant=refuse)


def run_sweep(args: list[str], sweep_dir: Path, log: Path) -> subprocess.Popen:
    """``python run.py -m ...`` writing into ``sweep_dir``; its output goes to ``log`` (a pipe could fill and block it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "run.py", "-m", *args, "device=cpu", "data.download=false",
                                 f"hydra.sweep.dir={sweep_dir}"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, text=True, preexec_fn=ctrl_c_as_in_a_terminal)


def sweep_records(sweep_dir: Path) -> dict[str, dict]:
    return {p.parent.name: strict_json(p) for p in sorted(sweep_dir.glob("*/record.json"))}


# -- lines are separated by \n only -----------------------------------------------------------------------
# every character str.splitlines() (and universal newlines) also splits at
SPLITTERS = {"U+2028": "\u2028", "U+2029": "\u2029", "U+0085": "\x85", "form feed": "\x0c", "vertical tab": "\x0b",
             "x1c": "\x1c", "x1d": "\x1d", "x1e": "\x1e", "lone CR": "\r"}


@pytest.mark.parametrize("char", SPLITTERS.values(), ids=SPLITTERS.keys())
def test_a_line_is_what_lies_between_two_newlines(tmp_path, char):
    path = tmp_path / "f.txt"
    path.write_bytes(f"one{char}two\nthree\n".encode())
    assert read_lines(path) == [f"one{char}two", "three"]
    assert len(read_lines(path)) == path.read_bytes().count(b"\n")  # as wc -l counts


def test_crlf_endings_and_a_leading_bom_are_dropped(tmp_path):
    path = tmp_path / "f.txt"
    path.write_bytes(b"\xef\xbb\xbfone\r\ntwo \xef\xbb\xbf\r\n\r\nlast\r")
    assert read_lines(path) == ["one", "two \ufeff", "", "last"]  # a BOM inside the text is text
    path.write_bytes(b"a\n\nb")  # no final newline: the last line still counts
    assert read_lines(path) == ["a", "", "b"]
    path.write_bytes(b"")
    assert read_lines(path) == []


def number_in(line: str) -> int:
    return int(re.search(r"\d+", line).group())


@pytest.mark.parametrize("where", ["both_sides", "one_side"])
def test_parallel_pairs_stay_aligned_around_unicode_line_separators(tmp_path, where):
    """A U+2028 on one side (and a \\x1d on the other) once shifted every later pair; now each pair keeps its number."""
    def edit(split, src, tgt):
        src[3] = src[3].replace("sat", "sat\u2028then")
        if where == "both_sides":
            tgt[7] = tgt[7].replace("sass", "sass\x1dda")
        tgt[9] = "\ufeff" + tgt[9] + "\r"  # a stray BOM mid-file is text; the CR of a CRLF is not
    folder = write_parallel(tmp_path / "par", 30, edit)
    task = tasks.build({"name": "parallel_files", "path": str(folder), "vocab_size": 60},
                       {"root": tmp_path, "cache_dir": tmp_path / "cache"})
    for split in ("train", "valid", "test"):
        src, tgt = task.corpus.src[split], task.corpus.tgt[split]
        assert len(src) == len(tgt) == 30
        assert [number_in(s) for s in src] == [number_in(t) for t in tgt] == list(range(30))
    refs = task.references("test")  # what evaluation scores against
    assert refs[3] == "die katze nummer 3 sass auf der matte" and refs[9] == "\ufeffdie katze nummer 9 sass auf der matte"
    assert "\u2028" in task.corpus.src["test"][3]


def test_parallel_files_of_different_line_counts_name_both_files(tmp_path):
    """Counted in newlines: a file one real line short fails naming both files and both counts."""
    folder = write_parallel(tmp_path / "par", 30, lambda split, src, tgt: split == "valid" and tgt.pop())
    with pytest.raises(tasks.DataError, match=rf"parallel files differ in length: {re.escape(str(folder / 'valid.src'))} "
                                              rf"has 30 lines, {re.escape(str(folder / 'valid.tgt'))} has 29"):
        tasks.build({"name": "parallel_files", "path": str(folder), "vocab_size": 60},
                    {"root": tmp_path, "cache_dir": tmp_path / "cache"})


def test_language_model_lines_and_words(tmp_path):
    folder = tmp_path / "txt"
    folder.mkdir()
    text = "\ufeffa b\u2028c\nd\x0ce\r\n"
    for split in ("train", "valid", "test"):
        (folder / f"{split}.txt").write_text(text, encoding="utf-8", newline="")
    task = tasks.build({"name": "text_files", "path": str(folder)}, {"root": tmp_path})
    # two lines (two <eos>), words split at whitespace: a b c / d e
    assert task.describe()["tokens"] == {"train": 7, "valid": 7, "test": 7}


# -- long sources: a cap on decoding, with a warning --------------------------------------------------------

def test_sources_longer_than_the_cap_are_counted_and_named():
    task = tasks.build({"name": "copy", "n_train": 20, "n_valid": 2, "n_test": 40, "min_len": 2, "max_len": 12})
    model = models.build({"name": "transformer", "d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32}, task)
    lengths = [len(s) for s in task.sources("test")]
    long = [i + 1 for i, n in enumerate(lengths) if n > 6]
    assert long and len(long) < len(lengths)
    out, hyps = evaluate_translation(model, task, "test", torch.device("cpu"),
                                     {"beam": 2, "max_len_a": 0.0, "max_len_b": 3, "max_source_tokens": 6})
    assert len(hyps) == 40 and out["truncated_sources"] == len(long)
    assert out["warning"].startswith(f"{len(long)} of 40 test source lines (line {long[0]}, ")
    assert "longer than 6 tokens" in out["warning"] and "eval.decoding.max_source_tokens" in out["warning"]
    whole, _ = evaluate_translation(model, task, "test", torch.device("cpu"),
                                    {"beam": 2, "max_len_a": 0.0, "max_len_b": 3, "max_source_tokens": None})
    assert whole["truncated_sources"] == 0 and "warning" not in whole


def test_one_huge_test_line_is_decoded_quickly_with_a_warning(tmp_path):
    """One 100k-character test line once decoded for minutes (gigabytes); now it is cut to 1024 tokens, and said so."""
    def edit(split, src, tgt):
        if split == "test":
            src[4] = " ".join(["the cat sat on the mat"] * 4400)  # ~100k characters, ~25k subwords
    args = ["model=transformer_tiny", "trainer=smoke", "trainer.max_steps=2", "trainer.threads=1",
            "trainer.valid_bleu=false", "eval.splits=[test]", *parallel(tmp_path, edit)]
    assert len((tmp_path / "par" / "test.src").read_text().splitlines()[4]) > 100_000
    proc = run_py(args, tmp_path / "run")
    output, _ = proc.communicate(timeout=180)  # the uncapped decoding takes minutes
    assert proc.returncode == 0, output[-3000:]
    rec = strict_json(tmp_path / "run" / "record.json")
    test = rec["metrics"]["test"]
    assert rec["status"] == "ok" and test["sentences"] == 30 and test["truncated_sources"] == 1
    assert test["warning"].startswith("1 of 30 test source lines (line 5) are longer than 1024 tokens")
    assert "1 of 30 test source lines (line 5)" in output  # logged as it happens, too
    assert len((tmp_path / "run" / "test.hyp").read_text(encoding="utf-8").split("\n")) == 31


# -- stop signals ----------------------------------------------------------------------------------------

EVAL_RUN = ["model=transformer_tiny", "task=copy", "task.n_train=60", "task.n_valid=4", "task.n_test=3000",
            "trainer=smoke", "trainer.max_steps=2", "trainer.threads=1", "trainer.valid_bleu=false",
            "eval.splits=[test]", "eval.decoding.beam=4", "eval.decoding.batch_sentences=1"]


SIGNALS = [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)]  # Ctrl-C: the same path, slow suite


@pytest.mark.parametrize("sig", SIGNALS, ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_evaluation_stops_it_promptly_with_an_interrupted_record(tmp_path, sig):
    """3000 test sentences decoded one by one take minutes; a stop signal ends the job within seconds."""
    out = tmp_path / "run"
    proc = run_py(EVAL_RUN, out)
    deadline = time.monotonic() + 120
    while saved_step(out / "last.pt") < 2:  # training is over: evaluation comes next
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "training never finished"
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(sig)
    try:
        output, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{sig.name} during evaluation was ignored: the job was still decoding 20 s later")
    assert proc.returncode != 0, output[-3000:]
    rec = strict_json(out / "record.json")
    assert rec["status"] == "interrupted" and rec["job"]["finished"], rec["error"]
    if sig == signal.SIGTERM:
        assert "stopped by SIGTERM while evaluating the test split" in rec["error"]
        assert "rerun the same command in the same folder" in rec["error"]
    assert saved_step(out / "last.pt") == 2 and saved_step(out / "best.pt") == 2  # the training is kept
    assert not (out / "test.hyp").exists() and not temp_files(out)


@pytest.mark.parametrize("sig", SIGNALS, ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_a_local_sweep_with_its_report_and_a_failing_exit_status(tmp_path, sig):
    sweep_dir, log = tmp_path / "sweep", tmp_path / "sweep.log"
    args = ["model=transformer_tiny", "task=copy", "task.n_train=300", "task.n_valid=4", "task.n_test=4", "trainer=smoke",
            "trainer.max_steps=100000", "trainer.eval_every=100000", "trainer.log_every=5", "trainer.threads=1",
            "seed=1,2,3"]
    proc = run_sweep(args, sweep_dir, log)
    deadline = time.monotonic() + 120
    try:
        while " step 5/" not in "".join(p.read_text() for p in sweep_dir.glob("0_*/run.log")):  # job 0 is training
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the first job never trained"
            time.sleep(0.1)
    except BaseException:
        proc.kill()  # a sweep of 100,000 steps per job must not outlive a failed test
        raise
    proc.send_signal(sig)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the sweep went on after {sig.name}: " + log.read_text()[-2000:])
    output = log.read_text()
    assert proc.returncode == 1, output[-3000:]
    recs = sweep_records(sweep_dir)
    assert [r["status"] for r in recs.values()] == ["interrupted"] * 3
    first, *rest = recs
    assert recs[first]["error"].startswith("Interrupted: stop requested at step" if sig == signal.SIGTERM
                                           else "KeyboardInterrupt")
    for name in rest:  # never started: no training, a record saying so
        assert recs[name]["error"] == f"not started: the sweep was stopped during job {first}"
        assert not list((sweep_dir / name).glob("*.pt"))
    report = (sweep_dir / "report" / "report.md").read_text()
    assert "3 jobs did not finish with status ok" in report and "not started" in report
    assert "the sweep was stopped before it finished (3 interrupted)" in output
    summaries = [line for line in output.splitlines() if line.startswith("[seqbench]") and ": interrupted |" in line]
    assert summaries and all(" steps" not in line for line in summaries), summaries  # the error, not "0 steps"


def test_a_sweep_in_which_every_job_fails_has_records_a_report_and_exit_status_1(tmp_path):
    """A crashing setting and an unknown job=: each leaves a failed record, the report lists both, the exit is 1."""
    sweep_dir, log = tmp_path / "sweep", tmp_path / "sweep.log"
    proc = run_sweep(["model=convs2s_tiny", "model.kernel_size=4", *COPY, "job=train,nope"], sweep_dir, log)
    proc.wait(timeout=300)
    output = log.read_text()
    assert proc.returncode == 1, output[-3000:]
    recs = list(sweep_records(sweep_dir).values())
    assert [r["status"] for r in recs] == ["failed", "failed"]
    assert "kernel_size=4 is even" in recs[0]["error"]
    assert recs[1]["error"] == "SettingError: job='nope'; valid: train, path_length"
    report = (sweep_dir / "report" / "report.md").read_text()
    assert "2 jobs did not finish with status ok" in report and "valid: train, path_length" in report
    assert "no job of the sweep finished ok (2 failed)" in output


def _records(folder: Path, statuses: list[str]) -> Path:
    for i, status in enumerate(statuses):
        schema.write(folder / f"{i}_job" / "record.json", {"status": status})
    return folder


@pytest.mark.parametrize("statuses,problem", [
    (["ok", "failed"], None),
    (["ok"], None),
    (["failed", "failed"], "no job of the sweep finished ok (2 failed)"),
    ([], "no job of the sweep finished ok (no job records)"),
    (["ok", "interrupted", "interrupted"], "the sweep was stopped before it finished (2 interrupted, 1 ok)"),
])
def test_sweep_exit_status(tmp_path, statuses, problem):
    found = launcher.sweep_problem(_records(tmp_path, statuses))
    assert (found is None) if problem is None else found.startswith(problem), found


def test_run_py_and_the_settings_table_know_the_same_jobs():
    from seqbench.harness import run
    assert tuple(run.JOBS) == settings.JOBS


# -- settings: checked at start-up, before any data is read ------------------------------------------------
# (overrides, the message: the setting, the value and what is valid)
BAD_SETTINGS = [
    (["seed=abc"], "seed='abc' must be an integer in 0..4294967295"),
    (["seed=-1"], "seed=-1 must be an integer in 0..4294967295"),
    (["seed=1.5"], "seed=1.5 must be an integer in 0..4294967295"),
    (["trainer.lr=abc"], "trainer.lr='abc' must be a finite number > 0"),
    (["trainer.max_steps=abc"], "trainer.max_steps='abc' must be a positive integer or null"),
    (["trainer.max_steps=2.5"], "trainer.max_steps=2.5 must be a positive integer or null"),
    (["eval.decoding.beam=abc"], "eval.decoding.beam='abc' must be a positive integer"),
    (["eval.decoding.batch_sentences=0"], "eval.decoding.batch_sentences=0 must be a positive integer"),
    (["eval.decoding.lenpen=nan"], "eval.decoding.lenpen=nan must be a finite number >= 0"),
    (["eval.decoding.max_source_tokens=0"], "eval.decoding.max_source_tokens=0 must be a positive integer or null"),
    (["device=tpu"], "device='tpu'; valid: auto, cpu, cuda, cuda:N"),
    (["device=CPU"], "device='CPU'; valid: auto, cpu, cuda, cuda:N"),
    (["device=mps"], "device='mps'; valid: auto, cpu, cuda, cuda:N"),
    (["job=nope"], "job='nope'; valid: train, path_length"),
    (["trainer.betas=[0.9]"], "trainer.betas=[0.9] must be two numbers in [0, 1)"),
]


@pytest.fixture
def no_data(tmp_path, monkeypatch):
    """An empty data root: a job that reads any data fails with a DataError."""
    monkeypatch.delenv("SEQBENCH_DATA_ROOT", raising=False)
    (tmp_path / "empty").mkdir()
    return ["model=transformer_tiny", "task=multi30k", f"data.root={tmp_path / 'empty'}", "data.download=false"]


@pytest.mark.parametrize("overrides,message", BAD_SETTINGS, ids=[o[0] for o, _ in BAD_SETTINGS])
def test_a_bad_setting_fails_at_start_up_naming_it(make_cfg, tmp_path, no_data, overrides, message):
    rec = job.run(make_cfg(*no_data, *overrides), tmp_path / "run", raise_errors=False)
    assert rec["status"] == "failed"
    assert rec["error"].startswith(f"SettingError: {message}"), rec["error"]
    saved = strict_json(tmp_path / "run" / "record.json")
    assert saved["status"] == "failed" and saved["error"] == rec["error"]
    assert "task" not in saved and "environment" not in saved  # nothing was set up, no data read
    assert not list((tmp_path / "run").glob("*.pt"))


def test_without_the_bad_setting_the_same_job_reads_data(make_cfg, tmp_path, no_data):
    """The control: the empty data root is noticed as soon as data is read."""
    rec = job.run(make_cfg(*no_data), tmp_path / "run", raise_errors=False)
    assert rec["status"] == "failed" and "dataset file not found" in rec["error"]


def test_every_bad_setting_is_named_at_once(make_cfg, tmp_path, no_data):
    rec = job.run(make_cfg(*no_data, "seed=abc", "trainer.lr=0", "device=tpu"), tmp_path / "run", raise_errors=False)
    assert rec["error"].splitlines() == ["SettingError: seed='abc' must be an integer in 0..4294967295",
                                         "device='tpu'; valid: auto, cpu, cuda, cuda:N",
                                         "trainer.lr=0 must be a finite number > 0"]


def test_the_shipped_configurations_pass_the_settings_check(make_cfg):
    for experiment in sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")):
        assert settings.problems(make_cfg(f"experiment={experiment}")) == [], experiment
    for trainer in sorted(p.stem for p in (ROOT / "conf" / "trainer").glob("*.yaml")):
        assert settings.problems(make_cfg(f"trainer={trainer}")) == [], trainer


def test_a_bad_setting_through_run_py(tmp_path, no_data):
    out = tmp_path / "run"
    proc = run_py([*no_data, "seed=abc"], out)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "SettingError: seed='abc' must be an integer in 0..4294967295" in output
    assert "dataset file" not in output
    assert strict_json(out / "record.json")["status"] == "failed"


def test_records_are_strict_json(tmp_path):
    path = tmp_path / "record.json"
    schema.write(path, {"status": "ok", "metrics": {"nll": float("nan"), "ppl": float("inf"), "ok": 1.5},
                        "curve": [(1, float("-inf")), {"x": [float("nan")]}]})
    saved = strict_json(path)
    assert saved["metrics"] == {"nll": None, "ppl": None, "ok": 1.5}
    assert saved["curve"] == [[1, None], {"x": [None]}]
    assert io.finite({"a": (math.nan,)}) == {"a": [None]}


def test_reports_out_must_be_a_folder(tmp_path):
    (tmp_path / "records").mkdir()
    schema.write(tmp_path / "records" / "0" / "record.json", {"status": "failed", "error": "x"})
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me\n")
    for out in (a_file, a_file / "report"):
        res = subprocess.run([sys.executable, "-m", "seqbench.reports", str(tmp_path / "records"), "--out", str(out)], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 2
        assert f"argument --out: {out}: {a_file} is a file, not a folder; give a folder for the report" in res.stderr
    assert a_file.read_text() == "keep me\n"
