"""minGRU (Feng et al. 2024, "Were RNNs All We Needed?", section 3.1) in seqbench's two model forms.

    z_t = sigmoid(W_z x_t),  h~_t = W_h x_t,  h_t = (1 - z_t) * h_{t-1} + z_t * h~_t

The gates depend on the input only, so training runs the recurrence as a scan (here: a loop over time, which
is plenty for the example's sizes); decoding carries h, one vector per layer. Each layer is pre-norm and
residual. The encoder-decoder form: a minGRU encoder over the source (left to right), and a decoder whose
layers are a minGRU followed by cross-attention to the encoder's output.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from seqbench.models.common import LanguageModel, Seq2Seq, padding_mask
from seqbench.models.registry import Architecture


class MinGRU(nn.Module):
    """One minGRU layer: (B,T,D) -> (B,T,D); ``h0`` (B,D) the state before the first step."""

    def __init__(self, d_model: int):
        super().__init__()
        self.gate, self.cand = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
        z, cand = torch.sigmoid(self.gate(x)), self.cand(x)
        h = torch.zeros_like(x[:, 0]) if h0 is None else h0
        out = []
        for t in range(x.size(1)):
            h = (1 - z[:, t]) * h + z[:, t] * cand[:, t]
            out.append(h)
        return torch.stack(out, dim=1)


class Block(nn.Module):
    """x + dropout(minGRU(norm(x))): one position-mixing block."""

    def __init__(self, d_model: int, dropout: float):
        super().__init__()
        self.norm, self.mix, self.drop = nn.LayerNorm(d_model), MinGRU(d_model), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.drop(self.mix(self.norm(x), h0))

    def states(self, x: torch.Tensor, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the block's output, the minGRU's last hidden state (B,D))."""
        h = self.mix(self.norm(x), h0)
        return x + self.drop(h), h[:, -1]


class CrossAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.norm, self.q, self.kv = nn.LayerNorm(d_model), nn.Linear(d_model, d_model), nn.Linear(d_model, 2 * d_model)
        self.out, self.drop = nn.Linear(d_model, d_model), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x (B,T,D), memory (B,S,D), keep (B,1,1,S) True at real source tokens."""
        B, T, D = x.shape
        q = self.q(self.norm(x)).view(B, T, self.n_heads, -1).transpose(1, 2)
        k, v = self.kv(memory).view(B, memory.size(1), 2, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return x + self.drop(self.out(y.transpose(1, 2).reshape(B, T, D)))


class Embedding(nn.Module):
    def __init__(self, vocab: int, d_model: int, dropout: float, pad_id: int | None):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model, padding_idx=pad_id)
        nn.init.normal_(self.tok.weight, std=d_model**-0.5)
        if pad_id is not None:
            nn.init.zeros_(self.tok.weight[pad_id])
        self.scale, self.drop = math.sqrt(d_model), nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.drop(self.tok(tokens) * self.scale)


class MinGRUSeq2Seq(Seq2Seq):
    """minGRU encoder, minGRU + cross-attention decoder; source and target embeddings and the output tied."""

    def __init__(self, src_vocab: int, tgt_vocab: int, pad_id: int, *, d_model: int = 256, n_layers: int = 3,
                 n_heads: int = 4, dropout: float = 0.1):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}; choose n_heads dividing it")
        self.pad_id = pad_id
        self.embed = Embedding(max(src_vocab, tgt_vocab), d_model, dropout, pad_id)
        self.encoder = nn.ModuleList(Block(d_model, dropout) for _ in range(n_layers))
        self.decoder = nn.ModuleList(Block(d_model, dropout) for _ in range(n_layers))
        self.cross = nn.ModuleList(CrossAttention(d_model, n_heads, dropout) for _ in range(n_layers))
        self.enc_norm, self.dec_norm = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.proj = nn.Linear(d_model, tgt_vocab, bias=False)
        self.proj.weight = self.embed.tok.weight if src_vocab == tgt_vocab else self.proj.weight

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.embed(src)
        for block in self.encoder:  # left to right: a real token never sees the padding after it
            x = block(x)
        keep = ~padding_mask(src_lengths, src.size(1))[:, None, None, :]
        state = {"src_memory": self.enc_norm(x), "src_keep": keep}
        for i in range(len(self.decoder)):
            state[f"h{i}"] = x.new_zeros(x.size(0), x.size(-1))
        return state

    def _decode(self, y: torch.Tensor, state: dict[str, torch.Tensor]):
        new = dict(state)
        for i, (block, cross) in enumerate(zip(self.decoder, self.cross)):
            y, new[f"h{i}"] = block.states(y, state[f"h{i}"])
            y = cross(y, state["src_memory"], state["src_keep"])
        return self.proj(self.dec_norm(y)), new

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        return self._decode(self.embed(tgt_in), self.encode(src, src_lengths))[0]

    def decode_step(self, prev: torch.Tensor, state: dict[str, torch.Tensor], step: int):
        logits, state = self._decode(self.embed(prev[:, None]), state)
        return logits[:, 0], state


class MinGRULM(LanguageModel):
    """A stack of minGRU blocks; output tied to the embedding."""

    def __init__(self, vocab: int, *, d_model: int = 256, n_layers: int = 3, n_heads: int = 4,
                 dropout: float = 0.1):
        super().__init__()
        self.tok_embed = Embedding(vocab, d_model, dropout, None)
        self.blocks = nn.ModuleList(Block(d_model, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.proj = nn.Linear(d_model, vocab, bias=False)
        self.proj.weight = self.tok_embed.tok.weight

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok_embed(tokens)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))

    def mixing_blocks(self) -> list[nn.Module]:
        return list(self.blocks)


ARCHITECTURE = Architecture(
    name="mingru", seq2seq=MinGRUSeq2Seq, lm=MinGRULM, description="Feng et al. 2024",
    lm_ignores=("n_heads",),  # the cross-attention's heads: the language model has none
    presets=Path(__file__).parent / "conf" / "model",
)
