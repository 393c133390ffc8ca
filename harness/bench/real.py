"""The ``real`` suite: the trainer's own training step on a real task's batches, beside the bench's synthetic step.

    python -m seqbench.harness.bench --suite real --precision bf16 --threads 1 --json out/real.json --profile
    python -m seqbench.harness.bench --suite real --archs lstm --task multi30k --real-batches 4 --max-tokens 4096

The ``train`` suite times one step on a random batch of ``--batch`` x (``--src-len`` + ``--tgt-len``) tokens with
no padding. A training run steps through its task's length-bucketed batches instead, whose shapes, padding and
token ids differ, so its time per token may differ too. This suite takes the first ``--real-batches`` batches of
the task's shuffled first epoch (``task.batches("train", max_tokens, epoch=0, shuffle=True, seed)``, what
``Trainer.epoch_batches`` takes) and times, interleaved in one process (``harness.bench.timing``), four contenders,
each a call of one update per real batch:

- ``trainer``: ``Trainer.train_step`` (``harness.train``) on the real batches, the trainer built as a job builds it
  (``TrainConfig`` at ``--precision``; its optimizer, schedule and fused loss);
- ``trainer, unpadded``: the same examples, each batch re-cut into ``--split`` sub-batches of rows sorted by source
  then target length (each sub-batch trimmed to its own longest sentence), their gradients summed into one update
  with the trainer's model, loss, optimizer and schedule: the same update as ``trainer``'s up to dropout's draws,
  with less padding and smaller products;
- ``bench step, real shapes``: the ``train`` suite's step (``suites.training_step``: the fused loss, the trainer's
  Adam) on random tokens in each real batch's shape, no padding: the same products as ``trainer``'s;
- ``bench step, train-suite shape``: that step on the ``train`` suite's own batch, once per real batch.

Every model is built from the same initial weights at the task's vocabulary. Tokens are target tokens scored by the
loss (padding excluded); padding fractions are padding tokens over all tokens of the sources and targets. FLOPs are
counted per call (``harness.profile``); MFU divides FLOP/s by the machine's measured peak at the model's widths for
the real batches' mean positions (``harness.peak``). The ratio is the trainer's speed over the train-suite step's
(<1: a real update costs more per token).

``--profile`` then runs ``torch.profiler`` (``record_shapes``) over ``--profile-steps`` trainer steps on the real
batches and prints the self CPU time per phase (model forward, loss forward, backward, optimizer, other), the
backward's time by autograd node, and the top operators of the forward and the backward by self CPU time with
their input shapes; with ``--json`` the text is also written beside it (``<json stem>.profile.<arch>.<precision>.txt``).
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.profiler import ProfilerActivity, profile, record_function

from seqbench import models, tasks
from seqbench.models.common import PAD
from seqbench.tasks.batching import Batch

from .. import train as train_module
from ..loss import smoothed_cross_entropy
from ..profile import count_flops
from ..train import Trainer, TrainConfig
from . import suites as bench
from .timing import Contender, paired_ratio, summary, time_rounds

TASK_CONF = models.PRESETS.parent / "task"  # conf/task/<name>.yaml: what task=<name> builds
CONTENDERS = ("trainer", "unpadded", "bench_real_shapes", "bench_train_shape")
NAMES = {"trainer": "trainer (Trainer.train_step), real batches",
         "unpadded": "trainer, real batches re-cut to less padding",
         "bench_real_shapes": "bench step, random tokens in the real shapes",
         "bench_train_shape": "bench step, train-suite shape"}
PHASES = ("model forward", "loss forward", "backward", "optimizer", "other")
BACKWARD_NODE = "autograd::engine::evaluate_function: "
TOP_OPS = 12  # operators listed per phase in the profile
JOB_SEED = 1  # conf/config.yaml's seed: the batch order a default job trains on


# -- the task and its batches -----------------------------------------------------------------------
def load_task(name: str, overrides: list[str]):
    """The task ``task=<name>`` trains on (``conf/task/<name>.yaml``), with ``key=value`` overrides (YAML values),
    read through the data root as a job reads it ($SEQBENCH_DATA_ROOT)."""
    path = TASK_CONF / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in TASK_CONF.glob("*.yaml")))
        raise SystemExit(f"--task {name}: no task config {path}; valid: {known}")
    cfg = yaml.safe_load(path.read_text())
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--task-set {item!r}: expected key=value, e.g. n_train=64")
        cfg[key] = yaml.safe_load(value)
    task = tasks.build(cfg)
    if task.form != "seq2seq":
        raise SystemExit(f"--task {name}: the real suite times encoder-decoder (seq2seq) tasks, and {name} is "
                         f"{task.form}-form; use a translation or synthetic seq2seq task (multi30k, copy)")
    return task


def real_batches(task, max_tokens: int, n: int, seed: int) -> list[Batch]:
    """The first ``n`` training batches of the shuffled first epoch, as ``Trainer.epoch_batches`` builds them."""
    try:
        batches = task.batches("train", max_tokens, epoch=0, shuffle=True, seed=seed)
    except ValueError as err:  # an example longer than the budget: the message names the trainer's setting
        raise SystemExit(f"--max-tokens {max_tokens}: {err} (here: raise --max-tokens)") from None
    if len(batches) < n:
        raise SystemExit(f"--real-batches {n}: the task has {len(batches)} training batches at --max-tokens "
                         f"{max_tokens}; ask for at most {len(batches)}")
    return batches[:n]


def padding(batches: list[Batch]) -> dict[str, float]:
    """Padding tokens over all tokens: of the sources, of the targets, and of both together."""
    src_pad = sum(int((b.inputs["src"] == PAD).sum()) for b in batches)
    src_all = sum(b.inputs["src"].numel() for b in batches)
    tgt_pad = sum(int((b.target == b.ignore_index).sum()) for b in batches)
    tgt_all = sum(b.target.numel() for b in batches)
    return {"src": src_pad / src_all, "tgt": tgt_pad / tgt_all, "all": (src_pad + tgt_pad) / (src_all + tgt_all)}


def shapes(batches: list[Batch]) -> list[tuple[int, int, int]]:
    """(rows, source length, target length) of each batch."""
    return [(b.target.size(0), b.inputs["src"].size(1), b.target.size(1)) for b in batches]


def unpadded(batch: Batch, parts: int) -> list[Batch]:
    """``batch``'s rows sorted by (source, target) length and cut into ``parts`` near-equal sub-batches, each trimmed
    to its own longest source and target: the same examples with the padding the sort removes."""
    src, target = batch.inputs["src"], batch.target
    src_len = batch.inputs["src_lengths"]
    tgt_len = (target != batch.ignore_index).sum(1)
    order = sorted(range(target.size(0)), key=lambda i: (int(src_len[i]), int(tgt_len[i])))
    out = []
    for rows in np.array_split(np.array(order), min(parts, len(order))):
        rows = torch.from_numpy(rows)
        s, t = int(src_len[rows].max()), int(tgt_len[rows].max())
        part_target = target[rows, :t]
        inputs = {"src": src[rows, :s], "src_lengths": src_len[rows], "tgt_in": batch.inputs["tgt_in"][rows, :t]}
        index = [batch.index[i] for i in rows.tolist()] if batch.index is not None else None
        out.append(Batch(inputs, part_target, int((part_target != batch.ignore_index).sum()), index,
                         batch.ignore_index))
    return out


def random_like(batch: Batch, vocab: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(src, lengths, tgt_in, tgt_out) of random ids in ``batch``'s shape with no padding: the train suite's batch."""
    (B, S), T = batch.inputs["src"].shape, batch.target.size(1)
    src = torch.randint(4, vocab, (B, S), generator=g)
    tgt = torch.randint(4, vocab, (B, T + 1), generator=g)
    return src, torch.full((B,), S), tgt[:, :-1], tgt[:, 1:]


# -- the contenders -----------------------------------------------------------------------------------
def build_trainer(cfg: dict, task, precision: str, max_tokens: int, device: torch.device, seed: int,
                  folder: Path) -> Trainer:
    """A trainer as a job builds one (the trainer's defaults at ``precision``), its model from seed ``seed``."""
    torch.manual_seed(seed)
    model = models.build(cfg, task)
    settings = TrainConfig(max_tokens=max_tokens, max_steps=10**9, precision=precision, progress=False,
                           threads=None, valid_bleu=False)
    trainer = Trainer(model, task, settings, folder, device, seed=seed, identity={"bench": "real"})
    trainer.model.train()
    return trainer


def trainer_call(trainer: Trainer, batches: list[Batch]) -> Callable[[], None]:
    def call() -> None:
        for batch in batches:
            trainer.train_step(batch)
    return call


def accumulated_call(trainer: Trainer, cut: list[tuple[list[Batch], int]]) -> Callable[[], None]:
    """One update per real batch from its sub-batches' summed gradients: ``Trainer.train_step``'s forward, loss,
    backward (the loss a mean over the whole batch's tokens), optimizer and schedule steps, without the fp16 scaler
    and gradient clipping, which the trainer's defaults at fp32 and bf16 leave off."""
    def call() -> None:
        for parts, n_tokens in cut:
            for part in parts:
                with trainer.autocast():
                    logits = trainer.forward(**part.inputs)
                loss = smoothed_cross_entropy(logits, part.target, trainer.cfg.label_smoothing, part.ignore_index)
                (loss / n_tokens).backward()
            trainer.opt.step()
            trainer.opt.zero_grad(set_to_none=True)
            trainer.sched.step()
    return call


def bench_call(cfg: dict, task, batches: list[tuple[torch.Tensor, ...]], device: torch.device, precision: str,
               seed: int, compile_model: bool) -> tuple[Callable[[], None], Callable[[], None]]:
    """The train suite's step on each of ``batches`` in turn: (a call of one step per batch, the same call's
    forward and backward alone, for counting FLOPs)."""
    torch.manual_seed(seed)
    model = models.build(cfg, task)
    losses = [bench.seq2seq_loss(tuple(t.to(device) for t in b), fused=True) for b in batches]
    turn: Iterator = itertools.cycle(losses)
    step, opt, autocast = bench.training_step(model, lambda fwd, ac: next(turn)(fwd, ac), device=device,
                                              precision=precision, compile_model=compile_model)

    def call() -> None:
        for _ in batches:
            step()

    def forward_backward() -> None:
        for loss_of in losses:
            loss_of(model, autocast).backward()
        opt.zero_grad(set_to_none=True)
    return call, forward_backward


def shape_text(dims: list[tuple[int, int, int]]) -> str:
    """'256x16 + 256x13' per batch (B x S source, B x T target), batches separated by '; '."""
    return "; ".join(f"{b}x{s} + {b}x{t}" for b, s, t in dims)


def real_suite(args, device: torch.device, precision: str) -> list[dict]:
    task = load_task(args.task, args.task_set)
    batches = real_batches(task, args.max_tokens, args.real_batches, JOB_SEED)
    vocab = task.vocab()["tgt"]
    g = torch.Generator().manual_seed(args.seed)
    inputs = {"synthetic": [random_like(b, vocab, g) for b in batches],
              "suite_batch": bench.translation_batch(suite_sizes(args, vocab), torch.device("cpu")),
              "cut": [(unpadded(b, args.split), b.n_tokens) for b in batches]}
    no_padding = {"src": 0.0, "tgt": 0.0, "all": 0.0}
    described = {  # per contender: (B, S, T) of each product call, padding fractions, target tokens
        "trainer": (shapes(batches), padding(batches), sum(b.n_tokens for b in batches)),
        "unpadded": ([d for parts, _ in inputs["cut"] for d in shapes(parts)],
                     padding([p for parts, _ in inputs["cut"] for p in parts]), sum(b.n_tokens for b in batches)),
        "bench_real_shapes": (shapes(batches), no_padding, sum(b.target.numel() for b in batches)),
        "bench_train_shape": ([(args.batch, args.src_len, args.tgt_len)] * len(batches), no_padding,
                              args.batch * args.tgt_len * len(batches))}
    shape = (f"task {args.task}, {len(batches)} batches of epoch 0 at max_tokens {args.max_tokens} (B x S source + "
             f"B x T target): {shape_text(shapes(batches))}; train-suite shape {args.batch}x{args.src_len} + "
             f"{args.batch}x{args.tgt_len}; vocab {vocab}")
    rows = []
    for arch, cfg in bench.presets(args.preset, args.models):
        with tempfile.TemporaryDirectory() as folder:
            row = real_row(arch, cfg, task, batches, inputs, described, args, device, precision, Path(folder))
        row["shape"] = shape
        rows.append(row)
        bench.progress(row)
    return rows


def real_row(arch: str, cfg: dict, task, batches: list[Batch], inputs: dict, described: dict, args,
             device: torch.device, precision: str, folder: Path) -> dict:
    """Count, time (and profile) the four contenders for one architecture; trainers write nothing in ``folder``."""
    trainers = {k: build_trainer(cfg, task, precision, args.max_tokens, device, args.seed, folder / k)
                for k in ("trainer", "unpadded")}
    calls = {"trainer": trainer_call(trainers["trainer"], [b.to(device) for b in batches]),
             "unpadded": accumulated_call(trainers["unpadded"], [([p.to(device) for p in parts], n)
                                                                 for parts, n in inputs["cut"]])}
    counted = {}
    for key, some in (("bench_real_shapes", inputs["synthetic"]),
                      ("bench_train_shape", [inputs["suite_batch"]] * len(batches))):
        calls[key], counted[key] = bench_call(cfg, task, some, device, precision, args.seed, args.compile)
    # counted first, untimed: the count also runs every contender once before the timed rounds
    flops = {k: count_flops(counted.get(k, calls[k])) for k in CONTENDERS}  # trainers: whole updates
    contenders = {k: Contender(NAMES[k], calls[k], described[k][2]) for k in CONTENDERS}
    time_rounds(list(contenders.values()), device=device, rounds=args.repeats, calls=args.steps, warmup=args.warmup)
    model = trainers["trainer"].model
    n_params = models.count_parameters(model)
    positions = round(statistics.mean(b * t for b, _, t in described["trainer"][0]))
    peak = bench.peak_for(model, positions, device, precision)
    stats = {}
    for key, c in contenders.items():
        dims, pad, _ = described[key]
        stats[key] = {**summary(c), "name": c.name, "shapes": dims, "padding": pad, "params": n_params}
        bench.add_mfu(stats[key], flops[key], peak)
    row = {"suite": "real", "arch": arch, "preset": cfg.get("preset"), "model": bench.label(arch, cfg, n_params),
           "baseline": NAMES["bench_train_shape"], "precision": precision, "task": args.task,
           "max_tokens": args.max_tokens, "split": args.split, "stats": stats}
    row.update(paired_ratio(contenders["trainer"], contenders["bench_train_shape"]))
    row["cost_ratio"] = 1 / row["ratio"]  # real / bench, per target token
    if args.profile:
        fresh = build_trainer(cfg, task, precision, args.max_tokens, device, args.seed, folder / "profile")
        row["profile"] = profile_text(fresh, [b.to(device) for b in batches], args.profile_steps,
                                      f"{row['model']} {precision}")
    return row


def suite_sizes(args, vocab: int) -> argparse.Namespace:
    """The train suite's sizes at the task's vocabulary (its batch's ids must fit the real model's embedding)."""
    return argparse.Namespace(batch=args.batch, src_len=args.src_len, tgt_len=args.tgt_len, vocab=vocab,
                              seed=args.seed)


# -- the profile --------------------------------------------------------------------------------------
@contextmanager
def labelled_phases(trainer: Trainer) -> Iterator[None]:
    """While profiling: the trainer's model forward and its loss run inside profiler labels, so that their operators
    can be told from the loss's and from the rest of the step (the backward and the optimizer label themselves)."""
    forward, loss = trainer.forward, train_module.smoothed_cross_entropy

    def labelled_forward(*a, **k):
        with record_function("model forward"):
            return forward(*a, **k)

    def labelled_loss(*a, **k):
        with record_function("loss forward"):
            return loss(*a, **k)

    trainer.forward, train_module.smoothed_cross_entropy = labelled_forward, labelled_loss
    try:
        yield
    finally:
        trainer.forward, train_module.smoothed_cross_entropy = forward, loss


def phase_of(event) -> str:
    """The step phase an operator ran in: the nearest enclosing label (itself included)."""
    e = event
    while e is not None:
        if e.name in ("model forward", "loss forward"):
            return e.name
        if e.name.startswith(BACKWARD_NODE):
            return "backward"
        if e.name.startswith("Optimizer."):
            return "optimizer"
        e = e.cpu_parent
    return "other"


def backward_node(event) -> str | None:
    """The autograd node (``MmBackward0``) whose backward an operator ran in, or None outside the backward."""
    e = event
    while e is not None:
        if e.name.startswith(BACKWARD_NODE):
            return e.name[len(BACKWARD_NODE):]
        e = e.cpu_parent
    return None


def profile_phases(trainer: Trainer, batches: list[Batch], steps: int) -> dict:
    """Self CPU microseconds of ``steps`` trainer steps (after one unprofiled step): per phase, per backward node,
    and per (phase, operator, input shapes)."""
    trainer.train_step(batches[0])  # warm-up: first-call allocations and kernel selection
    with labelled_phases(trainer), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for i in range(steps):
            trainer.train_step(batches[i % len(batches)])
    per_phase: dict[str, float] = dict.fromkeys(PHASES, 0.0)
    per_node: dict[str, float] = defaultdict(float)
    per_op: dict[tuple[str, str, str], list] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        phase, us = phase_of(e), e.self_cpu_time_total
        per_phase[phase] += us
        if phase == "backward":
            per_node[backward_node(e)] += us
        entry = per_op[phase, e.name, str(e.input_shapes)]
        entry[0] += us
        entry[1] += 1
    return {"phases": per_phase, "nodes": dict(per_node), "ops": dict(per_op), "steps": steps}


def profile_text(trainer: Trainer, batches: list[Batch], steps: int, title: str) -> str:
    """The profile of ``steps`` trainer steps as text: phases, the backward by autograd node, the top operators."""
    p = profile_phases(trainer, batches, steps)
    phases, total = p["phases"], sum(p["phases"].values())
    forward = phases["model forward"] + phases["loss forward"]
    ms = 1e-3 / steps  # microseconds over the steps -> milliseconds per step
    lines = [f"profile: {title}, {steps} trainer steps on real batches ({shape_text(shapes(batches))}), "
             f"{torch.get_num_threads()} threads; self CPU time per step",
             "", "| phase | ms per step | share of step |", "|---|---|---|"]
    lines += [f"| {k} | {v * ms:,.1f} | {100 * v / total:.1f}% |" for k, v in phases.items()]
    lines += ["", f"backward / forward (model + loss) = {phases['backward'] / max(forward, 1e-9):.2f}x; "
                  f"backward / model forward = {phases['backward'] / max(phases['model forward'], 1e-9):.2f}x", "",
              "backward by autograd node (self CPU time of the operators each node ran)", "",
              "| node | ms per step | share of backward |", "|---|---|---|"]
    for node, us in sorted(p["nodes"].items(), key=lambda kv: -kv[1])[:TOP_OPS]:
        lines.append(f"| {node} | {us * ms:,.1f} | {100 * us / max(phases['backward'], 1e-9):.1f}% |")
    for phase in ("model forward", "loss forward", "backward"):
        ops = sorted(((k, v) for k, v in p["ops"].items() if k[0] == phase), key=lambda kv: -kv[1][0])[:TOP_OPS]
        lines += ["", f"top operators by self CPU time: {phase}", "",
                  "| operator | input shapes | calls per step | ms per step | share of step |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {shape} | {n / steps:g} | {us * ms:,.2f} | {100 * us / total:.1f}% |"
                  for (_, name, shape), (us, n) in ops]
    return "\n".join(lines)


# -- the report ---------------------------------------------------------------------------------------
def real_table(rows: list[dict]) -> str:
    """One block per architecture: the four contenders, the ratio, the padding, and the profile when taken."""
    out = []
    for r in rows:
        st = r["stats"]
        trainer = st["trainer"]
        lines = [f"**{r['model']}**, {r['precision']}: real / bench cost per target token = {r['cost_ratio']:.2f}x "
                 f"(speed ratio {r['ratio']:.2f}, {r['ratio_min']:.2f}-{r['ratio_max']:.2f} over "
                 f"{len(r['ratio_rounds'])} rounds)", "",
                 "| contender | shapes (B x S + B x T per update) | target tokens | padding src / tgt / all | "
                 "s per call (IQR) | target tok/s | cost per token vs trainer | FLOP/s (MFU) |",
                 "|---|---|---|---|---|---|---|---|"]
        for key in CONTENDERS:
            s = st[key]
            dims = s["shapes"]
            shape = shape_text(dims) if key != "unpadded" else (
                f"{len(dims)} sub-batches, {shape_text(dims[:2])}; ...")
            pad = s["padding"]
            cost = trainer["tokens_per_s"] / s["tokens_per_s"]
            lines.append(f"| {s['name']} | {shape} | {s['tokens']:,} | {100 * pad['src']:.1f}% / "
                         f"{100 * pad['tgt']:.1f}% / {100 * pad['all']:.1f}% | {s['median_s']:.3f} "
                         f"({s['iqr_pct']:.0f}%) | {s['tokens_per_s']:,.0f} | {cost:.2f} | {bench.flop_rate(s)} |")
        if "profile" in r:
            lines += ["", r["profile"]]
        out.append("\n".join(lines))
    return "\n\n".join(out)


def save_profiles(rows: list[dict], json_path: Path) -> list[Path]:
    """Each row's profile text beside the JSON file: ``<stem>.profile.<arch>.<precision>.txt``."""
    written = []
    for r in rows:
        if "profile" in r:
            path = json_path.with_name(f"{json_path.stem}.profile.{r['arch']}.{r['precision']}.txt")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(r["profile"] + "\n")
            written.append(path)
    return written
