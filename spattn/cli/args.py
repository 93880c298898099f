"""Arguments several subcommands share: a pattern, a sequence length, the tensor shape and a
dtype."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence

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


DTYPES = ("float16", "bfloat16", "float32", "float64")  # torch's names, the ones printed
DTYPE_ALIASES = {
    "fp16": "float16", "half": "float16", "f16": "float16",
    "bf16": "bfloat16",
    "fp32": "float32", "float": "float32", "f32": "float32",
    "fp64": "float64", "double": "float64", "f64": "float64",
}


def dtype_parser(allowed: Sequence[str] = DTYPES) -> Callable[[str], str]:
    """An argparse type: torch's name of a dtype in `allowed` (float16, bfloat16, ...), from that
    name, 'torch.float16', or a short one (fp16, bf16, fp32, fp64, half, float, double)."""
    aliases = ", ".join(a for a, name in DTYPE_ALIASES.items() if name in allowed)

    def parse(text: str) -> str:
        key = text.strip().lower().removeprefix("torch.")
        name = DTYPE_ALIASES.get(key, key)
        if name not in allowed:
            raise argparse.ArgumentTypeError(
                f"invalid choice: {text[:40]!r} (choose from {', '.join(allowed)}; "
                f"or {aliases})")
        return name

    parse.__name__ = "dtype"  # argparse names the type in some messages
    return parse


def add_dtype(parser: argparse.ArgumentParser, allowed: Sequence[str] = DTYPES,
              default: str | None = None, many: bool = False, what: str = "tensor dtype") -> None:
    """--dtype: torch's names of `allowed` (short names too); `many`: one or more, repeatable."""
    more = "one or more of " if many else ""
    shorts = [a for a in ("fp16", "bf16", "fp32", "fp64") if DTYPE_ALIASES[a] in allowed]
    shown = f"default {default}" if default else "default: all"
    extra = {"action": "extend", "nargs": "+"} if many else {"default": default}
    parser.add_argument("--dtype", type=dtype_parser(allowed), metavar="D", **extra,
                        help=f"{what}: {more}{', '.join(allowed)} ({', '.join(shorts)} work "
                             f"too; {shown})")
