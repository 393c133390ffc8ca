"""ByteNet (Kalchbrenner et al., 2016, "Neural Machine Translation in Linear Time", arXiv:1610.10099).

Residual blocks of Figure 3 (left, the ReLU block used for translation), each
``LayerNorm -> ReLU -> 1x1 conv (D -> D/2) -> LayerNorm -> ReLU -> dilated conv k
-> LayerNorm -> ReLU -> 1x1 conv (D/2 -> D)`` plus the residual, so ``d_model`` is
the paper's 2d channels and the bottleneck its d hidden units. Dilations cycle
through ``dilations`` (1,2,4,8,16 in the paper). No positional encodings:
convolutions see relative position. A final LayerNorm precedes the output
projection, as the residual stream is never normalised otherwise.

Dynamic unfolding (section 3.2). The source s is the source tokens followed by an
end-of-sentence marker, so |s| counts the marker: the paper pads every sentence with
special symbols before unfolding and tensor2tensor appends EOS to every source, so in
both the encoder sees where the source ends through a learned symbol; here that is one
EOS (the paper's padding to a multiple of 50 is a batching detail, left out). The
source network produces a representation of L(s) = ceil(a|s| + b) columns (at least
|s|; a = ``unfold_a``, b = ``unfold_b``; the paper's a = 1.2, b = 0 for En->De): the
source is padded with zero embeddings to L(s) positions and the unmasked, non-causal
source network runs over all of them, as tensor2tensor pads the source and runs its
encoder over the padded length, so columns |s|..L(s)-1 carry the source too. Batch
padding past L(s) is zeroed before every dilated convolution, so a sentence's columns
do not depend on the batch. The causal target network reads, at position t, the target
embedding concatenated with column t, projected back to ``d_model``.

Length. A target of |t| tokens and its EOS fill |t| + 1 decoder positions. As in the paper, the decoder runs on
past L(s) over zero columns until it emits EOS: decoding is bounded only by the output limit every model shares
(``eval.decoding.max_len_a`` |src| + ``max_len_b``, harness/decode.py), and training likewise trains on a target
longer than L(s) - 1 tokens in full, its positions from L(s) on reading zero columns (nothing is cut or dropped;
on Multi30k En->De with the small preset, a = 1.2, b = 5, that is 170 of 29,000 training pairs, 376 of 457,331
target positions). L(s) is thus the span over which the decoder reads the source, not a bound on the output.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .common import (EOS, PAD, Dropout, LanguageModel, ScaledEmbedding, Seq2Seq, causal_conv_pad, check_odd_kernel,
                     conv_step, padding_mask)


class ResidualBlock(nn.Module):
    """Bottleneck residual block (Figure 3, left), causal or not; (B,T,D) -> (B,T,D)."""

    def __init__(self, d_model: int, kernel_size: int, dilation: int, dropout: float, causal: bool):
        super().__init__()
        half = d_model // 2
        self.norm1, self.reduce = nn.LayerNorm(d_model), nn.Linear(d_model, half)  # 1x1 conv
        self.norm2 = nn.LayerNorm(half)
        self.conv = nn.Conv1d(half, half, kernel_size, dilation=dilation, padding=0 if causal else "same")
        self.norm3, self.expand = nn.LayerNorm(half), nn.Linear(half, d_model)  # 1x1 conv
        self.drop = Dropout(dropout)
        self.left = (kernel_size - 1) * dilation if causal else 0  # past inputs the masked conv reads
        self.keep = None  # optional (B,T,1) 0/1 mask of real source positions, set by the encoder for one call

    def conv_input(self, x):
        """x (B,T,D) -> input of the dilated conv (B,D/2,T), padding positions zeroed."""
        h = F.relu(self.norm2(self.reduce(F.relu(self.norm1(x)))))  # (B,T,D/2)
        if self.keep is not None:
            h = h * self.keep
        return h.transpose(1, 2)

    def finish(self, x, h):
        """Residual x (B,T,D) plus the branch from the conv output h (B,D/2,T)."""
        return x + self.drop(self.expand(F.relu(self.norm3(h.transpose(1, 2)))))

    def forward(self, x):
        h = self.conv_input(x)
        return self.finish(x, self.conv(causal_conv_pad(h, self.left) if self.left else h))

    def step(self, x, buf):
        """One new position x (B,1,D) with buf (B,D/2,left) of past conv inputs -> (y, new buf)."""
        h = torch.cat([buf, self.conv_input(x)], dim=2)  # (B,D/2,left+1)
        return self.finish(x, conv_step(self.conv, h)[:, :, None]), h[:, :, 1:]


def make_blocks(n_layers, d_model, kernel_size, dilations, dropout, causal) -> nn.ModuleList:
    return nn.ModuleList(ResidualBlock(d_model, kernel_size, dilations[i % len(dilations)], dropout, causal)
                         for i in range(n_layers))


class ByteNet(Seq2Seq):
    """ByteNet encoder-decoder: target network stacked on the source network by dynamic unfolding."""

    def __init__(self, src_vocab: int, tgt_vocab: int, pad_id: int, *, d_model: int = 512, n_layers: int = 15,
                 kernel_size: int = 3, dilations: list[int] = (1, 2, 4, 8, 16), dropout: float = 0.1,
                 share_embeddings: bool = True, tie_output: bool = True, unfold_a: float = 1.2,
                 unfold_b: float = 0.0):
        super().__init__()
        check_odd_kernel(kernel_size, "ByteNet")
        args = (n_layers, d_model, kernel_size, list(dilations), dropout)
        self.pad_id, self.unfold_a, self.unfold_b = pad_id, unfold_a, unfold_b
        self.src_embed = ScaledEmbedding(src_vocab, d_model, dropout, pad_id, positions=False)
        share = share_embeddings and src_vocab == tgt_vocab
        self.tgt_embed = (self.src_embed if share else
                          ScaledEmbedding(tgt_vocab, d_model, dropout, pad_id, positions=False))
        self.encoder = make_blocks(*args, causal=False)
        self.enc_norm = nn.LayerNorm(d_model)
        self.unfold = nn.Linear(2 * d_model, d_model)  # [target embedding; source column] -> decoder input
        self.decoder = make_blocks(*args, causal=True)
        self.dec_norm = nn.LayerNorm(d_model)
        self.proj = nn.Linear(d_model, tgt_vocab, bias=False)
        if tie_output:
            self.proj.weight = self.tgt_embed.tok.weight
        else:
            nn.init.normal_(self.proj.weight, std=d_model**-0.5)

    def unfolded_lengths(self, src_lengths: torch.Tensor) -> torch.Tensor:
        """Columns of the source representation, L(s) = ceil(a|s| + b) with |s| counting the EOS marker, at least
        |s|; (B,) source lengths without the marker -> (B,)."""
        # rounded to 1e-9 first: 1.2 * 5 is 6.000000000000001 in floating point, whose ceiling would be 7
        cols = [max(n, math.ceil(round(self.unfold_a * n + self.unfold_b, 9))) for n in (src_lengths + 1).tolist()]
        return torch.tensor(cols, device=src_lengths.device)

    def run_encoder(self, src, src_lengths):
        """src (B,S), src_lengths (B,) -> source representation (B,W,D), W = max L(s), zero past each L(s).

        The EOS marker goes at position |src|; positions from |s| to L(s) hold zero embeddings and are
        convolved like the source (the unfolded extension); only batch padding past L(s) is masked.
        """
        cols = self.unfolded_lengths(src_lengths)
        width = int(cols.max())
        tokens = F.pad(src[:, :width], (0, max(0, width - src.size(1))), value=PAD)  # (B,W)
        tokens = tokens.scatter(1, src_lengths[:, None], EOS)
        dtype = self.enc_norm.weight.dtype
        source = (~padding_mask(src_lengths + 1, width))[..., None].to(dtype)  # (B,W,1): tokens and EOS
        keep = (~padding_mask(cols, width))[..., None].to(dtype)  # (B,W,1): the L(s) columns
        x = self.src_embed(tokens) * source
        for block in self.encoder:
            block.keep = keep
            x = block(x)
            block.keep = None
        return self.enc_norm(x) * keep

    def decoder_input(self, tgt, source):
        """tgt (B,T) tokens and their source columns (B,T,D) -> decoder input (B,T,D)."""
        return self.unfold(torch.cat([self.tgt_embed(tgt), source], dim=-1))

    def forward(self, src, src_lengths, tgt_in):
        """src (B,S), src_lengths (B,), tgt_in (B,T) -> logits (B,T,V)."""
        memory = self.run_encoder(src, src_lengths)  # (B,W,D)
        W, T = memory.size(1), tgt_in.size(1)
        source = memory[:, :T] if W >= T else F.pad(memory, (0, 0, 0, T - W))  # (B,T,D), zero from L(s) on
        y = self.decoder_input(tgt_in, source)
        for block in self.decoder:
            y = block(y)
        return self.proj(self.dec_norm(y))

    def encode(self, src, src_lengths):
        memory = self.run_encoder(src, src_lengths)
        state = {"src_memory": memory}
        for i, block in enumerate(self.decoder):
            state[f"buf{i}"] = memory.new_zeros(memory.size(0), block.conv.in_channels, block.left)
        return state

    def decode_step(self, prev, state, step):
        """prev (B,) tokens at position ``step`` -> logits (B,V) for that position."""
        memory = state["src_memory"]
        if step < memory.size(1):
            source = memory[:, step : step + 1]  # (B,1,D)
        else:
            source = memory.new_zeros(memory.size(0), 1, memory.size(2))
        y = self.decoder_input(prev[:, None], source)
        state = dict(state)
        for i, block in enumerate(self.decoder):
            y, state[f"buf{i}"] = block.step(y, state[f"buf{i}"])
        return self.proj(self.dec_norm(y))[:, 0], state


class ByteNetLM(LanguageModel):
    """The target network alone: embedding, masked dilated residual blocks, output projection.

    Takes the translation form's hyperparameters; ``share_embeddings`` and the
    unfolding bound have no effect here.
    """

    def __init__(self, vocab: int, *, d_model: int = 512, n_layers: int = 15, kernel_size: int = 3,
                 dilations: list[int] = (1, 2, 4, 8, 16), dropout: float = 0.1, share_embeddings: bool = True,
                 tie_output: bool = True, unfold_a: float = 1.2, unfold_b: float = 0.0):
        super().__init__()
        self.tok_embed = ScaledEmbedding(vocab, d_model, dropout, None, positions=False)
        self.blocks = make_blocks(n_layers, d_model, kernel_size, list(dilations), dropout, causal=True)
        self.norm = nn.LayerNorm(d_model)
        self.proj = nn.Linear(d_model, vocab, bias=False)
        if tie_output:
            self.proj.weight = self.tok_embed.tok.weight
        else:
            nn.init.normal_(self.proj.weight, std=d_model**-0.5)

    def embed(self, tokens):
        return self.tok_embed(tokens)

    def head(self, x):
        return self.proj(self.norm(x))

    def mixing_blocks(self):
        return list(self.blocks)
