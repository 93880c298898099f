"""Exact counts of the (head, query, key) triples a pattern allows, without an N x N mask.

Per branch the counts are closed forms (per segment length, per window edge, per global token,
per residue class of a stride, per random tile). The de-duplicated union of `overlap: union` is
counted per head by inclusion-exclusion over subsets of branches: the pairs that several dilated
branches share lie inside one cell of the common refinement of their segments, on one
arithmetic progression per cell (Chinese remainder theorem), so a subset costs O(cells), not
O(N^2); windows only bound the distance within a cell, and a stride splits a cell into residue
classes. Random blocks are added row by row: each query's drawn key runs, less what the other
branches already give it. Global tokens are then corrected for with per-query key counts of the
other branches, only at the tokens. N = 1,000,000 takes well under a second for LongNet-like
patterns, about a second for BigBird's.

`brute_force_pairs` materializes the mask; it exists to test the closed forms on small N.

Only random blocks and the union are not closed forms: past MAX_WORK elements of work (a random
table of heads x N / block x blocks draws, or the union's cells) they raise WorkLimitError
rather than take minutes and gigabytes. Counts past 2^63 are exact: arrays whose products might
overflow int64 become Python integers (few of them, at such N).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from spattn.limits import check_work
from spattn.patterns.arrays import ragged
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
class PairCounts:
    """Allowed (head, query, key) triples: one count per branch, and the total for the overlap."""

    branches: tuple[int, ...]
    total: int


class _Work:
    """Elements of work spent so far on one count, refused past MAX_WORK (`what` names it)."""

    VISIT = 1000  # one step of inclusion-exclusion: numpy's overhead, as elements

    def __init__(self, what: str) -> None:
        self.what, self.spent = what, 0

    def spend(self, elements: int) -> None:
        self.spent += elements
        check_work(self.spent, self.what)


def _exact(values: np.ndarray, n: int) -> np.ndarray:
    """`values` as Python integers when products of them may pass int64 (N past 2^31)."""
    return values.astype(object) if n > 2**31 else values


DRAW_OVERHEAD = 1000  # elements of work a head's draw costs per slot besides its rows


def draw_work(rows: int, slots: int) -> int:
    """About how many elements drawing `slots` key blocks for `rows` query blocks of one head
    takes: slot by slot, a few dozen passes over the rows, each comparing with the slots drawn
    before it (spattn/patterns/blocks.py), and numpy's overhead per slot."""
    return slots * (rows * (1 + slots // 8) + DRAW_OVERHEAD)


def random_table_work(geometry: RandomBlocks) -> int:
    """About how many elements drawing the whole table takes, head by head."""
    rows = -(-geometry.seq_len // geometry.block)
    return geometry.heads * draw_work(rows, min(geometry.blocks, rows))


def check_random_table(geometry: RandomBlocks) -> None:
    """WorkLimitError when drawing the table (heads x query blocks x blocks) passes MAX_WORK."""
    check_work(random_table_work(geometry),
               f"random blocks ({geometry.blocks} of {geometry.block} tokens, "
               f"{geometry.heads} heads) at N = {geometry.seq_len:,}")


# --- costs (SEMANTICS.md, "Costs") ----------------------------------------------------------------


def dense_pairs(seq_len: int, heads: int, causal: bool) -> int:
    """Pairs of dense attention: N^2 per head, N(N+1)/2 when causal."""
    per_head = seq_len * (seq_len + 1) // 2 if causal else seq_len * seq_len
    return heads * per_head


def useful_flops(pairs: int, head_dim: int, batch: int = 1) -> int:
    """Forward useful FLOPs: 2 for QK^T and 2 for PV per allowed pair (a backward pass: 2.5x)."""
    return 4 * head_dim * batch * pairs


def density(pairs: int, seq_len: int, heads: int, causal: bool) -> float:
    """The fraction of dense attention's pairs that the pattern allows."""
    dense = dense_pairs(seq_len, heads, causal)
    return pairs / dense if dense else 0.0


def speedup_bound(pairs: int, seq_len: int, heads: int, causal: bool) -> float:
    """How many times less useful work than dense attention: dense pairs / allowed pairs."""
    return dense_pairs(seq_len, heads, causal) / pairs if pairs else math.inf


# --- per branch -------------------------------------------------------------------------------


def _pairs_in_block(rows: int, causal: bool) -> int:
    return rows * (rows + 1) // 2 if causal else rows * rows


def branch_pairs(geometry: Geometry, seq_len: int, heads: int, causal: bool) -> int:
    """Allowed (head, query, key) triples of one resolved branch, summed over `heads` heads
    (those it applies to)."""
    n = seq_len
    if n <= 0:
        return 0
    if geometry.on_heads is not None:  # every kind below counts per head: sum over its heads
        active = sorted(h for h in geometry.on_heads if h < heads)
        if isinstance(geometry, Dilated):
            offsets = tuple(geometry.offsets[h] for h in active)
            geometry = replace(geometry, offsets=offsets, on_heads=None)
        elif isinstance(geometry, RandomBlocks):
            return _random_pairs(geometry, n, heads, causal, active)
        else:
            return len(active) * branch_pairs(replace(geometry, on_heads=None), n, 1, causal)
        heads = len(active)
    if isinstance(geometry, Dilated):
        # Every segment has length w' except a shorter last one; a head with offset s keeps
        # m = ceil((L - s) / r) rows of a segment of length L, i.e. m^2 pairs (causal m(m+1)/2).
        full, last = divmod(n, geometry.segment)
        total = 0
        for offset, count in Counter(geometry.offsets[:heads]).items():
            per_head = full * _pairs_in_block(geometry.rows_in(geometry.segment, offset), causal)
            per_head += _pairs_in_block(geometry.rows_in(last, offset), causal)
            total += count * per_head
        return total
    if isinstance(geometry, Window):
        # Distance d = |p - k| in [1, D] occurs n - d times; the diagonal n times.
        d = min(geometry.size - 1, n - 1)
        off_diagonal = d * n - d * (d + 1) // 2
        return heads * (n + (off_diagonal if causal else 2 * off_diagonal))
    if isinstance(geometry, Global):
        tokens = [t for t in geometry.tokens if t < n]
        t = len(tokens)
        if causal:  # rows of the tokens + columns of the tokens - pairs counted in both
            per_head = sum(q + 1 for q in tokens) + sum(n - k for k in tokens) - t * (t + 1) // 2
        else:
            per_head = 2 * t * n - t * t
        return heads * per_head
    if isinstance(geometry, Strided):
        # Each residue class of m rows is a clique: m^2 pairs (causal m(m+1)/2), every head.
        return heads * sum(count * _pairs_in_block(m, causal)
                           for _, count, m in geometry.classes(n))
    if isinstance(geometry, RandomBlocks):
        return _random_pairs(geometry, n, heads, causal)
    if isinstance(geometry, Dense):
        return dense_pairs(n, heads, causal)
    raise TypeError(f"unknown branch geometry {geometry!r}")


def _block_rows(block: int, n: int) -> np.ndarray:
    """Tokens in each block [i*block, (i+1)*block) of a sequence of n tokens."""
    return np.minimum(n - np.arange(-(-n // block)) * block, block)


def _random_pairs(geometry: RandomBlocks, n: int, heads: int, causal: bool,
                  active: Sequence[int] | None = None) -> int:
    """Sum over (head, query block i, drawn key block j) of the tile's pairs: rows_i * rows_j,
    or rows_i (rows_i + 1) / 2 on the diagonal when causal (and none above it); over the
    `active` heads when given."""
    check_random_table(geometry)
    table = geometry.table()[:heads].numpy()  # (heads, query blocks, slots)
    if active is not None:
        table = table[list(active)]
    rows = _exact(_block_rows(geometry.block, n), n)
    query_rows = rows[None, :table.shape[1], None]
    tile = query_rows * rows[np.maximum(table, 0)]
    if causal:
        below = np.arange(table.shape[1])[None, :, None]
        tile = np.where(table < below, tile,
                        np.where(table == below, query_rows * (query_rows + 1) // 2, 0))
    return int(np.where(table >= 0, tile, 0).sum())


# --- the union -----------------------------------------------------------------------------------

# One branch, seen from a vector of query positions: (selected, lo, hi, residue, step), meaning
# the branch gives query p the keys k in [lo, hi) with k = residue (mod step), if selected.
KeySets = tuple[np.ndarray | None, np.ndarray, np.ndarray, np.ndarray, int]
Progression = Callable[[np.ndarray], KeySets]


def _progression(geometry: Geometry, head: int, n: int) -> Progression:
    if isinstance(geometry, Dilated):
        w, r, s = geometry.segment, geometry.dilation, geometry.offsets[head]

        def dilated(pos: np.ndarray) -> KeySets:
            start = pos - pos % w
            return (pos - start) % r == s, start, np.minimum(start + w, n), (start + s) % r, r

        return dilated
    if isinstance(geometry, Window):
        size = geometry.size

        def window(pos: np.ndarray) -> KeySets:
            lo, hi = np.maximum(pos - size + 1, 0), np.minimum(pos + size, n)
            return None, lo, hi, np.zeros_like(pos), 1

        return window
    if isinstance(geometry, Strided):
        stride = geometry.stride

        def strided(pos: np.ndarray) -> KeySets:
            return None, np.zeros_like(pos), np.full_like(pos, n), pos % stride, stride

        return strided

    def dense(pos: np.ndarray) -> KeySets:
        return None, np.zeros_like(pos), np.full_like(pos, n), np.zeros_like(pos), 1

    return dense


def _combine(c: np.ndarray, m: int, c2: np.ndarray, r: int, n: int
             ) -> tuple[np.ndarray, int, np.ndarray | None]:
    """k = c (mod m) and k = c2 (mod r) as k = c' (mod lcm), and where that is solvable (None:
    everywhere).

    Once the step reaches n, a progression holds at most one point below n (c itself), so the
    step stops growing there and numbers stay far from overflowing int64.
    """
    if r == 1:
        return c, m, None
    if m == 1:
        return c2, r, None
    if m >= n:
        return c, m, (c - c2) % r == 0
    g = math.gcd(m, r)
    rg = r // g
    if m * rg >= 2**62:  # the new step would overflow int64: compute it in Python integers
        c, c2 = np.asarray(c).astype(object), np.asarray(c2).astype(object)
    ok = (c2 - c) % g == 0
    inverse = pow(m // g, -1, rg) if rg > 1 else 0
    t = ((c2 - c) // g % rg) * inverse % rg
    return c + m * t, m * rg, ok


def _progression_count(lo: np.ndarray, hi: np.ndarray, c: np.ndarray, m: int) -> np.ndarray:
    """#{k in [lo, hi): k = c (mod m)} for 0 <= lo, 0 <= c < m."""
    if m == 1:
        return np.maximum(hi - lo, 0)

    def below(x: np.ndarray) -> np.ndarray:  # #{k in [0, x): k = c (mod m)}
        return (x - c + m - 1) // m

    return np.maximum(below(hi) - below(lo), 0)


def _union_sizes(progressions: Sequence[Progression], pos: np.ndarray,
                 clip_lo: np.ndarray | int, clip_hi: np.ndarray | int, n: int, work: _Work
                 ) -> np.ndarray:
    """|union of the key sets the branches give each query in `pos`, within [clip_lo, clip_hi)|.

    Inclusion-exclusion over subsets of branches, depth first; a query leaves a subtree as soon
    as its intersection is empty, so the work shrinks with every dilated branch added.
    """
    out = np.zeros(len(pos), dtype=np.int64)

    def visit(start: int, idx: np.ndarray | None, lo: np.ndarray, hi: np.ndarray, c: np.ndarray,
              m: int, sign: int) -> None:
        at = pos if idx is None else pos[idx]  # idx None: every query
        for j in range(start, len(progressions)):
            work.spend(len(at) + work.VISIT)
            selected, lo_j, hi_j, c_j, r_j = progressions[j](at)
            lo2, hi2 = np.maximum(lo, lo_j), np.minimum(hi, hi_j)
            c2, m2, ok = _combine(c, m, c_j, r_j, n)
            count = _progression_count(lo2, hi2, c2, m2)
            for mask in (ok, selected):
                if mask is not None:
                    count = np.where(mask, count, 0)
            keep = np.flatnonzero(count)
            if len(keep) == 0:
                continue
            out[keep if idx is None else idx[keep]] += sign * count[keep]
            visit(j + 1, keep if idx is None else idx[keep], lo2[keep], hi2[keep], c2[keep], m2,
                  -sign)

    lo, hi = (np.broadcast_to(x, pos.shape) for x in (clip_lo, clip_hi))
    visit(0, None, lo, hi, np.zeros_like(pos), 1, 1)
    return out


# A set of (query, key) pairs of one head, as cells: in cell [x, y) the positions kept are
# k = c (mod step), and every pair of them, at distance < window when a window is in the set.
Cells = tuple[np.ndarray, np.ndarray, np.ndarray, int, int | None]


def _split(x: np.ndarray, y: np.ndarray, c: np.ndarray, w: int, work: _Work
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut every cell [x, y) at the multiples of w inside it."""
    pieces = (y - 1) // w - x // w + 1
    work.spend(int(pieces.sum()))
    cell, index = ragged(pieces)
    first = x[cell]
    start = np.where(index == 0, first, (first // w + index) * w)
    end = np.minimum(y[cell], (start // w + 1) * w)
    return start, end, c[cell]


def _residue_classes(x: np.ndarray, y: np.ndarray, c: np.ndarray, step: int, stride: int,
                     n: int, work: _Work) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Split each cell's progression k = c (mod step) into its classes modulo lcm(step, stride),
    keeping the classes with a point in the cell (so never more cells than points)."""
    if step >= n:  # at most one point per cell: a stride keeps its one (diagonal) pair
        return x, y, c, step
    stride = min(stride, n)  # (p - k) mod L == 0 means p == k for every L >= n
    classes = stride // math.gcd(step, stride)
    kept = np.minimum(_progression_count(x, y, c, step), classes)
    work.spend(int(kept.sum()))
    first = x + (c - x) % step  # the cell's first point
    cell, index = ragged(kept)
    lcm = step * classes
    return x[cell], y[cell], (first[cell] + step * index) % lcm, lcm


def _cell_pairs(m: np.ndarray, step: int, window: int | None, causal: bool) -> int:
    """Pairs among m points spaced `step` apart, closer than `window` if there is one."""
    if len(m) and int(m.max()) > 2**22:  # m^2 summed over the cells might pass int64
        m = m.astype(object)
    d = m - 1 if window is None else np.minimum(m - 1, -(-window // step) - 1)
    off_diagonal = d * m - d * (d + 1) // 2
    return int((m + (off_diagonal if causal else 2 * off_diagonal)).sum())


def _pair_union(geometries: Sequence[Geometry], head: int, n: int, causal: bool, work: _Work
                ) -> int:
    """|union of the pair sets of dilated, window and strided branches| for one head.

    Inclusion-exclusion over subsets, depth first. The pairs common to a subset's dilated
    branches are those inside one cell of the common refinement of their segments, both on the
    progression the offsets select there (Chinese remainder theorem); its windows leave the
    pairs closer than the smallest window; its strides keep the pairs within one residue class
    of each cell. Cells whose progression is empty drop out.
    """
    total = 0

    def visit(start: int, cells: Cells, sign: int) -> None:
        nonlocal total
        x, y, c, step, window = cells
        for j in range(start, len(geometries)):
            work.spend(len(x) + work.VISIT)
            g = geometries[j]
            if isinstance(g, Window):
                m = _progression_count(x, y, c, step)
                new = (x, y, c, step, g.size if window is None else min(window, g.size))
            elif isinstance(g, Strided):
                new = (*_residue_classes(x, y, c, step, g.stride, n, work), window)
                m = _progression_count(*new[:4])
            else:
                w, r = g.segment, g.dilation
                x2, y2, c2 = _split(x, y, c, w, work)
                c2, step2, ok = _combine(c2, step, (x2 - x2 % w + g.offsets[head]) % r, r, n)
                m = _progression_count(x2, y2, c2, step2)
                m = m if ok is None else np.where(ok, m, 0)
                keep = m > 0
                m, new = m[keep], (x2[keep], y2[keep], c2[keep], step2, window)
            if len(m) == 0:
                continue
            total += sign * _cell_pairs(m, new[3], new[4], causal)
            visit(j + 1, new, -sign)

    zero = np.zeros(1, dtype=np.int64)
    visit(0, (zero, np.full(1, n, dtype=np.int64), zero, 1, None), 1)
    return total


def _essential(geometries: Sequence[Geometry], head: int) -> list[Geometry]:
    """The dilated, window and strided branches less those inside another (their union is the
    same), so that inclusion-exclusion does not visit 2^B subsets of B equal windows.

    Windows nest (only the largest counts); a stride that a smaller one divides keeps a subset
    of its pairs; a dilated branch repeated with this head's offset adds nothing.
    """
    windows = [g for g in geometries if isinstance(g, Window)]
    strides = sorted({g.stride for g in geometries if isinstance(g, Strided)})
    dilated = {(g.segment, g.dilation, g.offsets[head]): g for g in geometries
               if isinstance(g, Dilated)}
    kept: list[Geometry] = list(dilated.values())
    kept += [max(windows, key=lambda g: g.size)] if windows else []
    kept += [Strided(s) for i, s in enumerate(strides) if all(s % t for t in strides[:i])]
    return kept


def _union_one_head(geometries: Sequence[Geometry], head: int, n: int, causal: bool,
                    work: _Work) -> int:
    if any(isinstance(g, Dense) for g in geometries):
        return dense_pairs(n, 1, causal)
    local = [g for g in geometries if not isinstance(g, Global)]
    symmetric = _essential(local, head)  # (p, k) in them iff (k, p)
    randoms = [g for g in local if isinstance(g, RandomBlocks)]
    progressions = [_progression(g, head, n) for g in symmetric]
    total = _pair_union(symmetric, head, n, causal, work)
    if randoms:
        total += _random_beyond(symmetric, progressions, randoms, head, n, causal, work)
    tokens = np.array(sorted({t for g in geometries if isinstance(g, Global)
                              for t in g.tokens if t < n}), dtype=np.int64)
    if len(tokens) == 0:
        return total
    # Global pairs G (a token's row or column) add |G| - |G & U|, U the other branches' pairs.
    # |G & U| = the tokens' rows of U + their columns - U on token x token. The symmetric
    # branches' column g is their row g (within [g, n) when causal); the random branches'
    # column g is the query blocks that drew g's block.
    total += branch_pairs(Global(tuple(tokens.tolist())), n, 1, causal)
    zero, end = np.zeros_like(tokens), np.full_like(tokens, n)
    row_hi, column_lo = (tokens + 1, tokens) if causal else (end, zero)
    rows = int(_union_sizes(progressions, tokens, zero, row_hi, n, work).sum(dtype=object))
    columns = int(_union_sizes(progressions, tokens, column_lo, end, n, work).sum(dtype=object))
    if randoms:
        rows += _runs_beyond(progressions, tokens, _key_runs(randoms, head, tokens, n), zero,
                             row_hi, n, work)
        columns += _runs_beyond(progressions, tokens, _query_runs(randoms, head, tokens, n),
                                column_lo, end, n, work)
    work.spend(len(tokens) ** 2 * len(local) // 4)  # token x token masks, vectorized, chunked
    return total - rows - columns + _token_pairs_in_union(local, head, tokens, causal)


def _random_beyond(symmetric: Sequence[Geometry], progressions: Sequence[Progression],
                   randoms: Sequence[RandomBlocks], head: int, n: int, causal: bool,
                   work: _Work) -> int:
    """|random pairs of one head that the symmetric branches do not have|.

    Rows in one block of every random branch see the same key runs: a tile (those rows x one
    run) that no symmetric branch can reach counts whole; the rows of the others, one by one.
    """
    for g in randoms:
        work.spend(-(-n // g.block) * g.blocks)
    starts = np.unique(np.concatenate([np.arange(0, n, g.block) for g in randoms]))
    ends = np.append(starts[1:], n)
    owner, lo, hi = _key_runs(randoms, head, starts, n)
    a, a2 = starts[owner], ends[owner]
    near = _may_meet(symmetric, a, a2, lo, hi)
    far = [_exact(x[~near], n) for x in (a, a2, lo, hi)]
    total = int(_tile_size(*far, causal).sum())
    a, a2, lo, hi = a[near], a2[near], lo[near], hi[near]
    work.spend(int((a2 - a).sum()))  # the rows of the tiles a symmetric branch may reach
    tile, row = ragged(a2 - a)
    pos = a[tile] + row
    runs = (np.arange(len(pos)), lo[tile], hi[tile])
    return total + _runs_beyond(progressions, pos, runs, 0, pos + 1 if causal else n, n, work)


def _may_meet(geometries: Sequence[Geometry], a: np.ndarray, a2: np.ndarray, lo: np.ndarray,
              hi: np.ndarray) -> np.ndarray:
    """Whether a branch may give a query in [a, a2) a key in [lo, hi) (False: surely not)."""
    near = np.zeros(len(a), dtype=bool)
    for g in geometries:
        if isinstance(g, Window):  # the tile's closest pair is nearer than the window
            near |= np.maximum(lo - a2 + 1, a - hi + 1) < g.size
        elif isinstance(g, Dilated):  # a query segment holds a key
            w = g.segment
            near |= (a // w <= (hi - 1) // w) & (lo // w <= (a2 - 1) // w)
        else:  # a stride reaches every tile
            return np.ones(len(a), dtype=bool)
    return near


def _tile_size(a: np.ndarray, a2: np.ndarray, lo: np.ndarray, hi: np.ndarray, causal: bool
               ) -> np.ndarray:
    """#{(p, k): a <= p < a2, lo <= k < hi, and k <= p when causal}."""
    if not causal:
        return (a2 - a) * (hi - lo)
    width = hi - lo

    def before(x: np.ndarray) -> np.ndarray:  # the rows p < x: p + 1 - lo keys each, in [0, width]
        u = np.clip(x - lo, 0, width)
        return u * (u + 1) // 2 + np.maximum(x - hi, 0) * width

    return before(a2) - before(a)


# Runs of positions, several per query: (owner, lo, hi), the run [lo, hi) of query pos[owner].
Runs = tuple[np.ndarray, np.ndarray, np.ndarray]


def _runs_beyond(progressions: Sequence[Progression], pos: np.ndarray, runs: Runs,
                 clip_lo: np.ndarray | int, clip_hi: np.ndarray | int, n: int, work: _Work
                 ) -> int:
    """Sum over queries of |their runs within [clip_lo, clip_hi), less the progressions' keys|.

    A query's runs must be disjoint; then this is |(S u runs) & clip| - |S & clip|, S the keys
    the progressions give it.
    """
    owner, lo, hi = runs
    lo = np.maximum(lo, np.broadcast_to(clip_lo, pos.shape)[owner])
    hi = np.minimum(hi, np.broadcast_to(clip_hi, pos.shape)[owner])
    keep = hi > lo
    owner, lo, hi = owner[keep], lo[keep], hi[keep]
    inside = _union_sizes(progressions, pos[owner], lo, hi, n, work)
    return int((hi - lo).sum(dtype=object) - inside.sum(dtype=object))


def _key_runs(randoms: Sequence[RandomBlocks], head: int, pos: np.ndarray, n: int) -> Runs:
    """The keys the random branches give each query in `pos`, as disjoint runs."""
    parts = []
    for g in randoms:
        drawn = g.table()[head].numpy()[pos // g.block]  # (queries, slots), sorted, -1 last
        owner, slot = np.nonzero(drawn >= 0)
        lo = drawn[owner, slot] * g.block
        parts.append((owner, lo, np.minimum(lo + g.block, n)))
    return _disjoint(parts, n)


def _query_runs(randoms: Sequence[RandomBlocks], head: int, keys: np.ndarray, n: int) -> Runs:
    """The queries the random branches give each key in `keys` to, as disjoint runs: the query
    blocks whose draw holds the key's block."""
    parts = []
    for g in randoms:
        table = g.table()[head].numpy()
        query_block, slot = np.nonzero(table >= 0)
        key_block = table[query_block, slot]
        order = np.argsort(key_block, kind="stable")  # by key block, then query block
        key_block, query_block = key_block[order], query_block[order]
        first = np.searchsorted(key_block, keys // g.block, "left")
        count = np.searchsorted(key_block, keys // g.block, "right") - first
        owner, index = ragged(count)
        entry = first[owner] + index
        lo = query_block[entry] * g.block
        parts.append((owner, lo, np.minimum(lo + g.block, n)))
    return _disjoint(parts, n)


def _disjoint(parts: Sequence[Runs], n: int) -> Runs:
    """The runs of all parts, each owner's made disjoint (overlapping runs merged).

    Within one part every owner's runs are already disjoint and increasing.
    """
    if len(parts) == 1:
        return parts[0]
    owner, lo, hi = (np.concatenate(column) for column in zip(*parts, strict=True))
    if len(owner) == 0:
        return owner, lo, hi
    order = np.lexsort((lo, owner))
    owner, lo, hi = owner[order], lo[order], hi[order]
    # A run starts a new piece unless an earlier run of its owner reaches past its start.
    reach = np.maximum.accumulate(owner * (n + 1) + hi)  # owners are kept apart by n + 1
    starts = np.flatnonzero(np.concatenate([[True], reach[:-1] <= owner[1:] * (n + 1) + lo[1:]]))
    return owner[starts], lo[starts], np.maximum.reduceat(hi, starts)


def _token_pairs_in_union(geometries: Sequence[Geometry], head: int, tokens: np.ndarray,
                          causal: bool, chunk: int = 1024) -> int:
    """#{(p, g) in T x T: a non-global branch allows (p, g); p >= g when causal}."""
    keys = torch.from_numpy(tokens)
    found = 0
    for start in range(0, len(tokens), chunk):
        queries = keys[start:start + chunk, None]
        allowed = torch.zeros(len(queries), len(keys), dtype=torch.bool)
        for g in geometries:
            if not isinstance(g, Global):
                allowed |= g.allows(head, queries, keys[None, :])
        if causal:
            allowed &= keys[None, :] <= queries
        found += int(allowed.sum())
    return found


def union_pairs(geometries: Sequence[Geometry], seq_len: int, heads: int, causal: bool) -> int:
    """Size of the de-duplicated union of the branches' (head, query, key) triples."""
    if seq_len <= 0:
        return 0
    # Heads with the same dilated offsets see the same keys, unless random blocks are drawn per
    # head: count each kind of head once.
    per_head = any(isinstance(g, RandomBlocks) for g in geometries)
    for g in geometries:
        if isinstance(g, RandomBlocks):
            check_random_table(g)
    work = _Work(f"the union of the branches at N = {seq_len:,}")
    work.spend(heads * len(geometries))
    heads_of: dict[tuple[int, ...], list[int]] = {}
    for h in range(heads):  # a kind: the branches a head has, their offsets (and its draws)
        kind = tuple(int(g.applies(h)) for g in geometries)
        kind += tuple(g.offsets[h] for g in geometries if isinstance(g, Dilated))
        kind += (h,) if per_head else ()
        heads_of.setdefault(kind, []).append(h)
    return sum(len(same) * _union_one_head([g for g in geometries if g.applies(same[0])],
                                           same[0], seq_len, causal, work)
               for same in heads_of.values())


# --- whole patterns ---------------------------------------------------------------------------


def count_pairs(pattern: Pattern, seq_len: int, heads: int) -> PairCounts:
    """Per-branch and total allowed triples of `pattern` at `seq_len` tokens and `heads` heads."""
    geometries = resolve(pattern, seq_len, heads)
    per_branch = tuple(branch_pairs(g, seq_len, heads, pattern.causal) for g in geometries)
    if pattern.overlap == "union":
        total = union_pairs(geometries, seq_len, heads, pattern.causal)
    else:  # multiset: a key two branches both give counts twice
        total = sum(per_branch)
    return PairCounts(per_branch, total)


def branch_mask(geometry: Geometry, head: int, seq_len: int, causal: bool,
                tokens: int | None = None) -> torch.Tensor:
    """The (tokens x tokens) corner of one head's boolean mask for one branch (materialized)."""
    size = seq_len if tokens is None else min(tokens, seq_len)
    pos = torch.arange(size)
    mask = geometry.allows(head, pos[:, None], pos[None, :])
    if causal:
        mask = mask & (pos[None, :] <= pos[:, None])
    return mask


def brute_force_pairs(pattern: Pattern, seq_len: int, heads: int) -> PairCounts:
    """`count_pairs` by materializing every mask: for tests, small N only."""
    geometries = resolve(pattern, seq_len, heads)
    per_branch = [0] * len(geometries)
    total = 0
    for head in range(heads):
        masks = [branch_mask(g, head, seq_len, pattern.causal) for g in geometries]
        for i, mask in enumerate(masks):
            per_branch[i] += int(mask.sum())
        if pattern.overlap == "union":
            total += int(torch.stack(masks).any(0).sum())
    if pattern.overlap != "union":
        total = sum(per_branch)
    return PairCounts(tuple(per_branch), total)
