"""Scoring and decoding: sacreBLEU parity, perplexity, beam search."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import models
import tasks
from harness.decode import beam_search, greedy, max_lengths
from harness.evaluate import evaluate_lm, score_translations
from tests.test_models import ARCHS, build, preset


def test_bleu_and_chrf_equal_the_sacrebleu_command_line(tmp_path, data_root):
    refs = (data_root / "multi30k" / "test_2016_flickr.de").read_text().splitlines()
    # a deterministic "system": drop every third word from the reference
    hyps = [" ".join(w for i, w in enumerate(r.split()) if i % 3) for r in refs]
    (tmp_path / "hyp").write_text("\n".join(hyps) + "\n")
    cli = subprocess.run([sys.executable, "-m", "sacrebleu", str(data_root / "multi30k" / "test_2016_flickr.de"),
                          "-i", str(tmp_path / "hyp"), "-m", "bleu", "chrf", "-b", "-w", "4"],
                         capture_output=True, text=True, check=True).stdout
    cli = json.loads(cli)  # [bleu, chrf] with -b
    ours = score_translations(hyps, refs)
    assert round(ours["bleu"], 4) == float(cli[0])
    assert round(ours["chrf"], 4) == float(cli[1])
    assert ours["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")


def test_perplexity_is_exp_of_mean_nll(data_root):
    task = tasks.build({"name": "ptb", "bptt": 40}, {"root": data_root, "download": False})
    task.streams["valid"] = task.streams["valid"][:3001]
    torch.manual_seed(0)
    model = models.build(preset("transformer_tiny"), task).eval()
    got = evaluate_lm(model, task, "valid", torch.device("cpu"), max_tokens=400)
    # independent computation: score the stream in windows of 40, one window at a time
    stream = torch.from_numpy(task.streams["valid"])
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(stream) - 1, 40):
            x, y = stream[s : s + 40], stream[s + 1 : s + 41]
            x = x[: len(y)]
            logp = F.log_softmax(model(x[None])[0].double(), -1)
            nll -= logp[torch.arange(len(y)), y].sum().item()
            n += len(y)
    assert got["tokens"] == n == 3000
    assert math.isclose(got["perplexity"], math.exp(nll / n), rel_tol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_beam_size_one_equals_greedy(arch):
    model = build(arch, "translation")
    g = torch.Generator().manual_seed(5)
    src = torch.randint(4, 23, (6, 9), generator=g)
    lengths = torch.tensor([9, 8, 7, 5, 3, 2])
    for b, n in enumerate(lengths):
        src[b, n:] = 0
    limits = max_lengths(lengths, 1.5, 3)
    assert beam_search(model, src, lengths, limits, beam=1) == greedy(model, src, lengths, limits)


@pytest.mark.parametrize("arch", ARCHS)
def test_beam_finds_at_least_the_greedy_score(arch):
    """With no length penalty, the beam's best finished hypothesis is never worse than greedy's."""
    model = build(arch, "translation")
    g = torch.Generator().manual_seed(7)
    src = torch.randint(4, 23, (4, 6), generator=g)
    lengths = torch.full((4,), 6)

    def logprob(b, hyp):
        tgt = torch.tensor([[1] + hyp])
        out = torch.tensor(hyp + [2])
        with torch.no_grad():
            lp = F.log_softmax(model(src[b : b + 1], lengths[b : b + 1], tgt)[0].double(), -1)
        return lp[torch.arange(len(out)), out].sum().item()

    limits = [30] * 4
    for b, (gh, bh) in enumerate(zip(greedy(model, src, lengths, limits),
                                     beam_search(model, src, lengths, limits, beam=4, lenpen=0.0))):
        if len(gh) < 30:  # greedy finished with EOS
            assert logprob(b, bh) >= logprob(b, gh) - 1e-6


def test_decoding_never_runs_past_learned_positions():
    """A long output limit (a*|s|+b) is capped at ConvS2S's max_positions instead of failing mid-evaluation."""
    from harness.evaluate import translate

    task = tasks.build({"name": "copy", "n_train": 10, "n_valid": 3, "n_test": 3, "min_len": 8, "max_len": 8})
    torch.manual_seed(0)
    model = models.build({**preset("convs2s_tiny"), "max_positions": 12}, task).eval()
    hyps, _ = translate(model, task, "test", torch.device("cpu"), beam=2, max_len_a=5.0, max_len_b=10)
    assert len(hyps) == 3 and all(len(h.split()) <= 12 for h in hyps)
