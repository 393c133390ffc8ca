"""The selective scan of Mamba (Gu & Dao 2023, section 3.2, Algorithm 2), in pure PyTorch.

The recurrence, per channel e of the inner width E and state dimension n of N (diagonal A)::

    h_t = exp(delta_t A) * h_{t-1} + delta_t B_t x_t      h_t: (E, N)
    y_t = C_t . h_t + D x_t

Shapes throughout (batch first, time second, as the models keep their activations):
``x, delta`` (Bt, T, E); ``A`` (E, N) with entries < 0; ``B, C`` (Bt, T, N); ``D`` (E,); a state ``h``
(Bt, E, N). ``delta`` is the step size after the softplus (and its bias). Every function returns the output
``y`` (Bt, T, E) and the state after the last position, so a later call can continue from it.

:func:`reference_scan` is the recurrence written as a loop over time, the plain definition the faster forms are
tested against. :func:`chunked_scan` is the fast form: the sequence is cut into chunks of ``chunk_size``
positions, every chunk's states are computed from its own inputs in parallel (log-depth doubling over the
chunk, decays from sums of ``delta A`` in log space), and a short sequential carry over the chunks adds the
state each chunk starts from. :func:`selective_scan` is the training form: the chunked scan on an accelerator, the loop on a CPU
(faster there, see its docstring), either recomputing its intermediate states in the backward pass instead of
storing them (section 3.3.2 of the paper), which keeps a training step's memory at the size of the inputs: the
states are (Bt, T, E, N), N times the activations.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _initial_state(x: torch.Tensor, A: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """``h0`` or the zero state (Bt, E, N) in the dtype of ``x``."""
    return x.new_zeros(x.size(0), *A.shape) if h0 is None else h0.to(x.dtype)


def ssm_step(x: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             D: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One position: x, delta (Bt, E), B, C (Bt, N), h (Bt, E, N) -> (y (Bt, E), the next state h (Bt, E, N))."""
    h = torch.exp(delta[..., None] * A) * h + (delta * x)[..., None] * B[:, None, :]
    return (h * C[:, None, :]).sum(-1) + D * x, h


def reference_scan(x: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor, h0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence as a loop over time (see the module docstring for the shapes)."""
    h = _initial_state(x, A, h0)
    ys = []
    for t in range(x.size(1)):
        y, h = ssm_step(x[:, t], delta[:, t], A, B[:, t], C[:, t], D, h)
        ys.append(y)
    return torch.stack(ys, dim=1), h


def chunked_scan(x: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 D: torch.Tensor, h0: torch.Tensor | None = None,
                 chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence computed chunk by chunk, each chunk in parallel over its positions.

    Within a chunk of L positions, with ``a_s = delta_s A <= 0`` (log decays) and ``u_s = delta_s B_s x_s``:

    * ``S_t = a_1 + ... + a_t`` (a cumulative sum: every term has the same sign, so nothing cancels), and the
      state is ``h_t = exp(S_t) h_start + b_t`` where ``b_t = sum_{s<=t} exp(a_{s+1} + ... + a_t) u_s`` is what
      the chunk's own inputs contribute;
    * ``b`` comes from log2(L) doubling steps (Hillis & Steele): after the step of width k, ``b_t`` holds the
      sum over s in (t-k, t] and ``w_t`` the log decay ``a_{t-k+1} + ... + a_t`` across that window; the next
      step adds ``exp(w_t) b_{t-k}`` and ``w_{t-k}``. Only sums of log decays are exponentiated, each <= 0, so
      nothing overflows however fast the state decays (a cumulative product divided back out would);
    * ``h_start`` of each chunk: a sequential carry over the chunks, ``h <- exp(S_L) h + b_L``, one (Bt, E, N)
      update per chunk.

    A length T that ``chunk_size`` does not divide is padded with ``delta = 0`` (decay 1, no input), which leaves
    the state as it is: the returned state is the one after position T-1.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of positions; got {chunk_size}")
    Bt, T, E = x.shape
    N = A.size(1)
    L = min(chunk_size, T)
    n_chunks = -(-T // L)
    pad = n_chunks * L - T
    if pad:
        x, delta, B, C = (F.pad(t, (0, 0, 0, pad)) for t in (x, delta, B, C))
    a = (delta[..., None] * A).view(Bt, n_chunks, L, E, N)  # log decays, <= 0
    b = ((delta * x)[..., None] * B[:, :, None, :]).view(Bt, n_chunks, L, E, N)  # inputs u
    S = a.cumsum(dim=2)  # log decay from the chunk's start to each position
    w, k = a, 1
    while k < L:  # doubling: windows of k positions become windows of 2k
        b = torch.cat([b[:, :, :k], b[:, :, k:] + torch.exp(w[:, :, k:]) * b[:, :, :-k]], dim=2)
        w = torch.cat([w[:, :, :k], w[:, :, k:] + w[:, :, :-k]], dim=2)
        k *= 2
    h = _initial_state(x, A, h0)
    chunk_decay = torch.exp(S[:, :, -1])  # (Bt, n_chunks, E, N)
    starts = []
    for c in range(n_chunks):
        starts.append(h)
        h = chunk_decay[:, c] * h + b[:, c, -1]
    states = torch.exp(S) * torch.stack(starts, dim=1)[:, :, None] + b  # (Bt, n_chunks, L, E, N)
    y = (states * C.view(Bt, n_chunks, L, 1, N)).sum(-1).reshape(Bt, n_chunks * L, E)[:, :T]
    return y + D * x[:, :T], h


def selective_scan(x: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor, h0: torch.Tensor | None = None, chunk_size: int = 64,
                   form: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The training scan, its intermediate states recomputed in the backward pass when gradients are needed.

    ``form``: ``chunked`` (:func:`chunked_scan`, parallel over positions), ``sequential`` (:func:`reference_scan`,
    one (Bt, E, N) update per position), or ``auto``: chunked on an accelerator, sequential on a CPU. A CPU has
    no parallelism to gain from the doubling steps, which move log2(chunk) times the states through memory; the
    loop's per-position updates stay in cache (``python -m seqbench.harness.bench.scan``; the measured ratio in
    ``docs/models.md``).
    """
    if form not in ("auto", "chunked", "sequential"):
        raise ValueError(f"form must be auto, chunked or sequential; got {form!r}")
    if form == "auto":
        form = "sequential" if x.device.type == "cpu" else "chunked"
    scan = reference_scan if form == "sequential" else partial(chunked_scan, chunk_size=chunk_size)
    tensors = (x, delta, A, B, C, D) + (() if h0 is None else (h0,))
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return checkpoint(scan, x, delta, A, B, C, D, h0, use_reentrant=False)
    return scan(x, delta, A, B, C, D, h0)
