"""The blocks of the Transformer++ recipe: RoPE self-attention, cross-attention, SwiGLU, pre-norm RMSNorm layers.

No linear layer has a bias (as in PaLM and LLaMA). Attention runs through
``torch.nn.functional.scaled_dot_product_attention`` (a fused kernel where the device has one).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from seqbench.models.common import Dropout, attention, check_divisible

from .rope import RotaryEmbedding

FFN_MULTIPLE = 8  # the default SwiGLU hidden size is a multiple of this


def default_d_ff(d_model: int, multiple: int = FFN_MULTIPLE) -> int:
    """SwiGLU hidden size: the multiple of ``multiple`` nearest to 8/3 d_model (at least ``multiple``).

    A SwiGLU layer has three d_model x d_ff matrices against the ReLU FFN's two; a hidden size of 2/3 of the ReLU
    FFN's 4 d_model keeps parameters and FLOPs equal (Shazeer 2020, section 2; LLaMA, section 2). For d_model =
    256: 680 (8/3 * 256 = 682.7).
    """
    return max(multiple, multiple * round(8 * d_model / (3 * multiple)))


def xavier_blocks(weight: torch.Tensor, n_blocks: int) -> None:
    """Xavier-uniform init of each of the ``n_blocks`` row blocks of a fused weight (e.g. q, k, v stacked).

    Each block is one d_in x d_out projection, and gets the bound of one (fan_out = d_out, not n_blocks d_out).
    """
    with torch.no_grad():
        for block in weight.chunk(n_blocks, dim=0):
            nn.init.xavier_uniform_(block)


class SwiGLU(nn.Module):
    """Feed-forward ``W2 (silu(W1 x) * W3 x)`` (Shazeer 2020, eq. 6 "FFN_SwiGLU"); W1 and W3 are one fused matrix."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.d_ff = d_ff
        self.gate_up = nn.Linear(d_model, 2 * d_ff, bias=False)  # rows: W1 (gate), then W3 (up)
        self.down = nn.Linear(d_ff, d_model, bias=False)  # W2
        xavier_blocks(self.gate_up.weight, 2)
        nn.init.xavier_uniform_(self.down.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) -> (..., D)."""
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Heads(nn.Module):
    """What self- and cross-attention share: the head split, the SDPA call and the output projection."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        check_divisible(d_model, n_heads)
        self.h, self.dh, self.dropout = n_heads, d_model // n_heads, dropout
        self.out = nn.Linear(d_model, d_model, bias=False)
        nn.init.xavier_uniform_(self.out.weight)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(B,T,D) -> (B,H,T,dh)."""
        B, T, _ = x.shape
        return x.view(B, T, self.h, self.dh).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
               causal: bool = False) -> torch.Tensor:
        """q (B,H,Tq,dh), k and v (B,H,Tk,dh); mask broadcastable to (B,H,Tq,Tk), True where attending is
        allowed -> (B,Tq,D)."""
        p = self.dropout if self.training else 0.0
        y = attention(q, k, v, mask, p, causal)
        B, H, T, dh = y.shape
        return self.out(y.transpose(1, 2).reshape(B, T, H * dh))


class SelfAttention(Heads):
    """Multi-head self-attention with RoPE on queries and keys (Su et al. 2021, section 3.4)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, rope_base: float):
        super().__init__(d_model, n_heads, dropout)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        xavier_blocks(self.qkv.weight, 3)
        self.rope = RotaryEmbedding(self.dh, rope_base)

    def project(self, x: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B,T,D) at positions offset.. -> q, k rotated to their positions and v, each (B,H,T,dh)."""
        q, k, v = (self.split(t) for t in self.qkv(x).chunk(3, dim=-1))
        return self.rope(q, offset), self.rope(k, offset), v

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """x (B,T,D) at positions 0..T-1; mask (B,1,1,T) True at keys that may be attended (None: all)."""
        return self.attend(*self.project(x), mask, causal)

    def step(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             position: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One new position x (B,1,D) at absolute ``position`` against the cached keys/values (B,H,t,dh).

        Keys are cached already rotated to their own positions, so a cached key never changes; the new query
        attends to all of them and itself (causal by construction). Returns the output (B,1,D) and the caches
        with the new key and value appended.
        """
        q, k, v = self.project(x, position)
        k = torch.cat([k_cache.to(k.dtype), k], dim=2)
        v = torch.cat([v_cache.to(v.dtype), v], dim=2)
        return self.attend(q, k, v), k, v


class CrossAttention(Heads):
    """Multi-head attention from the decoder to the encoder's output, with no RoPE.

    Queries and keys come from two different sequences (target and source positions), so their difference is no
    meaningful relative position; the source positions are already encoded in the encoder's output through its
    RoPE self-attention.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__(d_model, n_heads, dropout)
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        nn.init.xavier_uniform_(self.q.weight)
        xavier_blocks(self.kv.weight, 2)

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory (B,S,D) -> keys and values (B,H,S,dh), computed once per source sentence."""
        k, v = self.kv(memory).chunk(2, dim=-1)
        return self.split(k), self.split(v)

    def forward(self, y: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """y (B,T,D) attends to keys/values (B,H,S,dh); mask (B,1,1,S) True at real source positions."""
        return self.attend(self.split(self.q(y)), k, v, mask)


class PreNorm(nn.Module):
    """Pre-norm residual branch ``x + dropout(fn(RMSNorm(x)))`` (Xiong et al. 2020; as in GPT-2 and LLaMA).

    RMSNorm (Zhang & Sennrich 2019) is ``x / rms(x) * g``: a gain, no bias and no centring.
    """

    def __init__(self, d_model: int, dropout: float, eps: float):
        super().__init__()
        self.norm, self.drop = nn.RMSNorm(d_model, eps=eps), Dropout(dropout)

    def forward(self, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return x + self.drop(fn(self.norm(x)))


class EncoderLayer(nn.Module):
    """Bidirectional RoPE self-attention, then SwiGLU, each a pre-norm residual branch."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, attn_dropout: float,
                 rope_base: float, eps: float):
        super().__init__()
        self.attn = SelfAttention(d_model, n_heads, attn_dropout, rope_base)
        self.ff = SwiGLU(d_model, d_ff)
        self.r1, self.r2 = PreNorm(d_model, dropout, eps), PreNorm(d_model, dropout, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B,S,D); mask (B,1,1,S) True at real (non-padding) source positions."""
        x = self.r1(x, lambda y: self.attn(y, mask=mask))
        return self.r2(x, self.ff)


class DecoderLayer(nn.Module):
    """Causal RoPE self-attention, cross-attention (with ``cross``), SwiGLU; pre-norm residual branches.

    With ``cross=False`` it is the language model's block: ``forward(x)`` maps (B,T,D) -> (B,T,D).
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, attn_dropout: float,
                 rope_base: float, eps: float, cross: bool = True):
        super().__init__()
        self.self_attn = SelfAttention(d_model, n_heads, attn_dropout, rope_base)
        self.cross_attn = CrossAttention(d_model, n_heads, attn_dropout) if cross else None
        self.ff = SwiGLU(d_model, d_ff)
        self.r = nn.ModuleList(PreNorm(d_model, dropout, eps) for _ in range(3 if cross else 2))

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None,
                mem_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B,T,D) at positions 0..T-1; memory (B,S,D) and mem_mask (B,1,1,S) for the cross-attention."""
        x = self.r[0](x, lambda y: self.self_attn(y, causal=True))
        if self.cross_attn is not None:
            k, v = self.cross_attn.project_kv(memory)
            x = self.r[1](x, lambda y: self.cross_attn(y, k, v, mem_mask))
        return self.r[-1](x, self.ff)

    def step(self, x: torch.Tensor, state: dict[str, torch.Tensor], i: int, position: int) -> torch.Tensor:
        """One position x (B,1,D) of layer ``i``; reads and replaces ``state['k{i}']``/``['v{i}']`` (the
        self-attention cache) and reads ``state['src_k{i}']``/``['src_v{i}']``/``['src_mask']``."""
        def self_attn(y: torch.Tensor) -> torch.Tensor:
            out, state[f"k{i}"], state[f"v{i}"] = self.self_attn.step(y, state[f"k{i}"], state[f"v{i}"], position)
            return out

        x = self.r[0](x, self_attn)
        x = self.r[1](x, lambda y: self.cross_attn(y, state[f"src_k{i}"], state[f"src_v{i}"], state["src_mask"]))
        return self.r[2](x, self.ff)
