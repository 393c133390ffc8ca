"""Plain float64 counterparts of Transformer++'s fast computations, written for reading, not speed.

RoPE builds the d x d rotation matrix ``R_m`` of each position m (a block diagonal of 2 x 2 rotations by
``m * theta_i``, Su et al. 2021, eq. 15) and multiplies, one position at a time; attention is an explicit
softmax of ``q k^T / sqrt(dh)`` with the masked scores set to -inf. :func:`lm_reference` runs a whole language
model on these. Everything runs in float64 on the modules' own weights, so the fast float32 forms can be held to
it within float32 rounding.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .layers import SelfAttention, SwiGLU
from .model import TransformerPPLM


def rotation_matrix(position: int, dim: int, base: float) -> torch.Tensor:
    """R_m (dim, dim) float64: pair (2i, 2i+1) rotated by ``position * base^(-2i/dim)``."""
    R = torch.zeros(dim, dim, dtype=torch.float64)
    for i in range(dim // 2):
        angle = position * base ** (-2 * i / dim)
        c, s = math.cos(angle), math.sin(angle)
        R[2 * i, 2 * i], R[2 * i, 2 * i + 1] = c, -s
        R[2 * i + 1, 2 * i], R[2 * i + 1, 2 * i + 1] = s, c
    return R


def rope_reference(x: torch.Tensor, base: float, offset: int = 0) -> torch.Tensor:
    """x (..., T, dim) -> each position t rotated by R_{offset+t}, float64."""
    x = x.double()
    out = torch.empty_like(x)
    for t in range(x.size(-2)):
        out[..., t, :] = x[..., t, :] @ rotation_matrix(offset + t, x.size(-1), base).T
    return out


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        allowed: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(dh)) v with the scores of disallowed pairs at -inf.

    q (B,H,Tq,dh), k and v (B,H,Tk,dh); allowed broadcastable to (B,H,Tq,Tk), True where attending is allowed.
    """
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def self_attention_reference(attn: SelfAttention, x: torch.Tensor, *, offset: int = 0,
                             allowed: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """The output (B,T,D) of ``attn`` for x (B,T,D) at positions offset.., in float64 on its weights.

    allowed: (B,1,1,T) True at keys that may be attended; causal: each position attends to itself and earlier.
    """
    B, T, D = x.shape
    x = x.double()
    wq, wk, wv = attn.qkv.weight.double().chunk(3, dim=0)
    q, k, v = ((x @ w.T).view(B, T, attn.h, attn.dh).transpose(1, 2) for w in (wq, wk, wv))
    q, k = rope_reference(q, attn.rope.base, offset), rope_reference(k, attn.rope.base, offset)
    if causal:
        lower = torch.ones(T, T, dtype=torch.bool).tril()
        allowed = lower if allowed is None else allowed & lower
    y = attention_reference(q, k, v, allowed)  # (B,H,T,dh)
    return y.transpose(1, 2).reshape(B, T, D) @ attn.out.weight.double().T


def rms_norm_reference(norm: torch.nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * g, float64."""
    x = x.double()
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.double()


def swiglu_reference(ff: SwiGLU, x: torch.Tensor) -> torch.Tensor:
    """W2 (silu(W1 x) * W3 x), float64."""
    w1, w3 = ff.gate_up.weight.double().chunk(2, dim=0)
    x = x.double()
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ ff.down.weight.double().T


def lm_reference(model: TransformerPPLM, tokens: torch.Tensor) -> torch.Tensor:
    """Logits (B,T,V) of a language model in eval mode, every block through the reference functions."""
    x = model.tok_embed.tok.weight.double()[tokens] * math.sqrt(model.tok_embed.tok.embedding_dim)
    for block in model.blocks:
        attn_norm, ff_norm = (r.norm for r in block.r)
        x = x + self_attention_reference(block.self_attn, rms_norm_reference(attn_norm, x), causal=True)
        x = x + swiglu_reference(block.ff, rms_norm_reference(ff_norm, x))
    return rms_norm_reference(model.norm, x) @ model.proj.weight.double().T
