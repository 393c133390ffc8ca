"""Influence by distance: how strongly a trained language model's output at position i responds to its input at j.

For sampled output positions i with a scored target, the gradient of log p(target_i) with respect
to the input embedding x_j (the output of ``model.embed``, positions included) is taken for every
j <= i; its L2 norm is averaged over the samples with the same distance i - j. Positions j > i are
not counted (a causal model gives them zero). Nothing here knows an architecture: it uses the
``LanguageModel`` interface (``forward = head(blocks(embed(tokens)))``) as ``harness.analysis.path_length``
does, with ``embed`` replaced by a leaf tensor and the position-wise ``head`` run only at the sampled
positions (over a large vocabulary it would cost the most). Eval mode (dropout off).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..train import Interrupted

log = logging.getLogger("seqbench")


def forward_from_embeddings(model: nn.Module, tokens: torch.Tensor, x: torch.Tensor,
                            rows: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
    """``model(tokens)`` itself with ``embed(tokens)`` replaced by x (B,T,D), so that gradients reach x; with
    ``rows``/``positions`` its (position-wise) head runs only at (rows[p], positions[p]) and the logits are
    (1,P,V) (the head over every position would cost the most). The path-length analysis uses it too.

    Raises TypeError when the model's forward is not ``head(blocks(embed(tokens)))`` (the LanguageModel interface).
    """
    called, head = [], model.head

    def embed(_tokens):
        called.append("embed")
        return x

    def selected_head(h):  # (B,T,D) -> (1,P,V)
        called.append("head")
        return head(h if rows is None else h[rows, positions][None])

    model.embed, model.head = embed, selected_head  # instance attributes shadow the methods for this one call
    try:
        logits = model(tokens)
    finally:
        del model.embed, model.head
    if called != ["embed", "head"]:
        raise TypeError(f"{type(model).__name__}.forward does not compute head(blocks(embed(tokens))) "
                        f"(calls: {called}); the analysis needs the LanguageModel interface")
    return logits


def _sample(batches: list, n_positions: int, generator: torch.Generator) -> dict[tuple[int, int], list[int]]:
    """Up to ``n_positions`` scored positions drawn uniformly over all batches: {(batch, row): [position, ...]}."""
    masks = [batch.target != batch.ignore_index for batch in batches]  # (B,T) each
    sizes = torch.tensor([int(m.sum()) for m in masks])
    starts = sizes.cumsum(0) - sizes
    chosen = torch.randperm(int(sizes.sum()), generator=generator)[:n_positions]
    picks: dict[tuple[int, int], list[int]] = {}
    for k, mask in enumerate(masks):
        local = chosen[(chosen >= starts[k]) & (chosen < starts[k] + sizes[k])].sort().values - starts[k]
        for b, i in mask.nonzero()[local].tolist():
            picks.setdefault((k, b), []).append(i)
    return picks


def _stack(rows: list[torch.Tensor], fill: int) -> torch.Tensor:
    """(R,T) from 1-D tensors, right-padded with ``fill`` (harmless after the last position of a causal model)."""
    out = torch.full((len(rows), max(len(r) for r in rows)), fill, dtype=rows[0].dtype)
    for r, row in enumerate(rows):
        out[r, : len(row)] = row
    return out


def influence_by_distance(model: nn.Module, task, split: str, device, *, max_tokens: int, n_positions: int = 64,
                          max_rows: int = 8, seed: int = 0, check_stop=None) -> list[dict]:
    """Mean gradient norm of the output at i w.r.t. the input embedding at j, by distance i - j.

    Args:
        model: a causal ``LanguageModel``; its training flag is restored afterwards.
        task: a language-model-form task (``batches(split, max_tokens)``; targets equal to the batch's
            ``ignore_index`` are never sampled).
        n_positions: output positions sampled uniformly (seeded) among the split's scored ones; only the
            sequences holding them are run, ``max_rows`` at a time.
    Returns:
        [{"distance": d, "grad_norm": mean ||d log p(target_i) / d x_{i-d}||, "n": samples}, ...] by d.
    """
    was_training = model.training
    model.eval()
    try:
        return _influence(model, task.batches(split, max_tokens), device, n_positions, max_rows, seed, check_stop)
    finally:
        model.train(was_training)


def _influence(model: nn.Module, batches: list, device, n_positions: int, max_rows: int, seed: int,
               check_stop=None) -> list[dict]:
    """The body of :func:`influence_by_distance`, on an eval-mode model and the split's batches."""
    from seqbench.harness.evaluate import Progress  # noqa: PLC0415 (the evaluation's progress lines)

    picks = list(_sample(batches, n_positions, torch.Generator().manual_seed(seed)).items())
    progress = Progress("influence analysis", sum(len(positions) for _, positions in picks), "positions")
    total, count = torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    # cuDNN RNNs have no backward pass in eval mode; the native kernels compute the same gradients
    with torch.backends.cudnn.flags(enabled=False):
        for c in range(0, len(picks), max_rows):
            chunk = picks[c : c + max_rows]
            tokens = _stack([batches[k].inputs["tokens"][b] for (k, b), _ in chunk], 0).to(device)  # (R,T)
            target = _stack([batches[k].target[b].clamp(min=0) for (k, b), _ in chunk], 0).to(device)
            with torch.no_grad():
                x = model.embed(tokens)  # (R,T,D)
            x.requires_grad_(True)
            chosen = [(r, i) for r, (_, positions) in enumerate(chunk) for i in positions]
            r_idx, i_idx = (torch.tensor(v, device=device) for v in zip(*chosen))
            logp = F.log_softmax(forward_from_embeddings(model, tokens, x, r_idx, i_idx)[0].float(), -1)  # (P,V)
            score = logp.gather(-1, target[r_idx, i_idx][:, None])[:, 0]  # (P,): log p(target) at each pick
            for round_ in _rounds(list(enumerate(chosen))):  # each row once: rows are independent
                if check_stop:
                    check_stop()
                grad, = torch.autograd.grad(score[[p for p, _ in round_]].sum(), x, retain_graph=True)  # (R,T,D)
                norms = grad.norm(dim=-1).double().cpu()  # (R,T)
                for _, (r, i) in round_:
                    total, count = _accumulate(total, count, norms[r, : i + 1].flip(0))  # index d = i - j
                progress.update(len(round_))
    progress.end()
    return [{"distance": d, "grad_norm": (total[d] / count[d]).item(), "n": int(count[d])}
            for d in torch.nonzero(count)[:, 0].tolist()]


def _rounds(picks: list[tuple[int, tuple[int, int]]]) -> list[list[tuple[int, tuple[int, int]]]]:
    """Split (pick, (row, position)) pairs into groups with each row at most once (one backward pass per group)."""
    rounds: list[list] = []
    seen: dict[int, int] = {}
    for pick in picks:
        row = pick[1][0]
        n = seen.get(row, 0)
        seen[row] = n + 1
        if n == len(rounds):
            rounds.append([])
        rounds[n].append(pick)
    return rounds


def _accumulate(total: torch.Tensor, count: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Add ``values[d]`` to ``total[d]`` and one to ``count[d]``, growing both as needed."""
    n = max(len(total), len(values))
    total = F.pad(total, (0, n - len(total)))
    count = F.pad(count, (0, n - len(count)))
    total[: len(values)] += values
    count[: len(values)] += 1
    return total, count


def job_entry(model: nn.Module, task, cfg, device, check_stop=None) -> dict:
    """``{"analysis": {"influence_by_distance": [...], ...}}`` for a job's record, or {} when not applicable.

    Runs for language-model-form tasks (language modelling, probes) when ``eval.influence`` is true,
    on the valid split; translation is skipped. A failure is recorded, not raised: the trained
    model's metrics stay. ``check_stop()`` runs before every gradient round and raises to end the analysis early (a
    stop signal): that is raised, not recorded.
    """
    if task.form != "lm" or not cfg.eval.get("influence", False):
        return {}
    settings = {"split": "valid", "output": "log p(target)", "n_positions": 64, "max_rows": 8, "seed": int(cfg.seed)}
    limit = (getattr(task, "eval_limits", None) or {}).get("valid")
    if limit is not None:  # positions drawn from the part of the split evaluation reads (eval.max_valid_tokens)
        settings["max_valid_tokens"] = limit
    try:
        rows = influence_by_distance(model, task, "valid", device, max_tokens=cfg.trainer.max_tokens,
                                     check_stop=check_stop,
                                     **{k: settings[k] for k in ("n_positions", "max_rows", "seed")})
        return {"analysis": {"influence_by_distance": rows, "influence_settings": settings}}
    except Interrupted:
        raise
    except Exception as err:
        log.warning("influence analysis failed: %s: %s", type(err).__name__, err)
        return {"analysis": {"influence_by_distance": None, "influence_settings": settings,
                             "error": f"{type(err).__name__}: {err}"}}
