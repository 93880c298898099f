"""`spattn inspect`: what a pattern allows and costs at a sequence length, counted analytically."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from spattn.cli.args import add_shape, positive
from spattn.limits import MAX_PICTURE_HEADS, MAX_PICTURE_WORK, MAX_PLAN_WORK

if TYPE_CHECKING:
    from spattn.patterns.spec import Pattern

HELP = "count a pattern's pairs, FLOPs, tiles, speed-up bound and hop distance; draw its mask"

DESCRIPTION = f"""\
Per branch and in total: the allowed (head, query, key) pairs, the density against dense
attention, the useful forward FLOPs (4 * head_dim * batch * pairs) and the speed-up bound over
dense attention. Counts are exact and analytic, so N = 1,000,000 takes about a second.

Then the tiles: those spattn's plan computes (--block-m x --block-n, default 64x64; dilated
branches are tiled in their dilated rows, so no tile is wasted by dilation) against those a
block-sparse kernel over original positions computes (--flex-block squared, default 128x128, the
FlexAttention strategy: every tile holding an allowed pair), the useful fraction of each (allowed
pairs / computed tile area) and how much work spattn avoids.

Then the hop distance: the most hops any token needs to reach any earlier token (any other token
when the pattern is not causal) through the pattern, computed exactly for N up to 8192, and a
table of it for N = 16, 32, ... up to min(N, 4096) to show how it grows (LongNet: like log N).
A pattern only shows that growth past its segment lengths: LongNet's start at 2048, so use
--scale to shrink them, e.g. `spattn inspect longnet-lm --seq-len 4096 --scale 16`. Pairs with
no path at all (tokens further apart than the longest segment, or on rows no head keeps) are
reported as unconnected, and the hop counts are over the connected pairs.

Every part is bounded: a count, tile list, random table or hop search past its work limit is
left out with a note; a picture of more than {MAX_PICTURE_WORK:,} mask cells (heads drawn x
T^2 x branches) or of more than {MAX_PICTURE_HEADS} heads, and a --plan past {MAX_PLAN_WORK:,}
elements of planning, are refused in one line. --png writes a regular file only (never through
a link, nor over a device, FIFO or folder), atomically.
"""


def _head(text: str) -> int | None:
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or a head number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 'all' or a head number >= 0, got {text!r}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("inspect", help=HELP, description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape(parser, "sequence length N (>= 1; 1e6 and 1_000_000 work)")
    parser.add_argument("--scale", type=positive, default=1, metavar="S",
                        help="divide every segment length, window size, stride and random "
                             "block size by S (rounded down, at least 1), keeping dilations: "
                             "the pattern's shape at a smaller N")
    parser.add_argument("--no-hops", action="store_true", help="skip the hop distances")
    parser.add_argument("--no-tiles", action="store_true", help="skip the tile comparison")
    parser.add_argument("--block-m", type=positive, default=64, metavar="M",
                        help="query rows of spattn's tiles (default 64)")
    parser.add_argument("--block-n", type=positive, default=64, metavar="N",
                        help="key rows of spattn's tiles (default 64)")
    parser.add_argument("--flex-block", type=positive, default=128, metavar="B",
                        help="tile side of the block-sparse kernel compared with (default 128)")
    parser.add_argument("--plan", action="store_true",
                        help="also print the calls the PyTorch backend (CPU) makes for this "
                             "shape, as its cost model chooses them (`spattn tune` measures "
                             "this machine)")
    parser.add_argument("--kv-heads", type=positive, metavar="HKV",
                        help="key/value heads for --plan (default: the pattern's, else H)")
    parser.add_argument("--png", metavar="FILE",
                        help="draw the mask into a PNG file (a new or regular file)")
    parser.add_argument("--head", type=_head, default=0, metavar="H|all",
                        help="the head to draw, or 'all' for a grid of every head (default 0)")
    parser.add_argument("--png-tokens", type=positive, default=256, metavar="T",
                        help="draw the first T tokens (default 256, at most 4096)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from spattn.patterns.loader import load_pattern
    from spattn.patterns.report import choose_heads, format_report, inspect_pattern, scale_pattern

    pattern = load_pattern(args.pattern)
    heads = choose_heads(pattern, args.heads)
    if args.png:  # a bad --png, or a picture past its bound, is refused before any other work
        from spattn.patterns.picture import check_picture

        check_picture(scale_pattern(pattern, args.scale), args.seq_len, heads, args.png,
                      args.head, args.png_tokens)
    if args.plan:
        _check_plan(scale_pattern(pattern, args.scale), args, heads)
    report = inspect_pattern(pattern, args.seq_len, heads=args.heads, head_dim=args.head_dim,
                             batch=args.batch, scale=args.scale, hops=not args.no_hops,
                             tiles=not args.no_tiles, block_m=args.block_m, block_n=args.block_n,
                             block=args.flex_block)
    wrote = None
    if args.png:  # before printing anything, so that a failed write is the only line printed
        from spattn.patterns.picture import draw_mask

        scaled = f" (scaled 1/{args.scale})" if args.scale > 1 else ""
        drawn = draw_mask(scale_pattern(pattern, args.scale), args.seq_len, heads, args.png,
                          head=args.head, tokens=args.png_tokens, title=pattern.name + scaled)
        which = "every head" if args.head is None else f"head {args.head}"
        wrote = f"wrote {args.png}: the mask of {which} over the first {drawn:,} tokens"
    print(format_report(report))
    if args.plan:
        print("\n" + "\n".join(_plan_lines(scale_pattern(pattern, args.scale), args)))
    if wrote:
        print(f"\n{wrote}")
    return 0


def plan_work(pattern: Pattern, seq_len: int, heads: int) -> int:
    """About how many elements the CPU planner touches for this shape: it marks every piece's
    query rows, head by head (a random branch has a piece per draw), once per window chunk size
    it tries, and matches each piece's head against the others of its shape."""
    from spattn.patterns.spec import RandomBranch, WindowBranch
    from spattn.runtime.torch_backend import WINDOW_DIVISORS

    branches = pattern.expanded_branches()
    pieces = sum(4 * (b.random.blocks + 1) if isinstance(b, RandomBranch) else 4
                 for b in branches)
    tries = len(WINDOW_DIVISORS) if any(isinstance(b, WindowBranch) for b in branches) else 2
    return tries * heads * (seq_len * pieces + 25 * heads * len(branches))


def _check_plan(pattern: Pattern, args: argparse.Namespace, heads: int) -> None:
    """The SpattnError `--plan` would end in, or its work past MAX_PLAN_WORK, before any work."""
    from spattn.errors import SpattnError

    kv_heads = args.kv_heads or pattern.kv_heads or heads
    if heads % kv_heads:
        raise SpattnError(f"--kv-heads: {kv_heads} does not divide the {heads} query heads")
    work = plan_work(pattern, args.seq_len, heads)
    if work > MAX_PLAN_WORK:
        raise SpattnError(f"--plan: planning N = {args.seq_len:,} tokens x {heads:,} heads is "
                          f"about {work:,} elements of work, past the {MAX_PLAN_WORK:,} it may "
                          f"take; pass a smaller --seq-len or --heads (or leave out --plan)")


def _plan_lines(pattern: Pattern, args: argparse.Namespace) -> list[str]:
    from spattn.patterns.geometry import resolve
    from spattn.patterns.report import choose_heads
    from spattn.runtime import torch_backend
    from spattn.runtime.dispatch import resolve_scale

    heads = choose_heads(pattern, args.heads)
    kv_heads = args.kv_heads or pattern.kv_heads or heads
    dim = args.head_dim or pattern.head_dim or 64
    n = args.seq_len
    problem = torch_backend.Problem(resolve(pattern, n, heads), n, heads, kv_heads,
                                    pattern.causal, pattern.overlap == "union",
                                    resolve_scale(pattern, None, dim))
    lines = torch_backend.describe(problem, dim)
    return [f"CPU plan for N={n:,} H={heads} Hkv={kv_heads} D={dim}: {lines[0]}",
            *lines[1:]]
