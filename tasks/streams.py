"""Language-model batches for the evaluation protocols beyond independent chunks (``tasks.batching.lm_batches``).

``carried_batches`` cuts a stream into parallel streams whose consecutive chunks continue each other, for a
recurrent model that carries its state from one batch to the next (``batchify`` and ``get_batch`` of PyTorch's
word_language_model example). ``sliding_windows`` / ``sliding_batches`` score every token once in windows of
up to ``bptt`` tokens that advance by ``stride`` (Hugging Face's perplexity guide; fairseq's ``--context-window``).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .batching import Batch

NO_LOSS = -100  # target id of a position that is read as context but not scored


def limited_tokens(task, split: str, total: int) -> int:
    """How many of a split's ``total`` scorable tokens evaluation scores under the task's limit for that split
    (``task.eval_limits[split]``: a number of tokens, a fraction of the split in (0, 1], or None for all): ``total``
    without one, else at least 1."""
    limit = (getattr(task, "eval_limits", None) or {}).get(split)
    if limit is None:
        return total
    n = limit if isinstance(limit, int) else math.ceil(limit * total)
    return max(1, min(total, n))


def eval_stream(task, split: str) -> np.ndarray:
    """The part of a split's token stream that evaluation reads: its first ``limit + 1`` tokens under a limit
    (:func:`limited_tokens`; the first token is context only)."""
    stream = task.streams[split]
    return stream[: limited_tokens(task, split, len(stream) - 1) + 1]


def carried_batches(stream: np.ndarray, bptt: int, n_streams: int) -> list[Batch]:
    """The stream as ``n_streams`` equal rows (its last ``len % n_streams`` tokens dropped), served ``bptt``
    columns at a time: row r of batch i+1 continues row r of batch i.

    Each row's first token is context only, so ``n_streams * (len // n_streams - 1)`` tokens are scored.
    """
    length = len(stream) // n_streams
    if length < 2:
        raise ValueError(f"a stream of {len(stream)} tokens cannot be cut into {n_streams} streams of at least 2 "
                         "tokens")
    rows = torch.from_numpy(stream[: length * n_streams].astype(np.int64)).view(n_streams, length)  # (B, L)
    batches = []
    for start in range(0, length - 1, bptt):
        n = min(bptt, length - 1 - start)
        x, y = rows[:, start : start + n].contiguous(), rows[:, start + 1 : start + n + 1].contiguous()
        batches.append(Batch({"tokens": x}, y, y.numel(), ignore_index=NO_LOSS))
    return batches


def sliding_windows(n_predicted: int, bptt: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored) input positions of each window over ``n_predicted`` predictions.

    Windows begin every ``stride`` positions and hold up to ``bptt``; each scores the positions past the previous
    window's end, so every prediction is scored exactly once with at least ``bptt - stride + 1`` tokens of
    context (fewer only where the stream begins). ``stride == bptt`` gives the independent chunks.
    """
    if not 1 <= stride <= bptt:
        raise ValueError(f"the stride must be in 1..bptt={bptt}; got {stride}")
    windows, scored_to, begin = [], 0, 0
    while scored_to < n_predicted:
        end = min(begin + bptt, n_predicted)
        windows.append((begin, end, scored_to))
        scored_to, begin = end, begin + stride
    return windows


def sliding_batches(stream: np.ndarray, bptt: int, stride: int, batch_size: int) -> list[Batch]:
    """:func:`sliding_windows` over the stream, ``batch_size`` full windows per batch (the shorter last one alone).

    Positions already scored by an earlier window are context only (target ``NO_LOSS``).
    """
    data = torch.from_numpy(stream.astype(np.int64))
    windows = sliding_windows(len(stream) - 1, bptt, stride)
    full = [w for w in windows if w[1] - w[0] == bptt]
    groups = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
    groups += [[w] for w in windows if w[1] - w[0] < bptt]
    batches = []
    for group in groups:
        x = torch.stack([data[begin:end] for begin, end, _ in group])
        y = torch.stack([data[begin + 1 : end + 1] for begin, end, _ in group])
        for row, (begin, _, scored) in enumerate(group):
            y[row, : scored - begin] = NO_LOSS
        batches.append(Batch({"tokens": x}, y, int((y != NO_LOSS).sum()), ignore_index=NO_LOSS))
    return batches
