"""The PyTorch backend's plan: a pattern's pieces grouped into batches, each batch one call of the
fused attention kernel.

Pieces of different heads often have the same shape (a dilated branch gives every head one piece
per segment run, at its own offset). Run one by one, each pays the kernel's fixed cost and splits
a small problem over the cores; stacked, they are one call. Stacking copies the pieces' rows
(gather), except when every head reads the same rows of its own q, k and v: then the batch is a
view of the (B*H, N, D) tensors (`folded`) and costs no copy at all.

Whether to stack a group is the cost model's choice (`spattn.runtime.costs`): a call saved
against the bytes copied. Any grouping is exact: pieces only ever merge into their own head's
rows by log-sum-exp, in any order.

A call whose output would be large is cut into calls over runs of its segments: each call's
output then reuses memory the allocator keeps rather than fresh pages, every one of which faults
in on first touch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import torch

from spattn.patterns.geometry import Geometry, add_counts
from spattn.runtime import costs
from spattn.runtime.kernels import Mask
from spattn.runtime.pieces import MASK_BUDGET, Piece


@dataclass(frozen=True)
class Batch:
    """Pieces of one shape, at most one per head, run as one attention call."""

    pieces: tuple[Piece, ...]
    folded: bool = False  # every head, the same rows, H == Hkv: a view of (B*H, N, D)
    why: str = ""  # the cost model's reason, for `spattn inspect --plan`
    cost_us: float = 0.0  # the model's prediction for one batch row (B = 1)
    whole: bool = False  # the whole call, every head, one dense attention with a mask
    key: tuple | None = None  # the mask's key when cut from a larger call (`mask_key`)

    @property
    def strategy(self) -> str:
        if self.whole:
            return "dense masked"
        if self.folded:
            return "heads folded (view)"
        return "stacked (gather)" if len(self.pieces) > 1 else "strided view"

    def mask_tensor(self, device: torch.device | str) -> torch.Tensor | None:
        """Allowed pairs for the call: the pieces' one mask when they share it (broadcast over
        heads and segments), else each piece's for its segments, stacked like the rows."""
        return self._stacked(Piece.mask_tensor, device)

    def mask(self, device: torch.device | str, dtype: torch.dtype) -> Mask | None:
        """The call's mask: its allowed pairs, and log(1 + c) added where c more branches give
        a pair (nested branches sharing their pairs)."""
        allowed = self.mask_tensor(device)
        also = self._stacked(Piece.also_tensor, device)
        if also is None:
            return None if allowed is None else Mask.of(allowed, dtype)
        counts = also + 1
        return Mask.of_counts(counts if allowed is None else counts * allowed, dtype)

    @cached_property
    def mask_key(self) -> tuple:
        """What the call's mask depends on: batches whose pieces read one segment's worth of
        the same predicates at the same positions share it (heads of one offset class), and so
        do the calls cut from one call."""
        if self.key is not None:
            return self.key
        first = self.pieces[0]
        if first.shared_mask and _same(self.pieces):
            return first.q.segments(0, 1), first.k.segments(0, 1), first.mask, first.also
        return (self,)

    def _stacked(self, tensor: Callable[[Piece, torch.device | str], torch.Tensor | None],
                 device: torch.device | str) -> torch.Tensor | None:
        if _same(self.pieces):
            return tensor(self.pieces[0], device)
        parts = [tensor(p, device) for p in self.pieces]
        if parts[0] is None:
            return None
        return torch.cat([t.expand(p.q.nseg, -1, -1) for t, p in zip(parts, self.pieces,
                                                                      strict=True)])

    def describe(self) -> str:
        if self.whole:
            heads, shape, kind = "all heads", "1 x (N x N)", "masked"
        else:
            p = self.pieces[0]
            heads = f"{len(self.pieces)} head{'s' if len(self.pieces) > 1 else ''}"
            shape = f"{p.q.nseg} x ({p.q.count} x {p.k.count})"
            kind = "causal" if p.causal else "masked" if p.mask is not None else "full"
            if p.also is not None:  # pairs nested branches give, computed once
                kind += ", shared"
        return f"{self.strategy:<20} {heads:<9} {shape:<24} {kind:<6} {self.why}"


def _shape(piece: Piece) -> tuple:
    """Pieces with equal shapes can share a call: rows per segment, segments, causality, and
    whether a mask says which pairs count."""
    q, k = piece.q, piece.k
    return q.count, q.nseg, k.count, k.nseg, piece.causal, piece.mask is None, piece.also is None


def _same(pieces: Sequence[Piece]) -> bool:
    """The same rows and the same mask (one predicate object) on every piece."""
    first = pieces[0]
    return all(p.q == first.q and p.k == first.k and p.mask is first.mask
               and p.also is first.also for p in pieces)


def _mask_elements(pieces: Sequence[Piece]) -> int:
    """Mask elements a stacked batch would build: one mask when all pieces share it."""
    if not pieces[0].masked:
        return 0
    if _same(pieces):
        p = pieces[0]
        return (1 if p.shared_mask else p.q.nseg) * p.q.count * p.k.count
    return sum(p.q.nseg * p.q.count * p.k.count for p in pieces)


def plan_batches(pieces: tuple[Piece, ...], heads: int, kv_heads: int, seq_len: int,
                 head_dim: int, model: costs.CostModel, call_elements: int
                 ) -> tuple[Batch, ...]:
    """Group same-shape pieces of different heads; keep a group stacked when the model says the
    saved calls cost more than the copies; cut calls that would write more than
    `call_elements` output elements. `fresh` is recomputed for the batches' order."""
    groups: dict[tuple, list[list[Piece]]] = defaultdict(list)
    order: list[list[Piece]] = []
    for piece in pieces:
        for group in groups[_shape(piece)]:
            if all(p.head != piece.head for p in group):
                group.append(piece)
                break
        else:
            group = [piece]
            groups[_shape(piece)].append(group)
            order.append(group)
    batches: list[Batch] = []
    for group in order:
        folded = len(group) == heads and heads == kv_heads and _same(group)
        p = group[0]
        shape = (p.q.count, p.k.count, p.causal, head_dim, p.masked)
        one = model.call(p.q.nseg, *shape) + model.merge([p], head_dim)  # one piece alone
        if folded:
            # one merge over every head's rows
            cost = model.call(p.q.nseg * heads, *shape) + model.merge(group, head_dim) \
                - (heads - 1) * model.piece_us
            batches.append(Batch(tuple(group), True, "every head reads the same rows: no copy",
                                 cost))
        elif len(group) == 1:
            batches.append(Batch(tuple(group), why="no other head has this shape", cost_us=one))
        elif _mask_elements(group) > MASK_BUDGET:
            batches.extend(Batch((p,), why="the stacked masks would pass the mask budget",
                                 cost_us=one) for p in group)
        else:
            separate, stacked = model.compare(group, head_dim)
            why = f"{separate / 1e3:.2f} ms as {len(group)} calls, {stacked / 1e3:.2f} ms stacked"
            if stacked < separate:
                batches.append(Batch(tuple(group), why=why,
                                     cost_us=stacked + model.merge(group, head_dim)))
            else:
                batches.extend(Batch((p,), why=why, cost_us=one) for p in group)
    return tuple(call for batch in _mark_fresh(batches, heads, seq_len)
                 for call in _cut(batch, head_dim, model, call_elements))


def _cut(batch: Batch, head_dim: int, model: costs.CostModel, call_elements: int
         ) -> tuple[Batch, ...]:
    """The batch as calls over runs of its segments, each writing at most `call_elements`
    output elements (one call when it already does, or has one segment). Every call keeps the
    batch's mask key: a mask the same for every segment is built once for all of them."""
    p = batch.pieces[0]
    nseg = p.q.nseg
    most = max(1, call_elements // (len(batch.pieces) * p.q.count * head_dim))  # segments a call
    if nseg <= most:
        return (batch,)
    size = -(-nseg // -(-nseg // most))  # as many calls as needed, of sizes as even as can be
    key = batch.mask_key if p.shared_mask and _same(batch.pieces) else None
    return tuple(
        replace(batch, key=key, cost_us=batch.cost_us * min(size, nseg - first) / nseg
                + model.call_us,
                pieces=tuple(replace(x, q=x.q.segments(first, min(size, nseg - first)),
                                     k=x.k.segments(first, min(size, nseg - first)))
                             for x in batch.pieces))
        for first in range(0, nseg, size))


def pair_counts(branches: tuple[Geometry, ...], n: int, heads: int, causal: bool, union: bool,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                ) -> torch.Tensor:
    """(H, N, N): how many times each (head, query, key) pair counts (SEMANTICS.md: multiset
    counts a pair once per branch that gives it, union once)."""
    pos = torch.arange(n, device=device)
    qpos, kpos = pos[:, None], pos[None, :]
    counts = torch.zeros((heads, n, n), dtype=dtype, device=device)
    add_counts(counts, branches, heads, qpos, kpos)
    if union:
        counts.clamp_(max=1)
    if causal:
        counts *= kpos <= qpos
    return counts


def dense_masked(heads: int, seq_len: int, causal: bool, head_dim: int,
                 model: costs.CostModel, pieces_us: float) -> Batch:
    """The whole call as one dense attention with an additive mask of log(count): one call
    instead of many when the sequence is short and the pattern dense enough."""
    cost = model.call(heads, seq_len, seq_len, causal, head_dim, masked=True)
    return Batch((), why=f"{cost / 1e3:.2f} ms in one call, {pieces_us / 1e3:.2f} ms as pieces",
                 cost_us=cost, whole=True)


def describe_plan(batches: tuple[Batch, ...], model: costs.CostModel) -> list[str]:
    """A line per distinct batch (strategy, heads, segments x (queries x keys), kind, reason),
    repeats counted, under a summary line."""
    counts: dict[str, int] = {}
    for batch in batches:
        line = batch.describe()
        counts[line] = counts.get(line, 0) + 1
    pieces = sum(len(b.pieces) for b in batches)
    total = sum(b.cost_us for b in batches) / 1e3
    what = "the whole pattern" if batches and batches[0].whole else f"{pieces} pieces"
    lines = [f"{len(batches)} calls for {what}, {total:.1f} ms predicted (B=1); cost "
             f"model {model.describe()}"]
    lines += [f"{n:>3} x {line}" for line, n in counts.items()]
    return lines


def _mark_fresh(batches: list[Batch], heads: int, seq_len: int) -> tuple[Batch, ...]:
    """A piece is fresh when no earlier batch wrote any of its head's rows: it stores its output
    instead of merging it."""
    written = torch.zeros((heads, seq_len), dtype=torch.bool)
    marked = []
    for batch in batches:
        pieces = []
        for piece in batch.pieces:
            rows = piece.q.positions().flatten()
            fresh = not bool(written[piece.head, rows].any())
            written[piece.head, rows] = True
            pieces.append(replace(piece, fresh=fresh))
        marked.append(replace(batch, pieces=tuple(pieces)))
    return tuple(marked)
