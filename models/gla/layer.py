"""The layers of the GLA Transformer (Yang et al. 2024, "Gated Linear Attention Transformers with Hardware-Efficient
Training", arXiv:2312.06635, section 4): the GLA token mixer, SwiGLU, cross-attention and the pre-norm layer.

The GLA token mixer, per head (H heads; key dimension d_k = d_model * expand_k, value dimension
d_v = d_model * expand_v, split evenly between the heads)::

    q, k, v = x W_q, x W_k, x W_v
    alpha   = sigmoid(x W_alpha1 W_alpha2 + b_alpha) ** (1 / tau)       (low rank gate_rank, tau = gate_temperature)
    S_t     = diag(alpha_t) S_{t-1} + k_t^T v_t,    o_t = q_t S_t        (queries scaled by d_k-per-head ** -1/2)
    y       = (SiLU(x W_r + b_r) * RMSNorm_per_head(o)) W_o

``tau`` pulls every gate towards 1 (0.5 ** (1/16) = 0.958): long memory from the start of training. The gate is
kept in log space, ``log alpha = logsigmoid(.) / tau``, which is what the recurrence needs (and finite even where
alpha underflows). The recurrence runs in fp32 (at least), whatever the autocast: its decays are exponentials of
sums, which bf16 would round to a few digits. The mixer's projections have no bias except the forget gate's and
the output gate's (as the paper's equations).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from seqbench.models.common import Dropout
from seqbench.models.transformer import MultiHeadAttention

from . import kernels
from .recurrence import chunkwise_gla, recurrent_gla, recurrent_step

NORM_EPS = 1e-5
FF_MULTIPLE = 8


def default_d_ff(d_model: int) -> int:
    """SwiGLU hidden size when d_ff is null: the multiple of 8 nearest to 8/3 d_model (680 for d_model = 256).

    Three d_model x d_ff matrices of 8/3 d_model hold as many parameters as a ReLU FFN's two of 4 d_model.
    """
    return max(FF_MULTIPLE, FF_MULTIPLE * round(8 * d_model / (3 * FF_MULTIPLE)))


def dimension_problems(d_model: int, n_heads: int, expand_k: float, expand_v: float) -> list[str]:
    """One message per expansion that does not give a whole number of dimensions per head."""
    found = []
    for name, expand, what in (("expand_k", expand_k, "key"), ("expand_v", expand_v, "value")):
        dims = d_model * expand
        whole = abs(dims - round(dims)) < 1e-9  # 0.1 * 30 is 3.0000000000000004
        if not whole or round(dims) < n_heads or round(dims) % n_heads:
            step = n_heads / d_model
            found.append(f"model.{name}={expand} gives model.d_model={d_model} * {name} = {dims:g} {what} "
                         f"dimensions, not a positive multiple of model.n_heads={n_heads}; set {name} to a multiple "
                         f"of n_heads / d_model = {step:g} (e.g. {max(1, round(expand / step)) * step:g})")
    return found


def head_dims(d_model: int, n_heads: int, expand_k: float, expand_v: float) -> tuple[int, int]:
    """(d_k, d_v): the key and value dimensions of all heads together; ValueError when not whole per head."""
    found = dimension_problems(d_model, n_heads, expand_k, expand_v)
    if found:
        raise ValueError("; ".join(found))
    return round(d_model * expand_k), round(d_model * expand_v)


def xavier_blocks(weight: torch.Tensor, sizes: list[int]) -> None:
    """Xavier-uniform init of each row block of a fused weight, each with the bound of its own projection."""
    with torch.no_grad():
        for block in weight.split(sizes, dim=0):
            nn.init.xavier_uniform_(block)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32, or x's dtype where it is wider (float64 in the path-length analysis)."""
    return torch.promote_types(x.dtype, torch.float32)


def gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor, chunk_size: int,
        initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GLA over whole sequences (B,T,H,d) -> o (B,T,H,d_v), final state: fla's kernel on CUDA when installed;
    else, on a CPU, the recurrence for a sequence shorter than a chunk (:func:`short_on_cpu`), and the chunkwise
    PyTorch form otherwise."""
    with torch.autocast(q.device.type, enabled=False):
        if kernels.available(q):
            return kernels.chunk(q, k, v, log_alpha, initial_state)
        if short_on_cpu(q, chunk_size):
            args = (q, k, v, log_alpha, initial_state)
            if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
                return checkpoint(recurrent_gla, *args, use_reentrant=False)  # states recomputed, not stored
            return recurrent_gla(*args)
        return chunkwise_gla(q, k, v, log_alpha, chunk_size, initial_state)


def short_on_cpu(q: torch.Tensor, chunk_size: int) -> bool:
    """A CPU and fewer positions than a chunk (a translation batch of short sentences): there the recurrence, one
    (d_k x d_v) state update per position, is faster than the chunkwise form, whose (sub-chunk x sub-chunk x d_k)
    decay tensors it spends its time on: forward and backward of (200 sentences x 20 positions, 4 heads, d_k 32,
    d_v 64) on one thread of a 2-core AMD EPYC, 0.21 s against 0.61 s; at 128 positions the chunkwise form is
    ahead (0.20 s against 0.31 s). Both are tested equal to the recurrence."""
    return q.device.type == "cpu" and q.size(1) < chunk_size


def gla_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
             state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of GLA, inputs (B,1,H,d) -> o (B,1,H,d_v), new state: constant memory, whatever the position."""
    with torch.autocast(q.device.type, enabled=False):
        if kernels.available(q):
            return kernels.step(q, k, v, log_alpha, state)
        o, state = recurrent_step(q[:, 0], k[:, 0], v[:, 0], log_alpha[:, 0], state)
        return o[:, None], state


def reverse_within(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """x (B,T,...) with each row's first ``lengths[b]`` positions in reverse order, the padding after them in place.

    Its own inverse. A causal scan over the result reads each sentence from its last token back to its first and
    reaches the padding only after the whole sentence: no padding flows into a sentence position.
    """
    T = x.size(1)
    t = torch.arange(T, device=x.device)[None, :]
    index = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)  # (B,T)
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x))


class ScanInputs(nn.Module):
    """The per-direction projections of a GLA mixer: queries, keys, values and the low-rank forget gate."""

    def __init__(self, d_model: int, n_heads: int, d_k: int, d_v: int, gate_rank: int, gate_temperature: float):
        super().__init__()
        self.h, self.d_k, self.d_v, self.temperature = n_heads, d_k, d_v, gate_temperature
        self.qkv = nn.Linear(d_model, 2 * d_k + d_v, bias=False)
        self.gate_down = nn.Linear(d_model, gate_rank, bias=False)  # W_alpha1
        self.gate_up = nn.Linear(gate_rank, d_k)  # W_alpha2, b_alpha
        xavier_blocks(self.qkv.weight, [d_k, d_k, d_v])
        nn.init.xavier_uniform_(self.gate_down.weight)
        nn.init.xavier_uniform_(self.gate_up.weight)
        nn.init.zeros_(self.gate_up.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (B,T,D) -> q, k (B,T,H,d_k/H), v (B,T,H,d_v/H), log_alpha (B,T,H,d_k/H), in :func:`compute_dtype`."""
        B, T, _ = x.shape
        dtype = compute_dtype(x)
        q, k, v = self.qkv(x).to(dtype).split([self.d_k, self.d_k, self.d_v], dim=-1)
        log_alpha = F.logsigmoid(self.gate_up(self.gate_down(x)).to(dtype)) / self.temperature
        q = q * (self.d_k // self.h) ** -0.5
        return tuple(t.reshape(B, T, self.h, -1) for t in (q, k, v, log_alpha))


class GatedLinearAttention(nn.Module):
    """The GLA token mixer (module docstring); ``directions=2`` adds a right-to-left scan (the encoder's).

    Bidirectional: the backward scan has its own q/k/v/gate projections and reads each sentence reversed within its
    length (:func:`reverse_within`); the two scans' outputs are added before the per-head norm, output gate and
    output projection, which both directions share.
    """

    def __init__(self, d_model: int, n_heads: int, *, expand_k: float, expand_v: float, gate_rank: int,
                 gate_temperature: float, chunk_size: int, directions: int = 1):
        super().__init__()
        d_k, d_v = head_dims(d_model, n_heads, expand_k, expand_v)
        self.chunk_size = chunk_size
        self.scans = nn.ModuleList(ScanInputs(d_model, n_heads, d_k, d_v, gate_rank, gate_temperature)
                                   for _ in range(directions))
        self.gate = nn.Linear(d_model, d_v)  # W_r, b_r
        self.norm = nn.RMSNorm(d_v // n_heads, eps=NORM_EPS)  # per head, one weight for all heads
        self.out = nn.Linear(d_v, d_model, bias=False)
        for layer in (self.gate, self.out):
            nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(self.gate.bias)

    def state_shape(self) -> tuple[int, int, int]:
        """(H, d_k/H, d_v/H): the decoding state per sentence, of a size independent of the position."""
        scan = self.scans[0]
        return scan.h, scan.d_k // scan.h, scan.d_v // scan.h

    def output(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """x (B,T,D), o (B,T,H,d_v/H) -> (SiLU(x W_r + b_r) * RMSNorm(o)) W_o (B,T,D)."""
        return self.out(F.silu(self.gate(x)) * self.norm(o).flatten(-2))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """x (B,T,D) -> (B,T,D); causal, or both directions (``lengths`` (B,) then required)."""
        o, _ = gla(*self.scans[0](x), self.chunk_size)
        if len(self.scans) == 2:
            if lengths is None:
                raise ValueError("a bidirectional GLA mixer needs the sequence lengths, to reverse each sequence "
                                 "within its length")
            back, _ = gla(*self.scans[1](reverse_within(x, lengths)), self.chunk_size)
            o = o + reverse_within(back, lengths)
        return self.output(x, o)

    def step(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One causal step: x (B,1,D), state (B,H,d_k/H,d_v/H) -> (B,1,D), new state."""
        o, state = gla_step(*self.scans[0](x), state)
        return self.output(x, o), state


class SwiGLU(nn.Module):
    """Feed-forward ``W_2 (SiLU(x W_1) * x W_3)`` (Shazeer 2020), without biases; W_1 and W_3 fused."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.d_ff = d_ff
        self.up = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)
        xavier_blocks(self.up.weight, [d_ff, d_ff])
        nn.init.xavier_uniform_(self.down.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def cross_attention(d_model: int, n_heads: int, dropout: float) -> MultiHeadAttention:
    """The Transformer's cross-attention (SDPA): Xavier-uniform weights (the key and value blocks of the fused
    projection each on its own), zero biases."""
    attention = MultiHeadAttention(d_model, n_heads, dropout, cross=True)
    xavier_blocks(attention.kv.weight, [d_model, d_model])
    for layer in (attention.q, attention.out):
        nn.init.xavier_uniform_(layer.weight)
    for layer in (attention.q, attention.kv, attention.out):
        nn.init.zeros_(layer.bias)
    return attention


class GLALayer(nn.Module):
    """Pre-norm residual layer: GLA token mixer, cross-attention (decoder only), SwiGLU; RMSNorm before each.

    ``bidirectional`` (the encoder's): the mixer scans both ways. Dropout acts on each sub-layer's output.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, attn_dropout: float, mixer: dict,
                 *, bidirectional: bool = False, cross: bool = False):
        super().__init__()
        self.mix_norm = nn.RMSNorm(d_model, eps=NORM_EPS)
        self.mixer = GatedLinearAttention(d_model, n_heads, directions=2 if bidirectional else 1, **mixer)
        self.cross_norm = nn.RMSNorm(d_model, eps=NORM_EPS) if cross else None
        self.cross = cross_attention(d_model, n_heads, attn_dropout) if cross else None
        self.ff_norm = nn.RMSNorm(d_model, eps=NORM_EPS)
        self.ff = SwiGLU(d_model, d_ff)
        self.drop = Dropout(dropout)

    def attend(self, x: torch.Tensor, memory: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.cross.attend_to(self.cross_norm(x), *memory, mask))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None,
                memory: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B,T,D) -> (B,T,D); ``lengths`` for a bidirectional mixer, ``memory`` (cross-attention keys and
        values, the cross-attention's ``project_kv``) and ``mask`` (B,1,1,S) for the decoder's."""
        x = x + self.drop(self.mixer(self.mix_norm(x), lengths))
        if self.cross is not None:
            x = self.attend(x, memory, mask)
        return x + self.drop(self.ff(self.ff_norm(x)))

    def step(self, x: torch.Tensor, state: torch.Tensor, memory: tuple[torch.Tensor, torch.Tensor],
             mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step of a decoder layer: x (B,1,D), its GLA state -> (B,1,D), new state."""
        y, state = self.mixer.step(self.mix_norm(x), state)
        x = self.attend(x + self.drop(y), memory, mask)
        return x + self.drop(self.ff(self.ff_norm(x))), state


def swiglu_hidden(d_model: int, d_ff: int | None) -> int:
    """d_ff as given, or :func:`default_d_ff` when null."""
    return default_d_ff(d_model) if d_ff is None else d_ff

