"""A pattern as other systems' block-sparse layouts, tiled over *original* positions.

- `to_flex`: a `mask_mod` and `BlockMask` for torch's FlexAttention.
- `dense_layout`: a DeepSpeed-style (heads, blocks, blocks) 0/1 layout, for small N.
- `block_sparse_tiles`: how many tiles such a kernel computes (what spattn's plan is measured
  against), counted from per-row-tile column ranges without an N x N mask.

FlexAttention and block layouts hold one 0/1 mask per head, so they express the *union* of the
branches (each on the heads it applies to): a key that two branches give a query counts once. A
`multiset` pattern whose branches overlap (see `overlaps`) therefore exports the union mask, which
is not exactly that pattern.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from spattn.compiler.tiles import Band, TokenTiles
from spattn.errors import SpattnError
from spattn.patterns.arrays import ragged
from spattn.patterns.counting import count_pairs
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

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

MAX_LAYOUT_BLOCKS = 4096  # blocks per side that dense_layout will build

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def overlaps(pattern: Pattern, seq_len: int, heads: int) -> bool:
    """Whether two branches give some query the same key (then multiset != union)."""
    multiset = count_pairs(pattern.model_copy(update={"overlap": "multiset"}), seq_len, heads)
    union = count_pairs(pattern.model_copy(update={"overlap": "union"}), seq_len, heads)
    return multiset.total != union.total


# --- FlexAttention --------------------------------------------------------------------------------


def _branch_mod(g: Geometry, n: int, heads: int, device: torch.device | str) -> MaskMod:
    """One branch's predicate on (batch, head, query, key) index tensors, torch ops only."""
    mod = _kind_mod(g, n, device)
    if g.on_heads is None:
        return mod
    on = torch.tensor([g.applies(h) for h in range(heads)], device=device)

    def some_heads(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                   ) -> torch.Tensor:
        return on[h] & mod(b, h, q, k)

    return some_heads


def _kind_mod(g: Geometry, n: int, device: torch.device | str) -> MaskMod:
    """A branch kind's predicate, for every head."""
    if isinstance(g, Dilated):
        w, r = g.segment, g.dilation
        offsets = torch.tensor(g.offsets, dtype=torch.int64, device=device)

        def dilated(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                    ) -> torch.Tensor:
            s = offsets[h]
            return (q // w == k // w) & ((q % w) % r == s) & ((k % w) % r == s)

        return dilated
    if isinstance(g, Window):
        size = g.size
        return lambda b, h, q, k: (q - k).abs() < size
    if isinstance(g, Strided):
        stride = g.stride
        return lambda b, h, q, k: (q - k) % stride == 0
    if isinstance(g, RandomBlocks):
        return _random_mod(g, n, device)
    if isinstance(g, Global):
        is_token = torch.zeros(max(n, 1), dtype=torch.bool, device=device)
        is_token[list(g.tokens)] = True
        last = max(n - 1, 0)  # indices past N (block padding) are never real pairs

        def global_(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                    ) -> torch.Tensor:
            return is_token[q.clamp(0, last)] | is_token[k.clamp(0, last)]

        return global_
    return lambda b, h, q, k: (q >= 0) | (k >= 0)  # dense: every pair (shapes broadcast)


def _random_mod(g: RandomBlocks, n: int, device: torch.device | str) -> MaskMod:
    """k // block against each slot of table[h, q // block], unrolled so that it stays
    elementwise (traceable by FlexAttention's vmap); -1 slots never match."""
    table = g.table().to(device)  # (heads, query blocks, slots)
    block, slots, last = g.block, g.blocks, max(n - 1, 0)  # clamp: indices past N are padding

    def random_(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor
                ) -> torch.Tensor:
        row, key = q.clamp(0, last) // block, k.clamp(0, last) // block
        allowed = table[h, row, 0] == key
        for slot in range(1, slots):
            allowed = allowed | (table[h, row, slot] == key)
        return allowed

    return random_


def flex_mask_mod(pattern: Pattern, seq_len: int, heads: int,
                  device: torch.device | str = "cpu") -> MaskMod:
    """FlexAttention's mask_mod(b, h, q_idx, kv_idx) for the union of the pattern's branches."""
    mods = [_branch_mod(g, seq_len, heads, device) for g in resolve(pattern, seq_len, heads)]
    causal = pattern.causal

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
                 ) -> torch.Tensor:
        allowed = mods[0](b, h, q_idx, kv_idx)
        for mod in mods[1:]:
            allowed = allowed | mod(b, h, q_idx, kv_idx)
        return allowed & (kv_idx <= q_idx) if causal else allowed

    return mask_mod


def to_flex(pattern: Pattern, seq_len: int, heads: int, device: torch.device | str = "cpu",
            block_size: int = 128) -> tuple[MaskMod, BlockMask]:
    """(mask_mod, BlockMask) for `flex_attention(q, k, v, block_mask=...)` (union semantics)."""
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod = flex_mask_mod(pattern, seq_len, heads, device)
    block_mask = create_block_mask(mask_mod, None, heads, seq_len, seq_len, device=device,
                                   BLOCK_SIZE=block_size)
    return mask_mod, block_mask


# --- block-sparse tiles over original positions ---------------------------------------------------

# Column-tile ranges [lo, hi) per row tile; they may overlap (their union is the tile set).
Ranges = tuple[np.ndarray, np.ndarray, np.ndarray]


def _dilated_ranges(g: Dilated, head: int, n: int, causal: bool, block: int) -> Ranges:
    w, r, s = g.segment, g.dilation, g.offsets[head]
    starts = np.arange(0, n, w, dtype=np.int64)
    m = np.maximum((np.minimum(w, n - starts) - s + r - 1) // r, 0)  # rows kept per segment
    starts, m = starts[m > 0], m[m > 0]
    first, last = starts + s, starts + s + r * (m - 1)  # first and last kept row
    if r <= block:
        # Kept rows are at most `block` apart, so every tile between two of them holds one: the
        # segment's row tiles are contiguous, and so are the key tiles each of them reaches.
        seg, index = ragged(last // block - first // block + 1)
        row = first[seg] // block + index
        top = np.minimum((row + 1) * block - 1, last[seg])  # last position of the row tile
        reach = first[seg] + r * ((top - first[seg]) // r) if causal else last[seg]
        return row, first[seg] // block, reach // block + 1
    # r > block: every kept row (and key) has a tile of its own, so tiles = pairs of kept rows.
    seg, i = ragged(m)  # i: row index in its segment
    pair, j = ragged(i + 1 if causal else m[seg])
    row = (first[seg] + r * i)[pair] // block
    col = (first[seg][pair] + r * j) // block
    return row, col, col + 1


def _strided_ranges(g: Strided, n: int, causal: bool, block: int) -> Ranges:
    """Row tile [a0, a1] sees the keys [a0 - t*L, a1 - t*L] within [0, N), for every t that
    leaves one there (causal: t >= 0). When the tile has >= L rows, consecutive t's runs touch
    and the row tile sees one run of keys; otherwise each t is a range of its own."""
    stride = g.stride
    a0 = np.arange(0, n, block, dtype=np.int64)
    a1 = np.minimum(a0 + block, n) - 1
    t_lo = np.zeros_like(a0) if causal else -((n - 1 - a0) // stride)  # keys <= N - 1
    t_hi = a1 // stride  # keys >= 0
    joined = a1 - a0 + 1 >= stride
    row, index = ragged(np.where(joined, 1, t_hi - t_lo + 1))
    t_a = t_lo[row] + np.where(joined[row], 0, index)
    t_b = np.where(joined[row], t_hi[row], t_a)
    keys_lo = np.maximum(a0[row] - t_b * stride, 0)
    keys_hi = np.minimum(a1[row] - t_a * stride, n - 1)
    return row, keys_lo // block, keys_hi // block + 1


def _random_ranges(g: RandomBlocks, table: np.ndarray, n: int, causal: bool, block: int
                   ) -> Ranges:
    """Each drawn (query block i, key block j) of one head's (query blocks, slots) table, per row
    tile over block i: the key tiles of block j (causal, i == j: up to the tile's last query)."""
    b = g.block
    i, slot = np.nonzero(table >= 0)
    j = table[i, slot]
    q_end = np.minimum((i + 1) * b, n)  # block i is [i*b, q_end)
    entry, index = ragged((q_end - 1) // block - (i * b) // block + 1)
    row = (i[entry] * b) // block + index
    keys_hi = np.minimum((j[entry] + 1) * b, n) - 1
    if causal:
        last_query = np.minimum((row + 1) * block, q_end[entry]) - 1
        keys_hi = np.where(i[entry] == j[entry], last_query, keys_hi)
    return row, (j[entry] * b) // block, keys_hi // block + 1


def _ranges(g: Geometry, head: int, n: int, causal: bool, block: int) -> Ranges:
    if isinstance(g, Dilated):
        return _dilated_ranges(g, head, n, causal, block)
    if isinstance(g, Strided):
        return _strided_ranges(g, n, causal, block)
    if isinstance(g, RandomBlocks):
        return _random_ranges(g, g.table()[head].numpy(), n, causal, block)
    if isinstance(g, Global):
        rows, cols, _ = TokenTiles(n, g.tokens, causal, block, block).tiles()
        return rows, cols, cols + 1
    reach = n - 1 if isinstance(g, Dense) else min(g.size - 1, n - 1)
    lo, hi, _, _ = Band(n, 0 if causal else -reach, reach, block, block).row_ranges()
    return np.arange(len(lo), dtype=np.int64), lo, hi + 1


def _union_size(ranges: list[Ranges], width: int) -> int:
    """|union of the ranges| (tiles): a sweep over starts sorted within each row tile."""
    row, lo, hi = (np.concatenate(parts) for parts in zip(*ranges, strict=True))
    if len(row) == 0:
        return 0
    start, end = row * (width + 1) + lo, row * (width + 1) + hi  # rows never touch
    order = np.argsort(start, kind="stable")
    start, end = start[order], end[order]
    reached = np.concatenate(([start[0]], np.maximum.accumulate(end)[:-1]))
    return int(np.maximum(end - np.maximum(start, reached), 0).sum())


@dataclass(frozen=True)
class BlockSparseCounts:
    """Tiles of block x block over original positions with an allowed pair, summed over heads:
    per branch alone, and for the pattern's union mask (what one FlexAttention call computes)."""

    block: int
    branches: tuple[int, ...]
    total: int


def _head_ranges(pattern: Pattern, seq_len: int, heads: int, block: int
                 ) -> tuple[list[list[Ranges]], list[list[int]]]:
    """Ranges per distinct kind of head (per branch), and the heads of each kind."""
    geometries = resolve(pattern, seq_len, heads)
    drawn = any(isinstance(g, RandomBlocks) for g in geometries)  # random draws differ per head
    kinds: dict[tuple[int, ...], list[int]] = {}
    # heads with the same branches and dilated offsets (and draws) have the same tiles
    for h in range(heads):
        kind = tuple(g.applies(h) for g in geometries)
        kind += tuple(g.offsets[h] for g in geometries if isinstance(g, Dilated))
        kinds.setdefault((*kind, h) if drawn else kind, []).append(h)
    cache: dict[tuple[int, int], Ranges] = {}
    none = (np.zeros(0, dtype=np.int64),) * 3

    def ranges(i: int, head: int) -> Ranges:
        g = geometries[i]
        if not g.applies(head):  # a branch for other heads
            return none
        key = (i, g.offsets[head] if isinstance(g, Dilated) else
               head if isinstance(g, RandomBlocks) else 0)
        if key not in cache:
            cache[key] = _ranges(g, head, seq_len, pattern.causal, block)
        return cache[key]

    groups = list(kinds.values())
    return [[ranges(i, same[0]) for i in range(len(geometries))] for same in groups], groups


def block_sparse_counts(pattern: Pattern, seq_len: int, heads: int, block: int = 128
                        ) -> BlockSparseCounts:
    """Per-branch and union tile counts of a block x block kernel over original positions."""
    if seq_len < 1 or heads < 1 or block < 1:
        raise SpattnError(f"need seq_len, heads and block >= 1, got {seq_len}, {heads}, {block}")
    width = -(-seq_len // block)
    per_kind, groups = _head_ranges(pattern, seq_len, heads, block)
    branches = [0] * len(per_kind[0])
    total = 0
    for ranges, same in zip(per_kind, groups, strict=True):
        for i, branch in enumerate(ranges):
            branches[i] += len(same) * _union_size([branch], width)
        total += len(same) * _union_size(ranges, width)
    return BlockSparseCounts(block, tuple(branches), total)


def block_sparse_tiles(pattern: Pattern, seq_len: int, heads: int, block: int = 128,
                       branch: int | None = None) -> int:
    """Tiles a block x block block-sparse kernel over original positions computes for the
    pattern's union mask (or for branch `branch` alone), summed over heads."""
    counts = block_sparse_counts(pattern, seq_len, heads, block)
    return counts.total if branch is None else counts.branches[branch]


def dense_layout(pattern: Pattern, seq_len: int, heads: int, block: int = 128) -> torch.Tensor:
    """(heads, blocks, blocks) int64 0/1: block (i, j) of head h holds an allowed pair."""
    if seq_len < 1 or heads < 1 or block < 1:
        raise SpattnError(f"need seq_len, heads and block >= 1, got {seq_len}, {heads}, {block}")
    width = -(-seq_len // block)
    if width > MAX_LAYOUT_BLOCKS:
        raise SpattnError(f"dense_layout: N / block = {width:,} blocks per side is more than "
                          f"{MAX_LAYOUT_BLOCKS:,}; use a larger block, or block_sparse_tiles and "
                          f"the plan, which never build a dense layout")
    layout = np.zeros((heads, width, width), dtype=np.int64)
    per_kind, groups = _head_ranges(pattern, seq_len, heads, block)
    for ranges, same in zip(per_kind, groups, strict=True):
        row, lo, hi = (np.concatenate(parts) for parts in zip(*ranges, strict=True))
        marks = np.zeros((width, width + 1), dtype=np.int64)  # +1 at lo, -1 at hi, then cumsum
        np.add.at(marks, (row, lo), 1)
        np.add.at(marks, (row, hi), -1)
        layout[same] = np.cumsum(marks, axis=1)[:, :width] > 0
    return torch.from_numpy(layout)
