"""Data parallelism: one process per device, gradients averaged by DistributedDataParallel.

A job runs distributed when its environment says so:

- ``torchrun --nproc_per_node N run.py ...`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*``;
- a submitit SLURM job with several tasks (``hydra.launcher.tasks_per_node=N``, one GPU each)
  gets them from submitit's ``TorchDistributedEnvironment``.

``trainer.max_tokens`` stays the batch of one optimizer step, whatever the number of
processes: each global batch is split by rows across the ranks and every rank's loss is
normalised by the global token count, so N processes take the same steps as one process
would (up to the order of floating-point sums). Only rank 0 evaluates, writes checkpoints,
records and logs; the others follow its decisions (budget, stop signals, evaluations).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank ``rank`` of ``world`` processes (``world == 1``: not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()
_CONTROL = None  # a gloo group for small CPU-side agreements (budget, stop, evaluation results)


def from_environment() -> Dist:
    """Read (and, inside a multi-task submitit job, first export) the torch.distributed environment."""
    env = os.environ
    if ("RANK" not in env and env.get("SUBMITIT_EXECUTOR") == "slurm"
            and int(env.get("SLURM_NTASKS", "1")) > 1):
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    return Dist(rank=int(env["RANK"]), world=world, local_rank=int(env.get("LOCAL_RANK", "0")))


def init(d: Dist, device: torch.device, timeout_minutes: float = 120) -> None:
    """Join the process group (NCCL on CUDA, gloo on CPU); a no-op for a single process.

    The timeout bounds how long ranks wait for rank 0's evaluations and checkpoint writes.
    """
    global _CONTROL
    if not d.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    dist.init_process_group(backend, rank=d.rank, world_size=d.world, timeout=timeout)
    _CONTROL = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD


def is_initialized() -> bool:
    return dist.is_initialized()


def shutdown() -> None:
    global _CONTROL
    if dist.is_initialized():
        dist.destroy_process_group()
    _CONTROL = None


def device_for(d: Dist, name: str) -> str:
    """The device name for this rank: ``auto``/``cuda`` become ``cuda:<local rank>`` when distributed on GPUs."""
    if d.enabled and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{d.local_rank}"
    return name


def agree(values: list[float], op: str = "max") -> list[float]:
    """The element-wise max (or sum) of ``values`` over all ranks, on the CPU control group."""
    if op not in ("max", "sum"):
        raise ValueError(f"agree(op={op!r}): op must be 'max' or 'sum'")
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=_CONTROL)
    return t.tolist()


def broadcast(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (pickled, on the CPU control group)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_CONTROL)
    return box[0]


# -- the hand-over of a job's set-up: rank 0 builds first (tokenizer caches, checks); the others wait for it

def lead(d: Dist, device: torch.device, out_dir) -> None:
    """Rank 0: join the process group and tell the followers the job's folder (they read checkpoints from it)."""
    init(d, device)
    broadcast(str(out_dir))


def setup_done(error: str | None = None) -> None:
    """Rank 0: set-up finished (the followers build the same task and model now), or failed with ``error``."""
    broadcast(error)


def follow(d: Dist, device: torch.device) -> Path:
    """A rank other than 0: join, wait for rank 0's set-up; returns rank 0's output folder, raises on its error."""
    init(d, device)
    out_dir = Path(broadcast(None))
    error = broadcast(None)
    if error is not None:
        raise RuntimeError(f"rank 0 failed while setting up the job: {error}")
    return out_dir


def gather(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_CONTROL)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier(group=_CONTROL)
