"""The plan: per branch and head-offset group, which block_m x block_n tiles a kernel computes.

Dilated branches are tiled in their *dilated* coordinates (DESIGN.md, "kernel idea"): in each
segment a head with offset s keeps the rows a + s + r*i, i < m, and those rows form a dense
m x m problem (causal: its lower triangle), so no computed tile is partly wasted by dilation.
Segments come in at most two length classes (w' = min(w, N), and a shorter last one), and all
segments of a class share one tile set, so a plan is stored as runs of equal segments and costs
O(tiles of one segment) whatever N is. A strided branch is planned the same way: residue class
c holds the rows c, c + L, ..., a dense problem of ceil((N - c) / L) rows (at most two sizes),
and every head computes every class. Window, global and dense branches are tiled in original
coordinates, with full tiles (no predicate) and partial ones (apply it); so is each (query block,
key block) problem of a random branch, whose tiles differ per head (docs/branches.md). A branch
for some heads only (`heads:`) has tiles for those heads alone.

With `overlap: union` every branch still computes its own tiles; the kernel masks the pairs an
earlier branch already gave, so `Plan.pairs` is the de-duplicated count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

from spattn.compiler.tiles import Band, BlockPairs, TokenTiles, check_kind
from spattn.errors import SpattnError
from spattn.limits import check_work
from spattn.patterns.counting import dense_pairs, union_pairs, useful_flops
from spattn.patterns.geometry import (
    Dense,
    Dilated,
    Geometry,
    Global,
    RandomBlocks,
    Strided,
    Window,
    resolve,
)
from spattn.patterns.spec import Pattern


@dataclass(frozen=True)
class SegmentRun:
    """`count` segments of `length` tokens, the first at `start` and each right after the last.

    The head-offset group keeps `rows` (m) rows of each; `tiles` is that m x m problem, in dilated
    coordinates (row i of a segment starting at a is token a + offset + dilation * i). In a
    strided branch (dilation = stride, offset 0) the "segments" are residue classes: `length` is
    1, so the class starting at c holds the tokens c + stride * i, i < m.
    """

    start: int
    length: int
    count: int
    rows: int
    tiles: Band


@dataclass(frozen=True)
class OffsetGroup:
    """The heads that share one offset in a dilated branch, and the segments they compute."""

    offset: int
    heads: tuple[int, ...]
    runs: tuple[SegmentRun, ...]

    def tile_count(self, kind: str | None = None) -> int:
        return len(self.heads) * sum(run.count * run.tiles.count(kind) for run in self.runs)

    @property
    def pairs(self) -> int:
        return len(self.heads) * sum(run.count * run.tiles.pairs for run in self.runs)


class _Grouped:
    """A branch computed as dilated rows: offset groups of segment runs."""

    groups: tuple[OffsetGroup, ...]

    def tile_count(self, kind: str | None = None) -> int:
        return sum(g.tile_count(kind) for g in self.groups)

    @property
    def pairs(self) -> int:
        return sum(g.pairs for g in self.groups)


@dataclass(frozen=True)
class DilatedPlan(_Grouped):
    """A dilated branch: `segment` is w as written (segments are min(w, N) tokens long)."""

    segment: int
    dilation: int
    offsets: tuple[int, ...]  # per head
    groups: tuple[OffsetGroup, ...]  # by increasing offset, of the heads it applies to
    on_heads: frozenset[int] | None = None  # the heads it applies to (None: all)
    kind: ClassVar[str] = "dilated"


@dataclass(frozen=True)
class StridedPlan(_Grouped):
    """A strided branch as the dilated row kernel runs it: one group (offset 0, every head)
    whose runs are the residue classes of equal size (see `SegmentRun`)."""

    stride: int
    groups: tuple[OffsetGroup, ...]
    on_heads: frozenset[int] | None = None
    kind: ClassVar[str] = "strided"

    @property
    def dilation(self) -> int:
        return self.stride


class _SameTilesEachHead:
    """A branch whose tile set is the same for every head it applies to (`heads` of them)."""

    heads: int
    tiles: Band | TokenTiles

    def tile_count(self, kind: str | None = None) -> int:
        return self.heads * self.tiles.count(kind)

    @property
    def pairs(self) -> int:
        return self.heads * self.tiles.pairs


@dataclass(frozen=True)
class WindowPlan(_SameTilesEachHead):
    """A sliding window of `size`; the same tiles (original coordinates) for each of `heads`."""

    size: int
    heads: int
    tiles: Band
    on_heads: frozenset[int] | None = None
    kind: ClassVar[str] = "window"


@dataclass(frozen=True)
class GlobalPlan(_SameTilesEachHead):
    """Global `tokens` (sorted, below N); the same tiles for each of `heads`."""

    tokens: tuple[int, ...]
    heads: int
    tiles: TokenTiles
    on_heads: frozenset[int] | None = None
    kind: ClassVar[str] = "global"


@dataclass(frozen=True)
class DensePlan(_SameTilesEachHead):
    """Every key (the lower triangle of tiles when causal), for each of `heads`."""

    heads: int
    tiles: Band
    on_heads: frozenset[int] | None = None
    kind: ClassVar[str] = "dense"


@dataclass(frozen=True)
class RandomPlan:
    """Random key blocks (docs/branches.md): per head, each drawn (query block, key block) pair
    is a block x block problem in original coordinates, tiled on its own (`BlockPairs`; heads
    the branch does not apply to draw nothing there)."""

    block: int
    blocks: int  # slots per query block, c
    seed: int
    heads: int
    tiles: BlockPairs
    on_heads: frozenset[int] | None = None
    kind: ClassVar[str] = "random"

    def tile_count(self, kind: str | None = None) -> int:
        return self.tiles.count(kind)

    @property
    def pairs(self) -> int:
        return self.tiles.pairs


BranchPlan = DilatedPlan | StridedPlan | WindowPlan | GlobalPlan | RandomPlan | DensePlan


@dataclass(frozen=True)
class Plan:
    """A pattern planned for one sequence length, head count and tile shape."""

    pattern: str  # the pattern's name
    content_hash: str  # pattern.content_hash()
    seq_len: int
    heads: int
    kv_heads: int
    head_dim: int | None
    causal: bool
    overlap: str
    softmax_scale: float | None
    block_m: int
    block_n: int
    branches: tuple[BranchPlan, ...]

    def tile_count(self, kind: str | None = None) -> int:
        """Tiles computed, summed over heads and branches: all, or only 'full' or 'partial'."""
        check_kind(kind)
        return sum(b.tile_count(kind) for b in self.branches)

    @cached_property
    def pairs(self) -> int:
        """Allowed (head, query, key) triples: summed over branches (multiset) or de-duplicated."""
        if self.overlap != "union":
            return sum(b.pairs for b in self.branches)
        geometries = tuple(_geometry(b, self.seq_len, self.heads, self.causal)
                           for b in self.branches)
        return union_pairs(geometries, self.seq_len, self.heads, self.causal)

    @property
    def density(self) -> float:
        dense = dense_pairs(self.seq_len, self.heads, self.causal)
        return self.pairs / dense if dense else 0.0

    def flops(self, head_dim: int | None = None, batch: int = 1) -> int:
        """Useful forward FLOPs, 4 * D * B * pairs (SEMANTICS.md, Costs)."""
        return useful_flops(self.pairs, self._head_dim(head_dim), batch)

    def computed_flops(self, head_dim: int | None = None, batch: int = 1) -> int:
        """Forward FLOPs of every computed tile, masked pairs included."""
        slots = self.tile_count() * self.block_m * self.block_n
        return useful_flops(slots, self._head_dim(head_dim), batch)

    def _head_dim(self, head_dim: int | None) -> int:
        head_dim = head_dim or self.head_dim
        if head_dim is None:
            raise SpattnError("head_dim: the plan has none; pass head_dim to count FLOPs")
        return head_dim

    def summary(self) -> dict[str, Any]:
        """Counts per branch and in total, as plain data (what `to_json` writes)."""
        area = self.block_m * self.block_n
        tiles = self.tile_count()
        out: dict[str, Any] = {
            "pattern": self.pattern, "content_hash": self.content_hash,
            "seq_len": self.seq_len, "heads": self.heads, "kv_heads": self.kv_heads,
            "head_dim": self.head_dim, "causal": self.causal, "overlap": self.overlap,
            "softmax_scale": self.softmax_scale, "block_m": self.block_m,
            "block_n": self.block_n, "pairs": self.pairs, "density": self.density,
            "tiles": _tiles(self), "useful_fraction": self.pairs / (tiles * area) if tiles else 0.0,
            "branches": [_branch_summary(b, area) for b in self.branches],
        }
        if self.head_dim is not None:
            out["forward_flops"] = self.flops()
            out["computed_forward_flops"] = self.computed_flops()
        return out

    def to_json(self) -> str:
        """The summary as JSON: sorted keys and branches in pattern order, so it is byte-stable."""
        return json.dumps(self.summary(), indent=2, sort_keys=True) + "\n"


def _tiles(plan: Any) -> dict[str, int]:
    return {"full": plan.tile_count("full"), "partial": plan.tile_count("partial"),
            "total": plan.tile_count()}


def _branch_summary(branch: BranchPlan, area: int) -> dict[str, Any]:
    tiles = branch.tile_count()
    out: dict[str, Any] = {"kind": branch.kind, "pairs": branch.pairs, "tiles": _tiles(branch),
                           "useful_fraction": branch.pairs / (tiles * area) if tiles else 0.0}
    if branch.on_heads is not None:
        out["heads"] = sorted(branch.on_heads)
    if isinstance(branch, DilatedPlan):
        out.update(segment=branch.segment, dilation=branch.dilation, offsets=list(branch.offsets),
                   groups=[{"offset": g.offset, "heads": list(g.heads), "tiles": _tiles(g),
                            "runs": [{"start": r.start, "length": r.length, "count": r.count,
                                      "rows": r.rows, "tiles_per_segment": r.tiles.count()}
                                     for r in g.runs]} for g in branch.groups])
    elif isinstance(branch, StridedPlan):
        out.update(stride=branch.stride, classes=[
            {"first": r.start, "count": r.count, "rows": r.rows,
             "tiles_per_class": r.tiles.count()} for r in branch.groups[0].runs])
    elif isinstance(branch, WindowPlan):
        out["size"] = branch.size
    elif isinstance(branch, GlobalPlan):
        out["tokens"] = list(branch.tokens)
    elif isinstance(branch, RandomPlan):
        table = branch.tiles.table
        out.update(block=branch.block, blocks=branch.blocks, seed=branch.seed,
                   query_blocks=table.shape[1], block_pairs=int((table >= 0).sum()))
    return out


def _geometry(branch: BranchPlan, seq_len: int, heads: int, causal: bool) -> Geometry:
    """The resolved geometry of a branch plan again (for the union count)."""
    on = branch.on_heads
    if isinstance(branch, DilatedPlan):
        return Dilated(max(1, min(branch.segment, seq_len)), branch.dilation, branch.offsets, on)
    if isinstance(branch, StridedPlan):
        return Strided(branch.stride, on)
    if isinstance(branch, WindowPlan):
        return Window(branch.size, on)
    if isinstance(branch, GlobalPlan):
        return Global(branch.tokens, on)
    if isinstance(branch, RandomPlan):
        return RandomBlocks(branch.block, branch.blocks, branch.seed, seq_len, heads, causal, on)
    return Dense(on)


# --- building ------------------------------------------------------------------------------------


def _band(extent: int, reach: int, causal: bool, block_m: int, block_n: int) -> Band:
    """Pairs with |q - k| <= reach (causal: 0 <= q - k <= reach) in an extent x extent problem."""
    reach = min(reach, max(extent - 1, 0))
    return Band(extent, 0 if causal else -reach, reach, block_m, block_n)


def _applied(branch: Geometry, heads: int) -> tuple[int, ...]:
    """The heads in [0, heads) that `branch` applies to."""
    return tuple(h for h in range(heads) if branch.applies(h))


def _dilated(branch: Dilated, written: int, n: int, heads: int, causal: bool, block_m: int,
             block_n: int) -> DilatedPlan:
    w, r = branch.segment, branch.dilation
    full, last = divmod(n, w)
    groups = []
    applied = _applied(branch, heads)
    for offset in sorted({branch.offsets[h] for h in applied}):
        runs = []
        for start, length, count in ((0, w, full), (full * w, last, 1)):
            m = branch.rows_in(length, offset)  # ceil((L - s) / r), 0 when L <= s
            if count and m:
                runs.append(SegmentRun(start, length, count, m,
                                       _band(m, m - 1, causal, block_m, block_n)))
        same = tuple(h for h in applied if branch.offsets[h] == offset)
        groups.append(OffsetGroup(offset, same, tuple(runs)))
    return DilatedPlan(written, r, branch.offsets, tuple(groups), branch.on_heads)


def _strided(branch: Strided, n: int, heads: int, causal: bool, block_m: int,
             block_n: int) -> StridedPlan:
    """Residue classes as runs of 1-token "segments": class c is the m rows c + stride * i."""
    runs = tuple(SegmentRun(first, 1, count, m, _band(m, m - 1, causal, block_m, block_n))
                 for first, count, m in branch.classes(n))
    return StridedPlan(branch.stride, (OffsetGroup(0, _applied(branch, heads), runs),),
                       branch.on_heads)


def _random(branch: RandomBlocks, n: int, heads: int, causal: bool, block_m: int,
            block_n: int) -> RandomPlan:
    """Every head's draw (one small problem per drawn block pair), counted by class of problem."""
    table = branch.table().numpy()  # (heads, query blocks, slots), -1 for an empty slot
    if branch.on_heads is not None:
        table = table.copy()
        table[[h for h in range(heads) if not branch.applies(h)]] = -1
    return RandomPlan(branch.block, branch.blocks, branch.seed, heads,
                      BlockPairs(n, branch.block, table, causal, block_m, block_n),
                      branch.on_heads)


def _listed(geometries: tuple[Geometry, ...], n: int, heads: int, block: int) -> int:
    """About how many entries the plan lists: a band of row tiles per window, dense or global
    branch, a table of draws per random branch; dilated and strided tiles are counted per
    segment, not listed, and cost nothing here."""
    work = 0
    for g in geometries:
        if isinstance(g, RandomBlocks):
            work += heads * -(-n // g.block) * g.blocks
        elif not isinstance(g, (Dilated, Strided)):
            work += 2 * -(-n // block)
    return work


def build_plan(pattern: Pattern, seq_len: int, heads: int, kv_heads: int | None = None,
               head_dim: int | None = None, block_m: int = 64, block_n: int = 64) -> Plan:
    """The tiles that `pattern` computes at `seq_len` tokens and `heads` query heads.

    O(tiles of one segment) per branch and offset (O(N / block) for window and dense branches,
    O(tiles) for global ones, O(drawn blocks) for random ones); nothing N x N is ever built.
    """
    for flag, value in (("seq_len", seq_len), ("heads", heads), ("block_m", block_m),
                        ("block_n", block_n), ("kv_heads", kv_heads), ("head_dim", head_dim)):
        if value is not None and value < 1:
            raise SpattnError(f"{flag}: expected an integer >= 1, got {value}")
    kv_heads = kv_heads or pattern.kv_heads or heads
    if pattern.kv_heads is not None and kv_heads != pattern.kv_heads:
        raise SpattnError(f"kv_heads: pattern '{pattern.name}' is written for {pattern.kv_heads}, "
                          f"got {kv_heads}")
    if heads % kv_heads:
        raise SpattnError(f"kv_heads: expected a divisor of heads ({heads}), got {kv_heads}")
    head_dim = head_dim or pattern.head_dim
    if pattern.head_dim is not None and head_dim != pattern.head_dim:
        raise SpattnError(f"head_dim: pattern '{pattern.name}' is written for {pattern.head_dim}, "
                          f"got {head_dim}")
    try:
        geometries = resolve(pattern, seq_len, heads)
    except ValueError as error:
        raise SpattnError(f"heads: {error}") from None
    check_work(_listed(geometries, seq_len, heads, block_m),
               f"the tile list of '{pattern.name}' at N = {seq_len:,}")
    n, causal = seq_len, pattern.causal
    branches: list[BranchPlan] = []
    for spec, g in zip(pattern.expanded_branches(), geometries, strict=True):
        on = len(_applied(g, heads))  # the heads computing a window, global or dense branch
        if isinstance(g, Dilated):
            branches.append(_dilated(g, spec.segment, n, heads, causal, block_m, block_n))
        elif isinstance(g, Window):
            branches.append(WindowPlan(g.size, on, _band(n, g.size - 1, causal, block_m, block_n),
                                       g.on_heads))
        elif isinstance(g, Strided):
            branches.append(_strided(g, n, heads, causal, block_m, block_n))
        elif isinstance(g, Global):
            branches.append(GlobalPlan(g.tokens, on,
                                       TokenTiles(n, g.tokens, causal, block_m, block_n),
                                       g.on_heads))
        elif isinstance(g, RandomBlocks):
            branches.append(_random(g, n, heads, causal, block_m, block_n))
        else:
            branches.append(DensePlan(on, _band(n, n - 1, causal, block_m, block_n), g.on_heads))
    return Plan(pattern.name, pattern.content_hash(), n, heads, kv_heads, head_dim, causal,
                pattern.overlap, pattern.softmax_scale, block_m, block_n, tuple(branches))
