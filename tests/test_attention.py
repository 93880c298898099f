"""The PyTorch backend against the float64 reference (tests/reference.py)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from reference import pair_counts, reference_attention

import spattn
from spattn.patterns.geometry import resolve
from spattn.patterns.loader import builtin_names
from spattn.patterns.report import scale_pattern
from spattn.runtime import torch_backend
from spattn.runtime.dispatch import InputError

SETTINGS = settings(max_examples=220, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def branches(draw, heads: int, max_n: int):
    kind = draw(st.sampled_from(["dilated", "dilated", "dilated", "window", "global", "strided",
                                 "random", "dense"]))
    if kind == "dilated":
        r = draw(st.integers(1, 6))
        branch = {"segment": draw(st.integers(1, max_n + 8)), "dilation": r}
        if draw(st.booleans()):
            branch["offsets"] = draw(st.lists(st.integers(0, r - 1), min_size=heads,
                                              max_size=heads))
        return branch
    if kind == "window":
        return {"window": {"size": draw(st.integers(1, max_n + 4))}}
    if kind == "global":
        return {"global": {"tokens": draw(st.lists(st.integers(0, max_n + 4), min_size=1,
                                                   max_size=4))}}
    if kind == "strided":
        return {"strided": {"stride": draw(st.integers(1, max_n + 4))}}
    if kind == "random":
        return {"random": {"block": draw(st.integers(1, max_n // 2 + 2)),
                           "blocks": draw(st.integers(1, 4)), "seed": draw(st.integers(0, 99))}}
    return {"dense": {}}


@st.composite
def with_heads(draw, branch: dict, heads: int) -> dict:
    """The branch, for some heads only now and then (`heads:`)."""
    if draw(st.integers(0, 3)) == 0:
        return {**branch, "heads": draw(st.lists(st.integers(0, heads - 1), min_size=1,
                                                 max_size=heads, unique=True))}
    return branch


@st.composite
def problems(draw, max_n: int = 40):
    kv_heads = draw(st.sampled_from([1, 2, 3]))
    heads = kv_heads * draw(st.sampled_from([1, 2]))
    n = draw(st.integers(1, max_n))
    spec = {
        "name": "random",
        "causal": draw(st.booleans()),
        "overlap": draw(st.sampled_from(["multiset", "union"])),
        "head_offsets": draw(st.sampled_from(["paper", "blocked"])),
        "branches": [draw(with_heads(b, heads)) for b in draw(st.lists(branches(heads, max_n),
                                                                      min_size=1, max_size=4))],
    }
    batch = draw(st.integers(1, 2))
    dim = draw(st.sampled_from([1, 4, 8]))
    return spattn.Pattern.model_validate(spec), (batch, heads, kv_heads, n, dim)


def _inputs(shape, dtype=torch.float64, seed=0, requires_grad=True):
    batch, heads, kv_heads, n, dim = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, n, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, n, dim, generator=gen, dtype=torch.float64)
    return [t.to(dtype).requires_grad_(requires_grad) for t in (q, k, v)]


def _dilated(segment, dilation, causal=False, n_heads=None):
    spec = {"name": "d", "causal": causal, "branches": [{"segment": segment, "dilation": dilation}]}
    return spattn.Pattern.model_validate(spec)


def _window(size, causal):
    spec = {"name": "w", "causal": causal, "branches": [{"window": {"size": size}}]}
    return spattn.Pattern.model_validate(spec)


FIXED = [  # odd sizes the strategy may or may not reach: named, always run
    (_dilated(4, 1, True), (1, 1, 1, 1, 4)),  # N = 1
    (_dilated(8, 3, True), (1, 3, 3, 21, 4)),  # N not a multiple of w, w not a multiple of r
    (_dilated(64, 2), (2, 2, 1, 9, 8)),  # w > N, GQA
    (_dilated(1, 1), (1, 2, 2, 7, 4)),  # single-row segments
    (_dilated(5, 7, True), (1, 7, 7, 13, 4)),  # r > w: heads with offset >= w select nothing
]
def _one(branch, causal, overlap="multiset"):
    return spattn.Pattern.model_validate({"name": "one", "causal": causal, "overlap": overlap,
                                          "branches": [branch]})


NEW_KINDS = [  # strided and random branches (docs/branches.md) at their edges
    (_one({"strided": {"stride": 1}}, True), (1, 2, 1, 9, 4)),  # every key
    (_one({"strided": {"stride": 12}}, False), (1, 2, 2, 9, 4)),  # stride > N: the diagonal
    (_one({"strided": {"stride": 4}}, True), (2, 2, 1, 31, 4)),  # N not a multiple of stride
    (_one({"random": {"block": 1, "blocks": 3, "seed": 7}}, True), (1, 2, 1, 17, 4)),
    (_one({"random": {"block": 20, "blocks": 2}}, False), (1, 2, 2, 9, 4)),  # block > N
    (_one({"random": {"block": 4, "blocks": 9}}, False), (1, 3, 1, 30, 4)),  # every block
    (_one({"random": {"block": 3, "blocks": 2, "seed": 1}}, True, "union"), (1, 4, 2, 29, 4)),
]


@pytest.mark.parametrize("pattern,shape", NEW_KINDS, ids=[
    "stride1", "stride>n", "stride-ragged", "block1", "block>n", "all-blocks", "random-union"])
def test_new_branch_kinds_match_reference(pattern, shape):
    _check_against_reference(pattern, shape)


WINDOWS = [  # interior chunks (full, diagonal and edge blocks) and both sequence ends
    (_window(size, causal), (1, 2, 1, n, 4))
    for size, n in ((1, 40), (7, 61), (50, 203), (130, 420)) for causal in (True, False)
]


def _check_against_reference(pattern, shape, seed=0):
    q, k, v = _inputs(shape, seed=seed)
    out = spattn.attention(q, k, v, pattern)
    ref = reference_attention(q, k, v, pattern)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, g, w in zip("qkv", got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=f"d{name} differs")


@SETTINGS
@given(problems())
def test_matches_reference_on_random_patterns(case):
    pattern, shape = case
    _check_against_reference(pattern, shape)


@pytest.mark.parametrize("pattern,shape", FIXED, ids=["n1", "ragged", "w>n-gqa", "w1", "r>w"])
def test_matches_reference_on_odd_sizes(pattern, shape):
    _check_against_reference(pattern, shape)


@pytest.mark.parametrize("pattern,shape", WINDOWS, ids=[
    f"w{p.branches[0].window.size}-n{s[3]}-{'causal' if p.causal else 'bi'}" for p, s in WINDOWS])
def test_windows_match_reference(pattern, shape):
    _check_against_reference(pattern, shape)


@pytest.mark.parametrize("name,scale", [*((name, 64) for name in builtin_names()),
                                        ("bigbird", 1), ("sparse-transformer-strided", 1)])
def test_builtins_match_reference(name, scale):
    # scaled: longnet-lm's segments become 32 ... 512 over 300 tokens; unscaled, bigbird's 64
    # global tokens, window 192 and random blocks of 64, and the Sparse Transformer's stride 128
    pattern = scale_pattern(spattn.load_pattern(name), scale)
    _check_against_reference(pattern, (1, 2, 1, 300, 4))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(problems(max_n=24))
@example((_dilated(6, 2, True), (1, 2, 1, 11, 4)))
def test_matmul_fallback_matches_reference(case):
    """The chunked matmul path (used off CPU) meets the same contract as the fused kernel."""
    check_backend(*case, force_math=True)


def check_backend(pattern, shape, force_math=False) -> torch_backend.Problem:
    """torch_backend.forward and .backward in float64 against the reference and its autograd."""
    batch, heads, kv_heads, n, dim = shape
    q, k, v = _inputs(shape)
    problem = torch_backend.Problem(resolve(pattern, n, heads), n, heads, kv_heads,
                                    pattern.causal, pattern.overlap == "union",
                                    1 / math.sqrt(dim), force_math=force_math)
    out, lse = torch_backend.forward(q, k, v, problem)
    ref = reference_attention(q, k, v, pattern)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    grad = torch.randn_like(out)
    got = torch_backend.backward(grad, q, k, v, out, lse, problem)
    for g, w in zip(got, torch.autograd.grad(ref, (q, k, v), grad), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)
    return problem


LONGNET_SMALL = spattn.Pattern.model_validate({
    "name": "longnet-small", "causal": True,
    "branches": [{"segment": 16, "dilation": 1}, {"segment": 32, "dilation": 2},
                 {"segment": 64, "dilation": 4}, {"segment": 96, "dilation": 6}]})
SINK_SMALL = spattn.Pattern.model_validate({
    "name": "sink-small", "causal": True,
    "branches": [{"global": {"tokens": [0, 1, 2, 3]}}, {"window": {"size": 24}}]})
STRIDED_SMALL = spattn.Pattern.model_validate({
    "name": "strided-small", "causal": True, "overlap": "union",
    "branches": [{"window": {"size": 6}}, {"strided": {"stride": 6}}]})
BIGBIRD_SMALL = spattn.Pattern.model_validate({
    "name": "bigbird-small", "overlap": "union",
    "branches": [{"global": {"tokens": [0, 1, 2]}}, {"window": {"size": 7}},
                 {"random": {"block": 5, "blocks": 2, "seed": 3}}]})
SMALL = [LONGNET_SMALL, SINK_SMALL, STRIDED_SMALL, BIGBIRD_SMALL]
SMALL_IDS = ["longnet", "sink", "strided", "bigbird"]


@pytest.mark.parametrize("pattern", SMALL, ids=SMALL_IDS)
def test_float64_gradcheck(pattern):
    # the strided and bigbird patterns split into many small pieces: fewer tokens keep it quick
    n = 28 if pattern in (LONGNET_SMALL, SINK_SMALL) else 18
    q, k, v = _inputs((1, 2, 1, n, 3))
    assert torch.autograd.gradcheck(lambda a, b, c: spattn.attention(a, b, c, pattern), (q, k, v))


# Low precision: error against float64 at most this, on unit-normal inputs (D = 32, N ~ 100).
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("pattern", SMALL, ids=SMALL_IDS)
def test_low_precision_forward_and_backward(pattern, dtype):
    shape = (2, 4, 2, 100, 32)
    q, k, v = _inputs(shape, dtype=dtype)
    out = spattn.attention(q, k, v, pattern)
    assert out.dtype == dtype and out.shape == q.shape
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference_attention(q64, k64, v64, pattern)
    tol = TOLERANCE[dtype]
    assert (out.double() - ref).abs().max() <= tol
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
    want = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype
        assert (g.double() - w).abs().max() <= 4 * tol * max(1.0, w.abs().max().item())


def test_query_with_no_keys_gets_zero_output_and_gradient():
    # head 1 of a dilation-2 branch selects odd rows only; the global branch gives nothing to
    # queries before token 5 under causal order: even rows < 5 of head 0 ... see counts below
    pattern = spattn.Pattern.model_validate({
        "name": "gaps", "causal": True,
        "branches": [{"segment": 8, "dilation": 2, "offsets": [1, 1]},
                     {"global": {"tokens": [5]}}]})
    q, k, v = _inputs((1, 2, 2, 12, 4))
    counts = pair_counts(pattern, 12, 2)
    empty = counts.sum(-1) == 0
    assert empty.any()
    out = spattn.attention(q, k, v, pattern)
    (dq,) = torch.autograd.grad(out.sum(), (q,))
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    assert (out[0][empty] == 0).all() and (dq[0][empty] == 0).all()


def test_memory_stays_linear_in_n():
    """No tensor of N x N elements is ever created, forward or backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for t in result if isinstance(result, (tuple, list)) else (result,):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return result

    n = 4096
    pattern = spattn.Pattern.model_validate({
        "name": "mixed", "causal": True, "branches": [
            {"segment": 512, "dilation": 1}, {"segment": 4096, "dilation": 8},
            {"window": {"size": 300}}, {"global": {"tokens": [0, 1]}}, {"strided": {"stride": 64}},
            {"random": {"block": 64, "blocks": 3}}]})
    q, k, v = _inputs((1, 2, 2, n, 8), dtype=torch.float32)
    with LargestTensor() as mode:
        spattn.attention(q, k, v, pattern).sum().backward()
    assert mode.largest < n * n // 4, mode.largest


@pytest.mark.parametrize("make,message", [
    (lambda q, k, v: (q[0], k, v), "must be 4-D"),
    (lambda q, k, v: (q, k[:, :, :5], v[:, :, :5]), "Nq <= Nk"),
    (lambda q, k, v: (q, k[..., :2], v[..., :2]), "to match q"),
    (lambda q, k, v: (q, k, v[..., :2]), "same shape"),
    (lambda q, k, v: (q, k.float(), v.float()), "share one dtype"),
    (lambda q, k, v: (q[:, :3], k, v), "multiple of k/v's heads"),
    (lambda q, k, v: (q.int(), k.int(), v.int()), "not one of float32"),
])
def test_bad_tensors_say_what_was_expected(make, message):
    q, k, v = _inputs((1, 4, 2, 8, 4), requires_grad=False)
    with pytest.raises(spattn.SpattnError, match=message):
        spattn.attention(*make(q, k, v), LONGNET_SMALL)


def test_pattern_fixed_sizes_are_checked():
    pattern = LONGNET_SMALL.model_copy(update={"heads": 8})
    q, k, v = _inputs((1, 4, 4, 8, 4), requires_grad=False)
    with pytest.raises(InputError, match="fixes heads = 8"):
        spattn.attention(q, k, v, pattern)


def test_unknown_backend_is_an_error():
    q, k, v = _inputs((1, 2, 2, 8, 4), requires_grad=False)
    with pytest.raises(spattn.SpattnError, match="unknown backend 'cuda-magic'"):
        spattn.attention(q, k, v, LONGNET_SMALL, backend="cuda-magic")


def test_scale_argument_overrides_default():
    q, k, v = _inputs((1, 2, 2, 20, 4), requires_grad=False)
    out = spattn.attention(q, k, v, LONGNET_SMALL, scale=0.3)
    torch.testing.assert_close(out, reference_attention(q, k, v, LONGNET_SMALL, scale=0.3))


def test_non_contiguous_inputs_give_the_same_result():
    """(B, N, H, D) tensors viewed as (B, H, N, D), as models produce them."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 50, 4, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    views = [t.transpose(1, 2).requires_grad_() for t in (q, k, v)]
    dense = [t.detach().contiguous().requires_grad_() for t in views]
    out = spattn.attention(*views, SINK_SMALL)
    want = spattn.attention(*dense, SINK_SMALL)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    grad = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, views, grad), torch.autograd.grad(want, dense, grad),
                    strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
