"""The state benchmark suite: decoder-state bytes against output length (the Transformer's KV cache grows, a
recurrent mixer's state does not), peaks and times per length, ratios to the Transformer, lengths a model
cannot reach, and the command line that selects it."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from seqbench import models
from seqbench.harness.bench import suites as bench
from seqbench.harness.bench.state import (Settings, greedy_decode, human_bytes, state_bytes, state_rows,
                                          state_table, unreachable)
from seqbench.harness.settings import MAX_OUTPUT_TOKENS

CPU = torch.device("cpu")
V, B, S = 64, 2, 10  # the tiny preset's vocabulary and source length


def tiny(arch: str) -> dict:
    return bench.presets("tiny", [arch])[0][1]


def settings(lengths=(8, 16), repeats=1) -> Settings:
    return Settings(vocab=V, batch=B, src_len=S, lengths=lengths, device=CPU, precision="fp32",
                    autocast=bench.autocast_for(CPU, "fp32")[1], repeats=repeats, warmup=0, seed=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[list[dict], str]:
    """The suite through its command line: the Transformer and the two recurrent mixers, outputs of 8 and 16."""
    out = tmp_path_factory.mktemp("state") / "state.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        bench.main(["--suite", "state", "--preset", "tiny", "--archs", "transformer,mamba,gla", "--lengths", "16,8",
                    "--batch", str(B), "--repeats", "2", "--warmup", "0", "--precision", "fp32", "--device", "cpu",
                    "--json", str(out)])
    return json.loads(out.read_text())["rows"], printed.getvalue()


def by_key(rows: list[dict]) -> dict[tuple[str, int], dict]:
    return {(r["arch"], r["length"]): r for r in rows}


def test_a_row_per_architecture_and_length_sorted(run):
    rows, printed = run
    expected = [(a, n) for a in ("transformer", "mamba", "gla") for n in (8, 16)]
    assert [(r["arch"], r["length"]) for r in rows] == expected
    for r in rows:
        assert r["suite"] == "state" and r["reached"] and r["reason"] is None and r["batch"] == B
        assert r["precision"] == "fp32" and r["src_len"] == S and r["tail_steps"] == r["length"]
        assert r["per_token_s"] > 0 and r["tail_per_token_s"] > 0 and len(r["stats"]["seconds"]) == 2
        assert r["stats"]["tokens"] == B * r["length"]
        # the peak holds the parameters and, at the end, the whole decoder state
        assert r["peak_bytes"] >= r["resident_bytes"] + r["state_bytes"]["total"] > r["resident_bytes"]
        assert f"| {r['model']} | {r['length']} |" in printed
    assert "| model | output tokens | state per hypothesis | src_* state | state / transformer |" in printed
    assert "### Decode memory and speed against the Transformer's KV cache, by output length" in printed


@pytest.mark.parametrize("arch", ["mamba", "gla"])
def test_a_recurrent_mixer_keeps_a_state_of_constant_size(run, arch):
    rows = by_key(run[0])
    short, long = rows[arch, 8]["state_bytes"], rows[arch, 16]["state_bytes"]
    assert short == long and short["hypothesis"] > 0 and short["source"] > 0
    size = human_bytes(short["hypothesis"])
    assert f"{arch} {size} -> {size} (constant for x2 tokens)" in run[1]


def test_the_transformers_kv_cache_grows_linearly_with_the_output(run):
    rows = by_key(run[0])
    cfg = tiny("transformer")
    layers, d = cfg.get("n_decoder_layers") or cfg["n_layers"], cfg["d_model"]
    for n in (8, 16):
        state = rows["transformer", n]["state_bytes"]
        assert state["hypothesis"] == 2 * layers * d * n * B * 4  # keys and values, fp32
        # per sentence: cross-attention keys and values of the source, and its mask (bool, B x S)
        assert state["source"] == 2 * layers * d * S * B * 4 + B * S
    assert rows["transformer", 16]["peak_bytes"] > rows["transformer", 8]["peak_bytes"]


def test_ratios_are_to_the_transformer_at_the_same_length(run):
    rows = by_key(run[0])
    for (arch, n), r in rows.items():
        ref = rows["transformer", n]
        assert r["reference"] == "transformer"
        assert r["ratios"]["state"] == pytest.approx(r["state_bytes"]["total"] / ref["state_bytes"]["total"])
        assert r["ratios"]["hypothesis_state"] == pytest.approx(
            r["state_bytes"]["hypothesis"] / ref["state_bytes"]["hypothesis"])
        assert r["ratios"]["peak"] == pytest.approx(r["peak_bytes"] / ref["peak_bytes"])
        assert r["ratios"]["time"] == pytest.approx(r["per_token_s"] / ref["per_token_s"])
        if arch == "transformer":
            assert set(r["ratios"].values()) == {1.0}
    # a mixer's state shrinks against the growing cache
    gla = [rows["gla", n]["ratios"]["hypothesis_state"] for n in (8, 16)]
    assert gla[1] == pytest.approx(gla[0] / 2)


def test_each_length_reads_the_decode_at_that_many_steps():
    """One decode to the longest length stands for the decode to each shorter one: greedy decoding with EOS masked
    makes the same first steps whatever length it runs to, and the state after n steps is the state a decode of n
    tokens ends with."""
    torch.manual_seed(0)
    model = models.build(tiny("transformer"), bench.translation_task(V)).eval()
    src, lengths = torch.randint(4, V, (B, S)), torch.full((B,), S)
    seen: dict[int, tuple[int, int]] = {}
    with torch.no_grad():
        clock = greedy_decode(model, src, lengths, 16, {0, 8, 16}, CPU,
                              lambda k, st: seen.__setitem__(k, state_bytes(st)))
        alone: dict[int, tuple[int, int]] = {}
        greedy_decode(model, src, lengths, 8, {8}, CPU, lambda k, st: alone.__setitem__(k, state_bytes(st)))
    assert sorted(clock) == [-1, 0, 8, 16] and clock[-1] <= clock[0] <= clock[8] <= clock[16]
    assert seen[8] == alone[8] and seen[0][0] == 0 and seen[16][0] == 2 * seen[8][0]


def test_an_unreachable_length_gives_a_row_with_the_reason():
    cfg = {**tiny("convs2s"), "max_positions": 16}  # learned positions: at most 15 tokens and the EOS
    rows = state_rows([("convs2s", cfg)], settings(lengths=(8, 16)), bench.label)
    short, long = rows
    assert short["reached"] and short["state_bytes"]["hypothesis"] > 0
    assert short["ratios"] is None  # no Transformer in the run: nothing to divide by
    assert not long["reached"]
    assert "16 learned target positions" in long["reason"] and "at most 15 output tokens" in long["reason"]
    assert "state_bytes" not in long and "ratios" not in long
    table = state_table(rows)
    assert f"| {long['model']} | 16 | not run: {long['reason']} |" in table
    assert f"| {short['model']} | 8 |" in table and "| n/a |" in table


def test_the_shared_output_cap_and_a_models_own_bound_are_reasons():
    model = models.build(tiny("lstm"), bench.translation_task(V))
    lengths = torch.full((B,), S)
    assert unreachable(model, MAX_OUTPUT_TOKENS, lengths) is None
    assert f"at most {MAX_OUTPUT_TOKENS} output tokens" in unreachable(model, MAX_OUTPUT_TOKENS + 1, lengths)
    model.max_output_tokens = lambda src_lengths: [12] * len(src_lengths)  # as a model bounding its output does
    assert unreachable(model, 12, lengths) is None
    assert "bounds its output at 12 tokens for a 10-token source" in unreachable(model, 13, lengths)


def test_the_cli_marks_a_length_past_the_output_cap(capsys):
    rows = bench.main(["--suite", "state", "--preset", "tiny", "--archs", "lstm", "--lengths",
                       f"4,{MAX_OUTPUT_TOKENS + 1}", "--batch", "1", "--repeats", "1", "--warmup", "0",
                       "--device", "cpu"])
    assert [r["reached"] for r in rows] == [True, False]
    assert f"| {MAX_OUTPUT_TOKENS + 1} | not run: decoding makes at most {MAX_OUTPUT_TOKENS}" in capsys.readouterr().out


def test_cli_defaults_of_the_state_suite():
    args = bench.parse_args(["--suite", "state"])
    assert (args.lengths, args.state_batch, args.src_len) == ([64, 128, 256, 512, 1024], 16, 32)
    assert args.models == list(models.MODELS) and args.batch == 128  # --batch's default for the training suites
    args = bench.parse_args(["--suite", "state", "--preset", "tiny", "--batch", "2", "--lengths", "16,8"])
    assert (args.lengths, args.state_batch, args.batch) == ([8, 16], 2, 2)
    assert bench.parse_args(["--preset", "tiny"]).state_batch == 4


@pytest.mark.parametrize("argv,message", [
    (["--lengths", "0"], "--lengths: '0': every output length must be a positive integer"),
    (["--lengths", "8,-16"], "--lengths: '8,-16': every output length must be a positive integer"),
    (["--lengths", "8,8"], "given once"),
    (["--lengths", "8,x"], "--lengths: '8,x': expected comma-separated whole numbers"),
    (["--lengths", ","], "--lengths"),
    (["--archs", "transformer,nope"], "--archs: unknown ['nope']; valid: transformer"),
    (["--archs", ","], "--archs: no architecture given; valid: transformer"),
    (["--preset", "paper", "--archs", "mamba"], "--archs: no published-size preset for ['mamba']"),
    (["--batch", "0"], "--batch 0: must be a positive integer"),
])
def test_cli_refuses_bad_values_naming_the_option(capsys, argv, message):
    with pytest.raises(SystemExit) as err:
        bench.parse_args(["--suite", "state", *argv])
    assert err.value.code == 2 and message in capsys.readouterr().err


def test_every_suite_runs_every_registered_architecture_but_train_only_those_with_a_twin(capsys):
    assert bench.parse_args(["--suite", "decode"]).models == list(models.MODELS)
    assert bench.parse_args(["--preset", "paper"]).models == list(bench.PAPER)
    assert set(models.MODELS) - set(bench.ARCHS)  # the newer mixers, which have no twin
    rows = bench.main(["--suite", "train", "--preset", "tiny", "--archs", "gla,lstm", "--repeats", "1", "--steps", "1",
                       "--warmup", "0", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert [r["arch"] for r in rows] == ["lstm"]
    assert "[bench] train: skipping gla: no plain-PyTorch twin in harness.bench.baselines" in printed
    assert "train: not run for gla (no plain-PyTorch twin in harness.bench.baselines, which has twins of " in printed
