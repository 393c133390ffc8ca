"""A new kind of task needs only its class (the interface of tasks/base.py) and its config: this module defines
sequence classification by majority symbol and runs it through a job and the report, touching neither harness/
nor reports/. Also: the packages' import layering."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from seqbench import reports
from seqbench import tasks
from seqbench.harness import checkpoint, job
from seqbench.tasks.base import EvalContext, Task
from seqbench.tasks.batching import Batch

IGNORE = -100
QUERY, FIRST = 1, 2  # id 0 unused; the query marker; then the symbols


class MajorityTask:
    """Which of ``n_symbols`` symbols occurs most often in a sequence of ``length`` (the maximum is unique).

    Trained in the language-model form: the model reads the sequence and a query marker, and the class is the
    target at the query's position only.
    """

    name, family, form, metrics = "majority", "classification", "lm", ("accuracy",)

    def __init__(self, n_symbols: int, length: int, sizes: dict[str, int], seed: int):
        rng = np.random.default_rng(seed)
        self.n_symbols, self.data = n_symbols, {}
        for split, n in sizes.items():
            seqs = rng.integers(0, n_symbols, size=(4 * n, length))
            counts = np.stack([(seqs == k).sum(1) for k in range(n_symbols)], 1)  # (N, k)
            unique = (counts == counts.max(1, keepdims=True)).sum(1) == 1
            seqs, labels = seqs[unique][:n], counts[unique][:n].argmax(1)
            tokens = np.concatenate([seqs + FIRST, np.full((n, 1), QUERY)], 1)  # (N, L+1)
            self.data[split] = {"tokens": tokens, "labels": labels + FIRST}

    def vocab(self) -> dict[str, int]:
        return {"lm": FIRST + self.n_symbols}

    def describe(self) -> dict:
        return {"name": self.name, "family": self.family, "form": self.form, "metrics": list(self.metrics),
                "vocab": self.vocab()["lm"], "examples": {s: len(d["labels"]) for s, d in self.data.items()}}

    def data_arrays(self) -> dict[str, list]:
        return {s: [d["tokens"], d["labels"]] for s, d in self.data.items()}

    def batches(self, split: str, max_tokens: int, epoch: int = 0, shuffle: bool = False,
                seed: int = 0) -> list[Batch]:
        tokens, labels = self.data[split]["tokens"], self.data[split]["labels"]
        order = np.random.default_rng(seed + epoch).permutation(len(labels)) if shuffle else np.arange(len(labels))
        rows = max(1, max_tokens // tokens.shape[1])
        out = []
        for k in range(0, len(order), rows):
            idx = order[k : k + rows]
            target = torch.full(tokens[idx].shape, IGNORE)
            target[:, -1] = torch.as_tensor(labels[idx])
            out.append(Batch({"tokens": torch.as_tensor(tokens[idx])}, target, len(idx), idx.tolist(), IGNORE))
        return out

    def validate(self, model, ctx: EvalContext) -> dict:
        return {"valid_accuracy": self.evaluate(model, "valid", ctx)[0]["accuracy"]}

    @torch.no_grad()
    def evaluate(self, model, split: str, ctx: EvalContext) -> tuple[dict, dict]:
        model.eval()
        hits = n = 0
        for batch in self.batches(split, ctx.max_tokens):
            batch = batch.to(ctx.device)
            predicted = model(**batch.inputs)[:, -1].argmax(-1)
            hits += int((predicted == batch.target[:, -1]).sum())
            n += len(predicted)
        return {"accuracy": hits / n, "examples": n}, {}


def majority(root=None, cache_dir=None, *, n_symbols: int = 3, length: int = 9, n_train: int = 256,
             n_valid: int = 64, n_test: int = 96, data_seed: int = 0) -> MajorityTask:
    return MajorityTask(n_symbols, length, {"train": n_train, "valid": n_valid, "test": n_test}, data_seed)


@pytest.fixture
def majority_cfg(make_cfg, monkeypatch):
    """The registry entry and the config a new task kind brings (a conf/task/majority.yaml would hold the node)."""
    monkeypatch.setitem(tasks.TASKS, "majority", majority)
    cfg = make_cfg("model=transformer_tiny", "trainer=smoke", "trainer.max_steps=6", "trainer.max_tokens=200",
                   "logger=none")
    with open_dict(cfg):
        cfg.task = OmegaConf.create({"name": "majority", "n_symbols": 3, "length": 9})
    return cfg


def test_a_new_task_kind_runs_through_a_job_and_the_report(majority_cfg, tmp_path):
    assert isinstance(majority(), Task)  # the protocol's members are all there
    rec = job.run(majority_cfg, tmp_path / "records" / "run")
    assert rec["status"] == "ok", rec.get("error")
    assert rec["task"]["family"] == "classification" and rec["model"]["form"] == "lm"

    # the record's test accuracy is the evaluated checkpoint's, recomputed here by hand
    _, _, model, identity = job._build(majority_cfg, torch.device("cpu"))
    model.load_state_dict(checkpoint.load(tmp_path / "records" / "run" / "best.pt", identity)["model"])
    task = majority()
    tokens, labels = (torch.as_tensor(task.data["test"][k]) for k in ("tokens", "labels"))
    with torch.no_grad():
        expected = (model.eval()(tokens)[:, -1].argmax(-1) == labels).double().mean().item()
    assert rec["metrics"]["test"] == {"accuracy": pytest.approx(expected), "examples": 96}
    valid = rec["curves"]["valid"]
    assert [row["step"] for row in valid] == [2, 4, 6] and all(0 <= row["valid_accuracy"] <= 1 for row in valid)

    out = reports.build([tmp_path / "records"], tmp_path / "report")
    summary = pd.read_csv(tmp_path / "report" / "summary.csv")
    (row,) = summary[summary["task"] == "majority"].to_dict("records")
    assert row["family"] == "classification" and row["metrics"] == "accuracy"
    assert row["test_accuracy_mean"] == pytest.approx(expected)
    curves = pd.read_csv(tmp_path / "report" / "curves.csv")
    assert curves["valid_accuracy"].tolist() == pytest.approx([r["valid_accuracy"] for r in valid])
    text = out.with_suffix(".md").read_text()
    assert "### Task majority" in text and "test accuracy" in text


@pytest.mark.parametrize("code", [
    "import seqbench.reports, seqbench.reports.callback, sys; assert 'torch' not in sys.modules, 'reports imported torch'",
    "import seqbench.harness.schema, seqbench.harness.secrets, seqbench.harness.metrics, sys; "
    "assert 'torch' not in sys.modules",
    "import seqbench.tasks, sys; assert 'seqbench.models' not in sys.modules, 'tasks imported models'",
])
def test_import_layering(code):
    """The report runs where pandas does (no torch), and the data never depends on the models."""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
