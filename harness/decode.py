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

from seqbench.models.common import reorder_state
from seqbench.tasks.vocab import BOS, EOS

from .settings import MAX_OUTPUT_TOKENS  # the most output tokens decoding makes for one sentence

MAX_SOURCE_TOKENS = 1024  # eval.decoding.max_source_tokens unless set (fairseq's default max_source_positions)


def long_sources(lengths: list[int], cap: int | None) -> list[int]:
    """Line numbers (1-based) of the sources longer than ``cap`` tokens, which decoding cuts to ``cap``.

    The cap bounds the cost of a test set whatever its lines: decoding runs to ``a * |src| + b`` steps, each
    attending over the source, so one 100k-character line would take minutes and gigabytes on its own.
    """
    return [i + 1 for i, n in enumerate(lengths) if cap and n > cap]


def max_lengths(src_lengths: torch.Tensor, a: float, b: int, model=None) -> list[int]:
    """Per-sentence limit on output tokens (EOS not counted): ``a * |src| + b``, at least 1, at most
    :data:`MAX_OUTPUT_TOKENS`, and never past the model's own bounds: ``max_target_positions`` less the position
    of the EOS that beam search forces after the last token (a model with learned positions), and
    ``max_output_tokens(src_lengths)`` where a model sets one."""
    limits = [max(1, min(MAX_OUTPUT_TOKENS, int(a * n + b))) for n in src_lengths.tolist()]
    cap = getattr(model, "max_target_positions", None)
    if cap:
        limits = [min(n, cap - 1) for n in limits]
    own = getattr(model, "max_output_tokens", None)
    own = own(src_lengths) if own else None
    return [min(n, m) for n, m in zip(limits, own)] if own else limits


def length_penalty(length: int, alpha: float) -> float:
    """GNMT length penalty ((5 + |Y|) / 6) ** alpha (Wu et al. 2016), as in Vaswani et al."""
    return ((5.0 + length) / 6.0) ** alpha


def greedy(model, src: torch.Tensor, src_lengths: torch.Tensor, max_len: list[int],
           check_stop=None) -> list[list[int]]:
    """Arg-max decoding. Returns token ids per sentence, without BOS/EOS. ``check_stop()``, if given, runs before
    every step and raises to end decoding (a stop signal)."""
    with torch.no_grad(), parametrize.cached():
        return _greedy(model, src, src_lengths, max_len, check_stop)


def _greedy(model, src, src_lengths, max_len, check_stop=None):  # undecorated, so mutation testing reaches it
    state = model.encode(src, src_lengths)
    out: list[list[int]] = [[] for _ in range(src.size(0))]
    active = list(range(src.size(0)))
    prev = torch.full((src.size(0),), BOS, dtype=torch.long, device=src.device)
    for t in range(max(max_len)):
        if check_stop:
            check_stop()
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
                lenpen: float = 0.6, check_stop=None) -> list[list[int]]:
    """Batched beam search: the best hypothesis per sentence by length-normalised log-probability, without BOS/EOS.

    Scores are log P(Y) / lp(|Y|), GNMT's lp(n) = ((5 + n) / 6) ** lenpen (:func:`length_penalty`), |Y| counting
    the EOS. An EOS is accepted only from the top ``beam`` candidates of a step (as in fairseq); hypotheses that
    reach ``max_len`` tokens end with an EOS forced at the next step and charged its log-probability (as fairseq
    does), so every finished hypothesis is scored as a complete sentence.

    When a sentence ends (tensor2tensor's rule, not fairseq's "``beam`` hypotheses finished"): once no live
    hypothesis can beat the best finished one. A live hypothesis of log-probability ``s`` (<= 0) after ``t + 1``
    tokens can only lose probability, and will end with |Y| between ``t + 2`` and ``max_len + 1``, so the best
    score it can still reach is ``max(s / lp(t + 2), s / lp(max_len + 1))`` (for lenpen >= 0 the latter: the
    longest length is the most forgiving); the sentence ends when the best finished score is at least that bound
    for its best live hypothesis, or when its hypotheses reach ``max_len``. So the search never returns a
    hypothesis that a live beam could still have beaten, where fairseq's rule may end a sentence on ``beam``
    poor early EOS while a better hypothesis is live. It may take more steps than that rule (a live hypothesis
    keeps the sentence open) or fewer (a good finished hypothesis ends it before ``beam`` have finished).

    ``beam=1`` is greedy decoding (:func:`greedy`), which ends at the first arg-max EOS. ``check_stop()``, if
    given, runs before every step and raises to end the search (a stop signal).
    """
    if beam == 1:
        return greedy(model, src, src_lengths, max_len, check_stop=check_stop)
    with torch.no_grad(), parametrize.cached():
        return _beam_search(model, src, src_lengths, max_len, beam, lenpen, check_stop)


def _beam_search(model, src, src_lengths, max_len, beam, lenpen, check_stop=None):  # undecorated: mutation testing
    K, dev = beam, src.device
    n = src.size(0)
    state = reorder_state(model.encode(src, src_lengths), torch.arange(n, device=dev).repeat_interleave(K))
    sents = list(range(n))  # original index of each active sentence
    scores = torch.zeros(n, K, device=dev)
    scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    hist = torch.empty(n * K, 0, dtype=torch.long, device=dev)
    prev = torch.full((n * K,), BOS, dtype=torch.long, device=dev)
    best: list[tuple[float, list[int]] | None] = [None] * n  # per sentence: the best finished (score, tokens)

    def offer(s: int, score: float, row: int) -> None:
        if best[s] is None or score > best[s][0]:  # ties keep the earlier hypothesis
            best[s] = (score, hist[row].tolist())

    for t in range(max(max_len) + 1):
        if check_stop:
            check_stop()
        logits, state = model.decode_step(prev, state, t)
        lp = F.log_softmax(logits.float(), dim=-1)
        if any(max_len[s] == t for s in sents):
            force_eos(offer, sents, max_len, t, scores, lp[:, EOS], lenpen)
        V = lp.size(-1)
        cand = (scores.unsqueeze(-1) + lp.view(len(sents), K, V)).view(len(sents), K * V)
        top_s, top_i = cand.topk(min(2 * K, K * V), dim=-1)
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
                    if j < K:
                        offer(s, sc / length_penalty(t + 1, lenpen), i * K + b)
                elif len(chosen) < K:
                    chosen.append((i * K + b, k, sc))
            if not chosen or (best[s] is not None and best[s][0] >= reachable(chosen[0][2], t, max_len[s], lenpen)):
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
    return [b[1] if b else [] for b in best]


def reachable(score: float, t: int, max_len: int, lenpen: float) -> float:
    """The best normalised score a live hypothesis of log-probability ``score`` after step ``t`` (``t + 1`` tokens)
    can still reach: it ends with |Y| in ``t + 2 .. max_len + 1`` (EOS counted) and a log-probability of at most
    ``score``; lp is monotonic in |Y|, so the bound is at one end of that range."""
    return max(score / length_penalty(t + 2, lenpen), score / length_penalty(max_len + 1, lenpen))


def force_eos(offer, sents, max_len, t, scores, eos_lp, lenpen) -> None:
    """End the live hypotheses of every sentence whose ``max_len`` tokens are all in (step ``t``) with EOS.

    Each is charged the log-probability of that EOS (``eos_lp``, one per row), as if EOS were the only token
    allowed, and offered as a finished hypothesis (``offer(sentence, score, row)``). A beam that holds no
    hypothesis (score -inf) offers none; a model that gives EOS no probability still ends its hypotheses, scored
    -inf, so the search returns the best of them rather than nothing.
    """
    K = scores.size(1)
    rows, eos = scores.tolist(), eos_lp.tolist()
    for i, s in enumerate(sents):
        if max_len[s] != t:
            continue
        ends = sorted(((sc + eos[i * K + b], b) for b, sc in enumerate(rows[i]) if sc != float("-inf")),
                      key=lambda e: e[0], reverse=True)  # stable: ties keep the beams' order
        for sc, b in ends:
            offer(s, sc / length_penalty(t + 1, lenpen), i * K + b)


def beam_problem(beam: int, tgt_vocab: int) -> str | None:
    """The message refusing a beam wider than the target vocabulary (None when it fits).

    Beam search keeps ``beam`` hypotheses per sentence and repeats the encoder's state for each; wider than the
    vocabulary, the first step cannot fill the beam, and the search would only spend memory on empty beams.
    """
    if beam <= tgt_vocab:
        return None
    return (f"eval.decoding.beam={beam} is larger than the target vocabulary ({tgt_vocab} entries, special tokens "
            f"included); set eval.decoding.beam to at most {tgt_vocab} (4 to 5 is usual; 1 is greedy decoding)")
