"""seqbench entry point: ``seqbench model=<m> task=<t>`` (or ``python run.py ...`` in a checkout) trains and
evaluates one model.

Sweeps: ``python run.py -m model=transformer,lstm task=multi30k seed=1,2,3``.
With no arguments, ``python run.py`` runs the main job: the ``quick`` sweep and its report.
``python run.py --help`` says what the commands run, the experiments and the config groups.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import io
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, ConfigCompositionException, HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from seqbench.harness import job, plugins, secrets, settings  # job registers the config's resolvers (${seqbench.job:}, ...)
from seqbench.harness.analysis import path_length
from seqbench.harness.checkpoint import CheckpointError
from seqbench.harness.cluster import launcher, sweep_job
from seqbench.harness.evaluate import Diverged
from seqbench.harness.io import FolderInUse
from seqbench.harness.train import Interrupted, NonFiniteLoss
from seqbench.tasks.data import DataError

ROOT = Path(__file__).resolve().parents[1]  # the checkout (or the installed seqbench package)
CONF = ROOT / "conf"
JOBS = {"train": job.run, "path_length": path_length.run}  # cfg.job: what one job does (settings.JOBS names them)
# errors whose message names the problem and the fix: a single run prints the message alone
STATED = (settings.SettingError, DataError, CheckpointError, FolderInUse, Diverged, NonFiniteLoss, Interrupted,
          path_length.PathLengthError)
plugins.register_presets()  # plug-in presets join the model config group
STOPPED: list[str] = []  # the job at which this sweep was stopped (SIGTERM, Ctrl-C): the jobs after it do not run


class JobFailed(CompactHydraException):
    """A single run's error stated in full: Hydra prints this message alone (HYDRA_FULL_ERROR=1: the traceback)."""


def stated(err: BaseException) -> bool:
    """Whether ``err`` is an error seqbench raised on purpose, with a message naming the problem and the fix:
    one of its own error types, or a ValueError/TypeError/KeyError raised by seqbench's own code (its settings
    and registry checks), not by a library or Python itself deep inside one."""
    if isinstance(err, STATED):
        return True
    if not isinstance(err, (ValueError, TypeError, KeyError)):
        return False
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = Path(tb.tb_frame.f_code.co_filename).resolve() if tb is not None else None
    return where is not None and where.is_relative_to(ROOT) and not where.is_relative_to(ROOT / ".venv")


@hydra.main(config_path=str(CONF), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    if STOPPED:
        launcher.mark_not_started(cfg, hc.runtime.output_dir, f"the sweep was stopped during job {STOPPED[0]}")
        return None
    # in a sweep a failed job leaves a 'failed' record and the sweep carries on; job.run starts with the settings
    # check, so an invalid setting (an unknown job= too) fails there, with its record, whatever the job
    run_job = job.run if settings.problems(cfg) else JOBS[cfg.job]
    if multirun and in_own_process(hc):
        run_job = functools.partial(sweep_job.in_child, run_job)
    try:
        rec = run_job(cfg, hc.runtime.output_dir, sweep=cfg.sweep_name, raise_errors=not multirun)
    except Exception as err:
        if multirun or not stated(err):
            raise
        raise JobFailed(f"{type(err).__name__}: {err}") from err  # Hydra adds how to see the traceback
    if multirun and rec["status"] == "interrupted":
        STOPPED.append(Path(hc.runtime.output_dir).name)
    test = rec.get("metrics", {}).get("test", {})
    return test.get("bleu", test.get("perplexity"))


def in_own_process(hc) -> bool:
    """Whether each job of this sweep runs in a process of its own, forked from the sweep's: for Hydra's basic
    (local, one job after another) launcher where fork exists, unless ``SEQBENCH_SWEEP_IN_PROCESS=1`` (a debugger)
    asks otherwise. A cluster launcher gives every job its own process already."""
    target = str(OmegaConf.select(hc, "launcher._target_", default="") or "")
    return (target.endswith("BasicLauncher") and hasattr(os, "fork")
            and os.environ.get("SEQBENCH_SWEEP_IN_PROCESS", "") in ("", "0"))


def _overrides(argv: list[str]) -> list[str] | None:
    """The overrides of a command line that composes seqbench's config; None for --help, --info, another config."""
    from hydra._internal.utils import get_args_parser  # noqa: PLC0415 (the parser hydra.main itself uses)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args: argparse.Namespace = get_args_parser().parse_args(argv)
    except SystemExit:  # a malformed command line: Hydra says so itself
        return None
    if (args.help or args.hydra_help or args.info or args.shell_completion or args.experimental_rerun
            or args.config_path or args.config_name or args.config_dir):
        return None
    return list(args.overrides)


def _one_job(overrides: list[str]) -> list | None:
    """The parsed overrides of the sweep's first job (each sweep cut to its first value), without Hydra's own."""
    from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: PLC0415
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return None
    jobs = []
    for o in parsed:
        if o.key_or_group.split("/")[0].split(".")[0] == "hydra":
            continue  # Hydra's own settings: Hydra checks them
        line = o.input_line
        if o.is_sweep_override():
            try:
                line = f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}"
            except (HydraException, StopIteration, ValueError, TypeError):
                return None
        jobs.append((o, line))
    return jobs


def _paths(node, prefix: str = "") -> list[str]:
    """Every setting's dotted path in a config (mappings and their keys)."""
    out = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        out.append(path)
        if isinstance(value, dict):
            out += _paths(value, path + ".")
    return out


def suggest(key: str, known: list[str]) -> list[str]:
    """The setting a mistyped ``key`` most likely meant (a list of one, or empty): the sibling of the most similar
    name, else the most similar path."""
    parent, _, name = key.rpartition(".")
    siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == parent]
    if siblings:
        return [f"{parent}.{s}" if parent else s for s in difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)]
    return difflib.get_close_matches(key, known, n=1, cutoff=0.8)


def unknown_settings(argv: list[str]) -> str | None:
    """The message for overrides of settings the config does not have, each with its likely meaning
    (``trainer.max_second=5``: did you mean trainer.max_seconds?); None when there are none, or when the command
    line fails to compose for another reason, which Hydra then reports itself."""
    overrides = _overrides(argv)
    jobs = _one_job(overrides) if overrides else None
    if not jobs:
        return None
    from hydra import compose, initialize_config_dir  # noqa: PLC0415
    unknown = []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3", job_name="run"):
        while True:
            try:
                cfg = compose("config", overrides=[line for _, line in jobs])
                break
            except ConfigCompositionException as err:
                full_key = getattr(err.__cause__, "full_key", None)
                if not full_key or "not in struct" not in str(err.__cause__):
                    return None
                bad = [(o, line) for o, line in jobs if o.key_or_group == full_key
                       or o.key_or_group.startswith(full_key + ".")]
                if not bad:
                    return None
                unknown.append(bad[0])
                jobs.remove(bad[0])
    if not unknown:
        return None
    known = _paths(OmegaConf.to_container(cfg, resolve=False))
    lines = []
    for o, _ in unknown:
        guess = suggest(o.key_or_group, known)
        meant = f"did you mean {guess[0]}?" if guess else "`python run.py --cfg job` lists the settings"
        lines.append(f"Could not override '{o.key_or_group}': there is no such setting; {meant}\n"
                     f"  (to add a new key on purpose: +{o.input_line})")
    return "\n".join(lines)


def main() -> None:
    """The command line: ``seqbench [overrides]`` / ``python run.py [overrides]``."""
    if len(sys.argv) == 1:
        sys.argv += ["--multirun", "experiment=quick"]
    sys.argv[1:] = secrets.hide_in_environment(sys.argv[1:])  # Hydra and wandb save the command line
    # a mistyped setting: the one meant, before anything runs (HYDRA_FULL_ERROR=1: Hydra's own error, in full)
    problem = unknown_settings(sys.argv[1:]) if not os.environ.get("HYDRA_FULL_ERROR") else None
    if problem:
        sys.exit(problem)
    hydra_main()


if __name__ == "__main__":
    main()
