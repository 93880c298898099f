"""Batched dense attention that also returns the log-sum-exp, and its backward given a merged
(O, LSE).

Which kernel runs a call (`kernel_for`):

- CPU: torch's fused flash-attention kernel (`_scaled_dot_product_flash_attention_for_cpu` and its
  backward), which never builds the score matrix;
- CUDA: torch's fused kernels that return the LSE, `_scaled_dot_product_flash_attention` (fp16 and
  bf16, no mask, D % 8 == 0, D <= 256, sm80+) else `_scaled_dot_product_efficient_attention`
  (fp16, bf16, fp32, an additive mask, D a multiple of 16 bytes, D <= 256) and their backwards:
  ops whose schema is the same from torch 2.1 on (`cuda_kernel` says which takes a call);
- anything else (float64 on CUDA, other head dims or devices, a causal call with Mq != Mk, or
  `force_math`): a chunked matmul implementation in float32/float64 with the same contract.

Every kernel's LSE is the natural log-sum-exp of the scaled scores, in float32 (float64 for a
float64 fallback). Rows with no allowed key get O = 0 and LSE = -inf whatever the kernel reports.

The backward is the FlashAttention-2 one with the *merged* O and LSE of all pieces:
P = exp(S - LSE), D = rowsum(dO * O), dS = P * (dO V^T - D). Summed over pieces that is the exact
gradient of the merged output, mixing weights included.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import torch

QUERY_CHUNK = 1024  # rows per matmul chunk in the fallback
MAX_GRID = 65535  # CUDA's grid limit along y and z: the fused kernels' batch and head counts
MAX_FUSED_DIM = 256  # head dims the fused CUDA kernels are built (and here used) for
BIAS_ALIGN = 16  # elements: the efficient kernel reads a bias row in 16-byte vectors
LSE_BLOCK = 32  # the efficient kernel's LSE rows come padded to a multiple of this

# torch's fused CUDA kernels (their schemas are the same from torch 2.1 on)
FLASH_FORWARD = torch.ops.aten._scaled_dot_product_flash_attention.default
FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_backward.default
EFFICIENT_FORWARD = torch.ops.aten._scaled_dot_product_efficient_attention.default
EFFICIENT_BACKWARD = torch.ops.aten._scaled_dot_product_efficient_attention_backward.default


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """`torch.cuda.device(device)` for a CUDA device, else nothing: Triton launches (and
    allocations without a device) go to the current CUDA device, not the tensors' one."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@lru_cache(maxsize=16)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def cuda_kernel(dtype: torch.dtype, head_dim: int, mq: int, mk: int, causal: bool,
                masked: bool, capability: tuple[int, int], backward: bool = False
                ) -> str | None:
    """The fused CUDA kernel that takes a call of `attend` (or `attend_backward`): "flash",
    "efficient", or None (the matmul fallback). `capability` is the device's (major, minor).

    Both kernels take causal only top-left (flash-attn aligns it bottom-right when Mq != Mk),
    so a causal call must be square; flash takes no mask. The backward of head dims over 192
    needs the shared memory of sm80 or sm90 (flash), and over 128 (efficient): a backward may
    run on another kernel than its forward, since it reads only the merged O and LSE."""
    if not (mq and mk) or head_dim > MAX_FUSED_DIM or (causal and mq != mk):
        return None
    big_smem = capability in ((8, 0), (9, 0))
    if dtype in (torch.float16, torch.bfloat16) and not masked and head_dim % 8 == 0 \
            and capability >= (8, 0) and not (backward and head_dim > 192 and not big_smem):
        return "flash"
    if dtype in (torch.float16, torch.bfloat16, torch.float32) and capability >= (5, 0) \
            and head_dim % (16 // dtype.itemsize) == 0 \
            and not (backward and head_dim > 128 and not big_smem):
        return "efficient"
    return None


def kernel_for(q: torch.Tensor, k: torch.Tensor, causal: bool, masked: bool,
               force_math: bool = False, backward: bool = False) -> str | None:
    """What runs a call on q (B, S, Mq, D), k (B, S, Mk, D): "cpu" (torch's fused CPU kernel),
    "flash" or "efficient" (cuda_kernel), or None (the matmul fallback)."""
    if force_math:
        return None
    if q.device.type == "cpu":
        return "cpu"
    if q.device.type != "cuda" or torch.version.hip:  # (ROCm's kernels differ: not used)
        return None
    return cuda_kernel(q.dtype, q.shape[-1], q.shape[2], k.shape[2], causal, masked,
                       _capability(q.device), backward)


def unit_stride_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors with stride 1 along their last dimension (copied only where it is not).

    torch's fused CPU attention reads each row's D elements as if contiguous and silently
    returns wrong values for any other last-dimension stride (x[..., ::2], an unbound trailing
    axis, a transposed (B, H, D, N) key); every other stride (expanded, transposed N and H,
    sliced) it takes as it is.
    """
    return tuple(t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()
                 for t in tensors)


def _additive(allowed: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool mask (S, Mq, Mk) as the additive float mask (1, S, Mq, Mk) the kernels take."""
    if allowed is None:
        return None
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill_(~allowed, float("-inf")).unsqueeze(0)


@dataclass(frozen=True)
class Mask:
    """A bool mask of allowed pairs (S or 1, Mq, Mk) with what the kernels derive from it: the
    additive form the fused kernel takes and the rows with no allowed key. Built once, reused."""

    allowed: torch.Tensor
    bias: torch.Tensor  # (1, S or 1, Mq, Mk): 0 or -inf, in the inputs' dtype
    empty_rows: torch.Tensor  # (1, S or 1, Mq): True where a row has no allowed key
    any_empty: bool  # whether some row has no allowed key (else LSE needs no fix)

    @staticmethod
    def of(allowed: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None = None) -> Mask:
        """The mask of `allowed` pairs, with `bias` (the additive form, 0 or -inf where not
        given: a multiset's log(count) otherwise)."""
        empty = ~allowed.any(-1).unsqueeze(0)
        bias = _additive(allowed, dtype) if bias is None else bias
        if allowed.device.type == "cuda":  # the layout the efficient kernel reads, made once
            bias = aligned_bias(bias)
        return Mask(allowed, bias, empty, bool(empty.any()))

    @staticmethod
    def of_counts(counts: torch.Tensor, dtype: torch.dtype) -> Mask:
        """The mask of pairs counted `counts` times (0: not allowed): log(count) added to each
        score, computed in float32 or float64 (a multiset, or branches sharing their pairs)."""
        bias = counts.to(accum_dtype(dtype)).log().to(dtype)
        return Mask.of(counts > 0, dtype, bias.unsqueeze(0))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.allowed, self.bias,
                                                          self.empty_rows))


def _as_mask(allowed: torch.Tensor | Mask | None, dtype: torch.dtype) -> Mask | None:
    return allowed if allowed is None or isinstance(allowed, Mask) else Mask.of(allowed, dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
           allowed: torch.Tensor | Mask | None, force_math: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, S, Mq, D), k/v (B, S, Mk, D) -> O (B, S, Mq, D), LSE (B, S, Mq) (float32 or 64).

    Rows with no allowed key get O = 0 and LSE = -inf.
    """
    mask = _as_mask(allowed, q.dtype)
    kernel = kernel_for(q, k, causal, mask is not None, force_math)
    if kernel == "cpu":
        q, k, v = unit_stride_rows(q, k, v)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=None if mask is None else mask.bias, scale=scale)
    elif kernel is not None:
        out, lse = _cuda_forward(kernel, q, k, v, scale, causal, mask)
        if mask is not None and mask.any_empty:  # whatever the kernel left there: O = 0
            out = out.masked_fill(mask.empty_rows.unsqueeze(-1), 0.0)
    else:
        out, lse = _math_forward(q, k, v, scale, causal, None if mask is None else mask.allowed)
    if mask is not None and mask.any_empty:  # the fused kernels report LSE = 0 (or NaN) there
        lse = lse.masked_fill(mask.empty_rows, float("-inf"))
    return out, lse


def attend_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    out: torch.Tensor, lse: torch.Tensor, scale: float, causal: bool,
                    allowed: torch.Tensor | Mask | None, force_math: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ, dK, dV of one piece, from the merged output `out` and merged `lse` of its rows."""
    # a row no piece gave any key has LSE = -inf; +inf makes its P = exp(S - LSE) exactly 0
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    mask = _as_mask(allowed, q.dtype)
    kernel = kernel_for(q, k, causal, mask is not None, force_math, backward=True)
    if kernel == "cpu":
        do, q, k, v, out = unit_stride_rows(do, q, k, v, out)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, out, lse.contiguous(), 0.0, causal,
            attn_mask=None if mask is None else mask.bias, scale=scale)
    if kernel is not None:
        return _cuda_backward(kernel, do, q, k, v, out, lse, scale, causal, mask)
    return _math_backward(do, q, k, v, out, lse, scale, causal,
                          None if mask is None else mask.allowed)


# ---- torch's fused CUDA kernels ----------------------------------------------------------------


def aligned_bias(bias: torch.Tensor) -> torch.Tensor:
    """An additive mask (1, S or 1, Mq, Mk) as the efficient kernel reads it: rows of unit
    stride starting at 16-byte boundaries (a copy into rows padded to BIAS_ALIGN where not)."""
    strides_ok = all(s % BIAS_ALIGN == 0 for s, n in zip(bias.stride()[:-1], bias.shape[:-1],
                                                          strict=True) if n > 1)
    if bias.stride(-1) == 1 and strides_ok and bias.data_ptr() % 16 == 0:
        return bias
    mk = bias.shape[-1]
    padded = bias.new_empty((*bias.shape[:-1], -(-mk // BIAS_ALIGN) * BIAS_ALIGN))[..., :mk]
    return padded.copy_(bias)


def _aligned(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors with unit stride along D and every other stride, and the start, at 16-byte
    boundaries, as the fused CUDA kernels load rows (copied only where they are not)."""
    def ok(t: torch.Tensor) -> bool:
        align = 16 // t.element_size()
        return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(
            s % align == 0 for s, n in zip(t.stride()[:-1], t.shape[:-1], strict=True) if n > 1)

    return tuple(t if ok(t) else t.clone(memory_format=torch.contiguous_format)
                 for t in tensors)


def _grid_parts(b: int, s: int) -> Iterator[tuple[slice, slice]]:
    """(batch rows, S entries) of the fused calls a (B, S, ...) call is cut into: at most
    MAX_GRID of each per launch."""
    for b0 in range(0, b, MAX_GRID):
        for s0 in range(0, s, MAX_GRID):
            yield slice(b0, b0 + MAX_GRID), slice(s0, s0 + MAX_GRID)


def _bias_part(mask: Mask | None, rows: slice) -> torch.Tensor | None:
    if mask is None:
        return None
    return mask.bias if mask.bias.shape[1] == 1 else mask.bias[:, rows]


def _by_grid(run: Callable[..., tuple[torch.Tensor, ...]], tensors: tuple[torch.Tensor, ...],
             mask: Mask | None) -> tuple[torch.Tensor, ...]:
    """run(*tensors, bias) over grid-sized parts of the (B, S, ...) tensors, results joined."""
    b, s = tensors[0].shape[:2]
    if b <= MAX_GRID and s <= MAX_GRID:
        return run(*tensors, _bias_part(mask, slice(None)))
    parts = [(rows, run(*(t[batch, rows] for t in tensors), _bias_part(mask, rows)))
             for batch, rows in _grid_parts(b, s)]
    per_batch = -(-s // MAX_GRID)
    joined = []
    for i in range(len(parts[0][1])):
        by_batch = [torch.cat([r[i] for _, r in parts[j:j + per_batch]], 1)
                    for j in range(0, len(parts), per_batch)]
        joined.append(torch.cat(by_batch, 0))
    return tuple(joined)


def _cuda_forward(kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  causal: bool, mask: Mask | None) -> tuple[torch.Tensor, torch.Tensor]:
    """O (B, S, Mq, D) in q's dtype and LSE (B, S, Mq) float32 by torch's flash or efficient
    CUDA kernel."""
    def run(q, k, v, bias):
        q, k, v = _aligned(q, k, v)
        if kernel == "flash":
            out, lse = FLASH_FORWARD(q, k, v, 0.0, causal, False, scale=scale)[:2]
            return out, lse
        if bias is not None:  # (1, S or 1, Mq, Mk) -> (B, S, Mq, Mk): the kernel's shape
            bias = aligned_bias(bias).expand(q.shape[0], q.shape[1], *bias.shape[2:])
        out, lse = EFFICIENT_FORWARD(q, k, v, bias, True, 0.0, causal, scale=scale)[:2]
        return out, lse[..., :q.shape[2]]  # its LSE rows come padded

    return _by_grid(run, (q, k, v), mask)


def _cuda_backward(kernel: str, do: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: float,
                   causal: bool, mask: Mask | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ, dK, dV by the backward of torch's flash or efficient CUDA kernel, from the merged
    O and LSE (float32, +inf on rows with nothing to contribute)."""
    def run(do, q, k, v, out, lse, bias):
        do, q, k, v, out = _aligned(do, q, k, v, out.to(q.dtype))
        mq, mk = q.shape[2], k.shape[2]
        # the RNG state, read only with dropout (never here)
        seed, offset = q.new_zeros((2,), dtype=torch.int64), q.new_zeros((), dtype=torch.int64)
        if kernel == "flash":
            return FLASH_BACKWARD(do, q, k, v, out, lse.float().contiguous(), None, None, mq, mk,
                                  0.0, causal, seed, offset, scale=scale)
        if bias is not None:
            bias = aligned_bias(bias).expand(q.shape[0], q.shape[1], *bias.shape[2:])
        # the LSE laid out as the forward returns it: rows padded (with +inf: P = 0 there)
        padded = lse.new_full((*lse.shape[:2], math.ceil(mq / LSE_BLOCK) * LSE_BLOCK),
                              float("inf"), dtype=torch.float32)
        padded[..., :mq] = lse
        return EFFICIENT_BACKWARD(do, q, k, v, bias, out, padded, seed, offset, 0.0,
                                  [True, True, True, False], causal, scale=scale)[:3]

    return _by_grid(run, (do, q, k, v, out, lse), mask)


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype results are accumulated and merged in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _allowed_chunk(allowed: torch.Tensor | None, causal: bool, lo: int, hi: int, mk: int,
                   device: torch.device) -> torch.Tensor | None:
    """The (S or 1, hi - lo, Mk) allowed pairs of query rows lo..hi-1, or None for all."""
    chunk = None if allowed is None else allowed[:, lo:hi]
    if causal:
        rows = torch.arange(lo, hi, device=device)[:, None]
        tri = (torch.arange(mk, device=device)[None] <= rows)[None]
        chunk = tri if chunk is None else chunk & tri
    return chunk


def _math_forward(q, k, v, scale, causal, allowed):
    acc = accum_dtype(q.dtype)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    mq, mk = q.shape[2], k.shape[2]
    out = torch.empty(q.shape, dtype=acc, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=acc, device=q.device)
    for lo in range(0, mq, QUERY_CHUNK):
        hi = min(lo + QUERY_CHUNK, mq)
        s = scale * qf[:, :, lo:hi] @ kf.transpose(-1, -2)
        keep = _allowed_chunk(allowed, causal, lo, hi, mk, q.device)
        if keep is not None:
            s = s.masked_fill(~keep.unsqueeze(0), float("-inf"))
        m = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - m.masked_fill(m == float("-inf"), 0).unsqueeze(-1))
        out[:, :, lo:hi] = p @ vf
        lse[:, :, lo:hi] = m
    return out.to(q.dtype), lse


def _math_backward(do, q, k, v, out, lse, scale, causal, allowed):
    acc = accum_dtype(q.dtype)
    qf, kf, vf, dof = q.to(acc), k.to(acc), v.to(acc), do.to(acc)
    delta = (dof * out.to(acc)).sum(-1)
    dq = torch.zeros_like(qf)
    dk, dv = torch.zeros_like(kf), torch.zeros_like(vf)
    mq, mk = q.shape[2], k.shape[2]
    for lo in range(0, mq, QUERY_CHUNK):
        hi = min(lo + QUERY_CHUNK, mq)
        s = scale * qf[:, :, lo:hi] @ kf.transpose(-1, -2)
        p = torch.exp(s - lse[:, :, lo:hi].to(acc).unsqueeze(-1))
        keep = _allowed_chunk(allowed, causal, lo, hi, mk, q.device)
        if keep is not None:
            p = p.masked_fill(~keep.unsqueeze(0), 0.0)
        dp = dof[:, :, lo:hi] @ vf.transpose(-1, -2)
        ds = p * (dp - delta[:, :, lo:hi].unsqueeze(-1))
        dv += p.transpose(-1, -2) @ dof[:, :, lo:hi]
        dq[:, :, lo:hi] = scale * ds @ kf
        dk += scale * ds.transpose(-1, -2) @ qf[:, :, lo:hi]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
