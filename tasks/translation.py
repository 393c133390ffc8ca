"""Translation tasks: Multi30k, WMT14 En-De, any parallel text files, and synthetic copy/reverse.

Text is split by ``task.tokenizer`` (tasks/tokenizers.py: sentencepiece BPE or unigram subwords, the
whitespace-separated tokens as written, or characters; one joint or two separate vocabularies), built once
from the training split and cached under the cache folder keyed by its settings and the training data's
checksum. Hypotheses are detokenized back to plain text and scored against the raw references (whitespace
tokens: single-spaced), so BLEU is comparable with published sacreBLEU numbers; ``task.metrics`` chooses
the scores (harness/metrics.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from seqbench.harness import metrics as scoring

from . import tokenizers
from .base import EvalContext
from .batching import Batch, pad_stack, token_budget_batches, translation_batch
from .data import DataError, display_name, read_lines, require_path, resolve, sha256
from .vocab import UNK

SPLITS = ("train", "valid", "test")
log = logging.getLogger("seqbench")
EMPTY_SOURCE = np.array([UNK], dtype=np.int32)


@dataclass
class Corpus:
    """Raw parallel text per split."""

    src: dict[str, list[str]]
    tgt: dict[str, list[str]]


class TranslationTask:
    """Parallel text, encoded by the task's tokenizers, served as token-budget batches; evaluated by decoding
    (greedy or beam search) and scoring the detokenized hypotheses against the raw references."""

    family, form = "translation", "seq2seq"

    def __init__(self, name: str, corpus: Corpus, src_tok, tgt_tok, src_lang: str, tgt_lang: str,
                 max_len: int = 256, metrics: tuple[str, ...] = ("bleu", "chrf"), path: Path | None = None):
        self.name, self.src_lang, self.tgt_lang, self.max_len = name, src_lang, tgt_lang, max_len
        self.corpus, self.src_tok, self.tgt_tok = corpus, src_tok, tgt_tok
        self.metrics, self.path = metrics, path
        self.empty_references, self.data_warnings = empty_references(corpus)
        for warning in self.data_warnings:
            log.warning(warning)
        self.src_ids = {s: src_tok.encode(corpus.src[s]) for s in SPLITS}
        self.tgt_ids = {s: tgt_tok.encode(corpus.tgt[s]) for s in SPLITS}
        lens = [(len(a), len(b)) for a, b in zip(self.src_ids["train"], self.tgt_ids["train"])]
        # training pairs longer than max_len (or empty) are dropped, as fairseq does
        self.train_keep = np.array([i for i, (a, b) in enumerate(lens) if 0 < a <= max_len and 0 < b <= max_len])
        if len(self.train_keep) == 0:
            raise DataError(f"task {name}: no training pair has 1..{max_len} tokens on both sides")
        # positions a model needs per split (target + BOS/EOS); train counts the pairs kept
        self.longest = {"train": max(max(lens[i][0], lens[i][1] + 1) for i in self.train_keep)}
        for s in SPLITS[1:]:
            self.longest[s] = max([max(len(a), len(b) + 1) for a, b in zip(self.src_ids[s], self.tgt_ids[s])] or [0])

    @property
    def src_vocab_size(self) -> int:
        return self.src_tok.vocab_size

    @property
    def tgt_vocab_size(self) -> int:
        return self.tgt_tok.vocab_size

    def vocab(self) -> dict[str, int]:
        return {"src": self.src_vocab_size, "tgt": self.tgt_vocab_size}

    def describe(self) -> dict:
        return {"name": self.name, "family": self.family, "form": self.form, "pair": f"{self.src_lang}-{self.tgt_lang}",
                "sizes": {s: len(self.corpus.src[s]) for s in SPLITS}, "train_pairs_used": len(self.train_keep),
                "train_pairs_dropped": len(self.corpus.src["train"]) - len(self.train_keep),  # empty or > max_len
                "src_vocab": self.src_vocab_size, "tgt_vocab": self.tgt_vocab_size, "max_len": self.max_len,
                "metrics": list(self.metrics), "empty_references": self.empty_references,
                **_about(self.src_tok, self.tgt_tok, self.path, self.data_warnings)}

    def data_arrays(self) -> dict[str, list]:
        return {s: [*self.src_ids[s], *self.tgt_ids[s]] for s in self.src_ids}  # the subword ids of both sides

    def examples(self, split: str) -> np.ndarray:
        return self.train_keep if split == "train" else np.arange(len(self.src_ids[split]))

    def batches(self, split: str, max_tokens: int, epoch: int = 0, shuffle: bool = False, seed: int = 0) -> list[Batch]:
        idx = self.examples(split)
        # an empty source line (kept in valid/test, never trained on) is read as one unknown token, as in decoding
        src = [self.src_ids[split][i] if len(self.src_ids[split][i]) else EMPTY_SOURCE for i in idx]
        tgt = [self.tgt_ids[split][i] for i in idx]
        src_lens, tgt_lens = np.array([len(s) for s in src]), np.array([len(t) for t in tgt])
        groups = token_budget_batches(src_lens, tgt_lens, max_tokens, shuffle, seed, epoch)
        return [translation_batch([src[j] for j in g], [tgt[j] for j in g], [int(idx[j]) for j in g])
                for g in groups]

    def sources(self, split: str) -> list[np.ndarray]:
        return self.src_ids[split]

    def references(self, split: str) -> list[str]:
        canonical = getattr(self.tgt_tok, "canonical", None)  # whitespace tokens: single-spaced, as decoded
        return [canonical(r) for r in self.corpus.tgt[split]] if canonical else self.corpus.tgt[split]

    def detokenize(self, ids: list[int]) -> str:
        return self.tgt_tok.decode(ids)

    def source_batches(self, split: str, batch_sentences: int, max_source_tokens: int | None = None,
                       limit: int | None = None) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """Sources for decoding, shortest first: (corpus indices, src (B,S) right-padded, lengths (B,)) per batch.

        A source is cut to its first ``max_source_tokens`` tokens (None: whole); an empty line reads as one unknown
        token, so it still gets a (scored) hypothesis.
        """
        sources = self.sources(split)[:limit]
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
        out = []
        for k in range(0, len(order), batch_sentences):
            idx = order[k : k + batch_sentences]
            seqs = [sources[i][:max_source_tokens] if len(sources[i]) else EMPTY_SOURCE for i in idx]
            out.append((idx, pad_stack(seqs), torch.tensor([len(s) for s in seqs])))
        return out

    def validate(self, model, ctx: EvalContext) -> dict:
        """Greedy corpus BLEU of the validation split (``trainer.valid_bleu``), the curve the report plots."""
        if not ctx.greedy_curve:
            return {}
        from seqbench.harness.evaluate import evaluate_translation  # noqa: PLC0415 (the harness decodes; see __init__)
        scores, _ = evaluate_translation(model, self, "valid", ctx.device,
                                         {"precision": ctx.precision, **ctx.decoding, "beam": 1},
                                         check_stop=ctx.check_stop)
        return {"valid_bleu_greedy": scores["bleu"]}

    def evaluate(self, model, split: str, ctx: EvalContext) -> tuple[dict, dict]:
        """Decode the split with ``eval.decoding`` and score it with the task's metrics (harness/evaluate.py); the
        detokenized hypotheses and their references are left as ``<split>.hyp`` and ``<split>.ref``."""
        from seqbench.harness.evaluate import evaluate_translation  # noqa: PLC0415
        scores, hyps = evaluate_translation(model, self, split, ctx.device, {"precision": ctx.precision,
                                                                             **ctx.decoding},
                                            check_stop=ctx.check_stop)
        return scores, {f"{split}.hyp": hyps, f"{split}.ref": self.references(split)[: len(hyps)]}


def _about(src_tok, tgt_tok, path: Path | None, data_warnings: list[str] = ()) -> dict:
    """The tokenizer kind, its warnings (e.g. a capped vocabulary) and the data's, and the data folder, where there
    are such."""
    about = {"segmentation": getattr(tgt_tok, "kind", None),  # records redact strings under *token* keys
             "warnings": list(dict.fromkeys(getattr(src_tok, "warnings", []) + getattr(tgt_tok, "warnings", [])
                                            + list(data_warnings)))}
    if path is not None:
        about["path"] = str(path)
    return {k: v for k, v in about.items() if v}


def load_parallel(root: Path, files: dict[str, tuple[str, str]], download: bool) -> Corpus:
    """Read split -> (src file, tgt file) under ``root``; checks alignment and emptiness."""
    src, tgt = {}, {}
    for split, (fs, ft) in files.items():
        a, b = read_lines(resolve(root, fs, download)), read_lines(resolve(root, ft, download))
        if len(a) != len(b):
            raise DataError(f"parallel files differ in length: {root / fs} has {len(a)} lines, "
                            f"{root / ft} has {len(b)}; they must be line-aligned")
        if not a:
            raise DataError(f"{root / fs} is empty; split '{split}' needs at least one sentence pair")
        if split != "train":  # training drops empty pairs; a test set scores every line
            _refuse_empty_sources(root / fs, a, split)
        src[split], tgt[split] = a, b
    return Corpus(src, tgt)


def _line_numbers(numbers: list[int], shown: int = 5) -> str:
    return ", ".join(map(str, numbers[:shown])) + (", ..." if len(numbers) > shown else "")


def _refuse_empty_sources(path: Path, lines: list[str], split: str) -> None:
    """An empty source line of a valid or test split would be scored against its reference from nothing."""
    empty = [n for n, line in enumerate(lines, 1) if not line.strip()]
    if empty:
        raise DataError(f"{path} has {len(empty)} empty source line(s) in the {split} split (line "
                        f"{_line_numbers(empty)}): there is nothing to translate; remove those pairs from both files "
                        "or fill in the sources")


def empty_references(corpus: Corpus) -> tuple[dict[str, int], list[str]]:
    """Empty target lines of the valid and test splits per split (scored against an empty reference, they reward a
    model that outputs nothing), and a warning for each split that has any."""
    counts, warnings = {}, []
    for split in SPLITS[1:]:
        empty = [n for n, line in enumerate(corpus.tgt[split], 1) if not line.strip()]
        counts[split] = len(empty)
        if empty:
            warnings.append(f"{len(empty)} of {len(corpus.tgt[split])} {split} references are empty (line "
                            f"{_line_numbers(empty)}): they score a model that outputs nothing as exact; remove those "
                            "pairs or fill in the references")
    return counts, warnings


def build_translation(name: str, corpus: Corpus, files: list[Path], cache_dir: Path, src_lang: str, tgt_lang: str,
                      *, vocab_size: int | None, tokenizer: str = "bpe", min_count: int = 1, joint_vocab: bool = True,
                      max_len: int = 256, metrics=None, path: Path | None = None):
    """Build (or load from the cache) the tokenizers for a corpus and build the task."""
    chosen = scoring.choose(metrics, tokenizer)
    tokenizers.check_settings(tokenizer, vocab_size, min_count)  # before hashing large training files
    data = [sha256(f) for f in files]

    def train(lines: list[str], side: str):
        return tokenizers.build(tokenizer, lines, cache_dir, {"data": data, "side": side}, vocab_size, min_count)

    if joint_vocab:
        src_tok = tgt_tok = train(corpus.src["train"] + corpus.tgt["train"], "joint")
    else:
        src_tok, tgt_tok = train(corpus.src["train"], src_lang), train(corpus.tgt["train"], tgt_lang)
    return TranslationTask(name, corpus, src_tok, tgt_tok, src_lang, tgt_lang, max_len, chosen, path)


def multi30k(root: Path, cache_dir: Path, *, src_lang: str = "en", tgt_lang: str = "de", vocab_size: int = 8000,
             tokenizer: str = "bpe", min_count: int = 1, joint_vocab: bool = True, max_len: int = 256, metrics=None,
             download: bool = True):
    """Multi30k task 1 (Elliott et al. 2016); test = test_2016_flickr."""
    if {src_lang, tgt_lang} != {"en", "de"}:
        raise ValueError(f"multi30k has en and de; got src_lang={src_lang!r}, tgt_lang={tgt_lang!r}")
    stems = {"train": "train", "valid": "val", "test": "test_2016_flickr"}
    return _from_folder("multi30k", root, cache_dir, "multi30k", stems, src_lang, tgt_lang, download,
                        vocab_size=vocab_size, tokenizer=tokenizer, min_count=min_count, joint_vocab=joint_vocab,
                        max_len=max_len, metrics=metrics)


def check_languages(src_lang: str, tgt_lang: str, allow_same_lang: bool) -> None:
    """The same source and target language reads one file as both sides: a copy task, refused unless asked for."""
    if str(src_lang) == str(tgt_lang) and not allow_same_lang:
        raise DataError(f"task.src_lang={src_lang!r} equals task.tgt_lang={tgt_lang!r}: both sides would be read from "
                        f"the same files, so the model would learn to copy its input; set task.tgt_lang (or "
                        f"task.src_lang) to the other side's file suffix, or task.allow_same_lang=true to train that "
                        f"copy task on purpose")


def wmt14_en_de(root: Path, cache_dir: Path, *, src_lang: str = "en", tgt_lang: str = "de", vocab_size: int = 37000,
                tokenizer: str = "bpe", min_count: int = 1, joint_vocab: bool = True, max_len: int = 256,
                metrics=None, download: bool = True, allow_same_lang: bool = False):
    """WMT14 En-De: your training files, newstest2013 valid, newstest2014 (full, 3003) test."""
    check_languages(src_lang, tgt_lang, allow_same_lang)
    stems = {"train": "train", "valid": "newstest2013", "test": "newstest2014"}
    return _from_folder("wmt14_en_de", root, cache_dir, "wmt14-en-de", stems, src_lang, tgt_lang, download,
                        vocab_size=vocab_size, tokenizer=tokenizer, min_count=min_count, joint_vocab=joint_vocab,
                        max_len=max_len, metrics=metrics)


def _from_folder(name, root, cache_dir, folder, stems, src_lang, tgt_lang, download, **settings):
    """A published corpus: ``<root>/<folder>/<stem>.<lang>`` per split."""
    files = {s: (f"{folder}/{stem}.{src_lang}", f"{folder}/{stem}.{tgt_lang}") for s, stem in stems.items()}
    corpus = load_parallel(root, files, download)
    return build_translation(name, corpus, [root / f for f in files["train"]], cache_dir, src_lang, tgt_lang,
                             **settings)


def parallel_files(root: Path, cache_dir: Path, *, path: str, src_lang: str = "src", tgt_lang: str = "tgt",
                   vocab_size: int | None = 8000, tokenizer: str = "bpe", min_count: int = 1, joint_vocab: bool = True,
                   max_len: int = 256, metrics=None, label: str | None = None, download: bool = False,
                   allow_same_lang: bool = False):
    """Any folder with {train,valid,test}.{src_lang,tgt_lang} (relative to the data root or absolute).

    The task is named after the folder (or ``label``); the record keeps the full path. ``src_lang`` equal to
    ``tgt_lang`` (a copy task) is refused unless ``allow_same_lang``.
    """
    check_languages(src_lang, tgt_lang, allow_same_lang)
    require_path(path, "parallel_files", f"{{train,valid,test}}.{{{src_lang},{tgt_lang}}}")
    folder = (root / path).resolve()
    files = {s: (f"{s}.{src_lang}", f"{s}.{tgt_lang}") for s in SPLITS}
    corpus = load_parallel(folder, files, download=False)
    return build_translation(display_name(folder, label, "parallel_files"), corpus,
                             [folder / f for f in files["train"]], cache_dir, src_lang, tgt_lang,
                             vocab_size=vocab_size, tokenizer=tokenizer, min_count=min_count, joint_vocab=joint_vocab,
                             max_len=max_len, metrics=metrics, path=folder)
