"""Queries shorter than keys (bottom-right), the (B, N, H, D) layout and attention sinks, on
every backend, forward and backward, against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from generated_cases import INTERPRETED, generated_patterns
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import reference_attention
from test_attention import problems

import spattn


def _tensors(shape, nq, sinks, dtype=torch.float64, seed=0):
    batch, heads, kv_heads, n, dim = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, nq, dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, kv_heads, n, dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, kv_heads, n, dim, generator=gen, dtype=dtype)
    t = torch.randn(heads, generator=gen, dtype=dtype) * 2 if sinks else None
    return [x.requires_grad_() for x in (q, k, v)], (t.requires_grad_() if sinks else None)


def check(pattern, shape, nq, sinks, layout="bhnd", backend="torch", dtype=torch.float64,
          atol=1e-9, grad=True):
    (q, k, v), t = _tensors(shape, nq, sinks, dtype)
    args = [q, k, v]
    if layout == "bnhd":
        args = [x.detach().transpose(1, 2).contiguous().requires_grad_() for x in args]
    with torch.set_grad_enabled(grad):
        out = spattn.attention(*args, pattern, backend=backend, layout=layout, sinks=t)
    if layout == "bnhd":
        assert out.shape == args[0].shape
        out = out.transpose(1, 2)
    want = reference_attention(q, k, v, pattern, sinks=t)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=atol)
    if not grad:
        return
    dout = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    inputs = [*args] + ([t] if sinks else [])
    got = torch.autograd.grad(out.double(), inputs, dout)
    expected = torch.autograd.grad(want, [q, k, v] + ([t] if sinks else []), dout)
    for name, g, w in zip(["dq", "dk", "dv", "dsinks"], got, expected, strict=False):
        if layout == "bnhd" and name != "dsinks":
            g = g.transpose(1, 2)
        torch.testing.assert_close(g.double(), w.double(), rtol=0, atol=atol * 10,
                                   msg=lambda m, name=name: f"{name}: {m}")


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_n=30), st.data())
def test_torch_backend_random_patterns(case, data):
    pattern, shape = case
    nq = data.draw(st.integers(1, shape[3]), label="nq")
    check(pattern, shape, nq, sinks=data.draw(st.booleans(), label="sinks"),
          layout=data.draw(st.sampled_from(["bhnd", "bnhd"]), label="layout"))


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_n=30), st.data())
def test_torch_backend_inference_rows(case, data):
    """Without autograd, short query runs of causal patterns take the decoding path."""
    pattern, shape = case
    pattern = pattern.model_copy(update={"causal": True})
    nq = data.draw(st.integers(1, shape[3]), label="nq")
    check(pattern, shape, nq, sinks=data.draw(st.booleans(), label="sinks"), grad=False)


@settings(INTERPRETED, max_examples=6)
@given(generated_patterns(max_n=40), st.data())
def test_generated_kernels_random_patterns(case, data):
    pattern, shape = case
    nq = data.draw(st.integers(1, shape[3]), label="nq")
    check(pattern, shape, nq, sinks=data.draw(st.booleans(), label="sinks"),
          layout=data.draw(st.sampled_from(["bhnd", "bnhd"]), label="layout"), backend="triton",
          dtype=torch.float32, atol=2e-5, grad=data.draw(st.booleans(), label="grad"))


LONGNET = spattn.Pattern.model_validate({"name": "l", "causal": True, "branches": [
    {"segment": 8, "dilation": 1}, {"segment": 16, "dilation": 2}, {"segment": 32, "dilation": 4}]})


@pytest.mark.parametrize("nq", [1, 5, 40])
def test_key_padding_with_shorter_queries(nq):
    """Left padding, as in batched generation with a KV cache: each row's queries are the last
    positions of its own sequence."""
    (q, k, v), t = _tensors((3, 4, 2, 40, 8), nq, sinks=True)
    starts = [0, 7, 38]
    mask = torch.arange(40)[None] < torch.tensor(starts)[:, None]  # True at padding
    out = spattn.attention(q, k, v, LONGNET, key_padding_mask=mask, sinks=t)
    grads = torch.autograd.grad(out.sum(), (q, k, v, t))
    want_grads = [torch.zeros_like(x) for x in (q, k, v, t)]
    for row, a in enumerate(starts):
        first = 40 - nq
        lo = max(a, first) - first  # the row's first real query
        qr = q[row:row + 1, :, lo:].detach().requires_grad_()
        kr, vr = (x[row:row + 1, :, a:].detach().requires_grad_() for x in (k, v))
        tr = t.detach().requires_grad_()
        want = reference_attention(qr, kr, vr, LONGNET, sinks=tr)
        torch.testing.assert_close(out[row:row + 1, :, lo:], want, rtol=0, atol=1e-9)
        assert not out[row, :, :lo].any()
        g = torch.autograd.grad(want.sum(), (qr, kr, vr, tr))
        want_grads[0][row:row + 1, :, lo:] += g[0]
        want_grads[1][row:row + 1, :, a:] += g[1]
        want_grads[2][row:row + 1, :, a:] += g[2]
        want_grads[3] += g[3]
    for got, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-8)


def test_packed_sequences_with_shorter_queries_are_rows_of_the_full_forward():
    (q, k, v), _ = _tensors((1, 2, 2, 30, 8), 30, sinks=False)
    full = spattn.attention(q, k, v, LONGNET, seq_lens=[12, 18])
    part = spattn.attention(q[:, :, 21:], k, v, LONGNET, seq_lens=[12, 18])
    torch.testing.assert_close(part, full[:, :, 21:], rtol=0, atol=1e-12)


def test_sinks_lower_every_weight_and_leave_empty_rows_zero():
    pattern = spattn.Pattern.model_validate({"name": "g", "causal": True, "branches": [
        {"segment": 4, "dilation": 2}]})  # odd rows of each segment see nothing on head 0
    (q, k, v), t = _tensors((1, 2, 2, 8, 4), 8, sinks=True)
    out = spattn.attention(q, k, v, pattern, sinks=t)
    torch.testing.assert_close(out, reference_attention(q, k, v, pattern, sinks=t), rtol=0,
                               atol=1e-12)
    assert not out[0, 0, 1].any()
    very_negative = torch.full((2,), -1e4, dtype=torch.float64)
    torch.testing.assert_close(spattn.attention(q, k, v, pattern, sinks=very_negative),
                               spattn.attention(q, k, v, pattern), rtol=0, atol=1e-12)


@pytest.mark.parametrize("sinks,message", [
    (torch.zeros(3), r"shape \(H=2,\)"), (torch.zeros(2, dtype=torch.int64), "floating-point"),
    ([0.0, 0.0], "floating-point"),
])
def test_bad_sinks_say_what_was_expected(sinks, message):
    (q, k, v), _ = _tensors((1, 2, 2, 8, 4), 8, sinks=False)
    with pytest.raises(spattn.SpattnError, match=message):
        spattn.attention(q, k, v, LONGNET, sinks=sinks)


@pytest.mark.parametrize("layout,message", [("bshd", "layout must be"), ("BNHD", "layout")])
def test_bad_layout_is_an_error(layout, message):
    (q, k, v), _ = _tensors((1, 2, 2, 8, 4), 8, sinks=False)
    with pytest.raises(spattn.SpattnError, match=message):
        spattn.attention(q, k, v, LONGNET, layout=layout)


def test_bnhd_takes_views_without_copies():
    """The (B, N, H, D) output is a view of the backend's (B, H, N, D) result, and the inputs
    reach the backend as views (no .contiguous() copy of q, k, v)."""
    x = torch.randn(1, 24, 2, 8, dtype=torch.float64)
    out = spattn.attention(x, x, x, LONGNET, layout="bnhd")
    assert out.shape == (1, 24, 2, 8) and out.transpose(1, 2).is_contiguous()


def test_module_sinks_are_a_parameter_and_decode_like_the_full_forward():
    torch.manual_seed(0)
    mha = spattn.MultiheadDilatedAttention(32, 4, LONGNET, kv_heads=2, sinks=True, subln=True,
                                           dtype=torch.float64)
    assert mha.sinks.shape == (4,) and not mha.sinks.any()
    with torch.no_grad():
        mha.sinks.copy_(torch.randn(4, dtype=torch.float64))
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    full = mha(x)
    full.sum().backward()
    assert mha.sinks.grad is not None and mha.sinks.grad.abs().sum() > 0
    assert mha.inner_attn_ln.weight.grad is not None
    cache = mha.new_cache()
    with torch.no_grad():
        steps = [mha(x[:, a:b], cache=cache) for a, b in ((0, 30), (30, 31), (31, 40))]
    torch.testing.assert_close(torch.cat(steps, 1), full.detach(), rtol=0, atol=1e-10)
    without = spattn.MultiheadDilatedAttention(32, 4, LONGNET, kv_heads=2, subln=True,
                                               dtype=torch.float64)
    without.load_state_dict({k: v for k, v in mha.state_dict().items() if k != "sinks"})
    assert (without(x) - full).abs().max() > 1e-3  # the sinks change the output
