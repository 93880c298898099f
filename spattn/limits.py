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
MAX_NAME_LENGTH = 64  # a pattern's name (it names files and modules)
MAX_LIST_ITEMS = 2**16  # global tokens of one branch (offsets: one per head, MAX_HEADS)
MAX_SEED = 2**63 - 1  # a random branch's seed
MAX_DRAWS = 256  # key blocks a random branch draws per query block (kernels unroll over them)
MAX_WORLD_SIZE = 2**20  # ranks of a distributed plan
MAX_WORK = 10**7  # array elements an analytic count, tile list, hop search or picture may touch
MAX_PICTURE_WORK = 2**27  # mask cells (and draws) of a picture: 4,096 tokens, 8 branches
MAX_PICTURE_HEADS = 64  # heads one picture draws (an 8 x 8 grid)
MAX_PLAN_WORK = 10 * MAX_WORK  # elements the CPU planner touches for `inspect --plan`


class WorkLimitError(SpattnError, ValueError):
    """A count, tile list, hop search or picture that would touch more than MAX_WORK elements."""


def check_work(work: int, what: str, limit: int = MAX_WORK) -> None:
    """A WorkLimitError saying `what` is too large to do exactly when `work` passes `limit`."""
    if work > limit:
        raise WorkLimitError(f"{what}: too large to compute exactly (about {_amount(work)} "
                             f"elements of work, the limit is {_amount(limit)})")


def bound_text(limit: int) -> str:
    """A limit as people read it: '1099511627776 (2^40)', '9223372036854775807 (2^63 - 1)', '64'."""
    for power, suffix in ((limit, ""), (limit + 1, " - 1")):
        if power >= 2**16 and power & (power - 1) == 0:
            return f"{limit} (2^{power.bit_length() - 1}{suffix})"
    return str(limit)


def short_int(value: int) -> str:
    """An integer for an error message: its digits, or only how many there are when huge."""
    if abs(value) < 10**30:
        return str(value)
    digits = math.floor(math.log10(abs(value))) + 1
    digits -= 10 ** (digits - 1) > abs(value)  # log10 of 99...9 may round up to the next power
    return f"an integer of {digits} digits"


def _amount(work: int) -> str:
    return f"{work:,}" if work < 10**15 else f"10^{math.floor(math.log10(work))}"


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
