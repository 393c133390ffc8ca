"""Mamba (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", arXiv:2312.00752)
as an encoder-decoder and as a language model.

Both forms: token embeddings as the Transformer's (N(0, d_model^-1/2) times sqrt(d_model), no positions: the
mixer is causal and recurrent, so it knows the order), pre-norm residual blocks with RMSNorm and a final RMSNorm
(as the reference implementation's ``MixerModel``), the output projection tied to the embeddings.
"""
from __future__ import annotations

import torch
from torch import nn

from seqbench.models.common import LanguageModel, ScaledEmbedding, Seq2Seq, check_divisible, padding_mask

from .block import BidirectionalLayer, DecoderLayer, MambaBlock, reverse_within_lengths


def mixer_settings(d_model: int, d_state: int, d_conv: int, expand: int, dt_rank: int | None, dt_min: float,
                   dt_max: float, chunk_size: int) -> dict:
    """The mixer's keyword arguments, after checking the settings that must fit together (ValueError)."""
    for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand),
                        ("chunk_size", chunk_size)):
        if value < 1:
            raise ValueError(f"Mamba: {name}={value} must be a positive integer")
    if dt_rank is not None and dt_rank < 1:
        raise ValueError(f"Mamba: dt_rank={dt_rank} must be a positive integer or null (ceil(d_model / 16))")
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"Mamba: dt_min={dt_min} and dt_max={dt_max} must satisfy 0 < dt_min <= dt_max (the range "
                         "the initial step sizes are drawn from; the paper's 0.001 and 0.1)")
    return dict(d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank, dt_min=dt_min, dt_max=dt_max,
                chunk_size=chunk_size)


def tie_or_init(proj: nn.Linear, embedding: nn.Embedding, tie: bool, d_model: int) -> None:
    """Tie the output projection to the embedding, or draw it from N(0, d_model^-1/2) as the Transformer's."""
    if tie:
        proj.weight = embedding.weight
    else:
        nn.init.normal_(proj.weight, std=d_model**-0.5)


class MambaSeq2Seq(Seq2Seq):
    """Encoder-decoder Mamba.

    Encoder: ``n_layers`` bidirectional layers, each a forward and a backward Mamba mixer (parameters of their
    own) on the same RMSNorm-ed input, outputs summed into one pre-norm residual branch; the backward mixer reads
    each sentence reversed within its length, so padding follows the words in both directions and never reaches
    them (a causal mixer cannot look ahead). The paper's block is causal; summing a forward and a backward scan
    is how bidirectional Mamba variants read a whole input (e.g. Vim, Zhu et al. 2024), and a translation encoder
    sees the whole source. A final RMSNorm.

    Decoder: ``n_decoder_layers`` (default ``n_layers``) layers, each a causal Mamba residual block followed by a
    residual block of cross-attention (``n_heads`` heads, SDPA) to the encoder output; a final RMSNorm and the
    output projection.

    Decoding state (:meth:`encode`, :meth:`decode_step`): per sentence ``src_mask`` (Bt, 1, 1, S) and each layer's
    cross-attention keys and values ``src_k{i}``, ``src_v{i}`` (Bt, H, S, D / H); per hypothesis each layer's
    convolution window ``conv{i}`` (Bt, E, d_conv - 1) and SSM state ``ssm{i}`` (Bt, E, d_state), E = expand *
    d_model. The per-hypothesis state has the same size at every step.
    """

    def __init__(self, src_vocab: int, tgt_vocab: int, pad_id: int, *, d_model: int = 512, n_layers: int = 6,
                 n_decoder_layers: int | None = None, n_heads: int = 4, d_state: int = 16, d_conv: int = 4,
                 expand: int = 2, dt_rank: int | None = None, dt_min: float = 0.001, dt_max: float = 0.1,
                 chunk_size: int = 64, dropout: float = 0.1, attn_dropout: float = 0.0,
                 share_embeddings: bool = True, tie_output: bool = True):
        super().__init__()
        mixer = mixer_settings(d_model, d_state, d_conv, expand, dt_rank, dt_min, dt_max, chunk_size)
        check_divisible(d_model, n_heads)
        n_dec = n_decoder_layers or n_layers
        self.pad_id = pad_id
        self.src_embed = ScaledEmbedding(src_vocab, d_model, dropout, pad_id, positions=False)
        share = share_embeddings and src_vocab == tgt_vocab
        self.tgt_embed = self.src_embed if share else ScaledEmbedding(tgt_vocab, d_model, dropout, pad_id,
                                                                      positions=False)
        # residual branches per stream: two mixers per encoder layer, mixer and cross-attention per decoder layer
        self.encoder = nn.ModuleList(BidirectionalLayer(d_model, dropout, n_residuals=2 * n_layers, **mixer)
                                     for _ in range(n_layers))
        self.decoder = nn.ModuleList(DecoderLayer(d_model, n_heads, dropout, attn_dropout, n_residuals=2 * n_dec,
                                                  **mixer) for _ in range(n_dec))
        self.enc_norm, self.dec_norm = nn.RMSNorm(d_model, eps=1e-5), nn.RMSNorm(d_model, eps=1e-5)
        self.proj = nn.Linear(d_model, tgt_vocab, bias=False)
        tie_or_init(self.proj, self.tgt_embed.tok, tie_output, d_model)

    def run_encoder(self, src: torch.Tensor, src_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src (Bt, S), src_lengths (Bt,) -> encoder output (Bt, S, D), attention mask (Bt, 1, 1, S) True = word."""
        mask = ~padding_mask(src_lengths, src.size(1))[:, None, None, :]
        reverse = reverse_within_lengths(src_lengths, src.size(1))
        x = self.src_embed(src)
        for layer in self.encoder:
            x = layer(x, reverse)
        return self.enc_norm(x), mask

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """src (Bt, S), src_lengths (Bt,), tgt_in (Bt, T) -> logits (Bt, T, V)."""
        memory, mask = self.run_encoder(src, src_lengths)
        y = self.tgt_embed(tgt_in)
        for layer in self.decoder:
            y = layer(y, *layer.cross.project_kv(memory), mask)
        return self.proj(self.dec_norm(y))

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        """The decoding state before the first target position (see the class docstring)."""
        memory, mask = self.run_encoder(src, src_lengths)
        state = {"src_mask": mask}
        for i, layer in enumerate(self.decoder):
            state[f"src_k{i}"], state[f"src_v{i}"] = layer.cross.project_kv(memory)
            state[f"conv{i}"], state[f"ssm{i}"] = layer.mixer.initial_state(src.size(0), memory)
        return state

    def decode_step(self, prev: torch.Tensor, state: dict[str, torch.Tensor],
                    step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """prev (Bt,) tokens at position ``step`` -> logits (Bt, V) for that position, and the next state."""
        y = self.tgt_embed(prev[:, None])  # (Bt, 1, D)
        state = dict(state)
        for i, layer in enumerate(self.decoder):
            y, state[f"conv{i}"], state[f"ssm{i}"] = layer.step(y, state[f"src_k{i}"], state[f"src_v{i}"],
                                                                 state["src_mask"], state[f"conv{i}"],
                                                                 state[f"ssm{i}"])
        return self.proj(self.dec_norm(y))[:, 0], state


class MambaLM(LanguageModel):
    """Mamba language model: ``n_decoder_layers`` (default ``n_layers``) pre-norm Mamba blocks, each
    ``x + mixer(RMSNorm(x))`` (a mixing block), a final RMSNorm, the output projection. The settings of the
    encoder-decoder's cross-attention and source side (n_heads, attn_dropout, share_embeddings) are accepted,
    so one preset serves both forms, and unused."""

    def __init__(self, vocab: int, *, d_model: int = 512, n_layers: int = 6, n_decoder_layers: int | None = None,
                 n_heads: int = 4, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: int | None = None,
                 dt_min: float = 0.001, dt_max: float = 0.1, chunk_size: int = 64, dropout: float = 0.1,
                 attn_dropout: float = 0.0, share_embeddings: bool = True, tie_output: bool = True):
        super().__init__()
        mixer = mixer_settings(d_model, d_state, d_conv, expand, dt_rank, dt_min, dt_max, chunk_size)
        n = n_decoder_layers or n_layers
        self.tok_embed = ScaledEmbedding(vocab, d_model, dropout, None, positions=False)
        self.blocks = nn.ModuleList(MambaBlock(d_model, dropout, n_residuals=n, **mixer) for _ in range(n))
        self.norm = nn.RMSNorm(d_model, eps=1e-5)
        self.proj = nn.Linear(d_model, vocab, bias=False)
        tie_or_init(self.proj, self.tok_embed.tok, tie_output, d_model)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok_embed(tokens)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))

    def mixing_blocks(self) -> list[nn.Module]:
        return list(self.blocks)

