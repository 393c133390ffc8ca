"""Soak: a Hydra multirun sweep of short jobs with injected failures, and a job killed with SIGKILL.

Each job is one case file of a ``soak`` config group written into a temporary config dir
(``--config-dir``), so the sweep ``+soak=c01,c02,...`` gives every job its own model, seed and
fault: healthy jobs, jobs whose settings crash (``model.n_heads=3``, an even encoder kernel, an
unknown hyperparameter), and a NaN loss (``trainer.lr=1e30``). The sweep must carry on past
every failure, and each job must leave exactly one record: ``ok`` or ``failed`` with its error.

SIGKILL: Hydra's basic launcher runs the jobs inside the sweep process, so killing a job kills the
whole sweep (nothing the harness can catch). What is meaningful is the record a killed job leaves:
one job runs as its own process in the sweep folder and is killed after its first checkpoint; its
record must say ``running`` (unfinished), the report loader must list it among the jobs that did
not finish, and rerunning the same command must resume and finish it.

``test_soak_sweep`` (marked slow: 21 jobs + the killed one) and ``test_soak_sweep_reduced``
(5 jobs, in the default suite).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_reliability import kill_after_checkpoint, run_py

JOB = ["task=copy", "task.n_train=60", "task.n_valid=4", "task.n_test=4", "trainer=smoke", "trainer.threads=1",
       "eval.decoding.beam=2", "device=cpu", "data.download=false"]
ARCHS = ["transformer_tiny", "lstm_tiny", "gru_tiny", "convs2s_tiny", "bytenet_tiny"]

# fault name -> (model preset, YAML lines merged into the job's config, expected error or None for ok)
FAULTS = {
    "heads3": ("transformer_tiny", "model:\n  n_heads: 3", "d_model=32 is not divisible by model.n_heads=3"),
    "even_kernel": ("convs2s_tiny", "model:\n  kernel_size: 4", "kernel_size=4 is even"),
    "unknown_hparam": ("lstm_tiny", "model:\n  hidden: 64", "model.hidden is not a setting of lstm"),
    "nan": ("transformer_tiny", "trainer:\n  lr: 1.0e+30\n  warmup_steps: 1", "NonFiniteLoss"),
}


def write_cases(conf: Path, n_ok: int, faults: list[str]) -> dict[str, str | None]:
    """Write ``conf/soak/cNN.yaml`` files; returns case -> expected error (None: must be ok)."""
    (conf / "soak").mkdir(parents=True)
    expected, seed = {}, 0
    plan = [(ARCHS[i % len(ARCHS)], "", None) for i in range(n_ok)] + [FAULTS[f] for f in faults]
    for i, (arch, extra, error) in enumerate(plan, 1):
        seed += 1
        case = f"c{i:02d}"
        (conf / "soak" / f"{case}.yaml").write_text(
            "# @package _global_\ndefaults:\n  - override /model: " + arch + "\n\n"
            f"seed: {seed}\nsoak_case: {case}\n{extra}\n")
        expected[case] = error
    return expected


def sweep(tmp_path: Path, n_ok: int, faults: list[str], report: bool) -> tuple[Path, dict, subprocess.CompletedProcess]:
    conf, out = tmp_path / "conf", tmp_path / "sweep"
    expected = write_cases(conf, n_ok, faults)
    args = [sys.executable, "run.py", "-m", f"--config-dir={conf}", f"+soak={','.join(expected)}", *JOB,
            f"hydra.sweep.dir={out}", "sweep_name=soak"]
    if not report:
        args.append("~hydra.callbacks.report")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    return out, expected, res


def records(out: Path) -> dict[str, dict]:
    """case -> record, read from every job folder of the sweep."""
    found = {}
    for path in sorted(out.glob("*/record.json")):
        rec = json.loads(path.read_text())
        found[rec["config"]["soak_case"]] = rec
    return found


def check_sweep(out: Path, expected: dict, res) -> dict[str, dict]:
    assert res.returncode == 0, res.stderr[-3000:]  # the sweep carries on past every failure
    recs = records(out)
    assert sorted(recs) == sorted(expected), "a job left no record"
    assert len(list(out.glob("*/record.json"))) == len(expected)  # exactly one record per job
    for case, error in expected.items():
        rec = recs[case]
        if error is None:
            assert rec["status"] == "ok", (case, rec["error"])
            assert rec["metrics"]["test"]["bleu"] >= 0 and rec["costs"]["steps"] == 4
            assert (Path(rec["job"]["output_dir"]) / "best.pt").is_file()
        else:
            assert rec["status"] == "failed" and error in rec["error"], (case, rec["status"], rec["error"])
            assert rec["traceback"] and rec["job"]["finished"]
    assert not [p for p in out.rglob("*.tmp")]
    return recs


def test_soak_sweep_reduced(tmp_path):
    """5 jobs: 3 healthy, a crashing setting and a NaN loss (default suite, well under a minute)."""
    out, expected, res = sweep(tmp_path, 3, ["heads3", "nan"], report=False)
    recs = check_sweep(out, expected, res)
    assert sum(r["status"] == "ok" for r in recs.values()) == 3
    assert sum(r["status"] == "failed" for r in recs.values()) == 2
    assert "at step" in recs["c05"]["error"]  # the NaN names its step


@pytest.mark.slow
def test_soak_sweep(tmp_path):
    """21 jobs over the five architectures (16 healthy, 4 crashing settings, 1 NaN) plus a SIGKILLed job."""
    faults = ["heads3", "even_kernel", "unknown_hparam", "heads3", "nan"]
    out, expected, res = sweep(tmp_path, 16, faults, report=True)
    recs = check_sweep(out, expected, res)
    assert len(recs) == 21
    assert sum(r["status"] == "ok" for r in recs.values()) == 16
    assert {r["model"]["name"] for r in recs.values() if r["status"] == "ok"} == {
        "transformer", "lstm", "gru", "convs2s", "bytenet"}
    report = (out / "report" / "report.md").read_text()
    assert "Failed and unfinished jobs" in report and "5 jobs did not finish with status ok" in report

    # SIGKILL: one job killed as its own process inside the sweep folder
    from seqbench.reports.load import load as load_records
    from seqbench.reports.tables import failures
    killed = out / "99_killed"
    args = ["model=transformer_tiny", *JOB, "trainer.max_steps=40", "trainer.eval_every=2", "trainer.valid_bleu=false",
            "seed=99", "sweep_name=soak"]
    step = kill_after_checkpoint(args, killed, 10)
    rec = json.loads((killed / "record.json").read_text())
    assert rec["status"] == "running" and rec["job"]["finished"] is None and 10 <= step < 40
    runs = load_records([out]).runs
    assert len(runs) == 22
    bad = failures(runs)
    assert "running" in set(bad["status"]) and len(bad) == 6  # 5 failed + the unfinished one
    rerun = run_py(args, killed)
    output, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, output[-3000:]
    rec = json.loads((killed / "record.json").read_text())
    assert rec["status"] == "ok" and rec["resumed_from_step"] == step and rec["costs"]["steps"] == 40
    assert len(failures(load_records([out]).runs)) == 5
