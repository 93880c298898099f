"""Which keys a causal decoder must keep, and the most it ever keeps.

In a causal pattern, row p depends only on tokens 0 .. p, so after the first L tokens a decoder
needs only the keys that some later query (position >= L) can still attend. `last_use(k)` is the
last query position that attends key k through any branch and head (of those the branch applies
to); key k is kept while
last_use(k) >= L:

- dilated (w, r): k's segment ends at a multiple of w, and only rows of k's residue class see k,
  so the last is that class's last row in the segment (none when no head selects k's class);
- window W: k + W - 1;
- global tokens: a token is seen by every later query (kept forever); a global query t sees every
  earlier key, so every key up to the last token waits for it;
- strided, random blocks, dense: some later query may always attend k (kept forever).

The bound is the largest number of keys kept at once, over every L. Past the last global token
and the longest segment or window, the kept set repeats with the period of the segments (their
least common multiple), so scanning one period gives it exactly.
"""

from __future__ import annotations

import math

import numpy as np

from spattn.patterns.geometry import Dilated, Geometry, Global, Window, resolve
from spattn.patterns.spec import Pattern

FOREVER = np.iinfo(np.int64).max
UNBOUNDED = 1 << 62  # a sequence length past any real one: segments are not cut short
SCAN_LIMIT = 1 << 23  # positions scanned for an exact bound; past it, a simple upper bound
CHUNK = 1 << 20  # positions scanned at once


def _geometry(pattern: Pattern, heads: int) -> tuple[Geometry, ...]:
    return resolve(pattern, UNBOUNDED, heads)


def last_use(pattern: Pattern, heads: int, positions: np.ndarray) -> np.ndarray:
    """The last query position that attends each key position (int64; FOREVER when there is
    none; below the key itself when no query does)."""
    k = np.asarray(positions, dtype=np.int64)
    last = np.full(k.shape, -1, dtype=np.int64)
    for g in _geometry(pattern, heads):
        if isinstance(g, Dilated):
            w, r = g.segment, g.dilation
            s = (k % w) % r
            selects = np.zeros(r, dtype=bool)  # the residue classes its heads keep
            selects[[o for h, o in enumerate(g.offsets) if g.applies(h)]] = True
            selected = selects[s]
            end = k - k % w + s + r * ((w - 1 - s) // r)  # the class's last row in the segment
            last = np.maximum(last, np.where(selected, end, -1))
        elif isinstance(g, Window):
            last = np.maximum(last, k + g.size - 1)
        elif isinstance(g, Global):
            if g.tokens:
                token = np.isin(k, g.tokens)
                last = np.maximum(last, np.where(token, FOREVER,
                                                 np.where(k <= g.tokens[-1], g.tokens[-1], -1)))
        else:  # strided, random blocks, dense
            return np.full(k.shape, FOREVER, dtype=np.int64)
    return last


def cache_bound(pattern: Pattern, heads: int) -> int | None:
    """The most keys a decoder of `pattern` with `heads` query heads keeps at once, or None when
    it keeps every key (a strided, random or dense branch)."""
    geometry = _geometry(pattern, heads)
    if any(not isinstance(g, Dilated | Window | Global) for g in geometry):
        return None
    segments = [g.segment for g in geometry if isinstance(g, Dilated)]
    span = max([*segments, *(g.size for g in geometry if isinstance(g, Window)), 1])
    tokens = sorted({t for g in geometry if isinstance(g, Global) for t in g.tokens})
    last_token = tokens[-1] if tokens else -1
    period = math.lcm(*segments) if segments else 1
    horizon = last_token + 1 + span + period
    if horizon > SCAN_LIMIT:  # before the last token: at most everything; after: one span
        return max(last_token + 1, span - 1 + len(tokens))
    # key k is kept after L tokens for L in [k + 1, last]: count them with a difference array,
    # filled a chunk of keys at a time so that memory stays near one int64 per position
    change = np.zeros(horizon + 2, dtype=np.int64)
    for start in range(0, horizon, CHUNK):
        k = np.arange(start, min(start + CHUNK, horizon))
        last = np.minimum(last_use(pattern, heads, k), horizon)
        kept = last >= k + 1
        np.add.at(change, k[kept] + 1, 1)
        np.add.at(change, last[kept] + 1, -1)
    return int(np.cumsum(change)[:horizon + 1].max())
