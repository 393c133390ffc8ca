"""Language-model evaluation protocols (``eval.lm_protocol``) and truncated BPTT with carried state
(``trainer.carry_state``).

A perplexity depends on how much of the text before each token the model may read, so every language-model
perplexity in a record names its protocol (``metrics.<split>.protocol``, ``protocol_settings``, and
``mean_context``: the mean number of tokens of its stream each scored prediction has read):

- ``chunks``: the stream cut into consecutive, non-overlapping ``task.bptt``-token chunks, each run from a zero
  state with only its own tokens: the prediction at position j of a chunk has read j tokens (1..bptt, mean
  64.5 for 128). The same for every architecture and cheap; training batches and validation use it. Not the
  protocol of published WikiText-2/PTB numbers.
- ``carry``: the stream cut into ``eval.lm_batch_size`` parallel streams (the last ``len % B`` tokens dropped),
  scored chunk after chunk with the recurrent state carried from each chunk to the next, as PyTorch's
  word_language_model example and AWD-LSTM evaluate: every prediction has read its whole stream so far.
  Recurrent models only (an LSTM or GRU language model); with one stream it equals one pass over the split.
- ``sliding``: windows of up to ``task.bptt`` tokens that begin every ``eval.lm_stride`` tokens, each scoring only
  the tokens past the previous window's end (Hugging Face's perplexity guide, fairseq's ``--context-window``):
  every token is scored exactly once, after the stream's start with at least ``bptt - stride + 1`` tokens of
  context; any architecture. ``stride = bptt`` is ``chunks``; a smaller stride costs ``bptt / stride`` times
  the computation.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

import models
from tasks.batching import Batch
from tasks.streams import carried_batches, sliding_batches

from .loss import sequence_nll

PROTOCOLS = ("chunks", "carry", "sliding")
RECURRENT_FIX = "or train a recurrent language model (model=lstm, model=gru)"
log = logging.getLogger("seqbench")


@dataclass(frozen=True)
class Protocol:
    """How a split's perplexity is computed (see the module docstring)."""

    name: str = "chunks"
    stride: int | None = None  # sliding: tokens between window starts; None: half of task.bptt
    streams: int = 10  # carry: parallel streams (the examples' eval_batch_size)

    def settings(self, bptt: int) -> dict:
        """What the record states beside the protocol's name."""
        if self.name == "sliding":
            return {"bptt": bptt, "stride": self.stride_for(bptt)}
        return {"bptt": bptt, **({"streams": self.streams} if self.name == "carry" else {})}

    def stride_for(self, bptt: int) -> int:
        return self.stride if self.stride is not None else max(1, bptt // 2)


def from_config(cfg: DictConfig) -> Protocol:
    """The protocol the job's ``eval.lm_protocol``, ``eval.lm_stride`` and ``eval.lm_batch_size`` name."""
    return Protocol(OmegaConf.select(cfg, "eval.lm_protocol", default="chunks"),
                    OmegaConf.select(cfg, "eval.lm_stride", default=None),
                    OmegaConf.select(cfg, "eval.lm_batch_size", default=10))


def carries_state(arch: str | None) -> bool | None:
    """Whether architecture ``arch``'s language model can carry its state across chunks (None: unknown name)."""
    if arch not in models.MODELS:
        return None
    return hasattr(models.MODELS[arch][1], "init_state")


def problems(cfg: DictConfig) -> list[str]:
    """The settings check's messages for these settings together (harness/settings.py checks each alone)."""
    found, arch = [], OmegaConf.select(cfg, "model.name")
    if carries_state(arch) is False:
        name = models.MODELS[arch][1].__name__
        if OmegaConf.select(cfg, "eval.lm_protocol") == "carry":
            found.append(f"eval.lm_protocol=carry carries a recurrent language model's state from chunk to chunk, "
                         f"and {name} (model={arch}) has no state to carry; use eval.lm_protocol=sliding (any "
                         f"architecture: every token scored once with up to task.bptt tokens of context) or "
                         f"chunks, {RECURRENT_FIX}")
        if OmegaConf.select(cfg, "trainer.carry_state") is True:
            found.append(f"trainer.carry_state=true carries a recurrent language model's state from batch to batch, "
                         f"and {name} (model={arch}) has no state to carry; set trainer.carry_state=false, "
                         f"{RECURRENT_FIX}")
    stride, bptt = OmegaConf.select(cfg, "eval.lm_stride"), OmegaConf.select(cfg, "task.bptt")
    if (OmegaConf.select(cfg, "eval.lm_protocol") == "sliding" and isinstance(stride, int)
            and isinstance(bptt, int) and stride > bptt):
        found.append(f"eval.lm_stride={stride} is larger than task.bptt={bptt}: windows of {bptt} tokens starting "
                     f"{stride} apart would leave tokens unscored; set eval.lm_stride to at most {bptt} (null: half "
                     "of task.bptt)")
    return found


def is_stream_task(task) -> bool:
    """A language-model task over a text stream (not translation, not a probe of independent examples)."""
    return getattr(task, "streams", None) is not None


def ignored(cfg: DictConfig, task) -> list[str]:
    """Warnings for a protocol other than ``chunks`` given to a task it does not apply to."""
    protocol = from_config(cfg).name
    if protocol == "chunks" or is_stream_task(task):
        return []
    return [f"eval.lm_protocol={protocol} applies to language-model tasks over a text stream; task {task.name} "
            "scores its own way, so the setting has no effect"]


def batches(task, split: str, max_tokens: int, protocol: Protocol) -> list[Batch]:
    """The split's evaluation batches under ``protocol`` (``chunks``: the task's own, ``max_tokens`` per batch)."""
    rows = max(1, max_tokens // task.bptt)
    if protocol.name == "sliding":
        return sliding_batches(task.streams[split], task.bptt, protocol.stride_for(task.bptt), rows)
    if protocol.name == "carry":
        try:
            return carried_batches(task.streams[split], task.bptt, protocol.streams)
        except ValueError as err:
            raise ValueError(f"the {split} split of task {task.name}: {err}; lower eval.lm_batch_size") from err
    return task.batches(split, max_tokens)


@torch.no_grad()
def score(model, task, split: str, device, max_tokens: int, protocol: Protocol) -> dict:
    """Summed NLL (``nll_sum``, nats, fp32 log-softmax), scored ``tokens``, ``mean_context``, the protocol, and
    each evaluated sequence's summed NLL and scored tokens (``chunk_nll``, ``chunk_tokens``: batch rows in order)."""
    model.eval()
    count, context, offset, state, sums, counts = 0, 0, 0, None, [], []
    carry = protocol.name == "carry"
    for batch in batches(task, split, max_tokens, protocol):
        batch = batch.to(device)
        if carry:
            state = model.init_state(batch.target.size(0), device) if state is None else state
            logits, state = model(**batch.inputs, state=state)
        else:
            logits = model(**batch.inputs)
        batch_sums, batch_counts = sequence_nll(logits, batch.target, batch.ignore_index)
        count += batch.n_tokens
        sums += batch_sums
        counts += batch_counts
        read = offset + torch.arange(1, batch.target.size(1) + 1, device=device)  # tokens read at each position
        context += int(((batch.target != batch.ignore_index) * read).sum())
        offset += batch.target.size(1) if carry else 0
    return {"nll_sum": sum(sums), "tokens": count, "mean_context": context / max(count, 1), "protocol": protocol.name,
            "protocol_settings": protocol.settings(task.bptt), "chunk_nll": sums, "chunk_tokens": counts}


class CarriedState:
    """``trainer.carry_state``: truncated backpropagation through time over parallel streams, as PyTorch's
    word_language_model example trains.

    The training stream is cut into B = ``trainer.max_tokens // task.bptt`` streams; the batches of an epoch are
    their consecutive ``bptt``-token slices, in order, and each starts from the state the previous one ended in,
    detached (gradients reach back ``bptt`` tokens, the state further); an epoch starts from zero. The state is
    kept in the checkpoint, so a resumed run continues it exactly.
    """

    def __init__(self, model, task, max_tokens: int, distributed: bool = False):
        if not is_stream_task(task):
            raise ValueError(f"trainer.carry_state=true trains a language model on a text stream, and task {task.name} "
                             "is not one (translation, or a probe of independent examples); set "
                             "trainer.carry_state=false")
        if not hasattr(model, "init_state"):
            raise ValueError(f"trainer.carry_state=true carries a recurrent language model's state from batch to "
                             f"batch, and {type(model).__name__} has no state to carry; set "
                             f"trainer.carry_state=false, {RECURRENT_FIX}")
        if distributed:
            raise ValueError("trainer.carry_state=true does not run data-parallel (several processes) yet; train on "
                             "one process, or set trainer.carry_state=false")
        self.model = model
        self.batches = carried_batches(task.streams["train"], task.bptt, max(1, max_tokens // task.bptt))

    def forward(self, forward, batch: Batch, state: tuple | None):
        """``forward(tokens, state)`` from ``state`` (None: the zero state) -> (logits, the final state detached)."""
        rows, device = batch.target.size(0), batch.target.device
        state = self.model.init_state(rows, device) if state is None else tuple(s.to(device) for s in state)
        logits, final = forward(**batch.inputs, state=state)
        return logits, tuple(s.detach() for s in final)
