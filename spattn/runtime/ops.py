"""The backends as `torch.library` custom ops, so that `torch.compile(fullgraph=True)` traces a
model through `spattn.attention` without breaking the graph.

    spattn::attention_forward(q, k, v, sinks, key, scale, backend) -> (O, LSE)
    spattn::attention_backward(dO, q, k, v, sinks, O, LSE, key, scale, backend)
        -> (dQ, dK, dV, dSinks)
    spattn::decode_forward(q, k, v, sinks, key, scale, backend) -> O

`key` names a pattern registered by `register` (its content hash): ops take strings, not objects.
`backend` is "torch" (strided views + fused attention, runtime/torch_backend.py) or "triton" (the
pattern's generated module). Both ops have fake (meta) implementations for tracing; autograd
links them. `decode_forward` is the inference path of a few queries at the end of the keys
(runtime/cached.py), so that a traced decoding call runs it rather than a full forward.

Each op's body runs under `torch.cuda.device(q.device)` (kernels.on_device): Triton launches on
the current device, which need not be the tensors'.

Attention sinks (`sinks`, (H,), or None) are one more term of the log-sum-exp merge: a logit
t_h with no value. They join the backend's (O, LSE) after its kernels, so every backend serves
them, and the backward needs nothing new: with the merged O and LSE, P = exp(S - LSE) and
rowsum(dO * O) already account for the sink, and dt_h = -sum_p exp(t_h - LSE_p) rowsum(dO * O)_p.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache

import torch

from spattn.patterns.geometry import resolve
from spattn.patterns.spec import Pattern
from spattn.runtime import costs, nonfinite, torch_backend, triton_backend
from spattn.runtime.kernels import on_device

_PATTERNS: dict[str, Pattern] = {}


_KEYS: OrderedDict[int, tuple[Pattern, str]] = OrderedDict()  # id -> (the pattern, its key)


def problem_of(pattern: Pattern, q: torch.Tensor, k: torch.Tensor, scale: float
               ) -> torch_backend.Problem:
    """The PyTorch backend's Problem of a call of `pattern` on q, k."""
    return _problem(register(pattern), q, k, scale)


def register(pattern: Pattern) -> str:
    """Remember `pattern` under its content hash, the key the ops take. The hash of a pattern
    object is kept (its last 64): every call asks, and hashing costs about a millisecond."""
    known = _KEYS.get(id(pattern))
    if known is not None and known[0] is pattern:  # the entry holds the object: ids stay its
        _KEYS.move_to_end(id(pattern))
        return known[1]
    key = pattern.content_hash()
    _PATTERNS.setdefault(key, pattern)
    _KEYS[id(pattern)] = (pattern, key)
    if len(_KEYS) > 64:
        _KEYS.popitem(last=False)
    return key


def _problem(key: str, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch_backend.Problem:
    return _problem_of(key, q.shape[1], k.shape[1], q.shape[2], scale)


@lru_cache(maxsize=256)
def _problem_of(key: str, heads: int, kv_heads: int, n: int, scale: float
                ) -> torch_backend.Problem:
    """One Problem object per call shape: the plan's and the masks' caches then find it by
    identity instead of comparing every branch's geometry (hundreds of microseconds a call)."""
    pattern = _PATTERNS[key]
    return torch_backend.Problem(
        branches=resolve(pattern, n, heads), seq_len=n, heads=heads, kv_heads=kv_heads,
        causal=pattern.causal, union=pattern.overlap == "union", scale=scale)


def dense_causality(key: str, heads: int, kv_heads: int, n: int, head_dim: int,
                    scale: float) -> bool | None:
    """Whether a call of this shape is plain dense attention (every pair once: a dense or causal
    pattern, a window wider than the sequence), and then whether causal; else None. Such a
    call is exactly `scaled_dot_product_attention`, and runs as it."""
    return _dense_causality(key, heads, kv_heads, n, head_dim, scale, costs.current())


@lru_cache(maxsize=256)
def _dense_causality(key: str, heads: int, kv_heads: int, n: int, head_dim: int, scale: float,
                     model: costs.CostModel) -> bool | None:
    """dense_causality, once per call shape and cost model (it resolves the pattern)."""
    problem = _problem_of(key, heads, kv_heads, n, scale)
    dense = torch_backend._dense(torch_backend.plan(problem, head_dim, model), problem)
    return None if dense is None else dense.pieces[0].causal


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, LSE) of every branch merged with head h's sink logit sinks[h] (no value)."""
    sink = sinks.to(lse.dtype).view(1, -1, 1)
    merged = torch.logaddexp(lse, sink)
    weight = torch.exp(lse - merged)  # 0 where a row has no key (lse = -inf)
    return (out.to(lse.dtype) * weight.unsqueeze(-1)).to(out.dtype), merged


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None,
             key: str, scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, LSE) of a registered pattern on `backend`: the forward op's body."""
    problem = _problem(key, q, k, scale)

    def run(q, k, v):
        if backend == "triton":
            return triton_backend.compiled_module(_PATTERNS[key]).attention_with_lse(
                q, k, v, scale=scale)
        return torch_backend.forward(q, k, v, problem)

    with on_device(q.device):
        out, lse = nonfinite.guard_forward(run, reach(problem, q), q, k, v)
        if sinks is not None:
            out, lse = merge_sinks(out, lse, sinks)
    return out, lse


def _indicators(problem: torch_backend.Problem, q: torch.Tensor, dim: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero queries (B, H, N, dim) and keys (B, Hkv, N, dim) in float32 on q's device."""
    b, h, n = q.shape[:3]
    zeros = torch.zeros(b, h, n, dim, device=q.device)
    return zeros, zeros.new_zeros(b, problem.kv_heads, n, dim)


def reach(problem: torch_backend.Problem, q: torch.Tensor) -> nonfinite.Reach:
    """Which rows attend a bad key, and which have a key at all (nonfinite.guard_forward)."""
    def reach(bad_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zq, zk = _indicators(problem, q, 2)
        out, _ = torch_backend.forward(zq, zk, nonfinite.indicator_values(bad_keys), problem)
        return nonfinite.read_reach(out)

    return reach


def attended(problem: torch_backend.Problem, q: torch.Tensor
             ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The keys (B, Hkv, N) that some of the given rows (B, H, N) attend: dV of an all-zero
    call whose dO is 1 on those rows is P^T dO > 0 exactly there."""
    def attended(rows: torch.Tensor) -> torch.Tensor:
        zq, zk = _indicators(problem, q, 1)
        zero_out, lse = torch_backend.forward(zq, zk, zk, problem)
        _, _, dv = torch_backend.backward(rows.to(torch.float32).unsqueeze(-1), zq, zk, zk,
                                          zero_out, lse, problem)
        return dv[..., 0] > 0

    return attended


@torch.library.custom_op("spattn::attention_forward", mutates_args=())
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      sinks: torch.Tensor | None, key: str, scale: float, backend: str
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, sinks, key, scale, backend)


@attention_forward.register_fake
def _(q, k, v, sinks, key, scale, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        q.shape[:3], dtype=_lse_dtype(q.dtype))


@torch.library.custom_op("spattn::attention_backward", mutates_args=())
def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       sinks: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor, key: str,
                       scale: float, backend: str
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    problem = _problem(key, q, k, scale)

    def run(do, q, k, v, out, lse):
        if backend == "triton":
            return triton_backend.compiled_module(_PATTERNS[key]).attention_backward(
                do, q, k, v, out, lse, scale=scale)
        return torch_backend.backward(do.contiguous(), q, k, v, out, lse, problem)

    with on_device(q.device):
        dq, dk, dv = nonfinite.guard_backward(run, reach(problem, q), attended(problem, q), do,
                                              q, k, v, out, lse)
        if sinks is None:
            return dq, dk, dv, do.new_empty(0)
        delta = (do.to(lse.dtype) * out.to(lse.dtype)).sum(-1)  # rowsum(dO * O), (B, H, N)
        share = torch.exp(sinks.to(lse.dtype).view(1, -1, 1) - lse)  # the sink's weight
        return dq, dk, dv, -(share * delta).sum((0, 2)).to(sinks.dtype)


@attention_backward.register_fake
def _(do, q, k, v, sinks, out, lse, key, scale, backend):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format),
            do.new_empty(0) if sinks is None else torch.empty_like(sinks))


def _setup_context(ctx, inputs, output):
    q, k, v, sinks, key, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, sinks, out, lse)
    ctx.key, ctx.scale, ctx.backend = key, scale, backend


def _backward(ctx, d_out, d_lse):
    # LSE never leaves spattn.attention, so nothing flows into it (d_lse is unused)
    q, k, v, sinks, out, lse = ctx.saved_tensors
    dq, dk, dv, dsinks = attention_backward(d_out, q, k, v, sinks, out, lse, ctx.key, ctx.scale,
                                            ctx.backend)
    return dq, dk, dv, None if sinks is None else dsinks, None, None, None


attention_forward.register_autograd(_backward, setup_context=_setup_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key: str, scale: float,
              backend: str, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """The differentiable output of `backend` for a registered pattern. A call that needs no
    gradient, outside torch.compile, runs the op's body directly: the custom op's dispatch and
    autograd wrapping cost a few hundred microseconds a call and would add nothing."""
    if not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, sinks))):
        return _forward(q, k, v, sinks, key, scale, backend)[0]
    return attention_forward(q, k, v, sinks, key, scale, backend)[0]


@torch.library.custom_op("spattn::decode_forward", mutates_args=())
def decode_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   sinks: torch.Tensor | None, key: str, scale: float, backend: str
                   ) -> torch.Tensor:
    """The last Nq positions' rows of a causal pattern over N keys, without gradients: the
    decoding path (runtime/cached.py) as one op, so that torch.compile traces it."""
    from spattn.runtime.cached import decode  # (it imports what imports this)

    n = k.shape[2]
    positions = torch.arange(n, device=q.device)
    return decode(q, k, v, positions, n - q.shape[2], _PATTERNS[key], scale, sinks,
                  backend).contiguous()


@decode_forward.register_fake
def _(q, k, v, sinks, key, scale, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
