"""Architecture tests: the conformance kit (seqbench.harness.conformance) on every registered model, both forms,
on its tiny preset; and the tests of particular architectures."""
from __future__ import annotations


import pytest
import torch

from seqbench import models
from seqbench.models.common import EOS, PAD, conv_step, reorder_state
from seqbench.harness.conformance import *  # noqa: F403 (the architecture tests, every registered model)
from seqbench.harness.conformance import V, batch, train_to_copy  # noqa: F401 (the kit's batch; tests/test_eval.py uses train_to_copy)
from seqbench.tasks.base import Shape

ARCHS = sorted(models.MODELS)


def preset(name: str) -> dict:
    return models.load_preset(name)


def build(arch: str, family: str, vocab: int = V, **over):
    task = Shape("seq2seq", {"src": vocab, "tgt": vocab}) if family == "translation" else Shape("lm", {"lm": vocab})
    torch.manual_seed(0)
    return models.build({**preset(f"{arch}_tiny"), **over}, task).eval()


def test_unknown_model_lists_valid_names():
    with pytest.raises(KeyError, match="unknown model 'lstmm'") as err:
        models.build({"name": "lstmm"}, Shape("lm", {"lm": 5}))
    assert all(name in str(err.value) for name in models.MODELS)  # built-in and registered alike
    assert "model.architecture" in str(err.value)  # and how to bring one's own


def test_unknown_hyperparameter_fails_loudly():
    with pytest.raises(TypeError, match="d_modle"):
        build("transformer", "lm", d_modle=4)


RESTRICTED = "transformer_restricted_tiny"  # restricted self-attention: each position sees itself and r back


def reach(fn, x: torch.Tensor, t: int, changed: torch.Tensor) -> list[int]:
    """The positions whose output changes when position t of the input ``x`` (B,T,...) becomes ``changed``."""
    other = x.clone()
    other[:, t] = changed
    with torch.no_grad():
        diff = (fn(other) - fn(x)).abs().flatten(2).amax(dim=(0, 2))
    return [i for i, d in enumerate(diff.tolist()) if d > 1e-6]


def test_restricted_attention_sees_its_window_and_nothing_ahead():
    """Window r = 4, two layers: token t reaches outputs t..t+2r through the model and t..t+r through each
    block; never position t-1 (one token ahead of it) nor any earlier one."""
    cfg = preset(RESTRICTED)
    r, layers, T = cfg["attn_window"], cfg["n_layers"], 16
    assert (r, layers) == (4, 2)
    model = build("transformer", "lm", **{k: v for k, v in cfg.items() if k != "preset"})
    tokens = torch.randint(4, V, (2, T), generator=torch.Generator().manual_seed(0))
    x = model.embed(tokens).detach()
    for t in range(T):
        other_token = (tokens[:, t] + 1 - 4) % (V - 4) + 4
        assert reach(model, tokens, t, other_token) == list(range(t, min(T, t + layers * r + 1)))
        for block in model.mixing_blocks():
            assert reach(block, x, t, x[:, t] + torch.randn(x[:, t].shape)) == list(range(t, min(T, t + r + 1)))


def test_restricted_attention_is_refused_by_the_encoder_decoder():
    """The encoder-decoder form takes no window: the setting fails loudly instead of being ignored."""
    with pytest.raises(TypeError, match=r"TransformerSeq2Seq does not take \['attn_window'\]"):
        build("transformer", "translation", attn_window=4)


@pytest.mark.parametrize("bf16_lstm_runs", [True, False])
def test_an_lstm_layer_under_bf16_autocast_runs_in_fp32_where_onednn_has_no_bf16_lstm(monkeypatch, bf16_lstm_runs):
    """Without AVX-512, oneDNN cannot build a bf16 LSTM (the call raises): the layer then runs in fp32, its
    output equal to the fp32 layer's; where it can, the layer runs in bf16 as autocast asks."""
    from seqbench.models import rnn

    if bf16_lstm_runs and not rnn.cpu_bf16_lstm_runs():
        pytest.skip("this CPU's oneDNN has no bf16 LSTM")
    monkeypatch.setattr(rnn, "cpu_bf16_lstm_runs", lambda: bf16_lstm_runs)
    torch.manual_seed(0)
    layer = rnn.RecurrentLayer(torch.nn.LSTM, 8, 8, dropout=0.0).eval()
    x, state = torch.randn(2, 5, 8), (torch.randn(2, 8), torch.randn(2, 8))
    with torch.no_grad():
        y32, final32 = layer.run(x, state)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, final = layer.run(x, tuple(s.bfloat16() for s in state))
    if bf16_lstm_runs:
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), y32, atol=0.05, rtol=0)
    else:
        assert y.dtype == final[0].dtype == torch.float32
        state16 = tuple(s.bfloat16().float() for s in state)  # the state as the caller passed it
        with torch.no_grad():
            expected, _ = layer.run(x, state16)
        torch.testing.assert_close(y, expected, atol=0, rtol=0)


# -- ByteNet's dynamic unfolding ----------------------------------------------------------------

def test_bytenet_unfolded_length_is_the_ceiling_of_a_s_plus_b():
    """|s| counts the EOS marker: sources of 4 and 9 tokens are 5 and 10 long; a = 1.2, b = 0: 1.2 * 5 = 6 exactly
    (not 7: the floating-point 6.000000000000001 is not rounded up), 1.2 * 10 = 12; b = 2.5: 8.5 -> 9, 14.5 -> 15;
    a = 0.5: 2.5 -> 3 and 5 are shorter than the source, which the representation always covers: 5, 10."""
    lengths = torch.tensor([4, 9])
    assert build("bytenet", "translation").unfolded_lengths(lengths).tolist() == [6, 12]
    assert build("bytenet", "translation", unfold_b=2.5).unfolded_lengths(lengths).tolist() == [9, 15]
    assert build("bytenet", "translation", unfold_a=0.5).unfolded_lengths(lengths).tolist() == [5, 10]
    assert build("bytenet", "translation", unfold_b=2.5).max_output_tokens(lengths) is None  # decodes past L


def source_columns(model, src, lengths, tgt) -> torch.Tensor:
    """The source column each decoder position reads in ``model(src, lengths, tgt)``: (B,T,D)."""
    seen = []
    hook = model.unfold.register_forward_hook(lambda m, args, out: seen.append(args[0][..., m.in_features // 2:]))
    model(src, lengths, tgt)
    hook.remove()
    return seen[0]


def test_bytenet_decoder_reads_source_columns_up_to_the_unfolded_length_and_zeros_after():
    """Sources of 7, 5, 3 tokens (|s| = 8, 6, 4 with EOS), b = 2: L = ceil(1.2 |s| + 2) = 12, 10, 7. Every decoder
    position t < L reads a non-zero column that depends on the source (positions |s|..L-1 included: they were zero
    before unfolding), every t >= L reads zeros; a 14-position target (longer than L) is trained on in full.
    Four encoder blocks with dilations 1, 2, 4, 8 see 31 positions, so every column is within reach of the source."""
    model = build("bytenet", "translation", unfold_b=2, n_layers=4, dilations=[1, 2, 4, 8])
    src, lengths, tgt = batch(T=14)
    assert model.unfolded_lengths(lengths).tolist() == [12, 10, 7]
    columns = source_columns(model, src, lengths, tgt)
    other = src.clone()
    other[src != PAD] = (src[src != PAD] + 1 - 4) % (V - 4) + 4  # every source token another
    changed = (source_columns(model, other, lengths, tgt) - columns).abs().amax(-1)  # (B,T)
    for b, cols in enumerate([12, 10, 7]):
        assert (columns[b, :cols].abs().amax(-1) > 0).all() and (changed[b, :cols] > 0).all(), b
        assert (columns[b, cols:] == 0).all(), b
    model.train()
    logits = model(src, lengths, tgt)
    assert logits.shape == (3, 14, V) and torch.isfinite(logits).all()
    grads = torch.autograd.grad(logits[0, 13].logsumexp(-1), list(model.decoder.parameters()))  # past L = 12
    assert any(g.abs().sum() > 0 for g in grads)


def test_bytenet_output_past_the_source_depends_on_the_source_through_its_own_column():
    """One source of 3 tokens (|s| = 4), b = 8: L = ceil(4.8 + 8) = 13. The tiny decoder sees 7 columns (t-6..t),
    so at t = 9..12 it sees only columns 3..12, which were zero past the source before unfolding: the gradient of
    the output at t with respect to the source embeddings was zero there, and is not now."""
    model = build("bytenet", "translation", unfold_b=8, share_embeddings=False)
    src, lengths, tgt = batch(B=1, S=3, T=13)
    lengths = torch.tensor([3])
    assert model.unfolded_lengths(lengths).tolist() == [13]
    embedded = []
    model.src_embed.register_forward_hook(lambda m, args, out: embedded.append(out))
    logits = model(src, lengths, tgt)
    for t in range(9, 13):
        grad, = torch.autograd.grad(logits[0, t].logsumexp(-1), embedded[0], retain_graph=True)
        assert grad[0, :4].abs().sum() > 0, t  # the three tokens and the EOS


def test_bytenet_incremental_decoding_equals_forward_across_the_unfolded_length():
    """Positions before |s|, from |s| to L(s) and past L(s), for each of three sentences (b = 3: L = 13, 11, 8)."""
    model = build("bytenet", "translation", unfold_b=3)
    src, lengths, tgt = batch(T=15)
    assert model.unfolded_lengths(lengths).tolist() == [13, 11, 8]
    full = model(src, lengths, tgt)
    state = model.encode(src, lengths)
    for t in range(tgt.size(1)):
        logits, state = model.decode_step(tgt[:, t], state, t)
        torch.testing.assert_close(logits, full[:, t], atol=1e-5, rtol=0)


def test_reorder_within_sentences_keeps_the_per_sentence_entries():
    state = {"src_memory": torch.arange(4.0), "h": torch.arange(4.0)}
    index = torch.tensor([1, 1, 2, 3])
    within = reorder_state(state, index, within_sentences=True)
    assert within["src_memory"] is state["src_memory"] and within["h"].tolist() == [1, 1, 2, 3]
    assert reorder_state(state, index)["src_memory"].tolist() == [1, 1, 2, 3]


@pytest.mark.parametrize("dilation", [1, 2, 4])
@pytest.mark.parametrize("weight_norm", [False, True])
def test_conv_step_equals_the_convolution_at_the_last_position(dilation, weight_norm):
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(6, 10, 3, dilation=dilation)
    if weight_norm:
        conv = torch.nn.utils.parametrizations.weight_norm(conv)
    window = torch.randn(4, 2 * dilation + 1, 6).transpose(1, 2)  # (B,C_in,(k-1)d+1), not contiguous
    torch.testing.assert_close(conv_step(conv, window), conv(window)[:, :, 0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name, paper_millions", [("transformer_base", 65), ("transformer_big", 213)])
def test_paper_presets_match_the_papers_parameter_counts(name, paper_millions):
    """Vaswani et al. Table 3 with the shared 37k BPE vocabulary: base ~65M, big ~213M (within 4%)."""
    task = Shape("seq2seq", {"src": 37000, "tgt": 37000})
    with torch.device("meta"):
        n = models.count_parameters(models.build(preset(name), task))
    assert abs(n / 1e6 - paper_millions) / paper_millions < 0.04, n


def test_small_presets_have_roughly_equal_parameter_counts():
    """The CPU comparison presets stay within 15% of the small Transformer (8k shared vocabulary)."""
    task = Shape("seq2seq", {"src": 8000, "tgt": 8000})
    with torch.device("meta"):
        counts = {a: models.count_parameters(models.build(preset(a), task)) for a in ARCHS}
    for arch, n in counts.items():
        assert abs(n / counts["transformer"] - 1) < 0.15, counts
