"""The job's settings, checked at start-up against one table: a bad value fails before any data is read.

Without this check a wrong type or range reaches library internals and fails late, with their message
(``seed=abc`` in numpy, ``trainer.lr=abc`` in the optimizer, ``eval.decoding.batch_sentences=0`` at the first
validation) or never (``eval.decoding.lenpen=nan`` ends up in the record). Each message names the setting, the
value given and what is valid. Not here: the trainer's named choices (schedule, precision, on_nonfinite,
threads) and the optimizer settings that must fit together, which :class:`harness.train.TrainConfig` checks
before the data are read too, and the model's and the task's settings, checked by the code that uses them.

The config's own functions (OmegaConf resolvers) are registered here, on import, because every entry point
reads the settings before it resolves a config: ``${eq3_peak_lr:d_model,warmup}`` (trainer=paper's ``lr``).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

JOBS = ("train", "path_length")  # run.py's jobs (cfg.job)
SPLITS = ("train", "valid", "test")
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


class SettingError(ValueError):
    """One or more settings have a value of the wrong type or out of range; the message names each."""


@dataclass(frozen=True)
class Rule:
    """``accepts(value)`` says whether a value is valid; ``valid`` says what is, for the message."""

    accepts: Callable[[Any], bool]
    valid: str
    listing: bool = False  # ``valid`` lists the values: "key=value; valid: a, b" rather than "key=value must be ..."
    negative: str | None = None  # the message's end for a negative number, where it has its own wording

    def problem(self, key: str, value: Any) -> str | None:
        if self.accepts(value):
            return None
        if self.negative and _is_number(value) and value < 0:
            return f"{key}={value!r} is negative; {self.negative}"
        return f"{key}={value!r}; valid: {self.valid}" if self.listing else f"{key}={value!r} must be {self.valid}"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(low: int, high: int | None = None, *, null: str | None = None) -> Rule:
    """An integer in ``low..high``; with ``null`` (what null means) None is valid too."""
    valid = ("a positive integer" if low == 1 and high is None else f"an integer >= {low}" if high is None
             else f"an integer in {low}..{high}")
    return Rule(lambda v: (v is None and null is not None) or (_is_int(v) and low <= v and (high is None or v <= high)),
                valid + (f" or null ({null})" if null else ""))


def number(accepts: Callable[[float], bool], valid: str) -> Rule:
    """A finite number (an integer is one) that ``accepts``."""
    return Rule(lambda v: _is_number(v) and accepts(v), f"a finite number {valid}")


def budget(kind: str) -> Rule:
    """A training budget: positive, or null (no limit of this kind)."""
    is_kind = _is_int if kind == "integer" else _is_number
    return Rule(lambda v: v is None or (is_kind(v) and v > 0), f"a positive {kind} or null",
                negative="set a positive budget or null")


def choice(*values: str) -> Rule:
    return Rule(lambda v: v in values, ", ".join(values), listing=True)


BOOLEAN = Rule(lambda v: isinstance(v, bool), "true or false")


def eq3_peak_lr(d_model: float, warmup_steps: int) -> float:
    """The peak of Vaswani et al.'s eq. 3, d_model^-0.5 * min(step^-0.5, step * warmup^-1.5) at step = warmup:
    d_model^-0.5 * warmup^-0.5 (7.0e-4 for d_model 512 and 4000 warm-up steps, 4.9e-4 for d_model 1024)."""
    return float(d_model) ** -0.5 * max(1, int(warmup_steps)) ** -0.5


if not OmegaConf.has_resolver("eq3_peak_lr"):
    OmegaConf.register_new_resolver("eq3_peak_lr", eq3_peak_lr)

# setting -> rule; a setting absent from the config is not checked (its default applies)
SETTINGS: dict[str, Rule] = {
    "job": choice(*JOBS),
    "seed": integer(0, 2**32 - 1),
    "device": Rule(lambda v: isinstance(v, str) and DEVICE.fullmatch(v) is not None, "auto, cpu, cuda, cuda:N",
                   listing=True),
    "tuned": Rule(lambda v: v is None or (isinstance(v, str) and v != ""),
                  "the path of a tuning sweep's tuned.yaml, or null"),
    "data.download": BOOLEAN,
    "trainer.max_tokens": integer(1),
    "trainer.max_steps": budget("integer"),
    "trainer.max_epochs": budget("number"),
    "trainer.max_seconds": budget("number"),
    "trainer.lr": number(lambda v: v > 0, "> 0"),
    "trainer.warmup_steps": integer(0),
    "trainer.min_lr_ratio": number(lambda v: 0 <= v <= 1, "in [0, 1]"),
    "trainer.betas": Rule(lambda v: isinstance(v, list) and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v),
                          "two numbers in [0, 1), e.g. [0.9, 0.98]"),
    "trainer.eps": number(lambda v: v >= 0, ">= 0"),
    "trainer.weight_decay": number(lambda v: v >= 0, ">= 0"),
    "trainer.optimizer": choice("adam", "sgd", "adam_then_sgd"),
    "trainer.momentum": number(lambda v: 0 <= v < 1, "in [0, 1)"),
    "trainer.nesterov": BOOLEAN,
    "trainer.sgd_lr": Rule(lambda v: v is None or (_is_number(v) and v > 0),
                           "a finite number > 0 (SGD's learning rate after trainer.switch_step) or null"),
    "trainer.switch_step": integer(1, null="no switch"),
    "trainer.lr_shrink": number(lambda v: 0 < v < 1, "in (0, 1)"),
    "trainer.stop_lr": number(lambda v: v >= 0, ">= 0 (0: never stop on the learning rate)"),
    "trainer.label_smoothing": number(lambda v: 0 <= v < 1, "in [0, 1)"),
    "trainer.clip_norm": number(lambda v: v >= 0, ">= 0 (0: no clipping)"),
    "trainer.compile": BOOLEAN,
    "trainer.eval_every": integer(1),
    "trainer.save_every": integer(1, null="no periodic checkpoints"),
    "trainer.save_every_seconds": Rule(lambda v: v is None or (_is_number(v) and v > 0),
                                       "a positive number of seconds or null (no periodic checkpoints)"),
    "trainer.valid_bleu": BOOLEAN,
    "trainer.log_every": integer(1),
    "trainer.resume": BOOLEAN,
    "trainer.progress": BOOLEAN,
    "trainer.carry_state": BOOLEAN,
    "eval.splits": Rule(lambda v: isinstance(v, list) and len(v) > 0 and all(s in SPLITS for s in v),
                        "a non-empty list of " + ", ".join(SPLITS)),
    "eval.checkpoint": choice("best", "last", "average"),
    "eval.average_last": integer(1),
    "eval.influence": BOOLEAN,
    "eval.lm_protocol": choice("chunks", "carry", "sliding"),
    "eval.lm_stride": integer(1, null="half of task.bptt"),
    "eval.lm_batch_size": integer(1),
    "eval.decoding.beam": integer(1),
    "eval.decoding.lenpen": number(lambda v: v >= 0, ">= 0"),
    "eval.decoding.max_len_a": number(lambda v: v >= 0, ">= 0"),
    "eval.decoding.max_len_b": integer(0),
    "eval.decoding.batch_sentences": integer(1),
    "eval.decoding.max_source_tokens": integer(1, null="no cap"),
}

_ABSENT = object()


def problems(cfg: DictConfig) -> list[str]:
    """One message per setting of ``cfg`` that breaks its rule (empty when all are valid)."""
    found = []
    for key, rule in SETTINGS.items():
        try:
            value = OmegaConf.select(cfg, key, default=_ABSENT)
            if isinstance(value, (DictConfig, ListConfig)):
                value = OmegaConf.to_container(value, resolve=True)
        except OmegaConfBaseException as err:  # an interpolation that cannot be resolved, e.g. a missing key
            found.append(f"{key} cannot be computed: {str(err).splitlines()[0]}; give {key} a value")
            continue
        if value is _ABSENT:
            continue
        problem = rule.problem(key, value)
        if problem:
            found.append(problem)
    if OmegaConf.select(cfg, "eval.checkpoint") == "average" and not (
            OmegaConf.select(cfg, "trainer.save_every") or OmegaConf.select(cfg, "trainer.save_every_seconds")):
        found.append("eval.checkpoint=average averages the checkpoints saved every trainer.save_every steps or "
                     "trainer.save_every_seconds seconds, and neither is set; set one (e.g. +trainer.save_every=1000)")
    from . import lm_protocol  # noqa: PLC0415 (it reads the model registry, which imports torch)
    return found + lm_protocol.problems(cfg)


def check(cfg: DictConfig) -> None:
    """Raise :class:`SettingError` naming every invalid setting; call it before reading any data."""
    found = problems(cfg)
    if found:
        raise SettingError("\n".join(found))
