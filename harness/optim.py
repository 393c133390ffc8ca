"""The trainer's optimizers: Adam, AdamW, SGD (momentum, Nesterov's accelerated gradient), and Adam then SGD.

``trainer.optimizer``:

- ``adam``: Adam at ``lr`` with ``betas``, ``eps``, ``weight_decay`` (Vaswani et al.; Kalchbrenner et al.); the
  decay is an L2 term added to the gradient, so Adam's normalisation scales it with the gradient's history;
- ``adamw``: Adam with decoupled weight decay (Loshchilov & Hutter 2019): each step also shrinks the weights by
  ``lr x weight_decay``, whatever the gradient (MAD's and Zoology's protocols, today's language models);
- ``sgd``: SGD at ``lr`` with ``momentum``, ``nesterov`` and ``weight_decay`` (Gehring et al.: Nesterov's
  accelerated gradient with momentum 0.99);
- ``adam_then_sgd``: Adam at ``lr`` for the first ``switch_step`` steps, then SGD at ``sgd_lr`` (Wu et al.
  2016, section 8.1: Adam speeds up the start, Adam alone ends at a worse point than Adam then SGD).

The schedule (``harness.train.lr_factor``) multiplies the learning rate of whichever optimizer runs. The
trainer builds the optimizer of the phase a step falls in (:func:`phase`): at the start, at the switch, and
when it resumes a run past the switch, so a checkpoint always holds the state of the optimizer that wrote it.
"""
from __future__ import annotations

import torch

OPTIMIZERS = ("adam", "adamw", "sgd", "adam_then_sgd")


def phase(cfg, step: int) -> tuple[str, int]:
    """The optimizer (``adam`` or ``sgd``) that takes optimizer step ``step`` (0-based) and its phase's first step."""
    if cfg.optimizer == "adam_then_sgd":
        return ("sgd", cfg.switch_step) if step >= cfg.switch_step else ("adam", 0)
    return cfg.optimizer, 0


def build(params, cfg, device: torch.device, kind: str) -> torch.optim.Optimizer:
    """The optimizer ``kind`` (a :func:`phase`) over ``params`` with the trainer's settings ``cfg``."""
    if kind in ("adam", "adamw"):
        return adam(params, cfg, device, decoupled=kind == "adamw")
    if kind != "sgd":
        raise ValueError(f"trainer.optimizer={cfg.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    lr = cfg.sgd_lr if cfg.optimizer == "adam_then_sgd" else cfg.lr
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def adam(params, cfg, device: torch.device, decoupled: bool = False) -> torch.optim.Adam:
    """Adam (``decoupled``: AdamW) with the trainer's settings, fused on CPU and CUDA: one pass per tensor over
    weight, gradient and both moments, where the unfused CPU update makes about seven (and allocates), cheap in
    flops but a larger share of the step the faster the model's own work gets (bf16)."""
    kind = torch.optim.AdamW if decoupled else torch.optim.Adam
    return kind(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                fused=device.type in ("cpu", "cuda"))


def check(cfg) -> None:
    """Raise ValueError naming the setting when the optimizer's settings do not fit together."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"trainer.optimizer={cfg.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    switching = cfg.optimizer == "adam_then_sgd"
    if switching and (cfg.switch_step is None or cfg.sgd_lr is None):
        raise ValueError("trainer.optimizer=adam_then_sgd needs trainer.switch_step (Adam takes that many steps, SGD "
                         "the rest) and trainer.sgd_lr (SGD's learning rate; trainer.lr is Adam's), e.g. "
                         "switch_step=60000 sgd_lr=0.5 as in Wu et al. 2016")
    if not switching and (cfg.switch_step is not None or cfg.sgd_lr is not None):
        raise ValueError(f"trainer.switch_step and trainer.sgd_lr apply to trainer.optimizer=adam_then_sgd only, "
                         f"not {cfg.optimizer}; set them to null, or set trainer.optimizer=adam_then_sgd")
    if cfg.optimizer in ("adam", "adamw") and (cfg.momentum or cfg.nesterov):
        raise ValueError("trainer.momentum and trainer.nesterov apply to SGD only (trainer.optimizer=sgd or "
                         "adam_then_sgd); Adam's moments are trainer.betas")
    if cfg.nesterov and not cfg.momentum:
        raise ValueError("trainer.nesterov=true needs a trainer.momentum above 0 (Gehring et al.: 0.99)")
