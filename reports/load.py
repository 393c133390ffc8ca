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

A system is every setting that can change a result (:func:`system_settings`; :func:`system_key` is its
grouping key, the ``system`` column): the model's hyperparameters, the task's settings, decoding, optimiser, loss,
budget and evaluation settings, and the device. Seeds, output folders, times, tracking and logging do not split
systems. Every table, test and plot groups runs by (``task``, ``system``), never by architecture alone; each
row carries ``system_name``, the architecture with what sets it apart from the task's other systems
(``system_differs``).

A record is checked against the record schema (``harness.schema.problems``) before any use: one that cannot be
read, holds a value of the wrong JSON type, or a metric outside its range becomes an ``unreadable`` row naming its
file and each field at fault. A finished record without any metric is listed (status ``no metrics``), not counted.
A copy of a job's folder (same job name, sweep, start time and output folder) is counted once, and so are two
finished runs of one system with one seed (a duplicate: the later finished counts, the note names both); a
``record.json`` that is not a regular file (a FIFO, a folder) is skipped. ``Records.notes`` says which.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterable

import pandas as pd

from seqbench.harness import metrics as scoring  # torch-free
from seqbench.harness import schema  # torch-free
from seqbench.harness.schema import BUDGET_KEYS, COST_KEYS, CURVE_KEYS, RECORD_NAME  # torch-free

METRICS = tuple((m.name, m.record_key) for m in scoring.METRICS.values())  # (column, record)
QUALITY = [f"test_{name}" for name, _ in METRICS]  # every metric a record may hold; a task shows its own
SIGNATURES = ("bleu_signature", "chrf_signature", "ter_signature", "bleu_tok_signature")
TUNED_KEYS = ("lr", "warmup_steps", "clip_norm")  # trainer settings a tuning grid varies (reports/tuning.py)
KEY = ("job", "record", "status", "kind", "model", "label", "preset", "arch", "task", "family", "metrics", "seed",
       "device_name", "lm_protocol", "system", "system_name", "system_differs")
# config keys (a key or a whole group) that never split a system: the seed, where data and outputs live, which file
# tuned settings came from (the settings themselves count), the requested device (the device used counts),
# tracking, logging and progress display
NOT_SYSTEM = ("seed", "sweep_name", "tuned", "device", "hydra", "logger", "data", "overrides", "task.path",
              "trainer.progress", "trainer.log_every", "trainer.resume")
NO_METRICS = "no metrics"  # the row status of a finished record that holds no metric
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
        elif d.is_file():  # a record file
            found.add(d.resolve())
        elif d.exists():
            raise FileNotFoundError(f"{d} is neither a folder nor a record file: name a folder of records")
        else:
            raise FileNotFoundError(f"no such folder: {d}")
    return sorted(found)


def load(dirs: Iterable[str | Path]) -> Records:
    curves, by_length, paths, influence, by_distance = [], [], [], [], []
    found, notes = _distinct(find(dirs))
    rows = describe_systems(distinct_task_names([flatten(rec, path) for path, rec in found]))
    found, rows, more = _count_once(found, rows)
    notes += more
    for row in rows:
        if row["status"] == NO_METRICS:
            notes.append(f"{row['record']}: status ok but no metrics: not counted (listed with the unfinished jobs)")
            log.warning(notes[-1])
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
    job's folder holds the same job (name, sweep, start time, the output folder it ran in and its settings) and
    would count as a second seed: the job is counted once, from its most finished copy (status ok first, then
    the latest finish). The settings are part of it because reruns in one folder with other settings (kept under
    ``previous/``) may start within the same second as the run before them (the start time is in seconds).
    """
    notes, by_job = [], {}
    for path in paths:
        if not path.is_file():
            notes.append(f"{path}: skipped, not a regular file")
            continue
        rec = _read(path)
        job = rec.get("job") or {}
        identity = (job.get("name"), job.get("sweep"), job["started"], job.get("output_dir"), _system_or_none(rec)) \
            if job.get("started") else path
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


def _count_once(found: list[tuple[Path, dict]], rows: list[dict]) -> tuple[list, list, list[str]]:
    """``found`` and their ``rows`` without duplicate runs, and a note on each duplicate left out.

    Two finished training runs of one task, system and seed (a copied folder under another output folder, the
    same command run twice) are one result, not two seeds: the later finished counts.
    """
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        if row["status"] == "ok" and row["kind"] == "train" and row["seed"] is not None:
            groups.setdefault((row["task"], row["system"], row["seed"]), []).append(i)
    dropped, notes = set(), []
    for (task, _, seed), members in groups.items():
        if len(members) < 2:
            continue
        keep = max(members, key=lambda i: ((found[i][1].get("job") or {}).get("finished") or "", -i))
        others = [i for i in members if i != keep]
        dropped.update(others)
        notes.append(f"duplicate runs: {', '.join(str(found[i][0].parent) for i in others)} "
                     f"{'repeats' if len(others) == 1 else 'repeat'} {found[keep][0].parent} (system "
                     f"{rows[keep]['system_name']}, task {task}, seed {seed}, the same settings): counted once, "
                     f"from {found[keep][0].parent}, the one finished last")
    for note in notes:
        log.warning(note)
    keep = [i for i in range(len(rows)) if i not in dropped]
    return [found[i] for i in keep], [rows[i] for i in keep], notes


def system_settings(rec: dict) -> dict[str, str]:
    """Every setting of a record that can change its result: ``{dotted key: value as JSON}``.

    The resolved config (``config``) without ``NOT_SYSTEM`` and without unset (null) values, the model's name and
    preset where the config lacks them, and the device the run used (``device``: the device name). Numbers are
    compared by value (``4`` and ``4.0`` are one setting).
    """
    flat: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if prefix in NOT_SYSTEM or any(prefix.startswith(k + ".") for k in NOT_SYSTEM) or value is None:
            return
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif prefix:
            flat[prefix] = json.dumps(_number(value), sort_keys=True, default=str)

    walk("", rec.get("config") or {})
    model = rec.get("model") or {}
    for k in ("name", "preset"):
        if f"model.{k}" not in flat and model.get(k) is not None:
            flat[f"model.{k}"] = json.dumps(model[k])
    device = (rec.get("environment") or {}).get("device_name")
    if device is not None:
        flat["device"] = json.dumps(device)
    return dict(sorted(flat.items()))


def system_key(rec: dict) -> str:
    """The system a record belongs to (within its task): a digest of :func:`system_settings`. Runs with one key
    differ only in seed, output folder, times, tracking or logging: they are seeds of one system."""
    text = json.dumps(system_settings(rec), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def describe_systems(rows: list[dict]) -> list[dict]:
    """Each row's ``system_differs`` (JSON: the settings whose values set its system apart from the other systems
    of its task's finished training runs) and ``system_name`` (the architecture, with those settings).

    A model hyperparameter counts where it differs from a system of the same architecture (two architectures'
    hyperparameters always differ); any other setting where it differs from any other system of the task. A
    setting the system lacks (an older record) is not named: the other systems name their value.
    """
    systems: dict = {}  # task -> system -> (arch, settings) of the finished training runs
    for row in rows:
        if row["status"] == "ok" and row["kind"] == "train":
            systems.setdefault(row["task"], {})[row["system"]] = (row["arch"], json.loads(row["system_settings"]))
    for row in rows:
        mine = json.loads(row["system_settings"])
        others = [(arch, s) for key, (arch, s) in systems.get(row["task"], {}).items() if key != row["system"]]
        keys = sorted({k for _, s in others for k in s} | set(mine))
        differs = {k: json.loads(mine[k]) for k in keys
                   if k in mine and any(s.get(k) != mine[k] for arch, s in others
                                        if not k.startswith("model.") or arch == row["arch"])}
        row["system_differs"] = json.dumps(differs, default=str)
        row["system_name"] = system_name(row["arch"], differs)
    return rows


def system_name(arch, differs: dict) -> str:
    """``transformer-tiny (eval.decoding.beam=1, trainer.lr=0.001)``: the architecture and what sets it apart."""
    shown = ", ".join(f"{k}={v}" for k, v in differs.items())
    return f"{arch} ({shown})" if shown else str(arch)


def _number(value):
    """Whole floats as ints, inside lists too, so ``4.0`` and ``4`` are one setting."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_number(v) for v in value]
    return value


def for_display(records: Records) -> Records:
    """The records with long names (``LABELS``) and errors cut for plots and report tables.

    A 200 KB preset name would otherwise be drawn in every legend and repeated in every table row
    (minutes of layout, tens of MB of SVG); the tidy tables are written from the records uncut.
    """
    def cut(frame: pd.DataFrame) -> pd.DataFrame:
        limits = {**{c: LABEL_LIMIT for c in LABELS}, "error": TEXT_LIMIT, "system_name": TEXT_LIMIT}
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
    status, error, kind = rec.get("status"), rec.get("error"), job_kind(rec)
    rung = rec["ladder_rung"] if isinstance(rec.get("ladder_rung"), dict) else {}  # trainer.ladder: reports/ladder.py
    if status == "ok" and kind == "train" and not _has_metrics(rec):
        status, error = NO_METRICS, ("status ok, but the record holds no metric (metrics is empty or null): not "
                                     "counted; rerun the job in its folder to evaluate it")
    return {
        "job": job.get("name") or path.parent.name, "sweep": job.get("sweep"), "status": status,
        "kind": kind, "error": error, "record": str(path), "output_dir": job.get("output_dir"),
        "system": system_key(rec), "system_settings": json.dumps(system_settings(rec)),
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
        "ladder_rung": rung.get("rung"), "ladder_flops": rung.get("flops"),  # None: the run is no ladder rung
        "precision": env.get("precision") or trainer.get("precision"),  # resolved (bf16/fp32), not "auto"
        "vocab_size": task_cfg.get("vocab_size"), "task_vocab": task.get("vocab", task.get("tgt_vocab")),
        "tokenization": task.get("segmentation") or task_cfg.get("tokenizer") or task_cfg.get("model_type"),
        "task_settings": json.dumps({k: v for k, v in task_cfg.items() if k != "name"}, sort_keys=True),
        "lm_protocol": protocol_label(test or valid, family, task),
        **{f"test_{k}": test.get(m) for k, m in METRICS},
        **{f"valid_{k}": valid.get(m) for k, m in METRICS},
        **{k: test.get(k) or valid.get(k) for k in SIGNATURES},
        **{k: costs.get(k) for k in COST_KEYS},
        "job_seconds": _job_seconds(job),  # the job's wall-clock, set-up and evaluation included
        **{f"load_average_{k}": (costs.get("load_average") or {}).get(k) for k in ("start", "end")},
        "packages": json.dumps(env.get("packages") or {}, sort_keys=True),
        "plugins": json.dumps([p for p in env.get("plugins") or [] if isinstance(p, dict)], sort_keys=True),
    }


def _job_seconds(job: dict) -> float | None:
    """Seconds from the job's start to its end (``job.started`` / ``job.finished``); None while it runs or when
    either is missing or unreadable. A resumed job's span is its last attempt's (train_seconds holds every attempt's
    training)."""
    try:
        return (datetime.fromisoformat(job["finished"]) - datetime.fromisoformat(job["started"])).total_seconds()
    except (KeyError, TypeError, ValueError):
        return None


def _has_metrics(rec: dict) -> bool:
    """Whether any split of the record holds a value of any metric (harness/metrics.py)."""
    return any(isinstance(m, dict) and any(isinstance(m.get(k), (int, float)) for k in (*scoring.METRICS, "perplexity"))
               for m in (rec.get("metrics") or {}).values())


def protocol_label(metrics: dict, family: str | None, task: dict) -> str:
    """How a language model's perplexity was computed, e.g. ``sliding (bptt 128, stride 64)``; "" for other tasks.

    A limited evaluation (``eval.max_test_tokens``) adds the part scored (``; first 10,000 of 245,569 tokens``), and
    the share of unknown tokens among the scored ones follows (``; unknown tokens 2.6%``), so a perplexity is never
    read without either: both keep runs apart in the summary (the label is part of its grouping).

    Records that do not name a protocol predate the choice: they were scored in independent chunks.
    """
    if family != "lm":
        return ""
    settings = metrics.get("protocol_settings") or {"bptt": task.get("bptt")}
    shown = ", ".join(f"{k} {v}" for k, v in settings.items() if v is not None)
    label = (metrics.get("protocol") or "chunks") + (f" ({shown})" if shown else "")
    scored, total = metrics.get("tokens_evaluated"), metrics.get("tokens_total")
    if metrics.get("limited") and isinstance(scored, int) and isinstance(total, int):
        label += f"; first {scored:,} of {total:,} tokens"  # eval.max_*_tokens: never shown as a full evaluation
    if isinstance(metrics.get("unk_rate"), (int, float)):
        label += f"; unknown tokens {metrics['unk_rate']:.1%}"
    return label


def _system_or_none(rec: dict) -> str | None:
    """:func:`system_key` of a record, or None for a record too broken to have one (listed as unreadable)."""
    try:
        return system_key(rec)
    except Exception:  # noqa: BLE001 (an unreadable record's shape is anything)
        return None


def _read(path: Path) -> dict:
    """The record, or a stand-in 'unreadable' record that the failure listing shows.

    The record is checked against the record schema first (``harness.schema.problems``: each field of the wrong
    JSON type, each metric outside its range, named); anything else that stops it from being flattened into its
    rows (a field newer than these checks) makes it unreadable too, with the error.
    """
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        rec = scoring.read_old_names(rec) if isinstance(rec, dict) else rec  # metrics_version 1: wer <-> ser
        wrong = schema.problems(rec)
        if wrong:
            raise ValueError(f"wrong shape: {'; '.join(wrong)}")
        flatten(rec, path)  # raises on what the schema does not cover
        _path_rows(rec.get("path_length"), {})
        return rec
    except (OSError, ValueError, TypeError, AttributeError, KeyError, RecursionError) as err:
        why = f"{type(err).__name__}: {err}"
        log.warning("%s: unreadable record (%s); the report lists it with the failed jobs", path, why)
        return {"status": "unreadable", "error": why}


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
