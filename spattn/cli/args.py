"""Arguments several subcommands share: a pattern, a sequence length and the tensor shape."""

from __future__ import annotations

import argparse


def positive(text: str) -> int:
    """An integer >= 1; 1_000_000 and 1e6 work too."""
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not value.is_integer():
            raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
        value = int(value)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
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
