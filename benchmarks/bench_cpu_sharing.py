"""What sharing the pairs of nested dilated branches saves on this CPU: the same call planned with
and without it, side by side.

    python benchmarks/bench_cpu_sharing.py [--seq-lens 16384 65536] [--cases longnet-lm ...]
                                           [--repeats 5]

For each case and N, spattn's PyTorch backend runs the call three ways, interleaved call by call
(best of --repeats after a warm-up; each round starts with the next way): every chain of nested
branches shared (`SHARE_PAIRS = "always"`), none shared ("never"), and as the cost model chooses
("model", the default). fp32, B=1, H=4, D=64, forward and forward+backward. Writes
benchmarks/results/cpu_sharing.csv and prints a table last.
"""

from __future__ import annotations

import argparse
import csv
import platform
import time
from pathlib import Path

import torch

import spattn
from spattn.patterns.geometry import resolve
from spattn.runtime import torch_backend
from spattn.runtime.pieces import nested_chains

RESULTS = Path(__file__).parent / "results"
B, H, D = 1, 4, 64
WAYS = ("never", "always", "model")


def measure(pattern: spattn.Pattern, n: int, backward: bool, repeats: int) -> dict[str, float]:
    """Best milliseconds of each way."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=gen).requires_grad_(backward) for _ in range(3))
    grad = torch.randn(B, H, n, D, generator=gen)

    def call(way: str) -> None:
        torch_backend.SHARE_PAIRS = way
        out = spattn.attention(q, k, v, pattern, backend="torch")
        if backward:
            torch.autograd.grad(out, (q, k, v), grad)

    times: dict[str, list[float]] = {way: [] for way in WAYS}
    for way in WAYS:  # warm-up: plans and masks built
        call(way)
    for round_ in range(repeats):
        for way in WAYS[round_ % 3:] + WAYS[:round_ % 3]:
            start = time.perf_counter()
            call(way)
            times[way].append(time.perf_counter() - start)
    torch_backend.SHARE_PAIRS = "model"
    return {way: min(t) * 1e3 for way, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--cases", nargs="+",
                        default=["longnet-lm", "longnet-geometric", "longvit"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the CSV")
    args = parser.parse_args()
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / "cpu_sharing.csv"
    rows = []
    for name in args.cases:
        pattern = spattn.load_pattern(name)
        for n in args.seq_lens:
            chains = nested_chains(resolve(pattern, n, H), n, H, pattern.overlap == "union")
            for what in ("fwd", "fwd+bwd"):
                best = measure(pattern, n, what == "fwd+bwd", args.repeats)
                rows.append({"case": name, "seq_len": n, "pass": what, "chains": str(chains),
                             **{f"{way}_ms": f"{ms:.1f}" for way, ms in best.items()},
                             "model_over_never": f"{best['model'] / best['never']:.3f}"})
                print(f"{name} N={n} {what}: " + ", ".join(
                    f"{way} {ms:.1f} ms" for way, ms in best.items()), flush=True)
    with open(path, "w", newline="") as f:
        f.write(f"# {platform.machine()}, {torch.get_num_threads()} threads, torch "
                f"{torch.__version__}, B={B} H={H} D={D} float32, best of {args.repeats}, "
                f"interleaved\n")
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\n{'case':<18} {'N':>6} {'pass':<8} {'never ms':>9} {'model ms':>9} {'ratio':>6}")
    for r in rows:
        print(f"{r['case']:<18} {r['seq_len']:>6} {r['pass']:<8} {r['never_ms']:>9} "
              f"{r['model_ms']:>9} {r['model_over_never']:>6}")


if __name__ == "__main__":
    main()
