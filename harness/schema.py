"""The result record: one JSON file per job (``record.json``), the single source of truth for reports.

Torch-free: every writer (a training job, a path-length analysis, the sweep launcher marking jobs that never
ran or that SLURM lost) builds its record with the functions here and writes it with :func:`write`, and the
report (reports/load.py) reads the keys named here.

Schema (version 1), top-level keys:
  schema_version, status (one of STATUSES), error, traceback (failed jobs),
  job {name, sweep, output_dir, started, finished, slurm_job_id, previous_record},
  config (the resolved Hydra config, secrets redacted), seed,
  environment {git_commit, git_dirty, python, packages, device, device_name, device_count, threads,
               threads_chosen, hostname, deterministic, precision, processes}  (harness/environment.py),
  model {name, preset, form, paper, parameters, warnings}, task (the task's ``describe()``: name, family, form,
  metrics, ...), metrics {<split>: the task's ``evaluate`` entries}, eval_checkpoint,
  costs {COST_KEYS, flops_convention, cpu_seconds, cpu_threads, load_average {start, end},
         gpu_utilization_samples} (harness/utilization.py: how much of the machine the run had),
  curves {train: [...], valid: [...]},
  resumed_from_step, skipped_steps, best_recreated; analysis jobs carry path_length or analysis instead.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from .io import atomic_write_text, write_json
from .secrets import scrub

SCHEMA_VERSION = 1
RECORD_NAME = "record.json"
PREVIOUS_NAME = "record.previous.json"  # a folder's earlier finished record, kept when a rerun starts there
STATUSES = ("running", "ok", "failed", "interrupted")
BUDGET_KEYS = ("max_seconds", "max_steps", "max_tokens", "max_epochs")  # config.trainer: what bounds training
COST_KEYS = ("train_seconds", "steps", "tokens", "train_tokens_per_second", "decode_sentences_per_second",
             "peak_memory_bytes", "peak_memory_kind", "train_flops", "flops_per_token", "cpu_utilization",
             "gpu_utilization")
CURVE_KEYS = ("step", "train_seconds", "valid_bleu_greedy", "valid_ppl", "valid_accuracy")  # curves.valid rows
OBJECT, TEXT, NUMBER = (dict, type(None)), (str, type(None)), (int, float, type(None))
# the JSON types the report accepts where it reads a record (absent keys are fine)
SHAPE = {("status",): TEXT, ("error",): TEXT, ("seed",): NUMBER,
         ("job",): OBJECT, ("job", "name"): TEXT, ("job", "sweep"): TEXT, ("job", "started"): TEXT,
         ("config",): OBJECT, ("config", "seed"): NUMBER, ("config", "model"): OBJECT, ("config", "trainer"): OBJECT,
         ("config", "task"): OBJECT, ("environment",): OBJECT, ("environment", "packages"): OBJECT,
         ("environment", "device_name"): TEXT, ("model",): OBJECT, ("model", "name"): TEXT, ("model", "preset"): TEXT,
         ("task",): OBJECT, ("task", "name"): TEXT, ("task", "family"): TEXT, ("metrics",): OBJECT,
         ("costs",): OBJECT, ("curves",): OBJECT, ("path_length",): OBJECT, ("analysis",): OBJECT}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write(path: Path, record: dict) -> None:
    """Atomically write a record (secrets scrubbed), stamped with the schema version."""
    write_json(path, scrub({"schema_version": SCHEMA_VERSION, **record}))


def keep_previous(path: Path) -> Path | None:
    """Keep the folder's earlier finished record (status ``ok``) beside it before a rerun writes over it.

    A rerun in a finished job's folder (a longer budget, a changed setting whose resume is refused, a
    crash) replaces ``record.json`` with its own; the finished one is copied to ``record.previous.json``
    first, so no computed result is lost. Returns that path, or None when there is no finished record
    (none, unreadable, or not a regular file: reading a FIFO would block).
    """
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
        old = json.loads(text)
    except (OSError, ValueError):
        return None
    if not isinstance(old, dict) or old.get("status") != "ok":
        return None
    kept = path.with_name(PREVIOUS_NAME)
    atomic_write_text(kept, text)  # the file as it was, not re-serialised
    return kept


def job_entry(name: str, sweep: str | None, out_dir: Path | str, *, started: str | None = None,
              slurm_job_id: str | None = None) -> dict:
    """The record's ``job`` entry (``finished`` is set when the job ends)."""
    return {"name": name, "sweep": sweep, "output_dir": str(out_dir), "started": started, "finished": None,
            "slurm_job_id": slurm_job_id}


def started(config: dict, seed, job: dict) -> dict:
    """A job's record as it starts: ``running``, with its config and ``job`` entry."""
    return {"status": "running", "error": None, "seed": seed, "config": config, "job": job}


def not_started(config: dict, seed, job: dict, reason: str) -> dict:
    """A sweep job that never ran (the sweep was stopped before it): ``interrupted``, so a rerun runs it."""
    return {"status": "interrupted", "error": f"not started: {reason}", "seed": seed, "config": config,
            "job": {**job, "finished": now()}}


def lost(rec: dict | None, *, name: str, out_dir: Path | str, overrides: list[str], slurm_job_id: str,
         error: str) -> dict:
    """A job SLURM ended without a result: its own record (``rec``, if it wrote one) or a new one, ``failed``."""
    rec = rec or {"status": "running", "seed": None, "config": {"overrides": overrides},
                  "job": job_entry(name, None, out_dir, slurm_job_id=slurm_job_id)}
    rec.update(status="failed", error=error)
    rec["job"]["finished"] = now()
    return rec


def analysis(*, status: str, error: str | None, seed, job: dict, config: dict, environment: dict, model: dict,
             task: dict, **entries) -> dict:
    """The record of a job that analyses a model instead of training it (``path_length``, ...)."""
    return {"status": status, "error": error, "seed": seed, "job": {**job, "finished": now()}, "config": config,
            "environment": environment, "model": model, "task": task, **entries}
