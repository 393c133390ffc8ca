"""Secrets (API keys, tokens, passwords) kept out of everything a job writes.

Torch-free: ``run.py`` rewrites its command line with it before Hydra starts, and the records,
the wandb run, Hydra's config copies and the job's logs are scrubbed with it (:func:`scrub`, :func:`scrub_files`).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import MutableMapping

import yaml

from .io import _atomic

SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
REDACTED = "<redacted>"
ENV_PREFIX = "SEQBENCH_SECRET_"  # command-line secrets moved into the environment (the name marks them as secrets)


def is_secret_name(name) -> bool:
    """Whether a key or variable name marks a secret: one of its words ends in a marker (``api_key``, ``HF_TOKEN``,
    ``apiKey``, ``DB_PASSWORD``); words that only contain one (``tokenizer``, ``max_tokens``, ``n_keys``) do not."""
    words = re.split(r"[^A-Z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(name)).upper())
    return any(w.endswith(SECRET_MARKERS) for w in words if w)


def env_secrets() -> set[str]:
    """Values of environment variables whose names mark a secret (8 characters or more)."""
    return {v for k, v in os.environ.items() if is_secret_name(k) and len(v) >= 8}


def scrub(obj):
    """Drop values whose key names a secret, and any value equal to a secret in the environment."""
    secrets = env_secrets()
    def walk(x):
        if isinstance(x, dict):
            return {k: (REDACTED if is_secret_name(k) and isinstance(v, str) else walk(v)) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, str):
            for s in secrets:
                x = x.replace(s, REDACTED)
        return x
    return walk(obj)


def _secret_override(arg: str) -> tuple[str, str] | None:
    """``(key part, value)`` of a Hydra override that sets a secret-named key to a literal string, else None.

    Numbers (``trainer.max_tokens=512``), interpolations (``${oc.env:HF_TOKEN}``), sweeps, deletions and
    anything Hydra cannot parse are not secrets given in clear text.
    """
    if arg.startswith("-") or "=" not in arg:
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        override = OverridesParser.create().parse_override(arg)
        if override.is_sweep_override() or not is_secret_name(override.key_or_group.rsplit(".", 1)[-1]):
            return None
        value = override.value()
    except Exception:  # Hydra reports a malformed override itself
        return None
    if not isinstance(value, str) or "${" in value or value == REDACTED:
        return None
    return arg.split("=", 1)[0], value


def hide_in_environment(args: list[str], environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """The command-line overrides with each secret value moved into an environment variable the config reads.

    Hydra writes the command line into ``.hydra/{overrides,config,hydra}.yaml`` (and a sweep's
    ``multirun.yaml``) before the job starts, and wandb stores it in its run metadata, so a key given as
    ``+logger.api_key=...`` would sit in those files in clear text, even after a crash. Here it becomes
    ``+logger.api_key=${oc.env:SEQBENCH_SECRET_LOGGER_API_KEY}`` with the value in that variable: the job's
    config resolves to the same value, the files hold only the variable's name, and the value, now an
    environment secret, is redacted from records and logs. Jobs started by a launcher inherit the variable.
    """
    out = []
    for arg in args:
        found = _secret_override(arg)
        if found is None:
            out.append(arg)
            continue
        key, value = found
        var = ENV_PREFIX + re.sub(r"[^A-Za-z0-9]+", "_", key.split("@", 1)[0].lstrip("+~")).strip("_").upper()
        environ[var] = value
        out.append(f"{key}=${{oc.env:{var}}}")
    return out


def redact_args(args: list[str]) -> list[str]:
    """A command line with secret values replaced by ``<redacted>``: for tools that store it (wandb's metadata)."""
    secrets = sorted(env_secrets(), key=len, reverse=True)
    out = []
    for arg in args:
        found = _secret_override(arg)
        arg = f"{found[0]}={REDACTED}" if found else arg
        for s in secrets:
            arg = arg.replace(s, REDACTED)
        out.append(arg)
    return out


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
