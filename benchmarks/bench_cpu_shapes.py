"""The LongNet schedules against LongNet's own method, written two ways, over call shapes.

    python benchmarks/bench_cpu_shapes.py [--seq-len 16384] [--repeats 5] [--passes fwd fwd+bwd]

`bench_cpu_peers.py` times every built-in at one shape (B=1, H=4, D=64, float32). This one keeps
the sequence length and varies the shape: more heads with grouped keys (GQA), a larger head
dimension, two batch rows, bfloat16. Methods, in one process, interleaved call by call (each
round starting with the next method), best of --repeats after a warm-up:

- spattn: `spattn.attention` (the PyTorch backend and its planned calls);
- gather: gather + SDPA + scatter with index lists (`peers.gather_sdpa_scatter`);
- strided: the same method on strided views, as torchscale writes it
  (`peers.strided_sdpa_scatter`).

Before timing, each peer's forward output is compared with spattn's (1e-4 in float32, 3e-2 in
bfloat16). Writes benchmarks/results/cpu_shapes.csv and prints a table last.
"""

from __future__ import annotations

import argparse
import csv
import platform
import sys
import time
from pathlib import Path

import torch

import spattn
from spattn.patterns.counting import count_pairs, useful_flops

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CASES = ("longnet-lm", "longnet-geometric")
SHAPES = [  # (B, H, Hkv, D, dtype)
    (1, 4, 4, 64, "float32"),
    (1, 8, 2, 64, "float32"),
    (1, 4, 4, 128, "float32"),
    (2, 4, 4, 64, "float32"),
    (1, 4, 4, 64, "bfloat16"),
]
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}
FIELDS = ["case", "seq_len", "pass", "batch", "heads", "kv_heads", "head_dim", "dtype", "method",
          "ms", "spattn_over_method", "useful_gflops"]


def measure(case: str, n: int, shape: tuple, backward: bool, repeats: int) -> list[dict]:
    b, h, hkv, d, dtype_name = shape
    dtype = getattr(torch, dtype_name)
    pattern = spattn.load_pattern(case)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, n, d, generator=gen).to(dtype).requires_grad_(backward)
    k, v = (torch.randn(b, hkv, n, d, generator=gen).to(dtype).requires_grad_(backward)
            for _ in range(2))
    grad = torch.randn(b, h, n, d, generator=gen).to(dtype)
    methods = {"spattn": peers.spattn_attention(pattern, "torch"),
               "gather": peers.gather_sdpa_scatter(pattern),
               "strided": peers.strided_sdpa_scatter(pattern)}
    outputs = {name: peers.run_pass(fn, q, k, v, grad, backward).detach()  # the warm-up
               for name, fn in methods.items()}
    for name, out in outputs.items():
        error = (out.float() - outputs["spattn"].float()).abs().max().item()
        if error > TOLERANCE[dtype_name]:
            raise SystemExit(f"{case} {shape}: {name} differs from spattn by {error:.2e}")
    times: dict[str, list[float]] = {name: [] for name in methods}
    order = list(methods.items())
    for round_ in range(repeats):
        for name, fn in order[round_ % len(order):] + order[:round_ % len(order)]:
            start = time.perf_counter()
            peers.run_pass(fn, q, k, v, grad, backward)
            times[name].append(time.perf_counter() - start)
    best = {name: min(t) * 1e3 for name, t in times.items()}
    flops = useful_flops(count_pairs(pattern, n, h).total, d, b) * (3.5 if backward else 1.0)
    return [dict(case=case, seq_len=n, batch=b, heads=h, kv_heads=hkv, head_dim=d,
                 dtype=dtype_name, method=name, ms=f"{ms:.1f}",
                 spattn_over_method=f"{best['spattn'] / ms:.3f}",
                 useful_gflops=f"{flops / ms / 1e6:.1f}",
                 **{"pass": "fwd+bwd" if backward else "fwd"}) for name, ms in best.items()]


def table(rows: list[dict]) -> str:
    """Markdown: spattn's time and its ratio to each peer's, one line per case, pass and shape."""
    lines = ["| case | pass | B | H/Hkv | D | dtype | spattn ms | / gather | / strided |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|"]
    cells: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        key = (r["case"], r["pass"], r["batch"], f"{r['heads']}/{r['kv_heads']}",
               r["head_dim"], r["dtype"])
        cells.setdefault(key, {})[r["method"]] = r
    for key, by in cells.items():
        ratios = [by[m]["spattn_over_method"] if m in by else "-" for m in ("gather", "strided")]
        lines.append("| " + " | ".join(str(x) for x in (*key, by["spattn"]["ms"], *ratios))
                     + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--passes", nargs="+", choices=["fwd", "fwd+bwd"],
                        default=["fwd", "fwd+bwd"])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--shapes", type=int, nargs="+", help="indices into SHAPES (default: all)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the CSV")
    args = parser.parse_args()
    shapes = [SHAPES[i] for i in args.shapes] if args.shapes else SHAPES
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / "cpu_shapes.csv"
    rows = []
    with open(path, "w", newline="") as f:
        f.write(f"# {platform.machine()}, {torch.get_num_threads()} threads, torch "
                f"{torch.__version__}, spattn {spattn.__version__}; N={args.seq_len}, best of "
                f"{args.repeats} after a warm-up, interleaved\n")
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        for case in args.cases:
            for what in args.passes:
                for shape in shapes:
                    begin = time.perf_counter()
                    found = measure(case, args.seq_len, shape, what == "fwd+bwd", args.repeats)
                    writer.writerows(found)
                    f.flush()
                    rows += found
                    summary = ", ".join(f"{r['method']} {r['ms']} ms" for r in found)
                    print(f"{case} {what} {shape}: {summary} "
                          f"({time.perf_counter() - begin:.0f} s)", flush=True)
    print("\nspattn's time / the peer's (below 1: spattn faster)\n")
    print(table(rows))


if __name__ == "__main__":
    main()
