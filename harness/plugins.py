"""Plug-in architectures at run time: their presets offered to Hydra, and their provenance in every record.

A plug-in's presets (the folder its :class:`~seqbench.models.registry.Architecture` names) join the ``model``
config group through Hydra's ConfigStore, so ``seqbench model=<plug-in preset>`` composes like a built-in preset;
seqbench's own ``conf/model/<name>.yaml`` wins over a plug-in preset of the same name (a warning says so).

The record's ``environment.plugins`` names, for every registered architecture that is not seqbench's own (and for
one named by ``model.architecture``), the distribution and version it came from, a SHA-256 over its source files,
and the git commit and dirty flag of the repository it sits in, when it sits in one.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("seqbench")

SOURCE_SUFFIXES = (".py", ".yaml", ".yml", ".json", ".toml", ".cfg")  # what counts as a plug-in's source


@functools.cache
def register_presets() -> list[str]:
    """Store every plug-in preset in Hydra's ConfigStore (group ``model``); the names stored. Idempotent."""
    from hydra.core.config_store import ConfigStore  # noqa: PLC0415
    from omegaconf import OmegaConf  # noqa: PLC0415

    from seqbench import models  # noqa: PLC0415
    store, stored = ConfigStore.instance(), []
    own = {p.stem for p in models.PRESETS.glob("*.yaml")}
    for arch in models.ARCHITECTURES.values():
        if arch.presets is None:
            continue
        try:
            files = models.registry.preset_files(arch)
        except models.PluginError as err:
            log.warning(str(err))
            continue
        for path in files:
            if path.stem in own:
                log.warning(f"plug-in preset {path} has the name of seqbench's conf/model/{path.stem}.yaml, which "
                            "wins; rename the plug-in's preset")
                continue
            store.store(group="model", name=path.stem, node=OmegaConf.load(path))
            stored.append(path.stem)
    return stored


def _package_root(module: str) -> Path | None:
    """The folder of ``module``'s top-level package (or the module's own file, for a single-file module)."""
    try:
        spec = importlib.util.find_spec(module.split(".")[0])
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))).resolve()
    return Path(spec.origin).resolve() if spec.origin else None


@functools.cache
def source_identity(module: str) -> dict[str, Any]:
    """Where ``module``'s top-level package lives, a SHA-256 over its source files (relative path and bytes, sorted),
    how many there are, and its git commit and dirty flag when the folder is in a git repository."""
    root = _package_root(module)
    if root is None:
        return {"path": None, "source_sha256": None, "source_files": 0, "git_commit": None, "git_dirty": None}
    files = [root] if root.is_file() else sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES and "__pycache__" not in p.parts)
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(root.parent if root.is_file() else root)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    where = root.parent if root.is_file() else root

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = None if commit is None else bool(git("status", "--porcelain", "-uno", "--", "."))
    return {"path": str(root), "source_sha256": digest.hexdigest(), "source_files": len(files), "git_commit": commit,
            "git_dirty": dirty}


def provenance(model_cfg: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """One entry per plug-in architecture (not seqbench's own): name, how it was found, its distribution and
    version, the identity of its source (:func:`source_identity`) and whether this job's model is it."""
    from seqbench import models  # noqa: PLC0415
    archs = {n: a for n, a in models.ARCHITECTURES.items() if not a.origin.get("builtin")}
    used = None
    if model_cfg is not None and model_cfg.get("architecture"):
        used = models.architecture(model_cfg)
        archs[used.name] = used
    elif model_cfg is not None:
        used = archs.get(model_cfg.get("name"))
    out = []
    for name, arch in sorted(archs.items()):
        origin = dict(arch.origin)
        module = origin.get("module") or arch.seq2seq.__module__
        out.append({"name": name, "found_by": origin.get("kind"), "module": module,
                    "distribution": origin.get("distribution"), "version": origin.get("version"),
                    **source_identity(module), "used": used is not None and used.name == name})
    return out
