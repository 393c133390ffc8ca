"""Bring your own data: tokenizer choice, vocabulary limits, per-task metrics, task names, character LMs."""
from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F

from seqbench import models
from seqbench import reports
from seqbench import tasks
from seqbench.harness import job, metrics
from seqbench.harness.evaluate import evaluate_lm
from seqbench.models.common import EOS, UNK
from seqbench.tasks.data import DataError
from seqbench.tasks.tokenizers import SPECIALS
from tests.test_models import preset

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["trainer=smoke", "trainer.max_steps=2", "eval.decoding.beam=1", "eval.influence=false"]
# letters -> phoneme-like symbols, several characters each: subword tokenizers would split and merge them
PHONES = {c: p for c, p in zip("abcdefghijklmnop", ["AH0", "B", "K", "D", "EH1", "F", "G", "HH", "IY0", "JH", "K",
                                                    "L", "M", "N", "OW1", "P"])}


def write_g2p(folder: Path, n_train: int = 200, seed: int = 0) -> Path:
    """A symbol-level transduction data set: spelled words -> phoneme strings, whitespace-separated."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    for split, n in (("train", n_train), ("valid", 12), ("test", 12)):
        words = ["".join(rng.choice(list(PHONES)) for _ in range(rng.randint(2, 6))) for _ in range(n)]
        (folder / f"{split}.src").write_text("".join(" ".join(w) + "\n" for w in words), encoding="utf-8")
        (folder / f"{split}.tgt").write_text("".join(" ".join(PHONES[c] for c in w) + "\n" for w in words),
                                             encoding="utf-8")
    return folder


def build(folder: Path, cache: Path, **settings):
    return tasks.build({"name": "parallel_files", "path": str(folder), **settings}, {"root": folder, "cache_dir": cache})


# -- tokenizers ------------------------------------------------------------------------------

def test_whitespace_symbols_never_merge_and_decode_exactly(tmp_path):
    folder = write_g2p(tmp_path / "g2p")
    task = build(folder, tmp_path / "cache", tokenizer="whitespace")
    train = (folder / "train.src").read_text().split() + (folder / "train.tgt").read_text().split()
    assert task.src_tok is task.tgt_tok and list(task.src_tok.itos[:4]) == list(SPECIALS)
    assert sorted(task.src_tok.itos[4:]) == sorted(set(train))  # the symbols and nothing else: no merges
    assert task.src_vocab_size == 4 + len(set(train))
    for line in (folder / "test.tgt").read_text().splitlines():
        ids = task.tgt_tok.encode([line])[0]
        assert len(ids) == len(line.split()) and task.detokenize([*ids, EOS]) == line
    # irregular spacing reads as the same tokens; the reference is scored in the form decoding writes
    assert task.tgt_tok.decode(task.tgt_tok.encode(["  AH0   K  "])[0]) == "AH0 K"
    task.corpus.tgt["test"][0] = "  AH0   K  "
    assert task.references("test")[0] == "AH0 K"
    assert task.tgt_tok.decode(task.tgt_tok.encode(["AH0 ZZZ"])[0]) == "AH0 <unk>"
    about = task.describe()
    assert about["name"] == "g2p" and about["path"] == str(folder.resolve())
    assert about["metrics"] == ["wer", "ser"] and about["segmentation"] == "whitespace"
    assert len(list((tmp_path / "cache" / "vocab").glob("*.json"))) == 1


def test_char_tokenizer_keeps_spaces_and_min_count_makes_rare_tokens_unknown(tmp_path):
    folder = write_g2p(tmp_path / "g2p")
    task = build(folder, tmp_path / "cache", tokenizer="char", joint_vocab=False)
    for line in ("a b  c", " p o ", ""):
        assert task.src_tok.decode(task.src_tok.encode([line])[0]) == line
    assert " " in task.src_tok.itos and task.src_vocab_size == 4 + 16 + 1  # 16 letters and the space
    # min_count: a token seen once is unknown; the cache holds one vocabulary per setting
    (folder / "train.tgt").write_text((folder / "train.tgt").read_text() + "ZH\n")
    (folder / "train.src").write_text((folder / "train.src").read_text() + "a\n")
    once = build(folder, tmp_path / "cache", tokenizer="whitespace")
    twice = build(folder, tmp_path / "cache", tokenizer="whitespace", min_count=2)
    assert "ZH" in once.tgt_tok.itos and "ZH" not in twice.tgt_tok.itos
    assert list(twice.tgt_tok.encode(["ZH K"])[0]) == [UNK, twice.tgt_tok.stoi["K"]]
    assert len(list((tmp_path / "cache" / "vocab").glob("*.json"))) == 2 + 2  # char src and tgt, then two joint


def test_oversize_vocabulary_is_capped_at_the_largest_valid_size_with_a_warning(make_cfg, tmp_path):
    folder = write_g2p(tmp_path / "g2p")
    rec = job.run(make_cfg("model=lstm_tiny", *SMOKE, "task=parallel_files", f"task.path={folder}",
                           f"data.cache_dir={tmp_path / 'cache'}"), tmp_path / "run")
    assert rec["status"] == "ok"
    size = rec["task"]["src_vocab"]
    [warning] = rec["task"]["warnings"]
    assert warning.startswith(f"task.vocab_size=8000 is more than the bpe tokenizer can make of this training data: "
                              f"capped at {size}, the largest valid value.")
    on_disk = json.loads((tmp_path / "run" / "record.json").read_text())["task"]
    assert on_disk["warnings"] == [warning] and on_disk["segmentation"] == "bpe"
    # independently: sentencepiece trains at that size and refuses one more
    text = tmp_path / "joint.txt"
    text.write_text("".join((folder / f"train.{s}").read_text() for s in ("src", "tgt")))
    common = dict(input=str(text), model_type="bpe", character_coverage=1.0, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
                  minloglevel=2)
    spm.SentencePieceTrainer.train(**common, model_prefix=str(tmp_path / "ok"), vocab_size=size)
    with pytest.raises(RuntimeError, match=rf"Vocabulary size too high \({size + 1}\)"):
        spm.SentencePieceTrainer.train(**common, model_prefix=str(tmp_path / "no"), vocab_size=size + 1)


@pytest.mark.parametrize("value, error, message", [
    (5, DataError, r"task.vocab_size=5 is too small for the bpe tokenizer on this training data: it needs at least "
                   r"(\d+) .*Set task.vocab_size=\1 or more"),
    ("abc", ValueError, r"task.vocab_size='abc' is not a valid vocabulary size: set task.vocab_size to a whole "
                        r"number above 4"),
    (None, ValueError, r"task.vocab_size=None is not a valid vocabulary size"),
])
def test_invalid_vocabulary_size_names_the_setting(tmp_path, value, error, message):
    with pytest.raises(error, match=message):
        build(write_g2p(tmp_path / "g2p"), tmp_path / "cache", vocab_size=value)


def test_bad_tokenizer_and_metric_settings_name_the_setting(tmp_path):
    folder = write_g2p(tmp_path / "g2p")
    with pytest.raises(ValueError, match=r"task.tokenizer='words'; valid: bpe, unigram, whitespace, char"):
        build(folder, tmp_path / "cache", tokenizer="words")
    with pytest.raises(ValueError, match=r"task.metrics=\['wer', 'per'\] has \['per'\]; choose from bleu, chrf, ter, "
                                         r"wer, ser, cer, exact_match"):
        build(folder, tmp_path / "cache", tokenizer="whitespace", metrics=["wer", "per"])
    with pytest.raises(ValueError, match=r"task.min_count=0"):
        build(folder, tmp_path / "cache", tokenizer="whitespace", min_count=0)


@pytest.mark.parametrize("tokenizer, folder, suffix", [("unigram", "spm", ".model"), ("whitespace", "vocab", ".json")])
def test_corrupt_tokenizer_cache_names_the_file_and_says_deleting_is_safe(tmp_path, tokenizer, folder, suffix):
    data = write_g2p(tmp_path / "g2p")
    first = build(data, tmp_path / "cache", tokenizer=tokenizer, vocab_size=60)
    [cached] = (tmp_path / "cache" / folder).glob(f"*{suffix}")
    cached.write_bytes(b"\x00garbage")
    with pytest.raises(DataError, match=rf"the tokenizer cache file {cached} cannot be read .*Deleting it is safe"):
        build(data, tmp_path / "cache", tokenizer=tokenizer, vocab_size=60)
    cached.unlink()
    again = build(data, tmp_path / "cache", tokenizer=tokenizer, vocab_size=60)
    assert again.src_vocab_size == first.src_vocab_size and again.src_ids["test"][0].tolist() == \
        first.src_ids["test"][0].tolist()


# -- metrics ---------------------------------------------------------------------------------

def test_sentence_and_word_error_rates_against_hand_computed_values():
    refs = ["K AE1 T", "D AO1 G", "F IH1 SH", "B"]
    hyps = ["K AE1 T", "D AO1", "F IY1 SH S", "B"]
    # sequences wrong: 2 of 4; token edits: 0 + 1 deletion + (1 substitution + 1 insertion) + 0 = 3 of 10 tokens
    scores = metrics.score(["wer", "ser", "exact_match"], hyps, refs)
    assert scores == {"ser": pytest.approx(0.5), "wer": pytest.approx(3 / 10), "exact_match": pytest.approx(0.5)}
    assert metrics.word_error_rate(["a b c d"], ["x"]) == pytest.approx(4 / 1)  # 1 substitution, 3 insertions
    assert not any(metrics.METRICS[n].higher_is_better for n in ("wer", "ser", "ter", "ppl", "bpc"))
    assert all(metrics.METRICS[n].higher_is_better for n in ("bleu", "chrf", "exact_match", "accuracy"))


def test_translation_metrics_follow_the_tokenizer_unless_set(tmp_path):
    folder = write_g2p(tmp_path / "g2p")
    assert build(folder, tmp_path / "c", tokenizer="char").metrics == ("wer", "ser")
    assert build(folder, tmp_path / "c", vocab_size=60).metrics == ("bleu", "chrf")
    assert build(folder, tmp_path / "c", tokenizer="whitespace", metrics="ser, ter").metrics == ("ser", "ter")


# -- language models -------------------------------------------------------------------------

def write_text(folder: Path) -> Path:
    folder.mkdir(parents=True)
    rng = random.Random(1)
    for split, n in (("train", 60), ("valid", 8), ("test", 8)):
        lines = [" ".join(rng.choice(["the", "cat", "sat", "on", "a", "mat", "é"]) for _ in range(rng.randint(0, 7)))
                 for _ in range(n)]
        (folder / f"{split}.txt").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return folder


def test_character_lm_reports_bits_per_character(tmp_path):
    folder = write_text(tmp_path / "chars")
    task = tasks.build({"name": "text_files", "path": str(folder), "tokenizer": "char", "bptt": 16},
                       {"root": tmp_path, "cache_dir": tmp_path / "cache"})
    assert task.describe()["metrics"] == ["bpc", "ppl"] and task.name == "chars"
    text = (folder / "test.txt").read_text(encoding="utf-8")
    # the stream is the text's characters, each line end one end-of-line token
    stoi = task.tokenizer.stoi
    assert task.streams["test"].tolist() == [EOS if c == "\n" else stoi.get(c, UNK) for c in text]
    torch.manual_seed(0)
    model = models.build(preset("transformer_tiny"), task).eval()
    got = evaluate_lm(model, task, "test", torch.device("cpu"), max_tokens=64)
    # independently: the NLL of every character but the first, in windows of bptt, in bits
    stream = torch.tensor(task.streams["test"])
    nll = 0.0
    with torch.no_grad():
        for s in range(0, len(stream) - 1, 16):
            x, y = stream[s : s + 16], stream[s + 1 : s + 17]
            logp = F.log_softmax(model(x[: len(y)][None])[0].double(), -1)
            nll -= logp[torch.arange(len(y)), y].sum().item()
    characters = len(text) - 1
    assert got["tokens"] == characters
    assert got["bpc"] == pytest.approx(nll / characters / math.log(2), rel=1e-5)
    assert got["bpc"] == pytest.approx(math.log2(got["perplexity"]), rel=1e-9)


def test_subword_lm_on_any_text_and_capped_word_vocabulary(tmp_path):
    folder = write_text(tmp_path / "words")
    data = {"root": tmp_path, "cache_dir": tmp_path / "cache"}
    sub = tasks.build({"name": "text_files", "path": str(folder), "tokenizer": "bpe", "vocab_size": 30}, data)
    lines = (folder / "valid.txt").read_text(encoding="utf-8").splitlines()
    assert sub.describe()["segmentation"] == "bpe" and sub.describe()["metrics"] == ["ppl"]
    assert (sub.streams["valid"] == EOS).sum() == len(lines)  # one end-of-line per line
    assert [sub.tokenizer.decode(ids) for ids in sub.tokenizer.encode(lines)] == lines
    words = tasks.build({"name": "text_files", "path": str(folder), "vocab_size": 5, "label": "mine"}, data)
    # <eos>, <unk> and three of the most frequent words; the rest read as <unk>
    counts = pd.Series((folder / "train.txt").read_text(encoding="utf-8").split()).value_counts()
    kept = set(words.tokenizer.itos) - {"<eos>", "<unk>"}
    assert len(words.tokenizer.itos) == 5 and len(kept) == 3
    assert counts[list(kept)].min() >= counts.drop(list(kept)).max()
    assert words.name == "mine" and "task.vocab_size=5 keeps the 4 most frequent" in words.describe()["warnings"][0]


# -- names and the report --------------------------------------------------------------------

@pytest.fixture(scope="module")
def whitespace_runs(tmp_path_factory):
    """Two tiny end-to-end runs on a whitespace-tokenized symbol task, and their report built by the command line."""
    from hydra import compose, initialize_config_dir

    tmp = tmp_path_factory.mktemp("byod")
    folder = write_g2p(tmp / "data" / "g2p", n_train=60)
    runs = tmp / "runs"
    for model in ("lstm_tiny", "transformer_tiny"):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=["device=cpu", "data.download=false", f"data.cache_dir={tmp / 'cache'}",
                                               f"model={model}", *SMOKE, "task=parallel_files",
                                               f"task.path={folder}", "task.tokenizer=whitespace"])
        job.run(cfg, runs / model)
    out = tmp / "report"
    built = subprocess.run([sys.executable, "-m", "seqbench.reports", str(runs), "--out", str(out)], cwd=ROOT,
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    return runs, out


def test_report_shows_error_rates_lower_is_better(whitespace_runs):
    runs, out = whitespace_runs
    recs = {m: json.loads((runs / m / "record.json").read_text()) for m in ("lstm_tiny", "transformer_tiny")}
    md = (out / "report.md").read_text()
    section = md.split("### Task g2p")[1].split("## ")[0]
    header = next(line for line in section.splitlines() if line.startswith("| architecture"))
    assert "| test WER | test SER |" in header and "BLEU" not in header
    assert "lower is better for WER, SER. Rows sorted by test WER, best first." in section
    for r in recs.values():
        test = r["metrics"]["test"]
        assert test["ser"] == pytest.approx(1 - test["exact_match"]) and f"| {test['wer']:.3f} (1 seed) |" in section
    summ = pd.read_csv(out / "summary.csv")
    for m, r in recs.items():
        row = summ[summ["arch"] == f"{m.split('_')[0]}-tiny"].iloc[0]
        assert row["metrics"] == "wer,ser" and row["test_ser_mean"] == pytest.approx(r["metrics"]["test"]["ser"])
    assert set(pd.read_csv(out / "runs.csv")["tokenization"]) == {"whitespace"}
    assert "## Table 2" not in md  # Table 2 is for BLEU-scored tasks: none here


def test_report_ranks_lower_error_rates_first(whitespace_runs, tmp_path):
    runs, _ = whitespace_runs
    shutil.copytree(runs, tmp_path / "runs")
    for model, wer in (("lstm_tiny", 0.75), ("transformer_tiny", 0.25)):
        path = tmp_path / "runs" / model / "record.json"
        rec = json.loads(path.read_text())
        rec["metrics"]["test"]["wer"] = wer
        path.write_text(json.dumps(rec))
    md = (reports.build([tmp_path / "runs"], tmp_path / "report").parent / "report.md").read_text()
    section = md.split("### Task g2p")[1].split("## ")[0]
    assert section.index("| transformer-tiny |") < section.index("| lstm-tiny |")
    assert "Best: test WER 0.250 (transformer-tiny" in section


def test_same_base_name_in_two_folders_is_told_apart(whitespace_runs, tmp_path):
    runs, _ = whitespace_runs
    rec = json.loads((runs / "lstm_tiny" / "record.json").read_text())
    for i, path in enumerate(("/data/a/g2p", "/data/b/g2p", "/data/b/g2p")):
        (tmp_path / f"r{i}").mkdir()
        job_ = {**rec["job"], "name": f"run{i}"}  # three jobs, not copies of one
        (tmp_path / f"r{i}" / "record.json").write_text(json.dumps({**rec, "seed": i, "job": job_,
                                                                   "task": {**rec["task"], "path": path}}))
    names = reports.load([tmp_path]).runs.sort_values("seed")["task"].tolist()
    assert names[0] != names[1] == names[2] and all(n.startswith("g2p@") for n in names)


def test_report_imports_without_torch():
    code = "import seqbench.reports, seqbench.reports.plots, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
