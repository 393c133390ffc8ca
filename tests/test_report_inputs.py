"""The report against hostile or broken inputs, built as a user builds it (``python -m seqbench.reports``): strings that
are Markdown or spreadsheet syntax, records of the wrong shape, copies of a job's folder, a FIFO, a huge name."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from seqbench.reports.load import shorten
from tests.conftest import ROOT
from tests.test_reports import record, write_records


def build(*dirs: Path, out: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m seqbench.reports <dirs> --out <out>``; a hang fails the test instead of the suite."""
    return subprocess.run([sys.executable, "-m", "seqbench.reports", *map(str, dirs), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def section(md: str, title: str) -> str:
    return md.split(f"## {title}")[1].split("\n## ")[0]


# -- Markdown and spreadsheet syntax in record strings ----------------------------------------------------------

LINK = "[click me](http://evil.example/phish)"
IMAGE = "![tracker](http://evil.example/pixel.png)"
FORMULAS = {"preset": '=HYPERLINK("http://evil.example","x")', "task": "@SUM(A1:A9)", "error": "-2+3; cmd",
            "sweep": "+1 ok"}


def hostile_records() -> list[dict]:
    linked = record("transformer", "multi30k", 1, scores=(20.0, 50.0))
    linked["model"]["preset"] = linked["config"]["model"]["preset"] = LINK
    imaged = record("lstm", IMAGE, 1, scores=(10.0, 40.0))
    failed = record("gru", "multi30k", 1, status="failed", error=f"ValueError: see {LINK} and {IMAGE}")
    formula = record("bytenet", FORMULAS["task"], -1, scores=(5.0, 30.0))
    formula["model"]["preset"] = formula["config"]["model"]["preset"] = FORMULAS["preset"]
    formula["job"]["sweep"], formula["error"] = FORMULAS["sweep"], FORMULAS["error"]
    return [linked, imaged, failed, formula]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = write_records(tmp_path_factory.mktemp("hostile"), hostile_records())
    out = tmp_path_factory.mktemp("hostile_report")
    proc = build(root, out=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_link_and_image_syntax_from_records_is_escaped_in_markdown(hostile):
    md = (hostile / "report.md").read_text(encoding="utf-8")
    # the only links and images are the report's own plots
    links = re.findall(r"(?<!\\)\]\(([^)]*)\)", md)
    assert links and all(target.startswith("plots/") for target in links), links
    images = re.findall(r"(?<!\\)!\[", md)
    assert images and len(images) == len(re.findall(r"(?<!\\)!\[[^\]]*\]\(plots/[a-z_]+\.png\)", md))
    assert r"\[click me\](http://evil.example/phish)" in md  # shown as text, in the tables and failure list
    assert r"\!\[tracker\](http://evil.example/pixel.png)" in md
    failures = section(md, "Failed and unfinished jobs")
    assert r"ValueError: see \[click me\](http://evil.example/phish) and \!\[tracker\]" in failures


def test_csv_cells_that_would_run_as_formulas_are_quoted_and_parquet_is_exact(hostile):
    with open(hostile / "runs.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for column, cell in row.items():
            if cell[:1] in ("=", "+", "-", "@"):
                float(cell)  # only numbers may start so (seed -1); text would run in a spreadsheet
    bytenet = next(r for r in rows if r["model"] == "bytenet")
    assert {k: bytenet[k] for k in FORMULAS} == {k: "'" + v for k, v in FORMULAS.items()}
    assert bytenet["seed"] == "-1"
    with open(hostile / "summary.csv", newline="", encoding="utf-8") as f:
        summary = next(r for r in csv.DictReader(f) if r["model"] == "bytenet")
    assert summary["task"] == "'" + FORMULAS["task"] and summary["preset"] == "'" + FORMULAS["preset"]
    exact = pd.read_parquet(hostile / "runs.parquet").set_index("model").loc["bytenet"]
    assert {k: exact[k] for k in FORMULAS} == FORMULAS and exact["seed"] == -1


# -- records of the wrong shape, copies, FIFOs ------------------------------------------------------------------

def misshapen() -> dict[str, tuple[dict, str]]:
    """Valid JSON records of the wrong shape, and what the report must say about each."""
    def ok(seed=1):
        return record("transformer", "multi30k", seed, scores=(20.0, 50.0))
    cases = {"config_number": ({**ok(), "config": 5}, "config is a number, not an object"),
             "test_string": ({**ok(), "metrics": {"test": "x"}}, "metrics.test is a string, not an object"),
             "status_list": ({**ok(), "status": ["ok"]}, "status is an array, not a string"),
             "seed_string": ({**ok(), "seed": "one"}, "seed is a string, not a number")}
    return cases


def test_records_of_the_wrong_shape_are_listed_as_unreadable_with_path_and_why(tmp_path):
    root = tmp_path / "records"
    write_records(root, [record("lstm", "multi30k", 1, scores=(10.0, 40.0))])
    for name, (rec, _) in misshapen().items():
        (root / name).mkdir()
        (root / name / "record.json").write_text(json.dumps(rec))
    proc = build(root, out=tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    failures = section((tmp_path / "out" / "report.md").read_text(), "Failed and unfinished jobs")
    assert "4 jobs did not finish with status ok" in failures
    for name, (_, why) in misshapen().items():
        path = root / name / "record.json"
        assert f"| {name} | unreadable | ValueError: wrong shape: {why} | {path} |" in failures, name
        assert str(path) in proc.stderr and why in proc.stderr  # the warning names the file
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert summary["arch"].tolist() == ["lstm-tiny"] and summary["n"].tolist() == [1]


def started(rec: dict, when: str, finished: str | None = None, folder: str = "results/sweep/0") -> dict:
    rec["job"].update(started=when, finished=finished, output_dir=folder)
    return rec


def test_a_copied_job_folder_counts_once(tmp_path):
    runs = tmp_path / "runs"
    first = started(record("transformer", "multi30k", 1, scores=(20.0, 50.0)), "2026-01-01T10:00:00+00:00",
                    "2026-01-01T11:00:00+00:00")
    rerun = started(record("transformer", "multi30k", 2, scores=(24.0, 54.0)), "2026-01-02T10:00:00+00:00",
                    "2026-01-02T11:00:00+00:00")  # run again later with another seed: a run of its own
    twin = started(record("transformer", "multi30k", 3, scores=(28.0, 58.0)), "2026-01-01T10:00:00+00:00",
                   "2026-01-01T11:00:00+00:00", "results/sweep/1")  # started alongside it (another seed)
    write_records(runs / "sweep", [first, rerun, twin])
    copy = runs / "backup" / "0_transformer"
    copy.mkdir(parents=True)
    (copy / "record.json").write_bytes((runs / "sweep" / "0_transformer" / "record.json").read_bytes())
    proc = build(runs, out=tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = pd.read_csv(tmp_path / "out" / "summary.csv").iloc[0]
    assert row["n"] == 3 and row["test_bleu_mean"] == pytest.approx(24.0)  # not (20 + 20 + 24 + 28) / 4
    assert len(pd.read_csv(tmp_path / "out" / "runs.csv")) == 3
    (note,) = [line for line in (tmp_path / "out" / "report.md").read_text().splitlines() if "counted once" in line]
    assert str(copy / "record.json") in note and str(runs / "sweep" / "0_transformer" / "record.json") in note
    assert "counted once" in proc.stderr and str(copy / "record.json") in proc.stderr


def test_the_finished_copy_of_a_job_is_the_one_counted(tmp_path):
    done = started(record("transformer", "multi30k", 1, scores=(20.0, 50.0)), "2026-01-01T10:00:00+00:00",
                   "2026-01-01T11:00:00+00:00")
    running = started(record("transformer", "multi30k", 1, status="running"), "2026-01-01T10:00:00+00:00")
    write_records(tmp_path / "a", [running])  # sorts first, copied while the job ran
    write_records(tmp_path / "b", [done])
    proc = build(tmp_path / "a", tmp_path / "b", out=tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = pd.read_csv(tmp_path / "out" / "runs.csv")
    assert runs["status"].tolist() == ["ok"]
    assert runs["record"].tolist() == [str((tmp_path / "b" / "0_transformer" / "record.json").resolve())]


def test_a_fifo_named_record_json_is_skipped_not_waited_on(tmp_path):
    root = write_records(tmp_path / "records", [record("lstm", "multi30k", 1, scores=(10.0, 40.0))])
    (root / "pipe").mkdir()
    os.mkfifo(root / "pipe" / "record.json")
    (root / "folder" / "record.json").mkdir(parents=True)
    proc = build(root, out=tmp_path / "out", timeout=60)  # reading the FIFO would block for ever
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "out" / "report.md").read_text()
    for skipped in (root / "pipe" / "record.json", root / "folder" / "record.json"):
        assert f"{skipped}: skipped, not a regular file" in md and str(skipped) in proc.stderr
    assert len(pd.read_csv(tmp_path / "out" / "runs.csv")) == 1


# -- huge strings -----------------------------------------------------------------------------------------------

def test_a_200kb_preset_name_builds_in_seconds_and_stays_small(tmp_path):
    huge = ["p" * 200_000 + end for end in "ab"]  # two presets alike but for their last character
    recs = [record("transformer", "multi30k", s, scores=(20.0 + s, 50.0)) for s in (1, 2)]
    for rec, preset in zip(recs, huge):
        rec["model"]["preset"] = rec["config"]["model"]["preset"] = preset
    root = write_records(tmp_path / "records", [*recs, record("lstm", "multi30k", 1, scores=(10.0, 40.0))])
    start = time.monotonic()
    proc = build(root, out=tmp_path / "out", timeout=300)
    took = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert took < 60, f"report took {took:.0f} s"
    out = tmp_path / "out"
    assert (out / "report.md").stat().st_size < 50_000 and (out / "report.html").stat().st_size < 2_000_000
    for svg in (out / "plots").glob("*.svg"):
        assert svg.stat().st_size < 1_000_000, svg
    shown = {shorten(f"transformer-{p}") for p in huge}
    assert len(shown) == 2 and all(len(s) == 60 and s.startswith("transformer-ppp") for s in shown)
    table = section((out / "report.md").read_text(), "Results per task and architecture")
    assert all(table.count(f"| {s} |") == 1 for s in shown)  # still two rows, told apart
    assert sorted(pd.read_parquet(out / "runs.parquet")["preset"]) == sorted(["tiny", *huge])  # kept whole
    assert set(huge) <= set(pd.read_csv(out / "runs.csv")["preset"])
