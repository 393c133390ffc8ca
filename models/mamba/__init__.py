"""Mamba (Gu & Dao 2023): selective state-space mixers, an encoder-decoder and a language model.

``block`` holds the mixer and the residual layers, ``scan`` the selective scan (the sequential reference and the
chunked form used in training), ``kernels`` the optional CUDA kernels, ``model`` the two model forms.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from seqbench.models.registry import Architecture

from .model import MambaLM, MambaSeq2Seq


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _positive_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf")


SETTINGS = {
    "d_state": (_positive_int, "a positive integer (the SSM state size N per channel; the paper's 16)"),
    "d_conv": (_positive_int, "a positive integer (the causal convolution's taps; the paper's 4)"),
    "expand": (_positive_int, "a positive integer (inner width = expand * d_model; the paper's 2)"),
    "dt_rank": (lambda v: v is None or _positive_int(v), "a positive integer or null (ceil(d_model / 16))"),
    "chunk_size": (_positive_int, "a positive integer (positions per chunk of the parallel scan; 64)"),
    "dt_min": (_positive_number, "a positive finite number (smallest initial step size; the paper's 0.001)"),
    "dt_max": (_positive_number, "a positive finite number (largest initial step size; the paper's 0.1)"),
}


def check(hp: Mapping[str, Any]) -> list[str]:
    """Settings that must fit together: the initial step sizes' range."""
    if hp["dt_min"] > hp["dt_max"]:
        return [f"model.dt_min={hp['dt_min']} is more than model.dt_max={hp['dt_max']}: the initial step sizes are "
                "drawn from [dt_min, dt_max]; set dt_min <= dt_max (the paper's 0.001 and 0.1)"]
    return []


ARCHITECTURE = Architecture(
    name="mamba", seq2seq=MambaSeq2Seq, lm=MambaLM, settings=SETTINGS, check=check,
    lm_ignores=("n_heads", "attn_dropout", "share_embeddings"),
    description="Gu & Dao 2023")

__all__ = ["ARCHITECTURE", "MambaLM", "MambaSeq2Seq"]
