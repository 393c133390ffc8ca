"""Transformer (Vaswani et al., 2017, "Attention Is All You Need", arXiv:1706.03762).

Post-norm residual blocks as in the paper (``pre_norm=True`` selects pre-norm),
sinusoidal positions, embeddings scaled by sqrt(d_model), shared source/target
embeddings and pre-softmax projection, attention through
``torch.nn.functional.scaled_dot_product_attention`` (``models.common.attention`` picks its CPU kernel).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from .common import Dropout, LanguageModel, ScaledEmbedding, Seq2Seq, attention, check_divisible, padding_mask


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention (section 3.2.2)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, cross: bool = False):
        super().__init__()
        check_divisible(d_model, n_heads)
        self.h, self.dh, self.dropout = n_heads, d_model // n_heads, dropout
        self.cross = cross
        if cross:
            self.q = nn.Linear(d_model, d_model)
            self.kv = nn.Linear(d_model, 2 * d_model)
        else:
            self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.h, self.dh).transpose(1, 2)  # (B,H,T,dh)

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(memory).chunk(2, dim=-1)
        return self.split(k), self.split(v)

    def attend(self, q, k, v, mask=None, causal=False) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        y = attention(q, k, v, mask, p, causal)
        B, H, T, dh = y.shape
        return self.out(y.transpose(1, 2).reshape(B, T, H * dh))  # (B,T,D)

    def forward(self, x, mask=None, causal=False):
        """Self-attention over x (B,T,D); mask (B,1,1,T) True where attending is allowed."""
        q, k, v = (self.split(t) for t in self.qkv(x).chunk(3, dim=-1))
        return self.attend(q, k, v, mask, causal)

    def attend_to(self, y, k, v, mask=None):
        """Cross-attention: queries from y (B,T,D) to precomputed keys/values (B,H,S,dh) (:meth:`project_kv`),
        where mask (B,1,1,S) is True."""
        return self.attend(self.split(self.q(y)), k, v, mask)

    def step(self, x, k_cache, v_cache):
        """One new position x (B,1,D) against cached keys/values (B,H,t,dh)."""
        q, k, v = (self.split(t) for t in self.qkv(x).chunk(3, dim=-1))
        # the cache in the projection's dtype (bf16 under autocast): an fp32 start would double it at every step
        k, v = torch.cat([k_cache.to(k.dtype), k], dim=2), torch.cat([v_cache.to(v.dtype), v], dim=2)
        return self.attend(q, k, v), k, v


class FeedForward(nn.Module):
    """Position-wise FFN (section 3.3); ``dropout`` acts on the hidden ReLU (0 in the paper)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model), Dropout(dropout)

    def forward(self, x):
        return self.fc2(self.drop(F.relu(self.fc1(x))))


class Residual(nn.Module):
    """Residual connection with layer norm, post-norm (paper) or pre-norm."""

    def __init__(self, d_model: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.norm, self.drop, self.pre_norm = nn.LayerNorm(d_model), Dropout(dropout), pre_norm

    def forward(self, x, fn):
        if self.pre_norm:
            return x + self.drop(fn(self.norm(x)))
        return self.norm(x + self.drop(fn(x)))


class EncoderLayer(nn.Module):
    def __init__(self, d_model, n_heads, d_ff, dropout, attn_dropout, act_dropout, pre_norm):
        super().__init__()
        self.attn = MultiHeadAttention(d_model, n_heads, attn_dropout)
        self.ff = FeedForward(d_model, d_ff, act_dropout)
        self.r1, self.r2 = Residual(d_model, dropout, pre_norm), Residual(d_model, dropout, pre_norm)

    def forward(self, x, mask=None):
        """x (B,S,D); mask (B,1,1,S), True where a key may be attended (None: all)."""
        x = self.r1(x, lambda y: self.attn(y, mask=mask))
        return self.r2(x, self.ff)


def window_mask(T: int, window: int, device=None) -> torch.Tensor:
    """(T,T) bool, True where query i may attend key j: j in [i - window, i] (restricted self-attention)."""
    offset = torch.arange(T, device=device)[:, None] - torch.arange(T, device=device)[None, :]  # i - j
    return (offset >= 0) & (offset <= window)


class CausalLayer(nn.Module):
    """Decoder layer; with ``cross=False`` it is the language-model block.

    ``window=r`` restricts self-attention to the r previous positions (and the own one), the
    restricted self-attention of section 4 of the paper; None attends to the whole prefix.
    """

    def __init__(self, d_model, n_heads, d_ff, dropout, attn_dropout, act_dropout, pre_norm, cross=True,
                 window: int | None = None):
        super().__init__()
        self.window = window
        self.self_attn = MultiHeadAttention(d_model, n_heads, attn_dropout)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, attn_dropout, cross=True) if cross else None
        self.ff = FeedForward(d_model, d_ff, act_dropout)
        self.r = nn.ModuleList(Residual(d_model, dropout, pre_norm) for _ in range(3 if cross else 2))

    def cross(self, y, k, v, mask):
        return self.cross_attn.attend_to(y, k, v, mask)

    def causal_self_attn(self, y):
        if self.window is None:
            return self.self_attn(y, causal=True)
        return self.self_attn(y, mask=window_mask(y.size(1), self.window, y.device))

    def forward(self, x, memory=None, mem_mask=None):
        x = self.r[0](x, self.causal_self_attn)
        if self.cross_attn is not None:
            k, v = self.cross_attn.project_kv(memory)
            x = self.r[1](x, lambda y: self.cross(y, k, v, mem_mask))
        return self.r[-1](x, self.ff)


def init_linear(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


class TransformerSeq2Seq(Seq2Seq):
    """Encoder-decoder Transformer."""

    def __init__(self, src_vocab: int, tgt_vocab: int, pad_id: int, *, d_model: int = 512, n_layers: int = 6,
                 n_decoder_layers: int | None = None, n_heads: int = 8, d_ff: int = 2048, dropout: float = 0.1,
                 attn_dropout: float = 0.0, act_dropout: float = 0.0, pre_norm: bool = False,
                 share_embeddings: bool = True, tie_output: bool = True):
        super().__init__()
        args = (d_model, n_heads, d_ff, dropout, attn_dropout, act_dropout, pre_norm)
        self.pad_id = pad_id
        self.src_embed = ScaledEmbedding(src_vocab, d_model, dropout, pad_id)
        share = share_embeddings and src_vocab == tgt_vocab
        self.tgt_embed = self.src_embed if share else ScaledEmbedding(tgt_vocab, d_model, dropout, pad_id)
        self.encoder = nn.ModuleList(EncoderLayer(*args) for _ in range(n_layers))
        self.decoder = nn.ModuleList(CausalLayer(*args) for _ in range(n_decoder_layers or n_layers))
        self.enc_norm = nn.LayerNorm(d_model) if pre_norm else nn.Identity()
        self.dec_norm = nn.LayerNorm(d_model) if pre_norm else nn.Identity()
        self.proj = nn.Linear(d_model, tgt_vocab, bias=False)
        init_linear(self.encoder), init_linear(self.decoder)
        if tie_output:
            self.proj.weight = self.tgt_embed.tok.weight
        else:
            nn.init.normal_(self.proj.weight, std=d_model**-0.5)

    def run_encoder(self, src, src_lengths):
        mask = ~padding_mask(src_lengths, src.size(1))[:, None, None, :]  # (B,1,1,S) True = attend
        x = self.src_embed(src)
        for layer in self.encoder:
            x = layer(x, mask)
        return self.enc_norm(x), mask

    def forward(self, src, src_lengths, tgt_in):
        """src (B,S), src_lengths (B,), tgt_in (B,T) -> logits (B,T,V)."""
        memory, mask = self.run_encoder(src, src_lengths)
        y = self.tgt_embed(tgt_in)
        for layer in self.decoder:
            y = layer(y, memory, mask)
        return self.proj(self.dec_norm(y))

    def encode(self, src, src_lengths):
        memory, mask = self.run_encoder(src, src_lengths)
        state = {"src_mask": mask}
        B, H = src.size(0), self.decoder[0].self_attn.h
        empty = memory.new_zeros(B, H, 0, self.decoder[0].self_attn.dh)
        for i, layer in enumerate(self.decoder):
            state[f"src_k{i}"], state[f"src_v{i}"] = layer.cross_attn.project_kv(memory)
            state[f"k{i}"], state[f"v{i}"] = empty, empty
        return state

    def decode_step(self, prev, state, step):
        """prev (B,) tokens at position ``step`` -> logits (B,V) for that position."""
        y = self.tgt_embed(prev[:, None], offset=step)  # (B,1,D)
        state = dict(state)
        for i, layer in enumerate(self.decoder):
            def self_attn(z, i=i, layer=layer):
                out, state[f"k{i}"], state[f"v{i}"] = layer.self_attn.step(z, state[f"k{i}"], state[f"v{i}"])
                return out
            y = layer.r[0](y, self_attn)
            y = layer.r[1](y, lambda z: layer.cross(z, state[f"src_k{i}"], state[f"src_v{i}"], state["src_mask"]))
            y = layer.r[2](y, layer.ff)
        return self.proj(self.dec_norm(y))[:, 0], state


class TransformerLM(LanguageModel):
    """Decoder-only Transformer language model; ``attn_window=r`` gives restricted self-attention."""

    def __init__(self, vocab: int, *, d_model: int = 512, n_layers: int = 6, n_decoder_layers: int | None = None,
                 n_heads: int = 8, d_ff: int = 2048, dropout: float = 0.1, attn_dropout: float = 0.0,
                 act_dropout: float = 0.0, pre_norm: bool = False, share_embeddings: bool = True,
                 tie_output: bool = True, attn_window: int | None = None):
        super().__init__()
        if attn_window is not None and attn_window < 1:
            raise ValueError(f"attn_window must be a positive number of previous positions or None; got {attn_window}")
        args = (d_model, n_heads, d_ff, dropout, attn_dropout, act_dropout, pre_norm)
        self.tok_embed = ScaledEmbedding(vocab, d_model, dropout, None)
        self.blocks = nn.ModuleList(CausalLayer(*args, cross=False, window=attn_window)
                                    for _ in range(n_decoder_layers or n_layers))
        self.norm = nn.LayerNorm(d_model) if pre_norm else nn.Identity()
        self.proj = nn.Linear(d_model, vocab, bias=False)
        init_linear(self.blocks)
        if tie_output:
            self.proj.weight = self.tok_embed.tok.weight
        else:  # as the encoder-decoder's untied projection
            nn.init.normal_(self.proj.weight, std=d_model**-0.5)

    def embed(self, tokens):
        return self.tok_embed(tokens)

    def head(self, x):
        return self.proj(self.norm(x))

    def mixing_blocks(self):
        return list(self.blocks)
