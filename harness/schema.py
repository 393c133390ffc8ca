"""The result record: one JSON file per job (``record.json``), the single source of truth for reports.

Torch-free: every writer (a training job, a path-length analysis, the sweep launcher marking jobs that never
ran or that SLURM lost) builds its record with the functions here and writes it with :func:`write`, and the
report (reports/load.py) reads the keys named here.

Schema (version 1), top-level keys:
  schema_version, metrics_version (what the metric names mean: harness/metrics.py, VERSION),
  status (one of STATUSES), error, traceback (failed jobs),
  job {name, sweep, output_dir, started, finished, slurm_job_id, previous_record (the folder's earlier finished
       run, kept in previous/<finished>/record.json: keep_previous), config_digest (a rerun of the same config in
       the folder of its finished run returns that record: harness/job.py finished_here)},
  config (the resolved Hydra config, secrets redacted), seed,
  environment {git_commit, git_dirty, python, packages, device, device_name, device_count, threads,
               threads_chosen, hostname, deterministic, precision, processes}  (harness/environment.py),
  model {name, preset, form, paper, parameters, warnings}, task (the task's ``describe()``: name, family, form,
  metrics, ...), metrics {<split>: the task's ``evaluate`` entries}, eval_checkpoint,
  costs {COST_KEYS (mfu, peak_flops, peak_method, mfu_note: harness/peak.py), flops_convention, cpu_seconds,
         cpu_threads, load_average {start, end}, gpu_utilization_samples} (harness/utilization.py: how much of the
         machine the run had),
  curves {train: [...], valid: [...]},
  resumed_from_step, skipped_steps, best_recreated; analysis jobs carry path_length or analysis instead.
"""
from __future__ import annotations

import json
import math
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, create_model, field_validator

from .io import atomic_copy, atomic_write_text, write_json
from .metrics import VERSION as METRICS_VERSION  # what the metric names mean (harness/metrics.py)
from .secrets import scrub

SCHEMA_VERSION = 1
RECORD_NAME = "record.json"
STATUSES = ("running", "ok", "failed", "interrupted")
BUDGET_KEYS = ("max_seconds", "max_steps", "max_tokens", "max_epochs", "max_flops")  # config.trainer: what bounds training
COST_KEYS = ("train_seconds", "steps", "tokens", "train_tokens_per_second", "decode_sentences_per_second",
             "peak_memory_bytes", "peak_memory_kind", "train_flops", "flops_per_token", "cpu_utilization",
             "gpu_utilization", "mfu", "peak_flops", "peak_method", "mfu_note")
CURVE_KEYS = ("step", "train_seconds", "valid_bleu_greedy", "valid_ppl", "valid_accuracy")  # curves.valid rows
# Each metric's range (low, high; None: unbounded) where the record holds it (metrics.<split>.<key>, in the present
# metric names: harness/metrics.py): a value outside it, or not a finite number, makes the record unreadable rather
# than averaged. Rates of outputs (ser, exact match, accuracy) are fractions; edit rates (wer, cer, TER) count edits
# per reference unit, so a model that over-generates reads above 1 (TER: 100).
METRIC_RANGES = {"bleu": (0, 100), "chrf": (0, 100), "bleu_tok": (0, 100), "ter": (0, None), "wer": (0, None),
                 "cer": (0, None), "ser": (0, 1), "exact_match": (0, 1), "accuracy": (0, 1), "perplexity": (1, None),
                 "bpc": (0, None), "nll": (0, None)}
PREVIOUS_DIR = "previous"  # <out>/previous/<finished>/: a folder's earlier finished run, kept when a rerun starts
OUTPUT_SUFFIXES = (".hyp", ".ref", ".nll.json")  # the evaluation's output files (harness/job.py: write_outputs)

Text = Optional[str]
Number = Optional[float]  # strict: an int or a float; never a boolean or a string such as "0.001"


class _Part(BaseModel):
    """A part of the record: the types the readers rely on; other keys are allowed and left alone."""
    model_config = ConfigDict(strict=True, extra="allow")


class Job(_Part):
    name: Text = None
    sweep: Text = None
    output_dir: Text = None
    started: Text = None
    finished: Text = None
    slurm_job_id: Text = None
    previous_record: Text = None
    config_digest: Text = None


class TrainerConfig(_Part):
    max_seconds: Number = None
    max_steps: Number = None
    max_tokens: Number = None
    max_epochs: Number = None
    lr: Number = None
    warmup_steps: Number = None
    clip_norm: Number = None
    precision: Text = None


class ModelConfig(_Part):
    name: Text = None
    preset: Text = None


class TaskConfig(_Part):
    name: Text = None
    label: Text = None
    path: Text = None
    tokenizer: Text = None
    model_type: Text = None


class Config(_Part):
    seed: Number = None
    model: Optional[ModelConfig] = None
    trainer: Optional[TrainerConfig] = None
    task: Optional[TaskConfig] = None
    eval: Optional[dict] = None


class Environment(_Part):
    device: Text = None
    device_name: Text = None
    threads: Number = None
    python: Text = None
    git_commit: Text = None
    git_dirty: Optional[bool] = None
    precision: Text = None
    packages: Optional[dict[str, Optional[str]]] = None


class Model(_Part):
    name: Text = None
    preset: Text = None
    form: Text = None
    parameters: Number = None


class Task(_Part):
    name: Text = None
    family: Text = None
    path: Text = None
    segmentation: Text = None
    metrics: Optional[list[str]] = None
    warnings: Optional[list[str]] = None
    vocab: Number = None
    tgt_vocab: Number = None


def _in_range(value, info: ValidationInfo):
    low, high = METRIC_RANGES[info.field_name]
    if value is not None and (not math.isfinite(value) or value < low or (high is not None and value > high)):
        raise ValueError(f"{value!r} is outside its range " + (f"[{low}, {high}]" if high is not None else f">= {low}"))
    return value


Split = create_model(  # one split's metrics (the task's ``evaluate`` entries)
    "Split", __base__=_Part, __validators__={"range": field_validator(*METRIC_RANGES)(_in_range)},
    protocol=(Text, None), by_length=(Optional[list[dict]], None), accuracy_by_distance=(Optional[list[dict]], None),
    **{key: (Number, None) for key in METRIC_RANGES})


CurvePoint = create_model("CurvePoint", __base__=_Part, **{k: (Number, None) for k in CURVE_KEYS})


class Curves(_Part):
    train: Optional[list[dict]] = None
    valid: Optional[list[CurvePoint]] = None


class Costs(_Part):
    train_seconds: Number = None
    steps: Number = None
    tokens: Number = None
    train_tokens_per_second: Number = None
    decode_sentences_per_second: Number = None
    peak_memory_bytes: Number = None
    peak_memory_kind: Text = None
    train_flops: Number = None
    flops_per_token: Number = None
    mfu: Number = None  # (train_flops / train_seconds) / peak_flops (harness/peak.py); null: mfu_note says why
    peak_flops: Number = None
    peak_method: Text = None
    mfu_note: Text = None
    ended_by: Text = None
    cpu_utilization: Number = None
    gpu_utilization: Number = None
    load_average: Optional[dict[str, Number]] = None


class PathLength(_Part):
    layer_type: Text = None
    latency_device: Text = None
    n: Optional[list[Number]] = None
    max_path_length: Optional[list[Number]] = None
    latency_s: Optional[list[Number]] = None


class Analysis(_Part):
    influence_by_distance: Optional[list[dict]] = None


class Record(_Part):
    """The record as every reader may rely on it: each key the report reads has its JSON type (absent keys and
    nulls are fine), each metric its range (``METRIC_RANGES``)."""
    schema_version: Number = None
    status: Text = None
    error: Text = None
    seed: Number = None
    job: Optional[Job] = None
    config: Optional[Config] = None
    environment: Optional[Environment] = None
    model: Optional[Model] = None
    task: Optional[Task] = None
    metrics: Optional[dict[str, Split]] = None
    costs: Optional[Costs] = None
    curves: Optional[Curves] = None
    path_length: Optional[PathLength] = None
    analysis: Optional[Analysis] = None


JSON_TYPES = {"model_type": "an object", "model_attributes_type": "an object", "dict_type": "an object",
              "string_type": "a string", "float_type": "a number", "int_type": "a number", "bool_type": "a boolean",
              "list_type": "an array"}


def problems(rec) -> list[str]:
    """What makes ``rec`` unusable, one entry per field (``job.output_dir is an array, not a string``,
    ``metrics.test.ser: -5.0 is outside its range [0, 1]``); [] for a record every reader can use."""
    if not isinstance(rec, dict):
        return [f"the record is {json_type(rec)}, not an object"]
    try:
        Record.model_validate(rec)
    except ValidationError as err:
        return [_problem(e) for e in err.errors(include_url=False)]
    return []


def _problem(error: dict) -> str:
    field = ".".join(map(str, error["loc"])) or "the record"
    if error["type"] in JSON_TYPES:
        return f"{field} is {json_type(error['input'])}, not {JSON_TYPES[error['type']]}"
    return f"{field}: {error['ctx']['error'] if 'error' in error.get('ctx', {}) else error['msg']}"


def json_type(value) -> str:
    return ("null" if value is None else "a boolean" if isinstance(value, bool) else
            "a number" if isinstance(value, (int, float)) else "a string" if isinstance(value, str) else
            "an array" if isinstance(value, list) else "an object")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write(path: Path, record: dict) -> None:
    """Atomically write a record (secrets scrubbed), stamped with the schema version."""
    write_json(path, scrub({"schema_version": SCHEMA_VERSION, "metrics_version": METRICS_VERSION, **record}))


def keep_previous(path: Path) -> Path | None:
    """Keep the folder's finished run (record status ``ok``) in ``previous/<its finish time>/`` before a rerun.

    A rerun in a finished job's folder (a longer budget, another decoding setting, a changed setting whose resume
    is refused, a crash) replaces ``record.json`` and the evaluation's output files (``*.hyp``, ``*.ref``,
    ``*.nll.json``) with its own; the finished record (byte for byte) and those files are copied to
    ``previous/<finished>/`` first, so every finished result of the folder survives however many reruns follow,
    and the report, which reads every ``record.json`` below its folders, counts it with its own outputs for the
    significance tests. Returns the kept record's path, or None when there is no finished record (none,
    unreadable, or not a regular file: reading a FIFO would block).
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
    job = old.get("job") if isinstance(old.get("job"), dict) else {}
    stamp = re.sub(r"[^0-9A-Za-z]+", "-", str(job.get("finished") or job.get("started") or "")).strip("-") or "run"
    folder, k = path.parent / PREVIOUS_DIR / stamp, 1
    while (folder / RECORD_NAME).is_file():
        if (folder / RECORD_NAME).read_text(encoding="utf-8") == text:  # kept already (a rerun that died at once)
            return folder / RECORD_NAME
        k += 1
        folder = path.parent / PREVIOUS_DIR / f"{stamp}_{k}"
    for output in sorted(path.parent.iterdir()):
        if output.name.endswith(OUTPUT_SUFFIXES) and output.is_file():
            atomic_copy(output, folder / output.name)
    atomic_write_text(folder / RECORD_NAME, text)  # last: a kept record's outputs are all there
    return folder / RECORD_NAME


def job_entry(name: str, sweep: str | None, out_dir: Path | str, *, started: str | None = None,
              slurm_job_id: str | None = None, config_digest: str | None = None) -> dict:
    """The record's ``job`` entry (``finished`` is set when the job ends; ``config_digest``: harness/job.py's
    ``config_digest``, by which a rerun of a finished job is recognised)."""
    entry = {"name": name, "sweep": sweep, "output_dir": str(out_dir), "started": started, "finished": None,
             "slurm_job_id": slurm_job_id}
    return entry if config_digest is None else {**entry, "config_digest": config_digest}


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
