"""The gated linear attention recurrence (Yang et al. 2024, arXiv:2312.06635) in two pure-PyTorch forms.

Per head, with a matrix state ``S_t`` (d_k x d_v) and a forget gate ``alpha_t`` in (0, 1]^{d_k}::

    S_t = diag(alpha_t) S_{t-1} + k_t^T v_t,        o_t = q_t S_t

* :func:`recurrent_gla` is the reference: a loop over time with the state, exactly the equation above.
* :func:`chunkwise_gla` is the chunkwise-parallel form used in training (paper, section 4): the sequence is
  cut into chunks of ``chunk_size`` positions; the state is carried from chunk to chunk (one step per chunk), and
  inside a chunk the outputs come from an attention-like lower-triangular matrix built from the cumulative
  log-gates, itself cut into sub-chunks (the paper's secondary chunking).

Every tensor is batch first, time second, heads third (the layout of the flash-linear-attention kernels):
``q, k`` (B,T,H,d_k), ``v`` (B,T,H,d_v), ``log_alpha`` (B,T,H,d_k) = log of the forget gate (<= 0), state
(B,H,d_k,d_v). Queries arrive already scaled.

Exactness in fp32. Decays are products of gates, ``exp`` of sums of ``log_alpha``. The chunkwise form never takes
``exp`` of a positive number (no overflow: every exponent is a sum of log-gates over an interval, <= 0), and never
forms a decay as the difference of two running sums (``P_t - P_s`` loses the digits of a small decay next to a large
running sum, e.g. after a gate near 0). Each exponent is a direct sum over its own interval; as all terms share a
sign, such a sum is accurate to a few units in the last place of its own value, so the decays are as exact as the
reference's products of gates.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SUB_CHUNK = 16  # the secondary chunk: the largest divisor of chunk_size up to this (the paper's and fla's 16)


def recurrent_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
                   state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One time step: q, k, log_alpha (B,H,d_k), v (B,H,d_v), state (B,H,d_k,d_v) -> o (B,H,d_v), new state."""
    state = log_alpha.exp()[..., None] * state + k[..., None] * v[..., None, :]
    return torch.einsum("bhk,bhkv->bhv", q, state), state


def recurrent_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor,
                  initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: a loop over time. Returns o (B,T,H,d_v) and the final state (B,H,d_k,d_v)."""
    B, T, H, d_k = q.shape
    state = q.new_zeros(B, H, d_k, v.size(-1)) if initial_state is None else initial_state
    outputs = []
    for t in range(T):
        o, state = recurrent_step(q[:, t], k[:, t], v[:, t], log_alpha[:, t], state)
        outputs.append(o)
    return torch.stack(outputs, dim=1), state


def sub_chunk_size(chunk_size: int) -> int:
    """The largest divisor of ``chunk_size`` that is at most :data:`SUB_CHUNK` (16 for the usual 64)."""
    return max(c for c in range(1, min(chunk_size, SUB_CHUNK) + 1) if chunk_size % c == 0)


def chunk_layout(T: int, chunk_size: int) -> tuple[int, int]:
    """The chunk and sub-chunk lengths the chunkwise form uses for a sequence of T positions: ``chunk_size`` and
    :func:`sub_chunk_size`, except that a sequence shorter than a chunk is cut into one chunk of as many whole
    sub-chunks as it needs (T = 20 with chunk_size 64: one chunk of 32, not 64 positions of which 44 are padding).
    The result is the same whatever the chunk; only the padded work differs."""
    c = sub_chunk_size(chunk_size)
    return min(chunk_size, c * -(-T // c)), c


def chunkwise_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor, chunk_size: int,
                  initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunkwise-parallel form; equal to :func:`recurrent_gla` (same arguments, plus ``chunk_size``).

    Chunks of C positions, each cut into N sub-chunks of c positions (:func:`chunk_layout`). The sequence is
    padded to a whole number of chunks with k = v = 0 and log_alpha = 0 (gate 1): padded steps leave the state as it
    is, so the final state is the state after position T - 1.

    Within a chunk, output t sums over the chunk's earlier positions s <= t the terms
    ``(q_t * exp(sum_{r in (s, t]} g_r)) . k_s  v_s`` (g = log_alpha):

    * s, t in the same sub-chunk: the (c, c, d_k) tensor of exponents, in log space, masked to s <= t;
    * s in an earlier sub-chunk j: the decay splits at the end e_j of sub-chunk j into two factors <= 1,
      ``q_t * exp(sum (e_j, t])`` and ``k_s * exp(sum (s, e_j])``, whose product over d_k is a matrix product.

    Across chunks the state entering chunk n carries the earlier positions:
    ``o_t += (q_t * exp(sum [chunk start, t])) S_{n-1}`` and
    ``S_n = exp(sum over the chunk) S_{n-1} + sum_s (k_s * exp(sum (s, chunk end]))^T v_s``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer; got {chunk_size}")
    B, T, H, d_k = q.shape
    d_v = v.size(-1)
    C, c = chunk_layout(T, chunk_size)
    N, n = C // c, -(-T // C)  # sub-chunks per chunk, chunks

    def split(x: torch.Tensor) -> torch.Tensor:  # (B,T,H,d) -> (B,H,n,N,c,d), zero-padded to n*C positions
        x = F.pad(x.transpose(1, 2), (0, 0, 0, n * C - T))
        return x.reshape(B, H, n, N, c, x.size(-1))

    q, k, v, g = split(q), split(k), split(v), split(log_alpha)
    ones = dict(dtype=g.dtype, device=g.device)

    # sums of g within each sub-chunk: inclusive prefix [start, t], exclusive suffix (s, end], and the total
    prefix = g.cumsum(-2)  # (B,H,n,N,c,d_k)
    suffix = torch.cat([g.flip(-2).cumsum(-2).flip(-2)[..., 1:, :], torch.zeros_like(g[..., :1, :])], dim=-2)
    total = prefix[..., -1, :]  # (B,H,n,N,d_k)

    # sums of whole sub-chunks between two of them, each a direct sum over its sub-chunks
    idx = torch.arange(N, device=g.device)
    between = ((idx[None, :, None] < idx[None, None, :]) & (idx[None, None, :] < idx[:, None, None])).to(**ones)
    before, after = (idx[None, :] < idx[:, None]).to(**ones), (idx[None, :] > idx[:, None]).to(**ones)  # (N,N)

    # 1. within a sub-chunk: exponent sum (s, t] = sum_r [s < r <= t] g_r, masked to s <= t
    pos = torch.arange(c, device=g.device)
    interval = ((pos[None, :, None] < pos[None, None, :]) & (pos[None, None, :] <= pos[:, None, None])).to(**ones)
    decay = torch.einsum("tsr,bhnird->bhnitsd", interval, g)  # (B,H,n,N,c,c,d_k)
    decay = torch.where(pos[:, None, None] >= pos[None, :, None], decay, float("-inf")).exp()
    diagonal = torch.einsum("bhnitd,bhnisd,bhnitsd->bhnits", q, k, decay)  # (B,H,n,N,c,c)
    out = torch.einsum("bhnits,bhnisv->bhnitv", diagonal, v)

    # 2. from earlier sub-chunks j < i of the same chunk, split at the end of sub-chunk j
    if N > 1:
        gap = torch.einsum("ijm,bhnmd->bhnijd", between, total)  # sum over sub-chunks j < m < i
        q_side = prefix[..., :, None, :, :] + gap[..., None, :]  # (B,H,n,N_i,N_j,c,d_k): sum (e_j, t]
        earlier = (idx[None, :] < idx[:, None])[:, :, None, None]
        q_side = q[..., :, None, :, :] * torch.where(earlier, q_side, float("-inf")).exp()
        k_side = k * suffix.exp()  # (B,H,n,N,c,d_k): sum (s, e_j]
        scores = torch.einsum("bhnijtd,bhnjsd->bhnijts", q_side, k_side)
        out = out + torch.einsum("bhnijts,bhnjsv->bhnitv", scores, v)

    # 3. from earlier chunks, through the state entering each chunk
    q_decay = prefix + torch.einsum("im,bhnmd->bhnid", before, total)[..., None, :]  # sum [chunk start, t]
    k_decay = suffix + torch.einsum("jm,bhnmd->bhnjd", after, total)[..., None, :]  # sum (s, chunk end]
    chunk_total = total.sum(-2)  # (B,H,n,d_k)
    updates = torch.einsum("bhnjsd,bhnjsv->bhndv", k * k_decay.exp(), v)  # (B,H,n,d_k,d_v)
    state = q.new_zeros(B, H, d_k, d_v) if initial_state is None else initial_state
    entering = []
    for chunk in range(n):
        entering.append(state)
        state = chunk_total[:, :, chunk].exp()[..., None] * state + updates[:, :, chunk]
    out = out + torch.einsum("bhnitd,bhndv->bhnitv", q * q_decay.exp(), torch.stack(entering, dim=2))

    out = out.reshape(B, H, n * C, d_v)[:, :, :T].transpose(1, 2)  # (B,T,H,d_v)
    return out, state
