"""Secrets and tracking, run as a user runs them (``python run.py`` subprocesses): no key given on the command
line or in the environment is written anywhere (wandb run file, Hydra's config copies after SIGKILL or SIGTERM),
whatever its shape (list, number, nested mapping, interpolation default) and secret name, and an unreachable wandb
server costs seconds, not the job."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from seqbench.harness import job, secrets
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


# -- every shape of secret, from the command line a user types ---------------------------------------------------

SHAPES = {  # planted value -> how it is given
    "list-key-Rt5Wq2Nb": "a list", "list-key-Yp7Kc4Hv": "a list",
    "918273645501": "a number", "2.718281828459": "a float under pwd",
    "default-key-Gx3Mz8Ld": "an interpolation's default", "nested-key-Vb9Qs1Tf": "a nested mapping",
    "nested-default-Jh2Wn6Rc": "a nested interpolation's default", "passwd-Lk4Dg7Xe": "passwd",
    "cred-user-Ua8Pm3Zq": "a mapping under credentials", "Bearer-auth-Ce5Fy9Ko": "auth",
    "cookie-Wd3Hj6Sa": "a session cookie", "priv-key-Mq7Tb2Gn": "privateKey", "choice-key-Ns4Vx8Lf": "a sweep",
}
SHAPE_ARGS = ["+logger.api_key=[list-key-Rt5Wq2Nb,'list-key-Yp7Kc4Hv']", "+logger.password=918273645501",
              "+logger.pwd=2.718281828459", "+logger.hf_token=${oc.env:SEQBENCH_TEST_UNSET,default-key-Gx3Mz8Ld}",
              "+logger.wandb={api_key: nested-key-Vb9Qs1Tf, token: '${oc.env:SEQBENCH_TEST_UNSET,nested-default-Jh2Wn6Rc}',"
              " project: leak-test-project, max_tokens: 512}",
              "+logger.passwd=passwd-Lk4Dg7Xe", "+logger.credentials={user: cred-user-Ua8Pm3Zq, n: 3}",
              "+logger.auth=Bearer-auth-Ce5Fy9Ko", "+logger.session_cookie=cookie-Wd3Hj6Sa",
              "+logger.privateKey=priv-key-Mq7Tb2Gn", "+logger.hf_token2=${oc.env:HOME}"]


def planted(folder: Path, text: str = "") -> dict[str, list[str]]:
    """Every file under ``folder`` (as bytes: checkpoints, wandb's binary run file too), and ``text``, that holds
    a planted value: {file: [the shapes it leaks]}."""
    found = {}
    for p in folder.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            hits = [shape for value, shape in SHAPES.items() if value.encode() in data]
            if hits:
                found[str(p.relative_to(folder))] = hits
    hits = [shape for value, shape in SHAPES.items() if value in text]
    if hits:
        found["<output>"] = hits
    return found


def parallel_folder(folder: Path) -> Path:
    """A tiny reversal corpus as parallel files: ``{train,valid,test}.{src,tgt}``."""
    import random

    rng, words = random.Random(0), [f"w{i}" for i in range(12)]
    folder.mkdir()
    for split, n in (("train", 300), ("valid", 8), ("test", 8)):
        lines = [[rng.choice(words) for _ in range(rng.randint(3, 8))] for _ in range(n)]
        (folder / f"{split}.src").write_text("".join(" ".join(l) + "\n" for l in lines))
        (folder / f"{split}.tgt").write_text("".join(" ".join(reversed(l)) + "\n" for l in lines))
    return folder


def test_secret_names_shapes_and_defaults_are_redacted(make_cfg, monkeypatch):
    """The rules, without a job: which names are secrets, which values under them are hidden from Hydra (moved into
    the environment, the config resolving to the same values) and redacted from records."""
    secret = ["api_key", "HF_TOKEN", "apiKey", "HFToken", "DB_PASSWORD", "passwd", "pwd", "credentials", "credential",
              "auth", "Authorization", "bearer", "session_cookie", "cookies", "session", "private_key", "privateKey",
              "secrets", "APIKEY", "PGPASSWORD", "oauth", "x-auth-token", "api.key", "key2"]
    ordinary = ["tokenizer", "max_tokens", "n_keys", "tokens_per_batch", "flops_per_token", "tokens_per_second",
                "max_source_tokens", "tokenization", "exclude_keys", "keyboard", "author", "sessions"]
    assert [n for n in secret if not secrets.is_secret_name(n)] == []
    assert [n for n in ordinary if secrets.is_secret_name(n)] == []
    # interpolations: only the literal parts are secret
    assert secrets.literal_parts("${oc.env:NOPE,sk-Ab12}") == ["sk-Ab12"]
    assert secrets.literal_parts("${oc.env:HF_TOKEN}") == [] and secrets.literal_parts("${model.name}") == []
    assert secrets.literal_parts("Bearer ${oc.env:T}") == ["Bearer"]
    # every shape leaves the command line, and the job's config is what it would have been
    environ = {}
    hidden = secrets.hide_in_environment(SHAPE_ARGS, environ)
    assert not [a for a in hidden if any(v in a for v in SHAPES)], hidden
    assert "+logger.hf_token2=${oc.env:HOME}" in hidden  # names where the secret is: stays
    assert "project:leak-test-project" in hidden[4] and "max_tokens:512" in hidden[4]  # the mapping's other keys stay
    for k, v in environ.items():
        monkeypatch.setenv(k, v)
    want = OmegaConf.to_container(make_cfg(*SHAPE_ARGS).logger, resolve=True)
    assert OmegaConf.to_container(make_cfg(*hidden).logger, resolve=True) == want
    assert want["password"] == 918273645501 and want["wandb"]["token"] == "nested-default-Jh2Wn6Rc"
    # a sweep over secret values, and what wandb's metadata gets
    assert not any(v in a for a in secrets.hide_in_environment(["+logger.token=choice-key-Ns4Vx8Lf,b"], {})
                   for v in SHAPES)
    assert secrets.redact_args(["+logger.password=918273645501"]) == ["+logger.password=<redacted>"]
    # records: by name, whatever the type; ordinary settings and numbers stay
    scrubbed = secrets.scrub({"logger": want, "costs": {"flops_per_token": 6.5e4, "tokens_per_second": 10.0},
                              "task": {"tokenizer": "whitespace"}, "trainer": {"max_tokens": 512}})
    assert not any(v in str(scrubbed) for v in SHAPES), scrubbed
    assert scrubbed["logger"]["api_key"] == ["<redacted>"] * 2 and scrubbed["logger"]["password"] == "<redacted>"
    assert scrubbed["logger"]["credentials"] == {"user": "<redacted>", "n": "<redacted>"}
    assert scrubbed["logger"]["wandb"]["project"] == "leak-test-project" and scrubbed["logger"]["hf_token2"] == "<redacted>"
    assert scrubbed["costs"] == {"flops_per_token": 6.5e4, "tokens_per_second": 10.0}
    assert scrubbed["task"] == {"tokenizer": "whitespace"} and scrubbed["trainer"] == {"max_tokens": 512}


def test_scrub_files_redacts_every_shape_a_config_file_gave(tmp_path):
    """Secrets written into a config file (not the command line) reach Hydra's copy; the job's end redacts them:
    numbers, list elements, nested leaves and an interpolation's default, leaving the interpolation."""
    folder = tmp_path / "job" / ".hydra"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(
        "logger:\n  api_key:\n  - list-key-Rt5Wq2Nb\n  password: 918273645501\n"
        "  hf_token: ${oc.env:SEQBENCH_TEST_UNSET,default-key-Gx3Mz8Ld}\n"
        "  wandb:\n    api_key: nested-key-Vb9Qs1Tf\n    project: leak-test-project\n"
        "trainer:\n  max_tokens: 512\n")
    (folder / "overrides.yaml").write_text("- '+logger.credentials={user: cred-user-Ua8Pm3Zq}'\n- trainer=smoke\n")
    (tmp_path / "job" / "run.log").write_text("started with cred-user-Ua8Pm3Zq and 918273645501\n")
    secrets.scrub_files(tmp_path / "job")
    assert planted(tmp_path) == {}
    text = (folder / "config.yaml").read_text()
    assert "${oc.env:SEQBENCH_TEST_UNSET,<redacted>}" in text and "leak-test-project" in text and "512" in text


@pytest.mark.slow
def test_no_secret_of_any_shape_is_written_anywhere_killed_or_finished(tmp_path):
    """The command a user runs (parallel files, whitespace tokens, smoke trainer, wandb offline) with every secret
    shape at once: SIGKILL once Hydra has written .hydra/, SIGKILL mid-training (a checkpoint written), then the
    same command in the same folder resumes and finishes. After each, no file under the output folder or wandb's
    folders, binary or text, holds a planted value, nor does the output; the record shows where each one was."""
    data, out = parallel_folder(tmp_path / "data"), tmp_path / "out"
    env = secret_env(tmp_path, "offline")
    env.update(PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(ROOT / "run.py"), "model=transformer_tiny", "task=parallel_files", f"task.path={data}",
           "task.tokenizer=whitespace", "trainer=smoke", "trainer.max_steps=30", "trainer.eval_every=2",
           "trainer.max_tokens=256", "trainer.valid_bleu=false", "device=cpu", "logger=wandb", *SHAPE_ARGS,
           f"hydra.run.dir={out}"]

    def killed_when(ready) -> str:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300
        while not ready():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the moment to kill never came"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        return output

    overrides = out / ".hydra" / "overrides.yaml"  # the last file Hydra writes before the job starts
    output = killed_when(lambda: overrides.is_file() and "hf_token2" in overrides.read_text())
    assert planted(tmp_path, output) == {}
    assert "SEQBENCH_SECRET_LOGGER_WANDB_API_KEY" in (out / ".hydra" / "overrides.yaml").read_text()

    def step():
        try:
            return torch.load(out / "last.pt", weights_only=True)["progress"]["step"]
        except (OSError, RuntimeError, KeyError):
            return -1
    output = killed_when(lambda: step() >= 4 and list(out.glob("wandb/offline-run-*/run-*.wandb")))
    assert planted(tmp_path, output) == {}
    identity = torch.load(out / "last.pt", weights_only=True)["identity"]["config"]["logger"]
    assert identity["password"] == "<redacted>" and identity["api_key"] == ["<redacted>"] * 2

    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((out / "record.json").read_text())
    assert rec["status"] == "ok" and rec["resumed_from_step"] >= 4
    assert planted(tmp_path, proc.stdout + proc.stderr) == {}
    logger = rec["config"]["logger"]
    assert logger["api_key"] == ["<redacted>"] * 2 and logger["password"] == logger["pwd"] == "<redacted>"
    assert logger["wandb"] == {"api_key": "<redacted>", "token": "<redacted>", "project": "leak-test-project",
                               "max_tokens": 512}
    assert logger["credentials"] == {"user": "<redacted>", "n": "<redacted>"} and logger["auth"] == "<redacted>"
    assert rec["config"]["task"]["tokenizer"] == "whitespace" and rec["config"]["trainer"]["max_tokens"] == 256
    assert len(list(out.glob("wandb/offline-run-*/run-*.wandb"))) >= 2  # wandb ran in both jobs that trained
