"""The architecture tests, for any registered model: seqbench runs them on its own architectures, and a model
author runs them on theirs with a test module of two lines::

    from seqbench.harness.conformance import *  # noqa: F403 (the tests and their parametrisation)
    SEQBENCH_MODELS = ["my_model"]               # which architectures (default: every registered one)

Each test builds ``<name>_tiny`` (``SEQBENCH_PRESET``, a format string over ``{name}``: a small preset that
trains in seconds) in both forms on a 23-token vocabulary and checks the interface seqbench relies on
(models/common.py): forward/backward with every parameter in the loss; causality; padding invariance;
incremental decoding equal to the full pass (fp32 and bf16 autocast) after a beam-style reorder; the
per-sentence (``src_*``) state passed on unchanged; beam 1 = greedy; the language model as
``head(mixing_blocks(embed(x)))`` with the blocks accounting for every dependency (the path-length analysis);
overfitting one copy batch; every hyperparameter with a rule and every preset passing the settings check.

The decoder state may hold no ``src_*`` entry at all (a decoder that carries the source in its own recurrent
state); where it holds some, decoding must pass them on unchanged, since beam search leaves them in place.
"""
from __future__ import annotations

import pytest
import torch

from seqbench import models
from seqbench.models.common import BOS, EOS, PAD, SOURCE_PREFIX, reorder_state
from seqbench.tasks.base import Shape

__all__ = ["pytest_generate_tests", "test_forward_backward", "test_causality", "test_padding_invariance",
           "test_incremental_decoding_equals_forward", "test_incremental_decoding_equals_forward_under_bf16_autocast",
           "test_decode_step_passes_the_per_sentence_state_on", "test_beam_size_one_equals_greedy",
           "test_lm_forward_is_composition_of_mixing_blocks", "test_mixing_blocks_account_for_every_dependency",
           "test_tiny_model_overfits_copy_batch", "test_every_setting_has_a_rule_and_every_preset_passes"]

V = 23  # vocabulary of the tests: PAD/BOS/EOS/UNK and 19 ordinary tokens
FAMILIES = ("translation", "lm")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise ``arch`` over the module's ``SEQBENCH_MODELS`` (default: every registered architecture)."""
    if "arch" in metafunc.fixturenames:
        names = getattr(metafunc.module, "SEQBENCH_MODELS", None) or sorted(models.MODELS)
        unknown = [n for n in names if n not in models.MODELS]
        if unknown:
            raise pytest.UsageError(f"SEQBENCH_MODELS names {unknown}, which no registered architecture has; "
                                    + models.unknown_model(unknown[0]))
        metafunc.parametrize("arch", names)
    if "family" in metafunc.fixturenames:
        metafunc.parametrize("family", FAMILIES)


def _preset_name(request: pytest.FixtureRequest, arch: str) -> str:
    return getattr(request.module, "SEQBENCH_PRESET", "{name}_tiny").format(name=arch)


def build(request: pytest.FixtureRequest, arch: str, family: str, vocab: int = V, **over) -> torch.nn.Module:
    """The architecture's test preset in the form of ``family``, seeded, in eval mode."""
    task = Shape("seq2seq", {"src": vocab, "tgt": vocab}) if family == "translation" else Shape("lm", {"lm": vocab})
    torch.manual_seed(0)
    return models.build({**models.load_preset(_preset_name(request, arch)), **over}, task).eval()


def batch(B: int = 3, S: int = 7, T: int = 6, seed: int = 0):
    """Sources (B,S) padded to lengths S, S-2, S-4; their lengths (B,); targets (B,T) starting with BOS."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, V, (B, S), generator=g)
    lengths = torch.tensor([S, S - 2, S - 4][:B])
    for b, n in enumerate(lengths):
        src[b, n:] = PAD
    tgt = torch.randint(4, V, (B, T), generator=g)
    tgt[:, 0] = BOS
    return src, lengths, tgt


def test_forward_backward(request, arch, family):
    model = build(request, arch, family).train()
    src, lengths, tgt = batch()
    logits = model(src, lengths, tgt) if family == "translation" else model(tgt)
    assert logits.shape == (3, 6, V)
    logits.float().logsumexp(-1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert not [n for n, p in model.named_parameters() if p.requires_grad and not p.grad.abs().sum() > 0], \
        "parameters that take no part in the loss"


def test_causality(request, arch, family):
    """Output t depends on target tokens up to t only, and on token t itself at some later position."""
    model = build(request, arch, family)
    src, lengths, tgt = batch()
    run = (lambda t: model(src, lengths, t)) if family == "translation" else model
    base = run(tgt)
    for t in range(1, tgt.size(1)):
        changed = tgt.clone()
        changed[:, t] = (changed[:, t] + 1 - 4) % (V - 4) + 4
        out = run(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-5, rtol=0)
        assert not torch.allclose(out[:, t:], base[:, t:]), "changing token t changed nothing after it"


def test_padding_invariance(request, arch):
    """More padding changes nothing, and each sentence alone gives what it gives in the batch."""
    model = build(request, arch, "translation")
    src, lengths, tgt = batch()
    padded = torch.cat([src, torch.full((3, 5), PAD)], dim=1)
    torch.testing.assert_close(model(padded, lengths, tgt), model(src, lengths, tgt), atol=1e-5, rtol=0)
    full = model(src, lengths, tgt)
    for b in range(3):
        n = int(lengths[b])
        alone = model(src[b : b + 1, :n], lengths[b : b + 1], tgt[b : b + 1])
        torch.testing.assert_close(alone[0], full[b], atol=1e-5, rtol=0)


def test_incremental_decoding_equals_forward(request, arch):
    model = build(request, arch, "translation")
    src, lengths, tgt = batch(T=9)
    full = model(src, lengths, tgt)
    state = model.encode(src, lengths)
    perm = torch.tensor([2, 0, 1])  # reordered and back, as beam search does: exercises reorder_state
    state = reorder_state(reorder_state(state, perm), torch.argsort(perm))
    for t in range(tgt.size(1)):
        logits, state = model.decode_step(tgt[:, t], state, t)
        torch.testing.assert_close(logits, full[:, t], atol=1e-5, rtol=0)


def test_incremental_decoding_equals_forward_under_bf16_autocast(request, arch):
    """What beam search runs under bf16 precision: the cached steps match the bf16 full pass to a few units in
    the last place of the largest logit, and the fp32 pass to within bf16's error through the layers (1%)."""
    model = build(request, arch, "translation")
    src, lengths, tgt = batch(T=9)
    with torch.no_grad():
        reference = model(src, lengths, tgt)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            full = model(src, lengths, tgt)
            state = model.encode(src, lengths)
            steps = []
            for t in range(tgt.size(1)):
                logits, state = model.decode_step(tgt[:, t], state, t)
                steps.append(logits)
    cached = torch.stack(steps, dim=1)
    scale = reference.abs().max().item()
    torch.testing.assert_close(cached.float(), full.float(), atol=2 ** -6 * scale, rtol=0)
    torch.testing.assert_close(cached.float(), reference, atol=0.03 * scale, rtol=0)


def test_decode_step_passes_the_per_sentence_state_on(request, arch):
    """The ``src_*`` entries (none is fine) leave every decoding step as the same tensors, and the state carries
    something per hypothesis; every entry has the batch as dimension 0."""
    model = build(request, arch, "translation")
    src, lengths, tgt = batch()
    state = model.encode(src, lengths)
    assert all(v.size(0) == 3 for v in state.values()), {k: tuple(v.shape) for k, v in state.items()}
    source = {k: v for k, v in state.items() if k.startswith(SOURCE_PREFIX)}
    for t in range(3):
        _, state = model.decode_step(tgt[:, t], state, t)
        assert all(state[k] is v for k, v in source.items())
        assert all(v.size(0) == 3 for v in state.values())
    assert len(state) > len(source), "no per-hypothesis state: decoding could not depend on the output so far"


def test_beam_size_one_equals_greedy(request, arch):
    from seqbench.harness.decode import beam_search, greedy, max_lengths  # noqa: PLC0415 (harness: the caller)
    model = build(request, arch, "translation")
    g = torch.Generator().manual_seed(5)
    src, lengths = torch.randint(4, V, (6, 9), generator=g), torch.tensor([9, 8, 7, 5, 3, 2])
    for b, n in enumerate(lengths):
        src[b, n:] = PAD
    limits = max_lengths(lengths, 1.5, 3)
    assert beam_search(model, src, lengths, limits, beam=1) == greedy(model, src, lengths, limits)


def test_lm_forward_is_composition_of_mixing_blocks(request, arch):
    model = build(request, arch, "lm")
    _, _, tokens = batch()
    x = model.embed(tokens)
    blocks = model.mixing_blocks()
    assert len(blocks) >= 1
    for block in blocks:
        y = block(x)
        assert y.shape == x.shape
        x = y
    torch.testing.assert_close(model.head(x), model(tokens))


def test_mixing_blocks_account_for_every_dependency(request, arch):
    """The path-length analysis (Table 1) measures each block's position-to-position pattern; the product of the
    blocks' patterns must be the whole model's (nothing mixes positions outside ``mixing_blocks``)."""
    from seqbench.harness.analysis import path_length  # noqa: PLC0415
    model = build(request, arch, "lm", vocab=path_length.VOCAB)
    out = path_length.measure(model, [8, 16], vocab_size=path_length.VOCAB)
    assert out["max_path_length"][0] is not None and out["max_path_length"][0] >= 1
    assert len(out["block_types"]) == len(model.mixing_blocks())


def train_to_copy(model, high: int, steps: int):
    """Train ``model`` (Adam 3e-3) on one batch of eight 6-token sources drawn from ``4..high-1``, to copy them.

    Returns the model in eval mode, the batch (src, lengths, tgt_in, tgt_out) and the last step's loss.
    """
    model.train()
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, high, (8, 6), generator=g)
    lengths = torch.full((8,), 6)
    tgt_in = torch.cat([torch.full((8, 1), BOS), src], dim=1)
    tgt_out = torch.cat([src, torch.full((8, 1), EOS)], dim=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(src, lengths, tgt_in).flatten(0, 1), tgt_out.flatten())
        loss.backward()
        opt.step()
    return model.eval(), (src, lengths, tgt_in, tgt_out), loss


def test_tiny_model_overfits_copy_batch(request, arch):
    torch.manual_seed(0)
    model, (src, lengths, tgt_in, tgt_out), loss = train_to_copy(build(request, arch, "translation", dropout=0.0),
                                                                V, 300)
    assert loss.item() < 0.05
    assert torch.equal(model(src, lengths, tgt_in).argmax(-1), tgt_out)


def test_every_setting_has_a_rule_and_every_preset_passes(request, arch):
    """Each constructor keyword has a rule (seqbench's table or the architecture's own ``settings``), so a bad
    value is refused before anything is built; each preset of the architecture passes the check."""
    from omegaconf import OmegaConf  # noqa: PLC0415

    from seqbench.harness import settings  # noqa: PLC0415
    spec = models.architecture(arch)
    taken = {k for cls in spec.classes for k in models.accepted_kwargs(cls)}
    assert taken - set(settings.MODEL_SETTINGS) - set(spec.settings) == set(), "hyperparameters without a rule"
    presets = [name for name, path in models.preset_paths().items()
               if models.load_preset(name).get("name") == arch]
    assert presets, f"no preset names {arch!r}"
    for name in presets:
        cfg = OmegaConf.create({"model": models.load_preset(name)})
        assert settings.model_problems(cfg) == [], name
