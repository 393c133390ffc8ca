"""Word-level language modelling: WikiText-2, WikiText-103, PTB and any text files.

Each line is split on whitespace and ends with ``<eos>`` (as in the published
setups and PyTorch's word_language_model); blank lines contribute one ``<eos>``.
The vocabulary is the training split's word types (plus ``<unk>`` if absent);
perplexity is per word, ``<eos>`` included.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .batching import Batch, lm_batches
from .data import DataError, read_lines, require_path, resolve

SPLITS = ("train", "valid", "test")
EOS_WORD, UNK_WORD = "<eos>", "<unk>"


class LMTask:
    """A token stream per split, served as contiguous ``bptt``-token chunks."""

    family = "lm"

    def __init__(self, name: str, lines: dict[str, list[str]], bptt: int = 128):
        if bptt < 1:
            raise ValueError(f"task.bptt must be >= 1; got {bptt}")
        self.name, self.bptt = name, bptt
        words = {s: [w for line in lines[s] for w in line.split() + [EOS_WORD]] for s in SPLITS}
        vocab = list(dict.fromkeys(words["train"]))  # first-occurrence order: deterministic
        if UNK_WORD not in vocab:
            vocab.append(UNK_WORD)
        self.itos = vocab
        self.stoi = {w: i for i, w in enumerate(vocab)}
        unk = self.stoi[UNK_WORD]
        self.streams = {s: np.fromiter((self.stoi.get(w, unk) for w in words[s]), dtype=np.int64,
                                       count=len(words[s])) for s in SPLITS}
        for s in SPLITS:
            if len(self.streams[s]) < 2:
                raise DataError(f"task {name}: the {s} split has fewer than 2 tokens")

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def describe(self) -> dict:
        return {"name": self.name, "family": self.family, "vocab": self.vocab_size, "bptt": self.bptt,
                "tokens": {s: int(len(self.streams[s])) for s in SPLITS}}

    def n_predicted(self, split: str) -> int:
        """Tokens scored in a pass over a split (all but the first)."""
        return len(self.streams[split]) - 1

    def batches(self, split: str, max_tokens: int, epoch: int = 0, shuffle: bool = False, seed: int = 0) -> list[Batch]:
        if max_tokens < self.bptt:
            warnings.warn(f"batches of at most {max_tokens} tokens are smaller than one task.bptt={self.bptt} "
                          f"sequence: each batch holds one {self.bptt}-token sequence; raise trainer.max_tokens "
                          f"to a multiple of {self.bptt}, or lower task.bptt", stacklevel=2)
        batch_size = max(1, max_tokens // self.bptt)
        return lm_batches(self.streams[split], self.bptt, batch_size, shuffle, seed, epoch)


def _load(name: str, root: Path, files: dict[str, str], download: bool, bptt: int) -> LMTask:
    lines = {}
    for split, rel in files.items():
        lines[split] = read_lines(resolve(root, rel, download))
        if not any(line.strip() for line in lines[split]):
            raise DataError(f"{root / rel} holds no words; split '{split}' needs text")
    return LMTask(name, lines, bptt)


def wikitext2(root: Path, cache_dir: Path = None, *, bptt: int = 128, download: bool = True) -> LMTask:
    """WikiText-2 (Merity et al. 2016), tokenized v1 files."""
    return _load("wikitext2", root, {s: f"wikitext-2/{s}.txt" for s in SPLITS}, download, bptt)


def wikitext103(root: Path, cache_dir: Path = None, *, bptt: int = 128, download: bool = True) -> LMTask:
    """WikiText-103 (Merity et al. 2016): wiki.{train,valid,test}.tokens under wikitext-103/."""
    return _load("wikitext103", root, {s: f"wikitext-103/wiki.{s}.tokens" for s in SPLITS}, download, bptt)


def ptb(root: Path, cache_dir: Path = None, *, bptt: int = 128, download: bool = True) -> LMTask:
    """Penn Treebank, Mikolov's preprocessed version (10k vocabulary)."""
    return _load("ptb", root, {s: f"ptb/ptb.{s}.txt" for s in SPLITS}, download, bptt)


def text_files(root: Path, cache_dir: Path = None, *, path: str, bptt: int = 128, download: bool = False) -> LMTask:
    """Any folder with train.txt, valid.txt and test.txt (relative to the data root or absolute)."""
    require_path(path, "text_files", "train.txt, valid.txt and test.txt")
    folder = (root / path).resolve()
    return _load(f"text_files:{path}", folder, {s: f"{s}.txt" for s in SPLITS}, False, bptt)
