"""ConvS2S (Gehring et al., 2017, "Convolutional Sequence to Sequence Learning", arXiv:1705.03122).

Token plus learned position embeddings (section 3.1), linear maps into and out of
the convolution width, blocks of ``conv (C_in -> 2 C) -> GLU`` with residual
connections scaled by sqrt(0.5) (section 3.2; a linear projection carries the
residual where the width changes), and multi-step attention in every decoder
layer (section 3.3): ``d = (W h + g) sqrt(0.5)`` scores the encoder outputs ``z``,
the context is taken over ``z + e`` and scaled by ``s sqrt(1/s)`` (``s`` the
unpadded source length), and the layer output is ``(h + W c) sqrt(0.5)``.
Initialisation and scaling follow section 3.4 and fairseq's ``fconv``: weights
normal with std sqrt(4(1-p)/(k C_in)) for convolutions feeding a GLU and
sqrt((1-p)/n_in) for linear layers (p the dropout on their input), embeddings
std 0.1, zero biases, weight normalisation on every convolution and linear layer
(``weight_norm``), and the encoder's gradient scaled by 1/(2 x attention layers).

Encoder convolutions are centred and padding positions are zeroed before each
one, so extra source padding changes nothing; decoder convolutions are causal
and ``decode_step`` keeps the last k-1 inputs of each layer, never recomputing
the prefix; its convolution at the new position is one matrix product over the
k-tap window (``conv_step``). The language model is the decoder without
attention or positions: a causal gated convolutional network in the style of
Dauphin et al. (2017).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .common import Dropout, LanguageModel, LearnedPositions, Seq2Seq, check_odd_kernel, conv_step, padding_mask

SQRT_HALF = math.sqrt(0.5)


class GradMultiply(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` backward."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def normed(module: nn.Module, enabled: bool) -> nn.Module:
    """Weight normalisation (Salimans & Kingma, 2016) over each output unit."""
    return nn.utils.parametrizations.weight_norm(module) if enabled else module


def linear(n_in: int, n_out: int, dropout: float, wn: bool) -> nn.Module:
    """Linear layer with std sqrt((1-p)/n_in) weights and zero bias."""
    m = nn.Linear(n_in, n_out)
    nn.init.normal_(m.weight, std=math.sqrt((1 - dropout) / n_in))
    nn.init.zeros_(m.bias)
    return normed(m, wn)


def token_embedding(vocab: int, dim: int, pad_id: int | None) -> nn.Embedding:
    m = nn.Embedding(vocab, dim, padding_idx=pad_id)
    nn.init.normal_(m.weight, std=0.1)
    if pad_id is not None:
        nn.init.zeros_(m.weight[pad_id])
    return m


class Embedding(nn.Module):
    """Token embeddings plus learned positions (none when ``max_positions`` is None), then dropout."""

    def __init__(self, tok: nn.Embedding, max_positions: int | None, dropout: float):
        super().__init__()
        self.tok, self.drop = tok, Dropout(dropout)
        self.pos = LearnedPositions(max_positions, tok.embedding_dim) if max_positions else None

    def forward(self, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        x = self.tok(tokens)  # (B,T,E)
        return self.drop(x if self.pos is None else self.pos(x, offset))


class GLUConv(nn.Module):
    """Convolution to 2C channels and a gated linear unit; centred or causal; (B,T,C_in) -> (B,T,C)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, dropout: float, causal: bool, wn: bool):
        super().__init__()
        conv = nn.Conv1d(c_in, 2 * c_out, kernel_size)
        nn.init.normal_(conv.weight, std=math.sqrt(4 * (1 - dropout) / (kernel_size * c_in)))
        nn.init.zeros_(conv.bias)
        self.conv, self.kernel_size = normed(conv, wn), kernel_size
        self.pad = (kernel_size - 1, 0) if causal else ((kernel_size - 1) // 2, kernel_size // 2)

    def step(self, window: torch.Tensor) -> torch.Tensor:
        """The output for the last of exactly k inputs: (B,C_in,k) -> (B,1,C)."""
        return F.glu(conv_step(self.conv, window), dim=-1)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(F.pad(x.transpose(1, 2), self.pad))  # (B,2C,T)
        return F.glu(y, dim=1).transpose(1, 2)  # (B,T,C)


class EncoderLayer(nn.Module):
    """Centred GLU convolution block with a scaled residual; (B,S,C_in) -> (B,S,C)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, dropout: float, wn: bool):
        super().__init__()
        self.proj = linear(c_in, c_out, 0.0, wn) if c_in != c_out else None
        self.conv, self.drop = GLUConv(c_in, c_out, kernel_size, dropout, False, wn), Dropout(dropout)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        """x (B,S,C_in); pad (B,S) True at padding, zeroed so the convolution sees plain zero padding."""
        residual = x if self.proj is None else self.proj(x)
        if pad is not None:
            x = x.masked_fill(pad[..., None], 0.0)
        return (self.conv(self.drop(x)) + residual) * SQRT_HALF


class Memory(NamedTuple):
    """Encoder outputs seen by every attention layer."""

    z: torch.Tensor  # (B,S,E) encoder outputs, the attention keys
    ze: torch.Tensor  # (B,S,E) (z + e) sqrt(0.5), the attention values
    pad: torch.Tensor  # (B,S) True at source padding
    scale: torch.Tensor  # (B,1,1) s sqrt(1/s), s the source length


class Attention(nn.Module):
    """Multi-step attention of one decoder layer (section 3.3); (B,T,C) -> (B,T,C)."""

    def __init__(self, channels: int, d_model: int, wn: bool):
        super().__init__()
        self.q, self.out = linear(channels, d_model, 0.0, wn), linear(d_model, channels, 0.0, wn)

    def forward(self, h: torch.Tensor, g: torch.Tensor, memory: Memory) -> torch.Tensor:
        """h (B,T,C) convolution output, g (B,T,E) target embeddings."""
        d = (self.q(h) + g) * SQRT_HALF  # (B,T,E)
        scores = torch.bmm(d, memory.z.transpose(1, 2))  # (B,T,S)
        a = scores.masked_fill(memory.pad[:, None, :], float("-inf")).softmax(dim=-1)
        c = torch.bmm(a, memory.ze) * memory.scale  # (B,T,E)
        return (self.out(c) + h) * SQRT_HALF


class DecoderLayer(nn.Module):
    """Causal GLU convolution block with optional attention; with ``attention=False`` the LM block."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, dropout: float, wn: bool,
                 d_model: int | None = None):
        super().__init__()
        self.proj = linear(c_in, c_out, 0.0, wn) if c_in != c_out else None
        self.conv, self.drop = GLUConv(c_in, c_out, kernel_size, dropout, True, wn), Dropout(dropout)
        self.attn = Attention(c_out, d_model, wn) if d_model else None

    def block(self, x, h, g, memory):
        """Attention and residual around the convolution output h (B,T,C)."""
        residual = x if self.proj is None else self.proj(x)
        if self.attn is not None:
            h = self.attn(h, g, memory)
        return (h + residual) * SQRT_HALF

    def forward(self, x: torch.Tensor, g: torch.Tensor | None = None, memory: Memory | None = None):
        """x (B,T,C_in), g (B,T,E) target embeddings -> (B,T,C)."""
        return self.block(x, self.conv(self.drop(x)), g, memory)

    def step(self, x, buffer, g=None, memory=None):
        """One position x (B,1,C_in) after the previous k-1 inputs ``buffer`` (B,C_in,k-1)."""
        window = torch.cat([buffer, x.transpose(1, 2)], dim=2)  # (B,C_in,k)
        return self.block(x, self.conv.step(self.drop(window)), g, memory), window[:, :, 1:]


class OutputHead(nn.Module):
    """Linear map out of the convolution width, dropout, and the output projection; (B,T,C) -> (B,T,V)."""

    def __init__(self, channels: int, d_out: int, vocab: int, dropout: float, wn: bool,
                 tied: nn.Embedding | None):
        super().__init__()
        self.fc, self.drop = linear(channels, d_out, 0.0, wn), Dropout(dropout)
        if tied is None:
            self.proj = linear(d_out, vocab, dropout, wn)
        else:
            if tied.embedding_dim != d_out:
                raise ValueError(f"tie_output needs d_out == d_model, got d_out={d_out}, d_model={tied.embedding_dim}")
            self.proj = nn.Linear(d_out, vocab)
            self.proj.weight = tied.weight
            nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        return self.proj(self.drop(self.fc(x)))


def stack_spec(n_layers: int, kernel_size: int, channels: int, layers) -> list[tuple[int, int]]:
    """(channels, kernel_size) per layer: ``layers`` if given, else a uniform stack."""
    spec = [tuple(layer) for layer in layers] if layers is not None else [(channels, kernel_size)] * n_layers
    if not spec or any(len(s) != 2 or min(s) < 1 for s in spec):
        raise ValueError(f"layers must be a non-empty list of [channels, kernel_size] pairs, got {layers!r}")
    return [(int(c), int(k)) for c, k in spec]


def decoder_stack(spec, d_model, dropout, wn, attention: bool) -> nn.ModuleList:
    widths = [spec[0][0]] + [c for c, _ in spec]
    return nn.ModuleList(DecoderLayer(widths[i], c, k, dropout, wn, d_model if attention else None)
                         for i, (c, k) in enumerate(spec))


class ConvS2S(Seq2Seq):
    """Convolutional encoder-decoder with multi-step attention."""

    def __init__(self, src_vocab: int, tgt_vocab: int, pad_id: int, *, d_model: int = 512, n_layers: int = 20,
                 kernel_size: int = 3, channels: int | None = None, layers: list | None = None,
                 d_out: int | None = None, dropout: float = 0.1, max_positions: int = 1024,
                 share_embeddings: bool = False, tie_output: bool = False, weight_norm: bool = True):
        super().__init__()
        spec = stack_spec(n_layers, kernel_size, channels or d_model, layers)
        for _, k in spec:
            check_odd_kernel(k, "ConvS2S")
        widths = [spec[0][0]] + [c for c, _ in spec]
        src_tok = token_embedding(src_vocab, d_model, pad_id)
        share = share_embeddings and src_vocab == tgt_vocab
        tgt_tok = src_tok if share else token_embedding(tgt_vocab, d_model, pad_id)
        self.src_embed = Embedding(src_tok, max_positions, dropout)
        self.tgt_embed = Embedding(tgt_tok, max_positions, dropout)
        self.max_target_positions = max_positions
        self.enc_in = linear(d_model, widths[0], dropout, weight_norm)
        self.encoder = nn.ModuleList(EncoderLayer(widths[i], c, k, dropout, weight_norm)
                                     for i, (c, k) in enumerate(spec))
        self.enc_out = linear(widths[-1], d_model, 0.0, weight_norm)
        self.dec_in = linear(d_model, widths[0], dropout, weight_norm)
        self.decoder = decoder_stack(spec, d_model, dropout, weight_norm, attention=True)
        self.head = OutputHead(widths[-1], d_out or d_model, tgt_vocab, dropout, weight_norm,
                               tgt_tok if tie_output else None)
        self.grad_scale = 1.0 / (2.0 * len(self.decoder))  # one attention per decoder layer

    def run_encoder(self, src, src_lengths) -> Memory:
        pad = padding_mask(src_lengths, src.size(1))  # (B,S)
        e = self.src_embed(src)  # (B,S,E)
        x = self.enc_in(e)  # (B,S,C)
        for layer in self.encoder:
            x = layer(x, pad)
        z = GradMultiply.apply(self.enc_out(x), self.grad_scale).masked_fill(pad[..., None], 0.0)  # (B,S,E)
        s = src_lengths.to(z.dtype)[:, None, None]
        return Memory(z, (z + e) * SQRT_HALF, pad, s * s.rsqrt())

    def forward(self, src, src_lengths, tgt_in):
        """src (B,S), src_lengths (B,), tgt_in (B,T) -> logits (B,T,V)."""
        memory = self.run_encoder(src, src_lengths)
        g = self.tgt_embed(tgt_in)  # (B,T,E)
        x = self.dec_in(g)  # (B,T,C)
        for layer in self.decoder:
            x = layer(x, g, memory)
        return self.head(x)

    def encode(self, src, src_lengths):
        state = dict(zip(("src_z", "src_ze", "src_pad", "src_scale"), self.run_encoder(src, src_lengths)))
        for i, layer in enumerate(self.decoder):
            conv = layer.conv
            c_in = conv.conv.in_channels
            state[f"buf{i}"] = state["src_z"].new_zeros(src.size(0), c_in, conv.kernel_size - 1)  # (B,C_in,k-1)
        return state

    def decode_step(self, prev, state, step):
        """prev (B,) tokens at position ``step`` -> logits (B,V) for that position."""
        memory = Memory(state["src_z"], state["src_ze"], state["src_pad"], state["src_scale"])
        state = dict(state)
        g = self.tgt_embed(prev[:, None], offset=step)  # (B,1,E)
        x = self.dec_in(g)  # (B,1,C)
        for i, layer in enumerate(self.decoder):
            x, state[f"buf{i}"] = layer.step(x, state[f"buf{i}"], g, memory)
        return self.head(x)[:, 0], state


class ConvLM(LanguageModel):
    """Gated convolutional language model: the ConvS2S decoder without attention or positions.

    Takes the keywords of :class:`ConvS2S`; ``share_embeddings`` and ``max_positions`` have no
    effect (one vocabulary, and causal convolutions see relative position).
    """

    def __init__(self, vocab: int, *, d_model: int = 512, n_layers: int = 20, kernel_size: int = 3,
                 channels: int | None = None, layers: list | None = None, d_out: int | None = None,
                 dropout: float = 0.1, max_positions: int = 1024, share_embeddings: bool = False,
                 tie_output: bool = False, weight_norm: bool = True):
        super().__init__()
        spec = stack_spec(n_layers, kernel_size, channels or d_model, layers)
        tok = token_embedding(vocab, d_model, None)
        self.tok_embed = Embedding(tok, None, dropout)
        self.fc_in = linear(d_model, spec[0][0], dropout, weight_norm)
        self.blocks = decoder_stack(spec, d_model, dropout, weight_norm, attention=False)
        self.out = OutputHead(spec[-1][0], d_out or d_model, vocab, dropout, weight_norm,
                              tok if tie_output else None)

    def embed(self, tokens):
        return self.fc_in(self.tok_embed(tokens))  # (B,T,C)

    def head(self, x):
        return self.out(x)

    def mixing_blocks(self):
        return list(self.blocks)
