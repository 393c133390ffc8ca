"""Training-step benchmark: a seqbench model against a plain-PyTorch baseline, in one process.

    python -m harness.bench --preset transformer_base --device cuda --precision bf16 --compile

Both models get the same random batch (``batch`` sentences of ``src_len`` + ``tgt_len``
tokens, no padding), the same loss (label-smoothed cross-entropy), and Adam. Timing:
``warmup`` steps first (compilation included), the device synchronized around each timed
step, the median and the spread of ``steps`` steps reported. Tokens are target tokens.
Model FLOPs per step come from torch's FLOP counter (forward + backward), so MFU is
FLOPs / time / the measured bf16 (or fp32) matmul ceiling.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import models
from models.common import PAD, padding_mask

from .train import autocast_for

ROOT = Path(__file__).resolve().parents[1]


class PlainTransformer(nn.Module):
    """``nn.Transformer`` with tied, scaled embeddings (no position encodings: they cost nothing measurable)."""

    def __init__(self, vocab: int, d_model: int, n_heads: int, n_layers: int, d_ff: int, dropout: float):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model, padding_idx=PAD)
        self.core = nn.Transformer(d_model, n_heads, n_layers, n_layers, d_ff, dropout, batch_first=True)
        self.proj = nn.Linear(d_model, vocab, bias=False)
        self.proj.weight = self.embed.weight
        self.scale = d_model**0.5

    def forward(self, src, src_lengths, tgt_in):
        T = tgt_in.size(1)
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=tgt_in.device)
        pad = padding_mask(src_lengths, src.size(1))
        y = self.core(self.embed(src) * self.scale, self.embed(tgt_in) * self.scale, tgt_mask=causal,
                      src_key_padding_mask=pad, memory_key_padding_mask=pad, tgt_is_causal=True)
        return self.proj(y)


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int = 8192, reps: int = 10) -> float:
    """Measured FLOP/s of an n x n x n matrix product."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_training(model, batch, *, device, precision, compile_model, steps, warmup) -> dict:
    model = model.to(device).train()
    fwd = torch.compile(model) if compile_model else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9, fused=device.type == "cuda")
    _, autocast = autocast_for(device, precision)
    src, lengths, tgt_in, tgt_out = (t.to(device) for t in batch)

    def step():
        with autocast():
            logits = fwd(src, lengths, tgt_in)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tgt_out.flatten(), ignore_index=PAD, label_smoothing=0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    with FlopCounterMode(display=False) as counter:
        with autocast():
            logits = model(src, lengths, tgt_in)
        F.cross_entropy(logits.flatten(0, 1).float(), tgt_out.flatten()).backward()
    opt.zero_grad(set_to_none=True)
    median = statistics.median(times)
    return {"median_s": median, "min_s": min(times), "max_s": max(times), "flops": counter.get_total_flops(),
            "tokens_per_s": tgt_out.numel() / median}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="transformer_base")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--src-len", type=int, default=50)
    ap.add_argument("--tgt-len", type=int, default=50)
    ap.add_argument("--vocab", type=int, default=37000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / f"{args.preset}.yaml"))
    if cfg["name"] != "transformer":
        raise SystemExit(f"--preset {args.preset}: the plain-PyTorch baseline here is nn.Transformer")
    task = SimpleNamespace(family="translation", src_vocab_size=args.vocab, tgt_vocab_size=args.vocab)
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, args.vocab, (args.batch, args.src_len), generator=g)
    tgt = torch.randint(4, args.vocab, (args.batch, args.tgt_len + 1), generator=g)
    batch = (src, torch.full((args.batch,), args.src_len), tgt[:, :-1], tgt[:, 1:])
    precision, _ = autocast_for(device, args.precision)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    ceiling = matmul_ceiling(device, dtype, n=8192 if device.type == "cuda" else 1024)
    rows = []
    for name, make in [
        ("plain nn.Transformer", lambda: PlainTransformer(args.vocab, cfg["d_model"], cfg["n_heads"], cfg["n_layers"],
                                                           cfg["d_ff"], cfg.get("dropout", 0.1))),
        (f"seqbench {args.preset}", lambda: models.build(cfg, task)),
    ]:
        torch.manual_seed(0)
        r = time_training(make(), batch, device=device, precision=precision, compile_model=args.compile,
                          steps=args.steps, warmup=args.warmup)
        r.update(name=name, mfu=r["flops"] / r["median_s"] / ceiling)
        rows.append(r)
    base = rows[0]["tokens_per_s"]
    print(f"device={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}) precision={precision} "
          f"compile={args.compile} batch={args.batch}x({args.src_len}+{args.tgt_len}) vocab={args.vocab} torch={torch.__version__}")
    print(f"matmul ceiling: {ceiling / 1e12:.1f} TFLOP/s")
    print(f"{'model':32s} {'ms/step (min-max)':>22s} {'tgt tok/s':>12s} {'ratio':>7s} {'MFU':>6s}")
    for r in rows:
        print(f"{r['name']:32s} {r['median_s'] * 1e3:8.1f} ({r['min_s'] * 1e3:.1f}-{r['max_s'] * 1e3:.1f}) "
              f"{r['tokens_per_s']:12,.0f} {r['tokens_per_s'] / base:7.2f} {r['mfu']:6.1%}")
    return rows


if __name__ == "__main__":
    main()
