"""Cost measurements: training FLOPs through torch's FLOP counter.

torch's counter knows matmuls, convolutions and the CUDA attention kernels, but not some kernels
our models reach: the CPU ``scaled_dot_product_attention`` kernel (so attention went uncounted
on CPU) and the fused recurrent kernels (oneDNN's LSTM layer on CPU, cuDNN's LSTM/GRU on CUDA,
so those recurrences went uncounted). ``FORMULAS`` adds them, with torch's own conventions:
attention counts QK^T and AV forward, and backward five matmuls (the scores recomputed, as the
fused kernels do), causal masking ignored; every matmul is 2 FLOPs per multiply-add, and a
backward pass costs two matmuls (input and weight gradients) per forward matmul.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from seqbench.models.common import torch_attention_kernels

from .loss import training_logits

aten = torch.ops.aten


def _sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _tokens(input_shape) -> int:
    """Positions an RNN layer runs over: (T,B,I), (B,T,I) or packed (N,I)."""
    return math.prod(input_shape[:-1])


def _mkldnn_rnn_layer(input, w_ih, w_hh, *args, out_shape=None, **kwargs) -> int:
    """One oneDNN RNN layer (one direction): input and recurrent matmuls at every position."""
    return 2 * _tokens(input) * (math.prod(w_ih) + math.prod(w_hh))


def _mkldnn_rnn_layer_backward(input, w_ih, w_hh, *args, out_shape=None, **kwargs) -> int:
    return 2 * _mkldnn_rnn_layer(input, w_ih, w_hh)


def _cudnn_weights(weights) -> int:
    """Multiply-adds per position over all layers and directions (every 2-D weight; biases are adds)."""
    return sum(math.prod(w) for w in weights if len(w) == 2)


def _cudnn_rnn(input, weights, *args, out_shape=None, **kwargs) -> int:
    return 2 * _tokens(input) * _cudnn_weights(weights)


def _cudnn_rnn_backward(input, weights, *args, out_shape=None, **kwargs) -> int:
    output_mask = args[-1]  # (input, hx, cx, weight) gradients requested
    return 2 * _tokens(input) * _cudnn_weights(weights) * (1 + bool(output_mask[3]))


FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward,
    aten.mkldnn_rnn_layer: _mkldnn_rnn_layer,
    aten.mkldnn_rnn_layer_backward: _mkldnn_rnn_layer_backward,
    aten._cudnn_rnn: _cudnn_rnn,
    aten._cudnn_rnn_backward: _cudnn_rnn_backward,
}


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter with ``FORMULAS`` added (use as a context manager)."""
    return FlopCounterMode(display=False, custom_mapping=FORMULAS)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of everything ``fn()`` runs (forward and backward, if it calls backward), attention counted by its
    fused kernel's formula whatever kernel the precision would take (``torch_attention_kernels``)."""
    with flop_counter() as counter, torch_attention_kernels():
        fn()
    return counter.get_total_flops()


FLOPS_BATCHES = 8  # batches measured: enough to cover the spread of lengths in a length-bucketed epoch
# what the record's flops_per_token counts (costs.flops_convention)
CONVENTION = ("forward+backward of one training step per target token, token-weighted over up to "
              f"{FLOPS_BATCHES} batches spread over the first epoch; 2 FLOPs per multiply-add; causal "
              "attention counted in full (torch's FLOP counter counts QK^T and AV over every query-key pair, "
              "is_causal and masks ignored); embeddings, norms and elementwise ops not counted")


def sample_batches(batches: list, k: int = FLOPS_BATCHES) -> list:
    """Up to ``k`` batches evenly spaced over ``batches`` (the first and the last included): deterministic,
    and spread over the epoch's lengths rather than one batch's, which may be all short or all long sentences."""
    n = len(batches)
    if n <= k:
        return list(batches)
    return [batches[round(i * (n - 1) / (k - 1))] for i in range(k)]


def train_flops_per_token(model, batches: list) -> float:
    """FLOPs of one forward+backward (matmuls, convs, attention, recurrences) per target token over ``batches``:
    their total FLOPs over their total tokens, the token-weighted mean of each batch's per-token figure,
    which is what the epoch's steps cost on average when ``batches`` are a sample of it."""
    was_training, rng = model.training, torch.get_rng_state()
    model.train()

    def step(batch):
        logits, target = training_logits(model, batch)  # what the trainer's step computes
        loss = F.cross_entropy(logits.float().flatten(0, -2), target.flatten(), ignore_index=batch.ignore_index)
        loss.backward()

    flops = sum(count_flops(lambda: step(batch)) for batch in batches)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    torch.set_rng_state(rng)  # measuring must not change the run's random stream
    return flops / max(1, sum(batch.n_tokens for batch in batches))
