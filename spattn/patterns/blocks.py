"""BigBird-style random blocks: the key blocks each query block of each head sees.

The draw is part of what a pattern means (docs/branches.md gives it exactly), so every backend,
the counts, the layouts and the decoder read this one table. For head h and query block i there
are C candidate key blocks (0 .. i when causal, every block otherwise); when C > c, Floyd's
algorithm draws c distinct ones from a counter-based hash u(seed, h, i, j), so the table needs
no random state and is the same on every machine.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's output function, on uint64 arrays (arithmetic wraps modulo 2^64)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def block_hash(seed: int, head: int, block: np.ndarray, draw: np.ndarray) -> np.ndarray:
    """u(seed, h, i, j) = mix(mix(mix(mix(seed) + h) + i) + j), for arrays of i and j."""
    x = _mix(np.full(1, seed, dtype=np.uint64))
    x = _mix(x + np.uint64(head))
    return _mix(_mix(x + block.astype(np.uint64)) + draw.astype(np.uint64))


def draw_blocks(seed: int, head: int, candidates: np.ndarray, count: int) -> np.ndarray:
    """(len(candidates), count) int64: row i holds min(count, C_i) distinct blocks in [0, C_i),
    sorted, then -1. Floyd: for j = C-count .. C-1, take t = u mod (j+1), or j if t is taken."""
    rows = len(candidates)
    chosen = np.full((rows, count), -1, dtype=np.int64)
    few = candidates <= count  # every candidate is taken
    slot = np.arange(count)
    chosen[few] = np.where(slot[None] < candidates[few, None], slot[None], -1)
    many = np.flatnonzero(~few)
    if len(many):
        c = candidates[many]
        for t in range(count):
            j = c - count + t
            pick = (block_hash(seed, head, many, j) % (j + 1).astype(np.uint64)).astype(np.int64)
            taken = (chosen[many, :t] == pick[:, None]).any(1)
            chosen[many, t] = np.where(taken, j, pick)
    return _sorted_then_empty(chosen)


def _sorted_then_empty(chosen: np.ndarray) -> np.ndarray:
    """Each row's blocks in increasing order, the -1 slots last."""
    key = np.where(chosen < 0, np.iinfo(np.int64).max, chosen)
    return np.take_along_axis(chosen, np.argsort(key, axis=1, kind="stable"), axis=1)


@lru_cache(maxsize=32)
def random_blocks(block: int, count: int, seed: int, seq_len: int, heads: int, causal: bool
                  ) -> torch.Tensor:
    """(heads, query blocks, count) int64: the key blocks every query block sees, -1 for none.

    Blocks are `block` tokens; there are ceil(seq_len / block) of them, the last maybe shorter.
    """
    blocks = -(-seq_len // block)
    index = np.arange(blocks)
    candidates = index + 1 if causal else np.full(blocks, blocks)
    table = np.stack([draw_blocks(seed, h, candidates, count) for h in range(heads)]) \
        if blocks else np.zeros((heads, 0, count), dtype=np.int64)
    return torch.from_numpy(table)


def first_rows(block: int, count: int, seed: int, seq_len: int, head: int, causal: bool,
               rows: int) -> np.ndarray:
    """The first `rows` query blocks of head `head`'s table, as `random_blocks` draws them, with
    at most as many slots as there are blocks (the rest would be -1): for pictures of the first
    tokens of a long sequence, without drawing the whole table."""
    blocks = -(-seq_len // block)
    index = np.arange(min(rows, blocks))
    candidates = index + 1 if causal else np.full(len(index), blocks)
    return draw_blocks(seed, head, candidates, max(1, min(count, blocks)))
