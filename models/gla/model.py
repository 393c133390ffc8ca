"""The GLA Transformer (Yang et al. 2024, arXiv:2312.06635, section 4) as a language model and an encoder-decoder.

Embeddings as the Transformer's (N(0, d^-1/2) scaled by sqrt(d), PAD row zero, source and target shared, output
tied) but without positions: the gated recurrence orders the tokens itself. RMSNorm before every sub-layer and
before the output projection.
"""
from __future__ import annotations

import torch
from torch import nn

from seqbench.models.common import LanguageModel, ScaledEmbedding, Seq2Seq, padding_mask

from .layer import NORM_EPS, GLALayer, swiglu_hidden


def mixer_settings(expand_k: float, expand_v: float, gate_rank: int, gate_temperature: float,
                   chunk_size: int) -> dict:
    """The GLA mixer's own hyperparameters, checked, as keyword arguments of :class:`GatedLinearAttention`."""
    for name, value in (("gate_rank", gate_rank), ("chunk_size", chunk_size)):
        if value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value}")
    for name, value in (("expand_k", expand_k), ("expand_v", expand_v), ("gate_temperature", gate_temperature)):
        if not value > 0:
            raise ValueError(f"{name} must be a positive number; got {value}")
    return dict(expand_k=expand_k, expand_v=expand_v, gate_rank=gate_rank, gate_temperature=gate_temperature,
                chunk_size=chunk_size)


def untied_projection(proj: nn.Linear, d_model: int) -> None:
    """An untied output projection draws from N(0, d^-1/2), as the Transformer's."""
    nn.init.normal_(proj.weight, std=d_model**-0.5)


class GLASeq2Seq(Seq2Seq):
    """Encoder-decoder of GLA layers.

    Encoder: ``n_layers`` bidirectional GLA layers. Each mixer scans the source left to right and right to left, the
    backward scan with its own query/key/value/gate projections over each sentence reversed within its length; the
    two outputs are added before the shared per-head norm, output gate and output projection (the paper's GLA is
    causal; two scans, as a bidirectional RNN, let every source position see the whole sentence). Padding never
    reaches a sentence position: the forward scan meets it only after the sentence, and the reversal keeps it after
    the sentence for the backward scan. Then a SwiGLU feed-forward; pre-norm RMSNorm throughout, a final RMSNorm.

    Decoder: ``n_decoder_layers`` (default ``n_layers``) causal GLA layers, each with cross-attention to the
    encoder's output (SDPA, ``n_heads`` heads, ``attn_dropout``; padding masked) between the mixer and the
    feed-forward. Incremental decoding carries one GLA state per layer, ``S<i>`` (B, H, d_k/H, d_v/H), in fp32,
    whose size does not grow with the output; ``src_k<i>``/``src_v<i>`` (the cross-attention's keys and values)
    and ``src_mask`` are the per-sentence source memory.

    ``d_ff`` null: the multiple of 8 nearest to 8/3 d_model (680 for d_model = 256).
    """

    def __init__(self, src_vocab: int, tgt_vocab: int, pad_id: int, *, d_model: int = 512, n_layers: int = 6,
                 n_decoder_layers: int | None = None, n_heads: int = 4, d_ff: int | None = None,
                 dropout: float = 0.1, attn_dropout: float = 0.0, expand_k: float = 0.5, expand_v: float = 1.0,
                 gate_rank: int = 16, gate_temperature: float = 16.0, chunk_size: int = 64,
                 share_embeddings: bool = True, tie_output: bool = True):
        super().__init__()
        mixer = mixer_settings(expand_k, expand_v, gate_rank, gate_temperature, chunk_size)
        args = (d_model, n_heads, swiglu_hidden(d_model, d_ff), dropout, attn_dropout, mixer)
        self.src_embed = ScaledEmbedding(src_vocab, d_model, dropout, pad_id, positions=False)
        share = share_embeddings and src_vocab == tgt_vocab
        self.tgt_embed = self.src_embed if share else ScaledEmbedding(tgt_vocab, d_model, dropout, pad_id,
                                                                      positions=False)
        self.encoder = nn.ModuleList(GLALayer(*args, bidirectional=True) for _ in range(n_layers))
        self.decoder = nn.ModuleList(GLALayer(*args, cross=True) for _ in range(n_decoder_layers or n_layers))
        self.enc_norm = nn.RMSNorm(d_model, eps=NORM_EPS)
        self.dec_norm = nn.RMSNorm(d_model, eps=NORM_EPS)
        self.proj = nn.Linear(d_model, tgt_vocab, bias=False)
        if tie_output:
            self.proj.weight = self.tgt_embed.tok.weight
        else:
            untied_projection(self.proj, d_model)

    def run_encoder(self, src: torch.Tensor, src_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src (B,S), src_lengths (B,) -> memory (B,S,D), mask (B,1,1,S) True where a position may be attended."""
        mask = ~padding_mask(src_lengths, src.size(1))[:, None, None, :]
        x = self.src_embed(src)
        for layer in self.encoder:
            x = layer(x, src_lengths)
        return self.enc_norm(x), mask

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """src (B,S), src_lengths (B,), tgt_in (B,T) -> logits (B,T,V)."""
        memory, mask = self.run_encoder(src, src_lengths)
        y = self.tgt_embed(tgt_in)
        for layer in self.decoder:
            y = layer(y, memory=layer.cross.project_kv(memory), mask=mask)
        return self.proj(self.dec_norm(y))

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        memory, mask = self.run_encoder(src, src_lengths)
        state = {"src_mask": mask}
        dtype = torch.promote_types(memory.dtype, torch.float32)  # the recurrence's (layer.compute_dtype)
        for i, layer in enumerate(self.decoder):
            state[f"src_k{i}"], state[f"src_v{i}"] = layer.cross.project_kv(memory)
            state[f"S{i}"] = memory.new_zeros(src.size(0), *layer.mixer.state_shape(), dtype=dtype)
        return state

    def decode_step(self, prev: torch.Tensor, state: dict[str, torch.Tensor],
                    step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """prev (B,) tokens at position ``step`` -> logits (B,V) for that position, the state after it."""
        y = self.tgt_embed(prev[:, None])  # (B,1,D); no positions: ``step`` is not needed
        state = dict(state)
        for i, layer in enumerate(self.decoder):
            y, state[f"S{i}"] = layer.step(y, state[f"S{i}"], (state[f"src_k{i}"], state[f"src_v{i}"]),
                                           state["src_mask"])
        return self.proj(self.dec_norm(y))[:, 0], state


class GLALM(LanguageModel):
    """Language model: embedding, ``n_decoder_layers or n_layers`` causal GLA layers (mixer + SwiGLU), RMSNorm, the
    output projection (tied by default). Each layer is one mixing block."""

    def __init__(self, vocab: int, *, d_model: int = 512, n_layers: int = 6, n_decoder_layers: int | None = None,
                 n_heads: int = 4, d_ff: int | None = None, dropout: float = 0.1, attn_dropout: float = 0.0,
                 expand_k: float = 0.5, expand_v: float = 1.0, gate_rank: int = 16, gate_temperature: float = 16.0,
                 chunk_size: int = 64, share_embeddings: bool = True, tie_output: bool = True):
        super().__init__()
        mixer = mixer_settings(expand_k, expand_v, gate_rank, gate_temperature, chunk_size)
        self.tok_embed = ScaledEmbedding(vocab, d_model, dropout, None, positions=False)
        self.blocks = nn.ModuleList(GLALayer(d_model, n_heads, swiglu_hidden(d_model, d_ff), dropout, attn_dropout,
                                             mixer) for _ in range(n_decoder_layers or n_layers))
        self.norm = nn.RMSNorm(d_model, eps=NORM_EPS)
        self.proj = nn.Linear(d_model, vocab, bias=False)
        if tie_output:
            self.proj.weight = self.tok_embed.tok.weight
        else:
            untied_projection(self.proj, d_model)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok_embed(tokens)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))

    def mixing_blocks(self) -> list[nn.Module]:
        return list(self.blocks)
