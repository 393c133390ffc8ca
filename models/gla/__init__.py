"""Gated linear attention (Yang et al. 2024, "Gated Linear Attention Transformers with Hardware-Efficient Training",
arXiv:2312.06635): the GLA Transformer as a language model and an encoder-decoder.

* :mod:`.recurrence`: the recurrence in pure PyTorch, the reference loop and the chunkwise-parallel form;
* :mod:`.kernels`: flash-linear-attention's CUDA kernels, used on CUDA when installed;
* :mod:`.layer`: the GLA token mixer, SwiGLU, cross-attention and the pre-norm layer;
* :mod:`.model`: :class:`GLASeq2Seq` and :class:`GLALM`.

Hyperparameters of its own: ``expand_k`` (key dimension d_model * expand_k, 0.5), ``expand_v`` (value dimension
d_model * expand_v, 1.0), ``gate_rank`` (rank of the forget gate's projection, 16), ``gate_temperature`` (tau of
alpha = sigmoid(.) ** (1/tau), 16), ``chunk_size`` (positions per chunk of the chunkwise form, 64). ``d_ff`` may
be null: the multiple of 8 nearest to 8/3 d_model.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from seqbench.models.registry import Architecture

from .layer import dimension_problems
from .model import GLALM, GLASeq2Seq


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_number(v: Any) -> bool:
    return (_integer(v) or isinstance(v, float)) and math.isfinite(v) and v > 0


def check(hp: Mapping[str, Any]) -> list[str]:
    """Key and value dimensions must split evenly between the heads."""
    return dimension_problems(hp["d_model"], hp["n_heads"], hp["expand_k"], hp["expand_v"])


ARCHITECTURE = Architecture(
    name="gla",
    seq2seq=GLASeq2Seq,
    lm=GLALM,
    settings={
        "expand_k": (_positive_number, "a positive number (key dimension d_model * expand_k; 0.5 in the paper)"),
        "expand_v": (_positive_number, "a positive number (value dimension d_model * expand_v; 1 in the paper)"),
        "gate_rank": (lambda v: _integer(v) and v >= 1, "a positive integer (rank of the forget gate's projection)"),
        "gate_temperature": (_positive_number, "a positive number (tau of sigmoid(.) ** (1/tau); 16 in the paper)"),
        "chunk_size": (lambda v: _integer(v) and v >= 1, "a positive integer (positions per chunk; 64 usual)"),
        "d_ff": (lambda v: v is None or (_integer(v) and v >= 1),
                 "a positive integer or null (the multiple of 8 nearest to 8/3 d_model)"),
    },
    lm_ignores=("share_embeddings", "attn_dropout"),
    check=check,
    description="Yang et al. 2024",
)
