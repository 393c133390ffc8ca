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

from . import checkpoint, distributed, record, settings
from .analysis import influence
from . import metrics as scoring
from .evaluate import check_converged, evaluate_lm, evaluate_translation
from .io import FolderLock
from .precision import choose_threads, resolve_precision
from .analysis.probes import evaluate_probe
from .profile import CONVENTION as FLOPS_CONVENTION
from .profile import sample_batches, train_flops_per_token
from .tracking import job_tags, make_tracker
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
    """Set by SIGTERM/SIGUSR1 (SLURM time limit, preemption, ``scontrol requeue``): the loop saves and stops at the next step.

    Inside a submitit job on SLURM it also takes submitit's timeout signal (USR2, ``$SUBMITIT_PREEMPT_SIGNAL``),
    whose handler would otherwise requeue the job mid-step without saving; that handler is kept and run by
    :meth:`hand_over` once ``last.pt`` is saved.
    """

    def __init__(self):
        self.signal = None
        self._chained = {}  # signal -> submitit's handler, run after the checkpoint is saved
        self._requeue_on = None
        submitit_sig = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
        for sig in dict.fromkeys(s for s in (signal.SIGTERM, signal.SIGUSR1, submitit_sig) if s is not None):
            previous = signal.getsignal(sig)
            if isinstance(getattr(previous, "__self__", None), StopFlag):  # the flag of an earlier job
                self.signal = self.signal or previous.__self__.signal  # a stop that came after that job's last check
                previous = previous.__self__._chained.get(sig)
            chain = sig == submitit_sig and callable(previous)
            if sig not in (signal.SIGTERM, signal.SIGUSR1) and not chain:
                continue  # submitit's signal outside a submitit job: left alone
            try:
                signal.signal(sig, self.set)
            except ValueError:  # not the main thread
                continue
            if chain:
                self._chained[sig] = previous

    def set(self, signum, frame):
        self.signal = signum
        if signum in self._chained:
            self._requeue_on = signum

    def __call__(self) -> bool:
        return self.signal is not None

    def check(self, during: str):
        """A ``check_stop`` for evaluation, which runs after training: it raises :class:`Interrupted` once stopped."""
        def check():
            if self.signal is not None:
                raise Interrupted(f"stopped by {signal.Signals(self.signal).name} {during}; training is complete "
                                  "(checkpoints kept): rerun the same command in the same folder to evaluate")
        return check

    def hand_over(self) -> None:
        """After a stop on a signal, with ``last.pt`` saved and the record written: leave the rest to the requeued job.

        Only inside a submitit job on SLURM (else it returns). On submitit's signal its handler resubmits the
        same job and requeues it (``scontrol requeue``) and exits. On SIGTERM SLURM has already requeued the job
        (``scontrol requeue``, preemption) or cancelled it, so the process exits without a result, and the
        launcher waits for the requeued run, which resumes from ``last.pt``.
        """
        if self.signal is None or os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or not os.environ.get("SLURM_JOB_ID"):
            return
        if self._requeue_on is not None:
            self._chained[self._requeue_on](self._requeue_on, None)  # submitit: checkpoint, requeue, sys.exit
        raise SystemExit(f"stopped by {signal.Signals(self.signal).name} with last.pt saved; "
                         f"SLURM job {_slurm_id()} resumes from it if requeued")


def evaluate(model, task, cfg: DictConfig, device, precision: str = "fp32",
             stop: StopFlag | None = None) -> tuple[dict, dict]:
    """Metrics per split, plus hypotheses (translation) for the output folder; probes add accuracy by distance.

    Beam search runs at ``precision`` (the trainer's, resolved) unless ``eval.decoding.precision`` is given.
    A stop signal (``stop``) ends decoding between two batches, with :class:`Interrupted`.
    """
    metrics, outputs = {}, {}
    for split in cfg.eval.splits:
        if task.family == "translation":
            metrics[split], outputs[split] = evaluate_translation(
                model, task, split, device,
                {"precision": precision, **OmegaConf.to_container(cfg.eval.decoding, resolve=True)},
                check_stop=stop.check(f"while decoding the {split} split") if stop else None)
        elif getattr(task, "kind", None) == "probe":
            metrics[split] = evaluate_probe(model, task, split, device, cfg.trainer.max_tokens)
        else:
            metrics[split] = evaluate_lm(model, task, split, device, cfg.trainer.max_tokens)
    return metrics, outputs


def run(cfg: DictConfig, out_dir: str | Path, *, sweep: str | None = None, raise_errors: bool = True) -> dict:
    """Train and evaluate one model on one task; the record is written to ``out_dir/record.json``.

    Whatever happens, a record is written: status ``ok``, ``failed`` (with the error)
    or ``interrupted`` (resume by running the same command in the same folder).
    """
    d = distributed.from_environment()
    if d.enabled and not d.main:
        return _follow(cfg, d)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out_dir)  # before anything is written: a second run in this folder stops here, touching nothing
    path = out_dir / record.RECORD_NAME
    name = job_name(cfg)
    rec = {"status": "running", "error": None, "seed": cfg.seed, "config": OmegaConf.to_container(cfg),
           "job": {"name": name, "sweep": sweep or cfg.get("sweep_name"), "output_dir": str(out_dir),
                   "started": record.now(), "finished": None, "slurm_job_id": _slurm_id()}}
    tracker = stop = None
    followers_waiting = d.enabled  # data-parallel ranks 1.. wait for rank 0's set-up (or its error)
    try:
        settings.check(cfg)  # first: a bad setting fails before any device, data or model is touched
        stop = StopFlag()  # from the start: a stop signal during set-up ends the job at its first step
        device = pick_device(distributed.device_for(d, cfg.device))
        distributed.init(d, device)
        distributed.broadcast(str(out_dir))  # the followers read checkpoints from rank 0's folder
        rec["config"] = resolved = OmegaConf.to_container(cfg, resolve=True)
        rec["environment"] = {**record.environment(device), "processes": d.world}
        record.write(path, rec)
        train_cfg, task, model, identity = _build(cfg, device, rec)
        rec["model"] = {"name": cfg.model.name, "preset": cfg.model.get("preset"), "form": model.form,
                        "paper": cfg.model.get("paper"), "parameters": models.count_parameters(model),
                        **({"warnings": model.warnings} if getattr(model, "warnings", None) else {})}
        if followers_waiting:
            distributed.broadcast(None)  # set-up done: the followers build the same task (cached tokenizer) and model
            followers_waiting = False
        tracker = make_tracker(OmegaConf.to_container(cfg.logger, resolve=True), name=name, group=rec["job"]["sweep"],
                               config=record.scrub(resolved), out_dir=str(out_dir),
                               resume=train_cfg.resume and (out_dir / "last.pt").is_file(),
                               tags=job_tags(rec, resolve_precision(train_cfg.precision, device)))
        trainer = Trainer(model, task, train_cfg, out_dir, device, seed=cfg.seed, identity=identity,
                          tracker=tracker, decoding=OmegaConf.to_container(cfg.eval.decoding, resolve=True),
                          should_stop=stop, dist=d,
                          keep_snapshots=cfg.eval.average_last if cfg.eval.checkpoint == "average" else None)
        rec["environment"]["precision"] = trainer.precision  # resolved: what trainer.precision=auto chose
        sample = sample_batches(task.batches("train", train_cfg.max_tokens, epoch=0, shuffle=True, seed=cfg.seed))
        flops_per_token = train_flops_per_token(model, [batch.to(device) for batch in sample])
        progress = trainer.fit()
        rec["eval_checkpoint"] = _load_for_eval(model, cfg, out_dir, identity)
        metrics, outputs = evaluate(model, task, cfg, device, trainer.precision, stop)
        rec.update(influence.job_entry(model, task, cfg, device))  # LM-form tasks, if eval.influence: "analysis"
        for split, hyps in outputs.items():
            (out_dir / f"{split}.hyp").write_text("\n".join(hyps) + "\n", encoding="utf-8")
        rec.update(status="ok", metrics=metrics, resumed_from_step=trainer.resumed_from,
                   skipped_steps=progress.skipped_steps, best_recreated=progress.best_recreated,
                   curves={"train": progress.log, "valid": progress.evals},
                   costs=_costs(progress, metrics, flops_per_token, device))
        check_converged(metrics)  # a diverged model fails the job; its metrics, curves and costs stay in the record
        tracker.summary({"record": record.scrub(rec)})
    except (Interrupted, KeyboardInterrupt) as err:
        rec.update(status="interrupted", error=f"{type(err).__name__}: {err}")
        if raise_errors:  # in a sweep, run.py stops the sweep on it
            raise
    except Exception as err:
        rec.update(status="failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        log.error("job %s failed: %s", name, rec["error"])
        if followers_waiting and distributed.is_initialized():
            distributed.broadcast(rec["error"])  # the followers stop with rank 0's error instead of waiting
        if raise_errors:
            raise
    finally:
        distributed.shutdown()
        rec["job"]["finished"] = record.now()
        record.write(path, rec)
        record.scrub_files(out_dir)  # Hydra's copies of the config (.hydra/*.yaml) and the logs
        if tracker is not None:
            tracker.finish(exit_code=0 if rec["status"] == "ok" else 1, record=path)
        lock.release()
        if rec["status"] == "interrupted" and stop is not None:
            stop.hand_over()  # under SLURM: requeue, or exit leaving no result, so the requeued job finishes it
    _print_summary(rec)
    return rec


def _follow(cfg: DictConfig, d: distributed.Dist) -> dict:
    """A data-parallel rank other than 0: trains its share of every batch; rank 0 evaluates and writes the record."""
    try:
        settings.check(cfg)  # as rank 0 does, which fails before it would set up the process group
        device = pick_device(distributed.device_for(d, cfg.device))
        distributed.init(d, device)
        out_dir = Path(distributed.broadcast(None))
        error = distributed.broadcast(None)
        if error is not None:
            raise RuntimeError(f"rank 0 failed while setting up the job: {error}")
        train_cfg, task, model, identity = _build(cfg, device)
        trainer = Trainer(model, task, train_cfg, out_dir, device, seed=cfg.seed, identity=identity,
                          should_stop=StopFlag(), dist=d)
        try:
            progress = trainer.fit()
        except Interrupted as err:  # rank 0 saved last.pt and decides about requeueing
            return {"status": "interrupted", "rank": d.rank, "error": str(err)}
        return {"status": "ok", "rank": d.rank, "steps": progress.step}
    finally:
        distributed.shutdown()


def _build(cfg: DictConfig, device: torch.device, rec: dict | None = None):
    """Threads, seeds, trainer settings, task, model and checkpoint identity of a job, the same on every rank.

    The identity (what a checkpoint must match to be resumed, harness/checkpoint.py) holds the model, task,
    vocabulary, device type, the whole resolved config (secrets scrubbed) and checksums of the task's data.

    ``rec`` (rank 0's record) gets the threads and how they were chosen, and the task's description
    as soon as the task exists, so a failed model build still records which task it was for.
    """
    train_cfg = TrainConfig(**OmegaConf.to_container(cfg.trainer, resolve=True))
    threads, chosen = choose_threads(train_cfg.threads)
    if threads:
        torch.set_num_threads(threads)
    if rec is not None:
        rec["environment"].update(threads=torch.get_num_threads(), threads_chosen=chosen)
    random.seed(cfg.seed), np.random.seed(cfg.seed), torch.manual_seed(cfg.seed)
    task = tasks.build(OmegaConf.to_container(cfg.task, resolve=True), OmegaConf.to_container(cfg.data, resolve=True))
    described = task.describe()
    if rec is not None:
        rec["task"] = described
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model = models.build(model_cfg, task)
    identity = {"model": model_cfg, "task": described["name"], "vocab": _vocab(task), "device": device.type,
                "config": record.scrub(OmegaConf.to_container(cfg, resolve=True)),
                "data": checkpoint.data_checksums(task)}
    return train_cfg, task, model, identity


def _load_for_eval(model, cfg: DictConfig, out_dir: Path, identity: dict) -> dict:
    """Load the weights ``eval.checkpoint`` names into ``model``; returns which they are, for the record."""
    if cfg.eval.checkpoint == "average":
        state, entry = checkpoint.average_last(out_dir / checkpoint.SNAPSHOTS, cfg.eval.average_last, identity)
        for warning in entry.get("warnings", []):
            log.warning(warning)
    else:
        ckpt = checkpoint.load(out_dir / f"{cfg.eval.checkpoint}.pt", identity)
        state, entry = ckpt["model"], {"kind": cfg.eval.checkpoint, "steps": [ckpt["progress"]["step"]],
                                       "files": [f"{cfg.eval.checkpoint}.pt"]}
    model.load_state_dict(state)
    return entry


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
            "flops_convention": FLOPS_CONVENTION,
            **record.peak_memory_bytes(device)}


def _print_summary(rec: dict) -> None:
    m, task = rec.get("metrics", {}).get("test", {}), rec.get("task") or {}
    score = scoring.summary(task.get("metrics") or scoring.defaults(task.get("family")), m)
    c = rec.get("costs", {})
    print(f"[seqbench] {rec['job']['name']}: {rec['status']} | test {score} | "
          f"{c.get('train_seconds', 0):.0f}s train, {c.get('steps', 0)} steps | {rec['job']['output_dir']}")
    for warning in task.get("warnings", []):  # e.g. a vocabulary capped at what the data allows
        print(f"[seqbench] warning: {warning}")
