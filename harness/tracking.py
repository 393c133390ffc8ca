"""Experiment tracking: wandb (one run per job, grouped by sweep) or nothing."""
from __future__ import annotations

import os


class NullTracker:
    def log(self, metrics: dict, step: int | None = None) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker:
    """wandb run; offline when no API key is configured, honouring WANDB_MODE."""

    def __init__(self, *, project: str, group: str | None, name: str, config: dict, tags=(), entity=None,
                 mode: str | None = None, dir: str | None = None):
        import wandb

        if mode is None:
            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(project=project, entity=entity, group=group, name=name, config=config,
                              tags=list(tags), mode=mode, dir=dir, reinit="finish_previous")

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def summary(self, values: dict) -> None:
        self.run.summary.update(values)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def make_tracker(cfg: dict | None, *, name: str, group: str | None, config: dict, out_dir: str):
    if not cfg or cfg.get("kind", "none") == "none":
        return NullTracker()
    if cfg["kind"] != "wandb":
        raise ValueError(f"logger.kind={cfg['kind']!r}; valid: none, wandb")
    return WandbTracker(project=cfg.get("project", "seqbench"), entity=cfg.get("entity"), group=group, name=name,
                        config=config, tags=cfg.get("tags", ()), mode=cfg.get("mode"), dir=out_dir)
