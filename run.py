"""seqbench entry point: ``python run.py model=<m> task=<t>`` trains and evaluates one model.

Sweeps: ``python run.py -m model=transformer,lstm task=multi30k seed=1,2,3``.
With no arguments, ``python run.py`` runs the main job: the ``quick`` sweep and its report.
"""
from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from harness import job, path_length

JOBS = {"train": job.run, "path_length": path_length.run}  # cfg.job: what one job does


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    # in a sweep a failed job leaves a 'failed' record and the sweep carries on
    if cfg.job not in JOBS:
        raise ValueError(f"job={cfg.job!r}; valid jobs: {', '.join(JOBS)}")
    rec = JOBS[cfg.job](cfg, hc.runtime.output_dir, sweep=cfg.sweep_name, raise_errors=not multirun)
    test = rec.get("metrics", {}).get("test", {})
    return test.get("bleu", test.get("perplexity"))


if __name__ == "__main__":
    if len(sys.argv) == 1:
        sys.argv += ["--multirun", "experiment=quick"]
    main()
