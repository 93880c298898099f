"""A resolved pattern as a list of `Piece`s: batched dense attention problems whose log-sum-exp
merge is the pattern's output.

Every allowed (head, query, key) triple lies in exactly one piece (in `multiset` mode a triple
allowed by two branches lies in two, and counts twice, as SEMANTICS.md says, or in one piece
that adds log(count) to its score: see `nested_chains`). A piece is one head, `nseg` equal-shaped
problems (query rows x key rows), and optionally a mask predicate over token positions, built
only for the piece's own rows, so memory stays linear in N.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import cast

import torch

from spattn.patterns.geometry import Dense, Dilated, Geometry, Global, RandomBlocks, Strided, Window
from spattn.runtime.rows import Rows

# (query positions (S, Mq, 1), key positions (S, 1, Mk)) -> allowed (S, Mq, Mk)
MaskFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

MASK_BUDGET = 1 << 24  # mask elements one piece may materialize before it is split
SHARE_ROWS = 2048  # segment rows of a branch whose pairs nested branches may share (a mask)
MAX_CHAIN = 3  # nested branches sharing their pairs in one chain (masks grow with offset classes)


@dataclass(frozen=True)
class Piece:
    head: int
    q: Rows
    k: Rows
    causal: bool = False  # square problems, causal in their own (dilated) coordinates
    mask: MaskFn | None = None  # when set, it alone says which pairs count (causal included)
    shared_mask: bool = False  # the mask is the same for every segment (translation-invariant)
    fresh: bool = False  # no earlier piece of this head wrote these query rows: no merge needed
    also: MaskFn | None = None  # how many more branches give each pair (nested: one call)

    @property
    def masked(self) -> bool:
        """Whether the call needs a mask (pairs not allowed, or counted more than once)."""
        return self.mask is not None or self.also is not None

    def mask_tensor(self, device: torch.device | str) -> torch.Tensor | None:
        """Allowed pairs, (nseg or 1, Mq, Mk) bool, or None when every pair counts."""
        return None if self.mask is None else self._predicate(self.mask, device)

    def also_tensor(self, device: torch.device | str) -> torch.Tensor | None:
        """How many more branches give each pair, (nseg or 1, Mq, Mk) int, or None."""
        return None if self.also is None else self._predicate(self.also, device)

    def _predicate(self, fn: Callable, device: torch.device | str) -> torch.Tensor:
        q, k = self.q, self.k
        if self.shared_mask:
            q, k = q.segments(0, 1), k.segments(0, 1)
        return fn(q.positions(device)[:, :, None], k.positions(device)[:, None, :])


def _causal(qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
    return kpos <= qpos


def _dilated_rows(g: Dilated, n: int, head: int) -> Iterator[Rows]:
    """The head's rows of every whole segment (one strided view), then of the shorter last one."""
    s = g.offsets[head]
    full = n // g.segment
    m = g.rows_in(g.segment, s)
    if full and m:
        yield Rows(s, m, g.dilation, full, g.segment)
    tail_start = full * g.segment
    m = g.rows_in(n - tail_start, s)
    if m:
        yield Rows(tail_start + s, m, g.dilation)


def _dilated(g: Dilated, n: int, head: int, causal: bool) -> Iterator[Piece]:
    for rows in _dilated_rows(g, n, head):
        yield Piece(head, rows, rows, causal=causal)


@lru_cache(maxsize=256)
def _band(w: int, causal: bool) -> MaskFn:
    """The window's predicate, one object per (size, causality): every head's pieces share it, so
    a batch of heads builds one mask (runtime/batches.py)."""
    def band(qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        allowed = (qpos - kpos).abs() < w
        return allowed & (kpos <= qpos) if causal else allowed

    return band


@lru_cache(maxsize=256)
def _not_global(g: Global, causal: bool) -> MaskFn:
    """Every key but the global tokens (whose pairs the first global piece has): one object per
    branch, shared by every head."""
    def others(qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        allowed = ~g.is_global(kpos)
        return allowed & (kpos <= qpos) if causal else allowed

    return others


def _window(g: Window, n: int, head: int, causal: bool, divisor: int = 8) -> Iterator[Piece]:
    """Chunks of c queries against the keys around them.

    An interior chunk [a, a+c) splits its keys into a block every query sees (no mask), the
    causal diagonal block, and the c-1 keys at each far edge that only some queries see (a small
    band mask, the same for every chunk). Causal, the first W queries are plain causal attention
    over the first W tokens. Chunks left at the sequence ends get one masked piece each.
    """
    w = g.size
    if w >= n:  # every pair is inside the window
        yield from _dense(n, head, causal)
        return
    c = min(max(w // divisor, 16), 512, w)
    before, after = w - 1, 0 if causal else w - 1
    band = _band(w, causal)
    # interior chunks start at `origin`: the first query whose keys all lie at or after token 0
    origin = w if causal else w - 1
    if causal:
        yield from _dense(w, head, causal=True)  # p < W sees every earlier key
    chunks = max(0, (n - after - origin) // c)
    if chunks:
        q = Rows(origin, c, 1, chunks, c)

        def keys(lo: int, hi: int) -> Rows:  # keys a+lo .. a+hi-1 of every chunk [a, a+c)
            return Rows(origin + lo, hi - lo, 1, chunks, c)

        yield Piece(head, q, keys(c - w, 0 if causal else w))  # seen by every query
        if causal:
            yield Piece(head, q, keys(0, c), causal=True)
        yield Piece(head, q, keys(1 - w, c - w), mask=band, shared_mask=True)
        if not causal:
            yield Piece(head, q, keys(w, c + w - 1), mask=band, shared_mask=True)
    # what is left at either end, a chunk at a time: before `origin` (non-causal) and after
    head_end, tail_start = (0 if causal else origin), origin + chunks * c
    for lo in [*range(0, head_end, c), *range(tail_start, n, c)]:
        hi = min(lo + c, head_end if lo < head_end else n)
        k_lo, k_hi = max(0, lo - before), min(n, hi + after)
        yield Piece(head, Rows(lo, hi - lo), Rows(k_lo, k_hi - k_lo), mask=band)


def _global(g: Global, n: int, head: int, causal: bool) -> Iterator[Piece]:
    """Every query against the global keys, plus the global queries against all other keys."""
    if not g.tokens:
        return
    yield Piece(head, Rows(0, n), Rows.of(g.tokens), mask=_causal if causal else None)
    if len(g.tokens) < n:
        yield Piece(head, Rows.of(g.tokens), Rows(0, n), mask=_not_global(g, causal))


def _strided(g: Strided, n: int, head: int, causal: bool) -> Iterator[Piece]:
    """Residue classes c, c + stride, ...: one interleaved strided view per class size."""
    for first, classes, m in g.classes(n):
        rows = Rows(first, m, g.stride, classes, 1)
        yield Piece(head, rows, rows, causal=causal)


def _random(g: RandomBlocks, n: int, head: int, causal: bool) -> Iterator[Piece]:
    """Each draw slot is a batch of (query block, key block) tiles, one per query block, so a
    piece never repeats query rows. Tiles group by size (the last block may be shorter) and by
    whether they lie on the diagonal (causal in their own coordinates) or off it (unmasked)."""
    b = g.block
    table = g.table()[head]
    query = torch.arange(table.shape[0])
    tokens = (n - query * b).clamp(max=b)  # tokens in each block
    for key in table.T:
        tiles = key >= 0
        i, j = query[tiles], key[tiles]
        kind = torch.stack([tokens[i], tokens[j], (i == j) & causal], 1)
        for mq, mk, diagonal in torch.unique(kind, dim=0).tolist():
            same = (kind == torch.tensor([mq, mk, diagonal])).all(1)
            q = Rows.runs(tuple((i[same] * b).tolist()), mq)
            k = Rows.runs(tuple((j[same] * b).tolist()), mk)
            yield Piece(head, q, k, causal=bool(diagonal))


def _dense(n: int, head: int, causal: bool) -> Iterator[Piece]:
    yield Piece(head, Rows(0, n), Rows(0, n), causal=causal)


def branch_pieces(g: Geometry, n: int, head: int, causal: bool, divisor: int = 8
                  ) -> Iterator[Piece]:
    if isinstance(g, Dilated):
        return _dilated(g, n, head, causal)
    if isinstance(g, Window):
        return _window(g, n, head, causal, divisor)
    if isinstance(g, Global):
        return _global(g, n, head, causal)
    if isinstance(g, Strided):
        return _strided(g, n, head, causal)
    if isinstance(g, RandomBlocks):
        return _random(g, n, head, causal)
    if isinstance(g, Dense):
        return _dense(n, head, causal)
    raise TypeError(f"unknown branch {g!r}")


def _without_earlier(piece: Piece, earlier: tuple[Geometry, ...]) -> Piece:
    """Union overlap: drop the pairs an earlier branch already gives (each pair counted once)."""
    own, head, causal = piece.mask, piece.head, piece.causal

    def mask(qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        allowed = own(qpos, kpos) if own else (kpos <= qpos if causal else
                                                torch.ones_like(qpos == kpos))
        for g in earlier:
            allowed = allowed & ~g.allows(head, qpos, kpos)
        return allowed

    return Piece(head, piece.q, piece.k, mask=mask, shared_mask=False)


def _split(piece: Piece, budget: int) -> Iterator[Piece]:
    """Split a masked piece so that no mask exceeds `budget` elements."""
    per_segment = piece.q.count * piece.k.count
    if piece.mask is None or piece.shared_mask or piece.q.nseg * per_segment <= budget:
        yield piece
        return
    if piece.q.nseg > 1:
        step = max(1, budget // per_segment)
        for first in range(0, piece.q.nseg, step):
            number = min(step, piece.q.nseg - first)
            yield from _split(replace(piece, q=piece.q.segments(first, number),
                                      k=piece.k.segments(first, number)), budget)
        return
    step = max(1, budget // piece.k.count)
    for first in range(0, piece.q.count, step):
        yield replace(piece, q=piece.q.chunk(first, min(step, piece.q.count - first)))


def plan_pieces(branches: tuple[Geometry, ...], n: int, heads: int, causal: bool, union: bool,
                budget: int = MASK_BUDGET, divisor: int = 8,
                shared: tuple[tuple[int, ...], ...] = ()) -> list[Piece]:
    """All pieces of a resolved pattern, head by head, in branch order; windows of W tokens in
    chunks of about W / divisor queries; the pairs the branches of each `shared` chain (from
    `nested_chains`) give in common computed once."""
    if union and shared:
        raise ValueError("a union counts shared pairs once: nothing to share")
    pieces = []
    for head in range(heads):
        written = torch.zeros(n, dtype=torch.bool)  # query rows some earlier piece wrote
        for i, g in enumerate(branches):
            if not g.applies(head):  # a branch for other heads
                continue
            earlier = tuple(e for e in branches[:i] if e.applies(head))
            for piece in _pieces_sharing(branches, i, shared, n, head, causal, divisor):
                if not piece.q.count or not piece.k.count:
                    continue
                if union and earlier:
                    piece = _without_earlier(piece, earlier)
                for part in _split(piece, budget):
                    rows = part.q.positions().flatten()
                    fresh = not written[rows].any()
                    written[rows] = True
                    pieces.append(replace(part, fresh=bool(fresh)))
    return pieces


# --- pairs that nested dilated branches share ------------------------------------------------


def nested_chains(branches: tuple[Geometry, ...], n: int, heads: int, union: bool
                  ) -> tuple[tuple[int, ...], ...]:
    """Chains of dilated branches, each nesting in the one before it; a branch in one at most.

    b nests in a when its dilation is twice a's, each of its segments is one or two of a's, and
    on every head both apply to, b's rows inside each of a's segments are every other one of a's
    rows there. Then b's pairs inside one of a's segments are pairs of a too, counted twice
    (multiset). Along a chain a, b, c: a's calls add log(1 + how many later members give the
    pair) to its scores (a mask, the same for every segment), and each later member keeps only
    the pairs between the two halves of its segments (a rectangle, masked the same way by the
    members after it). LongNet's schedules nest this way (2048/1, 4096/2, 8192/4). A mask holds
    a segment's rows squared, one per offset class: members past SHARE_ROWS rows a segment are
    not shared, and a chain has at most MAX_CHAIN members.
    """
    if union:
        return ()
    used: set[int] = set()
    chains = []
    for i in range(len(branches)):
        chain = [i]
        for j in range(i + 1, len(branches)):
            if i not in used and j not in used and len(chain) < MAX_CHAIN and _extends(
                    [branches[c] for c in chain], branches[j], n, heads):
                chain.append(j)
        if len(chain) > 1:
            chains.append(tuple(chain))
            used |= set(chain)
    return tuple(chains)


def _extends(chain: list[Geometry], b: Geometry, n: int, heads: int) -> bool:
    """Whether b nests in the chain's last member, in phase in every member's segments."""
    last = chain[-1]
    if not (isinstance(last, Dilated) and isinstance(b, Dilated)) or \
            b.dilation != 2 * last.dilation:
        return False
    if any(g.rows_in(g.segment, o) > SHARE_ROWS for g in (*chain, b) for o in g.offsets):
        return False
    if b.segment not in (last.segment, min(2 * last.segment, n)):
        return False  # not one or two of the last member's segments
    if not all(_in_phase(g.segment, b, n) for g in chain):
        return False
    both = [h for h in range(heads) if all(g.applies(h) for g in (*chain, b))]
    return bool(both) and all(b.offsets[h] % last.dilation == last.offsets[h] for h in both)


def _in_phase(segment: int, b: Dilated, n: int) -> bool:
    """Whether b's rows lie at the same places in every `segment`-token segment inside one of
    b's (so a mask over them is the same for each)."""
    return segment >= n or b.segment == segment or segment % b.dilation == 0


def _pieces_sharing(branches: tuple[Geometry, ...], i: int, chains: tuple[tuple[int, ...], ...],
                    n: int, head: int, causal: bool, divisor: int) -> Iterator[Piece]:
    """Branch i's pieces for one head: as `branch_pieces`, unless it is in a chain whose every
    member applies to this head. Then the first member's pieces, and each later member's pairs
    between its segments' halves, count the pairs that later members give too."""
    for chain in chains:
        members = [cast(Dilated, branches[c]) for c in chain]  # all dilated (`_extends`)
        if i not in chain or not all(g.applies(head) for g in members):
            continue
        t = chain.index(i)
        pieces = _dilated(members[0], n, head, causal) if t == 0 else \
            _across(members[t], members[t - 1].segment, n, head, causal)
        later = tuple((g, g.offsets[head]) for g in members[t + 1:])
        if not later:
            return pieces
        also = _rows_of_later(later)
        return (replace(p, also=also, shared_mask=True) for p in pieces)
    return branch_pieces(branches[i], n, head, causal, divisor)


@lru_cache(maxsize=256)
def _rows_of_later(members: tuple[tuple[Dilated, int], ...]) -> MaskFn:
    """For each pair, how many of the later members (branch, this head's offset) have both its
    query and key among their rows. One object per offset class, so heads of one class share
    a mask."""
    def count(qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(torch.broadcast_shapes(qpos.shape, kpos.shape), dtype=torch.int32,
                            device=qpos.device)
        for g, offset in members:
            total += (g.residue(qpos) == offset) & (g.residue(kpos) == offset)
        return total

    return count


def _across(g: Dilated, half: int, n: int, head: int, causal: bool) -> Iterator[Piece]:
    """A later chain member's pairs between the two halves (`half` tokens each) of its
    segments; its pairs within a half are the members' before it. Every key of the first half
    precedes every query of the second: no causal mask, causal or not."""
    if g.segment <= half:
        return
    for rows in _dilated_rows(g, n, head):
        first = min(rows.count, g.rows_in(half, g.offsets[head]))
        if first == rows.count:
            continue
        before, after = rows.chunk(0, first), rows.chunk(first, rows.count - first)
        yield Piece(head, after, before)
        if not causal:
            yield Piece(head, before, after)
