"""Checkpoints: everything needed to resume a run exactly, loaded with ``weights_only=True``."""
from __future__ import annotations

import random
import re
from pathlib import Path

import torch

from .io import save_torch

FORMAT = 1


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


def load(path: Path, identity: dict) -> dict:
    """Read a checkpoint and check it was made for the same model and vocabulary.

    Raises:
        CheckpointError: truncated/corrupt file, unsafe pickle, or a different model.
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
        raise CheckpointError(f"cannot load checkpoint {path}: it {what}. Delete it to start over (a resumed run "
                              "then restarts from step 0), or point at another checkpoint.") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a seqbench checkpoint (format {FORMAT}); delete it or use a fresh "
                              "output directory")
    saved = ckpt.get("identity") or {}
    if saved != identity:
        diff = {k: (saved.get(k), v) for k, v in identity.items() if saved.get(k) != v}
        raise CheckpointError(f"checkpoint {path} was made for another model or data: (saved, now) = {diff}. "
                              "Use a fresh output directory for a different model, task or vocabulary.")
    return ckpt
