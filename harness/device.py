"""The device a job runs on: chosen from a setting, and synchronised around timed windows."""
from __future__ import annotations

import torch


def pick(name: str) -> torch.device:
    """``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; CUDA asked for but absent fails."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} but CUDA is not available; use device=cpu or device=auto")
    return device


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so a timer measures the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
