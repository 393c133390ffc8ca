"""The job's settings, checked at start-up against one table: a bad value fails before any data is read.

Without this check a wrong type or range reaches library internals and fails late, with their message
(``seed=abc`` in numpy, ``trainer.lr=abc`` in the optimizer, ``eval.decoding.batch_sentences=0`` at the first
validation) or never (``eval.decoding.lenpen=nan`` ends up in the record). Each message names the setting, the
value given and what is valid. The model's hyperparameters are checked here too (:func:`model_problems`), so that
no bad value reaches torch. Not here: the trainer's named choices (schedule, precision, on_nonfinite, threads)
and the optimizer settings that must fit together, which :class:`harness.train.TrainConfig` checks before the
data are read too, and the task's settings, checked by the code that uses them.

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
# The most output tokens decoding makes for one sentence, whatever eval.decoding.max_len_a * |src| + max_len_b
# gives (harness/decode.py caps every limit at it): it bounds the time and memory of any decoding run. The
# settings check refuses max_len_a and max_len_b above it.
MAX_OUTPUT_TOKENS = 4096
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
    "trainer.max_flops": budget("number"),
    "trainer.lr": number(lambda v: v > 0, "> 0"),
    "trainer.warmup_steps": integer(0),
    "trainer.min_lr_ratio": number(lambda v: 0 <= v <= 1, "in [0, 1]"),
    "trainer.betas": Rule(lambda v: isinstance(v, list) and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v),
                          "two numbers in [0, 1), e.g. [0.9, 0.98]"),
    "trainer.eps": number(lambda v: v >= 0, ">= 0"),
    "trainer.weight_decay": number(lambda v: v >= 0, ">= 0"),
    "trainer.optimizer": choice("adam", "adamw", "sgd", "adam_then_sgd"),
    "trainer.momentum": number(lambda v: 0 <= v < 1, "in [0, 1)"),
    "trainer.nesterov": BOOLEAN,
    "trainer.sgd_lr": Rule(lambda v: v is None or (_is_number(v) and v > 0),
                           "a finite number > 0 (SGD's learning rate after trainer.switch_step) or null"),
    "trainer.switch_step": integer(1, null="no switch"),
    "trainer.lr_shrink": number(lambda v: 0 < v < 1, "in (0, 1)"),
    "trainer.stop_lr": number(lambda v: v >= 0, ">= 0 (0: never stop on the learning rate)"),
    "trainer.label_smoothing": Rule(lambda v: v is None or (_is_number(v) and 0 <= v < 1),
                                    "a finite number in [0, 1) or null (the task's default: 0.1 translation, 0 "
                                    "language models)"),
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
    "trainer.ladder": Rule(lambda v: v is None or (isinstance(v, list) and len(v) > 0 and all(
        _is_number(f) and f > 0 for f in v) and all(b > a for a, b in zip(v, v[1:]))),
        "null or increasing positive FLOP budgets, e.g. [3e13,1e14,3e14] (with trainer.schedule=wsd)"),
    "trainer.cooldown": number(lambda v: 0 < v < 1, "in (0, 1), e.g. 0.2"),
    "trainer.stop_at": Rule(lambda v: v is None or (isinstance(v, dict) and len(v) > 0 and all(
        isinstance(k, str) and k.startswith("valid_") and _is_number(x) for k, x in v.items())),
        "null or validation metrics with their targets, e.g. {valid_accuracy:0.99} (training ends once validation "
        "reaches them)"),
    "tune.extend.enabled": BOOLEAN,
    "tune.extend.max_points": integer(0),
    "tune.extend.lr_min": Rule(lambda v: v is None or (_is_number(v) and v > 0),
                               "a positive learning rate (the extension's lower limit) or null"),
    "tune.extend.lr_max": Rule(lambda v: v is None or (_is_number(v) and v > 0),
                               "a positive learning rate (the extension's upper limit) or null"),
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
    "eval.decoding.max_len_a": number(lambda v: 0 <= v <= MAX_OUTPUT_TOKENS,
                                      f"in [0, {MAX_OUTPUT_TOKENS}] (outputs never exceed {MAX_OUTPUT_TOKENS} "
                                      "tokens; 1.2 is usual)"),
    "eval.decoding.max_len_b": Rule(lambda v: _is_int(v) and 0 <= v <= MAX_OUTPUT_TOKENS,
                                    f"an integer in 0..{MAX_OUTPUT_TOKENS} (outputs never exceed {MAX_OUTPUT_TOKENS} "
                                    "tokens; 10 is usual)"),
    "eval.decoding.batch_sentences": integer(1),
    "eval.decoding.max_source_tokens": integer(1, null="no cap"),
}

_ABSENT = object()


def _positive_ints(v, *, pairs: bool = False) -> bool:
    items = [x for pair in v for x in pair] if pairs else v
    return (isinstance(v, list) and len(v) > 0 and (not pairs or all(isinstance(p, list) and len(p) == 2 for p in v))
            and all(_is_int(x) and x >= 1 for x in items))


def _fraction(what: str) -> Rule:
    return number(lambda v: 0 <= v < 1, f"in [0, 1) ({what})")


# model hyperparameter -> rule, for every architecture that takes it (models/: the constructors' keywords);
# one meaning per name across architectures
MODEL_SETTINGS: dict[str, Rule] = {
    "d_model": integer(1),
    "n_layers": integer(1),
    "n_decoder_layers": integer(1, null="as many as n_layers"),
    "n_heads": integer(1),
    "d_ff": integer(1),
    "dropout": _fraction("the probability of dropping an activation"),
    "attn_dropout": _fraction("dropout on the attention weights"),
    "act_dropout": _fraction("dropout on the feed-forward activations"),
    "pre_norm": BOOLEAN,
    "share_embeddings": BOOLEAN,
    "tie_output": BOOLEAN,
    "bidirectional": BOOLEAN,
    "n_bidirectional_layers": integer(0, null="every encoder layer"),
    "attention": choice("luong", "bahdanau"),
    "input_feed": BOOLEAN,
    "residual_from": integer(2, null="no residual layers"),
    "kernel_size": integer(1),
    "channels": integer(1, null="d_model"),
    "layers": Rule(lambda v: v is None or _positive_ints(v, pairs=True),
                   "a non-empty list of [channels, kernel_size] pairs of positive integers, or null (n_layers "
                   "layers of channels x kernel_size)"),
    "d_out": integer(1, null="d_model"),
    "max_positions": integer(1),
    "weight_norm": BOOLEAN,
    "dilations": Rule(lambda v: _positive_ints(v), "a non-empty list of positive integers, e.g. [1, 2, 4, 8, 16]"),
    "unfold_a": number(lambda v: v >= 0, ">= 0 (ByteNet's L = ceil(a|s| + b); the paper's a = 1.2)"),
    "unfold_b": number(lambda v: v >= 0, ">= 0 (ByteNet's L = ceil(a|s| + b))"),
    "attn_window": integer(1, null="the whole prefix"),
}


def model_problems(cfg: DictConfig) -> list[str]:
    """One message per invalid ``model.*`` setting: an unknown architecture or hyperparameter, a value of the wrong
    type or range (:data:`MODEL_SETTINGS`), and settings that must fit together (heads dividing d_model, ...).

    Checked before anything is built, so that no bad value reaches torch (``model.n_heads=0`` would divide by
    zero, ``model.n_layers=0`` index an empty stack). What depends on the task's model form (an encoder's odd
    kernel) is checked by the model's constructor.
    """
    from seqbench import models  # noqa: PLC0415 (the registry imports torch)

    try:
        model = OmegaConf.to_container(cfg.model, resolve=True) if OmegaConf.select(cfg, "model") is not None else None
    except OmegaConfBaseException as err:
        return [f"model cannot be computed: {str(err).splitlines()[0]}; give each model.* setting a value"]
    if not isinstance(model, dict):
        return []
    name = model.get("name")
    try:
        arch = models.architecture(model)
    except KeyError:
        return [f"model.name={name!r}: {models.unknown_model(name)}"]
    except models.PluginError as err:
        return [str(err)]
    takes = dict.fromkeys(k for cls in arch.classes for k in models.accepted_kwargs(cls))
    own = {k: Rule(*rule) if isinstance(rule, tuple) else rule for k, rule in arch.settings.items()}
    found = []
    for key, value in model.items():
        if key in models.META_KEYS:
            continue
        if key not in takes:
            found.append(f"model.{key} is not a setting of {name}; valid: {', '.join(takes)}")
        elif key in own or key in MODEL_SETTINGS:
            found.append((own.get(key) or MODEL_SETTINGS[key]).problem(f"model.{key}", value))
    found = [f for f in found if f]
    if found:  # the combined checks below read values of the right type only
        return found

    def get(key):
        return model[key] if key in model else models.valid_default(arch.seq2seq, key)

    if arch.check is not None:
        found += list(arch.check({k: get(k) for k in takes}))

    d_model = get("d_model")
    if "n_heads" in takes and d_model % get("n_heads"):
        heads = [h for h in range(1, min(d_model, 64) + 1) if d_model % h == 0]
        found.append(f"model.d_model={d_model} is not divisible by model.n_heads={get('n_heads')}: each head gets "
                     f"d_model / n_heads dimensions; set model.n_heads to a divisor of d_model "
                     f"({', '.join(map(str, heads))})")
    if name in ("lstm", "gru"):
        n_bi = get("n_bidirectional_layers")
        if get("bidirectional") and n_bi is not None and n_bi > get("n_layers"):
            found.append(f"model.n_bidirectional_layers={n_bi} is more than model.n_layers={get('n_layers')}; set "
                         "it to at most n_layers (null: every encoder layer)")
        if get("bidirectional") and (n_bi is None or n_bi > 0) and d_model % 2:
            found.append(f"model.d_model={d_model} is odd, but a bidirectional layer splits d_model between its two "
                         f"directions; use an even d_model ({d_model - 1} or {d_model + 1}) or "
                         "model.bidirectional=false")
    if name == "bytenet" and d_model < 2:
        found.append(f"model.d_model={d_model} leaves ByteNet's bottleneck (d_model / 2 channels) empty; set "
                     "model.d_model to at least 2")
    if name == "convs2s" and get("tie_output") and get("d_out") not in (None, d_model):
        found.append(f"model.tie_output=true shares the output projection with the embeddings, so model.d_out="
                     f"{get('d_out')} must equal model.d_model={d_model}; set model.d_out=null or "
                     "model.tie_output=false")
    return found



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
                     "trainer.save_every_seconds seconds, and neither is set; set one (e.g. trainer.save_every=1000)")
    low, high = OmegaConf.select(cfg, "tune.extend.lr_min"), OmegaConf.select(cfg, "tune.extend.lr_max")
    if _is_number(low) and _is_number(high) and not low < high:
        found.append(f"tune.extend.lr_min={low} is not below tune.extend.lr_max={high}; the grid extends between "
                     "them: set lr_min < lr_max (e.g. 1e-4 and 2e-2)")
    if OmegaConf.select(cfg, "trainer.ladder") and OmegaConf.select(cfg, "eval.checkpoint") != "last":
        found.append(f"trainer.ladder evaluates each rung's cooled weights, the last ones of its cooldown, and "
                     f"eval.checkpoint={OmegaConf.select(cfg, 'eval.checkpoint')} would evaluate other weights at the "
                     "top rung; set eval.checkpoint=last")
    from . import lm_protocol  # noqa: PLC0415 (it reads the model registry, which imports torch)
    return found + model_problems(cfg) + lm_protocol.problems(cfg)


def check(cfg: DictConfig) -> None:
    """Raise :class:`SettingError` naming every invalid setting; call it before reading any data."""
    found = problems(cfg)
    if found:
        raise SettingError("\n".join(found))
