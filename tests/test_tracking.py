"""Experiment tracking: a wandb run in offline mode, read back from its .wandb file, matches the job's record."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import wandb

from seqbench.harness import job
from tests.conftest import ROOT

JOB = ["model=transformer_tiny", "task=copy", "task.n_train=200", "task.n_valid=8", "task.n_test=8",
       "trainer=smoke", "trainer.max_steps=6", "trainer.eval_every=3", "device=cpu", "data.download=false",
       "logger=wandb", "sweep_name=tracking-test"]


def wandb_records(path: Path):
    """The protobuf records of an offline run's ``run-<id>.wandb`` file.

    The file is W&B's transaction log: a 7-byte header (``:W&B``, magic, version), then LevelDB log
    blocks of 32 KiB holding chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) of
    serialized ``wandb_internal_pb2.Record`` messages. (wandb >= 0.2x dropped its Python reader.)
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", f"{path} is not a W&B transaction log"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def wandb_flushed() -> None:
    """Wait until wandb has written the files of the runs this process finished: ``run.finish()`` returns before
    wandb-core completes a run's offline transaction log (``run-<id>.wandb``); stopping its service waits for it."""
    wandb.teardown()


def _items(items) -> dict:
    return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}


def wandb_env(tmp_path: Path, mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        env[var] = str(tmp_path / "wandb_home" / var.lower())
        Path(env[var]).mkdir(parents=True, exist_ok=True)
    env.update(WANDB_MODE=mode, WANDB_SILENT="true", WANDB_DISABLE_GIT="true")
    return env


def test_offline_wandb_run_matches_the_record(tmp_path):
    out, cwd = tmp_path / "job", tmp_path / "cwd"
    cwd.mkdir()
    env = wandb_env(tmp_path, "offline")
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *JOB, f"hydra.run.dir={out}"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((out / "record.json").read_text())
    assert rec["status"] == "ok"

    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    history, summary, run, exit_code, axes, artifacts = {}, {}, None, None, {}, []
    for r in wandb_records(runs[0]):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            row = _items(r.history.item)
            history.setdefault(row["_step"], {}).update(row)
        elif kind == "summary":
            summary.update(_items(r.summary.update))
        elif kind == "run":
            run = r.run
        elif kind == "exit":
            exit_code = r.exit.exit_code
        elif kind == "metric":
            axes[r.metric.name or r.metric.glob_name] = r.metric.step_metric
        elif kind == "artifact":
            artifacts.append(r.artifact)
    assert run is not None and exit_code == 0
    assert run.display_name == rec["job"]["name"] and run.run_group == "tracking-test"
    assert _items(run.config.update)["model"] == rec["config"]["model"]

    # every evaluation and every logged training step, at its step, with the record's values
    valid = {s: h["valid_nll"] for s, h in history.items() if "valid_nll" in h}
    assert valid == {r["step"]: r["valid_nll"] for r in rec["curves"]["valid"]}
    assert valid[max(valid)] == rec["curves"]["valid"][-1]["valid_nll"]
    train = {s: h["train/loss"] for s, h in history.items() if "train/loss" in h}
    assert train == {r["step"]: r["loss"] for r in rec["curves"]["train"]}
    assert summary["record"]["metrics"] == rec["metrics"] and summary["record"]["status"] == "ok"

    # dashboard axes: both declared; validation against training seconds, training rows against the step; every
    # row holds both, with the record's values
    assert axes == {"step": "", "train_seconds": "", "valid_*": "train_seconds", "train/*": "step"}
    for curve in (rec["curves"]["valid"], rec["curves"]["train"]):
        assert {r["step"]: (history[r["step"]]["step"], history[r["step"]]["train_seconds"]) for r in curve} == {
            r["step"]: (r["step"], r["train_seconds"]) for r in curve}
    assert run.job_type == "train"
    assert set(run.tags) == {"arch:transformer", "preset:tiny", "task:copy", "device:cpu", "precision:fp32"}
    # the record as the run's artifact: the very file the job left (wandb's manifest digest is its base64 MD5)
    (artifact,) = [a for a in artifacts if a.type == "record"]
    (entry,) = artifact.manifest.contents
    assert artifact.name == f"record-{run.run_id}" and entry.path == "record.json"
    assert entry.digest == base64.b64encode(hashlib.md5((out / "record.json").read_bytes()).digest()).decode()

    # offline means local only: nothing outside the job's folder (WANDB_DIR, the working directory)
    assert not list((tmp_path / "wandb_home" / "wandb_dir").iterdir())
    assert not list(cwd.iterdir())


def test_disabled_wandb_writes_nothing(make_cfg, tmp_path, monkeypatch):
    for k, v in wandb_env(tmp_path, "disabled").items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    rec = job.run(make_cfg(*JOB), tmp_path / "job")
    assert rec["status"] == "ok"
    assert not (tmp_path / "job" / "wandb").exists()
    assert not (tmp_path / "wandb").exists()
    assert not any(p.is_file() for p in (tmp_path / "wandb_home").rglob("*"))


def test_a_resumed_job_continues_its_wandb_run(make_cfg, tmp_path, monkeypatch):
    for k, v in wandb_env(tmp_path, "offline").items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    common = [a for a in JOB if not a.startswith("trainer.max_steps")]
    out = tmp_path / "job"
    first = job.run(make_cfg(*common, "trainer.max_steps=3"), out)
    resumed = job.run(make_cfg(*common, "trainer.max_steps=6"), out)
    wandb_flushed()
    assert first["status"] == resumed["status"] == "ok" and resumed["resumed_from_step"] == 3
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2, files
    assert files[0].name == files[1].name  # run-<id>.wandb: one run id for both parts
    assert files[0].stem.removeprefix("run-") == (out / "wandb-run-id").read_text().strip()
    runs, steps, artifacts = [], [], []
    for f in files:
        kinds = [(r.WhichOneof("record_type"), r) for r in wandb_records(f)]
        runs.append(next(r.run for k, r in kinds if k == "run"))
        steps.append({_items(r.history.item)["_step"] for k, r in kinds if k == "history"})
        artifacts.append([r.artifact.name for k, r in kinds if k == "artifact" and r.artifact.type == "record"])
    assert {r.run_id for r in runs} == {files[0].stem.removeprefix("run-")}
    assert max(steps[0]) == 3 and min(steps[1]) > 3  # the second part continues after the first
    # each part logs the record it ended with, as versions of the run's one record artifact
    assert artifacts == [[f"record-{runs[0].run_id}"]] * 2
