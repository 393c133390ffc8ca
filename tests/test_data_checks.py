"""Data that must not score as ok: test files with CR-only line ends, empty test lines, a language-model test set
of mostly unknown words, and a translation task whose source and target are the same files.

Each check runs ``python run.py`` as a user would, on tiny files; the refusals stop at data loading.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from seqbench import tasks
from seqbench.tasks.data import DataError, read_lines
from tests.conftest import ROOT

PARALLEL = ["model=transformer_tiny", "task=parallel_files", "task.tokenizer=whitespace", "trainer=smoke",
            "trainer.max_steps=2", "eval.influence=false", "eval.decoding.beam=1"]


def run(args: list[str], out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "run.py", *args, "device=cpu", "data.download=false",
                           f"hydra.run.dir={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def write_pairs(folder: Path, n: int = 8, test_src=None, test_tgt=None, end: str = "\n") -> Path:
    """{train,valid,test}.{src,tgt}; ``test_src``/``test_tgt`` replace the test lines, each ended by ``end``."""
    folder.mkdir(parents=True, exist_ok=True)
    src = [f"w{i % 5} w{(i + 1) % 5} w{(i + 2) % 5}" for i in range(n)]
    tgt = [f"v{i % 5} v{(i + 1) % 5}" for i in range(n)]
    for split in ("train", "valid", "test"):
        for side, lines, test in (("src", src, test_src), ("tgt", tgt, test_tgt)):
            lines = test if split == "test" and test is not None else lines
            (folder / f"{split}.{side}").write_bytes("".join(line + end for line in lines).encode())
    return folder


def test_cr_only_test_files_are_split_at_each_cr_and_empty_references_are_counted(tmp_path):
    """Classic Mac OS line ends (a lone CR, no newline anywhere) were read as one line: a test set of six pairs
    scored as one. They are split at the CR; an empty reference among them is counted in the record, with a
    warning naming its line."""
    src = ["w1 w2 w3", "w2 w3", "w4 w0 w1", "w3", "w1 w1", "w0 w2"]
    tgt = ["v1 v2", "v2", "", "v3 v4", "v1", "v0"]
    folder = write_pairs(tmp_path / "data", test_src=src, test_tgt=tgt)
    for side in ("src", "tgt"):  # rewrite the test files with CR-only line ends
        (folder / f"test.{side}").write_bytes("".join(line + "\r" for line in (src if side == "src" else tgt)).encode())
    out = run([*PARALLEL, f"task.path={folder}"], tmp_path / "out")
    assert out.returncode == 0, out.stderr[-3000:]
    rec = json.loads((tmp_path / "out" / "record.json").read_text())
    assert rec["status"] == "ok"
    assert rec["metrics"]["test"]["sentences"] == 6
    assert (tmp_path / "out" / "test.ref").read_text().split("\n")[:6] == tgt
    assert rec["task"]["empty_references"] == {"valid": 0, "test": 1}
    warning = next(w for w in rec["task"]["warnings"] if "empty" in w)
    assert "1 of 6 test references" in warning and "line 3" in warning
    assert "warning" in out.stdout and "references are empty" in out.stdout


def test_read_lines_splits_at_a_lone_cr_only_when_no_newline_is_present(tmp_path):
    path = tmp_path / "f.txt"
    path.write_bytes(b"one\rtwo\r\rfour\r")
    assert read_lines(path) == ["one", "two", "", "four"]
    path.write_bytes(b"one\rtwo\nthree\n")  # a newline present: a lone CR inside a line is text
    assert read_lines(path) == ["one\rtwo", "three"]


def test_empty_test_sources_and_same_languages_are_refused_with_the_fix(tmp_path):
    """An empty source line in the test set would be scored against its reference from nothing: refused, naming
    the file and the lines. ``task.src_lang`` equal to ``task.tgt_lang`` reads one file as both sides (a copy task):
    refused naming both settings and task.allow_same_lang."""
    src = ["w1 w2", "", "w3", "  ", "w4", "w0"]
    folder = write_pairs(tmp_path / "data", test_src=src, test_tgt=["v1"] * 6)
    out = run([*PARALLEL, f"task.path={folder}"], tmp_path / "out")
    assert out.returncode != 0
    message = out.stdout + out.stderr
    assert str(folder / "test.src") in message and "line 2, 4" in message and "empty source" in message
    assert json.loads((tmp_path / "out" / "record.json").read_text())["status"] == "failed"

    same = write_pairs(tmp_path / "same")
    out = run([*PARALLEL, f"task.path={same}", "task.src_lang=src", "task.tgt_lang=src"], tmp_path / "out2")
    assert out.returncode != 0
    message = out.stdout + out.stderr
    assert "task.src_lang='src'" in message and "task.tgt_lang='src'" in message
    assert "task.allow_same_lang=true" in message
    # asked for: the copy task is built (in process: the command line would train it)
    task = tasks.build({"name": "parallel_files", "path": str(same), "tokenizer": "whitespace", "src_lang": "src",
                        "tgt_lang": "src", "allow_same_lang": True}, {"root": tmp_path, "cache_dir": tmp_path / "c"})
    assert task.corpus.src["test"] == task.corpus.tgt["test"]


def test_empty_training_lines_are_still_dropped_not_refused(tmp_path):
    """Only the valid and test splits refuse empty sources; training pairs with an empty side are dropped (and
    counted), as before."""
    folder = write_pairs(tmp_path / "data")
    lines = read_lines(folder / "train.src")
    (folder / "train.src").write_text("\n".join(["", *lines[1:]]) + "\n")
    task = tasks.build({"name": "parallel_files", "path": str(folder), "tokenizer": "whitespace"},
                       {"root": tmp_path, "cache_dir": tmp_path / "c"})
    assert task.describe()["train_pairs_dropped"] == 1
    (folder / "valid.src").write_text("\n".join(["", *lines[1:]]) + "\n")
    try:
        tasks.build({"name": "parallel_files", "path": str(folder), "tokenizer": "whitespace"},
                    {"root": tmp_path, "cache_dir": tmp_path / "c"})
    except DataError as err:
        assert "valid.src" in str(err) and "line 1" in str(err)
    else:
        raise AssertionError("an empty valid source was accepted")


def test_a_language_model_test_set_of_unknown_words_is_flagged(tmp_path):
    """A text test set of 80% words the training text never had scored a perplexity as ok with no sign of it: the
    unknown-token rate of every split is in the record (task.unk_rate, and metrics.<split>.unk_rate beside the
    perplexity), with a warning above 10%; a split under the threshold gets none."""
    folder = tmp_path / "text"
    folder.mkdir()
    known = "the cat sat on the mat"
    (folder / "train.txt").write_text("\n".join([known] * 40) + "\n")
    (folder / "valid.txt").write_text("\n".join([known] * 4) + "\n")
    (folder / "test.txt").write_text("\n".join(["xa xb the xc xd xe xf xg xh cat"] * 4) + "\n")  # 8 of 11 unknown
    out = run(["model=transformer_tiny", "task=text_files", f"task.path={folder}", "task.bptt=8", "trainer=smoke",
               "trainer.max_steps=2", "eval.influence=false"], tmp_path / "out")
    assert out.returncode == 0, out.stderr[-3000:]
    rec = json.loads((tmp_path / "out" / "record.json").read_text())
    assert rec["status"] == "ok"
    rates = rec["task"]["unk_rate"]
    assert rates["train"] == 0 and rates["valid"] == 0 and abs(rates["test"] - 32 / 44) < 1e-6
    assert abs(rec["metrics"]["test"]["unk_rate"] - 31 / 43) < 1e-6  # the scored tokens (the first is context)
    assert rec["metrics"]["valid"]["unk_rate"] == 0
    for split, total in (("valid", 27), ("test", 43)):  # under trainer=smoke's limits: scored whole, and says so
        m = rec["metrics"][split]
        assert (m["tokens_evaluated"], m["tokens_total"], m["limited"], m["tokens"]) == (total, total, False, total)
        assert "limit" not in m
    warnings = [w for w in rec["task"]["warnings"] if "unknown" in w]
    assert len(warnings) == 1 and "72.7%" in warnings[0] and "test split" in warnings[0]
    assert "72.7%" in out.stdout  # the summary repeats the task's warnings
