"""Decoding benchmark pieces: a recompute-the-prefix decoder, forced-length decoding, newstest-like sources.

``RecomputePrefix`` is a benchmark-only decoding mode: at every step it runs the model's full
``forward`` (encoder included) on the source and the whole target prefix and keeps the last
position's logits. It has the ``encode``/``decode_step`` interface, and its state (source,
lengths, prefix) is batch-first, so ``harness.decode.beam_search`` runs it unchanged and
reorders it like any cache: both modes do the same search and, as the tests check, find the
same hypotheses. None of its entries is named ``src_*``, so the search reorders all of them at
every step: the comparison also checks the cached search, which moves the per-sentence
``src_*`` entries only when it drops sentences. ``NoEOS`` masks the end-of-sentence token so
that every hypothesis runs to its length limit: an untrained model stops at random, and the
benchmark should time the same, realistic number of steps in both modes.
"""
from __future__ import annotations

import numpy as np
import torch

from seqbench.models.common import EOS, PAD, padding_mask

from ..decode import beam_search, max_lengths


class RecomputePrefix:
    """Decoding by the model's full forward pass over the whole prefix at every step (no cache)."""

    def __init__(self, model):
        self.model = model
        self.max_target_positions = getattr(model, "max_target_positions", None)
        self.max_output_tokens = getattr(model, "max_output_tokens", None)

    def encode(self, src, src_lengths):
        return {"source": src, "lengths": src_lengths, "prefix": src.new_empty(src.size(0), 0)}

    def decode_step(self, prev, state, step):
        """prev (B,) -> logits (B,V) of position ``step``, from forward(src, lengths, prefix (B,step+1))."""
        prefix = torch.cat([state["prefix"], prev[:, None]], dim=1)
        logits = self.model(state["source"], state["lengths"], prefix)[:, -1]
        return logits, {**state, "prefix": prefix}


class NoEOS:
    """Wraps a decoder so that EOS is never chosen: hypotheses end at their length limit."""

    def __init__(self, decoder):
        self.decoder = decoder
        self.max_target_positions = getattr(decoder, "max_target_positions", None)
        self.max_output_tokens = getattr(decoder, "max_output_tokens", None)

    def encode(self, src, src_lengths):
        return self.decoder.encode(src, src_lengths)

    def decode_step(self, prev, state, step):
        logits, state = self.decoder.decode_step(prev, state, step)
        return logits.index_fill(-1, torch.tensor([EOS], device=logits.device), float("-inf")), state


def newstest_like_lengths(n: int, *, mean: float = 27.0, sd: float = 15.0, max_len: int = 100,
                          seed: int = 0) -> list[int]:
    """``n`` source lengths spread evenly over a newstest2014-like distribution (about 27 +- 15 subwords).

    A gamma distribution with that mean and deviation is sampled 3,003 times (newstest2014's size)
    and ``n`` evenly spaced order statistics are kept, so a small ``n`` still has the corpus's mean
    and spread. Returned in random order.
    """
    rng = np.random.default_rng(seed)
    shape = (mean / sd) ** 2
    corpus = np.sort(np.clip(np.rint(rng.gamma(shape, mean / shape, max(n, 3003))), 1, max_len))
    picked = corpus[((np.arange(n) + 0.5) * len(corpus) / n).astype(int)]
    return rng.permutation(picked).astype(int).tolist()


def source_batches(lengths: list[int], vocab: int, batch_sentences: int,
                   seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random sentences of the given lengths, sorted by length into padded batches (src (B,S), lengths (B,))."""
    g = torch.Generator().manual_seed(seed)
    order = sorted(lengths)
    batches = []
    for k in range(0, len(order), batch_sentences):
        lens = torch.tensor(order[k : k + batch_sentences])
        src = torch.randint(4, vocab, (len(lens), int(lens.max())), generator=g)
        src[padding_mask(lens, src.size(1))] = PAD
        batches.append((src, lens))
    return batches


def decode_batches(decoder, batches, *, beam: int, lenpen: float, len_a: float, len_b: int,
                   device: torch.device) -> list[list[int]]:
    """Beam search over every batch, length limits a*|s|+b as in ``harness.evaluate``."""
    hyps = []
    for src, lengths in batches:
        limits = max_lengths(lengths, len_a, len_b, decoder)
        hyps += beam_search(decoder, src.to(device), lengths.to(device), limits, beam=beam, lenpen=lenpen)
    return hyps
