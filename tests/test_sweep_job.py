"""A local sweep's job in a process of its own (harness/cluster/sweep_job.py): its result and its errors come back,
nothing it changes reaches the sweep's process, a job that dies says how."""
from __future__ import annotations

import os
import signal

import pytest

from seqbench.harness.cluster import sweep_job
from seqbench.harness.train import Interrupted

if not hasattr(os, "fork"):
    pytest.skip("no fork on this platform: a local sweep runs its jobs in its own process", allow_module_level=True)

TOUCHED: list[int] = []


def job(out_dir: str, *, sweep: str, raise_errors: bool) -> dict:
    TOUCHED.append(os.getpid())
    return {"status": "ok", "pid": os.getpid(), "out": out_dir, "sweep": sweep, "raise_errors": raise_errors}


def test_the_job_runs_in_another_process_and_its_record_comes_back_unchanged():
    rec = sweep_job.in_child(job, "/tmp/x", sweep="s", raise_errors=False)
    assert rec == {"status": "ok", "pid": rec["pid"], "out": "/tmp/x", "sweep": "s", "raise_errors": False}
    assert rec["pid"] != os.getpid() and TOUCHED == []  # what the job changed stayed in its process


def failing(message: str) -> dict:
    raise Interrupted(message)


def test_the_jobs_exception_is_raised_in_the_sweep_with_its_type_and_message():
    with pytest.raises(Interrupted, match="stopped at step 3"):
        sweep_job.in_child(failing, "stopped at step 3")


def dies() -> dict:
    os.kill(os.getpid(), signal.SIGKILL)
    return {}


def test_a_job_killed_without_a_result_says_so_and_how_to_resume():
    with pytest.raises(RuntimeError, match="without a result.*SIGKILL.*resumes"):
        sweep_job.in_child(dies)


def test_a_stop_signal_between_jobs_reaches_the_next_job_as_a_stop_not_a_kill():
    """SIGTERM to the sweep while no job runs: the next job starts with its stop flag set (it stops at its first
    step, as in-process), and the sweep's process lives on."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        sweep_job.in_child(job, "/tmp/x", sweep="s", raise_errors=False)  # installs the sweep's handlers
        os.kill(os.getpid(), signal.SIGTERM)

        def flag_state() -> dict:
            from seqbench.harness.cluster.signals import StopFlag  # noqa: PLC0415
            return {"stopped": StopFlag()()}  # a job's flag, made as job.run makes it

        assert sweep_job.in_child(flag_state) == {"stopped": True}
        assert sweep_job.in_child(flag_state) == {"stopped": False}  # handed on once
    finally:
        signal.signal(signal.SIGTERM, previous)


def job_sees_a_stop(pause: float = 0.0) -> dict:
    """A job that makes its stop flag after ``pause`` seconds (a stop may come before or after) and waits up to 20 s
    for a stop to set it."""
    import time  # noqa: PLC0415

    from seqbench.harness.cluster.signals import StopFlag  # noqa: PLC0415
    time.sleep(pause)
    flag, deadline = StopFlag(), time.monotonic() + 20
    while not flag() and time.monotonic() < deadline:
        time.sleep(0.02)
    return {"stopped": flag()}


def test_a_stop_whose_handler_runs_before_the_sweep_knows_the_jobs_pid_reaches_the_job(monkeypatch):
    """A signal sent to the process may land in another thread (a BLAS or OpenMP worker) despite the mask, and its
    handler then runs in the main thread between the fork and the sweep's recording the job's pid: the stop is
    passed on, not dropped."""
    real_fork = os.fork

    def fork_then_early_handler() -> int:
        pid = real_fork()
        if pid:
            sweep_job._forward(signal.SIGTERM, None)  # what the handler does when it runs at this point
        return pid

    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(os, "fork", fork_then_early_handler)
    try:
        assert sweep_job.in_child(job_sees_a_stop) == {"stopped": True}
        assert sweep_job._pending == []  # handed on, not kept for the next job
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_stop_sent_while_the_job_is_being_forked_reaches_the_job(monkeypatch):
    """SIGTERM to the sweep between the fork and the sweep's knowing its job's pid: held back, then passed on."""
    real_fork = os.fork

    def fork_then_stop() -> int:
        pid = real_fork()
        if pid:
            os.kill(os.getpid(), signal.SIGTERM)
        return pid

    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(os, "fork", fork_then_stop)
    try:
        assert sweep_job.in_child(job_sees_a_stop, 0.3) == {"stopped": True}  # the stop usually comes before the job's flag exists
    finally:
        signal.signal(signal.SIGTERM, previous)
