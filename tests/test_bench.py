"""Benchmark harness: plain-PyTorch baselines, fair sizes, equal decoding work, FLOP and memory counting, the CLI."""
from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seqbench import models
from seqbench.harness.bench import real, suites as bench
from seqbench.harness.bench.baselines import WordLanguageModel, build_baseline
from seqbench.harness.bench.decoding import NoEOS, RecomputePrefix, decode_batches, newstest_like_lengths, source_batches
from seqbench.harness.bench.timing import Contender, paired_ratio, peak_call_bytes, resident_bytes, summary
from seqbench.harness.decode import beam_search
from seqbench.harness.profile import _cudnn_rnn, _cudnn_rnn_backward, count_flops, flop_counter
from seqbench.models.common import BOS, PAD
from seqbench.tasks.base import Shape

V = 64
CPU = torch.device("cpu")
# Parameter counts, baseline vs seqbench, may differ by at most this fraction of the baseline's. The
# encoder-decoder twins are exact; the examples' language model has an output bias (V parameters) that
# seqbench's LSTM LM does not: 33,278 of 13.99M = 0.24% at the example's size.
PARAM_TOLERANCE = {"seq2seq": 0.0, "lm": 0.0025}


def tiny(arch: str) -> dict:
    return bench.presets("tiny", [arch])[0][1]


def seq2seq_batch(B=3, S=7, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([S, S - 2, S - 4][:B])
    src = torch.randint(4, V, (B, S), generator=g)
    src[torch.arange(S)[None, :] >= lengths[:, None]] = PAD
    tgt = torch.randint(4, V, (B, T + 1), generator=g)
    tgt[:, 0] = BOS
    return src, lengths, tgt[:, :-1], tgt[:, 1:]


def build_pair(arch: str, cfg: dict | None = None, vocab: int = V):
    cfg = cfg or tiny(arch)
    torch.manual_seed(0)
    sb = models.build(cfg, bench.translation_task(vocab))
    return sb, build_baseline(cfg, vocab)


# -- weight transplant: a baseline given seqbench's weights must compute the same function ---------------
RENAMES = {
    "transformer": [(r"^embed\.", "src_embed.tok."), (r"^core\.encoder\.norm\.", "enc_norm."),
                    (r"^core\.decoder\.norm\.", "dec_norm."),
                    (r"^core\.encoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)", r"encoder.\1.attn.qkv.\2"),
                    (r"^core\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"encoder.\1.attn.out."),
                    (r"^core\.encoder\.layers\.(\d+)\.norm(\d)\.", r"encoder.\1.r\2.norm."),
                    *((rf"^core\.decoder\.layers\.(\d+)\.norm{n + 1}\.", rf"decoder.\1.r.{n}.norm.") for n in range(3)),
                    (r"^core\.decoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)",
                     r"decoder.\1.self_attn.qkv.\2"),
                    (r"^core\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"decoder.\1.self_attn.out."),
                    (r"^core\.decoder\.layers\.(\d+)\.multihead_attn\.out_proj\.", r"decoder.\1.cross_attn.out."),
                    (r"^core\.(en|de)coder\.layers\.(\d+)\.linear(\d)\.", r"\1coder.\2.ff.fc\3.")],
    "rnn": [(r"^embed\.", "src_embed."), (r"^score\.", "attn.wk."),
            (r"^(en|de)coder\.(\w+)_l(\d+)(_reverse)?$", r"\1coder.\3.rnn.\2_l0\4")],
    "convs2s": [(r"^embed\.", "src_embed.tok."), (r"^(src|tgt)_pos\.", r"\1_embed.pos."),
                (r"^enc_convs\.(\d+)\.", r"encoder.\1.conv.conv."), (r"^dec_convs\.(\d+)\.", r"decoder.\1.conv.conv."),
                (r"^att_(q|out)\.(\d+)\.", r"decoder.\2.attn.\1."), (r"^(fc|proj)\.", r"head.\1.")],
    "bytenet": [(r"^embed\.", "src_embed.tok."), (r"\.net_in\.0\.", ".norm1."), (r"\.net_in\.2\.", ".reduce."),
                (r"\.net_in\.3\.", ".norm2."), (r"\.net_out\.0\.", ".norm3."), (r"\.net_out\.2\.", ".expand.")],
    "lm": [(r"^encoder\.", "tok_embed."), (r"^rnn\.(\w+)_l(\d+)$", r"blocks.\2.rnn.\1_l0"),
           (r"^decoder\.weight", "proj.weight")],
}
RENAMES["lstm"] = RENAMES["gru"] = RENAMES["rnn"]


def transplant(kind: str, seqbench: nn.Module, baseline: nn.Module) -> None:
    """Load seqbench's weights into the baseline, renaming each baseline key to seqbench's."""
    theirs, state = seqbench.state_dict(), {}
    for key, value in baseline.state_dict().items():
        cross = re.match(r"^core\.decoder\.layers\.(\d+)\.multihead_attn\.in_proj_(weight|bias)", key)
        if cross:  # nn.MultiheadAttention packs q, k, v; seqbench's cross attention has q and kv
            i, what = cross.groups()
            state[key] = torch.cat([theirs[f"decoder.{i}.cross_attn.q.{what}"],
                                    theirs[f"decoder.{i}.cross_attn.kv.{what}"]])
            continue
        if kind == "lm" and key == "decoder.bias":
            state[key] = torch.zeros_like(value)  # the one parameter seqbench's LM lacks
            continue
        name = key
        for pattern, repl in RENAMES[kind]:
            name = re.sub(pattern, repl, name)
        assert theirs[name].shape == value.shape, (key, name)
        state[key] = theirs[name]
    baseline.load_state_dict(state)


@pytest.mark.parametrize("arch", bench.ARCHS)
def test_baseline_computes_the_same_function_as_seqbench(arch):
    """Given seqbench's weights, the plain twin gives the same logits: the benchmark compares equal work."""
    sb, base = build_pair(arch)
    transplant(arch, sb, base)
    src, lengths, tgt_in, _ = seq2seq_batch()
    sb.eval(), base.eval()
    with torch.no_grad():
        torch.testing.assert_close(base(src, lengths, tgt_in), sb(src, lengths, tgt_in), atol=1e-5, rtol=1e-4)


def test_word_language_model_computes_the_same_function_as_seqbench_lstm_lm():
    cfg = {"name": "lstm", "d_model": 16, "n_layers": 2, "dropout": 0.2, "tie_output": False}
    sb = models.build(cfg, Shape("lm", {"lm": V})).eval()
    base = WordLanguageModel(V, 16, 16, 2, 0.2).eval()
    transplant("lm", sb, base)
    tokens = torch.randint(0, V, (3, 9), generator=torch.Generator().manual_seed(0))  # (B,T)
    with torch.no_grad():
        out, _ = base(tokens.t(), base.init_hidden(3))  # (T*B, V) log-probabilities, time-first
        expected = F.log_softmax(sb(tokens), -1).transpose(0, 1).reshape(-1, V)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", bench.ARCHS)
def test_baseline_trains_one_step_at_tiny_size(arch):
    _, model = build_pair(arch)
    src, lengths, tgt_in, tgt_out = batch = seq2seq_batch()
    assert model(src, lengths, tgt_in).shape == (3, 6, V)
    loss_of = bench.seq2seq_loss(batch)
    step, opt, autocast = bench.training_step(model, loss_of, device=CPU, precision="fp32", compile_model=False)
    loss = loss_of(model, autocast)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    opt.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in model.parameters()]
    step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))  # Adam moved every tensor


def test_word_language_model_trains_one_step_carrying_its_hidden_state():
    """As in the examples: the first step starts from zeros, the next from the last one's final state, detached."""
    model = WordLanguageModel(V, 16, 16, 2, 0.2)
    text = torch.randint(0, V, (4, 9), generator=torch.Generator().manual_seed(0))
    loss_of = bench.word_lm_loss(model, text[:, :-1], text[:, 1:])
    seen = []  # (hidden state given, hidden state returned) of each forward pass
    model.register_forward_hook(lambda module, args, out: seen.append((args[1], out[1])))
    step, _, _ = bench.training_step(model, loss_of, device=CPU, precision="fp32", compile_model=False)
    before = [p.detach().clone() for p in model.parameters()]
    step()
    step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    (first_in, first_out), (second_in, _) = seen
    assert [h.shape for h in first_in] == [(2, 4, 16)] * 2 and not any(h.any() for h in first_in)
    assert all(h.abs().sum() > 0 for h in first_out)
    assert all(torch.equal(given, last) for given, last in zip(second_in, first_out))
    assert all(h.grad_fn is None and not h.requires_grad for h in second_in)  # no backward into the first step


def test_baselines_refuse_configs_they_do_not_replicate():
    with pytest.raises(ValueError, match="attention='bahdanau', input_feed=True.*replicates Luong attention"):
        build_baseline(bench.load_preset("gru_tiny"), V)
    with pytest.raises(ValueError, match="share_embeddings=false"):
        build_baseline(bench.load_preset("convs2s_wmt_en_de"), V)


@pytest.mark.parametrize("arch,preset,vocab", [*[(a, "tiny", V) for a in bench.ARCHS],
                                               *[(a, "small", 8000) for a in bench.ARCHS],
                                               ("transformer", "transformer_base", 37000)])
def test_parameter_counts_agree(arch, preset, vocab):
    cfg = dict(bench.presets(preset, [arch])[0][1])
    sb, base = build_pair(arch, cfg, vocab)
    n_sb, n_base = models.count_parameters(sb), models.count_parameters(base)
    assert abs(n_sb - n_base) <= PARAM_TOLERANCE["seq2seq"] * n_base, (n_sb, n_base)
    if preset == "small":  # the sizes the README states
        assert n_sb == {"transformer": 7_578_624, "lstm": 7_951_104, "gru": 7_664_800, "convs2s": 7_447_360,
                        "bytenet": 8_575_872}[arch]


@pytest.mark.parametrize("arch", bench.ARCHS)
def test_paper_sizes_have_twins_of_equal_size(arch):
    (_, cfg), = bench.presets("paper", [arch])
    with torch.device("meta"):  # published sizes: count without allocating
        sb, base = build_pair(arch, cfg, 37000)
    assert models.count_parameters(sb) == models.count_parameters(base)
    assert models.count_parameters(sb) > {"transformer": 60e6, "lstm": 150e6, "gru": 100e6, "convs2s": 150e6,
                                          "bytenet": 100e6}[arch]


def test_lm_parameter_counts_agree_at_the_examples_size():
    cfg = {"name": "lstm", "d_model": 200, "n_layers": 2, "dropout": 0.2, "tie_output": False}
    n_sb = models.count_parameters(models.build(cfg, Shape("lm", {"lm": 33278})))
    n_base = models.count_parameters(WordLanguageModel(33278, 200, 200, 2, 0.2))
    assert n_base - n_sb == 33278  # the examples' output bias
    assert abs(n_sb - n_base) <= PARAM_TOLERANCE["lm"] * n_base


# -- decoding: recomputing the prefix finds the same hypotheses as the cached search ---------------
def repo_tiny(arch):
    return models.load_preset(f"{arch}_tiny")


@pytest.mark.parametrize("arch", bench.ARCHS)
@pytest.mark.parametrize("source", ["bench", "repo"])
def test_recompute_prefix_decoding_matches_cached_beam_search(arch, source):
    torch.manual_seed(0)
    model = models.build(tiny(arch) if source == "bench" else repo_tiny(arch), bench.translation_task(V)).eval()
    src, lengths, _, _ = seq2seq_batch(S=9)
    limits = [12, 9, 7]
    cached = beam_search(model, src, lengths, limits, beam=4)
    assert cached == beam_search(RecomputePrefix(model), src, lengths, limits, beam=4)
    forced = beam_search(NoEOS(model), src, lengths, limits, beam=4)
    assert forced == beam_search(NoEOS(RecomputePrefix(model)), src, lengths, limits, beam=4)
    assert [len(h) for h in forced] == limits  # EOS masked: every hypothesis runs to its limit


def test_newstest_like_sources():
    lengths = newstest_like_lengths(3000, seed=0)
    assert 26 <= sum(lengths) / len(lengths) <= 28 and min(lengths) >= 1 and max(lengths) <= 100
    batches = source_batches(lengths[:10], V, 4)
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    assert sorted(lengths[:10]) == [n for _, lens in batches for n in lens.tolist()]
    for src, lens in batches:
        assert src.size(1) == lens.max() and ((src != PAD).sum(1) == lens).all()
    model = models.build(tiny("lstm"), bench.translation_task(V)).eval()
    hyps = decode_batches(NoEOS(model), batches, beam=2, lenpen=0.6, len_a=1.0, len_b=0, device=CPU)
    assert [len(h) for h in hyps] == sorted(lengths[:10])


# -- counting FLOPs and memory ------------------------------------------------------------------------------
def test_transformer_flops_include_attention_matmuls():
    """Counted forward+backward FLOPs of a Transformer equal a hand count of its matmuls, attention included."""
    cfg = dict(repo_tiny("transformer"))
    d, d_ff, L, B, S, T = cfg["d_model"], cfg["d_ff"], cfg["n_layers"], 2, 7, 5
    torch.manual_seed(0)
    model = models.build(cfg, bench.translation_task(V)).train()
    src, tgt = torch.randint(4, V, (B, S)), torch.randint(4, V, (B, T))
    flops = count_flops(lambda: model(src, torch.tensor([S, S]), tgt).sum().backward())
    Ns, Nt = B * S, B * T
    weights = (Ns * L * (4 * d * d + 2 * d * d_ff)  # encoder: qkv, out, FFN
               + Nt * L * (3 * d * d + d * d + d * d + d * d + 2 * d * d_ff)  # decoder: qkv, out, cross q, out, FFN
               + Ns * L * 2 * d * d  # cross-attention keys and values, from the encoder output
               + Nt * d * V)  # output projection
    attention = 2 * B * d * L * (S * S + T * T + T * S)  # multiply-adds of QK^T and AV: encoder, self, cross
    # 2 FLOPs per multiply-add. Backward: two matmuls per weight matmul; for attention five matmuls per
    # forward two (torch's convention for fused attention kernels, which recompute the scores)
    assert flops == 3 * (2 * weights) + (2 + 5) * attention
    assert attention > 0


@pytest.mark.parametrize("cell,gates", [(nn.LSTM, 4), (nn.GRU, 3)])
def test_recurrent_layer_flops_are_counted(cell, gates):
    rnn = cell(8, 6, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(3, 5, 8)
    forward = 2 * 3 * 5 * 2 * (gates * 6 * (8 + 6) + gates * 6 * (12 + 6))  # 2 directions, layer inputs 8 and 12
    with torch.no_grad():
        assert count_flops(lambda: rnn(x)) == forward


def test_cudnn_rnn_formula():
    # 2 layers, 2 directions, LSTM, hidden 6, input 8, packed input of 14 positions, biases
    weights = [torch.Size(s) for _ in range(2) for s in ((24, 8), (24, 6), (24,), (24,))]
    weights += [torch.Size(s) for _ in range(2) for s in ((24, 12), (24, 6), (24,), (24,))]
    per_position = 2 * (24 * 8 + 24 * 6) + 2 * (24 * 12 + 24 * 6)
    assert _cudnn_rnn(torch.Size((14, 8)), weights) == 2 * 14 * per_position
    mask = [True, True, True, True]
    assert _cudnn_rnn_backward(torch.Size((14, 8)), weights, *range(19), mask) == 4 * 14 * per_position


def test_flop_counter_is_torch_counter_with_additions():
    with flop_counter() as counter:
        torch.randn(4, 5) @ torch.randn(5, 6)
    assert counter.get_total_flops() == 2 * 4 * 5 * 6


def test_peak_call_bytes_on_cpu():
    def call():
        a = torch.ones(1_000_000)  # 4 MB
        b = a * 2  # 8 MB live
        del a
        c = b + 1  # 8 MB live again
        return c.sum()

    peak = peak_call_bytes(call, CPU)
    assert 8_000_000 <= peak <= 8_000_000 + 4096


def test_resident_bytes_counts_shared_storage_once():
    embed = nn.Embedding(10, 4)
    proj = nn.Linear(4, 10, bias=False)
    proj.weight = embed.weight
    assert resident_bytes([embed.weight, proj.weight, embed.weight[2:]]) == 10 * 4 * 4


def test_summary_and_paired_ratio():
    a = Contender("a", lambda: None, tokens=100, seconds=[1.0, 2.0, 1.5, 1.0, 1.0])
    b = Contender("b", lambda: None, tokens=100, seconds=[2.0, 2.0, 3.0, 2.0, 4.0])
    s = summary(a)
    assert s["median_s"] == 1.0 and s["tokens_per_s"] == 100.0 and (s["min_s"], s["max_s"]) == (1.0, 2.0)
    assert (s["q1_s"], s["q3_s"]) == (1.0, 1.5) and s["iqr_pct"] == 50.0
    r = paired_ratio(a, b)
    assert r["ratio"] == 2.0 and r["ratio_rounds"] == [2.0, 1.0, 2.0, 2.0, 4.0]
    assert (r["ratio_min"], r["ratio_max"]) == (1.0, 4.0)


# -- the command line ----------------------------------------------------------------------------------------
def test_cli_runs_every_suite_at_tiny_size(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--suite", "all", "--preset", "tiny", "--device", "cpu", "--repeats", "1", "--steps", "1",
                "--warmup", "0", "--decode-sentences", "4", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "| model | baseline | seqbench tok/s | baseline tok/s | ratio | spread | peak memory ratio |" in printed
    data = json.loads(out.read_text())
    rows = data["rows"]
    every = list(models.MODELS)  # train: those with a twin (bench.ARCHS); state: tests/test_bench_state.py
    assert [(r["suite"], r["arch"]) for r in rows] == [
        *[("train", a) for a in bench.ARCHS], ("lm", "lstm"), *[("precision", a) for a in every],
        *[("decode", a) for a in every], *[("state", a) for a in every for _ in (8, 16)]]
    for r in (r for r in rows if r["suite"] != "state"):
        sb, base = r["stats"]["seqbench"], r["stats"]["baseline"]
        assert sb["tokens_per_s"] > 0 and base["tokens_per_s"] > 0 and r["ratio"] > 0
        assert sb["peak_bytes"] > 0 and base["peak_bytes"] > 0 and len(r["ratio_rounds"]) == 1
        if r["suite"] != "precision":
            assert f"| {r['model']} | {r['baseline']} |" in printed
        if r["suite"] == "decode":
            assert r["same_hypotheses"] is True
            # EOS masked and limits |s|: as many target tokens as source tokens
            assert sb["tokens"] == base["tokens"] == sum(newstest_like_lengths(4, mean=8.0, sd=4.0, seed=0))
        else:
            assert r["flop_ratio"] == 1.0  # the twins do the same matmuls
            assert sb["tokens"] == (4 * 8 if r["suite"] == "lm" else 4 * 10)
    assert {r["stats"]["seqbench"]["params"] for r in rows if r["suite"] == "train"} == {
        models.count_parameters(models.build(tiny(a), bench.translation_task(V))) for a in bench.ARCHS}
    assert data["meta"]["device"] == "cpu" and data["meta"]["args"]["repeats"] == 1


def test_precision_suite_times_every_architecture_in_bf16_against_fp32(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--suite", "precision", "--preset", "tiny", "--device", "cpu", "--threads", "1", "--repeats", "1",
                "--steps", "1", "--warmup", "0", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "| model | fp32 tok/s | bf16 tok/s | speed ratio bf16 / fp32 |" in printed
    assert "CPU bf16 matrix instructions (AMX-BF16 or AVX512-BF16): " in printed
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [r["arch"] for r in rows] == list(models.MODELS)
    for r in rows:
        assert r["suite"] == "precision" and r["precision"] == "bf16" and r["ratio"] > 0
        n = models.count_parameters(models.build(tiny(r["arch"]), bench.translation_task(V)))
        assert r["model"] == f"{r['arch']} tiny ({n / 1e6:.2f}M)" and f"| {r['model']} |" in printed
        bf16, fp32 = r["stats"]["seqbench"], r["stats"]["baseline"]
        assert bf16["params"] == fp32["params"] == n  # two copies of one model
        assert bf16["tokens"] == fp32["tokens"] == 4 * 10 and len(r["ratio_rounds"]) == 1
        assert r["flop_ratio"] == 1.0 and bf16["mfu"] > 0 and fp32["mfu"] > 0  # each against the peak in its own dtype
    assert data["meta"]["threads"] == 1 and data["meta"]["cpu_bf16_matmul"] in (True, False)


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_training_step_runs_the_model_at_its_precision(precision, dtype):
    """The precision suite's two contenders: seqbench's step under bf16 autocast, and in fp32."""
    model = models.build(tiny("transformer"), bench.translation_task(V))
    seen = []
    model.register_forward_hook(lambda module, inputs, logits: seen.append(logits.dtype))
    step, opt, _ = bench.training_step(model, bench.seq2seq_loss(seq2seq_batch(), fused=True), device=CPU,
                                       precision=precision, compile_model=False)
    step()
    assert seen == [dtype]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 weights, whatever the precision
    assert opt.defaults["fused"] is True  # the trainer's Adam


def test_cli_keeps_the_single_preset_form():
    args = bench.parse_args(["--preset", "transformer_base", "--precision", "bf16"])
    assert (args.batch, args.src_len, args.tgt_len, args.vocab) == (256, 50, 50, 37000)
    assert [arch for arch, _ in bench.presets(args.preset, args.models)] == ["transformer"]
    with pytest.raises(SystemExit, match="no such preset"):
        bench.presets("transformer_huge", list(bench.ARCHS))


# -- the real suite: the trainer's step on a task's own batches -----------------------------------------------
COPY = ["--task", "copy", "--task-set", "n_train=48", "--task-set", "n_valid=4", "--task-set", "n_test=4"]


def copy_batch():
    """A translation batch of three copy examples with sources of 2, 5 and 3 tokens (targets the same)."""
    import numpy as np

    from seqbench.tasks.batching import translation_batch
    seqs = [np.arange(4, 4 + n) for n in (2, 5, 3)]
    return translation_batch(seqs, seqs, [0, 1, 2])


def test_padding_counts_pad_tokens_of_sources_and_targets():
    batch = copy_batch()  # sources 3 x 5 (pads 3 + 0 + 2); targets 3 x 6 with EOS (pads 3 + 0 + 2)
    pad = real.padding([batch])
    assert pad == pytest.approx({"src": 5 / 15, "tgt": 5 / 18, "all": 10 / 33})
    assert real.shapes([batch]) == [(3, 5, 6)]


def test_unpadded_keeps_every_example_and_trims_each_part():
    batch = copy_batch()
    parts = real.unpadded(batch, 2)
    assert sorted(i for p in parts for i in p.index) == [0, 1, 2]
    assert [p.index for p in parts] == [[0, 2], [1]]  # sorted by source length, cut into near-equal parts
    assert [tuple(p.inputs["src"].shape) for p in parts] == [(2, 3), (1, 5)]
    assert sum(p.n_tokens for p in parts) == batch.n_tokens
    for p in parts:
        rows = torch.tensor([batch.index.index(i) for i in p.index])
        S, T = p.inputs["src"].size(1), p.target.size(1)
        assert torch.equal(p.inputs["src"], batch.inputs["src"][rows, :S])
        assert torch.equal(p.target, batch.target[rows, :T]) and torch.equal(p.inputs["tgt_in"],
                                                                              batch.inputs["tgt_in"][rows, :T])
    assert real.padding(parts)["all"] < real.padding([batch])["all"]


def test_time_rounds_takes_turns_in_reversed_order_every_other_round():
    order = []
    contenders = [Contender(name, lambda name=name: order.append(name), tokens=1) for name in "abc"]
    from seqbench.harness.bench.timing import time_rounds
    time_rounds(contenders, device=CPU, rounds=3, calls=2, warmup=1)
    assert "".join(order) == "abc" + "aabbcc" + "ccbbaa" + "aabbcc"
    assert all(len(c.seconds) == 3 for c in contenders)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_the_unpadded_contender_makes_the_trainers_update(tmp_path):
    """Without dropout, the re-cut batch's summed sub-batch gradients give the update the whole batch gives."""
    task = real.load_task("copy", ["n_train=48", "n_valid=4", "n_test=4"])
    batch = real.real_batches(task, 64, 1, seed=1)[0]
    cfg = {**tiny("transformer"), "dropout": 0.0}
    whole, cut = (real.build_trainer(cfg, task, "fp32", 64, CPU, 0, tmp_path / k) for k in ("whole", "cut"))
    for t in (whole, cut):  # plain SGD: the update is the gradient itself
        t.opt = torch.optim.SGD(t.model.parameters(), lr=1.0)
    assert real.padding([batch])["all"] > real.padding(real.unpadded(batch, 3))["all"]
    real.trainer_call(whole, [batch])()
    real.accumulated_call(cut, [(real.unpadded(batch, 3), batch.n_tokens)])()
    for (name, a), b in zip(whole.model.named_parameters(), cut.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_real_suite_refuses_an_unknown_or_language_model_task():
    with pytest.raises(SystemExit, match="--task nosuch: no task config .*valid: .*multi30k"):
        real.load_task("nosuch", [])
    with pytest.raises(SystemExit, match="--task assoc_recall: the real suite times encoder-decoder"):
        real.load_task("assoc_recall", ["n_train=8", "n_valid=2", "n_test=2"])
    with pytest.raises(SystemExit, match="--task-set 'n_train': expected key=value"):
        real.load_task("copy", ["n_train"])
    copy = real.load_task("copy", ["n_train=48", "n_valid=4", "n_test=4"])
    with pytest.raises(SystemExit, match="--real-batches 999: the task has"):
        real.real_batches(copy, 64, 999, seed=1)
    with pytest.raises(SystemExit, match="--max-tokens 4: an example of .* tokens exceeds .*raise --max-tokens"):
        real.real_batches(copy, 4, 1, seed=1)


def test_real_suite_times_the_trainer_against_the_bench_step_and_profiles_it(tmp_path, capsys):
    out = tmp_path / "real.json"
    rows = bench.main(["--suite", "real", "--preset", "tiny", *COPY, "--max-tokens", "64", "--real-batches", "2",
                       "--split", "2", "--device", "cpu", "--precision", "fp32", "--repeats", "1", "--warmup", "0",
                       "--profile", "--profile-steps", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    (row,) = rows
    task = real.load_task("copy", ["n_train=48", "n_valid=4", "n_test=4"])
    batches = task.batches("train", 64, epoch=0, shuffle=True, seed=1)[:2]  # what Trainer.epoch_batches takes
    st = row["stats"]
    assert row["suite"] == "real" and row["arch"] == "transformer" and set(st) == set(real.CONTENDERS)
    assert st["trainer"]["tokens"] == st["unpadded"]["tokens"] == sum(b.n_tokens for b in batches)
    assert st["bench_real_shapes"]["tokens"] == sum(b.target.numel() for b in batches)
    assert st["bench_train_shape"]["tokens"] == 2 * 4 * 10  # the tiny train suite's 4 x (10 + 10), per batch
    assert st["trainer"]["padding"] == pytest.approx(real.padding(batches))
    assert [tuple(s) for s in st["trainer"]["shapes"]] == real.shapes(batches)
    assert row["ratio"] == pytest.approx(st["trainer"]["tokens_per_s"] / st["bench_train_shape"]["tokens_per_s"])
    assert row["cost_ratio"] == pytest.approx(1 / row["ratio"])
    assert all(s["mfu"] > 0 and s["flops"] > 0 for s in st.values())
    assert f"real / bench cost per target token = {row['cost_ratio']:.2f}x" in printed
    assert "| contender | shapes (B x S + B x T per update) | target tokens | padding src / tgt / all |" in printed
    pad = st["trainer"]["padding"]
    assert f"{100 * pad['src']:.1f}% / {100 * pad['tgt']:.1f}% / {100 * pad['all']:.1f}%" in printed
    # the profile: phases, the backward/forward ratio, the top operators of the forward and the backward
    for text in ("| model forward |", "| loss forward |", "| backward |", "| optimizer |", "backward / forward",
                 "top operators by self CPU time: model forward", "top operators by self CPU time: backward"):
        assert text in row["profile"] and text in printed
    backward = row["profile"].split("top operators by self CPU time: backward")[1]
    assert "aten::" in backward and "AddmmBackward0" in row["profile"]
    saved = tmp_path / "real.profile.transformer.fp32.txt"
    assert saved.read_text() == row["profile"] + "\n"
    assert json.loads(out.read_text())["rows"][0]["cost_ratio"] == pytest.approx(row["cost_ratio"])


def test_real_suite_defaults_to_the_transformer_and_checks_its_sizes():
    assert bench.parse_args(["--suite", "real"]).models == ["transformer"]
    assert bench.parse_args(["--suite", "real", "--archs", "lstm"]).models == ["lstm"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--suite", "real", "--real-batches", "0"])
