"""The budget ladder in the report (reports/ladder.py): the headline figure of quality against compute, the rung
tables ranked by each metric's direction with the two-level verdicts, crossings, and the conclusions per rung.

Records are synthetic, shaped as harness/job.py writes a ladder's rungs (tests/test_ladder.py runs a real one)."""
from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
import yaml

from seqbench import reports
from seqbench.harness import schema
from seqbench.harness.metrics import METRICS
from seqbench.reports import hierarchical, ladder
from seqbench.reports.load import flatten
from tests.test_reports import record

LADDER = [1e12, 3e12, 1e13]
TOKENS = 1000  # tokens per 1e9 FLOPs of a rung, for every architecture: the costs follow the rung


def rung_record(model: str, task: str, seed: int, rung: int, score: float, *, ladder_flops=LADDER, tuned=None,
                seconds_per_pflop: float = 10.0) -> dict:
    """Rung ``rung`` of the ladder job of ``model`` and ``seed``, scoring ``score`` (BLEU, or perplexity on an LM
    task), as harness/job.py writes it: ``config.trainer.max_flops`` the rung's FLOPs, ``ladder_rung`` naming it."""
    flops = ladder_flops[rung]
    budget = {"max_seconds": None, "max_tokens": None, "max_flops": flops, "ladder": list(ladder_flops),
              "schedule": "wsd"}
    scores = (score,) if task == "wikitext2" else (score, score + 30)
    rec = record(model, task, seed, scores=scores, budget=budget,
                 costs=(seconds_per_pflop * flops / 1e15, flops * 1.05, 1000.0))
    rec["costs"]["tokens"] = TOKENS * flops / 1e9
    job = f"{model}-tiny_{task}_s{seed}"
    top = rung == len(ladder_flops) - 1
    rec["job"]["name"] = job if top else f"{job}@{rung}"
    rec["ladder_rung"] = {"rung": rung, "of": len(ladder_flops), "flops": flops, "run": job, "cooldown_from_step": 5}
    if tuned:
        rec["config"]["tuned"] = tuned
    return rec


def write(root, rec: dict, nll_per_token: float | None = None) -> None:
    """``rec`` as ``<job>/record.json`` (or ``<job>/rung_<k>/``), with an LM's test NLL per chunk beside it."""
    run = rec["ladder_rung"]["run"] if "ladder_rung" in rec else rec["job"]["name"]
    folder = root / run
    if "ladder_rung" in rec and rec["ladder_rung"]["rung"] < rec["ladder_rung"]["of"] - 1:
        folder = folder / f"rung_{rec['ladder_rung']['rung']}"
    folder.mkdir(parents=True, exist_ok=True)  # the top rung's folder holds the lower rungs' folders
    schema.write(folder / "record.json", rec)
    if nll_per_token is not None:
        tokens = [64] * 20
        (folder / "test.nll.json").write_text(json.dumps({"nll": [nll_per_token * n for n in tokens],
                                                          "tokens": tokens}))


# multi30k (BLEU, higher is better): gru leads at the first rung, the transformer overtakes it at the second
BLEU = {("transformer", 0): (10.0, 12.0), ("transformer", 1): (20.0, 22.0), ("transformer", 2): (30.0, 32.0),
        ("gru", 0): (14.0, 15.0), ("gru", 1): (16.0, 17.0), ("gru", 2): (18.0, 19.0)}
# wikitext2 (perplexity, lower is better; NLL per token = its log): the transformer leads at both rungs, by 0.1 nat
# per token at the first, which its seeds' spread leaves open, and by 1 nat at the second
NLL = {("transformer", 0): (4.0, 4.2), ("lstm", 0): (4.3, 4.1), ("transformer", 1): (3.0, 3.2), ("lstm", 1): (4.0, 4.2)}
LM_LADDER = [2e12, 6e12]


def ladder_records(root, tuned=None) -> None:
    for (model, rung), scores in BLEU.items():
        for seed, bleu in zip((1, 2), scores):
            write(root, rung_record(model, "multi30k", seed, rung, bleu, tuned=tuned,
                                    seconds_per_pflop=20.0 if model == "gru" else 10.0))
    for (model, rung), nlls in NLL.items():
        for seed, nll in zip((1, 2), nlls):
            write(root, rung_record(model, "wikitext2", seed, rung, math.exp(nll), ladder_flops=LM_LADDER), nll)
    for model, scores in (("transformer", (5.0, 9.0)), ("lstm", (7.0, 8.0))):  # one seed each: no conclusion
        for rung, bleu in enumerate(scores):
            write(root, rung_record(model, "iwslt", 1, rung, bleu, ladder_flops=LM_LADDER))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("ladder_records")
    tuned = root / "tuned.yaml"
    tuned.write_text(yaml.safe_dump({"multi30k": {"transformer-tiny": {"budget": {"max_flops": 1e12}}}}))
    ladder_records(root, tuned=str(tuned))
    out = tmp_path_factory.mktemp("ladder_report")
    report = reports.build_report([root], out)
    md = (out / "report.md").read_text()
    return SimpleNamespace(root=root, out=out, report=report, md=md, runs=report.records.runs)


def section(md: str, title: str) -> str:
    return md.split(f"\n{title}\n")[1].split("\n## ")[0].split("\n### ")[0]


def test_each_rung_is_a_row_with_its_rung_and_flops(built):
    runs = built.runs
    wmt = runs[(runs["task"] == "multi30k") & (runs["arch"] == "gru-tiny")].sort_values(["ladder_rung", "seed"])
    assert wmt["ladder_rung"].tolist() == [0, 0, 1, 1, 2, 2]
    assert wmt["ladder_flops"].tolist() == [1e12, 1e12, 3e12, 3e12, 1e13, 1e13]
    assert wmt["system"].nunique() == 3  # a system per rung
    plain = flatten(record("gru", "multi30k", 1, scores=(10.0, 40.0)), built.root / "record.json")
    assert plain["ladder_rung"] is None and plain["ladder_flops"] is None


def test_the_figure_draws_one_line_per_architecture_through_the_rung_flops(built):
    pts = ladder.points(built.runs)
    fig = ladder.figure(pts)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[::2] == ["iwslt: against training FLOPs", "multi30k: against training FLOPs",
                           "wikitext2: against training FLOPs"]
    by_flops, by_time = fig.axes[2], fig.axes[3]  # multi30k's row: tasks in name order
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in by_flops.get_lines()}
    assert lines == {"gru-tiny": (LADDER, [14.5, 16.5, 18.5]), "transformer-tiny": (LADDER, [11.0, 21.0, 31.0])}
    assert by_flops.get_xscale() == "log" and by_time.get_xscale() == "log"
    seconds = {line.get_label(): list(line.get_xdata()) for line in by_time.get_lines()}
    assert seconds == {"gru-tiny": pytest.approx([0.02, 0.06, 0.2]),  # 20 s per 1e15 FLOPs, the transformer 10
                       "transformer-tiny": pytest.approx([0.01, 0.03, 0.1])}
    assert len(by_flops.collections) == 2  # a band per line
    assert fig.axes[4].get_yscale() == "log"  # perplexity
    assert (built.out / "plots" / "ladder.png").is_file() and (built.out / "plots" / "ladder.svg").is_file()
    assert "](plots/ladder.png)" in built.md


def test_the_rank_table_orders_by_the_metrics_direction(built):
    pts = ladder.points(built.runs)
    runs, archs = built.runs, hierarchical.architectures(built.runs)
    bleu = ladder.rank_table(pts, "multi30k", ladder.Verdicts(runs, archs, "multi30k", METRICS["bleu"]))
    assert bleu["rung FLOPs"].tolist() == ["1e12", "1e12", "3e12", "3e12", "1e13", "1e13"]
    assert bleu["architecture"].tolist() == ["gru-tiny", "transformer-tiny", "transformer-tiny", "gru-tiny",
                                             "transformer-tiny", "gru-tiny"]  # higher BLEU first
    assert bleu["rank"].tolist() == [1, 2] * 3
    first = bleu.iloc[0]
    assert first["test BLEU ↑"] == "14.50 (8.15, 20.85; n=2)"  # 14.5 +- 12.706 x 0.7071 / sqrt(2)
    assert first["seeds"] == "1, 2" and first["tokens seen"] == "1,000,000" and first["train s"] == "0.0"
    assert first["train FLOPs (counted)"] == "1.05e+12"
    assert first["vs next (two-level test)"] == "– (not tested: the task's architectures table says why)"
    assert bleu.iloc[1]["vs next (two-level test)"] == ""  # the last of its rung has none below it
    lm = ladder.rank_table(pts, "wikitext2", ladder.Verdicts(runs, archs, "wikitext2", METRICS["ppl"]))
    ppl = lm["test perplexity ↓"].map(lambda cell: float(cell.split(" ")[0]))
    assert lm["architecture"].tolist() == ["transformer-tiny", "lstm-tiny"] * 2
    assert ppl.iloc[0] < ppl.iloc[1] and ppl.iloc[2] < ppl.iloc[3]  # lower perplexity first


def test_the_two_level_verdicts_say_which_conclusions_hold_at_which_rung(built):
    """wikitext2: at 2e12 the transformer leads by 0.1 nat, but a draw of its worse seed against the lstm's better
    one reverses that in a sixteenth of the resamples: no conclusion. At 6e12 it is 1 nat per token better in every
    resample, p = 2 / 3,001, Holm over the task's 6 pairs of systems: a conclusion at that rung only."""
    table = section(built.md, "### Ladder, task wikitext2")
    assert re.search(r"\| 2e12 \| 1 \| transformer-tiny \| [^|]+ \| 1, 2 \| [^|]+ \| [^|]+ \| [^|]+ \| "
                     r"no \(Holm-adjusted p ≥ 0\.05\) \(Δ -0\.1000 NLL, Holm p [01]\.\d{3}\) \|", table)
    assert re.search(r"\| 6e12 \| 1 \| transformer-tiny \| [^|]+ \| 1, 2 \| [^|]+ \| [^|]+ \| [^|]+ \| "
                     r"yes: transformer-tiny better \(Δ -1\.0000 NLL, Holm p 0\.00\d\) \|", table)
    assert ("Conclusions (two-level test, Holm-adjusted p &lt; 0.05, two seeds or more a side): transformer-tiny "
            "better than lstm-tiny at 6e12 FLOPs. Without a conclusion: 2e12: no difference is a conclusion.") in table
    assert "Crossings of the means: none; every pair of architectures keeps its order" in table


def test_crossings_are_found_where_the_means_change_order_and_nowhere_else(built):
    pts = ladder.points(built.runs)
    assert ladder.crossings(pts, "multi30k") == ["transformer-tiny overtakes gru-tiny between 1e12 and 3e12 FLOPs"]
    assert ladder.crossings(pts, "wikitext2") == []
    multi30k = section(built.md, "### Ladder, task multi30k")
    assert "Crossings of the means: transformer-tiny overtakes gru-tiny between 1e12 and 3e12 FLOPs." in multi30k
    assert "Without a conclusion: 1e12: not tested (the task's architectures table says why);" in multi30k
    # a tie at 3e12 is passed over: the order changes between the rungs on either side of it
    tied = pts.copy()
    at = (tied["task"] == "multi30k") & (tied["rung_flops"] == 3e12)
    tied.loc[at, "mean"] = 16.5
    assert ladder.crossings(tied, "multi30k") == ["transformer-tiny overtakes gru-tiny between 1e12 and 1e13 FLOPs"]


def test_a_one_seed_ladder_says_no_conclusion(built):
    table = section(built.md, "### Ladder, task iwslt")
    assert "| 2e12 | 1 | lstm-tiny | 7.00 (1 seed) | 1 |" in table
    assert "| one seed: no conclusion |" in table
    assert "transformer-tiny overtakes lstm-tiny between 2e12 and 6e12 FLOPs" in table
    assert ("Conclusions (two-level test, Holm-adjusted p &lt; 0.05, two seeds or more a side): none. Without a "
            "conclusion: 2e12: one seed: no conclusion; 6e12: one seed: no conclusion.") in table


def test_the_ladder_leads_the_results_and_says_which_tuning_applied(built):
    titles = re.findall(r"^## (.+)$", built.md, re.M)
    assert titles[:3] == ["Overview", ladder.TITLE, "Fair comparison"]
    intro = section(built.md, f"## {ladder.TITLE}")
    assert "tuned=" in intro and "one setting serves every rung (a ladder's rungs are one training run)" in intro
    assert "tuned at max_flops=1e+12; one setting serves every rung of a ladder" in intro
    assert ladder.rung_tables(built.report.sections).keys() == {"ladder/iwslt", "ladder/multi30k", "ladder/wikitext2"}


def test_the_rungs_of_a_ladder_are_no_different_budgets_but_a_run_beside_them_is(built, tmp_path):
    assert "runs on different training budgets" not in built.md  # each rung is its own row, compared within it
    ladder_records(tmp_path / "records")
    plain = record("transformer", "multi30k", 1, scores=(20.0, 50.0), budget={"max_seconds": None, "max_steps": 100})
    (tmp_path / "records" / "plain").mkdir()
    schema.write(tmp_path / "records" / "plain" / "record.json", plain)
    reports.build([tmp_path / "records"], tmp_path / "report")
    warned = re.findall(r"WARNING: task (\w+): runs on different training budgets",
                        (tmp_path / "report" / "report.md").read_text())
    assert set(warned) == {"multi30k"}


def test_without_ladder_rungs_there_is_no_ladder_section(tmp_path):
    for seed, bleu in ((1, 20.0), (2, 22.0)):
        folder = tmp_path / "records" / f"s{seed}"
        folder.mkdir(parents=True)
        schema.write(folder / "record.json", record("transformer", "multi30k", seed, scores=(bleu, 50.0)))
    reports.build([tmp_path / "records"], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Overview" in md and "Budget ladder" not in md and "Ladder, task" not in md
    assert not (tmp_path / "report" / "plots" / "ladder.png").exists()


def test_the_wandb_report_run_logs_the_ladder_figure_and_rung_tables(built):
    from seqbench.reports import wandb_run

    row = wandb_run.contents(built.report)
    assert "plots/ladder" in row
    logged = row["ladder/multi30k"]
    shown = ladder.rung_tables(built.report.sections)["ladder/multi30k"]
    assert logged.columns == list(shown.columns)
    assert [r[2] for r in logged.data] == ["gru-tiny", "transformer-tiny", "transformer-tiny", "gru-tiny",
                                           "transformer-tiny", "gru-tiny"]


def test_a_budget_in_flops_reads_as_a_power_of_ten_and_a_token_budget_as_it_is(built):
    from seqbench.reports import tables
    differ = tables.differing_settings(built.runs)
    flops = " ".join(differ[differ["setting"] == "trainer.max_flops"]["values (runs)"])
    assert "1e+12 (" in flops and "1e+13 (" in flops and "1000000000000" not in flops
    row = {"max_flops": 1.5e14, "max_tokens": 4096.0, "max_seconds": 2700}
    text = tables.budget(row)
    assert "max_flops=1.5e+14" in text and "150000000000000" not in text
    assert "max_tokens=4096" in text and "max_seconds=2700" in text
    assert tables.budget({"max_flops": 150000000000000}) == tables.budget({"max_flops": 1.5e14})
