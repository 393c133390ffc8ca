"""Language modelling: WikiText-2, WikiText-103, PTB and any text files.

``task.tokenizer`` splits the text: ``whitespace`` (the default; words as in the published setups and
PyTorch's word_language_model), ``char`` (characters, spaces included) or ``bpe``/``unigram``
(sentencepiece subwords, tasks/tokenizers.py). Each line ends with an end-of-line token (``<eos>`` for
words); blank lines contribute just that token. Words keep the published vocabulary: the training split's
types in order of first occurrence, plus ``<unk>`` if absent. Perplexity is per token, the line ends
included; a character LM also reports bits per character (``bpc``: the mean NLL per character in bits,
each line end counting as one character).
"""
from __future__ import annotations

import logging
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from seqbench.harness import metrics as scoring

from . import tokenizers
from .base import EvalContext
from .batching import Batch, lm_batches
from .data import DataError, display_name, read_lines, require_path, resolve, sha256
from .streams import eval_stream
from .vocab import UNK

SPLITS = ("train", "valid", "test")
EOS_WORD, UNK_WORD = "<eos>", "<unk>"
UNK_WARN_RATE = 0.10  # a split with more unknown tokens than this gets a warning (WikiText-2 and PTB: 2.6 to 6.2%)
log = logging.getLogger("seqbench")


class Words:
    """The word vocabulary of the published word-level setups: every training word type, first occurrence first.

    ``min_count`` and ``vocab_size`` (at most that many entries, the most frequent kept) leave rare words out;
    they read as ``<unk>``.
    """

    kind = "whitespace"

    def __init__(self, train_lines: list[str], vocab_size: int | None = None, min_count: int = 1):
        counts = Counter(w for line in train_lines for w in line.split() + [EOS_WORD])  # first-occurrence order
        kept = [w for w, n in counts.items() if n >= min_count or w == EOS_WORD]
        self.warnings = []
        room = None if vocab_size is None else vocab_size - (UNK_WORD not in kept)
        if room is not None and len(kept) > room:
            frequent = set(sorted(kept, key=lambda w: (w not in (EOS_WORD, UNK_WORD), -counts[w]))[:room])
            self.warnings.append(f"task.vocab_size={vocab_size} keeps the {room} most frequent of the {len(kept)} "
                                 "word types; the others read as <unk>. Raise task.vocab_size to keep them.")
            kept = [w for w in kept if w in frequent]
        self.itos = kept + ([UNK_WORD] if UNK_WORD not in kept else [])
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.eos_id = self.stoi[EOS_WORD]
        self.unk_id = self.stoi[UNK_WORD]

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, lines: list[str]) -> list[np.ndarray]:
        get, unk = self.stoi.get, self.stoi[UNK_WORD]
        return [np.fromiter((get(w, unk) for w in line.split()), dtype=np.int64) for line in lines]


def stream(tokenizer, lines: list[str]) -> np.ndarray:
    """One split as a single token stream: each line's tokens, then the end-of-line id."""
    eos = np.array([tokenizer.eos_id], dtype=np.int64)
    parts = [part for ids in tokenizer.encode(lines) for part in (ids, eos)]
    return np.concatenate(parts).astype(np.int64) if parts else eos[:0]


class LMTask:
    """A token stream per split, served as contiguous ``bptt``-token chunks; evaluated by perplexity."""

    family = form = "lm"

    def __init__(self, name: str, lines: dict[str, list[str]], bptt: int = 128, tokenizer=None,
                 path: Path | None = None):
        if bptt < 1:
            raise ValueError(f"task.bptt must be >= 1; got {bptt}")
        self.name, self.bptt, self.path = name, bptt, path
        self.tokenizer = tokenizer if tokenizer is not None else Words(lines["train"])
        self.metrics = scoring.defaults("lm", self.tokenizer.kind)
        self.streams = {s: stream(self.tokenizer, lines[s]) for s in SPLITS}
        for s in SPLITS:
            if len(self.streams[s]) < 2:
                raise DataError(f"task {name}: the {s} split has fewer than 2 tokens")
        self.unk_rates = {s: self.unk_rate(self.streams[s]) for s in SPLITS}
        self.data_warnings = [f"{rate:.1%} of the {s} split's tokens are unknown to the vocabulary (read as one "
                              f"unknown token; above {UNK_WARN_RATE:.0%}): its perplexity says little about the text. "
                              "Check that the split is text of the training data's kind, or raise task.vocab_size / "
                              "lower task.min_count" for s, rate in self.unk_rates.items() if rate > UNK_WARN_RATE]
        for warning in self.data_warnings:
            log.warning("task %s: %s", name, warning)

    def unk_rate(self, stream: np.ndarray) -> float:
        """The share of a stream's tokens (line ends included) that are the unknown token."""
        unk = getattr(self.tokenizer, "unk_id", UNK)
        return float(np.count_nonzero(stream == unk)) / max(len(stream), 1)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def vocab(self) -> dict[str, int]:
        return {"lm": self.vocab_size}

    def data_arrays(self) -> dict[str, list]:
        return {s: [self.streams[s]] for s in self.streams}  # one token stream per split

    def describe(self) -> dict:
        about = {"path": None if self.path is None else str(self.path),
                 "warnings": [*self.tokenizer.warnings, *self.data_warnings]}
        return {"name": self.name, "family": self.family, "form": self.form, "vocab": self.vocab_size, "bptt": self.bptt,
                "tokens": {s: int(len(self.streams[s])) for s in SPLITS}, "segmentation": self.tokenizer.kind,
                "unk_rate": {s: round(rate, 6) for s, rate in self.unk_rates.items()},
                "metrics": list(self.metrics), **{k: v for k, v in about.items() if v}}

    def batches(self, split: str, max_tokens: int, epoch: int = 0, shuffle: bool = False, seed: int = 0) -> list[Batch]:
        if max_tokens < self.bptt:
            warnings.warn(f"batches of at most {max_tokens} tokens are smaller than one task.bptt={self.bptt} "
                          f"sequence: each batch holds one {self.bptt}-token sequence; raise trainer.max_tokens "
                          f"to a multiple of {self.bptt}, or lower task.bptt", stacklevel=2)
        batch_size = max(1, max_tokens // self.bptt)
        stream = self.streams[split] if split == "train" else eval_stream(self, split)  # under eval.max_*_tokens
        return lm_batches(stream, self.bptt, batch_size, shuffle, seed, epoch)


    def validate(self, model, ctx: EvalContext) -> dict:
        return {}  # the validation loss (valid_nll, valid_ppl) is the curve

    def evaluate(self, model, split: str, ctx: EvalContext) -> tuple[dict, dict]:
        """Perplexity under ``ctx.lm_protocol`` (and bits per character for a character LM; harness/evaluate.py);
        the per-sequence losses are left as ``<split>.nll.json``."""
        from seqbench.harness.evaluate import lm_scores  # noqa: PLC0415 (the harness evaluates; see __init__)
        protocol = {} if ctx.lm_protocol is None else {"protocol": ctx.lm_protocol}
        metrics, chunks = lm_scores(model, self, split, ctx.device, ctx.max_tokens, check_stop=ctx.check_stop,
                                    **protocol)
        return metrics, {f"{split}.nll.json": chunks}


def _load(name: str, root: Path, files: dict[str, str], download: bool, bptt: int, cache_dir: Path | None,
          tokenizer: str, vocab_size: int | None, min_count: int, path: Path | None = None) -> LMTask:
    tokenizers.check_settings(tokenizer, vocab_size, min_count)
    lines = {}
    for split, rel in files.items():
        lines[split] = read_lines(resolve(root, rel, download))
        if not any(line.strip() for line in lines[split]):
            raise DataError(f"{root / rel} holds no words; split '{split}' needs text")
    if tokenizer == "whitespace":
        tok = Words(lines["train"], vocab_size, min_count)
    else:
        key = {"data": [sha256(root / files["train"])], "side": "lm"}
        tok = tokenizers.build(tokenizer, lines["train"], Path(cache_dir or root / "cache"), key, vocab_size,
                               min_count)
    return LMTask(name, lines, bptt, tok, path)


def wikitext2(root: Path, cache_dir: Path = None, *, bptt: int = 128, tokenizer: str = "whitespace",
              vocab_size: int | None = None, min_count: int = 1, download: bool = True) -> LMTask:
    """WikiText-2 (Merity et al. 2016), tokenized v1 files."""
    return _load("wikitext2", root, {s: f"wikitext-2/{s}.txt" for s in SPLITS}, download, bptt, cache_dir,
                 tokenizer, vocab_size, min_count)


def wikitext103(root: Path, cache_dir: Path = None, *, bptt: int = 128, tokenizer: str = "whitespace",
                vocab_size: int | None = None, min_count: int = 1, download: bool = True) -> LMTask:
    """WikiText-103 (Merity et al. 2016): wiki.{train,valid,test}.tokens under wikitext-103/."""
    return _load("wikitext103", root, {s: f"wikitext-103/wiki.{s}.tokens" for s in SPLITS}, download, bptt,
                 cache_dir, tokenizer, vocab_size, min_count)


def ptb(root: Path, cache_dir: Path = None, *, bptt: int = 128, tokenizer: str = "whitespace",
        vocab_size: int | None = None, min_count: int = 1, download: bool = True) -> LMTask:
    """Penn Treebank, Mikolov's preprocessed version (10k vocabulary)."""
    return _load("ptb", root, {s: f"ptb/ptb.{s}.txt" for s in SPLITS}, download, bptt, cache_dir, tokenizer,
                 vocab_size, min_count)


def text_files(root: Path, cache_dir: Path = None, *, path: str, bptt: int = 128, tokenizer: str = "whitespace",
               vocab_size: int | None = None, min_count: int = 1, label: str | None = None,
               download: bool = False) -> LMTask:
    """Any folder with train.txt, valid.txt and test.txt (relative to the data root or absolute).

    The task is named after the folder (or ``label``); the record keeps the full path.
    """
    require_path(path, "text_files", "train.txt, valid.txt and test.txt")
    folder = (root / path).resolve()
    return _load(display_name(folder, label, "text_files"), folder, {s: f"{s}.txt" for s in SPLITS}, False, bptt,
                 cache_dir, tokenizer, vocab_size, min_count, folder)
