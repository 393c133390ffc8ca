"""Scoring and decoding: sacreBLEU parity, perplexity, beam search."""
from __future__ import annotations

import copy
import functools
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from seqbench import models
from seqbench import tasks
from seqbench.harness.bench.decoding import NoEOS, RecomputePrefix
from seqbench.harness.decode import beam_search, greedy, max_lengths
from seqbench.harness.evaluate import evaluate_lm, score_translations
from seqbench.models.common import BOS, EOS, SOURCE_PREFIX, reorder_state
from tests.test_models import ARCHS, build, preset, train_to_copy


def test_bleu_and_chrf_equal_the_sacrebleu_command_line(tmp_path, data_root):
    refs = (data_root / "multi30k" / "test_2016_flickr.de").read_text().splitlines()
    # a deterministic "system": drop every third word from the reference
    hyps = [" ".join(w for i, w in enumerate(r.split()) if i % 3) for r in refs]
    (tmp_path / "hyp").write_text("\n".join(hyps) + "\n")
    cli = subprocess.run([sys.executable, "-m", "sacrebleu", str(data_root / "multi30k" / "test_2016_flickr.de"),
                          "-i", str(tmp_path / "hyp"), "-m", "bleu", "chrf", "-b", "-w", "4"],
                         capture_output=True, text=True, check=True).stdout
    cli = json.loads(cli)  # [bleu, chrf] with -b
    ours = score_translations(hyps, refs)
    assert round(ours["bleu"], 4) == float(cli[0])
    assert round(ours["chrf"], 4) == float(cli[1])
    assert ours["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")


def test_perplexity_is_exp_of_mean_nll(data_root):
    task = tasks.build({"name": "ptb", "bptt": 40}, {"root": data_root, "download": False})
    task.streams["valid"] = task.streams["valid"][:3001]
    torch.manual_seed(0)
    model = models.build(preset("transformer_tiny"), task).eval()
    got = evaluate_lm(model, task, "valid", torch.device("cpu"), max_tokens=400)
    # independent computation: score the stream in windows of 40, one window at a time
    stream = torch.from_numpy(task.streams["valid"])
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(stream) - 1, 40):
            x, y = stream[s : s + 40], stream[s + 1 : s + 41]
            x = x[: len(y)]
            logp = F.log_softmax(model(x[None])[0].double(), -1)
            nll -= logp[torch.arange(len(y)), y].sum().item()
            n += len(y)
    assert got["tokens"] == n == 3000
    assert math.isclose(got["perplexity"], math.exp(nll / n), rel_tol=1e-5)


def sources(seed=5):
    """Six padded sources (B,S) of lengths 9, 8, 7, 5, 3, 2 and their lengths (B,)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, 23, (6, 9), generator=g)
    lengths = torch.tensor([9, 8, 7, 5, 3, 2])
    for b, n in enumerate(lengths):
        src[b, n:] = 0
    return src, lengths


class Spy:
    """Passes decoding through to ``decoder``, recording at each step the rows, the storage of each
    per-sentence (``src_*``) state entry, and the logits."""

    def __init__(self, decoder):
        self.decoder, self.steps = decoder, []

    def encode(self, src, src_lengths):
        return self.decoder.encode(src, src_lengths)

    def decode_step(self, prev, state, step):
        logits, new_state = self.decoder.decode_step(prev, state, step)
        source = {k: v.data_ptr() for k, v in state.items() if k.startswith(SOURCE_PREFIX)}
        self.steps.append((prev.size(0), source, logits))
        return logits, new_state


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("eos", [True, False])
def test_beam_search_moves_per_sentence_state_only_when_sentences_end(arch, eos, monkeypatch):
    """Sentences ending at different steps give the hypotheses of reordering the whole state at every step,
    and of recomputing the prefix; the ``src_*`` entries are copied only at the steps that drop sentences."""
    model = build(arch, "translation")
    src, lengths = sources()
    limits = max_lengths(lengths, 1.5, 3)  # 16, 15, 13, 10, 7, 6: without EOS each sentence ends at its own step
    wrap = (lambda d: d) if eos else NoEOS
    spy = Spy(wrap(model))
    hyps = beam_search(spy, src, lengths, limits, beam=3)
    assert hyps == beam_search(wrap(RecomputePrefix(model)), src, lengths, limits, beam=3)
    with monkeypatch.context() as m:  # the search as it was: every entry reordered at every step
        m.setattr("seqbench.harness.decode.reorder_state", lambda state, index, **_: reorder_state(state, index))
        assert hyps == beam_search(wrap(model), src, lengths, limits, beam=3)
    rows = [r for r, _, _ in spy.steps]
    assert any(b < a for a, b in zip(rows, rows[1:]))  # a sentence ended while others went on
    if not eos:
        assert [len(h) for h in hyps] == limits
    for (a, before, _), (b, after, _) in zip(spy.steps, spy.steps[1:]):
        moved = [before[k] != after[k] for k in before]
        assert all(moved) if b < a else not any(moved)


def test_bytenet_decoding_runs_past_its_unfolded_length():
    """Sources of 9, 8, 7, 5, 3, 2 tokens (|s| = 10, 9, 8, 6, 4, 3 with EOS), a = 1.2, b = 0: L = ceil(1.2 |s|) = 12,
    11, 10, 8, 5, 4 columns. The decoder reads zero columns past them (as in the paper), so decoding is bounded
    only by the harness's a * |src| + b, here 5 |src| + 10, like every other model's."""
    model = build("bytenet", "translation")
    src, lengths = sources()
    assert model.unfolded_lengths(lengths).tolist() == [12, 11, 10, 8, 5, 4]
    limits = max_lengths(lengths, 5.0, 10, model)
    assert limits == [55, 50, 45, 35, 25, 20] and max_lengths(lengths, 5.0, 10, NoEOS(model)) == limits
    spy = Spy(NoEOS(model))
    assert [len(h) for h in beam_search(spy, src, lengths, limits, beam=2)] == limits
    assert len(spy.steps) == 56
    assert [len(h) for h in greedy(NoEOS(model), src, lengths, limits)] == limits


def test_decoding_computes_each_weight_norm_once():
    """ConvS2S's weight-normalised weights are computed once per search, not at every step."""
    model = build("convs2s", "translation")
    norms = [m for m in model.modules() if isinstance(m, parametrize.ParametrizationList)]
    calls = []
    for m in norms:
        m.register_forward_hook(lambda *_: calls.append(1))
    src, lengths = sources()
    limits = max_lengths(lengths, 1.5, 3)
    for search in (greedy, beam_search):
        calls.clear()
        spy = Spy(NoEOS(model))
        search(spy, src, lengths, limits)
        forced_eos = search is beam_search  # one step more: the EOS forced after the longest hypotheses' last token
        assert len(spy.steps) == max(limits) + forced_eos and 0 < len(calls) <= len(norms)


def test_weight_norm_cache_ends_with_the_search():
    """After an optimizer step the next search decodes with the new weights, not those cached by the last one."""
    model = build("convs2s", "translation")
    src, lengths = sources()
    limits = max_lengths(lengths, 1.5, 3)

    def first_logits():
        spy = Spy(model)
        beam_search(spy, src, lengths, limits, beam=2)
        return spy.steps[0][2][::2]  # the first of each sentence's two rows

    before = first_logits()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tgt = torch.randint(4, 23, (6, 5), generator=torch.Generator().manual_seed(0))
    F.cross_entropy(model(src, lengths, tgt).flatten(0, 1), tgt.roll(-1, 1).flatten()).backward()
    assert all(p.grad is not None for p in model.parameters())  # training computed the weights afresh
    opt.step()
    after = first_logits()
    with torch.no_grad():  # a copy's weights are computed afresh, whatever any cache holds for the model's
        expected = copy.deepcopy(model)(src, lengths, torch.full((6, 1), BOS))[:, 0]
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(after, before, atol=1e-3)


@functools.cache
def copy_model(arch: str):
    """A tiny model trained (100 steps, no dropout) to copy eight sources of 6 tokens, and those sources.

    A model sure of its answers: greedy decoding copies each source and ends with EOS.
    """
    model, (src, lengths, _, _), _ = train_to_copy(build(arch, "translation", dropout=0.0), 23, 100)
    return model, src, lengths


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("lenpen", [0.0, 0.6])
def test_beam_finds_at_least_the_greedy_score(arch, lenpen):
    """On a model that ends its greedy hypotheses with EOS, the beam's choice scores at least as well as greedy's
    (log-probability with EOS over GNMT's ((5 + |Y|) / 6) ** lenpen, |Y| counting EOS).

    On the copy-trained Transformer, EOS candidates ranked among the top four of their steps (after 1, 1, 2 and 5
    tokens) finish four hypotheses of sentence 0 one step before the copy (log-probability -0.09) ends; a search
    that stopped at four finished hypotheses (fairseq's rule) returned the best of them ([8], -5.7). The search
    goes on while a live hypothesis can still beat the best finished one."""
    model, src, lengths = copy_model(arch)

    def score(b, hyp):
        tgt = torch.tensor([[BOS] + hyp])
        out = torch.tensor(hyp + [EOS])
        with torch.no_grad():
            lp = F.log_softmax(model(src[b : b + 1], lengths[b : b + 1], tgt)[0].double(), -1)
        return lp[torch.arange(len(out)), out].sum().item() / ((5 + len(out)) / 6) ** lenpen

    limits = [30] * 8
    greedy_hyps = greedy(model, src, lengths, limits)
    assert greedy_hyps == src.tolist()  # every greedy hypothesis ends with EOS, right after the copy
    for b, hyp in enumerate(beam_search(model, src, lengths, limits, beam=4, lenpen=lenpen)):
        assert score(b, hyp) >= score(b, greedy_hyps[b]) - 1e-6, (b, hyp)


def test_decoding_never_runs_past_learned_positions():
    """A long output limit (a*|s|+b) is capped at ConvS2S's max_positions instead of failing mid-evaluation."""
    from seqbench.harness.evaluate import translate

    task = tasks.build({"name": "copy", "n_train": 10, "n_valid": 3, "n_test": 3, "min_len": 8, "max_len": 8})
    torch.manual_seed(0)
    model = models.build({**preset("convs2s_tiny"), "max_positions": 12}, task).eval()
    hyps, _ = translate(model, task, "test", torch.device("cpu"), beam=2, max_len_a=5.0, max_len_b=10)
    assert len(hyps) == 3 and all(len(h.split()) <= 12 for h in hyps)
