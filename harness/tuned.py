"""Settings chosen by a tuning sweep, read by the jobs that use them: ``tuned=<sweep>/tuned.yaml``.

``python -m seqbench.reports.tuning`` (run at the end of every ``experiment=tune`` sweep) writes, per task and
architecture, the overrides of the grid point with the best validation score. A job given ``tuned=<that file>``
takes its own task's and architecture's ``trainer.*`` settings from it, so one sweep trains every architecture
with its own tuned settings:

    python run.py -m experiment=compare tuned=results/tune/<date>/tuned.yaml

The task is named as in its record (a folder task by ``task.label`` or its folder's name) and the architecture as
``<model>-<preset>``, the names the tuning report and ``tuned.yaml`` use. A setting given on the command line as
well as by the file is refused (one of them would be silently ignored); the settings applied are the job's config,
in its record.

A tuned.yaml records the seeds its tuning runs used (``tuning_seeds``). A job whose seed is one of them is refused:
the choice was made on that seed's own validation score, so its result would carry the selection's luck (the
winner's curse); comparisons run on seeds of their own. An architecture the tuning could not choose for (every grid
point failed: ``overrides: null``) is refused with the reason the file gives.
"""
from __future__ import annotations

from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from .settings import SettingError

PREFIX = "trainer."
ROOT = Path(__file__).resolve().parents[1]  # a relative path not found from the working directory: from here


def task_name(task: DictConfig) -> str:
    """The task's name in its record: folder tasks go by ``label`` or the folder's base name (tasks/data.py)."""
    path = OmegaConf.select(task, "path", default=None, throw_on_missing=False)
    if path in (None, "", "???"):
        return str(task.name)
    from seqbench.tasks.data import display_name  # noqa: PLC0415 (tasks imports torch; only folder tasks need it)

    return display_name(Path(str(path)), task.get("label"), str(task.name))


def architecture(model: DictConfig) -> str:
    """``<model>-<preset>`` (the tuning report's name for it); restricted attention adds its window, as reports do."""
    from seqbench.reports.load import model_label  # noqa: PLC0415 (torch-free; the report's naming, not a copy of it)

    name, preset = model_label(str(model.name), {"attn_window": model.get("attn_window")}), model.get("preset")
    return f"{name}-{preset}" if preset else name


def locate(path: str | Path) -> Path:
    """The file ``tuned=<path>`` names: as given, or, relative and not found from the working directory, in the
    project (e.g. conf/tuned_settings/*.yaml, the choices an experiment preset ships with)."""
    path = Path(path).expanduser()
    if not path.is_absolute() and not path.exists() and (ROOT / path).is_file():
        return ROOT / path
    return path


def entry_for(path: str | Path, task: str, arch: str) -> dict:
    """What ``path`` (a tuned.yaml) holds for ``task`` and ``arch`` (overrides, tuning seeds, ...); a clear error
    naming what is missing otherwise."""
    path = locate(path)
    fix = "run the tuning sweep (python run.py -m experiment=tune ...) or python -m seqbench.reports.tuning <its folder>"
    if not path.is_file():
        raise SettingError(f"tuned={path}: no such file; give the tuned.yaml a tuning sweep wrote ({fix})")
    try:
        chosen = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise SettingError(f"tuned={path}: not a YAML file ({str(err).splitlines()[0]}); give a tuned.yaml") from None
    if not isinstance(chosen, dict):
        raise SettingError(f"tuned={path}: holds no choices (task -> architecture -> overrides); {fix}")
    if task not in chosen or not isinstance(chosen[task], dict):
        raise SettingError(f"tuned={path} has no settings for task {task!r} (it has: {_names(chosen)}); tune this "
                           "task too, or drop tuned= for it")
    if arch not in chosen[task] or not isinstance(chosen[task][arch], dict):
        raise SettingError(f"tuned={path} has no settings for {arch} on {task} (it has: {_names(chosen[task])}); "
                           "tune this architecture too, or drop tuned= for it")
    return chosen[task][arch]


def _settings(entry: dict, path: str | Path, task: str, arch: str) -> dict:
    """``{trainer key: value}`` of one tuned.yaml entry."""
    if entry.get("overrides") is None and entry.get("no_choice"):
        raise SettingError(f"tuned={path}: the tuning chose no settings for {arch} on {task}: {entry['no_choice']}; "
                           "or drop tuned= for it")
    values = {}
    for override in entry.get("overrides") or []:
        key, sep, value = str(override).partition("=")
        if not sep:
            raise SettingError(f"tuned={path}: {task} {arch}: {override!r} is not key=value; rewrite it with "
                               "python -m seqbench.reports.tuning")
        if key.startswith(PREFIX):
            values[key] = yaml.safe_load(value)
    if not values:
        raise SettingError(f"tuned={path}: {task} {arch} sets no trainer.* setting; rewrite it with "
                           "python -m seqbench.reports.tuning")
    return values


def command_line_keys() -> set[str]:
    """The settings given on this job's command line (Hydra's task overrides; none outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig  # noqa: PLC0415

    if not HydraConfig.initialized():
        return set()
    return {o.partition("=")[0].lstrip("+~") for o in HydraConfig.get().overrides.task}


def apply(cfg: DictConfig, given: set[str] | None = None) -> DictConfig:
    """``cfg`` with its task's and architecture's tuned settings when ``cfg.tuned`` names a file (else ``cfg``).
    ``given``: the settings given on the command line (default: Hydra's); one the file also sets is an error."""
    path = cfg.get("tuned")
    if path is None:
        return cfg
    if not isinstance(path, str) or not path:
        raise SettingError(f"tuned={path!r}: give the path of a tuning sweep's tuned.yaml, or tuned=null")
    task, arch = task_name(cfg.task), architecture(cfg.model)
    entry = entry_for(path, task, arch)
    values = _settings(entry, path, task, arch)
    check_seed(cfg.seed, entry, path, task, arch)
    both = sorted(k for k in values if k in (command_line_keys() if given is None else given))
    if both:
        raise SettingError(f"{', '.join(both)} given on the command line and by tuned={path} "
                           f"({' '.join(f'{k}={values[k]}' for k in both)}): drop one of them")
    cfg = cfg.copy()
    with open_dict(cfg):
        for key, value in values.items():
            OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def check_seed(seed, entry: dict, path: str | Path, task: str, arch: str) -> None:
    """Refuse ``seed`` when the tuning runs of ``arch`` on ``task`` used it (tuned.yaml's ``tuning_seeds``): the
    choice was made on that seed's validation score. A file that predates recording them is not checked."""
    seeds = entry.get("tuning_seeds") or []
    if seed in seeds:
        raise SettingError(
            f"seed={seed} is one of the seeds tuned={path} was tuned on for {arch} on {task} (tuning seeds: "
            f"{', '.join(map(str, seeds))}): its settings were chosen on this seed's own validation score, so the "
            f"result would favour them (the winner's curse). Run the comparison on other seeds (e.g. seed=1,2,3), "
            f"or tune with other seeds (python run.py -m experiment=tune seed=...)")


def _names(mapping: dict) -> str:
    return ", ".join(sorted(map(str, mapping))) or "nothing"
