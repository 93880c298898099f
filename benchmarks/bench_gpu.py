"""spattn's generated kernels against dense flash SDPA, FlexAttention and gather + SDPA + scatter,
side by side in one run on one GPU (benchmarks/peers.py has the peers).

    python benchmarks/bench_gpu.py                   # the full sweep (GPU)
    python benchmarks/bench_gpu.py --scale           # plus the longest N that runs, B=1, H=12, D=64
    python benchmarks/bench_gpu.py --cpu-check       # end to end on CPU at small N (no GPU)

For every pattern, head_dim and N (B = tokens // N, so B x N stays near --tokens) it first checks
each method's output against the float64 reference at a small N, then times forward and forward +
backward (`triton.testing.do_bench` medians after warm-up on CUDA; perf_counter medians on CPU),
on random data. It reports ms, useful TFLOP/s (SEMANTICS.md: only the pattern's allowed pairs
count; dense SDPA counts its own), each peer's time over spattn's, and peak memory; writes a CSV
and a plot (time per token against N) under benchmarks/results/ naming the device, torch and
triton versions; and prints a short table last. A cell that fails (out of memory, a peer that
cannot express the pattern) is recorded with its reason and the sweep goes on.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

if "--cpu-check" in sys.argv:  # the generated kernels' check runs them on the Triton interpreter,
    os.environ.setdefault("TRITON_INTERPRET", "1")  # which must be set before triton is imported

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]  # peers, and the float64 reference

import peers  # noqa: E402
import triton  # noqa: E402
from reference import reference_attention  # noqa: E402

import spattn  # noqa: E402
from spattn.cli.args import add_dtype  # noqa: E402
from spattn.patterns.counting import count_pairs, dense_pairs, useful_flops  # noqa: E402
from spattn.patterns.report import scale_pattern  # noqa: E402

RESULTS = HERE / "results"
METHODS = ("spattn", "sdpa", "flex", "gather")
BACKWARD_FACTOR = 3.5  # forward + backward counts 1 + 2.5 forwards (SEMANTICS.md, Costs)


def make_method(method: str, pattern: spattn.Pattern, n: int, heads: int,
                device: torch.device, spattn_backend: str) -> peers.Attention:
    if method == "spattn":
        return peers.spattn_attention(pattern, spattn_backend)
    if method == "sdpa":
        return peers.dense_sdpa(pattern.causal)
    if method == "flex":
        return peers.flex(pattern, n, heads, device)
    return peers.gather_sdpa_scatter(pattern)


def reference_pattern(method: str, pattern: spattn.Pattern) -> spattn.Pattern:
    """What a method computes: FlexAttention's single mask is the union of the branches; dense
    SDPA is dense attention."""
    if method == "flex":
        return pattern.model_copy(update={"overlap": "union"})
    if method == "sdpa":
        return spattn.Pattern.model_validate({"name": "dense", "causal": pattern.causal,
                                              "branches": [{"dense": {}}]})
    return pattern


def check(method: str, fn: peers.Attention, pattern: spattn.Pattern, n: int, heads: int,
          dim: int, dtype: torch.dtype, device: torch.device) -> float:
    """Max abs error of the method's output against the float64 reference at a small N."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, heads, n, dim, generator=gen) for _ in range(3))
    want = reference_attention(q.double(), k.double(), v.double(),
                               reference_pattern(method, pattern))
    got = fn(*(t.to(device, dtype) for t in (q, k, v)))
    return (got.double().cpu() - want).abs().max().item()


def time_ms(step: Callable[[], None], device: torch.device, repeats: int) -> float:
    if device.type == "cuda":
        return triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
    step()  # warm-up (and compiles)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(fn: peers.Attention, shape: tuple[int, int, int, int], dtype: torch.dtype,
            device: torch.device, backward: bool, repeats: int) -> tuple[float, float]:
    """(median ms, peak MB over the inputs) of one forward or forward + backward."""
    b, h, n, d = shape
    q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=backward)
               for _ in range(3))
    grad = torch.randn(b, h, n, d, device=device, dtype=dtype) if backward else None

    def step() -> None:
        if backward:
            q.grad = k.grad = v.grad = None
            fn(q, k, v).backward(grad)
        else:
            with torch.no_grad():
                fn(q, k, v)

    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = float("nan")
    return time_ms(step, device, repeats), peak


def free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sizes(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """(pattern, head_dim, N) cells."""
    return [(name, d, n) for name in args.patterns for d in args.head_dims for n in args.seq_lens]


def sweep(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    rows, checked = [], set()
    for name, dim, n in _sizes(args):
        pattern = load(name, args.divide)
        batch = max(1, args.tokens // n)
        pairs = {"dense": dense_pairs(n, args.heads, pattern.causal),
                 "sparse": count_pairs(pattern, n, args.heads).total}
        for method in args.methods:
            key = (name, dim, method)
            row = {"pattern": pattern.name, "method": method, "seq_len": n, "batch": batch,
                   "heads": args.heads, "head_dim": dim, "dtype": args.dtype,
                   "density": round(pairs["sparse"] / pairs["dense"], 4)}
            try:
                if key not in checked:  # correctness first, once per pattern/dim/method
                    small = make_method(method, pattern, args.check_len, args.heads, device,
                                        args.spattn_backend)
                    error = check(method, small, pattern, args.check_len, args.heads, dim,
                                  dtype, device)
                    checked.add(key)
                    row["check_error"] = f"{error:.1e}"
                    if method == "spattn" and args.cpu_check:  # the kernels, interpreted
                        interpreted = peers.spattn_attention(pattern, "triton")
                        error = check(method, interpreted, pattern, args.check_len, args.heads,
                                      dim, dtype, device)
                        row["check_error_triton"] = f"{error:.1e}"
                fn = make_method(method, pattern, n, args.heads, device, args.spattn_backend)
            except NotImplementedError as why:
                rows += [{**row, "pass": p, "status": f"n/a: {why}"} for p in args.passes]
                continue
            useful = pairs["dense" if method == "sdpa" else "sparse"]
            for pass_ in args.passes:
                backward = pass_ == "fwd+bwd"
                print(f"{name:>20} D={dim:<3} N={n:<8} {method:>6} {pass_:<7} ...", end="",
                      flush=True, file=sys.stderr)
                try:
                    ms, peak = measure(fn, (batch, args.heads, n, dim), dtype, device, backward,
                                       args.repeats)
                except (torch.OutOfMemoryError, RuntimeError) as error:
                    reason = str(error).splitlines()[0][:120]
                    print(f" failed: {reason}", file=sys.stderr)
                    rows.append({**row, "pass": pass_, "status": f"failed: {reason}"})
                    free(device)
                    continue
                flops = useful_flops(useful, dim, batch) * (BACKWARD_FACTOR if backward else 1)
                print(f" {ms:10.3f} ms", file=sys.stderr)
                rows.append({**row, "pass": pass_, "status": "ok", "ms": round(ms, 4),
                             "ms_per_mtoken": round(ms / (batch * n) * 1e6, 4),
                             "useful_tflops": round(flops / ms / 1e9, 3),
                             "peak_mb": round(peak, 1)})
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """Each peer's time over spattn's in the same cell, and spattn's TFLOP/s over dense SDPA's."""
    cells: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        cell = (row["pattern"], row["head_dim"], row["seq_len"], row["pass"])
        cells.setdefault(cell, {})[row["method"]] = row
    for methods in cells.values():
        ours = methods.get("spattn", {})
        if ours.get("status") != "ok":
            continue
        for method, row in methods.items():
            if row.get("status") == "ok" and method != "spattn":
                ours[f"vs_{method}"] = round(row["ms"] / ours["ms"], 2)
        sdpa = methods.get("sdpa", {})
        if sdpa.get("status") == "ok":
            ours["tflops_vs_sdpa"] = round(ours["useful_tflops"] / sdpa["useful_tflops"], 3)


def longest(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """The longest N (doubling from 1M) that spattn runs with B=1, H=12, D=64."""
    pattern, rows = load("longnet-lm", args.divide), []
    for pass_ in ("fwd", "fwd+bwd"):
        n, best = 1 << 20, None
        while n <= args.scale_limit:
            try:
                ms, peak = measure(peers.spattn_attention(pattern, args.spattn_backend),
                                   (1, 12, n, 64), dtype, device, pass_ == "fwd+bwd", 1)
            except (torch.OutOfMemoryError, RuntimeError):
                break
            finally:
                free(device)
            best = {"pattern": pattern.name, "method": "spattn", "pass": pass_, "seq_len": n,
                    "batch": 1, "heads": 12, "head_dim": 64, "dtype": args.dtype,
                    "status": "longest", "ms": round(ms, 3), "peak_mb": round(peak, 1)}
            print(f"scale {pass_}: N={n:,} ok, {ms:.1f} ms, {peak:,.0f} MB", file=sys.stderr)
            n *= 2
        rows += [best] if best else []
    return rows


def load(name: str, divide: int) -> spattn.Pattern:
    """A built-in, with segments and windows divided by `divide` (CPU checks use small N)."""
    pattern = spattn.load_pattern(name)
    if divide == 1:
        return pattern
    return scale_pattern(pattern, divide).model_copy(update={"name": f"{name}-div{divide}"})


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"


def write(rows: list[dict], device: torch.device, args: argparse.Namespace) -> Path:
    args.results.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "_", device_name(device).lower()).strip("_")
    path = args.results / f"{args.prefix}_{slug}.csv"
    fields = ["pattern", "method", "pass", "seq_len", "batch", "heads", "head_dim", "dtype",
              "density", "status", "check_error", "check_error_triton", "ms", "ms_per_mtoken",
              "useful_tflops", "peak_mb", "vs_sdpa", "vs_flex", "vs_gather", "tflops_vs_sdpa"]
    with open(path, "w", newline="") as f:
        f.write(f"# {device_name(device)}, torch {torch.__version__}, triton "
                f"{triton.__version__}, spattn {spattn.__version__}, spattn backend "
                f"{args.spattn_backend}\n")
        if args.cpu_check:
            f.write("# --cpu-check: a functional run at small N on a shared CPU; its times say "
                    "nothing about the GPU targets\n")
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, path.with_suffix(".png"), device)
    return path


def plot(rows: list[dict], path: Path, device: torch.device) -> None:
    """Time per token against N (log-log), one panel per pass, one line per pattern/method/D."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install spattn[plot])", file=sys.stderr)
        return
    passes = sorted({r["pass"] for r in rows if r.get("status") == "ok"})
    if not passes:
        return
    fig, axes = plt.subplots(1, len(passes), figsize=(6.5 * len(passes), 4.5), squeeze=False)
    for ax, pass_ in zip(axes[0], passes, strict=True):
        lines: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            if r.get("status") == "ok" and r["pass"] == pass_:
                label = f"{r['method']} {r['pattern']} D={r['head_dim']}"
                lines.setdefault(label, []).append((r["seq_len"], r["ms_per_mtoken"]))
        for label, points in sorted(lines.items()):
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, marker="o", label=label, linestyle="-" if "spattn" in label else "--")
        ax.set(xscale="log", yscale="log", xlabel="sequence length N",
               ylabel="ms per million tokens", title=f"{pass_} on {device_name(device)}")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(rows: list[dict]) -> str:
    head = (f"{'pattern':>20} {'D':>3} {'N':>8} {'pass':>7} {'spattn ms':>10} {'TFLOP/s':>8} "
            f"{'vs sdpa':>8} {'vs flex':>8} {'vs gather':>9} {'rate/sdpa':>9}")
    lines = [head]
    for r in rows:
        if r["method"] != "spattn" or r.get("status") not in ("ok",):
            continue
        cells = [f"{r.get(key, ''):>{width}}" for key, width in
                 (("vs_sdpa", 8), ("vs_flex", 8), ("vs_gather", 9), ("tflops_vs_sdpa", 9))]
        lines.append(f"{r['pattern']:>20} {r['head_dim']:>3} {r['seq_len']:>8} {r['pass']:>7} "
                     f"{r['ms']:>10.3f} {r['useful_tflops']:>8.3g} " + " ".join(cells))
    for r in rows:
        if r.get("status") == "longest":
            lines.append(f"longest {r['pass']}: N = {r['seq_len']:,} (B=1, H=12, D=64), "
                         f"{r['ms']:.1f} ms, {r['peak_mb']:,.0f} MB")
    lines.append("vs X = X's time / spattn's (above 1: spattn is faster); rate/sdpa = spattn's "
                 "useful TFLOP/s / dense SDPA's")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+",
                        default=[8192, 32768, 131072, 524288, 1048576])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=1 << 20, help="B x N per cell")
    add_dtype(parser, ("float16", "bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--passes", nargs="+", default=["fwd", "fwd+bwd"],
                        choices=["fwd", "fwd+bwd"])
    parser.add_argument("--patterns", nargs="+",
                        default=["longnet-lm", "sliding-window", "sink-window"])
    parser.add_argument("--check-len", type=int, default=1024, help="N of the correctness check")
    parser.add_argument("--divide", type=int, default=1, help="divide segments and windows")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs on CPU")
    parser.add_argument("--scale", action="store_true", help="find the longest N that runs")
    parser.add_argument("--scale-limit", type=int, default=1 << 24)
    parser.add_argument("--spattn-backend", default=None)
    parser.add_argument("--prefix", default="gpu", help="CSV name: PREFIX_<device>.csv")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where CSV and plot go")
    parser.add_argument("--cpu-check", action="store_true",
                        help="CPU end-to-end check: small N, float32, torch backend")
    args = parser.parse_args(argv)
    if args.cpu_check:
        args.seq_lens, args.head_dims, args.heads, args.tokens = [256, 1024], [32], 2, 2048
        args.dtype, args.divide, args.check_len, args.prefix = "float32", 64, 128, "harness"
        args.spattn_backend = args.spattn_backend or "torch"
    args.spattn_backend = args.spattn_backend or "triton"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_check else "cpu")
    if device.type == "cpu" and not args.cpu_check:
        raise SystemExit("no CUDA device: run with --cpu-check for the CPU end-to-end check")
    dtype = getattr(torch, args.dtype)
    rows = sweep(args, device, dtype)
    if args.scale:
        rows += longest(args, device, dtype)
    path = write(rows, device, args)
    print(summary(rows))
    print(f"wrote {path} (and the plot beside it)")


if __name__ == "__main__":
    main()
