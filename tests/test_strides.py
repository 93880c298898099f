"""Any input strides give the answer of contiguous copies: every backend, forward and backward.

A view here holds the same numbers as a contiguous tensor but lays them out differently in
memory: a non-unit stride along D (an unbound trailing axis, x[..., ::2], a key stored (B, H, D, N)
and transposed), (B, N, H, D) storage, rows sliced along N, or a stride-0 (expanded) axis.
"""

from __future__ import annotations

import pytest
import torch
from generated_cases import INTERPRETED, generated_patterns
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_attention import problems

import spattn

LAYOUTS = ("contiguous", "unbound", "sliced-d", "stored-dn", "bnhd", "sliced-n", "expanded-b",
           "expanded-n")


def as_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A view with x's values (expanded layouts: x's first batch row or first token, repeated)
    laid out by `layout`; built from fresh storage, so it is not a leaf's plain alias."""
    b, h, n, d = x.shape
    if layout == "contiguous":
        return x.clone()
    if layout == "unbound":  # stride 3 along D, as q, k, v = qkv.unbind(-1)
        return torch.stack([torch.zeros_like(x), x, torch.zeros_like(x)], -1).unbind(-1)[1]
    if layout == "sliced-d":  # stride 2 along D
        return torch.stack([x, torch.zeros_like(x)], -1).flatten(-2)[..., ::2]
    if layout == "stored-dn":  # (B, H, D, N) storage, transposed: stride N along D
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "bnhd":  # (B, N, H, D) storage, as models project it
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "sliced-n":  # every other row of a longer tensor
        return torch.stack([x, torch.zeros_like(x)], 3).flatten(2, 3)[:, :, ::2]
    if layout == "expanded-b":  # stride 0 along B
        return x[:1].clone().expand(b, h, n, d)
    if layout == "expanded-n":  # stride 0 along N
        return x[:, :, :1].clone().expand(b, h, n, d)
    raise ValueError(layout)


def check_views_match_copies(pattern, shape, layouts, backend, dtype, atol, seed=0):
    batch, heads, kv_heads, n, dim = shape
    gen = torch.Generator().manual_seed(seed)
    base = [torch.randn(batch, hh, n, dim, generator=gen, dtype=dtype).requires_grad_()
            for hh in (heads, kv_heads, kv_heads)]
    views = [as_layout(t, layout) for t, layout in zip(base, layouts, strict=True)]
    copies = [t.detach().contiguous().requires_grad_() for t in views]
    out = spattn.attention(*views, pattern, backend=backend)
    want = spattn.attention(*copies, pattern, backend=backend)
    torch.testing.assert_close(out, want, rtol=0, atol=atol)
    grad = torch.randn(out.shape, generator=gen, dtype=dtype)
    got = torch.autograd.grad(out, views, grad)
    expected = torch.autograd.grad(want, copies, grad)
    for name, g, w in zip("qkv", got, expected, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=atol,
                                   msg=lambda m, name=name: f"d{name}: {m}")


layouts = st.tuples(*(st.sampled_from(LAYOUTS),) * 3)


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_n=30), layouts)
def test_torch_backend_any_strides(case, layouts_qkv):
    pattern, shape = case
    check_views_match_copies(pattern, shape, layouts_qkv, "torch", torch.float64, 1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_backend_each_layout_float32(layout):
    """Each layout alone on q, k and v at once, in float32, on a LongNet-like pattern."""
    pattern = spattn.Pattern.model_validate({"name": "l", "causal": True, "branches": [
        {"segment": 16, "dilation": 1}, {"segment": 32, "dilation": 2}, {"window": {"size": 5}}]})
    check_views_match_copies(pattern, (2, 4, 2, 40, 16), (layout,) * 3, "torch", torch.float32,
                             1e-5)


@settings(INTERPRETED, max_examples=6)
@given(generated_patterns(max_n=24), layouts)
def test_generated_kernels_any_strides(case, layouts_qkv):
    pattern, shape = case
    check_views_match_copies(pattern, shape, layouts_qkv, "triton", torch.float32, 1e-5)


def test_issue_example_unbound_last_axis():
    """q, k, v = qkv.unbind(-1): the example that was off by 3.5."""
    q, k, v = torch.randn(1, 4, 64, 16, 3, dtype=torch.float64).unbind(-1)
    ref = spattn.attention(q.contiguous(), k.contiguous(), v.contiguous(), "dense-causal")
    torch.testing.assert_close(spattn.attention(q, k, v, "dense-causal"), ref, rtol=0,
                               atol=1e-12)


def test_modules_and_kv_cache_prompt_any_strides():
    x = torch.randn(2, 4, 48, 8, 3, dtype=torch.float64)
    q, k, v = x.unbind(-1)
    copies = [t.contiguous() for t in (q, k, v)]
    attn = spattn.DilatedAttention("sink-window")
    torch.testing.assert_close(attn(q, k, v), attn(*copies), rtol=0, atol=1e-12)
    pattern = spattn.Pattern.model_validate({"name": "c", "causal": True, "branches": [
        {"segment": 8, "dilation": 2}, {"window": {"size": 6}}]})
    cache, fresh = spattn.KVCache(pattern), spattn.KVCache(pattern)
    torch.testing.assert_close(cache.attend(q[:, :, :40], k[:, :, :40], v[:, :, :40]),
                               fresh.attend(*(t[:, :, :40] for t in copies)), rtol=0, atol=1e-12)
    torch.testing.assert_close(cache.attend(q[:, :, 40:], k[:, :, 40:], v[:, :, 40:]),
                               fresh.attend(*(t[:, :, 40:] for t in copies)), rtol=0, atol=1e-12)
