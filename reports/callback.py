"""Hydra callback: build the sweep's report when a multirun ends (and, after ``experiment=tune``, tuned.yaml).

``conf/config.yaml`` wires it through ``harness.cluster.launcher.SweepReport``, which imports this module only
when the sweep ends (the report's libraries stay out of the jobs' memory)::

    hydra:
      callbacks:
        report:
          _target_: seqbench.harness.cluster.launcher.SweepReport
"""
from __future__ import annotations

import logging
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from seqbench.harness.secrets import scrub_files  # torch-free

log = logging.getLogger("seqbench.reports")


class BuildReport(Callback):
    """Writes ``<sweep dir>/report/`` from the sweep's records and prints its path; with ``logger=wandb`` the
    report is also logged as a wandb run in the sweep's group."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from . import build_report  # pandas/seaborn load only when the sweep ends

        sweep = Path(config.hydra.sweep.dir)
        scrub_files(sweep)  # multirun.yaml holds the command-line overrides
        if "tune" in config:  # experiment=tune: first extend the grid past an edge a choice sits on (tune.extend)
            from .tune_extend import extend_sweep

            try:
                extend_sweep(config, sweep)
            except Exception:
                log.exception("extending the tuning grid failed; the choice is made on the grid as it stands")
        try:
            report = build_report([sweep], sweep / "report")
            print(f"[seqbench] report: {report.html}")
        except Exception:  # the records are safe; a report bug must not fail the finished sweep
            report = None
            log.exception("report failed; rebuild it with: python -m seqbench.reports %s --out %s", sweep, sweep / "report")
        if "tune" in config:  # experiment=tune: the choice per architecture, and the overrides to use
            from . import tuning

            try:
                tuning.main([str(sweep)])
            except Exception:
                log.exception("choosing the tuned settings failed; rerun: python -m seqbench.reports.tuning %s", sweep)
        logger = OmegaConf.to_container(config.logger, resolve=True) if "logger" in config else None
        if report is not None and logger and logger.get("kind") == "wandb":
            from .wandb_run import log_report

            log_report(report, group=config.get("sweep_name"), logger=logger)
