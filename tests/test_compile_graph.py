"""spattn.attention inside torch.compile(fullgraph=True): one graph, same numbers as eager."""

from __future__ import annotations

import pytest
import torch

import spattn

PATTERN = spattn.Pattern.model_validate({
    "name": "compiled", "causal": True,
    "branches": [{"segment": 16, "dilation": 1}, {"segment": 64, "dilation": 4},
                 {"window": {"size": 12}}, {"global": {"tokens": [0]}}]})


def _layer(x: torch.Tensor, weight: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    b, n, e = x.shape
    q, k, v = (x @ weight).view(b, n, 3, 4, e // 4).permute(2, 0, 3, 1, 4)
    y = spattn.attention(q, k, v, PATTERN, backend=backend)
    return torch.tanh(y.transpose(1, 2).reshape(b, n, e))


@pytest.mark.parametrize("compiler,attention", [
    ("aot_eager", "torch"), ("inductor", "torch"),
    ("aot_eager", "triton"),  # generated kernels: on CPU, the Triton interpreter (conftest.py)
])
def test_fullgraph_compile_matches_eager_forward_and_backward(compiler, attention, monkeypatch,
                                                              tmp_path):
    monkeypatch.setenv("SPATTN_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 70, 32, generator=gen, requires_grad=True)
    weight = torch.randn(32, 96, generator=gen, requires_grad=True)
    compiled = torch.compile(_layer, fullgraph=True, backend=compiler)
    got = compiled(x, weight, attention)
    want = _layer(x, weight, attention)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grad = torch.randn(got.shape, generator=gen)
    got_grads = torch.autograd.grad(got, (x, weight), grad)
    want_grads = torch.autograd.grad(want, (x, weight), grad)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_ops_are_registered_with_fake_implementations():
    q = torch.empty(1, 2, 10, 8, device="meta")
    key = spattn.runtime.ops.register(PATTERN)
    out, lse = torch.ops.spattn.attention_forward(q, q, q, None, key, 0.5, "triton")
    assert out.shape == q.shape and lse.shape == (1, 2, 10) and out.device.type == "meta"


@pytest.mark.parametrize("dynamic", [None, True])
@pytest.mark.parametrize("by_name", [False, True])
@pytest.mark.parametrize("attention", ["torch", "triton"])
def test_fullgraph_compile_over_changing_lengths(dynamic, by_name, attention, monkeypatch,
                                                 tmp_path):
    """Training with a new sequence length every step (automatic dynamic shapes make N
    symbolic from the second length; dynamic=True from the first), the pattern given as an
    object or by name: one graph each time, equal to the float64 reference, forward and
    backward."""
    from reference import reference_attention

    monkeypatch.setenv("SPATTN_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    name = "longnet-lm"
    pattern = spattn.load_pattern(name)

    def step(q, k, v):
        return spattn.attention(q, k, v, name if by_name else pattern, backend=attention)

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    gen = torch.Generator().manual_seed(1)
    lengths = (40, 57, 33) if attention == "torch" else (24, 37)
    for n in lengths:
        q = torch.randn(2, 4, n, 16, generator=gen, requires_grad=True)
        k, v = (torch.randn(2, 2, n, 16, generator=gen, requires_grad=True) for _ in range(2))
        got = compiled(q, k, v)
        leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
        want = reference_attention(*leaves, pattern)
        torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=2e-4)
        grad = torch.randn(got.shape, generator=gen)
        for g, w in zip(torch.autograd.grad(got, (q, k, v), grad),
                        torch.autograd.grad(want, leaves, grad.double()), strict=True):
            torch.testing.assert_close(g.double(), w, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_fullgraph_short_queries_run_the_decoding_op(compiler, monkeypatch, tmp_path):
    """Queries shorter than the keys, without gradients: the compiled call runs the decoding
    path (spattn::decode_forward), not a full forward over zero-padded queries, and equals
    eager, over several lengths."""
    from spattn.runtime import cached, torch_backend

    monkeypatch.setenv("SPATTN_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    calls = {"decode": 0, "full": 0}
    for module, name, kind in ((cached, "attend_cached", "decode"),
                               (torch_backend, "forward", "full")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _r=real, _k=kind, **kw: (
            calls.__setitem__(_k, calls[_k] + 1), _r(*a, **kw))[1])

    def step(q, k, v):
        return spattn.attention(q, k, v, PATTERN, backend="torch") * 2

    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    gen = torch.Generator().manual_seed(2)
    for nq, n in ((1, 70), (3, 70), (1, 95)):
        q = torch.randn(2, 4, nq, 8, generator=gen)
        k, v = (torch.randn(2, 2, n, 8, generator=gen) for _ in range(2))
        with torch.no_grad():
            want = step(q, k, v)
            calls.update(decode=0, full=0)
            got = compiled(q, k, v)
        assert calls == {"decode": 1, "full": 0}
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_fullgraph_kv_cache_decoding(compiler, monkeypatch, tmp_path):
    """KVCache.attend inside a compiled step (one opaque op per call): prompt and tokens give
    what an eager cache gives."""
    monkeypatch.setenv("SPATTN_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(3)
    n, prompt = 60, 25
    q = torch.randn(1, 4, n, 8, generator=gen)
    k, v = (torch.randn(1, 2, n, 8, generator=gen) for _ in range(2))

    def step(cache, q, k, v):
        return torch.tanh(cache.attend(q, k, v)) + 1

    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    eager, graphed = spattn.KVCache(PATTERN), spattn.KVCache(PATTERN)
    for lo, hi in [(0, prompt), *((i, i + 1) for i in range(prompt, n))]:
        args = (q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi])
        torch.testing.assert_close(compiled(graphed, *args), step(eager, *args), rtol=1e-6,
                                   atol=1e-6)
    assert graphed.seen == eager.seen == n and graphed.kept == eager.kept
