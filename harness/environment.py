"""What a job records about where it ran: git commit, package versions, device, threads, peak memory
(the record's ``environment`` entry and memory costs; the record itself: harness/schema.py)."""
from __future__ import annotations

import ctypes
import functools
import gc
import os
import platform
import socket
import subprocess
import sys
import threading
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


# how a record's costs.peak_memory_bytes was measured (costs.peak_memory_kind); PER_JOB: the job's own peak
MEMORY_KINDS = {
    "cuda_allocated": "peak CUDA memory allocated by PyTorch during the job (torch.cuda.max_memory_allocated, the "
                      "peak statistics reset at the job's start)",
    "job_peak_rss": "the process's peak resident memory during the job (VmHWM of /proc/self/status, reset at the "
                    "job's start through /proc/self/clear_refs); a job of a local sweep runs in a process forked from "
                    "the sweep's, which maps the libraries' pages only as it touches them: the pages the sweep's "
                    "process held and the job never touched are added, as a process of its own holds them",
    "job_sampled_rss": "the largest resident memory of the process sampled every "
                       "0.05 s during the job (where the kernel's high-water mark cannot be reset)",
    "process_max_rss": "the process's lifetime peak resident memory (getrusage ru_maxrss): in a sweep run in one "
                       "process it includes the earlier jobs' memory, so it is not the job's own",
}
PER_JOB = ("cuda_allocated", "job_peak_rss", "job_sampled_rss")
SAMPLE_SECONDS = 0.05
PARENT_RSS_FILE: list[int] = []  # in a job forked from a sweep's process: that process's file-backed resident bytes
STATUS = Path("/proc/self/status")


def _status_bytes(field: str) -> int | None:
    """A ``kB`` line of /proc/self/status (``VmHWM``, ``VmRSS``) in bytes, or None where there is none."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_high_water_mark() -> bool:
    """Reset the kernel's peak resident memory of this process to its present size (Linux >= 4.0); True if done."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _status_bytes("VmHWM"), _status_bytes("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 16 * 2**20  # it took: the mark is at today's size


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest dynamic mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX, 64-bit)


def _release_freed_memory() -> None:
    """Collect garbage, hand the C heap's free pages back to the OS and fix glibc's allocation thresholds, so that
    an earlier job's memory is not counted in this job's resident size and every job allocates alike.

    glibc raises its mmap threshold (up to 32 MB) and its trim threshold (twice that) when a large block is freed:
    after a large job, a small job's blocks would come from the heap and stay resident after they are freed, so
    the same job would peak higher after another job than in a process of its own. Fixed at their largest values
    at every job's start (a job alone too), the thresholds are the same for every job."""
    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass


def _untouched_library_pages() -> int:
    """In a job forked from a sweep's process: the file-backed pages (the libraries' code and data) that process
    held and this one has not touched by now, at the job's end: a process of its own would hold them from its
    imports (0 outside a forked job). Pages the job touched are in its own high-water mark already."""
    if not PARENT_RSS_FILE:
        return 0
    return max(0, PARENT_RSS_FILE[0] - (_status_bytes("RssFile") or 0))


class PeakMemory:
    """A job's own peak memory, measured from its start (:meth:`result`: the record's cost entries).

    On CUDA, PyTorch's peak allocation, its statistics reset at the start. On a CPU, the kernel's high-water mark
    of resident memory, reset at the start (``job_peak_rss``); where that cannot be reset, the resident size
    sampled by a thread (``job_sampled_rss``); where neither exists, the process's lifetime peak
    (``process_max_rss``, flagged by the report: in a sweep it includes earlier jobs). ``MEMORY_KINDS`` says
    what each kind is.
    """

    def __init__(self, device: torch.device):
        self.device, self._peak, self._thread = device, 0, None
        self._stop = threading.Event()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.kind = "cuda_allocated"
            return
        _release_freed_memory()
        if _reset_high_water_mark():
            self.kind = "job_peak_rss"
        elif _status_bytes("VmRSS") is not None:
            self.kind = "job_sampled_rss"
            self._peak = _status_bytes("VmRSS") or 0
            self._thread = threading.Thread(target=self._sample, name="seqbench-peak-memory", daemon=True)
            self._thread.start()
        else:
            self.kind = "process_max_rss"

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self._peak = max(self._peak, _status_bytes("VmRSS") or 0)

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._peak = max(self._peak, _status_bytes("VmRSS") or 0)

    def result(self) -> dict:
        """``peak_memory_bytes`` since the start and ``peak_memory_kind`` (ends the sampling, if any)."""
        if self.kind == "cuda_allocated":
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.kind == "job_peak_rss":
            peak = _status_bytes("VmHWM")
            peak = None if peak is None else peak + _untouched_library_pages()
        elif self.kind == "job_sampled_rss":
            self.stop()
            peak = self._peak + _untouched_library_pages()
        else:
            import resource
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return {"peak_memory_bytes": peak, "peak_memory_kind": self.kind}

