"""Reliability: bad input fails early and clearly, faults never corrupt what is already computed.

Every test checks two things: the message names the problem and the fix, and nothing already
computed is lost or written wrongly (records stay valid JSON with the right status, checkpoints
keep their bytes, no temporary files are left behind).
"""
from __future__ import annotations

import errno
import gzip
import hashlib
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from seqbench import models
from seqbench import tasks
from seqbench.harness import checkpoint, io, job, schema, secrets, train
from seqbench.harness.checkpoint import CheckpointError
from seqbench.harness.evaluate import evaluate_translation
from seqbench.harness.train import TrainConfig, Trainer
from seqbench.tasks import data as data_mod
from seqbench.tasks.data import DataError
from tests.conftest import ROOT

SMOKE = ["trainer=smoke", "trainer.max_steps=2"]
COPY = ["task=copy", "task.n_train=60", "task.n_valid=4", "task.n_test=4", *SMOKE]
CPU = torch.device("cpu")


# -- helpers ---------------------------------------------------------------------------------

def temp_files(folder: Path) -> list[Path]:
    """Leftovers of an atomic write (``.<name>.<random>.tmp``) or of a download (``tmp*`` folders)."""
    return [p for p in Path(folder).rglob("*") if p.name.endswith(".tmp") or p.name.startswith("tmp")]


def on_disk(folder: Path) -> dict:
    return json.loads((Path(folder) / "record.json").read_text())


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_parallel(folder: Path, n: int = 30, edit=None) -> Path:
    """{train,valid,test}.{src,tgt} with n aligned lines; ``edit(split, src, tgt)`` may change the lists."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid", "test"):
        src = [f"the cat number {i} sat on the mat" for i in range(n)]
        tgt = [f"die katze nummer {i} sass auf der matte" for i in range(n)]
        if edit:
            edit(split, src, tgt)
        for side, lines in (("src", src), ("tgt", tgt)):
            (folder / f"{split}.{side}").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return folder


def write_text_files(folder: Path, train: str = "a b c\nd e f\n") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid", "test"):
        (folder / f"{split}.txt").write_text(train if split == "train" else "a b c\n")
    return folder


def parallel(tmp_path, edit=None, n=30):
    folder = write_parallel(tmp_path / "par", n, edit)
    return ["task=parallel_files", f"task.path={folder}", "task.vocab_size=60", f"data.cache_dir={tmp_path / 'cache'}"]


def _empty_test(split, src, tgt):
    if split == "test":
        src.clear(), tgt.clear()


def _unequal(split, src, tgt):
    if split == "valid":
        del tgt[-3:]


def _non_utf8(tmp_path):
    overrides = parallel(tmp_path)
    path = tmp_path / "par" / "train.tgt"
    raw = path.read_bytes()
    path.write_bytes(raw[:40] + b"\xff\xfe caf\xe9 " + raw[40:])  # Latin-1 bytes, not UTF-8
    return overrides


def _cache_under_a_file(tmp_path):
    (tmp_path / "a_file").write_text("not a folder\n")
    return parallel(tmp_path) + [f"data.cache_dir={tmp_path / 'a_file' / 'cache'}"]


# -- 1. bad input: one table ----------------------------------------------------------------
# (id, overrides or a function of tmp_path returning them, pattern the error must match)
# Each pattern holds the problem and the fix (the valid values, the setting to change).
JOB_CASES = [
    ("unknown_model_name", ["model=transformer_tiny", "model.name=nope", *COPY],
     r"model.name='nope': unknown model 'nope'; valid models: transformer, lstm, gru, convs2s, bytenet, .*gla.* "
     r"\(built in\).*model.architecture"),
    ("unknown_task_name", ["model=transformer_tiny", *COPY, "task.name=nope"],
     r"unknown task 'nope'; valid tasks: assoc_recall, copy, delayed_copy, mad_compression, .*, mqar, multi30k, "
     r"parallel_files, ptb, reverse, text_files"),
    ("d_model_not_divisible_by_heads", ["model=transformer_tiny", "model.n_heads=3", *COPY],
     r"model.d_model=32 is not divisible by model.n_heads=3.*set model.n_heads to a divisor of d_model"),
    ("convs2s_even_kernel", ["model=convs2s_tiny", "model.kernel_size=4", *COPY],
     r"ConvS2S: kernel_size=4 is even.*needs an odd kernel_size; use 3 or 5"),
    ("bytenet_even_kernel", ["model=bytenet_tiny", "model.kernel_size=2", *COPY],
     r"ByteNet: kernel_size=2 is even.*needs an odd kernel_size; use 1 or 3"),
    ("sequence_longer_than_learned_positions", ["model=convs2s_tiny", "model.max_positions=16", *COPY],
     r"max_positions=16 learned positions, but the train split holds a sequence of 21 positions.*"
     r"raise model.max_positions or lower task.max_len below 16"),
    ("unknown_model_hyperparameter", ["model=transformer_tiny", "+model.n_head=4", *COPY],
     r"model.n_head is not a setting of transformer; valid: d_model, n_layers, .*n_heads"),
    ("unknown_task_setting", ["model=transformer_tiny", *COPY, "+task.n_symbol=8"],
     r"task copy does not take \['n_symbol'\]; valid settings: n_train, .*n_symbols"),
    ("unknown_trainer_setting", ["model=transformer_tiny", *COPY, "+trainer.max_step=2"],
     r"unknown trainer settings \['max_step'\]; valid: max_tokens, max_steps, "),
    ("no_budget", ["model=transformer_tiny", *COPY, "trainer.max_steps=null"],
     r"no training budget: set trainer.max_steps, trainer.max_epochs, trainer.max_seconds or trainer.max_flops"),
    ("negative_budget", ["model=transformer_tiny", *COPY, "trainer.max_seconds=-5"],
     r"trainer.max_seconds=-5 is negative; set a positive budget or null"),
    ("bad_schedule_name", ["model=transformer_tiny", *COPY, "trainer.schedule=linear"],
     r"trainer.schedule='linear'; valid: inverse_sqrt, constant, cosine"),
    ("cosine_without_length", ["model=transformer_tiny", *COPY, "trainer.schedule=cosine", "trainer.max_steps=null",
                               "trainer.max_epochs=1"],
     r"trainer.schedule=cosine needs trainer.max_steps, trainer.max_flops or trainer.max_seconds \(its length\)"),
    ("bad_on_nonfinite", ["model=transformer_tiny", *COPY, "trainer.on_nonfinite=ignore"],
     r"trainer.on_nonfinite='ignore'; valid: fail, skip"),
    ("bad_precision", ["model=transformer_tiny", *COPY, "trainer.precision=fp8"],
     r"trainer.precision='fp8'; valid: auto, fp32, bf16, fp16"),
    ("zero_max_tokens", ["model=transformer_tiny", *COPY, "trainer.max_tokens=0"],
     r"trainer.max_tokens=0 must be a positive integer"),
    ("negative_max_tokens", ["model=transformer_tiny", *COPY, "trainer.max_tokens=-512"],
     r"trainer.max_tokens=-512 must be a positive integer"),
    ("max_tokens_below_one_example", ["model=transformer_tiny", *COPY, "trainer.max_tokens=10"],
     r"an example of 21 tokens exceeds max_tokens=10; raise trainer.max_tokens or lower task.max_len"),
    ("zero_log_every", ["model=transformer_tiny", *COPY, "trainer.log_every=0"],
     r"trainer.log_every=0 must be a positive integer"),
    ("bad_dropout", ["model=lstm_tiny", "model.dropout=1.5", *COPY], r"model.dropout=1.5 must be .*in \[0, 1\)"),
    ("bad_min_max_len", ["model=lstm_tiny", *COPY, "task.min_len=9", "task.max_len=4"],
     r"need 1 <= min_len <= max_len; got min_len=9, max_len=4"),
    ("missing_data_folder", lambda t: ["model=lstm_tiny", *SMOKE, "task=parallel_files", f"task.path={t / 'nowhere'}"],
     r"dataset file not found: .*nowhere/train.src.*Put the file there, or point the data root"),
    ("task_path_not_set", ["model=lstm_tiny", *SMOKE, "task=parallel_files"],
     r"task parallel_files needs task.path: set task.path=/path/to/folder holding \{train,valid,test\}.\{src,tgt\}"),
    ("missing_lm_file", lambda t: ["model=lstm_tiny", *SMOKE, "task=text_files", f"task.path={t / 'nowhere'}"],
     r"dataset file not found: .*nowhere/train.txt.*Put the file there"),
    ("missing_public_file_offline", lambda t: ["model=lstm_tiny", *SMOKE, "task=ptb", f"data.root={t}"],
     r"dataset file not found: .*ptb/ptb.train.txt \(downloads are off: data.download=false\).*data.root"),
    ("parallel_line_counts_differ", lambda t: ["model=lstm_tiny", *SMOKE, *parallel(t, _unequal)],
     r"parallel files differ in length: .*valid.src has 30 lines, .*valid.tgt has 27; they must be line-aligned"),
    ("empty_parallel_file", lambda t: ["model=lstm_tiny", *SMOKE, *parallel(t, _empty_test)],
     r"test.src is empty; split 'test' needs at least one sentence pair"),
    ("empty_lm_file", lambda t: ["model=lstm_tiny", *SMOKE, "task=text_files",
                                 f"task.path={write_text_files(t / 'txt', train=chr(10) * 3)}"],
     r"train.txt holds no words; split 'train' needs text"),
    ("all_pairs_too_long", lambda t: ["model=lstm_tiny", *SMOKE, *parallel(t), "task.max_len=2"],
     r"no training pair has 1..2 tokens on both sides"),
    ("non_utf8_bytes", lambda t: ["model=lstm_tiny", *SMOKE, *_non_utf8(t)],
     r"train.tgt is not valid UTF-8 \(byte \d+: invalid start byte\); re-encode it as UTF-8"),
    ("tokenizer_cache_not_writable", lambda t: ["model=lstm_tiny", *SMOKE, *_cache_under_a_file(t)],
     r"cannot write the tokenizer cache under .*a_file/cache: NotADirectoryError.*Point data.cache_dir at a "
     r"writable folder"),
    ("device_not_available", ["model=lstm_tiny", *COPY, "device=cuda:7"] if not torch.cuda.is_available() else
     ["model=lstm_tiny", *COPY, "device=cuda:99"],
     r"device=cuda:\d+ but CUDA is not available; use device=cpu|CUDA|invalid device ordinal"),
]


@pytest.mark.parametrize("case", JOB_CASES, ids=[c[0] for c in JOB_CASES])
def test_bad_input_fails_clearly_before_training(make_cfg, tmp_path, monkeypatch, case):
    _, overrides, pattern = case
    monkeypatch.delenv("SEQBENCH_DATA_ROOT", raising=False)  # it would win over data.root (CI sets it)
    overrides = overrides(tmp_path) if callable(overrides) else overrides
    out = tmp_path / "run"
    rec = job.run(make_cfg(*overrides), out, raise_errors=False)
    assert rec["status"] == "failed", rec.get("error")
    assert re.search(pattern, rec["error"]), rec["error"]
    # the failure is on disk, as valid JSON, and nothing else was written: no checkpoint, no half file
    saved = on_disk(out)
    assert saved["status"] == "failed" and saved["error"] == rec["error"] and saved["job"]["finished"]
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists()
    assert not temp_files(out)
    if (tmp_path / "cache").is_dir():  # a failed tokenizer training leaves no half model in the cache
        assert not temp_files(tmp_path / "cache")


# Hydra composition: an unknown preset never reaches the job; the exception lists the valid options.
HYDRA_CASES = [
    (["model=nope"], r"Could not find 'model/nope'.*Available options in 'model':.*transformer_tiny"),
    (["task=nope"], r"Could not find 'task/nope'.*Available options in 'task':.*multi30k"),
    (["trainer=nope"], r"Could not find 'trainer/nope'.*Available options in 'trainer':.*smoke"),
    (["trainer.max_step=3"], r"Could not override 'trainer.max_step'.*To append to your config use \+trainer.max_step=3"),
]


@pytest.mark.parametrize("overrides,pattern", HYDRA_CASES, ids=[c[0][0] for c in HYDRA_CASES])
def test_unknown_preset_is_a_composition_error_listing_options(make_cfg, overrides, pattern):
    with pytest.raises(ConfigCompositionException) as err:
        make_cfg(*overrides)
    assert re.search(pattern, str(err.value), re.S), str(err.value)


def test_empty_lines_in_parallel_data_are_dropped_from_training_with_a_count(make_cfg, tmp_path):
    """Empty lines: dropped from training (counted in the record); an empty reference in valid/test is kept, scored
    and counted (an empty valid/test source is refused: tests/test_data_checks.py)."""
    def edit(split, src, tgt):
        tgt[7] = ""  # target only
        if split == "train":
            src[3] = tgt[3] = ""  # both sides empty
            src[5] = ""  # source only
    for arch in ("lstm", "convs2s"):  # packed RNNs and learned positions are the fragile ones
        out = tmp_path / arch
        rec = job.run(make_cfg(f"model={arch}_tiny", *SMOKE, *parallel(tmp_path, edit)), out, raise_errors=False)
        assert rec["status"] == "ok", rec["error"]
        assert rec["task"]["sizes"] == {"train": 30, "valid": 30, "test": 30}
        assert rec["task"]["train_pairs_used"] == 27 and rec["task"]["train_pairs_dropped"] == 3
        assert rec["task"]["empty_references"] == {"valid": 1, "test": 1}
        assert all(math.isfinite(r["valid_nll"]) for r in rec["curves"]["valid"])
        assert rec["metrics"]["test"]["sentences"] == 30
        assert len((out / "test.hyp").read_text().splitlines()) == 30


def test_unreadable_data_file():
    """chmod 000 stops a normal user; root reads anything, so as root the test reads as user 'nobody' (seteuid)."""
    folder = Path(tempfile.mkdtemp(prefix="seqbench-unreadable-"))  # under /tmp, reachable by 'nobody'
    os.chmod(folder, 0o755)
    write_text_files(folder)
    (folder / "valid.txt").chmod(0)
    as_root = os.geteuid() == 0
    try:
        if as_root:
            try:
                os.setegid(65534), os.seteuid(65534)
            except PermissionError as err:
                pytest.skip(f"running as root without CAP_SETUID ({err}): root reads any file, so nothing is unreadable")
        try:
            with pytest.raises(DataError, match=rf"dataset file {re.escape(str(folder / 'valid.txt'))} is not readable; "
                                                r"fix its permissions"):
                tasks.build({"name": "text_files", "path": str(folder)}, {"root": folder})
            with pytest.raises(DataError, match=r"cannot read dataset file .*valid.txt: PermissionError.*fix its "
                                                r"permissions or point the data root"):
                data_mod.read_lines(folder / "valid.txt")  # past the check (e.g. permissions changed meanwhile)
        finally:
            if as_root:
                os.seteuid(0), os.setegid(0)
        assert (folder / "train.txt").read_text() == "a b c\nd e f\n"  # the data are left alone
    finally:
        (folder / "valid.txt").chmod(0o644)
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()


def test_a_folder_where_a_file_should_be_is_a_data_error(tmp_path):
    write_text_files(tmp_path / "txt")
    (tmp_path / "txt" / "test.txt").unlink()
    (tmp_path / "txt" / "test.txt").mkdir()
    with pytest.raises(DataError, match=r"dataset file not found: .*test.txt"):
        tasks.build({"name": "text_files", "path": str(tmp_path / "txt")}, {"root": tmp_path})
    with pytest.raises(DataError, match=r"cannot read dataset file .*test.txt: IsADirectoryError.*fix its permissions"):
        data_mod.read_lines(tmp_path / "txt" / "test.txt")


def test_language_model_cannot_be_asked_to_translate(tmp_path):
    """The registry picks the form from the task; building the other form by hand fails at once, clearly."""
    copy = tasks.build({"name": "copy", "n_train": 20, "n_valid": 2, "n_test": 2})
    lm_cls, s2s_cls = models.MODELS["transformer"][1], models.MODELS["transformer"][0]
    lm = lm_cls(copy.src_vocab_size, d_model=32, n_layers=1, n_heads=4, d_ff=64)
    cfg = TrainConfig(max_steps=1)
    with pytest.raises(TypeError, match=r"TransformerLM is a 'lm' model but task 'copy' is a translation task that "
                                        r"needs the 'seq2seq' form; build the model with models.build"):
        Trainer(lm, copy, cfg, tmp_path, CPU, seed=1, identity={})
    with pytest.raises(TypeError, match=r"TransformerLM is a language model and cannot translate.*models.build"):
        evaluate_translation(lm, copy, "test", CPU, {"beam": 1})
    lm_task = tasks.build({"name": "text_files", "path": str(write_text_files(tmp_path / "txt"))}, {"root": tmp_path})
    s2s = s2s_cls(10, 10, 0, d_model=32, n_layers=1, n_heads=4, d_ff=64)
    with pytest.raises(TypeError, match=r"is a 'seq2seq' model but task 'txt' is a lm task that needs the "
                                        r"'lm' form"):
        Trainer(s2s, lm_task, cfg, tmp_path, CPU, seed=1, identity={})
    assert not list(tmp_path.glob("*.pt"))
    # through the registry each family gets its own form
    assert models.build({"name": "lstm", "d_model": 8, "n_layers": 1}, lm_task).form == "lm"
    assert models.build({"name": "lstm", "d_model": 8, "n_layers": 1}, copy).form == "seq2seq"


def test_even_kernels_are_fine_for_causal_language_models():
    """Only the centred encoder needs odd kernels; causal convolutions (the LMs) take any size."""
    for arch in ("convs2s", "bytenet"):
        lm = models.MODELS[arch][1](20, d_model=16, n_layers=2, kernel_size=4)
        assert lm(torch.randint(0, 20, (2, 9))).shape == (2, 9, 20)


# -- checkpoints: truncated, foreign, unsafe -------------------------------------------------

TINY = ["model=transformer_tiny", *COPY, "trainer.eval_every=2"]


@pytest.fixture
def trained(make_cfg, tmp_path):
    """A finished 2-step run: its folder holds best.pt and last.pt."""
    out = tmp_path / "run"
    rec = job.run(make_cfg(*TINY), out)
    assert rec["status"] == "ok" and (out / "last.pt").is_file() and (out / "best.pt").is_file()
    return out


def test_truncated_checkpoint_fails_resume_clearly_and_is_not_trusted(make_cfg, trained):
    last = trained / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    before = {p.name: digest(p) for p in trained.glob("*.pt")}
    rec = job.run(make_cfg(*TINY, "trainer.max_steps=4"), trained, raise_errors=False)
    assert rec["status"] == "failed"
    assert re.search(rf"CheckpointError: cannot load checkpoint {re.escape(str(last))}: it is truncated or corrupt.*"
                     r"Delete it to start over", rec["error"]), rec["error"]
    assert {p.name: digest(p) for p in trained.glob("*.pt")} == before  # nothing overwritten
    assert on_disk(trained)["status"] == "failed" and not temp_files(trained)
    # the fix the message gives works: delete it and the run starts over
    last.unlink()
    again = job.run(make_cfg(*TINY, "trainer.max_steps=4"), trained)
    assert again["status"] == "ok" and again["resumed_from_step"] is None and again["costs"]["steps"] == 4


@pytest.mark.parametrize("change,key", [("model=lstm_tiny", "model"), ("model.d_model=64", "model"),
                                        ("task.n_symbols=40", "vocab")])
def test_checkpoint_of_another_model_or_vocabulary_is_refused(make_cfg, trained, change, key):
    before = {p.name: digest(p) for p in trained.glob("*.pt")}
    rec = job.run(make_cfg(*TINY, change, "trainer.max_steps=4"), trained, raise_errors=False)
    assert rec["status"] == "failed"
    assert re.search(rf"CheckpointError: checkpoint .*last.pt was made for another model or data: \(saved, now\) = "
                     rf"\{{'{key}'.*Use a fresh output directory", rec["error"]), rec["error"]
    assert {p.name: digest(p) for p in trained.glob("*.pt")} == before


def test_the_same_command_again_picks_up_a_finished_job_and_a_changed_one_runs_again(make_cfg, trained):
    """A sweep run again (in parts) returns its finished jobs' records as they stand: nothing trained, evaluated or
    rewritten; a changed setting, trainer.resume=false or a record without a digest runs the job again."""
    finished, files = on_disk(trained), {p.name: digest(p) for p in trained.iterdir() if p.is_file()}
    assert finished["job"]["config_digest"] == job.config_digest(make_cfg(*TINY))
    again = job.run(make_cfg(*TINY), trained)
    assert again == finished and {p.name: digest(p) for p in trained.iterdir() if p.is_file()} == files
    assert not (trained / "previous").exists()
    beam = job.run(make_cfg(*TINY, "eval.decoding.beam=2"), trained)  # evaluated again from last.pt
    assert beam["status"] == "ok" and beam["resumed_from_step"] == 2 and beam["job"]["previous_record"]
    assert beam["job"]["config_digest"] != finished["job"]["config_digest"]
    fresh = job.run(make_cfg(*TINY, "eval.decoding.beam=2", "trainer.resume=false"), trained)
    assert fresh["status"] == "ok" and fresh["resumed_from_step"] is None  # trained from the start
    legacy = on_disk(trained)
    del legacy["job"]["config_digest"]  # a record written before digests were kept
    (trained / "record.json").write_text(json.dumps(legacy))
    rerun = job.run(make_cfg(*TINY, "eval.decoding.beam=2"), trained)
    assert rerun["resumed_from_step"] == 2 and rerun["job"]["previous_record"]  # evaluated again, old record kept
    assert rerun["job"]["config_digest"] == beam["job"]["config_digest"]


def test_a_finished_job_copied_without_checkpoints_is_picked_up_elsewhere(make_cfg, trained, tmp_path):
    """A sweep goes on on another machine from copies of its finished jobs' folders without their checkpoints
    (docs/records/ladder_3x): the record alone makes the job finished; nothing is trained or rewritten."""
    copy = tmp_path / "elsewhere" / "run"
    shutil.copytree(trained, copy, ignore=shutil.ignore_patterns("*.pt", "ckpt", ".lock"))
    files = {p.name: digest(p) for p in copy.iterdir() if p.is_file()}
    assert not list(copy.glob("*.pt"))
    again = job.run(make_cfg(*TINY), copy)
    assert again == on_disk(trained)
    assert {p.name: digest(p) for p in copy.iterdir() if p.is_file() and p.name != ".lock"} == files
    assert not list(copy.glob("*.pt")) and not (copy / "previous").exists()


def test_a_shipped_tuned_file_counts_in_the_digest_from_any_working_directory(make_cfg, tmp_path, monkeypatch):
    """tuned=conf/tuned_settings/... is found from outside the project (harness/tuned.py); the digest that lets a
    sweep run again pick up its finished jobs must read the same file, or no finished job is ever picked up."""
    shipped = "tuned=conf/tuned_settings/multi30k_200_updates.yaml"
    here = job.config_digest(make_cfg(*TINY, shipped))
    monkeypatch.chdir(tmp_path)
    elsewhere = job.config_digest(make_cfg(*TINY, shipped))
    assert here is not None and elsewhere == here != job.config_digest(make_cfg(*TINY))


def test_a_refused_rerun_keeps_the_finished_record_beside_its_own(make_cfg, trained):
    finished = on_disk(trained)
    assert finished["status"] == "ok" and "previous_record" not in finished["job"]
    rec = job.run(make_cfg(*TINY, "model.d_model=64", "trainer.max_steps=4"), trained, raise_errors=False)
    assert rec["status"] == "failed" and "made for another model" in rec["error"]
    assert on_disk(trained)["status"] == "failed"  # record.json says what this run did
    (kept,) = trained.glob("previous/*/record.json")
    assert rec["job"]["previous_record"] == str(kept)
    assert json.loads(kept.read_text()) == finished  # the finished run's record, byte for byte the same content
    # a failed record is not "finished": a second failure leaves the kept one alone
    job.run(make_cfg(*TINY, "model.d_model=64", "trainer.max_steps=4"), trained, raise_errors=False)
    assert json.loads(kept.read_text()) == finished


def test_a_file_that_is_not_a_seqbench_checkpoint_is_refused(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match=r"last.pt is not a seqbench checkpoint \(format 1\); delete it"):
        checkpoint.load(tmp_path / "last.pt", {})
    with pytest.raises(CheckpointError, match=r"best.pt does not exist.*eval.checkpoint=last"):
        checkpoint.load(tmp_path / "best.pt", {})


def test_bad_eval_checkpoint_fails_before_training_and_the_fixed_rerun_trains_from_the_start(make_cfg, tmp_path):
    """eval.checkpoint is checked before training, so a typo costs no training: no checkpoint is written, and
    the corrected command in the same folder trains its two steps from step 0."""
    out = tmp_path / "run"
    rec = job.run(make_cfg(*TINY, "eval.checkpoint=middle"), out, raise_errors=False)
    assert rec["status"] == "failed" and "eval.checkpoint='middle'; valid: best, last" in rec["error"]
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists() and not temp_files(out)
    assert on_disk(out)["status"] == "failed"
    fixed = job.run(make_cfg(*TINY, "eval.checkpoint=last"), out)
    assert fixed["status"] == "ok" and fixed["costs"]["steps"] == 2
    assert fixed["resumed_from_step"] is None


class Payload:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("where", ["top", "inside"])
def test_checkpoint_that_runs_code_is_refused_and_never_runs(tmp_path, where):
    marker = tmp_path / "pwned"
    payload = Payload(str(marker))
    obj = payload if where == "top" else {"format": 1, "identity": {}, "model": {"w": payload}}
    torch.save(obj, tmp_path / "last.pt")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"cannot load checkpoint .*last.pt: it holds objects that are not plain "
                                              r"tensors/containers \(refused: loading it could run code; it asks for io.open\)"):
        checkpoint.load(tmp_path / "last.pt", {})
    assert not marker.exists()
    with pytest.raises(CheckpointError) as err:
        checkpoint.load(tmp_path / "last.pt", {})
    assert "weights_only=False" not in str(err.value)  # never advise loading it the unsafe way


# -- 2. faults -------------------------------------------------------------------------------

def test_nonfinite_step_is_skipped_and_recorded(make_cfg, tmp_path, monkeypatch):
    """trainer.on_nonfinite=skip: a NaN loss skips that update (weights untouched), the job finishes ok."""
    calls = []  # (summed loss, scored target tokens) of each step
    loss_fn = train.smoothed_cross_entropy

    def nan_on_second_step(logits, target, smoothing, ignore_index):
        loss = loss_fn(logits, target, smoothing, ignore_index)
        calls.append((loss.item(), int((target != ignore_index).sum())))
        return loss * float("nan") if len(calls) == 2 else loss

    weights = []  # the parameters after each step
    train_step = train.Trainer.train_step

    def keeping_weights(self, *args, **kwargs):
        loss = train_step(self, *args, **kwargs)
        weights.append([p.detach().clone() for p in self.model.parameters()])
        return loss

    monkeypatch.setattr(train, "smoothed_cross_entropy", nan_on_second_step)
    monkeypatch.setattr(train.Trainer, "train_step", keeping_weights)
    rec = job.run(make_cfg(*TINY, "trainer.max_steps=4", "trainer.on_nonfinite=skip"), tmp_path)
    assert rec["status"] == "ok" and rec["skipped_steps"] == [2]
    assert len(calls) == len(weights) == 4
    assert all(torch.equal(a, b) for a, b in zip(weights[0], weights[1]))  # step 2 left the weights as step 1 did
    assert not all(torch.equal(a, b) for a, b in zip(weights[1], weights[2]))  # step 3 updated them
    steps = [r["step"] for r in rec["curves"]["train"]]
    assert steps == [1, 3, 4]  # the skipped step logs no loss; the others log their loss per token
    assert [r["loss"] for r in rec["curves"]["train"]] == pytest.approx([calls[i][0] / calls[i][1] for i in (0, 2, 3)],
                                                                       rel=1e-6)
    assert all(math.isfinite(r["valid_nll"]) for r in rec["curves"]["valid"])
    assert math.isfinite(rec["metrics"]["test"]["bleu"])
    identity = torch.load(tmp_path / "last.pt", weights_only=True)["identity"]
    ckpt = checkpoint.load(tmp_path / "last.pt", identity)
    assert ckpt["progress"]["skipped_steps"] == [2]
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    # the same fault in the default mode fails the job, naming the step
    calls.clear()
    failed = job.run(make_cfg(*TINY, "trainer.max_steps=4"), tmp_path / "fail", raise_errors=False)
    assert failed["status"] == "failed" and "NonFiniteLoss: training loss is nan at step 2" in failed["error"]
    assert "trainer.on_nonfinite=skip" in failed["error"]


KILL_RUN = ["model=transformer_tiny", "task=copy", "task.n_train=300", "task.n_valid=8", "task.n_test=8",
            "trainer=smoke", "trainer.max_steps=40", "trainer.eval_every=2", "trainer.max_tokens=256",
            "trainer.valid_bleu=false", "trainer.threads=1", "eval.decoding.beam=2"]


def ctrl_c_as_in_a_terminal() -> None:
    """In the child before exec: SIGINT at its default, as a command started from a terminal has it (a suite
    started in the background by a non-interactive shell inherits SIGINT ignored, and Python then keeps ignoring
    it, so a Ctrl-C test would test the shell instead)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_py(args, out: Path, **popen):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "run.py", *args, "device=cpu", "data.download=false",
                             f"hydra.run.dir={out}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **{"preexec_fn": ctrl_c_as_in_a_terminal, **popen})


def saved_step(path: Path) -> int:
    try:
        return torch.load(path, weights_only=True)["progress"]["step"]
    except (OSError, RuntimeError):
        return -1  # not there yet


def kill_after_checkpoint(args, out: Path, at_step: int) -> int:
    """Start run.py and SIGKILL it once last.pt holds step ``at_step`` or later; returns the step saved at death."""
    proc = run_py(args, out)
    deadline = time.monotonic() + 300
    while saved_step(out / "last.pt") < at_step:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, f"last.pt never reached step {at_step}"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return saved_step(out / "last.pt")


def curve(rec, key="loss"):
    rows = rec["curves"]["train"] if key == "loss" else rec["curves"]["valid"]
    return [(r["step"], r[key]) for r in rows]


def test_sigkill_then_resume_equals_an_uninterrupted_run(make_cfg, tmp_path):
    at = random.Random().randrange(2, 26, 2)  # a random checkpoint of the 40 steps; shown on failure
    killed = tmp_path / "killed"
    step = kill_after_checkpoint(KILL_RUN, killed, at)
    assert on_disk(killed)["status"] == "running" and not on_disk(killed)["job"]["finished"]
    assert at <= step < 40, (at, step)
    assert checkpoint.load(killed / "last.pt", torch.load(killed / "last.pt", weights_only=True)["identity"])
    rerun = run_py(KILL_RUN, killed)
    output, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, output[-3000:]
    resumed = on_disk(killed)
    assert resumed["status"] == "ok" and resumed["resumed_from_step"] == step, (at, step)
    full = job.run(make_cfg(*KILL_RUN), tmp_path / "full")  # the same run, never interrupted
    assert curve(resumed) == curve(full), (at, step)  # every loss, the resumed ones included
    assert curve(resumed, "valid_nll") == curve(full, "valid_nll")
    assert resumed["metrics"]["test"]["bleu"] == full["metrics"]["test"]["bleu"]
    assert resumed["metrics"]["valid"]["bleu"] == full["metrics"]["valid"]["bleu"]
    assert (killed / "test.hyp").read_text() == (tmp_path / "full" / "test.hyp").read_text()
    assert not temp_files(killed)  # a checkpoint write cut by the kill leaves a .tmp; the resumed run removes it


class Boom(RuntimeError):
    pass


def test_crash_while_writing_a_record_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "record.json"
    schema.write(path, {"status": "running", "step": 1})
    before = path.read_bytes()
    real = json.dumps
    monkeypatch.setattr(io.json, "dumps", lambda *a, **k: (_ for _ in ()).throw(Boom("crash inside the write")))
    with pytest.raises(Boom):
        schema.write(path, {"status": "ok", "step": 2})
    monkeypatch.setattr(io.json, "dumps", real)
    for crash in (Boom("x"), KeyboardInterrupt()):
        def write(f, crash=crash):
            f.write(b'{"status": "half-writ')
            raise crash
        with pytest.raises(type(crash)):
            io._atomic(path, write)
    assert path.read_bytes() == before and json.loads(before)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]  # no temporary file left


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(make_cfg, trained, monkeypatch):
    last = trained / "last.pt"
    before = digest(last)
    identity = torch.load(last, weights_only=True)["identity"]

    def torn_save(obj, f):
        f.write(b"PK\x03\x04 torn")
        raise Boom("crash inside torch.save")

    monkeypatch.setattr(torch, "save", torn_save)  # harness.io imports torch when saving
    rec = job.run(make_cfg(*TINY, "trainer.max_steps=4"), trained, raise_errors=False)
    assert rec["status"] == "failed" and "crash inside torch.save" in rec["error"]
    assert digest(last) == before and not temp_files(trained)
    assert checkpoint.load(last, identity)["progress"]["step"] == 2  # the next run trusts a sound file
    monkeypatch.undo()
    again = job.run(make_cfg(*TINY, "trainer.max_steps=4"), trained)
    assert again["status"] == "ok" and again["resumed_from_step"] == 2


def test_disk_full_on_checkpoint_write_is_a_clear_error(make_cfg, trained, monkeypatch):
    last = trained / "last.pt"
    before = digest(last)

    def full_disk(obj, f):
        f.write(b"\0" * 1024)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    rec = job.run(make_cfg(*TINY, "trainer.max_steps=4"), trained, raise_errors=False)
    assert rec["status"] == "failed"
    assert re.search(r"OSError: \[Errno 28\] no space left on device while writing .*\.pt; free space or move the "
                     r"output directory \(hydra.run.dir / hydra.sweep.dir\)", rec["error"]), rec["error"]
    assert digest(last) == before and not temp_files(trained)
    assert on_disk(trained)["status"] == "failed"  # the record itself is still written


def _writer(folder: str, name: str, n: int) -> None:
    for i in range(n):
        schema.write(Path(folder) / f"{name}.json", {"status": "running", "writer": name, "i": i, "pad": "x" * 2000})
        schema.write(Path(folder) / "shared.json", {"status": "running", "writer": name, "i": i, "pad": "y" * 2000})


def test_concurrent_record_writers_lose_nothing(tmp_path):
    ctx = multiprocessing.get_context("fork")
    names, n = ["a", "b", "c"], 150
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), name, n)) for name in names]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    for name in names:
        rec = json.loads((tmp_path / f"{name}.json").read_text())
        assert rec["writer"] == name and rec["i"] == n - 1
    shared = json.loads((tmp_path / "shared.json").read_text())  # one writer's whole record, never a mix
    assert shared["writer"] in names and shared["pad"] == "y" * 2000
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{x}.json" for x in names] + ["shared.json"])


# -- 3. determinism --------------------------------------------------------------------------

def test_same_seed_same_settings_give_identical_runs(make_cfg, tmp_path):
    args = ["model=lstm_tiny", *COPY, "trainer.max_steps=6", "trainer.eval_every=3"]  # dropout 0.1: RNG in play
    a = job.run(make_cfg(*args), tmp_path / "a")
    b = job.run(make_cfg(*args), tmp_path / "b")
    assert a["environment"]["deterministic"] is True and on_disk(tmp_path / "a")["environment"]["deterministic"]
    assert curve(a) == curve(b) and curve(a, "valid_nll") == curve(b, "valid_nll")
    for split in ("valid", "test"):
        for m in ("bleu", "chrf", "exact_match"):
            assert a["metrics"][split][m] == b["metrics"][split][m]
    assert (tmp_path / "a" / "test.hyp").read_text() == (tmp_path / "b" / "test.hyp").read_text()
    c = job.run(make_cfg(*args, "seed=2"), tmp_path / "c")
    assert curve(c) != curve(a)  # the seed matters


# -- 4. security: secrets, downloads ---------------------------------------------------------

SECRET = "fake-key-1234567890"
HF = "hf_fakeTokenABCDEFGHIJ"


@pytest.fixture(scope="module")
def secret_run(tmp_path_factory):
    """A run.py job with secrets in the environment and in the config."""
    out = tmp_path_factory.mktemp("secret") / "run"
    env = {**os.environ, "WANDB_API_KEY": SECRET, "HF_TOKEN": HF, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "run.py", "model=lstm_tiny", "task=copy", "task.n_train=60", "task.n_valid=4",
                          "task.n_test=4", "trainer=smoke", "trainer.max_steps=2", "device=cpu", "logger=none",
                          f"+logger.api_key={SECRET}", "+logger.hf_token=${oc.env:HF_TOKEN}",
                          f"hydra.run.dir={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert SECRET not in res.stdout + res.stderr and HF not in res.stdout + res.stderr
    return out


def leaks(folder: Path) -> dict[str, list[str]]:
    found = {}
    for p in folder.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            hits = [s for s in (SECRET, HF) if s.encode() in data]
            if hits:
                found[str(p.relative_to(folder))] = hits
    return found


def test_record_and_log_hold_no_secret(secret_run):
    rec = on_disk(secret_run)
    assert rec["status"] == "ok"
    assert rec["config"]["logger"]["api_key"] == "<redacted>" and rec["config"]["logger"]["hf_token"] == "<redacted>"
    assert not {k: v for k, v in leaks(secret_run).items() if not k.startswith(".hydra/")}


def test_scrub_files_removes_secrets_hydra_wrote(monkeypatch, tmp_path):
    """Hydra dumps the overrides into .hydra/{overrides,config}.yaml; secrets.scrub_files redacts them."""
    import yaml
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    folder = tmp_path / "job"
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(f"- +logger.api_key={SECRET}\n- trainer.max_tokens=512\n")
    (folder / ".hydra" / "config.yaml").write_text(f"logger:\n  api_key: {SECRET}\ntrainer:\n  max_tokens: 512\n")
    (folder / "last.pt").write_bytes(SECRET.encode())  # binary files are not touched
    before = digest(folder / "last.pt")
    assert set(leaks(folder)) >= {".hydra/overrides.yaml", ".hydra/config.yaml"}
    changed = secrets.scrub_files(folder)
    assert {str(p.relative_to(folder)) for p in changed} == {".hydra/overrides.yaml", ".hydra/config.yaml"}
    cfg = yaml.safe_load((folder / ".hydra" / "config.yaml").read_text())
    assert cfg["logger"]["api_key"] == "<redacted>" and cfg["trainer"]["max_tokens"] == 512  # the rest intact
    assert "+logger.api_key=<redacted>" in yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text())
    assert digest(folder / "last.pt") == before and not temp_files(folder)
    assert secrets.scrub_files(folder) == []  # idempotent


def test_job_output_folder_holds_no_secret(secret_run):
    assert leaks(secret_run) == {}


def test_wandb_run_holds_no_secret(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_SILENT", "true")
    rec = job.run(make_cfg("model=lstm_tiny", *COPY, "logger=wandb", f"+logger.api_key={SECRET}"), tmp_path)
    assert rec["status"] == "ok" and list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert leaks(tmp_path) == {}


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_download_with_a_wrong_checksum_is_refused_and_leaves_nothing(tmp_path, monkeypatch, gz):
    good = b"the published file\n"
    packed = gzip.compress(good)
    remote = data_mod.RemoteFile(hashlib.sha256(good).hexdigest(), "https://example.invalid/f" + (".gz" if gz else ""),
                                 hashlib.sha256(packed).hexdigest() if gz else None)
    monkeypatch.setitem(data_mod.KNOWN_FILES, "fake/file.txt", remote)
    fetched = []

    def fake_urlretrieve(url, dest):
        fetched.append(url)
        Path(dest).write_bytes(b"tampered or truncated bytes")

    monkeypatch.setattr(data_mod.urllib.request, "urlretrieve", fake_urlretrieve)
    with pytest.raises(DataError, match=r"checksum mismatch for download https://example.invalid/f.*; not using it"):
        data_mod.resolve(tmp_path, "fake/file.txt")
    assert fetched and not (tmp_path / "fake" / "file.txt").exists()
    assert list((tmp_path / "fake").iterdir()) == []  # no partial file, no temporary folder
    # the right bytes are accepted and verified
    monkeypatch.setattr(data_mod.urllib.request, "urlretrieve",
                        lambda url, dest: Path(dest).write_bytes(packed if gz else good))
    assert data_mod.resolve(tmp_path, "fake/file.txt").read_bytes() == good
