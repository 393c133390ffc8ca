"""The machine's peak FLOP/s for a run, measured, so that a run can state its model FLOPs utilisation (MFU).

A datasheet peak says little about what a model can reach: a CPU's depends on its vector units, its
threads and the library torch calls; a GPU's on the dtype, TF32 and the matrix sizes. So the peak is
measured where the run runs: matrix products at the model's own widths (``model_shapes``: the
weight matrices that carry most of its multiply-adds, each multiplied by a batch's worth of
positions), in the run's compute dtype (``harness.precision``: bf16 or fp16 under autocast, else
fp32), with the run's intra-op threads. The peak is the best FLOP/s achieved over those shapes
(best of a few timed samples each, after a warm-up), counted as 2 FLOPs per multiply-add like
``harness.profile``. A model with no weight matrix falls back to ``SQUARE_WIDTHS``. Each product's first
dimension is cut to keep it within ``MAX_PRODUCT_FLOPS`` (milliseconds, not seconds, per product; the
efficiency of a product hardly grows past a few hundred rows) and ``MAX_PRODUCT_BYTES``.

Measuring costs up to ``BUDGET_S[device type]`` seconds, so each result is cached per machine in
``<cache dir>/peak_flops.json`` (``cache_dir``), keyed by device name and type, dtype, threads,
torch version, fp32 matmul precision (TF32 on or off) and shapes; a later run with the same key
reads it. A CPU peak measured while other processes keep the cores it needs busy is used by its run but not
cached (the next run measures again). A cache file that cannot be read is ignored with a warning and rewritten; one that
cannot be written leaves the measurement uncached. Two jobs measuring at once may each write the
file; the last write wins and the other's entry is measured again next time.

MFU = (counted training FLOPs / training seconds) / (peak x processes); ``costs`` gives the
record's entries, and a peak that could not be measured gives ``mfu`` null with the reason.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .device import sync
from .environment import cpu_name
from .io import write_json
from .precision import busy_cpus, resolve_precision

log = logging.getLogger("seqbench")

CACHE_ENV = "SEQBENCH_CACHE_DIR"  # where per-machine measurements are kept (default: $XDG_CACHE_HOME/seqbench)
CACHE_NAME = "peak_flops.json"
CACHE_VERSION = 1  # bump when the measurement changes meaning: older entries are then measured again
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MAX_SHAPES = 4  # the model's weight shapes measured: those that carry the most multiply-adds
SQUARE_WIDTHS = (1024, 2048, 4096)  # fallback: n x n @ n x n products (the batch dimension capped as any other)
# FLOPs of one product at most: the batch dimension is cut to fit, so one product takes milliseconds, not seconds
MAX_PRODUCT_FLOPS = {"cpu": 1e9, "cuda": 1e12}
# bytes of one product's operands and result at most (the first dimension cut to fit): the measurement runs inside
# the job, whose peak memory (costs.peak_memory_bytes) it must not set
MAX_PRODUCT_BYTES = 2**28
SAMPLE_S = {"cpu": 0.02, "cuda": 0.005}  # one timed sample: enough repeated products to last this long
SAMPLES = 3  # timed samples per shape; the best counts
BUDGET_S = {"cpu": 1.5, "cuda": 5.0}  # the whole measurement stops taking new samples after this
MAX_CALLS = 1000  # products per sample, at most (tiny shapes)
BUSY_SAMPLE_S = 0.2  # CPU: how long the machine's other work is watched before measuring


@dataclass(frozen=True)
class Peak:
    """A measured peak: FLOP/s of one device (None where it could not be measured, ``note`` says why), how it was
    measured, whether it came from the cache, and its cache key."""

    peak_flops_per_s: float | None
    method: str | None
    cached: bool
    key: dict = field(default_factory=dict)
    note: str | None = None


def cache_dir() -> Path:
    """``$SEQBENCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/seqbench``, else ``~/.cache/seqbench``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "seqbench"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name (``/proc/cpuinfo``): what a peak belongs to."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def model_shapes(model: nn.Module, tokens: int, limit: int = MAX_SHAPES) -> list[tuple[int, int, int]]:
    """(tokens, in, out) products at ``model``'s weight widths: the ``limit`` (in, out) pairs with the most
    multiply-adds per position (pair width x how many weights have it), largest first.

    Weights are those of linear layers (output projections included), of recurrent layers (each input and
    recurrent matrix) and of ungrouped 1-D convolutions (in x kernel -> out, as a product over positions);
    embedding lookups and depthwise convolutions are no matrix products. ``tokens`` is the positions a batch
    puts through each weight (the product's first dimension)."""
    if tokens < 1:
        raise ValueError(f"tokens={tokens}: a peak needs at least one position per product")
    counts: Counter[tuple[int, int]] = Counter()
    for module in model.modules():
        if isinstance(module, nn.Linear):
            counts[(module.in_features, module.out_features)] += 1
        elif isinstance(module, nn.RNNBase):
            for name, weight in module.named_parameters(recurse=False):
                if name.startswith("weight_") and weight.dim() == 2:
                    counts[(weight.shape[1], weight.shape[0])] += 1
        elif isinstance(module, nn.Conv1d) and module.groups == 1:
            counts[(module.in_channels * module.kernel_size[0], module.out_channels)] += 1
    ranked = sorted(counts, key=lambda kn: (counts[kn] * kn[0] * kn[1], kn[0] * kn[1]), reverse=True)
    return [(tokens, k, n) for k, n in ranked[:limit]]


def square_shapes() -> list[tuple[int, int, int]]:
    """The fallback set: n x n @ n x n for each of ``SQUARE_WIDTHS``."""
    return [(n, n, n) for n in SQUARE_WIDTHS]


def capped(shape: tuple[int, int, int], device_type: str, element_bytes: int = 4) -> tuple[int, int, int]:
    """``shape`` with its first dimension cut so that one product costs at most ``MAX_PRODUCT_FLOPS`` and its
    operands and result, of ``element_bytes`` each, take at most ``MAX_PRODUCT_BYTES``."""
    m, k, n = shape
    limit = MAX_PRODUCT_FLOPS.get(device_type, MAX_PRODUCT_FLOPS["cpu"])
    room = (MAX_PRODUCT_BYTES // element_bytes - k * n) // (k + n)
    return max(1, min(m, int(limit // (2 * k * n)), room)), k, n


def cache_key(device: torch.device, dtype: str, shapes: list[tuple[int, int, int]]) -> dict:
    """What a measurement depends on; an entry is reused only for an identical key."""
    return {"device_name": device_name(device), "device_type": device.type, "dtype": dtype,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "float32_matmul_precision": torch.get_float32_matmul_precision(), "shapes": [list(s) for s in shapes]}


def _entry_id(key: dict) -> str:
    return json.dumps(key, sort_keys=True)


def read_cache(path: Path) -> dict:
    """The cache's entries (entry id -> entry); {} for a missing, unreadable or foreign file (with a warning for
    one that exists: it is rewritten at the next measurement)."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not (isinstance(data, dict) and data.get("version") == CACHE_VERSION
                and isinstance(data.get("entries"), dict)):
            raise ValueError(f"not a version-{CACHE_VERSION} peak cache")
        return {i: e for i, e in data["entries"].items()
                if isinstance(e, dict) and isinstance(e.get("peak_flops_per_s"), (int, float))
                and e["peak_flops_per_s"] > 0 and isinstance(e.get("method"), str)}
    except (OSError, ValueError) as err:
        log.warning("ignoring the peak FLOP/s cache %s (%s); it will be rewritten", path, err)
        return {}


def time_product(a: torch.Tensor, b: torch.Tensor, device: torch.device, samples: int, deadline: float) -> float:
    """Best FLOP/s of ``a @ b`` over ``samples`` timed samples (fewer once ``deadline`` has passed, at least one),
    after one untimed warm-up product; each sample repeats the product to last about ``SAMPLE_S``."""
    flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
    sync(device)
    start = time.perf_counter()
    a @ b  # warm-up: kernel selection, allocator, thread pool
    sync(device)
    once = max(time.perf_counter() - start, 1e-7)
    calls = max(1, min(MAX_CALLS, math.ceil(SAMPLE_S.get(device.type, SAMPLE_S["cpu"]) / once)))
    best = 0.0
    for i in range(samples):
        if i and time.perf_counter() > deadline:
            break
        sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            a @ b
        sync(device)
        best = max(best, flops * calls / max(time.perf_counter() - start, 1e-9))
    return best


def benchmark(device: torch.device, dtype: str, shapes: list[tuple[int, int, int]],
              samples: int = SAMPLES) -> tuple[float, list[float]]:
    """(best FLOP/s over ``shapes``, each shape's best) of ``dtype`` products on ``device``."""
    deadline = time.perf_counter() + BUDGET_S.get(device.type, BUDGET_S["cpu"])
    g = torch.Generator().manual_seed(0)
    rates = []
    with torch.no_grad():
        for m, k, n in shapes:
            a = torch.randn(m, k, generator=g).to(device, DTYPES[dtype])
            b = torch.randn(k, n, generator=g).to(device, DTYPES[dtype])
            rates.append(time_product(a, b, device, samples, deadline))
            del a, b
    return max(rates), rates


def _shape_text(shape) -> str:
    m, k, n = shape
    return f"({m}x{k})@({k}x{n})"


def measure(device: torch.device, precision: str, shapes: list[tuple[int, int, int]] | None = None, *,
            cache: Path | None = None) -> Peak:
    """The peak FLOP/s of ``device`` at ``precision`` (``auto`` resolved as the trainer resolves it) over
    ``shapes`` ((m, k, n) products; None: ``square_shapes``), each first dimension capped (``capped``), with the
    current torch threads: from the cache file ``cache`` (default ``cache_dir()/peak_flops.json``) if it holds
    this key, else measured and stored there."""
    dtype = resolve_precision(precision, device)
    if dtype not in DTYPES:
        raise ValueError(f"precision={precision!r}: a peak is measured for {', '.join(DTYPES)} or auto")
    shapes = [capped(s, device.type, DTYPES[dtype].itemsize) for s in (shapes or square_shapes())]
    key = cache_key(device, dtype, shapes)
    path = cache if cache is not None else cache_dir() / CACHE_NAME
    entries = read_cache(path)
    hit = entries.get(_entry_id(key))
    if hit is not None:
        return Peak(float(hit["peak_flops_per_s"]), hit["method"], True, key)
    others = busy_cpus(BUSY_SAMPLE_S) if device.type == "cpu" else None  # CPUs other processes keep busy
    best, rates = benchmark(device, dtype, shapes)
    top = _shape_text(shapes[rates.index(best)])
    method = (f"best of up to {SAMPLES} timed samples of {dtype} matmuls at shapes "
              f"{', '.join(_shape_text(s) for s in shapes)} on {key['device_name']} ({device.type}), "
              f"threads {key['threads']}; best at {top}")
    if others is not None and others + key["threads"] > (os.cpu_count() or 1) + 0.5:
        log.warning("the peak FLOP/s was measured while other processes kept %.1f of %d CPUs busy: it is used for "
                    "this run and not cached", others, os.cpu_count() or 1)
        return Peak(best, method + f"; measured while other processes kept {others:.1f} CPUs busy (not cached)",
                    False, key)
    entries[_entry_id(key)] = {"key": key, "peak_flops_per_s": best, "method": method,
                               "per_shape_flops_per_s": rates, "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        write_json(path, {"version": CACHE_VERSION, "entries": entries})
    except OSError as err:
        log.warning("could not write the peak FLOP/s cache %s (%s); the peak is measured again next time "
                    "(set %s to a writable folder)", path, err, CACHE_ENV)
    return Peak(best, method, False, key)


def batch_positions(batches: list) -> int:
    """Positions per batch (rows x length of the target), the mean over ``batches``: the first dimension of the
    model's weight products in training."""
    if not batches:
        raise ValueError("no training batch to size the peak's matrix products by")
    return max(1, round(sum(batch.target.numel() for batch in batches) / len(batches)))


def for_run(model: nn.Module, batches: list, device: torch.device, precision: str) -> Peak:
    """The peak for a training run of ``model`` on ``batches`` (a sample of its epoch): at the model's widths,
    or the square fallback. Never raises: an error gives a peak of None with the reason (``note``), so that a
    run never fails for want of its MFU."""
    try:
        shapes = model_shapes(model, batch_positions(batches))
        return measure(device, precision, shapes or None)
    except Exception as err:  # noqa: BLE001 - any failure leaves the MFU unknown, never the run failed
        log.warning("peak FLOP/s not measured (%s: %s); the record's costs.mfu is null", type(err).__name__, err)
        return Peak(None, None, False, note=f"peak FLOP/s not measured: {type(err).__name__}: {err}")


def mfu(flops: float, seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s (``flops`` / ``seconds``) over ``peak_flops``."""
    return flops / seconds / peak_flops


def costs(peak: Peak | None, train_flops: float | None, train_seconds: float | None, processes: int = 1) -> dict:
    """The record's ``costs`` entries: ``mfu`` (counted training FLOPs per second over the peak of all
    ``processes`` devices), ``peak_flops`` (that peak), ``peak_method``, and ``mfu_note``: why ``mfu`` is null,
    else null. ``peak`` None: no peak was measured for these costs."""
    peak = peak or Peak(None, None, False, note="no peak FLOP/s measured for these costs")
    total = None if peak.peak_flops_per_s is None else peak.peak_flops_per_s * processes
    method = peak.method if processes == 1 or peak.method is None else f"{peak.method}; x {processes} processes"
    note = peak.note
    if note is None and not (train_seconds and train_seconds > 0):
        note = "no training time measured (no training step ran in this job)"
    if note is None and train_flops is None:
        note = "no training FLOPs counted"
    value = None if note is not None else mfu(train_flops, train_seconds, total)
    return {"mfu": value, "peak_flops": total, "peak_method": method, "mfu_note": note}
