"""What `spattn inspect` reports about a pattern, as data and as text.

`inspect_pattern` gathers per-branch and total counts (pairs, density, useful FLOPs, speed-up
bound), the tiles spattn computes against those of a block-sparse kernel over original positions,
the hop distance and a table of hop distances over N = 16, 32, ... for other code (benchmarks, the
README) to use; `format_report` prints it as aligned tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from spattn.errors import SpattnError
from spattn.limits import MAX_HEAD_DIM, MAX_HEADS, MAX_SIZE, WorkLimitError, bound_text, check_work
from spattn.patterns.counting import (
    branch_pairs,
    check_random_table,
    dense_pairs,
    random_table_work,
    union_pairs,
    useful_flops,
)
from spattn.patterns.geometry import (
    Dilated,
    Geometry,
    Global,
    RandomBlocks,
    Strided,
    describe,
    resolve,
)
from spattn.patterns.hops import MAX_HOPS_SEQ_LEN, Hops, hop_distance_of, hop_lengths
from spattn.patterns.retention import cache_bound
from spattn.patterns.spec import (
    DilatedBranch,
    GlobalBranch,
    Pattern,
    RandomBranch,
    StridedBranch,
    WindowBranch,
)

DEFAULT_HEADS = 8
DEFAULT_HEAD_DIM = 64
HOP_TABLE_LIMIT = 4096  # largest N in the hop table
DEFAULT_BLOCK = 64  # spattn's tiles (block_m = block_n)
DEFAULT_FLEX_BLOCK = 128  # the block-sparse kernel's tiles (FlexAttention's default)


@dataclass(frozen=True)
class Row:
    """Counts for one branch, the total, or dense attention."""

    label: str
    pairs: int | None  # None: too large to count exactly at this N (see the report's notes)
    density: float  # pairs / dense pairs
    flops: int  # forward useful FLOPs (a backward pass counts 2.5x)
    speedup: float  # dense pairs / pairs: the bound on the speed-up over dense attention


@dataclass(frozen=True)
class TileRow:
    """Tiles computed for one branch or the total: by spattn, and by a block-sparse kernel."""

    label: str
    pairs: int
    spattn: int  # block_m x block_n tiles of spattn's plan (dilated coordinates)
    block_sparse: int  # block x block tiles over original positions with an allowed pair
    spattn_useful: float  # pairs / (spattn * block_m * block_n)
    block_sparse_useful: float  # pairs / (block_sparse * block^2)


@dataclass(frozen=True)
class Tiles:
    block_m: int
    block_n: int
    block: int
    branches: tuple[TileRow, ...]
    total: TileRow  # spattn: every branch's pass; block-sparse: one pass over the union mask

    @property
    def spattn_products(self) -> int:
        """(query, key) products spattn's tiles compute."""
        return self.total.spattn * self.block_m * self.block_n

    @property
    def block_sparse_products(self) -> int:
        return self.total.block_sparse * self.block * self.block


@dataclass(frozen=True)
class InspectReport:
    pattern: str
    causal: bool
    overlap: str
    seq_len: int
    heads: int
    head_dim: int
    batch: int
    scale: int
    branches: tuple[Row, ...]
    total: Row
    dense: Row
    hops: Hops | None  # None when not computed (see hops_note)
    hop_table: tuple[Hops, ...]
    hops_note: str | None
    tiles: Tiles | None = None  # None when not computed
    cache_tokens: int | None = None  # causal: the most tokens a decoder's KV cache holds
    notes: tuple[str, ...] = ()  # what was ignored, or not computed and why


def choose_heads(pattern: Pattern, heads: int | None) -> int:
    """`heads`, else the pattern's own count, else 8; an error where the pattern fixes another."""
    required = pattern.required_heads()
    if heads is None:
        return required if required is not None else DEFAULT_HEADS
    if not 1 <= heads <= MAX_HEADS:
        raise SpattnError(f"--heads: expected an integer from 1 to {bound_text(MAX_HEADS)}, "
                          f"got {heads}")
    if required is not None and heads != required:
        why = "its 'heads'" if pattern.heads is not None else "the length of its offsets lists"
        raise SpattnError(f"--heads: pattern '{pattern.name}' is written for {required} heads "
                          f"({why}), got {heads}")
    return heads


def scale_pattern(pattern: Pattern, scale: int) -> Pattern:
    """A small-N model of a pattern whose sizes are long: every length divided by `scale`
    (rounded down, at least 1), every count kept.

    Lengths are segments, window sizes, strides and random block sizes; dilations, global
    tokens, the number of random blocks per query block and the seed are kept. So a random
    branch keeps drawing `blocks` key blocks, now out of N / (block / scale) blocks: the draw
    differs from the full-size pattern's, and its density at N is the full-size one at scale*N.
    """
    if scale < 1:
        raise SpattnError(f"--scale: expected an integer >= 1, got {scale}")
    if scale == 1:
        return pattern
    branches = [_scale_branch(branch, scale) for branch in pattern.expanded_branches()]
    return pattern.model_copy(update={"branches": branches, "schedule": None})


def _scale_branch(branch: Any, scale: int) -> Any:
    """The branch with its length (segment, window size, stride, block) divided by `scale`."""
    def shrink(spec: Any, field: str) -> Any:
        return spec.model_copy(update={field: max(1, getattr(spec, field) // scale)})

    if isinstance(branch, DilatedBranch):
        return shrink(branch, "segment")
    if isinstance(branch, WindowBranch):
        return branch.model_copy(update={"window": shrink(branch.window, "size")})
    if isinstance(branch, StridedBranch):
        return branch.model_copy(update={"strided": shrink(branch.strided, "stride")})
    if isinstance(branch, RandomBranch):
        return branch.model_copy(update={"random": shrink(branch.random, "block")})
    return branch  # global tokens and dense: nothing to scale


def _row(label: str, pairs: int | None, dense: int, head_dim: int, batch: int) -> Row:
    if pairs is None:
        return Row(label, None, math.nan, 0, math.nan)
    return Row(label, pairs, pairs / dense if dense else 0.0, useful_flops(pairs, head_dim, batch),
               dense / pairs if pairs else math.inf)


def _tile_row(label: str, pairs: int, spattn: int, block_sparse: int, spattn_area: int,
              block: int) -> TileRow:
    return TileRow(label, pairs, spattn, block_sparse,
                   pairs / (spattn * spattn_area) if spattn else 0.0,
                   pairs / (block_sparse * block * block) if block_sparse else 0.0)


def compare_tiles(pattern: Pattern, seq_len: int, heads: int, labels: list[str],
                  block_m: int = DEFAULT_BLOCK, block_n: int = DEFAULT_BLOCK,
                  block: int = DEFAULT_FLEX_BLOCK) -> Tiles:
    """spattn's tiles (the plan) against a block x block block-sparse kernel's, per branch."""
    from spattn.compiler.layouts import block_sparse_counts
    from spattn.compiler.plan import build_plan

    plan = build_plan(pattern, seq_len, heads, block_m=block_m, block_n=block_n)
    other = block_sparse_counts(pattern, seq_len, heads, block)
    area = block_m * block_n
    rows = tuple(_tile_row(label, b.pairs, b.tile_count(), tiles, area, block)
                 for label, b, tiles in zip(labels, plan.branches, other.branches, strict=True))
    total = _tile_row(f"total ({pattern.overlap})", plan.pairs, plan.tile_count(), other.total,
                      area, block)
    return Tiles(block_m, block_n, block, rows, total)


def inspect_pattern(pattern: Pattern, seq_len: int, heads: int | None = None,
                    head_dim: int | None = None, batch: int = 1, scale: int = 1,
                    hops: bool = True, tiles: bool = True, block_m: int = DEFAULT_BLOCK,
                    block_n: int = DEFAULT_BLOCK, block: int = DEFAULT_FLEX_BLOCK
                    ) -> InspectReport:
    """Counts, costs, tiles and hop distances of `pattern` at `seq_len` tokens (module doc).

    A part that would pass the work limit (random blocks or a union at a huge N, the tiles, a
    hop search of thousands of hops) is left out with a note saying so; the rest is reported.
    """
    for flag, value, most in (("--seq-len", seq_len, MAX_SIZE), ("--batch", batch, MAX_SIZE),
                              ("--head-dim", head_dim, MAX_HEAD_DIM),
                              ("--block-m", block_m, MAX_SIZE), ("--block-n", block_n, MAX_SIZE),
                              ("--flex-block", block, MAX_SIZE), ("--scale", scale, MAX_SIZE)):
        if value is not None and not 1 <= value <= most:
            raise SpattnError(f"{flag}: expected an integer from 1 to {bound_text(most)}, "
                              f"got {value}")
    heads = choose_heads(pattern, heads)
    head_dim = head_dim or pattern.head_dim or DEFAULT_HEAD_DIM
    pattern = scale_pattern(pattern, scale)
    branches = len(pattern.expanded_branches())
    # Every part resolves the pattern: an offset per head and branch, a few dozen times.
    check_work(20 * heads * branches, f"inspecting {heads:,} heads x {branches} branches")
    geometries = resolve(pattern, seq_len, heads)
    notes = _ignored_tokens(pattern, seq_len)
    counts = [_attempt(notes, branch_pairs, g, seq_len, heads, pattern.causal) for g in geometries]
    if pattern.overlap == "union":
        total = _attempt(notes, union_pairs, geometries, seq_len, heads, pattern.causal)
    else:  # multiset: a key two branches both give counts twice
        total = None if None in counts else sum(counts)
    dense = dense_pairs(seq_len, heads, pattern.causal)
    labels = [describe(g) for g in geometries]
    for i, branch in enumerate(pattern.expanded_branches()):
        if isinstance(branch, DilatedBranch):
            labels[i] += f" ({_offsets(branch, pattern)})"
        elif isinstance(branch, RandomBranch):
            labels[i] += f" (seed {branch.random.seed})"
    rows = tuple(_row(label, pairs, dense, head_dim, batch)
                 for label, pairs in zip(labels, counts, strict=True))
    total_row = _row(f"total ({pattern.overlap})", total, dense, head_dim, batch)
    hop, table, note = None, (), None
    if hops:
        hop, table, note = _hops(pattern, seq_len, heads)
    compared = None
    if tiles and total is None:  # the tiles' total needs the count refused above
        notes.append("not computed: the tile comparison, which needs the total count")
    elif tiles:
        compared = _attempt(notes, _checked_tiles, pattern, geometries, seq_len, heads, labels,
                            block_m, block_n, block)
    return InspectReport(
        pattern=pattern.name, causal=pattern.causal, overlap=pattern.overlap, seq_len=seq_len,
        heads=heads, head_dim=head_dim, batch=batch, scale=scale, branches=rows,
        total=total_row, dense=_row("dense attention", dense, dense, head_dim, batch), hops=hop,
        hop_table=table, hops_note=note, tiles=compared,
        cache_tokens=cache_bound(pattern, heads) if pattern.causal else None,
        notes=tuple(dict.fromkeys(notes)))


def _attempt(notes: list[str], function: Any, *args: Any) -> Any:
    """function(*args), or None with a note when it would pass the work limit."""
    try:
        return function(*args)
    except WorkLimitError as error:
        notes.append(f"not computed: {error}")
        return None


def _ignored_tokens(pattern: Pattern, seq_len: int) -> list[str]:
    """A note per global branch with tokens at or past N (SEMANTICS: they are ignored)."""
    notes = []
    for i, branch in enumerate(pattern.expanded_branches()):
        if isinstance(branch, GlobalBranch):
            past = sorted({t for t in branch.global_.tokens if t >= seq_len})
            if past:
                shown = ", ".join(f"{t:,}" for t in past[:8]) + (", ..." if len(past) > 8 else "")
                notes.append(f"branches[{i}]: {len(past):,} global token(s) at or past N = "
                             f"{seq_len:,} are ignored: {shown}")
    return notes


def _hops(pattern: Pattern, seq_len: int, heads: int
          ) -> tuple[Hops | None, tuple[Hops, ...], str | None]:
    """(hops at N, the table up to HOP_TABLE_LIMIT, a note when the first is not computed);
    the table stops before the first length whose search passes the work limit, or where the
    random tables drawn for every length so far pass it together."""
    table: list[Hops] = []
    drawn = 0  # elements of work of the random tables drawn so far, over every length

    def hops_at(n: int) -> Hops:
        nonlocal drawn
        geometries = resolve(pattern, n, heads)
        drawn += sum(random_table_work(g) for g in geometries if isinstance(g, RandomBlocks))
        check_work(drawn, f"the random blocks' draws ({heads:,} heads) of the hop distances up "
                          f"to N = {n:,}")
        return hop_distance_of(geometries, n, heads, pattern.causal)

    for n in hop_lengths(seq_len, limit=HOP_TABLE_LIMIT):
        try:
            table.append(hops_at(n))
        except WorkLimitError as error:
            stop = f"; the table below stops at N = {table[-1].seq_len:,}" if table else ""
            return None, tuple(table), f"not computed: {error}{stop}"
    if seq_len <= HOP_TABLE_LIMIT:
        return table[-1], tuple(table), None
    if seq_len > MAX_HOPS_SEQ_LEN:
        return None, tuple(table), (
            f"not computed for N > {MAX_HOPS_SEQ_LEN:,} (an exact all-pairs search needs N^2 "
            f"bits); the table below stops at N = {table[-1].seq_len:,}")
    try:
        return hops_at(seq_len), tuple(table), None
    except WorkLimitError as error:
        return None, tuple(table), f"not computed: {error}"


def tile_work(geometries: tuple[Geometry, ...], seq_len: int, heads: int, block_m: int,
              block_n: int, block: int) -> int:
    """About how many array elements listing the tiles takes (the plan's and the block-sparse
    kernel's, for every distinct kind of head): a bound checked before listing them."""
    n, b = seq_len, min(block, block_m, block_n)
    per_side = -(-n // b)
    if any(isinstance(g, RandomBlocks) for g in geometries):
        kinds = heads
    else:
        kinds = len({tuple(g.offsets[h] for g in geometries if isinstance(g, Dilated))
                     for h in range(heads)})
    work = 0
    for g in geometries:
        if isinstance(g, Dilated):
            segments, rows = -(-n // g.segment), -(-g.segment // g.dilation)
            work += per_side + segments * (rows * rows if g.dilation > block else 1)
        elif isinstance(g, Strided):
            work += per_side * (1 if g.stride <= block else -(-n // g.stride) + 1)
        elif isinstance(g, Global):
            work += 2 * per_side * len({t // b for t in g.tokens})
        elif isinstance(g, RandomBlocks):
            blocks = -(-n // g.block)
            work += blocks * g.blocks * (-(-g.block // b) + 1)  # per head: kinds counts heads
        else:  # window and dense: a band of tiles per row of tiles
            work += per_side
    return kinds * work


def _checked_tiles(pattern: Pattern, geometries: tuple[Geometry, ...], seq_len: int, heads: int,
                   labels: list[str], block_m: int, block_n: int, block: int) -> Tiles:
    check_work(tile_work(geometries, seq_len, heads, block_m, block_n, block),
               f"the tile lists at N = {seq_len:,} (try a larger --flex-block, --block-m "
               f"and --block-n)")
    for g in geometries:
        if isinstance(g, RandomBlocks):
            check_random_table(g)
    return compare_tiles(pattern, seq_len, heads, labels, block_m, block_n, block)


def _offsets(branch: DilatedBranch, pattern: Pattern) -> str:
    if branch.offsets:
        shown = ",".join(map(str, branch.offsets[:16]))
        return "offsets " + shown + (",..." if len(branch.offsets) > 16 else "")
    return f"{pattern.head_offsets} offsets" if branch.dilation > 1 else "every row"


# --- text ---------------------------------------------------------------------------------------


def _flops(value: float) -> str:
    for unit, size in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9),
                       ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} FLOP"


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.3g}%"


def _speedup(value: float) -> str:
    return "-" if math.isinf(value) else f"{value:,.1f}x"


def _table(header: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """Columns aligned: the first `left` to the left, the rest to the right."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) if i < left else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
            for row in [header, *rows]]


def _products(value: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.0f}"


def _tile_lines(tiles: Tiles) -> list[str]:
    b, bm, bn = tiles.block, tiles.block_m, tiles.block_n
    lines = [f"tiles: spattn's plan ({bm}x{bn} tiles, dilated rows loaded with a stride) against a "
             f"{b}x{b}", "block-sparse kernel over original positions (FlexAttention's strategy)"]
    header = ["branch", f"spattn {bm}x{bn} tiles", "useful", f"block-sparse {b}x{b} tiles",
              "useful"]
    rows = [[r.label, f"{r.spattn:,}", _percent(r.spattn_useful), f"{r.block_sparse:,}",
             _percent(r.block_sparse_useful)] for r in (*tiles.branches, tiles.total)]
    lines += ["  " + line for line in _table(header, rows)]
    lines.append("  (useful: allowed pairs / (tiles * tile area); spattn runs every branch, the "
                 "block-sparse kernel")
    lines.append("  one pass over the union mask)")
    ours, theirs = tiles.spattn_products, tiles.block_sparse_products
    lines.append(f"spattn computes {_products(ours)} query-key products, the block-sparse kernel "
                 f"{_products(theirs)}:")
    if ours < theirs:
        lines.append(f"spattn does {theirs / ours:,.2f}x less work and avoids "
                     f"{_products(theirs - ours)} products ({_percent(1 - ours / theirs)} of them)"
                     if ours else "spattn does no work")
    elif theirs:
        lines.append(f"spattn does {ours / theirs:,.2f}x as much work "
                     f"({_products(ours - theirs)} more products)")
    return lines


def _hops_sentence(report: InspectReport) -> str:
    if report.hops is None:
        return f"hops: {report.hops_note}"
    h, other = report.hops, ("earlier token" if report.causal else "other token")
    if h.pairs == 0:
        return "hops: a single token has nothing to reach"
    if h.connected:
        return f"hops: every token reaches every {other} in at most {h.hops} hop(s)"
    return (f"hops: {h.unreachable:,} of {h.pairs:,} (token, {other}) pairs are never connected; "
            f"the others take at most {h.hops} hop(s)")


def _decoding_sentence(report: InspectReport) -> str:
    if report.cache_tokens is None:
        return ("decoding: a KV cache keeps every token (a strided, random or dense branch may "
                "attend any earlier key)")
    return (f"decoding: a KV cache keeps at most {report.cache_tokens:,} tokens' keys and values, "
            f"at any sequence length (spattn.KVCache)")


def format_report(report: InspectReport) -> str:
    """The report as aligned text, as `spattn inspect` prints it."""
    scaled = f", lengths (segments, windows, strides, blocks) scaled by 1/{report.scale}" \
        if report.scale > 1 else ""
    lines = [
        f"{report.pattern}: {'causal' if report.causal else 'bidirectional'}, "
        f"overlap {report.overlap}{scaled}",
        f"N = {report.seq_len:,} tokens, {report.heads} heads, head_dim {report.head_dim}, "
        f"batch {report.batch}",
        "",
    ]
    header = ["branch", "(head, query, key) pairs", "density", "forward FLOPs", "speed-up bound"]
    rows = [[r.label, f"{r.pairs:,}", _percent(r.density), _flops(r.flops), _speedup(r.speedup)]
            if r.pairs is not None else [r.label, "not counted", "-", "-", "-"]
            for r in (*report.branches, report.total, report.dense)]
    lines += _table(header, rows)
    lines.append("(useful FLOPs = 4 * head_dim * batch * pairs; a backward pass counts 2.5x)")
    lines += [f"note: {note}" for note in report.notes]
    if report.tiles is not None:
        lines += ["", *_tile_lines(report.tiles)]
    if report.causal:
        lines += ["", _decoding_sentence(report)]
    if report.hops is not None or report.hops_note or report.hop_table:
        lines += ["", _hops_sentence(report)]
    if len(report.hop_table) > 1:
        lines += ["", "hop distance by sequence length (the paper: grows like log N)"]
        cells = [["N", *(f"{h.seq_len:,}" for h in report.hop_table)],
                 ["log2 N", *(f"{math.log2(h.seq_len):.3g}" for h in report.hop_table)],
                 ["hops", *(f"{h.hops}" for h in report.hop_table)]]
        if not all(h.connected for h in report.hop_table):
            cells.append(["unconnected", *(_percent(h.unreachable / h.pairs) if h.unreachable
                                           else "0" for h in report.hop_table)])
        lines += ["  " + line for line in _table(cells[0], cells[1:])]
        if len(cells) > 3:
            lines.append("  (unconnected: the share of pairs with no path; hops counts the others)")
    return "\n".join(lines)
