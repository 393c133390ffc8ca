"""Shared pieces of every architecture: the two model interfaces, embeddings,
positional encodings, masks and the generic decoder-state reordering.

Token ids are the same in every task: ``PAD=0, BOS=1, EOS=2, UNK=3`` for
translation vocabularies (defined with the data, in ``tasks/vocab.py``). Language-model vocabularies have no
padding (batches are contiguous text), so language models take no ``pad_id``.

Interfaces
----------
Every encoder-decoder (``Seq2Seq``) implements::

    forward(src (B,S), src_lengths (B,), tgt_in (B,T)) -> logits (B,T,V)
    encode(src, src_lengths) -> state dict
    decode_step(prev (B,), state, step) -> (logits (B,V), state)

``state`` is a flat ``dict[str, Tensor]`` whose tensors all have the batch
as dimension 0, so one beam search can reorder any model's cache with
:func:`reorder_state`. ``decode_step`` at ``step=t`` receives ``tgt_in[:, t]``
and must return exactly ``forward(...)[:, t]``. ``max_output_tokens(src_lengths)`` may bound
the output length per sentence (none of seqbench's architectures does); decoding never runs past it.

Entries named ``src_*`` (:data:`SOURCE_PREFIX`) are per sentence: ``encode``
computes them from the source alone and ``decode_step`` passes them on
unchanged. Every other entry is per hypothesis: ``decode_step`` may replace it.
Beam search repeats each sentence's rows for its hypotheses, so the ``src_*``
rows of one sentence's hypotheses are equal; while it only permutes hypotheses
within their sentences it leaves them in place (``reorder_state(...,
within_sentences=True)``), and selects them only when it drops sentences.

Every language model (``LanguageModel``) implements ``forward(tokens (B,T))
-> logits (B,T,V)`` as ``head(blocks(embed(tokens)))`` where ``mixing_blocks()``
returns the ordered position-mixing blocks, each ``(B,T,D) -> (B,T,D)``.
"""
from __future__ import annotations

import inspect
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from seqbench.tasks.vocab import BOS, EOS, PAD, UNK  # noqa: F401 (re-exported: the ids models and decoders use)

SOURCE_PREFIX = "src_"  # names of the per-sentence decoder-state entries
# CPU, bf16/fp16, with gradients: SDPA's math kernel up to this many keys, its fused kernel beyond (:func:`attention`)
MATH_ATTENTION_MAX_KEYS = 256
_CHOOSE_KERNEL = [True]  # False inside :func:`torch_attention_kernels`


@contextmanager
def torch_attention_kernels():
    """Inside, :func:`attention` leaves the kernel to torch. The FLOP counter (harness/profile.py) counts SDPA by
    its fused kernel's formula and the math kernel by its matrix products; counting under this keeps a model's
    counted FLOPs the same whatever kernel its precision takes."""
    _CHOOSE_KERNEL[0] = False
    try:
        yield
    finally:
        _CHOOSE_KERNEL[0] = True


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, causal: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)`` with the
    kernel chosen where torch's own choice is slow: training in bf16 or fp16 on a CPU, the fused (flash) kernel's
    backward costs about 4x the math kernel's at the lengths of sentence batches, and wins only from about 256 keys
    on. Measured in one process (forward + backward, bf16, one thread, torch 2.13, AMD EPYC with avx512_bf16):
    227 x 4 heads x 16 x 64 with a padding mask, fused 72.9 ms against math 17.5 ms; causal at 128 keys 1.24x,
    256 keys 1.00x, 512 keys 0.63x, 1024 keys 0.33x. fp32, inference and GPUs keep torch's choice."""
    if (_CHOOSE_KERNEL[0] and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
            and torch.is_grad_enabled() and k.size(-2) <= MATH_ATTENTION_MAX_KEYS):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)


class Seq2Seq(nn.Module):
    """Base class of every encoder-decoder; see the module docstring."""

    form = "seq2seq"
    max_target_positions: int | None = None  # a hard limit on decoding steps (learned positions), if any

    def forward(self, src: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def decode_step(self, prev: torch.Tensor, state: dict[str, torch.Tensor], step: int):
        raise NotImplementedError

    def max_output_tokens(self, src_lengths: torch.Tensor) -> list[int] | None:
        """Per-sentence limit on output tokens (EOS not counted) that the architecture sets itself, or None."""
        return None


class LanguageModel(nn.Module):
    """Base class of every language model; ``forward = head(blocks(embed(x)))``."""

    form = "lm"

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mixing_blocks(self) -> list[nn.Module]:
        raise NotImplementedError

    def encode(self, *args, **kwargs):
        """A language model cannot translate: no source to encode."""
        raise TypeError(f"{type(self).__name__} is a language model and cannot translate (no encoder); a translation "
                        "task needs the encoder-decoder form: build the model with models.build(cfg, task), which "
                        "picks the form from the task's family")

    decode_step = encode

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,T) -> the mixing blocks' output (B,T,D), what ``head`` turns into logits position by position."""
        x = self.embed(tokens)
        for block in self.mixing_blocks():
            x = block(x)
        return x

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,T) -> logits (B,T,V)."""
        return self.head(self.features(tokens))


def reorder_state(state: dict[str, torch.Tensor], index: torch.Tensor, *,
                  within_sentences: bool = False) -> dict[str, torch.Tensor]:
    """Select rows ``index`` (dim 0) of every tensor in a decoder state.

    ``within_sentences=True`` promises that, for every ``r``, rows ``r`` and ``index[r]`` are hypotheses
    of the same sentence (the index permutes or repeats hypotheses within their sentences and drops no
    sentence), so their per-sentence (``src_*``) entries are equal and are kept as they are; only the
    per-hypothesis entries are selected.
    """
    return {k: v if within_sentences and k.startswith(SOURCE_PREFIX) else v.index_select(0, index)
            for k, v in state.items()}


def conv_step(conv: nn.Conv1d, window: torch.Tensor) -> torch.Tensor:
    """Output of ``conv`` at the last position of ``window`` (B,C_in,(k-1)d+1) -> (B,C_out).

    One output position is a matrix product: the k taps (every d-th input, d the dilation), flattened
    channel-major to (B, C_in k) as the weight (C_out, C_in, k) flattens to (C_out, C_in k). On CPU this
    is several times faster than ``conv`` over the window.
    """
    taps = window[:, :, :: conv.dilation[0]]  # (B,C_in,k)
    return F.linear(taps.reshape(taps.size(0), -1), conv.weight.flatten(1), conv.bias)


def padding_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths -> (B, max_len) bool, True at padding positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] >= lengths[:, None]


def sinusoidal_table(n_positions: int, d_model: int) -> torch.Tensor:
    """(n_positions, d_model) table of Vaswani et al. (2017), section 3.5."""
    pos = torch.arange(n_positions, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(n_positions, d_model)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div[: d_model // 2])
    return table


class SinusoidalPositions(nn.Module):
    """Adds fixed sinusoidal position encodings; grows its table on demand."""

    def __init__(self, d_model: int, init_size: int = 1024):
        super().__init__()
        self.d_model = d_model
        self.register_buffer("table", sinusoidal_table(init_size, d_model), persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """x (B,T,D) -> x + PE[offset : offset+T]."""
        end = offset + x.size(1)
        if end > self.table.size(0):
            self.table = sinusoidal_table(max(end, 2 * self.table.size(0)), self.d_model).to(x.device)
        return x + self.table[offset:end].to(x.dtype)


class ScaledEmbedding(nn.Module):
    """Token embedding scaled by sqrt(d_model) (Vaswani et al. 2017, sec. 3.4), plus sinusoidal positions when
    ``positions`` (the Transformer; ByteNet's convolutions need none), then dropout."""

    def __init__(self, vocab: int, d_model: int, dropout: float, pad_id: int | None, positions: bool = True):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model, padding_idx=pad_id)
        nn.init.normal_(self.tok.weight, std=d_model**-0.5)
        if pad_id is not None:
            nn.init.zeros_(self.tok.weight[pad_id])
        self.pos = SinusoidalPositions(d_model) if positions else None
        self.drop, self.scale = Dropout(dropout), math.sqrt(d_model)

    def forward(self, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        x = self.tok(tokens) * self.scale  # (B,T,D)
        return self.drop(x if self.pos is None else self.pos(x, offset))


class LearnedPositions(nn.Module):
    """Learned absolute position embeddings with a hard maximum length."""

    def __init__(self, max_positions: int, d_model: int):
        super().__init__()
        self.max_positions = max_positions
        self.weight = nn.Parameter(torch.empty(max_positions, d_model))
        nn.init.normal_(self.weight, std=0.1)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """x (B,T,D) -> x + P[offset : offset+T]."""
        end = offset + x.size(1)
        if end > self.max_positions:
            raise ValueError(
                f"sequence of {end} positions exceeds max_positions={self.max_positions}; "
                "raise the model's max_positions or filter long sentences (task.max_len)"
            )
        return x + self.weight[offset:end]


def check_divisible(d_model: int, n_heads: int) -> None:
    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}; choose n_heads dividing d_model")


def check_odd_kernel(kernel_size: int, model: str) -> None:
    """A centred ('same') encoder convolution reads (k-1)/2 positions each side: k must be odd."""
    if kernel_size % 2 == 0:
        raise ValueError(f"{model}: kernel_size={kernel_size} is even, but the encoder's centred ('same') convolution "
                         f"needs an odd kernel_size; use {kernel_size - 1} or {kernel_size + 1}")


def accepted_kwargs(cls) -> list[str]:
    """Names of the keyword-only hyperparameters of a model constructor."""
    sig = inspect.signature(cls.__init__)
    return [n for n, p in sig.parameters.items() if p.kind == p.KEYWORD_ONLY]


def causal_conv_pad(x: torch.Tensor, left: int) -> torch.Tensor:
    """Left-pad (B,C,T) by ``left`` zeros along time."""
    return F.pad(x, (left, 0))


class Dropout(nn.Module):
    """Inverted dropout; on CPU it draws its mask from 16-bit slices of 64-bit random words.

    ``torch.nn.Dropout`` on CPU spends most of its time in the (single-threaded)
    random generator, up to a third of a small model's training step; drawing four
    16-bit uniforms per 64-bit random word is ~3x faster. The keep probability is
    exact to 1/65536. On GPUs it is ``F.dropout``.
    """

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
        bits = words.view(torch.int16)[:n].view_as(x)
        threshold = round(self.p * 65536) - 32768
        return x * (bits >= threshold) * (65536 / (65536 - round(self.p * 65536)))

    def extra_repr(self) -> str:
        return f"p={self.p}"
