"""The training loop: plain PyTorch, one model on one task, under a step/epoch/time budget.

Everything that decides the next step (model, optimizer, scheduler, RNG state,
epoch and batch position, the logs) is in the checkpoint, so a run stopped at
step k and resumed logs exactly what an uninterrupted run logs.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from time import monotonic  # the progress line's clock (not the timed ``time`` of the steps)

import torch
from tqdm import tqdm

from seqbench import models
from seqbench.tasks.base import EvalContext

from . import checkpoint, distributed, lm_protocol, optim, settings, utilization
from .device import sync
from .distributed import SINGLE, Dist
from .evaluate import mean_nll, perplexity
from .io import remove_stale_temps
from .decode import beam_problem
from .loss import label_smoothing, smoothed_cross_entropy, training_logits
from .precision import autocast_for

log = logging.getLogger("seqbench.train")
BAR_SECONDS = 2.0  # the progress line is redrawn at most this often


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


class Interrupted(RuntimeError):
    """Training stopped on a signal; the last checkpoint holds the position to resume from."""


@dataclass
class TrainConfig:
    max_tokens: int = 4096
    max_steps: int | None = None
    max_epochs: float | None = None
    max_seconds: float | None = None
    max_flops: float | None = None  # counted training FLOPs (costs.train_flops: FLOPs per token x tokens)
    lr: float = 7e-4
    schedule: str = "inverse_sqrt"  # inverse_sqrt | constant | cosine | plateau | wsd
    warmup_steps: int = 4000
    min_lr_ratio: float = 0.0  # cosine floor
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-9
    weight_decay: float = 0.0
    optimizer: str = "adam"  # adam | adamw | sgd | adam_then_sgd (harness/optim.py)
    momentum: float = 0.0  # sgd
    nesterov: bool = False  # sgd: Nesterov's accelerated gradient
    sgd_lr: float | None = None  # adam_then_sgd: SGD's learning rate (lr is Adam's)
    switch_step: int | None = None  # adam_then_sgd: Adam takes the first switch_step steps, SGD the rest
    lr_shrink: float = 0.1  # plateau: the factor applied after a validation that does not improve on the best
    stop_lr: float = 0.0  # plateau: training ends once the learning rate falls below it (0: never)
    label_smoothing: float | None = None  # null: the task's default (harness/loss.py: 0.1 translation, 0 LM)
    clip_norm: float = 0.0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    compile: bool = False
    eval_every: int = 1000
    save_every: int | None = None  # steps between weight snapshots <out>/ckpt/step_<k>.pt (eval.checkpoint=average)
    save_every_seconds: float | None = None  # or seconds of training between them
    valid_bleu: bool = True  # greedy BLEU on valid at each evaluation (translation)
    log_every: int = 100
    on_nonfinite: str = "fail"  # fail | skip
    resume: bool = True
    progress: bool = True
    threads: int | str | None = "auto"  # auto (the free cores) | null (torch's default) | a number
    carry_state: bool = False  # recurrent LMs: truncated BPTT with the state carried across batches (lm_protocol)
    ladder: list[float] | None = None  # schedule=wsd: FLOP budgets (rungs), each evaluated after a cooldown branch
    cooldown: float = 0.2  # schedule=wsd: the share of a run (or of a rung) over which the lr decays to its floor
    # {validation metric: target}: training ends at the first validation that reaches every target (>= for a
    # score, <= for a loss: STOP_AT_LOWER); Zoology stops MQAR at 0.99 accuracy. None: train the whole budget
    stop_at: dict | None = None

    def __new__(cls, *args, **kwargs):
        unknown = sorted(set(kwargs) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unknown trainer settings {unknown}; valid: {', '.join(f.name for f in fields(cls))}")
        return super().__new__(cls)

    def __post_init__(self):
        self._check_ladder()  # first: the top rung is the budget (max_flops)
        if not (self.max_steps or self.max_epochs or self.max_seconds or self.max_flops):
            raise ValueError("no training budget: set trainer.max_steps, trainer.max_epochs, trainer.max_seconds or "
                             "trainer.max_flops")
        for key in ("max_steps", "max_epochs", "max_seconds", "max_flops"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise ValueError(f"trainer.{key}={getattr(self, key)} is negative; set a positive budget or null")
        for key in ("max_tokens", "eval_every", "log_every"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"trainer.{key}={getattr(self, key)!r} must be a positive integer "
                                 f"(max_tokens: the batch budget in tokens; eval_every/log_every: steps)")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"trainer.precision={self.precision!r}; valid: auto, fp32, bf16, fp16")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"trainer.schedule={self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.schedule in ("cosine", "wsd") and not (self.max_steps or self.max_seconds or self.max_flops
                                                       or self.ladder):
            raise ValueError(f"trainer.schedule={self.schedule} needs trainer.max_steps, trainer.max_flops or "
                             "trainer.max_seconds (its length)")
        if not (self.threads in ("auto", None) or (type(self.threads) is int and self.threads >= 1)):
            raise ValueError(f"trainer.threads={self.threads!r}; valid: auto (the cores free at the start), null "
                             "(torch's default) or a positive integer")
        if self.on_nonfinite not in ("fail", "skip"):
            raise ValueError(f"trainer.on_nonfinite={self.on_nonfinite!r}; valid: fail, skip")
        optim.check(self)
        self.betas = tuple(self.betas)
        self._check_stop_at()

    def _check_stop_at(self) -> None:
        """trainer.stop_at: a mapping of validation metrics (valid_accuracy, valid_nll, ...) to finite targets."""
        if self.stop_at is None:
            return
        if not settings.SETTINGS["trainer.stop_at"].accepts(self.stop_at):  # the start-up check's rule
            raise ValueError(f"trainer.stop_at={self.stop_at!r} must map validation metrics to targets, e.g. "
                             "trainer.stop_at={valid_accuracy:0.99} (training ends once validation reaches them), "
                             "or be null")
        if self.ladder is not None:
            raise ValueError("trainer.stop_at ends a run before its budget, and trainer.ladder needs the run to reach "
                             "every rung; set trainer.stop_at=null or trainer.ladder=null")

    def _check_ladder(self) -> None:
        """trainer.ladder: increasing FLOP budgets under schedule=wsd, the last one the run's budget (max_flops)."""
        if not 0 < self.cooldown < 1:
            raise ValueError(f"trainer.cooldown={self.cooldown!r} must lie in (0, 1): the share of a run (or rung) "
                             "over which schedule=wsd decays the lr (e.g. 0.2)")
        if self.ladder is None:
            return
        rungs = list(self.ladder)
        if self.schedule != "wsd":
            raise ValueError(f"trainer.ladder needs trainer.schedule=wsd (it is {self.schedule}): each rung branches a "
                             "cooldown from the constant-lr phase; set trainer.schedule=wsd or trainer.ladder=null")
        if not rungs or any(isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 0 for f in rungs) \
                or any(b <= a for a, b in zip(rungs, rungs[1:])):
            raise ValueError(f"trainer.ladder={rungs!r} must be increasing positive FLOP budgets, e.g. [3e13,1e14,3e14]")
        if any(b * (1 - self.cooldown) < a for a, b in zip(rungs, rungs[1:])):
            raise ValueError(f"trainer.ladder={rungs!r} with trainer.cooldown={self.cooldown}: a rung's cooldown would "
                             "start before the previous rung ends; space the rungs further apart or shorten the "
                             "cooldown")
        others = [k for k in ("max_steps", "max_epochs", "max_seconds") if getattr(self, k) is not None]
        if others:
            raise ValueError(f"trainer.ladder bounds training by FLOPs alone (its top rung), and {', '.join(others)} "
                             f"is set too; set trainer.{others[0]}=null")
        if self.max_flops is None:
            self.max_flops = float(rungs[-1])
        elif self.max_flops != rungs[-1]:
            raise ValueError(f"trainer.max_flops={self.max_flops:g} differs from the ladder's top rung {rungs[-1]:g}; "
                             "set trainer.max_flops=null (the top rung is the budget)")
        self.ladder = [float(f) for f in rungs]


SCHEDULES = ("inverse_sqrt", "constant", "cosine", "plateau", "wsd")
STOP_AT_LOWER = ("nll", "ppl", "loss", "ter")  # trainer.stop_at: a metric whose name ends so is reached from above


def target_reached(stop_at: dict | None, row: dict | None) -> bool:
    """Whether the validation ``row`` reaches every target of ``trainer.stop_at`` (False without either). A metric
    the row lacks fails with the metrics it has: a target that can never be checked would train the whole budget
    silently."""
    if not stop_at or not row:
        return False
    absent = sorted(k for k in stop_at if k not in row)
    if absent:
        have = sorted(k for k, v in row.items() if k.startswith("valid_") and isinstance(v, (int, float)))
        raise ValueError(f"trainer.stop_at names {', '.join(absent)}, which this task's validation does not report; "
                         f"it reports {', '.join(have)}: set trainer.stop_at to one of them, or null")
    return all(row[k] is not None and (row[k] <= v if k.endswith(STOP_AT_LOWER) else row[k] >= v)
               for k, v in stop_at.items())


def lr_factor(cfg: TrainConfig, step: int, seconds: float = 0.0, shrinks: int = 0, flops: float = 0.0,
              rung: float | None = None, warm_end: tuple[float, float] | None = None) -> float:
    """Multiplier of the learning rate at optimizer step ``step`` (0-based), after ``seconds`` of training and
    ``shrinks`` validations that did not improve on the best one.

    ``inverse_sqrt`` is the schedule of Vaswani et al. (eq. 3) written with its
    peak: linear warm-up to ``lr`` over ``warmup_steps``, then ``lr * sqrt(warmup / step)``.
    ``cosine`` decays from the end of the warm-up to ``min_lr_ratio * lr`` at ``max_steps``; without
    ``max_steps`` it follows the FLOP budget (``max_flops``) or the training-time budget (``max_seconds``)
    instead, from where the warm-up ended (``warm_end``: the seconds and FLOPs spent by then) to the budget's end,
    so that every architecture anneals over the same compute or wall-clock whatever its step rate.
    ``plateau`` (Gehring et al.; fairseq's reduce-on-plateau with patience 0) keeps ``lr`` after the warm-up and
    multiplies it by ``lr_shrink`` after every validation whose loss is not below the best so far.
    ``wsd`` (warm-up, stable, decay; Hägele et al. 2024) keeps ``lr`` after the warm-up and decays it linearly to
    ``min_lr_ratio * lr`` over the last ``cooldown`` share of the run (measured as ``cosine`` measures it); with a
    ``ladder`` the lr stays constant except inside a rung's cooldown branch (``rung``: that rung's FLOPs), which
    decays over the last ``cooldown`` share of the rung's FLOPs.
    """
    s, w = step + 1, max(1, cfg.warmup_steps)
    if cfg.schedule == "inverse_sqrt":
        return min(s / w, math.sqrt(w / s))
    warm = min(1.0, s / w)
    if cfg.schedule == "constant":
        return warm
    if cfg.schedule == "plateau":
        return warm * cfg.lr_shrink ** shrinks
    if cfg.schedule == "wsd":
        if cfg.ladder and not rung:  # the stable phase between a ladder's cooldown branches
            return warm
        if cfg.ladder:
            at, length = flops, rung
        else:
            at, length = ((s, cfg.max_steps) if cfg.max_steps else (flops, cfg.max_flops) if cfg.max_flops
                          else (seconds, cfg.max_seconds))
        decay = min(1.0, max(0.0, (at / length - (1 - cfg.cooldown)) / cfg.cooldown))
        return warm * (1 - (1 - cfg.min_lr_ratio) * decay)
    if cfg.max_steps:
        progress = (s - w) / max(1, cfg.max_steps - w)
    elif s <= w or warm_end is None:  # in the warm-up, or at its last step (not yet recorded): no decay yet
        progress = 0.0
    else:  # a compute or time budget: the decay follows what is spent after the warm-up, whatever the step rate
        start_seconds, start_flops = warm_end
        at, start, end = ((flops, start_flops, cfg.max_flops) if cfg.max_flops
                          else (seconds, start_seconds, cfg.max_seconds))
        progress = (at - start) / max(end - start, 1e-12)
    progress = min(1.0, max(0.0, progress))
    return warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class Progress:
    """Where the loop is; saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    cpu_seconds: float = 0.0  # process CPU time over the same timed windows (harness/utilization.py)
    load_average: dict = field(default_factory=dict)  # the 1-minute load average at training start and end
    best_valid_nll: float = float("inf")
    snapshot_seconds: float = 0.0  # train_seconds at the last weight snapshot (trainer.save_every_seconds)
    lr_shrinks: int = 0  # schedule=plateau: validations so far that did not improve on the best
    skipped_steps: list[int] = field(default_factory=list)
    log: list[dict] = field(default_factory=list)  # training loss curve
    evals: list[dict] = field(default_factory=list)  # validation curve
    # set when a resumed run found best.pt deleted: the best evaluation it lost, and which one best.pt holds now
    best_recreated: dict | None = None
    carried_state: tuple | None = None  # trainer.carry_state: the (detached) state the last batch ended in
    ended_by: str | None = None  # what ended training: max_steps, max_epochs, max_flops, max_seconds, stop_lr, stop_at
    warm_end: dict | None = None  # {seconds, flops} spent when the warm-up ended: a cosine over them decays from there
    ladder: list[dict] = field(default_factory=list)  # trainer.ladder: the rungs evaluated so far (Trainer.on_rung)
    # trainer.ladder, inside a rung's cooldown branch: {rung (index), flops (the rung's), from_step, from_flops,
    # evaluating (the cooldown is over and the cooled weights are being evaluated)}
    branch: dict | None = None


STABLE = "stable.pt"  # trainer.ladder: the stable phase's state, saved where a rung's cooldown branches off


class Trainer:
    """Trains ``model`` on ``task``; writes ``last.pt`` / ``best.pt`` under ``out_dir``."""

    def __init__(self, model, task, cfg: TrainConfig, out_dir: Path, device: torch.device, *, seed: int,
                 identity: dict, tracker=None, decoding: dict | None = None, should_stop=lambda: False,
                 dist: Dist = SINGLE, keep_snapshots: int | None = None):
        models.check_form(model, task)
        cfg.label_smoothing = label_smoothing(cfg.label_smoothing, task.form)  # null: the task's default
        beam = (decoding or {}).get("beam")  # before training: a beam the vocabulary cannot fill is refused
        if task.form == "seq2seq" and isinstance(beam, int) and beam_problem(beam, task.vocab()["tgt"]):
            raise ValueError(beam_problem(beam, task.vocab()["tgt"]))
        self.keep_snapshots = keep_snapshots  # weight snapshots kept (the last N); None: all
        self.model, self.task, self.cfg, self.device = model.to(device), task, cfg, device
        self.dist, self._stop_agreed = dist, False
        self.out_dir, self.seed, self.identity = Path(out_dir), seed, identity
        self.tracker, self.decoding, self.should_stop = tracker, dict(decoding or {}), should_stop
        self.precision, self.autocast = autocast_for(device, cfg.precision)  # resolved: never "auto"
        self.p = Progress()
        self.flops_per_token: float | None = None  # counted by the job before training; trainer.max_flops reads it
        # trainer.ladder: called with the rung's index when a rung's cooldown ends, the model holding the cooled
        # weights (in train mode); returns what the rung's entry in Progress.ladder holds besides its costs
        self.on_rung: Callable[[int], dict] | None = None
        self.ended_by: str | None = None
        self.start_phase(0)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        wrapped = model
        if dist.enabled:  # gradients averaged over the processes; parameters broadcast from rank 0
            wrapped = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        self.forward = torch.compile(wrapped) if cfg.compile else wrapped
        self.carry = lm_protocol.CarriedState(model, task, cfg.max_tokens, dist.enabled) if cfg.carry_state else None
        self.resumed_from: int | None = None
        self._epoch_batches: tuple[int | None, list] = (None, [])

    def start_phase(self, step: int) -> None:
        """The optimizer and schedule that take optimizer step ``step`` on (harness/optim.py); the schedule reads
        the training time (cosine over max_seconds) and the plateau shrinks so far from the progress."""
        kind, start = optim.phase(self.cfg, step)
        self.opt = optim.build(self.model.parameters(), self.cfg, self.device, kind)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(self.cfg, start + s, self.p.train_seconds, self.p.lr_shrinks, self.flops(),
                                          self.p.branch["flops"] if self.p.branch else None,
                                          self.p.warm_end and (self.p.warm_end["seconds"], self.p.warm_end["flops"])))

    def shrink_lr(self) -> None:
        """A validation did not improve on the best (schedule=plateau): shrink the learning rate from the next step."""
        self.p.lr_shrinks += 1
        factor = self.sched.lr_lambdas[0](self.sched.last_epoch)
        for group, base in zip(self.opt.param_groups, self.sched.base_lrs):
            group["lr"] = base * factor

    # -- checkpoints -------------------------------------------------------------------------
    def save(self, name: str, *, collective: bool = True) -> None:
        """Write a checkpoint (rank 0). Data-parallel: every rank calls it (``collective``), to hand over its RNG."""
        rng_ranks = None
        if self.dist.enabled and collective:
            rng_ranks = distributed.gather(checkpoint.rng_state())
        if self.dist.main:
            checkpoint.save(self.out_dir / name, model=self.model, optimizer=self.opt, scheduler=self.sched,
                            progress=self.p.__dict__, identity=self.identity, rng_ranks=rng_ranks)
        if self.dist.enabled and collective:
            distributed.barrier()  # nobody reads or moves past a checkpoint before it is on disk

    def maybe_resume(self) -> None:
        if self.dist.main:
            for stale in [*remove_stale_temps(self.out_dir, ".*.pt.*.tmp"),  # a checkpoint write cut by SIGKILL
                          *remove_stale_temps(self.out_dir / checkpoint.SNAPSHOTS, ".*.pt.*.tmp")]:
                log.warning("removed %s, left by an interrupted checkpoint write", stale)
        path = self.out_dir / "last.pt"
        if not (self.cfg.resume and path.is_file()):
            return
        ckpt = checkpoint.load(path, self.identity)
        self._load_state(ckpt)
        self.p = Progress(**ckpt["progress"])
        self.resumed_from = self.p.step
        self._forget_deleted_best()

    def _load_state(self, ckpt: dict) -> None:
        """Weights, optimizer, schedule and random streams from a checkpoint (the progress is the caller's)."""
        self.model.load_state_dict(ckpt["model"])
        self.start_phase(ckpt["progress"]["step"])  # adam_then_sgd past its switch: the SGD phase's state
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        ranks = ckpt.get("rng_ranks") or []
        if len(ranks) == self.dist.world:
            checkpoint.set_rng_state(ranks[self.dist.rank])
        elif self.dist.main:
            checkpoint.set_rng_state(ckpt["rng"])
        else:  # resumed on another number of processes: fresh, distinct dropout streams
            torch.manual_seed(self.seed + 7919 * self.dist.rank + ckpt["progress"]["step"])

    def _forget_deleted_best(self) -> None:
        """best.pt was written before but is gone (deleted, e.g. as its load error advises for a corrupt one).

        The best evaluation so far is lost with it, so the next evaluation writes best.pt whatever its loss;
        if training is already over, :meth:`_recreate_best` writes it from the final model. Rank 0 decides:
        every rank must take the same (collective) checkpoint writes.
        """
        gone = self.dist.main and bool(self.p.evals) and not (self.out_dir / "best.pt").is_file()
        if not distributed.broadcast(gone):
            return
        lost = min(self.p.evals, key=lambda row: row["valid_nll"])
        self.p.best_recreated = {"lost": {"step": lost["step"], "valid_nll": lost["valid_nll"]},
                                 "from_step": self.p.step, "evals_before": len(self.p.evals)}
        self.p.best_valid_nll = float("inf")
        if self.dist.main:
            log.warning("best.pt is missing (it held step %d, valid_nll %.4g); the next evaluation writes a new one",
                        lost["step"], lost["valid_nll"])

    def _recreate_best(self) -> None:
        """After training, say in ``best_recreated`` which evaluation best.pt holds since it went missing.

        With no evaluation since (training was already over), best.pt is written from the final model:
        last.pt's, evaluated at this step.
        """
        p, note = self.p, self.p.best_recreated
        if note is None:
            return
        since = p.evals[note["evals_before"]:]
        if not since:
            since = [p.evals[-1]]
            if "step" not in note:
                p.best_valid_nll = since[0]["valid_nll"]
                self.save("best.pt")
        best = min(since, key=lambda row: row["valid_nll"])
        if note.get("step") != best["step"]:
            note.update(step=best["step"], valid_nll=best["valid_nll"])
            self.save("last.pt")  # its progress says what best.pt holds, for a later resume

    def snapshot(self, *, final: bool = False) -> None:
        """Every ``save_every`` steps or ``save_every_seconds`` of training, and at its end (``final``): the
        weights as ``ckpt/step_<k>.pt`` (rank 0), the checkpoints ``eval.checkpoint=average`` averages."""
        c, p = self.cfg, self.p
        if not (c.save_every or c.save_every_seconds):
            return
        due = final or (c.save_every and p.step % c.save_every == 0) or (
            c.save_every_seconds and p.train_seconds - p.snapshot_seconds >= c.save_every_seconds)
        if not due or (final and checkpoint.snapshot_path(self.out_dir, p.step).is_file()):
            return
        p.snapshot_seconds = p.train_seconds
        if self.dist.main:
            checkpoint.save_snapshot(self.out_dir, model=self.model, identity=self.identity, progress=p.__dict__,
                                     keep=self.keep_snapshots)

    # -- budget ------------------------------------------------------------------------------
    def flops(self) -> float:
        """Counted training FLOPs so far: FLOPs per token (counted once, by the job) x training tokens."""
        return (self.flops_per_token or 0.0) * self.p.tokens

    def budget_left(self, n_batches: int) -> bool:
        """Whether training goes on; when not, ``ended_by`` names the budget that ended it."""
        c, p = self.cfg, self.p
        reached = bool(p.evals) and p.evals[-1]["step"] == p.step and target_reached(c.stop_at, p.evals[-1])
        ended = [key for key, spent in (("stop_at", reached),
                                        ("max_steps", c.max_steps is not None and p.step >= c.max_steps),
                                        ("max_epochs", c.max_epochs is not None
                                         and p.epoch + p.batch_in_epoch / max(1, n_batches) >= c.max_epochs),
                                        ("max_flops", c.max_flops is not None and self.flops() >= c.max_flops),
                                        ("stop_lr", c.schedule == "plateau"
                                         and self.sched.base_lrs[0] * c.lr_shrink ** p.lr_shrinks < c.stop_lr),
                                        ("max_seconds", c.max_seconds is not None and p.train_seconds >= c.max_seconds))
                 if spent]
        self.ended_by = ended[0] if ended else None
        return not ended

    # -- one step ----------------------------------------------------------------------------
    def train_step(self, batch, n_tokens: int | None = None) -> torch.Tensor | None:
        """Forward, backward and update on one batch; returns the summed token loss (detached), or None when the
        update was skipped (a non-finite loss, ``trainer.on_nonfinite=skip``).

        ``n_tokens``: the loss is a mean over this many tokens (data-parallel: the global batch's;
        DistributedDataParallel averages gradients over the ranks, hence the factor ``world``).
        """
        with self.autocast():
            logits, target = (training_logits(self.model, batch, self.forward) if self.carry is None
                              else (self._carried(batch), batch.target))
        loss = smoothed_cross_entropy(logits, target, self.cfg.label_smoothing, batch.ignore_index)
        self.scaler.scale(loss * (self.dist.world / (n_tokens or batch.n_tokens))).backward()
        if self.cfg.clip_norm > 0:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_norm)
        finite = True
        if self.cfg.on_nonfinite == "skip":
            finite = bool(torch.isfinite(loss))
            if self.dist.enabled:  # every rank skips, or none
                finite = distributed.agree([float(not finite)])[0] == 0
        if finite:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.p.skipped_steps.append(self.p.step + 1)
            log.warning("non-finite loss %s at step %d: update skipped (trainer.on_nonfinite=skip)",
                        loss.item(), self.p.step + 1)
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        return loss.detach() if finite else None

    def _carried(self, batch):
        """trainer.carry_state: the forward pass from the state the epoch's previous batch ended in (zero first)."""
        start = self.p.carried_state if self.p.batch_in_epoch else None
        logits, self.p.carried_state = self.carry.forward(self.forward, batch, start)
        return logits

    # -- evaluation during training ----------------------------------------------------------
    def validate(self) -> dict:
        if self.dist.enabled:  # rank 0 evaluates the model (the same on every rank); the others wait
            row = self._validate() if self.dist.main else None
            return distributed.broadcast(row)
        return self._validate()

    def _validate(self) -> dict:
        nll, _ = mean_nll(self.model, self.task, "valid", self.device, self.cfg.max_tokens, self.autocast,
                          self.check_stop)
        row = {"step": self.p.step, "train_seconds": round(self.p.train_seconds, 3), "tokens": self.p.tokens,
               "valid_nll": nll, "valid_ppl": perplexity(nll)}  # None (null) where exp overflows: diverged
        row.update(self.task.validate(self.model, EvalContext(self.device, self.cfg.max_tokens, self.decoding,
                                                              self.precision, check_stop=self.check_stop,
                                                              greedy_curve=self.cfg.valid_bleu)))
        self.model.train()
        return row

    def check_stop(self) -> None:
        """Validation's ``check_stop`` (single process): a stop signal ends a long validation at its next decoding
        step or batch, with :class:`Interrupted` (data-parallel ranks stop together between steps instead)."""
        if not self.dist.enabled and self.should_stop():
            raise Interrupted(f"stop requested at step {self.p.step}, during validation")

    def evaluate_and_save(self) -> None:
        row = self.validate()
        if not math.isfinite(row["valid_nll"]):
            raise NonFiniteLoss(f"validation loss is {row['valid_nll']} at step {self.p.step}: the model's weights or "
                                "outputs are not finite; lower trainer.lr or set trainer.clip_norm (last.pt is "
                                "the previous evaluation's)")
        if self.cfg.schedule == "plateau" and row["valid_nll"] >= self.p.best_valid_nll:
            self.shrink_lr()
        self.p.evals.append(row)
        if self.dist.main:
            log.info("eval %s", " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in row.items()))
        if self.tracker:
            self.tracker.log({k: v for k, v in row.items() if k != "step"}, step=self.p.step)
        if row["valid_nll"] < self.p.best_valid_nll:
            self.p.best_valid_nll = row["valid_nll"]
            self.save("best.pt")
        self.save("last.pt")

    def log(self, window_loss: float, window_tokens: int, window_seconds: float, bar) -> None:
        if not self.dist.main:  # rank 0 keeps the curves
            return
        row = {"step": self.p.step, "epoch": self.p.epoch, "loss": window_loss / max(window_tokens, 1),
               "lr": self.sched.get_last_lr()[0], "tokens_per_second": window_tokens / max(window_seconds, 1e-9),
               "train_seconds": round(self.p.train_seconds, 3)}
        gpu = utilization.gpu_percent(self.device)
        if gpu is not None:
            row["gpu_utilization"] = gpu
        self.p.log.append(row)
        log.info("step %d%s epoch %d loss %.4f lr %.3g tok/s %.0f ETA %s", row["step"],
                 f"/{self.cfg.max_steps}" if self.cfg.max_steps else "", row["epoch"], row["loss"], row["lr"],
                 row["tokens_per_second"], self.eta())
        if self.tracker:
            self.tracker.log({f"train/{k}": v for k, v in row.items() if k != "step"}
                             | {"train_seconds": row["train_seconds"]}, step=self.p.step)  # both x-axes

    def eta(self) -> str:
        """Training time left under the budget that ends first (evaluation pauses not counted)."""
        c, p = self.cfg, self.p
        left = []
        if c.max_seconds:
            left.append(c.max_seconds - p.train_seconds)
        if c.max_steps and p.step:
            left.append((c.max_steps - p.step) * p.train_seconds / p.step)
        if c.max_flops and p.tokens:
            left.append((c.max_flops - self.flops()) * p.train_seconds / self.flops())
        return f"{max(0, min(left)) / 60:.1f}min" if left else "?"

    def progress_bar(self, n_batches: int) -> tqdm:
        """The job's progress line, to a total: steps out of ``max_steps`` (or the steps of ``max_epochs``), per mille
        of ``max_flops`` when a FLOP budget bounds training, or whole seconds of training out of ``max_seconds`` when
        time alone does; tqdm shows the time left, and :meth:`advance` adds step, loss, lr and the training time left
        under the budget that ends first (eta)."""
        c, p = self.cfg, self.p
        self._by_flops = bool(c.max_flops) and not c.max_steps
        self._by_time = bool(c.max_seconds) and not c.max_steps and not self._by_flops
        self._bar_at = self._bar_position()
        self._bar_shown = -math.inf
        kwargs = {"unit": "s"} if self._by_time else {"unit": "‰ FLOPs"} if self._by_flops else {}
        total = (1000 if self._by_flops else math.ceil(c.max_seconds) if self._by_time
                 else c.max_steps or math.ceil(c.max_epochs * n_batches))
        self._bar_total = total
        return tqdm(total=total, initial=self._bar_at, disable=not (c.progress and self.dist.main),
                    dynamic_ncols=True, desc="train", mininterval=BAR_SECONDS, **kwargs)

    def _bar_position(self) -> int:
        if self._by_flops:
            return min(1000, int(1000 * self.flops() / self.cfg.max_flops))
        return int(self.p.train_seconds) if self._by_time else self.p.step

    def advance(self, bar: tqdm, window: list) -> None:
        """One step on the progress line (whole seconds of training when it counts time); at most every
        ``BAR_SECONDS`` its text: step, mean token loss since the last log step, lr and eta."""
        at = self._bar_position()
        last = self._bar_at < self._bar_total <= at  # the budget's end: the line shows the final values
        if at > self._bar_at:
            bar.update(at - self._bar_at)
            self._bar_at = at
        now = monotonic()
        if not (self.cfg.progress and self.dist.main) or (now - self._bar_shown < BAR_SECONDS and not last):
            return
        self._bar_shown = now
        loss = window[0].item() / window[1] if window[1] else self.p.log[-1]["loss"] if self.p.log else None
        bar.set_postfix(ordered_dict={"step": self.p.step, "loss": "-" if loss is None else f"{loss:.3f}",
                                      "lr": f"{self.sched.get_last_lr()[0]:.3g}", "eta": self.eta()})

    # -- the budget ladder (trainer.ladder, schedule=wsd) --------------------------------------
    def _ladder_step(self) -> bool:
        """Before a step: branch the next rung's cooldown from the stable phase once its FLOPs reach
        ``(1 - cooldown) x rung`` (the stable state saved as ``stable.pt``), or, at the rung's FLOPs, evaluate the
        cooled weights (:attr:`on_rung`) and go back to the stable state. Returns True when it went back.

        The top rung is the run's own budget: its cooldown ends training, and the job evaluates it as any run.
        A stop during a cooldown resumes the cooldown (``last.pt`` holds the branch); a stop during a rung's
        evaluation evaluates it again; the stable branch continues exactly as if no cooldown had been taken
        (weights, optimizer, RNG and progress come back from ``stable.pt``).
        """
        c, p = self.cfg, self.p
        k = len(p.ladder)
        if k >= len(c.ladder):
            return False
        rung, top = c.ladder[k], k == len(c.ladder) - 1
        if p.branch is None:
            if self.flops() < rung * (1 - c.cooldown):
                return False
            if not top:
                self.save(STABLE)
            p.branch = {"rung": k, "flops": rung, "from_step": p.step, "from_flops": self.flops(), "evaluating": False}
            log.info("ladder: rung %d (%.3g FLOPs) cooldown from step %d", k, rung, p.step)
            return False
        if top or self.flops() < rung:
            return False
        p.branch["evaluating"] = True
        self.save("last.pt")  # a stop during the evaluation evaluates this rung again on resume
        entry = {**self.rung_entry(), **(self.on_rung(k) if self.on_rung is not None else {})}
        self.model.train()
        ckpt = checkpoint.load(self.out_dir / STABLE, self.identity)
        self._load_state(ckpt)
        self.p = Progress(**{**ckpt["progress"], "ladder": [*p.ladder, entry]})
        log.info("ladder: rung %d evaluated at step %d; back to the stable phase at step %d", k, p.step, self.p.step)
        self.save("last.pt")
        return True

    def rung_entry(self) -> dict:
        """The present rung's line in Progress.ladder (and the record's ``ladder``): its budget and what reaching
        it cost, counted as a run of that budget (the stable phase up to the branch, then the cooldown)."""
        p, k = self.p, len(self.p.ladder)
        branch = p.branch or {}  # none: one step crossed both the rung's cooldown start and its end
        return {"rung": k, "flops": self.cfg.ladder[k], "train_flops": self.flops(), "steps": p.step,
                "tokens": p.tokens, "train_seconds": round(p.train_seconds, 3),
                "cooldown_from_step": branch.get("from_step"), "cooldown_from_flops": branch.get("from_flops")}

    def _evaluation_owed(self) -> bool:
        """Resumed at an evaluation step whose evaluation was cut by a stop (last.pt saved without it): the run
        evaluates that step before training on, so its curve and best.pt match an uninterrupted run's. A step
        that ended the budget is evaluated after the loop instead (:meth:`fit`'s final evaluation)."""
        p = self.p
        return (self.resumed_from is not None and p.step > 0 and p.step % self.cfg.eval_every == 0
                and (not p.evals or p.evals[-1]["step"] != p.step) and self.budget_left(len(self.epoch_batches(p.epoch))))

    # -- the loop ----------------------------------------------------------------------------
    def epoch_batches(self, epoch: int) -> list:
        """The training batches of ``epoch`` in its shuffled order, built once per epoch (the job also samples
        epoch 0's to count FLOPs); carried-state training has one fixed order."""
        if self.carry:
            return self.carry.batches
        if self._epoch_batches[0] != epoch:
            self._epoch_batches = (epoch, self.task.batches("train", self.cfg.max_tokens, epoch=epoch, shuffle=True,
                                                             seed=self.seed))
        return self._epoch_batches[1]

    def fit(self) -> Progress:
        """Train until the budget is spent; returns the final progress (logs included)."""
        torch.manual_seed(self.seed + 7919 * self.dist.rank)  # rank 0 draws what a single process draws
        if self.cfg.max_flops and not self.flops_per_token:
            raise ValueError("trainer.max_flops needs the model's training FLOPs per token, which job.run counts before "
                             "training (Trainer.flops_per_token); set it, or bound training by steps or seconds")
        self.maybe_resume()
        self.model.train()
        cfg, p = self.cfg, self.p
        bar = self.progress_bar(len(self.epoch_batches(p.epoch)))
        window = [torch.zeros((), device=self.device), 0, 0.0]  # loss sum, tokens, seconds
        p.load_average.setdefault("start", utilization.load_average())
        try:
            if self._evaluation_owed():  # stopped during this step's evaluation: it comes first, as it would have
                self.evaluate_and_save()
            while True:
                batches, restored = self.epoch_batches(p.epoch), False
                while p.batch_in_epoch < len(batches) and self.budget_left(len(batches)):
                    if self._stop_agreed if self.dist.enabled else self.should_stop():
                        raise Interrupted(f"stop requested at step {p.step}")
                    if cfg.ladder and self._ladder_step():  # back on the stable branch: its epoch and position
                        p, restored = self.p, True
                        break
                    batch = batches[p.batch_in_epoch]
                    n_tokens = batch.n_tokens  # the global batch's (data-parallel: all ranks together)
                    if self.dist.enabled:
                        batch = batch.shard(self.dist.rank, self.dist.world)
                    batch = batch.to(self.device)
                    start, cpu_start = time.perf_counter(), time.process_time()
                    loss = self.train_step(batch, n_tokens)
                    p.step, p.batch_in_epoch, p.tokens = p.step + 1, p.batch_in_epoch + 1, p.tokens + n_tokens
                    if optim.phase(cfg, p.step) != optim.phase(cfg, p.step - 1):  # adam_then_sgd's switch
                        self.start_phase(p.step)
                    if loss is not None:  # None: a skipped non-finite step, kept out of the logged loss
                        window[0] += loss
                        window[1] += n_tokens
                    if p.step % cfg.log_every == 0 or not self.budget_left(len(batches)):
                        sync(self.device)
                    elapsed = time.perf_counter() - start
                    p.train_seconds += elapsed
                    p.cpu_seconds += time.process_time() - cpu_start
                    if self.dist.enabled:  # one clock and one stop decision for all ranks
                        stop, p.train_seconds = distributed.agree([float(self.should_stop()), p.train_seconds])
                        self._stop_agreed = stop > 0
                    if p.warm_end is None and p.step >= cfg.warmup_steps:  # after the ranks agree on the clock
                        p.warm_end = {"seconds": p.train_seconds, "flops": self.flops()}
                    window[2] += elapsed
                    self.advance(bar, window)
                    if p.step % cfg.log_every == 0:
                        total = window[0].item()
                        if self.dist.enabled:  # the global batch's loss: every rank's part
                            total = distributed.agree([total], op="sum")[0]
                        if not math.isfinite(total) and cfg.on_nonfinite == "fail":
                            raise NonFiniteLoss(f"training loss is {total} at step {p.step} (window ending here); "
                                                "lower trainer.lr, set trainer.clip_norm, or trainer.on_nonfinite=skip")
                        if window[1]:  # a window of skipped steps only logs no loss
                            self.log(total, window[1], window[2], bar)
                        window = [torch.zeros((), device=self.device), 0, 0.0]
                    self.snapshot()
                    if p.step % cfg.eval_every == 0:
                        self.evaluate_and_save()
                if restored:
                    continue
                if not self.budget_left(len(batches)):
                    p.ended_by = self.ended_by
                    break
                p.epoch, p.batch_in_epoch = p.epoch + 1, 0
        except Interrupted:
            self.save("last.pt")
            raise
        except KeyboardInterrupt:  # Ctrl-C may reach one rank only: no collective call
            self.save("last.pt", collective=False)
            raise
        finally:
            bar.close()
        p.load_average["end"] = utilization.load_average()
        if not p.evals or p.evals[-1]["step"] != p.step:
            try:
                self.evaluate_and_save()
            except Interrupted:  # stopped during the last validation: the trained steps are kept
                self.save("last.pt")
                raise
        self.snapshot(final=True)
        self._recreate_best()
        return p
