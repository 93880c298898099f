"""The PyTorch backend: a pattern's pieces run as batched dense attention over strided views,
merged by log-sum-exp into one running (O, LSE); and the exact backward. `spattn.runtime.ops`
wraps the two as torch.library custom ops with autograd.

Memory is linear in N: the accumulators are (B, H, N, D) and (B, H, N); each piece reads strided
views of q, k, v, and a mask, when it needs one, covers only that piece's rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from spattn.patterns.geometry import Geometry
from spattn.runtime.kernels import attend, attend_backward, unit_stride_rows
from spattn.runtime.pieces import Piece, plan_pieces


@dataclass(frozen=True)
class Problem:
    """Everything the backend needs besides the tensors."""

    branches: tuple[Geometry, ...]
    seq_len: int
    heads: int
    kv_heads: int
    causal: bool
    union: bool
    scale: float
    force_math: bool = False  # use the matmul fallback even where the fused kernel runs

    def kv_head(self, head: int) -> int:
        return head // (self.heads // self.kv_heads)


@lru_cache(maxsize=64)
def _pieces(problem: Problem) -> tuple[Piece, ...]:
    return tuple(plan_pieces(problem.branches, problem.seq_len, problem.heads, problem.causal,
                             problem.union))


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, problem: Problem
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """O (B, H, N, D) in q's dtype and LSE (B, H, N) (-inf where a query got no key)."""
    q, k, v = unit_stride_rows(q, k, v)  # once here, rather than per piece in `attend`
    acc = _accum_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
    for piece in _pieces(problem):
        h, kvh = piece.head, problem.kv_head(piece.head)
        allowed = piece.mask_tensor(q.device)
        o_p, l_p = attend(piece.q.take(q[:, h]), piece.k.take(k[:, kvh]), piece.k.take(v[:, kvh]),
                          problem.scale, piece.causal, allowed, problem.force_math)
        if piece.fresh:
            piece.q.put(out[:, h], o_p)
            piece.q.put(lse[:, h], l_p)
            continue
        o_acc, l_acc = piece.q.take(out[:, h]), piece.q.take(lse[:, h])
        l_new = torch.logaddexp(l_acc, l_p.to(acc))
        finite = l_new.isfinite()  # -inf - -inf would be NaN: rows still without keys stay 0
        w_acc = torch.where(finite, torch.exp(l_acc - l_new), 0).unsqueeze(-1)
        w_p = torch.where(finite, torch.exp(l_p.to(acc) - l_new), 0).unsqueeze(-1)
        piece.q.put(out[:, h], o_acc * w_acc + o_p.to(acc) * w_p)
        piece.q.put(lse[:, h], l_new)
    return out.to(q.dtype), lse


def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             out: torch.Tensor, lse: torch.Tensor, problem: Problem
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    do, q, k, v, out = unit_stride_rows(do, q, k, v, out)
    acc = _accum_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    lse_kernel = lse if q.dtype == torch.float64 else lse.float()
    for piece in _pieces(problem):
        h, kvh = piece.head, problem.kv_head(piece.head)
        rows = piece.q
        grads = attend_backward(
            rows.take(do[:, h]), rows.take(q[:, h]), piece.k.take(k[:, kvh]),
            piece.k.take(v[:, kvh]), rows.take(out[:, h]), rows.take(lse_kernel[:, h]),
            problem.scale, piece.causal, piece.mask_tensor(q.device), problem.force_math)
        rows.add(dq[:, h], grads[0])
        piece.k.add(dk[:, kvh], grads[1])
        piece.k.add(dv[:, kvh], grads[2])
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
