"""Checkpoints: everything needed to resume a run exactly, loaded with ``weights_only=True``.

Each checkpoint carries the identity of the run that wrote it: the model, task and vocabulary, the device
type, the full resolved config and checksums of the data as the model reads them. A run resumes it only
when nothing but its budgets, evaluation, logging and operational settings (``RESUMABLE``) differ, so one
record never describes a model trained partly with other settings or data.
"""
from __future__ import annotations

import hashlib
import logging
import random
import re
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from .io import save_torch

FORMAT = 1
STRUCTURE = ("model", "task", "vocab")  # what the weights' shapes and meaning depend on
# Settings a resumed run may change (a key or a whole group). Budgets and evaluation: the same training, taken
# further or scored otherwise; logger: tracking only; operational: where and how fast it runs, not what it
# computes. The data are compared by content (``data_checksums``), so their location may move; the device by
# type (``device``: cpu | cuda), so a requeued job may land on another GPU of the same kind. ``tuned`` names the
# file the trainer settings came from; the settings themselves are compared.
RESUMABLE = ("tuned", "trainer.max_steps", "trainer.max_seconds", "trainer.max_epochs", "trainer.stop_at", "eval",
             "logger", "device", "trainer.threads", "trainer.progress", "trainer.log_every", "trainer.resume",
             "data.root", "data.cache_dir", "data.download", "sweep_name", "trainer.save_every",
             "trainer.save_every_seconds")
SNAPSHOTS = "ckpt"  # <out>/ckpt/step_<k>.pt: the weights every trainer.save_every steps (eval.checkpoint=average)
CHECKED_SPLITS = ("train", "valid")  # what training and checkpoint selection read; the test split is evaluation
log = logging.getLogger("seqbench")


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable or does not belong to this model/run."""


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, *, model, optimizer, scheduler, progress: dict, identity: dict,
         rng_ranks: list[dict] | None = None) -> None:
    """Atomically write model/optimizer/scheduler/RNG state and the loop position.

    ``rng_ranks``: every process's RNG state in a data-parallel job (rank order), so each resumes its own.
    """
    save_torch(path, {
        "format": FORMAT, "identity": identity, "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_ranks[0] if rng_ranks else rng_state(), "progress": progress,
        **({"rng_ranks": rng_ranks} if rng_ranks else {}),
    })


def snapshot_path(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / SNAPSHOTS / f"step_{step}.pt"


def snapshots(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the weight snapshots in ``folder``, oldest first."""
    named = ((re.fullmatch(r"step_(\d+)\.pt", p.name), p) for p in Path(folder).glob("step_*.pt"))
    return sorted((int(m.group(1)), p) for m, p in named if m)


def save_snapshot(out_dir: Path, *, model, identity: dict, progress: dict, keep: int | None = None) -> Path:
    """Atomically write the model's weights as ``<out_dir>/ckpt/step_<k>.pt``, then delete all but the last ``keep``.

    Weights only (no optimizer or RNG state): a snapshot is only ever averaged for evaluation, never resumed,
    so it costs a third of ``last.pt``'s space with Adam. It carries the run's identity like every checkpoint.
    """
    path = snapshot_path(out_dir, progress["step"])
    save_torch(path, {"format": FORMAT, "identity": identity, "model": model.state_dict(),
                      "progress": {"step": progress["step"], "train_seconds": progress["train_seconds"]}})
    if keep is not None:
        for _, old in snapshots(path.parent)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def average_states(states: list[dict]) -> dict:
    """The element-wise mean of state dicts with the same keys, in float64, cast back to each tensor's dtype.

    A running mean (``m += (x - m) / k``): copies of one value average to exactly that value, whatever its dtype.
    Tensors that are not floating point (integer counters, masks) cannot be averaged: they come from the last.
    """
    out = {}
    for key, last in states[-1].items():
        if torch.is_tensor(last) and last.is_floating_point():
            mean = states[0][key].to(torch.float64, copy=True)
            for k, state in enumerate(states[1:], start=2):
                mean += (state[key].to(torch.float64) - mean) / k
            out[key] = mean.to(last.dtype)
        else:
            out[key] = last
    return out


def average_last(folder: Path, n: int, identity: dict) -> tuple[dict, dict]:
    """The mean weights of the last ``n`` snapshots in ``folder`` (each loaded and checked like any checkpoint),
    and what was averaged, for the record: steps, files and a warning where fewer than ``n`` exist.

    Raises:
        CheckpointError: no snapshot at all, or one that is unreadable or belongs to another run.
    """
    chosen = snapshots(folder)[-n:]
    if not chosen:
        raise CheckpointError(f"eval.checkpoint=average found no checkpoint in {folder}: training ended before its "
                              "first trainer.save_every / save_every_seconds. Rerun the same command in the same "
                              "folder with eval.checkpoint=last (or best) to evaluate the trained model")
    states = [load(path, identity)["model"] for _, path in chosen]
    entry = {"kind": "average", "average_last": n, "steps": [step for step, _ in chosen],
             "files": [f"{SNAPSHOTS}/{path.name}" for _, path in chosen]}
    if len(chosen) < n:
        entry["warnings"] = [f"eval.average_last={n} but only {len(chosen)} checkpoint(s) were saved in {folder}: "
                             f"the evaluated weights average those {len(chosen)}"]
    return average_states(states), entry


def load(path: Path, identity: dict) -> dict:
    """Read a checkpoint and check that this run (``identity``) may continue it (see :func:`mismatch`).

    Raises:
        CheckpointError: truncated/corrupt file, unsafe pickle, a different model, other settings or data.
    """
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: no evaluation saved it (best.pt is written at each "
                              "evaluation that improves the validation loss); train first, or use eval.checkpoint=last")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        text = str(err)
        if "Weights only load failed" in text or "Unsupported global" in text:
            # torch's own text suggests weights_only=False, which would run the code: quote only what it refused
            found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
            what = ("holds objects that are not plain tensors/containers (refused: loading it could run code; "
                    f"it asks for {found.group(1) if found else 'a global that is not allowed'})")
        else:
            what = f"is truncated or corrupt ({type(err).__name__}: {text[:200]})"
        raise CheckpointError(f"cannot load checkpoint {path}: it {what}. {_way_out(Path(path))}") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a seqbench checkpoint (format {FORMAT}); delete it or use a fresh "
                              "output directory")
    problem = mismatch(path, ckpt.get("identity") or {}, identity)
    if problem:
        raise CheckpointError(problem)
    return ckpt


def _way_out(path: Path) -> str:
    """What deleting an unreadable checkpoint leads to: the advice has to match what the next run does."""
    if path.name == "best.pt":
        return ("Delete it and rerun the same command: the run resumes from last.pt and writes a new best.pt at its "
                "next evaluation, or from its final model if training is over (the record's best_recreated says "
                "which); or evaluate last.pt instead with eval.checkpoint=last.")
    return "Delete it to start over (a resumed run then restarts from step 0), or point at another checkpoint."


def data_checksums(task) -> dict:
    """sha256 per split of the token ids the model reads: they change with the files and with the tokenizer
    (a rewritten training file of the same vocabulary size too), not with where the files are."""
    return {split: _digest(a) for split, a in task.data_arrays().items()}


def _digest(arrays: list, chunk: int = 1 << 16) -> str:
    """sha256 of the arrays' sizes, then their values as int64: where one sequence ends is part of the data."""
    h = hashlib.sha256(np.array([np.size(a) for a in arrays], dtype=np.int64).tobytes())
    for i in range(0, len(arrays), chunk):  # bounded memory on large corpora
        h.update(np.ascontiguousarray(np.concatenate([np.ravel(a) for a in arrays[i:i + chunk]]), dtype=np.int64))
    return h.hexdigest()


def mismatch(path: Path, saved: dict, identity: dict) -> str | None:
    """Why the checkpoint at ``path`` (its ``saved`` identity) cannot continue a run of ``identity``, or None."""
    structure = {k: (saved.get(k), identity[k]) for k in STRUCTURE if k in identity and saved.get(k) != identity[k]}
    changes = _changes(saved, identity)
    if not structure and not changes:
        return None
    listed = "; ".join(f"{name}: {_value(old)} -> {_value(new)}" for name, old, new in changes)
    if structure:
        return (f"checkpoint {path} was made for another model or data: (saved, now) = {structure}. Use a fresh "
                "output directory for a different model, task or vocabulary (hydra.run.dir=<new folder>)."
                + (f" Differing (checkpoint -> now): {listed}." if listed else ""))
    olds = " ".join(_override(name, old, new) for name, old, new in changes if not name.startswith("data "))
    ways = ([f"rerun with the checkpoint's values ({olds})"] if olds else []) + (
        ["restore the data it was trained on"] if any(n.startswith("data ") for n, _, _ in changes) else [])
    return (f"checkpoint {path} was written by a run with other settings or data, and resuming it would mix the two "
            f"in one run. Differing (checkpoint -> now): {listed}. To resume, {' and '.join(ways)}; or start "
            "this run in a new output folder (hydra.run.dir=<new folder>). A resumed run may change only its budgets "
            "(trainer.max_steps/max_seconds/max_epochs/stop_at), eval.*, logger.* and operational settings "
            "(device index, trainer.threads/progress/log_every/resume, data.root/cache_dir/download, sweep_name).")


def _added_at_default(old: dict, new: dict) -> set[str]:
    """Trainer settings this run has and the checkpoint's config lacks, at their default: settings added to
    seqbench after the checkpoint was written, whose default is what the older code did, so resuming is safe."""
    from .train import TrainConfig  # noqa: PLC0415 (train imports this module)

    defaults = {f"trainer.{f.name}": f.default for f in fields(TrainConfig)}
    return {k for k, v in new.items() if k not in old and k in defaults and v == defaults[k]}


def _changes(saved: dict, identity: dict) -> list[tuple[str, object, object]]:
    """(name, checkpoint's, this run's) for each checked setting, the device type and each data split that differ."""
    missing = [k for k in ("config", "device", "data") if k in identity and k not in saved]
    if missing:
        log.warning("the checkpoint predates recording its %s: resuming it without checking them", ", ".join(missing))
    changes = []
    if "config" in saved and "config" in identity:
        old, new = _flat(saved["config"]), _flat(identity["config"])
        schedule_length = None  # the budget that sets the cosine schedule's length: max_steps, else max_seconds
        if "cosine" in (old.get("trainer.schedule"), new.get("trainer.schedule")):
            schedule_length = ("trainer.max_steps" if old.get("trainer.max_steps") or new.get("trainer.max_steps")
                               else "trainer.max_seconds")
        added = _added_at_default(old, new)
        for key in dict.fromkeys([*new, *old]):
            free = any(key == r or key.startswith(r + ".") for r in RESUMABLE) or key in added
            if key == schedule_length:
                free = False  # the cosine schedule's length
            if not free and old.get(key, _ABSENT) != new.get(key, _ABSENT):
                changes.append((key, old.get(key, _ABSENT), new.get(key, _ABSENT)))
    if "device" in saved and "device" in identity and saved["device"] != identity["device"]:
        changes.append(("device (type)", saved["device"], identity["device"]))
    for split in CHECKED_SPLITS:
        old, new = (saved.get("data") or {}).get(split), (identity.get("data") or {}).get(split)
        if "data" in saved and "data" in identity and old != new:
            changes.append((f"data ({split} split, sha256 of its token ids)", _short(old), _short(new)))
    return changes


_ABSENT = object()  # a setting one of the two configs does not have


def _flat(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _value(v) -> str:
    """A setting as it is written on the command line."""
    if v is _ABSENT:
        return "(absent)"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    return str(v)


def _override(name: str, old, new) -> str:
    if old is _ABSENT:
        return f"~{name}"
    return f"{'+' if new is _ABSENT else ''}{name.replace(' (type)', '')}={_value(old)}"


def _short(digest: str | None) -> str:
    return f"{digest[:12]}..." if digest else "(none)"
