"""Model registry: one entry per architecture, each with a seq2seq and a language-model form; presets in
conf/model/ (:func:`load_preset`).

May import torch and the vocabulary and task interface of ``tasks`` (``tasks.vocab``, ``tasks.base``); never
``harness`` or ``reports``.
"""
from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from . import bytenet, convs2s, rnn, transformer
from seqbench.tasks.base import FORMS  # (encoder-decoder, language model): the order of each MODELS entry

from . import registry
from .common import PAD, LanguageModel, Seq2Seq, accepted_kwargs
from .registry import Architecture, PluginError

# config keys that describe a preset rather than a hyperparameter (architecture: a dotted path naming the classes)
META_KEYS = ("name", "preset", "paper", "architecture")

# seqbench's own architectures; LM form: the hyperparameters it takes (so one preset serves both forms) but does not
# use (encoder, attention and source-side settings, the shared source/target vocabulary, the unfolding bound)
BUILTIN: dict[str, Architecture] = {a.name: a for a in (
    Architecture("transformer", transformer.TransformerSeq2Seq, transformer.TransformerLM,
                 lm_ignores=("share_embeddings",), description="Vaswani et al. 2017"),
    Architecture("lstm", rnn.LSTMSeq2Seq, rnn.LSTMLM, description="Luong et al. 2015 / GNMT-style LSTM",
                 lm_ignores=("bidirectional", "n_bidirectional_layers", "attention", "input_feed",
                             "share_embeddings")),
    Architecture("gru", rnn.GRUSeq2Seq, rnn.GRULM, description="the LSTM's design with GRU cells",
                 lm_ignores=("bidirectional", "n_bidirectional_layers", "attention", "input_feed",
                             "share_embeddings")),
    Architecture("convs2s", convs2s.ConvS2S, convs2s.ConvLM, lm_ignores=("max_positions", "share_embeddings"),
                 description="Gehring et al. 2017"),
    Architecture("bytenet", bytenet.ByteNet, bytenet.ByteNetLM, lm_ignores=("share_embeddings", "unfold_a", "unfold_b"),
                 description="Kalchbrenner et al. 2016"),
)}
for _arch in BUILTIN.values():
    object.__setattr__(_arch, "origin", {"kind": "built-in", "module": _arch.seq2seq.__module__, "builtin": True})

# every architecture: the built-in ones and those registered through the seqbench.models entry-point group
# (seqbench's own newer mixers register that way too); BROKEN: registered ones that failed to load, and why
ARCHITECTURES, BROKEN = registry.discover(BUILTIN)
# architecture name -> (encoder-decoder class, language-model class)
MODELS: dict[str, tuple[type[Seq2Seq], type[LanguageModel]]] = {n: a.classes for n, a in ARCHITECTURES.items()}
LM_IGNORES: dict[str, tuple[str, ...]] = {n: a.lm_ignores for n, a in ARCHITECTURES.items()}
log = logging.getLogger("seqbench")

PRESETS = Path(__file__).resolve().parents[1] / "conf" / "model"  # one YAML file per preset


def preset_paths() -> dict[str, Path]:
    """Every model preset: seqbench's (``conf/model/*.yaml``) and each registered architecture's, by name."""
    found = {}
    for arch in ARCHITECTURES.values():
        for path in registry.preset_files(arch):
            found.setdefault(path.stem, path)
    found.update({p.stem: p for p in PRESETS.glob("*.yaml")})
    return dict(sorted(found.items()))


def load_preset(name: str) -> dict:
    """The model config of preset ``name`` (``conf/model/<name>.yaml``, or a plug-in's, e.g. ``transformer_tiny``)."""
    path = preset_paths().get(name)
    if path is None:
        raise KeyError(f"no such preset {name!r} (no file conf/model/{name}.yaml, nor a plug-in's); valid presets: "
                       + ", ".join(preset_paths()))
    import yaml  # noqa: PLC0415 (only the preset readers need it)
    return yaml.safe_load(path.read_text())


def unknown_model(name) -> str:
    """The message for a ``model.name`` no architecture has: the built-in and plug-in names, and broken plug-ins."""
    own = [n for n, a in ARCHITECTURES.items() if a.origin.get("builtin")]
    plugins = sorted(set(ARCHITECTURES) - set(own))
    msg = (f"unknown model {name!r}; valid models: {', '.join(own)} (built in)"
           + (f", {', '.join(plugins)} (plug-ins)" if plugins else "")
           + "; a model of your own: register it (entry-point group seqbench.models) or name it with "
             "model.architecture=package.module.NAME (docs/models.md, 'Adding a model')")
    return msg


def architecture(spec: str | Mapping[str, Any]) -> Architecture:
    """The architecture a model config (or a ``model.name``) selects: ``model.architecture`` (a dotted path) when
    given, else the registered architecture of that name."""
    if isinstance(spec, Mapping):
        name, path = spec.get("name"), spec.get("architecture")
        if path:
            if not isinstance(path, str):
                raise PluginError(f"model.architecture={path!r} must be a dotted path string, e.g. "
                                  "my_module.ARCHITECTURE")
            return registry.from_path(path, str(name))
    else:
        name = spec
    if name in BROKEN:
        raise PluginError(f"model {name!r} is registered but cannot be used: {BROKEN[name]}")
    if name not in ARCHITECTURES:
        raise KeyError(unknown_model(name))
    return ARCHITECTURES[name]


def model_class(name: str | Mapping[str, Any], form: str) -> type[nn.Module]:
    """The class of architecture ``name`` (or of a model config) in ``form`` (seq2seq or lm)."""
    arch = architecture(name)
    if form not in FORMS:
        raise ValueError(f"unknown model form {form!r}; expected one of {', '.join(FORMS)}")
    return arch.classes[FORMS.index(form)]


def build(cfg: Mapping[str, Any], task) -> nn.Module:
    """Build the model named by ``cfg['name']`` in the form the task needs.

    Args:
        cfg: the model config (``name``, optional ``preset``/``paper``, hyperparameters).
        task: a task (``tasks.base.Task``) or its ``tasks.base.Shape``: its ``form`` and ``vocab()`` sizes.
    """
    cfg = dict(cfg)
    cls, sizes = model_class(cfg, task.form), task.vocab()
    hparams = {k: v for k, v in cfg.items() if k not in META_KEYS}
    valid = accepted_kwargs(cls)
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        if not valid:
            raise TypeError(f"{cls.__name__} takes no keyword-only hyperparameters, so {unknown} cannot be set; a model "
                            "class takes its hyperparameters after a `*` (def __init__(self, vocab, *, d_model=256, "
                            "...)), as seqbench's own do")
        raise TypeError(f"{cls.__name__} does not take {unknown}; valid hyperparameters: {', '.join(valid)}")
    if task.form == "seq2seq":
        limit = hparams.get("max_positions", valid_default(cls, "max_positions"))
        for split, longest in (getattr(task, "longest", None) or {}).items():
            if limit is not None and longest > limit:
                fix = f"or lower task.max_len below {limit}" if split == "train" else "(valid/test are never filtered)"
                raise ValueError(f"{cls.__name__} has max_positions={limit} learned positions, but the {split} split "
                                 f"holds a sequence of {longest} positions (tokens + BOS/EOS); raise "
                                 f"model.max_positions {fix}")
        return cls(sizes["src"], sizes["tgt"], PAD, **hparams)
    model = cls(sizes["lm"], **hparams)
    model.warnings = ignored_settings(architecture(cfg), cls, hparams)
    for warning in model.warnings:
        log.warning(warning)
    return model


def ignored_settings(arch: Architecture | str, cls, hparams: Mapping[str, Any]) -> list[str]:
    """One message per seq2seq-only setting of a language-model form given a value other than its default.

    The LM form accepts them (a translation preset runs on an LM task unchanged) but they have no effect, so
    ``model.attention=bahdanau task=wikitext2`` would otherwise train the same model as ``attention=luong``.
    """
    arch = architecture(arch) if isinstance(arch, str) else arch
    name = arch.name
    changed = [k for k in arch.lm_ignores if k in hparams and hparams[k] != valid_default(cls, k)]
    return [f"model.{k}={hparams[k]!r} has no effect on {cls.__name__}, the language-model form of {name!r} "
            "(it applies to the translation form only); the model was built without it" for k in changed]


def valid_default(cls, name: str):
    """Default of keyword ``name`` of ``cls``'s constructor, or None if it has none."""
    param = inspect.signature(cls.__init__).parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def check_form(model: nn.Module, task) -> None:
    """Fail clearly when a model's form does not fit the task (an LM given translation pairs, or the reverse)."""
    form = getattr(model, "form", None)
    if form != task.form:
        raise TypeError(f"{type(model).__name__} is a {form!r} model but task {task.name!r} is a {task.family} task "
                        f"that needs the {task.form!r} form; build the model with models.build(cfg, task), which "
                        "picks the form the task names")


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
