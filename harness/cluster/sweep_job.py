"""One job of a local sweep in a process of its own, forked from the sweep's process.

Hydra's basic launcher runs a sweep's jobs one after another in its own process; run there, a job would inherit
what earlier jobs left behind (memory they left resident, allocator state, caches) and its peak memory would not
be its own. :func:`in_child` forks a child per job from the sweep's process, which itself never trains (so its
state is that of a fresh start), runs the job there and hands its record back. Stop signals reach the job as they
would in-process: SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) sent to the sweep are passed to the running job, once (the
job runs in a process group of its own, so the terminal's Ctrl-C reaches the sweep alone), and the sweep waits for
the job to stop; a SIGTERM/SIGUSR1 between jobs stops the next one at its first step; the job dies with the sweep
if the sweep is killed.
"""
from __future__ import annotations

import ctypes
import logging
import os
import pickle
import signal
import sys
from collections.abc import Callable

from .. import environment
from .signals import StopFlag

FORWARDED = (signal.SIGTERM, signal.SIGUSR1)  # and SIGINT while a job runs
HELD = (*FORWARDED, signal.SIGINT)  # held back while a job is forked: none is lost between fork and hand-over
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies
_child: list[int] = []  # the running job's pid
_pending: list[int] = []  # a stop signal that came between jobs: the next job starts stopped


def _forward(signum, frame) -> None:
    if _child:
        try:
            os.kill(_child[0], signum)
            return
        except ProcessLookupError:  # the job has just ended: the next one takes the stop
            pass
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    _pending.append(signum)


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    for handler in logging.getLogger().handlers + logging.getLogger("seqbench").handlers:
        handler.flush()


def _send(fd: int, outcome: tuple) -> None:
    try:
        payload = pickle.dumps(outcome)
    except Exception:  # noqa: BLE001 (an exception that cannot be pickled: its type and message)
        err = outcome[1]
        payload = pickle.dumps(("error", RuntimeError(f"{type(err).__name__}: {err}")))
    with os.fdopen(fd, "wb") as pipe:
        pipe.write(payload)


def in_child(run_job: Callable[..., dict], *args, **kwargs) -> dict:
    """``run_job(*args, **kwargs)`` in a forked child: its record, or its exception raised here."""
    for sig in FORWARDED:
        if signal.getsignal(sig) is not _forward:
            signal.signal(sig, _forward)
    _flush()
    library_pages = environment._status_bytes("RssFile")
    read, write = os.pipe()
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD)  # a stop now waits until the job can take it
    known = len(_pending)  # the job starts with these (fork copies them)
    try:
        pid = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)
        raise
    if pid == 0:  # the job
        os.close(read)
        os.setpgid(0, 0)  # the terminal's Ctrl-C reaches the sweep, which passes it on once
        _die_with_parent()
        if library_pages is not None:  # its peak memory counts them as a process of its own would
            environment.PARENT_RSS_FILE[:] = [library_pages]
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        code = 0
        try:
            flag = StopFlag()  # the job's own flag takes over from it, stop included
            if _pending:
                flag.set(_pending[-1], None)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)
            outcome = ("ok", run_job(*args, **kwargs))
        except BaseException as err:  # noqa: BLE001 (handed to the sweep's process, which raises it)
            outcome, code = ("error", err), 1
        try:
            _send(write, outcome)
        finally:
            _flush()
            os._exit(code)
    os.close(write)
    _child.append(pid)
    # The mask holds a stop back in this thread only: the kernel may hand a signal sent to the process to another
    # thread (a BLAS or OpenMP worker), and Python then runs the handler here as soon as it can, possibly between
    # the fork and the line above, when it could not yet name the job. Such a stop is passed on now.
    late = _pending[known:]
    _pending.clear()  # the job has the earlier ones
    for signum in late:
        os.kill(pid, signum)
    previous_int = signal.signal(signal.SIGINT, _forward)  # Ctrl-C: passed to the job; the sweep waits for it
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)  # a stop that came meanwhile goes to the job now
    try:
        with os.fdopen(read, "rb") as pipe:
            payload = pipe.read()
        _, status = os.waitpid(pid, 0)
    finally:
        _child.clear()
        signal.signal(signal.SIGINT, previous_int)
    if not payload:
        code = os.waitstatus_to_exitcode(status)
        raise RuntimeError(f"the job's process ended without a result (exit status {code}"
                           + (f", {signal.Signals(-code).name}" if code < 0 else "") + "); its folder keeps what it "
                           "wrote, and rerunning the sweep resumes it")
    kind, value = pickle.loads(payload)
    if kind == "error":
        raise value
    return value
