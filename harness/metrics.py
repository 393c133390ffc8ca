"""Every quality metric in one place: its name, label, direction and, for translation metrics, how it is scored.

The evaluation computes a task's metrics with these functions and the report reads names, labels and
directions from here (best values, sort order, Pareto fronts). Nothing here imports torch, and sacrebleu and
rapidfuzz are imported only when scoring, so the report can import this module anywhere pandas runs.

Error rates are fractions (0 = perfect), named as in speech and MT tooling (jiwer, sclite): ``wer``, the word
error rate, is the Levenshtein distance between the whitespace tokens of hypothesis and reference (substitutions,
deletions and insertions), summed over the set and divided by the summed number of reference tokens; ``cer``, the
character error rate, is the same over characters (leading and trailing spaces stripped, inner spaces counted);
``ser``, the sentence error rate, is 1 - exact match: the fraction of outputs that differ from their reference at
all. In grapheme-to-phoneme papers, "WER" (a word's whole pronunciation wrong) is ``ser`` here and "PER" (phoneme
error rate) is ``wer`` on space-separated phonemes. BLEU, chrF and TER are sacreBLEU's corpus scores (0-100).

Records written before these names (no ``metrics_version``, or version 1) used ``wer`` for 1 - exact match and
``ser`` for the token-level rate; :func:`read_old_names` gives such a record's entries their present names.

``bleu_tok`` is the BLEU of Vaswani et al. (2017), Table 2, for setting measured numbers beside the paper's:
tensor2tensor's get_ende_bleu.sh tokenizes hypotheses and references with the Moses tokenizer (``-l de``),
splits hyphenated compounds (``rich-text`` -> ``rich ##AT##-##AT## text``, so each part of a compound counts as
a match) and scores the tokens with multi-bleu.perl. Here: sacremoses' port of the tokenizer, the same
substitution, and sacreBLEU on the tokens as they are (``tokenize="none"``, no smoothing, as multi-bleu.perl).
It usually runs higher than ``bleu`` (sacreBLEU's 13a on detokenized text), the score comparable across papers.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
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


def edit_rate(hyps: list[str], refs: list[str], units: Callable[[str], Sequence]) -> float:
    """Summed Levenshtein distance between the ``units`` of hypothesis and reference over the summed number of
    reference units (jiwer's corpus-level rate). A set whose references hold no unit at all counts every
    hypothesis unit as one error."""
    from rapidfuzz.distance import Levenshtein

    errors = sum(Levenshtein.distance(units(h), units(r)) for h, r in zip(hyps, refs, strict=True))
    return errors / max(1, sum(len(units(r)) for r in refs))


def word_error_rate(hyps: list[str], refs: list[str]) -> float:
    """WER: token-level (whitespace tokens) edit distance over reference tokens, as jiwer and sclite compute it."""
    return edit_rate(hyps, refs, str.split)


def character_error_rate(hyps: list[str], refs: list[str]) -> float:
    """CER: character-level edit distance over reference characters (ends stripped, inner spaces count)."""
    return edit_rate(hyps, refs, str.strip)


def sentence_error_rate(hyps: list[str], refs: list[str]) -> float:
    """SER: the fraction of outputs not exactly equal to their reference (1 - exact match)."""
    return 1 - exact_match(hyps, refs)


VERSION = 2  # the record's ``metrics_version``: what its metric names mean (1: wer and ser the other way round)
RENAMED_IN_2 = {"wer": "ser", "ser": "wer"}  # version 1 name -> present name of the same measurement


def read_old_names(rec: dict) -> dict:
    """A record in the present metric names: one written under version 1 (``metrics_version`` absent or 1) has
    its ``wer`` (then 1 - exact match) read as ``ser`` and its ``ser`` (then the token edit rate) read as ``wer``,
    in every split's metrics, their by-length rows and the task's list of metrics (``task.metrics`` and
    ``config.task.metrics``), and gets ``metrics_renamed_from`` = 1. Newer records are returned as they are; a
    ``metrics_version`` that is not a whole number raises ValueError (the report lists the record as unreadable)."""
    version = rec.get("metrics_version", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"metrics_version is {version!r}, not a whole number: what its metric names mean is unknown")
    if version >= VERSION:
        return rec
    rename = lambda d: {RENAMED_IN_2.get(k, k): v for k, v in d.items()}  # noqa: E731
    names = lambda ns: [RENAMED_IN_2.get(n, n) if isinstance(n, str) else n for n in ns]  # noqa: E731
    out = {**rec, "metrics_version": VERSION, "metrics_renamed_from": version}
    if isinstance(rec.get("metrics"), dict):
        out["metrics"] = {split: _renamed_split(m, rename) for split, m in rec["metrics"].items()}
    task = rec.get("task")
    if isinstance(task, dict) and isinstance(task.get("metrics"), list):
        out["task"] = {**task, "metrics": names(task["metrics"])}
    cfg = rec.get("config")
    chosen = cfg["task"].get("metrics") if isinstance(cfg, dict) and isinstance(cfg.get("task"), dict) else None
    if isinstance(chosen, str):  # task.metrics as the user set it: "wer,ser" or a list
        chosen = [n.strip() for n in chosen.split(",")]
    if isinstance(chosen, list):
        out["config"] = {**cfg, "task": {**cfg["task"], "metrics": names(chosen)}}
    return out


def _renamed_split(m, rename):
    if not isinstance(m, dict):
        return m
    m = rename(m)
    if isinstance(m.get("by_length"), list):
        m["by_length"] = [rename(row) if isinstance(row, dict) else row for row in m["by_length"]]
    return m


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("bleu", "BLEU", "BLEU", True, "{:.2f}", score=_sacrebleu("bleu", "BLEU", detail=True)),
    Metric("chrf", "chrF", "chrF", True, "{:.2f}", score=_sacrebleu("chrf", "CHRF")),
    Metric("ter", "TER", "TER", False, "{:.2f}", score=_sacrebleu("ter", "TER")),
    Metric("wer", "WER", "WER", False, "{:.3f}", score=lambda h, r: {"wer": word_error_rate(h, r)}),
    Metric("ser", "SER", "SER", False, "{:.3f}", score=lambda h, r: {"ser": sentence_error_rate(h, r)}),
    Metric("cer", "CER", "CER", False, "{:.3f}", score=lambda h, r: {"cer": character_error_rate(h, r)}),
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
