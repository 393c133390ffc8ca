"""Evaluation: a translation task's metrics (harness/metrics.py: sacreBLEU, error rates), perplexity (and bits
per character for a character LM) for language models."""
from __future__ import annotations

import logging
import math
import time

import torch

from . import lm_protocol
from . import metrics as scoring
from .decode import MAX_SOURCE_TOKENS, beam_search, greedy, long_sources, max_lengths
from .device import sync
from .lm_protocol import Protocol
from .loss import sequence_nll
from .precision import autocast_for

log = logging.getLogger("seqbench.evaluate")


class Progress:
    """Progress of one evaluation phase in the log: a line at the start with the amount of work, one every
    ``every`` seconds with the share done and an estimate of the time left, and one at the end with the time."""

    def __init__(self, what: str, total: int, unit: str, every: float = 10.0):
        self.what, self.total, self.unit, self.every, self.done = what, int(total), unit, every, 0
        self.start = self.last = time.perf_counter()
        log.info("%s: %s %s", what, f"{self.total:,}", unit)

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every and self.done < self.total:
            self.last, spent = now, now - self.start
            left = spent * (self.total - self.done) / max(self.done, 1)
            log.info("%s: %d%% (%s of %s %s) in %.0fs, about %.0fs left", self.what, 100 * self.done // self.total,
                     f"{self.done:,}", f"{self.total:,}", self.unit, spent, left)

    def end(self) -> float:
        seconds = time.perf_counter() - self.start
        log.info("%s: done, %s %s in %.1fs", self.what, f"{self.done:,}", self.unit, seconds)
        return seconds


def score_translations(hyps: list[str], refs: list[str], names: tuple[str, ...] = ("bleu", "chrf")) -> dict:
    """The named metrics (sacrebleu's with their signatures), always with corpus BLEU: validation curves use it."""
    return scoring.score(_with_bleu(names), hyps, refs)


def _with_bleu(names) -> tuple[str, ...]:
    return tuple(dict.fromkeys(("bleu", *names)))


def translate(model, task, split: str, device, *, beam: int = 4, lenpen: float = 0.6, max_len_a: float = 1.2,
              max_len_b: int = 10, batch_sentences: int = 128, limit: int | None = None,
              precision: str = "fp32", max_source_tokens: int | None = MAX_SOURCE_TOKENS,
              check_stop=None) -> tuple[list[str], float]:
    """Decode a split (sorted by length into batches); returns hypotheses in corpus order and seconds.

    A source longer than ``max_source_tokens`` is decoded from its first ``max_source_tokens`` tokens (None: no
    cap; see :func:`harness.decode.long_sources`). ``check_stop()`` runs before each batch and each decoding step
    and raises to end decoding early (a signal asked the job to stop).

    ``precision``: the autocast the search runs under, one context per batch of sentences (so a weight is
    cast to bf16 once per batch, not at every step); the job passes the trainer's resolved precision.
    """
    with torch.no_grad():
        model.eval()
        _, autocast = autocast_for(device, precision)
        hyps: list[str] = [""] * len(task.sources(split)[:limit])
        sync(device)
        start = time.perf_counter()
        progress = Progress(f"{split} decoding ({'greedy' if beam == 1 else f'beam {beam}'})", len(hyps), "sentences")
        for idx, src, lengths in task.source_batches(split, batch_sentences, max_source_tokens, limit):
            if check_stop:
                check_stop()
            src, lengths = src.to(device), lengths.to(device)
            limits = max_lengths(lengths, max_len_a, max_len_b, model)
            with autocast():
                if beam == 1:
                    out = greedy(model, src, lengths, limits, check_stop=check_stop)
                else:
                    out = beam_search(model, src, lengths, limits, beam=beam, lenpen=lenpen, check_stop=check_stop)
            for i, ids in zip(idx, out):
                hyps[i] = task.detokenize(ids)
            progress.update(len(idx))
        sync(device)
        progress.end()
        return hyps, time.perf_counter() - start


LENGTH_BUCKETS = (10, 20, 30, 40, 60)  # upper bounds, in source subwords


def scores_by_length(hyps: list[str], refs: list[str], src_lengths: list[int],
                     names: tuple[str, ...] = ("bleu",)) -> list[dict]:
    """The named metrics per source-length bucket (for the quality-by-length plot)."""
    rows, low = [], 0
    for high in (*LENGTH_BUCKETS, None):
        idx = [i for i, n in enumerate(src_lengths) if n > low and (high is None or n <= high)]
        if idx:
            h, r = [hyps[i] for i in idx], [refs[i] for i in idx]
            rows.append({"bucket": f"{low + 1}-{high}" if high else f">{low}", "low": low + 1, "n": len(idx),
                         **{n: scoring.METRICS[n].value(h, r) for n in names}})
        low = high or low
    return rows


def evaluate_translation(model, task, split: str, device, decoding: dict,
                         check_stop=None) -> tuple[dict, list[str]]:
    """Decode ``split`` and score against the raw references with the task's metrics (exact match always).

    Sources cut to ``max_source_tokens`` for decoding are counted (``truncated_sources``) and named in a warning.
    """
    hyps, seconds = translate(model, task, split, device, **decoding, check_stop=check_stop)
    refs = task.references(split)[: len(hyps)]
    names = getattr(task, "metrics", ("bleu", "chrf"))
    out = score_translations(hyps, refs, names)
    out["by_length"] = scores_by_length(hyps, refs, [len(s) for s in task.sources(split)[: len(hyps)]],
                                        _with_bleu(names))
    out.update(sentences=len(hyps), decode_seconds=seconds, sentences_per_second=len(hyps) / max(seconds, 1e-9),
               exact_match=scoring.exact_match(hyps, refs),
               samples=[{"ref": r, "hyp": h} for h, r in list(zip(hyps, refs))[:5]])
    out.update(_truncation(task.sources(split)[: len(hyps)], decoding.get("max_source_tokens", MAX_SOURCE_TOKENS),
                           split))
    return out, hyps


def _truncation(sources: list, cap: int | None, split: str) -> dict:
    """``truncated_sources`` (how many lines decoding cut to ``cap`` tokens) and, if any, a warning naming them."""
    long = long_sources([len(s) for s in sources], cap)
    if not long:
        return {"truncated_sources": 0}
    lines = ", ".join(map(str, long[:5])) + (", ..." if len(long) > 5 else "")
    warning = (f"{len(long)} of {len(sources)} {split} source lines (line {lines}) are longer than {cap} tokens and "
               f"were decoded from their first {cap} tokens only; raise eval.decoding.max_source_tokens (null: no "
               "cap) to decode them whole")
    log.warning(warning)
    return {"truncated_sources": len(long), "warning": warning}


def chunk_nll(model, task, split: str, device, max_tokens: int, autocast=None,
              check_stop=None) -> tuple[list[float], list[int]]:
    """Summed token NLL (no label smoothing) and scored tokens of every sequence of a split, in batch order.

    Per sequence, not per split: a language model's sequences are the task's ``bptt``-token chunks in stream
    order whatever the batch size, so two models' losses pair chunk by chunk (the report's paired bootstrap).
    """
    with torch.no_grad():
        model.eval()
        sums, counts = [], []
        todo = task.batches(split, max_tokens)  # under an evaluation limit, its part of the split
        progress = Progress(f"{split} loss", sum(b.n_tokens for b in todo), "tokens")
        for batch in todo:
            if check_stop:  # a stop signal ends a long validation between two batches
                check_stop()
            batch = batch.to(device)
            with autocast() if autocast else torch.autocast(device.type, enabled=False):
                batch_sums, batch_counts, _ = lm_protocol.sequence_sums(model, batch, fallback=sequence_nll)
            sums += batch_sums
            counts += batch_counts
            progress.update(batch.n_tokens)
        progress.end()
        return sums, counts


def mean_nll(model, task, split: str, device, max_tokens: int, autocast=None, check_stop=None) -> tuple[float, int]:
    """Summed token NLL / number of scored tokens over a split (no label smoothing)."""
    sums, counts = chunk_nll(model, task, split, device, max_tokens, autocast, check_stop)
    return sum(sums) / max(sum(counts), 1), sum(counts)


class Diverged(RuntimeError):
    """A model's loss is too large for its perplexity to be a number: training diverged."""


def perplexity(nll: float) -> float | None:
    """exp(nll), or None when it overflows a float (nll above ~709.8 nats: a diverged model) or nll is not finite.

    None rather than inf: records are strict JSON, which has no infinity.
    """
    try:
        return math.exp(nll) if math.isfinite(nll) else None
    except OverflowError:
        return None


def check_converged(metrics: dict) -> None:
    """Raise :class:`Diverged` naming the splits whose perplexity overflowed (see :func:`evaluate_lm`)."""
    bad = {split: m["nll"] for split, m in metrics.items() if m.get("diverged")}
    if bad:
        losses = ", ".join(f"{split} {'not finite' if nll is None else f'{nll:.4g}'}" for split, nll in bad.items())
        raise Diverged(f"the model diverged: its loss ({losses} nats per token) puts the perplexity beyond any "
                       "number (recorded as null, diverged: true). Lower trainer.lr, set trainer.clip_norm or "
                       "lengthen trainer.warmup_steps, and rerun in a new output folder")


def evaluate_lm(model, task, split: str, device, max_tokens: int, protocol: Protocol = Protocol()) -> dict:
    """Mean NLL per token and perplexity under ``protocol``, which the result names (harness/lm_protocol.py);
    bits per character too when every token is one character."""
    return lm_scores(model, task, split, device, max_tokens, protocol)[0]


def lm_scores(model, task, split: str, device, max_tokens: int,
              protocol: Protocol = Protocol(), check_stop=None) -> tuple[dict, dict]:
    """:func:`evaluate_lm`'s metrics, and the summed NLL and scored tokens of each evaluated sequence (the
    ``<split>.nll.json`` the report's paired bootstrap reads: two models scored under the same protocol and
    settings see the same sequences in the same order)."""
    scored = lm_protocol.score(model, task, split, device, max_tokens, protocol, check_stop)
    sums, counts = scored.pop("chunk_nll"), scored.pop("chunk_tokens")
    nll = scored.pop("nll_sum") / max(scored["tokens"], 1)
    out = {"nll": nll if math.isfinite(nll) else None, "perplexity": perplexity(nll), **scored}
    chunks = {"split": split, "bptt": getattr(task, "bptt", None), "protocol": protocol.name, "nll": sums,
              "tokens": counts}
    if out["perplexity"] is None:
        out["diverged"] = True
    if "bpc" in getattr(task, "metrics", ()):
        out["bpc"] = nll / math.log(2)
    return out, chunks
