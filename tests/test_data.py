"""Tasks and data: published sizes, batching, clear errors."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from seqbench import tasks
from seqbench.tasks.batching import token_budget_batches, translation_batch
from seqbench.tasks.vocab import BOS, EOS, PAD
from seqbench.tasks.data import DataError


@pytest.fixture(scope="module")
def multi30k(data_root, cache_dir):
    return tasks.build({"name": "multi30k"}, {"root": data_root, "cache_dir": cache_dir, "download": False})


def test_multi30k_published_sizes(multi30k):
    d = multi30k.describe()
    assert d["sizes"] == {"train": 29000, "valid": 1014, "test": 1000}
    assert d["src_vocab"] == d["tgt_vocab"] == 8000
    assert multi30k.references("test")[0] == "Ein Mann mit einem orangefarbenen Hut, der etwas anstarrt."


def test_subwords_round_trip_to_raw_text(multi30k):
    refs = multi30k.references("valid")[:50]
    ids = multi30k.tgt_tok.encode(refs)
    assert [multi30k.detokenize(x.tolist()) for x in ids] == refs


def test_tokenizer_is_cached_by_settings(data_root, cache_dir, multi30k):
    models = sorted((cache_dir / "spm").glob("*.model"))
    again = tasks.build({"name": "multi30k"}, {"root": data_root, "cache_dir": cache_dir, "download": False})
    assert sorted((cache_dir / "spm").glob("*.model")) == models
    other = tasks.build({"name": "multi30k", "vocab_size": 4000, "joint_vocab": False},
                        {"root": data_root, "cache_dir": cache_dir, "download": False})
    assert other.src_vocab_size == other.tgt_vocab_size == 4000
    assert len(list((cache_dir / "spm").glob("*.model"))) == len(models) + 2
    assert again.src_vocab_size == 8000


def test_de_en_direction(data_root, cache_dir):
    t = tasks.build({"name": "multi30k", "src_lang": "de", "tgt_lang": "en"},
                    {"root": data_root, "cache_dir": cache_dir, "download": False})
    assert t.references("test")[0].startswith("A man in an orange hat")


def test_wikitext2_published_sizes(data_root):
    t = tasks.build({"name": "wikitext2"}, {"root": data_root, "download": False})
    d = t.describe()
    assert d["tokens"] == {"train": 2088628, "valid": 217646, "test": 245569}
    assert d["vocab"] == 33278


def test_ptb_published_sizes(data_root):
    d = tasks.build({"name": "ptb"}, {"root": data_root, "download": False}).describe()
    assert d["tokens"]["train"] == 929589 and d["vocab"] == 10000


def test_missing_file_names_path_and_setting(tmp_path):
    with pytest.raises(DataError) as err:
        tasks.build({"name": "multi30k"}, {"root": tmp_path, "download": False})
    msg = str(err.value)
    assert str(tmp_path / "multi30k" / "train.en") in msg
    assert "data.root" in msg and "SEQBENCH_DATA_ROOT" in msg


def test_corrupt_public_file_is_refused(tmp_path, data_root):
    (tmp_path / "ptb").mkdir()
    for s in ("train", "valid", "test"):
        shutil.copy(data_root / "ptb" / f"ptb.{s}.txt", tmp_path / "ptb" / f"ptb.{s}.txt")
    with open(tmp_path / "ptb" / "ptb.valid.txt", "a") as f:
        f.write("tampered\n")
    with pytest.raises(DataError, match="sha256"):
        tasks.build({"name": "ptb"}, {"root": tmp_path, "download": False})


def test_parallel_files_with_different_line_counts(tmp_path, cache_dir):
    for s in ("train", "valid", "test"):
        (tmp_path / f"{s}.src").write_text("a b c\nd e\n")
        (tmp_path / f"{s}.tgt").write_text("x y\nz\n" if s != "valid" else "x y\n")
    with pytest.raises(DataError, match="differ in length"):
        tasks.build({"name": "parallel_files", "path": str(tmp_path)}, {"root": tmp_path, "cache_dir": cache_dir})


def test_unknown_task_lists_valid_names():
    with pytest.raises(KeyError, match="valid tasks: assoc_recall, copy, delayed_copy, mad_compression, .*, mqar, multi30k"):
        tasks.build({"name": "multi31k"})


def test_token_budget_batches_cover_each_example_once_within_budget():
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(1, 40, 500), rng.integers(1, 40, 500)
    batches = token_budget_batches(src, tgt, 300, shuffle=True, seed=3, epoch=2)
    assert sorted(i for b in batches for i in b) == list(range(500))
    for b in batches:
        assert len(b) * max(max(src[i], tgt[i] + 1) for i in b) <= 300
    assert batches == token_budget_batches(src, tgt, 300, shuffle=True, seed=3, epoch=2)
    assert batches != token_budget_batches(src, tgt, 300, shuffle=True, seed=3, epoch=3)


def test_translation_batch_pads_and_frames_each_side_and_keeps_the_indices():
    """Written out by hand: the source as it is, the decoder input after BOS, the target before EOS, all padded
    with PAD to the longest row; the example indices stay with the batch (they put translations back in order)."""
    src = [np.array([11, 12, 13]), np.array([14])]
    tgt = [np.array([21]), np.array([22, 23])]
    batch = translation_batch(src, tgt, [7, 3])
    assert batch.inputs["src"].tolist() == [[11, 12, 13], [14, PAD, PAD]]
    assert batch.inputs["src_lengths"].tolist() == [3, 1]
    assert batch.inputs["tgt_in"].tolist() == [[BOS, 21, PAD], [BOS, 22, 23]]
    assert batch.target.tolist() == [[21, EOS, PAD], [22, 23, EOS]]
    assert batch.n_tokens == 5 and batch.index == [7, 3]


def test_token_budget_ties_are_shuffled_only_when_asked_and_an_example_may_fill_the_budget():
    """Eight examples of one length, 4 padded tokens each (target 3 + EOS), budget 8: two per batch. Without
    shuffling, the batches are the indices in order; with it, ties are broken at random, so some seed pairs
    other examples. An example exactly as long as the budget fits."""
    src, tgt = np.full(8, 3), np.full(8, 3)
    assert token_budget_batches(src, tgt, 8, shuffle=False, seed=1, epoch=0) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    pairs = {tuple(sorted(b)) for seed in range(5) for b in token_budget_batches(src, tgt, 8, True, seed, 0)}
    assert pairs - {(0, 1), (2, 3), (4, 5), (6, 7)}
    assert token_budget_batches(np.array([4, 2]), np.array([3, 1]), 4, shuffle=False, seed=1, epoch=0) == [[1], [0]]
    empty = np.array([], dtype=int)
    assert token_budget_batches(empty, empty, 8, shuffle=True, seed=1, epoch=0) == []  # an empty split: no batch


def test_lm_batches_predict_every_token_once(data_root):
    t = tasks.build({"name": "ptb", "bptt": 50}, {"root": data_root, "download": False})
    batches = t.batches("valid", 1000)
    assert sum(b.n_tokens for b in batches) == len(t.streams["valid"]) - 1  # every token but the first
    first = batches[0]
    assert (first.inputs["tokens"][0, 1:] == first.target[0, :-1]).all()
    with pytest.warns(UserWarning, match="smaller than one task.bptt=50 sequence"):
        assert {b.target.shape for b in t.batches("valid", 30)[:-1]} == {(1, 50)}


def test_synthetic_reverse_is_reversed():
    t = tasks.build({"name": "reverse", "n_train": 10, "n_valid": 3, "n_test": 3})
    src, ref = t.corpus.src["test"][0].split(), t.references("test")[0].split()
    assert ref == src[::-1]
