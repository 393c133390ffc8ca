"""Experiment tracking: wandb (one run per job, grouped by sweep) or nothing."""
from __future__ import annotations

import os
from pathlib import Path

from .io import atomic_write_text

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
    with the same id, merged by ``wandb sync``).
    """

    def __init__(self, *, project: str, group: str | None, name: str, config: dict, tags=(), entity=None,
                 mode: str | None = None, dir: str | None = None, resume: bool = False):
        import wandb

        if mode is None:
            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        id_file = Path(dir) / RUN_ID_FILE if dir and mode != "disabled" else None
        run_id = id_file.read_text().strip() if resume and id_file and id_file.is_file() else None
        self.run = wandb.init(project=project, entity=entity, group=group, name=name, config=config,
                              tags=list(tags), mode=mode, dir=dir, reinit="finish_previous",
                              id=run_id, resume="allow" if run_id else None)
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
                        resume=resume)
