"""`spattn.attention`: check the call, pick a backend, run it.

Each backend says why it cannot take a call (xformers-style); an explicitly requested backend
that cannot run raises with its reasons and never falls back silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from spattn.errors import SpattnError
from spattn.patterns.geometry import resolve
from spattn.patterns.loader import load_pattern
from spattn.patterns.spec import Pattern
from spattn.runtime import torch_backend

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class InputError(SpattnError, ValueError):
    """Tensors or arguments that do not fit the call."""


class BackendError(SpattnError, RuntimeError):
    """A backend that was asked for and cannot run the call."""


@dataclass(frozen=True)
class Call:
    batch: int
    heads: int
    kv_heads: int
    seq_len: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    needs_grad: bool


class TorchBackend:
    """Strided views + torch's fused attention with LSE + log-sum-exp merge. Runs anywhere."""

    name = "torch"

    def why_not(self, call: Call) -> str | None:
        if call.dtype not in DTYPES:
            return f"dtype {call.dtype} is not one of float32, float64, bfloat16, float16"
        return None

    def run(self, q, k, v, pattern: Pattern, scale: float, call: Call) -> torch.Tensor:
        problem = torch_backend.Problem(
            branches=resolve(pattern, call.seq_len, call.heads), seq_len=call.seq_len,
            heads=call.heads, kv_heads=call.kv_heads, causal=pattern.causal,
            union=pattern.overlap == "union", scale=scale)
        return torch_backend.run(q, k, v, problem)


BACKENDS = {b.name: b for b in (TorchBackend(),)}


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern) -> Call:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise InputError(f"{name} must be 4-D (batch, heads, seq_len, head_dim), "
                             f"got shape {tuple(t.shape)}")
    b, h, n, d = q.shape
    if k.shape != v.shape:
        raise InputError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    hkv = k.shape[1]
    if (k.shape[0], k.shape[2], k.shape[3]) != (b, n, d):
        raise InputError(f"k and v must be (B={b}, Hkv, N={n}, D={d}) to match q "
                         f"{tuple(q.shape)}, got {tuple(k.shape)}")
    if hkv == 0 or h % hkv:
        raise InputError(f"q's heads ({h}) must be a multiple of k/v's heads ({hkv})")
    if not (q.dtype == k.dtype == v.dtype):
        raise InputError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise InputError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    for field, expected, got in (("heads", pattern.heads, h), ("kv_heads", pattern.kv_heads, hkv),
                                 ("head_dim", pattern.head_dim, d)):
        if expected is not None and expected != got:
            raise InputError(f"pattern '{pattern.name}' fixes {field} = {expected}, "
                             f"but the tensors have {got}")
    required = pattern.required_heads()
    if required is not None and required != h:
        raise InputError(f"pattern '{pattern.name}' has per-head offsets for {required} heads, "
                         f"but q has {h}")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return Call(b, h, hkv, n, d, q.dtype, q.device, needs_grad)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern | str, *,
              backend: str | None = None, scale: float | None = None) -> torch.Tensor:
    """Sparse attention of q (B, H, N, D) over k, v (B, Hkv, N, D) by `pattern`.

    `pattern` is a Pattern, a built-in name or a YAML path. `scale` defaults to the pattern's
    softmax_scale, else 1/sqrt(D). Returns (B, H, N, D) in q's dtype, differentiable in q, k, v.
    """
    if not isinstance(pattern, Pattern):
        pattern = load_pattern(pattern)
    call = _check(q, k, v, pattern)
    if scale is None:
        scale = pattern.softmax_scale or 1.0 / math.sqrt(call.head_dim)
    if backend is not None:
        if backend not in BACKENDS:
            raise BackendError(f"unknown backend '{backend}'; available: {', '.join(BACKENDS)}")
        chosen = BACKENDS[backend]
        reason = chosen.why_not(call)
        if reason:
            raise BackendError(f"backend '{backend}' cannot run this call: {reason}")
    else:
        reasons = {name: b.why_not(call) for name, b in BACKENDS.items()}
        usable = [name for name, reason in reasons.items() if reason is None]
        if not usable:
            raise BackendError("no backend can run this call: " +
                               "; ".join(f"{n}: {r}" for n, r in reasons.items()))
        chosen = BACKENDS[usable[0]]
    if call.seq_len == 0:
        return q.new_zeros(q.shape).requires_grad_(call.needs_grad)
    return chosen.run(q, k, v, pattern, float(scale), call)
