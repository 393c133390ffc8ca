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
from tasks.base import FORMS  # (encoder-decoder, language model): the order of each MODELS entry

from .common import PAD, LanguageModel, Seq2Seq, accepted_kwargs

# architecture name -> (encoder-decoder class, language-model class)
MODELS: dict[str, tuple[type[Seq2Seq], type[LanguageModel]]] = {
    "transformer": (transformer.TransformerSeq2Seq, transformer.TransformerLM),
    "lstm": (rnn.LSTMSeq2Seq, rnn.LSTMLM),
    "gru": (rnn.GRUSeq2Seq, rnn.GRULM),
    "convs2s": (convs2s.ConvS2S, convs2s.ConvLM),
    "bytenet": (bytenet.ByteNet, bytenet.ByteNetLM),
}

# config keys that describe a preset rather than a hyperparameter
META_KEYS = ("name", "preset", "paper")

# architecture -> hyperparameters its language-model form takes (so one preset serves both forms) but does not
# use: encoder, attention and source-side settings, the shared source/target vocabulary, the unfolding bound
LM_IGNORES: dict[str, tuple[str, ...]] = {
    "transformer": ("share_embeddings",),
    "lstm": ("bidirectional", "n_bidirectional_layers", "attention", "input_feed", "share_embeddings"),
    "gru": ("bidirectional", "n_bidirectional_layers", "attention", "input_feed", "share_embeddings"),
    "convs2s": ("max_positions", "share_embeddings"),
    "bytenet": ("share_embeddings", "unfold_a", "unfold_b"),
}
log = logging.getLogger("seqbench")

PRESETS = Path(__file__).resolve().parents[1] / "conf" / "model"  # one YAML file per preset


def load_preset(name: str) -> dict:
    """The model config of the preset file ``conf/model/<name>.yaml`` (e.g. ``transformer_tiny``)."""
    path = PRESETS / f"{name}.yaml"
    if not path.is_file():
        valid = sorted(p.stem for p in PRESETS.glob("*.yaml"))
        raise KeyError(f"no such preset {name!r} (no file conf/model/{name}.yaml); valid presets: "
                       + ", ".join(valid))
    import yaml  # noqa: PLC0415 (only the preset readers need it)
    return yaml.safe_load(path.read_text())


def model_class(name: str, form: str) -> type[nn.Module]:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}")
    if form not in FORMS:
        raise ValueError(f"unknown model form {form!r}; expected one of {', '.join(FORMS)}")
    return MODELS[name][FORMS.index(form)]


def build(cfg: Mapping[str, Any], task) -> nn.Module:
    """Build the model named by ``cfg['name']`` in the form the task needs.

    Args:
        cfg: the model config (``name``, optional ``preset``/``paper``, hyperparameters).
        task: a task (``tasks.base.Task``) or its ``tasks.base.Shape``: its ``form`` and ``vocab()`` sizes.
    """
    cfg = dict(cfg)
    cls, sizes = model_class(cfg["name"], task.form), task.vocab()
    hparams = {k: v for k, v in cfg.items() if k not in META_KEYS}
    valid = accepted_kwargs(cls)
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
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
    model.warnings = ignored_settings(cfg["name"], cls, hparams)
    for warning in model.warnings:
        log.warning(warning)
    return model


def ignored_settings(name: str, cls, hparams: Mapping[str, Any]) -> list[str]:
    """One message per seq2seq-only setting of a language-model form given a value other than its default.

    The LM form accepts them (a translation preset runs on an LM task unchanged) but they have no effect, so
    ``model.attention=bahdanau task=wikitext2`` would otherwise train the same model as ``attention=luong``.
    """
    changed = [k for k in LM_IGNORES.get(name, ()) if k in hparams and hparams[k] != valid_default(cls, k)]
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
