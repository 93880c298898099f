"""How many hops information needs to travel between tokens through a pattern.

The token graph has an edge from query p to every key k that p attends, in any head, through
any branch. `hop_distance` is the largest shortest-path length over the ordered pairs that a
pattern should connect: every token to every earlier token (causal), or to every other token.
LongNet's claim is that this grows like log N.

It is exact and fast: a breadth-first search from all N sources at once, with the sources packed
64 to a machine word, and one step of every branch applied to whole columns at a time using the
branch's structure (a dilated segment's rows form a clique, a causal one a "suffix" of it; so
does each residue class of a stride, over the whole sequence; a window is a range; global tokens
link to everything; a random key block is reached from every query block that drew it). One
step costs O(N^2 / 64) word operations per branch, so N = 4096 takes well under a second for
LongNet-like patterns.
`token_graph` builds the same graph explicitly in networkx, for small N and for checking.
A search that would pass MAX_HOP_WORK word operations (a window of 2 needs N - 1 hops) raises
WorkLimitError instead of running for minutes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import networkx as nx
import numpy as np

from spattn.limits import MAX_WORK, check_work
from spattn.patterns.counting import branch_mask, check_random_table
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

MAX_HOPS_SEQ_LEN = 8192  # beyond this the N x N reachability bits get slow (N^2 / 8 bytes)
MAX_HOP_WORK = 20 * MAX_WORK  # words read by the steps of one search (about a second)

Step = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Hops:
    """Hop distance at one sequence length.

    `hops` is the largest shortest-path length over the connected pairs among `pairs` (query,
    earlier-or-other token) pairs; `unreachable` of them have no path at all.
    """

    seq_len: int
    hops: int
    pairs: int
    unreachable: int

    @property
    def connected(self) -> bool:
        return self.unreachable == 0


def _popcount(words: np.ndarray) -> int:
    if hasattr(np, "bitwise_count"):
        return int(np.bitwise_count(words).sum())
    return int(np.unpackbits(words.view(np.uint8)).sum())  # numpy < 2.0


def _suffix_or(bits: np.ndarray, axis: int) -> np.ndarray:
    """out[..., k, ...] = OR of bits[..., k:, ...] along `axis`."""
    flipped = np.flip(bits, axis=axis)
    return np.flip(np.bitwise_or.accumulate(flipped, axis=axis), axis=axis)


def _range_or(bits: np.ndarray, before: int, after: int) -> np.ndarray:
    """out[:, k] = OR of bits[:, k - before : k + after + 1] (clipped to the sequence)."""
    words, n = bits.shape
    before, after = min(before, n - 1), min(after, n - 1)
    width = before + after + 1
    table = np.zeros((words, n + width - 1), dtype=bits.dtype)
    table[:, before:before + n] = bits
    span = 1  # invariant: table[:, i] = OR of the padded columns [i, i + span)
    while 2 * span <= width:
        table = table[:, :-span] | table[:, span:]
        span *= 2
    return table[:, :n] | table[:, width - span:width - span + n]  # two spans cover the range


def _dilated_step(g: Dilated, n: int, heads: int, causal: bool) -> Step:
    """Columns of one residue class of one segment form a clique (causal: edges point back)."""
    used = sorted({g.offsets[h] for h in range(heads) if g.applies(h)})
    full, last = divmod(n, g.segment)
    blocks = []
    for first, length, count in ((0, g.segment, full), (n - last, last, 1)):  # the last is shorter
        if length == 0 or count == 0:
            continue
        within = np.arange(-(-length // g.dilation))[:, None] * g.dilation + np.array(used)
        index = first + g.segment * np.arange(count)[:, None, None] + within  # (seg, row, offset)
        index = np.where(within < length, index, n)  # n: an always-empty column
        blocks.append((index, index < n))

    def step(bits: np.ndarray) -> np.ndarray:
        padded = np.concatenate([bits, np.zeros_like(bits[:, :1])], axis=1)
        out = np.zeros_like(bits)
        for index, valid in blocks:
            gathered = padded[:, index]
            if causal:
                reached = _suffix_or(gathered, axis=2)
            else:
                reached = np.broadcast_to(
                    np.bitwise_or.reduce(gathered, axis=2, keepdims=True), gathered.shape)
            out[:, index[valid]] = reached[:, valid]
        return out

    return step


def _global_step(tokens: Sequence[int], n: int, causal: bool) -> Step:
    t = np.array(tokens, dtype=np.int64)
    first_token_at_or_after = np.searchsorted(t, np.arange(n))  # len(t) when there is none

    def step(bits: np.ndarray) -> np.ndarray:
        out = np.zeros_like(bits)
        if len(t) == 0:
            return out
        if causal:
            # every later query reaches a token; a token reaches every earlier key
            out[:, t] = _suffix_or(bits, axis=1)[:, t]
            from_tokens = _suffix_or(bits[:, t], axis=1)
            from_tokens = np.concatenate([from_tokens, np.zeros_like(from_tokens[:, :1])], 1)
            return out | from_tokens[:, first_token_at_or_after]
        out[:, t] = np.bitwise_or.reduce(bits, axis=1)[:, None]
        return out | np.bitwise_or.reduce(bits[:, t], axis=1)[:, None]

    return step


def _strided_step(stride: int, n: int, causal: bool) -> Step:
    """Each residue class modulo the stride is a clique (causal: a suffix, like a segment)."""
    stride = min(stride, n)  # a stride of n or more links every token only to itself
    rows = -(-n // stride)

    def step(bits: np.ndarray) -> np.ndarray:
        grid = np.zeros((len(bits), rows * stride), dtype=bits.dtype)  # zeros past n
        grid[:, :n] = bits
        grid = grid.reshape(len(bits), rows, stride)  # [word, row, residue]: position row*L + res
        if causal:
            reached = _suffix_or(grid, axis=1)
        else:
            reached = np.broadcast_to(np.bitwise_or.reduce(grid, axis=1, keepdims=True),
                                      grid.shape)
        return reached.reshape(len(bits), -1)[:, :n]

    return step


def _random_step(g: RandomBlocks, n: int, heads: int, causal: bool) -> Step:
    """Key block j is reached from every query block that drew it, in any head; causal, a
    query block that drew itself reaches each of its keys from the queries at or after it."""
    b = g.block
    blocks = -(-n // b)
    table = g.table()[[h for h in range(heads) if g.applies(h)]].numpy()
    head, query, slot = np.nonzero(table >= 0)
    key = table[head, query, slot]
    diagonal = np.zeros(blocks, dtype=bool)
    if causal:
        diagonal[query[key == query]] = True
        query, key = query[key < query], key[key < query]
    linked = np.unique(key * blocks + query)  # (key block, query block), heads merged, sorted
    key, query = linked // blocks, linked % blocks
    drawn, first = np.unique(key, return_index=True)  # each drawn key block, its first entry

    def step(bits: np.ndarray) -> np.ndarray:
        grid = np.zeros((len(bits), blocks * b), dtype=bits.dtype)  # zeros past n
        grid[:, :n] = bits
        grid = grid.reshape(len(bits), blocks, b)  # [word, block, row in block]
        out = np.zeros_like(grid)
        if len(drawn):
            per_block = np.bitwise_or.reduce(grid, axis=2)  # [word, query block]
            reached = np.bitwise_or.reduceat(per_block[:, query], first, axis=1)
            out[:, drawn] = reached[:, :, None]
        out[:, diagonal] |= _suffix_or(grid[:, diagonal], axis=2)
        return out.reshape(len(bits), -1)[:, :n]

    # its cost: a gather per link reads ~10x slower than the bitwise passes the limit is sized by
    step.words_per_row = blocks * b + 10 * len(query)  # type: ignore[attr-defined]
    return step


def _branch_step(g: Geometry, n: int, heads: int, causal: bool) -> Step:
    """One hop through one branch: a key is reached when a query reached so far attends it."""
    if isinstance(g, Dilated):
        return _dilated_step(g, n, heads, causal)
    if isinstance(g, Window):
        return lambda bits: _range_or(bits, 0 if causal else g.size - 1, g.size - 1)
    if isinstance(g, Global):
        return _global_step(g.tokens, n, causal)
    if isinstance(g, Strided):
        return _strided_step(g.stride, n, causal)
    if isinstance(g, RandomBlocks):
        return _random_step(g, n, heads, causal)
    if isinstance(g, Dense):
        if causal:
            return lambda bits: _suffix_or(bits, axis=1)
        return lambda bits: np.broadcast_to(np.bitwise_or.reduce(bits, axis=1, keepdims=True),
                                            bits.shape)
    raise TypeError(f"unknown branch geometry {g!r}")


def hop_distance_of(geometries: Sequence[Geometry], seq_len: int, heads: int,
                    causal: bool) -> Hops:
    """`hop_distance` for resolved branches."""
    n = seq_len
    pairs = n * (n - 1) // 2 if causal else n * (n - 1)
    for g in geometries:
        if isinstance(g, RandomBlocks):
            check_random_table(g)
    steps = [_branch_step(g, n, heads, causal) for g in geometries]
    # reach[w, k] bit b: source 64*w + b reaches token k (in the hops taken so far).
    sources = np.arange(n)
    reach = np.zeros((-(-n // 64), n), dtype=np.uint64)
    reach[sources // 64, sources] = np.left_shift(np.uint64(1), (sources % 64).astype(np.uint64))
    reached, hops, work = n, 0, 0
    # words a hop reads per row of `reach`: n per step, more for random steps (their links)
    per_row = n + sum(getattr(step, "words_per_row", n) for step in steps)
    while reached - n < pairs:
        work += reach.shape[0] * per_row
        check_work(work, f"the hop distance at N = {n:,} (more than {hops:,} hops)",
                   MAX_HOP_WORK)
        grown = reach.copy()
        for step in steps:
            grown |= step(reach)
        count = _popcount(grown)
        if count == reached:  # nothing new: the rest is unreachable
            break
        reach, reached, hops = grown, count, hops + 1
    return Hops(n, hops, pairs, pairs - (reached - n))


def hop_distance(pattern: Pattern, seq_len: int, heads: int) -> Hops:
    """The largest number of hops any token needs to reach any earlier (or other) token."""
    if not 1 <= seq_len <= MAX_HOPS_SEQ_LEN:
        raise ValueError(f"hop distance needs 1 <= seq_len <= {MAX_HOPS_SEQ_LEN}, got {seq_len}")
    return hop_distance_of(resolve(pattern, seq_len, heads), seq_len, heads, pattern.causal)


def hop_lengths(seq_len: int, start: int = 16, limit: int = 4096) -> list[int]:
    """N = start, 2 start, 4 start, ... below min(seq_len, limit), and that."""
    top = min(seq_len, limit)
    lengths = []
    while start < top:
        lengths.append(start)
        start *= 2
    return [*lengths, top]


def hop_table(pattern: Pattern, seq_len: int, heads: int, start: int = 16,
              limit: int = 4096) -> tuple[Hops, ...]:
    """Hop distance at N = start, 2 start, 4 start, ... up to min(seq_len, limit), and at that."""
    return tuple(hop_distance(pattern, n, heads) for n in hop_lengths(seq_len, start, limit))


def token_graph(pattern: Pattern, seq_len: int, heads: int) -> nx.DiGraph:
    """The token graph, explicitly (materializes every mask: small N only)."""
    graph = nx.DiGraph()
    graph.add_nodes_from(range(seq_len))
    for g in resolve(pattern, seq_len, heads):
        for head in range(heads):
            query, key = branch_mask(g, head, seq_len, pattern.causal).nonzero(as_tuple=True)
            graph.add_edges_from(zip(query.tolist(), key.tolist(), strict=True))
    return graph
