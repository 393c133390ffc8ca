"""Stop signals of a job: SIGTERM/SIGUSR1 (SLURM's time limit, preemption, ``scontrol requeue``) and submitit's
timeout signal end training at the next step with ``last.pt`` saved; under SLURM the job then hands over to its
requeued run."""
from __future__ import annotations

import os
import signal

from ..train import Interrupted


def slurm_job_id() -> str | None:
    """The SLURM job id (``<array job>_<task>`` inside an array), or None outside SLURM."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    return os.environ.get("SLURM_JOB_ID")


class StopFlag:
    """Set by SIGTERM/SIGUSR1 (SLURM time limit, preemption, ``scontrol requeue``): the loop saves and stops at the next step.

    Inside a submitit job on SLURM it also takes submitit's timeout signal (USR2, ``$SUBMITIT_PREEMPT_SIGNAL``),
    whose handler would otherwise requeue the job mid-step without saving; that handler is kept and run by
    :meth:`hand_over` once ``last.pt`` is saved.
    """

    def __init__(self):
        self.signal = None
        self._chained = {}  # signal -> submitit's handler, run after the checkpoint is saved
        self._requeue_on = None
        submitit_sig = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
        for sig in dict.fromkeys(s for s in (signal.SIGTERM, signal.SIGUSR1, submitit_sig) if s is not None):
            previous = signal.getsignal(sig)
            if isinstance(getattr(previous, "__self__", None), StopFlag):  # the flag of an earlier job
                self.signal = self.signal or previous.__self__.signal  # a stop that came after that job's last check
                previous = previous.__self__._chained.get(sig)
            chain = sig == submitit_sig and callable(previous)
            if sig not in (signal.SIGTERM, signal.SIGUSR1) and not chain:
                continue  # submitit's signal outside a submitit job: left alone
            try:
                signal.signal(sig, self.set)
            except ValueError:  # not the main thread
                continue
            if chain:
                self._chained[sig] = previous

    def set(self, signum, frame):
        self.signal = signum
        if signum in self._chained:
            self._requeue_on = signum

    def __call__(self) -> bool:
        return self.signal is not None

    def check(self, during: str):
        """A ``check_stop`` for evaluation, which runs after training: it raises :class:`Interrupted` once stopped."""
        def check():
            if self.signal is not None:
                raise Interrupted(f"stopped by {signal.Signals(self.signal).name} {during}; training is complete "
                                  "(checkpoints kept): rerun the same command in the same folder to evaluate")
        return check

    def hand_over(self) -> None:
        """After a stop on a signal, with ``last.pt`` saved and the record written: leave the rest to the requeued job.

        Only inside a submitit job on SLURM (else it returns). On submitit's signal its handler resubmits the
        same job and requeues it (``scontrol requeue``) and exits. On SIGTERM SLURM has already requeued the job
        (``scontrol requeue``, preemption) or cancelled it, so the process exits without a result, and the
        launcher waits for the requeued run, which resumes from ``last.pt``.
        """
        if self.signal is None or os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or not os.environ.get("SLURM_JOB_ID"):
            return
        if self._requeue_on is not None:
            self._chained[self._requeue_on](self._requeue_on, None)  # submitit: checkpoint, requeue, sys.exit
        raise SystemExit(f"stopped by {signal.Signals(self.signal).name} with last.pt saved; "
                         f"SLURM job {slurm_job_id()} resumes from it if requeued")
