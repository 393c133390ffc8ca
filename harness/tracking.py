"""Experiment tracking: wandb (one run per job, grouped by sweep) or nothing.

Torch-free (the report's wandb run uses it too); wandb is imported only when a run starts.
"""
from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from .secrets import redact_args

log = logging.getLogger("seqbench")

RUN_ID_FILE = "wandb-run-id"  # in the job's folder: the run a resumed job continues
# a metric glob and the step metric its panels are drawn against (wandb allows one per metric): validation
# against training seconds, as the report's learning curves; training rows against the optimiser step. Every
# logged row carries both axes, so any panel can switch its x-axis to the other.
STEP_METRICS = {"valid_*": "train_seconds", "train/*": "step"}
TAG_LIMIT = 64  # characters of one wandb tag


class NullTracker:
    def log(self, metrics: dict, step: int | None = None) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def finish(self, exit_code: int = 0, record: str | os.PathLike | None = None) -> None:
        pass


class WandbTracker:
    """wandb run; offline when no API key is configured, honouring WANDB_MODE.

    With ``resume`` (the job resumes from its checkpoint) the run id saved in the job's folder is
    reused, so the requeued or restarted job continues the same run (offline: a second run file
    with the same id, merged by ``wandb sync``). An online run whose server cannot be reached
    within ``init_timeout`` seconds is logged offline instead, with a warning saying how to upload
    it, rather than failing the job. A given ``run_id`` (the report run's, derived from its group) is
    continued if it exists: rebuilding that report updates its run instead of adding one.
    """

    def __init__(self, *, project: str, group: str | None, name: str, config: dict, tags=(), entity=None,
                 mode: str | None = None, dir: str | None = None, resume: bool = False,
                 init_timeout: float | None = None, job_type: str | None = None, run_id: str | None = None):
        import wandb

        if mode is None:
            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        id_file = Path(dir) / RUN_ID_FILE if dir and mode != "disabled" and run_id is None else None
        run_id = run_id or (id_file.read_text().strip() if resume and id_file and id_file.is_file() else None)
        settings = wandb.Settings(save_code=False, **({"init_timeout": init_timeout} if init_timeout else {}))
        args = dict(project=project, entity=entity, group=group, name=name, config=config, tags=list(tags), dir=dir,
                    job_type=job_type, reinit="finish_previous", id=run_id, resume="allow" if run_id else None,
                    settings=settings)
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
            from .io import atomic_write_text  # imports torch: only a job (which has it) keeps an id file

            atomic_write_text(id_file, self.run.id + "\n")

    def log(self, metrics: dict, step: int | None = None) -> None:
        """One row; with ``step`` (a job's optimiser step) the row also holds it as ``step``, an x-axis."""
        self.run.log(metrics if step is None else {**metrics, "step": step}, step=step)

    def define_axes(self) -> None:
        """Declare ``STEP_METRICS``: the x-axes of the dashboard's automatic panels."""
        for axis in dict.fromkeys(STEP_METRICS.values()):
            self.run.define_metric(axis)
        for metrics, axis in STEP_METRICS.items():
            self.run.define_metric(metrics, step_metric=axis)

    def summary(self, values: dict) -> None:
        self.run.summary.update(values)

    def log_files(self, name: str, kind: str, files: dict[str, Path]) -> None:
        """Log ``files`` (name in the artifact -> path) as the artifact ``name`` of type ``kind`` (a new version
        when the run logs it again). A disabled run keeps nothing (wandb would still stage the files)."""
        import wandb

        if self.run.disabled:
            return
        artifact = wandb.Artifact(name, type=kind)
        for inside, path in files.items():
            artifact.add_file(str(path), name=inside)
        self.run.log_artifact(artifact)

    def finish(self, exit_code: int = 0, record: str | os.PathLike | None = None) -> None:
        """End the run; ``record`` (the job's record file, secrets already scrubbed) is logged as its artifact.

        The record is safe on disk whatever happens here, so a failure to log it is a warning, and the run
        still ends."""
        if record is not None and Path(record).is_file():
            try:
                self.log_files(f"record-{self.run.id}", "record", {Path(record).name: Path(record)})
            except Exception as err:  # wandb's error types vary by version and mode
                log.warning("wandb: the record %s was not logged as an artifact: %s", record, err)
        self.run.finish(exit_code=exit_code)


def make_tracker(cfg: dict | None, *, name: str, group: str | None, config: dict, out_dir: str,
                 resume: bool = False, tags=()):
    """A job's tracker: its run (``job_type`` train) gets the logger's tags and ``tags`` and declares its axes."""
    if not cfg or cfg.get("kind", "none") == "none":
        return NullTracker()
    if cfg["kind"] != "wandb":
        raise ValueError(f"logger.kind={cfg['kind']!r}; valid: none, wandb")
    tracker = WandbTracker(project=cfg.get("project", "seqbench"), entity=cfg.get("entity"), group=group, name=name,
                           config=config, tags=[*(cfg.get("tags") or ()), *tags], mode=cfg.get("mode"),
                           dir=out_dir, resume=resume, init_timeout=cfg.get("init_timeout"), job_type="train")
    tracker.define_axes()
    return tracker


def job_tags(rec: dict, precision: str | None) -> list[str]:
    """``key:value`` tags a dashboard filters and groups a job's run by: architecture, preset, task, device type
    and (resolved) precision, from the record as it stands once the model is built."""
    model, task, env = rec.get("model") or {}, rec.get("task") or {}, rec.get("environment") or {}
    values = {"arch": model.get("name"), "preset": model.get("preset"), "task": task.get("name"),
              "device": env.get("device"), "precision": precision}
    return [f"{k}:{v}"[:TAG_LIMIT] for k, v in values.items() if v is not None]


@contextmanager
def _command_line_redacted():
    """wandb stores ``sys.argv`` in its run metadata when the run starts: let it see secret values redacted."""
    argv = sys.argv[:]
    sys.argv[:] = redact_args(argv)
    try:
        yield
    finally:
        sys.argv[:] = argv
