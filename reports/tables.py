"""Tables from the tidy runs table: per-task summaries, Table 2, fairness checks, failures, appendix.

Functions return DataFrames. ``summary`` keeps numbers (it is also written as CSV); the ``*_display``
functions turn numbers into the strings the report shows.
"""
from __future__ import annotations

import json
import math
import numbers
import re

import pandas as pd

from seqbench.harness.metrics import METRICS, Metric

from . import hardware, stats
from .load import BUDGET_KEYS, QUALITY, TUNED_KEYS
from .reference import MEASURED

# rows of one summary group: one task and one system (reports.load.system_key: every setting that can change a
# result, the device included); the other columns name it. Seeds (and only seeds) are pooled
GROUP = ["task", "family", "metrics", "arch", "model", "label", "preset", "device_name", "budget", "optimizer",
         "lm_protocol", "system_name"]
SYSTEM = ["task", "system"]  # what identifies a row: runs.system is load.system_key of each record
SHOWN = ("device", "trainer.lr", "trainer.warmup_steps", "trainer.clip_norm",
         *(f"trainer.{k}" for k in BUDGET_KEYS))  # settings with columns of their own in the summary display
COSTS = [("parameters", "parameters", "{:,.0f}"), ("train_flops", "train FLOPs", "{:.2e}"),
         ("train_seconds", "train s", "{:.1f}"), ("train_tokens_per_second", "train tokens/s", "{:,.0f}"),
         ("mfu", "MFU", "{:.1%}"),  # costs.mfu: counted FLOP/s over the measured matmul peak (harness/peak.py)
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


def budget(row, without: tuple[str, ...] = ()) -> str:
    """The training budget of one run, e.g. ``max_seconds=2700, max_tokens=4096`` (the keys ``without`` left out)."""
    parts = [f"{k}={number_text(row.get(k))}" for k in BUDGET_KEYS if k not in without and not _missing(row.get(k))]
    return ", ".join(parts) or "none"


def number_text(v):
    """A setting's number as a person reads it: ``1.5e+14`` FLOPs rather than 150000000000000; ``4096`` tokens,
    ``2700`` seconds and ``0.002`` as they are. An int and a whole float of one value read the same (4096 and 4096.0,
    150000000000000 and 1.5e14)."""
    if isinstance(v, numbers.Real) and not isinstance(v, bool) and abs(v) >= 1e6:
        return f"{float(v):g}"
    return _plain(v)


def optimizer(row) -> str:
    """The optimiser settings a tuning grid varies, e.g. ``lr=0.002, warmup_steps=150, clip_norm=0``."""
    return ", ".join(f"{k}={_plain(row.get(k))}" for k in TUNED_KEYS if not _missing(row.get(k))) or "?"


def with_groups(runs: pd.DataFrame) -> pd.DataFrame:
    runs = runs.copy()
    runs["budget"] = runs.apply(budget, axis=1) if len(runs) else []
    runs["optimizer"] = runs.apply(optimizer, axis=1) if len(runs) else []
    runs["peak_memory_mib"] = pd.to_numeric(runs.get("peak_memory_bytes"), errors="coerce") / 2**20
    for c in [*GROUP, "system"]:
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
        return pd.DataFrame(columns=[*GROUP, "system", *agg, "system_differs"])
    numbers = metrics + [c for c, _, _ in COSTS]
    done[numbers] = done[numbers].apply(pd.to_numeric, errors="coerce")
    done["low_utilization"] = [None if why is None else f"seed {_plain(seed)}: {why}"
                               for seed, why in zip(done["seed"], hardware.flag(done))]
    first = done.groupby(SYSTEM, sort=False)["system_differs"].first().rename("system_differs")
    out = done.groupby([*GROUP, "system"], sort=True, dropna=False).agg(**agg).reset_index()
    return out.join(first, on=SYSTEM)


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
    settings = rows["system_differs"].map(lambda text: differs_text(text, SHOWN))
    if settings.astype(bool).any():  # systems of one architecture apart in other settings: each row says which
        out.insert(1, "settings", settings)
    if (rows["lm_protocol"] != "").any():  # a language model's perplexity depends on the context it was given
        out["perplexity protocol"] = rows["lm_protocol"]  # with the part scored and the unknown-token rate
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


def differs_text(text, without=()) -> str:
    """A run's ``system_differs`` (JSON) as ``eval.decoding.beam=1, model.d_model=64``, leaving out ``without``."""
    differs = json.loads(text) if isinstance(text, str) and text else {}
    return ", ".join(f"{k}={v}" for k, v in differs.items() if k not in without)


def differing_settings(runs: pd.DataFrame) -> pd.DataFrame:
    """Per task, each setting whose value differs between the task's finished runs, with run counts: the
    ``SETTINGS`` columns and every setting of the resolved config that can change a result
    (``load.system_settings``); a model hyperparameter where it differs between runs of one architecture,
    labelled with it (two architectures' hyperparameters always differ)."""
    rows = []
    for task, group in with_groups(ok(runs)).groupby("task", sort=True):
        settings = group[[c for c, _ in SETTINGS]].rename(columns=dict(SETTINGS))
        settings = settings.join(pd.DataFrame([{f"task.{k}": v for k, v in json.loads(s or "{}").items()}
                                               for s in group["task_settings"]], index=group.index))
        config = [json.loads(s) if isinstance(s, str) else {} for s in group.get("system_settings", [])]
        shown = set(settings.columns) | {"device", "model.name", "model.preset"}
        columns = {label: settings[label] for label in settings.columns}
        for k in sorted({k for c in config for k in c if k not in shown and not k.startswith("task.")}):
            values = pd.Series([json.loads(c[k]) if k in c else "unset" for c in config], index=group.index,
                               dtype=object)
            if not k.startswith("model."):
                columns[k] = values
                continue
            for arch in sorted(group["arch"].unique()):
                columns[f"{k} ({arch})"] = values[group["arch"] == arch]
        for label, column in columns.items():
            values = column.map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else str(number_text(v)))
            values = values.value_counts()
            if len(values) > 1:
                rows.append({"task": task, "setting": label,
                             "values (runs)": "; ".join(f"{v} ({n})" for v, n in values.sort_index().items())})
    return pd.DataFrame(rows, columns=["task", "setting", "values (runs)"])


def compared_budget(row) -> str:
    """A run's budget as a warning compares it: the rungs of a budget ladder (a ``ladder_flops`` run) differ by
    design in ``max_flops``, the rung, and are compared within a rung; the rest of their budget must agree."""
    return row["budget"] if _missing(row.get("ladder_flops")) else "ladder rung, " + budget(row, ("max_flops",))


def fairness_warnings(runs: pd.DataFrame) -> dict[str, list[str]]:
    """Per task, the warnings for runs on different devices or budgets that share one table. The rungs of one
    budget ladder are no different budgets: each rung is its own row and the ladder's tables compare within it."""
    out = {}
    for task, group in with_groups(ok(runs)).groupby("task", sort=True):
        msgs, one_budget = [], group.apply(compared_budget, axis=1).nunique() == 1
        for col, what in (("device_name", "devices"), ("budget", "training budgets"),
                          ("lm_protocol", "perplexity protocols (eval.lm_protocol)")):
            values = sorted(group[col].unique())
            if col == "budget" and one_budget:
                continue
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


PLUGIN_COLUMNS = ["architecture", "found by", "distribution", "version", "source sha256", "git commit", "runs that used it"]


def plugins(runs: pd.DataFrame) -> pd.DataFrame:
    """Each plug-in architecture the records name (environment.plugins): where it came from and which code it was
    (its source files' SHA-256, shortened; its repository's commit, ``+dirty`` when it differed), and how many runs
    used it. One row per distinct source: a plug-in whose code changed between runs has two."""
    found: dict[tuple, dict] = {}
    for text in runs.get("plugins", pd.Series(dtype=object)).dropna():
        for p in json.loads(text):
            commit = p.get("git_commit")
            key = (p.get("name"), p.get("found_by"), p.get("distribution"), p.get("version"),
                   (p.get("source_sha256") or "")[:12], f"{commit[:10]}{'+dirty' if p.get('git_dirty') else ''}"
                   if commit else "")
            found.setdefault(key, {"used": 0})["used"] += bool(p.get("used"))
    rows = [dict(zip(PLUGIN_COLUMNS, (*key, v["used"]))) for key, v in sorted(found.items(), key=lambda kv: str(kv[0]))]
    return pd.DataFrame(rows, columns=PLUGIN_COLUMNS).map(lambda v: "–" if v in (None, "") else v)


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


# ---------------------------------------------------------------- the overview, the quality and the cost tables

ARROWS = {True: "↑", False: "↓"}  # which way a metric is better, as the overview's column headers say it
NBSP = "\u00a0"  # joins the words of a short device name: a table never breaks it over lines
DEVICE_LIMIT = 20  # characters of a short device name
VENDOR_WORDS = {"nvidia", "geforce", "tesla", "quadro", "amd", "intel", "apple", "cpu", "processor", "radeon"}


def short_device(name) -> str:
    """A device name as a table cell: the model (``H100``, ``RTX 4090``, ``Xeon``) and a CPU's cores.

    ``NVIDIA H100 80GB HBM3`` -> ``H100``; ``Intel(R) Xeon(R) CPU @ 2.20GHz (2 cores)`` -> ``Xeon, 2 cores``;
    names without a vendor's noise (``x86_64``) stay as they are.
    """
    text = "?" if _missing(name) else str(name)
    cores = re.search(r"\((\d+) cores?\)\s*$", text)
    rest = re.sub(r"\((R|TM|C)\)|®|™|@\s*[\d.]+\s*[GM]Hz|\(\d+ cores?\)\s*$", " ", text, flags=re.I)
    words = [w for w in rest.split() if w.lower() not in VENDOR_WORDS]
    if not cores:  # an accelerator: its model, without memory and variant suffixes (V100-SXM2-16GB -> V100)
        words = [w.split("-")[0] if re.match(r"^[A-Za-z]+\d", w) else w for w in words]
    at = next((k for k, w in enumerate(words) if re.search(r"\d", w)), None)
    if at is None:
        model = words[:1]
    else:  # the first word with a digit, after its series name (RTX 4090, EPYC 7B13)
        model = words[max(0, at - 1):at + 1] if at and words[at - 1].isalpha() else words[at:at + 1]
    short = " ".join(model) or text
    if cores:
        short += f", {cores.group(1)} cores"
    short = short if len(short) <= DEVICE_LIMIT else short[:DEVICE_LIMIT - 1] + "…"
    return short.replace(" ", NBSP)


def short_devices(names) -> dict[str, str]:
    """Each device name -> its short name (:func:`short_device`), numbered where two would read alike."""
    full = sorted({"?" if _missing(n) else str(n) for n in names})
    short = {n: short_device(n) for n in full}
    counts = pd.Series(list(short.values()), dtype=object).value_counts()
    seen: dict[str, int] = {}
    for n in full:
        if counts.get(short[n], 0) > 1:
            seen[short[n]] = seen.get(short[n], 0) + 1
            short[n] = f"{short[n]}{NBSP}#{seen[short[n]]}"
    return short


def device_legend(devices: dict[str, str], shown) -> str:
    """``Devices: H100 = NVIDIA H100 80GB HBM3; ...`` for the shortened names among ``shown``; "" if none."""
    pairs = sorted({(devices[n], n) for n in shown if n in devices and devices[n] != n})
    return ("Devices: " + "; ".join(f"{s.replace(NBSP, ' ')} = {n}" for s, n in pairs) + ".") if pairs else ""


def primary_metric(rows: pd.DataFrame) -> Metric | None:
    """A task's primary metric: the first of its metrics (BLEU, perplexity, accuracy, an error rate)."""
    quality = task_metrics(rows)
    return quality[0] if quality else None


def system_names(summ: pd.DataFrame, devices: dict[str, str] | None = None, without=()) -> pd.Series:
    """Each summary row's name in the overview: its architecture, with the device, budget, optimiser settings or
    LM protocol where the architecture's rows of one task differ in them (named the same way in every task), and
    any other setting that sets apart systems of one architecture and task (``system_differs``); ``without``:
    columns a table shows on their own (``device_name``)."""
    if summ.empty:
        return pd.Series(dtype=object)
    devices = devices if devices is not None else short_devices(summ["device_name"])
    extra = [c for c in ("device_name", "budget", "optimizer", "lm_protocol") if c in summ and c not in without]
    varies = {arch: [c for c in extra if (rows.groupby("task")[c].nunique() > 1).any()]
              for arch, rows in summ.groupby("arch", sort=False)}
    show = lambda c, v: devices.get(v, v) if c == "device_name" else str(v)  # noqa: E731
    names = pd.Series([" · ".join([row["arch"], *(show(c, row[c]) for c in varies[row["arch"]])])
                       for _, row in summ.iterrows()], index=summ.index, dtype=object)
    for _, rows in summ.assign(_name=names).groupby(["task", "_name", *without], sort=False):  # still alike
        if len(rows) < 2 or "system_differs" not in rows:
            continue
        differs = [json.loads(t) if isinstance(t, str) and t else {} for t in rows["system_differs"]]
        keys = sorted({k for d in differs for k in d
                       if len({json.dumps(o.get(k), default=str) for o in differs}) > 1})
        for k, (i, d) in enumerate(zip(rows.index, differs), 1):  # numbered where nothing recorded tells them apart
            names[i] += " (" + (", ".join(f"{key}={d[key]}" for key in keys if key in d) or f"#{k}") + ")"
    return names


def interval_cell(row, column: str, fmt: str) -> str:
    """``mean (low, high; n=k)`` with the 95% t-interval of the mean over seeds, ``mean (1 seed)``, or ``–``."""
    mean, n = row.get(f"{column}_mean"), row.get(f"{column}_n")
    show = lambda v: re.sub(r"^-(?=[0.]*$)", "", fmt.format(v))  # noqa: E731  (no "-0.00")
    if _missing(mean):
        return "–"
    if _missing(n) or n < 2:
        return f"{show(mean)} (1 seed)"
    low, high = (show(row[f"{column}_ci_{end}"]) for end in ("low", "high"))
    return f"{show(mean)} ({low}, {high}; n={_plain(n)})"


def overview(summ: pd.DataFrame, devices: dict[str, str] | None = None) -> tuple[pd.DataFrame, set]:
    """The architecture x task matrix of each task's primary test metric, and the cells of each task's best mean.

    Rows are :func:`system_names`, one column per task headed ``task: metric ↑`` (↓ where lower is better); a cell
    is :func:`interval_cell`. The second value holds (row, column) positions of the best cells (ties all best).
    """
    columns, cells = {}, {}
    names = system_names(summ, devices)
    for task in sorted(summ["task"].unique()) if len(summ) else []:
        rows = summ[summ["task"] == task]
        metric = primary_metric(rows)
        if metric is None:
            continue
        head = f"{task}: {metric.label} {ARROWS[metric.higher_is_better]}"
        columns[head] = {names[i]: interval_cell(row, f"test_{metric.name}", metric.fmt) for i, row in rows.iterrows()}
        means = pd.to_numeric(rows[f"test_{metric.name}_mean"], errors="coerce")
        best = means.max() if metric.higher_is_better else means.min()
        cells[head] = {names[i] for i, v in means.items() if v == best}
    if not columns:
        return pd.DataFrame(columns=["architecture"]), set()
    order = sorted({n for col in columns.values() for n in col})
    frame = pd.DataFrame({"architecture": order, **{h: [col.get(n, "") for n in order] for h, col in columns.items()}})
    bold = {(r, c) for c, head in enumerate(frame.columns) if head in cells
            for r, name in enumerate(order) if name in cells[head]}
    return frame, bold


def quality_display(summ: pd.DataFrame, task: str, devices: dict[str, str] | None = None) -> pd.DataFrame:
    """:func:`summary_display` without the costs (they are in :func:`costs_display`), devices by their short names.

    A task with a hardware warning keeps its CPU utilisation beside the warning, which cites it."""
    out = summary_display(summ, task)
    keep = {"CPU utilisation"} if "hardware" in out else set()
    out = out.drop(columns=[label for _, label, _ in COSTS if label in out and label not in keep])
    devices = devices if devices is not None else short_devices(summ["device_name"])
    return out.assign(device=out["device"].map(lambda v: devices.get(v, v)))


def costs_display(summ: pd.DataFrame, devices: dict[str, str] | None = None) -> pd.DataFrame:
    """Per task and system: the mean costs over seeds (time, throughput, FLOPs, memory, parameters)."""
    devices = devices if devices is not None else short_devices(summ["device_name"])
    rows = summ.sort_values(["task", "arch"], kind="stable")
    out = pd.DataFrame({"task": rows["task"], "architecture": system_names(summ, devices, ["device_name"])[rows.index],
                        "device": rows["device_name"].map(lambda v: devices.get(v, v)), "n": rows["n"]})
    for c, label, fmt in COSTS:
        out[label] = rows[c].map(lambda v, fmt=fmt: num(v, fmt))
    return out.reset_index(drop=True)
