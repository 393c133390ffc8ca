"""precision=auto and threads=auto: what they resolve to on machines with and without bf16 matrix instructions
or free cores, what the record says, and a bf16 job end to end on CPU."""
from __future__ import annotations

import math
import os
import time

import pytest
import torch

from seqbench.harness import evaluate, job, optim, precision, train
from seqbench.harness.precision import (autocast_for, busy_cpus, cpu_times, choose_threads, cpu_has_bf16_matmul, physical_cores,
                               resolve_precision)
from seqbench.harness.train import TrainConfig

CPU = torch.device("cpu")
FLAGS = "fpu vme sse sse2 avx avx2 avx512f avx512bw"
COPY = ["model=transformer_tiny", "task=copy", "task.n_train=60", "task.n_valid=4", "task.n_test=4", "trainer=smoke",
        "trainer.max_steps=2", "eval.decoding.beam=2"]


@pytest.fixture
def keep_threads():
    """Jobs set torch's threads for the whole process; put the test suite's back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def cpuinfo(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    path.write_text("".join(f"processor\t: {i}\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\n" for i in range(2)))
    return path


@pytest.mark.parametrize("extra,expected", [("", False), ("avx512_bf16", True), ("amx_tile amx_bf16 amx_int8", True),
                                            ("avx512_bf16x", False)])
def test_bf16_matmul_is_read_from_the_cpu_flags(tmp_path, extra, expected):
    assert cpu_has_bf16_matmul(cpuinfo(tmp_path, f"{FLAGS} {extra}")) is expected


@pytest.mark.parametrize("torch_says", [True, False])
def test_without_proc_cpuinfo_torch_describes_the_cpu(tmp_path, monkeypatch, torch_says):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: torch_says, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert cpu_has_bf16_matmul(tmp_path / "missing") is torch_says


@pytest.mark.parametrize("has_bf16,expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cpu_follows_the_bf16_instructions(monkeypatch, has_bf16, expected):
    monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: has_bf16)
    assert resolve_precision("auto", CPU) == expected
    resolved, autocast = autocast_for(CPU, "auto")
    with autocast():
        out = torch.nn.Linear(4, 3)(torch.randn(2, 4))
    assert resolved == expected and out.dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[expected]
    for explicit in ("fp32", "bf16", "fp16"):  # an explicit choice is never overridden
        assert resolve_precision(explicit, CPU) == explicit


@pytest.mark.parametrize("setting,has_bf16,expected", [("auto", True, "bf16"), ("auto", False, "fp32"),
                                                       ("bf16", False, "bf16")])
def test_job_trains_and_decodes_at_the_resolved_precision_and_records_it(make_cfg, tmp_path, monkeypatch,
                                                                        setting, has_bf16, expected):
    monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: has_bf16)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[expected]
    seen = {"loss": set(), "decode": set()}
    loss = train.smoothed_cross_entropy

    def spy_loss(logits, *args):
        seen["loss"].add(logits.dtype)
        return loss(logits, *args)

    def spy_search(search):
        def run(model, src, *args, **kwargs):
            seen["decode"].add(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)
            return search(model, src, *args, **kwargs)
        return run

    monkeypatch.setattr(train, "smoothed_cross_entropy", spy_loss)
    monkeypatch.setattr(evaluate, "beam_search", spy_search(evaluate.beam_search))
    monkeypatch.setattr(evaluate, "greedy", spy_search(evaluate.greedy))
    rec = job.run(make_cfg(*COPY, f"trainer.precision={setting}"), tmp_path)
    assert rec["status"] == "ok" and rec["environment"]["precision"] == expected
    assert rec["config"]["trainer"]["precision"] == setting  # the setting as given, beside what it became
    assert seen == {"loss": {dtype}, "decode": {dtype}}  # training logits; greedy validation and beam test search
    assert math.isfinite(rec["metrics"]["test"]["bleu"]) and all(math.isfinite(r["loss"])
                                                                 for r in rec["curves"]["train"])


def test_bad_threads_setting_is_a_clear_error():
    for bad in (0, -2, "many", 1.5):
        with pytest.raises(ValueError, match=r"trainer.threads=.*valid: auto .*null .*or a positive integer"):
            TrainConfig(max_steps=1, threads=bad)
    for good in ("auto", None, 3):
        assert TrainConfig(max_steps=1, threads=good).threads == good


def machine(monkeypatch, *, cores: int, affinity: int | None = None, busy: float | None, smt: int = 1):
    """A machine of ``cores`` cores of ``smt`` logical CPUs each, this process allowed on ``affinity`` of its CPUs,
    other processes keeping ``busy`` CPUs busy (None: not measurable)."""
    monkeypatch.setattr(precision.os, "cpu_count", lambda: cores * smt)
    monkeypatch.setattr(precision.os, "sched_getaffinity", lambda pid: set(range(affinity or cores * smt)),
                        raising=False)
    monkeypatch.setattr(precision, "physical_cores", lambda cpus: len({cpu // smt for cpu in cpus}))
    monkeypatch.setattr(precision, "busy_cpus", lambda: busy)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


@pytest.mark.parametrize("cores,busy,expected", [
    (8, 0.0, 8),  # a quiet machine: every core
    (8, 0.3, 8),  # background noise does not take a core
    (8, 3.4, 5),  # three busy cores
    (8, 3.6, 4),  # nearly four
    (2, 1.0, 1),  # the GRU case: another process holds one of two cores
    (2, 2.0, 1),  # every core busy: at least one thread
    (4, None, 4),  # not measurable on this system
])
def test_auto_threads_take_the_cores_other_processes_leave_free(monkeypatch, cores, busy, expected):
    machine(monkeypatch, cores=cores, busy=busy)
    threads, chosen = choose_threads("auto")
    assert threads == expected
    assert chosen["setting"] == "auto" and chosen["threads"] == expected and chosen["usable_cores"] == cores


def test_auto_threads_count_physical_cores_not_hyper_threads(monkeypatch, tmp_path):
    """torch's default is one thread per physical core; auto takes no more than that."""
    machine(monkeypatch, cores=4, smt=2, busy=1.0)  # 8 logical CPUs, one core busy elsewhere
    threads, chosen = choose_threads("auto")
    assert threads == 3 and (chosen["usable_cores"], chosen["usable_cpus"], chosen["machine_cpus"]) == (4, 8, 8)
    for cpu, siblings in enumerate(["0,2", "1,3", "0,2", "1,3"]):  # two cores, two hyper-threads each
        (tmp_path / f"cpu{cpu}" / "topology").mkdir(parents=True)
        (tmp_path / f"cpu{cpu}" / "topology" / "thread_siblings_list").write_text(siblings + "\n")
    assert physical_cores({0, 1, 2, 3}, tmp_path) == 2
    assert physical_cores({0, 1}, tmp_path) == 2 and physical_cores({0, 2}, tmp_path) == 1
    assert physical_cores({0, 1, 7}, tmp_path) == 3  # topology unknown: every CPU a core


def test_auto_threads_share_the_free_cores_among_the_jobs_processes(monkeypatch):
    machine(monkeypatch, cores=8, busy=2.0)
    assert choose_threads("auto", processes=2)[0] == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's: four processes of this job on this machine
    threads, chosen = choose_threads("auto")
    assert threads == 1 and chosen["processes"] == 4


def test_auto_threads_trust_an_affinity_narrower_than_the_machine(monkeypatch):
    """SLURM or taskset gave the job 4 of 64 cores: the machine-wide load of other jobs is on other cores."""
    machine(monkeypatch, cores=64, affinity=4, busy=40.0)
    assert choose_threads("auto")[0] == 4


def test_explicit_threads_are_used_as_given(monkeypatch):
    machine(monkeypatch, cores=8, busy=7.0)
    assert choose_threads(6) == (6, {"setting": 6})
    assert choose_threads(None) == (None, {"setting": None})


def test_busy_cpus_is_the_machines_busy_share_over_the_sample(monkeypatch, tmp_path):
    """Two /proc/stat readings 0.5 s apart: 300 of 400 ticks busy on 4 CPUs is 3 busy CPUs."""
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 1000 10 0 0 0 0 0\ncpu0 1 2 3\n")
    assert cpu_times(stat) == (1160.0, 1010.0)
    readings = iter([(1000.0, 800.0), (1400.0, 900.0)])
    monkeypatch.setattr(precision, "cpu_times", lambda: next(readings))
    monkeypatch.setattr(precision.time, "sleep", lambda s: None)
    monkeypatch.setattr(precision.os, "cpu_count", lambda: 4)
    assert busy_cpus() == pytest.approx(3.0)
    monkeypatch.setattr(precision, "cpu_times", lambda: None)
    assert busy_cpus() is None
    assert cpu_times(tmp_path / "missing") is None


def test_busy_cpus_sees_a_process_that_keeps_a_core_busy():
    """A real spinning process (started and stopped here by pid) shows as about one busy CPU."""
    import subprocess
    import sys

    quiet = busy_cpus(0.5)
    if quiet > (os.cpu_count() or 1) - 1:
        pytest.skip(f"no idle CPU to watch: {quiet:.1f} of {os.cpu_count()} busy already")
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert busy_cpus(0.5) >= quiet + 0.6
    finally:
        spin.kill()
        spin.wait()


def test_job_records_the_threads_and_how_they_were_chosen(make_cfg, tmp_path, monkeypatch, keep_threads):
    machine(monkeypatch, cores=4, busy=2.2)  # two of four cores busy elsewhere
    rec = job.run(make_cfg(*COPY, "trainer.threads=auto"), tmp_path)
    env = rec["environment"]
    assert rec["status"] == "ok" and env["threads"] == 2 and torch.get_num_threads() == 2
    assert env["threads_chosen"] == {"setting": "auto", "usable_cores": 4, "usable_cpus": 4, "machine_cpus": 4,
                                     "busy_cpus": 2.2, "processes": 1, "threads": 2}
    explicit = job.run(make_cfg(*COPY, "trainer.threads=1"), tmp_path / "explicit")
    assert explicit["environment"]["threads"] == 1 and explicit["environment"]["threads_chosen"] == {"setting": 1}


def test_trainers_fused_adam_makes_the_unfused_update():
    """The trainer's Adam is fused on CPU (one pass per tensor) and updates as the for-loop Adam, to fp32 rounding."""
    cfg = TrainConfig(max_steps=1, lr=1e-2, weight_decay=0.01)
    torch.manual_seed(0)
    fused_model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    plain_model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    plain_model.load_state_dict(fused_model.state_dict())
    fused = optim.adam(fused_model.parameters(), cfg, CPU)
    plain = torch.optim.Adam(plain_model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, foreach=False)
    assert fused.defaults["fused"] is True
    start = [p.detach().clone() for p in fused_model.parameters()]
    for step in range(5):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
        for model, opt in ((fused_model, fused), (plain_model, plain)):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert all((a - s).abs().max() > 1e-3 for a, s in zip(fused_model.parameters(), start))  # five real updates
