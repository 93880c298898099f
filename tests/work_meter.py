"""What a call costs, counted rather than timed: a loaded machine changes the time, not these.

`metered()` counts, while it is open:
- `checked`: the largest work each bounded part declared to `check_work` and then did (by
  what it names; a part refused is not counted);
- `cells`: elements of every mask predicate evaluated (`Geometry.allows`: pictures, brute force);
- `draws` and `drawn`: head draws of random-block tables, and their (query block, slot) cells;
- `plan_rows`: query rows the CPU planner marks (heads x N per plan it builds).
`peak_rss_mb(argv)` runs `spattn ARGV` in a fresh interpreter and returns its status, stderr and
peak resident memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from unittest import mock

from spattn import limits
from spattn.patterns import blocks, counting, geometry, hops, picture, report
from spattn.runtime import torch_backend

HANG_GUARD_S = 600  # a hang guard only: the bounds asserted are counts


@dataclass
class Meter:
    checked: dict[str, int] = field(default_factory=dict)
    cells: int = 0
    draws: int = 0
    drawn: int = 0
    plan_rows: int = 0
    peak_mb: float = 0.0  # Python allocations (tracemalloc), numpy's included

    @property
    def declared(self) -> int:
        """The work all bounded parts declared, each counted once at its largest."""
        return sum(self.checked.values())


@contextmanager
def metered() -> Iterator[Meter]:
    meter = Meter()
    real_check, real_allows = limits.check_work, geometry._OnHeads.allows
    real_draw, real_pieces = blocks.draw_blocks, torch_backend.plan_pieces

    def check_work(work: int, what: str, limit: int = limits.MAX_WORK) -> None:
        real_check(work, what, limit)  # refused: not done, not counted
        part = what.split(" (more than")[0]  # a hop search declares its running total
        meter.checked[part] = max(meter.checked.get(part, 0), work)

    def allows(self, head, qpos, kpos):
        out = real_allows(self, head, qpos, kpos)
        meter.cells += out.numel()
        return out

    def draw_blocks(seed, head, candidates, count):
        meter.draws += 1
        meter.drawn += len(candidates) * count
        return real_draw(seed, head, candidates, count)

    def plan_pieces(branches, n, heads, *args, **kwargs):
        meter.plan_rows += heads * n
        return real_pieces(branches, n, heads, *args, **kwargs)

    blocks.random_blocks.cache_clear()  # a table drawn before would cost nothing here
    torch_backend._plan_of.cache_clear()
    with ExitStack() as stack:
        for module in (counting, hops, report, picture):
            stack.enter_context(mock.patch.object(module, "check_work", check_work))
        stack.enter_context(mock.patch.object(geometry._OnHeads, "allows", allows))
        stack.enter_context(mock.patch.object(blocks, "draw_blocks", draw_blocks))
        stack.enter_context(mock.patch.object(torch_backend, "plan_pieces", plan_pieces))
        with peak_megabytes(lambda mb: setattr(meter, "peak_mb", mb)):
            yield meter


@contextmanager
def peak_megabytes(record) -> Iterator[None]:
    """Trace Python allocations (numpy's included) while the block runs, then record(peak MB)."""
    tracemalloc.start()
    try:
        yield
    finally:
        record(tracemalloc.get_traced_memory()[1] / 2**20)
        tracemalloc.stop()


# The child's own peak: VmHWM belongs to the process image, while ru_maxrss keeps what the
# parent (pytest, maybe large by then) had at the fork, across the exec.
RUNNER = """\
import json, resource, sys
from spattn.cli.main import main
try:
    status = main(sys.argv[1:])
except SystemExit as stop:
    status = stop.code
sys.stdout.flush()
try:
    with open("/proc/self/status") as file:
        rss = next(int(line.split()[1]) for line in file if line.startswith("VmHWM:")) / 1024
except (OSError, StopIteration):
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"status": status, "rss_mb": rss}), file=sys.stderr)
"""


def peak_rss_mb(argv: list[str]) -> tuple[int, str, float]:
    """(exit status, stderr less the measurement, peak RSS in MB) of `spattn ARGV`, run alone."""
    done = subprocess.run([sys.executable, "-c", RUNNER, *argv], capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
    *lines, last = done.stderr.strip().splitlines() or [""]
    measured = json.loads(last)
    return measured["status"], "\n".join(lines), measured["rss_mb"]
