"""The comparison on the wandb dashboard: the report run of a sweep, read back from its offline run files.

Its tables (one per task, rows = architectures), images (the report's plots) and artifact (report.html and
the tidy tables), its id (the same on every rebuild of one group's report), the failed jobs of a real sweep,
and no planted secret in any file it leaves.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from seqbench import reports
from seqbench.reports import wandb_run
from seqbench.reports.__main__ import main as reports_main
from seqbench.reports.callback import BuildReport
from tests.conftest import ROOT
from tests.test_reports import record, write_records
from tests.test_security import CLI_KEY, ENV_KEY, SECRET_ARGS, holding_secrets, secret_env
from tests.test_tracking import wandb_flushed, wandb_records

DRAWN = {"learning_curves", "pareto", "quality_vs_parameters", "throughput"}  # the plots the fixture has data for


def read_run(run_file: Path) -> dict:
    """An offline run: its run record, its logged values (media as their JSON references), the tables (loaded
    from the run's files), its artifacts and its exit code."""
    out = {"values": {}, "artifacts": [], "exit": None, "kinds": []}
    for r in wandb_records(run_file):
        kind = r.WhichOneof("record_type")
        out["kinds"].append(kind)
        if kind == "run":
            out["run"] = r.run
        elif kind == "history":
            for item in r.history.item:  # media as nested keys: (key, path), (key, _type), ...
                *parents, last = [item.key] if item.key else list(item.nested_key)
                node = out["values"]
                for key in parents:
                    node = node.setdefault(key, {})
                node[last] = json.loads(item.value_json)
        elif kind == "artifact":
            out["artifacts"].append(r.artifact)
        elif kind == "exit":
            out["exit"] = r.exit.exit_code
    assert "run" in out, f"{run_file} ({run_file.stat().st_size} bytes) holds no run record: {out['kinds']}"
    files = run_file.parent / "files"
    out["tables"] = {k: json.loads((files / v["path"]).read_text()) for k, v in out["values"].items()
                     if isinstance(v, dict) and v.get("_type") == "table-file"}
    out["images"] = {k: files / v["path"] for k, v in out["values"].items()
                     if isinstance(v, dict) and v.get("_type") == "image-file"}
    return out


def publish(report, **kwargs):
    run = wandb_run.publish(report, **kwargs)
    wandb_flushed()
    return run


def rows(table: dict) -> list[dict]:
    return [dict(zip(table["columns"], r)) for r in table["data"]]


def md5(path: Path) -> str:
    """wandb's manifest digest of a file: its MD5, base64."""
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def fixture_sweep() -> list[dict]:
    """Transformer (2 seeds) and LSTM (1 seed) on multi30k, and a failed GRU job: sweep ``fixture``."""
    return [record("transformer", "multi30k", 1, scores=(20.0, 50.0), costs=(60.0, 1.0e12, 1000.0)),
            record("transformer", "multi30k", 2, scores=(24.0, 56.0), costs=(64.0, 1.4e12, 1200.0)),
            record("lstm", "multi30k", 1, scores=(10.0, 40.0), costs=(30.0, 2.0e11, 3000.0)),
            record("gru", "multi30k", 1, status="failed", error="ValueError: d_model=30 is not divisible by 4")]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Offline wandb with planted secrets: an API key and a service key in the environment, and a key on the
    command line (moved into the environment as run.py moves it)."""
    for k, v in secret_env(tmp_path, "offline").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("SEQBENCH_SECRET_LOGGER_API_KEY", CLI_KEY)
    monkeypatch.setattr(sys, "argv", ["python -m seqbench.reports", f"+logger.api_key={CLI_KEY}"])
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_report_run_holds_the_tables_plots_failures_and_files(offline, capsys):
    records, out = write_records(offline / "records", fixture_sweep()), offline / "report"
    assert reports_main([str(records), "--out", str(out), "--wandb"]) == 0
    wandb_flushed()
    (run_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    got = read_run(run_file)
    run = got["run"]
    assert run.job_type == "report" and run.run_group == "fixture" and got["exit"] == 0
    assert run.run_id == run_file.stem.removeprefix("run-") == wandb_run.run_id("fixture")
    printed = capsys.readouterr()
    assert f"wandb report run {run.run_id}: offline in {run_file.parent}" in printed.out

    # one table per task, one row per architecture, best BLEU first; columns read from the summary
    summary = rows(got["tables"]["summary/multi30k"])
    assert [r["architecture"] for r in summary] == ["transformer-tiny", "lstm-tiny"]
    t, lstm = summary
    assert t["n"] == 2 and t["seeds"] == "1, 2" and lstm["n"] == 1
    assert t["test_bleu_mean"] == pytest.approx(22.0) and t["test_bleu_std"] == pytest.approx(math.sqrt(8))
    assert t["test_chrf_mean"] == pytest.approx(53.0) and t["test_chrf_std"] == pytest.approx(math.sqrt(18))
    assert lstm["test_bleu_mean"] == pytest.approx(10.0) and lstm["test_bleu_std"] is None  # one seed: no spread
    assert t["train_seconds"] == pytest.approx(62.0) and t["train_flops"] == pytest.approx(1.2e12)
    assert lstm["train_tokens_per_second"] == pytest.approx(3000.0) and t["parameters"] == 2000
    assert got["tables"]["summary/multi30k"]["columns"][0] == "architecture"
    assert not any(c.startswith(("test_ppl", "test_accuracy")) for c in got["tables"]["summary/multi30k"]["columns"])
    assert set(got["tables"]) == {"summary/multi30k", "failed_jobs", "warnings", "differing_settings"}

    assert rows(got["tables"]["failed_jobs"]) == [
        {"job": "gru-tiny_multi30k_s1", "status": "failed", "error": "ValueError: d_model=30 is not divisible by 4",
         "record": str((records / "3_gru" / "record.json").resolve())}]

    # every drawn plot, byte for byte the report's PNG
    assert set(got["images"]) == {f"plots/{name}" for name in DRAWN}
    for name in DRAWN:
        assert got["images"][f"plots/{name}"].read_bytes() == (out / "plots" / f"{name}.png").read_bytes()

    # the report's files as the artifact report-<group>
    (artifact,) = [a for a in got["artifacts"] if a.type == "report"]
    contents = {c.path: c.digest for c in artifact.manifest.contents}
    expected = {"report.html", "report.md", "runs.csv", "curves.csv", "summary.csv", "significance.csv",
                "runs.parquet",
                *(f"plots/{n}.{ext}" for n in DRAWN for ext in ("png", "svg"))}
    assert artifact.name == "report-fixture" and set(contents) == expected
    assert all(contents[p] == md5(out / p) for p in expected)

    assert holding_secrets(offline, text=printed.out + printed.err) == {}
    assert b"+logger.api_key=<redacted>" in run_file.read_bytes()  # wandb's copy of the command line


def test_a_rebuilt_report_updates_its_run_and_its_files_are_scrubbed(offline, monkeypatch):
    report = reports.build_report([write_records(offline / "records", fixture_sweep())], offline / "report")
    first = publish(report)
    with (report.out / "report.md").open("a") as f:  # a secret that reached the report's text
        f.write(f"\nkey {ENV_KEY}\n")
    again = publish(report)
    other = publish(report, group="another-sweep")
    assert first.id == again.id != other.id
    files = sorted(report.out.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 3 and len({f.parent for f in files}) == 3  # one offline folder per build
    ids = [read_run(f)["run"].run_id for f in files]
    assert sorted(ids) == sorted([first.id, first.id, other.id])  # two parts of one run (wandb sync merges them)
    assert all(read_run(f)["run"].resume for f in files)
    assert (report.out / "report.md").read_text().endswith("\nkey <redacted>\n")
    assert holding_secrets(offline) == {}

    monkeypatch.setenv("WANDB_MODE", "disabled")  # tracking off: the report run writes nothing
    before = {p: p.stat().st_mtime_ns for p in offline.rglob("*") if p.is_file()}
    assert wandb_run.where(publish(report)) == "not logged (WANDB_MODE=disabled)"
    assert {p: p.stat().st_mtime_ns for p in offline.rglob("*") if p.is_file()} == before


def test_the_sweep_callback_logs_the_report_run_with_the_sweeps_logger(offline, capsys):
    sweep = write_records(offline / "sweep", fixture_sweep())
    logger = {"kind": "wandb", "project": "bench-x", "entity": None, "mode": None, "tags": ["paper"],
              "init_timeout": 15}
    BuildReport().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}, "logger": logger,
                                                    "sweep_name": "fixture"}))
    wandb_flushed()
    (run_file,) = (sweep / "report").glob("wandb/offline-run-*/run-*.wandb")
    got = read_run(run_file)
    run = got["run"]
    assert (run.project, run.run_group, run.job_type, list(run.tags)) == ("bench-x", "fixture", "report",
                                                                        ["paper", "report"])
    assert [r["job"] for r in rows(got["tables"]["failed_jobs"])] == ["gru-tiny_multi30k_s1"]
    assert f"wandb report run {run.run_id}: offline in" in capsys.readouterr().out


def test_a_failed_wandb_run_keeps_the_report_and_says_how_to_retry(offline, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_MODE", "no-such-mode")
    records, out = write_records(offline / "records", fixture_sweep()), offline / "report"
    assert reports_main([str(records), "--out", str(out), "--wandb", "--wandb-group", "g1"]) == 1
    assert (out / "report.html").is_file() and (out / "summary.csv").is_file()
    assert f"log it again with: python -m seqbench.reports {records} --out {out} --wandb --wandb-group g1 " \
           "--wandb-project seqbench" in caplog.text


def test_no_records_still_give_a_report_run_with_the_report(offline):
    (offline / "empty").mkdir()
    out = offline / "report"
    assert reports_main([str(offline / "empty"), "--out", str(out), "--wandb"]) == 1  # no record: an error, logged
    wandb_flushed()
    (run_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    got = read_run(run_file)
    assert got["run"].run_group == "seqbench" and got["tables"] == {} and got["images"] == {} and got["exit"] == 0
    (artifact,) = [a for a in got["artifacts"] if a.type == "report"]
    assert {c.path for c in artifact.manifest.contents} == {"report.html", "report.md"}


def test_table_cells_are_plain_values_with_secrets_redacted(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", ENV_KEY)
    table = wandb_run.table(pd.DataFrame({"job": ["a", "b"], "error": [f"auth {ENV_KEY} refused", None],
                                          "n": [2, 3], "bleu": [1.5, float("nan")]}))
    assert table.columns == ["job", "error", "n", "bleu"]
    assert table.data == [["a", "auth <redacted> refused", 2, 1.5], ["b", None, 3, None]]


def test_the_report_imports_neither_torch_nor_wandb():
    code = ("import sys, reports, reports.wandb_run, reports.callback; "
            "assert not {'torch', 'wandb'} & set(sys.modules), {'torch', 'wandb'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


SWEEP = ["-m", "model=transformer_tiny,lstm_tiny", "++model.n_heads=4", "task=copy", "task.n_train=60",
         "task.n_valid=4", "task.n_test=4", "trainer=smoke", "trainer.threads=1", "eval.decoding.beam=2",
         "device=cpu", "data.download=false", "logger=wandb", "sweep_name=dashboard"]


@pytest.mark.slow
def test_a_wandb_sweep_with_a_failing_job_gets_a_report_run_listing_it(tmp_path):
    """An LSTM does not take n_heads: one job fails, the other trains; the sweep's report run lists the failure."""
    sweep = tmp_path / "sweep"
    env = {**secret_env(tmp_path, "offline"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "run.py", *SWEEP, *SECRET_ARGS, f"hydra.sweep.dir={sweep}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    recs = {rec["config"]["model"]["name"]: rec
            for rec in (json.loads(p.read_text()) for p in sweep.glob("*/record.json"))}
    assert recs["transformer"]["status"] == "ok" and recs["lstm"]["status"] == "failed"

    (run_file,) = (sweep / "report").glob("wandb/offline-run-*/run-report-*.wandb")
    got = read_run(run_file)
    assert got["run"].job_type == "report" and got["run"].run_group == "dashboard"
    (failed,) = rows(got["tables"]["failed_jobs"])
    assert failed["job"] == "lstm-tiny_copy_s1" and failed["status"] == "failed"
    assert failed["error"] == recs["lstm"]["error"] and "model.n_heads is not a setting of lstm" in failed["error"]
    (row,) = rows(got["tables"]["summary/copy"])
    assert row["architecture"] == "transformer-tiny" and row["n"] == 1
    assert row["test_bleu_mean"] == pytest.approx(recs["transformer"]["metrics"]["test"]["bleu"])
    assert f"wandb report run {got['run'].run_id}: offline in" in output
    # the job run beside it, in the same group
    (job_file,) = sweep.glob("*transformer*/wandb/offline-run-*/run-*.wandb")
    assert read_run(job_file)["run"].run_group == "dashboard"
    assert holding_secrets(tmp_path, text=output) == {}
