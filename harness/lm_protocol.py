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
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from seqbench import models
from seqbench.tasks.batching import Batch
from seqbench.tasks.streams import carried_batches, eval_stream, limited_tokens, sliding_batches

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
    found += [f"{key}={value!r} is not a limit; {key} takes a number of tokens (a positive integer), a fraction of the "
              f"split (a number in (0, 1]) or null (the whole split)"
              for key in LIMIT_KEYS.values() if not valid_limit(value := OmegaConf.select(cfg, key, default=None))]
    stride, bptt = OmegaConf.select(cfg, "eval.lm_stride"), OmegaConf.select(cfg, "task.bptt")
    if (OmegaConf.select(cfg, "eval.lm_protocol") == "sliding" and isinstance(stride, int)
            and isinstance(bptt, int) and stride > bptt):
        found.append(f"eval.lm_stride={stride} is larger than task.bptt={bptt}: windows of {bptt} tokens starting "
                     f"{stride} apart would leave tokens unscored; set eval.lm_stride to at most {bptt} (null: half "
                     "of task.bptt)")
    return found


LIMIT_KEYS = {"valid": "eval.max_valid_tokens", "test": "eval.max_test_tokens"}  # split -> its limit's setting


def valid_limit(value) -> bool:
    """None, a positive integer (tokens) or a float in (0, 1] (a fraction of the split's tokens)."""
    if value is None:
        return True
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return value >= 1 if isinstance(value, int) else 0.0 < value <= 1.0


def limit_evaluation(task, eval_cfg) -> None:
    """Give ``task`` the evaluation limits of ``eval_cfg`` (``eval.max_valid_tokens``, ``eval.max_test_tokens``):
    what validation during training, the final evaluation and the influence analysis score of those splits."""
    get = eval_cfg.get if hasattr(eval_cfg, "get") else (lambda key, default=None: default)
    task.eval_limits = {split: get(key.split(".")[1], None) for split, key in LIMIT_KEYS.items()}


def limit_entry(task, split: str, evaluated: int, total: int) -> dict:
    """A split's metrics entries stating what was evaluated: ``tokens_evaluated``, ``tokens_total``, ``limited``,
    and when limited, the setting (``limit``) and a warning (logged too) that it is not a full evaluation."""
    entry = {"tokens_evaluated": int(evaluated), "tokens_total": int(total), "limited": evaluated < total}
    if entry["limited"]:
        key = LIMIT_KEYS.get(split, "the evaluation limit")
        entry["limit"] = f"{key}={task.eval_limits.get(split)}"
        entry["warning"] = (f"the {split} split was scored on its first {evaluated:,} of {total:,} tokens "
                            f"({entry['limit']}): not comparable with a full evaluation; set {key}=null to score "
                            "it whole")
        log.warning(entry["warning"])
    return entry


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
        return sliding_batches(eval_stream(task, split), task.bptt, protocol.stride_for(task.bptt), rows)
    if protocol.name == "carry":
        try:
            return carried_batches(eval_stream(task, split), task.bptt, protocol.streams)
        except ValueError as err:
            raise ValueError(f"the {split} split of task {task.name}: {err}; lower eval.lm_batch_size") from err
    return task.batches(split, max_tokens)


# Logits per block of the blocked loss (8 MiB in fp32). A language model's (tokens x vocabulary) logits are its
# largest tensor: a 512-token batch over WikiText-2's 33,278 words is 68 MB, and its log-softmax as much again.
# Tensors that large are fresh pages from the kernel at every batch (the allocator returns them to it), so
# evaluation spent as long in page faults as in arithmetic. In blocks, the head's output and its loss stay in the
# cache and in memory the allocator reuses.
BLOCK_LOGITS = 1 << 21


def _blocked_head(model) -> bool:
    """Whether ``model`` is a language model whose forward ends in a position-wise ``head`` method (the
    LanguageModel interface: ``forward = head(blocks(embed(tokens)))``)."""
    return getattr(model, "form", None) == "lm" and isinstance(getattr(type(model), "head", None), types.FunctionType)


def _hidden_states(model, call):
    """``call()`` with ``model.head`` left out: (its output with the head's input in place of the logits, the head),
    or None when the forward does not end in one call of the head."""
    head, seen = model.head, []

    def keep(h):
        seen.append(h)
        return h

    model.head = keep  # an instance attribute shadows the method for this one call
    try:
        out = call()
    finally:
        del model.head
    hidden = out[0] if isinstance(out, tuple) else out
    return (out, head) if len(seen) == 1 and hidden is seen[0] else None


def token_nll(head, hidden: torch.Tensor, target: torch.Tensor, ignore_index: int,
              block: int = BLOCK_LOGITS) -> torch.Tensor:
    """NLL (fp32 log-softmax, 0 where ``target`` is ``ignore_index``) of each position: ``head`` applied to
    ``hidden`` (B,T,D) a block of positions at a time -> (B,T)."""
    flat, goal = hidden.reshape(-1, hidden.size(-1)), target.reshape(-1)
    scored = goal != ignore_index
    where = None if bool(scored.all()) else scored.nonzero().squeeze(1)
    if where is not None:  # the head on the scored positions only (a probe scores a few: MQAR 4 of 64); 0 elsewhere
        flat, goal = flat[where], goal[where]
    nll = torch.empty(goal.shape, dtype=torch.float32, device=hidden.device)
    rows = max(1, block // head(flat[:1]).size(-1)) if len(flat) else 1  # positions per block: by the vocabulary
    for start in range(0, flat.size(0), rows):
        logits = head(flat[start : start + rows]).float()
        nll[start : start + rows] = F.cross_entropy(logits, goal[start : start + rows], ignore_index=ignore_index,
                                                    reduction="none")
    if where is None:
        return nll.view_as(target)
    out = torch.zeros(target.numel(), dtype=torch.float32, device=hidden.device)
    out[where] = nll
    return out.view_as(target)


def sequence_sums(model, batch, state=None, fallback=sequence_nll):
    """A batch's summed NLL and scored tokens per sequence (``fallback(logits, target, ignore_index)`` computes
    them from whole logits where the model has no separable head), and the carried state when ``state`` is given.

    A language model's head runs in blocks (:data:`BLOCK_LOGITS`): the same numbers, for about half the CPU time
    over a large vocabulary."""
    inputs = dict(batch.inputs, **({"state": state} if state is not None else {}))
    found = _hidden_states(model, lambda: model(**inputs)) if _blocked_head(model) else None
    if found is None:
        out = model(**inputs)
        logits, state = out if state is not None else (out, None)
        sums, counts = fallback(logits, batch.target, batch.ignore_index)
        return sums, counts, state
    out, head = found
    hidden, state = out if state is not None else (out, None)
    nll = token_nll(head, hidden, batch.target, batch.ignore_index)
    return nll.sum(1).tolist(), (batch.target != batch.ignore_index).sum(1).tolist(), state


@torch.no_grad()
def score(model, task, split: str, device, max_tokens: int, protocol: Protocol, check_stop=None) -> dict:
    """Summed NLL (``nll_sum``, nats, fp32 log-softmax), scored ``tokens``, ``mean_context``, the protocol, and
    each evaluated sequence's summed NLL and scored tokens (``chunk_nll``, ``chunk_tokens``: batch rows in order).

    Under an evaluation limit (:func:`limit_evaluation`) the split's stream is read up to it, and the result says so
    (:func:`limit_entry`). Progress is logged: the work at the start, every few seconds, the time at the end."""
    from .evaluate import Progress  # noqa: PLC0415 (evaluate imports this module)

    model.eval()
    count, context, offset, state, sums, counts = 0, 0, 0, None, [], []
    carry = protocol.name == "carry"
    todo = batches(task, split, max_tokens, protocol)
    total = len(task.streams[split]) - 1
    progress = Progress(f"{split} evaluation ({protocol.name})", sum(b.n_tokens for b in todo), "tokens")
    for batch in todo:
        if check_stop:  # a stop signal ends a long evaluation between two batches
            check_stop()
        batch = batch.to(device)
        if carry:
            state = model.init_state(batch.target.size(0), device) if state is None else state
        batch_sums, batch_counts, state = sequence_sums(model, batch, state if carry else None)
        count += batch.n_tokens
        sums += batch_sums
        counts += batch_counts
        read = offset + torch.arange(1, batch.target.size(1) + 1, device=device)  # tokens read at each position
        context += int(((batch.target != batch.ignore_index) * read).sum())
        offset += batch.target.size(1) if carry else 0
        progress.update(batch.n_tokens)
    progress.end()
    evaluated = min(total, limited_tokens(task, split, total))
    return {"nll_sum": sum(sums), "tokens": count, "mean_context": context / max(count, 1), "protocol": protocol.name,
            "protocol_settings": protocol.settings(task.bptt), "chunk_nll": sums, "chunk_tokens": counts,
            **({"unk_rate": round(task.unk_rate(eval_stream(task, split)[1:]), 6)} if hasattr(task, "unk_rate") else {}),
            **limit_entry(task, split, evaluated, total)}


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
