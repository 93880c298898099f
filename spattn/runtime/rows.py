"""`Rows`: which token rows of one head a piece of attention reads, as a view when possible.

Dilated rows `a + s + r*i` of every segment are one strided view of the (B, N, D) tensor (no
gather copy); window chunks are overlapping strided views; strided residue classes are
interleaved strided views; global tokens are an index list; random blocks are runs of rows whose
starts are listed (a gather).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class Rows:
    """Rows start + seg*seg_stride + step*i for seg < nseg, i < count; or starts[seg] + step*i
    when segment starts are listed; or the explicit `index` (one segment)."""

    start: int = 0
    count: int = 0
    step: int = 1
    nseg: int = 1
    seg_stride: int = 0
    index: tuple[int, ...] | None = None
    starts: tuple[int, ...] | None = None

    @staticmethod
    def of(index: tuple[int, ...]) -> Rows:
        return Rows(count=len(index), index=index)

    @staticmethod
    def runs(starts: tuple[int, ...], count: int) -> Rows:
        """`count` consecutive rows from each of `starts` (segments may repeat)."""
        return Rows(count=count, nseg=len(starts), starts=starts)

    @property
    def overlapping(self) -> bool:
        """Whether two (segment, i) of a strided form may name one row. Interleaved segments
        (seg_stride * nseg <= step, as strided residue classes) never do."""
        spread = self.nseg > 1 and (self.count - 1) * self.step >= self.seg_stride
        return spread and self.seg_stride * self.nseg > self.step

    def positions(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(nseg, count) int64 token positions (kept for listed rows: do not write to them)."""
        if self.index is not None or self.starts is not None:
            return _listed_positions(self, str(device))
        return self._positions(device)

    def _positions(self, device: torch.device | str) -> torch.Tensor:
        if self.index is not None:
            return torch.tensor(self.index, dtype=torch.int64, device=device)[None]
        if self.starts is not None:
            seg = torch.tensor(self.starts, dtype=torch.int64, device=device)[:, None]
        else:
            seg = self.start + torch.arange(self.nseg, device=device)[:, None] * self.seg_stride
        return seg + self.step * torch.arange(self.count, device=device)[None]

    def segments(self, first: int, number: int) -> Rows:
        """Segments first .. first+number-1 of these rows."""
        if self.starts is not None:
            return Rows.runs(self.starts[first:first + number], self.count)
        return Rows(self.start + first * self.seg_stride, self.count, self.step, number,
                    self.seg_stride)

    def chunk(self, first: int, number: int) -> Rows:
        """Rows first .. first+number-1 within every segment."""
        if self.index is not None:
            return Rows.of(self.index[first:first + number])
        if self.starts is not None:
            return Rows.runs(tuple(s + first for s in self.starts), number)
        return Rows(self.start + first * self.step, number, self.step, self.nseg, self.seg_stride)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, *rest) -> (B, nseg, count, *rest); a view unless rows are listed."""
        if self.index is not None or self.starts is not None:
            idx = self.positions(x.device).flatten()
            return x.index_select(1, idx).view(x.shape[0], self.nseg, self.count, *x.shape[2:])
        b, n, *rest = x.stride()
        size = (x.shape[0], self.nseg, self.count, *x.shape[2:])
        stride = (b, self.seg_stride * n, self.step * n, *rest)
        return x.as_strided(size, stride, x.storage_offset() + self.start * n)

    def put(self, x: torch.Tensor, value: torch.Tensor) -> None:
        """x[rows] = value, for rows that do not overlap."""
        if self.index is not None or self.starts is not None:
            idx = self.positions(x.device).flatten()
            x.index_copy_(1, idx, value.flatten(1, 2).to(x.dtype))
        else:
            self.take(x).copy_(value)

    def add(self, x: torch.Tensor, value: torch.Tensor) -> None:
        """x[rows] += value; rows repeated across segments (overlapping or listed) add up."""
        if self.index is None and self.starts is None and not self.overlapping:
            self.take(x).add_(value)
            return
        idx = self.positions(x.device).flatten()
        x.index_add_(1, idx, value.flatten(1, 2).to(x.dtype))


@lru_cache(maxsize=4096)
def _listed_positions(rows: Rows, device: str) -> torch.Tensor:
    """Positions of listed rows (global tokens, random blocks), made once: a tuple of Python
    ints costs more to turn into a tensor than the gather that uses it."""
    return rows._positions(device)
