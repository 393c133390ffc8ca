"""Extending a tuning grid past the edge its choice sits on, at the end of an ``experiment=tune`` sweep.

A choice at the largest learning rate tried says only that the optimum lies at or above it. When
``tune.extend.enabled`` (conf/experiment/tune.yaml), the end-of-sweep callback (reports/callback.py) calls
:func:`extend_sweep`: for each task and architecture whose choice sits on an edge, it runs one more
learning rate past that edge, at the grid's own ratio (4e-3 after 1e-3, 2e-3: 8e-3), with the overrides of that
architecture's and task's own jobs (every warm-up and seed), into the same sweep folder, then chooses again; until
every choice is interior, or the grid has grown by ``max_points`` in that direction, or the next point would pass
``lr_min`` / ``lr_max``. A point whose runs diverge brackets the choice like a worse one.

The decisions (:func:`step`, :func:`next_lr`, :func:`limits`) are pure functions of the learning rates tried; the
launching runs ``<this program> --multirun <overrides>`` as a child process, with the sweep's own Hydra
overrides, so it uses the sweep's launcher: one job after another on this machine with the basic launcher; under
``hydra/launcher=slurm`` each step submits its jobs to SLURM and waits for them, while this process (the one that
submitted the sweep) waits with it. The child sweeps of one step (one per task and architecture on an edge) run
side by side as far as the launcher's parallelism goes (:func:`at_once`: two one-job children at once under
``hydra/launcher=joblib`` with two jobs at a time; every child at once on SLURM). The child sweep builds no report (the callback builds one once the grid is
final). The extension is recorded in ``<sweep>/tune_extension.yaml``, which reports/tuning.py carries into
tuned.yaml and the report.
"""
from __future__ import annotations

import itertools
import logging
import math
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml
from omegaconf import DictConfig, OmegaConf

from seqbench.harness.io import atomic_write_text

from . import tuning
from .load import load

log = logging.getLogger("seqbench.reports")
# a child sweep's job folders: never a grid job's (the grid's subdir may leave the learning rate out of the name)
SUBDIR = "extend_${hydra:job.num}_${seqbench.job:}_lr${trainer.lr}_w${trainer.warmup_steps}"
OWN = ("hydra.sweep.dir", "hydra.sweep.subdir", "hydra.mode", "~hydra.callbacks.report")  # set here for the child sweep


class ExtensionError(ValueError):
    """The grid cannot be extended as configured; the message names the setting and the fix."""


@dataclass(frozen=True)
class Limits:
    """``tune.extend``: at most ``max_points`` learning rates past the grid in either direction, none below
    ``lr_min`` or above ``lr_max`` (None: no bound)."""
    max_points: int
    lr_min: float | None = None
    lr_max: float | None = None


@dataclass(frozen=True)
class Step:
    """The next learning rate to run for one task and architecture (None: stop), the direction of the edge its
    choice sits on (None: interior or nothing chosen), and why."""
    lr: float | None
    direction: str | None
    reason: str


def limits(node: Mapping) -> Limits:
    """``tune.extend``'s limits, checked: ``max_points`` a whole number >= 0; ``lr_min`` < ``lr_max``, positive or
    null."""
    points = node.get("max_points")
    if isinstance(points, bool) or not isinstance(points, int) or points < 0:
        raise ExtensionError(f"tune.extend.max_points={points!r}: give a whole number >= 0 (the learning rates the "
                             "grid may grow by past an edge), e.g. tune.extend.max_points=2")
    bounds = {}
    for key in ("lr_min", "lr_max"):
        value = node.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 < value < math.inf):
            raise ExtensionError(f"tune.extend.{key}={value!r}: give a positive learning rate, or null for no bound")
        bounds[key] = None if value is None else float(value)
    if bounds["lr_min"] is not None and bounds["lr_max"] is not None and bounds["lr_min"] >= bounds["lr_max"]:
        raise ExtensionError(f"tune.extend.lr_min={bounds['lr_min']} is not below tune.extend.lr_max="
                             f"{bounds['lr_max']}: give lr_min < lr_max")
    return Limits(points, **bounds)


def next_lr(lrs: Iterable[float], side: str) -> float:
    """The learning rate one step past ``side`` (``upper``/``lower``) of the ``lrs`` tried, at the ratio between the
    edge and its neighbour (the grid's own ratio in a log-spaced grid), to 6 significant digits."""
    tried = sorted({float(lr) for lr in lrs})
    if len(tried) < 2:
        raise ExtensionError(f"one learning rate tried ({tried}): a grid of two or more gives the ratio to extend "
                             "it by")
    if side == "upper":
        lr = tried[-1] * tried[-1] / tried[-2]
    elif side == "lower":
        lr = tried[0] * tried[0] / tried[1]
    else:
        raise ValueError(f"side={side!r}: upper or lower")
    return float(f"{lr:.6g}")


def beyond(lrs: Iterable[float], grid: Sequence[float], direction: str) -> list[float]:
    """The learning rates of ``lrs`` past the sweep's own ``grid`` in ``direction`` (the points extension added)."""
    if direction == "upward":
        return sorted(lr for lr in lrs if lr > max(grid) * (1 + 1e-9))
    return sorted(lr for lr in lrs if lr < min(grid) * (1 - 1e-9))


def step(lrs: Sequence[float], chosen: float | None, grid: Sequence[float], bounds: Limits) -> Step:
    """What to do for one task and architecture, from the learning rates tried (``lrs``, failed points included),
    the chosen one (None: nothing chosen) and the sweep's own grid: run the next point past the edge the choice
    sits on, or stop (interior, nothing chosen, ``max_points`` reached, ``lr_min``/``lr_max`` passed)."""
    if chosen is None:
        return Step(None, None, "no grid point was scored")
    side = tuning.edge(lrs, chosen)
    if side is None:
        return Step(None, None, "the choice is interior" if len(set(lrs)) > 1 else "one learning rate tried")
    direction = tuning.SIDES[side][1]
    if len(beyond(lrs, grid, direction)) >= bounds.max_points:
        return Step(None, direction, f"tune.extend.max_points={bounds.max_points} reached")
    lr = next_lr(lrs, side)
    if side == "upper" and bounds.lr_max is not None and lr > bounds.lr_max * (1 + 1e-9):
        return Step(None, direction, f"the next point {tuning.lr_text(lr)} is above tune.extend.lr_max="
                                     f"{tuning.lr_text(bounds.lr_max)}")
    if side == "lower" and bounds.lr_min is not None and lr < bounds.lr_min * (1 - 1e-9):
        return Step(None, direction, f"the next point {tuning.lr_text(lr)} is below tune.extend.lr_min="
                                     f"{tuning.lr_text(bounds.lr_min)}")
    return Step(lr, direction, f"the choice {tuning.lr_text(chosen)} is on the grid's {side} edge")


def ledger_entry(lrs: Sequence[float], grid: Sequence[float], edge: str | None, reason: str) -> dict | None:
    """tune_extension.yaml's entry for one task and architecture: the direction, the points added past the grid
    and why the extension stopped (None: its choice was interior from the start, nothing to record)."""
    up, down = beyond(lrs, grid, "upward"), beyond(lrs, grid, "downward")
    direction = "upward" if up else "downward" if down else tuning.SIDES[edge][1] if edge else None
    if direction is None:
        return None
    return {"direction": direction, "added": up or down, "stopped": reason}


def grid_lrs(config: DictConfig) -> list[float]:
    """The sweep's own learning rates: ``trainer.lr`` as its command line gave it, else as its sweeper's params, else
    the single value of its config."""
    given = [o for o in config.hydra.overrides.task if o.partition("=")[0].lstrip("+") == "trainer.lr"]
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    text = given[-1] if given else f"trainer.lr={params['trainer.lr']}" if "trainer.lr" in params else None
    if text is None:
        return [float(config.trainer.lr)]
    from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: PLC0415

    override = OverridesParser.create().parse_override(text)
    if not override.is_sweep_override():
        return [float(override.value())]
    if not override.is_discrete_sweep():
        raise ExtensionError(f"{text}: a continuous sweep has no grid to extend; list the learning rates "
                             "(trainer.lr=5e-4,1e-3,2e-3,4e-3) or set tune.extend.enabled=false")
    return sorted(float(v) for v in override.sweep_iterator())


def sweep_overrides(jobs: Sequence[Sequence[str]], lr: float) -> list[list[str]]:
    """The command lines (overrides) that run ``jobs`` (each a job's own overrides) again at learning rate ``lr``:
    one sweep whose every setting lists the values the jobs take (``trainer.warmup_steps=50,150``) when the jobs
    are exactly that product (a grid's slice), else one command per job."""
    def at_lr(job: Sequence[str]) -> tuple[str, ...]:
        kept = tuple(o for o in job if o.partition("=")[0].lstrip("+") != "trainer.lr")
        return (*kept, f"trainer.lr={lr}")

    runs = list(dict.fromkeys(at_lr(job) for job in jobs))
    values: dict[str, list[str]] = {}
    for job in runs:
        for o in job:
            key, _, value = o.partition("=")
            if value not in values.setdefault(key, []):
                values[key].append(value)
    for options in values.values():
        options.sort(key=_natural)
    keys = list(values)
    product = {tuple(f"{k}={v}" for k, v in zip(keys, combo)) for combo in itertools.product(*values.values())}
    as_product = {tuple(sorted(job, key=lambda o: keys.index(o.partition("=")[0]))) for job in runs}
    if len(runs) > 1 and all("=" in o for job in runs for o in job) and product == as_product:
        return [[f"{key}={','.join(vs)}" for key, vs in values.items()]]
    return [list(job) for job in runs]


def _natural(value: str) -> tuple:
    """Numbers by value, before other values (in text order): the order a person lists a sweep's values in."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def job_overrides(runs: pd.DataFrame, task: str, arch: str, lr: float) -> list[list[str]]:
    """The overrides of the grid jobs of ``arch`` on ``task`` at learning rate ``lr``, from each job's
    ``.hydra/overrides.yaml`` (records kept under ``previous/`` have none: the folder's current job counts)."""
    at = runs[(runs["kind"] == "train") & (runs["task"] == task) & (runs["arch"] == arch)
              & runs["lr"].map(lambda v: pd.notna(v) and math.isclose(float(v), lr, rel_tol=1e-9))]
    jobs = []
    for record in sorted(set(at["record"].dropna())):
        saved = Path(record).parent / ".hydra" / "overrides.yaml"
        if saved.is_file():
            jobs.append([str(o) for o in yaml.safe_load(saved.read_text(encoding="utf-8")) or []])
    if not jobs:
        raise ExtensionError(f"no job folder of {arch} on {task} at lr {tuning.lr_text(lr)} holds "
                             ".hydra/overrides.yaml: the extension repeats those jobs' overrides; run the grid with "
                             "Hydra (python run.py -m)")
    return jobs


def commands(config: DictConfig, sweep: Path, jobs: Sequence[Sequence[str]], lr: float,
             program: Sequence[str]) -> list[list[str]]:
    """The child sweeps that run ``jobs`` again at ``lr``: into ``sweep``, each job in a folder of its own, with the
    sweep's own Hydra overrides (its launcher among them) and without a report of their own."""
    hydra = [o for o in config.hydra.overrides.hydra if o.partition("=")[0] not in OWN]
    folder = str(Path(sweep).resolve()).replace("\\", "\\\\").replace("'", "\\'")
    own = [f"hydra.sweep.dir='{folder}'", f"hydra.sweep.subdir={SUBDIR}", "~hydra.callbacks.report"]
    return [[*program, "--multirun", *line, *hydra, *own] for line in sweep_overrides(jobs, lr)]


def launch(command: Sequence[str], sweep: Path) -> int:
    """Run one child sweep; its exit status. The sweep's ``multirun.yaml`` (the grid's own command line, which the
    child's Hydra overwrites with its own) is put back afterwards."""
    saved = Path(sweep) / "multirun.yaml"
    original = saved.read_text(encoding="utf-8") if saved.is_file() else None
    try:
        return subprocess.run(list(command), check=False).returncode
    finally:
        if original is not None:
            atomic_write_text(saved, original)


def at_once(config: DictConfig, jobs: Sequence[int]) -> int:
    """How many child sweeps of one extension step run side by side: the sweep's launcher runs that many jobs at once
    (joblib's ``n_jobs``, SLURM's array parallelism; one at a time with the basic launcher), and a child sweep of
    ``n`` jobs takes ``n`` of them; at least one. ``jobs``: each child sweep's number of jobs."""
    if not jobs:
        return 1
    from seqbench.harness.cluster.launcher import parallel_jobs  # noqa: PLC0415 (torch-free, Hydra-only)

    if OmegaConf.select(config, "hydra.launcher") is None:
        return 1
    return max(1, min(len(jobs), parallel_jobs(config, sum(jobs)) // max(jobs)))


def this_program() -> list[str]:
    """The command that started this sweep (``python run.py``, the ``seqbench`` script), to start its child sweeps
    with; ``python -m seqbench.harness.run`` for that module itself (run as a file, its folder would shadow the
    standard library's modules of the same names)."""
    if Path(sys.argv[0]).resolve() == Path(__file__).resolve().parents[1] / "harness" / "run.py":
        return [sys.executable, "-m", "seqbench.harness.run"]
    return [sys.executable, sys.argv[0]]


def extend_sweep(config: DictConfig, sweep: str | Path, run: Callable[[Sequence[str], Path], int] = launch,
                 program: Sequence[str] | None = None) -> dict:
    """Extend ``sweep``'s grid past every edge a choice sits on while ``tune.extend`` allows; write and return
    ``tune_extension.yaml``'s content (task -> architecture -> direction, added, stopped). ``run`` launches one
    child sweep (default: :func:`launch`); ``program``: the command that runs seqbench (default: this process's)."""
    sweep = Path(sweep)
    settings = OmegaConf.select(config, "tune.extend", default=None)
    if settings is None or not settings.get("enabled"):
        return {}
    bounds = limits(OmegaConf.to_container(settings, resolve=True))
    from seqbench.harness.cluster.launcher import sweep_problem  # noqa: PLC0415 (what fails a sweep's exit status)

    problem = sweep_problem(sweep)
    if problem:
        log.warning("the tuning grid is not extended: %s", problem)
        return {}
    grid = grid_lrs(config)
    program = list(program or this_program())
    saved = sweep / "multirun.yaml"  # the grid's own command line
    grid_multirun = saved.read_text(encoding="utf-8") if saved.is_file() else None
    blocked: dict[tuple[str, str], str] = {}  # why a task's and architecture's extension cannot go on
    tried: set[tuple[str, str, float]] = set()
    while True:
        runs = load([sweep]).runs
        results = tuning.outcomes(tuning.grid(runs))
        todo = []
        for o in results:
            key = (o.task, o.architecture)
            s = step(o.lrs, _chosen_lr(o), grid, bounds)
            if s.lr is None or key in blocked:
                continue
            if (*key, s.lr) in tried:
                blocked[key] = f"its runs at {tuning.lr_text(s.lr)} left no readable record"
                continue
            todo.append((o, s))
        if not todo:
            break
        plans = []  # (task and architecture, the new rate, its child sweeps, how many jobs they run)
        for o, s in todo:
            key = (o.task, o.architecture)
            tried.add((*key, s.lr))
            print(f"[seqbench] {o.task} {o.architecture}: {s.reason}: extending the grid {s.direction} to lr "
                  f"{tuning.lr_text(s.lr)}", flush=True)
            try:
                jobs = job_overrides(runs, o.task, o.architecture, float(o.chosen["lr"]))
                plans.append((key, s.lr, commands(config, sweep, jobs, s.lr, program), len(jobs)))
            except ExtensionError as err:
                blocked[key] = str(err)

        def extend(plan) -> tuple[tuple[str, str], str | None]:
            key, lr, lines, _ = plan
            for command in lines:
                status = run(command, sweep)
                if status:
                    return key, f"the sweep at {tuning.lr_text(lr)} exited with status {status}"
            return key, None

        width = at_once(config, [n for *_, n in plans])
        try:
            with ThreadPoolExecutor(max_workers=width) as pool:  # each architecture's child sweeps, side by side
                for key, why in pool.map(extend, plans):
                    if why:
                        blocked[key] = why
        finally:
            if grid_multirun is not None:  # children that overlap each restored what the other had written
                atomic_write_text(sweep / "multirun.yaml", grid_multirun)
    ledger = {}
    for o in results:
        key = (o.task, o.architecture)
        reason = blocked.get(key) or step(o.lrs, _chosen_lr(o), grid, bounds).reason
        entry = ledger_entry(o.lrs, grid, o.edge, reason)
        if entry is not None:
            ledger.setdefault(o.task, {})[o.architecture] = entry
    atomic_write_text(sweep / tuning.EXTENSION_NAME,
                      "# The learning rates added past the tuning grid's edge at the end of the sweep, and why the "
                      "extension stopped\n# (reports/tune_extend.py).\n" + yaml.safe_dump(ledger, sort_keys=True))
    return ledger


def _chosen_lr(o: tuning.Outcome) -> float | None:
    return None if o.chosen is None else float(o.chosen["lr"])
