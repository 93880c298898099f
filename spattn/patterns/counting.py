"""Exact counts of the (head, query, key) triples a pattern allows, without an N x N mask.

Per branch the counts are closed forms (per segment length, per window edge, per global token).
The de-duplicated union of `overlap: union` is counted per head by inclusion-exclusion over
subsets of branches: the pairs that several dilated branches share lie inside one cell of the
common refinement of their segments, on one arithmetic progression per cell (Chinese remainder
theorem), so a subset costs O(cells), not O(N^2); windows only bound the distance within a cell.
Global tokens are then corrected for with per-query key counts of the other branches, only at
the tokens. N = 1,000,000 takes well under a second for LongNet-like patterns.

`brute_force_pairs` materializes the mask; it exists to test the closed forms on small N.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from spattn.patterns.geometry import Dense, Dilated, Geometry, Global, Window, resolve
from spattn.patterns.spec import Pattern


@dataclass(frozen=True)
class PairCounts:
    """Allowed (head, query, key) triples: one count per branch, and the total for the overlap."""

    branches: tuple[int, ...]
    total: int


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
    """Allowed (head, query, key) triples of one resolved branch, summed over `heads` heads."""
    n = seq_len
    if n <= 0:
        return 0
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
    if isinstance(geometry, Dense):
        return dense_pairs(n, heads, causal)
    raise TypeError(f"unknown branch geometry {geometry!r}")


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

    def dense(pos: np.ndarray) -> KeySets:
        return None, np.zeros_like(pos), np.full_like(pos, n), np.zeros_like(pos), 1

    return dense


def _combine(c: np.ndarray, m: int, c2: np.ndarray, r: int, n: int
             ) -> tuple[np.ndarray, int, np.ndarray]:
    """k = c (mod m) and k = c2 (mod r) as k = c' (mod lcm), and where that is solvable.

    Once the step reaches n, a progression holds at most one point below n (c itself), so the
    step stops growing there and numbers stay far from overflowing int64.
    """
    if m >= n:
        return c, m, (c - c2) % r == 0
    g = math.gcd(m, r)
    rg = r // g
    ok = (c2 - c) % g == 0
    inverse = pow(m // g, -1, rg) if rg > 1 else 0
    t = ((c2 - c) // g % rg) * inverse % rg
    return c + m * t, m * rg, ok


def _progression_count(lo: np.ndarray, hi: np.ndarray, c: np.ndarray, m: int) -> np.ndarray:
    """#{k in [lo, hi): k = c (mod m)} for 0 <= lo, 0 <= c < m."""
    def below(x: np.ndarray) -> np.ndarray:  # #{k in [0, x): k = c (mod m)}
        return (x - c + m - 1) // m

    return np.maximum(below(hi) - below(lo), 0)


def _union_sizes(progressions: Sequence[Progression], pos: np.ndarray, clip_lo: np.ndarray,
                 clip_hi: np.ndarray, n: int) -> np.ndarray:
    """|union of the key sets the branches give each query in `pos`, within [clip_lo, clip_hi)|.

    Inclusion-exclusion over subsets of branches, depth first; a query leaves a subtree as soon
    as its intersection is empty, so the work shrinks with every dilated branch added.
    """
    out = np.zeros(len(pos), dtype=np.int64)

    def visit(start: int, idx: np.ndarray, lo: np.ndarray, hi: np.ndarray, c: np.ndarray,
              m: int, sign: int) -> None:
        for j in range(start, len(progressions)):
            selected, lo_j, hi_j, c_j, r_j = progressions[j](pos[idx])
            lo2, hi2 = np.maximum(lo, lo_j), np.minimum(hi, hi_j)
            c2, m2, keep = _combine(c, m, c_j, r_j, n)
            if selected is not None:
                keep &= selected
            count = np.where(keep & (hi2 > lo2), _progression_count(lo2, hi2, c2, m2), 0)
            keep = count > 0
            if not keep.any():
                continue
            out[idx[keep]] += sign * count[keep]
            visit(j + 1, idx[keep], lo2[keep], hi2[keep], c2[keep], m2, -sign)

    visit(0, np.arange(len(pos)), clip_lo, clip_hi, np.zeros_like(pos), 1, 1)
    return out


# A set of (query, key) pairs of one head, as cells: in cell [x, y) the positions kept are
# k = c (mod step), and every pair of them, at distance < window when a window is in the set.
Cells = tuple[np.ndarray, np.ndarray, np.ndarray, int, int | None]


def _split(x: np.ndarray, y: np.ndarray, c: np.ndarray, w: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut every cell [x, y) at the multiples of w inside it."""
    pieces = (y - 1) // w - x // w + 1
    first = np.repeat(x, pieces)
    index = np.arange(len(first)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    start = np.where(index == 0, first, (first // w + index) * w)
    end = np.minimum(np.repeat(y, pieces), (start // w + 1) * w)
    return start, end, np.repeat(c, pieces)


def _cell_pairs(m: np.ndarray, step: int, window: int | None, causal: bool) -> int:
    """Pairs among m points spaced `step` apart, closer than `window` if there is one."""
    d = m - 1 if window is None else np.minimum(m - 1, -(-window // step) - 1)
    off_diagonal = d * m - d * (d + 1) // 2
    return int((m + (off_diagonal if causal else 2 * off_diagonal)).sum())


def _pair_union(geometries: Sequence[Geometry], head: int, n: int, causal: bool) -> int:
    """|union of the pair sets of dilated and window branches| for one head.

    Inclusion-exclusion over subsets, depth first. The pairs common to a subset's dilated
    branches are those inside one cell of the common refinement of their segments, both on the
    progression the offsets select there (Chinese remainder theorem); its windows leave the
    pairs closer than the smallest window. Cells whose progression is empty drop out.
    """
    total = 0

    def visit(start: int, cells: Cells, sign: int) -> None:
        nonlocal total
        x, y, c, step, window = cells
        for j in range(start, len(geometries)):
            g = geometries[j]
            if isinstance(g, Window):
                m = _progression_count(x, y, c, step)
                new = (x, y, c, step, g.size if window is None else min(window, g.size))
            else:
                w, r = g.segment, g.dilation
                x2, y2, c2 = _split(x, y, c, w)
                c2, step2, ok = _combine(c2, step, (x2 - x2 % w + g.offsets[head]) % r, r, n)
                m = np.where(ok, _progression_count(x2, y2, c2, step2), 0)
                keep = m > 0
                m, new = m[keep], (x2[keep], y2[keep], c2[keep], step2, window)
            if len(m) == 0:
                continue
            total += sign * _cell_pairs(m, new[3], new[4], causal)
            visit(j + 1, new, -sign)

    zero = np.zeros(1, dtype=np.int64)
    visit(0, (zero, np.full(1, n, dtype=np.int64), zero, 1, None), 1)
    return total


def _union_one_head(geometries: Sequence[Geometry], head: int, n: int, causal: bool) -> int:
    if any(isinstance(g, Dense) for g in geometries):
        return dense_pairs(n, 1, causal)
    local = [g for g in geometries if not isinstance(g, Global)]
    total = _pair_union(local, head, n, causal)
    tokens = np.array(sorted({t for g in geometries if isinstance(g, Global)
                              for t in g.tokens if t < n}), dtype=np.int64)
    if len(tokens) == 0:
        return total
    # Global pairs G (a token's row or column) add |G| - |G & U|, U the other branches' pairs.
    # |G & U| = the tokens' rows of U + their columns - U on token x token. Every relation in U
    # is symmetric, so column g holds |U(g) within [g, n)| pairs (causal; else all of U(g)).
    total += branch_pairs(Global(tuple(tokens.tolist())), n, 1, causal)
    progressions = [_progression(g, head, n) for g in local]
    zero, end = np.zeros_like(tokens), np.full_like(tokens, n)
    rows = _union_sizes(progressions, tokens, zero, tokens + 1 if causal else end, n)
    columns = _union_sizes(progressions, tokens, tokens if causal else zero, end, n)
    return total - int(rows.sum()) - int(columns.sum()) + _token_pairs_in_union(
        local, head, tokens, causal)


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
    # Heads with the same dilated offsets see the same keys: count each kind of head once.
    heads_of: dict[tuple[int, ...], list[int]] = {}
    for h in range(heads):
        kind = tuple(g.offsets[h] for g in geometries if isinstance(g, Dilated))
        heads_of.setdefault(kind, []).append(h)
    return sum(len(same) * _union_one_head(geometries, same[0], seq_len, causal)
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
