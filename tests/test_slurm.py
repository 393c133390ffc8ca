"""The cluster path: sweeps through ``hydra/launcher=slurm`` on a real (single-node) SLURM cluster.

The tests marked ``slurm`` run with ``pytest -m slurm`` after ``bash harness/cluster/slurm_up.sh`` (it prints the ``SLURM_CONF`` to
export; without it these tests look in ``$SEQBENCH_SLURM_DIR`` or ``${TMPDIR:-/tmp}/seqbench-slurm``).
Each job is a tiny transformer on the synthetic copy task, so a sweep takes seconds plus SLURM's latency.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seqbench.harness.cluster.signals import StopFlag
from tests.conftest import ROOT

JOB = ["model=transformer_tiny", "task=copy", "task.n_train=200", "task.n_valid=8", "task.n_test=8",
       "trainer=smoke", "trainer.threads=1", "device=cpu", "data.download=false"]
# long enough to be stopped mid-training (a checkpoint every 10 steps), short enough for CI
LONG = ["trainer.max_steps=200", "trainer.eval_every=10", "trainer.log_every=1"]
LAUNCHER = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2",
            "hydra.launcher.timeout_min=15"]


def _slurm_conf() -> str:
    if os.environ.get("SLURM_CONF"):
        return os.environ["SLURM_CONF"]
    folder = os.environ.get("SEQBENCH_SLURM_DIR") or Path(os.environ.get("TMPDIR") or "/tmp") / "seqbench-slurm"
    return str(Path(folder) / "slurm.conf")


@pytest.fixture(scope="module")
def slurm_env():
    env = {**os.environ, "SLURM_CONF": _slurm_conf(), "PYTHONUNBUFFERED": "1"}
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.fail(f"no SLURM client: {err}; run harness/cluster/slurm_up.sh first")
    if out.returncode != 0 or not re.match(r"(idle|mixed|alloc|completing)", out.stdout.strip()):
        pytest.fail(f"no usable SLURM cluster (SLURM_CONF={env['SLURM_CONF']}): {out.stdout}{out.stderr}"
                    "; run harness/cluster/slurm_up.sh first")
    return env


def slurm(env, *cmd: str) -> str:
    out = subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{' '.join(cmd)}: {out.stderr}"
    return out.stdout


class Sweep:
    """``python run.py -m hydra/launcher=slurm ...`` in the background, its log in the sweep folder's parent."""

    def __init__(self, env, folder: Path, *overrides: str):
        self.env, self.dir, self.log = env, folder / "sweep", folder / "launcher.log"
        cmd = [sys.executable, "run.py", "-m", *LAUNCHER, f"hydra.sweep.dir={self.dir}", *JOB, *overrides]
        folder.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"the launcher did not return within {timeout:.0f} s:\n{self.output()[-3000:]}")

    def record(self, job_num: int) -> dict | None:
        paths = list(self.dir.glob(f"{job_num}_*/record.json"))
        return json.loads(paths[0].read_text()) if paths else None

    def wait_mid_training(self, job_num: int, timeout: float = 240) -> dict:
        """The job's record (status running) once it has saved a checkpoint, i.e. is training."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc.poll() is None, f"the launcher ended early:\n{self.output()[-3000:]}"
            rec = self.record(job_num)
            if rec and list(self.dir.glob(f"{job_num}_*/last.pt")):
                assert rec["status"] == "running", f"job {job_num} finished before it could be interrupted"
                return rec
            time.sleep(0.2)
        pytest.fail(f"job {job_num} did not start training within {timeout} s:\n{self.output()[-3000:]}")

    def cancel_leftovers(self) -> None:
        ids = {p.name.split("_")[0] for p in (self.dir / ".submitit").glob("*") if p.name[0].isdigit()}
        if ids:
            subprocess.run(["scancel", *sorted(ids)], env=self.env, capture_output=True, timeout=60)
        if self.proc.poll() is None:
            self.proc.kill()


@pytest.fixture
def sweeps(slurm_env, tmp_path):
    started = []

    def start(*overrides: str) -> Sweep:
        sweep = Sweep(slurm_env, tmp_path / f"s{len(started)}", *overrides)
        started.append(sweep)
        return sweep

    yield start
    for sweep in started:
        sweep.cancel_leftovers()


@pytest.mark.slurm
def test_sweep_runs_as_a_job_array_and_records_the_slurm_ids(sweeps, slurm_env):
    sweep = sweeps("seed=1,2")
    assert sweep.wait(timeout=300) == 0, sweep.output()[-3000:]
    recs = [sweep.record(0), sweep.record(1)]
    assert [r["status"] for r in recs] == ["ok", "ok"]
    ids = [r["job"]["slurm_job_id"] for r in recs]
    # one array, one task per job: <array id>_<task>, as submitit names its folders
    assert re.fullmatch(r"\d+_0", ids[0]) and ids[1] == ids[0][:-1] + "1", ids
    for job_id in ids:
        assert (sweep.dir / ".submitit" / job_id).is_dir()
        assert slurm(slurm_env, "sacct", "-n", "-X", "-j", job_id, "-o", "State").split() == ["COMPLETED"]
    assert [r["seed"] for r in recs] == [1, 2]


def _comparable(rec: dict) -> dict:
    """What an interrupted-and-resumed run must reproduce exactly (no timings)."""
    return {"metrics": {split: {k: v for k, v in m.items() if "second" not in k}
                        for split, m in rec["metrics"].items()},
            "train_loss": [(r["step"], r["loss"]) for r in rec["curves"]["train"]],
            "valid_nll": [(r["step"], r["valid_nll"]) for r in rec["curves"]["valid"]]}


@pytest.mark.slurm
@pytest.mark.parametrize("how", ["scontrol_requeue", "timeout_signal"])
def test_requeued_job_resumes_and_matches_an_uninterrupted_run(sweeps, slurm_env, how):
    """Job 0 is requeued mid-training; job 1, the same configuration, runs through. Both must agree.

    scontrol_requeue: SLURM requeues the job and sends SIGTERM (as preemption does).
    timeout_signal: USR2, what SLURM sends signal_delay_s before the time limit; submitit's handler requeues.
    """
    sweep = sweeps(*LONG, "sweep_name=interrupted,reference")
    job_id = sweep.wait_mid_training(0)["job"]["slurm_job_id"]
    if how == "scontrol_requeue":
        slurm(slurm_env, "scontrol", "requeue", job_id)
    else:
        slurm(slurm_env, "scancel", "--signal=USR2", job_id)
    # SLURM holds a requeued job for 2 minutes (BeginTime); release it so the test stays short
    deadline = time.monotonic() + 300
    released = False
    while sweep.proc.poll() is None and time.monotonic() < deadline:
        state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], env=slurm_env, capture_output=True,
                               text=True, timeout=60).stdout.split()
        if state[:2] == ["PENDING", "BeginTime"]:
            slurm(slurm_env, "scontrol", "update", f"JobId={job_id}", "StartTime=now")
            released = True
        time.sleep(1)
    assert sweep.wait(timeout=max(1.0, deadline - time.monotonic())) == 0, sweep.output()[-3000:]
    assert released, "the job was never requeued"

    resumed, reference = sweep.record(0), sweep.record(1)
    assert resumed["status"] == "ok" and reference["status"] == "ok"
    assert resumed["job"]["slurm_job_id"] == job_id
    assert 0 < resumed["resumed_from_step"] < 200, resumed["resumed_from_step"]
    assert reference["resumed_from_step"] is None
    states = slurm(slurm_env, "sacct", "-D", "-n", "-X", "-j", job_id, "-o", "State").split()
    assert states == ["REQUEUED", "COMPLETED"], states
    assert _comparable(resumed) == _comparable(reference)


def _job_processes(sweep: Sweep) -> list[int]:
    """PIDs of the sweep's job processes (``python -m submitit.core._submit <sweep>/.submitit/...``), not srun's."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0") if proc.name.isdigit() else []
        except OSError:
            continue
        if argv and Path(argv[0].decode()).name.startswith("python") and b"submitit.core._submit" in argv \
                and any(a.startswith(str(sweep.dir).encode()) for a in argv):
            pids.append(int(proc.name))
    return pids


@pytest.mark.slurm
@pytest.mark.parametrize("how", ["scancel_signal_kill", "sigkill_process"])
def test_killed_job_is_reported_failed_in_bounded_time(sweeps, slurm_env, how):
    """A job that dies without a word (SIGKILL: nothing to catch, no checkpoint, no result) is reported failed.

    scancel_signal_kill: ``scancel --signal=KILL``, SLURM cancels the job.
    sigkill_process: SIGKILL to the job's Python process, as the OOM killer would; the job step fails.
    Accounting (slurmdbd) is what lets the launcher see it: without sacct it would wait forever.
    The launcher marks the job's record failed with SLURM's state; the other job and the report go on.
    """
    sweep = sweeps(*LONG, "seed=1,2")
    job_id = sweep.wait_mid_training(0)["job"]["slurm_job_id"]
    if how == "scancel_signal_kill":
        slurm(slurm_env, "scancel", "--signal=KILL", job_id)
    else:
        pids = [p for p in _job_processes(sweep) if _job_of(p) == job_id]
        assert pids, "the job's process was not found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    rc = sweep.wait(timeout=300)
    out = sweep.output()
    assert rc == 0, out[-3000:]
    state = slurm(slurm_env, "sacct", "-n", "-X", "-j", job_id, "-o", "State").split()
    assert state and state[0].rstrip("+") in ("CANCELLED", "FAILED"), state
    lost, other = sweep.record(0), sweep.record(1)
    assert lost["status"] == "failed", lost["status"]
    assert re.match(rf"SLURM job {job_id} ended without a result \(state (CANCELLED|FAILED)", lost["error"]), \
        lost["error"]
    assert time.monotonic() - killed < 240  # job 1 runs on meanwhile; the lost one never blocks the sweep
    assert re.search(rf"job #0 SLURM job {job_id} ended without a result", out), out[-3000:]
    assert other["status"] == "ok"
    report = (sweep.dir / "report" / "report.md").read_text()
    assert "ended without a result" in report


def _job_of(pid: int) -> str | None:
    """The SLURM job id (``<array>_<task>``) a process runs in, from its environment."""
    env = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in kv)
    array, task = env.get(b"SLURM_ARRAY_JOB_ID"), env.get(b"SLURM_ARRAY_TASK_ID")
    return f"{array.decode()}_{task.decode()}" if array and task else None


# -- without a cluster: how the job's stop flag hands over to submitit (runs in the default suite) -------------

@pytest.fixture
def saved_handlers():
    sigs = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
    saved = {sig: signal.getsignal(sig) for sig in sigs}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_stop_flag_defers_submitits_requeue_until_the_checkpoint_is_saved(monkeypatch, saved_handlers):
    calls = []

    def submitit_handler(signum, frame):  # stands for submitit's checkpoint_and_try_requeue
        calls.append(signum)
        raise SystemExit(-1)

    signal.signal(signal.SIGUSR2, submitit_handler)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    stop = StopFlag()
    os.kill(os.getpid(), signal.SIGUSR2)
    assert stop() and calls == []  # the loop stops and saves first...
    with pytest.raises(SystemExit):
        stop.hand_over()  # ...then submitit requeues
    assert calls == [signal.SIGUSR2]
    # a second job in the same process still reaches submitit's handler
    StopFlag().set(signal.SIGUSR2, None)
    assert signal.getsignal(signal.SIGUSR2).__self__._chained[signal.SIGUSR2] is submitit_handler


def test_stop_flag_on_sigterm_exits_without_a_result_only_under_slurm(monkeypatch, saved_handlers):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    stop = StopFlag()
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL  # no submitit here: USR2 left alone
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop() and stop.signal == signal.SIGTERM
    stop.hand_over()  # outside SLURM: nothing, the job raises Interrupted as before
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    with pytest.raises(SystemExit, match="SIGTERM"):
        stop.hand_over()  # SLURM requeued (or cancelled) the job: exit, leave the result to the requeued run


@pytest.mark.slurm
def test_a_two_task_job_trains_data_parallel(sweeps, slurm_env):
    """``tasks_per_node=2``: submitit starts two processes of one SLURM job; they train as one DDP job (gloo on CPU)."""
    sweep = sweeps("hydra.launcher.tasks_per_node=2", "trainer.max_steps=6")
    assert sweep.wait(timeout=300) == 0, sweep.output()[-3000:]
    rec = sweep.record(0)
    assert rec["status"] == "ok", rec.get("error")
    assert rec["environment"]["processes"] == 2
    assert rec["costs"]["steps"] == 6 and len(rec["curves"]["train"]) == 6
    assert re.fullmatch(r"\d+(_0)?", rec["job"]["slurm_job_id"])  # one job: no array
