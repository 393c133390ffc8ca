"""Batches: token-budget batching with length bucketing, and contiguous LM chunks."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .vocab import BOS, EOS, PAD


@dataclass
class Batch:
    """One batch: ``model(**inputs)`` gives logits aligned with ``target`` (PAD ignored)."""

    inputs: dict[str, torch.Tensor]
    target: torch.Tensor  # (B,T)
    n_tokens: int  # non-padding target tokens
    index: list[int] | None = None  # example indices (translation)
    ignore_index: int = PAD  # target id that carries no loss (-100: none, for language models)

    def to(self, device) -> Batch:
        inputs = {k: v.to(device, non_blocking=True) for k, v in self.inputs.items()}
        target = self.target.to(device, non_blocking=True)
        return Batch(inputs, target, self.n_tokens, self.index, self.ignore_index)

    def shard(self, rank: int, world: int) -> Batch:
        """Rows ``rank`` of ``world`` contiguous, near-equal parts (data parallelism); ``n_tokens`` counts the part's."""
        rows = self.target.shape[0]
        if rows < world:
            raise ValueError(f"a batch of {rows} sequences cannot be split over {world} processes; raise "
                             "trainer.max_tokens (it is the batch of one optimizer step, shared by all processes)")
        part = torch.arange(rows).tensor_split(world)[rank]
        lo, hi = int(part[0]), int(part[-1]) + 1
        target = self.target[lo:hi]
        index = self.index[lo:hi] if self.index is not None else None
        return Batch({k: v[lo:hi] for k, v in self.inputs.items()}, target,
                     int((target != self.ignore_index).sum()), index, self.ignore_index)


def pad_stack(seqs: list[np.ndarray], prefix: int | None = None, suffix: int | None = None) -> torch.Tensor:
    """Right-padded (B, max_len) tensor from id arrays, optionally adding BOS/EOS."""
    extra = (prefix is not None) + (suffix is not None)
    out = torch.full((len(seqs), max(len(s) for s in seqs) + extra), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        row = ([prefix] if prefix is not None else []) + s.tolist() + ([suffix] if suffix is not None else [])
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def translation_batch(src: list[np.ndarray], tgt: list[np.ndarray], index: list[int]) -> Batch:
    src_t = pad_stack(src)
    lengths = torch.tensor([len(s) for s in src], dtype=torch.long)
    tgt_in, tgt_out = pad_stack(tgt, prefix=BOS), pad_stack(tgt, suffix=EOS)
    n = int((tgt_out != PAD).sum())
    return Batch({"src": src_t, "src_lengths": lengths, "tgt_in": tgt_in}, tgt_out, n, index)


def token_budget_batches(src_lens: np.ndarray, tgt_lens: np.ndarray, max_tokens: int,
                         shuffle: bool, seed: int, epoch: int) -> list[list[int]]:
    """Group example indices so each batch holds at most ``max_tokens`` padded tokens.

    Examples are sorted by length (ties broken randomly when shuffling), cut
    greedily into batches, and the batch order shuffled: the result depends only
    on (seed, epoch), so a resumed run sees exactly the same batches.
    """
    rng = np.random.default_rng([seed, epoch])
    n = len(src_lens)
    tiebreak = rng.permutation(n) if shuffle else np.arange(n)
    order = np.lexsort((tiebreak, src_lens, tgt_lens))  # sort by target, then source length
    sizes = np.maximum(src_lens, tgt_lens + 1)[order]
    if sizes.max(initial=0) > max_tokens:
        raise ValueError(
            f"an example of {int(sizes.max())} tokens exceeds max_tokens={max_tokens}; "
            "raise trainer.max_tokens or lower task.max_len"
        )
    batches, start, longest = [], 0, 0
    for i, size in enumerate(sizes):
        longest = max(longest, size)
        if longest * (i - start + 1) > max_tokens:
            batches.append(order[start:i].tolist())
            start, longest = i, size
    if start < n:
        batches.append(order[start:].tolist())
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def lm_batches(stream: np.ndarray, bptt: int, batch_size: int, shuffle: bool, seed: int, epoch: int) -> list[Batch]:
    """Cut a token stream into (input, next-token target) chunks of ``bptt`` tokens.

    Every token but the first is predicted exactly once per pass. Chunks are
    independent (no state carried between them), so their order may be shuffled.
    """
    starts = np.arange(0, len(stream) - 1, bptt)
    if shuffle:
        starts = np.random.default_rng([seed, epoch]).permutation(starts)
    full = [s for s in starts if s + bptt + 1 <= len(stream)]
    tail = [s for s in starts if s + bptt + 1 > len(stream)]  # the one shorter chunk at the end
    data = torch.from_numpy(stream.astype(np.int64))
    batches = []
    for group in [full[i : i + batch_size] for i in range(0, len(full), batch_size)] + [[s] for s in tail]:
        n = min(bptt, len(stream) - 1 - group[0]) if len(group) == 1 else bptt
        x = torch.stack([data[s : s + n] for s in group])
        y = torch.stack([data[s + 1 : s + n + 1] for s in group])
        batches.append(Batch({"tokens": x}, y, y.numel(), ignore_index=-100))
    return batches
