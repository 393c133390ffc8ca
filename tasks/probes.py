"""Long-range probes: language-model-form tasks whose answer sits exactly d positions back.

``delayed_copy`` is the copy-memory task (Hochreiter & Schmidhuber 1997; Arjovsky et al. 2016)
with a per-example delay; ``assoc_recall`` is associative recall (Ba et al. 2016). Each example
draws its distance d from ``distances``, so one trained model gives accuracy at every d
(``harness.analysis.probes.evaluate_probe``). Only answer positions carry loss; the others have the
target ``IGNORE`` (-100). The data depend only on ``data_seed``.

Token ids: ``BLANK`` 0 (also the padding of a batch: models are causal, so padding on the right
never reaches an answer), ``GO`` 1 (start of recall, or the query marker), then the symbols.

delayed_copy, k = ``n_copy`` symbols a_0..a_{k-1}, delay d >= k::

    position  0 .. k-1 | k .. d-1       | d   | d+1 .. d+k-1
    input     a_0..    | blanks (d - k) | GO  | blanks
    target    -100                      | a_0 | a_1 .. a_{k-1}      answer a_i at d + i reads input i: d back

assoc_recall, n = ``n_pairs`` pairs of distinct keys and values (disjoint id ranges), query pair j::

    position  0 .. 2n-1        | 2n .. 2n+g-1 | 2n+g  | 2n+g+1
    input     k_0 v_0 .. k_{n-1} v_{n-1} | blanks (g) | GO | k_j
    target    -100                                      | v_j     v_j is input 2j+1: d = 2(n-j) + g back

For a drawn d, j is uniform over the pairs that fit (2(n - j) <= d) and g = d - 2(n - j).
"""
from __future__ import annotations

import numpy as np
import torch

from .base import EvalContext
from .batching import Batch, token_budget_batches

SPLITS = ("train", "valid", "test")
BLANK, GO, FIRST_SYMBOL = 0, 1, 2
IGNORE = -100  # target id without loss (F.cross_entropy's default ignore_index)
NO_ANSWER = -1  # distance of a position that is not an answer


class ProbeTask:
    """Probe examples per split, served in length-bucketed token-budget batches; trained in the language-model
    form and evaluated by answer accuracy, overall and by distance."""

    family, form = "probe", "lm"
    metrics = ("accuracy",)

    def __init__(self, name: str, data: dict[str, dict[str, np.ndarray]], vocab_size: int, settings: dict):
        """``data[split]``: ``tokens``, ``target``, ``distance`` (N, T_max), right-padded, and ``length`` (N,)."""
        self.name, self.data, self.settings, self.vocab_size = name, data, settings, vocab_size

    def vocab(self) -> dict[str, int]:
        return {"lm": self.vocab_size}

    def describe(self) -> dict:
        return {"name": self.name, "family": self.family, "form": self.form, "metrics": list(self.metrics),
                "vocab": self.vocab_size,
                "distances": sorted(self.settings["distances"]), "settings": self.settings,
                "examples": {s: len(d["length"]) for s, d in self.data.items()},
                "answers": {s: self.n_predicted(s) for s in self.data}}

    def data_arrays(self) -> dict[str, list]:
        return {s: [d[k] for k in sorted(d)] for s, d in self.data.items()}  # the generated arrays

    def n_predicted(self, split: str) -> int:
        """Answer positions (the only scored targets) in a split."""
        return int((self.data[split]["target"] != IGNORE).sum())

    def validate(self, model, ctx: EvalContext) -> dict:
        return {"valid_accuracy": self.evaluate(model, "valid", ctx)[0]["accuracy"]}

    def evaluate(self, model, split: str, ctx: EvalContext) -> tuple[dict, dict]:
        """Greedy answer accuracy, overall and by distance (harness/analysis/probes.py); no files."""
        from seqbench.harness.analysis.probes import evaluate_probe  # noqa: PLC0415 (the harness evaluates; see __init__)
        return evaluate_probe(model, self, split, ctx.device, ctx.max_tokens, ctx.check_stop), {}

    def batches(self, split: str, max_tokens: int, epoch: int = 0, shuffle: bool = False, seed: int = 0) -> list[Batch]:
        lengths = self.data[split]["length"]
        if lengths.max() > max_tokens:
            raise ValueError(f"task {self.name}: an example of {lengths.max()} tokens exceeds max_tokens={max_tokens}; "
                             "raise trainer.max_tokens or lower task.distances")
        groups = token_budget_batches(lengths, lengths - 1, max_tokens, shuffle, seed, epoch)
        return [self._batch(split, idx) for idx in groups]

    def _batch(self, split: str, index: list[int]) -> Batch:
        tokens, target = self._stack(split, index, "tokens"), self._stack(split, index, "target")
        return Batch({"tokens": tokens}, target, int((target != IGNORE).sum()), index, ignore_index=IGNORE)

    def distances(self, split: str, index: list[int]) -> torch.Tensor:
        """(B,T) answer distance of each target of the batch of examples ``index`` (``NO_ANSWER`` elsewhere)."""
        return self._stack(split, index, "distance")

    def _stack(self, split: str, index: list[int], field: str) -> torch.Tensor:
        d = self.data[split]
        return torch.from_numpy(d[field][index, : d["length"][index].max()].astype(np.int64))  # (B,T)


# ---------------------------------------------------------------- examples

def _blank(length: np.ndarray) -> dict[str, np.ndarray]:
    """Arrays of N examples of the given lengths, all BLANK inputs, no answers."""
    shape = (len(length), int(length.max()))
    return {"tokens": np.full(shape, BLANK, np.int32), "target": np.full(shape, IGNORE, np.int32),
            "distance": np.full(shape, NO_ANSWER, np.int32), "length": length.astype(np.int64)}


def copy_examples(symbols: np.ndarray, delay: np.ndarray) -> dict[str, np.ndarray]:
    """Copy-memory examples from symbols (N,k) and delays (N,): GO at position d, answer i at d + i.

    Returns ``tokens``, ``target``, ``distance`` (N, T_max) and ``length`` (N,) = d + k.
    """
    n, k = symbols.shape
    out, rows = _blank(delay + k), np.arange(n)
    out["tokens"][:, :k] = symbols
    out["tokens"][rows, delay] = GO
    answer = delay[:, None] + np.arange(k)  # (N,k) positions of the answers
    out["target"][rows[:, None], answer] = symbols
    out["distance"][rows[:, None], answer] = delay[:, None]
    return out


def recall_examples(keys: np.ndarray, values: np.ndarray, query: np.ndarray, gap: np.ndarray) -> dict[str, np.ndarray]:
    """Associative-recall examples from keys, values (N,n), queried pair (N,) and gap of blanks (N,).

    Returns ``tokens``, ``target``, ``distance`` (N, T_max) and ``length`` (N,) = 2n + gap + 2.
    """
    n_ex, n = keys.shape
    rows = np.arange(n_ex)
    out = _blank(2 * n + gap + 2)
    last = out["length"] - 1  # (N,) the query's position
    out["tokens"][:, 0 : 2 * n : 2], out["tokens"][:, 1 : 2 * n : 2] = keys, values
    out["tokens"][rows, last - 1], out["tokens"][rows, last] = GO, keys[rows, query]
    out["target"][rows, last] = values[rows, query]
    out["distance"][rows, last] = last - (2 * query + 1)
    return out


def _check_distances(distances: list[int], least: int, what: str) -> list[int]:
    distances = [int(d) for d in distances]
    if not distances or min(distances) < least:
        raise ValueError(f"task.distances={distances}: {what} needs a non-empty list of distances >= {least}")
    return distances


def _sizes(n_train: int, n_valid: int, n_test: int) -> dict[str, int]:
    sizes = {"train": n_train, "valid": n_valid, "test": n_test}
    bad = {s: n for s, n in sizes.items() if n < 1}
    if bad:
        raise ValueError(f"every split needs at least one example; got {bad} (task.n_<split>)")
    return sizes


# ---------------------------------------------------------------- builders

def delayed_copy(root=None, cache_dir=None, *, n_train: int = 20000, n_valid: int = 500, n_test: int = 1000,
                 n_symbols: int = 8, n_copy: int = 4, distances: list[int] = (4, 8, 16, 32, 64),
                 data_seed: int = 1234) -> ProbeTask:
    """Copy ``n_copy`` random symbols after a delay d drawn from ``distances`` (each >= n_copy)."""
    if n_symbols < 2 or n_copy < 1:
        raise ValueError(f"delayed_copy needs n_symbols >= 2 and n_copy >= 1; got {n_symbols}, {n_copy}")
    distances = _check_distances(distances, n_copy, f"delayed_copy with n_copy={n_copy}")
    rng = np.random.default_rng(data_seed)
    data = {}
    for split, n in _sizes(n_train, n_valid, n_test).items():
        delay = rng.choice(distances, size=n)
        symbols = rng.integers(FIRST_SYMBOL, FIRST_SYMBOL + n_symbols, size=(n, n_copy))
        data[split] = copy_examples(symbols, delay)
    settings = {"n_symbols": n_symbols, "n_copy": n_copy, "distances": distances, "data_seed": data_seed}
    return ProbeTask("delayed_copy", data, FIRST_SYMBOL + n_symbols, settings)


def assoc_recall(root=None, cache_dir=None, *, n_train: int = 20000, n_valid: int = 500, n_test: int = 1000,
                 n_keys: int = 16, n_values: int = 16, n_pairs: int = 4, distances: list[int] = (4, 8, 16, 32, 64),
                 data_seed: int = 1234) -> ProbeTask:
    """Recall the value of a queried key; the value sits d back, d drawn from ``distances`` (each >= 2)."""
    if not 1 <= n_pairs <= n_keys or n_values < 2:
        raise ValueError(f"assoc_recall needs 1 <= n_pairs <= n_keys (distinct keys) and n_values >= 2; got "
                         f"n_pairs={n_pairs}, n_keys={n_keys}, n_values={n_values}")
    distances = _check_distances(distances, 2, "assoc_recall (the last pair's value is 2 back from the query)")
    rng = np.random.default_rng(data_seed)
    data = {}
    for split, n in _sizes(n_train, n_valid, n_test).items():
        d = rng.choice(distances, size=n)
        keys = FIRST_SYMBOL + rng.random((n, n_keys)).argsort(1)[:, :n_pairs]  # distinct keys per example
        values = FIRST_SYMBOL + n_keys + rng.integers(0, n_values, size=(n, n_pairs))
        low = np.maximum(0, n_pairs - d // 2)  # the pairs that fit: 2(n - j) <= d
        query = low + (rng.random(n) * (n_pairs - low)).astype(np.int64)
        data[split] = recall_examples(keys, values, query, d - 2 * (n_pairs - query))
    settings = {"n_keys": n_keys, "n_values": n_values, "n_pairs": n_pairs, "distances": distances,
                "data_seed": data_seed}
    return ProbeTask("assoc_recall", data, FIRST_SYMBOL + n_keys + n_values, settings)
