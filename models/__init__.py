"""Model registry: one entry per architecture, each with a seq2seq and a language-model form."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from . import bytenet, convs2s, rnn, transformer
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


def model_class(name: str, family: str) -> type[nn.Module]:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}")
    if family not in ("translation", "lm"):
        raise ValueError(f"unknown task family {family!r}; expected 'translation' or 'lm'")
    return MODELS[name][0 if family == "translation" else 1]


def build(cfg: Mapping[str, Any], task) -> nn.Module:
    """Build the model named by ``cfg['name']`` in the form the task needs.

    Args:
        cfg: the model config (``name``, optional ``preset``/``paper``, hyperparameters).
        task: a task with ``family`` and vocabulary sizes (see ``tasks``).
    """
    cfg = dict(cfg)
    cls = model_class(cfg["name"], task.family)
    hparams = {k: v for k, v in cfg.items() if k not in META_KEYS}
    valid = accepted_kwargs(cls)
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        raise TypeError(f"{cls.__name__} does not take {unknown}; valid hyperparameters: {', '.join(valid)}")
    if task.family == "translation":
        return cls(task.src_vocab_size, task.tgt_vocab_size, PAD, **hparams)
    return cls(task.vocab_size, **hparams)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
