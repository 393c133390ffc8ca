"""Synthetic sequence-to-sequence probes: copy and reverse a random symbol string.

Lengths are drawn uniformly from [min_len, max_len]; the data depend only on
``data_seed``, so every run and every model sees the same examples.
"""
from __future__ import annotations

import numpy as np

from .translation import Corpus, TranslationTask
from .vocab import BOS, EOS, PAD, UNK

OFFSET = UNK + 1  # first symbol id


class Symbols:
    """Tokenizer over the symbols ``s0 .. s{n-1}``."""

    def __init__(self, n_symbols: int):
        self.n = n_symbols

    @property
    def vocab_size(self) -> int:
        return self.n + OFFSET

    def encode(self, lines: list[str]) -> list[np.ndarray]:
        return [np.asarray([int(w[1:]) + OFFSET for w in line.split()], dtype=np.int32) for line in lines]

    def decode(self, ids: list[int]) -> str:
        return " ".join(f"s{i - OFFSET}" if i >= OFFSET else "<unk>" for i in ids if i not in (PAD, BOS, EOS))


def _corpus(kind: str, sizes: dict[str, int], n_symbols: int, min_len: int, max_len: int, seed: int) -> Corpus:
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len; got min_len={min_len}, max_len={max_len}")
    rng = np.random.default_rng(seed)
    src, tgt = {}, {}
    for split, n in sizes.items():
        seqs = [rng.integers(0, n_symbols, rng.integers(min_len, max_len + 1)) for _ in range(n)]
        src[split] = [" ".join(f"s{i}" for i in s) for s in seqs]
        tgt[split] = [" ".join(f"s{i}" for i in (s if kind == "copy" else s[::-1])) for s in seqs]
    return Corpus(src, tgt)


def _task(kind, n_train, n_valid, n_test, n_symbols, min_len, max_len, data_seed):
    sizes = {"train": n_train, "valid": n_valid, "test": n_test}
    corpus = _corpus(kind, sizes, n_symbols, min_len, max_len, data_seed)
    tok = Symbols(n_symbols)
    return TranslationTask(kind, corpus, tok, tok, "sym", "sym", max_len)


def copy(root=None, cache_dir=None, *, n_train: int = 10000, n_valid: int = 200, n_test: int = 200,
         n_symbols: int = 32, min_len: int = 5, max_len: int = 20, data_seed: int = 1234, download: bool = False):
    """Output = input."""
    return _task("copy", n_train, n_valid, n_test, n_symbols, min_len, max_len, data_seed)


def reverse(root=None, cache_dir=None, *, n_train: int = 10000, n_valid: int = 200, n_test: int = 200,
            n_symbols: int = 32, min_len: int = 5, max_len: int = 20, data_seed: int = 1234, download: bool = False):
    """Output = input reversed."""
    return _task("reverse", n_train, n_valid, n_test, n_symbols, min_len, max_len, data_seed)
