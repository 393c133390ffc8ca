"""Secrets and tracking, run as a user runs them (``python run.py`` subprocesses): no key given on the command
line or in the environment is written anywhere (wandb run file, Hydra's config copies after SIGKILL or SIGTERM),
and an unreachable wandb server costs seconds, not the job."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from harness import job, secrets
from tests.conftest import ROOT
from tests.test_reliability import KILL_RUN, kill_after_checkpoint, run_py
from tests.test_tracking import JOB, wandb_env, wandb_flushed, wandb_records

CLI_KEY = "cli-key-Zq8Wv3Lp0Xr5"  # given on the command line
ENV_KEY = "env-key-Hn4Tc7Ys2Kd9"  # WANDB_API_KEY
SERVICE_KEY = "svc-key-Mb6Jf1Ug8Qe3"  # another secret in the environment, read by the config
SECRET_ARGS = [f"+logger.api_key={CLI_KEY}", "+logger.service=${oc.env:SEQBENCH_TEST_SERVICE_KEY}"]
HIDDEN = "+logger.api_key=${oc.env:SEQBENCH_SECRET_LOGGER_API_KEY}"  # what Hydra and wandb see instead


def holding_secrets(*folders: Path, text: str = "") -> dict[str, list[str]]:
    """Every file under the folders (read as bytes, binary wandb files too), and ``text``, that holds a planted key."""
    found = {}
    for folder in folders:
        for p in folder.rglob("*"):
            if p.is_file():
                data = p.read_bytes()
                hits = [k for k in (CLI_KEY, ENV_KEY, SERVICE_KEY) if k.encode() in data]
                if hits:
                    found[str(p)] = hits
    hits = [k for k in (CLI_KEY, ENV_KEY, SERVICE_KEY) if k in text]
    if hits:
        found["<output>"] = hits
    return found


def secret_env(tmp_path: Path, mode: str) -> dict:
    env = wandb_env(tmp_path, mode)
    env.update(WANDB_API_KEY=ENV_KEY, SEQBENCH_TEST_SERVICE_KEY=SERVICE_KEY, OMP_NUM_THREADS="1")
    return env


def closed_port() -> int:
    """A local port nothing listens on: a server there refuses at once, and nothing leaves the machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the wandb run file ---------------------------------------------------------------------------------------

def test_wandb_run_file_holds_no_key_from_the_command_line_or_environment(tmp_path):
    out, cwd = tmp_path / "job", tmp_path / "cwd"
    cwd.mkdir()
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *JOB, *SECRET_ARGS, f"hydra.run.dir={out}"],
                          cwd=cwd, env=secret_env(tmp_path, "offline"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    assert holding_secrets(tmp_path, text=proc.stdout + proc.stderr) == {}
    # wandb still has the command line and the config, with the key's place marked
    assert HIDDEN.encode() in run_file.read_bytes()
    (run,) = [r.run for r in wandb_records(run_file) if r.WhichOneof("record_type") == "run"]
    logger = {i.key: json.loads(i.value_json) for i in run.config.update}["logger"]
    assert logger["api_key"] == logger["service"] == "<redacted>"


def test_the_tracker_hides_command_line_keys_from_wandb(make_cfg, tmp_path, monkeypatch):
    """Called without run.py (its command line unchanged), the tracker still gives wandb a redacted sys.argv."""
    for k, v in secret_env(tmp_path, "offline").items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    argv = ["run.py", *JOB, f"+logger.api_key={CLI_KEY}", f"+logger.other_token={SERVICE_KEY}x"]
    monkeypatch.setattr(sys, "argv", argv[:])
    rec = job.run(make_cfg(*JOB, f"+logger.api_key={CLI_KEY}"), tmp_path / "job")
    assert rec["status"] == "ok" and sys.argv == argv  # restored after wandb.init
    wandb_flushed()
    (run_file,) = (tmp_path / "job").glob("wandb/offline-run-*/run-*.wandb")
    assert b"+logger.api_key=<redacted>" in run_file.read_bytes()
    assert holding_secrets(tmp_path) == {}


# -- Hydra's config copies --------------------------------------------------------------------------------------

def test_sigkill_mid_training_leaves_no_key_in_hydras_files(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", ENV_KEY)
    monkeypatch.setenv("SEQBENCH_TEST_SERVICE_KEY", SERVICE_KEY)
    out = tmp_path / "killed"
    kill_after_checkpoint([*KILL_RUN, *SECRET_ARGS], out, at_step=2)  # no clean-up code runs after SIGKILL
    assert (out / ".hydra" / "overrides.yaml").is_file() and (out / "last.pt").is_file()
    assert holding_secrets(out) == {}
    assert HIDDEN in (out / ".hydra" / "overrides.yaml").read_text()


def test_sigterm_of_a_local_sweep_leaves_no_key_in_its_files(tmp_path, monkeypatch):
    """SIGTERM as the first job starts; the files are searched then (what a kill at that moment would leave)
    and after the sweep has stopped."""
    monkeypatch.setenv("WANDB_API_KEY", ENV_KEY)
    monkeypatch.setenv("SEQBENCH_TEST_SERVICE_KEY", SERVICE_KEY)
    sweep = tmp_path / "sweep"
    proc = run_py(["-m", *KILL_RUN, "seed=1,2", *SECRET_ARGS, f"hydra.sweep.dir={sweep}"], tmp_path / "unused")
    deadline = time.monotonic() + 300
    while not list(sweep.glob("*/.hydra/overrides.yaml")):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "the sweep never started a job"
        time.sleep(0.01)
    assert holding_secrets(sweep) == {}  # Hydra has written multirun.yaml and the job's .hydra/*.yaml
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert holding_secrets(sweep, text=output) == {}
    assert HIDDEN in (sweep / "multirun.yaml").read_text()


def test_a_command_line_key_still_reaches_the_job(make_cfg, monkeypatch):
    environ = {}
    args = secrets.hide_in_environment([f"+logger.api_key={CLI_KEY}", "trainer=smoke"], environ)
    assert args == [HIDDEN, "trainer=smoke"] and environ == {"SEQBENCH_SECRET_LOGGER_API_KEY": CLI_KEY}
    monkeypatch.setenv("SEQBENCH_SECRET_LOGGER_API_KEY", CLI_KEY)
    assert make_cfg(*args).logger.api_key == CLI_KEY
    assert CLI_KEY in secrets.env_secrets()  # so records and logs redact it


def test_only_literal_secret_strings_leave_the_command_line():
    args = ["-m", "trainer.max_tokens=512", "trainer.max_tokens=256,512", "+logger.hf_token=${oc.env:HF_TOKEN}",
            "~logger.api_key", "hydra.run.dir=out", "task.tokenizer=whitespace", "+logger.api_key=bad=[syntax"]
    environ = {}
    assert secrets.hide_in_environment(args, environ) == args and environ == {}
    assert secrets.hide_in_environment(["++logger.password='a b'"], environ) == [
        "++logger.password=${oc.env:SEQBENCH_SECRET_LOGGER_PASSWORD}"]
    assert environ == {"SEQBENCH_SECRET_LOGGER_PASSWORD": "a b"}


# -- an unreachable wandb server -----------------------------------------------------------------------------

def test_unreachable_wandb_server_logs_offline_within_seconds(tmp_path, make_cfg):
    assert make_cfg("logger=wandb").logger.init_timeout <= 30  # the default bounds the wait too
    out, cwd = tmp_path / "job", tmp_path / "cwd"
    cwd.mkdir()
    env = secret_env(tmp_path, "offline")
    del env["WANDB_MODE"]  # an API key and no mode: online
    server = f"http://127.0.0.1:{closed_port()}"
    env.update(WANDB_BASE_URL=server, HTTP_PROXY=server, HTTPS_PROXY=server, NO_PROXY="")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *JOB, "logger.init_timeout=5",
                           f"hydra.run.dir={out}"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert took < 60, f"the job took {took:.0f} s"
    assert json.loads((out / "record.json").read_text())["status"] == "ok"
    (run_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    output = proc.stdout + proc.stderr
    assert "could not be reached" in output and f"wandb sync {run_file.parent}" in output
    assert any(r.WhichOneof("record_type") == "history" for r in wandb_records(run_file))
    assert holding_secrets(tmp_path, text=output) == {}


def test_names_that_only_contain_a_marker_are_not_secrets():
    """``tokenizer`` holds a token word, not a token: its value stays in records (and on the command line)."""
    rec = {"task": {"tokenizer": "whitespace", "tokenization": "bpe 8000", "n_keys": 16},
           "logger": {"api_key": "k", "hfToken": "t", "DB_PASSWORD": "p"}}
    hidden = {"api_key": "<redacted>", "hfToken": "<redacted>", "DB_PASSWORD": "<redacted>"}
    assert secrets.scrub(rec) == {"task": rec["task"], "logger": hidden}
