"""Architectures and where they come from: seqbench's own and those other packages register (plug-ins).

An architecture is an :class:`Architecture`: its name, its encoder-decoder and language-model classes (the
interfaces of :mod:`seqbench.models.common`), the rules of the hyperparameters only it takes, and the folder of
its presets (``<preset>.yaml`` files of the ``model`` config group). A package registers one through the Python
entry-point group ``seqbench.models`` (``pyproject.toml``)::

    [project.entry-points."seqbench.models"]
    my_model = "my_package.model:ARCHITECTURE"

the entry point naming an :class:`Architecture`, a ``(seq2seq class, lm class)`` pair, or a callable returning
either. Code that is not a package yet can name its architecture in the model config instead:
``model.architecture=my_module.ARCHITECTURE`` (a dotted path, importable through ``PYTHONPATH``).
"""
from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger("seqbench")

GROUP = "seqbench.models"  # the entry-point group plug-ins register in


@dataclass(frozen=True)
class Architecture:
    """One architecture in both model forms.

    Args:
        name: the value of ``model.name`` that selects it.
        seq2seq: the encoder-decoder class (``Seq2Seq``): ``cls(src_vocab, tgt_vocab, pad_id, **hyperparameters)``.
        lm: the language-model class (``LanguageModel``): ``cls(vocab, **hyperparameters)``.
        settings: rules of the hyperparameters seqbench's shared table (``harness/settings.py``,
            ``MODEL_SETTINGS``) does not know: name -> ``(accepts(value) -> bool, "what is valid")``, checked
            before anything is built, like the built-in ones.
        lm_ignores: hyperparameters the LM form accepts (so one preset serves both forms) but does not use; a
            value other than the default is reported as having no effect.
        presets: the folder of this architecture's presets (``<preset>.yaml``, each naming ``name:``), offered as
            ``model=<preset>``; None: none shipped.
        check: settings that must fit together: ``check(hyperparameters with defaults filled in)`` -> one message
            per problem (empty when fine).
        description: one line for listings.
    """

    name: str
    seq2seq: type
    lm: type
    settings: Mapping[str, tuple[Callable[[Any], bool], str]] = field(default_factory=dict)
    lm_ignores: tuple[str, ...] = ()
    presets: str | Path | None = None
    check: Callable[[Mapping[str, Any]], list[str]] | None = None
    description: str = ""
    origin: Mapping[str, Any] = field(default_factory=dict)  # set by the registry: where it was found

    @property
    def classes(self) -> tuple[type, type]:
        return self.seq2seq, self.lm


class PluginError(RuntimeError):
    """A registered architecture that cannot be loaded or is not one."""


def as_architecture(obj: Any, name: str, where: str) -> Architecture:
    """``obj`` (an Architecture, a (seq2seq, lm) pair, or a callable returning either) as an Architecture."""
    if callable(obj) and not isinstance(obj, (Architecture, type)):
        obj = obj()
    if isinstance(obj, Architecture):
        return obj
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(c, type) for c in obj):
        return Architecture(name=name, seq2seq=obj[0], lm=obj[1])
    raise PluginError(f"{where} is {type(obj).__name__}, not an architecture; it must name a "
                      "seqbench.models.registry.Architecture, a (seq2seq class, lm class) pair, or a function "
                      "returning one")


def import_object(path: str) -> Any:
    """The object a dotted path names: ``package.module.NAME`` or ``package.module:NAME``."""
    module, sep, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not module or not attr:
        raise PluginError(f"model.architecture={path!r} is not a dotted path; write package.module.NAME (or "
                          "package.module:NAME) naming an Architecture or a (seq2seq, lm) pair")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise PluginError(f"model.architecture={path!r} cannot be imported ({type(err).__name__}: {err}); install "
                          "its package or put its folder on PYTHONPATH") from err
    return obj


def entry_points() -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=GROUP), key=lambda ep: ep.name)


def discover(builtin: Mapping[str, Architecture]) -> tuple[dict[str, Architecture], dict[str, str]]:
    """The built-in architectures and every registered one: (name -> Architecture, name -> why it failed to load).

    A plug-in that fails to import is not fatal at start-up (another model may be wanted); selecting it raises
    :class:`PluginError` with the reason. A plug-in may not take a built-in's name.
    """
    found, broken = dict(builtin), {}
    for ep in entry_points():
        dist = ep.dist.name if ep.dist is not None else None
        where = f"entry point {ep.name!r} = {ep.value!r} (group {GROUP}, distribution {dist})"
        if ep.name in builtin and not _is_own(dist):
            broken[ep.name] = f"{where} takes the name of a built-in architecture; rename the entry point"
            continue
        try:
            arch = as_architecture(ep.load(), ep.name, where)
        except Exception as err:  # noqa: BLE001 (any import error of foreign code: reported when it is selected)
            broken[ep.name] = f"{where} failed to load: {type(err).__name__}: {err}"
            log.debug(broken[ep.name])
            continue
        if arch.name != ep.name:
            broken[ep.name] = f"{where} names an architecture called {arch.name!r}; the names must agree"
            continue
        module = ep.value.partition(":")[0]
        found[ep.name] = _with_origin(arch, kind="entry point", module=module, distribution=dist,
                                      version=ep.dist.version if ep.dist is not None else None,
                                      builtin=_is_own(dist))
    return found, broken


def from_path(path: str, name: str) -> Architecture:
    """The architecture a ``model.architecture`` dotted path names (code on PYTHONPATH, not a package)."""
    arch = as_architecture(import_object(path), name, f"model.architecture={path!r}")
    dist = _distribution_of(path.partition(":")[0] if ":" in path else path.rpartition(".")[0])
    return _with_origin(arch, kind="dotted path", module=path.partition(":")[0] if ":" in path
                        else path.rpartition(".")[0], distribution=dist[0], version=dist[1], builtin=False)


def _is_own(dist: str | None) -> bool:
    return dist == "seqbench"


def _with_origin(arch: Architecture, **origin) -> Architecture:
    from dataclasses import replace  # noqa: PLC0415
    return replace(arch, origin={**arch.origin, **origin})


def _distribution_of(module: str) -> tuple[str | None, str | None]:
    top = module.split(".")[0]
    for dist in metadata.packages_distributions().get(top, []):
        try:
            return dist, metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None, None


def preset_files(arch: Architecture) -> list[Path]:
    """The architecture's preset files (``<folder>/*.yaml``), sorted."""
    if arch.presets is None:
        return []
    folder = Path(arch.presets)
    if not folder.is_dir():
        raise PluginError(f"architecture {arch.name!r} names the preset folder {folder}, which does not exist; ship "
                          "the presets with the package (package data) or set presets=None")
    return sorted(folder.glob("*.yaml"))
