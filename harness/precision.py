"""What ``trainer.precision=auto`` and ``trainer.threads=auto`` resolve to on this machine, and why.

Precision: ``auto`` is bf16 autocast where the hardware multiplies bf16 matrices natively (GPUs
that support bf16; CPUs with AMX-BF16 or AVX512-BF16 instructions, on which oneDNN's bf16 matrix
products run several times faster than its fp32 ones) and fp32 elsewhere: without those
instructions bf16 is emulated, with no speed to gain. Under autocast torch runs matrix products
(those inside recurrent layers too), convolutions and attention in bf16; parameters, gradients
and Adam's state stay fp32, and the log-softmax of the training loss (``harness.loss``), of
beam search (``harness.decode``) and of the validation NLL (``harness.evaluate``) is taken in
fp32.

Threads: a recurrent layer runs one parallel region per time step, and every region waits for
its slowest thread; on a machine where another process holds a core, a thread that is not
scheduled stalls every step (a GRU job ran ~19x slower beside one busy process). ``auto`` takes
the cores that are free when the job starts.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

import torch

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bf16 matrix instructions
BUSY_SAMPLE_S = 0.5  # how long the CPUs are watched before a job chooses its threads


def cpu_has_bf16_matmul(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has native bf16 matrix instructions (AMX-BF16 or AVX512-BF16).

    Read from the kernel's CPU flags; where there is no ``/proc/cpuinfo`` (not Linux), from the
    CPU description torch's own dispatch uses.
    """
    try:
        text = cpuinfo.read_text()
    except OSError:
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    flags = {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``precision`` with ``auto`` replaced by what this device runs fastest: bf16 or fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_bf16_matmul() else "fp32"


def autocast_for(device: torch.device, precision: str):
    """(resolved precision, a context factory running its body at that precision) for ``device``."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return precision, contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return precision, lambda: torch.autocast(device.type, dtype=dtype)


def cpu_times(stat: Path = Path("/proc/stat")) -> tuple[float, float] | None:
    """(all CPU time, idle CPU time) since boot, summed over CPUs, in clock ticks; None where unknown."""
    try:
        fields = [float(v) for v in stat.read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(fields[:8]), fields[3] + fields[4]  # user..steal (guest is inside user); idle + iowait


def busy_cpus(sample_s: float = BUSY_SAMPLE_S) -> float | None:
    """How many CPUs other processes keep busy now: the machine's busy share over a short sample.

    Measured rather than read from the 1-minute load average, which lags by a minute: right after a
    job that kept every core busy it still counts that job, and the next one (the next job of a sweep
    or of a script) would find no core free. This process only sleeps during the sample.
    """
    before = cpu_times()
    if before is None:
        return None
    time.sleep(sample_s)
    after = cpu_times()
    total, idle = after[0] - before[0], after[1] - before[1]
    return (os.cpu_count() or 1) * max(0.0, total - idle) / total if total > 0 else 0.0


def physical_cores(cpus: set[int], sysfs: Path = Path("/sys/devices/system/cpu")) -> int:
    """Distinct physical cores among the logical CPUs ``cpus`` (hyper-threads of one core share it).

    torch's default is one thread per physical core; two threads on one core's hyper-threads
    compete for its arithmetic units. Where the topology is unknown, every CPU counts as a core.
    """
    try:
        return len({(sysfs / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text().strip() for cpu in cpus})
    except OSError:
        return len(cpus)


def usable_cores() -> tuple[int, int, int]:
    """(physical cores this process may run on, logical CPUs it may run on, logical CPUs of the machine)."""
    total = os.cpu_count() or 1
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(total))
    return physical_cores(cpus), len(cpus), total


def choose_threads(setting, processes: int | None = None) -> tuple[int | None, dict]:
    """Intra-op threads for a job, and how they were chosen (for the record).

    ``setting``: a positive integer (used as it is), None (torch's default) or
    ``"auto"``: the physical cores free at the start, at least 1, shared by the ``processes`` of this
    job on this machine (``$LOCAL_WORLD_SIZE``, set by torchrun and by multi-task SLURM jobs). A
    core is free unless other processes keep it busy (:func:`busy_cpus`, rounded to whole cores).
    That is measured over the whole machine, so it counts only when this process may run on every
    CPU; a narrower CPU affinity (SLURM's, ``taskset``'s) is a set of cores given to the job, taken as free.
    """
    if setting != "auto":
        return setting, {"setting": setting}
    processes = processes or int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    cores, cpus, machine_cpus = usable_cores()
    busy = busy_cpus() if cpus >= machine_cpus else None  # None: unknown, or not ours to count
    free = cores - math.floor((busy or 0.0) + 0.5)
    threads = max(1, free // max(1, processes))
    return threads, {"setting": "auto", "usable_cores": cores, "usable_cpus": cpus, "machine_cpus": machine_cpus,
                     "busy_cpus": None if busy is None else round(busy, 2), "processes": processes,
                     "threads": threads}
