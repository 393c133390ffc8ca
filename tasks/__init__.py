"""Tasks: data, vocabularies and batches, behind one interface (``tasks.base.Task``); the registry builds each
task by ``build(cfg, data_cfg)``.

May import numpy, torch, sentencepiece and the torch-free ``harness.metrics``; never ``models`` (the special
token ids live here, in ``tasks.vocab``). A task's ``evaluate`` calls the harness's decoding and scoring when it
runs (imported there), so importing ``tasks`` loads neither.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import lm, probes, synthetic, translation, zoology
from .data import DataError, data_root

TASKS = {
    "multi30k": translation.multi30k,
    "wmt14_en_de": translation.wmt14_en_de,
    "parallel_files": translation.parallel_files,
    "wikitext2": lm.wikitext2,
    "wikitext103": lm.wikitext103,
    "ptb": lm.ptb,
    "text_files": lm.text_files,
    "copy": synthetic.copy,
    "reverse": synthetic.reverse,
    "delayed_copy": probes.delayed_copy,
    "assoc_recall": probes.assoc_recall,
    **{name: getattr(zoology, name) for name in ("mqar", *zoology.MAD_TASKS)},
}

__all__ = ["TASKS", "DataError", "build"]


def build(cfg: Mapping[str, Any], data_cfg: Mapping[str, Any] | None = None):
    """Build the task named by ``cfg['name']``.

    Args:
        cfg: the task config (``name`` plus the builder's keyword arguments).
        data_cfg: ``root`` (default $SEQBENCH_DATA_ROOT, else ./data), ``cache_dir`` (default
            ``<root>/cache``) and ``download`` (fetch missing public files).
    """
    cfg, data_cfg = dict(cfg), dict(data_cfg or {})
    name = cfg.pop("name")
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    fn = TASKS[name]
    valid = [n for n, p in inspect.signature(fn).parameters.items() if p.kind == p.KEYWORD_ONLY]
    unknown = sorted(set(cfg) - set(valid))
    if unknown:
        raise TypeError(f"task {name} does not take {unknown}; valid settings: {', '.join(valid)}")
    root = data_root(data_cfg.get("root"))
    cache = Path(data_cfg.get("cache_dir") or root / "cache")
    if "download" in valid:
        cfg.setdefault("download", bool(data_cfg.get("download", True)))
    return fn(root, cache, **cfg)
