"""Mamba's training scan on this machine: the chunked form against the sequential one, forward and backward.

    python -m seqbench.harness.bench.scan --threads 1 [--shapes 200x20,32x128] [--inner 512] [--state 16]

Each shape is (batch, positions) of a (batch, positions, inner channels, states) scan, as
``models.mamba.scan.selective_scan`` trains it (states recomputed in the backward pass). The two forms are timed
interleaved in one process (``harness.bench.timing``); the ratio is the sequential form's speed over the chunked
form's (>1: sequential faster). ``selective_scan(form="auto")`` takes the sequential form on a CPU.
"""
from __future__ import annotations

import argparse
import platform

import torch

from seqbench.models.mamba.scan import selective_scan

from .timing import Contender, paired_ratio, summary, time_rounds


def step(form: str, inputs: list[torch.Tensor]):
    def call():
        for t in inputs:
            t.grad = None
        y, h = selective_scan(*inputs, form=form)
        (y.square().mean() + h.sum()).backward()
    return call


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shapes", default="200x20,32x128", help="batch x positions, comma-separated")
    ap.add_argument("--inner", type=int, default=512, help="inner channels (d_model x expand; the small preset's)")
    ap.add_argument("--state", type=int, default=16, help="d_state")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)")
    for shape in args.shapes.split(","):
        Bt, T = (int(v) for v in shape.split("x"))
        g = torch.Generator().manual_seed(0)
        E, N = args.inner, args.state
        inputs = [t.requires_grad_() for t in (
            torch.randn(Bt, T, E, generator=g), torch.rand(Bt, T, E, generator=g) * 0.1,
            -torch.arange(1, N + 1.0).repeat(E, 1), torch.randn(Bt, T, N, generator=g),
            torch.randn(Bt, T, N, generator=g), torch.ones(E))]
        seq, chunked = (Contender(form, step(form, inputs), Bt * T) for form in ("sequential", "chunked"))
        time_rounds([seq, chunked], device=torch.device("cpu"), rounds=args.rounds, calls=1, warmup=1)
        s, c, r = summary(seq), summary(chunked), paired_ratio(seq, chunked)
        print(f"{Bt}x{T}x{E}x{N}: sequential {s['median_s']:.3f} s, chunked {c['median_s']:.3f} s per forward and "
              f"backward; sequential/chunked speed {r['ratio']:.1f}x (rounds {r['ratio_min']:.1f}-{r['ratio_max']:.1f})")


if __name__ == "__main__":
    main()
