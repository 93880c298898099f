"""A pattern resolved for one sequence length N and head count H: plain frozen dataclasses.

Each branch answers, with vectorized position predicates, which (head, query, key) pairs it
allows (SEMANTICS.md); causal order is applied by the caller. Everything downstream (the PyTorch
backend, counting, pictures, the compiler) starts from `resolve`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from spattn.patterns.blocks import random_blocks
from spattn.patterns.spec import (
    DenseBranch,
    DilatedBranch,
    GlobalBranch,
    Pattern,
    RandomBranch,
    StridedBranch,
    WindowBranch,
)


class _OnHeads:
    """A branch's `on_heads` (the query heads its YAML `heads` lists; None: all) and `allows` on
    top of each kind's own predicate `_allows`: other heads get no keys."""

    on_heads: frozenset[int] | None

    def applies(self, head: int) -> bool:
        return self.on_heads is None or head in self.on_heads

    def allows(self, head: int, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        if self.applies(head):
            return self._allows(head, qpos, kpos)
        return torch.zeros(torch.broadcast_shapes(qpos.shape, kpos.shape), dtype=torch.bool,
                           device=qpos.device)

    def _allows(self, head: int, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    per_head = False  # whether `_allows` depends on the head

    def allows_heads(self, heads: int, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        """`allows` for heads 0 .. heads-1 at once: (heads, *broadcast shape) bool, one
        predicate for all heads where the kind does not depend on the head."""
        if self.per_head:
            allowed = torch.stack([self._allows(h, qpos, kpos) for h in range(heads)])
        else:
            one = self._allows(0, qpos, kpos)
            allowed = one.expand(heads, *one.shape)
        return self._on_heads_only(allowed)

    def _on_heads_only(self, allowed: torch.Tensor) -> torch.Tensor:
        if self.on_heads is None:
            return allowed
        heads = allowed.shape[0]
        applies = torch.tensor([self.applies(h) for h in range(heads)], device=allowed.device)
        return allowed & applies.view(heads, *[1] * (allowed.dim() - 1))


@dataclass(frozen=True)
class Dilated(_OnHeads):
    """Segments of `segment` (= min(w, N)) tokens; head h keeps rows a + offsets[h] + dilation*i."""

    segment: int
    dilation: int
    offsets: tuple[int, ...]
    on_heads: frozenset[int] | None = None

    def rows_in(self, length: int, offset: int) -> int:
        """How many rows one head keeps in a segment of `length` tokens."""
        return max(0, -(-(length - offset) // self.dilation))  # integers: exact at any size

    def residue(self, pos: torch.Tensor) -> torch.Tensor:
        """Each position's offset class within its segment: head h keeps those equal to
        offsets[h]."""
        return (pos % self.segment) % self.dilation

    def selects(self, head: int, pos: torch.Tensor) -> torch.Tensor:
        return self.residue(pos) == self.offsets[head]

    def _allows(self, head: int, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        same_segment = (qpos // self.segment) == (kpos // self.segment)
        return same_segment & self.selects(head, qpos) & self.selects(head, kpos)

    def allows_heads(self, heads: int, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        same_segment = (qpos // self.segment) == (kpos // self.segment)
        offsets = torch.tensor(self.offsets[:heads], device=qpos.device)
        offsets = offsets.view(heads, *[1] * same_segment.dim())
        allowed = same_segment & (self.residue(qpos) == offsets) \
            & (self.residue(kpos) == offsets)
        return self._on_heads_only(allowed.expand(heads, *same_segment.shape))


@dataclass(frozen=True)
class Window(_OnHeads):
    size: int
    on_heads: frozenset[int] | None = None

    def _allows(self, head: int, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        return (qpos - kpos).abs() < self.size


@dataclass(frozen=True)
class Global(_OnHeads):
    """Global tokens below N, sorted and de-duplicated."""

    tokens: tuple[int, ...]
    on_heads: frozenset[int] | None = None

    def is_global(self, pos: torch.Tensor) -> torch.Tensor:
        tokens = torch.tensor(self.tokens, dtype=pos.dtype, device=pos.device)
        return torch.isin(pos, tokens)

    def _allows(self, head: int, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        return self.is_global(qpos) | self.is_global(kpos)


@dataclass(frozen=True)
class Strided(_OnHeads):
    """Key k for query p when (p - k) mod stride == 0: each residue class attends itself."""

    stride: int
    on_heads: frozenset[int] | None = None

    def classes(self, seq_len: int) -> list[tuple[int, int, int]]:
        """(first residue, how many residues, rows each): the classes of equal size, at most 2."""
        rows, longer = divmod(seq_len, self.stride)
        groups = [(0, min(longer, self.stride), rows + 1), (longer, self.stride - longer, rows)]
        return [(first, count, m) for first, count, m in groups if count and m]

    def _allows(self, head: int, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        return (qpos - kpos) % self.stride == 0


@dataclass(frozen=True)
class RandomBlocks(_OnHeads):
    """Query block i (tokens [i*block, (i+1)*block)) sees the key blocks `table()[head, i]`."""

    block: int
    blocks: int
    seed: int
    seq_len: int
    heads: int
    causal: bool
    on_heads: frozenset[int] | None = None

    per_head = True

    def table(self) -> torch.Tensor:
        """(heads, query blocks, blocks) int64 key blocks, -1 where a query block has fewer."""
        return random_blocks(self.block, self.blocks, self.seed, self.seq_len, self.heads,
                             self.causal)

    def _allows(self, head: int, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        chosen = self.table()[head].to(qpos.device)[qpos // self.block]  # (..., blocks)
        return (chosen == (kpos // self.block).unsqueeze(-1)).any(-1)


@dataclass(frozen=True)
class Dense(_OnHeads):
    on_heads: frozenset[int] | None = None

    def _allows(self, head: int, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        return torch.ones(torch.broadcast_shapes(qpos.shape, kpos.shape), dtype=torch.bool,
                          device=qpos.device)


Geometry = Dilated | Window | Global | Strided | RandomBlocks | Dense

STACKED_LIMIT = 1 << 18  # (branch, head, query, key) predicates add_counts builds at once


def add_counts(counts: torch.Tensor, branches: Sequence[Geometry], heads: int,
               qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
    """counts (heads, *broadcast shape) += how many of `branches` give each (head, query, key)
    pair. The dilated branches of a small call (decoding: one query over the kept keys) are
    evaluated together, a few tensor operations in all rather than a few per branch."""
    dilated = tuple(g for g in branches if isinstance(g, Dilated))
    size = len(dilated) * heads * qpos.numel() * kpos.numel()  # at least the broadcast size
    if len(dilated) > 1 and size <= STACKED_LIMIT:
        counts += _dilated_counts(dilated, heads, qpos, kpos)
        branches = [g for g in branches if not isinstance(g, Dilated)]
    for g in branches:
        counts += g.allows_heads(heads, qpos, kpos)
    return counts


def _dilated_counts(branches: tuple[Dilated, ...], heads: int, qpos: torch.Tensor,
                    kpos: torch.Tensor) -> torch.Tensor:
    """Dilated.allows_heads of every branch, summed: (heads, *broadcast shape)."""
    segment, dilation, offsets = _dilated_tables(branches, heads, qpos.device)
    ones = [1] * qpos.dim()
    segment, dilation = segment.view(-1, *ones), dilation.view(-1, *ones)
    offsets = offsets.view(len(branches), heads, *ones)  # -1 on heads a branch skips
    same_segment = (qpos // segment) == (kpos // segment)  # (branches, *shape)
    q_class = ((qpos % segment) % dilation).unsqueeze(1)  # (branches, 1, *q shape)
    k_class = ((kpos % segment) % dilation).unsqueeze(1)
    allowed = same_segment.unsqueeze(1) & (q_class == offsets) & (k_class == offsets)
    return allowed.sum(0)


@lru_cache(maxsize=64)
def _dilated_tables(branches: tuple[Dilated, ...], heads: int, device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The branches' segments and dilations (branches,), and offsets (branches, heads), -1 where
    a branch does not apply to a head (a residue class is never -1)."""
    offsets = [[g.offsets[h] if g.applies(h) else -1 for h in range(heads)] for g in branches]
    return (torch.tensor([g.segment for g in branches], device=device),
            torch.tensor([g.dilation for g in branches], device=device),
            torch.tensor(offsets, device=device))


def head_offsets(mode: str, dilation: int, heads: int) -> tuple[int, ...]:
    """s_h for every head: `paper` is h mod r, `blocked` is h // ceil(H / r)."""
    if mode == "paper":
        return tuple(h % dilation for h in range(heads))
    block = math.ceil(heads / dilation)
    return tuple(h // block for h in range(heads))


def resolve(pattern: Pattern, seq_len: int, heads: int) -> tuple[Geometry, ...]:
    """The pattern's branches for a sequence of `seq_len` tokens and `heads` query heads."""
    if seq_len < 0 or heads < 1:
        raise ValueError(f"need seq_len >= 0 and heads >= 1, got {seq_len} and {heads}")
    required = pattern.required_heads()
    if required is not None and required != heads:
        raise ValueError(f"pattern '{pattern.name}' is written for {required} heads, got {heads}")
    resolved: list[Geometry] = []
    if pattern.min_heads() > heads:
        raise ValueError(f"pattern '{pattern.name}' has a branch for head {pattern.min_heads() - 1}"
                         f", but there are {heads} heads")
    for branch in pattern.expanded_branches():
        on = branch.applies_to()
        if isinstance(branch, DilatedBranch):
            offsets = tuple(branch.offsets) if branch.offsets else head_offsets(
                pattern.head_offsets, branch.dilation, heads)
            resolved.append(Dilated(max(1, min(branch.segment, seq_len)), branch.dilation, offsets,
                                    on))
        elif isinstance(branch, WindowBranch):
            resolved.append(Window(branch.window.size, on))
        elif isinstance(branch, GlobalBranch):
            tokens = sorted({t for t in branch.global_.tokens if t < seq_len})
            resolved.append(Global(tuple(tokens), on))
        elif isinstance(branch, StridedBranch):
            resolved.append(Strided(branch.strided.stride, on))
        elif isinstance(branch, RandomBranch):
            spec = branch.random
            resolved.append(RandomBlocks(spec.block, spec.blocks, spec.seed, seq_len, heads,
                                         pattern.causal, on))
        elif isinstance(branch, DenseBranch):
            resolved.append(Dense(on))
        else:  # pragma: no cover - the spec admits no other kind
            raise TypeError(f"unknown branch {branch!r}")
    return tuple(resolved)


def describe(geometry: Geometry) -> str:
    """A short human label, e.g. 'dilated w=2048 r=1' (and 'heads 0-3' when it has some)."""
    label = _kind_label(geometry)
    if geometry.on_heads is None:
        return label
    return f"{label} heads {head_ranges(sorted(geometry.on_heads))}"


def head_ranges(values: list[int]) -> str:
    """Sorted head indices as runs: [0, 1, 2, 5] -> '0-2, 5'."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def _kind_label(geometry: Geometry) -> str:
    if isinstance(geometry, Dilated):
        return f"dilated w={geometry.segment} r={geometry.dilation}"
    if isinstance(geometry, Window):
        return f"window {geometry.size}"
    if isinstance(geometry, Global):
        return f"global {len(geometry.tokens)} tokens"
    if isinstance(geometry, Strided):
        return f"strided {geometry.stride}"
    if isinstance(geometry, RandomBlocks):
        return f"random {geometry.blocks} blocks of {geometry.block}"
    return "dense"
