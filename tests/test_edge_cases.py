"""Edges of the core modules that the broader tests pass over: a sentence decoded after another one's length cap,
tensors moved to another device, the exact dropout mask, buffers that checkpoints must not carry, records read
under a non-UTF-8 locale, and the exact messages of refused input.

Where a device matters, the tensors go to PyTorch's ``meta`` device (shapes and devices, no data), which every
build has: code that builds a tensor on the default device instead of its input's fails there as it would on a GPU.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from seqbench.harness import distributed, evaluate, io, schema
from seqbench.harness.decode import beam_search, greedy
from seqbench.models import common
from seqbench.tasks.batching import Batch, token_budget_batches
from seqbench.tasks.vocab import BOS, EOS
from tests.test_catch import NEVER, A, B, TableDecoder, V, sources

META = torch.device("meta")
ROOT = Path(__file__).resolve().parents[1]


# -- harness/decode.py -------------------------------------------------------------------------------------------

def steady(n: int) -> TableDecoder:
    """``n`` sentences whose next-token log-probabilities are the same at every step: token A (~0), then B, then
    EOS, whatever came before (test_catch's table decoder)."""
    table = torch.full((n, 1, V, V), NEVER)
    table[..., A], table[..., B], table[..., EOS] = 0.0, -2.0, -4.0
    return TableDecoder(table)


class CheckedTable(TableDecoder):
    """A table decoder that checks what the search hands it: CPU tensors, each state row naming a real sentence,
    and as previous tokens only BOS or tokens it can have chosen (A, B)."""

    def decode_step(self, prev, state, step):
        assert prev.device.type == "cpu" and state["src_sentence"].device.type == "cpu"
        assert set(prev.tolist()) <= {BOS, A, B} and set(state["src_sentence"].tolist()) <= {0, 1}
        with torch.device(prev.device):  # the stub's own table lookup, not under test, stays on the input's device
            return super().decode_step(prev, state, step)


def test_a_sentence_past_its_cap_does_not_end_the_sentences_after_it():
    """Sentence 0 may have 1 token, sentence 1 three: at step 1 the search ends sentence 0 with a forced EOS and must
    go on with sentence 1 (the best hypothesis repeats token 3 up to its own cap)."""
    src, lengths = sources(2)
    for beam in (1, 2):
        assert beam_search(steady(2), src, lengths, [1, 3], beam=beam, lenpen=0.0) == [[A], [A, A, A]]
        assert beam_search(steady(2), src, lengths, [3, 1], beam=beam, lenpen=0.0) == [[A, A, A], [A]]


def test_decoding_builds_every_tensor_on_the_sources_device():
    """With another default device (here ``meta``, as ``torch.set_default_device("cuda")`` would be), a search over
    CPU sources must still run on the CPU and give the same hypotheses: no tensor may land on the default device."""
    src, lengths = sources(2)
    table = steady(2).table

    def both():
        checked = CheckedTable(table)
        return [beam_search(checked, src, lengths, [1, 3], beam=2), greedy(checked, src, lengths, [1, 3])]

    expected = both()
    torch.set_default_device(META)
    try:
        got = both()
    finally:
        torch.set_default_device(None)
    assert got == expected == [[[A], [A, A, A]]] * 2


# -- harness/evaluate.py -----------------------------------------------------------------------------------------

class MetaSources:
    """Two sentences of a task, batched on the CPU like every task's batches."""

    def sources(self, split):
        return [[5, 6], [7]]

    def source_batches(self, split, batch_sentences, max_source_tokens, limit):
        yield [0, 1], torch.tensor([[5, 6], [7, 0]]), torch.tensor([2, 1])

    def batches(self, split, max_tokens):
        return [Batch({"tokens": torch.tensor([[5, 6]])}, torch.tensor([[6, 7]]), 2, ignore_index=-100)]

    def detokenize(self, ids):
        return " ".join(map(str, ids))


def test_evaluation_moves_each_batch_to_the_jobs_device(monkeypatch):
    """Translation hands the search its sources and lengths on the job's device, and scoring feeds the model its
    batch there (``meta`` here: the searches, length limits and sums are recorded instead of computed)."""
    seen = []

    def search(model, src, lengths, limits, **kw):
        seen.append(("search", src.device, lengths.device))
        return [[1], [2]]

    monkeypatch.setattr(evaluate, "beam_search", search)
    monkeypatch.setattr(evaluate, "max_lengths", lambda lengths, a, b, model: seen.append(("limits", lengths.device))
                        or [3, 3])
    monkeypatch.setattr(evaluate, "autocast_for", lambda device, precision: (precision, contextlib.nullcontext))
    hyps, _ = evaluate.translate(torch.nn.Module(), MetaSources(), "test", META)
    assert hyps == ["1", "2"] and seen == [("limits", META), ("search", META, META)]

    def sums(logits, target, ignore_index):
        seen.append(("nll", logits.device, target.device))
        return [4.0], [2]

    monkeypatch.setattr(evaluate, "sequence_nll", sums)
    class Scorer(torch.nn.Module):
        def forward(self, tokens):
            return torch.zeros(*tokens.shape, 9, device=tokens.device)

    assert evaluate.chunk_nll(Scorer(), MetaSources(), "test", META, 64, contextlib.nullcontext) == ([4.0], [2])
    assert seen[-1] == ("nll", META, META)


def test_an_agreement_between_ranks_is_a_max_or_a_sum_and_nothing_else():
    """Outside a process group ``agree`` returns this rank's values; an unknown reduction is refused, not summed."""
    assert distributed.agree([1.0, 2.0]) == [1.0, 2.0] and distributed.agree([3.0], op="sum") == [3.0]
    with pytest.raises(ValueError, match=r"^agree\(op='SUM'\): op must be 'max' or 'sum'$"):
        distributed.agree([1.0], op="SUM")


# -- tasks/batching.py -------------------------------------------------------------------------------------------

def test_a_batch_moved_to_a_device_moves_every_tensor_and_keeps_its_bookkeeping():
    batch = Batch({"src": torch.ones(2, 3, dtype=torch.long), "src_lengths": torch.tensor([3, 2])},
                  torch.ones(2, 4, dtype=torch.long), n_tokens=7, index=[5, 1], ignore_index=-100)
    moved = batch.to(META)
    assert {k: v.device for k, v in moved.inputs.items()} == {"src": META, "src_lengths": META}
    assert moved.target.device == META and moved.target.shape == (2, 4)
    assert (moved.n_tokens, moved.index, moved.ignore_index) == (7, [5, 1], -100)


def test_an_example_longer_than_the_token_budget_is_refused_with_the_fix():
    with pytest.raises(ValueError) as caught:
        token_budget_batches(np.array([3, 9]), np.array([2, 4]), 8, shuffle=False, seed=0, epoch=0)
    assert str(caught.value) == ("an example of 9 tokens exceeds max_tokens=8; raise trainer.max_tokens or lower "
                                 "task.max_len")


# -- models/common.py --------------------------------------------------------------------------------------------

def test_padding_mask_is_built_on_the_lengths_device():
    mask = common.padding_mask(torch.tensor([1, 3], device=META), 4)
    assert mask.device == META and mask.shape == (2, 4) and mask.dtype == torch.bool


def test_position_tables_start_at_position_zero_and_stay_out_of_checkpoints():
    """Without an offset, the first position added is row 0; the sinusoidal table is recomputed, never saved (a
    checkpoint holds only learned weights, and a grown table would not load into a fresh model)."""
    x = torch.zeros(1, 3, 4)
    sin = common.SinusoidalPositions(4, init_size=8)
    torch.testing.assert_close(sin(x), common.sinusoidal_table(3, 4)[None])
    assert "table" not in sin.state_dict() and sin.state_dict() == {}
    learned = common.LearnedPositions(5, 4)
    torch.testing.assert_close(learned(x), learned.weight[:3][None])


def test_a_grown_position_table_lives_on_the_inputs_device():
    pe = common.SinusoidalPositions(4, init_size=2).to(META)
    out = pe(torch.zeros(1, 5, 4, device=META))
    assert out.device == META and pe.table.device == META and pe.table.size(0) == 5


def test_the_padding_embedding_stays_zero_under_training():
    """The PAD row is the embedding of padding: zero at the start and given no gradient, so it stays zero."""
    emb = common.ScaledEmbedding(6, 4, 0.0, pad_id=0, positions=False)
    emb(torch.tensor([[0, 3, 0, 5]])).sum().backward()
    grad = emb.tok.weight.grad
    assert torch.count_nonzero(grad[0]) == 0
    assert torch.count_nonzero(grad[3]) == 4 and torch.count_nonzero(grad[1]) == 0  # others: only the used rows


def test_cpu_dropout_keeps_exactly_the_values_whose_16_bit_draw_clears_p():
    """The documented draw: the generator's 64-bit words, read as four 16-bit integers each; a value is kept when its
    integer, as an unsigned u in [0, 65536), is at least round(p * 65536), and scaled by 65536 / (65536 - that).
    p = 0.9 is where p * 65536 (58982.4) and p * 65537 (58983.3) round apart."""
    n, p = 1 << 20, 0.9
    torch.manual_seed(11)
    y = common.Dropout(p).train()(torch.ones(n))
    torch.manual_seed(11)
    words = torch.empty(n // 4, dtype=torch.int64).random_(-(2**63), None)
    u = words.view(torch.int16).to(torch.int32) + 32768  # (n,) uniform in [0, 65536)
    keep = u >= 58982
    assert torch.equal(y != 0, keep)
    assert torch.all(y[keep] == 65536 / (65536 - 58982))


def test_dropout_off_the_cpu_is_torch_dropout_on_the_inputs_device(monkeypatch):
    """Off the CPU the module is ``F.dropout(x, p, training=True)``: on the input's device, with the module's rate,
    in training mode (what it is called with is recorded, as the meta device holds no values to count)."""
    x = torch.zeros(3, 4, device=META)
    y = common.Dropout(0.5).train()(x)
    assert y.device == META and y.shape == (3, 4)
    calls = []
    monkeypatch.setattr(common.F, "dropout", lambda *args, **kwargs: calls.append((args, kwargs)) or args[0])
    assert common.Dropout(0.25).train()(x) is x
    assert calls == [((x, 0.25, True), {})]


# -- harness/io.py and harness/schema.py -------------------------------------------------------------------------

def test_a_full_disk_message_is_exactly_the_file_and_the_fix(tmp_path):
    path = tmp_path / "record.json"

    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as caught:
        io._atomic(path, full)
    assert caught.value.strerror == (f"no space left on device while writing {path}; free space or move the output "
                                     "directory (hydra.run.dir / hydra.sweep.dir)")


def test_a_temporary_removed_by_someone_else_meanwhile_is_no_error(tmp_path, monkeypatch):
    """Between listing the stale temporaries and deleting them, another cleaner may delete one first."""
    (tmp_path / ".a.tmp").write_text("x")
    gone = tmp_path / ".b.tmp"  # listed, but already deleted when its turn comes
    listed = [tmp_path / ".a.tmp", gone]
    monkeypatch.setattr(Path, "glob", lambda self, pattern: iter(listed))
    assert io.remove_stale_temps(tmp_path) == listed
    assert not any(tmp_path.iterdir())


def test_a_finished_record_with_non_ascii_text_is_kept_under_an_ascii_locale(tmp_path):
    """Records are UTF-8 whatever the locale: on a node whose locale is plain C (ASCII) a finished record holding
    German text (an error message, a sample translation) is still read and kept before a rerun."""
    path = tmp_path / "record.json"
    path.write_text(json.dumps({"status": "ok", "sample": "Straße über Brücken"}, ensure_ascii=False),
                    encoding="utf-8")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONIOENCODING": "utf-8"}
    code = ("import locale, sys; from pathlib import Path; from seqbench.harness import schema; "
            "print(locale.getpreferredencoding(False)); print(schema.keep_previous(Path(sys.argv[1])))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout.split("\n")
    assert out[0] in ("ANSI_X3.4-1968", "ascii", "US-ASCII")  # the locale really is ASCII
    (kept,) = tmp_path.glob("previous/*/record.json")
    assert out[1] == str(kept)
    assert json.loads(kept.read_text(encoding="utf-8"))["sample"] == "Straße über Brücken"
    assert schema.keep_previous(tmp_path / "missing.json") is None
