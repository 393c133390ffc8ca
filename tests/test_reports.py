"""The comparison report: tables against hand-computed values, plots, guards, escaping, a real browser."""
from __future__ import annotations

import colorsys
import html
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from matplotlib.colors import to_hex, to_rgb
from omegaconf import OmegaConf

from seqbench import reports
from seqbench.reports import plots, reference, sections, tables
from seqbench.reports.__main__ import main as cli
from seqbench.reports.callback import BuildReport
from seqbench.reports.render import write_html, write_markdown

CPU, H100 = ("cpu", "x86_64"), ("cuda", "NVIDIA H100 80GB HBM3")
XSS_NAME = "<script>alert(1)</script>"
XSS_ERROR = "ValueError: bad input <img src=x onerror=\"document.title='pwned'\">"
PLOTS = ("learning_curves", "pareto", "quality_vs_parameters", "throughput", "quality_by_length")
ANALYSIS_PLOTS = ("accuracy_by_distance", "influence_by_distance", "path_length", "throughput_by_length")
FAMILY = {"wikitext2": "lm", "delayed_copy": "probe", "assoc_recall": "probe"}  # else translation
TITLE = "seqbench comparison report"


def environment(device=CPU) -> dict:
    return {"git_commit": "0123456789abcdef0123", "git_dirty": False, "python": "3.11.7",
            "packages": {"torch": "2.13.0", "sacrebleu": "2.6.0"}, "device": device[0], "device_name": device[1]}


def record(model, task, seed, *, status="ok", scores=None, costs=None, device=CPU, budget=None, name=None,
           error=None, by_length=None, path_length=None, settings=None, by_distance=None, analysis=None) -> dict:
    """A result record shaped like harness.job writes it (schema 1), with only what a report reads.

    ``settings``: model hyperparameters (e.g. attn_window); ``by_distance``: a probe task's accuracy_by_distance;
    ``analysis``: the record's analysis entry (influence by distance)."""
    family = FAMILY.get(task, "translation")
    trainer = {"max_tokens": 4096, "max_steps": None, "max_epochs": None, "max_seconds": 60, "precision": "auto",
               **(budget or {})}
    task_cfg = {"name": task, "bptt": 128} if family != "translation" else {"name": task, "vocab_size": 8000,
                                                                            "model_type": "bpe"}
    rec = {"schema_version": 1, "status": status, "error": error, "seed": seed,
           "config": {"model": {"name": model, "preset": "tiny", **(settings or {})}, "task": task_cfg,
                      "trainer": trainer, "seed": seed},
           "job": {"name": name or f"{model}-tiny_{task}_s{seed}", "sweep": "fixture"},
           "environment": environment(device),
           "model": {"name": model, "preset": "tiny", "form": "seq2seq",
                     "parameters": 1000 if model == "lstm" else 2000},
           "task": {"name": task, "family": family, **({"vocab": 1000} if family == "lm" else
                                                        {"src_vocab": 8000, "tgt_vocab": 8000})}}
    if status != "ok":
        return rec
    if family == "translation":
        bleu, chrf = scores
        test = {"bleu": bleu, "chrf": chrf,
                "bleu_signature": "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0",
                "chrf_signature": "nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:2.6.0"}
        if by_length:
            test["by_length"] = [{"bucket": b, "bleu": v} for b, v in by_length]
        curve = [{"step": 10 * k, "train_seconds": 20.0 * k, "valid_bleu_greedy": bleu * k / 3} for k in (1, 2, 3)]
    elif family == "probe":
        test = {"accuracy": scores[0], "nll": 0.5,
                "accuracy_by_distance": [{"distance": d, "accuracy": a, "n": 100} for d, a in by_distance or []]}
        curve = [{"step": 10 * k, "train_seconds": 20.0 * k, "valid_ppl": 4.0 - k, "valid_accuracy": scores[0] * k / 3}
                 for k in (1, 2, 3)]
    else:
        test = {"perplexity": scores[0], "nll": math.log(scores[0])}
        curve = [{"step": 10 * k, "train_seconds": 20.0 * k, "valid_ppl": scores[0] * (4 - k)} for k in (1, 2, 3)]
    seconds, flops, tps = costs or (60.0, 1e12, 1000.0)
    rec.update(metrics={"test": test, "valid": dict(test)}, curves={"train": [], "valid": curve},
               costs={"train_seconds": seconds, "steps": 30, "tokens": 60000, "train_flops": flops,
                      "flops_per_token": flops / 60000, "train_tokens_per_second": tps,
                      "decode_sentences_per_second": 50.0, "peak_memory_bytes": 512 * 2**20,
                      "peak_memory_kind": "process_max_rss"})
    if path_length:
        rec["path_length"] = path_length
    if analysis:
        rec["analysis"] = analysis
    return rec


def fixture_records() -> list[dict]:
    """2 architectures x 3 seeds on multi30k (+1 run on another device), an LM task with two budgets,
    a failed job named like a script, an interrupted job."""
    buckets = lambda b: [("1-10", b + 2), ("11-20", b), ("21+", b - 3)]
    recs = [record("transformer", "multi30k", s, scores=sc, costs=co, by_length=buckets(sc[0]))
            for s, sc, co in [(1, (20.0, 50.0), (60.0, 1.0e12, 1000.0)), (2, (22.0, 52.0), (62.0, 1.2e12, 1100.0)),
                              (3, (24.0, 57.0), (64.0, 1.4e12, 1200.0))]]
    recs += [record("lstm", "multi30k", s, scores=sc, by_length=buckets(sc[0]))
             for s, sc in [(1, (10.0, 40.0)), (2, (11.0, 41.0)), (3, (15.0, 45.0))]]
    recs.append(record("transformer", "multi30k", 4, scores=(30.0, 60.0), device=H100, costs=(10.0, 1e12, 9000.0)))
    recs += [record("transformer", "wikitext2", 1, scores=(100.0,), budget={"max_seconds": None, "max_steps": 100}),
             record("transformer", "wikitext2", 2, scores=(110.0,), budget={"max_seconds": None, "max_steps": 100}),
             record("lstm", "wikitext2", 1, scores=(150.0,), budget={"max_seconds": None, "max_steps": 200})]
    recs.append(record("gru", "multi30k", 1, status="failed", name=XSS_NAME, error=XSS_ERROR))
    recs.append(record("bytenet", "multi30k", 1, status="interrupted", error="Interrupted: SIGTERM at step 50"))
    return recs


def write_records(root, recs):
    for i, rec in enumerate(recs):
        path = root / f"{i}_{rec['config']['model']['name']}" / "record.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(rec), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = write_records(tmp_path_factory.mktemp("records"), fixture_records())
    out = tmp_path_factory.mktemp("report")
    path = reports.build([root], out)
    return path, out


def summary_row(out, task, arch, device="x86_64"):
    summ = pd.read_csv(out / "summary.csv")
    row = summ[(summ["task"] == task) & (summ["arch"] == arch) & (summ["device_name"] == device)]
    assert len(row) == 1, summ[["task", "arch", "device_name"]]
    return row.iloc[0]


def test_summary_matches_hand_computed_means_and_stds(built):
    _, out = built
    t = summary_row(out, "multi30k", "transformer-tiny")
    assert t["n"] == 3 and t["seeds"] == "1, 2, 3"
    assert t["test_bleu_mean"] == pytest.approx(22.0) and t["test_bleu_std"] == pytest.approx(2.0)
    assert t["test_chrf_mean"] == pytest.approx(53.0) and t["test_chrf_std"] == pytest.approx(math.sqrt(13))
    assert t["train_seconds"] == pytest.approx(62.0) and t["train_flops"] == pytest.approx(1.2e12)
    assert t["train_tokens_per_second"] == pytest.approx(1100.0) and t["peak_memory_mib"] == pytest.approx(512)
    lstm = summary_row(out, "multi30k", "lstm-tiny")
    assert lstm["test_bleu_mean"] == pytest.approx(12.0) and lstm["test_bleu_std"] == pytest.approx(math.sqrt(7))
    # the run on another device is its own row, not pooled with the CPU seeds
    gpu = summary_row(out, "multi30k", "transformer-tiny", H100[1])
    assert gpu["n"] == 1 and gpu["test_bleu_mean"] == pytest.approx(30.0) and math.isnan(gpu["test_bleu_std"])
    lm = summary_row(out, "wikitext2", "transformer-tiny")
    assert lm["test_ppl_mean"] == pytest.approx(105.0) and lm["test_ppl_std"] == pytest.approx(math.sqrt(50))
    # the 95% interval of the mean: mean +- t(0.975, n - 1) s / sqrt(n), t = 4.303 (n = 3) and 12.706 (n = 2) from
    # a table of Student's t: 22 +- 4.303 * 2 / sqrt(3) = 22 +- 4.97
    assert (t["test_bleu_n"], t["test_bleu_ci_low"], t["test_bleu_ci_high"]) == (3, pytest.approx(17.0317, abs=1e-3),
                                                                                  pytest.approx(26.9683, abs=1e-3))
    assert (lm["test_ppl_ci_low"], lm["test_ppl_ci_high"]) == (pytest.approx(41.469, abs=1e-2),
                                                               pytest.approx(168.531, abs=1e-2))
    assert gpu["test_bleu_n"] == 1 and math.isnan(gpu["test_bleu_ci_low"])
    md = (out / "report.md").read_text()
    for cell in ("| 22.00 ± 2.00 (CI 17.03, 26.97; n=3) | 53.00 ± 3.61 (CI 44.04, 61.96; n=3) |",
                 "| 12.00 ± 2.65 (CI 5.43, 18.57; n=3) | 42.00 ± 2.65 (CI 35.43, 48.57; n=3) |",
                 "| 30.00 (1 seed) | 60.00 (1 seed) |", "| 105.00 ± 7.07 (CI 41.47, 168.53; n=2) |",
                 "| 150.00 (1 seed) |", "| 1.20e+12 |"):
        assert cell in md, cell
    assert "± –" not in md


def test_tidy_tables_are_written(built):
    _, out = built
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 12 and set(runs["status"]) == {"ok", "failed", "interrupted"}
    for col in ("model", "preset", "parameters", "task", "family", "seed", "device_name", "test_bleu", "test_chrf",
                "test_ppl", "train_seconds", "train_tokens_per_second", "decode_sentences_per_second",
                "peak_memory_bytes", "train_flops", "flops_per_token", "steps", "max_seconds", "max_steps",
                "vocab_size"):
        assert col in runs, col
    curves = pd.read_csv(out / "curves.csv")
    assert len(curves) == 10 * 3 and {"step", "train_seconds", "valid_bleu_greedy", "valid_ppl"} <= set(curves)
    assert len(pd.read_parquet(out / "runs.parquet")) == 12  # pyarrow is a dependency


def test_every_plot_is_written_and_absent_data_is_noted(built):
    path, out = built
    for name in PLOTS:
        for ext in ("png", "svg"):
            assert (out / "plots" / f"{name}.{ext}").stat().st_size > 1000, (name, ext)
    assert not (out / "plots" / "path_length.png").exists()
    md = (out / "report.md").read_text()
    (missing,) = [line for line in md.split("## Plots")[1].splitlines() if line.startswith("*Not drawn")]
    assert "Quality by source-length bucket" not in missing  # drawn
    assert ("Long-range accuracy by distance (probe tasks) (no records carry metrics.&lt;split&gt;."
            "accuracy_by_distance)") in missing
    assert "## Table 1" not in md  # no path-length records: no Table 1, nor its plots
    assert md.count("](plots/") == len(PLOTS) * 2  # each PNG and its SVG link
    assert path.read_text().count('src="data:image/png;base64,') == len(PLOTS)


def drawn_lines(fig) -> dict[str, list]:
    """Per visible panel: (colour, x values, y values) of every line drawn with data (legend entries have none)."""
    return {ax.get_title(): sorted((to_hex(line.get_color()), tuple(round(float(v), 6) for v in line.get_xdata()),
                                    tuple(round(float(v), 6) for v in line.get_ydata()))
                                   for line in ax.get_lines() if len(line.get_xdata()) and line.get_label()[0] == "_")
            for ax in fig.axes if ax.get_visible()}


def drawn_points(ax) -> list:
    """(x, y, colour) of every point of the panel's first scatter."""
    points = ax.collections[0]
    return sorted((float(x), float(y), to_hex(c)) for (x, y), c in zip(points.get_offsets(), points.get_facecolors()))


def curve(colour, ys, xs=(20.0, 40.0, 60.0)):
    return colour, tuple(xs), tuple(round(y, 6) for y in ys)


T_COL, L_COL = plots.PALETTE["transformer"], plots.PALETTE["lstm"]


def test_plots_draw_the_fixture_values(tmp_path):
    """Each training-run plot draws the values the fixture records hold (hand-computed means), in each
    architecture's colour: the tidy tables it draws from are read right and nothing is dropped or pooled."""
    records = reports.load([write_records(tmp_path, fixture_records())])
    runs, pal = tables.ok(records.runs), plots.report_palette(records)
    # validation curves: valid BLEU = final BLEU * k / 3 at 20 k seconds (ppl x (4 - k) for LMs), one line per model
    # and device, the mean over seeds: transformer (20, 22, 24) -> 22, on the H100 30; lstm (10, 11, 15) -> 12
    fig, _ = plots.learning_curves(records.curves, pal)
    assert drawn_lines(fig) == {
        "multi30k": sorted([*(curve(T_COL, [b * k / 3 for k in (1, 2, 3)]) for b in (22, 30)),
                            curve(L_COL, [12 * k / 3 for k in (1, 2, 3)])]),
        "wikitext2": sorted([curve(T_COL, [105 * (4 - k) for k in (1, 2, 3)]),
                             curve(L_COL, [150 * (4 - k) for k in (1, 2, 3)])])}
    # Pareto: BLEU (perplexity) against training FLOPs; the run on the H100 (1e12 FLOPs, BLEU 30) dominates
    fig, _ = plots.pareto(runs, pal)
    mt, lm = (next(ax for ax in fig.axes if ax.get_title() == t) for t in ("multi30k", "wikitext2"))
    assert drawn_points(mt) == sorted([(1.0e12, 20.0, T_COL), (1.2e12, 22.0, T_COL), (1.4e12, 24.0, T_COL),
                                       (1.0e12, 30.0, T_COL), (1.0e12, 10.0, L_COL), (1.0e12, 11.0, L_COL),
                                       (1.0e12, 15.0, L_COL)])
    front = {t: [(tuple(line.get_xdata()), tuple(line.get_ydata())) for line in ax.get_lines()
                 if line.get_label() == "Pareto front"] for t, ax in (("multi30k", mt), ("wikitext2", lm))}
    assert front == {"multi30k": [((1.0e12, 1.4e12), (30.0, 30.0))],  # on to the costliest run
                     "wikitext2": [((1.0e12, 1.0e12), (100.0, 100.0))]}  # lower perplexity is better
    fig, _ = plots.quality_vs_parameters(runs, pal)
    by_title = {ax.get_title(): drawn_points(ax) for ax in fig.axes if ax.get_visible()}
    assert by_title == {"multi30k": sorted([*((2000.0, b, T_COL) for b in (20.0, 22.0, 24.0, 30.0)),
                                            *((1000.0, b, L_COL) for b in (10.0, 11.0, 15.0))]),
                        "wikitext2": sorted([(2000.0, 100.0, T_COL), (2000.0, 110.0, T_COL), (1000.0, 150.0, L_COL)])}
    # throughput: mean tokens/s over seeds, one bar per architecture and device, error bar one standard deviation
    fig, _ = plots.throughput(runs, pal)
    bars = {ax.get_title(): {t.get_text(): (p.get_height(), to_hex(p.get_facecolor()))
                             for t, p in zip(ax.get_xticklabels(), ax.patches)} for ax in fig.axes if ax.get_visible()}
    assert {t: {k: h for k, (h, _) in b.items()} for t, b in bars.items()} == {
        "multi30k": {"lstm-tiny\nx86_64": 1000.0, "transformer-tiny\nx86_64": 1100.0,
                     "transformer-tiny\nH100": 9000.0},
        "wikitext2": {"lstm-tiny": 1000.0, "transformer-tiny": 1000.0}}
    for b in bars.values():  # seaborn's bars are a desaturated shade of the architecture's colour
        assert all(same_hue(c, T_COL if k.startswith("transformer") else L_COL) for k, (_, c) in b.items()), b
    errors = [tuple(line.get_ydata()) for line in fig.axes[0].get_lines() if tuple(line.get_xdata()) == (1.0, 1.0)]
    assert errors == [(1000.0, 1200.0)]  # 1100 +- std(1000, 1100, 1200)
    # BLEU by length bucket: the mean over seeds of (b + 2, b, b - 3)
    fig, _ = plots.quality_by_length(records.by_length, pal)
    assert drawn_lines(fig) == {"multi30k": sorted([curve(T_COL, [24.0, 22.0, 19.0], xs=(0.0, 1.0, 2.0)),
                                                    curve(L_COL, [14.0, 12.0, 9.0], xs=(0.0, 1.0, 2.0))])}
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["1-10", "11-20", "21+"]


def test_failures_are_listed_with_their_errors(built):
    path, out = built
    md = (out / "report.md").read_text()
    failures = md.split("## Failed and unfinished jobs")[1].split("## Appendix")[0]
    assert "2 jobs did not finish with status ok" in failures
    assert "| &lt;script&gt;alert(1)&lt;/script&gt; | failed | ValueError: bad input &lt;img" in failures
    assert "| interrupted | Interrupted: SIGTERM at step 50 |" in failures
    page = path.read_text()
    assert XSS_NAME not in page and html.escape(XSS_NAME) in page
    assert "<img src=x" not in page and html.escape(XSS_ERROR) in page


def test_device_and_budget_warnings(built):
    path, out = built
    md = (out / "report.md").read_text()
    device = ("WARNING: task multi30k: runs on different devices are compared side by side "
              "(NVIDIA H100 80GB HBM3 | x86_64)")
    budget = "WARNING: task wikitext2: runs on different training budgets are compared side by side"
    assert device in md and budget in md
    assert "task multi30k: runs on different training budgets" not in md
    assert "task wikitext2: runs on different devices" not in md
    fair = md.split("## Fair comparison")[1].split("## Results")[0]
    assert "| multi30k | device | NVIDIA H100 80GB HBM3 (1); x86_64 (6) |" in fair
    assert "| wikitext2 | trainer.max_steps | 100 (2); 200 (1) |" in fair
    assert 'class="warning">WARNING: task multi30k' in path.read_text()


def test_reference_rows_stand_apart_from_measured_ones(built, tmp_path):
    path, out = built
    t2 = (out / "report.md").read_text().split("## Table 2")[1].split("\n## ")[0]
    assert "multi30k" in t2 and "Reference values" not in t2  # the paper's rows only beside a WMT14 run
    recs = [record("transformer", reference.TASK, 1, scores=(20.0, 50.0)), record("lstm", "multi30k", 1,
                                                                                   scores=(10.0, 40.0))]
    section = sections.table2(reports.load([write_records(tmp_path, recs)]).runs)
    write_markdown(tmp_path / "t2.md", TITLE, [section])
    write_html(tmp_path / "t2.html", TITLE, [section])
    measured, ref = (tmp_path / "t2.md").read_text().split("Reference values, not measured here")
    assert "Transformer (base)" not in measured and "multi30k" in measured and reference.TASK in measured
    assert "| Transformer (base) | 27.3 | 3.3e+18 |" in ref and "| ByteNet | 23.75 | – |" in ref
    assert reference.CITATION.split(",")[0] in ref
    assert '<table class="reference">' in (tmp_path / "t2.html").read_text()


def test_appendix_traces_every_run(built):
    _, out = built
    appendix = (out / "report.md").read_text().split("## Appendix")[1]
    assert appendix.count("0123456789ab") == 12 and appendix.count("record.json |") == 12
    assert "nrefs:1|case:mixed" not in appendix  # pipes in signatures are escaped in tables
    assert "nrefs:1\\|case:mixed\\|eff:no\\|tok:13a" in appendix
    assert "| torch | 2.13.0 (12) |" in appendix


def test_palette_is_fixed_per_architecture():
    assert plots.colour("transformer") == plots.PALETTE["transformer"]
    assert len(set(plots.PALETTE.values())) == len(plots.PALETTE) == 8
    assert plots.colour("transformer_pp") != plots.colour("transformer")  # a name of its own, not a variant
    # an unknown name: a pick from FALLBACK by its CRC-32 (retnet 4, rwkv 2), the same in every process, whatever
    # Python's string-hash seed (a pick by hash() would change from run to run)
    assert (plots.colour("retnet"), plots.colour("rwkv")) == (plots.FALLBACK[4], plots.FALLBACK[2])
    for seed in ("1", "2"):
        other = subprocess.run([sys.executable, "-c", "from seqbench.reports import plots; print(plots.colour('retnet'), "
                                "plots.colour('rwkv'))"], env={**os.environ, "PYTHONHASHSEED": seed},
                               cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, check=True)
        assert other.stdout.split() == [plots.FALLBACK[4], plots.FALLBACK[2]]
    # a variant has its architecture's colour here (the palette shades it), whatever the case; a longer name does not
    assert plots.colour("transformer_restricted(r=4)") == plots.colour("Transformer") == plots.PALETTE["transformer"]
    assert plots.colour("lstmx") != plots.PALETTE["lstm"]


def test_pareto_front():
    d = pd.DataFrame({"cost": [1, 2, 3, 4], "q": [10, 9, 12, 11]})
    assert plots.front_of(d, "cost", "q", True)["cost"].tolist() == [1, 3]
    assert plots.front_of(d, "cost", "q", False)["cost"].tolist() == [1, 2]


def test_path_length_section_renders_when_present(tmp_path, capsys):
    pl = {"n": [4, 16, 64], "max_path_length": [1, 1, 1], "layer_type": "self-attention"}
    rnn = {"n": [4, 16, 64], "max_path_length": [4, 16, 64], "layer_type": "recurrent"}
    recs = [record("transformer", "multi30k", 1, scores=(20.0, 50.0), path_length=pl),
            record("lstm", "multi30k", 1, scores=(10.0, 40.0), path_length=rnn)]
    root = write_records(tmp_path / "sweep", recs)
    assert cli([str(root), "--out", str(tmp_path / "out")]) == 0
    assert "report.html" in capsys.readouterr().out
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| lstm-tiny | recurrent | 4 | 16 | 64 |" in md and "| transformer-tiny | self-attention | 1 | 1 | 1 |" in md
    assert (tmp_path / "out" / "plots" / "path_length.svg").exists()
    (missing,) = [line for line in md.splitlines() if line.startswith("*Not drawn")]
    assert "Quality by source-length bucket (no records carry metrics.test.by_length)" in missing


# --- analysis records: path length, influence, probe tasks, a restricted-attention variant ---------------------

NS = [8, 16, 32, 64]
DISTANCES = [0, 4, 16, 64]  # influence: output i against input i - d
RESTRICTED = "transformer_restricted(r=4)"  # the label of a transformer with attn_window=4
# delayed_copy accuracy by distance per seed: (distance, accuracy); hand-computed means and stds below
PROBE = {1: (0.90, [(1, 1.0), (4, 0.95), (16, 0.9), (64, 0.7)]),
         2: (0.80, [(1, 1.0), (4, 0.85), (16, 0.8), (64, 0.6)]),
         3: (0.85, [(1, 1.0), (4, 0.90), (16, 0.85), (64, 0.8)])}


def path_record(name, preset, layer_type, paths, *, settings=None, latency=None) -> dict:
    """A path-length record shaped like harness.analysis.path_length.path_record writes it (no training)."""
    latency = latency or [1e-3 * n / 8 for n in NS]
    return {"status": "ok", "error": None, "seed": 0,
            "job": {"name": f"path_length_{name}-{preset}", "sweep": "path_length"},
            "config": {"model": {"name": name, "preset": preset, "d_model": 32, **(settings or {})},
                       "path_length": {"n": NS, "trials": 2, "seed": 0}},
            "environment": environment(), "model": {"name": name, "preset": preset, "form": "lm", "parameters": 3000},
            "task": {"name": "path_length", "family": "lm"},
            "path_length": {"n": NS, "max_path_length": paths, "layer_type": layer_type, "latency_s": latency,
                            "latency_exponent": 1.0, "latency_device": "cpu"}}


def influence_record(model, seed, norms, *, settings=None) -> dict:
    """An analysis-only record: the input-gradient norm by distance of a model, on the delayed_copy task."""
    return {"status": "ok", "error": None, "seed": seed,
            "job": {"name": f"influence_{model}_s{seed}", "sweep": "fixture"},
            "config": {"model": {"name": model, "preset": "tiny", **(settings or {})}, "seed": seed,
                       "task": {"name": "delayed_copy"}},
            "environment": environment(), "model": {"name": model, "preset": "tiny", "parameters": 2000},
            "task": {"name": "delayed_copy", "family": "probe"},
            "analysis": influence(norms)}


def influence(norms) -> dict:
    return {"influence_by_distance": [{"distance": d, "grad_norm": g, "n": 32} for d, g in zip(DISTANCES, norms)]}


def analysis_records() -> list[dict]:
    window = {"attn_window": 4}
    recs = [path_record("transformer", "tiny", "self-attention", [1, 1, 1, 1]),
            path_record("transformer", "restricted_tiny", "restricted self-attention", [2, 4, 8, 16],
                        settings=window),
            path_record("lstm", "tiny", "recurrent", NS)]
    recs += [record("transformer", "delayed_copy", s, scores=(acc,), by_distance=bd) for s, (acc, bd) in PROBE.items()]
    recs += [record("lstm", "delayed_copy", s, scores=(acc,), by_distance=[(1, 1.0), (64, acc - 0.3)])
             for s, acc in ((1, 0.6), (2, 0.7))]
    recs.append(record("transformer", "delayed_copy", 1, scores=(0.75,), settings=window,
                       by_distance=[(1, 1.0), (64, 0.4)]))
    recs += [record("transformer", "assoc_recall", 1, scores=(0.95,), by_distance=[(2, 1.0), (32, 0.9)]),
             record("lstm", "assoc_recall", 1, scores=(0.50,), by_distance=[(2, 0.9), (32, 0.3)],
                    analysis=influence([3.0, 1.0, 0.1, 0.01]))]  # a trained model's influence
    recs += [influence_record("transformer", s, [1.0, 0.9, 0.8, 0.7]) for s in (1, 2)]
    recs += [influence_record("lstm", 1, [2.0, 0.2, 0.02, 0.0]),
             influence_record("transformer", 1, [1.0, 0.5, 0.0, 0.0], settings=window)]
    return recs


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    root = write_records(tmp_path_factory.mktemp("analysis_records"), analysis_records())
    out = tmp_path_factory.mktemp("analysis_report")
    return reports.build([root], out), out, root


def test_analysis_records_stay_out_of_the_quality_tables(analysed):
    _, out, root = analysed
    summ = pd.read_csv(out / "summary.csv")
    assert set(summ["task"]) == {"delayed_copy", "assoc_recall"}  # no path_length, no influence-only rows
    runs = pd.read_csv(out / "runs.csv")
    assert (runs["kind"] == "analysis").sum() == 3 + 4 and "path_length" in set(runs["task"])
    md = (out / "report.md").read_text()
    results = md.split("## Results per task")[1].split("\n## ")[0]
    assert "### Task path_length" not in results and "path_length" not in results
    assert "### Task delayed_copy" in results and "### Task assoc_recall" in results
    assert "7 analysis-only jobs without training" in md
    # the quality plots have one panel per trained task, none for the analysis-only jobs
    records = reports.load([root])
    fig, _ = plots.quality_vs_parameters(tables.ok(records.runs))
    assert sorted(ax.get_title() for ax in fig.axes if ax.get_visible()) == ["assoc_recall", "delayed_copy"]


def test_probe_accuracy_is_the_quality_of_probe_tasks(analysed):
    _, out, _ = analysed
    t = summary_row(out, "delayed_copy", "transformer-tiny")
    assert t["n"] == 3 and t["seeds"] == "1, 2, 3"  # the influence-only job of seed 1 is not a fourth run
    assert t["test_accuracy_mean"] == pytest.approx(0.85) and t["test_accuracy_std"] == pytest.approx(0.05)
    lstm = summary_row(out, "delayed_copy", "lstm-tiny")
    assert lstm["test_accuracy_mean"] == pytest.approx(0.65) and lstm["test_accuracy_std"] == pytest.approx(
        math.sqrt(0.005))
    variant = summary_row(out, "delayed_copy", f"{RESTRICTED}-tiny")  # not pooled with the plain transformer
    assert variant["n"] == 1 and variant["test_accuracy_mean"] == pytest.approx(0.75)
    md = (out / "report.md").read_text()
    table = md.split("### Task delayed_copy")[1].split("###")[0]
    # 95% t-intervals: 0.85 +- 4.303 * 0.05 / sqrt(3); 0.65 +- 12.706 * 0.0707 / sqrt(2) (past an accuracy of 1:
    # a t-interval over two seeds is that wide)
    assert "| test accuracy |" in table and "| 0.850 ± 0.050 (CI 0.726, 0.974; n=3) |" in table
    assert "| 0.650 ± 0.071 (CI 0.015, 1.285; n=2) |" in table
    by = pd.read_csv(out / "accuracy_by_distance.csv")
    row = by[(by["task"] == "delayed_copy") & (by["label"] == "transformer") & (by["split"] == "test")
             & (by["distance"] == 64)].iloc[0]
    assert row["n"] == 3 and row["accuracy_mean"] == pytest.approx(0.7) and row["accuracy_std"] == pytest.approx(0.1)
    row = by[(by["label"] == "transformer") & (by["split"] == "test") & (by["distance"] == 4)].iloc[0]
    assert row["accuracy_mean"] == pytest.approx(0.9) and row["accuracy_std"] == pytest.approx(0.05)


def same_hue(a: str, b: str) -> bool:
    """Whether two colours are shades of one hue (a variant and its architecture)."""
    ha, hb = colorsys.rgb_to_hls(*to_rgb(a))[0], colorsys.rgb_to_hls(*to_rgb(b))[0]
    return min(abs(ha - hb), 1 - abs(ha - hb)) < 0.02


def test_model_variants_get_their_own_shade_of_the_architecture_colour(analysed):
    pal = plots.palette(["transformer", RESTRICTED, "lstm", "transformer_restricted"])
    assert pal["transformer"] == plots.PALETTE["transformer"] and pal["lstm"] == plots.PALETTE["lstm"]
    assert len({pal["transformer"], pal[RESTRICTED], pal["transformer_restricted"]}) == 3
    assert same_hue(pal[RESTRICTED], pal["transformer"]) and not same_hue(pal[RESTRICTED], pal["lstm"])
    assert plots.palette(["transformer_restricted", "lstm", RESTRICTED, "transformer"]) == pal  # order-free
    # the records name the variant by its attn_window, and the report's one palette tells it apart
    _, _, root = analysed
    records = reports.load([root])
    assert set(records.path_length["label"]) == {"transformer", RESTRICTED, "lstm"}
    assert set(records.path_length["arch"]) == {"transformer-tiny", f"{RESTRICTED}-restricted_tiny", "lstm-tiny"}
    report = plots.report_palette(records)
    assert report["transformer"] != report[RESTRICTED] and same_hue(report["transformer"], report[RESTRICTED])


def test_analysis_plots_are_written_and_shown(analysed):
    path, out, root = analysed
    md = (out / "report.md").read_text()
    for name in (*ANALYSIS_PLOTS, "quality_vs_parameters", "pareto", "learning_curves"):
        for ext in ("png", "svg"):
            assert (out / "plots" / f"{name}.{ext}").stat().st_size > 1000, (name, ext)
        assert f"](plots/{name}.png)" in md, name
    table1 = md.split("## Table 1")[1].split("## Plots")[0]
    assert "](plots/path_length.png)" in table1 and "](plots/throughput_by_length.png)" in table1
    assert f"| {RESTRICTED}-restricted_tiny | restricted self-attention | 2 | 4 | 8 | 16 |" in table1
    assert "| transformer-tiny | self-attention | 1 | 1 | 1 | 1 |" in table1
    assert "3 points with zero gradient" in md  # lstm at distance 64, the restricted variant beyond its window
    (missing,) = [line for line in md.splitlines() if line.startswith("*Not drawn")]
    assert missing.count(" (no records carry") == 1 and "Quality by source-length bucket" in missing
    assert path.read_text().count('src="data:image/png;base64,') == len(PLOTS) - 1 + len(ANALYSIS_PLOTS)
    # influence: a panel per task, from the trained assoc_recall run and the analysis-only delayed_copy jobs
    fig, _ = plots.influence_by_distance(reports.load([root]).influence)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["assoc_recall", "delayed_copy"]
    assert {ax.get_xscale() for ax in axes} == {"symlog"} and {ax.get_yscale() for ax in axes} == {"log"}


def test_analysis_plots_draw_the_fixture_values(analysed):
    """Accuracy and influence by distance (means over seeds, each run divided by its nearest distance, zero
    influence left off the log axis), path length and forward throughput, each model in its own colour."""
    _, _, root = analysed
    records = reports.load([root])
    pal = plots.report_palette(records)
    V_COL = pal[RESTRICTED]
    assert V_COL not in (T_COL, L_COL)
    fig, _ = plots.accuracy_by_distance(records.by_distance, pal)
    assert drawn_lines(fig) == {
        "assoc_recall": sorted([curve(L_COL, [0.9, 0.3], xs=(2, 32)), curve(T_COL, [1.0, 0.9], xs=(2, 32))]),
        "delayed_copy": sorted([curve(T_COL, [1.0, 0.9, 0.85, 0.7], xs=(1, 4, 16, 64)),
                                curve(L_COL, [1.0, 0.35], xs=(1, 64)), curve(V_COL, [1.0, 0.4], xs=(1, 64))])}
    fig, _ = plots.influence_by_distance(records.influence, pal)
    assert drawn_lines(fig) == {
        "assoc_recall": [curve(L_COL, [1.0, 1 / 3, 1 / 30, 1 / 300], xs=DISTANCES)],
        "delayed_copy": sorted([curve(T_COL, [1.0, 0.9, 0.8, 0.7], xs=DISTANCES),
                                curve(L_COL, [1.0, 0.1, 0.01], xs=DISTANCES[:3]),
                                curve(V_COL, [1.0, 0.5], xs=DISTANCES[:2])])}
    fig, _ = plots.path_length(records.path_length, pal)
    assert drawn_lines(fig) == {"maximum path length": sorted([curve(T_COL, [1, 1, 1, 1], xs=NS),
                                                               curve(V_COL, [2, 4, 8, 16], xs=NS),
                                                               curve(L_COL, NS, xs=NS)])}
    fig, _ = plots.throughput_by_length(records.path_length, pal)  # n / (1e-3 n / 8 s) = 8000 tokens/s
    assert drawn_lines(fig) == {"forward pass on x86_64": sorted(curve(c, [8000.0] * 4, xs=NS)
                                                                 for c in (T_COL, V_COL, L_COL))}


def test_job_kind_tells_training_from_analysis():
    from seqbench.reports.load import job_kind
    failed_training = record("gru", "multi30k", 1, status="failed", error="ValueError: x")
    assert job_kind(failed_training) == "train" and job_kind({**failed_training, "config": {"job": "train"}}) == "train"
    failed_path = {**path_record("lstm", "tiny", "recurrent", NS), "status": "failed", "path_length": None}
    assert job_kind(failed_path) == "analysis" and job_kind({"config": {"job": "path_length"}}) == "analysis"
    with_influence = record("lstm", "wikitext2", 1, scores=(100.0,), analysis=influence([1.0, 0.5, 0.2, 0.1]))
    assert job_kind(with_influence) == "train"


def test_influence_is_normalised_by_the_nearest_distance():
    frame = pd.DataFrame({"record": ["a"] * 3 + ["b"] * 3, "job": ["a"] * 3 + ["b"] * 3, "status": "ok",
                          "task": "t", "family": "probe", "label": "lstm", "preset": "tiny", "model": "lstm",
                          "distance": [4, 1, 16] * 2, "grad_norm": [1.0, 2.0, 0.5, 10.0, 20.0, 5.0]})
    fig, note = plots.influence_by_distance(frame)
    ys = sorted(y for line in fig.axes[0].get_lines() for y in line.get_ydata() if y == y)
    assert ys == pytest.approx([0.25, 0.5, 1.0])  # both runs give 1, 0.5, 0.25: one mean line
    assert "divided by its value at the nearest distance" in note
    assert plots.influence_by_distance(frame.iloc[:0]) == (None, "no records carry analysis.influence_by_distance")


def test_callback_builds_the_sweep_report(tmp_path, capsys):
    sweep = write_records(tmp_path / "sweep", [record("transformer", "multi30k", 1, scores=(20.0, 50.0))])
    BuildReport().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert (sweep / "report" / "report.html").exists()
    assert f"report: {sweep / 'report' / 'report.html'}" in capsys.readouterr().out


def test_empty_folder_gives_a_report_that_says_so(tmp_path):
    path = reports.build([tmp_path], tmp_path / "out")
    assert "No result records" in path.read_text()


def test_no_finished_run_still_gives_a_report(tmp_path):
    """Only a running job and an unreadable record: every section says what is missing."""
    running = record("gru", "multi30k", 1, status="running")
    root = write_records(tmp_path / "sweep", [running])
    (root / "broken").mkdir()
    (root / "broken" / "record.json").write_text("{oops")
    md = reports.build([root], tmp_path / "out").with_suffix(".md").read_text()
    assert "| gru-tiny_multi30k_s1 | running |" in md and "| broken | unreadable | JSONDecodeError" in md
    assert "No finished training run has a test score" in md.split("## Overview")[1].split("\n## ")[0]
    assert not re.search(r"^## (Table 2|Table 1|Plots|Costs)", md, re.M)  # no section without content


# --- the HTML in a real headless browser ---------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--enable-logging=stderr", "--v=0"]
# a probe, added to a copy of the page: records alert() calls, script errors and the state of every image
PROBE_HEAD = ("<script>window.__alerts = []; window.__errors = [];"
              "window.alert = m => window.__alerts.push(String(m));"
              "window.addEventListener('error', e => window.__errors.push(String(e.message || e.target.src)), true);"
              "</script>")
PROBE_BODY = """<script>window.addEventListener('load', () => {
  const imgs = Array.from(document.images).map(i => ({ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth}));
  const probe = {title: document.title, alerts: window.__alerts, errors: window.__errors, images: imgs,
                 scripts: document.scripts.length, text: document.body.innerText.includes(%s)};
  const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(probe);
  document.body.appendChild(pre);
});</script>""" % json.dumps(XSS_NAME).replace("</", "<\\/")  # '</script>' would end the probe itself


def chromium(page, tmp_path, *args):
    cmd = ["nice", "-n", "19", CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium; .ci/run does)")
def test_html_renders_in_a_headless_browser(built, tmp_path):
    path, _ = built
    alone = tmp_path / "alone"  # the page on its own: nothing may load from beside it
    alone.mkdir()
    page = alone / "report.html"
    shutil.copy(path, page)
    shot = tmp_path / "screenshot.png"
    run = chromium(page, tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", "--virtual-time-budget=5000")
    assert shot.exists() and shot.stat().st_size > 10_000, run.stderr[-2000:]
    # the page runs no script and loads nothing: any console line is a CSP violation or an error
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console

    # a copy with a probe and without the CSP, so only the escaping stops the run named like a script
    source = page.read_text()
    probed = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", source)
    assert probed != source
    probed = probed.replace("<head>", "<head>" + PROBE_HEAD, 1).replace("</body>", PROBE_BODY + "</body>", 1)
    probe_page = alone / "probe.html"
    probe_page.write_text(probed, encoding="utf-8")
    run = chromium(probe_page, tmp_path, "--dump-dom", "--virtual-time-budget=5000")
    found = re.search(r'<pre id="probe">(.*?)</pre>', run.stdout, re.S)
    assert found, run.stderr[-2000:]
    probe = json.loads(html.unescape(found.group(1)))
    assert probe["title"] == TITLE and probe["alerts"] == [] and probe["errors"] == []
    assert probe["scripts"] == 2, "only the probe's own scripts may exist in the DOM"
    assert probe["text"], "the run named like a script must show as text"
    assert len(probe["images"]) == len(PLOTS) and all(i["ok"] and i["w"] > 100 for i in probe["images"])
    assert [line for line in run.stderr.splitlines() if ":CONSOLE" in line] == []


def test_translation_curves_without_greedy_bleu_fall_back_to_perplexity(tmp_path):
    """A sweep that skips the greedy validation BLEU (trainer.valid_bleu=false) still gets its learning-curve panel."""
    rec = record("transformer", "multi30k", 1, scores=(20.0, 50.0))
    rec["curves"]["valid"] = [{"step": 10 * k, "train_seconds": 20.0 * k, "valid_ppl": 40.0 / k} for k in (1, 2, 3)]
    root = tmp_path / "records"
    write_records(root, [rec])
    fig, _ = plots.learning_curves(reports.load([root]).curves)
    assert fig is not None
    (ax,) = [a for a in fig.axes if a.get_title()]
    assert ax.get_title() == "multi30k" and ax.get_ylabel() == "valid perplexity"
