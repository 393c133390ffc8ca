"""The CUDA kernels of the reference implementation (``mamba_ssm``'s selective scan, ``causal_conv1d``), used
when they are installed (the optional ``kernels`` extra) and the tensors are on a GPU; pure PyTorch otherwise.

Both kernels take channels before time, (Bt, E, T); these wrappers take and return the models' (Bt, T, E).
"""
from __future__ import annotations

import torch

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
except Exception:  # noqa: BLE001 (absent, or built for another CUDA/torch: the pure PyTorch scan serves)
    selective_scan_fn = None
try:
    from causal_conv1d import causal_conv1d_fn
except Exception:  # noqa: BLE001 (as above: the PyTorch convolution serves)
    causal_conv1d_fn = None


def scan_kernel_applies(x: torch.Tensor, h0: torch.Tensor | None) -> bool:
    """Whether the selective-scan kernel computes this scan: installed, on CUDA, from the zero state (the kernel
    takes no initial state)."""
    return selective_scan_fn is not None and x.is_cuda and h0 is None


def conv_kernel_applies(x: torch.Tensor) -> bool:
    """Whether the causal-convolution kernel computes this convolution: installed and on CUDA."""
    return causal_conv1d_fn is not None and x.is_cuda


def scan(x: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
         D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``scan.reference_scan`` from the zero state by the kernel: x, delta (Bt,T,E), A (E,N), B, C (Bt,T,N), D (E,)
    -> (y (Bt,T,E), the last state (Bt,E,N))."""
    y, last = selective_scan_fn(x.transpose(1, 2).contiguous(), delta.transpose(1, 2).contiguous(), A.contiguous(),
                                B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), D.contiguous(),
                                return_last_state=True)
    return y.transpose(1, 2), last


def conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """SiLU of the depthwise causal convolution by the kernel: x (Bt,T,E), weight (E,1,K), bias (E,) -> (Bt,T,E)."""
    return causal_conv1d_fn(x.transpose(1, 2).contiguous(), weight[:, 0].contiguous(), bias,
                            activation="silu").transpose(1, 2)
