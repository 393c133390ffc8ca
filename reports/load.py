"""Read result records (``record.json``, one per job) into tidy pandas tables.

``load(dirs)`` returns a ``Records`` bundle of tables, all keyed by ``job`` and ``record``:
  runs         one row per job: identity, environment, budget, task settings, metrics, costs
  curves       one row per validation point of ``curves.valid`` (learning curves)
  by_length    one row per source-length bucket of ``metrics.test.by_length``
  path_length  one row per (job, n) of the ``path_length`` analysis (with forward latency where timed)
  influence    one row per (job, distance) of ``analysis.influence_by_distance``
  by_distance  one row per (job, split, distance) of ``metrics.<split>.accuracy_by_distance`` (probe tasks)
A job is ``kind`` "train" when it trained (metrics, costs or curves), "analysis" when it only analysed a
model (path length, influence): analysis jobs never enter the quality and cost tables.
Every row carries ``label``, the model's name with its variant (``transformer_restricted(r=4)``), which keys
the plots' colours. Nothing here imports torch: a report can be rebuilt anywhere pandas runs.
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
CURVE_KEYS = ("step", "train_seconds", "valid_bleu_greedy", "valid_ppl", "valid_accuracy")
METRICS = (("bleu", "bleu"), ("chrf", "chrf"), ("ppl", "perplexity"), ("accuracy", "accuracy"))  # (column, record)
KEY = ("job", "record", "status", "kind", "model", "label", "preset", "arch", "task", "family", "seed", "device_name")


@dataclass
class Records:
    runs: pd.DataFrame
    curves: pd.DataFrame
    by_length: pd.DataFrame
    path_length: pd.DataFrame
    influence: pd.DataFrame
    by_distance: pd.DataFrame


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
    rows, curves, by_length, paths, influence, by_distance = [], [], [], [], [], []
    for path in find(dirs):
        rec = _read(path)
        row = flatten(rec, path)
        rows.append(row)
        key = {k: row[k] for k in KEY}
        curves += [{**key, **{k: point.get(k) for k in CURVE_KEYS}} for point in _list(rec, "curves", "valid")]
        by_length += [{**key, "bucket": str(b.get("bucket")), "bleu": b.get("bleu")}
                      for b in _list(rec, "metrics", "test", "by_length")]
        paths += _path_rows(rec.get("path_length"), key)
        influence += [{**key, **{k: p.get(k) for k in ("distance", "grad_norm", "n")}}
                      for p in _list(rec, "analysis", "influence_by_distance")]
        for split, m in (_get(rec, "metrics") or {}).items():
            by_distance += [{**key, "split": split, **{k: p.get(k) for k in ("distance", "accuracy", "n")}}
                            for p in _list(m, "accuracy_by_distance")]
    runs = _frame(rows)
    if len(runs):  # a stable, readable order: task, architecture, seed
        runs = runs.sort_values(["task", "arch", "seed", "record"], na_position="last", ignore_index=True)
    return Records(runs=runs, curves=_frame(curves, CURVE_KEYS), by_length=_frame(by_length),
                   path_length=_frame(paths), influence=_frame(influence), by_distance=_frame(by_distance))


def model_label(name, settings: dict) -> str | None:
    """The model's name with its variant: ``transformer_restricted(r=4)`` for restricted attention (attn_window=4)."""
    if name is None:
        return None
    window = settings.get("attn_window")
    if window is None:
        return str(name)
    return f"{name if 'restricted' in str(name) else f'{name}_restricted'}(r={window})"


def job_kind(rec: dict) -> str:
    """``train`` for a training job (whatever its status), ``analysis`` for one that only analysed a model.

    The config's ``job`` says so where it is set (``train`` | ``path_length``); else the record's contents do.
    """
    cfg = rec.get("config") or {}
    if isinstance(cfg.get("job"), str):
        return "train" if cfg["job"] == "train" else "analysis"
    trained = any(rec.get(k) for k in ("metrics", "costs", "curves"))
    analysis = "path_length" in rec or "analysis" in rec or "path_length" in cfg
    return "analysis" if analysis and not trained else "train"


def flatten(rec: dict, path: Path) -> dict:
    """One job's row: what the tables, plots and fairness checks need (missing values are None)."""
    cfg, env, costs = rec.get("config") or {}, rec.get("environment") or {}, rec.get("costs") or {}
    model, task, job = rec.get("model") or cfg.get("model") or {}, rec.get("task") or {}, rec.get("job") or {}
    trainer, task_cfg = cfg.get("trainer") or {}, cfg.get("task") or {}
    name, preset = model.get("name"), model.get("preset")
    label = model_label(name, {**model, **(cfg.get("model") or {})})
    test, valid = _get(rec, "metrics", "test") or {}, _get(rec, "metrics", "valid") or {}
    return {
        "job": job.get("name") or path.parent.name, "sweep": job.get("sweep"), "status": rec.get("status"),
        "kind": job_kind(rec), "error": rec.get("error"), "record": str(path),
        "model": name, "label": label, "preset": preset, "arch": f"{label}-{preset}" if preset else label,
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
        **{f"test_{k}": test.get(m) for k, m in METRICS},
        **{f"valid_{k}": valid.get(m) for k, m in METRICS},
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


def _list(d: dict, *keys) -> list[dict]:
    """The list at ``d[keys...]``, keeping only its dict entries ([] when absent or malformed)."""
    value = _get(d, *keys)
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _family(test: dict) -> str | None:
    return ("translation" if "bleu" in test else "lm" if "perplexity" in test else "probe" if "accuracy" in test
            else None)


def _path_rows(pl, key: dict) -> list[dict]:
    if not isinstance(pl, dict):
        return []
    ns = pl.get("n") or []
    latency = pl.get("latency_s") or [None] * len(ns)
    return [{**key, "layer_type": pl.get("layer_type"), "n": n, "max_path_length": m, "latency_s": t,
             "latency_device": pl.get("latency_device")}
            for n, m, t in zip(ns, pl.get("max_path_length") or [], latency)]


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
