"""`longnet-lm` on this CPU against dense causal SDPA, side by side in one run.

    python benchmarks/bench_cpu_longnet.py [--seq-lens 4096 16384 65536] [--repeats 3]

Each (method, N) runs in a fresh subprocess, so its peak memory (growth of the peak resident set
over the inputs) is its own. Times are medians after one warm-up run. Useful TFLOP/s counts only
the pattern's allowed pairs (SEMANTICS.md, Costs): 4 * D * B * pairs. Writes
benchmarks/results/cpu_longnet.csv and prints a table last.
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
from pathlib import Path

import torch
import torch.nn.functional as F

import spattn
from spattn.patterns.counting import count_pairs, dense_pairs, useful_flops

RESULTS = Path(__file__).parent / "results"
B, H, D = 1, 4, 64
PATTERN = "longnet-lm"


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(method: str, n: int, repeats: int, backward: bool) -> dict:
    """One (method, N) cell; run in its own process by `main`."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, requires_grad=backward) for _ in range(3))
    pattern = spattn.load_pattern(PATTERN)

    def step() -> None:
        if method == "spattn":
            out = spattn.attention(q, k, v, pattern, backend="torch")
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if backward:
            out.sum().backward()

    base = _peak_mb()
    step()  # warm-up, and the peak-memory run
    peak = _peak_mb() - base
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "peak_mb": peak}


def _run_cell(method: str, n: int, repeats: int, backward: bool) -> dict:
    cmd = [sys.executable, __file__, "--cell", method, str(n), str(repeats), str(int(backward))]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backward", action="store_true", help="time forward + backward")
    parser.add_argument("--cell", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        method, n, repeats, backward = args.cell
        print(json.dumps(measure(method, int(n), int(repeats), bool(int(backward)))))
        return

    pattern = spattn.load_pattern(PATTERN)
    factor = 3.5 if args.backward else 1.0  # a backward pass counts 2.5x the forward
    rows = []
    for n in args.seq_lens:
        pairs = {"spattn": count_pairs(pattern, n, H).total, "dense": dense_pairs(n, H, True)}
        cells = {}
        for method in ("spattn", "dense"):
            print(f"N={n:>6} {method:>6} ...", end="", flush=True, file=sys.stderr)
            cells[method] = _run_cell(method, n, args.repeats, args.backward)
            print(f" {cells[method]['seconds'] * 1e3:.0f} ms", file=sys.stderr)
        for method, cell in cells.items():
            flops = factor * useful_flops(pairs[method], D, B)
            rows.append({
                "pattern": PATTERN, "method": method, "seq_len": n, "pass": "fwd+bwd"
                if args.backward else "fwd", "ms": round(cell["seconds"] * 1e3, 1),
                "useful_tflops": round(flops / cell["seconds"] / 1e12, 4),
                "peak_mb": round(cell["peak_mb"], 1),
                "density": round(pairs["spattn"] / pairs["dense"], 4),
                "speedup_vs_dense": round(cells["dense"]["seconds"] / cells["spattn"]["seconds"], 2)
                if method == "spattn" else 1.0,
            })

    RESULTS.mkdir(exist_ok=True)
    name = "cpu_longnet_fwd_bwd.csv" if args.backward else "cpu_longnet.csv"
    with open(RESULTS / name, "w", newline="") as f:
        cpu = platform.processor() or platform.machine()
        f.write(f"# {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__},"
                f" spattn {spattn.__version__}, B={B} H={H} D={D}"
                f" float32 causal\n")
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = f"{'N':>7} {'method':>7} {'ms':>9} {'TFLOP/s':>8} {'peak MB':>8} {'speed-up':>8}"
    print(header)
    for r in rows:
        print(f"{r['seq_len']:>7} {r['method']:>7} {r['ms']:>9.1f} {r['useful_tflops']:>8.3f} "
              f"{r['peak_mb']:>8.1f} {r['speedup_vs_dense']:>7.2f}x")
    print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
