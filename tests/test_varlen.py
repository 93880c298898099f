"""Packed variable-length batches and padded batches: every sequence as if it ran alone, in every
backend (the generated kernels on the Triton interpreter), forward and backward."""

from __future__ import annotations

import pytest
import torch
from generated_cases import DEVICE, scaled
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_attention

import spattn

BACKENDS = [("torch", torch.float64, 1e-10, "cpu"), ("triton", torch.float32, 2e-4, DEVICE)]


@pytest.fixture(autouse=True)
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPATTN_CACHE_DIR", str(tmp_path / "cache"))


def _leaves(batch, heads, kv_heads, n, dim, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, n, dim), (batch, kv_heads, n, dim), (batch, kv_heads, n, dim)]
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype)
            .requires_grad_() for s in shapes]


def _alone(pattern, q, k, v, d_out, bounds, rows=None):
    """Reference: each (row, [a, b)) attended on its own in float64; zeros elsewhere."""
    leaves = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for row, (a, b) in zip(rows or [slice(None)] * len(bounds), bounds, strict=True):
        if b > a:
            row = slice(row, row + 1) if isinstance(row, int) else row
            out[row, :, a:b] = reference_attention(*(t[row, :, a:b] for t in leaves), pattern)
    return out, torch.autograd.grad(out, leaves, d_out.double().cpu(), allow_unused=True)


def _compare(got, want, tol):
    assert got.shape == want.shape
    error = (got.detach().double().cpu() - want).abs().max().item()
    assert error < tol * max(1.0, want.abs().max().item()), f"max abs error {error:.2e}"


@pytest.mark.parametrize("backend,dtype,tol,device", BACKENDS, ids=["torch", "triton"])
@pytest.mark.parametrize("form", ["seq_lens", "cu_seqlens", "cu_seqlens-tensor"])
def test_packed_sequences_run_as_if_alone(backend, dtype, tol, device, form):
    pattern = scaled("sink-window", 256)  # global tokens 0-3 of every sequence, window 16
    lengths = [37, 1, 20, 45]
    offsets = [0, 37, 38, 58, 103]
    q, k, v = _leaves(1, 4, 2, 103, 16, dtype, device)
    kwargs = {"seq_lens": lengths, "cu_seqlens": offsets,
              "cu_seqlens-tensor": torch.tensor(offsets, dtype=torch.int32)}
    name = form.removesuffix("-tensor")
    out = spattn.attention(q, k, v, pattern, backend=backend, **{name: kwargs[form]})
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad(out, (q, k, v), d_out)
    bounds = list(zip(offsets[:-1], offsets[1:], strict=True))
    want, want_grads = _alone(pattern, q, k, v, d_out, bounds)
    for got, expected in zip((out, *grads), (want, *want_grads), strict=True):
        _compare(got, expected, tol)


@pytest.mark.parametrize("backend,dtype,tol,device", BACKENDS, ids=["torch", "triton"])
def test_padded_rows_left_and_right(backend, dtype, tol, device):
    pattern = scaled("longnet-lm", 256)  # segments 8 ... 128
    q, k, v = _leaves(3, 2, 2, 70, 16, dtype, device)
    padding = torch.zeros(3, 70, dtype=torch.bool)
    padding[0, 51:] = True  # right-padded
    padding[1, :13] = True  # left-padded: segments start at its first real token
    padding[2, :] = True  # nothing real
    out = spattn.attention(q, k, v, pattern, backend=backend, key_padding_mask=padding)
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad(out, (q, k, v), d_out)
    want, want_grads = _alone(pattern, q, k, v, d_out, [(0, 51), (13, 70), (0, 0)],
                              rows=[0, 1, 2])
    for got, expected in zip((out, *grads), (want, *want_grads), strict=True):
        _compare(got, expected, tol)
    assert (out[2] == 0).all() and (grads[1][0, :, 51:] == 0).all()  # padding: zero everywhere


@settings(max_examples=25, deadline=None, derandomize=True)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=5),
       segment=st.integers(1, 30), dilation=st.integers(1, 4), causal=st.booleans(),
       window=st.integers(1, 12))
def test_random_packings_torch_backend(lengths, segment, dilation, causal, window):
    pattern = spattn.Pattern.model_validate({
        "name": "packed", "causal": causal,
        "branches": [{"segment": segment, "dilation": dilation}, {"window": {"size": window}},
                     {"global": {"tokens": [0, 5]}}]})
    n = sum(lengths)
    q, k, v = _leaves(2, 2, 1, n, 8, torch.float64, "cpu")
    out = spattn.attention(q, k, v, pattern, backend="torch", seq_lens=lengths)
    bounds, start = [], 0
    for length in lengths:
        bounds.append((start, start + length))
        start += length
    d_out = torch.randn(out.shape, dtype=torch.float64)
    want, want_grads = _alone(pattern, q, k, v, d_out, bounds)
    grads = torch.autograd.grad(out, (q, k, v), d_out)
    for got, expected in zip((out, *grads), (want, *want_grads), strict=True):
        _compare(got, expected, 1e-10)


def test_module_takes_a_key_padding_mask():
    mha = spattn.MultiheadDilatedAttention(32, 4, scaled("longnet-lm", 256), kv_heads=2)
    x = torch.randn(2, 40, 32)
    padding = torch.zeros(2, 40, dtype=torch.bool)
    padding[1, 30:] = True
    got = mha(x, key_padding_mask=padding)
    alone = mha(x[1:, :30])
    torch.testing.assert_close(got[1:, :30], alone)
    torch.testing.assert_close(got[:1], mha(x[:1]))


@pytest.mark.parametrize("kwargs,message", [
    ({"seq_lens": [10, 10], "cu_seqlens": [0, 10, 20]}, "not both"),
    ({"seq_lens": [10, 9]}, "sum to 19, but the tensors hold N = 20"),
    ({"seq_lens": [20, 0]}, "positive lengths"),
    ({"seq_lens": [10.0, 10.0]}, "must hold ints"),
    ({"cu_seqlens": [0, 12, 12, 20]}, "strictly increasing"),
    ({"cu_seqlens": [1, 20]}, "from 0 to N = 20"),
    ({"cu_seqlens": torch.tensor([0.0, 20.0])}, "integer tensor"),
    ({"key_padding_mask": torch.zeros(1, 19, dtype=torch.bool)}, r"\(B=1, N=20\)"),
    ({"key_padding_mask": torch.zeros(1, 20)}, "bool tensor"),
    ({"key_padding_mask": torch.tensor([[False, True] * 10])}, "one contiguous run"),
    ({"key_padding_mask": torch.zeros(1, 20, dtype=torch.bool), "seq_lens": [20]}, "not both"),
])
def test_bad_sequence_arguments_say_what_was_expected(kwargs, message):
    q = torch.randn(1, 2, 20, 8)
    with pytest.raises(spattn.SpattnError, match=message):
        spattn.attention(q, q, q, "sliding-window", **kwargs)
