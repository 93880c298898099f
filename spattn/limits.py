"""What input may cost: the bounds every entry point (YAML, CLI, API) enforces the same way.

A pattern or a call past these is refused with a clear `SpattnError` before any work is done, so
hostile input costs seconds and megabytes, never hours and gigabytes.
"""

from __future__ import annotations

import math
import numbers

from spattn.errors import SpattnError

MAX_SIZE = 2**40  # any token count or size field: segment, dilation, window, stride, block, N
MAX_HEADS = 2**16  # heads and kv_heads
MAX_HEAD_DIM = 2**16
MAX_BRANCHES = 256  # branches of one pattern, a geometric schedule's count included
MAX_YAML_BYTES = 1 << 20  # a pattern file
MAX_YAML_NODES = 100_000  # YAML nodes after alias expansion
MAX_YAML_DEPTH = 64  # nesting of YAML mappings and lists


class ScaleError(SpattnError, ValueError):
    """A softmax scale that is not a finite number > 0."""


def check_scale(scale: object, what: str = "scale") -> float:
    """`scale` as a float if it is a finite real number > 0, else a ScaleError naming `what`.

    spattn refuses scale <= 0 (SEMANTICS.md allows it): with a zero or negative scale the
    causal diagonal no longer dominates, and nobody trains with it on purpose.
    """
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise ScaleError(f"{what} must be a finite number > 0, got {type(scale).__name__} "
                         f"{_short(scale)}")
    try:
        value = float(scale)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value) or value <= 0:
        raise ScaleError(f"{what} must be a finite number > 0, got {_short(value)}")
    return value


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
