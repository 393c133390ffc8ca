"""Cost measurements: training FLOPs through torch's FLOP counter."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode


def train_flops_per_token(model, batch) -> float:
    """FLOPs of one forward+backward on ``batch`` (torch's counter: matmuls, convs, attention), per target token."""
    was_training, rng = model.training, torch.get_rng_state()
    model.train()
    with FlopCounterMode(display=False) as counter:
        logits = model(**batch.inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch.target.flatten(), ignore_index=batch.ignore_index)
        loss.backward()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    torch.set_rng_state(rng)  # measuring must not change the run's random stream
    return counter.get_total_flops() / max(1, batch.n_tokens)
