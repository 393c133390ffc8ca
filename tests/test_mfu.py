"""Model FLOPs utilisation: the measured matmul peak (harness/peak.py), its per-machine cache, the record's
costs.mfu / peak_flops / peak_method, and the benchmark's MFU columns."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

from seqbench import models
from seqbench.harness import job, peak, schema
from seqbench.harness.bench import suites as bench
from seqbench.harness.bench.state import flop_rate

CPU = torch.device("cpu")
TINY_SHAPES = [(8, 16, 32), (8, 32, 16)]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The cache folder of this test, through the environment variable the harness reads; a quiet machine."""
    monkeypatch.setenv(peak.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(peak, "busy_cpus", lambda sample_s: 0.0)
    return tmp_path / "cache" / peak.CACHE_NAME


@pytest.fixture
def benchmarks(monkeypatch):
    """Count the benchmarks run; each reports 2e9 FLOP/s at every shape, on a quiet machine."""
    calls = []
    monkeypatch.setattr(peak, "busy_cpus", lambda sample_s: 0.0)

    def fake(device, dtype, shapes, samples=peak.SAMPLES):
        calls.append((dtype, [tuple(s) for s in shapes]))
        return 2e9, [2e9] * len(shapes)
    monkeypatch.setattr(peak, "benchmark", fake)
    return calls


# -- arithmetic -----------------------------------------------------------------------------------------------
def test_mfu_is_counted_flops_per_second_over_the_peak():
    p = peak.Peak(1e11, "best of 3 timed samples ...", False, {})
    entry = peak.costs(p, train_flops=3e10, train_seconds=3.0)
    assert entry == {"mfu": pytest.approx(0.1), "peak_flops": 1e11, "peak_method": p.method, "mfu_note": None}
    # two data-parallel processes, two devices: twice the peak, half the utilisation
    both = peak.costs(p, train_flops=3e10, train_seconds=3.0, processes=2)
    assert both["peak_flops"] == 2e11 and both["mfu"] == pytest.approx(0.05)
    assert both["peak_method"].endswith("; x 2 processes")


def test_a_missing_peak_or_time_leaves_mfu_null_with_the_reason():
    failed = peak.Peak(None, None, False, note="peak FLOP/s not measured: RuntimeError: no device")
    assert peak.costs(failed, 3e10, 3.0) == {"mfu": None, "peak_flops": None, "peak_method": None,
                                             "mfu_note": failed.note}
    untimed = peak.costs(peak.Peak(1e11, "m", True), 0.0, 0.0)
    assert untimed["mfu"] is None and "no training time" in untimed["mfu_note"]
    assert "no peak" in peak.costs(None, 3e10, 3.0)["mfu_note"]


def test_a_failing_measurement_never_raises(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("matmul failed")
    monkeypatch.setattr(peak, "measure", broken)
    model = nn.Linear(4, 4)
    batch = type("B", (), {"target": torch.zeros(2, 3)})()
    p = peak.for_run(model, [batch], CPU, "fp32")
    assert p.peak_flops_per_s is None and p.note == "peak FLOP/s not measured: RuntimeError: matmul failed"
    assert peak.for_run(model, [], CPU, "fp32").note.startswith("peak FLOP/s not measured: ValueError")


# -- the shapes -------------------------------------------------------------------------------------------------
def test_shapes_are_the_models_widths_by_their_share_of_the_work():
    cfg = bench.presets("tiny", ["transformer"])[0][1]  # d_model 32, d_ff 64, vocab 64 below
    model = models.build(cfg, bench.translation_task(64))
    shapes = peak.model_shapes(model, 40)
    assert len(shapes) == peak.MAX_SHAPES and all(m == 40 for m, _, _ in shapes)
    widths = [(k, n) for _, k, n in shapes]
    assert (32, 64) in widths and (64, 32) in widths  # the feed-forward layers: the most multiply-adds
    rnn = nn.LSTM(8, 16)  # weight_ih (64 x 8), weight_hh (64 x 16): in -> 4 gates
    assert peak.model_shapes(rnn, 5) == [(5, 16, 64), (5, 8, 64)]
    assert peak.model_shapes(nn.Embedding(10, 4), 5) == []  # a lookup is no product
    with pytest.raises(ValueError, match="tokens=0"):
        peak.model_shapes(model, 0)


def test_the_first_dimension_is_capped_to_the_product_budget():
    m, k, n = peak.capped((10**6, 1024, 1024), "cpu")
    assert 2 * m * k * n <= peak.MAX_PRODUCT_FLOPS["cpu"] < 2 * (m + 1) * k * n
    assert peak.capped((8, 16, 32), "cpu") == (8, 16, 32)
    assert peak.capped((8, 10**5, 10**5), "cpu")[0] == 1
    # a wide output layer on a GPU: within the FLOPs, but its result would take gigabytes of the job's memory
    m, k, n = peak.capped((10**6, 512, 37000), "cuda", element_bytes=2)
    assert 2 * m * k * n < peak.MAX_PRODUCT_FLOPS["cuda"]
    assert 2 * (m * k + k * n + m * n) <= peak.MAX_PRODUCT_BYTES < 2 * ((m + 1) * (k + n) + k * n)


def test_a_model_without_weight_matrices_falls_back_to_the_square_set(cache, benchmarks):
    batch = type("B", (), {"target": torch.zeros(2, 3)})()
    p = peak.for_run(nn.Embedding(10, 4), [batch], CPU, "fp32")
    assert p.key["shapes"] == [list(peak.capped(s, "cpu")) for s in peak.square_shapes()]
    assert all(k == n for _, k, n in p.key["shapes"]) and p.peak_flops_per_s == 2e9


# -- the cache --------------------------------------------------------------------------------------------------
def test_a_real_measurement_is_cached_and_read_back_without_a_benchmark(cache, monkeypatch):
    first = peak.measure(CPU, "fp32", TINY_SHAPES)
    assert not first.cached and first.peak_flops_per_s > 0
    assert first.key == {"device_name": peak.device_name(CPU), "device_type": "cpu", "dtype": "fp32",
                         "threads": torch.get_num_threads(), "torch": torch.__version__,
                         "float32_matmul_precision": torch.get_float32_matmul_precision(),
                         "shapes": [list(s) for s in TINY_SHAPES]}
    assert first.method.startswith(f"best of up to {peak.SAMPLES} timed samples of fp32 matmuls at shapes "
                                   "(8x16)@(16x32), (8x32)@(32x16) on ")
    assert f"threads {torch.get_num_threads()}" in first.method
    stored = json.loads(cache.read_text())
    assert stored["version"] == peak.CACHE_VERSION and len(stored["entries"]) == 1

    def no_benchmark(*args, **kwargs):
        raise AssertionError("the cached peak should have been read")
    monkeypatch.setattr(peak, "benchmark", no_benchmark)
    second = peak.measure(CPU, "fp32", TINY_SHAPES)
    assert second.cached and second.peak_flops_per_s == first.peak_flops_per_s and second.method == first.method


def test_a_cpu_peak_measured_beside_other_work_serves_its_run_and_is_not_cached(cache, benchmarks, monkeypatch,
                                                                                  caplog):
    import os

    monkeypatch.setattr(peak, "busy_cpus", lambda sample_s: float(os.cpu_count() or 1))  # every CPU busy
    with caplog.at_level(logging.WARNING, logger="seqbench"):
        first = peak.measure(CPU, "fp32", TINY_SHAPES)
    assert first.peak_flops_per_s == 2e9 and "not cached" in first.method and "busy" in caplog.text
    assert not cache.exists() or peak._entry_id(first.key) not in json.loads(cache.read_text())["entries"]
    monkeypatch.setattr(peak, "busy_cpus", lambda sample_s: 0.0)  # quiet again: measured and cached
    second = peak.measure(CPU, "fp32", TINY_SHAPES)
    assert len(benchmarks) == 2 and not second.cached and "not cached" not in second.method
    assert peak.measure(CPU, "fp32", TINY_SHAPES).cached


def test_another_key_is_measured_again(cache, benchmarks):
    peak.measure(CPU, "fp32", TINY_SHAPES)
    peak.measure(CPU, "fp32", TINY_SHAPES)  # cached
    peak.measure(CPU, "fp32", TINY_SHAPES[:1])  # other shapes
    peak.measure(CPU, "bf16", TINY_SHAPES)  # another dtype
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        peak.measure(CPU, "fp32", TINY_SHAPES)  # other threads
    finally:
        torch.set_num_threads(threads)
    assert [dtype for dtype, _ in benchmarks] == ["fp32", "fp32", "bf16", "fp32"]
    assert len(json.loads(cache.read_text())["entries"]) == 4


def test_auto_precision_is_resolved_before_the_key(cache, benchmarks, monkeypatch):
    monkeypatch.setattr(peak, "resolve_precision", lambda precision, device: "bf16")
    assert peak.measure(CPU, "auto", TINY_SHAPES).key["dtype"] == "bf16"
    with pytest.raises(ValueError, match="precision='int8'"):
        monkeypatch.setattr(peak, "resolve_precision", lambda precision, device: precision)
        peak.measure(CPU, "int8", TINY_SHAPES)


@pytest.mark.parametrize("text", ["{not json", json.dumps([1, 2]), json.dumps({"version": 99, "entries": {}})])
def test_a_corrupt_cache_is_ignored_with_a_warning_and_rewritten(cache, benchmarks, caplog, text):
    cache.parent.mkdir(parents=True)
    cache.write_text(text)
    with caplog.at_level(logging.WARNING, logger="seqbench"):
        p = peak.measure(CPU, "fp32", TINY_SHAPES)
    assert not p.cached and len(benchmarks) == 1
    assert any("ignoring the peak FLOP/s cache" in r.getMessage() for r in caplog.records)
    stored = json.loads(cache.read_text())
    assert stored["version"] == peak.CACHE_VERSION and list(stored["entries"].values())[0]["peak_flops_per_s"] == 2e9
    assert peak.measure(CPU, "fp32", TINY_SHAPES).cached


def test_an_unwritable_cache_leaves_the_peak_measured(tmp_path, benchmarks, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the cache folder should be
    with caplog.at_level(logging.WARNING, logger="seqbench"):
        p = peak.measure(CPU, "fp32", TINY_SHAPES, cache=blocker / peak.CACHE_NAME)
    assert p.peak_flops_per_s == 2e9 and not p.cached
    assert any("could not write the peak FLOP/s cache" in r.getMessage() for r in caplog.records)


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(peak.CACHE_ENV, str(tmp_path / "mine"))
    assert peak.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(peak.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert peak.cache_dir() == tmp_path / "xdg" / "seqbench"


# -- the record and the benchmark ----------------------------------------------------------------------------------
def test_a_runs_record_carries_its_mfu(make_cfg, tmp_path, cache, monkeypatch):
    monkeypatch.setattr(peak, "benchmark",
                        lambda device, dtype, shapes, samples=peak.SAMPLES: (4e9, [4e9] * len(shapes)))
    cfg = make_cfg("model=transformer_tiny", "task=copy", "trainer=smoke", "eval.splits=[valid]",
                   "eval.influence=false")
    rec = job.run(cfg, tmp_path / "run")
    costs = rec["costs"]
    assert rec["status"] == "ok" and costs["peak_flops"] == 4e9 and costs["mfu_note"] is None
    assert costs["mfu"] == pytest.approx(costs["train_flops"] / costs["train_seconds"] / 4e9)
    assert costs["peak_method"].startswith("best of") and "matmuls at shapes" in costs["peak_method"]
    written = json.loads((tmp_path / "run" / schema.RECORD_NAME).read_text())
    assert written["costs"]["mfu"] == pytest.approx(costs["mfu"]) and schema.problems(written) == []
    entry = list(json.loads(cache.read_text())["entries"].values())[0]  # the run's peak, cached for the next
    assert entry["key"]["dtype"] == rec["environment"]["precision"] == "fp32"
    assert entry["key"]["threads"] == rec["environment"]["threads"]


def test_a_record_with_a_non_number_mfu_is_named():
    assert schema.problems({"costs": {"mfu": "12%"}}) == ["costs.mfu is a string, not a number"]


def test_the_benchmark_gives_flops_per_second_and_mfu_against_the_peak():
    stats = {"median_s": 0.5}
    bench.add_mfu(stats, 3e9, peak.Peak(2e10, "m", True))
    assert stats == {"median_s": 0.5, "flops": 3e9, "flops_per_s": 6e9, "peak_flops": 2e10, "mfu": pytest.approx(0.3)}
    assert flop_rate(stats) == "6.00 GFLOP/s (30.0%)"
    assert flop_rate({"flops_per_s": 2.5e12, "mfu": 0.25}) == "2.50 TFLOP/s (25.0%)"
