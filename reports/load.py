"""Read result records (``record.json``, one per job) into tidy pandas tables.

``load(dirs)`` returns a ``Records`` bundle of four tables, all keyed by ``job`` and ``record``:
  runs         one row per job: identity, environment, budget, task settings, metrics, costs
  curves       one row per validation point of ``curves.valid`` (learning curves)
  by_length    one row per source-length bucket of ``metrics.test.by_length``
  path_length  one row per (job, n) of the ``path_length`` analysis
Nothing here imports torch: a report can be rebuilt anywhere pandas runs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pandas as pd

RECORD_NAME = "record.json"  # harness.record.RECORD_NAME (not imported: it pulls in torch)
BUDGET_KEYS = ("max_seconds", "max_steps", "max_tokens", "max_epochs")
COST_KEYS = ("train_seconds", "steps", "tokens", "train_tokens_per_second", "decode_sentences_per_second",
             "peak_memory_bytes", "peak_memory_kind", "train_flops", "flops_per_token")
CURVE_KEYS = ("step", "train_seconds", "valid_bleu_greedy", "valid_ppl")


@dataclass
class Records:
    runs: pd.DataFrame
    curves: pd.DataFrame
    by_length: pd.DataFrame
    path_length: pd.DataFrame


def find(dirs: Iterable[str | Path]) -> list[Path]:
    """Every ``record.json`` under the given folders (or the files themselves), sorted, without duplicates."""
    found = set()
    for d in map(Path, dirs):
        if d.is_file():
            found.add(d.resolve())
        elif d.is_dir():
            found.update(p.resolve() for p in d.rglob(RECORD_NAME))
        else:
            raise FileNotFoundError(f"no such folder: {d}")
    return sorted(found)


def load(dirs: Iterable[str | Path]) -> Records:
    rows, curves, by_length, paths = [], [], [], []
    for path in find(dirs):
        rec = _read(path)
        row = flatten(rec, path)
        rows.append(row)
        key = {k: row[k] for k in ("job", "record", "model", "preset", "arch", "task", "family", "seed",
                                   "device_name")}
        curves += [{**key, **{k: point.get(k) for k in CURVE_KEYS}} for point in _get(rec, "curves", "valid") or []]
        by_length += [{**key, "bucket": str(b.get("bucket")), "bleu": b.get("bleu")}
                      for b in _get(rec, "metrics", "test", "by_length") or []]
        paths += _path_rows(rec.get("path_length"), key)
    runs = _frame(rows)
    if len(runs):  # a stable, readable order: task, architecture, seed
        runs = runs.sort_values(["task", "arch", "seed", "record"], na_position="last", ignore_index=True)
    return Records(runs=runs, curves=_frame(curves, CURVE_KEYS), by_length=_frame(by_length),
                   path_length=_frame(paths))


def flatten(rec: dict, path: Path) -> dict:
    """One job's row: what the tables, plots and fairness checks need (missing values are None)."""
    cfg, env, costs = rec.get("config") or {}, rec.get("environment") or {}, rec.get("costs") or {}
    model, task, job = rec.get("model") or cfg.get("model") or {}, rec.get("task") or {}, rec.get("job") or {}
    trainer, task_cfg = cfg.get("trainer") or {}, cfg.get("task") or {}
    name, preset = model.get("name"), model.get("preset")
    test, valid = _get(rec, "metrics", "test") or {}, _get(rec, "metrics", "valid") or {}
    return {
        "job": job.get("name") or path.parent.name, "sweep": job.get("sweep"), "status": rec.get("status"),
        "error": rec.get("error"), "record": str(path),
        "model": name, "preset": preset, "arch": f"{name}-{preset}" if preset else name,
        "parameters": model.get("parameters"),
        "task": task.get("name") or task_cfg.get("name"), "family": task.get("family") or _family(test),
        "seed": rec.get("seed", cfg.get("seed")),
        "device": env.get("device"), "device_name": env.get("device_name"),
        "torch": (env.get("packages") or {}).get("torch"), "python": env.get("python"),
        "git_commit": env.get("git_commit"), "git_dirty": env.get("git_dirty"),
        **{k: trainer.get(k) for k in BUDGET_KEYS},
        "precision": trainer.get("precision"),
        "vocab_size": task_cfg.get("vocab_size"), "task_vocab": task.get("vocab", task.get("tgt_vocab")),
        "tokenization": task_cfg.get("model_type"),
        "task_settings": json.dumps({k: v for k, v in task_cfg.items() if k != "name"}, sort_keys=True),
        **{f"test_{k}": test.get(m) for k, m in (("bleu", "bleu"), ("chrf", "chrf"), ("ppl", "perplexity"))},
        **{f"valid_{k}": valid.get(m) for k, m in (("bleu", "bleu"), ("chrf", "chrf"), ("ppl", "perplexity"))},
        "bleu_signature": test.get("bleu_signature") or valid.get("bleu_signature"),
        "chrf_signature": test.get("chrf_signature") or valid.get("chrf_signature"),
        **{k: costs.get(k) for k in COST_KEYS},
        "packages": json.dumps(env.get("packages") or {}, sort_keys=True),
    }


def _read(path: Path) -> dict:
    """The record, or a stand-in 'unreadable' record that the failure listing shows."""
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rec, dict):
            raise ValueError("not a JSON object")
        return rec
    except (OSError, ValueError) as err:
        return {"status": "unreadable", "error": f"{type(err).__name__}: {err}"}


def _get(d: dict, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _family(test: dict) -> str | None:
    return "translation" if "bleu" in test else "lm" if "perplexity" in test else None


def _path_rows(pl, key: dict) -> list[dict]:
    if not isinstance(pl, dict):
        return []
    return [{**key, "layer_type": pl.get("layer_type"), "n": n, "max_path_length": m}
            for n, m in zip(pl.get("n") or [], pl.get("max_path_length") or [])]


def _frame(rows: list[dict], columns: Iterable[str] = ()) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for c in columns:
        if c not in df:
            df[c] = None
    # numbers stay numbers (None -> NaN), so means, CSV and Parquet all work
    for c in df.columns:
        if df[c].dtype == object and df[c].map(lambda v: v is None or isinstance(v, (int, float))).all() \
                and df[c].notna().any() and not df[c].map(lambda v: isinstance(v, bool)).any():
            df[c] = pd.to_numeric(df[c])
    return df
