"""Tables from the tidy runs table: per-task summaries, Table 2, fairness checks, failures, appendix.

Functions return DataFrames. ``summary`` keeps numbers (it is also written as CSV); the ``*_display``
functions turn numbers into the strings the report shows.
"""
from __future__ import annotations

import json
import math

import pandas as pd

from harness.metrics import METRICS, Metric

from . import hardware, stats
from .load import BUDGET_KEYS, QUALITY, TUNED_KEYS
from .reference import MEASURED

# rows of one summary group: same task (and metrics), architecture (variant and preset), device, budget,
# optimiser settings (a tuning grid's points are not seeds of one another) and LM protocol; seeds are pooled
GROUP = ["task", "family", "metrics", "arch", "model", "label", "preset", "device_name", "budget", "optimizer",
         "lm_protocol"]
COSTS = [("parameters", "parameters", "{:,.0f}"), ("train_flops", "train FLOPs", "{:.2e}"),
         ("train_seconds", "train s", "{:.1f}"), ("train_tokens_per_second", "train tokens/s", "{:,.0f}"),
         ("decode_sentences_per_second", "decode sentences/s", "{:,.1f}"),
         ("peak_memory_mib", "peak memory MiB", "{:,.0f}"), ("cpu_utilization", "CPU utilisation", "{:.2f}")]
# settings that must match for a fair comparison: (runs column, label)
SETTINGS = [*[(k, f"trainer.{k}") for k in BUDGET_KEYS], ("preset", "model preset"), ("precision", "precision"),
            ("device_name", "device"), ("torch", "torch version"), ("tokenization", "tokenization"),
            ("lm_protocol", "eval.lm_protocol")]


def ok(runs: pd.DataFrame) -> pd.DataFrame:
    """The finished training runs: analysis-only jobs (path length, influence) have no quality or cost to compare."""
    return runs[(runs["status"] == "ok") & (runs["kind"] == "train")].copy() if len(runs) else runs


def analyses(runs: pd.DataFrame) -> pd.DataFrame:
    """The analysis-only jobs (no training)."""
    return runs[runs["kind"] == "analysis"] if len(runs) else runs


def budget(row) -> str:
    """The training budget of one run, e.g. ``max_seconds=2700, max_tokens=4096``."""
    parts = [f"{k}={_plain(row.get(k))}" for k in BUDGET_KEYS if not _missing(row.get(k))]
    return ", ".join(parts) or "none"


def optimizer(row) -> str:
    """The optimiser settings a tuning grid varies, e.g. ``lr=0.002, warmup_steps=150, clip_norm=0``."""
    return ", ".join(f"{k}={_plain(row.get(k))}" for k in TUNED_KEYS if not _missing(row.get(k))) or "?"


def with_groups(runs: pd.DataFrame) -> pd.DataFrame:
    runs = runs.copy()
    runs["budget"] = runs.apply(budget, axis=1) if len(runs) else []
    runs["optimizer"] = runs.apply(optimizer, axis=1) if len(runs) else []
    runs["peak_memory_mib"] = pd.to_numeric(runs.get("peak_memory_bytes"), errors="coerce") / 2**20
    for c in GROUP:
        runs[c] = runs[c].fillna("?").astype(str) if c in runs else "?"
    return runs


def summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Per task x architecture (x device x budget): quality mean, sample std, 95% t-interval of the mean and n over
    seeds; mean costs."""
    metrics = QUALITY
    agg = {"n": ("job", "size"), "seeds": ("seed", lambda s: ", ".join(str(_plain(v)) for v in sorted(s.dropna())))}
    for c in metrics:
        agg[f"{c}_mean"], agg[f"{c}_std"], agg[f"{c}_n"] = (c, "mean"), (c, "std"), (c, "count")
        agg[f"{c}_ci_low"] = (c, lambda s: stats.t_interval(s).low)
        agg[f"{c}_ci_high"] = (c, lambda s: stats.t_interval(s).high)
    for c, _, _ in COSTS:
        agg[c] = (c, "mean")
    agg["low_utilization"] = ("low_utilization", lambda s: ", ".join(s.dropna()))
    done = with_groups(ok(runs))
    if done.empty:
        return pd.DataFrame(columns=[*GROUP, *agg])
    numbers = metrics + [c for c, _, _ in COSTS]
    done[numbers] = done[numbers].apply(pd.to_numeric, errors="coerce")
    done["low_utilization"] = [None if why is None else f"seed {_plain(seed)}: {why}"
                               for seed, why in zip(done["seed"], hardware.flag(done))]
    return done.groupby(GROUP, sort=True, dropna=False).agg(**agg).reset_index()


def task_metrics(rows: pd.DataFrame) -> list[Metric]:
    """The metrics of one task's rows (runs or summary), in the task's order; else every metric with a value."""
    names = [n for text in rows.get("metrics", pd.Series(dtype=object)).dropna().astype(str)
             for n in text.split(",") if n in METRICS]
    if not names:
        names = [n for n in METRICS if any(pd.to_numeric(rows.get(c), errors="coerce").notna().any()
                                           for c in (f"test_{n}", f"test_{n}_mean") if c in rows)]
    return [METRICS[n] for n in dict.fromkeys(names)]


def best_first(rows: pd.DataFrame, metric: Metric, column: str) -> pd.DataFrame:
    """Rows sorted by ``column`` (a metric's values), best first whichever way the metric runs; gaps last."""
    values = pd.to_numeric(rows[column], errors="coerce")
    order = values.sort_values(ascending=not metric.higher_is_better, na_position="last", kind="stable").index
    return rows.loc[order]


def summary_display(summ: pd.DataFrame, task: str) -> pd.DataFrame:
    """One task's summary as strings, best first by its first metric: quality as :func:`spread` cells, then costs."""
    rows = summ[summ["task"] == task]
    quality = task_metrics(rows)
    if quality:
        rows = best_first(rows, quality[0], f"test_{quality[0].name}_mean")
    out = pd.DataFrame({"architecture": rows["arch"], "device": rows["device_name"], "budget": rows["budget"],
                        "n": rows["n"], "seeds": rows["seeds"]})
    if (rows["lm_protocol"] != "").any():  # a language model's perplexity depends on the context it was given
        out["perplexity protocol"] = rows["lm_protocol"]
    for m in quality:
        out[f"test {m.label}"] = [spread(row, f"test_{m.name}", m.fmt) for _, row in rows.iterrows()]
    for c, label, fmt in COSTS:
        out[label] = rows[c].map(lambda v, fmt=fmt: num(v, fmt))
    if rows["optimizer"].nunique() > 1:  # e.g. tuned settings per architecture, or a tuning grid
        out.insert(3, "optimizer", rows["optimizer"])
    if rows["low_utilization"].astype(bool).any():
        out["hardware"] = [hardware.row_warning(text) if text else "" for text in rows["low_utilization"]]
    return out.reset_index(drop=True)


def summary_caption(summ: pd.DataFrame, task: str) -> str:
    """What the task's quality columns mean: which way is better, the sort order, and the best mean of each."""
    rows = summ[summ["task"] == task]
    quality = task_metrics(rows)
    if not quality:
        return ""
    ways = [f"{way} is better for {', '.join(m.label for m in quality if m.higher_is_better == up)}"
            for way, up in (("higher", True), ("lower", False)) if any(m.higher_is_better == up for m in quality)]
    best = []
    for m in quality:
        top = best_first(rows, m, f"test_{m.name}_mean").iloc[0]
        if not _missing(top[f"test_{m.name}_mean"]):
            best.append(f"test {m.label} {m.fmt.format(top[f'test_{m.name}_mean'])} ({top['arch']}, "
                        f"{top['device_name']})")
    return (f"Quality: mean ± sample std over seeds (CI: the 95% confidence interval of the mean, Student t; n "
            f"seeds); "
            f"{'; '.join(ways)}. Rows sorted by test {quality[0].label}, best first. "
            f"Best: {'; '.join(best) or 'none'}.")


def by_distance(frame: pd.DataFrame, value: str) -> pd.DataFrame:
    """Per task x model variant x split x distance: ``value`` mean and sample std over runs (seeds), and n.

    ``frame`` is ``Records.by_distance`` (value ``accuracy``) or ``Records.influence`` (``grad_norm``)."""
    keys = [k for k in ("task", "label", "arch", "preset", "device_name", "split", "distance") if k in frame]
    columns = [*keys, f"{value}_mean", f"{value}_std", "n", "seeds"]
    done = frame[frame["status"] == "ok"] if len(frame) else frame
    if done.empty:
        return pd.DataFrame(columns=columns)
    done = done.assign(**{value: pd.to_numeric(done[value], errors="coerce")},
                       **{k: done[k].fillna("?").astype(str) for k in keys if k != "distance"})
    return (done.groupby(keys, sort=True).agg(**{f"{value}_mean": (value, "mean"), f"{value}_std": (value, "std"),
                                                  "n": ("job", "size"),
                                                  "seeds": ("seed", lambda s: ", ".join(
                                                      str(_plain(v)) for v in sorted(s.dropna())))})
            .reset_index()[columns])


def table2_display(summ: pd.DataFrame) -> pd.DataFrame:
    """Measured rows of the Table 2 layout: BLEU and training cost in FLOPs, per translation task scored by BLEU."""
    rows = summ[(summ["family"] == "translation") & summ["metrics"].astype(str).str.split(",").map(
        lambda names: "bleu" in names)]
    out = pd.DataFrame({"task": rows["task"], "architecture": rows["arch"], "device": rows["device_name"],
                        "n": rows["n"], "test BLEU": [spread(row, "test_bleu") for _, row in rows.iterrows()],
                        "training cost (FLOPs)": rows["train_flops"].map(lambda v: num(v, "{:.2e}")),
                        "BLEU pipeline": MEASURED["bleu"], "FLOPs method": MEASURED["flops"]})
    if pd.to_numeric(rows["test_bleu_tok_mean"], errors="coerce").notna().any():  # the paper's BLEU too (wmt14_en_de)
        out.insert(5, "test BLEU, tokenized + compound split",
                   [spread(row, "test_bleu_tok") for _, row in rows.iterrows()])
    return out.reset_index(drop=True)


def reference_display(ref: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"model (reference)": ref["model"], "EN-DE BLEU": ref["bleu"].map(lambda v: num(v, "{:g}")),
                         "training cost (FLOPs)": ref["train_flops"].map(lambda v: num(v, "{:.1e}")),
                         "BLEU pipeline": ref["bleu_pipeline"], "FLOPs method": ref["flops_method"]})


def differing_settings(runs: pd.DataFrame) -> pd.DataFrame:
    """Per task, each setting whose value differs between the task's finished runs, with run counts."""
    rows = []
    for task, group in with_groups(ok(runs)).groupby("task", sort=True):
        settings = group[[c for c, _ in SETTINGS]].rename(columns=dict(SETTINGS))
        settings = settings.join(pd.DataFrame([{f"task.{k}": v for k, v in json.loads(s or "{}").items()}
                                               for s in group["task_settings"]], index=group.index))
        for label in settings.columns:
            values = settings[label].map(_plain).map(str).value_counts()
            if len(values) > 1:
                rows.append({"task": task, "setting": label,
                             "values (runs)": "; ".join(f"{v} ({n})" for v, n in values.sort_index().items())})
    return pd.DataFrame(rows, columns=["task", "setting", "values (runs)"])


def fairness_warnings(runs: pd.DataFrame) -> dict[str, list[str]]:
    """Per task, the warnings for runs on different devices or budgets that share one table."""
    out = {}
    for task, group in with_groups(ok(runs)).groupby("task", sort=True):
        msgs = []
        for col, what in (("device_name", "devices"), ("budget", "training budgets"),
                          ("lm_protocol", "perplexity protocols (eval.lm_protocol)")):
            values = sorted(group[col].unique())
            if len(values) > 1:
                msgs.append(f"WARNING: task {task}: runs on different {what} are compared side by side "
                            f"({' | '.join(values)}); their costs and quality are not directly comparable.")
        if msgs:
            out[task] = msgs
    return out


def task_warnings(runs: pd.DataFrame) -> dict[str, list[str]]:
    """Per task, what its records' task descriptions warn about (e.g. a vocabulary capped at what the data allows)."""
    out = {}
    for task, texts in (runs.dropna(subset=["task_warnings"]).groupby("task")["task_warnings"]
                        if "task_warnings" in runs else []):
        out[task] = list(dict.fromkeys(f"task {task}: {w}" for text in texts for w in json.loads(text)))
    return out


def warnings_by_task(runs: pd.DataFrame) -> dict[str, list[str]]:
    """Per task, every warning shown above its summary table: fairness first, then the task's own."""
    out = fairness_warnings(runs)
    for task, msgs in task_warnings(ok(runs)).items():
        out.setdefault(task, []).extend(msgs)
    return out


def failures(runs: pd.DataFrame) -> pd.DataFrame:
    bad = runs[runs["status"] != "ok"] if len(runs) else runs
    return pd.DataFrame({"job": bad.get("job"), "status": bad.get("status"), "error": bad.get("error"),
                         "record": bad.get("record")}).fillna("").reset_index(drop=True)


def appendix(runs: pd.DataFrame) -> pd.DataFrame:
    """Every run, so every number traces to its record."""
    commit = [("" if _missing(c) else str(c)[:12]) + (" (dirty)" if d is True else "")
              for c, d in zip(runs["git_commit"], runs["git_dirty"])] if len(runs) else []
    return pd.DataFrame({"job": runs.get("job"), "status": runs.get("status"), "task": runs.get("task"),
                         "seed": runs.get("seed"), "device": runs.get("device_name"), "git commit": commit,
                         "record": runs.get("record")}).map(_plain).fillna("").reset_index(drop=True)


def signatures(runs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for col, metric in (("bleu_signature", "BLEU"), ("chrf_signature", "chrF"), ("ter_signature", "TER"),
                        ("bleu_tok_signature", "tokenized BLEU")):
        for sig, n in runs[col].dropna().value_counts().sort_index().items() if col in runs else []:
            rows.append({"metric": metric, "sacrebleu signature": sig, "runs": n})
    return pd.DataFrame(rows, columns=["metric", "sacrebleu signature", "runs"])


def package_versions(runs: pd.DataFrame) -> pd.DataFrame:
    rows = {}
    for text in runs.get("packages", pd.Series(dtype=object)).dropna():
        for pkg, version in json.loads(text).items():
            rows.setdefault(pkg, {}).setdefault(str(version), 0)
            rows[pkg][str(version)] += 1
    for py in runs.get("python", pd.Series(dtype=object)).dropna():
        rows.setdefault("python", {}).setdefault(str(py), 0)
        rows["python"][str(py)] += 1
    return pd.DataFrame([{"package": p, "versions (runs)": "; ".join(f"{v} ({n})" for v, n in sorted(vs.items()))}
                         for p, vs in sorted(rows.items())], columns=["package", "versions (runs)"])


def spread(row, column: str, fmt: str = "{:.2f}") -> str:
    """A summary row's metric ``column`` over seeds: ``mean ± std (CI low, high; n=k)`` with the 95% t-interval of
    the mean (no brackets: Markdown would escape them), or ``mean (1 seed)``."""
    mean, n = row.get(f"{column}_mean"), row.get(f"{column}_n")
    if _missing(mean):
        return "–"
    if _missing(n) or n < 2:
        return f"{fmt.format(mean)} (1 seed)"
    low, high = (fmt.format(row[f"{column}_ci_{end}"]) for end in ("low", "high"))
    return f"{fmt.format(mean)} ± {fmt.format(row[f'{column}_std'])} (CI {low}, {high}; n={_plain(n)})"


def num(value, fmt: str) -> str:
    return "–" if _missing(value) else fmt.format(value)


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _plain(v):
    """Whole floats as ints (``4.0`` -> ``4``): pandas turns int columns with gaps into floats."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return None if _missing(v) else v
