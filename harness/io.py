"""Atomic file writes: a crash mid-write never leaves a half-written file behind."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno == 28:  # ENOSPC
            raise OSError(err.errno, f"no space left on device while writing {path}; free space or move "
                                     "the output directory (hydra.run.dir / hydra.sweep.dir)") from err
        raise


def remove_stale_temps(folder: Path, pattern: str = ".*.tmp") -> list[Path]:
    """Delete temporary files a killed writer left in ``folder`` (SIGKILL skips the cleanup above).

    They are never read (the target name is only ever replaced whole), so this only frees space.
    Call it only where no other process is writing, e.g. in a job's own output folder at its start.
    """
    removed = []
    for p in Path(folder).glob(pattern):
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def write_json(path: Path, obj: Any) -> None:
    _atomic(path, lambda f: f.write(json.dumps(obj, indent=1, sort_keys=False, default=str).encode()))


def save_torch(path: Path, obj: Any) -> None:
    _atomic(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(path, lambda f: f.write(text.encode("utf-8")))
