"""A language model's batch that scores few positions (MQAR scores the queried values alone) runs the output head
on those positions only (harness/loss.py ``training_logits``): the same loss and gradients as the full forward."""
from __future__ import annotations

import pytest
import torch

from seqbench import models
from seqbench.harness import lm_protocol
from seqbench.harness.analysis.probes import evaluate_probe
from seqbench.harness.loss import smoothed_cross_entropy, training_logits
from seqbench.harness.profile import count_flops, train_flops_per_token
from seqbench.tasks import zoology

ARCHITECTURES = list(models.MODELS)


@pytest.fixture(scope="module")
def task():
    return zoology.mqar(n_train=64, n_valid=8, n_test=8, vocab_size=128, seq_len=32, num_kv_pairs=4)


def _grads(model, batch, sparse: bool) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    logits, target = training_logits(model, batch) if sparse else (model(**batch.inputs), batch.target)
    loss = smoothed_cross_entropy(logits, target, 0.1, batch.ignore_index)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_scoring_few_positions_gives_the_full_forwards_loss_and_gradients(task, arch):
    batch = task.batches("train", 512, epoch=0, shuffle=False, seed=1)[0]
    assert batch.n_tokens < 0.5 * batch.target.numel()  # MQAR: the queried values only
    torch.manual_seed(0)
    model = models.build({**models.load_preset(f"{arch}_tiny"), "dropout": 0.0}, task)
    scored = batch.target != batch.ignore_index
    logits, target = training_logits(model, batch)
    every = model(**batch.inputs)
    assert logits.shape == (batch.n_tokens, every.shape[-1]) and torch.equal(target, batch.target[scored])
    torch.testing.assert_close(logits, every[scored], rtol=1e-5, atol=1e-5)
    full_loss, full = _grads(model, batch, sparse=False)
    sparse_loss, sparse = _grads(model, batch, sparse=True)
    assert sparse_loss == pytest.approx(full_loss, rel=1e-5)
    assert full.keys() == sparse.keys()
    for name in full:
        torch.testing.assert_close(sparse[name], full[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_batch_that_scores_most_positions_and_a_wrapped_model_keep_the_full_forward(task):
    torch.manual_seed(0)
    model = models.build(models.load_preset("transformer_tiny"), task)
    batch = task.batches("train", 512, epoch=0, shuffle=False, seed=1)[0]
    wrapper = lambda **inputs: model(**inputs)  # noqa: E731 (a compiled or data-parallel model stands here)
    logits, target = training_logits(model, batch, wrapper)
    assert logits.shape[:-1] == batch.target.shape and target is batch.target
    dense = type(batch)(batch.inputs, batch.inputs["tokens"].clone(), batch.target.numel(), batch.index, -100)
    logits, target = training_logits(model, dense)
    assert logits.shape[:-1] == dense.target.shape


def test_counted_flops_follow_the_step_the_trainer_takes(task):
    """FLOPs per token count the output layer on the scored positions only, as the step computes it: the full
    forward's count less forward and backward (6 x d_model x vocabulary) of each unscored position."""
    torch.manual_seed(0)
    model = models.build(models.load_preset("transformer_tiny"), task)
    batch = task.batches("train", 512, epoch=0, shuffle=False, seed=1)[0]
    sparse = train_flops_per_token(model, [batch]) * batch.n_tokens

    def full_step():
        logits = model(**batch.inputs)
        smoothed_cross_entropy(logits, batch.target, 0.0, batch.ignore_index).backward()

    full = count_flops(full_step)
    unscored = batch.target.numel() - batch.n_tokens
    assert full - sparse == 6 * model.proj.in_features * model.proj.out_features * unscored


@pytest.mark.parametrize("arch", ["transformer", "lstm"])
def test_evaluation_scores_the_answer_positions_alone_with_the_full_forwards_numbers(task, arch):
    """Validation and test of a probe (loss, accuracy, accuracy by distance) run the output head on the answer
    positions only, and give what the full forward gives."""
    torch.manual_seed(0)
    model = models.build({**models.load_preset(f"{arch}_tiny"), "dropout": 0.0}, task).eval()
    batch = task.batches("valid", 512)[0]
    with torch.no_grad():
        every = model(**batch.inputs).float()
        full = torch.nn.functional.cross_entropy(every.transpose(1, 2), batch.target, ignore_index=-100,
                                                 reduction="none")
        head_only = lm_protocol.token_nll(model.head, model.features(batch.inputs["tokens"]), batch.target, -100)
    torch.testing.assert_close(head_only, full, rtol=1e-5, atol=1e-5)
    assert torch.equal(head_only[batch.target == -100], torch.zeros(int((batch.target == -100).sum())))
    got = evaluate_probe(model, task, "valid", torch.device("cpu"), 512)
    answers = batch.target != -100
    expected = (every.argmax(-1)[answers] == batch.target[answers]).double().mean().item()
    assert len(task.batches("valid", 512)) == 1 and got["tokens"] == int(answers.sum())
    assert got["accuracy"] == pytest.approx(expected)
    assert got["nll"] == pytest.approx(full.sum().item() / int(answers.sum()), rel=1e-5)
