"""The result record: one JSON file per job, the single source of truth for reports.

Schema (version 1), top-level keys:
  schema_version, status ('ok' | 'failed' | 'interrupted' | 'running'), error,
  job {name, sweep, output_dir, started, finished, slurm_job_id, hostname},
  config (resolved Hydra config), seed, environment {git_commit, git_dirty, python,
  packages, device, device_name, threads, deterministic},
  model {name, preset, form, parameters, paper}, task (task.describe()),
  metrics {valid/test: bleu, chrf, signatures, perplexity, nll, ...},
  costs {train_seconds, steps, epochs, tokens, train_tokens_per_second,
         decode_sentences_per_second, peak_memory_bytes, flops_per_token, train_flops,
         cpu_utilization, cpu_seconds, cpu_threads, load_average {start, end}, gpu_utilization
         (harness/utilization.py)},
  curves {train: [...], valid: [...]}, resumed_from_step, skipped_steps.
"""
from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch
import yaml

from .io import _atomic, write_json
from .secrets import REDACTED, env_secrets, is_secret_name, scrub  # noqa: F401 (scrub: record.scrub for jobs)

SCHEMA_VERSION = 1
RECORD_NAME = "record.json"
PACKAGES = ("torch", "hydra-core", "sacrebleu", "sentencepiece", "numpy", "wandb", "submitit")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_info() -> dict:
    root = Path(__file__).resolve().parents[1]
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"git_commit": git("rev-parse", "HEAD") or None, "git_dirty": bool(git("status", "--porcelain", "-uno"))}


def package_versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_name()} ({os.cpu_count()} cores)"
    return {**git_info(), "python": sys.version.split()[0], "packages": package_versions(), "device": device.type,
            "device_name": name, "device_count": torch.cuda.device_count() if device.type == "cuda" else 1,
            "threads": torch.get_num_threads(), "hostname": socket.gethostname(),
            "deterministic": device.type == "cpu" or torch.are_deterministic_algorithms_enabled()}


def peak_memory_bytes(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "peak_memory_kind": "cuda_allocated"}
    import resource
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_memory_kind": "process_max_rss"}


SCRUB_SUFFIXES = (".yaml", ".yml", ".log", ".json", ".txt")


def _secret_values(text: str) -> set[str]:
    """String values given to secret-named keys in a YAML dump, or in ``key=value`` override strings in it.

    The rule is :func:`scrub`'s: a string under a key naming a secret (numbers such as max_tokens stay); an
    interpolation (``${oc.env:HF_TOKEN}``) only names where the secret is, and stays.
    """
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        return set()
    found = set()

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if is_secret_name(k) and isinstance(v, str):
                    found.add(v)
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, str) and "=" in x:  # an override: [+|++|~]key.path=value
            key, value = x.split("=", 1)
            if is_secret_name(key.lstrip("+~").rsplit(".", 1)[-1]):
                try:
                    value = yaml.safe_load(value)
                except yaml.YAMLError:
                    pass
                if isinstance(value, str):
                    found.add(value)
    walk(doc)
    return {v for v in found if len(v) >= 4 and v not in ("???", REDACTED) and "${" not in v}


def scrub_files(folder: str | os.PathLike, extra: tuple[str, ...] = (), max_bytes: int = 50 << 20) -> list[Path]:
    """Redact secrets from the text files a job leaves in its output folder; returns the files changed.

    Hydra writes the command-line overrides and the composed config into ``.hydra/overrides.yaml``,
    ``.hydra/config.yaml`` and ``.hydra/hydra.yaml`` (and a sweep's ``multirun.yaml``) before the job
    runs, so a key passed as ``+logger.api_key=...`` would land there verbatim (``run.py`` moves such
    values into the environment first: :func:`secrets.hide_in_environment`; this catches the rest,
    such as a key written into a config file). This replaces, in every
    ``.yaml/.yml/.log/.json/.txt`` file under ``folder`` (recursively; checkpoints are left alone),
    each secret-looking value: values of environment variables named like a secret, values given to
    secret-named keys (``*key*``, ``*token*``, ``*secret*``, ``*password*``) in any of those files,
    and ``extra``. YAML files are replaced atomically; logs are rewritten in place (a logging
    handler may still hold them open in append mode).
    """
    files = [p for p in Path(folder).rglob("*") if p.suffix in SCRUB_SUFFIXES and p.is_file()
             and p.stat().st_size <= max_bytes]
    texts = {}
    for p in files:
        try:
            texts[p] = p.read_text(encoding="utf-8", errors="surrogateescape")
        except OSError:
            continue
    secrets = env_secrets() | set(extra)
    for p, text in texts.items():
        if p.suffix in (".yaml", ".yml"):
            secrets |= _secret_values(text)
    secrets = sorted((s for s in secrets if s), key=len, reverse=True)  # longest first: no partial leftovers
    changed = []
    for p, text in texts.items():
        new = text
        for s in secrets:
            new = new.replace(s, REDACTED)
        if new == text:
            continue
        data = new.encode("utf-8", errors="surrogateescape")
        if p.suffix == ".log":
            with open(p, "r+b") as f:
                f.write(data)
                f.truncate()
        else:
            _atomic(p, lambda f, data=data: f.write(data))
        changed.append(p)
    return changed


def write(path: Path, record: dict) -> None:
    """Atomically write a record (secrets scrubbed)."""
    write_json(path, scrub({"schema_version": SCHEMA_VERSION, **record}))
