"""What a job records about where it ran: git commit, package versions, device, threads, peak memory
(the record's ``environment`` entry and memory costs; the record itself: harness/schema.py)."""
from __future__ import annotations

import functools
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("torch", "hydra-core", "sacrebleu", "sentencepiece", "numpy", "wandb", "submitit")


@functools.cache
def git_info() -> dict:
    """The commit (and whether tracked files differed from it) of the code this process runs: looked up once, at
    the first job, since the code is loaded then; a commit made while a sweep runs does not change what its
    later jobs run, so their records must not name it."""
    root = Path(__file__).resolve().parents[1]
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"git_commit": git("rev-parse", "HEAD") or None, "git_dirty": bool(git("status", "--porcelain", "-uno"))}


def package_versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: torch.device) -> dict:
    """The record's ``environment`` entry (the job adds threads, precision and processes)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_name()} ({os.cpu_count()} cores)"
    return {**git_info(), "python": sys.version.split()[0], "packages": package_versions(), "device": device.type,
            "device_name": name, "device_count": torch.cuda.device_count() if device.type == "cuda" else 1,
            "threads": torch.get_num_threads(), "hostname": socket.gethostname(),
            "deterministic": device.type == "cpu" or torch.are_deterministic_algorithms_enabled()}


def peak_memory_bytes(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "peak_memory_kind": "cuda_allocated"}
    import resource
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_memory_kind": "process_max_rss"}
