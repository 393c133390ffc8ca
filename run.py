"""seqbench entry point: ``python run.py model=<m> task=<t>`` trains and evaluates one model.

Sweeps: ``python run.py -m model=transformer,lstm task=multi30k seed=1,2,3``.
With no arguments, ``python run.py`` runs the main job: the ``quick`` sweep and its report.
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from harness import job, secrets, settings
from harness.analysis import path_length
from harness.cluster import launcher

JOBS = {"train": job.run, "path_length": path_length.run}  # cfg.job: what one job does (settings.JOBS names them)
STOPPED: list[str] = []  # the job at which this sweep was stopped (SIGTERM, Ctrl-C): the jobs after it do not run


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    if STOPPED:
        launcher.mark_not_started(cfg, hc.runtime.output_dir, f"the sweep was stopped during job {STOPPED[0]}")
        return None
    # in a sweep a failed job leaves a 'failed' record and the sweep carries on; job.run starts with the settings
    # check, so an invalid setting (an unknown job= too) fails there, with its record, whatever the job
    run_job = job.run if settings.problems(cfg) else JOBS[cfg.job]
    rec = run_job(cfg, hc.runtime.output_dir, sweep=cfg.sweep_name, raise_errors=not multirun)
    if multirun and rec["status"] == "interrupted":
        STOPPED.append(Path(hc.runtime.output_dir).name)
    test = rec.get("metrics", {}).get("test", {})
    return test.get("bleu", test.get("perplexity"))


if __name__ == "__main__":
    if len(sys.argv) == 1:
        sys.argv += ["--multirun", "experiment=quick"]
    sys.argv[1:] = secrets.hide_in_environment(sys.argv[1:])  # Hydra and wandb save the command line
    main()
