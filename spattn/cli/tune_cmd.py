"""`spattn tune`: measure this machine for the PyTorch backend's cost model and keep the figures."""

from __future__ import annotations

import argparse
import sys
import warnings

from spattn.cli.args import positive
from spattn.errors import SpattnError


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

    with warnings.catch_warnings():  # a bad tuned file: replaced now, or refused below
        warnings.simplefilter("ignore", costs.CostFileWarning)
        before = costs.current()
    try:
        model, path = costs.tune(args.repeat, lambda what: print(f"timing {what} ...",
                                                                 file=sys.stderr, flush=True))
    except OSError as error:  # a read-only cache, or a link or FIFO where the file goes
        where = error.filename or costs.cache_dir() / "costs"
        raise SpattnError(f"cannot write {where}: {error.strerror or error}") from None
    print(f"was   {before.describe()}")
    print(f"now   {model.describe()}")
    print(f"wrote {path}")
    return 0
