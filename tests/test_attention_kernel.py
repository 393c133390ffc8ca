"""models.common.attention: SDPA, with its math kernel for short keys when training in half precision on a CPU
(the fused kernel's backward is the slow one there) and torch's own choice otherwise."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqbench.models import common


@pytest.fixture
def chosen(monkeypatch):
    """The SDPA backends :func:`common.attention` asks for."""
    asked, real = [], common.sdpa_kernel
    monkeypatch.setattr(common, "sdpa_kernel", lambda backend: asked.append(backend) or real(backend))
    return asked


def tensors(keys: int, dtype=torch.bfloat16):
    torch.manual_seed(0)
    q = torch.randn(3, 2, 5, 8, dtype=dtype, requires_grad=True)
    kv = [torch.randn(3, 2, keys, 8, dtype=dtype, requires_grad=True) for _ in range(2)]
    return q, *kv


@pytest.mark.parametrize("causal", [False, True])
def test_short_keys_in_bf16_training_take_the_math_kernel_with_the_same_result(chosen, causal):
    q, k, v = tensors(5)
    mask = None if causal else torch.tensor([True, True, True, False, False]).expand(3, 1, 1, 5)
    out = common.attention(q, k, v, mask, 0.0, causal)
    assert chosen == [common.SDPBackend.MATH]
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=causal)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad.float()).all()


def test_long_keys_fp32_and_inference_keep_torchs_choice(chosen):
    common.attention(*tensors(common.MATH_ATTENTION_MAX_KEYS + 1))
    common.attention(*tensors(5, torch.float32))
    with torch.no_grad():
        common.attention(*tensors(5))
    assert chosen == []


def test_counted_flops_do_not_depend_on_the_kernel_the_precision_takes():
    from seqbench.harness.profile import count_flops

    q, k, v = tensors(5)

    def step(dtype):
        return lambda: common.attention(q.to(dtype), k.to(dtype), v.to(dtype)).float().sum().backward()

    assert count_flops(step(torch.bfloat16)) == count_flops(step(torch.float32)) > 0
