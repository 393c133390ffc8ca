"""The report never merges what differs and never loses a result: systems, duplicates, records that must not be
averaged, reruns in a finished folder, and a report of nothing. Built as a user builds it (``python -m seqbench.reports``)."""
from __future__ import annotations

import io
import json
import logging
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from seqbench.harness import job
from seqbench.reports import significance
from seqbench.reports.__main__ import main as cli
from tests.test_reports import record, write_records

COPY = ["model=transformer_tiny", "task=copy", "task.n_train=60", "task.n_valid=4", "task.n_test=4", "trainer=smoke",
        "trainer.max_steps=2", "trainer.eval_every=2", "trainer.threads=1"]


def build(*dirs, out: Path) -> SimpleNamespace:
    """``python -m seqbench.reports <dirs> --out <out>`` in this process (no interpreter start): its exit status and what it
    wrote to stderr, its warnings included."""
    err = io.StringIO()
    handler, logger = logging.StreamHandler(err), logging.getLogger("seqbench.reports")
    logger.addHandler(handler)
    try:
        with redirect_stdout(io.StringIO()), redirect_stderr(err):
            try:
                code = cli([*map(str, dirs), "--out", str(out)])
            except SystemExit as stop:  # argparse's errors
                code = stop.code
    finally:
        logger.removeHandler(handler)
    return SimpleNamespace(returncode=code, stderr=err.getvalue())


def section(md: str, title: str) -> str:
    return md.split(f"## {title}")[1].split("\n## ")[0]


def full(model: str, task: str, seed: int, *, scores=(20.0, 50.0), folder: str | None = None, **changes) -> dict:
    """A record whose config holds the settings a real job resolves (model, decoding, optimiser, loss), then
    ``changes`` (dotted key -> value) applied to it."""
    rec = record(model, task, seed, scores=scores)
    cfg = rec["config"]
    cfg["model"].update(d_model=32, d_ff=64, n_layers=2, n_heads=4, dropout=0.1)
    cfg["trainer"].update(lr=0.002, warmup_steps=150, clip_norm=0.0, optimizer="adam", label_smoothing=0.1,
                          schedule="cosine", progress=False, log_every=100)
    cfg.update(eval={"decoding": {"beam": 4, "lenpen": 0.6}, "checkpoint": "best"}, sweep_name="s",
               logger={"kind": "none"}, data={"root": "/data"})
    for key, value in changes.items():
        *parents, last = key.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    rec["job"]["output_dir"] = folder or f"results/s/{model}_{seed}_{len(changes)}"
    rec["metrics_version"] = 2  # today's metric names
    return rec


# -- one report of every case below: each task of it holds one case --------------------------------------------

REFS = [f"the cat number {i} sat on the mat near door {i % 7}" for i in range(30)]


def write_outputs(folder: Path, hyps: list[str], refs: list[str]) -> None:
    (folder / "test.hyp").write_text("".join(h + "\n" for h in hyps))
    (folder / "test.ref").write_text("".join(r + "\n" for r in refs))


def systems_records() -> list[dict]:
    """Task multi30k: one architecture in four systems (and a run that differs only in what changes no result)."""
    recs = [full("transformer", "multi30k", 1), full("transformer", "multi30k", 2),
            full("transformer", "multi30k", 3, **{"eval.decoding.beam": 1}),
            full("transformer", "multi30k", 4, **{"model.d_model": 64, "model.d_ff": 256}),
            full("transformer", "multi30k", 5, **{"trainer.optimizer": "sgd", "trainer.label_smoothing": 0}),
            full("transformer", "multi30k", 6, **{"trainer.log_every": 7, "sweep_name": "other",
                                                   "data.root": "/elsewhere", "logger.kind": "wandb"}),
            full("lstm", "multi30k", 1, scores=(10.0, 40.0))]
    recs[5]["job"]["started"] = "2026-01-01T00:00:00+00:00"
    return recs


def duplicate_records() -> list[dict]:
    """Task dups: a run, its copy in another output folder (same system and seed), and a second seed."""
    first = full("transformer", "dups", 1, scores=(20.0, 50.0), folder="results/s/0")
    first["job"]["finished"] = "2026-01-01T11:00:00+00:00"
    copy = json.loads(json.dumps(first))
    copy["job"]["output_dir"], copy["job"]["finished"] = "results/copy/0", "2026-01-01T12:00:00+00:00"
    return [first, copy, full("transformer", "dups", 2, scores=(24.0, 54.0))]


def no_metrics_records() -> list[dict]:
    """Task empty: two scored runs, one finished without metrics, one whose metrics are all null."""
    empty, nulls = full("transformer", "empty", 3), full("transformer", "empty", 4)
    empty["metrics"], nulls["metrics"] = {}, {"test": {"bleu": None, "chrf": None}}
    return [full("transformer", "empty", 1), full("transformer", "empty", 2), empty, nulls]


def bad_metric_records() -> dict[str, tuple[dict, str]]:
    """Records that must not be averaged, each with what the report must say about it."""
    def ok(seed, **test):
        rec = full("transformer", "scored", seed)
        rec["metrics"]["test"].update(test)
        return rec
    lm = record("transformer", "wikitext2", 9, scores=(100.0,))
    lm["metrics"]["test"]["perplexity"] = 0.5
    probe = record("transformer", "delayed_copy", 9, scores=(0.5,))
    probe["metrics"]["test"]["accuracy"] = 1.5
    return {"wer_string": (ok(3, wer="0.001"), "metrics.test.wer is a string, not a number"),
            "wer_negative": (ok(4, wer=-5.0), "metrics.test.wer: -5.0 is outside its range"),
            "ser_high": (ok(11, ser=1.5), "metrics.test.ser: 1.5 is outside its range [0, 1]"),
            "bleu_high": (ok(5, bleu=1e308), "metrics.test.bleu: 1e+308 is outside its range [0, 100]"),
            "chrf_bool": (ok(6, chrf=True), "metrics.test.chrf is a boolean, not a number"),
            "ppl_below_one": (lm, "metrics.test.perplexity: 0.5 is outside its range"),
            "accuracy_high": (probe, "metrics.test.accuracy: 1.5 is outside its range [0, 1]"),
            "output_dir_list": ({**ok(7), "job": {"name": "j", "started": "2026-01-01T00:00:00+00:00",
                                                  "output_dir": ["a", "b"]}},
                                "job.output_dir is an array, not a string"),
            "seconds_text": ({**ok(8), "costs": {"train_seconds": "60"}}, "costs.train_seconds is a string"),
            "metrics_names": ({**ok(10), "task": {"name": "scored", "metrics": [1]}},
                              "task.metrics.0 is a number, not a string")}


def learning_rate_records() -> list[dict]:
    """Task lrs: one architecture at two learning rates, two seeds each."""
    return [full("transformer", "lrs", s, scores=(10.0 if lr == 0.001 else 30.0, 50.0), **{"trainer.lr": lr})
            for lr in (0.001, 0.002) for s in (1, 2)]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("records")
    for name, recs in (("systems", systems_records()), ("dups", duplicate_records()),
                       ("empty", no_metrics_records()), ("lrs", learning_rate_records()),
                       ("scored", [full("transformer", "scored", 1, scores=(20.0, 50.0)),
                                   full("transformer", "scored", 2, scores=(22.0, 52.0))])):
        write_records(root / name, recs)
    for name, (rec, _) in bad_metric_records().items():
        (root / "bad" / name).mkdir(parents=True)
        (root / "bad" / name / "record.json").write_text(json.dumps(rec))
    for i, folder in enumerate(sorted((root / "lrs").iterdir())):  # lr 0.001 (the first two) drops words
        write_outputs(folder, [" ".join(r.split()[: 5 if i < 2 else None]) for r in REFS], REFS)
    out = tmp_path_factory.mktemp("report")
    proc = build(root, out=out)
    assert proc.returncode == 0, proc.stderr[-3000:]  # one list-valued output_dir used to kill the whole report
    md = (out / "report.md").read_text()
    return SimpleNamespace(root=root, out=out, stderr=proc.stderr, md=md, summary=pd.read_csv(out / "summary.csv"))


def task_section(md: str, task: str) -> str:
    return md.split(f"### Task {task}\n")[1].split("\n## ")[0].split("\n### ")[0]


# -- every setting that can change a result splits systems ------------------------------------------------------

def test_runs_that_differ_in_any_setting_are_separate_systems_and_say_how(report):
    summ = report.summary[report.summary["task"] == "multi30k"]
    transformer = summ[summ["arch"] == "transformer-tiny"]
    # seeds 1, 2 and 6 are one system (logging, sweep name, data location and tracking change no result)
    assert sorted(transformer["n"]) == [1, 1, 1, 3] and transformer["system"].nunique() == 4
    assert transformer[transformer["n"] == 3].iloc[0]["seeds"] == "1, 2, 6"
    table = task_section(report.md, "multi30k")
    for differs in ("eval.decoding.beam=1", "model.d_model=64", "model.d_ff=256", "trainer.optimizer=sgd",
                    "trainer.label_smoothing=0"):
        assert differs in table, differs
    fair = section(report.md, "Fair comparison")
    assert "all finished runs share" not in fair
    for setting in ("eval.decoding.beam", "model.d_model (transformer-tiny)", "trainer.optimizer",
                    "trainer.label_smoothing"):
        assert f"| multi30k | {setting} |" in fair, setting
    assert "trainer.log_every" not in fair and "sweep_name" not in fair and "model.d_model (lstm" not in fair
    runs = pd.read_csv(report.out / "runs.csv")
    assert runs.groupby(["task", "system"])["arch"].nunique().max() == 1  # parameters never averaged across systems


def test_the_system_key_ignores_seed_folder_and_logging_only():
    from seqbench.reports.load import system_key

    base = full("transformer", "multi30k", 1)
    same = full("transformer", "multi30k", 2, folder="elsewhere", **{"trainer.progress": True, "hydra.x": 1,
                                                                      "data.root": "/d", "tuned": "t.yaml"})
    assert system_key(base) == system_key(same)
    for change in ({"trainer.lr": 0.001}, {"eval.decoding.lenpen": 1.0}, {"model.dropout": 0.3},
                   {"trainer.max_steps": 100}, {"task.vocab_size": 4000}, {"trainer.label_smoothing": 0.0}):
        assert system_key(full("transformer", "multi30k", 1, **change)) != system_key(base), change
    other_device = full("transformer", "multi30k", 1)
    other_device["environment"]["device_name"] = "NVIDIA H100"
    assert system_key(other_device) != system_key(base)
    assert system_key(full("transformer", "multi30k", 1, **{"trainer.lr": 2.0e-3})) == system_key(base)  # by value


def test_significance_pairs_systems_of_one_architecture_never_pools_them(report):
    """Two learning rates of one architecture are two systems: compared with each other, seed by seed."""
    pairs = pd.read_csv(report.out / "significance.csv")
    bleu = pairs[(pairs["task"] == "lrs") & (pairs["metric"] == "bleu")]
    assert len(bleu) == 2 and bleu["note"].isna().all()
    assert set(bleu["a"]) == {"transformer-tiny (trainer.lr=0.002)"}
    assert set(bleu["b"]) == {"transformer-tiny (trainer.lr=0.001)"}
    assert sorted(zip(bleu["seed_a"], bleu["seed_b"])) == [(1, 1), (2, 2)]


def test_a_difference_that_rounds_to_zero_is_never_significant():
    tested = pd.DataFrame({"delta": [0.0024, 0.0031], "significant": [True, True]})
    assert not significance.verdict("bleu", tested, "A", "B").startswith("yes")
    assert significance.verdict("bleu", tested.assign(delta=[0.8, 0.6]), "A", "B") == "yes: A better"
    pairs = pd.DataFrame([{"task": "t", "metric": "bleu", "a": "A", "b": "B", "delta": d, "p": 0.001, "p_holm": None,
                           "significant": None} for d in (0.0024, 0.5)])
    assert significance.holm(pairs)["significant"].tolist() == [False, True]


# -- duplicates, values that must not be averaged, records without metrics, wrong shapes ----------------------

def test_a_duplicate_run_counts_once_and_the_report_names_both_folders(report):
    row = report.summary[report.summary["task"] == "dups"].iloc[0]
    assert row["n"] == 2 and row["seeds"] == "1, 2" and row["test_bleu_mean"] == pytest.approx(22.0)
    (note,) = [line for line in report.md.splitlines() if "duplicate runs:" in line]
    assert str(report.root / "dups" / "0_transformer") in note and str(report.root / "dups" / "1_transformer") in note
    assert "seed 1" in note and "duplicate runs:" in report.stderr


def test_wrong_types_out_of_range_metrics_and_wrong_shapes_are_unreadable_not_averaged(report):
    failures = section(report.md, "Failed and unfinished jobs")
    for name, (_, why) in bad_metric_records().items():
        line = next((x for x in failures.splitlines() if f"| {name} | unreadable |" in x), "").replace("\\", "")
        assert why in line and str(report.root / "bad" / name / "record.json") in line, (name, line)
    scored = report.summary[report.summary["task"] == "scored"]
    assert scored["n"].tolist() == [2] and scored["test_bleu_mean"].tolist() == [pytest.approx(21.0)]
    assert scored["test_wer_mean"].isna().all() and set(report.summary["task"]) == {"multi30k", "dups", "empty",
                                                                                   "lrs", "scored"}


def test_a_finished_record_without_metrics_is_flagged_not_counted(report):
    row = report.summary[report.summary["task"] == "empty"].iloc[0]
    assert row["n"] == 2 and row["seeds"] == "1, 2"
    failures = section(report.md, "Failed and unfinished jobs")
    for folder in ("2_transformer", "3_transformer"):
        line = next(x for x in failures.splitlines() if str(report.root / "empty" / folder / "record.json") in x)
        assert "| no metrics |" in line and "no metric" in line
    assert "2 no metrics" in section(report.md, "Overview")


# -- a report of nothing ----------------------------------------------------------------------------------------

def test_a_report_of_nothing_fails_naming_the_path(tmp_path):
    missing = tmp_path / "nonexistent"
    proc = build(missing, out=tmp_path / "x")
    assert proc.returncode != 0 and str(missing) in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = build(tmp_path / "empty", out=tmp_path / "y")
    assert proc.returncode != 0 and str(tmp_path / "empty") in proc.stderr and "record.json" in proc.stderr
    proc = build("", out=tmp_path / "z")
    assert proc.returncode != 0 and "empty path" in proc.stderr
    proc = build("/dev/null", out=tmp_path / "w")
    assert proc.returncode != 0 and "/dev/null" in proc.stderr


# -- reruns in a finished folder keep every finished result -----------------------------------------------------

@pytest.mark.slow  # four training runs
def test_reruns_in_a_finished_folder_keep_every_result_and_the_report_reads_them(make_cfg, tmp_path):
    out = tmp_path / "run"
    hyps = {}
    for beam in (4, 1, 2):
        rec = job.run(make_cfg(*COPY, f"eval.decoding.beam={beam}"), out)
        assert rec["status"] == "ok"
        hyps[beam] = (out / "test.hyp").read_text()
    refused = job.run(make_cfg(*COPY, "model.d_model=64"), out, raise_errors=False)
    assert refused["status"] == "failed" and "another model" in refused["error"]
    kept = sorted(out.glob("previous/*/record.json"))
    beams = {json.loads(p.read_text())["config"]["eval"]["decoding"]["beam"]: p.parent for p in kept}
    assert sorted(beams) == [1, 2, 4] and len(kept) == 3  # every finished run, none twice
    for beam, folder in beams.items():
        assert (folder / "test.hyp").read_text() == hyps[beam] and (folder / "test.ref").is_file()
    assert refused["job"]["previous_record"] == str(beams[2] / "record.json")
    proc = build(out, out=tmp_path / "report")
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "4 runs (1 failed, 3 ok)" in section(md, "Overview")
    summ = pd.read_csv(tmp_path / "report" / "summary.csv")
    assert len(summ) == 3 and summ["n"].tolist() == [1, 1, 1]
    for beam in (1, 2, 4):
        assert summ["system_name"].str.contains(f"eval.decoding.beam={beam}", regex=False).sum() == 1


def test_a_limited_evaluation_and_the_unknown_token_rate_stand_beside_the_perplexity(tmp_path):
    """A perplexity scored on part of the test split (eval.max_test_tokens) is a row of its own that says so, never
    averaged with full evaluations, and every LM row shows the share of unknown tokens it scored."""
    full_eval = [record("lstm", "wikitext2", seed, scores=(120.0 + seed,)) for seed in (1, 2)]
    limited = [record("lstm", "wikitext2", seed, scores=(90.0 + seed,)) for seed in (3, 4)]
    for rec in full_eval:
        rec["metrics"]["test"].update(tokens_evaluated=245569, tokens_total=245569, limited=False, unk_rate=0.026)
    for rec in limited:
        rec["metrics"]["test"].update(tokens_evaluated=10000, tokens_total=245569, limited=True, unk_rate=0.031)
        rec["config"]["eval"] = {"max_test_tokens": 10000}
    write_records(tmp_path / "runs", full_eval + limited)
    out = build(tmp_path / "runs", out=tmp_path / "report")
    assert out.returncode == 0, out.stderr
    summary = pd.read_csv(tmp_path / "report" / "summary.csv")
    assert sorted(summary["n"]) == [2, 2]  # two rows: the limited runs are not seeds of the full ones
    md = (tmp_path / "report" / "report.md").read_text()
    assert "first 10,000 of 245,569 tokens" in md
    assert "unknown tokens 2.6%" in md and "unknown tokens 3.1%" in md
