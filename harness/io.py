"""Atomic file writes (a crash mid-write never leaves a half-written file behind) and output-folder locks."""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("seqbench")
LOCK_NAME = ".lock"


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
        code = _disk_full(err)
        if code is not None:
            what = "no space left on device" if code == errno.ENOSPC else "disk quota exceeded"
            raise OSError(code, f"{what} while writing {path}; free space or move the output directory "
                                "(hydra.run.dir / hydra.sweep.dir)") from err
        raise


def _disk_full(err: BaseException) -> int | None:
    """ENOSPC or EDQUOT if that is what ``err`` comes from, else None.

    A full disk under ``torch.save`` surfaces as ``RuntimeError: [enforce fail at inline_container.cc:...]
    unexpected pos ...``, raised while handling the file object's ``OSError``: the cause is in the chain.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return err.errno
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


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


class FolderInUse(RuntimeError):
    """Another live process holds the output folder's lock."""


class FolderLock:
    """An exclusive ``flock`` on ``<folder>/.lock``, which holds the owner's pid.

    Two runs in one folder would resume from each other's checkpoints, delete each other's temporary
    files and overwrite each other's record. The kernel drops the lock when the owner's file is closed:
    at :meth:`release`, or when the process ends however it ends (SIGKILL, OOM), so a lock file left by a
    dead run never blocks the next one. Where the file system has no locks (some network file systems),
    the run goes on unlocked with a warning.
    """

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self._file = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            holder = self.path.read_text(encoding="utf-8").strip() or "not yet written: it is starting"
            raise FolderInUse(f"output folder {folder} is in use by another run (pid {holder}, holding "
                              f"{self.path}); two runs in one folder would overwrite each other's checkpoints and "
                              "record. Wait for that run to end (or stop it), or give this run another output "
                              "folder (hydra.run.dir / hydra.sweep.dir)") from None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            log.warning("cannot lock %s (%s): this file system has no locks; make sure no other run uses this "
                        "output folder", self.path, err.strerror)
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()

    def release(self) -> None:
        self._file.close()  # closing the file drops the flock; the file stays (removing it would race a new owner)


def write_json(path: Path, obj: Any) -> None:
    """Strict JSON: NaN and infinities are written as null (``NaN`` is no JSON, and strict parsers reject it)."""
    text = json.dumps(finite(obj), indent=1, sort_keys=False, default=str, allow_nan=False)
    _atomic(path, lambda f: f.write(text.encode()))


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (inside dicts, lists and tuples too) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def save_torch(path: Path, obj: Any) -> None:
    import torch  # noqa: PLC0415 (the rest of this module is torch-free: records and reports use it)

    _atomic(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(path, lambda f: f.write(text.encode("utf-8")))


def atomic_copy(source: Path, target: Path) -> None:
    """``source``'s bytes written atomically to ``target`` (its folder made if missing)."""
    data = Path(source).read_bytes()
    _atomic(target, lambda f: f.write(data))
