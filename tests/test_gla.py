"""Gated linear attention (models/gla): the chunkwise form against the reference loop, the gate, the carried state,
the bidirectional encoder's padding, incremental decoding and the settings; the fla kernels where installed on a GPU."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seqbench import models, tasks
from seqbench.harness import settings
from seqbench.models.common import BOS, PAD
from seqbench.models.gla import ARCHITECTURE, GLALM, GLASeq2Seq, kernels
from seqbench.models.gla.layer import GatedLinearAttention, default_d_ff, reverse_within
from seqbench.models.gla.recurrence import chunk_layout, chunkwise_gla, recurrent_gla, sub_chunk_size
from seqbench.tasks.base import Shape

V = 23


def inputs(B: int, T: int, H: int, d_k: int, d_v: int, log_alpha=None, seed: int = 0, dtype=torch.float32):
    """Random q, k (B,T,H,d_k), v (B,T,H,d_v), log-gates (B,T,H,d_k) spread over (0, 1) gates, an initial state."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, d_k, generator=g, dtype=dtype) * d_k**-0.5
    k, v = torch.randn(B, T, H, d_k, generator=g, dtype=dtype), torch.randn(B, T, H, d_v, generator=g, dtype=dtype)
    if log_alpha is None:
        log_alpha = F.logsigmoid(3 * torch.randn(B, T, H, d_k, generator=g, dtype=dtype))
    state = torch.randn(B, H, d_k, d_v, generator=g, dtype=dtype)
    return q, k, v, log_alpha, state


def assert_equal_fp32(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to fp32 rounding: 1e-5 of the largest magnitude."""
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual, expected, atol=1e-5 * max(1.0, expected.abs().max().item()), rtol=1e-5)


# -- the chunkwise form equals the recurrence ------------------------------------------------------------------

SHAPES = [  # B, T, H, d_k, d_v, chunk_size: T not divisible by the chunk, T = 1, chunks longer than T, one per step,
    (2, 37, 3, 5, 6, 8),  # several chunks of one sub-chunk
    (1, 1, 1, 4, 4, 64),
    (2, 1, 2, 3, 5, 1),
    (2, 9, 2, 4, 4, 1),
    (3, 20, 2, 4, 3, 64),
    (2, 150, 2, 8, 4, 64),  # 3 chunks of 4 sub-chunks of 16, the last chunk partial
    (2, 70, 1, 4, 6, 24),  # sub-chunks of 12
    (1, 40, 2, 3, 3, 17),  # a prime chunk above 16: sub-chunks of 1
]


@pytest.mark.parametrize("B,T,H,d_k,d_v,chunk", SHAPES)
def test_chunkwise_form_equals_the_recurrence(B, T, H, d_k, d_v, chunk):
    q, k, v, g, state = inputs(B, T, H, d_k, d_v)
    for initial in (None, state):
        o, final = chunkwise_gla(q, k, v, g, chunk, initial)
        o_ref, final_ref = recurrent_gla(q, k, v, g, initial)
        assert o.shape == (B, T, H, d_v) and final.shape == (B, H, d_k, d_v)
        assert_equal_fp32(o, o_ref)
        assert_equal_fp32(final, final_ref)


def test_sub_chunks_divide_the_chunk():
    assert [sub_chunk_size(c) for c in (64, 16, 24, 10, 17, 1, 48)] == [16, 16, 12, 10, 1, 1, 16]


def test_a_sequence_shorter_than_a_chunk_is_padded_to_whole_sub_chunks_only():
    """A 20-token sentence under chunk_size 64 is one chunk of 32 positions (two sub-chunks of 16), not 64; a
    sequence as long as a chunk or longer keeps the configured chunk."""
    assert [chunk_layout(T, 64) for T in (1, 16, 17, 20, 33, 64, 65, 500)] == \
        [(16, 16), (16, 16), (32, 16), (32, 16), (48, 16), (64, 16), (64, 16), (64, 16)]
    assert chunk_layout(5, 24) == (12, 12) and chunk_layout(30, 24) == (24, 12) and chunk_layout(7, 1) == (1, 1)


@pytest.mark.parametrize("gate", ["near 0", "underflowing", "near 1", "exactly 1", "mixed", "0 then moderate"])
def test_extreme_gates_stay_exact_and_finite(gate):
    """Gates near 0 (log -60), so small that they underflow (log -1e4), near 1 (log -1e-7), 1, a mixture, and a
    gate near 0 (log -1000) every 8 steps followed by moderate ones (log -0.1 to -0.5), where a decay taken as the
    difference of two running sums (-1000.3 - -1000.1) would keep only 4 of its digits: outputs, final states
    and gradients equal the reference's, all finite."""
    B, T, H, d = 2, 130, 2, 4
    rand = torch.rand(B, T, H, d, generator=torch.Generator().manual_seed(3))
    every_8th = (torch.arange(T) % 8 == 0)[None, :, None, None]
    log_alpha = {"near 0": torch.full_like(rand, -60.0), "underflowing": torch.full_like(rand, -1e4),
                 "near 1": torch.full_like(rand, -1e-7), "exactly 1": torch.zeros_like(rand),
                 "mixed": torch.where(rand < 0.1, -1e4, torch.where(rand < 0.5, -30.0, -1e-6)),
                 "0 then moderate": torch.where(every_8th, -1000.0, -0.1 - 0.4 * rand)}[gate]
    q, k, v, g, _ = inputs(B, T, H, d, d, log_alpha=log_alpha)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, g)]
    o, final = chunkwise_gla(*leaves, 64)
    o_ref, final_ref = recurrent_gla(q, k, v, g)
    assert_equal_fp32(o, o_ref)
    assert_equal_fp32(final, final_ref)
    (o.square().sum() + final.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)


def test_chunkwise_gradients_equal_the_recurrences():
    """float64: the backward pass of the chunkwise form (autograd through masks and exponentials) is the
    reference's."""
    leaves = [t.requires_grad_(True) for t in inputs(2, 21, 2, 3, 4, dtype=torch.float64)]
    grads = []
    for run in (lambda *a: chunkwise_gla(*a[:4], 8, a[4]), recurrent_gla):
        o, final = run(*leaves)
        grads.append(torch.autograd.grad(o.sin().sum() + final.cos().sum(), leaves))
    for chunked, reference in zip(*grads):
        torch.testing.assert_close(chunked, reference, atol=1e-10, rtol=1e-10)


def test_on_a_cpu_a_sequence_shorter_than_a_chunk_runs_the_recurrence_with_the_same_values_and_gradients(monkeypatch):
    from seqbench.models.gla import layer  # noqa: PLC0415
    calls = []
    for name in ("recurrent_gla", "chunkwise_gla"):
        real = getattr(layer, name)
        monkeypatch.setattr(layer, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    for T, form in ((7, "recurrent_gla"), (8, "chunkwise_gla"), (19, "chunkwise_gla")):
        leaves = [t.double().requires_grad_() for t in inputs(2, T, 2, 4, 3, seed=T)]
        calls.clear()
        o, final = layer.gla(*leaves[:4], 8, leaves[4])
        assert calls == [form], (T, calls)
        want_o, want_final = recurrent_gla(*leaves[:4], leaves[4])
        torch.testing.assert_close((o, final), (want_o, want_final), rtol=1e-10, atol=1e-10)
        got = torch.autograd.grad(o.square().sum() + final.sum(), leaves)
        want = torch.autograd.grad(want_o.square().sum() + want_final.sum(), leaves)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_carried_state_continues_the_sequence(chunk):
    """Two halves, the second from the first's final state, give the whole sequence's outputs and state."""
    q, k, v, g, state = inputs(2, 33, 2, 4, 5, seed=1)
    whole, final = chunkwise_gla(q, k, v, g, chunk, state)
    first, mid = chunkwise_gla(q[:, :13], k[:, :13], v[:, :13], g[:, :13], chunk, state)
    second, end = chunkwise_gla(q[:, 13:], k[:, 13:], v[:, 13:], g[:, 13:], chunk, mid)
    assert_equal_fp32(torch.cat([first, second], dim=1), whole)
    assert_equal_fp32(end, final)
    reference_mid = recurrent_gla(q[:, :13], k[:, :13], v[:, :13], g[:, :13], state)[1]
    assert_equal_fp32(mid, reference_mid)


def test_the_state_forgets_through_the_gate_and_adds_the_outer_product():
    """One step by hand: S_1 = diag(alpha) S_0 + k^T v, o = q S_1."""
    q, k, v = torch.tensor([[[[1.0, 2.0]]]]), torch.tensor([[[[3.0, -1.0]]]]), torch.tensor([[[[2.0]]]])
    alpha, state = torch.tensor([[[[0.5, 0.25]]]]), torch.tensor([[[[4.0], [8.0]]]])
    o, final = recurrent_gla(q, k, v, alpha.log(), state)
    expected = torch.tensor([[[[0.5 * 4 + 3 * 2], [0.25 * 8 - 1 * 2]]]])  # (1,1,2,1)
    torch.testing.assert_close(final, expected)
    torch.testing.assert_close(o, torch.tensor([[[[8.0 + 2 * 0.0]]]]))
    torch.testing.assert_close(chunkwise_gla(q, k, v, alpha.log(), 64, state)[1], expected)


# -- the layer: gate, dimensions, bidirectional scan -----------------------------------------------------------

def mixer(**over) -> GatedLinearAttention:
    torch.manual_seed(0)
    hp = dict(expand_k=0.5, expand_v=1.0, gate_rank=4, gate_temperature=16.0, chunk_size=4) | over
    return GatedLinearAttention(16, 2, **hp)


def test_the_forget_gate_is_a_low_rank_sigmoid_to_the_power_one_over_tau():
    layer = mixer()
    scan = layer.scans[0]
    x = torch.randn(2, 5, 16)
    q, k, v, log_alpha = scan(x)
    assert (scan.gate_down.weight.shape, scan.gate_up.weight.shape) == ((4, 16), (8, 4))
    logits = x @ scan.gate_down.weight.T @ scan.gate_up.weight.T + scan.gate_up.bias
    alpha = torch.sigmoid(logits) ** (1 / 16)
    torch.testing.assert_close(log_alpha.exp(), alpha.view(2, 5, 2, 4))
    assert q.shape == k.shape == (2, 5, 2, 4) and v.shape == (2, 5, 2, 8)
    assert (alpha > torch.sigmoid(logits)).all() and alpha.mean() > 0.9  # tau = 16: long memory from the start


def test_the_mixer_equals_the_reference_recurrence_with_output_gate_and_norm():
    """The layer = (SiLU(x W_r + b_r) * RMSNorm(q S)) W_o, with S from the reference loop."""
    layer = mixer(chunk_size=3)
    x = torch.randn(2, 10, 16)
    q, k, v, g = layer.scans[0](x)
    o, _ = recurrent_gla(q, k, v, g)
    rms = o * torch.rsqrt(o.square().mean(-1, keepdim=True) + 1e-5) * layer.norm.weight
    expected = layer.out(F.silu(layer.gate(x)) * rms.flatten(-2))
    assert_equal_fp32(layer(x), expected)


@pytest.mark.parametrize("expand_k,expand_v,fine", [(0.5, 1.0, True), (0.3, 1.0, False), (0.5, 0.03125, False),
                                                     (1.5, 2.0, True)])
def test_key_and_value_dimensions_must_split_between_the_heads(expand_k, expand_v, fine):
    """d_model 32, 2 heads: d_k = 32 expand_k and d_v = 32 expand_v must be whole multiples of 2."""
    hp = {"d_model": 32, "n_heads": 2, "expand_k": expand_k, "expand_v": expand_v}
    found = ARCHITECTURE.check(hp)
    assert (found == []) == fine, found
    if fine:
        GLALM(V, **hp, n_layers=1)
    else:
        assert "model.expand_" in found[0] and "multiple of n_heads / d_model = 0.0625" in found[0]
        with pytest.raises(ValueError, match="n_heads"):
            GLALM(V, **hp, n_layers=1)


def test_reverse_within_length_reverses_each_sentence_and_keeps_padding_after_it():
    x = torch.arange(10.0).view(2, 5, 1)
    lengths = torch.tensor([5, 3])
    reversed_ = reverse_within(x, lengths)
    assert reversed_[..., 0].tolist() == [[4, 3, 2, 1, 0], [7, 6, 5, 8, 9]]
    assert torch.equal(reverse_within(reversed_, lengths), x)


def test_the_encoder_sees_both_directions():
    """Changing the last source token changes the first position's encoding, the first token the last one's."""
    model = build("translation")
    src = torch.randint(4, V, (1, 7), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([7])
    base = model.run_encoder(src, lengths)[0]
    for changed_at, watched in ((6, 0), (0, 6)):
        other = src.clone()
        other[0, changed_at] = (other[0, changed_at] - 4 + 1) % (V - 4) + 4
        assert not torch.allclose(model.run_encoder(other, lengths)[0][0, watched], base[0, watched])


# -- the models --------------------------------------------------------------------------------------------------

def build(family: str, **over):
    shape = Shape("seq2seq", {"src": V, "tgt": V}) if family == "translation" else Shape("lm", {"lm": V})
    torch.manual_seed(0)
    return models.build({**models.load_preset("gla_tiny"), **over}, shape).eval()


def batch(B: int = 3, S: int = 7, T: int = 20):
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, V, (B, S), generator=g)
    lengths = torch.tensor([S, S - 2, S - 4][:B])
    for b, n in enumerate(lengths):
        src[b, n:] = PAD
    tgt = torch.randint(4, V, (B, T), generator=g)
    tgt[:, 0] = BOS
    return src, lengths, tgt


def test_padding_never_reaches_the_sentence():
    """Whatever the padding holds (here: real tokens), the outputs are those of the sentences alone."""
    model = build("translation")
    src, lengths, tgt = batch(T=6)
    garbage = src.clone()
    garbage[src == PAD] = torch.randint(4, V, (int((src == PAD).sum()),), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(garbage, lengths, tgt), model(src, lengths, tgt), atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_decode_steps_equal_the_forward_pass_with_a_constant_state(chunk_size):
    """20 target positions (several chunks): each step's logits equal the forward pass's; the state holds one
    (B, H, d_k/H, d_v/H) matrix per decoder layer, the same size at every step."""
    model = build("translation", chunk_size=chunk_size)
    src, lengths, tgt = batch()
    full = model(src, lengths, tgt)
    state = model.encode(src, lengths)
    shapes = {k: v.shape for k, v in state.items()}
    assert shapes["S0"] == shapes["S1"] == (3, 2, 8, 16) and state["S0"].dtype == torch.float32
    for t in range(tgt.size(1)):
        logits, state = model.decode_step(tgt[:, t], state, t)
        torch.testing.assert_close(logits, full[:, t], atol=1e-5, rtol=0)
        assert {k: v.shape for k, v in state.items()} == shapes


def test_the_chunk_size_changes_nothing_but_the_schedule():
    tokens = batch(T=30)[2]
    reference = build("lm", chunk_size=1)(tokens)
    for chunk_size in (7, 16, 64):
        assert_equal_fp32(build("lm", chunk_size=chunk_size)(tokens), reference)


def test_the_recurrence_runs_in_fp32_under_bf16_autocast():
    model = build("lm")
    tokens = batch(T=12)[2]
    seen = []
    model.blocks[0].mixer.norm.register_forward_hook(lambda m, args, out: seen.append(args[0].dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
    assert seen == [torch.float32] and logits.dtype == torch.bfloat16


def test_the_swiglu_hidden_size_defaults_to_the_multiple_of_8_nearest_8_thirds_d_model():
    assert [default_d_ff(d) for d in (256, 32, 64, 512, 1)] == [680, 88, 168, 1368, 8]
    model = GLALM(V, d_model=256, n_layers=1, d_ff=None)
    assert model.blocks[0].ff.d_ff == 680 and model.blocks[0].ff.up.weight.shape == (2 * 680, 256)


def test_the_lm_form_is_causal_layer_by_layer():
    model = build("lm")
    x = model.embed(batch(T=12)[2]).detach()
    block = model.mixing_blocks()[0]
    base = block(x)
    changed = x.clone()
    changed[:, 5] += 1
    out = block(changed)
    torch.testing.assert_close(out[:, :5], base[:, :5], atol=0, rtol=0)
    assert not torch.allclose(out[:, 5:], base[:, 5:])


def test_settings_of_the_gla_are_checked_with_what_is_valid(make_cfg):
    for override, words in (("model.gate_rank=0", ["model.gate_rank=0", "positive integer"]),
                            ("model.chunk_size=2.5", ["model.chunk_size=2.5", "positive integer"]),
                            ("model.gate_temperature=-1", ["model.gate_temperature=-1", "positive number"]),
                            ("model.expand_k=0.3", ["model.expand_k=0.3", "model.n_heads=2", "0.0625"])):
        found = settings.problems(make_cfg("model=gla_tiny", "task=copy", override))
        assert len(found) == 1 and all(w in found[0] for w in words), (override, found)
    assert settings.problems(make_cfg("model=gla", "task=copy", "model.d_ff=null")) == []


@pytest.mark.parametrize("probe", ["delayed_copy", "assoc_recall"])
def test_the_probe_preset_has_the_transformers_budget(probe):
    task = tasks.build({"name": probe, "n_train": 60, "n_valid": 30, "n_test": 40})
    counts = [models.count_parameters(models.build(models.load_preset(p), task)) for p in ("gla_probe",
                                                                                          "transformer_probe")]
    assert abs(counts[0] / counts[1] - 1) < 0.15, counts


# -- the CUDA kernels of flash-linear-attention ------------------------------------------------------------------

def test_fla_kernels_equal_the_reference_on_a_gpu():
    pytest.importorskip("fla")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    q, k, v, g, state = (t.cuda() for t in inputs(2, 150, 2, 16, 32))
    assert kernels.available(q)
    o, final = kernels.chunk(q, k, v, g, state)
    o_ref, final_ref = recurrent_gla(q.double(), k.double(), v.double(), g.double(), state.double())
    scale = o_ref.abs().max().item()
    torch.testing.assert_close(o.double(), o_ref, atol=2e-3 * scale, rtol=0)  # tf32 matrix products
    torch.testing.assert_close(final.double(), final_ref, atol=2e-3 * final_ref.abs().max().item(), rtol=0)
    o1, s1 = kernels.step(q[:, :1], k[:, :1], v[:, :1], g[:, :1], state)
    o1_ref, s1_ref = recurrent_gla(q[:, :1], k[:, :1], v[:, :1], g[:, :1], state)
    torch.testing.assert_close(o1, o1_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s1, s1_ref, atol=1e-4, rtol=1e-4)
    cpu = build("translation", dropout=0.0)
    src, lengths, tgt = batch()
    gpu = GLASeq2Seq(V, V, PAD, **{k: v for k, v in models.load_preset("gla_tiny").items()
                                   if k not in models.META_KEYS}).cuda().eval()
    gpu.load_state_dict(cpu.state_dict())
    expected = cpu(src, lengths, tgt)
    torch.testing.assert_close(gpu(src.cuda(), lengths.cuda(), tgt.cuda()).cpu(), expected,
                               atol=2e-3 * expected.abs().max().item(), rtol=0)
    assert math.isfinite(expected.abs().max().item())
