"""Path-length analysis (Table 1): exact path lengths per layer type on tiny presets, and the reachability check."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from seqbench.harness.analysis import path_length as pl
from seqbench import models
from seqbench.models.common import LanguageModel
from seqbench.reports.load import load
from tests.conftest import ROOT

V = pl.VOCAB


def lm(name: str, preset: str = "tiny", **settings) -> nn.Module:
    return pl.build_lm(pl.preset_config(name, preset, settings), V)


def measure(model: nn.Module, ns: list[int]) -> dict:
    return pl.measure(model, ns, vocab_size=V, device=None)


def test_self_attention_path_length_is_constant():
    r = measure(lm("transformer"), [4, 16, 48])
    assert r["layer_type"] == "self-attention"
    assert r["max_path_length"] == [1, 1, 1] and r["min_depth_for_distance"] == [1, 1, 1]
    assert r["growth"] == "constant" and r["sequential_ops_growth"] == "constant"


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_recurrent_path_length_is_exactly_n(arch):
    ns = [4, 9, 16, 33]
    r = measure(lm(arch), ns)
    assert r["layer_type"] == "recurrent" and all(r["recurrent_blocks"])
    # one step to enter at position 0, then n - 1 steps along the hidden state
    assert r["max_path_length"] == ns
    assert r["min_depth_for_distance"] == [1] * len(ns)
    assert r["growth"] == "linear" and r["fit"]["slope"] == pytest.approx(1.0)
    assert r["sequential_ops_growth"] == "linear"  # the autograd graph deepens with n: measured, not assumed


@pytest.mark.parametrize("k", [2, 3, 5])
def test_causal_convolution_depth_is_ceil_n_minus_1_over_k_minus_1(k):
    ns = [2, 5, 8, 13, 32]
    r = measure(lm("convs2s", kernel_size=k), ns)
    expected = [math.ceil((n - 1) / (k - 1)) for n in ns]
    assert r["layer_type"] == "convolutional"
    assert r["min_depth_for_distance"] == expected and r["max_path_length"] == expected
    assert r["model_path_length"][0] == 2  # the preset's own 2 blocks connect n = 2 in 2 steps
    assert r["sequential_ops_growth"] == "constant"


@pytest.mark.parametrize("k", [2, 3])
def test_dilated_convolution_depth_grows_with_log2_n(k):
    ns = [n for n in (2, 3, 4, 7, 8, 15, 16, 31, 32, 63) if n - 1 <= (k - 1) * 31]  # within one 1..16 cycle
    r = measure(lm("bytenet", n_layers=5, dilations=[1, 2, 4, 8, 16], kernel_size=k), ns)
    expected = [math.ceil(math.log2((n - 1) / (k - 1) + 1)) for n in ns]
    assert r["layer_type"] == "dilated convolutional"
    assert r["min_depth_for_distance"] == expected and r["max_path_length"] == expected
    assert pl.fit_growth([8, 16, 32], [3, 4, 5])["growth"] == "logarithmic"


@pytest.mark.parametrize("window", [2, 4])
def test_restricted_attention_grows_as_n_over_r(window):
    ns = [2, 5, 6, 9, 16, 33]
    r = measure(lm("transformer_restricted", attn_window=window), ns)
    expected = [math.ceil((n - 1) / window) for n in ns]
    assert r["layer_type"] == "restricted self-attention"
    assert r["max_path_length"] == expected and r["min_depth_for_distance"] == expected
    assert r["growth"] == "linear" and r["fit"]["slope"] == pytest.approx(1 / window, rel=0.1)


class SecretMix(nn.Module):
    """Runs a block, then adds the mean over positions: every output then depends on every input."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) + x.mean(dim=1, keepdim=True)


class HiddenMixLM(LanguageModel):
    """A convolutional LM whose forward runs SecretMix wrappers while mixing_blocks() lists the innocent blocks."""

    def __init__(self):
        super().__init__()
        self.base = lm("convs2s")
        self.secret = nn.ModuleList(SecretMix(b) for b in self.base.mixing_blocks())

    def embed(self, tokens):
        return self.base.embed(tokens)

    def head(self, x):
        return self.base.head(x)

    def mixing_blocks(self):
        return [s.inner for s in self.secret]

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.secret:
            x = block(x)
        return self.head(x)


def test_mixing_outside_the_listed_blocks_is_caught():
    with pytest.raises(pl.PathLengthError, match="the model connects but its mixing_blocks"):
        measure(HiddenMixLM(), [8])


def test_a_block_given_an_innocent_pattern_is_caught(monkeypatch):
    model = lm("convs2s")
    model.blocks[0] = SecretMix(model.blocks[0])
    assert measure(model, [16])["max_path_length"] == [1]  # measured honestly, the mean connects everything

    real = pl.dependencies
    def innocent(fn, x, generator):  # the secret block reports its inner convolution's pattern
        return real(fn.inner if isinstance(fn, SecretMix) else fn, x, generator)
    monkeypatch.setattr(pl, "dependencies", innocent)
    with pytest.raises(pl.PathLengthError, match="something outside the listed blocks mixes positions"):
        measure(model, [16])


def test_shortest_path_may_leave_a_slow_block_for_a_fast_one():
    n = 12
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    steps = [pl.step_lengths(causal, recurrent=True), pl.step_lengths(causal, recurrent=False)]
    paths = pl.shortest_paths(steps, max_depth=50)
    assert paths["model"][n - 1, 0] == 2  # enter the recurrence at 0 (1 step), then attend to n - 1 (1 step)
    assert paths["best"][n - 1, 0] == 2 and paths["first"][n - 1, 0] == 1
    assert paths["best"][n - 1, n - 1] == 1 and torch.isinf(paths["best"][0, n - 1])


def test_a_recurrent_pattern_a_chain_cannot_realise_is_rejected():
    gappy = torch.eye(6, dtype=torch.bool)
    gappy[5, 0] = True
    with pytest.raises(pl.PathLengthError, match="chain"):
        pl.step_lengths(gappy, recurrent=True)


def test_growth_fits():
    ns = [8, 16, 32, 64, 128]
    assert pl.fit_growth(ns, [2] * 5)["growth"] == "constant"
    assert pl.fit_growth(ns, [n / 2 for n in ns])["growth"] == "linear"
    assert pl.fit_growth(ns, [math.log2(n) for n in ns])["growth"] == "logarithmic"
    assert pl.exponent(ns, [n**2 for n in ns]) == pytest.approx(2.0)


def test_cli_writes_records_the_report_reads(tmp_path, capsys):
    code = pl.main(["--out", str(tmp_path), "--models", "transformer,lstm,nosuch", "--n", "4,8",
                    "--device", "cpu", "--reps", "2"])
    assert code == 1  # the unknown model failed, the others carried on
    table = capsys.readouterr().out
    assert "| transformer-tiny | self-attention | O(n²·d) | O(1) | O(1) | 1, 1 | constant (1) |" in table
    assert "| lstm-tiny | recurrent | O(n·d²) | O(n) | O(n) | 4, 8 | linear (1·n +0) |" in table
    assert load([tmp_path / "nosuch"]).runs["status"].tolist() == ["failed"]
    paths = load([tmp_path / "transformer", tmp_path / "lstm"]).path_length
    assert sorted(zip(paths["model"], paths["n"], paths["max_path_length"])) == [
        ("lstm", 4, 4), ("lstm", 8, 8), ("transformer", 4, 1), ("transformer", 8, 1)]
    assert set(paths["layer_type"]) == {"self-attention", "recurrent"}


def test_experiment_defaults_name_real_presets():
    defaults = pl.yaml.safe_load(pl.EXPERIMENT.read_text())["path_length"]
    for name in defaults["models"]:
        cfg = pl.preset_config(name, defaults["preset"], defaults["settings"].get(name))
        assert cfg["name"] in models.MODELS
    with pytest.raises(KeyError, match="valid presets: .*transformer_restricted_tiny"):
        pl.preset_config("nosuch", "tiny")


# ---------------------------------------------------------------- through run.py (job: path_length)

def test_experiment_sweep_names_the_cli_models(make_cfg):
    exp = pl.yaml.safe_load(pl.EXPERIMENT.read_text())
    node = exp["path_length"]
    assert exp["hydra"]["sweeper"]["params"]["model"].split(",") == [f"{m}_{node['preset']}" for m in node["models"]]
    cfg = make_cfg("experiment=path_length")
    assert cfg.job == "path_length" and cfg.model.preset == "tiny" and cfg.sweep_name == "path_length"
    assert make_cfg().job == "train"


def test_path_length_job_applies_the_experiment_settings(make_cfg, tmp_path):
    cfg = make_cfg("experiment=path_length", "model=bytenet_tiny", "path_length.n=[4,8]", "path_length.device=none")
    rec = pl.run(cfg, tmp_path)
    on_disk = json.loads((tmp_path / "record.json").read_text())
    assert rec["status"] == "ok" and rec["job"]["name"] == "path_length_bytenet-tiny"
    assert rec["path_length"]["model_depth"] == 7  # the node's bytenet settings: dilations 1..64
    assert rec["path_length"]["max_path_length"] == [2, 3]  # ceil(log2((n-1)/2 + 1)) at n = 4, 8
    assert rec["path_length"]["latency_s"] is None
    assert rec["config"]["path_length"]["settings"] == {"n_layers": 7, "dilations": [1, 2, 4, 8, 16, 32, 64]}
    assert on_disk["status"] == "ok"
    rows = load([tmp_path]).path_length
    assert rows["max_path_length"].tolist() == [2, 3] and rows["model"].tolist() == ["bytenet", "bytenet"]


def test_path_length_job_failure_is_a_failed_record(make_cfg, tmp_path):
    cfg = make_cfg("experiment=path_length", "model=transformer_tiny", "model.n_heads=3", "path_length.n=[4]",
                   "path_length.device=none")
    rec = pl.run(cfg, tmp_path / "quiet", raise_errors=False)
    assert rec["status"] == "failed" and "not divisible by n_heads=3" in rec["error"]
    assert load([tmp_path / "quiet"]).runs["status"].tolist() == ["failed"]
    with pytest.raises(RuntimeError, match="path_length_transformer-tiny failed: .*n_heads=3"):
        pl.run(cfg, tmp_path / "loud")


def test_run_py_experiment_path_length_writes_a_record(tmp_path, data_root):
    """``python run.py experiment=path_length`` analyses (no training) and writes the record the report reads."""
    env = {**os.environ, "SEQBENCH_DATA_ROOT": str(data_root)}
    out = subprocess.run([sys.executable, "run.py", "experiment=path_length", "model=lstm_tiny", "path_length.n=[4,8]",
                          "path_length.reps=2", "path_length.device=cpu", f"hydra.run.dir={tmp_path}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[seqbench] path_length_lstm-tiny: ok | max path length [4, 8] at n = [4, 8] (recurrent)" in out.stdout
    rec = json.loads((tmp_path / "record.json").read_text())
    assert rec["status"] == "ok" and "metrics" not in rec and not (tmp_path / "last.pt").exists()
    assert rec["path_length"]["max_path_length"] == [4, 8] and len(rec["path_length"]["latency_s"]) == 2
    paths = load([tmp_path]).path_length
    assert sorted(zip(paths["model"], paths["n"], paths["max_path_length"])) == [("lstm", 4, 4), ("lstm", 8, 8)]


@pytest.mark.slow
def test_run_py_multirun_over_models_builds_the_report(tmp_path, data_root):
    env = {**os.environ, "SEQBENCH_DATA_ROOT": str(data_root)}
    out = subprocess.run([sys.executable, "run.py", "-m", "experiment=path_length", "model=lstm_tiny,transformer_tiny",
                          "path_length.n=[4,8]", "path_length.device=none", f"hydra.sweep.dir={tmp_path}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(p.parent.name for p in tmp_path.glob("*/record.json")) == ["0_lstm-tiny", "1_transformer-tiny"]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "lstm" in report and "transformer" in report
    paths = load([tmp_path]).path_length
    assert sorted(zip(paths["model"], paths["max_path_length"])) == [("lstm", 4), ("lstm", 8), ("transformer", 1),
                                                                      ("transformer", 1)]


def test_table1_states_a_chunked_scan_s_recurrent_path_and_its_parallel_depth_apart():
    """Mamba and GLA are recurrences trained by chunked scans: Table 1's paper columns say both, and the measured
    path grows with n (the state carries every position), whatever the chunk."""
    rows = {}
    for arch in ("mamba", "gla"):
        model = pl.build_lm(pl.preset_config(arch, "tiny"))
        rows[f"{arch}-tiny"] = pl.measure(model, [8, 16], vocab_size=pl.VOCAB)
    table = pl.table1_markdown(rows)
    assert "| mamba-tiny | recurrent | O(n·d·N) (state N) | O(n) as a recurrence; O(log n) as a parallel scan |" in table
    assert "| gla-tiny | recurrent | O(n·d²/h) (h heads) | O(n) as a recurrence; O(n/c) chunkwise (chunk c) |" in table
    assert all(r["max_path_length"][1] > r["max_path_length"][0] for r in rows.values())
