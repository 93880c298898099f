"""Batched dense attention that also returns the log-sum-exp, and its backward given a merged
(O, LSE).

On CPU this is torch's fused flash-attention kernel (`_scaled_dot_product_flash_attention_for_cpu`
and its backward), which never builds the score matrix. Elsewhere (and when asked for) it is a
chunked matmul implementation in float32/float64 with the same contract.

The backward is the FlashAttention-2 one with the *merged* O and LSE of all pieces:
P = exp(S - LSE), D = rowsum(dO * O), dS = P * (dO V^T - D). Summed over pieces that is the exact
gradient of the merged output, mixing weights included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QUERY_CHUNK = 1024  # rows per matmul chunk in the fallback


def _fused(device: torch.device, force_math: bool) -> bool:
    return device.type == "cpu" and not force_math


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
    if _fused(q.device, force_math):
        q, k, v = unit_stride_rows(q, k, v)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=None if mask is None else mask.bias, scale=scale)
    else:
        out, lse = _math_forward(q, k, v, scale, causal, None if mask is None else mask.allowed)
    if mask is not None and mask.any_empty:  # the fused kernel reports LSE = 0 for them
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
    if _fused(q.device, force_math):
        do, q, k, v, out = unit_stride_rows(do, q, k, v, out)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, out, lse.contiguous(), 0.0, causal,
            attn_mask=None if mask is None else mask.bias, scale=scale)
    return _math_backward(do, q, k, v, out, lse, scale, causal,
                          None if mask is None else mask.allowed)


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
