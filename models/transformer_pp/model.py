"""Transformer++: the Transformer with the recipe of LLaMA-style models (Touvron et al. 2023, section 2.2).

Against :mod:`seqbench.models.transformer` (Vaswani et al. 2017) it changes:

* pre-norm residual branches with RMSNorm (Zhang & Sennrich 2019) and a final RMSNorm on each stack;
* rotary position embeddings on the queries and keys of every self-attention (Su et al. 2021) in place of
  sinusoidal positions added to the embeddings;
* a SwiGLU feed-forward layer (Shazeer 2020) of hidden size ~8/3 d_model (the ReLU FFN's parameters);
* no bias in any linear layer.

Embeddings are the Transformer's (N(0, d^-1/2) scaled by sqrt(d), padding row zero, shared source/target
vocabulary, output projection tied), without positions. Linear weights are Xavier-uniform as in the Transformer,
each fused projection (q/k/v, gate/up) per block.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from seqbench.models.common import LanguageModel, ScaledEmbedding, Seq2Seq, check_divisible, padding_mask

from .layers import DecoderLayer, EncoderLayer, default_d_ff


def problems(hp: Mapping[str, Any]) -> list[str]:
    """Settings of Transformer++ that must fit together (values already of the right type): RoPE rotates pairs of
    head features, so each head's size d_model / n_heads must be even."""
    d_model, n_heads = hp["d_model"], hp["n_heads"]
    if d_model % n_heads or (d_model // n_heads) % 2 == 0:
        return []  # a head count that does not divide d_model is reported by the shared check
    even = [h for h in range(1, min(d_model, 64) + 1) if d_model % h == 0 and (d_model // h) % 2 == 0]
    fix = (f"set model.n_heads to one of {', '.join(map(str, even))}" if even
           else "use an even model.d_model")
    return [f"model.d_model={d_model} with model.n_heads={n_heads} gives heads of {d_model // n_heads} features, "
            f"but rotary position embeddings rotate pairs of features, so the head size must be even; {fix}"]


def check_settings(d_model: int, n_heads: int, d_ff: int | None, rope_base: float, norm_eps: float) -> int:
    """Raise ValueError on settings the model cannot be built with; return the SwiGLU hidden size."""
    check_divisible(d_model, n_heads)
    found = problems({"d_model": d_model, "n_heads": n_heads})
    if d_ff is not None and d_ff < 1:
        found.append(f"d_ff={d_ff} must be a positive integer or None (the multiple of 8 nearest 8/3 d_model)")
    if not (math.isfinite(rope_base) and rope_base > 1):
        found.append(f"rope_base={rope_base} must be a number > 1 (the base of RoPE's wavelengths; 10000 in the paper)")
    if not (math.isfinite(norm_eps) and norm_eps > 0):
        found.append(f"norm_eps={norm_eps} must be a positive number (RMSNorm's epsilon)")
    if found:
        raise ValueError("; ".join(found))
    return default_d_ff(d_model) if d_ff is None else d_ff


class TransformerPPSeq2Seq(Seq2Seq):
    """Encoder-decoder Transformer++.

    Encoder: bidirectional RoPE self-attention (no causal mask; padding keys masked), positions 0..S-1 of the
    source. Decoder: causal RoPE self-attention over target positions 0..T-1, then cross-attention to the encoder
    output without RoPE (the two sequences' positions do not share an origin; the encoder has already put the
    source positions into its output), then SwiGLU.

    Incremental decoding: ``encode`` returns ``src_mask`` (B,1,1,S), the cross-attention keys/values
    ``src_k{i}``/``src_v{i}`` (B,H,S,dh) and empty self-attention caches ``k{i}``/``v{i}`` (B,H,0,dh);
    ``decode_step(prev, state, step)`` rotates the new query and key to the absolute position ``step``, appends
    the key and value to the caches (keys are cached rotated, so no cached entry ever changes) and attends.
    """

    def __init__(self, src_vocab: int, tgt_vocab: int, pad_id: int, *, d_model: int = 512, n_layers: int = 6,
                 n_decoder_layers: int | None = None, n_heads: int = 8, d_ff: int | None = None,
                 dropout: float = 0.1, attn_dropout: float = 0.0, share_embeddings: bool = True,
                 tie_output: bool = True, rope_base: float = 10000.0, norm_eps: float = 1e-6):
        super().__init__()
        d_ff = check_settings(d_model, n_heads, d_ff, rope_base, norm_eps)
        args = (d_model, n_heads, d_ff, dropout, attn_dropout, rope_base, norm_eps)
        self.pad_id = pad_id
        self.src_embed = ScaledEmbedding(src_vocab, d_model, dropout, pad_id, positions=False)
        share = share_embeddings and src_vocab == tgt_vocab
        self.tgt_embed = self.src_embed if share else ScaledEmbedding(tgt_vocab, d_model, dropout, pad_id,
                                                                      positions=False)
        self.encoder = nn.ModuleList(EncoderLayer(*args) for _ in range(n_layers))
        self.decoder = nn.ModuleList(DecoderLayer(*args) for _ in range(n_decoder_layers or n_layers))
        self.enc_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.dec_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.proj = nn.Linear(d_model, tgt_vocab, bias=False)
        if tie_output:
            self.proj.weight = self.tgt_embed.tok.weight
        else:
            nn.init.normal_(self.proj.weight, std=d_model**-0.5)

    def run_encoder(self, src: torch.Tensor, src_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src (B,S), src_lengths (B,) -> memory (B,S,D) and mask (B,1,1,S), True at real source positions."""
        mask = ~padding_mask(src_lengths, src.size(1))[:, None, None, :]
        x = self.src_embed(src)
        for layer in self.encoder:
            x = layer(x, mask)
        return self.enc_norm(x), mask

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """src (B,S), src_lengths (B,), tgt_in (B,T) -> logits (B,T,V)."""
        memory, mask = self.run_encoder(src, src_lengths)
        y = self.tgt_embed(tgt_in)
        for layer in self.decoder:
            y = layer(y, memory, mask)
        return self.proj(self.dec_norm(y))

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        memory, mask = self.run_encoder(src, src_lengths)
        state = {"src_mask": mask}
        attn = self.decoder[0].self_attn
        empty = memory.new_zeros(src.size(0), attn.h, 0, attn.dh)
        for i, layer in enumerate(self.decoder):
            state[f"src_k{i}"], state[f"src_v{i}"] = layer.cross_attn.project_kv(memory)
            state[f"k{i}"], state[f"v{i}"] = empty, empty
        return state

    def decode_step(self, prev: torch.Tensor, state: dict[str, torch.Tensor],
                    step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """prev (B,) tokens at position ``step`` -> logits (B,V) for that position, and the new state."""
        y = self.tgt_embed(prev[:, None])  # (B,1,D): no position added; RoPE places it at ``step``
        state = dict(state)
        for i, layer in enumerate(self.decoder):
            y = layer.step(y, state, i, step)
        return self.proj(self.dec_norm(y))[:, 0], state


class TransformerPPLM(LanguageModel):
    """Decoder-only Transformer++ (the LLaMA architecture): causal RoPE self-attention and SwiGLU blocks."""

    def __init__(self, vocab: int, *, d_model: int = 512, n_layers: int = 6, n_decoder_layers: int | None = None,
                 n_heads: int = 8, d_ff: int | None = None, dropout: float = 0.1, attn_dropout: float = 0.0,
                 share_embeddings: bool = True, tie_output: bool = True, rope_base: float = 10000.0,
                 norm_eps: float = 1e-6):
        super().__init__()
        d_ff = check_settings(d_model, n_heads, d_ff, rope_base, norm_eps)
        args = (d_model, n_heads, d_ff, dropout, attn_dropout, rope_base, norm_eps)
        self.tok_embed = ScaledEmbedding(vocab, d_model, dropout, None, positions=False)
        self.blocks = nn.ModuleList(DecoderLayer(*args, cross=False) for _ in range(n_decoder_layers or n_layers))
        self.norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.proj = nn.Linear(d_model, vocab, bias=False)
        if tie_output:
            self.proj.weight = self.tok_embed.tok.weight
        else:
            nn.init.normal_(self.proj.weight, std=d_model**-0.5)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,T) -> (B,T,D); positions enter only through RoPE inside the blocks."""
        return self.tok_embed(tokens)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))

    def mixing_blocks(self) -> list[nn.Module]:
        return list(self.blocks)
