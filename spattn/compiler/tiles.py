"""Tile sets of one attention problem: described in a few integers, listed on demand in O(tiles).

A tile (i, j) is the query rows [i*block_m, (i+1)*block_m) against the key columns
[j*block_n, (j+1)*block_n), clipped to the problem's extent. A listed tile is `full` when every
pair inside the extent is allowed (no predicate needed) and `partial` when only some are (apply
the predicate); tiles with no allowed pair are never listed. Tiles at the extent's edge still need
the bounds check that every kernel makes.

`BlockPairs` (random key blocks) holds many small problems in original coordinates, each with
its own tile grid starting at its blocks' first tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

import numpy as np

from spattn.patterns.arrays import ragged

KINDS = (None, "full", "partial")


class TileList(NamedTuple):
    """Listed tiles in row-major order: row tile, column tile, and whether it is full."""

    rows: np.ndarray
    cols: np.ndarray
    full: np.ndarray


def check_kind(kind: str | None) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind: expected None, 'full' or 'partial', got {kind!r}")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _expand(rows: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (row, col) with lo <= col <= hi, row by row."""
    item, index = ragged(np.maximum(hi - lo + 1, 0))
    return rows[item], lo[item] + index


@dataclass(frozen=True)
class Band:
    """An extent x extent problem whose allowed pairs are those with dmin <= q - k <= dmax.

    Dense attention (causal: dmin = 0), a sliding window and a dilated segment in its dilated
    coordinates are all bands. dmin <= 0 <= dmax: the diagonal is always allowed, so every row
    tile lists a contiguous, non-empty run of column tiles.
    """

    extent: int
    dmin: int
    dmax: int
    block_m: int
    block_n: int

    def row_ranges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per row tile: listed columns lo..hi, and full columns flo..fhi (none if flo > fhi)."""
        n, bm, bn = self.extent, self.block_m, self.block_n
        last_col = _ceil_div(n, bn) - 1
        q0 = np.arange(0, n, bm, dtype=np.int64)
        q1 = np.minimum(q0 + bm, n) - 1
        # A tile holds the differences q - k in [q0 - k1, q1 - k0]: listed when that meets
        # [dmin, dmax], full when it lies inside.
        lo = np.maximum((q0 - self.dmax) // bn, 0)
        hi = np.minimum((q1 - self.dmin) // bn, last_col)
        flo = np.maximum(-((self.dmax - q1) // bn), lo)  # q1 - j*bn <= dmax
        # k1 = min((j+1)*bn, n) - 1 <= q0 - dmin; the last column tile ends at n - 1.
        fhi = np.where(n - 1 <= q0 - self.dmin, last_col, (q0 - self.dmin + 1) // bn - 1)
        return lo, hi, flo, np.minimum(fhi, hi)

    def count(self, kind: str | None = None) -> int:
        check_kind(kind)
        lo, hi, flo, fhi = self.row_ranges()
        full = int(np.maximum(fhi - flo + 1, 0).sum())
        if kind == "full":
            return full
        total = int((hi - lo + 1).sum())
        return total if kind is None else total - full

    @property
    def pairs(self) -> int:
        """sum over d in [dmin, dmax] of (extent - |d|)."""
        n = self.extent

        def side(a: int) -> int:  # sum_{d=0}^{a} (n - d)
            a = min(a, n - 1)
            return (a + 1) * n - a * (a + 1) // 2 if a >= 0 else 0

        return side(self.dmax) + side(-self.dmin) - n if n else 0

    def tiles(self) -> TileList:
        lo, hi, flo, fhi = self.row_ranges()
        rows, cols = _expand(np.arange(len(lo), dtype=np.int64), lo, hi)
        count = hi - lo + 1
        full = (cols >= np.repeat(flo, count)) & (cols <= np.repeat(fhi, count))
        return TileList(rows, cols, full)


@dataclass(frozen=True)
class TokenTiles:
    """Global tokens over extent x extent: (q, k) is allowed when q or k is one of `tokens`
    (sorted, below extent), and k <= q when causal."""

    extent: int
    tokens: tuple[int, ...]
    causal: bool
    block_m: int
    block_n: int

    @cached_property
    def _listed(self) -> TileList:
        n, bm, bn = self.extent, self.block_m, self.block_n
        rows_total, cols_total = _ceil_div(n, bm), _ceil_div(n, bn)
        tokens = np.array(self.tokens, dtype=np.int64)
        if len(tokens) == 0:
            empty = np.zeros(0, dtype=np.int64)
            return TileList(empty, empty, np.zeros(0, dtype=bool))
        # Token rows: row tile i lists the columns its last token reaches (causal) or all.
        row_tiles = np.unique(tokens // bm)
        last = tokens[np.searchsorted(tokens // bm, row_tiles, side="right") - 1]
        hi = last // bn if self.causal else np.full_like(row_tiles, cols_total - 1)
        r1, c1 = _expand(row_tiles, np.zeros_like(row_tiles), hi)
        # Token columns: column tile j is listed by the rows at or after its first token.
        col_tiles = np.unique(tokens // bn)
        first = tokens[np.searchsorted(tokens // bn, col_tiles)]
        start = first // bm if self.causal else np.zeros_like(col_tiles)
        c2, r2 = _expand(col_tiles, start, np.full_like(col_tiles, rows_total - 1))
        keys = np.unique(np.concatenate([r1 * cols_total + c1, r2 * cols_total + c2]))
        rows, cols = keys // cols_total, keys % cols_total
        # Full: every row or every column of the tile is a token (and it is below the diagonal).
        per_row = np.bincount(tokens // bm, minlength=rows_total)
        per_col = np.bincount(tokens // bn, minlength=cols_total)
        row_len = np.minimum((rows + 1) * bm, n) - rows * bm
        col_len = np.minimum((cols + 1) * bn, n) - cols * bn
        full = (per_row[rows] == row_len) | (per_col[cols] == col_len)
        if self.causal:
            full &= np.minimum((cols + 1) * bn, n) - 1 <= rows * bm
        return TileList(rows, cols, full)

    def count(self, kind: str | None = None) -> int:
        check_kind(kind)
        full = self._listed.full
        return len(full) if kind is None else int(full.sum() if kind == "full" else (~full).sum())

    @property
    def pairs(self) -> int:
        n, t = self.extent, len(self.tokens)
        if self.causal:  # the tokens' rows + their columns - the pairs counted in both
            return sum(q + 1 for q in self.tokens) + sum(n - k for k in self.tokens) \
                - t * (t + 1) // 2
        return 2 * t * n - t * t

    def tiles(self) -> TileList:
        return self._listed


class BlockTileList(NamedTuple):
    """Listed tiles of block-pair problems, in order of head, query block, key block (as in the
    table), then row-major inside the problem: the tile's row and column are counted from the
    first tokens of its query and key blocks."""

    heads: np.ndarray
    qblocks: np.ndarray
    kblocks: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    full: np.ndarray


def _pair_grid(rows: int, cols: int, cut_rows: bool, cut_cols: bool, diagonal: bool,
               block_m: int, block_n: int) -> TileList:
    """The tiles of one rows x cols block pair (k <= q when `diagonal`). A tile that runs past
    a block's end into the next block (`cut_*`: the block is not the sequence's last) holds
    pairs of other problems, so it is partial."""
    u, v = (a.ravel() for a in np.meshgrid(np.arange(_ceil_div(rows, block_m)),
                                            np.arange(_ceil_div(cols, block_n)), indexing="ij"))
    full = ~((cut_rows & ((u + 1) * block_m > rows)) | (cut_cols & ((v + 1) * block_n > cols)))
    if diagonal:  # listed when the tile's first key is <= its last query; full when all are
        keep = v * block_n <= np.minimum((u + 1) * block_m, rows) - 1
        full &= np.minimum((v + 1) * block_n, cols) - 1 <= u * block_m
        u, v, full = u[keep], v[keep], full[keep]
    return TileList(u.astype(np.int64), v.astype(np.int64), full)


def _pair_counts(rows: int, cols: int, cut_rows: bool, cut_cols: bool, diagonal: bool,
                 block_m: int, block_n: int) -> tuple[int, int]:
    """(listed, full) tiles of `_pair_grid`, in O(rows / block_m) without listing them."""
    row_tiles, col_tiles = _ceil_div(rows, block_m), _ceil_div(cols, block_n)
    inside_rows = rows // block_m if cut_rows else row_tiles  # tiles that end in the block
    inside_cols = cols // block_n if cut_cols else col_tiles
    if not diagonal:
        return row_tiles * col_tiles, inside_rows * inside_cols
    lo, hi, flo, fhi = Band(rows, 0, rows - 1, block_m, block_n).row_ranges()
    fhi = np.minimum(fhi, inside_cols - 1)[:inside_rows]
    return int((hi - lo + 1).sum()), int(np.maximum(fhi - flo[:inside_rows] + 1, 0).sum())


@dataclass(frozen=True)
class BlockPairs:
    """Random key blocks over extent tokens cut into blocks of `block` (the last maybe shorter).

    Head h computes, for query block i and each key block j in table[h, i] (-1: an empty slot),
    block i's rows against block j's columns, with k <= q when causal (which only cuts i == j:
    a causal draw has j <= i). Each such problem is tiled on its own; a tile is full when every
    pair it holds inside the sequence belongs to the problem and is allowed.
    """

    extent: int
    block: int
    table: np.ndarray = field(repr=False, compare=False)  # (heads, query blocks, slots) int64
    causal: bool
    block_m: int
    block_n: int

    def _codes(self) -> np.ndarray:
        """The class of every slot (i last + 2 * j last + 4 * causal diagonal); -1 when empty."""
        table = self.table
        i = np.arange(table.shape[1])[None, :, None]
        code = (i == table.shape[1] - 1) + 2 * (table == table.shape[1] - 1)
        if self.causal:
            code = code + 4 * (table == i)
        return np.where(table >= 0, code, -1)

    def _entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Each drawn (head, i, j) in table order, and its class."""
        heads, i, slot = np.nonzero(self.table >= 0)
        return heads, i, self.table[heads, i, slot], self._codes()[heads, i, slot]

    def _class_sizes(self, code: int) -> tuple[int, int, bool]:
        """Query rows and key columns of the problems of one class, and whether diagonal."""
        last_rows = self.extent - (_ceil_div(self.extent, self.block) - 1) * self.block
        return (last_rows if code & 1 else self.block, last_rows if code & 2 else self.block,
                bool(code & 4))

    @cached_property
    def _grids(self) -> list[TileList]:
        """The tile grid of each class of problem (empty for a class with no problem)."""
        empty = np.zeros(0, dtype=np.int64)
        grids = []
        for code, problems in enumerate(self._per_class.tolist()):
            rows, cols, diagonal = self._class_sizes(code)
            grids.append(_pair_grid(rows, cols, not code & 1, not code & 2, diagonal,
                                    self.block_m, self.block_n) if problems
                         else TileList(empty, empty, empty.astype(bool)))
        return grids

    @cached_property
    def _per_class(self) -> np.ndarray:
        """How many problems of each class."""
        return np.bincount(self._codes().ravel() + 1, minlength=9)[1:]

    def count(self, kind: str | None = None) -> int:
        check_kind(kind)
        total = 0
        for code, problems in enumerate(self._per_class.tolist()):
            if problems:
                rows, cols, diagonal = self._class_sizes(code)
                listed, full = _pair_counts(rows, cols, not code & 1, not code & 2, diagonal,
                                            self.block_m, self.block_n)
                total += problems * {None: listed, "full": full, "partial": listed - full}[kind]
        return total

    @property
    def pairs(self) -> int:
        total = 0
        for code, problems in enumerate(self._per_class.tolist()):
            rows, cols, diagonal = self._class_sizes(code)
            total += problems * (rows * (rows + 1) // 2 if diagonal else rows * cols)
        return total

    def tiles(self) -> BlockTileList:
        heads, i, j, code = self._entries()
        grids = self._grids
        sizes = np.array([len(g.rows) for g in grids], dtype=np.int64)
        starts = np.cumsum(sizes) - sizes
        entry, local = ragged(sizes[code])
        pick = starts[code][entry] + local
        rows, cols, full = (np.concatenate(parts) for parts in zip(*grids, strict=True))
        return BlockTileList(heads[entry], i[entry], j[entry], rows[pick], cols[pick],
                             full[pick])
