"""Runtime safety: one run per output folder, resume only what may be resumed, a full disk, a diverged model,
and a deleted best.pt.

Each test runs the job as a user does (``python run.py`` where the fault only shows that way, else
``job.run``) and checks both the message (the problem and the way out) and that nothing computed is lost.
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from seqbench import models
from seqbench.reports.load import load as load_records
from seqbench import tasks
from seqbench.harness import checkpoint, io, job, train
from seqbench.harness.evaluate import perplexity
from seqbench.harness.train import TrainConfig, Trainer
from tests.test_reliability import KILL_RUN, TINY, digest, on_disk, run_py, saved_step, temp_files, write_text_files

CPU = torch.device("cpu")


def tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- one run per output folder ---------------------------------------------------------------

@pytest.fixture
def trained(make_cfg, tmp_path):
    """A finished 2-step run (lr 2e-3, seed 1, max_tokens 512): its folder holds best.pt and last.pt."""
    out = tmp_path / "run"
    rec = job.run(make_cfg(*TINY), out)
    assert rec["status"] == "ok" and rec["config"]["trainer"]["lr"] == 0.002
    return out


def test_run_py_in_a_folder_another_run_holds_stops_at_once_and_touches_nothing(make_cfg, trained):
    """This process holds the folder, as a live run does; ``python run.py`` into it must leave everything alone."""
    files = {p.name: digest(p) for p in trained.glob("*.pt")} | {"record.json": digest(trained / "record.json")}
    inode = (trained / "record.json").stat().st_ino
    lock = io.FolderLock(trained)
    try:
        proc = run_py([*TINY, "trainer.max_steps=4"], trained)
        output, _ = proc.communicate(timeout=300)
    finally:
        lock.release()
    assert proc.returncode != 0, output[-3000:]
    assert f"FolderInUse: output folder {trained} is in use by another run (pid {os.getpid()}," in output, output[-3000:]
    assert "Wait for that run to end (or stop it), or give this run another output folder (hydra.run.dir" in output
    assert (trained / "record.json").stat().st_ino == inode  # not even rewritten with the same bytes
    assert {p.name: digest(p) for p in trained.glob("*.pt")} | {"record.json": digest(trained / "record.json")} \
        == files and not temp_files(trained)
    rec = job.run(make_cfg(*TINY, "trainer.max_steps=4"), trained)  # once the holder is gone, the run resumes
    assert rec["status"] == "ok" and rec["resumed_from_step"] == 2


@pytest.mark.slow
def test_two_run_py_in_one_folder_the_second_stops_and_the_first_trains_on(make_cfg, tmp_path):
    out = tmp_path / "run"
    first = run_py([*KILL_RUN, "trainer.max_steps=100000"], out)
    second = None
    try:
        deadline = time.monotonic() + 300
        while saved_step(out / "last.pt") < 2:  # the first run is training and checkpointing
            assert first.poll() is None, first.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the first run never wrote last.pt"
            time.sleep(0.05)
        rec_before, inode = (out / "record.json").read_bytes(), (out / "record.json").stat().st_ino
        second = run_py(KILL_RUN, out)
        output, _ = second.communicate(timeout=120)
        assert second.returncode != 0, output[-3000:]
        assert f"output folder {out} is in use by another run (pid {first.pid}," in output, output[-3000:]
        assert "give this run another output folder (hydra.run.dir" in output
        # the first run's record is the same file, untouched; the first run trains on
        assert (out / "record.json").stat().st_ino == inode and (out / "record.json").read_bytes() == rec_before
        assert json.loads(rec_before)["status"] == "running"
        step = saved_step(out / "last.pt")
        assert first.poll() is None
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
        step = max(step, saved_step(out / "last.pt"))
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)
    # the lock file still names the killed run, but a dead process holds no lock: the next run resumes
    assert (out / ".lock").read_text().strip() == str(first.pid)
    rec = job.run(make_cfg(*KILL_RUN, f"trainer.max_steps={step + 2}"), out)
    assert rec["status"] == "ok" and rec["resumed_from_step"] == step and rec["costs"]["steps"] == step + 2
    assert (out / ".lock").read_text().strip() == str(os.getpid()) and not temp_files(out)


def test_a_folder_lock_is_exclusive_and_released(tmp_path):
    lock = io.FolderLock(tmp_path)
    with pytest.raises(io.FolderInUse, match=rf"output folder {tmp_path} is in use by another run \(pid {os.getpid()},"):
        io.FolderLock(tmp_path)  # another open file description: refused even within one process
    lock.release()
    io.FolderLock(tmp_path).release()


def test_a_file_system_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(io.fcntl, "flock", no_locks)
    io.FolderLock(tmp_path).release()
    assert "this file system has no locks" in caplog.text
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())


# -- resume only what may be resumed ----------------------------------------------------------

def test_resuming_with_other_settings_fails_naming_each_one(make_cfg, trained):
    before = {p.name: digest(p) for p in trained.glob("*.pt")}
    rec = job.run(make_cfg(*TINY, "trainer.lr=1e-3", "seed=2", "trainer.max_tokens=256", "trainer.max_steps=4"),
                  trained, raise_errors=False)
    assert rec["status"] == "failed"
    error = rec["error"]
    assert error.startswith(f"CheckpointError: checkpoint {trained / 'last.pt'} was written by a run with other "
                            "settings or data"), error
    for change in ("seed: 1 -> 2", "trainer.lr: 0.002 -> 0.001", "trainer.max_tokens: 512 -> 256"):
        assert change in error, (change, error)
    assert "max_steps" not in error.split("Differing")[1].split(". To resume")[0]  # a budget: free to change
    olds = error.split("rerun with the checkpoint's values (")[1].split(")")[0].split()
    assert sorted(olds) == ["seed=1", "trainer.lr=0.002", "trainer.max_tokens=512"], error
    assert "new output folder (hydra.run.dir=" in error
    assert {p.name: digest(p) for p in trained.glob("*.pt")} == before


@pytest.mark.parametrize("change", ["trainer.max_steps=4", "eval.decoding.beam=2", "trainer.log_every=2"])
def test_resuming_with_a_larger_budget_or_other_evaluation_settings_continues(make_cfg, trained, change):
    rec = job.run(make_cfg(*TINY, "trainer.max_steps=4", change), trained)
    assert rec["status"] == "ok" and rec["resumed_from_step"] == 2 and rec["costs"]["steps"] == 4


def test_the_cosine_schedules_length_is_not_a_free_budget(make_cfg, tmp_path):
    cosine = [*TINY, "trainer.schedule=cosine"]
    assert job.run(make_cfg(*cosine), tmp_path)["status"] == "ok"
    rec = job.run(make_cfg(*cosine, "trainer.max_steps=4"), tmp_path, raise_errors=False)
    assert rec["status"] == "failed" and "trainer.max_steps: 2 -> 4" in rec["error"], rec["error"]


def _text(words: list[str], lines: int = 40) -> str:
    return "".join(" ".join(words[(i + j) % len(words)] for j in range(7)) + "\n" for i in range(lines))


def test_resuming_on_a_rewritten_training_file_fails_naming_the_data(make_cfg, tmp_path):
    folder = write_text_files(tmp_path / "txt", train=_text(["a", "b", "c", "d", "e", "f"]))
    lm = ["model=lstm_tiny", "task=text_files", f"task.path={folder}", "task.bptt=8", "trainer=smoke",
          "trainer.max_steps=2", "eval.influence=false"]
    first = job.run(make_cfg(*lm), tmp_path / "run")
    assert first["status"] == "ok"
    before = {p.name: digest(p) for p in (tmp_path / "run").glob("*.pt")}
    (folder / "train.txt").write_text(_text(["a", "b", "c", "d", "e", "f"], lines=60))  # the same words, more lines
    rec = job.run(make_cfg(*lm, "trainer.max_steps=4"), tmp_path / "run", raise_errors=False)
    assert rec["status"] == "failed"
    assert rec["task"]["vocab"] == first["task"]["vocab"]  # a vocabulary-size check cannot see it
    assert "Differing (checkpoint -> now): data (train split, sha256 of its token ids): " in rec["error"], rec["error"]
    assert "valid split" not in rec["error"] and "restore the data it was trained on" in rec["error"]
    assert {p.name: digest(p) for p in (tmp_path / "run").glob("*.pt")} == before


# -- a full disk ------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mounted on a fresh folder (root only); its size is set by calling the fixture's value."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    where, mounted = tmp_path / "small", []

    def mount(size_bytes: int) -> Path:
        where.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(where)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
        mounted.append(where)
        return where

    try:
        yield mount
    finally:
        for path in mounted:
            subprocess.run(["umount", str(path)], check=True)


def test_a_real_full_disk_during_a_checkpoint_write_is_a_clear_error(make_cfg, tmp_path, small_disk):
    # 4,000 symbols: an embedding of 512 KB, written past Python's file buffer, as any real model's are; there
    # torch.save itself meets the full disk and says only "RuntimeError: [enforce fail at ...] unexpected pos"
    wide = [*TINY, "task.n_symbols=4000"]
    trained = tmp_path / "run"
    assert job.run(make_cfg(*wide), trained)["status"] == "ok"
    size = sum((trained / n).stat().st_size for n in ("best.pt", "last.pt"))
    disk = small_disk(size + (128 << 10))  # room for the checkpoints and the record, not for another checkpoint
    for name in ("best.pt", "last.pt", "record.json"):
        shutil.copy2(trained / name, disk / name)
    before = {n: digest(disk / n) for n in ("best.pt", "last.pt")}
    rec = job.run(make_cfg(*wide, "trainer.max_steps=4"), disk, raise_errors=False)
    assert rec["status"] == "failed"
    assert rec["error"].startswith("OSError: [Errno 28] no space left on device while writing "), rec["error"]
    assert rec["error"].endswith(".pt; free space or move the output directory (hydra.run.dir / hydra.sweep.dir)")
    assert {n: digest(disk / n) for n in before} == before and not temp_files(disk)  # the checkpoints it had
    assert on_disk(disk)["status"] == "failed" and on_disk(disk)["error"] == rec["error"]


# -- a diverged model -------------------------------------------------------------------------

def _strict_json(path: Path) -> dict:
    def refuse(token):
        raise ValueError(f"{path} holds {token}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_diverged_language_model_fails_cleanly_and_keeps_its_numbers(make_cfg, tmp_path):
    folder = write_text_files(tmp_path / "txt", train=_text(["the", "cat", "sat", "on", "a", "mat"]))
    out = tmp_path / "run"
    # lr 1e3 blows the LSTM's loss up to thousands of nats per token: finite, far beyond exp's range
    rec = job.run(make_cfg("model=lstm_tiny", "task=text_files", f"task.path={folder}", "task.bptt=8",
                           "trainer=smoke", "trainer.lr=1e3", "trainer.schedule=constant", "trainer.warmup_steps=1"),
                  out, raise_errors=False)
    assert rec["status"] == "failed"
    assert rec["error"].startswith("Diverged: the model diverged: its loss (valid "), rec["error"]
    assert "Lower trainer.lr" in rec["error"] and "new output folder" in rec["error"]
    saved = _strict_json(out / "record.json")  # no Infinity/NaN tokens
    for split in ("valid", "test"):
        m = saved["metrics"][split]
        assert m["nll"] > math.log(1.7976931348623157e308) and m["perplexity"] is None and m["diverged"] is True
    assert saved["curves"]["train"] and saved["costs"]["steps"] == 4  # nothing computed is lost
    for row in saved["curves"]["valid"]:
        assert row["valid_ppl"] == (math.exp(row["valid_nll"]) if row["valid_nll"] < 709 else None), row
    runs = load_records([out]).runs  # the report reads it as a failed run naming the divergence
    assert list(runs["status"]) == ["failed"] and "diverged" in runs["error"][0]


def test_validation_perplexity_is_exact_or_null(tmp_path, monkeypatch):
    task = tasks.build({"name": "text_files", "path": str(write_text_files(tmp_path / "txt")), "bptt": 4},
                       {"root": tmp_path})
    model = models.build({"name": "lstm", "d_model": 8, "n_layers": 1}, task)
    trainer = Trainer(model, task, TrainConfig(max_steps=1), tmp_path, CPU, seed=1, identity={})
    for nll, expected in ((60.0, math.exp(60.0)), (5e7, None)):
        monkeypatch.setattr(train, "mean_nll", lambda *a, nll=nll, **k: (nll, 10))
        assert trainer._validate()["valid_ppl"] == expected
    assert perplexity(float("nan")) is None and perplexity(float("inf")) is None


# -- a deleted best.pt --------------------------------------------------------------------------

FOUR = [*TINY, "trainer.max_steps=4"]  # evaluations at steps 2 and 4


def test_deleting_a_corrupt_best_pt_as_advised_recreates_it_from_the_final_model(make_cfg, tmp_path):
    out = tmp_path / "run"
    first = job.run(make_cfg(*FOUR), out)
    curve = first["curves"]["valid"]
    lost = min(curve, key=lambda r: r["valid_nll"])
    best = out / "best.pt"
    best.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    again = [*FOUR, "eval.decoding.beam=2"]  # a setting changed: the finished job is evaluated again (same config: kept)
    broken = job.run(make_cfg(*again), out, raise_errors=False)
    assert broken["status"] == "failed"
    assert f"cannot load checkpoint {best}: it is truncated or corrupt" in broken["error"]
    assert "Delete it and rerun the same command: the run resumes from last.pt" in broken["error"]
    best.unlink()  # the advice
    rec = job.run(make_cfg(*again), out)
    assert rec["status"] == "ok" and rec["resumed_from_step"] == 4
    assert rec["best_recreated"] == {"lost": {"step": lost["step"], "valid_nll": lost["valid_nll"]}, "from_step": 4,
                                     "evals_before": 2, "step": 4, "valid_nll": curve[-1]["valid_nll"]}
    assert rec["curves"]["valid"] == curve  # no evaluation added or changed
    made, last = (torch.load(out / n, weights_only=True) for n in ("best.pt", "last.pt"))
    assert tensors_equal(made["model"], last["model"]) and made["progress"]["step"] == 4
    assert last["progress"]["best_valid_nll"] == curve[-1]["valid_nll"]  # a later resume compares against it
    assert on_disk(out)["best_recreated"]["step"] == 4


def test_a_best_pt_deleted_mid_training_is_rewritten_by_the_next_evaluation(make_cfg, tmp_path):
    out = tmp_path / "run"
    first = job.run(make_cfg(*TINY), out)  # 2 steps, one evaluation
    (out / "best.pt").unlink()
    rec = job.run(make_cfg(*TINY, "trainer.max_steps=6"), out)
    assert rec["status"] == "ok" and rec["resumed_from_step"] == 2
    later = rec["curves"]["valid"][1:]
    assert [r["step"] for r in later] == [4, 6]
    chosen = min(later, key=lambda r: r["valid_nll"])  # the best since, whatever step 2 scored
    assert rec["best_recreated"]["lost"] == {"step": 2, "valid_nll": first["curves"]["valid"][0]["valid_nll"]}
    assert (rec["best_recreated"]["step"], rec["best_recreated"]["valid_nll"]) == (chosen["step"], chosen["valid_nll"])
    assert torch.load(out / "best.pt", weights_only=True)["progress"]["step"] == chosen["step"]


def test_a_checkpoint_from_before_a_new_trainer_setting_resumes_when_the_setting_is_at_its_default():
    """Settings added to the trainer later (carry_state, optimizer, ...) are absent from older checkpoints: at
    their default (what the older code did) the resume goes on; set to anything else it is refused, naming it."""
    saved = {"config": {"trainer": {"lr": 0.002, "warmup_steps": 150}}}
    now = {"config": {"trainer": {"lr": 0.002, "warmup_steps": 150, "carry_state": False, "optimizer": "adam"}}}
    assert checkpoint.mismatch(Path("last.pt"), saved, now) is None
    now["config"]["trainer"]["carry_state"] = True
    assert "trainer.carry_state: (absent) -> true" in checkpoint.mismatch(Path("last.pt"), saved, now)
    now["config"]["trainer"].update(carry_state=False, lr=0.001)  # an old setting changed: refused as before
    assert "trainer.lr: 0.002 -> 0.001" in checkpoint.mismatch(Path("last.pt"), saved, now)


def test_tuned_names_where_settings_came_from_and_the_settings_themselves_are_compared():
    """A run continued with tuned=<file> resumes when the file gives the checkpoint's own trainer settings (e.g. the
    tuning run itself, decoded on test afterwards), and is refused when the file's settings differ."""
    saved = {"config": {"trainer": {"lr": 0.004, "warmup_steps": 50}, "eval": {"splits": ["valid"]}}}
    now = {"config": {"tuned": "tune/tuned.yaml", "trainer": {"lr": 0.004, "warmup_steps": 50},
                      "eval": {"splits": ["valid", "test"]}}}
    assert checkpoint.mismatch(Path("last.pt"), saved, now) is None
    now["config"]["trainer"]["warmup_steps"] = 100
    assert "trainer.warmup_steps: 50 -> 100" in checkpoint.mismatch(Path("last.pt"), saved, now)


def test_records_name_the_commit_the_process_started_from(monkeypatch):
    """A sweep's jobs run the code loaded at its start: a commit made meanwhile must not appear in later records."""
    from seqbench.harness import environment
    heads = iter(["a" * 40, "", "b" * 40, ""])  # rev-parse, status; then what a second lookup would see

    def fake_git(args, **kwargs):
        return subprocess.CompletedProcess(args, 0, stdout=next(heads) + "\n", stderr="")
    environment.git_info.cache_clear()
    monkeypatch.setattr(environment.subprocess, "run", fake_git)
    try:
        first = environment.describe(torch.device("cpu"))
        later = environment.describe(torch.device("cpu"))
        assert first["git_commit"] == later["git_commit"] == "a" * 40 and first["git_dirty"] is False
        assert next(heads) == "b" * 40  # git was asked once
    finally:
        environment.git_info.cache_clear()


def test_a_stop_during_an_evaluation_is_evaluated_again_on_resume(make_cfg, tmp_path, monkeypatch):
    """A stop (SIGTERM, a SLURM requeue) that lands in step 2's validation saves last.pt at step 2 without that
    evaluation; the resumed run evaluates step 2 before training on, so its curve and best.pt are the uninterrupted
    run's."""
    reference = job.run(make_cfg(*FOUR), tmp_path / "reference")
    out, real_check = tmp_path / "run", Trainer.check_stop
    stopped = []

    def stop_once_at_step_2(self):
        if self.p.step == 2 and not stopped:
            stopped.append(self.p.step)
            raise train.Interrupted("stop requested at step 2, during validation")
        return real_check(self)

    monkeypatch.setattr(Trainer, "check_stop", stop_once_at_step_2)
    first = job.run(make_cfg(*FOUR), out, raise_errors=False)
    assert first["status"] == "interrupted" and stopped == [2]
    last = torch.load(out / "last.pt", weights_only=True)["progress"]
    assert last["step"] == 2 and last["evals"] == []  # the cut evaluation is not in the checkpoint
    rec = job.run(make_cfg(*FOUR), out)
    assert rec["status"] == "ok" and rec["resumed_from_step"] == 2
    assert [r["step"] for r in rec["curves"]["valid"]] == [2, 4]
    drop = ("train_seconds",)
    assert ([{k: v for k, v in r.items() if k not in drop} for r in rec["curves"]["valid"]]
            == [{k: v for k, v in r.items() if k not in drop} for r in reference["curves"]["valid"]])
