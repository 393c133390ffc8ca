"""The ``state`` suite: decoder-state size, peak memory and speed of incremental decoding against output length.

Every architecture decodes the same way: ``encode`` once, then ``decode_step`` once per output position,
greedily, with end-of-sentence masked (``decoding.NoEOS``) so that every sentence runs to the output length
under test. A Transformer keeps the keys and values of every decoded position (its KV cache: 2 x layers x
d_model values per position and hypothesis), so its state grows linearly with the output; a recurrent mixer
(Mamba, GLA, LSTM, GRU) or a causal convolution (ConvS2S, ByteNet) carries a state of fixed size. Both also keep
per-sentence entries computed from the source (``src_*``: cross-attention keys and values, the encoder output),
whose size depends on the source only; they are reported apart from the per-hypothesis part, which is what a
beam multiplies.

Per (architecture, output length):

- state bytes: the distinct storages behind the decoder state after the last step (what stays allocated
  between steps), split into the per-hypothesis part and the ``src_*`` part;
- peak memory: the model's parameters and buffers plus the highest allocation above the starting point during
  the whole decode (as ``timing.peak_call_bytes`` measures a call: CUDA's peak statistics, or every allocation
  through PyTorch's CPU allocator on CPU);
- time per generated token: the whole decode (encode and every step) over batch x length tokens, median over
  the timed rounds; and the same for the last ``min(64, length)`` steps alone, which, set beside it, shows
  whether a step becomes slower as the output grows (the Transformer's attention reads a longer cache);
- FLOP/s and MFU: the FLOPs of the decode up to that length (torch's counter with ``harness.profile``'s
  additions, over one untimed decode read at each length) over its median time, and that over the machine's
  peak at the architecture's widths (``harness.peak``, for ``peak_tokens`` positions per product);
- the ratios of state bytes, peak memory and time per token to the reference architecture's (the
  Transformer's) at the same length.

Greedy decoding with EOS masked computes the same first n steps whatever length it runs to, so the decode to a
length is the beginning of the decode to the longest one: one decode to the longest length is read at every
length (its state, peak and clock where it has made that many steps), rather than one decode per length. One
such decode runs under the memory profiler (untimed; it also warms every length up), then ``repeats`` timed.

A length that an architecture cannot decode to (learned target positions, a bound the model sets on its own
output, or the output cap every decoder shares, ``harness.settings.MAX_OUTPUT_TOKENS``) is not run: its row
carries the reason instead of measurements.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.nn.utils import parametrize
from torch.profiler import ProfilerActivity, profile, record_function

from seqbench import models
from seqbench.models.common import BOS, SOURCE_PREFIX
from seqbench.tasks.base import Shape

from .. import peak as peak_flops
from ..decode import max_lengths
from ..device import sync
from ..profile import flop_counter
from ..settings import MAX_OUTPUT_TOKENS
from .decoding import NoEOS
from .timing import Contender, resident_bytes, state_tensors, summary

TAIL_STEPS = 64  # the last steps timed on their own
REFERENCE = "transformer"  # the architecture every ratio divides by
MARKER = "seqbench.bench.state.step"  # profiler range named after a step count: where the peak is read


@dataclass(frozen=True)
class Settings:
    """What the suite decodes: ``batch`` random sources of ``src_len`` tokens from a ``vocab``-word vocabulary, to
    each of ``lengths`` output tokens, under ``autocast`` (``precision`` names it); ``warmup`` untimed decodes per
    architecture to the shortest length, then one profiled and ``repeats`` timed decodes to the longest, and one
    counted (FLOPs). ``peak_tokens``: positions per product of the peak that MFU divides by (``harness.peak``;
    None: ``batch`` x ``src_len``)."""

    vocab: int
    batch: int
    src_len: int
    lengths: tuple[int, ...]
    device: torch.device
    precision: str
    autocast: Callable
    repeats: int
    warmup: int
    seed: int
    peak_tokens: int | None = None


def state_bytes(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(per-hypothesis bytes, per-sentence ``src_*`` bytes) of a decoder state: the distinct storages behind its
    tensors, so views of one storage (keys and values split from one projection) count once; a storage that a
    ``src_*`` entry shares counts in the ``src_*`` part."""
    source = [v for k, v in state.items() if k.startswith(SOURCE_PREFIX)]
    src = resident_bytes(source)
    both = resident_bytes([*source, *(v for k, v in state.items() if not k.startswith(SOURCE_PREFIX))])
    return both - src, src


def unreachable(model: nn.Module, length: int, src_lengths: torch.Tensor) -> str | None:
    """None when every sentence can be decoded to ``length`` output tokens, else why not.

    The limit is the one every decoder of seqbench applies (``harness.decode.max_lengths``): the shared output
    cap, learned target positions (``max_target_positions`` less the position of the closing EOS), and the
    model's own ``max_output_tokens``.
    """
    if min(max_lengths(src_lengths, 0.0, length, model)) >= length:
        return None
    reasons = []
    if length > MAX_OUTPUT_TOKENS:
        reasons.append(f"decoding makes at most {MAX_OUTPUT_TOKENS} output tokens per sentence")
    cap = getattr(model, "max_target_positions", None)
    if cap and length > cap - 1:
        reasons.append(f"{cap} learned target positions (max_positions) hold at most {cap - 1} output tokens "
                       "and the EOS")
    own = model.max_output_tokens(src_lengths) if hasattr(model, "max_output_tokens") else None
    if own and min(own) < length:
        reasons.append(f"the model bounds its output at {min(own)} tokens for a {int(src_lengths.max())}-token "
                       "source (max_output_tokens)")
    return "; ".join(reasons)


def greedy_decode(model: nn.Module, src: torch.Tensor, src_lengths: torch.Tensor, steps: int, marks: set[int],
                  device: torch.device, at_mark: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
                  ) -> dict[int, float]:
    """Greedy decoding of ``steps`` tokens per sentence of src (B,S), src_lengths (B,), EOS never chosen.

    Returns clock readings (``time.perf_counter``, the device synchronized first): before encoding (key -1) and
    after each number of steps in ``marks`` (0: after encoding). ``at_mark(k, state)`` runs after the reading at
    mark ``k`` with the decoder state after ``k`` steps. The device is synchronized only at the marks, so the
    steps between them queue as they do in a real decode.
    """
    clock = {}

    def mark(k: int, state: dict[str, torch.Tensor]) -> None:
        sync(device)
        clock[k] = time.perf_counter()
        if at_mark is not None:
            at_mark(k, state)

    decoder = NoEOS(model)
    sync(device)
    clock[-1] = time.perf_counter()
    state = decoder.encode(src, src_lengths)
    prev = torch.full((src.size(0),), BOS, dtype=torch.long, device=src.device)
    if 0 in marks:
        mark(0, state)
    for t in range(steps):
        logits, state = decoder.decode_step(prev, state, t)
        prev = logits.argmax(-1)  # (B,)
        if t + 1 in marks:
            mark(t + 1, state)
    return clock


def peak_at_marks(decode: Callable[[Callable[[int], None]], None], device: torch.device) -> dict[int, int]:
    """Highest bytes allocated above the starting point from the start of ``decode(note)`` up to each of its
    ``note(k)`` calls, by ``k``: on CUDA from the allocator's running peak, on CPU from the profiler's record of
    every allocation and free (as ``timing.peak_call_bytes``), split where each ``note`` left a marker."""
    peaks: dict[int, int] = {}
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        decode(lambda k: peaks.__setitem__(k, torch.cuda.max_memory_allocated(device) - start))
        return peaks
    if device.type != "cpu":
        raise ValueError(f"peak memory is measured on cpu and cuda, not {device.type}")

    def note(k: int) -> None:
        with record_function(f"{MARKER}{k}"):
            pass

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        decode(note)
    current = peak = 0
    for e in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns()):
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU:
            current += e.nbytes()  # negative for a free
            peak = max(peak, current)
        elif e.name().startswith(MARKER):
            peaks[int(e.name()[len(MARKER):])] = peak
    return peaks


def measure(arch: str, cfg: dict, name: str, model: nn.Module, s: Settings) -> list[dict]:
    """One row per output length of ``s.lengths`` for an eval-mode encoder-decoder ``model``, each read from
    decodes to the longest reachable length (the module docstring says why that is the decode to each length)."""
    g = torch.Generator().manual_seed(s.seed)
    src = torch.randint(4, s.vocab, (s.batch, s.src_len), generator=g).to(s.device)
    src_lengths = torch.full((s.batch,), s.src_len, device=s.device)
    resident = resident_bytes(state_tensors(model))
    reasons = {n: unreachable(model, n, src_lengths.cpu()) for n in s.lengths}
    reached = [n for n in s.lengths if reasons[n] is None]
    tails = {n: min(TAIL_STEPS, n) for n in reached}
    marks = {*reached, *(n - tails[n] for n in reached)}

    def decode(steps: int, at_mark=None) -> dict[int, float]:
        with torch.no_grad(), parametrize.cached(), s.autocast():
            return greedy_decode(model, src, src_lengths, steps, marks, s.device, at_mark)

    states: dict[int, tuple[int, int]] = {}
    peaks: dict[int, int] = {}
    if reached:
        for _ in range(s.warmup):
            decode(min(reached))

        def profiled(note: Callable[[int], None]) -> None:
            def at_mark(k: int, state: dict[str, torch.Tensor]) -> None:
                if k in tails:
                    states[k] = state_bytes(state)
                    note(k)
            decode(max(reached), at_mark)

        peaks = peak_at_marks(profiled, s.device)
    timed = [Contender(name, lambda: None, s.batch * n) for n in reached]
    tail_s: dict[int, list[float]] = {n: [] for n in reached}
    for _ in range(s.repeats if reached else 0):
        clock = decode(max(reached))
        for n, c in zip(reached, timed):
            c.seconds.append(clock[n] - clock[-1])
            tail_s[n].append(clock[n] - clock[n - tails[n]])
    flops_at: dict[int, int] = {}
    if reached:
        with flop_counter() as counter:
            decode(max(reached), lambda k, state: flops_at.__setitem__(k, counter.get_total_flops()))
    peak = peak_flops.measure(s.device, s.precision,
                              peak_flops.model_shapes(model, s.peak_tokens or s.batch * s.src_len) or None)
    rows = []
    base = {"suite": "state", "arch": arch, "preset": cfg.get("preset"), "model": name, "batch": s.batch,
            "src_len": s.src_len, "precision": s.precision, "params": models.count_parameters(model),
            "shape": (f"greedy decoding, EOS masked, of {s.batch} random sources of {s.src_len} tokens (vocab "
                      f"{s.vocab}), eval mode, {s.precision}; {s.repeats} timed rounds, each one decode to the "
                      "longest output length, read at every length")}
    for length in s.lengths:
        row = {**base, "length": length, "reached": reasons[length] is None, "reason": reasons[length]}
        rows.append(row)
        if not row["reached"]:
            print(f"[bench] state: {name} at {length} output tokens: not run ({reasons[length]})", flush=True)
            continue
        stats = summary(timed[reached.index(length)])
        hyp, source = states[length]
        row.update(state_bytes={"hypothesis": hyp, "source": source, "total": hyp + source},
                   peak_bytes=resident + peaks[length], resident_bytes=resident, tail_steps=tails[length],
                   stats=stats, per_token_s=stats["median_s"] / (s.batch * length),
                   tail_per_token_s=statistics.median(tail_s[length]) / (s.batch * tails[length]),
                   flops=flops_at[length], flops_per_s=flops_at[length] / stats["median_s"],
                   peak_flops=peak.peak_flops_per_s,
                   mfu=peak_flops.mfu(flops_at[length], stats["median_s"], peak.peak_flops_per_s))
        print(f"[bench] state: {name} at {length} output tokens: state {human_bytes(hyp)} + {human_bytes(source)} "
              f"src_*, peak {human_bytes(row['peak_bytes'])}, {row['per_token_s'] * 1e6:,.1f} us/token", flush=True)
    return rows


def add_ratios(rows: list[dict], reference: str = REFERENCE) -> None:
    """Set each measured row's ``ratios`` to the reference architecture's row at the same length (None where the
    reference was not run or did not reach that length): state bytes (total and per hypothesis), peak memory and
    time per token, each this architecture's over the reference's (<1: leaner or faster)."""
    ref = {r["length"]: r for r in rows if r["arch"] == reference and r["reached"]}
    for r in rows:
        if not r["reached"]:
            continue
        base = ref.get(r["length"])
        r["reference"] = reference
        r["ratios"] = None if base is None else {
            "state": r["state_bytes"]["total"] / base["state_bytes"]["total"],
            "hypothesis_state": r["state_bytes"]["hypothesis"] / base["state_bytes"]["hypothesis"],
            "peak": r["peak_bytes"] / base["peak_bytes"],
            "time": r["per_token_s"] / base["per_token_s"]}


def state_rows(configs: Sequence[tuple[str, dict]], s: Settings,
               name_of: Callable[[str, dict, int], str]) -> list[dict]:
    """Rows of every (architecture, seqbench config) at every length of ``s.lengths``, ratios to the reference's."""
    rows = []
    for arch, cfg in configs:
        torch.manual_seed(s.seed)
        model = models.build(cfg, Shape("seq2seq", {"src": s.vocab, "tgt": s.vocab})).to(s.device).eval()
        rows += measure(arch, cfg, name_of(arch, cfg, models.count_parameters(model)), model, s)
        del model
    add_ratios(rows)
    return rows


# -- output -----------------------------------------------------------------------------------
def human_bytes(n: int) -> str:
    """Bytes in the largest binary unit that keeps at least 1 before the point: 512 B, 3.0 KiB, 96.0 MiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} B"


def state_table(rows: list[dict]) -> str:
    """The Markdown table: one row per (architecture, output length), ratios to the reference's at that length."""
    ref = next((r.get("reference") for r in rows if r.get("reference")), REFERENCE)
    lines = [f"| model | output tokens | state per hypothesis | src_* state | state / {ref} | peak memory | "
             f"peak / {ref} | us per token | us per token, last {TAIL_STEPS} steps | time / {ref} | FLOP/s (MFU) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["reached"]:
            lines.append(f"| {r['model']} | {r['length']} | not run: {r['reason']} | | | | | | | | |")
            continue
        ratio = r["ratios"] or {}

        def x(key: str) -> str:
            return f"{ratio[key]:.2f}" if key in ratio else "n/a"

        state = r["state_bytes"]
        tail = f"{r['tail_per_token_s'] * 1e6:,.1f}" + (f" (last {r['tail_steps']})" if r["tail_steps"] < TAIL_STEPS
                                                         else "")
        lines.append(f"| {r['model']} | {r['length']} | {human_bytes(state['hypothesis'])} | "
                     f"{human_bytes(state['source'])} | {x('state')} | {human_bytes(r['peak_bytes'])} | {x('peak')} | "
                     f"{r['per_token_s'] * 1e6:,.1f} | {tail} | {x('time')} | {flop_rate(r)} |")
    return "\n".join(lines)


def flop_rate(r: dict) -> str:
    """FLOP/s and MFU of a row (or a contender's stats), as ``12.34 GFLOP/s (28.1%)``."""
    per_s = r["flops_per_s"]
    scaled = f"{per_s / 1e12:,.2f} TFLOP/s" if per_s >= 1e12 else f"{per_s / 1e9:,.2f} GFLOP/s"
    return f"{scaled} ({r['mfu']:.1%})"


def state_notes(rows: list[dict]) -> list[str]:
    """What the columns mean, and each architecture's per-hypothesis state from its shortest to its longest length."""
    notes = ["state: the decoder state's tensors after the last step (distinct storages), per hypothesis (what a "
             "beam multiplies) and per sentence (src_*: from the source alone); peak memory: parameters + the "
             "whole decode's peak allocation; us per token: the whole decode (encode + every step) / (batch x "
             f"output tokens), median over rounds, and the last {TAIL_STEPS} steps alone (a step that slows as the "
             "output grows shows there); FLOP/s: the decode's counted FLOPs up to that length over its median time, "
             "MFU: that over the measured matmul peak (harness.peak); ratios: this architecture / the reference's "
             "at the same length (< 1: leaner or faster)"]
    growth = []
    for arch in dict.fromkeys(r["arch"] for r in rows):
        done = [r for r in rows if r["arch"] == arch and r["reached"]]
        if len(done) >= 2:
            first, last = done[0], done[-1]
            a, b = first["state_bytes"]["hypothesis"], last["state_bytes"]["hypothesis"]
            change = "constant" if a == b else f"x{b / a:.1f}" if a else "from nothing"
            growth.append(f"{arch} {human_bytes(a)} -> {human_bytes(b)} ({change} for "
                          f"x{last['length'] / first['length']:g} tokens)")
    if growth:
        notes.append("per-hypothesis state from the shortest to the longest output: " + ", ".join(growth))
    return notes
