"""Transformer++ (``transformer_pp``): the Transformer with the LLaMA-style recipe (pre-norm RMSNorm, RoPE, SwiGLU,
no biases); see :mod:`.model`. The fast attention is :mod:`.layers` (SDPA), its plain counterpart :mod:`.reference`.
"""
from __future__ import annotations

import math
from typing import Any

from seqbench.models.registry import Architecture

from .model import TransformerPPLM, TransformerPPSeq2Seq, problems


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


ARCHITECTURE = Architecture(
    name="transformer_pp",
    seq2seq=TransformerPPSeq2Seq,
    lm=TransformerPPLM,
    settings={
        "d_ff": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
                 "a positive integer or null (SwiGLU's hidden size; null: the multiple of 8 nearest 8/3 d_model)"),
        "rope_base": (lambda v: _number(v) and v > 1,
                      "a number > 1 (the base of the rotary embeddings' wavelengths; 10000 in Su et al. 2021)"),
        "norm_eps": (lambda v: _number(v) and v > 0, "a positive number (RMSNorm's epsilon)"),
    },
    lm_ignores=("share_embeddings",),
    check=problems,
    description="Transformer++: pre-norm RMSNorm, RoPE, SwiGLU, no biases (Touvron et al. 2023; Su et al. 2021; "
                "Shazeer 2020)",
)
