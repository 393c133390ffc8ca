"""One job: build the task and model, train, evaluate, and write the result record."""
from __future__ import annotations

import hashlib
import json
import logging
import random
import traceback
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from seqbench import models
from seqbench import tasks
from seqbench.tasks.base import EvalContext
from seqbench.tasks.data import display_name

from . import checkpoint, distributed, environment, lm_protocol, plugins, schema, secrets, settings, tuned, utilization
from . import peak as peak_flops
from . import metrics as scoring
from .analysis import influence
from .cluster.signals import StopFlag, slurm_job_id
from .device import pick
from .evaluate import check_converged
from .io import FolderLock, atomic_write_text, write_json
from .precision import choose_threads, resolve_precision
from .profile import CONVENTION as FLOPS_CONVENTION
from .profile import sample_batches, train_flops_per_token
from .tracking import job_tags, make_tracker
from .train import Interrupted, TrainConfig, Trainer

log = logging.getLogger("seqbench")


def task_name(cfg: DictConfig) -> str:
    """The task's name in records, reports, job names and folders: ``task.label`` if set, else, for a task that
    reads your folder (``task.path``), the folder's base name, else the task's config name (as ``describe()``)."""
    task = cfg.task
    label = task.get("label")
    if label not in (None, ""):
        return str(label)
    if "path" in task and not OmegaConf.is_missing(task, "path") and task.path not in (None, ""):
        return display_name((Path(str(cfg.data.root)) / str(task.path)).resolve(), None, task.name)
    return str(task.name)


def job_name(cfg: DictConfig) -> str:
    """``<model>-<preset>_<task>_s<seed>``: the job's name in its record, summary line, report and folder."""
    return f"{cfg.model.name}-{cfg.model.get('preset', 'custom')}_{task_name(cfg)}_s{cfg.seed}"


# conf/config.yaml names the job folders ${seqbench.job:} (hydra.run.dir, hydra.sweep.subdir): the same name
OmegaConf.register_new_resolver("seqbench.job", lambda *, _root_: job_name(_root_), replace=True)


def preset_list(suffix: str = "") -> str:
    """A sweep's model list: preset ``<architecture><suffix>`` of every registered architecture that has one
    (seqbench's, then plug-ins'), comma-separated: ``${seqbench.models:_tiny}`` in an experiment's sweep, so an
    architecture a package registers joins the experiments without a change to them."""
    presets = models.preset_paths()
    return ",".join(name for name in (f"{arch}{suffix}" for arch in models.MODELS) if name in presets)


OmegaConf.register_new_resolver("seqbench.models", preset_list, replace=True)


def evaluate(model, task, cfg: DictConfig, device, precision: str = "fp32",
             stop: StopFlag | None = None) -> tuple[dict, dict]:
    """Metrics per split (``task.evaluate``), and the files the task's evaluation leaves for the output folder
    (name -> content): a translation's ``<split>.hyp`` and ``<split>.ref``, a language model's
    ``<split>.nll.json`` (per-sequence NLL), which the report's paired significance tests read.

    Decoding runs at ``precision`` (the trainer's, resolved) unless ``eval.decoding.precision`` is given.
    A stop signal (``stop``) ends evaluation between two batches, with :class:`Interrupted`.
    """
    metrics, outputs = {}, {}
    decoding, protocol = OmegaConf.to_container(cfg.eval.decoding, resolve=True), lm_protocol.from_config(cfg)
    for split in cfg.eval.splits:
        ctx = EvalContext(device, cfg.trainer.max_tokens, decoding, precision,
                          stop.check(f"while evaluating the {split} split") if stop else None, lm_protocol=protocol)
        metrics[split], files = task.evaluate(model, split, ctx)
        outputs.update(files)
    return metrics, outputs


def write_outputs(out_dir: Path, outputs: dict) -> None:
    """Each output file, atomically: lines of text (``.hyp``, ``.ref``) or strict JSON (``.json``)."""
    for name, content in outputs.items():
        if name.endswith(".json"):
            write_json(out_dir / name, content)
        else:
            atomic_write_text(out_dir / name, "\n".join(content) + "\n")


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
    path = out_dir / schema.RECORD_NAME
    name = job_name(cfg)
    digest = config_digest(cfg)
    done = None if d.enabled else finished_here(path, digest, cfg)
    if done is not None:  # a sweep run again (in parts) picks up its finished jobs instead of evaluating them again
        lock.release()
        log.info("%s finished already in %s with this config: its record stands (delete %s, or set "
                 "trainer.resume=false, to run it again)", name, out_dir, path.name)
        _print_summary(done)
        return done
    rec = schema.started(OmegaConf.to_container(cfg), cfg.seed,
                         schema.job_entry(name, sweep or cfg.get("sweep_name"), out_dir, started=schema.now(),
                                          slurm_job_id=slurm_job_id(), config_digest=digest))
    kept = schema.keep_previous(path)  # a finished record already here survives this run whatever happens
    if kept is not None:
        rec["job"]["previous_record"] = str(kept)
        log.info("this folder held a finished run; its record is kept in %s", kept)
    tracker = stop = memory = None
    followers_waiting = d.enabled  # data-parallel ranks 1.. wait for rank 0's set-up (or its error)
    try:
        cfg = tuned.apply(cfg)  # tuned=<tuned.yaml>: this task's and architecture's tuned trainer settings
        settings.check(cfg)  # first: a bad setting fails before any device, data or model is touched
        stop = StopFlag()  # from the start: a stop signal during set-up ends the job at its first step
        device = pick(distributed.device_for(d, cfg.device))
        memory = environment.PeakMemory(device)  # this job's own peak, not the process's (a sweep runs many jobs)
        distributed.lead(d, device, out_dir)
        rec["config"] = resolved = OmegaConf.to_container(cfg, resolve=True)
        rec["environment"] = {**environment.describe(device), "processes": d.world}
        rec["environment"]["plugins"] = plugins.provenance(OmegaConf.to_container(cfg.model, resolve=True))
        schema.write(path, rec)
        train_cfg, task, model, identity = _build(cfg, device, rec)
        for warning in lm_protocol.ignored(cfg, task):
            log.warning(warning)
        rec["model"] = {"name": cfg.model.name, "preset": cfg.model.get("preset"), "form": model.form,
                        "paper": cfg.model.get("paper"), "parameters": models.count_parameters(model),
                        **({"warnings": model.warnings} if getattr(model, "warnings", None) else {})}
        if followers_waiting:
            distributed.setup_done()
            followers_waiting = False
        tracker = make_tracker(resolved["logger"], name=name, group=rec["job"]["sweep"],
                               config=secrets.scrub(resolved), out_dir=str(out_dir),
                               resume=train_cfg.resume and (out_dir / "last.pt").is_file(),
                               tags=job_tags(rec, resolve_precision(train_cfg.precision, device)))
        trainer = Trainer(model, task, train_cfg, out_dir, device, seed=cfg.seed, identity=identity,
                          tracker=tracker, decoding=resolved["eval"]["decoding"],
                          should_stop=stop, dist=d,
                          keep_snapshots=cfg.eval.average_last if cfg.eval.checkpoint == "average" else None)
        rec["environment"]["precision"] = trainer.precision  # resolved: what trainer.precision=auto chose
        rec["config"]["trainer"]["label_smoothing"] = train_cfg.label_smoothing  # resolved: null is the task's
        rec["config"]["trainer"]["max_flops"] = train_cfg.max_flops  # resolved: a ladder's top rung
        sample = sample_batches(trainer.epoch_batches(0))
        flops_per_token = train_flops_per_token(model, [batch.to(device) for batch in sample])
        trainer.flops_per_token = flops_per_token  # trainer.max_flops: the budget in these FLOPs
        peak = peak_flops.for_run(model, sample, device, trainer.precision)  # costs.mfu's denominator; never raises
        trainer.on_rung = lambda k: _rung(rec, k, trainer, task, cfg, device, memory, stop, peak, d.world)  # ladder
        progress = trainer.fit()
        rec["eval_checkpoint"] = _load_for_eval(model, cfg, out_dir, identity)
        metrics, outputs = evaluate(model, task, cfg, device, trainer.precision, stop)
        rec.update(influence.job_entry(model, task, cfg, device, stop.check("during the influence analysis")))  # LM-form tasks, if eval.influence: "analysis"
        write_outputs(out_dir, outputs)
        rec.update(status="ok", metrics=metrics, resumed_from_step=trainer.resumed_from,
                   skipped_steps=progress.skipped_steps, best_recreated=progress.best_recreated,
                   curves={"train": progress.log, "valid": progress.evals},
                   costs=_costs(progress, metrics, flops_per_token, memory.result(), device, peak, d.world))
        if train_cfg.ladder:  # the top rung is this run: its entry is the record's own result
            top = trainer.rung_entry()
            rec["ladder"] = [*progress.ladder, {**top, "metrics": metrics, "folder": "."}]
            rec["ladder_rung"] = _ladder_rung(top, len(train_cfg.ladder), name)
        check_converged(metrics)  # a diverged model fails the job; its metrics, curves and costs stay in the record
        tracker.summary({"record": secrets.scrub(rec)})
    except (Interrupted, KeyboardInterrupt) as err:
        rec.update(status="interrupted", error=f"{type(err).__name__}: {err}")
        if raise_errors:  # in a sweep, run.py stops the sweep on it
            raise
    except Exception as err:
        rec.update(status="failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        log.error("job %s failed: %s", name, rec["error"])
        if followers_waiting and distributed.is_initialized():
            distributed.setup_done(rec["error"])  # the followers stop with rank 0's error instead of waiting
        if raise_errors:
            raise
    finally:
        distributed.shutdown()
        if memory is not None:
            memory.stop()
        rec["job"]["finished"] = schema.now()
        schema.write(path, rec)
        secrets.scrub_files(out_dir)  # Hydra's copies of the config (.hydra/*.yaml) and the logs
        if tracker is not None:
            tracker.finish(exit_code=0 if rec["status"] == "ok" else 1, record=path)
        lock.release()
        if rec["status"] == "interrupted" and stop is not None:
            stop.hand_over()  # under SLURM: requeue, or exit leaving no result, so the requeued job finishes it
    _print_summary(rec)
    return rec


# Settings added after records first kept a config digest: unset (null) they do what the older code did, and they
# are left out of the digest, so a sweep still recognises the jobs its older commits finished.
DIGEST_NEUTRAL = (("trainer", "stop_at"),)


def config_digest(cfg: DictConfig) -> str | None:
    """A digest of the job's resolved config and, with ``tuned=``, of that file's content: a finished record with
    the same digest in the job's folder is this job's result (:func:`finished_here`). None when the config does
    not resolve or the tuned file cannot be read (the job then fails, naming the problem)."""
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        for group, key in DIGEST_NEUTRAL:  # settings added later, at their default: the older jobs' digest
            if isinstance(resolved.get(group), dict) and key in resolved[group] and resolved[group][key] is None:
                del resolved[group][key]
        text = json.dumps(resolved, sort_keys=True, default=str).encode()
        if resolved.get("tuned"):
            text += tuned.locate(resolved["tuned"]).read_bytes()  # as the job finds it: a shipped file from anywhere
    except Exception:  # noqa: BLE001 (any failure here is reported by the job itself)
        return None
    return hashlib.sha256(text).hexdigest()[:24]


def finished_here(path: Path, digest: str | None, cfg: DictConfig) -> dict | None:
    """The finished record (status ``ok``) of this very job at ``path``: written by a job of the same config digest;
    None otherwise (no record, another config, a failed, interrupted or running job, a record from before digests
    were kept) and with ``trainer.resume=false`` (a fresh start). A rerun with any setting changed (a beam, a
    tuned file's content) trains or evaluates again, keeping the finished record under ``previous/``."""
    if digest is None or not OmegaConf.select(cfg, "trainer.resume", default=True) or not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("status") != "ok" or not isinstance(rec.get("job"), dict):
        return None
    return rec if rec["job"].get("config_digest") == digest else None


def _follow(cfg: DictConfig, d: distributed.Dist) -> dict:
    """A data-parallel rank other than 0: trains its share of every batch; rank 0 evaluates and writes the record."""
    try:
        cfg = tuned.apply(cfg)  # as rank 0 does
        settings.check(cfg)  # as rank 0 does, which fails before it would set up the process group
        device = pick(distributed.device_for(d, cfg.device))
        out_dir = distributed.follow(d, device)
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
    conf = OmegaConf.to_container(cfg, resolve=True)  # plain values, once
    train_cfg = TrainConfig(**conf["trainer"])
    threads, chosen = choose_threads(train_cfg.threads)
    if threads:
        torch.set_num_threads(threads)
    if rec is not None:
        rec["environment"].update(threads=torch.get_num_threads(), threads_chosen=chosen)
    random.seed(cfg.seed), np.random.seed(cfg.seed), torch.manual_seed(cfg.seed)
    task = tasks.build(conf["task"], conf["data"])
    lm_protocol.limit_evaluation(task, conf.get("eval", {}))  # eval.max_valid_tokens, eval.max_test_tokens
    described = task.describe()
    if rec is not None:
        rec["task"] = described
    model = models.build(conf["model"], task)
    identity = {"model": conf["model"], "task": described["name"], "vocab": task.vocab(), "device": device.type,
                "config": secrets.scrub(conf),
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


RUNG_DIR = "rung_{}"  # trainer.ladder: <out>/rung_<k>/ holds rung k's record.json and evaluation outputs


def _rung(rec: dict, k: int, trainer: Trainer, task, cfg: DictConfig, device, memory, stop: StopFlag,
          peak: peak_flops.Peak | None, processes: int) -> dict:
    """trainer.ladder: evaluate rung ``k``'s cooled weights (the model as the cooldown left it) as the job evaluates
    its final model, and write them as a run of their own, ``<out>/rung_<k>/record.json`` with its outputs: the
    run a FLOP budget of the rung's size would have made (``config.trainer.max_flops`` is the rung's), so the
    report's tables, plots and significance tests treat each rung as a system. Returns the rung's ladder entry."""
    folder = Path(rec["job"]["output_dir"]) / RUNG_DIR.format(k)
    folder.mkdir(parents=True, exist_ok=True)
    metrics, outputs = evaluate(trainer.model, task, cfg, device, trainer.precision, stop)
    write_outputs(folder, outputs)
    p, flops = trainer.p, trainer.cfg.ladder[k]
    rung = {**rec, "job": {**rec["job"], "name": f"{rec['job']['name']}@{k}", "output_dir": str(folder)},
            "config": {**rec["config"], "trainer": {**rec["config"]["trainer"], "max_flops": flops}},
            "status": "ok", "metrics": metrics, "eval_checkpoint": {"kind": "ladder_rung", "steps": [p.step]},
            "ladder_rung": _ladder_rung(trainer.rung_entry(), len(trainer.cfg.ladder), rec["job"]["name"]),
            "curves": {"train": list(p.log), "valid": list(p.evals)}, "skipped_steps": list(p.skipped_steps),
            "costs": {**_costs(p, metrics, trainer.flops_per_token, memory.result(), device, peak, processes),
                      "ended_by": "ladder_rung"}}
    rung["job"]["finished"] = schema.now()
    schema.write(folder / schema.RECORD_NAME, rung)
    log.info("ladder: rung %d of %s evaluated: %s", k, rec["job"]["name"], folder)
    return {"metrics": metrics, "folder": RUNG_DIR.format(k)}


def _ladder_rung(entry: dict, rungs: int, run: str) -> dict:
    """A rung's record names its place in the ladder run ``run`` (``entry``: ``Trainer.rung_entry``)."""
    return {"rung": entry["rung"], "of": rungs, "flops": entry["flops"], "run": run,
            "cooldown_from_step": entry["cooldown_from_step"]}


def _costs(progress, metrics, flops_per_token, memory: dict, device, peak: peak_flops.Peak | None = None,
           processes: int = 1) -> dict:
    """The record's ``costs``; ``peak`` (this device's, harness/peak.py) over ``processes`` devices gives ``mfu``
    (None: not measured, ``mfu_note`` says so)."""
    decode = [m["sentences_per_second"] for m in metrics.values() if "sentences_per_second" in m]
    return {"train_seconds": progress.train_seconds, "steps": progress.step, "epochs": progress.epoch,
            "tokens": progress.tokens, "train_tokens_per_second": progress.tokens / max(progress.train_seconds, 1e-9),
            "decode_sentences_per_second": decode[-1] if decode else None,
            "flops_per_token": flops_per_token, "train_flops": flops_per_token * progress.tokens,
            "flops_convention": FLOPS_CONVENTION, "ended_by": progress.ended_by,
            **peak_flops.costs(peak, flops_per_token * progress.tokens, progress.train_seconds, processes),
            **memory, **utilization.costs(progress, device)}


def _print_summary(rec: dict) -> None:
    m, task = rec.get("metrics", {}).get("test", {}), rec.get("task") or {}
    score = scoring.summary(task.get("metrics") or scoring.defaults(task.get("family")), m)
    score += f" ({m['protocol']})" if m.get("protocol") else ""  # how a perplexity was computed (lm_protocol)
    score += (f" [first {m['tokens_evaluated']:,} of {m['tokens_total']:,} tokens: {m['limit']}]"  # eval.max_test_tokens
              if m.get("limited") else "")
    c = rec.get("costs") or {}
    result = (f"test {score} | {c.get('train_seconds', 0):.0f}s train, {c.get('steps', 0)} steps"
              if c or rec["status"] == "ok" else rec.get("error", "no result"))  # stopped or failed before its result
    lines = [f"[seqbench] {rec['job']['name']}: {rec['status']} | {result} | {rec['job']['output_dir']}",
             *(f"[seqbench] warning: {w}" for w in task.get("warnings", []))]  # e.g. a vocabulary capped by the data
    for line in lines:
        print(line)
        _to_log_files(line)


def _to_log_files(line: str) -> None:
    """``line`` in the job's log files (Hydra's ``run.log``) as well: the console has it already, from print."""
    entry = logging.LogRecord(log.name, logging.INFO, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(entry)
