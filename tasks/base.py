"""What a task is: the interface every task implements, and what its evaluation is given.

A job never asks which kind of task it has. It builds the model in the task's ``form``, trains on
``batches``, adds the task's ``validate`` columns to each validation row, and writes the task's
``evaluate`` results into the record; the report reads the task's ``family`` and ``metrics`` from
the record's ``task`` entry (``describe()``). A new kind of task (classification, a task scored by
error rate) is a class with these members and a registry entry in ``tasks/__init__.py``, plus a config
file in ``conf/task/``: nothing in ``harness/`` or ``reports/`` changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

from .batching import Batch

FORMS = ("seq2seq", "lm")  # the two model interfaces (models/common.py): encoder-decoder, language model


@dataclass
class EvalContext:
    """Where and how a task's evaluation runs the model.

    ``max_tokens``: the batch size of teacher-forced passes (the trainer's); ``decoding``: the
    ``eval.decoding`` settings of generation tasks (beam, lenpen, length limits); ``precision``: the
    trainer's resolved autocast precision; ``check_stop()`` raises to end a long evaluation early (a
    signal asked the job to stop); ``greedy_curve``: whether validation rows get a greedy-decoding score
    (``trainer.valid_bleu``), which costs a decoding pass per validation; ``lm_protocol``: how a stream's
    perplexity is computed (``eval.lm_protocol``).
    """

    device: Any
    max_tokens: int
    decoding: dict = field(default_factory=dict)
    precision: str = "fp32"
    check_stop: Callable[[], None] | None = None
    greedy_curve: bool = True
    lm_protocol: Any = None  # how a language model's perplexity is computed (harness/lm_protocol.py); None: chunks


@runtime_checkable
class Task(Protocol):
    """The members every task has (see the classes in translation.py, lm.py and probes.py)."""

    name: str
    family: str  # the record's task.family: how the report groups and describes it (translation, lm, probe, ...)
    form: str  # one of FORMS: the model form models.build makes for it
    metrics: tuple[str, ...]  # test metrics it reports, names in harness/metrics.py's registry; the first ranks rows

    def describe(self) -> dict:
        """The record's ``task`` entry: at least name, family, form and metrics, plus sizes and settings."""

    def vocab(self) -> dict[str, int]:
        """Vocabulary sizes the model is built with: ``{"src", "tgt"}`` (seq2seq) or ``{"lm"}``."""

    def data_arrays(self) -> dict[str, list]:
        """The token ids the model reads, per split (arrays): a checkpoint's data checksums are taken over them."""

    def batches(self, split: str, max_tokens: int, epoch: int = 0, shuffle: bool = False,
                seed: int = 0) -> list[Batch]:
        """Teacher-forced batches of at most ``max_tokens`` tokens (shuffled per epoch when ``shuffle``)."""

    def validate(self, model, ctx: EvalContext) -> dict:
        """Validation-curve columns beyond the loss (``valid_bleu_greedy``, ``valid_accuracy``); {} for none."""

    def evaluate(self, model, split: str, ctx: EvalContext) -> tuple[dict, dict]:
        """The record's ``metrics[split]`` (holding every name in ``metrics``), and the files to leave in the job's
        folder, name -> content: a list of lines (``<split>.hyp``) or a JSON object (``<split>.nll.json``)."""


@dataclass
class Shape:
    """A task's form and vocabulary sizes without its data: what ``models.build`` needs to make a model to time
    or analyse (``Shape("lm", {"lm": 64})``, ``Shape("seq2seq", {"src": 8000, "tgt": 8000})``)."""

    form: str
    sizes: dict[str, int]
    name: str = "shape"

    def vocab(self) -> dict[str, int]:
        return dict(self.sizes)
