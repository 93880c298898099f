"""Several sequences in one call: packed variable-length batches and padded batches.

- Packed (flash-attn's varlen layout): sequences lie one after another along N, given by their
  lengths (`seq_lens`) or cumulative offsets (`cu_seqlens`, [0, l0, l0+l1, ..., N]).
- Padded: a (B, N) `key_padding_mask`, True at padding (the `nn.MultiheadAttention`
  convention); each row's real tokens are one contiguous run (right- or left-padded).

Every sequence is attended on its own: it is segmented from its own first token, never sees
another sequence's keys, and padding rows get zero output (and zero gradient). Each sequence runs
through the chosen backend as a view of the packed tensors; autograd joins the pieces.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable

import torch

from spattn.errors import SpattnError


class VarlenError(SpattnError, ValueError):
    """Sequence lengths, offsets or padding masks that do not describe the tensors."""


Bounds = list[tuple[int, int]]  # [start, end) of each sequence along N


def _ints(name: str, values: Iterable[int] | torch.Tensor) -> list[int]:
    """The values as a list of ints, read once (a generator works too)."""
    if isinstance(values, torch.Tensor):
        if values.dim() != 1 or values.dtype in (torch.bool,) or values.is_floating_point():
            raise VarlenError(f"{name} must be a 1-D integer tensor or a list of ints, got "
                              f"{values.dtype} of shape {tuple(values.shape)}")
        return [int(x) for x in values.tolist()]
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise VarlenError(f"{name} must be a list of ints or a 1-D integer tensor, got "
                          f"{type(values).__name__}")
    values = list(values)
    bad = [x for x in values if isinstance(x, bool) or not isinstance(x, numbers.Integral)]
    if bad:
        raise VarlenError(f"{name} must hold ints, got {bad[0]!r} ({type(bad[0]).__name__})")
    return [int(x) for x in values]


def packed_bounds(n: int, seq_lens: Iterable[int] | torch.Tensor | None = None,
                  cu_seqlens: Iterable[int] | torch.Tensor | None = None) -> Bounds:
    """[start, end) of every packed sequence, checked against the tensors' N."""
    if (seq_lens is None) == (cu_seqlens is None):
        raise VarlenError("give seq_lens or cu_seqlens, not both")
    if seq_lens is not None:
        lengths = _ints("seq_lens", seq_lens)
        if not lengths or min(lengths) < 1:
            raise VarlenError(f"seq_lens must be positive lengths, got {_brief(lengths)}")
        offsets = [0]
        for length in lengths:
            offsets.append(offsets[-1] + length)
        if offsets[-1] != n:
            raise VarlenError(f"seq_lens sum to {offsets[-1]}, but the tensors hold N = {n} "
                              f"tokens")
    else:
        offsets = _ints("cu_seqlens", cu_seqlens)
        if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != n:
            raise VarlenError(f"cu_seqlens must run from 0 to N = {n} (one more entry than "
                              f"there are sequences), got {_brief(offsets)}")
        if any(b <= a for a, b in zip(offsets, offsets[1:], strict=False)):
            raise VarlenError(f"cu_seqlens must be strictly increasing, got {_brief(offsets)}")
    return list(zip(offsets, offsets[1:], strict=False))


def _brief(values: list[int], most: int = 8) -> str:
    """A list for an error message, cut after `most` entries."""
    if len(values) <= most:
        return str(values)
    return f"[{', '.join(map(str, values[:most]))}, ... ({len(values)} in all)]"


def padding_bounds(mask: torch.Tensor, batch: int, n: int) -> Bounds:
    """[start, end) of each batch row's real tokens from a (B, N) mask, True at padding."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise VarlenError(f"key_padding_mask must be a bool tensor (True at padding), got "
                          f"{getattr(mask, 'dtype', type(mask).__name__)}")
    if tuple(mask.shape) != (batch, n):
        raise VarlenError(f"key_padding_mask must be (B={batch}, N={n}), got "
                          f"{tuple(mask.shape)}")
    real = ~mask.cpu()
    bounds = []
    for row in range(batch):
        where = real[row].nonzero().flatten()
        if len(where) == 0:
            bounds.append((0, 0))
            continue
        start, end = int(where[0]), int(where[-1]) + 1
        if end - start != len(where):
            raise VarlenError(f"key_padding_mask row {row}: the real tokens must be one "
                              f"contiguous run (right or left padding), got gaps between "
                              f"{start} and {end}")
        bounds.append((start, end))
    return bounds


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def connected_zero(*tensors: torch.Tensor) -> torch.Tensor:
    """An exact 0 that autograd links to every tensor (an empty slice's sum): added to an
    output made only of zeros, it gives the inputs zero gradients instead of none at all."""
    return sum(t[..., :0].sum() for t in tensors)


def packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: Bounds,
           attend: Attend) -> torch.Tensor:
    """Each packed sequence attended on its own, joined along N. Queries shorter than keys are
    the last rows of the packed keys: the rows of the full packed forward, computed by it."""
    first = k.shape[2] - q.shape[2]
    if first:
        full = torch.cat([q.new_zeros(*q.shape[:2], first, q.shape[3]), q], 2)
        return packed(full, k, v, bounds, attend)[:, :, first:]
    parts = [attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b]) for a, b in bounds]
    return torch.cat(parts, 2) if parts else q.new_zeros(q.shape) + connected_zero(q, k, v)


def padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: Bounds,
           attend: Attend) -> torch.Tensor:
    """Each batch row's real tokens attended on their own; zero rows at padding. The queries
    may be the last Nq of the Nk positions (bottom-right): a row's real queries are then the
    last ones of its real run, and attend them as such."""
    first = k.shape[2] - q.shape[2]  # the position of query row 0
    rows = []
    for row, (a, b) in enumerate(bounds):
        lo, hi = max(a, first) - first, max(b, first) - first  # the row's real query rows
        pieces = [q.new_zeros(1, q.shape[1], lo, q.shape[3])]
        if hi > lo:
            pieces.append(attend(q[row:row + 1, :, lo:hi], k[row:row + 1, :, a:b],
                                 v[row:row + 1, :, a:b]))
        pieces.append(q.new_zeros(1, q.shape[1], q.shape[2] - hi, q.shape[3]))
        rows.append(torch.cat(pieces, 2))
    out = torch.cat(rows, 0) if rows else q.new_zeros(q.shape)  # rows: none when B = 0
    if not out.requires_grad and torch.is_grad_enabled():  # every row padding: zero gradients
        out = out + connected_zero(q, k, v)
    return out
