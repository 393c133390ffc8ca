"""Plots a reader can read: confidence bands over seeds, perplexity on log axes, tick labels that never overlap."""
from __future__ import annotations

import math
from itertools import combinations

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex

from seqbench import reports
from seqbench.reports import plots, tables
from tests.test_reports import L_COL, T_COL, fixture_records, record, write_records

T_2 = 4.303  # Student's t, 97.5th percentile, 2 degrees of freedom (a printed t table)
ARCHS = ("transformer", "lstm", "gru", "convs2s", "bytenet")


def bands(ax) -> dict[str, dict[float, tuple[float, float]]]:
    """colour -> {x: (low, high)} of every confidence band (filled area) drawn on the panel."""
    out = {}
    for band in ax.collections:
        if type(band).__name__.endswith("PolyCollection") and len(band.get_paths()):
            points = band.get_paths()[0].vertices
            by_x = out.setdefault(to_hex(band.get_facecolor()[0]), {})
            for x, y in points:
                low, high = by_x.get(round(x, 6), (math.inf, -math.inf))
                by_x[round(x, 6)] = (min(low, y), max(high, y))
    return out


def panel(fig, title):
    return next(ax for ax in fig.axes if ax.get_visible() and ax.get_title() == title)


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    records = reports.load([write_records(tmp_path_factory.mktemp("records"), fixture_records())])
    return records, plots.report_palette(records)


def test_curves_carry_95_percent_t_bands_over_seeds(fixture):
    """transformer on multi30k, 3 seeds of valid BLEU (20, 22, 24) k / 3 at 20 k seconds: the band at 60 s is
    22 +- 4.303 * 2 / sqrt(3); the lone H100 run and the one-seed lstm on wikitext2 get no band."""
    records, pal = fixture
    fig, caption = plots.learning_curves(records.curves, pal)
    half = T_2 * 2 / math.sqrt(3)
    mt = bands(panel(fig, "multi30k"))
    assert set(mt) == {T_COL, L_COL}  # one transformer band: the H100 run has none
    assert mt[T_COL][60.0] == (pytest.approx(22 - half, abs=2e-3), pytest.approx(22 + half, abs=2e-3))
    assert mt[T_COL][20.0] == (pytest.approx((22 - half) / 3, abs=1e-3), pytest.approx((22 + half) / 3, abs=1e-3))
    lstm = T_2 * math.sqrt(7) / math.sqrt(3)  # (10, 11, 15): s = sqrt(7)
    assert mt[L_COL][60.0] == (pytest.approx(12 - lstm, abs=2e-3), pytest.approx(12 + lstm, abs=2e-3))
    assert set(bands(panel(fig, "wikitext2"))) == {T_COL}
    assert "95% confidence interval of the mean (Student t over seeds" in caption
    # BLEU by length: bucket 1-10 holds (22, 24, 26) for the transformer's seeds: 24 +- 4.303 * 2 / sqrt(3)
    fig, caption = plots.quality_by_length(records.by_length, pal)
    assert bands(fig.axes[0])[T_COL][0.0] == (pytest.approx(24 - half, abs=2e-3), pytest.approx(24 + half, abs=2e-3))
    assert "95% confidence interval" in caption


def test_seeds_evaluated_at_other_times_average_on_a_common_grid(tmp_path):
    """Two seeds evaluated at different seconds: each is interpolated at the times both reached (20..50 s)."""
    recs = [record("transformer", "multi30k", s, scores=(30.0, 60.0)) for s in (1, 2)]
    recs[0]["curves"]["valid"] = [{"step": k, "train_seconds": t, "valid_bleu_greedy": b}
                                  for k, (t, b) in enumerate([(10.0, 0.0), (30.0, 20.0), (50.0, 30.0)])]
    recs[1]["curves"]["valid"] = [{"step": k, "train_seconds": t, "valid_bleu_greedy": b}
                                  for k, (t, b) in enumerate([(20.0, 10.0), (40.0, 30.0), (60.0, 40.0)])]
    records = reports.load([write_records(tmp_path, recs)])
    fig, _ = plots.learning_curves(records.curves)
    (line,) = [ln for ln in fig.axes[0].get_lines() if len(ln.get_xdata()) and ln.get_label().startswith("_")]
    # seed 1 at 20, 30, 40, 50 s: 10, 20, 25, 30; seed 2: 10, 20, 30, 35 (interpolated between its points)
    assert list(line.get_xdata()) == [20.0, 30.0, 40.0, 50.0]
    assert list(line.get_ydata()) == pytest.approx([10.0, 20.0, 27.5, 32.5])


def test_perplexity_axes_are_logarithmic_and_a_run_far_behind_leaves_the_rest_readable(tmp_path):
    """One language model far behind (perplexity 1e6) with three near 100-150: on the log axis the three stay
    apart (a linear axis would put them within 0.01% of its height); BLEU axes stay linear."""
    recs = [record("transformer", "wikitext2", s, scores=(p,)) for s, p in ((1, 100.0), (2, 110.0))]
    recs += [record("lstm", "wikitext2", 1, scores=(150.0,)), record("gru", "wikitext2", 1, scores=(1e6,)),
             record("transformer", "multi30k", 1, scores=(20.0, 50.0))]
    records = reports.load([write_records(tmp_path, recs)])
    for make, data in ((plots.pareto, tables.ok(records.runs)), (plots.quality_vs_parameters, tables.ok(records.runs)),
                       (plots.learning_curves, records.curves)):
        fig, _ = make(data)
        assert panel(fig, "wikitext2").get_yscale() == "log" and panel(fig, "multi30k").get_yscale() == "linear"
    fig, _ = plots.pareto(tables.ok(records.runs))
    ax = panel(fig, "wikitext2")
    FigureCanvasAgg(fig).draw()
    heights = sorted(ax.transLimits.transform(ax.transScale.transform((1e12, y)))[1] for y in (100.0, 150.0))
    assert heights[1] - heights[0] > 0.02  # log(1.5) / log(1e4) of the axis, about 4%
    assert fig is not None and all(t.get_text() for t in ax.get_yticklabels() if _in_view(ax.yaxis, t))


def costs_spanning(low: float, high: float, clustered: int = 0) -> list[float]:
    """Ten training costs from ``low`` to ``high`` (log-spaced), the last ``clustered`` a hair apart near ``high``."""
    spread = [low * (high / low) ** (k / 9) for k in range(10 - clustered)]
    return spread + [high * (1 + 1e-4 * k) for k in range(1, clustered + 1)]


@pytest.mark.parametrize("flops, ppl", [
    (costs_spanning(3.2073e12, 3.2080e12), (100, 101)),  # within a hair: one linear axis
    (costs_spanning(1e11, 3.2073e12, clustered=6), (100, 400)),  # the clustered WikiText-2 Pareto plot
    (costs_spanning(2e12, 2.5e13), (90, 700)),  # a decade and a bit
    (costs_spanning(1e10, 1e20), (20, 3e5)),  # ten decades
])
def test_tick_labels_never_overlap(tmp_path, flops, ppl):
    """Every plot of training runs, drawn: no two tick labels of an axis overlap, and cost ticks are few and short."""
    recs = []
    for k, cost in enumerate(flops):
        quality = ppl[0] * (ppl[1] / ppl[0]) ** (k / (len(flops) - 1))
        arch, seed = ARCHS[k % 5], k // 5 + 1
        recs += [record(arch, "wikitext2", seed, scores=(quality,), costs=(60.0 + k, cost, 1000.0 * (k + 1))),
                 record(arch, "multi30k", seed, scores=(20.0 + k, 50.0), costs=(60.0 + k, cost, 1000.0 * (k + 1)))]
    records = reports.load([write_records(tmp_path, recs)])
    runs, pal = tables.ok(records.runs), plots.report_palette(records)
    for make, data in ((plots.pareto, runs), (plots.quality_vs_parameters, runs), (plots.throughput, runs),
                       (plots.learning_curves, records.curves)):
        fig, _ = make(data, pal)
        renderer = FigureCanvasAgg(fig).get_renderer()
        fig.draw(renderer)
        for ax in (a for a in fig.axes if a.get_visible()):
            for axis in (ax.xaxis, ax.yaxis):
                labels = [t for t in axis.get_ticklabels() if t.get_text() and _in_view(axis, t)]
                boxes = [t.get_window_extent(renderer) for t in labels]
                clash = [(a.get_text(), b.get_text()) for (a, x), (b, y) in combinations(zip(labels, boxes), 2)
                         if x.overlaps(y)]
                assert not clash, (make.__name__, ax.get_title(), axis.axis_name, clash)
        if make is plots.pareto:
            costs = [t.get_text() for t in panel(fig, "wikitext2").get_xticklabels()
                     if _in_view(panel(fig, "wikitext2").xaxis, t)]
            assert 2 <= len(costs) <= 9 and all(len(c) <= 7 and "e+" not in c for c in costs), costs


def _in_view(axis, label) -> bool:
    low, high = sorted(axis.get_view_interval())
    position = label.get_position()[0 if axis.axis_name == "x" else 1]
    return low <= position <= high


def test_seeds_with_one_evaluation_each_at_other_times_are_drawn_not_dropped(tmp_path):
    """An update budget evaluated once at its end: the seeds reach it at 240 and 260 s, so their curves share no span
    of time; the panel shows both points (it was empty)."""
    recs = [record("transformer", "multi30k", s, scores=(30.0, 60.0)) for s in (1, 2)]
    for rec, (t, b) in zip(recs, [(240.0, 15.0), (260.0, 17.0)]):
        rec["curves"]["valid"] = [{"step": 200, "train_seconds": t, "valid_bleu_greedy": b}]
    records = reports.load([write_records(tmp_path, recs)])
    fig, caption = plots.learning_curves(records.curves)
    points = {tuple(xy) for c in fig.axes[0].collections for xy in c.get_offsets().tolist()}
    assert points == {(240.0, 15.0), (260.0, 17.0)}  # one point per seed
    assert not [ln for ln in fig.axes[0].get_lines() if len(ln.get_xdata()) > 1]  # and no line joining the seeds
    assert "seeds whose curves share no span of time: each seed's own points" in caption
    assert "runs evaluated once each: one point per run, no lines" in caption
