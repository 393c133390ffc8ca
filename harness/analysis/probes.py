"""Evaluation of the long-range probes (tasks/probes.py): answer accuracy overall and by distance."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..evaluate import perplexity
from ..loss import training_logits


def accuracy_by_distance(predicted: torch.Tensor, target: torch.Tensor, distance: torch.Tensor,
                         ignore_index: int = -100) -> list[dict]:
    """Accuracy of the answers grouped by their distance.

    Args:
        predicted: (N,) or (B,T) predicted token ids.
        target: same shape; positions equal to ``ignore_index`` are not answers.
        distance: same shape; the answer's distance (how far back it sits in the input).
    Returns:
        [{"distance": d, "accuracy": correct / n, "n": n}, ...] sorted by d, one row per distance present.
    """
    answer = target != ignore_index
    d, hit = distance[answer].long(), (predicted[answer] == target[answer]).long()
    if (d < 0).any():
        raise ValueError("an answer position has no distance (negative); the task's distance grid and targets disagree")
    n = torch.bincount(d)
    correct = torch.bincount(d, weights=hit.double(), minlength=len(n))
    return [{"distance": k, "accuracy": correct[k].item() / n[k].item(), "n": int(n[k])}
            for k in torch.nonzero(n)[:, 0].tolist()]


@torch.no_grad()
def evaluate_probe(model, task, split: str, device, max_tokens: int, check_stop=None) -> dict:
    """Greedy (argmax) answer accuracy of a language model on a probe split, overall and by distance.

    Returns ``{"accuracy", "accuracy_by_distance": [{"distance", "accuracy", "n"}, ...], "nll",
    "perplexity", "tokens"}``; nll and perplexity are per answer token.
    """
    model.eval()
    predicted, targets, distances, nll = [], [], [], 0.0
    for batch in task.batches(split, max_tokens):
        if check_stop:  # a stop signal ends the evaluation (raises)
            check_stop()
        dist = task.distances(split, batch.index)  # (B,T)
        batch = batch.to(device)
        answer = batch.target != batch.ignore_index
        # the output head on the answer positions only where few are scored (MQAR: 4 of 64), as in training
        logits, target = training_logits(model, batch)
        if logits.dim() == 3:  # the full forward: (B,T,V)
            logits, target = logits[answer], target[answer]
        logits = logits.float()  # (answers, V), in the row-major order of ``answer``
        nll += F.cross_entropy(logits, target, reduction="sum").item()
        predicted.append(logits.argmax(-1).cpu())
        targets.append(target.cpu())
        distances.append(dist[answer.cpu()])
    predicted, targets, distances = torch.cat(predicted), torch.cat(targets), torch.cat(distances)
    count = len(targets)
    mean_nll = nll / max(count, 1)
    return {"accuracy": (predicted == targets).double().mean().item() if count else float("nan"),
            "accuracy_by_distance": accuracy_by_distance(predicted, targets, distances),
            "nll": mean_nll, "perplexity": perplexity(mean_nll), "tokens": count}
