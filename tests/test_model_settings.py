"""Model hyperparameters are checked with the other settings, before anything is built: a bad value fails the job at
start-up with a message naming the setting and what is valid, never inside torch. Also the benchmark's options."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from seqbench import models
from seqbench.harness import job, settings
from seqbench.harness.bench.suites import parse_args

ROOT = Path(__file__).resolve().parents[1]

# (preset, override, what the message must say): the setting, the value and what is valid
BAD_MODELS = [
    ("transformer_tiny", "model.n_heads=0", ["model.n_heads=0", "positive integer"]),
    ("transformer_tiny", "model.n_heads=5", ["model.d_model=32", "model.n_heads=5", "divisor", "1, 2, 4, 8, 16, 32"]),
    ("transformer_tiny", "model.n_layers=0", ["model.n_layers=0", "positive integer"]),
    ("transformer_tiny", "model.d_model=abc", ["model.d_model='abc'", "positive integer"]),
    ("transformer_tiny", "model.d_model=-5", ["model.d_model=-5", "positive integer"]),
    ("transformer_tiny", "model.d_model=32.5", ["model.d_model=32.5", "positive integer"]),
    ("transformer_tiny", "model.d_ff=0", ["model.d_ff=0", "positive integer"]),
    ("transformer_tiny", "model.dropout=1.0", ["model.dropout=1.0", "[0, 1)"]),
    ("transformer_tiny", "+model.attn_dropout=-0.1", ["model.attn_dropout=-0.1", "[0, 1)"]),
    ("transformer_tiny", "+model.pre_norm=maybe", ["model.pre_norm='maybe'", "true or false"]),
    ("transformer_tiny", "+model.n_decoder_layers=0", ["model.n_decoder_layers=0", "positive integer or null"]),
    ("transformer_tiny", "+model.n_head=4", ["model.n_head", "not a setting of transformer", "n_heads"]),
    ("transformer_restricted_tiny", "model.attn_window=0", ["model.attn_window=0", "positive integer or null"]),
    ("lstm_tiny", "model.n_layers=-1", ["model.n_layers=-1", "positive integer"]),
    ("lstm_tiny", "model.d_model=33", ["model.d_model=33", "even", "model.bidirectional=false"]),
    ("lstm_tiny", "model.attention=dot", ["model.attention='dot'", "luong, bahdanau"]),
    ("lstm_tiny", "+model.residual_from=1", ["model.residual_from=1", "integer >= 2"]),
    ("lstm_tiny", "+model.n_bidirectional_layers=3", ["model.n_bidirectional_layers=3", "model.n_layers=2"]),
    ("gru_tiny", "model.input_feed=2", ["model.input_feed=2", "true or false"]),
    ("gru_tiny", "model.d_model=0", ["model.d_model=0", "positive integer"]),
    ("convs2s_tiny", "model.kernel_size=0", ["model.kernel_size=0", "positive integer"]),
    ("convs2s_tiny", "+model.layers=[[32,3],[32]]", ["model.layers=", "[channels, kernel_size] pairs"]),
    ("convs2s_tiny", "+model.d_out=16", ["model.d_out=16", "model.d_model=32", "model.tie_output=false"]),
    ("convs2s_tiny", "model.max_positions=0", ["model.max_positions=0", "positive integer"]),
    ("convs2s_tiny", "+model.weight_norm=1", ["model.weight_norm=1", "true or false"]),
    ("bytenet_tiny", "model.dilations=[]", ["model.dilations=[]", "non-empty list of positive integers"]),
    ("bytenet_tiny", "model.dilations=[1,0]", ["model.dilations=[1, 0]", "non-empty list of positive integers"]),
    ("bytenet_tiny", "model.d_model=1", ["model.d_model=1", "at least 2"]),
    ("bytenet_tiny", "+model.unfold_a=-1", ["model.unfold_a=-1", ">= 0"]),
    ("bytenet_tiny", "model.kernel_size=-3", ["model.kernel_size=-3", "positive integer"]),
    ("transformer_tiny", "model.name=rnn", ["model.name='rnn'", "transformer, lstm, gru, convs2s, bytenet", "model.architecture"]),
]


@pytest.mark.parametrize("preset,override,words", BAD_MODELS, ids=[f"{p}:{o}" for p, o, _ in BAD_MODELS])
def test_a_bad_model_setting_is_named_with_what_is_valid(make_cfg, preset, override, words):
    found = settings.problems(make_cfg(f"model={preset}", "task=copy", override))
    assert len(found) == 1, found
    assert all(w in found[0] for w in words), found[0]


def test_every_model_hyperparameter_has_a_rule():
    """Each keyword of every model constructor is in the settings table (a new one must be given a rule)."""
    for arch in models.ARCHITECTURES.values():  # a registered architecture may bring rules of its own
        taken = {k for cls in arch.classes for k in models.accepted_kwargs(cls)}
        assert taken - set(settings.MODEL_SETTINGS) - set(arch.settings) == set(), arch.name


def test_every_shipped_model_preset_passes_the_check(make_cfg):
    cfg = make_cfg()
    presets = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))
    assert len(presets) > 15 and settings.problems(cfg) == []
    for preset in presets:
        cfg.model = models.load_preset(preset)
        assert settings.model_problems(cfg) == [], preset


def test_every_bad_model_setting_is_named_at_once(make_cfg, tmp_path):
    """The job fails at start-up (no data read, nothing built), naming each bad setting."""
    rec = job.run(make_cfg("model=transformer_tiny", "task=copy", "model.n_heads=0", "model.dropout=2"),
                  tmp_path / "run", raise_errors=False)
    assert rec["status"] == "failed" and rec["error"].startswith("SettingError: ")
    assert "model.n_heads=0" in rec["error"] and "model.dropout=2" in rec["error"]
    assert "task" not in rec and not list((tmp_path / "run").glob("*.pt"))


def run_py(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *args, "device=cpu", "data.download=false"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})


def test_bad_model_settings_through_run_py_fail_each_sweep_job_at_start_up(tmp_path):
    """``python run.py -m ... model.n_heads=0,3``: each job fails at the settings check with its message (no
    ZeroDivisionError from torch) and leaves a failed record; the sweep exits non-zero."""
    res = run_py("-m", "model=transformer_tiny", "task=copy", "trainer=smoke", "model.n_heads=0,3",
                 f"hydra.sweep.dir={tmp_path / 'sweep'}")
    output = res.stdout + res.stderr
    assert res.returncode != 0 and "ZeroDivisionError" not in output
    assert "model.n_heads=0 must be a positive integer" in output
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/record.json"))]
    assert len(records) == 2 and all(r["status"] == "failed" and "task" not in r for r in records), records
    assert [r["error"].splitlines()[0] for r in records] == [
        "SettingError: model.n_heads=0 must be a positive integer",
        "SettingError: model.d_model=32 is not divisible by model.n_heads=3: each head gets d_model / n_heads "
        "dimensions; set model.n_heads to a divisor of d_model (1, 2, 4, 8, 16, 32)"]


@pytest.mark.parametrize("argv,words", [
    (["--beam", "0"], ["--beam 0", "positive integer"]),
    (["--steps", "0"], ["--steps 0", "positive integer"]),
    (["--threads", "0"], ["--threads 0", "positive integer"]),
    (["--decode-batch", "-2"], ["--decode-batch -2", "positive integer"]),
    (["--len-a", "-1"], ["--len-a -1.0", ">= 0"]),
    (["--preset", "tiny", "--beam", "100"], ["--beam 100", "vocabulary", "at most 64"]),
])
def test_the_benchmark_refuses_options_it_would_replace_or_divide_by(argv, words, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_args(["--suite", "decode", *argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
