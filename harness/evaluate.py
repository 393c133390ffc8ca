"""Evaluation: sacreBLEU/chrF for translation, perplexity for language models."""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from sacrebleu.metrics import BLEU, CHRF

from models.common import UNK
from tasks.batching import pad_stack

from .decode import beam_search, greedy, max_lengths


def score_translations(hyps: list[str], refs: list[str]) -> dict:
    """Corpus BLEU and chrF (sacrebleu defaults: 13a tokenization, chrF2) with their signatures."""
    bleu, chrf = BLEU(), CHRF()
    b, c = bleu.corpus_score(hyps, [refs]), chrf.corpus_score(hyps, [refs])
    return {"bleu": b.score, "chrf": c.score, "bleu_signature": str(bleu.get_signature()),
            "chrf_signature": str(chrf.get_signature()), "bleu_detail": str(b)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def translate(model, task, split: str, device, *, beam: int = 4, lenpen: float = 0.6, max_len_a: float = 1.2,
              max_len_b: int = 10, batch_sentences: int = 128, limit: int | None = None) -> tuple[list[str], float]:
    """Decode a split (sorted by length into batches); returns hypotheses in corpus order and seconds."""
    model.eval()
    sources = task.sources(split)[:limit]
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    hyps: list[str] = [""] * len(sources)
    sync(device)
    start = time.perf_counter()
    for k in range(0, len(order), batch_sentences):
        idx = order[k : k + batch_sentences]
        # an empty source line is read as one unknown token, so it still gets a (scored) hypothesis
        seqs = [sources[i] if len(sources[i]) else np.array([UNK]) for i in idx]
        lengths = torch.tensor([len(s) for s in seqs], device=device)
        src = pad_stack(seqs).to(device)
        limits = max_lengths(lengths, max_len_a, max_len_b, model)
        if beam == 1:
            out = greedy(model, src, lengths, limits)
        else:
            out = beam_search(model, src, lengths, limits, beam=beam, lenpen=lenpen)
        for i, ids in zip(idx, out):
            hyps[i] = task.detokenize(ids)
    sync(device)
    return hyps, time.perf_counter() - start


LENGTH_BUCKETS = (10, 20, 30, 40, 60)  # upper bounds, in source subwords


def bleu_by_length(hyps: list[str], refs: list[str], src_lengths: list[int]) -> list[dict]:
    """Corpus BLEU per source-length bucket (for the quality-by-length plot)."""
    rows, low = [], 0
    for high in (*LENGTH_BUCKETS, None):
        idx = [i for i, n in enumerate(src_lengths) if n > low and (high is None or n <= high)]
        if idx:
            score = BLEU().corpus_score([hyps[i] for i in idx], [[refs[i] for i in idx]]).score
            rows.append({"bucket": f"{low + 1}-{high}" if high else f">{low}", "low": low + 1, "n": len(idx),
                         "bleu": score})
        low = high or low
    return rows


def evaluate_translation(model, task, split: str, device, decoding: dict) -> dict:
    """Decode ``split`` and score against the raw references."""
    hyps, seconds = translate(model, task, split, device, **decoding)
    refs = task.references(split)[: len(hyps)]
    out = score_translations(hyps, refs)
    out["by_length"] = bleu_by_length(hyps, refs, [len(s) for s in task.sources(split)[: len(hyps)]])
    out.update(sentences=len(hyps), decode_seconds=seconds, sentences_per_second=len(hyps) / max(seconds, 1e-9),
               exact_match=sum(h == r for h, r in zip(hyps, refs)) / max(1, len(hyps)),
               samples=[{"ref": r, "hyp": h} for h, r in list(zip(hyps, refs))[:5]])
    return out, hyps


@torch.no_grad()
def mean_nll(model, task, split: str, device, max_tokens: int, autocast=None) -> tuple[float, int]:
    """Summed token NLL / number of scored tokens over a split (no label smoothing)."""
    model.eval()
    total, count = 0.0, 0
    for batch in task.batches(split, max_tokens):
        batch = batch.to(device)
        with autocast() if autocast else torch.autocast(device.type, enabled=False):
            logits = model(**batch.inputs)
        nll = F.cross_entropy(logits.float().flatten(0, 1), batch.target.flatten(),
                              ignore_index=batch.ignore_index, reduction="sum")
        total += nll.item()
        count += batch.n_tokens
    return total / max(count, 1), count


def evaluate_lm(model, task, split: str, device, max_tokens: int) -> dict:
    nll, count = mean_nll(model, task, split, device, max_tokens)
    return {"nll": nll, "perplexity": math.exp(nll), "tokens": count}
