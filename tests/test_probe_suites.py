"""The Zoology and MAD suites (tasks/zoology.py): answers recoverable by a lookup-table solver, MQAR's power-law
query slots, no train/test overlap, determinism in data_seed, one job end to end, the two experiments, and the
suites' report (reports/probe_suites.py) on synthetic records."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from seqbench import models, tasks
from seqbench.harness import job
from seqbench.tasks.probes import IGNORE, NO_ANSWER
from seqbench.tasks.zoology import MAD_TASKS, memorization_map, power_law
from tests.conftest import ROOT

SMALL = {"n_train": 300, "n_valid": 40, "n_test": 60}
TINY = {  # small settings of every task: many repeats, short sequences
    "mqar": {"vocab_size": 256, "seq_len": 64, "num_kv_pairs": 8},
    "mad_in_context_recall": {"vocab_size": 16, "seq_len": 48},
    "mad_noisy_in_context_recall": {"vocab_size": 32, "noise_vocab": 16, "seq_len": 48, "frac_noise": 0.4},
    "mad_fuzzy_in_context_recall": {"vocab_size": 10, "seq_len": 64, "k_motif_size": 2, "v_motif_size": 3},
    "mad_selective_copying": {"vocab_size": 16, "seq_len": 40, "num_tokens_to_copy": 6},
    "mad_compression": {"vocab_size": 16, "seq_len": 12},
    "mad_memorization": {"vocab_size": 64, "seq_len": 16},
}
NAMES = tuple(TINY)


def build(name: str, **settings):
    return tasks.build({"name": name, **SMALL, **TINY[name], **settings})


# ---------------------------------------------------------------- the reference solver

def _after_last(tokens, p):
    """The token after the latest earlier occurrence of tokens[p] (induction: what followed this key before)."""
    earlier = np.nonzero(tokens[:p] == tokens[p])[0]
    return tokens[earlier[-1] + 1] if len(earlier) else None


def _fuzzy(tokens, p, k):
    """Fuzzy recall: the key is the run of key ids (< k) before the current value run; look its value up."""
    kind = np.where(tokens < k, 0, np.where(tokens < 2 * k, 1, 2))  # key, value, pad
    table, runs, start = {}, [], 0
    for i in range(1, p + 2):  # runs of one kind, up to position p (the last run may continue past p)
        if i == p + 1 or kind[i] != kind[start]:
            runs.append((start, i))
            start = i
    for (ks, ke), (vs, ve) in zip(runs, runs[1:]):
        if kind[ks] == 0 and kind[vs] == 1 and ve <= p:  # a complete earlier pair
            table[tuple(tokens[ks:ke])] = tuple(tokens[vs:ve])
    last_key = max(i for i, (s, _) in enumerate(runs) if kind[s] == 0)
    ks, ke = runs[last_key]
    value = table.get(tuple(tokens[ks:ke]))
    offset = p - (ke - 1)  # 0: predicting the value's first token at the key's last token
    return value[offset] if value is not None and offset < len(value) else None


def solve(name: str, task, split: str, n: int, p: int, facts: dict):
    """The answer at position p of example n, from that example's input (memorization: the training set's table)."""
    d, s = task.data[split], task.settings
    tokens = d["tokens"][n, : d["length"][n]]
    if name in ("mqar", "mad_in_context_recall", "mad_noisy_in_context_recall"):
        return _after_last(tokens, p)
    if name == "mad_fuzzy_in_context_recall":
        return _fuzzy(tokens, p, (s["vocab_size"] - 1) // 2)
    if name == "mad_selective_copying":
        marker = int(np.nonzero(tokens == s["vocab_size"] - 1)[0][0])
        kept = tokens[:marker][tokens[:marker] != s["vocab_size"] - 2]
        return kept[p - marker - 1]
    if name == "mad_compression":
        return tokens[tokens[p] - s["vocab_size"]]  # cue i asks for token i
    return facts.get(tokens[p - 1])  # memorization: the key before INSERT


@pytest.mark.parametrize("name", NAMES)
def test_a_lookup_table_solver_answers_every_generated_answer(name):
    task = build(name)
    d = task.data["train"]
    facts = {int(d["tokens"][n, p - 1]): int(d["target"][n, p]) for n, p in zip(*np.nonzero(d["target"] != IGNORE))}
    for split in ("train", "valid", "test"):
        d = task.data[split]
        answers = list(zip(*np.nonzero(d["target"] != IGNORE)))
        assert len(answers) >= len(d["length"])  # every example asks at least once
        right = sum(solve(name, task, split, n, p, facts) == d["target"][n, p] for n, p in answers)
        assert right == len(answers), f"{name} {split}: {right}/{len(answers)}"
        assert ((d["distance"] != NO_ANSWER) == (d["target"] != IGNORE)).all()
        assert d["tokens"].max() < task.vocab_size and d["target"].max() < task.vocab_size
    assert task.family == "probe" and task.form == "lm" and task.describe()["suite"] in ("zoology", "mad")


def test_mqar_layout_as_zoology():
    """Distinct keys (1 .. V/2-1) and values (V/2 .. V-1), each key asked once after the pairs, 0 elsewhere."""
    task = build("mqar")
    d, n = task.data["test"], 8
    for tokens, target in zip(d["tokens"], d["target"]):
        keys, values = tokens[0 : 2 * n : 2], tokens[1 : 2 * n : 2]
        assert len(set(keys)) == n and len(set(values)) == n
        assert keys.min() >= 1 and keys.max() < 128 <= values.min() and values.max() < 256
        asked = np.nonzero(target != IGNORE)[0]
        assert sorted(tokens[asked]) == sorted(keys) and (asked >= 2 * n).all() and (asked % 2 == 0).all()
        rest = np.ones(len(tokens), bool)
        rest[: 2 * n], rest[asked] = False, False
        assert (tokens[rest] == 0).all()


def _tv(a: np.ndarray, p: np.ndarray) -> float:
    return 0.5 * np.abs(np.bincount(a, minlength=len(p)) / len(a) - p).sum()


def test_mqar_query_slots_follow_the_power_law():
    """The first pair's query slot is the first draw without replacement: distributed as p ~ (g+1)^(a-1)."""
    seq_len, n = 64, 4
    space = (seq_len - 2 * n) // 2
    for a in (0.01, 0.5):
        task = tasks.build({"name": "mqar", "n_train": 4000, "n_valid": 1, "n_test": 1, "vocab_size": 256,
                            "seq_len": seq_len, "num_kv_pairs": n, "power_a": a})
        tokens = task.data["train"]["tokens"]
        query = np.argmax(tokens[:, 2 * n :] == tokens[:, [0]], axis=1)  # where key 0 is asked, past the pairs
        slot = query // 2
        p = power_law(space, a)
        assert _tv(slot, p) < 0.04, (a, _tv(slot, p))
        uniform = np.random.default_rng(0).integers(0, space, len(slot))
        assert _tv(uniform, p) > 0.15  # the tolerance tells the law from a uniform draw
        # all pairs' slots: small slots far more often than a uniform draw gives them
        everyone = np.nonzero(task.data["train"]["target"][:, 2 * n :] != IGNORE)[1] // 2
        assert np.mean(everyone < space // 4) > (0.4 if a == 0.01 else 0.3)
    assert power_law(5, 1.0) == pytest.approx(np.full(5, 0.2))  # power_a = 1: uniform


@pytest.mark.parametrize("name", NAMES)
def test_generation_is_deterministic_in_data_seed(name):
    a, b, c = build(name), build(name), build(name, data_seed=7)
    for split in ("train", "test"):
        for f in ("tokens", "target", "distance"):
            assert np.array_equal(a.data[split][f], b.data[split][f]), (split, f)
    assert not np.array_equal(a.data["test"]["tokens"], c.data["test"]["tokens"])
    assert a.settings == b.settings and a.settings["data_seed"] == 1234


def _rows(d) -> set[bytes]:
    return {d["tokens"][i].tobytes() + d["target"][i].tobytes() for i in range(len(d["length"]))}


def test_no_valid_or_test_example_is_a_training_example():
    """A space so small (2^4 sequences) that independent draws must collide: every held-out clash is drawn again."""
    task = tasks.build({"name": "mad_compression", "n_train": 24, "n_valid": 4, "n_test": 4, "vocab_size": 3,
                        "seq_len": 5})
    train = _rows(task.data["train"])
    assert len(train) < 24  # independent training draws collide here ...
    for split in ("valid", "test"):
        assert not (_rows(task.data[split]) & train), split  # ... but no held-out example is a training example
    with pytest.raises(ValueError, match=r"(?s)valid.*too small.*vocab_size.*n_train"):
        tasks.build({"name": "mad_compression", "n_train": 200, "n_valid": 1, "n_test": 50, "vocab_size": 3,
                     "seq_len": 4})  # 8 possible sequences, all in training


def test_memorization_facts_come_from_the_training_set():
    task = build("mad_memorization")
    facts = memorization_map(64, 1234)
    d = task.data["train"]
    seen = set(d["tokens"][:, 0::2].ravel().tolist())
    assert seen == set(range(len(facts)))  # every fact is shown in training
    keys, values = d["tokens"][:, 0::2], d["target"][:, 1::2]
    assert (values == facts[keys]).all() and (d["tokens"][:, 1::2] == 63).all()
    assert set(task.settings["distances"]) == {0}  # never in the input


@pytest.mark.parametrize("settings, words", [
    ({"name": "mqar", "seq_len": 16, "num_kv_pairs": 5}, ("seq_len", "num_kv_pairs")),
    ({"name": "mqar", "vocab_size": 32, "seq_len": 64, "num_kv_pairs": 4}, ("vocab_size",)),
    ({"name": "mad_noisy_in_context_recall", "noise_vocab": 0}, ("frac_noise", "noise_vocab")),
    ({"name": "mad_fuzzy_in_context_recall", "k_motif_size": 9}, ("k_motif_size", "vocab_size")),
    ({"name": "mad_selective_copying", "seq_len": 20, "num_tokens_to_copy": 10}, ("seq_len", "num_tokens_to_copy")),
])
def test_bad_settings_name_the_setting(settings, words):
    with pytest.raises(ValueError) as err:
        tasks.build({**SMALL, **settings})
    assert all(w in str(err.value) for w in words), str(err.value)


def test_an_example_longer_than_the_batch_budget_names_both_settings():
    task = build("mad_compression")
    with pytest.raises(ValueError, match=r"(?s)23 tokens.*trainer\.max_tokens.*task\.seq_len"):
        task.batches("train", max_tokens=16)


# ---------------------------------------------------------------- jobs and experiments

def test_mqar_job_end_to_end_records_accuracy(make_cfg, tmp_path):
    cfg = make_cfg("model=transformer_tiny", "task=mqar", "task.n_train=64", "task.n_valid=16", "task.n_test=24",
                   "task.vocab_size=256", "task.seq_len=32", "task.num_kv_pairs=4", "trainer=smoke",
                   "eval.influence=false")
    job.run(cfg, tmp_path)
    rec = json.loads((tmp_path / "record.json").read_text())
    assert rec["status"] == "ok" and rec["task"]["name"] == "mqar" and rec["task"]["suite"] == "zoology"
    test = rec["metrics"]["test"]
    assert test["tokens"] == 4 * 24 and 0.0 <= test["accuracy"] <= 1.0
    assert sum(r["n"] for r in test["accuracy_by_distance"]) == 4 * 24
    assert all(r["distance"] & (r["distance"] - 1) == 0 for r in test["accuracy_by_distance"])  # octaves


@pytest.mark.parametrize("experiment, task_names", [("mqar", ["mqar", "mqar_128", "mqar_256", "mqar_512"]),
                                                    ("mad", list(MAD_TASKS))])
def test_suite_experiments_sweep_the_tasks_and_list_architectures_once(make_cfg, experiment, task_names):
    sweep = yaml.safe_load((ROOT / "conf" / "experiment" / f"{experiment}.yaml").read_text())
    params = sweep["hydra"]["sweeper"]["params"]
    assert sorted(params["task"].split(",")) == sorted(task_names)
    assert params["model"].startswith("${seqbench.models:_tiny}")  # every registered architecture, plug-ins too
    archs = job.preset_list("_tiny").split(",")
    assert archs == [f"{a}_tiny" for a in models.MODELS]
    assert len(params["trainer.lr"].split(",")) >= 2  # a grid per cell, the best kept by the report
    for name in task_names:  # every task has its preset
        assert (ROOT / "conf" / "task" / f"{name}.yaml").is_file(), name
    # another architecture joins by its preset's name: the experiment's shared model settings apply to it
    cfg = make_cfg(f"experiment={experiment}", f"task={task_names[-1]}", "model=lstm_tiny")
    assert cfg.task.name == ("mqar" if experiment == "mqar" else task_names[-1])
    assert cfg.model.name == "lstm" and cfg.model.n_layers == 2 and cfg.model.dropout == 0.0
    assert cfg.sweep_name == experiment and cfg.eval.influence is False


# ---------------------------------------------------------------- the suites' report

def _runs(rows: list[dict]) -> "pd.DataFrame":
    """A ``load(...).runs`` stand-in: finished training runs with their settings as the loader stores them."""
    import pandas as pd  # noqa: PLC0415

    out = []
    for r in rows:
        settings = {"model.d_model": r.get("d_model", 64), "trainer.lr": r["lr"],
                    "trainer.weight_decay": r.get("wd", 0.0), "task.seq_len": r.get("seq_len", 128)}
        if r["task"] == "mqar":
            settings.update({"task.num_kv_pairs": r["pairs"], "task.vocab_size": r.get("vocab", 8192)})
        out.append({"status": r.get("status", "ok"), "kind": "train", "task": r["task"], "label": r["arch"],
                    "seed": r.get("seed", 1), "test_accuracy": r["acc"],
                    "system_settings": json.dumps({k: json.dumps(v) for k, v in settings.items()})})
    return pd.DataFrame(out)


def test_mqar_report_keeps_the_best_lr_per_architecture_and_cell(tmp_path):
    from seqbench.reports import probe_suites  # noqa: PLC0415

    rows = []
    for arch, base in (("transformer", 0.9), ("lstm", 0.2)):
        for seq_len, pairs in ((64, 4), (128, 8)):
            for d in (32, 64):
                for lr, bonus in ((1e-3, 0.0), (3e-3, 0.05)):
                    for seed, noise in ((1, 0.01), (2, -0.01)):
                        rows.append({"task": "mqar", "arch": arch, "seq_len": seq_len, "pairs": pairs, "d_model": d,
                                     "lr": lr, "seed": seed, "acc": base + bonus + noise + d / 1000})
    rows.append({"task": "mqar", "arch": "lstm", "seq_len": 64, "pairs": 4, "d_model": 32, "lr": 1e-2, "acc": 1.0,
                 "status": "failed"})  # a failed job never counts
    rows.append({"task": "mqar", "arch": "lstm", "seq_len": 64, "pairs": 4, "d_model": 32, "lr": 1e-3, "acc": 0.99,
                 "vocab": 512})  # another vocabulary is another cell
    best = probe_suites.mqar_best(_runs(rows))
    assert len(best) == 2 * 2 * 2 + 1  # architecture x cell x width, and the other vocabulary's cell
    best, other = best[best["vocab_size"] == 8192], best[best["vocab_size"] == 512]
    assert other["accuracy"].tolist() == [0.99] and other["lr"].tolist() == [1e-3]
    assert (best["lr"] == 3e-3).all() and (best["grid_points"] == 2).all() and (best["seeds"] == 2).all()
    row = best[(best["label"] == "lstm") & (best["seq_len"] == 64) & (best["d_model"] == 32)].iloc[0]
    assert row["accuracy"] == pytest.approx(0.2 + 0.05 + 0.032) and row["std"] == pytest.approx(0.01 * 2 ** 0.5)
    sections = probe_suites.sections(_runs(rows), tmp_path)
    assert [s.title for s in sections] == ["MQAR (Zoology)"]
    fig = probe_suites.mqar_figure(best)
    assert [a.get_title() for a in fig.axes] == ["sequence length 64, 4 pairs", "sequence length 128, 8 pairs"]
    all_cells = probe_suites.mqar_figure(probe_suites.mqar_best(_runs(rows)))  # the other vocabulary: its own panel
    assert "sequence length 64, 4 pairs, vocabulary 512" in [a.get_title() for a in all_cells.axes]
    assert all(len(a.get_lines()) >= 2 for a in fig.axes)  # a line per architecture
    assert (tmp_path / "mqar_accuracy_vs_width.png").is_file()
    one_panel = best[~((best["label"] == "lstm") & (best["seq_len"] == 128))]  # the LSTM drawn in one panel only
    (legend,) = probe_suites.mqar_figure(one_panel).legends
    assert [t.get_text() for t in legend.get_texts()] == ["lstm", "transformer"]  # each architecture once


def test_mad_table_scores_architectures_over_the_six_tasks(tmp_path):
    from seqbench.reports import probe_suites  # noqa: PLC0415

    rows = []
    for i, task in enumerate(MAD_TASKS):
        for lr, wd, acc in ((1e-3, 0.0, 0.5), (1e-3, 0.01, 0.6 + i / 100), (3e-3, 0.0, 0.4)):
            rows.append({"task": task, "arch": "transformer", "lr": lr, "wd": wd, "acc": acc})
        rows.append({"task": task, "arch": "gru", "lr": 1e-3, "acc": 0.3})
    rows += [{"task": "mad_compression", "arch": "bytenet", "lr": 1e-3, "acc": 0.9}]  # one task only
    assert probe_suites.MAD_TASKS == MAD_TASKS  # the report's list (torch-free) is the tasks'
    table = probe_suites.mad_table(_runs(rows))
    assert list(table.columns) == [*MAD_TASKS, "MAD score"]
    assert list(table.index) == ["transformer", "gru", "bytenet"]  # by score; incomplete last
    assert table.loc["transformer", "mad_memorization"] == pytest.approx(0.65)  # best of the grid
    assert table.loc["transformer", "MAD score"] == pytest.approx(0.6 + 0.025)
    assert table.loc["gru", "MAD score"] == pytest.approx(0.3) and np.isnan(table.loc["bytenet", "MAD score"])
    sections = probe_suites.sections(_runs(rows), tmp_path)
    assert [s.title for s in sections] == ["MAD suite"] and (tmp_path / "mad_heatmap.png").is_file()
    assert probe_suites.sections(_runs(rows[:0] or [{"task": "ptb", "arch": "gru", "lr": 1e-3, "acc": 0.1}]),
                                 tmp_path) == []


def test_every_suite_preset_names_only_settings_its_task_takes():
    import inspect  # noqa: PLC0415

    files = sorted((ROOT / "conf" / "task").glob("mqar*.yaml")) + sorted((ROOT / "conf" / "task").glob("mad_*.yaml"))
    assert len(files) == 4 + len(MAD_TASKS)
    for file in files:
        preset = yaml.safe_load(file.read_text())
        for parent in [d for d in preset.pop("defaults", []) if d != "_self_"]:  # mqar_128: the mqar preset, changed
            preset = {**yaml.safe_load((file.parent / f"{parent}.yaml").read_text()), **preset}
        builder = tasks.TASKS[preset.pop("name")]
        takes = {n for n, p in inspect.signature(builder).parameters.items() if p.kind == p.KEYWORD_ONLY}
        assert set(preset) <= takes, (file.name, set(preset) - takes)
        assert preset["data_seed"] == 1234 and preset["n_test"] >= 1000, file.name


# ---------------------------------------------------------------- the README's tables are the kept records'

README_NAMES = {"Transformer": "transformer", "Transformer++": "transformer_pp", "GLA": "gla", "Mamba": "mamba",
                "LSTM": "lstm", "GRU": "gru", "ConvS2S": "convs2s", "ByteNet": "bytenet"}


def readme_table(first_cell: str) -> dict[str, dict[str, str]]:
    """The README's Markdown table whose header starts with ``first_cell``: {row label: {column: cell}}."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    cells = [[c.strip().strip("*") for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
             for line in lines]
    start = next(i for i, row in enumerate(cells) if row and row[0] == first_cell and set(row[1:]) == set(README_NAMES))
    end = cells.index(None, start)  # the first line after the table
    return {row[0]: dict(zip(cells[start][1:], row[1:])) for row in cells[start + 2:end]}


def test_the_readme_mad_and_mqar_tables_are_what_the_kept_records_give():
    """Every number of the README's two probe tables, recomputed from docs/records by the suites' report code."""
    from seqbench.reports.load import load
    from seqbench.reports.probe_suites import MAD_TASKS as REPORT_TASKS, mad_table, mqar_best

    mad = mad_table(load([str(ROOT / "docs" / "records" / "mad_cpu")]).runs)
    rows = {"MAD score": "MAD score", **dict(zip(("in-context recall", "fuzzy recall", "noisy recall",
                                                  "selective copying", "compression", "memorization"), REPORT_TASKS))}
    table = readme_table("")
    assert set(table) == set(rows) and set(table["MAD score"]) == set(README_NAMES)
    for row, column in rows.items():
        for name, cell in table[row].items():
            assert cell == f"{mad.loc[README_NAMES[name], column]:.2f}", (row, name)

    folders = [str(p) for p in sorted((ROOT / "docs" / "records" / "mqar_cpu").glob("*/")) if p.is_dir()]
    best = mqar_best(load(folders).runs).set_index(["label", "d_model"])["accuracy"]
    table = readme_table("test accuracy")
    assert set(table) == {"width 32", "width 64", "width 128"}
    for row, cells in table.items():
        for name, cell in cells.items():
            key = (README_NAMES[name], int(row.split()[1]))
            if cell == "–":  # a job still to finish: its record, once kept, must replace the dash
                assert key not in best.index, f"the README's {name} at {row} has a record now: its accuracy, not '–'"
                continue
            assert key in best.index, f"the README's {name} at {row} has no record in docs/records/mqar_cpu"
            assert cell == f"{best.loc[key]:.3f}", (row, name)
