"""How much of the hardware a job actually got while it trained, so a report can tell a fair comparison from one
where another process took the machine.

A job beside a busy process trains slower and, under a time budget, takes fewer updates: its throughput and its
budget-bound quality then measure the machine's load, not the architecture. The trainer accumulates the process's
CPU time over the same timed windows as its training seconds; from them:

- ``cpu_utilization`` = process CPU seconds / (training seconds x threads), where ``threads`` is torch's intra-op
  threads on a CPU and 1 on a GPU (one host thread drives the device). Near 1 when the job had its cores (idle
  OpenMP threads spin, and count); about 1/2 when another process took half of them.
- ``load_average``: the machine's 1-minute load average when training started and when it ended.
- ``gpu_utilization`` (CUDA): the device's busy share (0-1), the mean of the samples taken at each training log
  step by ``torch.cuda.utilization`` (which needs ``pynvml``, package nvidia-ml-py); null where it cannot be read.
"""
from __future__ import annotations

import os

import torch


def load_average() -> float | None:
    """The machine's 1-minute load average, or None where the OS has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def gpu_percent(device: torch.device) -> float | None:
    """The device's utilisation now (percent of the last sample period a kernel ran), or None.

    None off CUDA and wherever NVML cannot answer (pynvml not installed, no NVML driver, a MIG slice): a missing
    measurement must never fail a training job.
    """
    if device.type != "cuda":
        return None
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # ModuleNotFoundError without pynvml; pynvml's NVMLError family otherwise
        return None


def threads_counted(device: torch.device) -> int:
    """The threads whose full use is utilisation 1: torch's intra-op threads on a CPU, the one host thread on a GPU."""
    return torch.get_num_threads() if device.type == "cpu" else 1


def costs(progress, device: torch.device) -> dict:
    """The record's utilisation entries (``costs``), from the trainer's progress."""
    threads = threads_counted(device)
    wall = progress.train_seconds
    samples = [row["gpu_utilization"] for row in progress.log if row.get("gpu_utilization") is not None]
    return {"cpu_seconds": progress.cpu_seconds, "cpu_threads": threads,
            "cpu_utilization": round(progress.cpu_seconds / (wall * threads), 4) if wall > 0 else None,
            "load_average": {"start": progress.load_average.get("start"), "end": progress.load_average.get("end")},
            "gpu_utilization": round(sum(samples) / len(samples) / 100, 4) if samples else None,
            "gpu_utilization_samples": len(samples)}
