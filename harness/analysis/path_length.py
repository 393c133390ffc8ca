"""Path length: Table 1 of Vaswani et al. (2017, arXiv:1706.03762), measured from each language model's computation.

    python run.py -m experiment=path_length [model=lstm_tiny,gru_tiny] [path_length.n=[8,16]]
    python -m seqbench.harness.analysis.path_length --out results/path_length [--models transformer,lstm] [--n 8,16,32]

Both run the same job per model preset (:func:`run`) on the config Hydra composes from
conf/experiment/path_length.yaml; the module's command line also prints Table 1 as Markdown.

Nothing here knows an architecture; it uses the ``LanguageModel`` interface alone
(``embed``, ``mixing_blocks``, ``forward = head(blocks(embed(tokens)))``).

1. Pattern. Each block of ``model.mixing_blocks()`` runs in float64, eval mode (dropout off),
   on its real input from random tokens. ``deps[i, j]`` is True iff output position i has a
   non-zero gradient w.r.t. input position j: the Jacobian row by row, one backward pass per
   output position with a random cotangent over the features. Patterns are ORed over
   ``trials`` inputs, so a ReLU that happens to be off cannot hide a dependency.
2. Recurrence. A block is recurrent when its autograd graph gets deeper with the sequence
   length (it runs one step per position; measured at two probe lengths), or when it holds an
   ``nn.RNNBase``/``nn.RNNCellBase`` (a fused kernel shows as one node). Its dependencies are
   realised through the hidden state: one step to enter at position j, then one step per
   position along the chain, so input j reaches output i in ``1 + |i - j|`` steps; each row
   of its pattern must be an interval around the diagonal, the only thing a chain can realise.
   Any other block costs one step per dependency, near or far.
3. Paths. Stacks are the model's blocks in order, repeated cyclically where a deeper stack is
   needed (the same design, made deeper). Min-plus products, block by block, give the fewest
   steps from input j to output i at every depth; a pair's path length is its minimum over
   depths. ``max_path_length`` is the maximum over the pairs that any depth connects;
   ``min_depth_for_distance`` is the fewest stacked blocks connecting positions 0 and n - 1.
4. Check. The model's own forward pass (``embed`` replaced by x) gives the reachability of
   logits i from x_j; it must equal the boolean product of its blocks' patterns, else
   ``PathLengthError``: a block or head that mixes positions unseen cannot hide.

Exact values under these definitions (tests/test_path_length.py): self-attention 1; recurrent n
(1 + (n - 1)); causal convolution of width k: ceil((n-1)/(k-1)) blocks and steps; dilations
1, 2, 4, ...: ceil(log2((n-1)/(k-1) + 1)); restricted self-attention of window r: ceil((n-1)/r).

Also measured per n: sequential operations as the depth of the stacked blocks' autograd graph
(the longest chain of operations), FLOPs per block (torch's counter) and the forward latency
of one sequence on the device (float32, median of ``reps`` after warm-up, synchronized).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
import warnings
from collections import deque
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from seqbench import models
from seqbench.tasks.base import Shape

from .. import environment, schema
from ..device import pick, sync
from ..profile import flop_counter
from .influence import forward_from_embeddings

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = ROOT / "conf" / "experiment" / "path_length.yaml"  # the CLI's defaults (node ``path_length``)
VOCAB = 64
PROBE_LENGTHS = (8, 16)  # two lengths at which a recurrent block's graph depth differs
# Table 1 of the paper (and the contiguous/dilated convolutions and restricted attention of its
# section 4): complexity per layer, sequential operations, maximum path length.
THEORY = {
    "self-attention": ("O(n²·d)", "O(1)", "O(1)"),
    "recurrent": ("O(n·d²)", "O(n)", "O(n)"),
    "convolutional": ("O(k·n·d²)", "O(1)", "O(n/k)"),
    "dilated convolutional": ("O(k·n·d²)", "O(1)", "O(log_k(n))"),
    "restricted self-attention": ("O(r·n·d)", "O(1)", "O(n/r)"),
}
# Architectures whose paper entries the measured layer type does not give: a linear recurrence trained by a parallel
# (chunked) scan is recurrent in its sequential path (the state carries position j to i through i - j updates)
# but not in its parallel depth; the measured graph depth shows the chunked form's (n / chunk + the chunk's own).
THEORY_BY_ARCHITECTURE = {
    "transformer_pp": THEORY["self-attention"],
    "mamba": ("O(n·d·N) (state N)", "O(n) as a recurrence; O(log n) as a parallel scan", "O(n)"),
    "gla": ("O(n·d²/h) (h heads)", "O(n) as a recurrence; O(n/c) chunkwise (chunk c)", "O(n)"),
}
ATTENTION_OPS = ("softmax", "scaled_dot_product_attention")
INF = float("inf")


class PathLengthError(RuntimeError):
    """A model's blocks do not account for its computation, or a recurrent pattern is not a chain."""


# ---------------------------------------------------------------- one block's computation

def dependencies(fn, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """deps (n_out, n_in) bool: output position i of fn(x) has a non-zero gradient w.r.t. input position j.

    Args:
        fn: (1, n, D) -> (1, n_out, E), run once with x as its input.
        x: (1, n, D) input.
    """
    x = x.detach().requires_grad_(True)
    y = fn(x)  # (1,n_out,E)
    n_out = y.size(1)
    rows = torch.arange(n_out)
    cotangents = torch.zeros((n_out, *y.shape), dtype=y.dtype)  # (n_out,1,n_out,E): one per output position
    cotangents[rows, 0, rows] = torch.randn(n_out, y.size(-1), generator=generator, dtype=y.dtype)
    try:
        with warnings.catch_warnings():  # vmap falls back to a loop for ops without a batching rule
            warnings.simplefilter("ignore")
            grads = torch.autograd.grad(y, x, cotangents, is_grads_batched=True)[0]  # (n_out,1,n,D)
    except RuntimeError:  # an op vmap cannot batch at all: one backward pass per row
        grads = torch.stack([torch.autograd.grad(y, x, c, retain_graph=True)[0] for c in cotangents])
    return (grads[:, 0] != 0).any(-1)  # (n_out,n)


def graph_depth(t: torch.Tensor) -> int:
    """Autograd nodes on the longest chain that produced t: its sequential operations."""
    depth: dict = {}
    stack = [(t.grad_fn, False)]
    while stack:  # iterative post-order: a recurrence of n steps is thousands of nodes deep
        node, expanded = stack.pop()
        if node is None or (node in depth and not expanded):
            continue
        children = [c for c, _ in node.next_functions if c is not None]
        if expanded:
            depth[node] = 1 + max((depth[c] for c in children), default=0)
        else:
            stack.append((node, True))
            stack.extend((c, False) for c in children if c not in depth)
    return depth.get(t.grad_fn, 0)


class _CallNames(TorchFunctionMode):
    """Records the names of the torch functions called inside it."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def calls_attention(block: nn.Module, x: torch.Tensor) -> bool:
    """Whether the block weighs positions by a softmax (an attention layer)."""
    with torch.no_grad(), _CallNames() as calls:
        block(x)
    return any(op in name for name in calls.names for op in ATTENTION_OPS)


def is_recurrent(block: nn.Module, width: int) -> bool:
    """A block whose autograd graph deepens with the sequence length, or one holding an RNN module."""
    depths = [graph_depth(block(torch.randn(1, n, width, dtype=torch.float64, requires_grad=True)))
              for n in PROBE_LENGTHS]
    return depths[1] > depths[0] or any(isinstance(m, (nn.RNNBase, nn.RNNCellBase)) for m in block.modules())


def block_type(deps: torch.Tensor, recurrent: bool, attention: bool) -> str:
    """The layer type a (n,n) pattern shows: recurrent, (restricted) self-attention, (dilated) convolution."""
    if recurrent:
        return "recurrent"
    n = deps.size(0)
    offsets = [(i - torch.nonzero(deps[i])[:, 0]).tolist() for i in range(n)]  # i - j per row
    if all(o == [0] for o in offsets):
        return "position-wise"
    whole = torch.equal(deps, torch.ones_like(deps).tril()) or bool(deps.all())
    gaps = any(len(o) != max(o) - min(o) + 1 for o in offsets if o)
    if attention:
        return "self-attention" if whole else "restricted self-attention"
    if whole:
        return "global mixing"
    return "dilated convolutional" if gaps else "convolutional"


def model_layer_type(types: list[str]) -> str:
    kinds = sorted(set(types) - {"position-wise"}) or ["position-wise"]
    if kinds == ["convolutional", "dilated convolutional"]:
        return "dilated convolutional"
    return "+".join(kinds)


# ---------------------------------------------------------------- paths through stacks

def step_lengths(deps: torch.Tensor, recurrent: bool) -> torch.Tensor:
    """(n,n) float64 steps from input j to output i of one block; inf where i does not depend on j."""
    n = deps.size(0)
    if recurrent:
        for i in range(n):
            js = torch.nonzero(deps[i])[:, 0]
            if not deps[i, i] or len(js) != int(js.max() - js.min()) + 1:
                raise PathLengthError(f"recurrent block: output {i} depends on inputs {js.tolist()}, which a chain "
                                      "through the hidden state cannot realise")
        pos = torch.arange(n, dtype=torch.float64)
        cost = 1 + (pos[:, None] - pos[None, :]).abs()  # enter at j, then one step per position
    else:
        cost = torch.ones(n, n, dtype=torch.float64)
    return torch.where(deps, cost, torch.full_like(cost, INF))


def min_plus(w: torch.Tensor, d: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """(w ⊗ d)[i, j] = min_k w[i, k] + d[k, j], in row chunks to bound memory."""
    return torch.cat([(w[i:i + chunk, :, None] + d[None]).amin(1) for i in range(0, w.size(0), chunk)])


def shortest_paths(steps: list[torch.Tensor], max_depth: int) -> dict:
    """Fewest steps between every pair over stacks of the blocks (cycled), and the depth first connecting each pair.

    Stops once no deeper stack can shorten a path (every path through m blocks has >= m steps)
    and the reachable set has come back to the same point of the block cycle (a fixed point),
    or at ``max_depth`` blocks.
    Returns ``best`` (n,n) steps (inf: never connected), ``first`` (n,n) depths (0: never) and
    ``model`` (n,n) steps through exactly ``len(steps)`` blocks, the model's own stack.
    """
    n, period = steps[0].size(0), len(steps)
    d = torch.full((n, n), INF, dtype=torch.float64).fill_diagonal_(0.0)
    best, first = torch.full_like(d, INF), torch.zeros(n, n, dtype=torch.long)
    reaches, own = deque(maxlen=period), None
    for m in range(1, max_depth + 1):
        d = min_plus(steps[(m - 1) % period], d)
        reach = torch.isfinite(d)
        first[reach & (first == 0)] = m
        best = torch.minimum(best, d)
        own = d.clone() if m == period else own
        longest = best[torch.isfinite(best)].max().item() if torch.isfinite(best).any() else 0
        settled = len(reaches) == period and torch.equal(reach, reaches[0])
        if m >= period and settled and m >= longest:
            break
        reaches.append(reach)
    return {"best": best, "first": first, "model": own if own is not None else d}


def boolean_product(patterns: list[torch.Tensor]) -> torch.Tensor:
    """Reachability (n,n) of a stack: output i reaches input j through the blocks in order."""
    reach = torch.eye(patterns[0].size(1), dtype=torch.float64)
    for deps in patterns:
        reach = ((deps.double() @ reach) > 0).double()
    return reach.bool()


def check_reachability(stacked: torch.Tensor, whole: torch.Tensor) -> None:
    """Raise unless the blocks' stacked reachability equals the model's own (both (n,n) bool)."""
    if torch.equal(stacked, whole):
        return
    hidden, missing = (whole & ~stacked).nonzero().tolist(), (stacked & ~whole).nonzero().tolist()
    parts = []
    if hidden:
        parts.append(f"{len(hidden)} pairs (output, input) the model connects but its mixing_blocks() do not, "
                     f"e.g. {hidden[0]}: something outside the listed blocks mixes positions")
    if missing:
        parts.append(f"{len(missing)} pairs the blocks connect but the model does not, e.g. {missing[0]}")
    raise PathLengthError("the model's Jacobian reachability differs from its blocks' patterns: " + "; ".join(parts))


# ---------------------------------------------------------------- one model

def model_dependencies(model: nn.Module, tokens: torch.Tensor, x: torch.Tensor, generator) -> torch.Tensor:
    """(n,n) bool: logits at i depend on embed's output at j, from ``model(tokens)`` itself with embed -> x."""
    def run(z):
        try:
            return forward_from_embeddings(model, tokens, z)
        except TypeError as err:
            raise PathLengthError(str(err)) from None
    return dependencies(run, x, generator)


def analyze(model: nn.Module, n: int, *, vocab_size: int, recurrent: list[bool], attention: list[bool],
            trials: int = 2, seed: int = 0, max_depth: int | None = None) -> dict:
    """Path lengths at one sequence length n for a float64, eval-mode language model (see the module docstring)."""
    blocks = model.mixing_blocks()
    g = torch.Generator().manual_seed(seed)
    patterns = [torch.zeros(n, n, dtype=torch.bool) for _ in blocks]
    whole = torch.zeros(n, n, dtype=torch.bool)
    for _ in range(trials):
        tokens = torch.randint(vocab_size, (1, n), generator=g)
        with torch.no_grad():
            x = h = model.embed(tokens)  # (1,n,D)
        for b, block in enumerate(blocks):
            patterns[b] |= dependencies(block, h, g)
            with torch.no_grad():
                h = block(h)
        whole |= model_dependencies(model, tokens, x, g)
    check_reachability(boolean_product(patterns), whole)
    steps = [step_lengths(p, r) for p, r in zip(patterns, recurrent)]
    paths = shortest_paths(steps, max_depth or len(blocks) * (n + 1))
    best, first, own = paths["best"], paths["first"], paths["model"]
    far = [d for d in (first[n - 1, 0].item(), first[0, n - 1].item()) if d > 0]
    own_far = min(own[n - 1, 0].item(), own[0, n - 1].item())
    connected = best[torch.isfinite(best)]
    return {"max_path_length": int(connected.max().item()) if connected.numel() else None,
            "min_depth_for_distance": min(far) if far else None,
            "model_path_length": int(own_far) if math.isfinite(own_far) else None,
            "block_types": [block_type(p, r, a) for p, r, a in zip(patterns, recurrent, attention)]}


def stack_costs(model: nn.Module, n: int, vocab_size: int) -> tuple[int, float]:
    """(autograd graph depth of the stacked blocks, mean FLOPs per block) on one sequence of n tokens.

    FLOPs count every matrix product, so causal attention counts its full n x n scores.
    """
    blocks = model.mixing_blocks()
    x = model.embed(torch.randint(vocab_size, (1, n))).detach()
    h = x.requires_grad_(True)
    # the math attention kernel: torch's FLOP counter has no formula for the CPU flash kernel
    with sdpa_kernel([SDPBackend.MATH]), flop_counter() as counter:
        for block in blocks:
            h = block(h)
    return graph_depth(h), counter.get_total_flops() / len(blocks)


def forward_latency(model: nn.Module, n: int, device: torch.device, vocab_size: int, *, reps: int = 20,
                    warmup: int = 3) -> float:
    """Median seconds of one forward pass on one sequence of n tokens (B=1), warm-up first, device synchronized."""
    tokens = torch.randint(vocab_size, (1, n), device=device)
    times = []
    with torch.inference_mode():
        for k in range(warmup + reps):
            sync(device)
            start = time.perf_counter()
            model(tokens)
            sync(device)
            if k >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def fit_growth(ns: list[int], ys: list[float]) -> dict:
    """The best of y = a (constant, only if y never changes), a + b·n (linear), a + b·log2 n (logarithmic)."""
    if max(ys) == min(ys):
        return {"growth": "constant", "slope": 0.0, "intercept": float(ys[0])}
    fits = []
    for growth, f in (("linear", float), ("logarithmic", math.log2)):
        xs = [f(n) for n in ns]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        sse = sum((my + slope * (x - mx) - y) ** 2 for x, y in zip(xs, ys))
        fits.append((sse, growth, slope, my - slope * mx))
    sse, growth, slope, intercept = min(fits, key=lambda fit: fit[0])
    tidy = lambda v: round(v, 9) + 0.0  # no -0 or 1e-16 from rounding
    return {"growth": growth, "slope": tidy(slope), "intercept": tidy(intercept)}


def exponent(ns: list[int], ys: list[float]) -> float | None:
    """Least-squares e of y ∝ n^e (log-log slope)."""
    pts = [(math.log(n), math.log(y)) for n, y in zip(ns, ys) if y and y > 0]
    if len(pts) < 2:
        return None
    mx, my = statistics.fmean(p[0] for p in pts), statistics.fmean(p[1] for p in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def measure(model: nn.Module, ns: list[int], *, vocab_size: int, device: torch.device | None = None,
            trials: int = 2, seed: int = 0, latency_reps: int = 20) -> dict:
    """The ``path_length`` entry of a record for one language model over sequence lengths ``ns``.

    Args:
        model: a ``LanguageModel``; it is copied, never changed.
        ns: sequence lengths to measure at.
        vocab_size: token ids are drawn from [0, vocab_size).
        device: where forward latency is timed (float32); None skips latency.
        trials: random inputs whose patterns are ORed.
    Returns:
        {n, max_path_length, min_depth_for_distance, layer_type, growth, latency_s, ...} (lists by n).
    """
    ns = sorted(ns)
    m64 = copy.deepcopy(model).cpu().double().eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        h = m64.embed(torch.randint(vocab_size, (1, PROBE_LENGTHS[0])))
        recurrent, attention = [], []
        for block in m64.mixing_blocks():
            with torch.enable_grad():
                recurrent.append(is_recurrent(block, h.size(-1)))
            attention.append(calls_attention(block, h))
            h = block(h)
    rows = [analyze(m64, n, vocab_size=vocab_size, recurrent=recurrent, attention=attention, trials=trials,
                    seed=seed) for n in ns]
    costs = [stack_costs(m64, n, vocab_size) for n in ns]
    paths = [r["max_path_length"] for r in rows]
    fit = fit_growth(ns, paths)
    seq_ops = [c[0] for c in costs]
    out = {"n": ns, "max_path_length": paths, "min_depth_for_distance": [r["min_depth_for_distance"] for r in rows],
           "layer_type": model_layer_type(rows[-1]["block_types"]), "growth": fit["growth"],
           "fit": fit, "model_depth": len(m64.mixing_blocks()),
           "model_path_length": [r["model_path_length"] for r in rows],
           "block_types": rows[-1]["block_types"], "recurrent_blocks": recurrent,
           "sequential_ops": seq_ops, "sequential_ops_growth": fit_growth(ns, seq_ops)["growth"],
           "flops_per_block": [c[1] for c in costs], "flops_exponent": exponent(ns, [c[1] for c in costs]),
           "latency_s": None, "latency_exponent": None, "latency_device": None}
    if device is not None:
        m32 = copy.deepcopy(model).float().eval().to(device)
        lat = [forward_latency(m32, n, device, vocab_size, reps=latency_reps) for n in ns]
        out.update(latency_s=lat, latency_exponent=exponent(ns, lat), latency_device=str(device))
    return out


# ---------------------------------------------------------------- records, Table 1, CLI

def preset_config(name: str, preset: str, settings: dict | None = None) -> dict:
    """The model config of ``conf/model/<name>_<preset>.yaml`` (else ``<name>.yaml``), with settings applied."""
    stem = f"{name}_{preset}" if (models.PRESETS / f"{name}_{preset}.yaml").is_file() else name
    return {**models.load_preset(stem), **(settings or {})}


def build_lm(cfg: dict, vocab_size: int = VOCAB, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return models.build(cfg, Shape("lm", {"lm": vocab_size})).eval()


def path_record(cfg: dict, model: nn.Module | None, path_length: dict | None, *, device: torch.device,
                started: str, out_dir: Path, error: str | None = None, settings: dict | None = None,
                sweep: str = "path_length") -> dict:
    """A result record (harness/schema.py) carrying the ``path_length`` analysis of one model."""
    name, preset = cfg.get("name"), cfg.get("preset")
    return schema.analysis(
        status="failed" if error else "ok", error=error, seed=(settings or {}).get("seed"),
        job=schema.job_entry(f"path_length_{name}-{preset}", sweep, out_dir, started=started),
        config={"model": cfg, "path_length": settings or {}}, environment=environment.describe(device),
        model={"name": name, "preset": preset, "form": "lm", "paper": cfg.get("paper"),
               "parameters": models.count_parameters(model) if model is not None else None},
        task={"name": "path_length", "family": "lm"}, path_length=path_length)


def write_record(out_dir: Path, rec: dict) -> Path:
    path = Path(out_dir) / schema.RECORD_NAME
    schema.write(path, rec)
    return path


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.0f}" if v.is_integer() else f"{v:.3g}"
    return str(v)


def describe_growth(fit: dict) -> str:
    if fit["growth"] == "constant":
        return f"constant ({_fmt(fit['intercept'])})"
    var = "n" if fit["growth"] == "linear" else "log₂n"
    return f"{fit['growth']} ({fit['slope']:.3g}·{var} {fit['intercept']:+.3g})"


def table1_markdown(results: dict[str, dict]) -> str:
    """Table 1 as Markdown: the paper's entries beside the measured ones, one row per model."""
    head = ["model", "layer type (measured)", "complexity per layer (paper)", "sequential ops (paper)",
            "max path length (paper)", "max path length (measured)", "fitted growth", "min depth for distance n-1",
            "sequential ops (graph depth)", "FLOPs/block ∝ n^e", "latency (ms)"]
    ns = next((pl["n"] for pl in results.values() if pl), [])
    lines = [f"Measured at n = {', '.join(map(str, ns))} (lists are by n).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arch, pl in results.items():
        if not pl:
            lines.append(f"| {arch} | failed |" + " |" * (len(head) - 2))
            continue
        theory = (THEORY_BY_ARCHITECTURE.get(arch.split("-")[0]) or THEORY.get(pl["layer_type"])
                  or ("?", "?", "?"))
        latency = ", ".join(f"{t * 1e3:.2g}" for t in pl["latency_s"]) if pl.get("latency_s") else "–"
        if pl.get("latency_exponent") is not None:
            latency += f" (∝ n^{pl['latency_exponent']:.2f}, {pl['latency_device']})"
        flops = f"{pl['flops_exponent']:.2f}" if pl.get("flops_exponent") is not None else "–"
        cells = [arch, pl["layer_type"], *theory, ", ".join(map(_fmt, pl["max_path_length"])),
                 describe_growth(pl["fit"]), ", ".join(map(_fmt, pl["min_depth_for_distance"])),
                 f"{pl['sequential_ops_growth']} ({', '.join(map(_fmt, pl['sequential_ops']))})", flops, latency]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_settings(items: list[str]) -> dict[str, dict]:
    """``model.key=value`` strings (value in YAML) -> {model: {key: value}}."""
    out: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        model, dot, field = key.partition(".")
        if not (sep and dot and field):
            raise ValueError(f"--set takes model.key=value (e.g. bytenet.dilations=[1,2,4]); got {item!r}")
        out.setdefault(model, {})[field] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    defaults = yaml.safe_load(EXPERIMENT.read_text())["path_length"]
    parser = argparse.ArgumentParser(prog="python -m seqbench.harness.analysis.path_length",
                                     description=__doc__.split("\n\n")[0],
                                     epilog=f"defaults: {EXPERIMENT.relative_to(ROOT)}")
    parser.add_argument("--out", required=True, type=Path, help="writes <out>/<model>/record.json")
    parser.add_argument("--models", default=",".join(defaults["models"]),
                        help="comma-separated; each names conf/model/<model>_<preset>.yaml (or <model>.yaml)")
    parser.add_argument("--preset", default=defaults["preset"])
    parser.add_argument("--n", default=",".join(map(str, defaults["n"])), help="sequence lengths, comma-separated")
    parser.add_argument("--set", action="append", default=[], metavar="MODEL.KEY=VALUE",
                        help="change a hyperparameter (replaces that model's default settings)")
    parser.add_argument("--device", default=defaults["device"], help="where latency is timed: auto | cpu | cuda[:N] "
                                                                     "| none")
    parser.add_argument("--trials", type=int, default=defaults["trials"])
    parser.add_argument("--reps", type=int, default=defaults["reps"], help="timed forward passes per n")
    parser.add_argument("--seed", type=int, default=defaults["seed"])
    args = parser.parse_args(argv)
    chosen = {**(defaults.get("settings") or {}), **parse_settings(args.set)}
    results, failed = {}, 0
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        try:
            cfg = job_config(name, args, chosen.get(name))
        except Exception as err:  # e.g. no such preset: a failed record, and the others carry on
            rec = analyze_preset(lambda err=err: _raise(err), {"name": name, "preset": args.preset}, args.out / name,
                                 ns=[], device=None, trials=args.trials, seed=args.seed, reps=args.reps, settings={})
        else:
            rec = run(cfg, args.out / name, raise_errors=False)
        failed += rec["status"] != "ok"
        results[rec["job"]["name"].removeprefix("path_length_")] = rec["path_length"]
    print(table1_markdown(results))
    return 1 if failed else 0


def job_config(name: str, args: argparse.Namespace, settings: dict | None):
    """The config ``python run.py experiment=path_length model=<name's preset>`` composes, with the command line's
    n, trials, reps, seed, device and model settings."""
    from hydra import compose, initialize_config_dir  # noqa: PLC0415 (the command line only)

    stem = f"{name}_{args.preset}" if (models.PRESETS / f"{name}_{args.preset}.yaml").is_file() else name
    node = {"n": "[" + args.n + "]", "trials": args.trials, "reps": args.reps, "seed": args.seed,
            "device": args.device, "preset": args.preset}
    overrides = ["experiment=path_length", f"model={stem}", *(f"path_length.{k}={v}" for k, v in node.items())]
    if settings is not None:  # replaces the experiment's settings of this model
        values = ",".join(f"{k}:{json.dumps(v)}" for k, v in settings.items())
        overrides.append(f"++path_length.settings.{name}={{{values}}}")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def _raise(err: Exception):
    raise err


def analyze_preset(make_cfg, fallback: dict, out_dir: Path, *, ns: list[int], device: torch.device | None,
                   trials: int, seed: int, reps: int, settings: dict, sweep: str = "path_length") -> dict:
    """Measure one model and write its record to ``out_dir/record.json``; a failure is a ``failed`` record.

    Args:
        make_cfg: () -> the model config (may raise, e.g. for an unknown preset).
        fallback: the model config named in the record when ``make_cfg`` fails.
    """
    started, cfg, model, pl, error = schema.now(), fallback, None, None, None
    try:
        cfg = make_cfg()
        model = build_lm(cfg, VOCAB, seed)
        pl = measure(model, ns, vocab_size=VOCAB, device=device, trials=trials, seed=seed, latency_reps=reps)
    except Exception as err:  # a failed model is a record, not a gap; the others carry on
        error = f"{type(err).__name__}: {err}"
        print(f"[path_length] {fallback.get('name')}: failed: {error}", file=sys.stderr)
    run_settings = {"n": ns, "trials": trials, "seed": seed, "vocab_size": VOCAB, "settings": settings}
    rec = path_record(cfg, model, pl, device=device or torch.device("cpu"), started=started, out_dir=out_dir,
                      error=error, settings=run_settings, sweep=sweep)
    path = write_record(out_dir, rec)
    print(f"[path_length] {fallback.get('name')}: {'failed' if error else pl['layer_type']} -> {path}", file=sys.stderr)
    return rec


def run(cfg, out_dir: str | Path, *, sweep: str | None = None, raise_errors: bool = True) -> dict:
    """``python run.py experiment=path_length`` (``job: path_length``): measure ``cfg.model``, no training.

    Reads the ``path_length`` node (n, trials, seed, reps, device, per-model ``settings`` keyed as ``--models``
    names the model; defaults from conf/experiment/path_length.yaml) and writes the same record as the CLI to
    ``out_dir/record.json``.
    """
    given = cfg.get("path_length")  # absent when job=path_length is set without the experiment
    node = {**yaml.safe_load(EXPERIMENT.read_text())["path_length"],
            **(OmegaConf.to_container(given, resolve=True) if given is not None else {})}
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    key = f"{model_cfg['name']}_{model_cfg.get('preset')}".removesuffix(f"_{node['preset']}")  # as --models names it
    settings = (node.get("settings") or {}).get(key) or {}
    device = None if node["device"] == "none" else pick(node["device"])
    rec = analyze_preset(lambda: {**model_cfg, **settings}, model_cfg, Path(out_dir), ns=[int(n) for n in node["n"]],
                         device=device, trials=node["trials"], seed=node["seed"], reps=node["reps"], settings=settings,
                         sweep=sweep or "path_length")
    pl = rec["path_length"]
    print(f"[seqbench] {rec['job']['name']}: {rec['status']} | "
          + (f"max path length {pl['max_path_length']} at n = {pl['n']} ({pl['layer_type']})" if pl else rec["error"])
          + f" | {out_dir}")
    if rec["status"] != "ok" and raise_errors:
        raise RuntimeError(f"path-length analysis of {rec['job']['name']} failed: {rec['error']}")
    return rec


if __name__ == "__main__":
    sys.exit(main())
