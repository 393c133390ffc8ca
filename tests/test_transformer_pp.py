"""Transformer++ (models/transformer_pp): the fast SDPA/RoPE forms against the plain float64 reference, RoPE's
relative-position property, the decoder's KV cache at absolute positions, and the recipe's details (SwiGLU size,
no biases, RMSNorm, embeddings without positions, settings)."""
from __future__ import annotations

import pytest
import torch

from seqbench import models
from seqbench.harness import settings
from seqbench.models.common import PAD
from seqbench.models.transformer_pp import ARCHITECTURE
from seqbench.models.transformer_pp.layers import CrossAttention, SelfAttention, default_d_ff
from seqbench.models.transformer_pp.model import TransformerPPLM, TransformerPPSeq2Seq
from seqbench.models.transformer_pp.reference import (lm_reference, rope_reference, rotation_matrix,
                                                      self_attention_reference)
from seqbench.models.transformer_pp.rope import RotaryEmbedding
from seqbench.tasks.base import Shape
from tests.test_models import batch, build

V = 23


def close(fast: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    """fast (float32) equals ref (float64) within tol relative to ref's largest entry."""
    scale = max(ref.abs().max().item(), 1.0)
    torch.testing.assert_close(fast.double(), ref, atol=tol * scale, rtol=0)


# -- RoPE ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T,dim,offset,base", [(1, 2, 0, 10000.0), (5, 8, 0, 10000.0), (13, 16, 7, 10000.0),
                                               (9, 6, 31, 500.0)])
def test_fast_rope_equals_the_rotation_matrix_loop(T, dim, offset, base):
    torch.manual_seed(0)
    x = torch.randn(2, 3, T, dim)
    close(RotaryEmbedding(dim, base)(x, offset), rope_reference(x, base, offset))


def test_rope_rotates_by_the_position_difference():
    """R_m is orthogonal, R_0 = I and R_m^T R_n = R_{n-m}: the algebra behind the relative-position property."""
    R = {m: rotation_matrix(m, 8, 10000.0) for m in (0, 3, 5, 9)}
    eye = torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(R[0], eye)
    torch.testing.assert_close(R[9].T @ R[9], eye)
    torch.testing.assert_close(R[3].T @ R[5], rotation_matrix(2, 8, 10000.0))
    torch.testing.assert_close(R[5].T @ R[3], rotation_matrix(-2, 8, 10000.0))


def test_rope_scores_depend_only_on_relative_position():
    """Shift invariance: rotating queries and keys of positions 0..T-1 or of s..s+T-1 gives the same scores
    <R_m q, R_n k>; the same q and k at every position give scores that are a function of n - m alone (constant
    along each diagonal) and do vary with it, so the positions are not simply lost."""
    torch.manual_seed(0)
    rope = RotaryEmbedding(16)
    q, k = torch.randn(2, 2, 10, 16), torch.randn(2, 2, 10, 16)
    scores = {s: rope(q, s) @ rope(k, s).transpose(-1, -2) for s in (0, 1, 17, 64)}
    for s in (1, 17, 64):
        torch.testing.assert_close(scores[s], scores[0], atol=1e-4, rtol=0)
        assert (rope(q, s) - rope(q, 0)).abs().amax() > 0.1  # the rotated queries themselves do move
    same_q, same_k = q[:, :, :1].expand_as(q), k[:, :, :1].expand_as(k)
    toeplitz = rope(same_q) @ rope(same_k).transpose(-1, -2)  # (B,H,T,T)
    torch.testing.assert_close(toeplitz[..., 1:, 1:], toeplitz[..., :-1, :-1], atol=1e-5, rtol=0)
    assert (toeplitz[..., 0, 1:] - toeplitz[..., 0, :1]).abs().amax() > 0.1  # differs with n - m


def test_rope_preserves_norms():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 11, 8)
    y = RotaryEmbedding(8)(x, offset=5)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    assert not torch.allclose(y[..., 1:, :], x[..., 1:, :])


def test_rope_needs_an_even_head_size():
    with pytest.raises(ValueError, match="head size must be even"):
        RotaryEmbedding(7)


# -- the SDPA path against the explicit-softmax reference ------------------------------------------------------

@pytest.mark.parametrize("B,T,D,H", [(1, 1, 16, 2), (2, 7, 32, 4), (3, 13, 24, 3)])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_self_attention_equals_the_reference(B, T, D, H, causal):
    """Bidirectional (the encoder: padded keys masked) and causal (the decoder), T = 1 included."""
    torch.manual_seed(0)
    attn = SelfAttention(D, H, dropout=0.0, rope_base=10000.0).eval()
    x = torch.randn(B, T, D)
    lengths = torch.tensor([T, max(1, T - 2), max(1, T - 5)][:B])
    allowed = None if causal else (torch.arange(T)[None, :] < lengths[:, None])[:, None, None, :]
    with torch.no_grad():
        fast = attn(x, mask=allowed, causal=causal)
    close(fast, self_attention_reference(attn, x, allowed=allowed, causal=causal))


def test_cached_steps_attend_at_their_absolute_positions():
    """Steps at positions 0..T-1 against the growing cache equal the causal reference over the whole sequence;
    the cached keys are the reference's rotated keys (RoPE applied once, at the key's own position)."""
    torch.manual_seed(0)
    attn = SelfAttention(16, 2, dropout=0.0, rope_base=10000.0).eval()
    x = torch.randn(2, 9, 16)
    k = v = torch.zeros(2, 2, 0, 8)
    with torch.no_grad():
        outs = []
        for t in range(9):
            out, k, v = attn.step(x[:, t : t + 1], k, v, t)
            outs.append(out)
        raw_k = attn.split(attn.qkv(x).chunk(3, dim=-1)[1])
    close(torch.cat(outs, dim=1), self_attention_reference(attn, x, causal=True))
    close(k, rope_reference(raw_k, 10000.0))


@pytest.mark.parametrize("T", [1, 8])
def test_language_model_equals_the_reference(T):
    """The whole tiny LM (RMSNorm, RoPE attention through SDPA, SwiGLU, tied head) against the float64 reference."""
    torch.manual_seed(0)
    model = build("transformer_pp", "lm").eval()
    tokens = torch.randint(0, V, (2, T))
    with torch.no_grad():
        close(model(tokens), lm_reference(model, tokens))


# -- the encoder-decoder ---------------------------------------------------------------------------------------

def test_the_decoder_depends_only_on_relative_target_positions():
    """The same target decoded from step s with an empty cache gives the logits of decoding it from step 0: RoPE
    carries only relative positions, and neither the embeddings nor the cross-attention hold absolute ones."""
    model = build("transformer_pp", "translation")
    src, lengths, tgt = batch(T=6)
    with torch.no_grad():
        runs = []
        for start in (0, 5, 40):
            state, logits = model.encode(src, lengths), []
            for t in range(tgt.size(1)):
                out, state = model.decode_step(tgt[:, t], state, start + t)
                logits.append(out)
            runs.append(torch.stack(logits, dim=1))
    torch.testing.assert_close(runs[1], runs[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(runs[2], runs[0], atol=1e-5, rtol=0)


def test_cross_attention_has_no_positions():
    """Permuting the source memory (with its mask) leaves cross-attention unchanged: no RoPE on it."""
    torch.manual_seed(0)
    cross = CrossAttention(16, 2, dropout=0.0).eval()
    y, memory = torch.randn(2, 4, 16), torch.randn(2, 6, 16)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])[:, None, None, :]
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        out = cross(y, *cross.project_kv(memory), mask)
        permuted = cross(y, *cross.project_kv(memory[:, perm]), mask[..., perm])
    torch.testing.assert_close(permuted, out, atol=1e-6, rtol=0)


def test_the_encoder_is_bidirectional_and_position_aware():
    """A change to the last source token reaches the first encoder output (no causal mask), and swapping two
    source tokens changes the output beyond a permutation (RoPE puts positions into the encoder)."""
    model = build("transformer_pp", "translation")
    src, lengths, _ = batch()
    changed, swapped = src.clone(), src.clone()
    changed[0, 6] = (src[0, 6] + 1 - 4) % (V - 4) + 4
    swapped[0, [1, 2]] = src[0, [2, 1]]
    assert src[0, 1] != src[0, 2]
    with torch.no_grad():
        memory, _ = model.run_encoder(src, lengths)
        assert (model.run_encoder(changed, lengths)[0][0, 0] - memory[0, 0]).abs().max() > 1e-4
        other = model.run_encoder(swapped, lengths)[0]
    assert (other[0, [2, 1]] - memory[0, [1, 2]]).abs().max() > 1e-4


# -- the recipe's details --------------------------------------------------------------------------------------

def test_swiglu_hidden_size_defaults_to_the_multiple_of_8_nearest_8_thirds_d_model():
    assert [default_d_ff(d) for d in (1, 32, 64, 256, 512)] == [8, 88, 168, 680, 1368]
    assert build("transformer_pp", "lm").blocks[0].ff.d_ff == 88
    assert build("transformer_pp", "translation", d_ff=50).encoder[0].ff.d_ff == 50


@pytest.mark.parametrize("family", ["translation", "lm"])
def test_no_biases_rmsnorm_and_no_position_embeddings(family):
    model = build("transformer_pp", family)
    assert not [n for n, _ in model.named_parameters() if "bias" in n]
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    norms = [m for m in model.modules() if isinstance(m, torch.nn.RMSNorm)]
    per_block = 5 if family == "translation" else 2  # encoder 2 + decoder 3, or 2 per block
    assert len(norms) == 2 * per_block + (2 if family == "translation" else 1)  # + the final norm(s)
    embeddings = [model.src_embed, model.tgt_embed] if family == "translation" else [model.tok_embed]
    assert all(e.pos is None for e in embeddings)


def test_embeddings_initialise_as_the_transformers_and_are_tied():
    """N(0, d^-1/2) times sqrt(d), padding row zero, source and target shared, output tied (both forms)."""
    cfg = models.load_preset("transformer_pp")
    for shape in (Shape("seq2seq", {"src": 2000, "tgt": 2000}), Shape("lm", {"lm": 2000})):
        torch.manual_seed(0)
        model = models.build(cfg, shape)
        emb = model.tgt_embed if shape.form == "seq2seq" else model.tok_embed
        assert emb.tok.weight[4:].std().item() == pytest.approx(256**-0.5, rel=0.05)
        assert emb.scale == pytest.approx(16.0) and model.proj.weight is emb.tok.weight
        if shape.form == "seq2seq":
            assert model.src_embed is emb and not emb.tok.weight[PAD].any()


def test_an_odd_head_size_is_refused():
    with pytest.raises(ValueError, match="head size must be even"):
        TransformerPPSeq2Seq(V, V, PAD, d_model=24, n_heads=8)
    with pytest.raises(ValueError, match="rope_base"):
        TransformerPPLM(V, d_model=32, n_heads=4, rope_base=1.0)
    assert ARCHITECTURE.check({"d_model": 32, "n_heads": 4}) == []
    assert ARCHITECTURE.check({"d_model": 32, "n_heads": 5}) == []  # the shared check names this one


@pytest.mark.parametrize("override,words", [
    ("model.n_heads=8", ["model.d_model=24", "model.n_heads=8", "3 features", "even", "1, 2, 3, 4, 6, 12"]),
    ("+model.rope_base=1", ["model.rope_base=1", "a number > 1"]),
    ("+model.norm_eps=0", ["model.norm_eps=0", "positive number"]),
    ("model.d_ff=0", ["model.d_ff=0", "positive integer or null"]),
])
def test_bad_settings_are_named_before_building(make_cfg, override, words):
    extra = ["model.d_model=24"] if override == "model.n_heads=8" else []
    found = settings.problems(make_cfg("model=transformer_pp_tiny", "task=copy", *extra, override))
    assert len(found) == 1 and all(w in found[0] for w in words), found


def test_the_presets_pass_the_settings_check(make_cfg):
    cfg = make_cfg("model=transformer_pp_tiny", "task=copy")
    for preset in ("transformer_pp", "transformer_pp_tiny", "transformer_pp_probe"):
        cfg.model = models.load_preset(preset)
        assert settings.model_problems(cfg) == [], preset


def test_cuda_sdpa_equals_the_reference():
    """Where a GPU is present: the model on CUDA (SDPA's fused kernels, float32) against the CPU reference."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = build("transformer_pp", "lm").eval()
    tokens = torch.randint(0, V, (2, 12))
    reference = lm_reference(model, tokens)
    with torch.no_grad():
        close(model.cuda()(tokens.cuda()).cpu(), reference, tol=1e-4)
