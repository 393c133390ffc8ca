"""The report leads with the answer: an architecture x task matrix of each task's primary metric (best in bold) and
one headline figure on the first screen; costs in their own table; sections only with content; the page checked
in headless Chromium at 1280 px (no main table overflows, the matrix within the first 1000 px)."""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

import pytest

from seqbench import reports
from seqbench.reports import plots, sections, tables
from tests.test_reports import CHROMIUM, H100, fixture_records, record, write_records

XEON = ("cpu", "Intel(R) Xeon(R) CPU @ 2.20GHz (2 cores)")
XEON_SHORT = "Xeon,\u00a02\u00a0cores"  # its short name: words joined by no-break spaces
WIDTH, HEIGHT = 1280, 1000  # the first screen the report is checked at
# a probe, added to a copy of the page: measures every table and the overview matrix once the page has loaded
PROBE = """<script>window.addEventListener('load', () => {
  const lines = el => { const r = document.createRange(); r.selectNodeContents(el);
                        return new Set(Array.from(r.getClientRects()).map(x => Math.round(x.top))).size; };
  const tables = Array.from(document.querySelectorAll('table')).map(t => {
    const heads = Array.from(t.querySelectorAll('thead th')).map(th => th.textContent);
    const device = heads.indexOf('device');
    return {id: t.id, caption: t.caption ? t.caption.textContent.slice(0, 60) : '', heads: heads,
            scroll: t.scrollWidth, client: t.clientWidth, container: t.parentElement.clientWidth,
            device_lines: device < 0 ? [] : Array.from(t.querySelectorAll('tbody tr'))
              .map(tr => lines(tr.children[device]))};
  });
  const overview = document.getElementById('overview');
  const probe = {width: window.innerWidth, page: document.documentElement.scrollWidth, tables: tables,
                 overview_top: overview ? overview.getBoundingClientRect().top : null,
                 overview_bottom: overview ? overview.getBoundingClientRect().bottom : null,
                 bold: overview ? Array.from(overview.querySelectorAll('td strong')).map(b => b.textContent) : []};
  const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(probe);
  document.body.appendChild(pre);
});</script>"""
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         f"--window-size={WIDTH},{HEIGHT}", "--virtual-time-budget=5000"]


def wide_records() -> list[dict]:
    """The fixture's runs on a CPU with a long name, plus a GPU run and a third architecture on both tasks: a
    realistic first screen (five tasks' worth of columns would not be wider than the LM's protocol column)."""
    recs = []
    for rec in fixture_records():
        if rec["environment"]["device_name"] != H100[1]:
            rec["environment"]["device"], rec["environment"]["device_name"] = XEON
        recs.append(rec)
    recs += [record("gru", "multi30k", s, scores=(18.0 + s, 48.0), device=XEON) for s in (1, 2)]
    recs += [record("gru", "wikitext2", 1, scores=(130.0,), device=XEON,
                    budget={"max_seconds": None, "max_steps": 100})]
    return recs


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    root = write_records(tmp_path_factory.mktemp("records"), wide_records())
    out = tmp_path_factory.mktemp("report")
    return reports.build([root], out), out


def test_the_overview_matrix_leads_with_each_tasks_primary_metric(wide):
    """Hand-computed: multi30k BLEU transformer (20, 22, 24) -> 22.00, 95% CI 22 +- 4.303 x 2 / sqrt(3); gru (19, 20)
    -> 19.50 +- 12.706 x 0.7071 / sqrt(2); wikitext2 perplexity (lower is better): transformer (100, 110) -> 105,
    lstm 150, gru 130. The best of each task is bold: the lone H100 transformer (BLEU 30) and the transformer's 105."""
    path, out = wide
    md = (out / "report.md").read_text()
    sections = re.findall(r"^## (.+)$", md, re.M)
    assert sections[0] == "Overview"
    first = md.split("## Overview")[1].split("\n## ")[0]
    header = next(line for line in first.splitlines() if line.startswith("| architecture"))
    assert header == "| architecture | multi30k: BLEU ↑ | wikitext2: perplexity ↓ |"
    rows = {line.split(" | ")[0][2:]: line for line in first.splitlines() if line.startswith("| ") and line != header
            and not line.startswith("|---")}
    # the transformer ran on two devices: its rows name them (short), the other architectures' do not
    assert set(rows) == {"gru-tiny", "lstm-tiny", "transformer-tiny · H100", "transformer-tiny · " + XEON_SHORT}
    assert rows["transformer-tiny · " + XEON_SHORT] == (
        f"| transformer-tiny · {XEON_SHORT} | 22.00 (17.03, 26.97; n=3) | **105.00 (41.47, 168.53; n=2)** |")
    assert rows["transformer-tiny · H100"] == "| transformer-tiny · H100 | **30.00 (1 seed)** |  |"
    assert rows["gru-tiny"] == "| gru-tiny | 19.50 (13.15, 25.85; n=2) | 130.00 (1 seed) |"
    assert rows["lstm-tiny"] == "| lstm-tiny | 12.00 (5.43, 18.57; n=3) | 150.00 (1 seed) |"
    assert "↑ higher is better, ↓ lower is better" in first and "in bold" in first
    assert "H100 = NVIDIA H100 80GB HBM3" in first and f"Xeon, 2 cores = {XEON[1]}" in first
    # the headline figure (quality against training cost) follows the matrix, in the overview
    assert first.index("| architecture") < first.index("](plots/pareto.png)")
    page = path.read_text()
    assert page.index('<table id="overview"') < page.index("<h2>Fair comparison</h2>")
    assert "<td><strong>30.00 (1 seed)</strong></td>" in page


def test_costs_leave_the_quality_tables_for_a_table_of_their_own(wide):
    _, out = wide
    md = (out / "report.md").read_text()
    sections = re.findall(r"^## (.+)$", md, re.M)
    assert sections.index("Results per task and architecture") < sections.index("Costs")
    task = md.split("### Task wikitext2")[1].split("\n## ")[0]
    header = next(line for line in task.splitlines() if line.startswith("| architecture"))
    assert "test perplexity" in header and not any(label in header for _, label, _ in tables.COSTS)
    rows = [line for line in task.splitlines() if line.startswith("| transformer-tiny |")]
    assert rows and all(f"| {XEON_SHORT} |" in r and XEON[1] not in r for r in rows)  # the short name
    costs = md.split("## Costs")[1].split("\n## ")[0]
    header = next(line for line in costs.splitlines() if line.startswith("| task"))
    assert header == ("| task | architecture | device | n | parameters | train FLOPs | train s | train tokens/s | MFU | "
                      "decode sentences/s | peak memory MiB | CPU utilisation |")
    assert f"| multi30k | transformer-tiny | {XEON_SHORT} | 3 | 2,000 | 1.20e+12 | 62.0 | 1,100 |" in costs
    assert "| multi30k | transformer-tiny | H100 | 1 | 2,000 | 1.00e+12 | 10.0 | 9,000 |" in costs
    assert "H100 = NVIDIA H100 80GB HBM3" in costs


def test_sections_without_content_are_left_out(wide, tmp_path):
    """No path-length records: no Table 1; no WMT14 run: Table 2 without the paper's reference rows; plots that have
    no data are named in one line, not one paragraph each. Language models alone: no Table 2, no empty table."""
    _, out = wide
    md = (out / "report.md").read_text()
    assert "## Table 1" not in md and "no path-length records" not in md
    t2 = md.split("## Table 2")[1].split("\n## ")[0]
    assert "multi30k" in t2 and "Reference values" not in t2 and "Transformer (base)" not in t2
    assert "Plot skipped" not in md
    (missing,) = [line for line in md.splitlines() if "Not drawn" in line]
    assert "Long-range accuracy by distance (probe tasks)" in missing and "Maximum path length" not in missing
    lm = reports.load([write_records(tmp_path, [r for r in fixture_records()
                                                if r["config"]["task"]["name"] == "wikitext2"])])
    assert sections.table2(lm.runs) is None and sections.table1(lm) is None and sections.plot_section([]) is None
    appendix = sections.appendix(lm.runs)  # no sacreBLEU signature to list: no empty table of them
    assert [b.caption for b in appendix.blocks] == ["Every run and its record", "Package versions"]


def test_device_names_are_short_and_distinct():
    assert tables.short_device("NVIDIA H100 80GB HBM3") == "H100"
    assert tables.short_device("NVIDIA GeForce RTX 4090") == "RTX\u00a04090"
    assert tables.short_device("Tesla V100-SXM2-16GB") == "V100"
    assert tables.short_device("AMD EPYC 7B13 64-Core Processor (16 cores)") == "EPYC\u00a07B13,\u00a016\u00a0cores"
    assert tables.short_device("x86_64") == "x86_64"
    two = tables.short_devices(["Intel(R) Xeon(R) CPU @ 2.20GHz (2 cores)", "Intel(R) Xeon(R) CPU @ 3.10GHz (2 cores)"])
    assert len(set(two.values())) == 2 and all(v.startswith("Xeon,\u00a02\u00a0cores") for v in two.values())


def test_plots_name_devices_as_the_tables_do(tmp_path):
    """Bars and curve styles on two devices carry the short names the tables use, not 40-character CPU names."""
    records = reports.load([write_records(tmp_path, wide_records())])
    fig, _ = plots.throughput(tables.ok(records.runs))
    ax = next(a for a in fig.axes if a.get_title() == "multi30k")
    assert sorted(t.get_text() for t in ax.get_xticklabels()) == [
        "gru-tiny\nXeon, 2 cores", "lstm-tiny\nXeon, 2 cores", "transformer-tiny\nH100",
        "transformer-tiny\nXeon, 2 cores"]
    fig, _ = plots.learning_curves(records.curves)
    ax = next(a for a in fig.axes if a.get_title() == "multi30k")
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "tiny on H100" in legend and "tiny on Xeon, 2 cores" in legend


def test_a_matrix_cell_is_the_mean_its_interval_and_seeds():
    row = {"x_mean": -0.001, "x_n": 2, "x_ci_low": -0.152, "x_ci_high": 0.004}
    assert tables.interval_cell(row, "x", "{:.2f}") == "0.00 (-0.15, 0.00; n=2)"  # no "-0.00"
    assert tables.interval_cell({"x_mean": 3.0, "x_n": 1}, "x", "{:.1f}") == "3.0 (1 seed)"
    assert tables.interval_cell({"x_mean": float("nan")}, "x", "{:.1f}") == "–"


def test_systems_of_one_architecture_are_told_apart_by_what_differs(tmp_path):
    """Two transformer systems on one task, apart in model.d_model: two matrix rows, each naming its setting."""
    recs = [record("transformer", "multi30k", 1, scores=(20.0, 50.0), settings={"d_model": 32}),
            record("transformer", "multi30k", 1, scores=(25.0, 55.0), settings={"d_model": 64}),
            record("lstm", "multi30k", 1, scores=(10.0, 40.0))]
    summ = tables.summary(reports.load([write_records(tmp_path, recs)]).runs)
    matrix, best = tables.overview(summ)
    assert matrix.values.tolist() == [["lstm-tiny", "10.00 (1 seed)"],
                                      ["transformer-tiny (model.d_model=32)", "20.00 (1 seed)"],
                                      ["transformer-tiny (model.d_model=64)", "25.00 (1 seed)"]]
    assert best == {(2, 1)}
    # systems the records cannot tell apart (no setting named) still keep a row each
    twins, _ = tables.overview(summ.assign(system_differs="{}"))
    assert twins["architecture"].tolist() == ["lstm-tiny", "transformer-tiny (#1)", "transformer-tiny (#2)"]


def test_learning_curves_draw_runs_evaluated_once_as_points_beside_other_models_lines(tmp_path):
    """In one panel: a transformer whose two seeds were evaluated once each (at 240 and 260 s) and an lstm with a
    curve of three points. The transformer's seeds are two points, no line joins them; the lstm is a line."""
    recs = [record("transformer", "multi30k", s, scores=(30.0, 60.0)) for s in (1, 2)]
    for rec, (t, b) in zip(recs, [(240.0, 15.0), (260.0, 17.0)]):
        rec["curves"]["valid"] = [{"step": 200, "train_seconds": t, "valid_bleu_greedy": b}]
    recs.append(record("lstm", "multi30k", 1, scores=(20.0, 50.0)))
    fig, _ = plots.learning_curves(reports.load([write_records(tmp_path, recs)]).curves)
    ax = fig.axes[0]
    lines = [tuple(ln.get_xdata()) for ln in ax.get_lines() if len(ln.get_xdata())]
    assert lines == [(20.0, 40.0, 60.0)]  # the lstm's curve only
    points = {tuple(xy) for c in ax.collections for xy in c.get_offsets().tolist()}
    assert {(240.0, 15.0), (260.0, 17.0)} <= points
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["lstm", "transformer"]


def probe(page, tmp_path) -> dict:
    """The page's measurements at 1280 x 1000 (a copy with the probe, without the CSP that forbids it)."""
    source = page.read_text()
    probed = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", source)
    probed = probed.replace("</body>", PROBE + "</body>", 1)
    copy = page.with_name("probe.html")
    copy.write_text(probed, encoding="utf-8")
    run = subprocess.run(["nice", "-n", "19", CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                          "--dump-dom", copy.as_uri()], capture_output=True, text=True, timeout=180)
    found = re.search(r'<pre id="probe">(.*?)</pre>', run.stdout, re.S)
    assert found, run.stderr[-2000:]
    return json.loads(html.unescape(found.group(1)))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium; .ci/run does)")
def test_first_screen_at_1280_px_shows_the_matrix_and_no_table_overflows(wide, tmp_path):
    path, _ = wide
    page = tmp_path / "report.html"
    shutil.copy(path, page)
    shot = tmp_path / "first_screen.png"
    run = subprocess.run(["nice", "-n", "19", CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                          f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=180)
    assert shot.exists() and shot.stat().st_size > 10_000, run.stderr[-2000:]
    found = probe(page, tmp_path)
    assert found["width"] == WIDTH, found["width"]
    assert found["page"] <= WIDTH  # nothing makes the page scroll sideways
    assert found["overview_top"] is not None and found["overview_bottom"] < HEIGHT  # the whole matrix on screen 1
    assert found["bold"] == ["30.00 (1 seed)", "105.00 (41.47, 168.53; n=2)"]
    main = [t for t in found["tables"] if t["id"] in ("overview", "costs") or "test BLEU" in t["heads"]
            or "test perplexity" in t["heads"]]
    assert len(main) == 2 + 2 + 1  # the matrix, the costs, a quality table per task, Table 2
    for t in main:
        assert t["scroll"] <= t["client"] <= t["container"], t  # no horizontal scrolling inside a table either
        assert all(n == 1 for n in t["device_lines"]), t  # a device name stays on one line
