"""Non-finite inputs reach exactly the rows that attend them (docs/semantics.md): a NaN or inf in
q, k or v makes NaN every output row and gradient whose allowed pairs include it, and no other.

The expected NaN positions come from the float64 reference's pair counts (tests/reference.py),
not from any backend: row i is NaN iff it has a key and its q is bad, or it attends a bad key;
dQ is NaN on those rows (and on rows with a key whose dO is bad), dK and dV on every key those
rows attend."""

from __future__ import annotations

import pytest
import torch
from generated_cases import INTERPRETED, scaled
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import pair_counts
from test_attention import problems

import spattn
from spattn.patterns.loader import load_pattern_text

NAN, INF = float("nan"), float("inf")


def _bad_rows(x: torch.Tensor) -> torch.Tensor:
    return ~torch.isfinite(x).all(-1)


def expected(pattern, q, k, v, do):
    """(out, dq, dk, dv) bool masks of where NaN must be, from the reference's pair counts."""
    b, h, n, _ = q.shape
    group = h // k.shape[1]
    allowed = pair_counts(pattern, n, h) > 0  # (H, N, N)
    has_key = allowed.any(-1)[None]  # (1, H, N)
    bad_kv = (_bad_rows(k) | _bad_rows(v)).repeat_interleave(group, 1)  # (B, H, N)
    attends_bad = (allowed[None] & bad_kv[:, :, None, :]).any(-1)
    out = attends_bad | (has_key & _bad_rows(q))
    rows = out | (has_key & _bad_rows(do))
    reached = (allowed[None] & rows[:, :, :, None]).any(2)  # (B, H, N) keys of the bad rows
    keys = reached.view(b, k.shape[1], group, n).any(2)
    return out, rows, keys, keys


def _poison(gen: torch.Generator, x: torch.Tensor, count: int, value: float) -> None:
    """Put `value` at `count` random elements of x (in place)."""
    for _ in range(count):
        at = tuple(int(torch.randint(0, s, (1,), generator=gen)) for s in x.shape)
        x[at] = value


def check(pattern, shape, backend: str, dtype: torch.dtype, seed: int, where: str,
          value: float = NAN) -> None:
    batch, heads, kv_heads, n, dim = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n, dim, generator=gen)
    k, v, do = (torch.randn(batch, hh, n, dim, generator=gen)
                for hh in (kv_heads, kv_heads, heads))
    for name, x in (("q", q), ("k", k), ("v", v), ("do", do)):
        if name in where:
            _poison(gen, x, 2, value)
    leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    out = spattn.attention(*leaves, pattern, backend=backend)
    out.backward(do.to(dtype))
    got = [_bad_rows(t) for t in (out, *(x.grad for x in leaves))]
    want = expected(pattern, q, k, v, do)
    for label, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert torch.equal(g, w), (f"{label}: NaN rows {g.nonzero().tolist()}, expected "
                                   f"{w.nonzero().tolist()}")
    finite = [t for t, w in zip((out, *(x.grad for x in leaves)), want, strict=True)]
    for t, w in zip(finite, want, strict=True):  # no inf either where the rows are clean
        assert torch.isfinite(t[~w]).all()


WHERE = ("q", "k", "v", "do", "qkv")


@pytest.mark.parametrize("where", WHERE)
@given(case=problems(max_n=24), seed=st.integers(0, 2**16))
@settings(INTERPRETED, max_examples=50)
def test_torch_backend_nan_reaches_exactly_its_rows(case, seed, where) -> None:
    pattern, shape = case
    check(pattern, shape, "torch", torch.float64, seed, where)


@pytest.mark.parametrize("value", [INF, -INF])
def test_inf_inputs_count_as_non_finite(value) -> None:
    pattern = load_pattern_text("name: w\ncausal: true\nbranches:\n  - {window: {size: 5}}\n"
                                "  - {segment: 8, dilation: 2}\n")
    for where in ("q", "k", "v"):
        check(pattern, (1, 2, 1, 30, 8), "torch", torch.float32, 3, where, value)


def test_issue_window_case() -> None:
    """A causal window of 5 at N=2048, one NaN in k: exactly rows 100-104 of that head."""
    pattern = load_pattern_text("name: w\ncausal: true\nbranches:\n  - {window: {size: 5}}\n")
    q, k, v = (torch.randn(1, 2, 2048, 16) for _ in range(3))
    k[0, 0, 100, 3] = NAN
    rows = _bad_rows(spattn.attention(q, k, v, pattern))
    assert rows[0, 0].nonzero().flatten().tolist() == [100, 101, 102, 103, 104]
    assert not rows[0, 1].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_and_dense_calls(dtype) -> None:
    """The dense shortcut (torch's own SDPA call) too: SDPA itself drops a NaN query row at
    some small sizes."""
    for name in ("dense-causal", "longnet-lm"):
        pattern = scaled(name, 512) if name == "longnet-lm" else spattn.load_pattern(name)
        for where in ("q", "k", "v"):
            check(pattern, (1, 2, 2, 8 if name == "dense-causal" else 40, 16), "torch", dtype,
                  5, where)


def test_row_no_branch_gives_is_zero_whatever_its_q() -> None:
    pattern = load_pattern_text("name: w\nbranches:\n  - {window: {size: 3}, heads: [0]}\n")
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    q[0, 1, 10, 0] = NAN
    out = spattn.attention(q, k, v, pattern)
    assert torch.equal(out[0, 1], torch.zeros(16, 8))


def test_nan_in_padding_and_other_sequences_never_reaches_a_real_row() -> None:
    pattern = spattn.load_pattern("dense-causal")
    q, k, v = (torch.randn(2, 2, 12, 8) for _ in range(3))
    k[:, :, 4] = NAN  # the first packed sequence's last token
    out = spattn.attention(q, k, v, pattern, seq_lens=[5, 7])
    assert _bad_rows(out)[:, :, 4].all() and not _bad_rows(out)[:, :, 5:].any()
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[:, 9:] = True
    q, k, v = (torch.randn(2, 2, 12, 8) for _ in range(3))
    for x in (q, k, v):
        x[:, :, 9:] = NAN
    out = spattn.attention(q, k, v, pattern, key_padding_mask=padding)
    assert torch.isfinite(out[:, :, :9]).all()


@pytest.mark.parametrize("where", ["q", "k", "v", "do"])
def test_generated_kernels_nan_reaches_exactly_its_rows(where) -> None:
    """The Triton backend (interpreter on CPU): dense-causal at N=8 (the issue's case), and a
    scaled longnet-lm with a window and a global token, causal and not."""
    mixed = load_pattern_text("name: m\nbranches:\n  - {segment: 8, dilation: 2}\n"
                              "  - {window: {size: 4}}\n  - {global: {tokens: [0]}}\n")
    for pattern, shape in ((spattn.load_pattern("dense-causal"), (1, 1, 1, 8, 16)),
                           (scaled("longnet-lm", 1024), (1, 2, 1, 40, 16)),
                           (mixed, (1, 2, 2, 24, 16))):
        check(pattern, shape, "triton", torch.float32, 11, where)


def test_decoding_nan_reaches_exactly_its_rows() -> None:
    """Short queries against a long sequence and the KV cache: the decoding paths."""
    pattern = scaled("longnet-lm", 512)
    n = 48
    q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
    v[0, 0, 7, 2] = NAN
    full = spattn.attention(q, k, v, pattern)
    last = spattn.attention(q[:, :, -3:], k, v, pattern)
    assert torch.equal(_bad_rows(last), _bad_rows(full)[:, :, -3:])
    cache = spattn.KVCache(pattern)
    steps = torch.cat([cache.attend(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1])
                       for i in range(n)], 2)
    assert torch.equal(_bad_rows(steps), _bad_rows(full))
    assert _bad_rows(full)[0, 0, 7] and not _bad_rows(full)[0, 1].any()


def test_emitted_module_attention_guards_too(tmp_path) -> None:
    """The emitted module's own `attention` (the drop-in for SDPA), forward and backward."""
    from spattn.compiler.codegen import compile_module
    from spattn.runtime.triton_backend import import_module_file

    pattern = scaled("longnet-lm", 1024)
    module = import_module_file(compile_module(pattern, tmp_path))
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=gen) for _ in range(3))
    k[0, 0, 5, 1] = NAN
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = module.attention(*leaves)
    do = torch.randn(out.shape, generator=gen)
    out.backward(do)
    want = expected(pattern, q, k, v, do)
    for g, w in zip((out, *(x.grad for x in leaves)), want, strict=True):
        assert torch.equal(_bad_rows(g), w)
