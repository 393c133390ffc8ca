"""Failure isolation for sweeps: jobs that SLURM ends without a result, jobs a stopped sweep never ran, and the
sweep's exit status.

A job killed by SIGKILL (the OOM killer, ``scancel --signal=KILL``), by a node failure or by a
cancellation cannot write its own record: it stays at status ``running``, and Hydra's submitit
launcher raises on it, ending the sweep without a report. With :class:`RecordLostJobs` the launcher
still waits for every job, then such a job's record is marked ``failed`` with SLURM's final state
(a record is written if the job never got to write one) and the sweep finishes: the other jobs'
records and the report are produced, and the report lists the failure.

A sweep ends with exit status 1, after its report, when it was stopped (a job ``interrupted``) or when no
job finished ``ok``: a script or scheduler running it sees the failure without reading the records.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .. import schema, secrets
from ..job import job_name

log = logging.getLogger("seqbench.launcher")


class RecordLostJobs(Callback):
    """Hydra callback (``conf/config.yaml``): failure isolation for sweeps, and their exit status.

    While the sweep runs, a submitit job's ``results()`` that would raise (the job ended without a
    result) writes the job's ``failed`` record instead and returns an empty result, so the launcher
    carries on with the other jobs and the sweep ends with its report. Launchers other than
    submitit's are untouched. At the end (after the report, which Hydra's reverse order of
    ``on_multirun_end`` builds first) the sweep exits with status 1 if :func:`sweep_problem` finds one.
    """

    def __init__(self):
        self._stock = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if "submitit" not in str(config.hydra.launcher.get("_target_", "")):
            return
        from submitit.core.core import Job

        sweep_dir, stock = Path(str(config.hydra.sweep.dir)), Job.results
        self._stock = stock

        def results(job):
            from submitit.core.utils import FailedJobError, UncompletedJobError

            try:
                return stock(job)
            except (UncompletedJobError, FailedJobError) as err:
                return [_lost(job, err, sweep_dir)]

        Job.results = results

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self._stock is not None:
            from submitit.core.core import Job

            Job.results, self._stock = self._stock, None
        problem = sweep_problem(Path(str(config.hydra.sweep.dir)))
        if problem:
            raise SystemExit(f"[seqbench] {problem}")  # Hydra's callbacks catch Exception only: this ends the sweep


def sweep_problem(sweep_dir: Path) -> str | None:
    """Why a finished sweep must exit non-zero: it was stopped before every job ran, or no job finished ``ok``."""
    statuses = Counter()
    for path in sweep_dir.glob(f"*/{schema.RECORD_NAME}"):
        try:
            statuses[json.loads(path.read_text(encoding="utf-8")).get("status")] += 1
        except (OSError, ValueError):
            statuses["unreadable"] += 1
    counts = ", ".join(f"{n} {status}" for status, n in sorted(statuses.items(), key=str)) or "no job records"
    if statuses["interrupted"]:
        return (f"the sweep was stopped before it finished ({counts}): rerun the same command with "
                f"hydra.sweep.dir={sweep_dir} to finish it (the interrupted jobs resume from their checkpoints)")
    if not statuses["ok"]:
        return f"no job of the sweep finished ok ({counts}); the records in {sweep_dir} hold each job's error"
    return None


def mark_not_started(cfg: DictConfig, out_dir: Path, reason: str) -> dict:
    """Record a sweep job that never ran, the sweep having stopped: ``interrupted``, so that the report lists it
    and rerunning the sweep in its folder runs it."""
    out_dir = Path(out_dir)
    rec = schema.not_started(OmegaConf.to_container(cfg), cfg.get("seed"),
                             schema.job_entry(job_name(cfg), cfg.get("sweep_name"), out_dir), reason)
    schema.write(out_dir / schema.RECORD_NAME, rec)
    secrets.scrub_files(out_dir)  # Hydra's copies of the config
    print(f"[seqbench] {rec['job']['name']}: not started | {reason}")
    return rec


def _lost(job, err: Exception, sweep_dir: Path) -> JobReturn:
    """Record a job SLURM ended without a result; the launcher gets an empty (completed) job return."""
    try:
        args = job.submission().args  # the launcher's call: (overrides, dir key, job number, ...)
        overrides, job_num = list(args[0]), int(args[2])
    except Exception:  # the submission pickle is gone: the record still names the SLURM job
        overrides, job_num = [], -1
    message = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    error = (f"SLURM job {job.job_id} ended without a result (state {job.state}): {message}. "
             f"Its log: {job.paths.stderr}")
    path = mark_lost(sweep_dir, job.job_id, job_num, overrides, error)
    log.error("job #%d %s; record: %s", job_num, error, path)
    return JobReturn(overrides=overrides, status=JobStatus.COMPLETED, _return_value=None)


def mark_lost(sweep_dir: Path, slurm_job_id: str, job_num: int, overrides: list[str], error: str) -> Path:
    """Mark the record of a job that SLURM ended as ``failed`` (or write one); returns its path."""
    for path in sorted(sweep_dir.glob(f"*/{schema.RECORD_NAME}")):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if rec.get("job", {}).get("slurm_job_id") == slurm_job_id:
            break
    else:
        path, rec = sweep_dir / f"{job_num}_lost" / schema.RECORD_NAME, None
    if rec is not None and rec.get("status") in ("ok", "failed"):  # the job wrote its own outcome before it was lost
        return path
    schema.write(path, schema.lost(rec, name=f"job {job_num}: {' '.join(overrides)}", out_dir=path.parent,
                                   overrides=overrides, slurm_job_id=slurm_job_id, error=error))
    return path
