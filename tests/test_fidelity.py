"""Choices that bias a comparison between architectures, each pinned: label smoothing by task, the beam search's
stopping rule, ByteNet's decoding past its unfolded length, each family's initialisation; and decoding that a
stop signal ends at its next step, with a bounded output length and a beam that fits the vocabulary."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from seqbench import models
from seqbench.harness import job, loss, settings, train
from seqbench.harness.decode import beam_search, greedy, max_lengths
from seqbench.models.common import BOS, EOS
from seqbench.tasks.base import Shape
from tests.test_catch import A, B, one_sentence
from tests.test_catch import sources as table_sources
from tests.test_eval import sources
from tests.test_models import build

ROOT = Path(__file__).resolve().parents[1]
ARCHS = sorted(models.MODELS)


# -- label smoothing: the task's default, an explicit setting wins ----------------------------------------------

def test_label_smoothing_is_the_tasks_default_unless_set():
    assert loss.label_smoothing(None, "seq2seq") == 0.1  # translation: Vaswani et al.'s
    assert loss.label_smoothing(None, "lm") == 0.0  # language models and probes: none
    assert loss.label_smoothing(0.2, "lm") == 0.2 and loss.label_smoothing(0.0, "seq2seq") == 0.0  # explicit wins
    assert train.TrainConfig(max_steps=1).label_smoothing is None  # the trainer's default is the task's


def small_task(name: str):
    from seqbench import tasks  # noqa: PLC0415

    extra = {"distances": [4, 8]} if name == "delayed_copy" else {}
    return tasks.build({"name": name, "n_train": 40, "n_valid": 4, "n_test": 4, **extra})


@pytest.mark.parametrize("task_name,setting,expected", [("copy", None, 0.1), ("delayed_copy", None, 0.0),
                                                        ("delayed_copy", 0.2, 0.2), ("copy", 0.0, 0.0)])
def test_the_trainer_trains_with_the_tasks_label_smoothing_unless_set(tmp_path, monkeypatch, task_name, setting,
                                                                      expected):
    """A translation-form task (copy) trains with 0.1, a language-model-form one (the delayed-copy probe) with 0;
    an explicit trainer.label_smoothing wins over both."""
    used = []
    real = train.smoothed_cross_entropy
    monkeypatch.setattr(train, "smoothed_cross_entropy",
                        lambda logits, target, smoothing, ignore: used.append(smoothing) or real(logits, target,
                                                                                                   smoothing, ignore))
    task = small_task(task_name)
    cfg = train.TrainConfig(max_steps=1, **({} if setting is None else {"label_smoothing": setting}))
    trainer = train.Trainer(models.build(models.load_preset("transformer_tiny"), task), task, cfg, tmp_path,
                            torch.device("cpu"), seed=1, identity={})
    trainer.train_step(task.batches("train", 64)[0])
    assert trainer.cfg.label_smoothing == expected and used == [expected]


def test_the_record_states_the_label_smoothing_used(make_cfg, tmp_path):
    """trainer.label_smoothing=null (the default) on a language-model-form task: the record says 0.0."""
    cfg = make_cfg("model=transformer_tiny", "task=delayed_copy", "task.n_train=40", "task.n_valid=4", "task.n_test=4",
                   "task.distances=[4,8]", "trainer=smoke", "trainer.max_steps=1", "eval.splits=[test]",
                   "eval.influence=false")
    assert cfg.trainer.label_smoothing is None
    rec = job.run(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "record.json").read_text())
    assert rec["status"] == "ok" and saved["config"]["trainer"]["label_smoothing"] == 0.0


# -- beam search: it stops only when no live hypothesis can beat the best finished one ----------------------

# Beam 2, lenpen 0. Step 0: A .6, EOS .25, B .15: [] + EOS (log .25 = -1.386) ranks second and finishes. Step 1:
# after A, A .7 / EOS .3; after B, EOS .5 / A .5: [A] + EOS (log .18 = -1.715) ranks second and finishes. A search
# that stops at two finished hypotheses returns [] (-1.386); the live [A, A] (log .42 = -0.868) can still beat it,
# and ends at step 2 with EOS .95: log .399 = -0.919, which greedy decoding finds too.
EARLY_EOS = [{A: .6, EOS: .25, B: .15}, {A: {A: .7, EOS: .3}, B: {EOS: .5, A: .5}}, {A: {EOS: .95, A: .05},
                                                                                    B: {EOS: .95, A: .05}}]


@pytest.mark.parametrize("lenpen", [0.0, 0.6])
def test_beam_search_goes_on_while_a_live_hypothesis_can_beat_the_finished_ones(lenpen):
    src, lengths = table_sources(1)
    assert greedy(one_sentence(EARLY_EOS), src, lengths, [3]) == [[A, A]]
    model = one_sentence(EARLY_EOS)
    assert beam_search(model, src, lengths, [3], beam=2, lenpen=lenpen) == [[A, A]]
    assert len(model.rows) == 3  # steps 0, 1, 2: the EOS of [A, A] at step 2 ends it (the bound: nothing better)


# -- ByteNet: decoding runs past the unfolded length L(s) until EOS ------------------------------------------

def test_bytenet_translates_a_reference_longer_than_its_unfolded_length():
    """Sources of 6 tokens (|s| = 7 with EOS), a = 1.2, b = 0: L(s) = 9 columns, so at most 8 tokens could be decoded
    within them. Trained to write each source twice (12 tokens), ByteNet decodes all 12 and the EOS, the last 4
    positions over zero columns, as it was trained."""
    torch.manual_seed(0)
    model = build("bytenet", "translation", dropout=0.0).train()
    g = torch.Generator().manual_seed(1)
    src, lengths = torch.randint(4, 23, (8, 6), generator=g), torch.full((8,), 6)
    ref = torch.cat([src, src], dim=1)  # (8,12)
    tgt_in = torch.cat([torch.full((8, 1), BOS), ref], dim=1)
    tgt_out = torch.cat([ref, torch.full((8, 1), EOS)], dim=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(src, lengths, tgt_in).flatten(0, 1), tgt_out.flatten()).backward()
        opt.step()
    model.eval()
    assert model.unfolded_lengths(lengths).tolist() == [9] * 8 and ref.size(1) > 9
    limits = max_lengths(lengths, 1.2, 10, model)
    assert limits == [17] * 8  # 1.2 * 6 + 10: the common output limit, not L(s) - 1
    assert greedy(model, src, lengths, limits) == ref.tolist()
    assert beam_search(model, src, lengths, limits, beam=4) == ref.tolist()


# -- each family's initialisation, as the model table states it ------------------------------------------------

# family -> (std of the token embedding as a function of d_model, the embedding's multiplier into the network)
INIT = {"transformer": (lambda d: d**-0.5, lambda d: d**0.5), "bytenet": (lambda d: d**-0.5, lambda d: d**0.5),
        "lstm": (lambda d: 1.0, lambda d: 1.0), "gru": (lambda d: 1.0, lambda d: 1.0),
        "convs2s": (lambda d: 0.1, lambda d: 1.0), "transformer_pp": (lambda d: d**-0.5, lambda d: d**0.5),
        "mamba": (lambda d: d**-0.5, lambda d: d**0.5), "gla": (lambda d: d**-0.5, lambda d: d**0.5)}
COMPARISON_PRESETS = [f"{arch}{kind}" for arch in ARCHS for kind in ("", "_tiny", "_probe")]


def token_embedding(model) -> tuple[torch.nn.Embedding, float]:
    """The (target-side) token embedding of any model form, and the factor it is multiplied by."""
    emb = getattr(model, "tgt_embed", None) or model.tok_embed
    return (emb.tok, getattr(emb, "scale", 1.0)) if hasattr(emb, "tok") else (emb, 1.0)


def output_projection(model) -> torch.nn.Linear:
    for name in ("proj", "head", "out"):
        part = getattr(model, name, None)
        if isinstance(part, torch.nn.Linear):
            return part
        if isinstance(getattr(part, "proj", None), torch.nn.Linear):
            return part.proj
    raise AssertionError(f"no output projection found in {type(model).__name__}")


@pytest.mark.parametrize("name", COMPARISON_PRESETS)
def test_the_comparison_presets_initialise_as_the_model_table_states(name):
    """Every small and tiny preset in both forms, every probe preset as a language model: the token embedding's
    std (Transformer and ByteNet N(0, d^-1/2) times sqrt(d); LSTM/GRU N(0, 1); ConvS2S N(0, 0.1)), padding row
    zero, source and target embeddings shared, and the output projection tied to the embedding."""
    cfg = models.load_preset(name)
    std, scale = INIT[cfg["name"]]
    forms = [Shape("lm", {"lm": 2000})]  # the probes are language-model tasks
    if not name.endswith("_probe"):
        forms.insert(0, Shape("seq2seq", {"src": 2000, "tgt": 2000}))
    for shape in forms:
        torch.manual_seed(0)
        model = models.build(cfg, shape)
        emb, factor = token_embedding(model)
        d = emb.embedding_dim
        rows = emb.weight[4:]  # past the special tokens: PAD's row is zero in the encoder-decoder form
        assert rows.std().item() == pytest.approx(std(d), rel=0.05), (name, shape.form)
        assert factor == pytest.approx(scale(d)), (name, shape.form)
        assert output_projection(model).weight is emb.weight, f"{name} ({shape.form}): output not tied"
        if shape.form == "seq2seq":
            src = getattr(model.src_embed, "tok", model.src_embed)
            assert src is emb, f"{name}: source and target embeddings not shared"
            assert not emb.weight[0].any(), f"{name}: padding embedding not zero"


def test_an_untied_transformer_lm_projects_as_the_encoder_decoder_does():
    """Untied, both forms of the Transformer draw the output projection from N(0, d^-1/2), not from PyTorch's
    default uniform init."""
    cfg = {**models.load_preset("transformer"), "tie_output": False}
    for shape in (Shape("seq2seq", {"src": 4000, "tgt": 4000}), Shape("lm", {"lm": 4000})):
        torch.manual_seed(0)
        weight = output_projection(models.build(cfg, shape)).weight
        assert weight.std().item() == pytest.approx(256**-0.5, rel=0.05) and weight.mean().abs() < 1e-3, shape.form


# -- stop means stop: decoding checks the stop flag at every step ---------------------------------------------

class Stop(Exception):
    pass


def stop_after(n: int):
    calls = []

    def check():
        calls.append(1)
        if len(calls) > n:
            raise Stop
    return check, calls


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_decoding_checks_the_stop_flag_before_every_step(search):
    """A model that never ends (EOS masked) decoding 4000 tokens: the check runs before each step, and the
    search ends at the step after the one that raised."""
    from seqbench.harness.bench.decoding import NoEOS  # noqa: PLC0415

    model = NoEOS(build("transformer", "translation"))
    src, lengths = sources()
    limits = max_lengths(lengths, 0.0, 4000)
    run = (lambda check: greedy(model, src, lengths, limits, check_stop=check)) if search == "greedy" else (
        lambda check: beam_search(model, src, lengths, limits, beam=2, check_stop=check))
    check, calls = stop_after(5)
    with pytest.raises(Stop):
        run(check)
    assert len(calls) == 6  # steps 0..4 ran, the sixth check raised


def test_output_length_is_capped_and_huge_limits_are_refused(make_cfg):
    cap = settings.MAX_OUTPUT_TOKENS
    assert max_lengths(torch.tensor([3, 50]), 1_000_000.0, 0) == [cap, cap]
    found = settings.problems(make_cfg("eval.decoding.max_len_a=1000000", f"eval.decoding.max_len_b={cap + 1}"))
    assert any(p.startswith("eval.decoding.max_len_a=1000000") and str(cap) in p for p in found), found
    assert any(p.startswith(f"eval.decoding.max_len_b={cap + 1}") and str(cap) in p for p in found), found
    assert settings.problems(make_cfg(f"eval.decoding.max_len_a={cap}", f"eval.decoding.max_len_b={cap}")) == []


def test_a_beam_wider_than_the_target_vocabulary_is_refused_before_training(make_cfg, tmp_path):
    """Copy with 10 symbols: 14 target entries with the special tokens; beam 100000 would repeat the encoder's
    state for every hypothesis (gigabytes). The job fails before its first step, naming the setting and the size."""
    cfg = make_cfg("model=transformer_tiny", "task=copy", "task.n_symbols=10", "task.n_train=40", "task.n_valid=4",
                   "task.n_test=4", "trainer=smoke", "eval.decoding.beam=100000")
    rec = job.run(cfg, tmp_path / "run", raise_errors=False)
    assert rec["status"] == "failed"
    assert "eval.decoding.beam=100000" in rec["error"] and "14" in rec["error"] and "at most 14" in rec["error"]
    assert not list((tmp_path / "run").glob("*.pt"))  # nothing trained


@pytest.mark.slow
def test_sigterm_during_a_long_validation_decoding_stops_it_promptly(tmp_path):
    """Greedy validation decoding of 500 sentences up to 4096 tokens each (a model that has trained two steps
    rarely ends them) takes minutes; a SIGTERM during it ends the job within seconds, with an interrupted record
    and the trained steps kept in last.pt."""
    out, log = tmp_path / "run", tmp_path / "log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "run.py", "model=transformer_tiny", "task=copy", "task.n_train=60",
                                 "task.n_valid=500", "task.n_test=4", "trainer=smoke", "eval.decoding.max_len_a=0",
                                 "eval.decoding.max_len_b=4096", "eval.influence=false", "device=cpu",
                                 "data.download=false", f"hydra.run.dir={out}"], cwd=ROOT, env=env, stdout=sink,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while "step 2" not in log.read_text():  # the validation after step 2 decodes next
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "training never reached step 2"
        time.sleep(0.1)
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("SIGTERM during validation decoding was ignored: still decoding 30 s later")
    rec = json.loads((out / "record.json").read_text())
    assert proc.returncode != 0 and rec["status"] == "interrupted", rec.get("error")
    assert "validation" in rec["error"]
    assert torch.load(out / "last.pt", weights_only=True)["progress"]["step"] == 2


def test_the_stop_check_reaches_language_model_and_probe_evaluation(tmp_path):
    """Perplexity scoring (the validation loss and the test protocol) and probe accuracy run ``check_stop`` before
    each batch, as decoding does before each step."""
    from seqbench import tasks  # noqa: PLC0415
    from seqbench.harness.analysis.probes import evaluate_probe  # noqa: PLC0415
    from seqbench.harness.evaluate import lm_scores, mean_nll  # noqa: PLC0415

    words = " ".join(f"w{i % 37}" for i in range(400))
    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.txt").write_text(words + "\n")
    text = tasks.build({"name": "text_files", "path": str(tmp_path), "bptt": 8}, {"root": tmp_path})
    probe = tasks.build({"name": "delayed_copy", "n_train": 4, "n_valid": 4, "n_test": 40, "distances": [4, 8]})
    cpu = torch.device("cpu")
    lm, probe_lm = (models.build(models.load_preset("transformer_tiny"), t).eval() for t in (text, probe))
    for run in (lambda check: evaluate_probe(probe_lm, probe, "test", cpu, 64, check),
                lambda check: mean_nll(lm, text, "test", cpu, 16, check_stop=check),
                lambda check: lm_scores(lm, text, "test", cpu, 16, check_stop=check)):
        check, calls = stop_after(1)
        with pytest.raises(Stop):
            run(check)
        assert len(calls) == 2
