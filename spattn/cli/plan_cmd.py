"""`spattn plan`: how a pattern splits over P ranks and what each rank communicates."""

from __future__ import annotations

import argparse

from spattn.cli.args import add_dtype, add_shape, positive

HELP = "plan a pattern over P ranks: local and spanning branches, bytes each rank sends"

DESCRIPTION = """\
Rank j of P holds tokens [j*N/P, (j+1)*N/P). Per branch: local (its segments lie inside one
rank's chunk: no communication) or spanning g ranks (a segment covers g whole chunks: the g ranks
of each subgroup all-gather their dilated K/V rows in the forward and send back those rows'
gradients in the backward), the subgroups, and the elements and bytes each rank sends per layer
(it receives as much). The total is compared with all-gathering every rank's whole K and V, and
with gathering the same dilated rows from all P ranks as the official LongNet code does.
Everything is analytic: nothing is communicated. A pattern the plan cannot serve is an error.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("plan", help=HELP, description=DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape(parser, "total sequence length N over all ranks (1e6 and 1_048_576 work)")
    parser.add_argument("--world-size", "-p", type=positive, required=True, metavar="P",
                        help="number of ranks; N must be a multiple of P")
    parser.add_argument("--kv-heads", type=positive, metavar="HKV",
                        help="key/value heads (default: the pattern's, else H)")
    add_dtype(parser, default="bfloat16",
              what="dtype of q, k, v (gradients travel in float32, float64 for float64)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from spattn.distributed.plan import PlanError, build_plan, format_plan
    from spattn.patterns.loader import load_pattern
    from spattn.patterns.report import DEFAULT_HEAD_DIM, choose_heads

    pattern = load_pattern(args.pattern)
    heads = choose_heads(pattern, args.heads)
    kv_heads = args.kv_heads or pattern.kv_heads or heads
    if pattern.kv_heads is not None and args.kv_heads not in (None, pattern.kv_heads):
        raise PlanError(f"pattern '{pattern.name}' fixes kv_heads = {pattern.kv_heads}, "
                        f"got --kv-heads {args.kv_heads}")
    head_dim = args.head_dim or pattern.head_dim or DEFAULT_HEAD_DIM
    if pattern.head_dim is not None and head_dim != pattern.head_dim:
        raise PlanError(f"pattern '{pattern.name}' fixes head_dim = {pattern.head_dim}, "
                        f"got --head-dim {head_dim}")
    plan = build_plan(pattern, args.seq_len, args.world_size, heads=heads, kv_heads=kv_heads,
                      head_dim=head_dim, batch=args.batch, dtype=args.dtype)
    print(format_plan(plan))
    return 0
