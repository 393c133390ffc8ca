"""The Mamba mixer (Gu & Dao 2023, section 3.4 and Figure 3) and the residual layers built from it.

Mixer, for an input u (Bt, T, d_model), with E = expand * d_model inner channels::

    x, z = in_proj(u)                           two (Bt, T, E) halves: the SSM branch and the gate
    x = SiLU(causal depthwise conv1d(x))        d_conv taps per channel
    dt, B, C = x_proj(x)                        (Bt, T, dt_rank), (Bt, T, d_state), (Bt, T, d_state)
    delta = softplus(dt_proj(dt))               (Bt, T, E): the input-dependent step size, a rank-dt_rank map
    y = selective_scan(x, delta, A, B, C, D)    A = -exp(A_log) (E, d_state), S4D-real A_n = -(n+1)
    out = out_proj(y * SiLU(z))

The convolution, the SSM's input projections (x_proj, dt_proj) and the scan run in float32 (float64 when the
model is), whatever autocast asks, as the reference kernels compute the scan: the state adds up every earlier
position, and the step-by-step decoding state must agree with the full forward pass.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqbench.models.common import Dropout
from seqbench.models.transformer import MultiHeadAttention, init_linear

from . import kernels
from .scan import selective_scan, ssm_step

DT_INIT_FLOOR = 1e-4  # the reference implementation's lower bound on the initial step size


def default_dt_rank(d_model: int) -> int:
    """dt_rank=null: ceil(d_model / 16), as the reference implementation."""
    return math.ceil(d_model / 16)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32, or float64 for a float64 model: the precision of the convolution and the scan."""
    return torch.promote_types(x.dtype, torch.float32)


class MambaMixer(nn.Module):
    """The Mamba block's mixer, (Bt, T, d_model) -> (Bt, T, d_model), causal; see the module docstring.

    Initialisation as the reference implementation (``mamba_simple.Mamba`` and ``MixerModel._init_weights``):
    PyTorch's default for in_proj, conv1d and x_proj; dt_proj's weight U(-dt_rank^-1/2, dt_rank^-1/2) and its
    bias the inverse softplus of dt drawn log-uniformly from [dt_min, dt_max] (at least 1e-4), so that the initial
    step sizes cover that range; A_log = log(1..d_state) per channel; D = 1; out_proj's default weight divided by
    sqrt(n_residuals), the number of residual branches that add into the stream it writes to.
    """

    def __init__(self, d_model: int, *, d_state: int, d_conv: int, expand: int, dt_rank: int | None,
                 dt_min: float, dt_max: float, chunk_size: int, n_residuals: int):
        super().__init__()
        E, R = expand * d_model, dt_rank or default_dt_rank(d_model)
        self.d_inner, self.d_state, self.d_conv, self.dt_rank, self.chunk_size = E, d_state, d_conv, R, chunk_size
        self.in_proj = nn.Linear(d_model, 2 * E, bias=False)
        self.conv1d = nn.Conv1d(E, E, d_conv, groups=E, bias=True)  # depthwise; left padding in conv()
        self.x_proj = nn.Linear(E, R + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        self.out_proj = nn.Linear(E, d_model, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(E, 1))
        self.D = nn.Parameter(torch.ones(E))
        with torch.no_grad():
            nn.init.uniform_(self.dt_proj.weight, -R**-0.5, R**-0.5)
            log_dt = torch.rand(E) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
            dt = torch.exp(log_dt).clamp(min=DT_INIT_FLOOR)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(bias) = dt
            self.out_proj.weight.div_(math.sqrt(n_residuals))

    def conv(self, x: torch.Tensor) -> torch.Tensor:
        """SiLU of the causal depthwise convolution, x (Bt, T, E) -> (Bt, T, E) in the compute dtype."""
        if kernels.conv_kernel_applies(x):
            return kernels.conv_silu(x, self.conv1d.weight.to(x.dtype), self.conv1d.bias.to(x.dtype))
        padded = F.pad(x.transpose(1, 2), (self.d_conv - 1, 0))  # (Bt, E, d_conv - 1 + T)
        out = F.conv1d(padded, self.conv1d.weight.to(x.dtype), self.conv1d.bias.to(x.dtype), groups=self.d_inner)
        return F.silu(out).transpose(1, 2)

    def ssm_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (..., E) -> delta (..., E), B, C (..., d_state) and A (E, d_state), in the dtype of x."""
        dt, B, C = F.linear(x, self.x_proj.weight.to(x.dtype)).split([self.dt_rank, self.d_state, self.d_state], -1)
        delta = F.softplus(F.linear(dt, self.dt_proj.weight.to(x.dtype), self.dt_proj.bias.to(x.dtype)))
        return delta, B, C, -torch.exp(self.A_log.to(x.dtype))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u (Bt, T, d_model) -> (Bt, T, d_model), from the zero state."""
        x, z = self.in_proj(u).chunk(2, dim=-1)
        with torch.autocast(u.device.type, enabled=False):
            x = self.conv(x.to(compute_dtype(x)))
            delta, B, C, A = self.ssm_inputs(x)
            D = self.D.to(x.dtype)
            if kernels.scan_kernel_applies(x, None):
                y, _ = kernels.scan(x, delta, A, B, C, D)
            else:
                y, _ = selective_scan(x, delta, A, B, C, D, chunk_size=self.chunk_size)
        return self.out_proj(y * F.silu(z))

    def initial_state(self, batch: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoding state before the first position: the convolution's window of the last d_conv - 1 inputs
        (batch, E, d_conv - 1) and the SSM state (batch, E, d_state), zeros in the compute dtype of ``like``."""
        dtype = compute_dtype(like)
        return (like.new_zeros(batch, self.d_inner, self.d_conv - 1, dtype=dtype),
                like.new_zeros(batch, self.d_inner, self.d_state, dtype=dtype))

    def step(self, u: torch.Tensor, conv_state: torch.Tensor,
             ssm_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One position u (Bt, d_model) -> (output (Bt, d_model), next conv_state, next ssm_state); the states
        keep their sizes (see :meth:`initial_state`), however many positions have been decoded."""
        x, z = self.in_proj(u).chunk(2, dim=-1)
        with torch.autocast(u.device.type, enabled=False):
            window = torch.cat([conv_state, x.to(conv_state.dtype)[:, :, None]], dim=-1)  # (Bt, E, d_conv)
            weight, bias = self.conv1d.weight[:, 0].to(window.dtype), self.conv1d.bias.to(window.dtype)
            x = F.silu((window * weight).sum(-1) + bias)  # (Bt, E)
            delta, B, C, A = self.ssm_inputs(x)
            y, ssm_state = ssm_step(x, delta, A, B, C, self.D.to(x.dtype), ssm_state)
        return self.out_proj(y * F.silu(z)), window[:, :, 1:], ssm_state


class MambaBlock(nn.Module):
    """Pre-norm residual block of the language model: ``x + dropout(mixer(RMSNorm(x)))``, (Bt, T, D) -> (Bt, T, D)."""

    def __init__(self, d_model: int, dropout: float, **mixer):
        super().__init__()
        self.norm, self.mixer, self.drop = nn.RMSNorm(d_model, eps=1e-5), MambaMixer(d_model, **mixer), Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.mixer(self.norm(x)))


def reverse_within_lengths(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(Bt,) lengths -> (Bt, max_len) positions that reverse each sequence within its length and leave its padding
    where it is: ``n - 1 - t`` for ``t < n``, ``t`` after. The permutation is its own inverse."""
    t = torch.arange(max_len, device=lengths.device)[None, :]
    n = lengths[:, None]
    return torch.where(t < n, n - 1 - t, t)


class BidirectionalLayer(nn.Module):
    """Encoder layer: ``x + dropout(forward(RMSNorm(x)) + reverse(backward(reverse(RMSNorm(x)))))``.

    Two mixers with parameters of their own, one reading the sentence left to right, one right to left, outputs
    summed. ``reverse`` reverses each sentence within its length (:func:`reverse_within_lengths`), so in both
    directions the padding comes after the words, and a causal mixer never lets it reach them.
    """

    def __init__(self, d_model: int, dropout: float, **mixer):
        super().__init__()
        self.norm = nn.RMSNorm(d_model, eps=1e-5)
        self.forward_mixer, self.backward_mixer = MambaMixer(d_model, **mixer), MambaMixer(d_model, **mixer)
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor, reverse: torch.Tensor) -> torch.Tensor:
        """x (Bt, S, D); reverse (Bt, S) from :func:`reverse_within_lengths`."""
        y = self.norm(x)
        index = reverse[:, :, None].expand_as(y)
        backward = self.backward_mixer(y.gather(1, index)).gather(1, index)
        return x + self.drop(self.forward_mixer(y) + backward)


def cross_attention(d_model: int, n_heads: int, dropout: float) -> MultiHeadAttention:
    """The Transformer's cross-attention (SDPA) with Xavier-uniform weights and zero biases, as the Transformer's."""
    attention = MultiHeadAttention(d_model, n_heads, dropout, cross=True)
    init_linear(attention)
    return attention


class DecoderLayer(nn.Module):
    """Decoder layer: a causal Mamba residual block, then a cross-attention residual block, both pre-norm."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, attn_dropout: float, **mixer):
        super().__init__()
        self.mixer_norm, self.mixer = nn.RMSNorm(d_model, eps=1e-5), MambaMixer(d_model, **mixer)
        self.cross_norm, self.cross = nn.RMSNorm(d_model, eps=1e-5), cross_attention(d_model, n_heads, attn_dropout)
        self.drop = Dropout(dropout)

    def attend(self, y: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The cross-attention residual block, y (Bt, T, D) -> (Bt, T, D)."""
        return y + self.drop(self.cross.attend_to(self.cross_norm(y), k, v, mask))

    def forward(self, y: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """y (Bt, T, D); k, v of this layer's cross-attention; mask (Bt, 1, 1, S) True at the words."""
        return self.attend(y + self.drop(self.mixer(self.mixer_norm(y))), k, v, mask)

    def step(self, y: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, conv_state: torch.Tensor,
             ssm_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One position y (Bt, 1, D) -> (output (Bt, 1, D), next conv_state, next ssm_state)."""
        out, conv_state, ssm_state = self.mixer.step(self.mixer_norm(y)[:, 0], conv_state, ssm_state)
        return self.attend(y + self.drop(out[:, None]), k, v, mask), conv_state, ssm_state
