"""Every quality metric in one place: its name, label, direction and, for translation metrics, how it is scored.

The evaluation computes a task's metrics with these functions and the report reads names, labels and
directions from here (best values, sort order, Pareto fronts). Nothing here imports torch, and sacrebleu and
rapidfuzz are imported only when scoring, so the report can import this module anywhere pandas runs.

Error rates are fractions (0 = perfect): ``wer`` is the sequence error rate, 1 - exact match (as in
grapheme-to-phoneme work, where a "word" is a whole output sequence); ``ser`` is the symbol (token) error rate,
the Levenshtein distance between the whitespace tokens of hypothesis and reference, summed over the set and
divided by the summed reference length. BLEU, chrF and TER are sacreBLEU's corpus scores (0-100).

``bleu_tok`` is the BLEU of Vaswani et al. (2017), Table 2, for setting measured numbers beside the paper's:
tensor2tensor's get_ende_bleu.sh tokenizes hypotheses and references with the Moses tokenizer (``-l de``),
splits hyphenated compounds (``rich-text`` -> ``rich ##AT##-##AT## text``, so each part of a compound counts as
a match) and scores the tokens with multi-bleu.perl. Here: sacremoses' port of the tokenizer, the same
substitution, and sacreBLEU on the tokens as they are (``tokenize="none"``, no smoothing, as multi-bleu.perl).
It usually runs higher than ``bleu`` (sacreBLEU's 13a on detokenized text), the score comparable across papers.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str  # the name in task.metrics and in the report's columns (test_<name>)
    label: str  # the report's column label (``test <label>``)
    abbrev: str  # the job's summary line
    higher_is_better: bool
    fmt: str
    key: str = ""  # the entry in the record's metrics, when it differs from the name
    score: Callable[[list[str], list[str]], dict] | None = None  # hyps, refs -> record entries; None: not text

    @property
    def record_key(self) -> str:
        return self.key or self.name

    def value(self, hyps: list[str], refs: list[str]) -> float:
        return self.score(hyps, refs)[self.record_key]


def _sacrebleu(name: str, cls: str, detail: bool = False):
    """A sacreBLEU corpus metric (default settings) with its signature, so a score can be reproduced."""
    def score(hyps: list[str], refs: list[str]) -> dict:
        from sacrebleu import metrics

        metric = getattr(metrics, cls)()
        result = metric.corpus_score(hyps, [refs])
        out = {name: result.score, f"{name}_signature": str(metric.get_signature())}
        return {**out, f"{name}_detail": str(result)} if detail else out
    return score


COMPOUND = re.compile(r"(\S)-(\S)")  # get_ende_bleu.sh: perl -ple 's{(\S)-(\S)}{$1 ##AT##-##AT## $2}g'
PAPER_BLEU_LANG = "de"  # get_ende_bleu.sh runs tokenizer.perl -l de


def split_compounds(tokenized: str) -> str:
    """``rich-text`` -> ``rich ##AT##-##AT## text``, left to right without overlap, as the perl substitution does
    (``a-b-c`` -> ``a ##AT##-##AT## b-c``: the match that consumed ``b`` cannot start another)."""
    return COMPOUND.sub(r"\1 ##AT##-##AT## \2", tokenized)


def tokenized_bleu(hyps: list[str], refs: list[str]) -> dict:
    """The paper's BLEU (``bleu_tok``): Moses-tokenized, compound-split, multi-bleu.perl's BLEU; with a signature."""
    from sacrebleu.metrics import BLEU
    from sacremoses import MosesTokenizer

    moses = MosesTokenizer(lang=PAPER_BLEU_LANG)
    prepare = lambda text: split_compounds(moses.tokenize(text, return_str=True, escape=True))  # noqa: E731
    metric = BLEU(tokenize="none", smooth_method="none", force=True)
    result = metric.corpus_score([prepare(h) for h in hyps], [[prepare(r) for r in refs]])
    return {"bleu_tok": result.score,
            "bleu_tok_signature": f"moses-tok:{PAPER_BLEU_LANG}|compound-split:##AT##|{metric.get_signature()}"}


def exact_match(hyps: list[str], refs: list[str]) -> float:
    """The fraction of hypotheses equal to their reference."""
    return sum(h == r for h, r in zip(hyps, refs, strict=True)) / max(1, len(refs))


def symbol_error_rate(hyps: list[str], refs: list[str]) -> float:
    """Summed token-level Levenshtein distance over summed reference tokens (whitespace tokens).

    A set whose references hold no token at all counts every hypothesis token as one error.
    """
    from rapidfuzz.distance import Levenshtein

    errors = sum(Levenshtein.distance(h.split(), r.split()) for h, r in zip(hyps, refs, strict=True))
    return errors / max(1, sum(len(r.split()) for r in refs))


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("bleu", "BLEU", "BLEU", True, "{:.2f}", score=_sacrebleu("bleu", "BLEU", detail=True)),
    Metric("chrf", "chrF", "chrF", True, "{:.2f}", score=_sacrebleu("chrf", "CHRF")),
    Metric("ter", "TER", "TER", False, "{:.2f}", score=_sacrebleu("ter", "TER")),
    Metric("wer", "WER", "WER", False, "{:.3f}", score=lambda h, r: {"wer": 1 - exact_match(h, r)}),
    Metric("ser", "SER", "SER", False, "{:.3f}", score=lambda h, r: {"ser": symbol_error_rate(h, r)}),
    Metric("exact_match", "exact match", "exact match", True, "{:.3f}",
           score=lambda h, r: {"exact_match": exact_match(h, r)}),
    Metric("bleu_tok", "BLEU tokenized, compound-split (paper)", "tok-BLEU", True, "{:.2f}", score=tokenized_bleu),
    Metric("ppl", "perplexity", "ppl", False, "{:.2f}", key="perplexity"),
    Metric("bpc", "bits per character", "bpc", False, "{:.3f}"),
    Metric("accuracy", "accuracy", "accuracy", True, "{:.3f}"),
)}
TEXT_METRICS = tuple(n for n, m in METRICS.items() if m.score is not None)  # what task.metrics may name
SYMBOL_TOKENIZERS = ("whitespace", "char")  # tokens as written: scored by error rates, not BLEU


def defaults(family: str | None, tokenizer: str | None = None) -> tuple[str, ...]:
    """A task's metrics when ``task.metrics`` is not set: error rates for symbol-level text, BLEU/chrF for subwords,
    bits per character (then perplexity) for a character LM, perplexity for other LMs, accuracy for probes."""
    if family == "translation":
        return ("wer", "ser") if tokenizer in SYMBOL_TOKENIZERS else ("bleu", "chrf")
    if family == "lm":
        return ("bpc", "ppl") if tokenizer == "char" else ("ppl",)
    return ("accuracy",) if family == "probe" else ()


def choose(setting, tokenizer: str | None) -> tuple[str, ...]:
    """A translation task's metrics from ``task.metrics`` (a list, a comma-separated string, or null)."""
    if setting in (None, "", []):
        return defaults("translation", tokenizer)
    names = [s.strip() for s in setting.split(",")] if isinstance(setting, str) else list(setting)
    bad = [n for n in names if n not in TEXT_METRICS]
    if bad or not names:
        raise ValueError(f"task.metrics={setting!r} has {bad or 'no metric'}; choose from {', '.join(TEXT_METRICS)} "
                         "(e.g. task.metrics=[wer,ser])")
    return tuple(dict.fromkeys(names))


def score(names: Iterable[str], hyps: list[str], refs: list[str]) -> dict:
    """The record entries of the named metrics (scores, and signatures for sacreBLEU metrics)."""
    out = {}
    for name in names:
        out.update(METRICS[name].score(hyps, refs))
    return out


def summary(names: Iterable[str], scores: dict) -> str:
    """``BLEU 35.36 chrF 60.01``: the named metrics that ``scores`` holds, as the job's summary line shows them."""
    shown = [(METRICS[n], scores.get(METRICS[n].record_key)) for n in names if n in METRICS]
    return " ".join(f"{m.abbrev} {m.fmt.format(v)}" for m, v in shown if isinstance(v, (int, float)))
