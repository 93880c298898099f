"""`spattn tune`: measure this machine for the PyTorch backend's cost model and keep the figures."""

from __future__ import annotations

import argparse
import sys

from spattn.cli.args import positive


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tune", help="measure this machine for the CPU planner's cost model",
        description="Time what the PyTorch backend's plans are made of on this machine (one "
                    "attention call, a gather of rows, the pairs of a dense problem; a few "
                    "seconds) and keep the figures in $SPATTN_CACHE_DIR/costs/, where every "
                    "later process reads them. Untuned, plans use a fixed default model.")
    p.add_argument("--repeat", type=positive, default=5, metavar="R",
                   help="timings per figure; the best is kept (default 5)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from spattn.runtime import costs

    before = costs.current()
    model, path = costs.tune(args.repeat, lambda what: print(f"timing {what} ...",
                                                             file=sys.stderr, flush=True))
    print(f"was   {before.describe()}")
    print(f"now   {model.describe()}")
    print(f"wrote {path}")
    return 0
