"""Arguments several subcommands share: a pattern, a sequence length and the tensor shape."""

from __future__ import annotations

import argparse
import math

from spattn.limits import MAX_SIZE


def positive(text: str) -> int:
    """An integer in [1, 2^40]; 1_000_000 and 1e6 work too."""
    expected = f"expected an integer from 1 to {MAX_SIZE:,} (2^40), got {text[:40]!r}"
    try:
        value = int(text)
    except ValueError:
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if not number.is_integer():  # nan and inf are not
            raise argparse.ArgumentTypeError(expected) from None
        value = int(number)
    if not 1 <= value <= MAX_SIZE:
        raise argparse.ArgumentTypeError(expected)
    return value


def add_shape(parser: argparse.ArgumentParser, seq_len_help: str) -> None:
    """PATTERN, --seq-len, --heads, --head-dim and --batch."""
    parser.add_argument("pattern", metavar="PATTERN", help="a built-in pattern name or a YAML file")
    parser.add_argument("--seq-len", "-n", type=positive, required=True, metavar="N",
                        help=seq_len_help)
    parser.add_argument("--heads", type=positive, metavar="H",
                        help="query heads (default: the pattern's, else 8)")
    parser.add_argument("--head-dim", type=positive, metavar="D",
                        help="head dimension (default: the pattern's, else 64)")
    parser.add_argument("--batch", type=positive, default=1, metavar="B",
                        help="batch size (default 1)")
