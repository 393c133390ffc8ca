"""Mamba (models/mamba): the chunked selective scan against the sequential recurrence, the carried state, the
mixer's step-by-step decoding, the paper's initialisation, the bidirectional encoder, the settings, and the CUDA
kernels where they are installed."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seqbench import models
from seqbench.models.mamba import ARCHITECTURE
from seqbench.models.mamba.block import MambaMixer, reverse_within_lengths
from seqbench.models.mamba.model import MambaLM, MambaSeq2Seq
from seqbench.models.mamba.scan import chunked_scan, reference_scan, selective_scan
from seqbench.models.common import PAD
from seqbench.tasks.base import Shape
from tests.test_models import batch, build

MIXER = dict(d_state=4, d_conv=3, expand=2, dt_rank=None, dt_min=0.001, dt_max=0.1, chunk_size=4, n_residuals=2)


def scan_inputs(Bt: int, T: int, E: int, N: int, *, seed: int = 0, dt_scale: float = 1.0,
                dtype=torch.float32) -> tuple[torch.Tensor, ...]:
    """x, delta, A, B, C, D, h0 for a scan of (Bt, T, E) with state size N; A spread like the S4D-real init."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(Bt, T, E, generator=g, dtype=dtype)
    delta = F.softplus(torch.randn(Bt, T, E, generator=g, dtype=dtype)) * dt_scale
    A = -torch.arange(1, N + 1, dtype=dtype).repeat(E, 1) * torch.rand(E, 1, generator=g, dtype=dtype).add(0.5)
    B, C = torch.randn(Bt, T, N, generator=g, dtype=dtype), torch.randn(Bt, T, N, generator=g, dtype=dtype)
    D, h0 = torch.randn(E, generator=g, dtype=dtype), torch.randn(Bt, E, N, generator=g, dtype=dtype)
    return x, delta, A, B, C, D, h0


def close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal to ``rel`` of the largest magnitude of ``expected``."""
    torch.testing.assert_close(actual, expected, atol=rel * expected.abs().max().item(), rtol=0)


# -- the chunked scan is the recurrence --------------------------------------------------------------------------

@pytest.mark.parametrize("Bt,T,E,N", [(2, 13, 5, 3), (1, 1, 4, 2), (3, 64, 6, 4), (2, 50, 3, 16), (1, 7, 8, 1)])
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 16, 64])
@pytest.mark.parametrize("from_state", [False, True])
def test_chunked_scan_equals_the_sequential_recurrence(Bt, T, E, N, chunk_size, from_state):
    """Outputs and the state after the last position, for chunk sizes that divide T, do not, exceed it, and T=1."""
    x, delta, A, B, C, D, h0 = scan_inputs(Bt, T, E, N, seed=T * chunk_size)
    h0 = h0 if from_state else None
    y_ref, h_ref = reference_scan(x, delta, A, B, C, D, h0)
    y, h = chunked_scan(x, delta, A, B, C, D, h0, chunk_size)
    assert y.shape == (Bt, T, E) and h.shape == (Bt, E, N)
    close(y, y_ref)
    close(h, h_ref)


def test_chunked_scan_is_stable_when_the_state_decays_fast():
    """Steps of delta * |A| up to ~100 within a 64-position chunk: the log decay summed over the chunk reaches
    thousands, far past exp's float32 range (~88); only sums <= 0 are exponentiated, so the result is finite and
    equal to the recurrence."""
    x, delta, A, B, C, D, h0 = scan_inputs(2, 64, 4, 16, dt_scale=4.0)
    assert (delta[..., None] * A).sum(1).min() < -1000
    y_ref, h_ref = reference_scan(x, delta, A, B, C, D, h0)
    y, h = chunked_scan(x, delta, A, B, C, D, h0, 64)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    close(y, y_ref)
    close(h, h_ref)


@pytest.mark.parametrize("split", [1, 5, 8, 12])
def test_the_carried_state_continues_the_scan(split):
    """Scanning positions [0, split) and then [split, T) from the state carried over equals one scan of all T."""
    x, delta, A, B, C, D, _ = scan_inputs(2, 17, 5, 4)
    y_all, h_all = chunked_scan(x, delta, A, B, C, D, None, 4)
    first, h = chunked_scan(x[:, :split], delta[:, :split], A, B[:, :split], C[:, :split], D, None, 4)
    second, h_end = chunked_scan(x[:, split:], delta[:, split:], A, B[:, split:], C[:, split:], D, h, 4)
    close(torch.cat([first, second], dim=1), y_all)
    close(h_end, h_all)


@pytest.mark.parametrize("form", ["chunked", "sequential", "auto"])
def test_selective_scan_gradients_equal_the_recurrences(form):
    """The training forms (chunked or sequential, recomputed in the backward pass) have the recurrence's
    gradients, in float64 to 1e-10, for every input including the initial state."""
    inputs = [t.requires_grad_() for t in scan_inputs(2, 11, 3, 4, dtype=torch.float64)]
    cotangent = torch.randn(2, 11, 3, dtype=torch.float64)

    def grads(fn):
        y, h = fn(*inputs)
        return torch.autograd.grad((y * cotangent).sum() + h.sum(), inputs)

    for got, want in zip(grads(lambda *a: selective_scan(*a, chunk_size=4, form=form)),
                         grads(reference_scan), strict=True):
        close(got, want, rel=1e-10)


def test_selective_scan_picks_the_sequential_form_on_a_cpu_and_refuses_an_unknown_one(monkeypatch):
    from seqbench.models.mamba import scan  # noqa: PLC0415
    inputs = scan_inputs(2, 5, 3, 4)
    called = []
    monkeypatch.setattr(scan, "chunked_scan", lambda *a, **k: called.append("chunked") or reference_scan(*a[:7]))
    monkeypatch.setattr(scan, "reference_scan", lambda *a: called.append("sequential") or reference_scan(*a))
    scan.selective_scan(*inputs)
    scan.selective_scan(*inputs, form="chunked")
    assert called == ["sequential", "chunked"]
    with pytest.raises(ValueError, match="form must be auto, chunked or sequential"):
        selective_scan(*inputs, form="parallel")


def test_the_scan_benchmark_times_both_forms_and_prints_their_ratio(capsys):
    from seqbench.harness.bench import scan as bench_scan  # noqa: PLC0415
    bench_scan.main(["--shapes", "2x5,1x3", "--inner", "4", "--state", "2", "--rounds", "1"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "sequential/chunked speed" in line]
    assert [line.split(":")[0] for line in lines] == ["2x5x4x2", "1x3x4x2"]


# -- the mixer: decoding step by step, initialisation, precision -------------------------------------------------

def test_the_mixers_steps_equal_its_forward_pass_with_a_state_of_constant_size():
    torch.manual_seed(0)
    mixer = MambaMixer(16, **MIXER).eval()
    u = torch.randn(3, 11, 16)
    with torch.no_grad():
        full = mixer(u)
        conv, ssm = mixer.initial_state(3, u)
        for t in range(u.size(1)):
            out, conv, ssm = mixer.step(u[:, t], conv, ssm)
            assert conv.shape == (3, 32, 2) and ssm.shape == (3, 32, 4)
            torch.testing.assert_close(out, full[:, t], atol=1e-5, rtol=0)


def test_the_mixer_is_initialised_as_the_paper():
    """A_n = -(n+1) for every channel (S4D-real), D = 1, softplus(dt bias) log-uniform in [dt_min, dt_max],
    dt_proj's weight within dt_rank^-1/2, dt_rank = ceil(d_model / 16), out_proj divided by sqrt(n_residuals)."""
    torch.manual_seed(0)
    mixer = MambaMixer(40, **{**MIXER, "d_state": 16, "dt_min": 0.002, "dt_max": 0.05, "n_residuals": 4})
    assert mixer.dt_rank == 3 and mixer.d_inner == 80
    torch.testing.assert_close(-torch.exp(mixer.A_log), -torch.arange(1.0, 17.0).repeat(80, 1))
    assert torch.equal(mixer.D, torch.ones(80))
    dt = F.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 0.002 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
    assert dt.log().std() > 0.5  # spread over the log range (log-uniform over ln 25 = 3.2 has std 0.93)
    assert mixer.dt_proj.weight.abs().max() <= 3**-0.5
    default_bound = 1 / math.sqrt(80)  # nn.Linear's kaiming-uniform bound, fan_in 80
    assert default_bound / 2 * 0.9 < mixer.out_proj.weight.abs().max() <= default_bound / 2


def test_under_bf16_autocast_the_scan_and_its_state_stay_float32():
    torch.manual_seed(0)
    mixer = MambaMixer(16, **MIXER).eval()
    u = torch.randn(2, 9, 16)
    with torch.no_grad():
        reference = mixer(u)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = mixer(u)
            conv, ssm = mixer.initial_state(2, out)
            _, conv, ssm = mixer.step(u[:, 0], conv, ssm)
    assert out.dtype == torch.bfloat16 and conv.dtype == ssm.dtype == torch.float32
    torch.testing.assert_close(out.float(), reference, atol=0.03 * reference.abs().max().item(), rtol=0)


# -- the models ---------------------------------------------------------------------------------------------------

def test_decoding_state_does_not_grow_and_steps_equal_the_forward_pass_over_many_chunks():
    """25 target positions (seven chunks of 4): every step equals the forward pass, and the per-hypothesis state
    has the same shapes at every step: (Bt, E, d_conv - 1) windows and (Bt, E, d_state) SSM states."""
    model = build("mamba", "translation")
    src, lengths, tgt = batch(T=25)
    full = model(src, lengths, tgt)
    state = model.encode(src, lengths)
    shapes = {k: v.shape for k, v in state.items()}
    assert shapes["conv0"] == (3, 64, 3) and shapes["ssm1"] == (3, 64, 8)
    for t in range(tgt.size(1)):
        logits, state = model.decode_step(tgt[:, t], state, t)
        torch.testing.assert_close(logits, full[:, t], atol=1e-5, rtol=0)
        assert {k: v.shape for k, v in state.items()} == shapes


def test_reverse_within_lengths_reverses_the_words_and_keeps_the_padding():
    index = reverse_within_lengths(torch.tensor([4, 2, 0]), 5)
    assert index.tolist() == [[3, 2, 1, 0, 4], [1, 0, 2, 3, 4], [0, 1, 2, 3, 4]]
    assert torch.equal(index.gather(1, index), torch.arange(5).expand(3, 5))  # its own inverse


def test_the_encoder_reads_the_source_both_ways_within_its_length():
    """Each word's encoding depends on the words before and after it (both mixers), never on the padding."""
    model = build("mamba", "translation")
    src, lengths, _ = batch()
    emb = []
    hook = model.src_embed.register_forward_hook(lambda m, args, out: emb.append(out))
    memory, _ = model.run_encoder(src, lengths)
    hook.remove()
    n = int(lengths[1])
    first, last = (torch.autograd.grad(memory[1, t].sum(), emb[0], retain_graph=True)[0][1].abs().sum(-1)
                   for t in (0, n - 1))
    assert first[n - 1] > 0 and last[0] > 0  # the first word sees the last, and the last the first
    assert (first[n:] == 0).all() and (last[n:] == 0).all()  # the padding reaches no word


def test_the_encoder_without_its_backward_mixers_would_be_causal():
    """The backward mixers are what carries the later words to the earlier ones: with their output projections
    zeroed, the first word's encoding no longer depends on the second."""
    model = build("mamba", "translation")
    src, lengths, _ = batch()
    changed = src.clone()
    changed[:, 1] = (changed[:, 1] + 1 - 4) % (23 - 4) + 4
    with torch.no_grad():
        before = (model.run_encoder(changed, lengths)[0] - model.run_encoder(src, lengths)[0])[:, 0].abs().max()
        for layer in model.encoder:
            layer.backward_mixer.out_proj.weight.zero_()
        after = (model.run_encoder(changed, lengths)[0] - model.run_encoder(src, lengths)[0])[:, 0].abs().max()
    assert before > 1e-3 and after == 0


def test_the_language_model_ignores_the_cross_attention_settings():
    cfg = models.load_preset("mamba_tiny")
    model = models.build({**cfg, "n_heads": 2}, Shape("lm", {"lm": 23}))
    assert isinstance(model, MambaLM) and any("model.n_heads=2 has no effect" in w for w in model.warnings)
    assert not [n for n, _ in model.named_modules() if "cross" in n]


def test_presets_name_the_paper_and_fit_their_settings():
    for name in ("mamba", "mamba_tiny", "mamba_probe"):
        cfg = models.load_preset(name)
        assert cfg["name"] == "mamba" and cfg["paper"] == "Gu & Dao 2023"
        assert ARCHITECTURE.check({"dt_min": cfg.get("dt_min", 0.001), "dt_max": cfg.get("dt_max", 0.1)}) == []
    tiny = models.load_preset("mamba_tiny")
    assert (tiny["d_model"], tiny["d_state"], tiny["n_layers"]) == (32, 8, 2)


# -- settings ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,good,bad", [("d_state", 16, 0), ("d_conv", 4, 1.5), ("expand", 2, True),
                                           ("dt_rank", None, 0), ("chunk_size", 64, -1), ("dt_min", 0.001, 0.0),
                                           ("dt_max", 0.1, float("nan"))])
def test_each_new_setting_has_a_rule(name, good, bad):
    accepts, _ = ARCHITECTURE.settings[name]
    assert accepts(good) and not accepts(bad)


def test_a_step_size_range_upside_down_is_refused():
    found = ARCHITECTURE.check({"dt_min": 0.2, "dt_max": 0.1})
    assert len(found) == 1 and "model.dt_min=0.2" in found[0] and "model.dt_max=0.1" in found[0]
    with pytest.raises(ValueError, match="dt_min=0.2 and dt_max=0.1"):
        MambaSeq2Seq(10, 10, PAD, d_model=16, n_layers=1, dt_min=0.2, dt_max=0.1)
    with pytest.raises(ValueError, match="not divisible by n_heads=3"):
        MambaSeq2Seq(10, 10, PAD, d_model=16, n_layers=1, n_heads=3)


# -- CUDA kernels --------------------------------------------------------------------------------------------------

def test_the_cuda_kernels_equal_the_pytorch_scan_and_convolution():
    pytest.importorskip("mamba_ssm")
    pytest.importorskip("causal_conv1d")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from seqbench.models.mamba import kernels  # noqa: PLC0415

    x, delta, A, B, C, D, _ = (t.cuda() for t in scan_inputs(2, 70, 16, 8))
    assert kernels.scan_kernel_applies(x, None) and kernels.conv_kernel_applies(x)
    y, h = kernels.scan(x, delta, A, B, C, D)
    y_ref, h_ref = reference_scan(x, delta, A, B, C, D)
    close(y, y_ref, rel=1e-4)
    close(h, h_ref, rel=1e-4)
    torch.manual_seed(0)
    mixer = MambaMixer(8, **MIXER).cuda()
    conv = mixer.conv(x)
    kernels_off = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (2, 0)), mixer.conv1d.weight, mixer.conv1d.bias,
                                  groups=16)).transpose(1, 2)
    close(conv, kernels_off, rel=1e-4)
