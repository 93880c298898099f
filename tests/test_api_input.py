"""What the public API does with input that is wrong, degenerate or unusual: one clear
SpattnError, or the right answer; never a raw TypeError, a NaN or a missing gradient."""

from __future__ import annotations

import math

import pytest
import torch

import spattn
from spattn.limits import check_scale

CAUSAL = spattn.Pattern.model_validate({"name": "c", "causal": True, "branches": [
    {"segment": 8, "dilation": 2}, {"window": {"size": 4}}]})

BAD_SCALES = [0, 0.0, -1.0, -1e-9, math.inf, -math.inf, math.nan, 10**400, "1", True,
              torch.tensor(0.5), [0.5]]


def _qkv(b=1, h=2, n=16, d=8, hkv=None, grad=False):
    gen = torch.Generator().manual_seed(0)
    shapes = [(b, h, n, d), (b, hkv or h, n, d), (b, hkv or h, n, d)]
    return [torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_(grad)
            for s in shapes]


@pytest.mark.parametrize("scale", BAD_SCALES, ids=repr)
def test_bad_scales_are_refused_the_same_way_everywhere(scale):
    q, k, v = _qkv()
    messages = []
    for make in (
        lambda: spattn.attention(q, k, v, CAUSAL, scale=scale),
        lambda: spattn.DilatedAttention(CAUSAL, scale=scale),
        lambda: spattn.KVCache(CAUSAL, scale=scale),
        lambda: check_scale(scale),
    ):
        with pytest.raises(spattn.SpattnError, match="scale must be a finite number > 0") as e:
            make()
        messages.append(str(e.value))
    assert len(set(messages)) == 1, messages


def test_tiny_positive_scale_is_fine_and_finite():
    q, k, v = _qkv()
    out = spattn.attention(q, k, v, CAUSAL, scale=1e-30)
    assert out.isfinite().all()


@pytest.mark.parametrize("shape,message", [
    ((1, 2, 16, 0), "head_dim >= 1"),
    ((1, 0, 16, 8), "at least one head"),
])
def test_empty_heads_or_head_dim_are_errors(shape, message):
    q = torch.randn(*shape)
    with pytest.raises(spattn.SpattnError, match=message):
        spattn.attention(q, q, q, CAUSAL)


@pytest.mark.parametrize("b,n", [(0, 16), (2, 0)])
def test_empty_batch_or_sequence_has_zero_gradients(b, n):
    q, k, v = _qkv(b=b, n=n, grad=True)
    out = spattn.attention(q, k, v, CAUSAL)
    assert out.shape == q.shape
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(g.shape == t.shape and not g.any() for g, t in zip(grads, (q, k, v), strict=True))


@pytest.mark.parametrize("pattern", [123, None, 4.5, b"dense-causal", ["dense-causal"]],
                         ids=repr)
def test_pattern_of_the_wrong_type_is_a_clear_error(pattern):
    q, k, v = _qkv()
    for make in (lambda: spattn.attention(q, k, v, pattern), lambda: spattn.KVCache(pattern),
                 lambda: spattn.DilatedAttention(pattern), lambda: spattn.load_pattern(pattern)):
        with pytest.raises(spattn.SpattnError, match="a spattn.Pattern, a built-in name or"):
            make()


def test_seq_lens_may_be_any_iterable_read_once():
    q, k, v = _qkv(n=16)
    want = spattn.attention(q, k, v, CAUSAL, seq_lens=[5, 11])
    for lengths in ((x for x in (5, 11)), iter([5, 11]), (5, 11), torch.tensor([5, 11])):
        torch.testing.assert_close(spattn.attention(q, k, v, CAUSAL, seq_lens=lengths), want)


@pytest.mark.parametrize("lengths,message", [
    ("5,11", "a list of ints"), (5, "a list of ints"), ([5.0, 11], "must hold ints"),
    ([True, 15], "must hold ints"), (list(range(10_000)), "in all"),
])
def test_bad_seq_lens_say_what_was_expected(lengths, message):
    q, k, v = _qkv(n=16)
    with pytest.raises(spattn.SpattnError, match=message) as e:
        spattn.attention(q, k, v, CAUSAL, seq_lens=lengths)
    assert len(str(e.value)) < 300


def test_key_padding_mask_padding_the_whole_batch_has_zero_gradients():
    q, k, v = _qkv(b=2, grad=True)
    mask = torch.ones(2, 16, dtype=torch.bool)
    out = spattn.attention(q, k, v, CAUSAL, key_padding_mask=mask)
    assert not out.any()
    out.sum().backward()
    assert all(t.grad is not None and not t.grad.any() for t in (q, k, v))


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
@pytest.mark.parametrize("queries", [10, 3, 0])
@pytest.mark.parametrize("how", ["key_padding_mask", "seq_lens", "cu_seqlens"])
def test_empty_batch_with_several_sequences_is_an_empty_output(layout, queries, how):
    """B = 0 with a padding mask or packed lengths, in either layout, queries as many as the keys
    or fewer: an empty output and zero gradients, never torch.cat's error."""
    q = torch.randn(0, 2, queries, 8, requires_grad=True)
    k, v = (torch.randn(0, 1, 10, 8, requires_grad=True) for _ in range(2))
    args = {"key_padding_mask": {"key_padding_mask": torch.zeros(0, 10, dtype=torch.bool)},
            "seq_lens": {"seq_lens": [4, 6]}, "cu_seqlens": {"cu_seqlens": [0, 4, 10]}}[how]
    views = [x.transpose(1, 2) if layout == "bnhd" else x for x in (q, k, v)]
    out = spattn.attention(*views, "longnet-lm", layout=layout, **args)
    assert out.shape == views[0].shape
    out.sum().backward()
    assert all(x.grad is not None and x.grad.shape == x.shape for x in (q, k, v))


@pytest.mark.parametrize("how", ["key_padding_mask", "seq_lens"])
def test_module_takes_an_empty_batch(how):
    from spattn.modules import MultiheadDilatedAttention

    layer = MultiheadDilatedAttention(16, 2, "longnet-lm")
    x = torch.randn(0, 10, 16, requires_grad=True)
    args = {"key_padding_mask": torch.zeros(0, 10, dtype=torch.bool)} if how != "seq_lens" \
        else {"seq_lens": [4, 6]}
    y = layer(x, **args)
    y.sum().backward()
    assert y.shape == x.shape and torch.equal(x.grad, torch.zeros_like(x))
