"""The core modules' small pieces, each against values derived by hand: record writing (harness/schema.py,
harness/io.py), the models' shared blocks (models/common.py), evaluation's helpers (harness/evaluate.py) and the
trainer's settings, budget and snapshot rules (harness/train.py).

Fast and direct: these are the tests the mutation run (``mutmut run``, README "Mutation testing") leans on for
the functions the end-to-end tests reach only through a whole job.
"""
from __future__ import annotations

import errno
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import sacrebleu
import torch

from seqbench.harness import evaluate, io, schema
from seqbench.harness.train import Progress, TrainConfig, Trainer, lr_factor
from seqbench.models import common


def strict_json(text: str):
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def utc(stamp: str) -> datetime:
    parsed = datetime.fromisoformat(stamp)
    assert parsed.tzinfo is not None and parsed.utcoffset().total_seconds() == 0
    return parsed


# -- records: harness/io.py ---------------------------------------------------------------------

def test_finite_replaces_every_non_finite_float_at_any_depth():
    obj = {"a": float("nan"), "b": [1.5, float("inf"), (float("-inf"), 2)], "c": {"d": {"e": float("nan")}},
           "f": 3, "g": "nan", "h": None, "i": True}
    assert io.finite(obj) == {"a": None, "b": [1.5, None, [None, 2]], "c": {"d": {"e": None}}, "f": 3, "g": "nan",
                              "h": None, "i": True}
    assert io.finite(float("inf")) is None and io.finite(0.25) == 0.25


def test_write_json_is_strict_ordered_and_atomic(tmp_path):
    path = tmp_path / "new" / "deeper" / "r.json"  # folders are created
    io.write_json(path, {"z": float("nan"), "a": [float("inf"), 1], "p": Path("/x/y")})
    text = path.read_text()
    assert strict_json(text) == {"z": None, "a": [None, 1], "p": "/x/y"}
    assert list(strict_json(text)) == ["z", "a", "p"]  # the writer's order, not sorted
    assert text.startswith('{\n "z"')  # indented by one space
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.json"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "r.json"
    io.atomic_write_text(path, "old")

    def broken(f):
        f.write(b"half")
        raise ValueError("writer failed")

    with pytest.raises(ValueError, match="writer failed"):
        io._atomic(path, broken)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_a_write_goes_through_a_hidden_temporary_beside_the_target(tmp_path):
    """``.<name>.<random>.tmp`` in the target's folder: what a later run's remove_stale_temps finds after a kill."""
    seen = []

    def writer(f):
        seen.extend(p.name for p in tmp_path.iterdir())
        f.write(b"x")

    io._atomic(tmp_path / "last.pt", writer)
    assert len(seen) == 1 and seen[0].startswith(".last.pt.") and seen[0].endswith(".tmp")
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]

    def vanishing(f):  # the temporary is gone when the write fails: the write's own error still comes through
        for p in tmp_path.glob(".*.tmp"):
            p.unlink()
        raise ValueError("the write's own error")

    with pytest.raises(ValueError, match="the write's own error"):
        io._atomic(tmp_path / "r.json", vanishing)


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left on device"),
                                         (errno.EDQUOT, "disk quota exceeded")])
def test_a_full_disk_during_a_write_names_the_file_and_the_fix(tmp_path, code, words):
    path = tmp_path / "ck.pt"

    def full(f):
        try:
            raise OSError(code, "full")
        except OSError as err:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from err

    with pytest.raises(OSError) as caught:
        io._atomic(path, full)
    assert caught.value.errno == code
    assert str(caught.value).startswith(f"[Errno {code}] {words} while writing {path}; free space")
    assert "hydra.run.dir / hydra.sweep.dir" in str(caught.value)
    assert not list(tmp_path.iterdir())


def test_disk_full_follows_causes_and_contexts_and_stops_at_cycles():
    full = OSError(errno.ENOSPC, "full")
    outer = RuntimeError("outer")
    outer.__context__ = ValueError("middle")
    outer.__context__.__cause__ = full
    assert io._disk_full(outer) == errno.ENOSPC
    assert io._disk_full(OSError(errno.EDQUOT, "quota")) == errno.EDQUOT
    assert io._disk_full(OSError(errno.EACCES, "denied")) is None
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a  # a cycle
    assert io._disk_full(a) is None
    assert io._disk_full(None) is None


def test_remove_stale_temps_removes_only_matching_files(tmp_path):
    for name in (".last.pt.abc.tmp", ".record.json.x.tmp", "last.pt", "keep.tmp"):
        (tmp_path / name).write_text("x")
    removed = io.remove_stale_temps(tmp_path, ".*.pt.*.tmp")
    assert removed == [tmp_path / ".last.pt.abc.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".record.json.x.tmp", "keep.tmp", "last.pt"]
    assert sorted(p.name for p in io.remove_stale_temps(tmp_path)) == [".record.json.x.tmp"]  # default: .*.tmp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.tmp", "last.pt"]


def test_a_folder_lock_holds_the_pid_refuses_a_second_owner_and_is_released(tmp_path):
    import os

    first = io.FolderLock(tmp_path)
    assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    with pytest.raises(io.FolderInUse, match=rf"in use by another run \(pid {os.getpid()},"):
        io.FolderLock(tmp_path)
    first.release()
    second = io.FolderLock(tmp_path)
    assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"  # rewritten, not appended
    second.release()


def test_a_busy_folder_names_the_holder_and_the_fix(tmp_path):
    import fcntl

    holder = open(tmp_path / ".lock", "a+")  # another run, its pid not written yet
    fcntl.flock(holder.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    with pytest.raises(io.FolderInUse) as caught:
        io.FolderLock(tmp_path)
    assert str(caught.value) == (
        f"output folder {tmp_path} is in use by another run (pid not yet written: it is starting, holding "
        f"{tmp_path / '.lock'}); two runs in one folder would overwrite each other's checkpoints and record. Wait "
        "for that run to end (or stop it), or give this run another output folder (hydra.run.dir / hydra.sweep.dir)")
    holder.close()


def test_a_file_system_without_locks_warns_and_goes_on_other_errors_stop(tmp_path, monkeypatch, caplog):
    import fcntl
    import os

    for code in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        def no_locks(fd, op, code=code):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(fcntl, "flock", no_locks)
        caplog.clear()
        with caplog.at_level("WARNING", logger="seqbench"):
            lock = io.FolderLock(tmp_path)
        assert [r.getMessage() for r in caplog.records] == [
            f"cannot lock {tmp_path / '.lock'} ({os.strerror(code)}): this file system has no locks; make sure no "
            "other run uses this output folder"]
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
        lock.release()

    def denied(fd, op):
        raise OSError(errno.EACCES, "denied")

    monkeypatch.setattr(fcntl, "flock", denied)
    with pytest.raises(PermissionError):
        io.FolderLock(tmp_path)


def test_save_torch_round_trips(tmp_path):
    io.save_torch(tmp_path / "t.pt", {"w": torch.arange(3)})
    assert torch.equal(torch.load(tmp_path / "t.pt")["w"], torch.arange(3))
    io.atomic_write_text(tmp_path / "u.txt", "é\n")
    assert (tmp_path / "u.txt").read_bytes() == "é\n".encode("utf-8")


# -- records: harness/schema.py -----------------------------------------------------------------

def test_write_stamps_the_schema_version_first_and_scrubs_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "s3cr3t-value-1234")
    schema.write(tmp_path / "record.json", {"status": "ok", "config": {"api_key": "abc", "note": "s3cr3t-value-1234"},
                                            "x": float("nan")})
    rec = strict_json((tmp_path / "record.json").read_text())
    assert list(rec)[0] == "schema_version" and rec["schema_version"] == schema.SCHEMA_VERSION == 1
    assert rec["status"] == "ok" and rec["x"] is None
    assert "abc" not in json.dumps(rec) and "s3cr3t-value-1234" not in json.dumps(rec)


def test_keep_previous_copies_only_a_finished_record_verbatim(tmp_path):
    path = tmp_path / "record.json"
    assert schema.keep_previous(path) is None  # none yet
    path.mkdir()
    assert schema.keep_previous(path) is None  # not a regular file
    path.rmdir()
    for text in ('{"status": "running"}', "not json", '["ok"]', '{"status": "failed"}'):
        path.write_text(text)
        assert schema.keep_previous(path) is None
        assert not (tmp_path / "previous").exists()
    text = '{"status":   "ok", "job": {"finished": "2026-01-01T10:00:00+00:00"}}\n'  # odd spacing: kept byte for byte
    path.write_text(text)
    kept = schema.keep_previous(path)
    assert kept == tmp_path / "previous" / "2026-01-01T10-00-00-00-00" / "record.json"
    assert kept.read_text() == text and path.read_text() == text
    assert schema.keep_previous(path) == kept and len(list(tmp_path.glob("previous/*"))) == 1  # not kept twice


def test_job_entry_started_and_not_started_records():
    job = schema.job_entry("j", "sw", Path("/out/j"), started="2026-01-01T00:00:00+00:00", slurm_job_id="42")
    assert job == {"name": "j", "sweep": "sw", "output_dir": "/out/j", "started": "2026-01-01T00:00:00+00:00",
                   "finished": None, "slurm_job_id": "42"}
    assert schema.job_entry("k", None, "/o") == {"name": "k", "sweep": None, "output_dir": "/o", "started": None,
                                                 "finished": None, "slurm_job_id": None}
    assert schema.started({"a": 1}, 3, job) == {"status": "running", "error": None, "seed": 3, "config": {"a": 1},
                                                 "job": job}
    rec = schema.not_started({"a": 1}, 3, job, "the sweep was stopped")
    assert rec["status"] == "interrupted" and rec["error"] == "not started: the sweep was stopped"
    assert rec["seed"] == 3 and rec["config"] == {"a": 1}
    assert {k: v for k, v in rec["job"].items() if k != "finished"} == {k: v for k, v in job.items() if k != "finished"}
    assert abs((utc(rec["job"]["finished"]) - datetime.now(timezone.utc)).total_seconds()) < 5
    assert job["finished"] is None  # the caller's entry is left alone
    assert schema.STATUSES == ("running", "ok", "failed", "interrupted")


def test_lost_marks_a_job_failed_whether_or_not_it_wrote_a_record():
    new = schema.lost(None, name="j", out_dir="/o/j", overrides=["seed=1"], slurm_job_id="77", error="OOM killed")
    assert new["status"] == "failed" and new["error"] == "OOM killed" and new["seed"] is None
    assert set(new) == {"status", "seed", "config", "job", "error"}
    assert new["config"] == {"overrides": ["seed=1"]}
    assert {k: v for k, v in new["job"].items() if k != "finished"} == {
        "name": "j", "sweep": None, "output_dir": "/o/j", "started": None, "slurm_job_id": "77"}
    utc(new["job"]["finished"])
    own = {"status": "running", "seed": 5, "config": {"x": 1}, "job": {"name": "j", "finished": None}, "metrics": {}}
    out = schema.lost(own, name="other", out_dir="/z", overrides=[], slurm_job_id="1", error="time limit")
    assert out is own and out["status"] == "failed" and out["error"] == "time limit" and out["seed"] == 5
    assert out["job"]["name"] == "j" and out["config"] == {"x": 1} and out["metrics"] == {}
    utc(out["job"]["finished"])


def test_analysis_record_carries_its_entries():
    job = schema.job_entry("p", None, "/o")
    rec = schema.analysis(status="ok", error=None, seed=1, job=job, config={"c": 1}, environment={"e": 2},
                          model={"name": "lstm"}, task={"name": "t"}, path_length={"mean": 3.0})
    assert {k: v for k, v in rec.items() if k != "job"} == {
        "status": "ok", "error": None, "seed": 1, "config": {"c": 1}, "environment": {"e": 2},
        "model": {"name": "lstm"}, "task": {"name": "t"}, "path_length": {"mean": 3.0}}
    utc(rec["job"]["finished"])
    assert rec["job"]["name"] == "p" and job["finished"] is None


def test_now_is_utc_to_the_second():
    stamp = schema.now()
    assert "." not in stamp and stamp.endswith("+00:00")
    assert abs((utc(stamp) - datetime.now(timezone.utc)).total_seconds()) < 5


# -- models/common.py ---------------------------------------------------------------------------

def test_padding_mask_marks_positions_at_or_past_each_length():
    assert common.padding_mask(torch.tensor([3, 1, 0]), 4).tolist() == [
        [False, False, False, True], [False, True, True, True], [True, True, True, True]]


@pytest.mark.parametrize("d", [6, 5])
def test_sinusoidal_table_follows_the_paper(d):
    table = common.sinusoidal_table(4, d)
    assert table.shape == (4, d)
    for pos in range(4):
        for j in range(d):
            angle = pos / 10000 ** (2 * (j // 2) / d)  # PE(pos, 2i) = sin(pos / 10000^(2i/d)), 2i+1: cos
            assert table[pos, j].item() == pytest.approx(math.sin(angle) if j % 2 == 0 else math.cos(angle), abs=1e-6)


def test_sinusoidal_positions_add_rows_from_the_offset_and_grow_the_table():
    pe = common.SinusoidalPositions(4, init_size=4)
    x = torch.ones(2, 3, 4)
    torch.testing.assert_close(pe(x, offset=1), x + common.sinusoidal_table(4, 4)[1:4])
    out = pe(x, offset=3)  # positions 3..5: past the table of 4
    assert pe.table.size(0) == 8  # doubled (at least the 6 needed)
    torch.testing.assert_close(out, x + common.sinusoidal_table(6, 4)[3:6])
    assert pe(x.bfloat16()).dtype == torch.bfloat16


def test_scaled_embedding_scales_adds_positions_and_zeroes_padding():
    torch.manual_seed(0)
    emb = common.ScaledEmbedding(3000, 64, 0.0, pad_id=0).eval()
    assert torch.count_nonzero(emb.tok.weight[0]) == 0
    assert emb.tok.weight[1:].std().item() == pytest.approx(64 ** -0.5, rel=0.03)  # N(0, d^-1/2)
    tokens = torch.tensor([[5, 0, 7]])
    expected = emb.tok.weight[tokens] * 8.0 + common.sinusoidal_table(5, 64)[2:5]
    torch.testing.assert_close(emb(tokens, offset=2), expected)
    plain = common.ScaledEmbedding(10, 4, 0.0, pad_id=None, positions=False).eval()
    assert plain.pos is None and torch.count_nonzero(plain.tok.weight[0]) == 4
    torch.testing.assert_close(plain(torch.tensor([[0, 9]])), plain.tok.weight[[0, 9]][None] * 2.0)


def test_learned_positions_add_their_rows_and_refuse_past_the_maximum():
    lp = common.LearnedPositions(5, 3)
    x = torch.zeros(1, 2, 3)
    torch.testing.assert_close(lp(x, offset=3), lp.weight[3:5][None])
    with pytest.raises(ValueError, match=r"sequence of 6 positions exceeds max_positions=5; raise the model's"):
        lp(x, offset=4)


def test_shape_checks_name_the_fix():
    common.check_divisible(12, 4)
    with pytest.raises(ValueError, match="d_model=10 is not divisible by n_heads=4"):
        common.check_divisible(10, 4)
    common.check_odd_kernel(3, "convs2s")
    with pytest.raises(ValueError, match="convs2s: kernel_size=4 is even.*use 3 or 5"):
        common.check_odd_kernel(4, "convs2s")


def test_accepted_kwargs_are_the_keyword_only_parameters():
    class M:
        def __init__(self, a, b=1, *, c, d=2, **rest):
            pass

    assert common.accepted_kwargs(M) == ["c", "d"]


def test_causal_conv_pad_adds_zeros_on_the_left_only():
    x = torch.tensor([[[1.0, 2.0]]])
    assert common.causal_conv_pad(x, 2).tolist() == [[[0.0, 0.0, 1.0, 2.0]]]


def test_reorder_state_keeps_source_entries_within_sentences():
    state = {"src_memory": torch.tensor([[1.0], [2.0], [3.0]]), "h": torch.tensor([[10.0], [20.0], [30.0]])}
    index = torch.tensor([2, 2, 0])
    within = common.reorder_state(state, index, within_sentences=True)
    assert within["src_memory"] is state["src_memory"] and within["h"].flatten().tolist() == [30.0, 30.0, 10.0]
    across = common.reorder_state(state, index)
    assert across["src_memory"].flatten().tolist() == [3.0, 3.0, 1.0]
    assert across["h"].flatten().tolist() == [30.0, 30.0, 10.0]


def test_conv_step_is_the_convolution_at_the_last_position():
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(3, 2, kernel_size=3, dilation=2)
    window = torch.randn(4, 3, 5)  # (k-1)d+1 = 5
    torch.testing.assert_close(common.conv_step(conv, window), conv(window)[:, :, -1])


def test_dropout_keeps_each_value_with_one_minus_p_and_rescales():
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\); got 1.0"):
        common.Dropout(1.0)
    with pytest.raises(ValueError, match="got -0.1"):
        common.Dropout(-0.1)
    assert repr(common.Dropout(0.25)) == "Dropout(p=0.25)"
    x = torch.ones(200_000)
    assert common.Dropout(0.0).train()(x) is x and common.Dropout(0.3).eval()(x) is x
    torch.manual_seed(0)
    for p in (0.1, 0.5):
        y = common.Dropout(p).train()(x)
        kept = y != 0
        keep = 1 - round(p * 65536) / 65536
        assert kept.float().mean().item() == pytest.approx(keep, abs=0.005)
        assert torch.all(y[kept] == 1 / keep)  # inverted: E[y] = x


def test_the_model_bases_name_what_a_subclass_must_provide():
    class Tiny(common.LanguageModel):
        def embed(self, tokens):
            return tokens.float() * 10

        def mixing_blocks(self):
            return [lambda x: x + 1, lambda x: x * 2]

        def head(self, x):
            return x - 3

    assert Tiny()(torch.tensor([[1, 2]])).tolist() == [[19.0, 39.0]]  # ((10t + 1) * 2) - 3, blocks in order
    with pytest.raises(TypeError, match="Tiny is a language model and cannot translate"):
        Tiny().encode(torch.zeros(1))
    with pytest.raises(TypeError, match="Tiny is a language model"):
        Tiny().decode_step(torch.zeros(1), {}, 0)
    base = common.Seq2Seq()
    assert base.form == "seq2seq" and common.LanguageModel.form == "lm" and base.max_output_tokens(None) is None
    for call in (lambda: base(None, None, None), lambda: base.encode(None, None),
                 lambda: base.decode_step(None, {}, 0)):
        with pytest.raises(NotImplementedError):
            call()


# -- harness/evaluate.py: the helpers -----------------------------------------------------------

def test_score_translations_always_includes_bleu_first():
    assert evaluate._with_bleu(("chrf",)) == ("bleu", "chrf")
    assert evaluate._with_bleu(("ter", "bleu")) == ("bleu", "ter")
    out = evaluate.score_translations(["a cat sat on the mat"], ["a cat sat on the mat"], ("chrf",))
    assert out["bleu"] == pytest.approx(100.0) and out["chrf"] == pytest.approx(100.0)


def test_scores_by_length_buckets_on_source_length():
    refs = [f"the cat number {i} sat on the mat today" for i in range(7)]
    hyps = [r if i % 2 else "the dog sat" for i, r in enumerate(refs)]
    lengths = [10, 11, 20, 21, 60, 61, 1]
    rows = evaluate.scores_by_length(hyps, refs, lengths, ("bleu",))
    assert [(r["bucket"], r["low"], r["n"]) for r in rows] == [
        ("1-10", 1, 2), ("11-20", 11, 2), ("21-30", 21, 1), ("41-60", 41, 1), (">60", 61, 1)]
    first = [0, 6]  # lengths 10 and 1
    expected = sacrebleu.corpus_bleu([hyps[i] for i in first], [[refs[i] for i in first]]).score
    assert rows[0]["bleu"] == pytest.approx(expected)
    assert rows[1]["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps[1:3], [refs[1:3]]).score)
    assert evaluate.scores_by_length([], [], []) == []


def test_truncation_counts_the_long_sources_and_names_the_first_five(caplog):
    assert evaluate._truncation([[1] * 3, [1] * 4], 4, "test") == {"truncated_sources": 0}
    assert evaluate._truncation([[1] * 9], None, "test") == {"truncated_sources": 0}
    out = evaluate._truncation([[1] * 5, [1] * 2, [1] * 5], 4, "valid")
    assert out["truncated_sources"] == 2
    assert out["warning"] == ("2 of 3 valid source lines (line 1, 3) are longer than 4 tokens and were decoded from "
                              "their first 4 tokens only; raise eval.decoding.max_source_tokens (null: no cap) to "
                              "decode them whole")
    assert [r.getMessage() for r in caplog.records if r.name == "seqbench.evaluate"] == [out["warning"]]
    many = evaluate._truncation([[1] * 5] * 7, 4, "test")
    assert "(line 1, 2, 3, 4, 5, ...)" in many["warning"] and many["truncated_sources"] == 7
    assert "(line 1, 2, 3, 4, 5) are" in evaluate._truncation([[1] * 5] * 5, 4, "test")["warning"]  # all named
    assert "(line 1, 2, 3, 4, 5, ...)" in evaluate._truncation([[1] * 5] * 6, 4, "test")["warning"]


class StubTask:
    """Sources of 2, 1, 3 and 4 tokens; batches of (at most) two in length order, the last sentence in none."""

    metrics = ("bleu", "chrf", "ter")

    def __init__(self):
        self.calls, self.src = [], [[5, 6], [7], [8, 9, 10], [11, 12, 13, 14]]

    def sources(self, split):
        return self.src

    def references(self, split):
        return ["5 6", "7", "8 9 10", "x"]

    def source_batches(self, split, batch_sentences, max_source_tokens, limit):
        self.calls.append((split, batch_sentences, max_source_tokens, limit))
        for idx in ([1, 0], [2]):
            yield idx, torch.zeros(len(idx), 3, dtype=torch.long), torch.tensor([len(self.src[i]) for i in idx])

    def detokenize(self, ids):
        return " ".join(map(str, ids))


class StubModel(torch.nn.Module):
    max_target_positions = None


def test_translate_passes_its_settings_to_the_search_and_returns_corpus_order(monkeypatch):
    searched, casts, checks = [], [], []

    def search(kind):
        def run(model, src, lengths, limits, check_stop=None, **kw):
            assert not torch.is_grad_enabled()
            searched.append((kind, lengths.tolist(), limits, kw))
            checks.append(check_stop)  # the search runs it at every step
            return [[n + 4] for n in lengths.tolist()]
        return run

    def autocast_for(device, precision):
        casts.append((device, precision))
        return precision, __import__("contextlib").nullcontext

    monkeypatch.setattr(evaluate, "greedy", search("greedy"))
    monkeypatch.setattr(evaluate, "beam_search", search("beam"))
    monkeypatch.setattr(evaluate, "autocast_for", autocast_for)
    task, model, cpu = StubTask(), StubModel().train(), torch.device("cpu")
    stops = []

    def stop():
        stops.append(1)

    hyps, seconds = evaluate.translate(model, task, "test", cpu, check_stop=stop)
    assert not model.training and hyps == ["6", "5", "7", ""]  # corpus order; a sentence in no batch stays empty
    assert 0 <= seconds < 5 and len(stops) == 2 and checks == [stop, stop]
    assert task.calls == [("test", 128, 1024, None)] and casts == [(cpu, "fp32")]
    assert searched == [("beam", [1, 2], [11, 12], {"beam": 4, "lenpen": 0.6}),  # int(1.2 n + 10)
                        ("beam", [3], [13], {"beam": 4, "lenpen": 0.6})]
    searched.clear()
    evaluate.translate(model, task, "valid", cpu, beam=1, max_len_a=2.0, max_len_b=1, batch_sentences=7, limit=3,
                       precision="bf16", max_source_tokens=None)
    assert task.calls[-1] == ("valid", 7, None, 3) and casts[-1] == (cpu, "bf16")
    assert searched == [("greedy", [1, 2], [3, 5], {}), ("greedy", [3], [7], {})]
    searched.clear()
    evaluate.translate(model, task, "valid", cpu, beam=2, lenpen=1.0)
    assert [s[3] for s in searched] == [{"beam": 2, "lenpen": 1.0}] * 2


@pytest.mark.parametrize("named", [True, False])
def test_evaluate_translation_scores_the_decoded_lines(monkeypatch, named):
    task = stub = StubTask()
    if not named:  # a task that names no metrics: BLEU and chrF
        task = SimpleNamespace(**{k: getattr(stub, k) for k in ("sources", "references", "source_batches",
                                                                "detokenize")})
    got = {}

    def translate(model, task_, split, device, **kw):
        got.update(kw, split=split)
        return ["5 6", "7", "8 9", "y"], 0.5

    monkeypatch.setattr(evaluate, "translate", translate)
    stop = object()
    out, hyps = evaluate.evaluate_translation(None, task, "test", "dev", {"beam": 3, "max_source_tokens": 2},
                                              check_stop=stop)
    assert got == {"beam": 3, "max_source_tokens": 2, "check_stop": stop, "split": "test"}
    refs = ["5 6", "7", "8 9 10", "x"]
    names = ("bleu", "chrf", "ter") if named else ("bleu", "chrf")
    assert set(out) == {*names, *(f"{n}_signature" for n in names), "bleu_detail", "by_length", "sentences",
                        "decode_seconds", "sentences_per_second", "exact_match", "samples", "truncated_sources",
                        "warning"}
    assert out["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert out["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert out["by_length"] == evaluate.scores_by_length(hyps, refs, [2, 1, 3, 4], names)
    assert out["sentences"] == 4 and out["decode_seconds"] == 0.5 and out["sentences_per_second"] == 8.0
    assert out["exact_match"] == 0.5 and out["samples"] == [{"ref": r, "hyp": h} for h, r in zip(hyps, refs)]
    assert out["truncated_sources"] == 2  # 3 and 4 tokens > 2
    assert out["warning"] == evaluate._truncation([[0] * 2, [0], [0] * 3, [0] * 4], 2, "test")["warning"]
    out, _ = evaluate.evaluate_translation(None, task, "test", "dev", {})
    assert out["truncated_sources"] == 0 and "warning" not in out  # the default cap: 1024 tokens
    stub.src = [[1] * 1024, [1] * 1025, [1], [1]]
    out, _ = evaluate.evaluate_translation(None, task, "test", "dev", {})
    assert out["truncated_sources"] == 1 and "(line 2)" in out["warning"]
    monkeypatch.setattr(evaluate, "translate", lambda *a, **k: (["a"] * 4, 0.0))
    out, _ = evaluate.evaluate_translation(None, task, "test", "dev", {})
    assert out["sentences_per_second"] == 4 / 1e-9


def test_perplexity_is_exp_or_null():
    assert evaluate.perplexity(2.0) == pytest.approx(math.e ** 2)
    assert evaluate.perplexity(0.0) == 1.0
    for bad in (1000.0, float("nan"), float("inf")):
        assert evaluate.perplexity(bad) is None


def test_check_converged_names_each_diverged_split():
    evaluate.check_converged({"valid": {"nll": 3.0}, "test": {"nll": 2.0, "diverged": False}})
    with pytest.raises(evaluate.Diverged) as caught:
        evaluate.check_converged({"valid": {"nll": 812.5, "diverged": True}, "train": {"nll": 1.0},
                                  "test": {"nll": None, "diverged": True}})
    assert str(caught.value) == (
        "the model diverged: its loss (valid 812.5, test not finite nats per token) puts the perplexity beyond any "
        "number (recorded as null, diverged: true). Lower trainer.lr, set trainer.clip_norm or lengthen "
        "trainer.warmup_steps, and rerun in a new output folder")


def test_mean_nll_divides_the_summed_loss_by_the_tokens(monkeypatch):
    calls = []
    monkeypatch.setattr(evaluate, "chunk_nll",
                        lambda *a, **k: calls.append(a + tuple(k.values())) or ([3.0, 5.0], [2, 6]))
    assert evaluate.mean_nll("model", "task", "valid", "dev", 8, "cast") == (1.0, 8)
    assert calls == [("model", "task", "valid", "dev", 8, "cast", None)]  # None: no stop check given
    assert evaluate.mean_nll("model", "task", "valid", "dev", 8, "cast", print) == (1.0, 8) and calls[-1][-1] is print
    monkeypatch.setattr(evaluate, "chunk_nll", lambda *a, **k: ([3.0], [1]))
    assert evaluate.mean_nll(None, None, "valid", None, 8) == (3.0, 1)
    monkeypatch.setattr(evaluate, "chunk_nll", lambda *a, **k: ([], []))
    assert evaluate.mean_nll(None, None, "valid", None, 8) == (0.0, 0)


@pytest.mark.parametrize("metrics", [("ppl",), ("ppl", "bpc")])
def test_lm_scores_turn_summed_losses_into_metrics(monkeypatch, metrics):
    scored = {"chunk_nll": [2.0, 4.0], "chunk_tokens": [1, 2], "nll_sum": 6.0, "tokens": 3, "protocol": "chunks"}
    calls = []
    monkeypatch.setattr(evaluate.lm_protocol, "score", lambda *a, **k: calls.append(a) or dict(scored))
    task = SimpleNamespace(bptt=35, metrics=metrics)
    protocol = evaluate.Protocol("carry", streams=3)  # not the default: each call must pass it on
    out, chunks = evaluate.lm_scores("model", task, "test", "dev", 64, protocol)
    assert calls == [("model", task, "test", "dev", 64, protocol, None)]  # None: no stop check given
    assert out["nll"] == 2.0 and out["perplexity"] == pytest.approx(math.e ** 2)
    assert out["tokens"] == 3 and out["protocol"] == "chunks" and "diverged" not in out
    assert ("bpc" in out) == ("bpc" in metrics)
    if "bpc" in metrics:
        assert out["bpc"] == pytest.approx(2.0 / math.log(2))
    assert chunks == {"split": "test", "bptt": 35, "protocol": "carry", "nll": [2.0, 4.0], "tokens": [1, 2]}
    assert evaluate.evaluate_lm("model", task, "test", "dev", 64, protocol) == out
    assert calls[-1] == ("model", task, "test", "dev", 64, protocol, None)
    _, bare = evaluate.lm_scores(None, SimpleNamespace(), "test", None, 64)  # a task naming no bptt or metrics
    assert bare["bptt"] is None

    monkeypatch.setattr(evaluate.lm_protocol, "score", lambda *a, **k: {**scored, "nll_sum": 3000.0, "tokens": 1})
    out, _ = evaluate.lm_scores(None, task, "test", None, 64)
    assert out["nll"] == 3000.0 and out["perplexity"] is None and out["diverged"] is True
    monkeypatch.setattr(evaluate.lm_protocol, "score",
                        lambda *a, **k: {**scored, "nll_sum": float("inf"), "tokens": 0})
    out, _ = evaluate.lm_scores(None, task, "test", None, 64)
    assert out["nll"] is None and out["diverged"] is True


# -- harness/train.py: settings, schedule, budget, snapshots ------------------------------------

@pytest.mark.parametrize("settings, message", [
    ({"max_steps": 5, "bogus": 1}, r"unknown trainer settings \['bogus'\]; valid: max_tokens, max_steps"),
    ({}, "no training budget"),
    ({"max_steps": -1}, r"trainer.max_steps=-1 is negative"),
    ({"max_steps": 5, "max_epochs": -0.5}, r"trainer.max_epochs=-0.5 is negative"),
    ({"max_steps": 5, "max_seconds": -2}, r"trainer.max_seconds=-2 is negative"),
    ({"max_steps": 5, "max_tokens": 0}, r"trainer.max_tokens=0 must be a positive integer"),
    ({"max_steps": 5, "eval_every": 2.5}, r"trainer.eval_every=2.5 must be a positive integer"),
    ({"max_steps": 5, "log_every": 0}, r"trainer.log_every=0 must be a positive integer"),
    ({"max_steps": 5, "precision": "fp8"}, r"trainer.precision='fp8'; valid: auto, fp32, bf16, fp16"),
    ({"max_steps": 5, "schedule": "linear"}, r"trainer.schedule='linear'; valid: inverse_sqrt"),
    ({"max_epochs": 1, "schedule": "cosine"}, "cosine needs trainer.max_steps, trainer.max_flops or trainer.max_seconds"),
    ({"max_steps": 5, "threads": 0}, r"trainer.threads=0; valid: auto"),
    ({"max_steps": 5, "threads": True}, r"trainer.threads=True; valid: auto"),
    ({"max_steps": 5, "threads": "all"}, r"trainer.threads='all'; valid: auto"),
    ({"max_steps": 5, "on_nonfinite": "ignore"}, r"trainer.on_nonfinite='ignore'; valid: fail, skip"),
])
def test_train_config_refuses_bad_settings_naming_them(settings, message):
    with pytest.raises((TypeError, ValueError), match=message):
        TrainConfig(**settings)


def test_train_config_accepts_the_edges():
    assert TrainConfig(max_steps=0, max_epochs=1).max_steps == 0
    assert TrainConfig(max_seconds=1, schedule="cosine").schedule == "cosine"
    assert TrainConfig(max_steps=5, max_epochs=None, max_seconds=None, threads=None).threads is None
    assert TrainConfig(max_steps=5, threads=1, max_tokens=1, eval_every=1, log_every=1).threads == 1
    assert TrainConfig(max_steps=5, betas=[0.8, 0.9]).betas == (0.8, 0.9)


def test_warm_up_of_the_constant_and_cosine_schedules():
    const = TrainConfig(max_steps=100, schedule="constant", warmup_steps=4)
    assert [lr_factor(const, s) for s in (0, 1, 3, 50)] == [0.25, 0.5, 1.0, 1.0]
    assert lr_factor(TrainConfig(max_steps=100, schedule="constant", warmup_steps=0), 0) == 1.0
    assert lr_factor(TrainConfig(max_steps=100, warmup_steps=0), 3) == pytest.approx(0.5)  # inverse_sqrt: 1/sqrt(4)
    cos = TrainConfig(max_steps=14, schedule="cosine", warmup_steps=4, min_lr_ratio=0.2)
    assert lr_factor(cos, 1) == pytest.approx(0.5)  # in the warm-up: 2/4 of the peak, no decay yet
    assert lr_factor(cos, 3) == pytest.approx(1.0)  # the warm-up's end
    assert lr_factor(cos, 8) == pytest.approx(0.2 + 0.8 * 0.5)  # halfway: (9 - 4) / (14 - 4)
    assert lr_factor(cos, 13) == pytest.approx(0.2) and lr_factor(cos, 40) == pytest.approx(0.2)


def bare_trainer(cfg: TrainConfig, **progress) -> Trainer:
    """A Trainer with only its settings, progress and schedule: what the budget and snapshot rules read."""
    t = object.__new__(Trainer)
    t.cfg, t.p, t.dist, t.out_dir = cfg, Progress(**progress), SimpleNamespace(main=True), Path("/nonexistent")
    t.sched, t.model, t.identity, t.keep_snapshots = SimpleNamespace(base_lrs=[cfg.lr]), None, {}, 3
    return t


def test_budget_left_stops_at_each_budget():
    assert bare_trainer(TrainConfig(max_steps=10), step=9).budget_left(5)
    assert not bare_trainer(TrainConfig(max_steps=10), step=10).budget_left(5)
    assert not bare_trainer(TrainConfig(max_steps=0, max_seconds=9)).budget_left(5)  # 0 steps: none
    epochs = TrainConfig(max_epochs=1.5)
    assert bare_trainer(epochs, epoch=1, batch_in_epoch=4).budget_left(10)
    assert not bare_trainer(epochs, epoch=1, batch_in_epoch=5).budget_left(10)
    assert not bare_trainer(TrainConfig(max_epochs=1), epoch=1).budget_left(0)  # an empty epoch counts as 1 batch
    assert bare_trainer(TrainConfig(max_seconds=10), train_seconds=9.99).budget_left(5)
    assert not bare_trainer(TrainConfig(max_seconds=10), train_seconds=10.0).budget_left(5)
    plateau = TrainConfig(max_steps=100, schedule="plateau", lr=1e-3, lr_shrink=0.1, stop_lr=5e-5)
    assert bare_trainer(plateau, lr_shrinks=1).budget_left(5)  # 1e-4 >= 5e-5
    assert not bare_trainer(plateau, lr_shrinks=2).budget_left(5)  # 1e-5 < 5e-5
    assert bare_trainer(TrainConfig(max_steps=100, lr=1e-3, stop_lr=5e-5), lr_shrinks=2).budget_left(5)  # not plateau


def test_eta_takes_the_nearer_budget():
    assert bare_trainer(TrainConfig(max_seconds=600), train_seconds=300).eta() == "5.0min"
    assert bare_trainer(TrainConfig(max_steps=100), step=50, train_seconds=60).eta() == "1.0min"
    assert bare_trainer(TrainConfig(max_steps=100), step=0).eta() == "?"
    assert bare_trainer(TrainConfig(max_steps=100, max_seconds=600), step=50, train_seconds=120).eta() == "2.0min"
    assert bare_trainer(TrainConfig(max_steps=100, max_seconds=150), step=50, train_seconds=120).eta() == "0.5min"
    assert bare_trainer(TrainConfig(max_seconds=60), train_seconds=90).eta() == "0.0min"


def test_snapshots_are_due_every_k_steps_every_s_seconds_and_at_the_end(monkeypatch, tmp_path):
    from seqbench.harness import checkpoint

    saved = []
    monkeypatch.setattr(checkpoint, "save_snapshot",
                        lambda out, **kw: saved.append((kw["progress"]["step"], kw["keep"])))

    def run(cfg, final=False, **progress):
        saved.clear()
        t = bare_trainer(cfg, **progress)
        t.out_dir = tmp_path
        t.snapshot(final=final)
        return saved[:], t.p.snapshot_seconds

    assert run(TrainConfig(max_steps=9)) == ([], 0.0)  # no snapshots asked for
    assert run(TrainConfig(max_steps=9), final=True, step=9) == ([], 0.0)
    assert run(TrainConfig(max_steps=9, save_every=3), step=6, train_seconds=4.0) == ([(6, 3)], 4.0)
    assert run(TrainConfig(max_steps=9, save_every=3), step=7, train_seconds=4.0) == ([], 0.0)
    assert run(TrainConfig(max_steps=9, save_every=3), final=True, step=7, train_seconds=5.0) == ([(7, 3)], 5.0)
    every_10s = TrainConfig(max_steps=9, save_every_seconds=10)
    assert run(every_10s, step=2, train_seconds=19.0, snapshot_seconds=9.0) == ([(2, 3)], 19.0)
    assert run(every_10s, step=2, train_seconds=18.9, snapshot_seconds=9.0) == ([], 9.0)
    checkpoint.snapshot_path(tmp_path, 7).parent.mkdir(parents=True, exist_ok=True)
    checkpoint.snapshot_path(tmp_path, 7).write_bytes(b"")  # the final step's snapshot exists already
    assert run(TrainConfig(max_steps=9, save_every=3), final=True, step=7, train_seconds=5.0) == ([], 0.0)


# -- tasks/batching.py: language-model chunks and data-parallel shards ----------------------------

def test_lm_batches_cut_the_stream_into_next_token_chunks():
    from seqbench.tasks.batching import lm_batches

    def rows(batches):
        return [(b.inputs["tokens"].tolist(), b.target.tolist(), b.n_tokens, b.ignore_index) for b in batches]

    # 11 tokens, bptt 3: chunks start at 0, 3, 6, 9; the one at 9 has a single next token left (10)
    assert rows(lm_batches(np.arange(11), 3, 2, False, 0, 0)) == [
        ([[0, 1, 2], [3, 4, 5]], [[1, 2, 3], [4, 5, 6]], 6, -100),
        ([[6, 7, 8]], [[7, 8, 9]], 3, -100),
        ([[9]], [[10]], 1, -100)]
    # 10 tokens: three full chunks, nothing left over (token 9 is the last target)
    assert rows(lm_batches(np.arange(10), 3, 2, False, 0, 0)) == [
        ([[0, 1, 2], [3, 4, 5]], [[1, 2, 3], [4, 5, 6]], 6, -100),
        ([[6, 7, 8]], [[7, 8, 9]], 3, -100)]


def test_lm_batches_shuffle_by_seed_and_epoch_and_still_predict_every_token_once():
    from seqbench.tasks.batching import lm_batches

    stream = np.arange(100)

    def order(seed, epoch):
        return [b.inputs["tokens"][:, 0].tolist() for b in lm_batches(stream, 3, 4, True, seed, epoch)]

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1) and order(1, 0) != order(2, 0)
    assert order(1, 0) != [b.inputs["tokens"][:, 0].tolist() for b in lm_batches(stream, 3, 4, False, 1, 0)]
    targets = sorted(t for b in lm_batches(stream, 3, 4, True, 1, 0) for t in b.target.flatten().tolist())
    assert targets == list(range(1, 100))


def test_a_batch_shards_into_contiguous_near_equal_parts():
    from seqbench.tasks.batching import Batch

    target = torch.tensor([[1, 0], [2, 2], [3, 0], [4, 4], [5, 5]])  # 0: padding
    batch = Batch({"src": torch.arange(5)[:, None] * 10, "n": torch.arange(5)}, target, 8, [7, 8, 9, 10, 11], 0)
    first, second = batch.shard(0, 2), batch.shard(1, 2)
    assert first.target.tolist() == [[1, 0], [2, 2], [3, 0]] and second.target.tolist() == [[4, 4], [5, 5]]
    assert first.inputs["src"].flatten().tolist() == [0, 10, 20] and second.inputs["n"].tolist() == [3, 4]
    assert (first.n_tokens, second.n_tokens) == (4, 4) and (first.index, second.index) == ([7, 8, 9], [10, 11])
    assert first.ignore_index == second.ignore_index == 0
    lm = Batch({"tokens": torch.zeros(2, 3)}, torch.zeros(2, 3, dtype=torch.long), 6, ignore_index=-100)
    halves = [lm.shard(r, 2) for r in (0, 1)]
    assert [h.n_tokens for h in halves] == [3, 3] and halves[1].index is None and halves[1].ignore_index == -100
    with pytest.raises(ValueError) as caught:
        lm.shard(0, 3)
    assert str(caught.value) == ("a batch of 2 sequences cannot be split over 3 processes; raise trainer.max_tokens "
                                 "(it is the batch of one optimizer step, shared by all processes)")


def test_a_language_model_refuses_to_translate_with_the_fix():
    class Tiny(common.LanguageModel):
        pass

    with pytest.raises(TypeError) as caught:
        Tiny().encode()
    assert str(caught.value) == (
        "Tiny is a language model and cannot translate (no encoder); a translation task needs the encoder-decoder "
        "form: build the model with models.build(cfg, task), which picks the form from the task's family")


# -- harness/decode.py: the EOS forced at the length cap -----------------------------------------

def test_force_eos_ends_the_capped_sentences_beams_charging_their_eos():
    """Two sentences, two beams each; sentence 1 reaches its cap of 3 tokens at step 3, sentence 0 does not.
    Each live beam of sentence 1 is offered as finished (sentence, score, row), ended with its own row's EOS
    log-probability and scored by the GNMT penalty of 4 tokens (the EOS counts): ((5 + 4) / 6) ** 1 = 1.5, best
    first; a beam holding no hypothesis offers none."""
    from seqbench.harness.decode import force_eos

    scores = torch.tensor([[-0.5, -0.7], [-1.0, -2.0]])
    eos = torch.tensor([-0.1, -0.3, -0.2, -0.4])  # one per row: sentence i, beam b is row 2 i + b
    offered = []

    def offer(sentence, score, row):
        offered.append((sentence, pytest.approx(score), row))

    force_eos(offer, [0, 1], [5, 3], 3, scores, eos, 1.0)
    assert offered == [(1, -1.2 / 1.5, 2), (1, -2.4 / 1.5, 3)]
    offered.clear()
    force_eos(offer, [0, 1], [5, 3], 3, torch.tensor([[0.0, 0.0], [-1.0, float("-inf")]]), eos, 1.0)
    assert offered == [(1, -1.2 / 1.5, 2)]
