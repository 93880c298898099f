"""`longnet-lm` on this CPU against dense causal SDPA, side by side in one run.

    python benchmarks/bench_cpu_longnet.py [--seq-lens 4096 16384 65536] [--repeats 3]
    python benchmarks/bench_cpu_longnet.py --scale --heads 1 --seq-lens 16384 65536 262144 1048576

Each (method, N) runs in a fresh subprocess, so its peak memory (growth of the peak resident set
over the inputs) is its own. Times are medians after one warm-up run; the scale run times every N
in one process instead, interleaved (a round over all N, then the next), so that the machine's
drift falls on all of them alike. Useful TFLOP/s counts only
the pattern's allowed pairs (SEMANTICS.md, Costs): 4 * D * B * pairs. Writes
benchmarks/results/cpu_longnet.csv and prints a table last.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
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


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def _reset_peak() -> float:
    """Restart the peak resident set from now (Linux: clear_refs 5), returning the resident
    set now. The peak getrusage reports would start from the parent process's."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def measure(method: str, n: int, repeats: int, backward: bool, heads: int = H) -> dict:
    """One (method, N) cell; run in its own process by `main`."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, heads, n, D, requires_grad=backward) for _ in range(3))
    pattern = spattn.load_pattern(PATTERN)

    def step() -> None:
        if method == "spattn":
            out = spattn.attention(q, k, v, pattern, backend="torch")
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if backward:
            out.sum().backward()

    base = _reset_peak()
    step()  # warm-up, and the peak-memory run
    peak = _status_mb("VmHWM") - base
    times = [_seconds(step) for _ in range(repeats)]
    return {"seconds": statistics.median(times) if times else None, "peak_mb": peak}


def _seconds(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def interleaved_seconds(ns: list[int], repeats: int, heads: int) -> dict[int, float]:
    """spattn's median forward time at each N, timed in rounds over every N (after a warm-up
    round), in this process."""
    pattern = spattn.load_pattern(PATTERN)
    inputs = {}
    for n in ns:
        torch.manual_seed(0)
        inputs[n] = [torch.randn(B, heads, n, D) for _ in range(3)]
    times: dict[int, list[float]] = {n: [] for n in ns}
    for round_ in range(repeats + 1):
        for n in ns:
            seconds = _seconds(lambda n=n: spattn.attention(*inputs[n], pattern, backend="torch"))
            if round_:
                times[n].append(seconds)
    return {n: statistics.median(t) for n, t in times.items()}


def _run_cell(method: str, n: int, repeats: int, backward: bool, heads: int) -> dict:
    cmd = [sys.executable, __file__, "--cell", method, str(n), str(repeats), str(int(backward)),
           str(heads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backward", action="store_true", help="time forward + backward")
    parser.add_argument("--heads", type=int, default=H)
    parser.add_argument("--methods", nargs="+", choices=["spattn", "dense"],
                        default=["spattn", "dense"])
    parser.add_argument("--scale", action="store_true",
                        help="the scale run: time per token and peak memory against N, written "
                             "to cpu_longnet_scale.csv and .png (spattn only)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the CSV and plot")
    parser.add_argument("--cell", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        method, n, repeats, backward, heads = args.cell
        print(json.dumps(measure(method, int(n), int(repeats), bool(int(backward)), int(heads))))
        return
    if args.scale:
        args.methods = ["spattn"]

    pattern = spattn.load_pattern(PATTERN)
    factor = 3.5 if args.backward else 1.0  # a backward pass counts 2.5x the forward
    if args.scale:
        print(f"timing N = {args.seq_lens}, interleaved ...", file=sys.stderr)
        scale_seconds = interleaved_seconds(args.seq_lens, args.repeats, args.heads)
    rows = []
    for n in args.seq_lens:
        heads = args.heads
        pairs = {"spattn": count_pairs(pattern, n, heads).total,
                 "dense": dense_pairs(n, heads, True)}
        cells = {}
        for method in args.methods:
            print(f"N={n:>6} {method:>6} ...", end="", flush=True, file=sys.stderr)
            cells[method] = _run_cell(method, n, 0 if args.scale else args.repeats,
                                      args.backward, heads)
            if args.scale:
                cells[method]["seconds"] = scale_seconds[n]
            print(f" {cells[method]['seconds'] * 1e3:.0f} ms", file=sys.stderr)
        for method, cell in cells.items():
            flops = factor * useful_flops(pairs[method], D, B)
            rows.append({
                "pattern": PATTERN, "method": method, "seq_len": n, "pass": "fwd+bwd"
                if args.backward else "fwd", "ms": round(cell["seconds"] * 1e3, 1),
                "us_per_token": round(cell["seconds"] * 1e6 / n, 2),
                "useful_tflops": round(flops / cell["seconds"] / 1e12, 4),
                "peak_mb": round(cell["peak_mb"], 1),
                "density": round(pairs["spattn"] / pairs["dense"], 4),
                "speedup_vs_dense": round(cells["dense"]["seconds"] / cell["seconds"], 2)
                if "dense" in cells else "",
            })

    args.results.mkdir(parents=True, exist_ok=True)
    name = "cpu_longnet_scale.csv" if args.scale else \
        "cpu_longnet_fwd_bwd.csv" if args.backward else "cpu_longnet.csv"
    with open(args.results / name, "w", newline="") as f:
        cpu = platform.processor() or platform.machine()
        f.write(f"# {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__},"
                f" spattn {spattn.__version__}, B={B} H={args.heads} D={D}"
                f" float32 causal\n")
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if args.scale:
        _plot_scale(rows, args.results / "cpu_longnet_scale.png", args.heads)
    print(f"{'N':>8} {'method':>7} {'ms':>10} {'us/token':>9} {'TFLOP/s':>8} {'peak MB':>8} "
          f"{'speed-up':>8}")
    for r in rows:
        speedup = f"{r['speedup_vs_dense']:.2f}x" if r["speedup_vs_dense"] != "" else "-"
        print(f"{r['seq_len']:>8} {r['method']:>7} {r['ms']:>10.1f} {r['us_per_token']:>9.2f} "
              f"{r['useful_tflops']:>8.3f} {r['peak_mb']:>8.1f} {speedup:>8}")
    print(f"wrote {args.results / name}")


def _plot_scale(rows: list[dict], path: Path, heads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["seq_len"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(ns, [r["us_per_token"] for r in rows], marker="o")
    left.set_ylim(bottom=0)
    left.set_ylabel("microseconds per token")
    right.plot(ns, [r["peak_mb"] for r in rows], marker="o")  # linear axes: linear memory
    right.set_ylabel("peak resident memory growth (MB)")
    right.set_ylim(bottom=0)
    left.set_xscale("log", base=2)
    for ax in (left, right):
        ax.set_xlabel("sequence length N")
    fig.suptitle(f"{PATTERN} forward on CPU, one process, H={heads} D={D} float32")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
