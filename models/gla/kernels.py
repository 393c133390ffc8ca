"""The CUDA kernels of flash-linear-attention (``fla``, the GLA authors' library), used when installed.

``pip install seqbench[kernels]`` brings them. They run GLA on CUDA tensors: ``chunk_gla`` (the chunkwise form, for
training and full sequences) and ``fused_recurrent_gla`` (one decoding step). Without them, or on any other device,
the pure-PyTorch forms of :mod:`.recurrence` run instead; the two agree (tests/test_gla.py, on a GPU).

Both kernels take the layout of :mod:`.recurrence` (B,T,H,d) and the same log-gates; the queries arrive already
scaled (``scale=1``). Releases of fla before the batch-first layout became their only one take ``head_first``
(default True there): it is passed as False where the signature has it.
"""
from __future__ import annotations

import inspect
import logging

import torch

log = logging.getLogger("seqbench")

try:
    from fla.ops.gla import chunk_gla as _chunk_gla, fused_recurrent_gla as _fused_recurrent_gla
except Exception as err:  # noqa: BLE001 (not installed, or built for another torch/triton: pure PyTorch then)
    _chunk_gla = _fused_recurrent_gla = None
    log.debug("flash-linear-attention is not usable (%s: %s); GLA runs in pure PyTorch", type(err).__name__, err)


def available(x: torch.Tensor) -> bool:
    """Whether the fla kernels can run on ``x``: installed, and ``x`` on a CUDA device."""
    return _chunk_gla is not None and x.is_cuda


def _batch_first(fn) -> dict[str, bool]:
    return {"head_first": False} if "head_first" in inspect.signature(fn).parameters else {}


def chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
          initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fla's ``chunk_gla``: as :func:`.recurrence.chunkwise_gla` -> o (B,T,H,d_v), final state (B,H,d_k,d_v)."""
    return _chunk_gla(q, k, v, log_alpha, scale=1.0, initial_state=initial_state, output_final_state=True,
                      **_batch_first(_chunk_gla))


def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
         state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fla's ``fused_recurrent_gla`` over (B,T,H,d) inputs from ``state`` -> o (B,T,H,d_v), new state."""
    return _fused_recurrent_gla(q, k, v, gk=log_alpha, scale=1.0, initial_state=state, output_final_state=True,
                                **_batch_first(_fused_recurrent_gla))
