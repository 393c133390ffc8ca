"""One job: build the task and model, train, evaluate, and write the result record."""
from __future__ import annotations

import logging
import os
import random
import signal
import traceback
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import models
import tasks

from . import checkpoint, record
from .evaluate import evaluate_lm, evaluate_translation
from .profile import train_flops_per_token
from .tracking import make_tracker
from .train import Interrupted, TrainConfig, Trainer

log = logging.getLogger("seqbench")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} but CUDA is not available; use device=cpu or device=auto")
    return device


def job_name(cfg: DictConfig) -> str:
    return f"{cfg.model.name}-{cfg.model.get('preset', 'custom')}_{cfg.task.name}_s{cfg.seed}"


class StopFlag:
    """Set by SIGTERM/SIGUSR1 (SLURM time limit, preemption): the loop saves and stops at the next step."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                signal.signal(sig, self.set)
            except ValueError:  # not the main thread
                pass

    def set(self, signum, frame):
        self.signal = signum

    def __call__(self) -> bool:
        return self.signal is not None


def evaluate(model, task, cfg: DictConfig, device) -> tuple[dict, dict]:
    """Metrics per split, plus hypotheses (translation) for the output folder."""
    metrics, outputs = {}, {}
    for split in cfg.eval.splits:
        if task.family == "translation":
            metrics[split], outputs[split] = evaluate_translation(
                model, task, split, device, OmegaConf.to_container(cfg.eval.decoding))
        else:
            metrics[split] = evaluate_lm(model, task, split, device, cfg.trainer.max_tokens)
    return metrics, outputs


def run(cfg: DictConfig, out_dir: str | Path, *, sweep: str | None = None, raise_errors: bool = True) -> dict:
    """Train and evaluate one model on one task; the record is written to ``out_dir/record.json``.

    Whatever happens, a record is written: status ``ok``, ``failed`` (with the error)
    or ``interrupted`` (resume by running the same command in the same folder).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / record.RECORD_NAME
    resolved = OmegaConf.to_container(cfg, resolve=True)
    name = job_name(cfg)
    rec = {"status": "running", "error": None, "seed": cfg.seed, "config": resolved,
           "job": {"name": name, "sweep": sweep or cfg.get("sweep_name"), "output_dir": str(out_dir),
                   "started": record.now(), "finished": None, "slurm_job_id": _slurm_id()}}
    tracker = None
    try:
        device = pick_device(cfg.device)
        rec["environment"] = record.environment(device)
        record.write(path, rec)
        if cfg.trainer.get("threads"):
            torch.set_num_threads(int(cfg.trainer.threads))
        random.seed(cfg.seed), np.random.seed(cfg.seed), torch.manual_seed(cfg.seed)
        train_cfg = TrainConfig(**OmegaConf.to_container(cfg.trainer, resolve=True))
        task = tasks.build(OmegaConf.to_container(cfg.task, resolve=True), OmegaConf.to_container(cfg.data))
        rec["task"] = task.describe()
        model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
        model = models.build(model_cfg, task)
        rec["model"] = {"name": cfg.model.name, "preset": cfg.model.get("preset"), "form": model.form,
                        "paper": cfg.model.get("paper"), "parameters": models.count_parameters(model)}
        identity = {"model": model_cfg, "task": rec["task"]["name"], "vocab": _vocab(task)}
        tracker = make_tracker(OmegaConf.to_container(cfg.logger), name=name, group=rec["job"]["sweep"],
                               config=resolved, out_dir=str(out_dir))
        trainer = Trainer(model, task, train_cfg, out_dir, device, seed=cfg.seed, identity=identity,
                          tracker=tracker, decoding=OmegaConf.to_container(cfg.eval.decoding), should_stop=StopFlag())
        first = task.batches("train", train_cfg.max_tokens, epoch=0, shuffle=True, seed=cfg.seed)[0].to(device)
        flops_per_token = train_flops_per_token(model, first)
        progress = trainer.fit()
        which = cfg.eval.checkpoint
        if which not in ("best", "last"):
            raise ValueError(f"eval.checkpoint={which!r}; valid: best, last")
        model.load_state_dict(checkpoint.load(out_dir / f"{which}.pt", identity)["model"])
        metrics, outputs = evaluate(model, task, cfg, device)
        for split, hyps in outputs.items():
            (out_dir / f"{split}.hyp").write_text("\n".join(hyps) + "\n", encoding="utf-8")
        rec.update(status="ok", metrics=metrics, resumed_from_step=trainer.resumed_from,
                   skipped_steps=progress.skipped_steps,
                   curves={"train": progress.log, "valid": progress.evals},
                   costs=_costs(progress, metrics, flops_per_token, device))
        tracker.summary({"record": rec})
    except (Interrupted, KeyboardInterrupt) as err:
        rec.update(status="interrupted", error=f"{type(err).__name__}: {err}")
        raise
    except Exception as err:
        rec.update(status="failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        log.error("job %s failed: %s", name, rec["error"])
        if raise_errors:
            raise
    finally:
        rec["job"]["finished"] = record.now()
        record.write(path, rec)
        if tracker is not None:
            tracker.finish(exit_code=0 if rec["status"] == "ok" else 1)
    _print_summary(rec)
    return rec


def _vocab(task) -> dict:
    if task.family == "translation":
        return {"src": task.src_vocab_size, "tgt": task.tgt_vocab_size}
    return {"lm": task.vocab_size}


def _slurm_id() -> str | None:
    """The SLURM job id (``<array job>_<task>`` inside an array), or None outside SLURM."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    return os.environ.get("SLURM_JOB_ID")


def _costs(progress, metrics, flops_per_token, device) -> dict:
    decode = [m["sentences_per_second"] for m in metrics.values() if "sentences_per_second" in m]
    return {"train_seconds": progress.train_seconds, "steps": progress.step, "epochs": progress.epoch,
            "tokens": progress.tokens, "train_tokens_per_second": progress.tokens / max(progress.train_seconds, 1e-9),
            "decode_sentences_per_second": decode[-1] if decode else None,
            "flops_per_token": flops_per_token, "train_flops": flops_per_token * progress.tokens,
            **record.peak_memory_bytes(device)}


def _print_summary(rec: dict) -> None:
    m = rec.get("metrics", {}).get("test", {})
    score = f"BLEU {m['bleu']:.2f} chrF {m['chrf']:.2f}" if "bleu" in m else (
        f"ppl {m['perplexity']:.2f}" if "perplexity" in m else "")
    c = rec.get("costs", {})
    print(f"[seqbench] {rec['job']['name']}: {rec['status']} | test {score} | "
          f"{c.get('train_seconds', 0):.0f}s train, {c.get('steps', 0)} steps | {rec['job']['output_dir']}")
