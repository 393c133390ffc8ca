"""Rotary position embeddings (RoPE; Su et al. 2021, "RoFormer", arXiv:2104.09864, section 3.4).

Feature pairs ``(2i, 2i+1)`` of a query or key at absolute position ``m`` are rotated by the angle
``m * theta_i`` with ``theta_i = base^(-2i/d)`` (eq. 15, 34): the 2-d rotation of pair ``i`` is
``[[cos, -sin], [sin, cos]]``. Since rotations compose, ``<R_m q, R_n k> = <q, R_{n-m} k>``: the attention
score depends on the positions only through ``n - m`` (section 3.4.2), which is why no absolute position
encoding is added to the embeddings.

This is the fast form (one broadcast product over all positions); :mod:`.reference` builds the rotation
matrices one position at a time.
"""
from __future__ import annotations

import torch
from torch import nn


def rope_angles(n: int, dim: int, base: float, offset: int = 0,
                device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles of positions ``offset .. offset+n-1``: each (n, dim/2) float32.

    Computed on the fly (a few thousand products, against the attention's T^2 d): there is no cached table that
    could be cast to a low precision with the model or need to grow with the sequence length.
    """
    inv_freq = base ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)  # theta_i, (dim/2,)
    positions = torch.arange(offset, offset + n, device=device, dtype=torch.float32)
    angles = positions[:, None] * inv_freq[None, :]  # (n, dim/2): m * theta_i
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the feature pairs ``(2i, 2i+1)`` of x (..., T, dim) by the angles whose cos/sin are (T, dim/2).

    The rotation runs in float32 and the result has x's dtype (under bf16 autocast the projections are bf16; a
    bf16 angle would lose the position for m beyond a few hundred).
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # (..., T, dim/2, 2)
    x1, x2 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to queries or keys (B,H,T,dh) at positions ``offset .. offset+T-1``; no parameters."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"RoPE rotates pairs of features, so the head size must be even; got {dim}")
        self.dim, self.base = dim, float(base)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        cos, sin = rope_angles(x.size(-2), self.dim, self.base, offset, x.device)
        return apply_rope(x, cos, sin)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base:g}"
