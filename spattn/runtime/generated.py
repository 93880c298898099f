"""What generated modules call at run time: input checks, head offsets, global-token tables,
block sizes and the autograd Function. Generated code imports only torch, triton and this
module."""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import lru_cache

import torch

from spattn.patterns.geometry import head_offsets as _offsets
from spattn.runtime.dispatch import InputError, check_fixed, check_tensors


def check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: dict
          ) -> tuple[int, int, int, int, int]:
    """(B, H, N, D, Hkv) after the same checks as spattn.attention, against the pattern's
    fixed heads / kv_heads / head_dim."""
    call = check_tensors(q, k, v)
    check_fixed(call, pattern["name"], pattern.get("heads"), pattern.get("kv_heads"),
                pattern.get("head_dim"), pattern.get("offsets_heads"))
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise InputError(f"the generated kernels take float32, float16 or bfloat16, got {q.dtype}")
    return call.batch, call.heads, call.seq_len, call.head_dim, call.kv_heads


def rows_contiguous(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Kernels index rows with strides but need each row's D elements contiguous, and k and v
    with the same strides. Row offsets (row * row stride) are 32-bit in the kernels, so a layout
    whose rows are too far apart for that (e.g. (B, N, H, D) transposed, past ~2M tokens) is
    made contiguous, where the row stride is D."""
    q, k, v = tensors
    n = q.shape[2]
    if q.stride(-1) != 1 or q.stride(2) * n >= 2**31:
        q = q.contiguous()
    if k.stride() != v.stride() or k.stride(-1) != 1 or k.stride(2) * n >= 2**31:
        k, v = k.contiguous(), v.contiguous()
    return q, k, v


def block_sizes(device: torch.device) -> tuple[int, int]:
    """Tile sizes (BLOCK_M, BLOCK_N): small under the CPU interpreter, where tiles are numpy."""
    if device.type == "cpu" or os.environ.get("TRITON_INTERPRET") == "1":
        return 16, 16
    return 64, 64


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs keep float32 products ("ieee"; TF32 would lose about 3 digits); half
    precision inputs ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


class GeneratedAttention(torch.autograd.Function):
    """A generated module's forward and backward kernels as one differentiable op. The forward
    keeps only O and the merged LSE for the backward."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                kernels: tuple[Callable, Callable]) -> torch.Tensor:
        forward, backward = kernels
        out, lse = forward(q, k, v, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.backward = scale, backward
        return out

    @staticmethod
    def backward(ctx, d_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.backward(d_out, q, k, v, out, lse, scale=ctx.scale)
        return dq, dk, dv, None, None


@lru_cache(maxsize=256)
def _offsets_cached(offsets: tuple[int, ...] | None, mode: str, dilation: int, heads: int,
                    device: str) -> torch.Tensor:
    values = offsets if offsets is not None else _offsets(mode, dilation, heads)
    return torch.tensor(values, dtype=torch.int32, device=device)


def head_offsets(offsets: list[int] | None, mode: str, dilation: int, heads: int,
                 device: torch.device) -> torch.Tensor:
    """Per-head offsets s_h as an int32 tensor (explicit, or by the pattern's head_offsets)."""
    fixed = tuple(offsets) if offsets is not None else None
    return _offsets_cached(fixed, mode, dilation, heads, str(device))


@lru_cache(maxsize=64)
def _tokens_cached(tokens: tuple[int, ...], n: int, device: str
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    kept = sorted({t for t in tokens if t < n})
    is_global = torch.zeros(n, dtype=torch.int8, device=device)
    index = torch.tensor(kept, dtype=torch.int64, device=device)
    is_global[index] = 1
    return index.to(torch.int32), is_global


# a branch as the union tables need it: (dilation or None, explicit offsets or None, global tokens)
_Branch = tuple[int | None, tuple[int, ...] | None, tuple[int, ...]]


@lru_cache(maxsize=64)
def _union_cached(branches: tuple[_Branch, ...], mode: str, heads: int, n: int, device: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.zeros((len(branches), heads), dtype=torch.int32)
    flags = torch.zeros((len(branches), max(n, 1)), dtype=torch.int8)
    for i, (dilation, explicit, tokens) in enumerate(branches):
        if dilation is not None:
            offsets[i] = torch.tensor(explicit or _offsets(mode, dilation, heads))
        flags[i, [t for t in tokens if t < n]] = 1
    return offsets.to(device), flags.to(device)


def union_tables(pattern: dict, heads: int, n: int, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """For overlap: union: every branch's per-head offsets (branches, H) int32 and global-token
    flags (branches, N) int8, which the kernels read to skip pairs earlier branches give."""
    branches = tuple((b.get("dilation"), tuple(b["offsets"]) if b.get("offsets") else None,
                      tuple(b.get("tokens", ()))) for b in pattern["branches"])
    return _union_cached(branches, pattern["head_offsets"], heads, n, str(device))


def global_tokens(tokens: list[int], n: int, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The global tokens below N (sorted, int32) and an int8 flag per position."""
    return _tokens_cached(tuple(tokens), n, str(device))
