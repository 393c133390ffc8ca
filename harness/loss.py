"""Label-smoothed cross-entropy with a fused backward pass: the training loss of every seqbench job.

Same value and gradient as ``F.cross_entropy(logits.float(), target, ignore_index=...,
label_smoothing=eps, reduction="sum")`` (``tests/test_train.py`` checks both), computed with less
work over the (tokens x vocabulary) matrix, which is the largest tensor of a translation or
language-model step. For row i with target y_i (rows whose target is ``ignore_index`` count
zero) and log-probabilities lp = log_softmax(z_i):

    loss_i = -(1 - eps) lp[y_i] - (eps / V) sum_v lp[v]
    d loss_i / d z_i = softmax(z_i) - q_i,   q_i = (1 - eps) onehot(y_i) + eps / V

PyTorch's autograd reaches that gradient in four passes over the matrix (a zero-filled
gradient for the NLL term, an expanded one for the smoothing term, their sum, and the
log-softmax backward); here the backward is ``exp`` of the saved log-probabilities, one
subtract-and-scale pass and a scatter into the target column. The log-softmax is taken in
fp32 from logits of any dtype (no fp32 copy of bf16/fp16 logits is kept), and the gradient
comes back in the logits' dtype.
"""
from __future__ import annotations

import torch

from seqbench.models.common import LanguageModel


class _SmoothedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, smoothing: float, ignore_index: int) -> torch.Tensor:
        logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # (N,V)
        keep = target != ignore_index
        safe = target.masked_fill(~keep, 0)
        per_row = logp.gather(1, safe[:, None]).squeeze(1) * (1.0 - smoothing)
        if smoothing:
            per_row = per_row + logp.sum(dim=-1) * (smoothing / logp.size(1))
        ctx.save_for_backward(logp, safe, keep)
        ctx.smoothing, ctx.dtype, ctx.spent = smoothing, logits.dtype, False
        return -(per_row * keep).sum()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.spent:
            raise RuntimeError("smoothed_cross_entropy's backward reuses its saved log-probabilities as the gradient "
                               "and runs once per forward; to backpropagate twice (retain_graph=True), compute "
                               "the loss again or use F.cross_entropy")
        ctx.spent = True
        logp, safe, keep = ctx.saved_tensors
        eps, V = ctx.smoothing, logp.size(1)
        weight = (keep * grad_out)[:, None].float()  # (N,1): d loss / d loss_i
        grad = logp.exp_()  # in place: the log-probabilities' memory becomes the gradient's
        if eps:
            grad.sub_(eps / V)
        grad.mul_(weight)
        grad.scatter_add_(1, safe[:, None], weight * -(1.0 - eps))
        return grad.to(ctx.dtype), None, None, None


# trainer.label_smoothing=null: the task's default, by the model form it trains. Translation (the encoder-decoder
# form) keeps Vaswani et al.'s 0.1; language models (and the probes, which are language-model form) train without
# smoothing, as the LM papers and the reference LM code do: smoothing raises perplexity, by a different amount for
# each architecture, so it would bias their comparison.
TASK_SMOOTHING = {"seq2seq": 0.1, "lm": 0.0}


def label_smoothing(setting: float | None, form: str) -> float:
    """The label smoothing a job trains with: ``trainer.label_smoothing`` when it is a number (an explicit
    setting always wins), else (null) the default of the task's model form, :data:`TASK_SMOOTHING`."""
    if setting is not None:
        return float(setting)
    if form not in TASK_SMOOTHING:
        raise ValueError(f"no default label smoothing for model form {form!r}; set trainer.label_smoothing")
    return TASK_SMOOTHING[form]


def smoothed_cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0,
                           ignore_index: int = -100) -> torch.Tensor:
    """Summed label-smoothed cross-entropy of ``logits`` (..., V) against ``target`` (...), ignored targets excluded.

    ``smoothing`` in [0, 1): the weight of the uniform distribution over the vocabulary in the
    target distribution (``label_smoothing`` of ``F.cross_entropy``). Returns an fp32 scalar.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1); got {smoothing}")
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree: logits must be "
                         "the target's shape plus a vocabulary dimension")
    return _SmoothedCrossEntropy.apply(logits.reshape(-1, logits.size(-1)), target.reshape(-1), float(smoothing),
                                       int(ignore_index))


def sequence_nll(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> tuple[list[float], list[int]]:
    """Per sequence of a batch: the summed token NLL (fp32 log-softmax, no label smoothing) and the number of
    scored tokens; logits (B,T,V), target (B,T). What evaluation sums, and what the report's paired bootstrap
    resamples."""
    nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=ignore_index,
                                            reduction="none").view_as(target)  # (B,T)
    return nll.sum(1).tolist(), (target != ignore_index).sum(1).tolist()


SCORED_SHARE = 0.5  # a language model's batch that scores less than this share of its positions projects those alone


def training_logits(model: torch.nn.Module, batch, forward=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits a training step's loss needs, and their targets: ``(forward or model)(**batch.inputs)`` and
    ``batch.target``, except for a language model's batch that scores few of its positions (the probes: MQAR
    scores the queried values alone, 4 of 64 positions), where the output head runs on the scored positions only.

    A language model is ``head(mixing_blocks(embed(tokens)))`` with a position-wise head (the conformance kit
    holds every architecture to it), so the loss and every gradient are those of the full forward; the
    (positions x vocabulary) product, the largest of a probe's step with Zoology's 8,192-token vocabulary,
    shrinks with the share of scored positions. ``forward`` (a compiled or data-parallel wrapper of ``model``)
    keeps the full forward: the wrapper must see the call.
    """
    scored = batch.target != batch.ignore_index
    if ((forward is None or forward is model) and isinstance(model, LanguageModel) and set(batch.inputs) == {"tokens"}
            and batch.n_tokens < SCORED_SHARE * batch.target.numel()):
        return model.head(model.features(batch.inputs["tokens"])[scored]), batch.target[scored]
    return (forward or model)(**batch.inputs), batch.target

