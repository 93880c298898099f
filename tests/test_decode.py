"""KVCache: decoding a causal pattern token by token and in uneven chunks gives the rows of the
full causal forward, keeps exactly the keys a later query can still attend, and never holds more
than its reported bound."""

from __future__ import annotations

import pytest
import torch
from generated_cases import DEVICE, branch_specs
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_attention

import spattn
from spattn.patterns.counting import branch_mask
from spattn.patterns.geometry import resolve
from spattn.patterns.report import scale_pattern
from spattn.patterns.retention import cache_bound
from spattn.runtime.dispatch import BackendError, InputError


@pytest.fixture(autouse=True)
def cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SPATTN_CACHE_DIR", str(tmp_path / "cache"))


def _inputs(batch, heads, kv_heads, n, dim, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, h, n, dim, generator=gen, dtype=torch.float64).to(dtype)
            for h in (heads, kv_heads, kv_heads)]


def _decode(cache, q, k, v, chunks):
    """Feed the tokens in chunks of the given sizes (the last repeated); the outputs joined."""
    outs, i, sizes = [], 0, list(chunks)
    while i < q.shape[2]:
        t = min(sizes.pop(0) if len(sizes) > 1 else sizes[0], q.shape[2] - i)
        outs.append(cache.attend(q[:, :, i:i + t], k[:, :, i:i + t], v[:, :, i:i + t]))
        i += t
        yield i, torch.cat(outs, 2)


def _needed(pattern, n, heads, horizon=300):
    """needed(L): the keys k < L that a query at or after L attends, from the masks of a sequence
    `horizon` tokens longer (past every segment, window and global token of these patterns)."""
    size = n + horizon
    seen = torch.zeros(size, size, dtype=torch.bool)  # (query, key), any head or branch
    for g in resolve(pattern, size, heads):
        for h in range(heads):
            seen |= branch_mask(g, h, size, causal=True)
    later = torch.flip(torch.cumsum(torch.flip(seen.int(), [0]), 0), [0]) > 0  # rows >= L
    return lambda length: later[length, :length].nonzero().flatten().tolist()


LONGNET_256 = scale_pattern(spattn.load_pattern("longnet-lm"), 256)  # w = 8 ... 128, r <= 12


@pytest.mark.parametrize("chunks", [[1], [37, 1, 1, 90, 5, 2, 64, 13]], ids=["tokens", "chunks"])
def test_longnet_decoding_reproduces_the_full_forward(chunks):
    # four times the longest segment, GQA, heads with every offset of the r = 6 branch
    q, k, v = _inputs(1, 6, 2, 512, 8)
    full = spattn.attention(q, k, v, LONGNET_256)
    cache = spattn.KVCache(LONGNET_256)
    most = 0
    for length, out in _decode(cache, q, k, v, chunks):
        torch.testing.assert_close(out, full[:, :, :length], rtol=1e-12, atol=1e-12)
        assert cache.kept <= cache.bound and cache.memory_bytes <= cache.bound_bytes()
        most = max(most, cache.kept)
    assert cache.seen == 512
    if chunks == [1]:  # token by token the cache passes through its fullest state
        assert most == cache.bound < 2 * 128


SMALL = {
    "longnet": LONGNET_256,
    "sink": scale_pattern(spattn.load_pattern("sink-window"), 256),  # tokens 0-3 + window 16
    "union": spattn.Pattern.model_validate({
        "name": "union", "causal": True, "overlap": "union",
        "branches": [{"segment": 12, "dilation": 3, "offsets": [2, 0, 1, 1]},
                     {"window": {"size": 5}}, {"global": {"tokens": [3, 20]}},
                     {"segment": 7, "dilation": 1}]}),
    "strided": scale_pattern(spattn.load_pattern("sparse-transformer-strided"), 16),
    "random": spattn.Pattern.model_validate({
        "name": "random", "causal": True,
        "branches": [{"random": {"block": 5, "blocks": 2, "seed": 4}}, {"window": {"size": 3}}]}),
    "heads": spattn.Pattern.model_validate({  # retrieval and streaming heads (DuoAttention)
        "name": "heads", "causal": True, "overlap": "union",
        "branches": [{"segment": 16, "dilation": 4, "heads": [1, 3]},
                     {"window": {"size": 6}, "heads": [0, 1, 2]},
                     {"global": {"tokens": [2]}, "heads": [2]}, {"segment": 8, "dilation": 1}]}),
}


@pytest.mark.parametrize("name", SMALL)
def test_cache_keeps_exactly_the_keys_later_queries_attend(name):
    pattern, n, heads = SMALL[name], 70, 4
    q, k, v = _inputs(1, heads, 2, n, 4)
    want = reference_attention(q, k, v, pattern)
    needed = _needed(pattern, n, heads)
    cache = spattn.KVCache(pattern)
    for length, out in _decode(cache, q, k, v, [1, 2, 3, 1, 9]):
        torch.testing.assert_close(out, want[:, :, :length], rtol=1e-10, atol=1e-12)
        _check_kept(cache, needed, length)


def _check_kept(cache, needed, length):
    if cache.bound is None:  # a strided, random or dense branch: every key stays
        assert cache.positions.tolist() == list(range(length))
    else:
        assert cache.positions.tolist() == needed(length)
        assert cache.kept <= cache.bound


def test_bounds_of_the_builtins():
    assert cache_bound(spattn.load_pattern("sliding-window"), 8) == 4095  # the 4095 keys before
    assert cache_bound(spattn.load_pattern("sink-window"), 8) == 4 + 4095
    assert cache_bound(spattn.load_pattern("dense-causal"), 8) is None
    assert cache_bound(spattn.load_pattern("sparse-transformer-strided"), 8) is None
    # With 12 heads every residue class of the r = 12 branch is some head's, and the classes'
    # last rows in a 32K segment are 32756 .. 32767 of it: until the first of them, every key of
    # the segment so far is kept (the shorter segments lie inside it).
    lm = spattn.load_pattern("longnet-lm")
    assert cache_bound(lm, 12) == 32756
    # with 4 heads, classes 0-3 of the r = 12 and r = 6 branches: between a half and two thirds
    assert 16384 < cache_bound(lm, 4) < 32768 * 2 // 3


@st.composite
def causal_problems(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    kinds = ("dilated", "dilated", "window", "global", "strided", "random")
    branches = draw(st.lists(branch_specs(heads, 30, kinds), min_size=1, max_size=3))
    pattern = spattn.Pattern.model_validate({
        "name": "decode", "causal": True, "branches": branches,
        "overlap": draw(st.sampled_from(["multiset", "union"])),
        "head_offsets": draw(st.sampled_from(["paper", "blocked"]))})
    chunks = draw(st.lists(st.integers(1, 7), min_size=1, max_size=6))
    return pattern, heads, draw(st.integers(1, 45)), chunks


@settings(max_examples=60, deadline=None, derandomize=True)
@given(causal_problems())
def test_random_patterns_decode_like_the_full_forward(case):
    pattern, heads, n, chunks = case
    q, k, v = _inputs(2, heads, 1, n, 4)
    want = reference_attention(q, k, v, pattern)
    needed = _needed(pattern, n, heads)
    cache = spattn.KVCache(pattern)
    for length, out in _decode(cache, q, k, v, chunks):
        torch.testing.assert_close(out, want[:, :, :length], rtol=1e-10, atol=1e-12)
        _check_kept(cache, needed, length)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 2e-5), (torch.float16, 4e-3),
                                             (torch.bfloat16, 3e-2)], ids=str)
def test_low_precision_decoding(dtype, tolerance):
    # the forward's tolerances (test_attention.py) against float64, D = 16, N = 300
    q, k, v = _inputs(2, 4, 2, 300, 16)
    want = spattn.attention(q, k, v, LONGNET_256)
    cache = spattn.KVCache(LONGNET_256)
    low = [t.to(dtype) for t in (q, k, v)]
    for length, out in _decode(cache, *low, [100, 1, 3]):
        assert out.dtype == dtype
        assert (out.double() - want[:, :, :length]).abs().max() <= tolerance


# ---- the generated decode kernel (the Triton interpreter without a GPU) ----------------------

TRITON_CASES = {
    "longnet": scale_pattern(spattn.load_pattern("longnet-lm"), 1024),  # w = 2 ... 32
    "mixed-union": spattn.Pattern.model_validate({
        "name": "mixed", "causal": True, "overlap": "union",
        "branches": [{"global": {"tokens": [0, 9]}}, {"strided": {"stride": 6}},
                     {"random": {"block": 7, "blocks": 2, "seed": 1}},
                     {"segment": 16, "dilation": 2, "offsets": [1, 0, 0, 1]}]}),
    "heads-union": SMALL["heads"],  # branches for some heads only, mixed within a GQA group
    "heads-multiset": SMALL["heads"].model_copy(update={"overlap": "multiset"}),
}


@pytest.mark.parametrize("name", TRITON_CASES)
def test_generated_decode_kernel(name):
    pattern = TRITON_CASES[name]
    q, k, v = _inputs(2, 4, 2, 70, 16, dtype=torch.float32)
    want = reference_attention(q, k, v, pattern)
    cache = spattn.KVCache(pattern, backend="triton")
    q, k, v = (t.to(DEVICE) for t in (q, k, v))
    for length, out in _decode(cache, q, k, v, [9, 1, 1, 4, 1, 30, 1]):
        error = (out.double().cpu() - want[:, :, :length]).abs().max().item()
        assert error < 2e-4, f"after {length} tokens: max abs error {error:.2e}"


def test_generated_decode_checks_its_inputs(tmp_path):
    from spattn.compiler.codegen import compile_module
    from spattn.runtime.triton_backend import import_module_file

    module = import_module_file(compile_module(TRITON_CASES["longnet"], tmp_path))
    q, k, v = _inputs(1, 2, 1, 8, 16, dtype=torch.float32)
    with pytest.raises(InputError, match="positions must be"):
        module.decode_attention(q[:, :, 7:], k, v, torch.arange(5), 7)
    bidirectional = spattn.load_pattern("bigbird")
    module = import_module_file(compile_module(bidirectional, tmp_path))
    with pytest.raises(InputError, match="not causal"):
        module.decode_attention(q[:, :, 7:], k, v, torch.arange(8), 7)


# ---- errors ----------------------------------------------------------------------------------


def test_bidirectional_patterns_cannot_be_decoded():
    with pytest.raises(spattn.SpattnError, match="'bigbird' is not causal"):
        spattn.KVCache("bigbird")


def test_later_calls_must_match_the_first():
    cache = spattn.KVCache(LONGNET_256)
    q, k, v = _inputs(1, 4, 2, 3, 8)
    cache.attend(q, k, v)
    with pytest.raises(InputError, match="decodes heads = 4"):
        cache.attend(q[:, :2], k, v)
    with pytest.raises(InputError, match="decodes dtype = torch.float64"):
        cache.attend(q.float(), k.float(), v.float())
    with pytest.raises(InputError, match="must be 4-D"):
        cache.attend(q[0], k, v)
    cache.reset()
    assert cache.seen == cache.kept == 0
    out = cache.attend(q, k, v)  # a new sequence of the same shapes
    torch.testing.assert_close(out, spattn.attention(q, k, v, LONGNET_256))


def test_bound_needs_the_heads_and_the_bytes_need_a_call():
    cache = spattn.KVCache("longnet-lm")
    with pytest.raises(spattn.SpattnError, match="number of heads"):
        _ = cache.bound
    with pytest.raises(spattn.SpattnError, match="call attend first"):
        cache.bound_bytes()


def test_an_unavailable_backend_says_why(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU runs the triton backend")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cache = spattn.KVCache(LONGNET_256, backend="triton")
    q, k, v = _inputs(1, 2, 2, 3, 8, dtype=torch.float32)
    with pytest.raises(BackendError, match="need a CUDA device"):
        cache.attend(q, k, v)


def test_long_chunks_are_split_by_the_budget(monkeypatch):
    from spattn.runtime import cached

    monkeypatch.setattr(cached, "WEIGHT_BUDGET", 5000)  # a query or two per chunk
    q, k, v = _inputs(2, 4, 2, 200, 8)
    full = spattn.attention(q, k, v, LONGNET_256)
    cache = spattn.KVCache(LONGNET_256)
    for length, out in _decode(cache, q, k, v, [7, 150, 43]):
        torch.testing.assert_close(out, full[:, :, :length], rtol=1e-12, atol=1e-12)


def test_buffers_are_reused_with_lazy_eviction(monkeypatch):
    """Keys go into preallocated buffers: no new allocation per token, compactions only when
    the buffer is full (once per `bound` tokens or so), never more than twice the bound."""
    pattern = spattn.Pattern.model_validate({"name": "w", "causal": True,
                                             "branches": [{"window": {"size": 16}}]})
    q, k, v = _inputs(1, 2, 1, 400, 8)
    cache = spattn.KVCache(pattern, backend="torch")
    compactions = []
    compact = cache._compact
    monkeypatch.setattr(cache, "_compact", lambda: (compactions.append(cache.seen), compact()))
    buffers = set()
    out = None
    for _, joined in _decode(cache, q, k, v, [20, 1]):
        out = joined
        buffers.add(cache._keys.data_ptr())
        assert cache.capacity <= 2 * cache.bound
        assert cache.memory_bytes <= cache.bound_bytes()
    want = reference_attention(q, k, v, pattern)
    assert torch.allclose(out, want, atol=1e-10)
    assert len(buffers) <= 2  # the prompt's buffer, then one of twice the bound
    assert 0 < len(compactions) <= 400 // cache.bound + 1
