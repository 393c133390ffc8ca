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

# The sweep's time estimate (SweepPlan): rough allowances, printed as an estimate
SETUP_SECONDS = 3.0  # per job: build the task and the model, count FLOPs, write the record
EVAL_SHARE = 0.25  # per job: validation and test evaluation, as a share of its training time
STEP_SECONDS = 0.1  # per step, for a job whose budget is steps only (tiny presets on a CPU; larger models take longer)
SWEEP_SECONDS = 15.0  # once per sweep: start-up and the report
BUDGET_FREE = ("model", "task", "seed")  # overrides that leave a job's training budget as it is


class SweepPlan(Callback):
    """Hydra callback (``conf/config.yaml``): at the start of a sweep, print how many jobs it runs and an estimate
    of how long they take, from their budgets (:func:`estimate`)."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        try:
            print(f"[seqbench] {describe_plan(config)}", flush=True)
        except Exception as err:  # a plan that cannot be worked out must not stop the sweep
            log.debug("no sweep estimate: %s", err)


def sweep_jobs(config: DictConfig) -> list[list[str]]:
    """Each job's overrides, as Hydra's basic sweeper makes them (``hydra.sweeper.params`` and the command line)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    overrides = parser.parse_overrides([*params, *config.hydra.overrides.task])
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def job_seconds(cfg: DictConfig) -> float | None:
    """A rough estimate of one job's wall-clock seconds from its budget: training (``trainer.max_seconds``, or
    ``max_steps`` x ``STEP_SECONDS``, whichever ends first), plus ``SETUP_SECONDS`` and ``EVAL_SHARE`` of the
    training time for evaluation. None for an epoch budget alone (its time depends on the data and the model)."""
    if cfg.get("job", "train") != "train":
        return SETUP_SECONDS
    t = cfg.trainer
    bounds = [b for b in (t.get("max_seconds"), t.get("max_steps") and t.max_steps * STEP_SECONDS) if b]
    if not bounds:
        return None
    train = min(bounds)
    return train + SETUP_SECONDS + EVAL_SHARE * train


def parallel_jobs(config: DictConfig, n: int) -> int:
    """How many of the sweep's jobs run at once: joblib's n_jobs, SLURM's array parallelism, else one."""
    launcher = config.hydra.launcher
    target = str(launcher.get("_target_", ""))
    if "joblib" in target:
        at_once = int(launcher.get("n_jobs") or 1)
    elif "submitit" in target:
        at_once = int(launcher.get("array_parallelism") or 1)
    else:
        at_once = 1
    return max(1, min(n, at_once if at_once > 0 else n))


def estimate(config: DictConfig, jobs: list[list[str]]) -> tuple[float, int]:
    """The sweep's estimated wall-clock seconds and how many of its jobs could not be estimated (epoch budgets).

    One config is composed per distinct set of budget-relevant overrides (not ``BUDGET_FREE``), as Hydra composes
    each job's."""
    from hydra.core.global_hydra import GlobalHydra

    loader, seconds, per_group = GlobalHydra.instance().config_loader(), [], {}
    for job in jobs:
        group = tuple(o for o in job if o.split("=", 1)[0].lstrip("+~") not in BUDGET_FREE)
        if group not in per_group:
            per_group[group] = job_seconds(loader.load_sweep_config(config, list(job)))
        seconds.append(per_group[group])
    known = [s for s in seconds if s is not None]
    return SWEEP_SECONDS + sum(known) / parallel_jobs(config, len(jobs)), len(seconds) - len(known)


def duration(seconds: float) -> str:
    """``about 40 s``, ``about 15 min``, ``about 2 h 10 min``."""
    if seconds < 60:
        return f"about {max(10, round(seconds, -1)):.0f} s"
    minutes = round(seconds / 60)
    return f"about {minutes} min" if minutes < 60 else f"about {minutes // 60} h {minutes % 60} min"


def describe_plan(config: DictConfig) -> str:
    """``sweep quick: 5 jobs, about 15 min in all (an estimate from the budgets: ...)``."""
    jobs = sweep_jobs(config)
    seconds, unknown = estimate(config, jobs)
    at_once = parallel_jobs(config, len(jobs))
    how = (f"a rough estimate: each job's training budget (steps at ~{STEP_SECONDS} s), ~{SETUP_SECONDS:.0f} s "
           f"set-up and {EVAL_SHARE:.0%} more for evaluation, ~{SWEEP_SECONDS:.0f} s start-up and report; "
           f"{'one job at a time' if at_once == 1 else f'{at_once} jobs at a time'}")
    text = f"sweep {config.get('sweep_name')}: {len(jobs)} job{'s' * (len(jobs) != 1)}, "
    if unknown == len(jobs):
        return text + ("time not estimated (epoch or FLOP budgets: their time depends on the data, the model and the "
                       "machine)")
    text += f"{duration(seconds)} in all ({how}"
    if unknown:
        text += f"; not counted: {unknown} jobs with an epoch or FLOP budget alone"
    return text + f") -> {config.hydra.sweep.dir}"


class SweepReport(Callback):
    """Hydra callback (``conf/config.yaml``): :class:`reports.callback.BuildReport` when the sweep ends, imported
    only then, so that a job does not carry the report's libraries (pandas, matplotlib, scipy: about 150 MB of
    memory and seconds of start-up) while it trains."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from seqbench.reports.callback import BuildReport

        BuildReport().on_multirun_end(config, **kwargs)


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
