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
the plots' colours, and ``metrics``, the task's metrics (``wer,ser``; harness/metrics.py names them and says
which way is better). Tasks on different folders that share a name get a short hash of the folder appended.
Nothing here imports torch: a report can be rebuilt anywhere pandas runs.

A record that cannot be read, or holds a value of a JSON type the report cannot use, becomes an ``unreadable``
row naming its file and why; a copy of a job's folder (same job name, sweep, start time and output folder) is
counted once; a ``record.json`` that is not a regular file (a FIFO, a folder) is skipped. ``Records.notes``
says which.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pandas as pd

from harness import metrics as scoring  # torch-free
from harness.schema import BUDGET_KEYS, COST_KEYS, CURVE_KEYS, RECORD_NAME, SHAPE  # torch-free

METRICS = tuple((m.name, m.record_key) for m in scoring.METRICS.values())  # (column, record)
QUALITY = [f"test_{name}" for name, _ in METRICS]  # every metric a record may hold; a task shows its own
SIGNATURES = ("bleu_signature", "chrf_signature", "ter_signature", "bleu_tok_signature")
TUNED_KEYS = ("lr", "warmup_steps", "clip_norm")  # trainer settings a tuning grid varies (reports/tuning.py)
KEY = ("job", "record", "status", "kind", "model", "label", "preset", "arch", "task", "family", "metrics", "seed",
       "device_name", "lm_protocol")
# names cut to LABEL_LIMIT characters in plots and report tables, errors to TEXT_LIMIT (the tidy tables keep them)
LABELS = ("job", "sweep", "model", "label", "preset", "arch", "task", "device_name", "bucket", "split", "layer_type",
          "latency_device", "precision", "tokenization")
LABEL_LIMIT, TEXT_LIMIT = 60, 500
log = logging.getLogger("seqbench.reports")


@dataclass
class Records:
    runs: pd.DataFrame
    curves: pd.DataFrame
    by_length: pd.DataFrame
    path_length: pd.DataFrame
    influence: pd.DataFrame
    by_distance: pd.DataFrame
    notes: list[str] = field(default_factory=list)  # records skipped or counted once, and why


def find(dirs: Iterable[str | Path]) -> list[Path]:
    """Every ``record.json`` under the given folders (or the files themselves), sorted, without duplicates."""
    found = set()
    for d in map(Path, dirs):
        if d.is_dir():
            found.update(p.resolve() for p in d.rglob(RECORD_NAME))
        elif d.exists():  # a record file (load skips one that is not a regular file)
            found.add(d.resolve())
        else:
            raise FileNotFoundError(f"no such folder: {d}")
    return sorted(found)


def load(dirs: Iterable[str | Path]) -> Records:
    curves, by_length, paths, influence, by_distance = [], [], [], [], []
    found, notes = _distinct(find(dirs))
    rows = distinct_task_names([flatten(rec, path) for path, rec in found])
    for (path, rec), row in zip(found, rows):
        key = {k: row[k] for k in KEY}
        curves += [{**key, **{k: point.get(k) for k in CURVE_KEYS},  # and whatever the task's validate adds
                    **{k: v for k, v in point.items() if k.startswith("valid_") and isinstance(v, (int, float))}}
                   for point in _list(rec, "curves", "valid")]
        by_length += [{**key, "bucket": str(b.get("bucket")), **{m: b.get(m) for m in scoring.METRICS if m in b}}
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
                   path_length=_frame(paths), influence=_frame(influence), by_distance=_frame(by_distance),
                   notes=notes)


def _distinct(paths: list[Path]) -> tuple[list[tuple[Path, dict]], list[str]]:
    """The records to count, as (path, record), and notes on the files left out.

    A ``record.json`` that is not a regular file is skipped (reading a FIFO would block). A copy of a
    job's folder holds the same job (name, sweep, start time and the output folder it ran in) and would
    count as a second seed: the job is counted once, from its most finished copy (status ok first, then
    the latest finish).
    """
    notes, by_job = [], {}
    for path in paths:
        if not path.is_file():
            notes.append(f"{path}: skipped, not a regular file")
            continue
        rec = _read(path)
        job = rec.get("job") or {}
        identity = (job.get("name"), job.get("sweep"), job["started"], job.get("output_dir")) if job.get("started") \
            else path
        by_job.setdefault(identity, []).append((path, rec))
    kept = []
    for identity, copies in by_job.items():
        best = max(copies, key=lambda c: (c[1].get("status") == "ok", (c[1].get("job") or {}).get("finished") or ""))
        kept.append(best)
        notes += [f"{path}: a copy of {best[0]} (job {identity[0]} of sweep {identity[1]}, started {identity[2]} in "
                  f"{identity[3]}); counted once" for path, _ in copies if path != best[0]]
    for note in notes:
        log.warning(note)
    return sorted(kept, key=lambda c: c[0]), notes


def for_display(records: Records) -> Records:
    """The records with long names (``LABELS``) and errors cut for plots and report tables.

    A 200 KB preset name would otherwise be drawn in every legend and repeated in every table row
    (minutes of layout, tens of MB of SVG); the tidy tables are written from the records uncut.
    """
    def cut(frame: pd.DataFrame) -> pd.DataFrame:
        limits = {**{c: LABEL_LIMIT for c in LABELS}, "error": TEXT_LIMIT}
        return frame.assign(**{c: frame[c].map(lambda v, n=n: shorten(v, n) if isinstance(v, str) else v)
                               for c, n in limits.items() if c in frame})
    return dataclasses.replace(records, **{f.name: cut(getattr(records, f.name)) for f in dataclasses.fields(records)
                                           if f.name != "notes"})


def shorten(text: str, limit: int = LABEL_LIMIT) -> str:
    """``text`` cut to ``limit`` characters, ending in ``…`` and a checksum: distinct names stay distinct."""
    if len(text) <= limit:
        return text
    return f"{text[:limit - 9]}…{zlib.crc32(text.encode('utf-8', 'surrogatepass')):08x}"


def distinct_task_names(rows: list[dict]) -> list[dict]:
    """Runs on different data folders whose tasks share a name (the folders' base name) get ``name@<hash of the
    folder>``, so they never share a table row; a name given with task.label is the user's choice and kept."""
    folders: dict[str, set] = {}
    for row in rows:
        if row["task_path"] and not row["task_label"]:
            folders.setdefault(row["task"], set()).add(row["task_path"])
    for row in rows:
        if len(folders.get(row["task"], ())) > 1 and row["task_path"] and not row["task_label"]:
            row["task"] = f"{row['task']}@{hashlib.sha256(str(row['task_path']).encode()).hexdigest()[:6]}"
    return rows


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
    family = task.get("family") or _family(test)
    return {
        "job": job.get("name") or path.parent.name, "sweep": job.get("sweep"), "status": rec.get("status"),
        "kind": job_kind(rec), "error": rec.get("error"), "record": str(path),
        "model": name, "label": label, "preset": preset, "arch": f"{label}-{preset}" if preset else label,
        "parameters": model.get("parameters"),
        "task": task.get("name") or task_cfg.get("name"), "family": family,
        "metrics": ",".join(task.get("metrics") or scoring.defaults(family)),
        "task_path": task.get("path"), "task_label": task_cfg.get("label"),
        "task_warnings": json.dumps(task["warnings"]) if task.get("warnings") else None,
        "seed": rec.get("seed", cfg.get("seed")),
        "device": env.get("device"), "device_name": env.get("device_name"), "threads": env.get("threads"),
        "torch": (env.get("packages") or {}).get("torch"), "python": env.get("python"),
        "git_commit": env.get("git_commit"), "git_dirty": env.get("git_dirty"),
        **{k: trainer.get(k) for k in BUDGET_KEYS}, **{k: trainer.get(k) for k in TUNED_KEYS},
        "precision": env.get("precision") or trainer.get("precision"),  # resolved (bf16/fp32), not "auto"
        "vocab_size": task_cfg.get("vocab_size"), "task_vocab": task.get("vocab", task.get("tgt_vocab")),
        "tokenization": task.get("segmentation") or task_cfg.get("tokenizer") or task_cfg.get("model_type"),
        "task_settings": json.dumps({k: v for k, v in task_cfg.items() if k != "name"}, sort_keys=True),
        "lm_protocol": protocol_label(test or valid, family, task),
        **{f"test_{k}": test.get(m) for k, m in METRICS},
        **{f"valid_{k}": valid.get(m) for k, m in METRICS},
        **{k: test.get(k) or valid.get(k) for k in SIGNATURES},
        **{k: costs.get(k) for k in COST_KEYS},
        **{f"load_average_{k}": (costs.get("load_average") or {}).get(k) for k in ("start", "end")},
        "packages": json.dumps(env.get("packages") or {}, sort_keys=True),
    }


def protocol_label(metrics: dict, family: str | None, task: dict) -> str:
    """How a language model's perplexity was computed, e.g. ``sliding (bptt 128, stride 64)``; "" for other tasks.

    Records that do not name a protocol predate the choice: they were scored in independent chunks.
    """
    if family != "lm":
        return ""
    settings = metrics.get("protocol_settings") or {"bptt": task.get("bptt")}
    shown = ", ".join(f"{k} {v}" for k, v in settings.items() if v is not None)
    return (metrics.get("protocol") or "chunks") + (f" ({shown})" if shown else "")


def _read(path: Path) -> dict:
    """The record, or a stand-in 'unreadable' record that the failure listing shows.

    A value of the wrong JSON type is named by ``shape_error``; anything else that stops the record from
    being flattened into its rows (a field newer than these checks) makes it unreadable too, with the error.
    """
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rec, dict):
            raise ValueError("not a JSON object")
        wrong = shape_error(rec)
        if wrong:
            raise ValueError(f"wrong shape: {wrong}")
        flatten(rec, path)  # raises on what the shape checks do not cover
        _path_rows(rec.get("path_length"), {})
        return rec
    except (OSError, ValueError, TypeError, AttributeError, KeyError, RecursionError) as err:
        why = f"{type(err).__name__}: {err}"
        log.warning("%s: unreadable record (%s); the report lists it with the failed jobs", path, why)
        return {"status": "unreadable", "error": why}


def shape_error(rec: dict) -> str | None:
    """Where the record holds a JSON type the report cannot use (``config is a number, not an object``), or None."""
    for keys, types in SHAPE.items():
        parent = _get(rec, *keys[:-1])
        if isinstance(parent, dict) and keys[-1] in parent and not _is(parent[keys[-1]], types):
            return f"{'.'.join(keys)} is {_json_type(parent[keys[-1]])}, not {_json_type(types[0]())}"
    for split, m in (rec.get("metrics") or {}).items():
        if not isinstance(m, dict):
            return f"metrics.{split} is {_json_type(m)}, not an object"
    return None


def _is(value, types: tuple) -> bool:
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def _json_type(value) -> str:
    return ("null" if value is None else "a boolean" if isinstance(value, bool) else
            "a number" if isinstance(value, (int, float)) else "a string" if isinstance(value, str) else
            "an array" if isinstance(value, list) else "an object")


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
