"""Tokenizers for text tasks (``task.tokenizer``), all behind one small interface.

Each has ``encode(lines) -> [int32 id arrays]``, ``decode(ids) -> str``, ``vocab_size``, ``kind`` and
``warnings`` (what the record's task description should say about it), and the fixed special ids
PAD 0, BOS 1, EOS 2, UNK 3 of every translation task:

- ``bpe`` / ``unigram``: sentencepiece subwords; decoding gives back the text.
- ``whitespace``: the tokens as written, split on whitespace, never merged (symbol-level data such as
  phoneme strings); decoding joins tokens with single spaces, so it is exact for any line in that form.
- ``char``: characters, spaces included, so decoding gives back the exact line.

The vocabulary comes from the training text only, and is built once and cached under the cache folder,
keyed by the tokenizer kind, its settings and the training data's checksum.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import sentencepiece as spm

from .data import DataError
from .vocab import BOS, EOS, PAD, UNK

KINDS = ("bpe", "unigram", "whitespace", "char")
SUBWORDS = ("bpe", "unigram")
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids PAD, BOS, EOS, UNK
UNK_TEXT = {"whitespace": "<unk>", "char": "\N{REPLACEMENT CHARACTER}"}  # how an unknown token decodes


def check_settings(kind, vocab_size, min_count: int = 1):
    """Fail early, naming the setting, on a tokenizer kind, vocabulary size or minimum count that cannot work."""
    if kind not in KINDS:
        raise ValueError(f"task.tokenizer={kind!r}; valid: {', '.join(KINDS)}")
    uncapped = vocab_size is None and kind not in SUBWORDS  # every token type of the training data
    if not uncapped and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                         or vocab_size <= len(SPECIALS)):
        every = "" if kind in SUBWORDS else ", or null for every token type of the training data"
        raise ValueError(f"task.vocab_size={vocab_size!r} is not a valid vocabulary size: set task.vocab_size to a "
                         f"whole number above {len(SPECIALS)} (the special ids), e.g. 8000{every}")
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"task.min_count={min_count!r}: set it to a whole number >= 1 (the fewest times a token "
                         "must occur in the training data to get its own id)")


def build(kind: str, lines: list[str], cache_dir: Path, key: dict, vocab_size: int | None, min_count: int = 1):
    """The tokenizer of ``kind`` trained on ``lines`` (or loaded from the cache); ``key`` identifies the data."""
    check_settings(kind, vocab_size, min_count)
    if kind in SUBWORDS:  # the sentencepiece cache key as it has always been, so cached models stay valid
        return Subwords.train(lines, cache_dir, {**key, "model_type": kind, "vocab_size": vocab_size})
    return Vocabulary.train(kind, lines, cache_dir,
                            {**key, "tokenizer": kind, "vocab_size": vocab_size, "min_count": min_count})


def cache_file(cache_dir: Path, folder: str, key: dict, suffix: str) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / folder / f"{digest}{suffix}"


def corrupt_cache(path: Path, err: Exception) -> DataError:
    return DataError(f"the tokenizer cache file {path} cannot be read ({type(err).__name__}: {err}); it is corrupt "
                     "or from another program. Deleting it is safe: it is rebuilt from the training data on the next "
                     "run.")


def unwritable_cache(cache_dir: Path, err: OSError) -> DataError:
    return DataError(f"cannot write the tokenizer cache under {cache_dir}: {type(err).__name__}: {err}. Point "
                     "data.cache_dir at a writable folder (or make the data root writable).")


class Subwords:
    """A trained sentencepiece model (one side or joint), with our fixed special ids."""

    eos_id = EOS  # what a language model's stream puts at each line end

    def __init__(self, model_file: Path, kind: str = "bpe", requested: int | None = None):
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as err:
            raise corrupt_cache(model_file, err) from err
        self.kind, self.warnings = kind, []
        if requested is not None and self.vocab_size < requested:
            self.warnings.append(
                f"task.vocab_size={requested} is more than the {kind} tokenizer can make of this training data: "
                f"capped at {self.vocab_size}, the largest valid value. Set task.vocab_size={self.vocab_size} (or "
                "less), or task.tokenizer=whitespace if the tokens are already separated by spaces.")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, lines: list[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int32) for ids in self.sp.encode(lines)]

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i not in (PAD, BOS, EOS)])

    @classmethod
    def train(cls, lines: list[str], cache_dir: Path, key: dict) -> Subwords:
        """Train (or load from the cache) a sentencepiece model on ``lines``.

        A ``vocab_size`` larger than the data allows is capped at the largest valid size (sentencepiece's
        soft limit) and the tokenizer says so in ``warnings``; one too small fails naming the smallest valid size.
        """
        model_file = cache_file(cache_dir, "spm", key, ".model")
        if not model_file.is_file():
            try:
                model_file.parent.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=model_file.parent) as tmp:
                    text = Path(tmp) / "train.txt"
                    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
                    _train_sentencepiece(text, Path(tmp) / "m", key)
                    (model_file.parent / f"{model_file.stem}.json").write_text(json.dumps(key, indent=1, sort_keys=True))
                    os.replace(Path(tmp) / "m.model", model_file)
            except OSError as err:  # not writable, a path through a file, disk full, ...
                raise unwritable_cache(cache_dir, err) from err
        return cls(model_file, key["model_type"], key["vocab_size"])


def _train_sentencepiece(text: Path, prefix: Path, key: dict) -> None:
    kind, size = key["model_type"], key["vocab_size"]
    settings = dict(input=str(text), model_prefix=str(prefix), vocab_size=size, model_type=kind,
                    character_coverage=1.0, pad_id=PAD, bos_id=BOS, eos_id=EOS, unk_id=UNK,
                    input_sentence_size=2_000_000, shuffle_input_sentence=True, num_threads=os.cpu_count() or 1,
                    minloglevel=2)
    try:
        try:
            spm.SentencePieceTrainer.train(**settings)
        except RuntimeError as err:
            if "Vocabulary size too high" not in str(err):
                raise
            spm.SentencePieceTrainer.train(**settings, hard_vocab_limit=False)  # as many pieces as the data allows
    except RuntimeError as err:
        if (small := re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(err))) is not None:
            raise DataError(f"task.vocab_size={size} is too small for the {kind} tokenizer on this training data: "
                            f"it needs at least {small.group(1)} (the special ids and every character of the text). "
                            f"Set task.vocab_size={small.group(1)} or more, or task.tokenizer=char.") from err
        raise DataError(f"sentencepiece could not build the {kind} tokenizer (task.tokenizer={kind}, "
                        f"task.vocab_size={size}): {err}") from err


class Vocabulary:
    """Tokens as written (``whitespace``) or characters (``char``), each with its own id after the special ids.

    Token types are ordered by training-data frequency (ties: first occurrence); types seen fewer than
    ``min_count`` times, or beyond the ``vocab_size`` most frequent, read as UNK.
    """

    eos_id = EOS

    def __init__(self, kind: str, tokens: list[str], warnings: list[str] | None = None):
        self.kind, self.warnings = kind, list(warnings or [])
        self.itos = [*SPECIALS, *tokens]
        self.stoi = {t: i for i, t in enumerate(self.itos) if i >= UNK}  # '<s>' in the text is a token, not BOS
        self.unk_text = UNK_TEXT[kind]

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def split(self, line: str) -> list[str]:
        return line.split() if self.kind == "whitespace" else list(line)

    def canonical(self, line: str) -> str:
        """The line as decoding writes it (single spaces between whitespace tokens): what hypotheses are scored
        against."""
        return " ".join(line.split()) if self.kind == "whitespace" else line

    def encode(self, lines: list[str]) -> list[np.ndarray]:
        get = self.stoi.get
        return [np.fromiter((get(t, UNK) for t in self.split(line)), dtype=np.int32) for line in lines]

    def decode(self, ids: list[int]) -> str:
        tokens = [self.unk_text if i == UNK else self.itos[i] for i in ids if i not in (PAD, BOS, EOS)]
        return (" " if self.kind == "whitespace" else "").join(tokens)

    @classmethod
    def train(cls, kind: str, lines: list[str], cache_dir: Path, key: dict) -> Vocabulary:
        """Count the training tokens (or load the vocabulary from the cache) and keep the frequent ones."""
        path = cache_file(cache_dir, "vocab", key, ".json")
        if path.is_file():
            try:
                cached = json.loads(path.read_text(encoding="utf-8"))
                return cls(kind, [str(t) for t in cached["tokens"]], cached["warnings"])
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise corrupt_cache(path, err) from err
        tokens, warnings = _keep(kind, lines, key["vocab_size"], key["min_count"])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False) as f:
                json.dump({"key": key, "tokens": tokens, "warnings": warnings}, f, ensure_ascii=False)
            os.replace(f.name, path)
        except OSError as err:
            raise unwritable_cache(cache_dir, err) from err
        return cls(kind, tokens, warnings)


def _keep(kind: str, lines: list[str], vocab_size: int | None, min_count: int) -> tuple[list[str], list[str]]:
    """The token types that get an id, most frequent first, and what to warn about the ones left out."""
    counts = Counter(t for line in lines for t in (line.split() if kind == "whitespace" else line))
    for special in SPECIALS:
        counts.pop(special, None)
    frequent = [t for t, n in counts.most_common() if n >= min_count]
    room = len(frequent) if vocab_size is None else vocab_size - len(SPECIALS)
    if len(frequent) <= room:
        return frequent, []
    left = sum(counts[t] for t in frequent[room:])
    return frequent[:room], [
        f"task.vocab_size={vocab_size} keeps the {room} most frequent of the {len(frequent)} {kind} token types "
        f"seen at least task.min_count={min_count} times; the other {len(frequent) - room} ({left} of "
        f"{sum(counts.values())} training tokens) read as unknown. Raise task.vocab_size to keep them."]
