"""How long planning takes, and how much memory: `longnet-lm`, 16 heads, N = 2^14 ... 2^20.

    python benchmarks/bench_plan.py [--log2-seq-lens 14 15 ... 20] [--repeats 5]

Per N, in a fresh subprocess: `build_plan` (64x64 tiles), then every tile list of the plan
materialized (one per segment class and head-offset group: the compact form the code generator
reads), then `block_sparse_counts` (the 128x128 tiles a block-sparse kernel over original
positions would compute, for comparison). Times are medians after one warm-up run; peak memory is
tracemalloc's peak over plan + tile lists (and over the block-sparse count), and the growth of
the process's peak resident set over the whole cell. Writes benchmarks/results/plan.csv and
prints a table last.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PATTERN, HEADS = "longnet-lm", 16


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(n: int, repeats: int) -> dict:
    """One N; run in its own process by `main`."""
    import spattn
    from spattn.compiler.layouts import block_sparse_counts
    from spattn.compiler.plan import build_plan
    from spattn.patterns.counting import count_pairs

    pattern = spattn.load_pattern(PATTERN)

    def list_tiles(plan: object) -> int:
        listed = 0
        for branch in plan.branches:
            for group in branch.groups:
                for run in group.runs:
                    listed += len(run.tiles.tiles().rows)
        return listed

    def timed(fn: object, *args: object) -> tuple[object, float]:
        start = time.perf_counter()
        result = fn(*args)
        return result, time.perf_counter() - start

    def traced(fn: object, *args: object) -> float:
        tracemalloc.start()
        fn(*args)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        return peak

    base_rss = _rss_mb()
    list_tiles(build_plan(pattern, n, HEADS))  # warm-up
    block_sparse_counts(pattern, n, HEADS)
    plan_s, lists_s, block_sparse_s = [], [], []
    for _ in range(repeats):
        plan, seconds = timed(build_plan, pattern, n, HEADS)
        plan_s.append(seconds)
        listed, seconds = timed(list_tiles, plan)
        lists_s.append(seconds)
        counts, seconds = timed(block_sparse_counts, pattern, n, HEADS)
        block_sparse_s.append(seconds)
    plan_peak = traced(lambda: list_tiles(build_plan(pattern, n, HEADS)))
    block_sparse_peak = traced(block_sparse_counts, pattern, n, HEADS)
    assert plan.pairs == count_pairs(pattern, n, HEADS).total
    plan_ms, lists_ms = statistics.median(plan_s) * 1e3, statistics.median(lists_s) * 1e3
    return {
        "seq_len": n, "heads": HEADS, "plan_ms": plan_ms, "tile_lists_ms": lists_ms,
        "plan_and_tiles_ms": plan_ms + lists_ms, "plan_and_tiles_peak_mb": plan_peak,
        "block_sparse_ms": statistics.median(block_sparse_s) * 1e3,
        "block_sparse_peak_mb": block_sparse_peak, "rss_growth_mb": _rss_mb() - base_rss,
        "tile_lists": listed, "spattn_tiles": plan.tile_count(),
        "block_sparse_tiles": counts.total, "pairs": plan.pairs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log2-seq-lens", type=int, nargs="+", default=list(range(14, 21)))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cell", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(measure(*args.cell)))
        return
    rows = []
    for log2 in args.log2_seq_lens:
        cmd = [sys.executable, __file__, "--cell", str(2**log2), str(args.repeats)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows.append({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
        print(f"N=2^{log2} done", file=sys.stderr)

    import spattn

    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "plan.csv"
    with open(path, "w", newline="") as f:
        cpu = platform.processor() or platform.machine()
        f.write(f"# {cpu}, Python {platform.python_version()}, spattn {spattn.__version__}, "
                f"{PATTERN}, H={HEADS}, spattn tiles 64x64, block-sparse tiles 128x128\n")
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{'N':>9} {'plan ms':>8} {'lists ms':>9} {'plan+lists':>10} {'peak MB':>8} "
          f"{'spattn tiles':>13} | {'128x128 ms':>10} {'peak MB':>8} {'128x128 tiles':>14} "
          f"| {'RSS +MB':>8}")
    for r in rows:
        print(f"{r['seq_len']:>9,} {r['plan_ms']:>8.2f} {r['tile_lists_ms']:>9.2f} "
              f"{r['plan_and_tiles_ms']:>10.2f} {r['plan_and_tiles_peak_mb']:>8.2f} "
              f"{r['spattn_tiles']:>13,} | {r['block_sparse_ms']:>10.1f} "
              f"{r['block_sparse_peak_mb']:>8.1f} {r['block_sparse_tiles']:>14,} "
              f"| {r['rss_growth_mb']:>8.1f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
