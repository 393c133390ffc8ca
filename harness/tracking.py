"""Experiment tracking: wandb (one run per job, grouped by sweep) or nothing."""
from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from .io import atomic_write_text
from .secrets import redact_args

log = logging.getLogger("seqbench")

RUN_ID_FILE = "wandb-run-id"  # in the job's folder: the run a resumed job continues


class NullTracker:
    def log(self, metrics: dict, step: int | None = None) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker:
    """wandb run; offline when no API key is configured, honouring WANDB_MODE.

    With ``resume`` (the job resumes from its checkpoint) the run id saved in the job's folder is
    reused, so the requeued or restarted job continues the same run (offline: a second run file
    with the same id, merged by ``wandb sync``). An online run whose server cannot be reached
    within ``init_timeout`` seconds is logged offline instead, with a warning saying how to upload
    it, rather than failing the job.
    """

    def __init__(self, *, project: str, group: str | None, name: str, config: dict, tags=(), entity=None,
                 mode: str | None = None, dir: str | None = None, resume: bool = False,
                 init_timeout: float | None = None):
        import wandb

        if mode is None:
            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        id_file = Path(dir) / RUN_ID_FILE if dir and mode != "disabled" else None
        run_id = id_file.read_text().strip() if resume and id_file and id_file.is_file() else None
        settings = wandb.Settings(save_code=False, **({"init_timeout": init_timeout} if init_timeout else {}))
        args = dict(project=project, entity=entity, group=group, name=name, config=config, tags=list(tags), dir=dir,
                    reinit="finish_previous", id=run_id, resume="allow" if run_id else None, settings=settings)
        with _command_line_redacted():
            try:
                self.run = wandb.init(mode=mode, **args)
            except wandb.errors.CommError as err:
                if mode != "online":
                    raise
                self.run = wandb.init(mode="offline", **args)
                folder = Path(self.run.dir).parent
                log.warning("wandb: the server could not be reached (%s); this run is logged offline in %s. "
                            "Upload it later with: wandb sync %s", str(err).splitlines()[0], folder, folder)
        if id_file is not None and run_id is None:
            atomic_write_text(id_file, self.run.id + "\n")

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def summary(self, values: dict) -> None:
        self.run.summary.update(values)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def make_tracker(cfg: dict | None, *, name: str, group: str | None, config: dict, out_dir: str,
                 resume: bool = False):
    if not cfg or cfg.get("kind", "none") == "none":
        return NullTracker()
    if cfg["kind"] != "wandb":
        raise ValueError(f"logger.kind={cfg['kind']!r}; valid: none, wandb")
    return WandbTracker(project=cfg.get("project", "seqbench"), entity=cfg.get("entity"), group=group, name=name,
                        config=config, tags=cfg.get("tags", ()), mode=cfg.get("mode"), dir=out_dir,
                        resume=resume, init_timeout=cfg.get("init_timeout"))


@contextmanager
def _command_line_redacted():
    """wandb stores ``sys.argv`` in its run metadata when the run starts: let it see secret values redacted."""
    argv = sys.argv[:]
    sys.argv[:] = redact_args(argv)
    try:
        yield
    finally:
        sys.argv[:] = argv
