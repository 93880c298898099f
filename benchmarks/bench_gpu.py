"""spattn's generated kernels against dense flash SDPA, FlexAttention and gather + SDPA + scatter,
side by side in one run on one GPU (benchmarks/peers.py has the peers).

    python benchmarks/bench_gpu.py                   # the full sweep (GPU)
    python benchmarks/bench_gpu.py --scale           # plus the longest N that runs, B=1, H=12, D=64
    python benchmarks/bench_gpu.py --cpu-check       # end to end on CPU at small N (no GPU)
    python benchmarks/bench_gpu.py --csv OUT/bench.csv --no-plot ...   # append to one CSV

For every pattern, head_dim and N (B = tokens // N, so B x N stays near --tokens) it first checks
each method's output against a float64 reference at a small N (--check-len; the float64 oracle
of tests/reference.py where its loops are cheap, else float64 attention with the pattern's
masks), prints the error and, past the dtype's tolerance, marks the method wrong in the CSV, times
nothing of it and exits 1 at the end. Then it times forward and forward + backward: a warm-up
call (it compiles, and on a GPU tunes every launch), peak memory over one call after it, then
`triton.testing.do_bench` medians (the median of three calls for a call over 50 ms) on CUDA,
perf_counter medians on CPU, on random data. It reports ms, useful TFLOP/s (SEMANTICS.md: only
the pattern's allowed pairs count; dense SDPA counts its own), each peer's time over spattn's,
peak memory and the backend that ran (SDPA's flash kernel, else the one torch took).

Each row is appended to the CSV (and printed) as soon as it is measured, so a run stopped at a
deadline keeps everything measured before; at the end the CSV is rewritten with the ratios over
all its rows (several runs may append to one CSV), a plot (time per token against N) is drawn
unless --no-plot, and a short table is printed. A cell that fails (out of memory, a peer that
cannot express the pattern) is recorded with its reason and the sweep goes on.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import re
import signal
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

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
from spattn.patterns.geometry import Dense, resolve  # noqa: E402
from spattn.patterns.report import scale_pattern  # noqa: E402

RESULTS = HERE / "results"
METHODS = ("spattn", "sdpa", "flex", "gather")
BACKWARD_FACTOR = 3.5  # forward + backward counts 1 + 2.5 forwards (SEMANTICS.md, Costs)
# the largest error a method may show against the float64 reference, over max(1, max |ref|):
# the generated kernels' tests' bounds (tests/test_triton_kernels.py), unit-normal inputs
TOLERANCE = {"float32": 2e-4, "float16": 2e-2, "bfloat16": 8e-2}
ORACLE_WORK = 1 << 21  # H * N^2 up to this: tests/reference.py's Python loops (seconds)
LONG_CALL_MS = 50.0  # past this a call is timed three times rather than by do_bench
FIELDS = ["pattern", "method", "pass", "seq_len", "batch", "heads", "head_dim", "dtype",
          "density", "status", "backend", "check_error", "check_tolerance", "check_error_triton",
          "ms", "ms_per_mtoken", "useful_tflops", "peak_mb", "vs_sdpa", "vs_flex", "vs_gather",
          "tflops_vs_sdpa"]


class Deadline(BaseException):
    """SIGTERM (the session's `timeout`): stop measuring, keep what was measured. (Not an
    Exception, so that no handler for a failed cell takes it.)"""


def make_method(method: str, pattern: spattn.Pattern, n: int, heads: int,
                device: torch.device, spattn_backend: str) -> peers.Attention:
    if method == "spattn":
        return peers.spattn_attention(pattern, spattn_backend)
    if method == "sdpa":
        return peers.dense_sdpa(pattern.causal)
    if method == "flex":
        return peers.flex(pattern, n, heads, device)
    return peers.gather_sdpa_scatter(pattern)


def backend_name(method: str, fn: peers.Attention, device: torch.device,
                 spattn_backend: str) -> str:
    """What ran: spattn's backend, SDPA's kernel (flash unless torch could not), ..."""
    if method == "spattn":
        return spattn_backend
    if method == "sdpa":
        return getattr(fn, "backend", None) or "?"
    if method == "flex":
        return "flex_attention (torch.compile)"
    return "flash_attention (aten op)" if device.type == "cuda" else "cpu"


def reference_pattern(method: str, pattern: spattn.Pattern) -> spattn.Pattern:
    """What a method computes: FlexAttention's single mask is the union of the branches; dense
    SDPA is dense attention."""
    if method == "flex":
        return pattern.model_copy(update={"overlap": "union"})
    if method == "sdpa":
        return spattn.Pattern.model_validate({"name": "dense", "causal": pattern.causal,
                                              "branches": [{"dense": {}}]})
    return pattern


def reference_output(pattern: spattn.Pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     device: torch.device) -> torch.Tensor:
    """Float64 attention of `pattern` (on CPU): tests/reference.py's oracle while its loops are
    cheap; else float64 SDPA (on `device`) with the log-count mask built from the branches' own
    masks (peers.pattern_bias), which shares no code with the generated kernels."""
    heads, n = q.shape[1], q.shape[2]
    if heads * n * n <= ORACLE_WORK:
        return reference_attention(q.double(), k.double(), v.double(), pattern)
    q, k, v = (t.to(device, torch.float64) for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    if [type(g) for g in resolve(pattern, n, heads)] == [Dense]:  # one dense branch
        return F.scaled_dot_product_attention(q, k, v, is_causal=pattern.causal).cpu()
    bias = peers.pattern_bias(pattern, n, heads).to(device, torch.float64)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=pattern.softmax_scale)
    return out.nan_to_num(0.0).cpu()  # a query with no key: 0 (SEMANTICS.md)


_REFERENCES: dict[tuple, tuple[list[torch.Tensor], torch.Tensor]] = {}


def check(method: str, fn: peers.Attention, pattern: spattn.Pattern, n: int, heads: int,
          dim: int, dtype: torch.dtype, device: torch.device) -> tuple[float, float]:
    """(max abs error of the method's output against the float64 reference at a small N, the
    largest error its dtype allows there)."""
    want_pattern = reference_pattern(method, pattern)
    key = (want_pattern.model_dump_json(), n, heads, dim)
    if key not in _REFERENCES:
        gen = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(1, heads, n, dim, generator=gen) for _ in range(3))
        _REFERENCES[key] = [q, k, v], reference_output(want_pattern, q, k, v, device)
    inputs, want = _REFERENCES[key]
    with torch.no_grad():
        got = fn(*(t.to(device, dtype) for t in inputs))
    error = (got.double().cpu() - want).abs().max().item()
    bound = TOLERANCE[str(dtype).removeprefix("torch.")] * max(1.0, want.abs().max().item())
    return (error if math.isfinite(error) else float("inf")), bound


def time_ms(step: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median ms of `step`, already warm."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(3):
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
            if times[0] < LONG_CALL_MS:  # a short call: do_bench's many timed calls
                return triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
        return statistics.median(times)
    times = []
    for _ in range(repeats):
        start_s = time.perf_counter()
        step()
        times.append(time.perf_counter() - start_s)
    return statistics.median(times) * 1e3


def measure(fn: peers.Attention, shape: tuple[int, int, int, int], dtype: torch.dtype,
            device: torch.device, backward: bool, repeats: int) -> tuple[float, float]:
    """(median ms, peak MB over the inputs) of one forward or forward + backward. The first call
    compiles and (on a GPU) tunes every launch; the peak is that of one call after it."""
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

    step()  # warm-up: compiles, tunes
    peak = float("nan")
    if device.type == "cuda":
        q.grad = k.grad = v.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return time_ms(step, device, repeats), peak


def free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _number(text: str) -> object:
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text else value


def read_rows(path: Path) -> tuple[list[str], list[dict]]:
    """A results CSV's comment lines and its rows, numbers as numbers."""
    lines = path.read_text().splitlines() if path.exists() else []
    comments = [line for line in lines if line.startswith("#")]
    rows = [{key: _number(value) for key, value in row.items() if value not in ("", None)}
            for row in csv.DictReader(line for line in lines if not line.startswith("#"))]
    return comments, rows


class Results:
    """The CSV, one row appended and flushed as each is measured."""

    def __init__(self, path: Path, comments: list[str], fresh: bool) -> None:
        self.path, self.rows = path, []
        path.parent.mkdir(parents=True, exist_ok=True)
        if fresh or not path.exists() or not path.stat().st_size:
            with open(path, "w", newline="") as f:
                f.writelines(f"# {line}\n" for line in comments)
                csv.DictWriter(f, fieldnames=FIELDS).writeheader()

    def add(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=FIELDS, restval="", extrasaction="ignore").writerow(row)
            f.flush()
            os.fsync(f.fileno())
        print(describe(row), flush=True)

    def finish(self) -> list[dict]:
        """Every row of the CSV (this run's and earlier runs'), with the ratios, rewritten."""
        comments, rows = read_rows(self.path)
        add_ratios(rows)
        temporary = self.path.with_name(self.path.name + ".tmp")
        with open(temporary, "w", newline="") as f:
            f.writelines(f"{line}\n" for line in comments)
            writer = csv.DictWriter(f, fieldnames=FIELDS, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        temporary.replace(self.path)
        return rows


def describe(row: dict) -> str:
    """One printed line per measured row."""
    cell = (f"{row['pattern']:>20} D={row['head_dim']:<3} N={row['seq_len']:<8} "
            f"{row['method']:>6} {row['pass']:<7}")
    if row.get("status") != "ok":
        return f"{cell} {row.get('status')}"
    return (f"{cell} {row['ms']:10.3f} ms {row['useful_tflops']:8.3g} TFLOP/s "
            f"{row['peak_mb']:9.1f} MB  [{row.get('backend', '')}]")


def _sizes(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    """(pattern, head_dim, N) cells."""
    return [(name, d, n) for name in args.patterns for d in args.head_dims for n in args.seq_lens]


def sweep(args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
          results: Results) -> bool:
    """Every cell, each row into `results` as it is measured; False if a method was wrong."""
    checked: dict[tuple, dict] = {}  # (method, reference, dim) -> the check's row fields
    timed: dict[tuple, tuple[float, float, str]] = {}  # dense SDPA's cells, shared by patterns
    all_right = True
    for name, dim, n in _sizes(args):
        pattern = load(name, args.divide)
        batch = max(1, args.tokens // n)
        pairs = {"dense": dense_pairs(n, args.heads, pattern.causal),
                 "sparse": count_pairs(pattern, n, args.heads).total}
        for method in args.methods:
            row = {"pattern": pattern.name, "method": method, "seq_len": n, "batch": batch,
                   "heads": args.heads, "head_dim": dim, "dtype": args.dtype,
                   "density": round(pairs["sparse"] / pairs["dense"], 4)}
            key = (method, reference_pattern(method, pattern).model_dump_json(), dim)
            try:
                if key not in checked:  # correctness first, once per pattern/dim/method
                    checked[key] = check_method(method, pattern, dim, dtype, device, args)
                fn = make_method(method, pattern, n, args.heads, device, args.spattn_backend)
            except NotImplementedError as why:
                for pass_ in args.passes:
                    results.add({**row, "pass": pass_, "status": f"n/a: {why}"})
                continue
            except Exception as error:  # noqa: BLE001 - it crashed: a failure, the sweep goes on
                reason = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
                print(f"FAILED: {method} on {pattern.name} D={dim}: {reason}", file=sys.stderr)
                all_right = all_right and method != "spattn"
                checked.setdefault(key, {"status": f"failed: {reason}"})
                for pass_ in args.passes:
                    results.add({**row, "pass": pass_, "status": f"failed: {reason}"})
                free(device)
                continue
            row.update(checked[key])
            if row["status"] != "ok":  # wrong (or its check crashed): nothing of it is timed
                all_right = all_right and not (method == "spattn"
                                               or row["status"].startswith("wrong"))
                for pass_ in args.passes:
                    results.add({**row, "pass": pass_})
                continue
            useful = pairs["dense" if method == "sdpa" else "sparse"]
            for pass_ in args.passes:
                backward = pass_ == "fwd+bwd"
                memo = (pattern.causal, n, batch, dim, pass_) if method == "sdpa" else None
                try:
                    if memo in timed:
                        ms, peak, backend = timed[memo]
                    else:
                        ms, peak = measure(fn, (batch, args.heads, n, dim), dtype, device,
                                           backward, args.repeats)
                        backend = backend_name(method, fn, device, args.spattn_backend)
                        if memo is not None:
                            timed[memo] = ms, peak, backend
                except Deadline:
                    raise
                except Exception as error:  # noqa: BLE001 - out of memory, resources, ...
                    reason = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
                    results.add({**row, "pass": pass_, "status": f"failed: {reason}"})
                    free(device)
                    continue
                flops = useful_flops(useful, dim, batch) * (BACKWARD_FACTOR if backward else 1)
                results.add({**row, "pass": pass_, "status": "ok", "backend": backend,
                             "ms": round(ms, 4), "ms_per_mtoken": round(ms / (batch * n) * 1e6, 4),
                             "useful_tflops": round(flops / ms / 1e9, 3),
                             "peak_mb": round(peak, 1)})
            free(device)
    return all_right


def check_method(method: str, pattern: spattn.Pattern, dim: int, dtype: torch.dtype,
                 device: torch.device, args: argparse.Namespace) -> dict:
    """The check's fields of a method's rows; status 'wrong: ...' past the tolerance."""
    small = make_method(method, pattern, args.check_len, args.heads, device, args.spattn_backend)
    error, bound = check(method, small, pattern, args.check_len, args.heads, dim, dtype, device)
    fields = {"check_error": f"{error:.1e}", "check_tolerance": f"{bound:.1e}", "status": "ok"}
    if method == "spattn" and args.cpu_check:  # the kernels, interpreted
        interpreted = peers.spattn_attention(pattern, "triton")
        error_triton, _ = check(method, interpreted, pattern, args.check_len, args.heads, dim,
                                dtype, device)
        fields["check_error_triton"] = f"{error_triton:.1e}"
        error = max(error, error_triton)
    verdict = "ok" if error <= bound else "WRONG"
    print(f"check {pattern.name} D={dim} {method} at N={args.check_len}: max abs error "
          f"{error:.1e} (tolerance {bound:.1e}) {verdict}", flush=True)
    if error > bound:
        fields["status"] = f"wrong: error {error:.1e} > {bound:.1e} at N={args.check_len}"
        print(f"WRONG: {method} computes {pattern.name} (D={dim}, {args.dtype}) beyond the "
              f"tolerance; it is not timed", file=sys.stderr, flush=True)
    return fields


def add_ratios(rows: list[dict]) -> None:
    """Each peer's time over spattn's in the same cell, and spattn's TFLOP/s over dense SDPA's."""
    cells: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        cell = (row["pattern"], row["head_dim"], row["seq_len"], row["batch"], row["dtype"],
                row["pass"])
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


def longest(args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
            results: Results) -> None:
    """The longest N (doubling from 1M) that spattn runs with B=1, H=12, D=64."""
    pattern = load("longnet-lm", args.divide)
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
        if best:
            results.add(best)


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


def csv_path(device: torch.device, args: argparse.Namespace) -> Path:
    if args.csv is not None:
        return args.csv
    slug = re.sub(r"[^a-z0-9]+", "_", device_name(device).lower()).strip("_")
    return args.results / f"{args.prefix}_{slug}.csv"


def comments(device: torch.device, args: argparse.Namespace) -> list[str]:
    lines = [f"{device_name(device)}, torch {torch.__version__}, triton {triton.__version__}, "
             f"spattn {spattn.__version__}, spattn backend {args.spattn_backend}"]
    if args.cpu_check:
        lines.append("--cpu-check: a functional run at small N on a shared CPU; its times say "
                     "nothing about the GPU targets")
    return lines


def plot(rows: list[dict], path: Path, device: torch.device | str) -> None:
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
    where = device_name(device) if isinstance(device, torch.device) else device
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
               ylabel="ms per million tokens", title=f"{pass_} on {where}")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def safe_plot(rows: list[dict], path: Path, device: torch.device | str) -> None:
    """The plot, whatever rows there are; a failure to draw it is printed, never raised."""
    try:
        plot(rows, path, device)
    except Exception as error:  # noqa: BLE001 - a plot never fails a run
        print(f"no plot: {type(error).__name__}: {error}", file=sys.stderr)


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
    wrong = sorted({f"{r['method']} on {r['pattern']} D={r['head_dim']}" for r in rows
                    if str(r.get("status", "")).startswith("wrong")})
    if wrong:
        lines.append("WRONG (not timed): " + ", ".join(wrong))
    lines.append("vs X = X's time / spattn's (above 1: spattn is faster); rate/sdpa = spattn's "
                 "useful TFLOP/s / dense SDPA's")
    return "\n".join(lines)


# each mode's defaults for the options it leaves unset: (GPU sweep, --cpu-check)
DEFAULTS = {"seq_lens": ([8192, 32768, 131072, 524288, 1048576], [256, 1024]),
            "head_dims": ([64, 128], [32]), "heads": (16, 2), "tokens": (1 << 20, 2048),
            "divide": (1, 64), "check_len": (4096, 128), "prefix": ("gpu", "harness")}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", help="default 8K ... 1M")
    parser.add_argument("--head-dims", type=int, nargs="+", help="default 64 128")
    parser.add_argument("--heads", type=int, help="default 16")
    parser.add_argument("--tokens", type=int, help="B x N per cell (default 2^20)")
    add_dtype(parser, ("float16", "bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--passes", nargs="+", default=["fwd", "fwd+bwd"],
                        choices=["fwd", "fwd+bwd"])
    parser.add_argument("--patterns", nargs="+",
                        default=["longnet-lm", "sliding-window", "sink-window"])
    parser.add_argument("--check-len", type=int, help="N of the correctness check (4096)")
    parser.add_argument("--divide", type=int, help="divide segments and windows")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs on CPU")
    parser.add_argument("--scale", action="store_true", help="find the longest N that runs")
    parser.add_argument("--scale-limit", type=int, default=1 << 24)
    parser.add_argument("--spattn-backend", default=None)
    parser.add_argument("--prefix", help="CSV name: PREFIX_<device>.csv (without --csv)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where CSV and plot go")
    parser.add_argument("--csv", type=Path, help="append the rows to this CSV (made if missing)")
    parser.add_argument("--plot", type=Path, help="the plot's file (default: beside the CSV)")
    parser.add_argument("--no-plot", action="store_true", help="draw no plot")
    parser.add_argument("--cpu-check", action="store_true",
                        help="CPU end-to-end check: small N, float32, torch backend")
    args = parser.parse_args(argv)
    for name, (gpu, cpu) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, cpu if args.cpu_check else gpu)
    if args.cpu_check:
        args.dtype = "float32"  # (the interpreter mishandles bfloat16)
        args.spattn_backend = args.spattn_backend or "torch"
    args.spattn_backend = args.spattn_backend or "triton"
    return args


def _deadline(signum: int, frame: object) -> None:
    raise Deadline


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_check else "cpu")
    if device.type == "cpu" and not args.cpu_check:
        raise SystemExit("no CUDA device: run with --cpu-check for the CPU end-to-end check")
    dtype = getattr(torch, args.dtype)
    path = csv_path(device, args)
    results = Results(path, comments(device, args), fresh=args.csv is None)
    signal.signal(signal.SIGTERM, _deadline)
    all_right, stopped = True, False
    try:
        all_right = sweep(args, device, dtype, results)
        if args.scale:
            longest(args, device, dtype, results)
    except Deadline:
        stopped = True
        print("deadline: stopped; the rows measured so far are in the CSV", file=sys.stderr)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    rows = results.finish()
    all_right = all_right and not any(str(r.get("status", "")).startswith("wrong")
                                      for r in results.rows)
    if not args.no_plot:
        safe_plot(rows, args.plot or path.with_suffix(".png"), device)
    print(summary(rows))
    print(f"wrote {path}" + ("" if args.no_plot else " (and the plot beside it)"))
    if not all_right:
        print("WRONG: a method's output is beyond its dtype's tolerance (see 'wrong' rows)",
              file=sys.stderr)
        return 1
    return 124 if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
