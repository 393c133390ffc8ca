"""Greedy and batched beam search over the common incremental-decoding interface.

Works for every ``Seq2Seq`` model: it only calls ``encode``, ``decode_step``
and reorders the decoder state with ``reorder_state``, so each prefix is
computed once (cached), never recomputed. Beam search moves the per-sentence
(``src_*``) state entries only when it drops finished sentences. Parametrized
weights (ConvS2S's weight normalisation) are computed once per search
(``torch.nn.utils.parametrize.cached``), not at every step; the cache ends with
the search, so weights updated by training are never stale.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from models.common import reorder_state
from tasks.vocab import BOS, EOS

MAX_SOURCE_TOKENS = 1024  # eval.decoding.max_source_tokens unless set (fairseq's default max_source_positions)


def long_sources(lengths: list[int], cap: int | None) -> list[int]:
    """Line numbers (1-based) of the sources longer than ``cap`` tokens, which decoding cuts to ``cap``.

    The cap bounds the cost of a test set whatever its lines: decoding runs to ``a * |src| + b`` steps, each
    attending over the source, so one 100k-character line would take minutes and gigabytes on its own.
    """
    return [i + 1 for i, n in enumerate(lengths) if cap and n > cap]


def max_lengths(src_lengths: torch.Tensor, a: float, b: int, model=None) -> list[int]:
    """Per-sentence limit on output tokens (EOS not counted): ``a * |src| + b``, at least 1, and never past the
    model's own bounds: ``max_target_positions`` less the position of the EOS that beam search forces after the
    last token (a model with learned positions), and ``max_output_tokens(src_lengths)`` (ByteNet's unfolding)."""
    limits = [max(1, int(a * n + b)) for n in src_lengths.tolist()]
    cap = getattr(model, "max_target_positions", None)
    if cap:
        limits = [min(n, cap - 1) for n in limits]
    own = getattr(model, "max_output_tokens", None)
    own = own(src_lengths) if own else None
    return [min(n, m) for n, m in zip(limits, own)] if own else limits


def length_penalty(length: int, alpha: float) -> float:
    """GNMT length penalty ((5 + |Y|) / 6) ** alpha (Wu et al. 2016), as in Vaswani et al."""
    return ((5.0 + length) / 6.0) ** alpha


def greedy(model, src: torch.Tensor, src_lengths: torch.Tensor, max_len: list[int]) -> list[list[int]]:
    """Arg-max decoding. Returns token ids per sentence, without BOS/EOS."""
    with torch.no_grad(), parametrize.cached():
        return _greedy(model, src, src_lengths, max_len)


def _greedy(model, src, src_lengths, max_len):  # undecorated, so mutation testing reaches it
    state = model.encode(src, src_lengths)
    out: list[list[int]] = [[] for _ in range(src.size(0))]
    active = list(range(src.size(0)))
    prev = torch.full((src.size(0),), BOS, dtype=torch.long, device=src.device)
    for t in range(max(max_len)):
        logits, state = model.decode_step(prev, state, t)
        tok = logits.argmax(-1)
        keep = []
        for row, (s, k) in enumerate(zip(active, tok.tolist())):
            if k == EOS:
                continue
            out[s].append(k)
            if t + 1 < max_len[s]:
                keep.append(row)
        if not keep:
            break
        if len(keep) < len(active):
            idx = torch.tensor(keep, device=src.device)
            state, tok, active = reorder_state(state, idx), tok[idx], [active[r] for r in keep]
        prev = tok
    return out


def beam_search(model, src: torch.Tensor, src_lengths: torch.Tensor, max_len: list[int], beam: int = 4,
                lenpen: float = 0.6) -> list[list[int]]:
    """Batched beam search; a sentence ends once it has ``beam`` finished hypotheses.

    An EOS is accepted only from the top ``beam`` candidates (as in fairseq), so
    ``beam=1`` is exactly greedy decoding. Hypotheses that reach ``max_len`` tokens
    end with an EOS forced at the next step and charged its log-probability (as
    fairseq does), so every finished hypothesis is scored as a complete sentence.
    Returns the best hypothesis per sentence by length-normalised log-probability
    (|Y| counting the EOS), without BOS/EOS.
    """
    with torch.no_grad(), parametrize.cached():
        return _beam_search(model, src, src_lengths, max_len, beam, lenpen)


def _beam_search(model, src, src_lengths, max_len, beam, lenpen):  # undecorated, so mutation testing reaches it
    K, dev = beam, src.device
    n = src.size(0)
    state = reorder_state(model.encode(src, src_lengths), torch.arange(n, device=dev).repeat_interleave(K))
    sents = list(range(n))  # original index of each active sentence
    scores = torch.zeros(n, K, device=dev)
    scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    hist = torch.empty(n * K, 0, dtype=torch.long, device=dev)
    prev = torch.full((n * K,), BOS, dtype=torch.long, device=dev)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(n)]
    for t in range(max(max_len) + 1):
        logits, state = model.decode_step(prev, state, t)
        lp = F.log_softmax(logits.float(), dim=-1)
        if any(max_len[s] == t for s in sents):
            force_eos(finished, sents, max_len, t, scores, lp[:, EOS], hist, lenpen)
        V = lp.size(-1)
        cand = (scores.unsqueeze(-1) + lp.view(len(sents), K, V)).view(len(sents), K * V)
        top_s, top_i = cand.topk(2 * K, dim=-1)
        rows, toks, new_scores, keep_sents = [], [], [], []
        for i, (s, ss, ii) in enumerate(zip(sents, top_s.tolist(), top_i.tolist())):
            if max_len[s] == t:  # ended by force_eos
                continue
            chosen = []
            for j, (sc, flat) in enumerate(zip(ss, ii)):
                b, k = divmod(flat, V)
                if sc == float("-inf"):
                    break
                if k == EOS:
                    if j < K and len(finished[s]) < K:
                        finished[s].append((sc / length_penalty(t + 1, lenpen), hist[i * K + b].tolist()))
                elif len(chosen) < K:
                    chosen.append((i * K + b, k, sc))
            if len(finished[s]) >= K or not chosen:
                continue
            while len(chosen) < K:  # fewer live candidates than beams (tiny vocabularies)
                chosen.append((chosen[0][0], chosen[0][1], float("-inf")))
            keep_sents.append(s)
            for row, k, sc in chosen:
                rows.append(row), toks.append(k), new_scores.append(sc)
        if not keep_sents:
            break
        idx = torch.tensor(rows, device=dev)
        prev = torch.tensor(toks, device=dev)
        state = reorder_state(state, idx, within_sentences=len(keep_sents) == len(sents))
        hist = torch.cat([hist[idx], prev[:, None]], dim=1)
        scores = torch.tensor(new_scores, device=dev).view(len(keep_sents), K)
        sents = keep_sents
    return [max(f, key=lambda x: x[0])[1] if f else [] for f in finished]


def force_eos(finished, sents, max_len, t, scores, eos_lp, hist, lenpen) -> None:
    """End the live hypotheses of every sentence whose ``max_len`` tokens are all in (step ``t``) with EOS.

    Each is charged the log-probability of that EOS (``eos_lp``, one per row), as if EOS were the only token
    allowed, and the best are added until the sentence has as many finished hypotheses as beams. A beam that
    holds no hypothesis (score -inf) adds none; a model that gives EOS no probability still ends its hypotheses,
    scored -inf, so the search returns the best of them rather than nothing.
    """
    K = scores.size(1)
    rows, eos = scores.tolist(), eos_lp.tolist()
    for i, s in enumerate(sents):
        if max_len[s] != t:
            continue
        ends = sorted(((sc + eos[i * K + b], b) for b, sc in enumerate(rows[i]) if sc != float("-inf")),
                      key=lambda e: e[0], reverse=True)  # stable: ties keep the beams' order
        for sc, b in ends[: K - len(finished[s])]:
            finished[s].append((sc / length_penalty(t + 1, lenpen), hist[i * K + b].tolist()))
