"""Decoding, evaluation and the training loss against values derived outside the code under test.

Each test pins one thing that a plausible slip would break while every other test still passes:
the length penalty's exponent (hand-computed values, a stub decoder whose best hypothesis flips
with the penalty, an exhaustive search), the output limits, the order of the translations (an
oracle copy model decoded in small, length-sorted batches), the label smoothing the trainer
applies (the logged loss against ``F.cross_entropy`` on the very logits of the step) and the
fused loss's default and messages.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from seqbench import tasks
from seqbench.harness import job, train
from seqbench.harness.decode import beam_search, greedy, length_penalty, max_lengths
from seqbench.harness.evaluate import evaluate_translation
from seqbench.harness.loss import smoothed_cross_entropy
from seqbench.models.common import BOS, EOS, PAD, Seq2Seq

A, B = 3, 4  # the stubs' two ordinary tokens (ids after PAD, BOS, EOS)
V = 5
NEVER = float("-inf")  # PAD and BOS: never emitted by the stubs


class TableDecoder(Seq2Seq):
    """A stub model: the logits at step t are ``table[sentence, t, prev]`` (V,), whatever else came before.

    The source's first token names the sentence (its row of the table); the state holds it as a
    per-sentence (``src_*``) entry, so beam search's reordering is exercised as with a real model.
    """

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table  # (sentences, steps, V prev, V next)
        self.rows: list[int] = []  # hypotheses decoded at each step

    def encode(self, src, src_lengths):
        return {"src_sentence": src[:, 0].clone()}

    def decode_step(self, prev, state, step):
        self.rows.append(prev.size(0))
        step = min(step, self.table.size(1) - 1)
        return self.table[state["src_sentence"], step, prev], state


def one_sentence(steps: list[dict]) -> TableDecoder:
    """A table for one sentence from per-step probabilities: {token: p} after any token, or
    {previous token: {token: p}}."""
    table = torch.full((1, len(steps), V, V), NEVER)
    for t, probs in enumerate(steps):
        for prev, row in (probs.items() if isinstance(next(iter(probs.values())), dict) else [(None, probs)]):
            for tok, p in row.items():
                table[0, t, slice(None) if prev is None else prev, tok] = math.log(p)
    return TableDecoder(table)


def sources(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sources (n,1) naming sentences 0..n-1."""
    return torch.arange(n)[:, None], torch.ones(n, dtype=torch.long)


# -- the length penalty ------------------------------------------------------------------------

@pytest.mark.parametrize("length,alpha,expected", [
    (1, 0.6, 1.0),                 # (5 + 1) / 6 = 1: any exponent gives 1
    (7, 1.0, 2.0),                 # (5 + 7) / 6 = 2
    (7, 0.6, 2.0 ** 0.6),          # 1.515716566510398
    (13, 0.5, math.sqrt(3.0)),     # (5 + 13) / 6 = 3
    (25, 2.0, 25.0),               # (5 + 25) / 6 = 5, squared
    (13, 0.0, 1.0),                # alpha = 0: no penalty
])
def test_length_penalty_equals_hand_computed_values(length, alpha, expected):
    """GNMT's lp(Y) = ((5 + |Y|) / 6) ** alpha (Wu et al. 2016, eq. 14)."""
    assert length_penalty(length, alpha) == pytest.approx(expected, rel=1e-12)


def test_output_limits_equal_hand_computed_values():
    """int(a |src| + b), at least 1, capped at a model's learned target positions (less the forced EOS's) and at
    the model's own per-sentence limit."""
    assert max_lengths(torch.tensor([0, 1, 4, 10]), 1.2, 10) == [10, 11, 14, 22]  # 10, 11.2, 14.8, 22
    assert max_lengths(torch.tensor([0, 1, 3]), 0.5, 0) == [1, 1, 1]  # 0, 0.5, 1.5: never below one token
    capped = Seq2Seq()
    capped.max_target_positions = 12
    # 11.2, 16 -> 11: 11 tokens fill positions 0..10, the EOS forced after them position 11, the last of 12
    assert max_lengths(torch.tensor([1, 5]), 1.2, 10, capped) == [11, 11]
    assert max_lengths(torch.tensor([1, 5]), 1.2, 10, Seq2Seq()) == [11, 16]  # no learned positions: no cap
    own = Seq2Seq()
    own.max_output_tokens = lambda lengths: (2 * lengths).tolist()  # a per-sentence limit of the model's own
    assert max_lengths(torch.tensor([1, 5, 9]), 1.2, 10, own) == [2, 10, 18]  # min(11, 2), min(16, 10), min(20, 18)


# Step by step, for one sentence (probabilities; PAD and BOS never):
#   step 0:     A .98, B .015, EOS .005  -> every hypothesis starts with A
#   step 1:     EOS .55, A .44, B .01    -> "A" ends here: the short hypothesis
#   steps 2-9:  A .97, B .02, EOS .01    -> B outranks EOS, so no early end enters the beam
#   step 10:    EOS .97, A .02, B .01    -> "A" * 10 ends here: the long hypothesis
# short = [A]:      log .98 + log .55                   = -0.6180, |Y| = 2  (EOS counts), lp = 7/6
# long  = [A] * 10: log .98 + log .44 + 9 log .97       = -1.1154, |Y| = 11,             lp = 16/6
# alpha = 0:   -0.6180            > -1.1154             -> short
# alpha = 0.5: -0.6180 / 1.0801 = -0.5722 > -1.1154 / 1.6330 = -0.6830 -> short
# alpha = 1:   -0.6180 / 1.1667 = -0.5297 < -1.1154 / 2.6667 = -0.4183 -> long
# An exponent of 2 alpha picks long at alpha = 0.5, -alpha or 0 pick short at alpha = 1.
FLIP = [{A: .98, B: .015, EOS: .005}, {EOS: .55, A: .44, B: .01}, *[{A: .97, B: .02, EOS: .01}] * 8,
        {EOS: .97, A: .02, B: .01}, {EOS: .97, A: .02, B: .01}]
SHORT, LONG = [A], [A] * 10


@pytest.mark.parametrize("lenpen,expected", [(0.0, SHORT), (0.5, SHORT), (1.0, LONG)])
def test_length_penalty_decides_between_a_short_and_a_long_hypothesis(lenpen, expected):
    model = one_sentence(FLIP)
    src, lengths = sources(1)
    assert beam_search(model, src, lengths, [12], beam=2, lenpen=lenpen) == [expected]


def test_greedy_takes_the_short_hypothesis_of_the_flip_table():
    """Greedy ends at step 1 (EOS .55 is the arg-max): the long hypothesis needs the beam."""
    model = one_sentence(FLIP)
    src, lengths = sources(1)
    assert greedy(model, src, lengths, [12]) == [SHORT]
    assert beam_search(model, src, lengths, [12], beam=1, lenpen=1.0) == [SHORT]


def hypothesis_score(table: torch.Tensor, sentence: int, hyp: list[int], alpha: float) -> float:
    """Length-normalised log-probability of ``hyp`` under a TableDecoder table, computed here in float64.

    Every hypothesis ends with EOS, which counts in its length; one that reached its length limit gets
    the EOS forced after its last token (where the stub reads its last step's row), charged like any other.
    """
    tokens = hyp + [EOS]
    logp, prev = 0.0, BOS
    for t, tok in enumerate(tokens):
        logp += torch.log_softmax(table[sentence, min(t, table.size(1) - 1), prev].double(), -1)[tok].item()
        prev = tok
    return logp / ((5.0 + len(tokens)) / 6.0) ** alpha


def exhaustive_best(table: torch.Tensor, sentence: int, max_len: int, alpha: float) -> float:
    """The best score over every hypothesis of at most ``max_len`` tokens over {A, B} (EOS ends them)."""
    return max(hypothesis_score(table, sentence, list(hyp), alpha)
               for n in range(max_len + 1) for hyp in itertools.product((A, B), repeat=n))


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0, 2.0])
def test_a_beam_wide_enough_finds_the_exhaustive_optimum(alpha):
    """Vocabulary {EOS, A, B}; with limits of at most 4 tokens there are at most 3 * 2**3 = 24 candidates
    per step, so a beam of 32 keeps every prefix and accepts every EOS: it must reach the optimum."""
    g = torch.Generator().manual_seed(11)
    n, limits = 8, [4, 3, 4, 2, 4, 3, 4, 1]
    table = 2.0 * torch.randn(n, 4, V, V, generator=g)
    table[..., PAD] = table[..., BOS] = NEVER
    model = TableDecoder(table)
    src, lengths = sources(n)
    hyps = beam_search(model, src, lengths, limits, beam=32, lenpen=alpha)
    for s, (hyp, limit) in enumerate(zip(hyps, limits)):
        assert len(hyp) <= limit and set(hyp) <= {A, B}
        assert hypothesis_score(table, s, hyp, alpha) == pytest.approx(
            exhaustive_best(table, s, limit, alpha), abs=1e-5), (s, hyp)


# Only two hypotheses exist, whatever the beam: [A] (EOS at step 1) and [A] * 4 (EOS at step 4).
# [A]:     log .55 = -0.5978, |Y| = 2, lp = (7/6) ** alpha
# [A] * 4: log .45 = -0.7985, |Y| = 5, lp = (10/6) ** alpha
# alpha 0.6: -0.5978 / 1.0969 = -0.5450 > -0.7985 / 1.3585 = -0.5878  -> [A]
# alpha 1:   -0.5978 / 1.1667 = -0.5124 < -0.7985 / 1.6667 = -0.4791  -> [A] * 4
# alpha 1.6: -0.5978 / 1.2797 = -0.4671 < -0.7985 / 2.2636 = -0.3528  -> [A] * 4
TWO = [{A: 1.0}, {EOS: .55, A: .45}, {A: 1.0}, {A: 1.0}, {EOS: 1.0}]


def test_beam_search_defaults_to_four_beams_and_the_papers_penalty():
    """beam 4 (four hypotheses per sentence from the first step) and alpha 0.6, as in Vaswani et al."""
    src, lengths = sources(1)
    model = one_sentence(TWO)
    assert beam_search(model, src, lengths, [8]) == [[A]]
    assert model.rows[0] == 4
    assert beam_search(one_sentence(TWO), src, lengths, [8], lenpen=1.0) == [[A] * 4]


# Beam 3, alpha 0 or 1. Step 0: A .55, B .4, EOS .05 (finished: [], -2.996). Step 1: after A, A .9; after
# B, EOS .9: B EOS (-1.0217) ranks second and ends on the second beam (finished: [B]). Step 2: A A EOS
# (-1.3963) ends the third hypothesis. Best: [B] (-1.0217; normalised by 7/6 for alpha 1: -0.8758 against
# [A, A]'s -1.3963 / (8/6) = -1.0472).
SECOND_BEAM = [{A: .55, B: .4, EOS: .05},
               {A: {A: .9, B: .05, EOS: .05}, B: {EOS: .9, A: .05, B: .05}},
               {EOS: .5, A: .25, B: .25}, {EOS: .9, A: .05, B: .05}]


@pytest.mark.parametrize("lenpen", [0.0, 1.0])
def test_a_hypothesis_ending_on_another_beam_keeps_that_beams_tokens(lenpen):
    src, lengths = sources(1)
    assert beam_search(one_sentence(SECOND_BEAM), src, lengths, [5], beam=3, lenpen=lenpen) == [[B]]


def test_search_stops_once_a_sentence_has_beam_hypotheses():
    """FLIP with beam 2: the second hypothesis ends at step 10, so step 11 (within the limit of 12) never runs."""
    model = one_sentence(FLIP)
    src, lengths = sources(1)
    assert beam_search(model, src, lengths, [12], beam=2, lenpen=1.0) == [LONG]
    assert len(model.rows) == 11


def test_fewer_live_tokens_than_beams():
    """Only A and EOS ever have probability: beam 3 holds one live hypothesis. Step 0 ends [] (log .1), step 1
    ends [A] (log .9 + log .4 = -1.0217), step 2 ends [A, A] (log .9 + log .6 + log .9 = -0.7215), the best."""
    model = one_sentence([{A: .9, EOS: .1}, {A: .6, EOS: .4}, {EOS: .9, A: .1}, {EOS: .9, A: .1}])
    src, lengths = sources(1)
    assert beam_search(model, src, lengths, [6], beam=3, lenpen=0.0) == [[A, A]]


# -- the length limit: the EOS forced after the last token is charged (as fairseq does) ----------

# Beam 2, limit 2 tokens. Step 1 keeps [A, A] (log .6 + log .9 = -0.6162) and [B, B] (log .4 + log .8 = -1.1394);
# EOS has no probability before step 2, where it is forced: after [A, A] it has .1, after [B, B] .9.
# Charged: [A, A] -0.6162 + log .1 = -2.9188 < [B, B] -1.1394 + log .9 = -1.2448 -> [B, B].
# Not charged (the hypotheses cut at 2 tokens as they are): -0.6162 > -1.1394 -> [A, A].
# Both have 3 tokens with the EOS, so the length penalty is the same for both.
UNLIKELY_END = [{A: .6, B: .4}, {A: {A: .9, B: .1}, B: {B: .8, A: .2}}, {A: {EOS: .1, A: .9}, B: {EOS: .9, B: .1}}]


@pytest.mark.parametrize("lenpen", [0.0, 0.6])
def test_hypotheses_at_the_length_limit_are_charged_the_forced_eos(lenpen):
    model = one_sentence(UNLIKELY_END)
    src, lengths = sources(1)
    assert beam_search(model, src, lengths, [2], beam=2, lenpen=lenpen) == [[B, B]]
    assert model.rows == [2, 2, 2]  # steps 0, 1 and the forced EOS at step 2


# Beam 2, limit 2. Step 1: [A] + EOS (log .55 + log .6 = -1.1087, |Y| = 2) finishes, ranked second after [B, B]
# (log .45 + log .9 = -0.9039); [A, A] (-1.5141) is the other live beam. Step 2 forces EOS: [B, B] + EOS =
# -0.9039 + log .7 = -1.2605 (|Y| = 3) is added, [A, A] + EOS (-2.2073) is not (two hypotheses finished).
# alpha 0: [A] -1.1087 > [B, B] -1.2605 -> [A]   (EOS not charged: -0.9039 -> [B, B])
# alpha 1: [A] -1.1087 / (7/6) = -0.9503 < [B, B] -1.2605 / (8/6) = -0.9454 -> [B, B]
#          (EOS charged but not counted in |Y|: -1.2605 / (7/6) = -1.0805 -> [A])
CUT_OR_ENDED = [{A: .55, B: .45}, {A: {EOS: .6, A: .4}, B: {B: .9, A: .1}}, {A: {EOS: .5, A: .5}, B: {EOS: .7, B: .3}}]


@pytest.mark.parametrize("lenpen,expected", [(0.0, [A]), (1.0, [B, B])])
def test_the_forced_eos_is_charged_and_counts_in_the_length(lenpen, expected):
    src, lengths = sources(1)
    assert beam_search(one_sentence(CUT_OR_ENDED), src, lengths, [2], beam=2, lenpen=lenpen) == [expected]


def test_a_model_that_never_ends_still_returns_its_best_hypothesis():
    """EOS has no probability at all: the forced EOS scores every hypothesis -inf, and the search returns the
    best beam ([A, A]: .6 * .7, ahead of [B, A]: .4 * .7), not an empty translation."""
    src, lengths = sources(1)
    assert beam_search(one_sentence([{A: .6, B: .4}, {A: .7, B: .3}]), src, lengths, [2], beam=2) == [[A, A]]


# -- evaluation: hypotheses stay aligned with their references ----------------------------------

class OracleCopy(Seq2Seq):
    """Emits its source token by token, then EOS, with a wide margin (a perfect copy model)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def encode(self, src, src_lengths):
        return {"src_tokens": src, "src_lengths": src_lengths}

    def decode_step(self, prev, state, step):
        src, lengths = state["src_tokens"], state["src_lengths"]
        want = src[:, step] if step < src.size(1) else torch.full_like(lengths, EOS)
        want = torch.where(step < lengths, want, torch.full_like(want, EOS))
        logits = torch.full((src.size(0), self.vocab), -10.0)
        logits[torch.arange(src.size(0)), want] = 10.0
        return logits, state


@pytest.mark.parametrize("beam", [1, 3])
def test_oracle_copy_model_scores_perfectly_in_corpus_order(beam):
    task = tasks.build({"name": "copy", "n_train": 4, "n_valid": 2, "n_test": 13, "min_len": 1, "max_len": 16,
                        "data_seed": 4})
    lengths = [len(s) for s in task.sources("test")]
    assert len(set(lengths)) > 5 and sorted(lengths) != lengths  # mixed lengths, not already in length order
    decoding = {"beam": beam, "lenpen": 0.6, "max_len_a": 1.2, "max_len_b": 10, "batch_sentences": 2}
    scores, hyps = evaluate_translation(OracleCopy(task.tgt_vocab_size), task, "test", torch.device("cpu"), decoding)
    refs = task.references("test")
    assert hyps == refs  # each hypothesis in its own reference's place
    assert scores["exact_match"] == 1.0 and scores["bleu"] == pytest.approx(100.0) and scores["sentences"] == 13
    assert scores["samples"] == [{"ref": r, "hyp": r} for r in refs[:5]]
    short = sum(n <= 10 for n in lengths)
    assert [(row["bucket"], row["n"]) for row in scores["by_length"]] == [("1-10", short), ("11-20", 13 - short)]
    assert all(row["bleu"] == pytest.approx(100.0) for row in scores["by_length"])


class SourcePointers(OracleCopy):
    """The oracle copy model, recording where its per-sentence state lies at each step."""

    def __init__(self, vocab: int):
        super().__init__(vocab)
        self.where: list[int] = []

    def decode_step(self, prev, state, step):
        self.where.append(state["src_tokens"].data_ptr())
        return super().decode_step(prev, state, step)


def test_greedy_moves_the_per_sentence_state_only_when_a_sentence_ends():
    """Sentences of 2, 4 and 4 tokens: the first ends at step 2, so only step 3 reads a moved source."""
    model = SourcePointers(V + 6)
    src = torch.tensor([[5, 6, 0, 0], [5, 6, 7, 8], [8, 7, 6, 5]])
    assert greedy(model, src, torch.tensor([2, 4, 4]), [10] * 3) == [[5, 6], [5, 6, 7, 8], [8, 7, 6, 5]]
    where = model.where
    assert len(where) == 5 and [a != b for a, b in zip(where, where[1:])] == [False, False, True, False]


# -- training: the logged loss is the configured label-smoothed cross-entropy -------------------

def test_fused_loss_defaults_to_no_smoothing_and_its_errors_give_the_fix():
    logits = torch.randn(4, 5, requires_grad=True, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 1, 2, 3])
    loss = smoothed_cross_entropy(logits, target)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, target, reduction="sum").item(), rel=1e-6)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError) as err:
        loss.backward()
    assert str(err.value) == ("smoothed_cross_entropy's backward reuses its saved log-probabilities as the gradient "
                              "and runs once per forward; to backpropagate twice (retain_graph=True), compute the "
                              "loss again or use F.cross_entropy")
    with pytest.raises(ValueError) as err:
        smoothed_cross_entropy(logits, target[:3])
    assert str(err.value) == ("logits (4, 5) and target (3,) disagree: logits must be the target's shape plus a "
                              "vocabulary dimension")


def test_logged_training_loss_is_label_smoothed_cross_entropy(make_cfg, tmp_path, monkeypatch):
    """One step through the job and the real Trainer, label smoothing 0.1 configured: the logged loss equals
    ``F.cross_entropy(..., label_smoothing=0.1)`` on the logits of that step, per target token."""
    seen = []
    train_step = train.Trainer.train_step

    def recording(self, batch, n_tokens=None):
        hook = self.model.register_forward_hook(lambda m, args, out: seen.append((out.detach().clone(), batch)))
        try:
            return train_step(self, batch, n_tokens)
        finally:
            hook.remove()

    monkeypatch.setattr(train.Trainer, "train_step", recording)
    rec = job.run(make_cfg("model=transformer_tiny", "task=copy", "task.n_train=40", "task.n_valid=2",
                           "task.n_test=2", "trainer=smoke", "trainer.max_steps=1", "trainer.label_smoothing=0.1",
                           "trainer.valid_bleu=false", "eval.splits=[valid]"), tmp_path)
    assert rec["status"] == "ok" and len(seen) == 1
    logits, batch = seen[0]
    target = batch.target.flatten()
    n = int((target != PAD).sum())

    def per_token(smoothing):
        return F.cross_entropy(logits.double().flatten(0, 1), target, ignore_index=PAD, label_smoothing=smoothing,
                               reduction="sum").item() / n

    (logged,) = rec["curves"]["train"]
    assert logged["step"] == 1
    assert logged["loss"] == pytest.approx(per_token(0.1), rel=1e-5)
    assert abs(per_token(0.1) - per_token(0.0)) > 1e-2  # the smoothing makes a difference the check can see
