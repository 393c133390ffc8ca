"""Benchmarks in one process: seqbench against plain PyTorch (training), bf16 against fp32 (training), cached
against recomputed decoding, decoder state and speed against output length.

    python -m seqbench.harness.bench --suite all --preset small --device cpu --repeats 7 --json bench.json
    python -m seqbench.harness.bench --preset transformer_base --device cuda --precision bf16 --compile

Suites (``--suite``; ``all`` runs every one). Each runs every registered architecture (``models.MODELS``)
unless ``--archs`` names some, except ``train``, which runs those with a plain-PyTorch twin (``ARCHS``) and
says which it skipped:

- ``train``: per architecture, one training step (forward, label-smoothed cross-entropy,
  backward, Adam step) of seqbench's model against its plain-PyTorch twin of the same size
  (``harness.bench.baselines``), on the same random batch (``batch`` sentences of ``src_len`` +
  ``tgt_len`` tokens, no padding, a shared vocabulary). seqbench's step uses its trainer's
  loss (``harness.loss``, fused backward), the baseline ``F.cross_entropy``; ``--plain-loss``
  gives both ``F.cross_entropy`` and so compares the models alone.
- ``lm``: seqbench's LSTM language model against the PyTorch examples' word-level language
  model at the example's size (emsize = nhid = 200, 2 layers, dropout 0.2, untied, bptt 35 x
  batch 20, WikiText-2's 33,278 words), with cross-entropy without smoothing (the example's
  ``log_softmax`` + ``nll_loss``; seqbench's fused loss unless ``--plain-loss``) and Adam.
- ``precision``: per architecture, seqbench's training step (the ``train`` suite's, on its batch)
  under bf16 autocast against the same step in fp32, each on its own copy of the model (the same
  initial weights); ratio = bf16 speed / fp32 speed (>1: bf16 faster), whatever ``--precision``
  says. Whether the CPU has native bf16 matrix instructions (``harness.precision``) is printed
  with the table.
- ``decode``: per architecture, beam search (beam 4, alpha 0.6) with the cached incremental
  decoder against the same search recomputing the whole prefix with the model's full forward
  at every step (``harness.bench.decoding``), on random sources of newstest2014-like lengths
  (27 +- 15 subwords), end-of-sentence masked so every hypothesis runs to its limit (a|s|+b);
  eval mode, under ``--precision``'s autocast, never compiled.
- ``state``: per architecture and output length (``--lengths``, default 64 to 1024), greedy decoding of
  ``--batch`` (default 16) random sources of ``--src-len`` tokens with end-of-sentence masked: the decoder
  state's bytes after the last step (per hypothesis and per sentence, ``src_*``: the Transformer's KV cache
  grows with the output, a recurrent mixer's state does not), the decode's peak memory, the time per generated
  token (and over the last 64 steps alone), each beside the Transformer's at that length
  (``harness.bench.state``); a length an architecture cannot reach gets a row saying why.

- ``real`` (not in ``all``: it reads a task's data): the trainer's own step on the first batches of a real task
  (``--task``, default multi30k) against the ``train`` suite's synthetic step, with padding fractions, batch shapes
  and an optional profile (``--profile``) of the forward and backward (``harness.bench.real``); the Transformer
  alone unless ``--archs`` names others.

``--preset``: ``small`` (the CPU comparison presets, ``conf/model/<arch>.yaml``), ``tiny`` (the
same structure at test size: the ``*_tiny.yaml`` presets differ in structure), ``paper`` (each
architecture at its published size, ``PAPER``; 256 sentences x (50 + 50) tokens, 37k
vocabulary) or any preset file name (``transformer_base``: that architecture only). Timing (``harness.bench.timing``):
``warmup`` calls each, then ``repeats`` interleaved rounds of ``steps`` calls each; the median
over rounds, the spread as the interquartile range and the min-max of the per-round ratio.
Tokens are target tokens: those scored by the loss (train, lm) or generated (decode, state). Ratios
are seqbench / baseline in speed (>1: seqbench faster; decode: cached faster than recomputing)
and in peak memory (<1: seqbench leaner); the state suite times each decode alone (``repeats``
rounds, no pair) and divides by the Transformer's (<1: leaner or faster). FLOPs per step come
from torch's FLOP counter with ``harness.profile``'s additions (a decode's: the whole search, counted once
after timing; the state suite's: one decode, read at each length). Every suite gives each contender's FLOP/s
(counted FLOPs over the median time) and MFU: that over the machine's peak (``harness.peak``, the measurement
a training run's ``costs.mfu`` uses: matrix products at the architecture's widths for a training batch of
``batch`` x ``tgt_len`` positions, in the contender's precision, measured once per machine and cached).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from seqbench import models
from seqbench.models.common import PAD
from seqbench.tasks.base import Shape

from .. import peak as peak_flops
from ..environment import cpu_name, git_info
from ..loss import smoothed_cross_entropy
from ..precision import autocast_for, cpu_has_bf16_matmul, resolve_precision
from ..profile import count_flops
from ..optim import adam
from ..train import TrainConfig
from . import real
from .baselines import BASELINE_NAMES, WordLanguageModel, build_baseline
from .decoding import NoEOS, RecomputePrefix, decode_batches, newstest_like_lengths, source_batches
from .state import Settings, flop_rate, state_notes, state_rows, state_table
from .timing import (Contender, paired_ratio, peak_call_bytes, resident_bytes, state_tensors, summary,
                     time_interleaved)

ARCHS = ("transformer", "lstm", "gru", "convs2s", "bytenet")  # those with a plain-PyTorch twin (baselines.py)
SUITES = ("train", "lm", "precision", "decode", "state")  # --suite all; "real" reads a task's data (real.py)
TINY = {"d_model": 32, "n_layers": 2, "d_ff": 64, "n_heads": 4, "channels": 32}  # over the small presets
# defaults per --preset: translation batch (sentences, src_len, tgt_len, vocab), LM (batch, bptt, vocab,
# emsize = nhid), decoding (sentences, sentences per batch, mean and sd of source lengths), state (sentences,
# output lengths; its sources have --src-len tokens)
SHAPES = {
    "tiny": {"batch": (4, 10, 10, 64), "lm": (4, 8, 64, 16), "decode": (8, 4, 8.0, 4.0), "state": (4, (8, 16))},
    "small": {"batch": (128, 32, 32, 8000), "lm": (20, 35, 33278, 200), "decode": (64, 32, 27.0, 15.0),
              "state": (16, (64, 128, 256, 512, 1024))},
    "paper": {"batch": (256, 50, 50, 37000), "lm": (20, 35, 33278, 200), "decode": (64, 32, 27.0, 15.0),
              "state": (16, (64, 128, 256, 512, 1024))},
}


# -- configs ------------------------------------------------------------------------------------
# --preset paper: each architecture at its published size, with what its plain twin lacks replaced by the
# nearest thing it has (GNMT-sized RNNs: Luong attention, every encoder layer bidirectional, no residual
# connections; ConvS2S: one shared vocabulary)
RNN_AT_GNMT_SIZE = {"attention": "luong", "residual_from": None, "n_bidirectional_layers": None,
                    "share_embeddings": True, "preset": "gnmt-size"}
PAPER = {"transformer": ("transformer_base", {}),
         "lstm": ("lstm_gnmt", RNN_AT_GNMT_SIZE),
         "gru": ("lstm_gnmt", {**RNN_AT_GNMT_SIZE, "name": "gru"}),
         "convs2s": ("convs2s_wmt_en_de", {"share_embeddings": True}),
         "bytenet": ("bytenet_mt", {})}


def load_preset(name: str) -> dict:
    try:
        return models.load_preset(name)
    except KeyError as err:
        raise SystemExit(f"--preset: {err.args[0]} (or tiny, small, paper)") from None


def presets(preset: str, archs: list[str]) -> list[tuple[str, dict]]:
    """(architecture, seqbench config) for each benchmarked architecture."""
    if preset in ("tiny", "small"):
        out = []
        for arch in archs:
            cfg = load_preset(arch)
            if preset == "tiny":
                cfg.update({k: v for k, v in TINY.items() if k in cfg}, preset="tiny")
            out.append((arch, cfg))
        return out
    if preset == "paper":
        return [(arch, {**load_preset(PAPER[arch][0]), **PAPER[arch][1]}) for arch in archs]
    cfg = load_preset(preset)
    return [(cfg["name"], cfg)]


def shape_key(preset: str) -> str:
    return preset if preset in ("tiny", "small") else "paper"


def translation_task(vocab: int):
    return Shape("seq2seq", {"src": vocab, "tgt": vocab})


def label(arch: str, cfg: dict, n_params: int) -> str:
    return f"{arch} {cfg.get('preset', '')} ({n_params / 1e6:.2f}M)"


# -- training steps ---------------------------------------------------------------------------
def training_step(model, loss_of, *, device, precision, compile_model):
    """A closure running one training step (forward, loss, backward, Adam step), and its optimizer (the trainer's)."""
    model.to(device).train()
    fwd = torch.compile(model) if compile_model else model
    opt = adam(model.parameters(), TrainConfig(lr=1e-4, betas=(0.9, 0.98), eps=1e-9, max_steps=1), device)
    _, autocast = autocast_for(device, precision)

    def step():
        loss_of(fwd, autocast).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, opt, autocast


def token_loss(target, *, smoothing: float = 0.0, ignore_index: int = -100, fused: bool = False):
    """logits (..., V) -> mean label-smoothed cross-entropy over ``target``'s scored tokens: seqbench's
    fused loss (``fused``, what its trainer runs) or ``F.cross_entropy``."""
    n_tokens = int((target != ignore_index).sum())  # once, not in the timed step

    def loss(logits):
        if fused:
            return smoothed_cross_entropy(logits, target, smoothing, ignore_index) / n_tokens
        return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=ignore_index,
                               label_smoothing=smoothing)
    return loss


def seq2seq_loss(batch, smoothing: float = 0.1, fused: bool = False):
    src, lengths, tgt_in, tgt_out = batch
    loss = token_loss(tgt_out, smoothing=smoothing, ignore_index=PAD, fused=fused)

    def loss_of(fwd, autocast):
        with autocast():
            logits = fwd(src, lengths, tgt_in)
        return loss(logits)
    return loss_of


def lm_loss(tokens, targets, fused: bool = False):
    loss = token_loss(targets, fused=fused)

    def loss_of(fwd, autocast):
        with autocast():
            logits = fwd(tokens)
        return loss(logits)
    return loss_of


def word_lm_loss(model: WordLanguageModel, tokens, targets):
    """The example's step: time-first data, the hidden state carried over and detached (``repackage_hidden``)."""
    data, target = tokens.t().contiguous(), targets.t().contiguous().view(-1)  # (T,B), (T*B,)
    hidden = [model.init_hidden(tokens.size(0))]

    def loss_of(fwd, autocast):
        with autocast():
            output, new = fwd(data, tuple(h.detach() for h in hidden[0]))
        hidden[0] = new
        return F.nll_loss(output.float(), target)
    return loss_of


def peak_for(model, tokens: int, device: torch.device, precision: str) -> peak_flops.Peak:
    """The machine's peak FLOP/s at ``model``'s widths for ``tokens`` positions per product, at ``precision``
    (``harness.peak``: cached per machine): the MFU denominator of every suite for this architecture."""
    return peak_flops.measure(device, precision, peak_flops.model_shapes(model, tokens) or None)


def add_mfu(stats: dict, flops: float, peak: peak_flops.Peak) -> None:
    """A contender's ``stats`` get its counted FLOPs per call, FLOP/s at the median time, the peak, and the MFU."""
    per_s = flops / stats["median_s"]
    stats.update(flops=flops, flops_per_s=per_s, peak_flops=peak.peak_flops_per_s,
                 mfu=peak_flops.mfu(flops, stats["median_s"], peak.peak_flops_per_s))


def compare_training(suite: str, pair, tokens: int, args, device, precision) -> dict:
    """Time, count and measure a (seqbench, baseline) pair, each (name given the parameter count, model
    factory, loss factory given the model); ``precision``: both contenders', or a pair of them. Both contenders'
    MFU divide by the peak at seqbench's model's widths (``peak_for``), each in its own precision."""
    contenders, extra = [], []
    precisions = (precision,) * 2 if isinstance(precision, str) else precision
    for (name, make, make_loss), each in zip(pair, precisions):
        torch.manual_seed(args.seed)
        model = make().to(device)
        loss_of = make_loss(model)
        step, opt, autocast = training_step(model, loss_of, device=device, precision=each,
                                            compile_model=args.compile)
        contenders.append(Contender(name(models.count_parameters(model)), step, tokens))
        extra.append((model, opt, autocast, loss_of))
    sb, base = contenders
    time_interleaved(sb, base, device=device, rounds=args.repeats, calls=args.steps, warmup=args.warmup)
    row = {"suite": suite, "model": sb.name, "baseline": base.name, "stats": {}}
    peaks = {each: peak_for(extra[0][0], tokens, device, each) for each in dict.fromkeys(precisions)}
    for key, c, (model, opt, autocast, loss_of), each in zip(("seqbench", "baseline"), (sb, base), extra, precisions):
        stats = summary(c)
        stats["params"] = models.count_parameters(model)
        stats["peak_bytes"] = resident_bytes(state_tensors(model, opt)) + peak_call_bytes(c.call, device)
        add_mfu(stats, count_flops(lambda: loss_of(model, autocast).backward()), peaks[each])
        opt.zero_grad(set_to_none=True)
        row["stats"][key] = stats
    row.update(paired_ratio(sb, base))
    stats = row["stats"]
    row["memory_ratio"] = stats["seqbench"]["peak_bytes"] / stats["baseline"]["peak_bytes"]
    row["flop_ratio"] = stats["seqbench"]["flops"] / max(1, stats["baseline"]["flops"])
    return row


def translation_batch(args, device) -> tuple[torch.Tensor, ...]:
    """(src, lengths, tgt_in, tgt_out) of ``batch`` random sentences, ``src_len`` + ``tgt_len`` tokens, no padding."""
    B, S, T, V = args.batch, args.src_len, args.tgt_len, args.vocab
    g = torch.Generator().manual_seed(args.seed)
    src = torch.randint(4, V, (B, S), generator=g)
    tgt = torch.randint(4, V, (B, T + 1), generator=g)
    return tuple(t.to(device) for t in (src, torch.full((B,), S), tgt[:, :-1], tgt[:, 1:]))


def without_twin(archs: list[str]) -> list[str]:
    """The architectures of ``archs`` that the train suite skips: no plain-PyTorch twin in ``baselines``."""
    return [a for a in archs if a not in BASELINE_NAMES]


def train_suite(args, device, precision) -> list[dict]:
    B, S, T, V = args.batch, args.src_len, args.tgt_len, args.vocab
    batch = translation_batch(args, device)
    skipped = without_twin(args.models)
    if skipped:
        print(f"[bench] train: skipping {', '.join(skipped)}: no plain-PyTorch twin in harness.bench.baselines",
              flush=True)
    rows = []
    for arch, cfg in presets(args.preset, [a for a in args.models if a not in skipped]):
        pair = [(lambda n: label(arch, cfg, n), lambda: models.build(cfg, translation_task(V)),
                 lambda m: seq2seq_loss(batch, fused=not args.plain_loss)),
                (lambda n: f"{BASELINE_NAMES[arch]} ({n / 1e6:.2f}M)", lambda: build_baseline(cfg, V),
                 lambda m: seq2seq_loss(batch))]
        row = compare_training("train", pair, B * T, args, device, precision)
        row.update(arch=arch, preset=cfg.get("preset"), shape=f"{B} x ({S} + {T}), vocab {V}")
        rows.append(row)
        progress(row)
    return rows


def lm_suite(args, device, precision) -> list[dict]:
    B, T, V, D = args.lm_batch, args.bptt, args.lm_vocab, args.lm_size
    g = torch.Generator().manual_seed(args.seed)
    text = torch.randint(0, V, (B, T + 1), generator=g).to(device)
    tokens, targets = text[:, :-1], text[:, 1:]
    cfg = {"name": "lstm", "preset": "wlm", "d_model": D, "n_layers": 2, "dropout": 0.2, "tie_output": False}
    task = Shape("lm", {"lm": V})
    pair = [(lambda n: f"seqbench LSTM LM ({n / 1e6:.2f}M)", lambda: models.build(cfg, task),
             lambda m: lm_loss(tokens, targets, fused=not args.plain_loss)),
            (lambda n: f"examples word_language_model ({n / 1e6:.2f}M)", lambda: WordLanguageModel(V, D, D, 2, 0.2),
             lambda m: word_lm_loss(m, tokens, targets))]
    row = compare_training("lm", pair, B * T, args, device, precision)
    row.update(arch="lstm", preset="wlm", shape=f"{B} x {T} (bptt), vocab {V}, emsize = nhid = {D}")
    progress(row)
    return [row]


def precision_suite(args, device, precision) -> list[dict]:
    """seqbench's training step in bf16 (autocast) against fp32, per architecture; each MFU against the peak in
    its own dtype."""
    B, S, T, V = args.batch, args.src_len, args.tgt_len, args.vocab
    batch = translation_batch(args, device)
    rows = []
    for arch, cfg in presets(args.preset, args.models):
        pair = [(lambda n, p=p: f"{label(arch, cfg, n)} {p}", lambda: models.build(cfg, translation_task(V)),
                 lambda m: seq2seq_loss(batch, fused=not args.plain_loss)) for p in ("bf16", "fp32")]
        row = compare_training("precision", pair, B * T, args, device, ("bf16", "fp32"))
        n_params = row["stats"]["seqbench"]["params"]
        row.update(model=label(arch, cfg, n_params), baseline="the same step in fp32", precision="bf16", arch=arch,
                   preset=cfg.get("preset"), shape=f"{B} x ({S} + {T}), vocab {V}")
        rows.append(row)
        progress(row)
    return rows


# -- decoding ---------------------------------------------------------------------------------
def decode_suite(args, device, precision) -> list[dict]:
    n, per_batch, mean, sd = args.decode_sentences, args.decode_batch, args.decode_mean_len, args.decode_sd_len
    lengths = newstest_like_lengths(n, mean=mean, sd=sd, seed=args.seed)
    batches = source_batches(lengths, args.vocab, per_batch, seed=args.seed)
    typical = source_batches([round(mean)] * per_batch, args.vocab, per_batch, seed=args.seed + 1)
    search = dict(beam=args.beam, lenpen=0.6, len_a=args.len_a, len_b=args.len_b, device=device)
    _, autocast = autocast_for(device, precision)

    def decode(decoder, some_batches):
        with autocast():
            return decode_batches(decoder, some_batches, **search)

    rows = []
    for arch, cfg in presets(args.preset, args.models):
        torch.manual_seed(args.seed)
        model = models.build(cfg, translation_task(args.vocab)).to(device).eval()
        resident = resident_bytes(state_tensors(model))
        modes = {"seqbench": NoEOS(model), "baseline": NoEOS(RecomputePrefix(model))}
        # warm-up and peak memory: one batch of sentences of the mean length (the profiler's record of a
        # whole recomputing run, or of its longest batch, would take gigabytes on CPU)
        peak_bytes = {k: resident + peak_call_bytes(lambda d=d: decode(d, typical), device) for k, d in modes.items()}
        hyps = {}

        def decode_all(key):
            hyps[key] = decode(modes[key], batches)

        a = Contender(f"{label(arch, cfg, models.count_parameters(model))} cached", lambda: decode_all("seqbench"), 0)
        b = Contender("recompute prefix (full forward)", lambda: decode_all("baseline"), 0)
        time_interleaved(a, b, device=device, rounds=args.repeats, calls=1, warmup=0)
        a.tokens = b.tokens = sum(len(h) for h in hyps["seqbench"])  # generated target tokens
        peak = peak_for(model, args.batch * args.tgt_len, device, precision)
        stats = {k: {**summary(c), "peak_bytes": peak_bytes[k]} for k, c in (("seqbench", a), ("baseline", b))}
        for k in modes:
            add_mfu(stats[k], count_flops(lambda k=k: decode(modes[k], batches)), peak)  # untimed: the counter is slow
        row = {"suite": "decode", "arch": arch, "preset": cfg.get("preset"), "model": a.name, "baseline": b.name,
               "same_hypotheses": hyps["seqbench"] == hyps["baseline"], "sentences": n,
               "stats": stats,
               "shape": f"{n} sentences in batches of {per_batch}, mean source length {sum(lengths) / n:.1f}, "
                        f"beam {args.beam}, vocab {args.vocab}, target length {args.len_a:g}|s|+{args.len_b} "
                        f"(EOS masked); peak memory: one batch of {per_batch} sentences of {round(mean)} tokens"}
        row.update(paired_ratio(a, b))
        row["memory_ratio"] = peak_bytes["seqbench"] / peak_bytes["baseline"]
        rows.append(row)
        progress(row)
    return rows


# -- decoder state against output length -----------------------------------------------------------------
def state_suite(args, device, precision) -> list[dict]:
    _, autocast = autocast_for(device, precision)
    settings = Settings(vocab=args.vocab, batch=args.state_batch, src_len=args.src_len, lengths=tuple(args.lengths),
                        device=device, precision=precision, autocast=autocast, repeats=args.repeats,
                        warmup=args.warmup, seed=args.seed, peak_tokens=args.batch * args.tgt_len)
    return state_rows(presets(args.preset, args.models), settings, label)


# -- output -----------------------------------------------------------------------------------
def progress(row: dict) -> None:
    print(f"[bench] {row['suite']}: {row['model']} vs {row['baseline']}: ratio {row['ratio']:.2f}", flush=True)


def mb(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def markdown_table(rows: list[dict]) -> str:
    head = ("| model | baseline | seqbench tok/s | baseline tok/s | ratio | spread | peak memory ratio | FLOP ratio | "
            "seqbench FLOP/s (MFU) | baseline FLOP/s (MFU) |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        sb, base = r["stats"]["seqbench"], r["stats"]["baseline"]
        spread = (f"IQR {sb['iqr_pct']:.1f}% / {base['iqr_pct']:.1f}%; ratio {r['ratio_min']:.2f}-"
                  f"{r['ratio_max']:.2f} over {len(r['ratio_rounds'])} rounds")
        memory = f"{r['memory_ratio']:.2f} ({mb(sb['peak_bytes'])} / {mb(base['peak_bytes'])} MiB)"
        flops = f"{r['flop_ratio']:.3f}" if "flop_ratio" in r else "n/a"
        if r.get("same_hypotheses") is False:
            flops += " (hypotheses differ!)"
        lines.append(f"| {r['model']} | {r['baseline']} | {sb['tokens_per_s']:,.0f} | {base['tokens_per_s']:,.0f} | "
                     f"{r['ratio']:.2f} | {spread} | {memory} | {flops} | {flop_rate(sb)} | {flop_rate(base)} |")
    return "\n".join(lines)


def precision_table(rows: list[dict]) -> str:
    lines = ["| model | fp32 tok/s | bf16 tok/s | speed ratio bf16 / fp32 | spread | peak memory ratio bf16 / fp32 | "
             "fp32 FLOP/s (MFU) | bf16 FLOP/s (MFU) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        low, fp32 = r["stats"]["seqbench"], r["stats"]["baseline"]
        spread = (f"IQR {low['iqr_pct']:.1f}% / {fp32['iqr_pct']:.1f}%; ratio {r['ratio_min']:.2f}-"
                  f"{r['ratio_max']:.2f} over {len(r['ratio_rounds'])} rounds")
        lines.append(f"| {r['model']} | {fp32['tokens_per_s']:,.0f} | {low['tokens_per_s']:,.0f} | {r['ratio']:.2f} | "
                     f"{spread} | {r['memory_ratio']:.2f} ({mb(low['peak_bytes'])} / {mb(fp32['peak_bytes'])} MiB) | "
                     f"{flop_rate(fp32)} | {flop_rate(low)} |")
    return "\n".join(lines)


TITLES = {
    "train": "Training step (forward + backward + Adam), seqbench vs plain PyTorch",
    "precision": "seqbench's training step, bf16 autocast vs fp32 (ratio > 1: bf16 faster)",
    "lm": "Language-model training step, seqbench LSTM LM vs PyTorch examples word_language_model",
    "decode": "Beam search, cached incremental decoding vs recomputing the prefix (ratio = speedup of caching)",
    "state": "Decode memory and speed against the Transformer's KV cache, by output length",
    "real": "The trainer's step on real batches against the bench's synthetic step (ratio < 1: real costs more)",
}


def report(rows: list[dict], meta: dict) -> str:
    out = [f"device={meta['device']} ({meta['device_name']}) threads={meta['threads']} precision={meta['precision']} "
           f"compile={meta['compile']} torch={meta['torch']} preset={meta['preset']} seqbench loss="
           f"{'F.cross_entropy' if meta['plain_loss'] else 'harness.loss (fused)'}",
           "tok/s = target tokens per second (median over rounds); ratio = seqbench / baseline speed (>1: seqbench "
           "faster); peak memory ratio = seqbench / baseline peak bytes of one call (resident state + the call's "
           f"peak allocation; {meta['memory_method']}); FLOP ratio = counted FLOPs per step, seqbench / baseline; "
           "FLOP/s = counted FLOPs / median time; MFU = FLOP/s / the machine's measured matmul peak at the "
           f"architecture's widths in the contender's precision (harness.peak, cached in {meta['peak_cache']})"]
    for suite in SUITES:
        suite_rows = [r for r in rows if r["suite"] == suite]
        if suite_rows:
            table = {"precision": precision_table, "state": state_table}.get(suite, markdown_table)(suite_rows)
            out += ["", f"### {TITLES[suite]}", "", f"{suite_rows[0]['shape']}", "", table]
            if suite == "precision" and meta["device"] == "cpu":
                out += ["", f"CPU bf16 matrix instructions (AMX-BF16 or AVX512-BF16): "
                            f"{'yes' if meta['cpu_bf16_matmul'] else 'no (bf16 emulated)'}; precision=auto on this "
                            f"CPU: {meta['auto_precision']}"]
            if suite == "decode":
                out += ["", "speedup of caching >= 3x: " + ", ".join(
                    f"{r['arch']} {'yes' if r['ratio'] >= 3 else 'NO'} ({r['ratio']:.1f}x)" for r in suite_rows)]
            if suite == "state":
                out += [""] + state_notes(suite_rows)
        skipped = without_twin(meta["args"]["models"]) if suite == "train" else []
        if skipped and meta["args"]["suite"] in ("train", "all"):
            out += ["", f"train: not run for {', '.join(skipped)} (no plain-PyTorch twin in harness.bench.baselines, "
                        f"which has twins of {', '.join(BASELINE_NAMES)})"]
    real_rows = [r for r in rows if r["suite"] == "real"]
    if real_rows:
        out += ["", f"### {TITLES['real']}", "", real_rows[0]["shape"], "", real.real_table(real_rows)]
    return "\n".join(out)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def git_commit() -> str | None:
    return git_info()["git_commit"]


# -- command line -----------------------------------------------------------------------------
def output_lengths(text: str) -> list[int]:
    """``--lengths``: "64,128" -> [64, 128], each a positive integer, none repeated."""
    try:
        lengths = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated whole numbers of output tokens, "
                                         "e.g. 64,128,256") from None
    if not lengths or min(lengths) < 1 or len(set(lengths)) < len(lengths):
        raise argparse.ArgumentTypeError(f"{text!r}: every output length must be a positive integer, given once")
    return sorted(lengths)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", default="train", choices=[*SUITES, "real", "all"],
                    help="all: every suite but real, which reads a task's data (harness.bench.real)")
    ap.add_argument("--preset", default="small",
                    help="tiny, small, paper (every architecture at its published size) or a preset file name "
                         "(e.g. transformer_base: that architecture only)")
    ap.add_argument("--archs", "--models", dest="models", default=None,
                    help="comma-separated architectures (tiny/small/paper presets; default: every registered one, "
                         "with --preset paper those with a published size; train: those with a plain-PyTorch twin)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="auto",
                    help="auto (bf16 where the GPU or CPU multiplies bf16 natively, else fp32), fp32, bf16, fp16; "
                         "the precision suite always compares bf16 with fp32")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models (train and lm suites)")
    ap.add_argument("--plain-loss", action="store_true",
                    help="seqbench's training step with F.cross_entropy instead of its fused loss (compares the "
                         "models alone)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds per pair")
    ap.add_argument("--steps", type=int, default=None, help="calls per round (default: 3 train, 10 lm, 1 real)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls of each contender first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the rows and settings here")
    g = ap.add_argument_group("sizes (defaults depend on --preset)")
    for flag, kind in (("--batch", int), ("--src-len", int), ("--tgt-len", int), ("--vocab", int),
                       ("--lm-batch", int), ("--bptt", int), ("--lm-vocab", int), ("--lm-size", int),
                       ("--decode-sentences", int), ("--decode-batch", int), ("--decode-mean-len", float),
                       ("--decode-sd-len", float)):
        g.add_argument(flag, type=kind, default=None)
    g.add_argument("--lengths", type=output_lengths, default=None,
                   help="state suite: comma-separated output lengths in tokens (default 64,128,256,512,1024; tiny: "
                        "8,16); --batch sets its sentences (default 16; tiny: 4), --src-len their tokens")
    g.add_argument("--beam", type=int, default=4)
    r = ap.add_argument_group("real suite (harness.bench.real)")
    r.add_argument("--task", default="multi30k", help="the task config conf/task/<name>.yaml (seq2seq form)")
    r.add_argument("--task-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a task setting (repeatable), e.g. --task-set n_train=64")
    r.add_argument("--real-batches", type=int, default=4, help="the first N batches of the shuffled epoch 0")
    r.add_argument("--max-tokens", type=int, default=4096, help="the batch budget (trainer.max_tokens)")
    r.add_argument("--split", type=int, default=4, help="sub-batches per real batch in the unpadded contender")
    r.add_argument("--profile", action="store_true",
                   help="profile trainer steps (torch.profiler, record_shapes): forward and backward operators")
    r.add_argument("--profile-steps", type=int, default=2, help="trainer steps profiled")
    g.add_argument("--len-a", type=float, default=1.0, help="decoding length limit a|s|+b")
    g.add_argument("--len-b", type=int, default=0)
    args = ap.parse_args(argv)
    for flag in ("--beam", "--steps", "--threads", "--repeats", "--batch", "--src-len", "--tgt-len", "--vocab",
                 "--lm-batch", "--bptt", "--lm-vocab", "--lm-size", "--decode-sentences", "--decode-batch",
                 "--real-batches", "--max-tokens", "--split", "--profile-steps"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and value < 1:  # None: the default; 0 would divide by zero or be taken for the default
            ap.error(f"{flag} {value}: must be a positive integer (leave it out for the default)")
    for flag in ("--warmup", "--len-a", "--len-b", "--decode-sd-len", "--decode-mean-len"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and not (value >= 0 and math.isfinite(value)):
            ap.error(f"{flag} {value}: must be a finite number >= 0")
    shapes = SHAPES[shape_key(args.preset)]
    args.state_batch = args.batch if args.batch is not None else shapes["state"][0]  # before --batch's default
    args.lengths = args.lengths or list(shapes["state"][1])
    for names, key in ((("batch", "src_len", "tgt_len", "vocab"), "batch"),
                       (("lm_batch", "bptt", "lm_vocab", "lm_size"), "lm"),
                       (("decode_sentences", "decode_batch", "decode_mean_len", "decode_sd_len"), "decode")):
        for name, default in zip(names, shapes[key]):
            if getattr(args, name) is None:
                setattr(args, name, default)
    published = args.preset == "paper"  # only architectures with a published-size preset (PAPER)
    if args.models is None:  # the real suite: the Transformer alone unless --archs names others
        args.models = ["transformer"] if args.suite == "real" else list(PAPER if published else models.MODELS)
    else:
        args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - set(models.MODELS))
    if unknown or not args.models:
        ap.error(f"--archs: {f'unknown {unknown}' if unknown else 'no architecture given'}; valid: "
                 f"{', '.join(models.MODELS)}")
    if published and set(args.models) - set(PAPER):
        ap.error(f"--archs: no published-size preset for {sorted(set(args.models) - set(PAPER))} under --preset "
                 f"paper; it has {', '.join(PAPER)}")
    if args.repeats < 1 or args.warmup < 0:
        ap.error("--repeats must be >= 1 and --warmup >= 0")
    if args.beam > args.vocab:
        ap.error(f"--beam {args.beam} is larger than the vocabulary (--vocab {args.vocab}); use at most {args.vocab}")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precision, _ = autocast_for(device, args.precision)
    suites = SUITES if args.suite == "all" else (args.suite,)
    rows = []
    for suite in suites:
        steps = args.steps or {"lm": 10, "real": 1}.get(suite, 3)
        run = {"train": train_suite, "lm": lm_suite, "precision": precision_suite, "decode": decode_suite,
               "state": state_suite, "real": real.real_suite}[suite]
        rows += run(argparse.Namespace(**{**vars(args), "steps": steps}), device, precision)
    meta = {"device": str(device), "device_name": device_name(device), "threads": torch.get_num_threads(),
            "precision": precision, "compile": args.compile, "plain_loss": args.plain_loss, "torch": torch.__version__,
            "cpu_bf16_matmul": cpu_has_bf16_matmul(), "auto_precision": resolve_precision("auto", device),
            "preset": args.preset,
            "git_commit": git_commit(), "peak_cache": str(peak_flops.cache_dir() / peak_flops.CACHE_NAME),
            "memory_method": "torch.cuda.max_memory_allocated" if device.type == "cuda"
            else "CPU allocator events from torch.profiler(profile_memory=True)",
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    print(report(rows, meta))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        for path in real.save_profiles(rows, args.json):
            print(f"[bench] profile written to {path}")
    return rows


if __name__ == "__main__":
    main()
