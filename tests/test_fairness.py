"""Fair hardware, detected: each record says how much of the machine its training got, and the report flags the
runs that got less than the runs they are compared with (harness/utilization.py, reports/hardware.py)."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys

import pandas as pd
import pytest
import torch

from seqbench import reports
from seqbench.harness import job, utilization
from seqbench.harness.train import Progress, Trainer
from seqbench.reports import hardware, tables
from seqbench.reports.load import load
from tests.test_reports import record, write_records

COPY = ["model=transformer_tiny", "task=copy", "task.n_train=60", "task.n_valid=4", "task.n_test=4", "trainer=smoke",
        "eval.splits=[valid]"]


@pytest.fixture
def keep_threads():
    """Jobs set torch's threads for the whole process; put the test suite's back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def with_utilization(rec: dict, value: float | None) -> dict:
    rec["costs"]["cpu_utilization"] = value
    return rec


def fleet() -> list[dict]:
    """multi30k on the CPU: utilisations 1.0, 0.9, 0.9, 0.7 (median 0.9, so 0.72 is the line); one GPU run at 0.45
    alone in its group; wikitext2: 0.55 and 0.6 (both above the floor and 0.8 x their median); one run without a
    utilisation; a failed run is never flagged."""
    recs = [with_utilization(record("transformer", "multi30k", 1, scores=(20.0, 50.0)), 1.0),
            with_utilization(record("transformer", "multi30k", 2, scores=(21.0, 51.0)), 0.9),
            with_utilization(record("lstm", "multi30k", 1, scores=(10.0, 40.0)), 0.9),
            with_utilization(record("lstm", "multi30k", 2, scores=(11.0, 41.0)), 0.7),
            with_utilization(record("transformer", "multi30k", 4, scores=(30.0, 60.0),
                                    device=("cuda", "NVIDIA H100 80GB HBM3")), 0.45),
            with_utilization(record("transformer", "wikitext2", 1, scores=(100.0,)), 0.55),
            with_utilization(record("lstm", "wikitext2", 1, scores=(150.0,)), 0.6),
            with_utilization(record("lstm", "wikitext2", 2, scores=(160.0,)), None)]
    failed = record("gru", "multi30k", 1, status="failed", error="ValueError: x")
    failed["costs"] = {"cpu_utilization": 0.1}
    return [*recs, failed]


def test_runs_below_the_groups_median_or_the_floor_are_flagged(tmp_path):
    runs = tables.ok(load([write_records(tmp_path, fleet())]).runs)
    low = hardware.flagged(runs)
    assert list(low["job"]) == ["lstm-tiny_multi30k_s2", "transformer-tiny_multi30k_s4"]
    assert list(low["why"]) == ["CPU utilisation 0.70, below 0.8 x its group's median 0.90",
                                "CPU utilisation 0.45, below 0.5"]
    assert list(low["group median"]) == [0.9, 0.45]
    assert hardware.unknown(runs) == 1


def test_a_run_that_took_fewer_threads_is_flagged_though_it_kept_them_busy(tmp_path):
    """threads=auto gives a job that finds the CPUs busy at its start fewer threads; it keeps those busy, so its
    utilisation is high, but it trained on 1 CPU where its group trained on 2: 1 x 0.99 < 0.8 x median(1.94, 1.92,
    0.99) = 0.8 x 1.92. Without a thread count (older records) only the utilisation is checked."""
    recs = []
    for (model, seed), n, util in [(("transformer", 1), 2, 0.97), (("lstm", 1), 2, 0.96), (("lstm", 2), 1, 0.99)]:
        rec = with_utilization(record(model, "multi30k", seed, scores=(20.0, 50.0)), util)
        rec["environment"]["threads"] = n
        recs.append(rec)
    runs = tables.ok(load([write_records(tmp_path / "a", recs)]).runs)
    low = hardware.flagged(runs)
    assert list(low["job"]) == ["lstm-tiny_multi30k_s2"] and list(low["threads"]) == [1]
    assert list(low["why"]) == ["1 threads x CPU utilisation 0.99 = 0.99 CPUs training, below 0.8 x its group's "
                                "median 1.92 (fewer threads: the CPUs were busy at its start, or trainer.threads "
                                "differed)"]
    for rec in recs:
        del rec["environment"]["threads"]
    assert hardware.flagged(tables.ok(load([write_records(tmp_path / "b", recs)]).runs)).empty


def test_report_warns_about_flagged_runs_in_the_fairness_section_and_beside_their_row(tmp_path):
    root = write_records(tmp_path / "records", fleet())
    reports.build([root], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    fair = md.split("## Fair comparison")[1].split("## Results")[0]
    assert "WARNING: 2 runs got less of the machine than the runs they are compared with" in fair
    assert "| multi30k | x86_64 | lstm-tiny | 2 | lstm-tiny_multi30k_s2 | 0.7 | 0.9 |" in fair
    assert "1 finished runs record no CPU utilisation" in fair
    multi30k = md.split("### Task multi30k")[1].split("### Task wikitext2")[0]
    lstm_row = next(line for line in multi30k.splitlines() if line.startswith("| lstm-tiny |"))
    assert lstm_row.endswith("| 0.80 | WARNING: low hardware utilisation (seed 2: CPU utilisation 0.70, below 0.8 "
                             "x its group's median 0.90): throughput and budget-bound quality not comparable |")
    transformer_row = next(line for line in multi30k.splitlines() if line.startswith("| transformer-tiny | x86_64"))
    assert transformer_row.endswith("| 0.95 |  |")  # mean utilisation of 1.0 and 0.9, no warning
    wikitext2 = md.split("### Task wikitext2")[1].split("## ")[0]
    assert "WARNING" not in wikitext2 and "hardware" not in wikitext2


def test_the_shared_settings_note_does_not_call_flagged_runs_fair(tmp_path):
    quiet = [r for r in fleet()[:4]]
    reports.build([write_records(tmp_path / "records", quiet)], tmp_path / "report")
    fair = (tmp_path / "report" / "report.md").read_text().split("## Fair comparison")[1].split("## Results")[0]
    assert ("Within each task, all finished runs share these settings: trainer.max_seconds, trainer.max_steps, "
            "trainer.max_tokens, trainer.max_epochs, trainer.max_flops, model preset, precision, device, torch version, tokenization, "
            "eval.lm_protocol, task.\\* (task settings and tokenization). They did not share the hardware alike: the comparison is not "
            "fair for the runs flagged above (1).") in fair
    reports.build([write_records(tmp_path / "fair", [with_utilization(r, 1.0) for r in quiet])], tmp_path / "fair_r")
    fair = (tmp_path / "fair_r" / "report.md").read_text().split("## Fair comparison")[1].split("## Results")[0]
    assert "WARNING" not in fair and "did not share the hardware" not in fair


def test_utilization_costs_from_the_trainers_progress(keep_threads):
    """3 CPU seconds over 2 training seconds on 2 threads is 0.75; GPU samples 40 and 60 percent average 0.5."""
    torch.set_num_threads(2)
    p = Progress(train_seconds=2.0, cpu_seconds=3.0, load_average={"start": 1.5, "end": 2.5},
                 log=[{"gpu_utilization": 40.0}, {"gpu_utilization": 60.0}, {"loss": 1.0}])
    assert utilization.costs(p, torch.device("cpu")) == {
        "cpu_seconds": 3.0, "cpu_threads": 2, "cpu_utilization": 0.75, "load_average": {"start": 1.5, "end": 2.5},
        "gpu_utilization": 0.5, "gpu_utilization_samples": 2}
    on_gpu = utilization.costs(p, torch.device("cuda"))  # one host thread drives the device
    assert on_gpu["cpu_threads"] == 1 and on_gpu["cpu_utilization"] == 1.5
    assert utilization.costs(Progress(), torch.device("cpu"))["cpu_utilization"] is None  # no training time


def test_gpu_utilization_is_null_where_it_cannot_be_read(monkeypatch):
    def no_nvml(device=None):
        raise ModuleNotFoundError("pynvml does not seem to be installed or it can't be imported.")
    monkeypatch.setattr(torch.cuda, "utilization", no_nvml)
    assert utilization.gpu_percent(torch.device("cuda")) is None
    monkeypatch.setattr(torch.cuda, "utilization", lambda device=None: 37)
    assert utilization.gpu_percent(torch.device("cuda")) == 37.0
    assert utilization.gpu_percent(torch.device("cpu")) is None


def test_job_records_its_utilization_and_load_average(make_cfg, tmp_path, keep_threads):
    rec = job.run(make_cfg(*COPY, "trainer.threads=1"), tmp_path)
    c = rec["costs"]
    assert c["cpu_threads"] == 1 and 0 < c["cpu_seconds"]
    assert c["cpu_utilization"] == pytest.approx(c["cpu_seconds"] / c["train_seconds"], abs=1e-3)
    assert set(c["load_average"]) == {"start", "end"} and all(v >= 0 for v in c["load_average"].values())
    assert c["gpu_utilization"] is None and c["gpu_utilization_samples"] == 0


def beside_burners(fit):
    """``Trainer.fit`` run while two spinning processes per CPU compete for the cores (started here, killed by pid):
    on any number of cores, a job's threads then get at most about half of a core each."""
    def run(self):
        burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                   for _ in range(2 * (os.cpu_count() or 1))]
        try:
            return fit(self)
        finally:
            for burner in burners:
                os.kill(burner.pid, signal.SIGKILL)
                burner.wait()
    return run


def test_a_job_beside_cpu_burners_records_low_utilization_and_the_report_flags_it(make_cfg, tmp_path, keep_threads,
                                                                                   monkeypatch):
    """Two training threads beside two spinning processes per CPU get well under 0.8 of their time."""
    monkeypatch.setattr(Trainer, "fit", beside_burners(Trainer.fit))
    rec = job.run(make_cfg(*COPY, "trainer.threads=2", "trainer.max_steps=2", "trainer.eval_every=100",
                           "trainer.valid_bleu=false"),
                  tmp_path / "runs" / "burned")  # one validation, at the end
    assert rec["status"] == "ok" and rec["costs"]["cpu_threads"] == 2
    assert rec["costs"]["cpu_utilization"] < 0.8
    for seed in (2, 3):  # two runs of the same job that had the machine to themselves
        quiet = copy.deepcopy(rec)
        quiet["seed"], quiet["job"]["name"], quiet["costs"]["cpu_utilization"] = seed, f"quiet_s{seed}", 1.0
        (tmp_path / "runs" / f"quiet{seed}").mkdir()
        (tmp_path / "runs" / f"quiet{seed}" / "record.json").write_text(json.dumps(quiet))
    reports.build([tmp_path / "runs"], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    fair = md.split("## Fair comparison")[1].split("## Results")[0]
    assert "WARNING: 1 runs got less of the machine" in fair and f"| {rec['job']['name']} |" in fair
    assert "quiet_s" not in fair
    summary = pd.read_csv(tmp_path / "report" / "summary.csv")
    assert summary["low_utilization"].iloc[0].startswith("seed 1: CPU utilisation")
