"""Every built-in pattern against the other ways of computing it on this CPU, side by side.

    python benchmarks/bench_cpu_peers.py [--seq-lens 1024 4096 16384 65536] [--cases NAME ...]
                                         [--passes fwd fwd+bwd] [--repeats 3] [--budget-s 20]

Cases: every built-in at full size, and the long-segment ones scaled to short contexts (every
segment and window divided by 8 or 16, as `spattn inspect --scale` does). Methods, in one process
and interleaved call by call (after a warm-up, the best of as many rounds as give about two
seconds of calls of each method that computes the pattern: at least --repeats, at most 40),
fp32, B=1, H=4, D=64:

- spattn: `spattn.attention` (the PyTorch backend and its planned calls);
- dense SDPA: `scaled_dot_product_attention` with `is_causal`, the pattern's causality;
- masked SDPA: `scaled_dot_product_attention` with the pattern as an additive mask (log of each
  pair's count, -inf where none): exact for every pattern, N <= 4K (the mask is H x N x N);
- gather: gather + SDPA + scatter, LongNet's own method (dilated and dense branches only);
- window blocks: a causal sliding window by query blocks of W rows over the 2W keys that end
  with them, one masked SDPA call (patterns that are one causal window only);
- flex: FlexAttention compiled for the CPU with spattn's exported mask (N <= 4K: it takes
  25-40 s a call at 16K; the mask is built over every (query, key) pair). Its backward does not
  run on the CPU (NotImplementedError), so it has no forward+backward times.

`same` says whether a peer computes this pattern: its forward output matches spattn's to 1e-4.
A peer that does not (dense SDPA on a sparse pattern; FlexAttention or a union of branches where
the pattern counts overlapping pairs twice) is timed for reference only. Peers whose dense work
would pass --budget-s per call are skipped. Writes benchmarks/results/cpu_peers.csv (appended
cell by cell, so an interrupted run keeps what it finished) and cpu_peers.png, and prints a
summary last.
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import spattn
from spattn.patterns.counting import count_pairs, useful_flops
from spattn.patterns.geometry import Dense, Dilated, resolve
from spattn.patterns.loader import builtin_names
from spattn.patterns.report import scale_pattern

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PEERS = ("dense SDPA", "masked SDPA", "gather", "window blocks", "flex")
B, H, D = 1, 4, 64
DENSE_GFLOPS = 40.0  # this machine's dense SDPA rate, for skipping calls past the budget
FLEX_MAX_N = 4096  # compiled FlexAttention on CPU takes 25-40 s a call at 16K
CELL_S = 2.0  # seconds of calls of each method that computes the pattern, at least
MAX_ROUNDS = 40
MASKED_MAX_N = 4096  # masked SDPA's (1, H, N, N) float mask: 256 MB at 4K, 4 GB at 16K
SCALED = {"longnet-lm": 16, "longnet-geometric": 16, "longvit": 16, "sliding-window": 8,
          "sink-window": 8}
FIELDS = ["case", "seq_len", "pass", "method", "ms", "spattn_over_method", "same",
          "useful_gflops"]


def cases() -> dict[str, spattn.Pattern]:
    out = {}
    for name in builtin_names():
        out[name] = spattn.load_pattern(name)
        if name in SCALED:
            scaled = scale_pattern(out[name], SCALED[name])
            out[f"{name}/{SCALED[name]}"] = scaled.model_copy(update={"name": scaled.name})
    return out


def _dilated_only(pattern: spattn.Pattern, n: int) -> bool:
    return all(isinstance(g, Dilated | Dense) for g in resolve(pattern, n, H))


def methods(pattern: spattn.Pattern, n: int, backward: bool, budget_s: float,
            chosen: tuple[str, ...] = PEERS) -> dict[str, Callable | str]:
    """The callables to time, or the reason a peer is left out."""
    dense_flops = useful_flops(H * (n * (n + 1) // 2 if pattern.causal else n * n), D, B)
    work = 3.5 if backward else 1.0
    found: dict[str, Callable | str] = {"spattn": peers.spattn_attention(pattern, "torch")}
    if dense_flops * work / (DENSE_GFLOPS * 1e9) > budget_s:
        found["dense SDPA"] = f"past the {budget_s:.0f} s budget"
    else:
        found["dense SDPA"] = peers.dense_sdpa(pattern.causal)
    if n > MASKED_MAX_N:
        found["masked SDPA"] = f"N > {MASKED_MAX_N}"
    elif "masked SDPA" in chosen:
        found["masked SDPA"] = peers.masked_sdpa(pattern, n, H, torch.device("cpu"))
    found["gather"] = (peers.gather_sdpa_scatter(pattern) if _dilated_only(pattern, n)
                       else "not dilated")
    found["window blocks"] = (peers.window_blocks(pattern) if peers.causal_window(pattern, n, H)
                              else "not one causal window")
    union = pattern.model_copy(update={"overlap": "union"})
    if n > FLEX_MAX_N:
        found["flex"] = f"N > {FLEX_MAX_N}"
    elif count_pairs(union, n, H).total != count_pairs(pattern, n, H).total:
        found["flex"] = "computes the union (pairs counted twice here)"
    elif "flex" in chosen:
        found["flex"] = peers.flex(pattern, n, H, torch.device("cpu"))
    return {name: fn for name, fn in found.items() if name == "spattn" or name in chosen}


def measure(case: str, pattern: spattn.Pattern, n: int, backward: bool, repeats: int,
            budget_s: float, chosen: tuple[str, ...] = PEERS) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, generator=gen).requires_grad_(backward) for _ in range(3))
    grad = torch.randn(B, H, n, D, generator=gen)
    found = methods(pattern, n, backward, budget_s, chosen)
    timed = {name: fn for name, fn in found.items() if callable(fn)}
    if len(timed) == 1:  # no peer runs this cell: nothing to compare with
        return [dict(case=case, seq_len=n, method=name, ms="", spattn_over_method="", same=why,
                     useful_gflops="", **{"pass": "fwd+bwd" if backward else "fwd"})
                for name, why in found.items() if name != "spattn"]
    outputs, first = {}, {}
    for name, fn in list(timed.items()):  # warm-up (compiles), and the outputs compared
        try:
            outputs[name] = peers.run_pass(fn, q, k, v, grad, backward).detach()
            start = time.perf_counter()
            peers.run_pass(fn, q, k, v, grad, backward)
            first[name] = time.perf_counter() - start
        except Exception as error:  # a peer that cannot run this case: say why, go on
            found[name] = f"failed: {type(error).__name__}"
            del timed[name]
    same = {name: bool((out - outputs["spattn"]).abs().max() < 1e-4)
            for name, out in outputs.items()}
    # the methods that compute the pattern get rounds for about CELL_S of calls each (at least
    # `repeats`), so that the best of them is not one lucky or unlucky call on a shared
    # machine; a peer that computes something else, timed for reference, runs `repeats` rounds
    exact = [name for name in first if same[name]]
    rounds = max(repeats, min(MAX_ROUNDS, math.ceil(CELL_S / max(first[m] for m in exact))))
    times: dict[str, list[float]] = {name: [] for name in first}
    order = [(name, timed[name]) for name in first]
    for round_ in range(rounds):  # each round starts with the next method: no fixed position
        for name, fn in order[round_ % len(order):] + order[:round_ % len(order)]:
            if round_ >= repeats and not same[name]:
                continue
            start = time.perf_counter()
            peers.run_pass(fn, q, k, v, grad, backward)
            times[name].append(time.perf_counter() - start)
    flops = useful_flops(count_pairs(pattern, n, H).total, D, B) * (3.5 if backward else 1.0)
    best = {name: min(t) * 1e3 for name, t in times.items()}
    rows = []
    for name, fn in found.items():
        if name not in best:
            rows.append(dict(case=case, seq_len=n, method=name, ms="", spattn_over_method="",
                             same=fn, useful_gflops=""))
            continue
        rows.append(dict(case=case, seq_len=n, method=name, ms=f"{best[name]:.1f}",
                         spattn_over_method=f"{best['spattn'] / best[name]:.3f}",
                         same="yes" if same[name] else "no",
                         useful_gflops=f"{flops / best[name] / 1e6:.1f}"))
    return [{**row, "pass": "fwd+bwd" if backward else "fwd"} for row in rows]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    names = list(dict.fromkeys(r["case"] for r in rows))
    colors = plt.get_cmap("tab20")
    for ax, what in zip(axes, ("fwd", "fwd+bwd"), strict=True):
        for i, case in enumerate(names):
            best = {}
            for r in rows:  # per N: spattn over the fastest peer that computes the same thing
                if r["case"] == case and r["pass"] == what and r["same"] == "yes" \
                        and r["method"] != "spattn":
                    n = int(r["seq_len"])
                    best[n] = max(best.get(n, 0.0), float(r["spattn_over_method"]))
            if best:
                ns = sorted(best)
                ax.plot(ns, [best[n] for n in ns], marker="o", label=case, color=colors(i))
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length N")
        ax.set_title(f"{what}: spattn time / fastest exact peer (below 1: spattn faster)")
    axes[0].set_ylabel("time ratio")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"spattn vs peers on CPU ({platform.machine()}, {torch.get_num_threads()} "
                 f"threads, fp32, B={B} H={H} D={D})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(rows: list[dict]) -> str:
    """A table per pass: spattn's time, and its ratio to each peer's (bold where the peer is
    faster; in parentheses where the peer computes something else)."""
    out = []
    for what in ("fwd", "fwd+bwd"):
        cells: dict[tuple[str, int], dict[str, dict]] = {}
        for r in rows:
            if r["pass"] == what:
                cells.setdefault((r["case"], int(r["seq_len"])), {})[r["method"]] = r
        if not cells:
            continue
        out += [f"\n{what}: spattn's time, and spattn's time / the peer's\n",
                "| case | N | spattn ms | " + " | ".join(f"/ {p}" for p in PEERS) + " |",
                "|---|---:|---:|" + "---:|" * len(PEERS)]
        for (case, n), by in cells.items():
            if "spattn" not in by:  # no peer ran this cell
                continue
            line = [case, f"{n:,}", by["spattn"]["ms"]]
            for peer in PEERS:
                r = by.get(peer)
                if r is None or not r["ms"]:
                    line.append("-")
                    continue
                ratio = float(r["spattn_over_method"])
                text = f"{ratio:.2f}"
                if r["same"] != "yes":
                    text = f"({text})"
                elif ratio > 1.0:
                    text = f"**{text}**"
                line.append(text)
            out.append("| " + " | ".join(line) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--cases", nargs="+", help="case names (default: all)")
    parser.add_argument("--passes", nargs="+", choices=["fwd", "fwd+bwd"],
                        default=["fwd", "fwd+bwd"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=8.0,
                        help="skip a peer whose dense work would take longer per call")
    parser.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    parser.add_argument("--fresh", action="store_true", help="start a new CSV")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the CSV and plot")
    parser.add_argument("--markdown", action="store_true",
                        help="print the CSV's tables in markdown, redraw the plot, and stop")
    args = parser.parse_args()
    results = args.results
    csv_path = results / "cpu_peers.csv"
    all_cases = cases()
    chosen = args.cases or list(all_cases)
    unknown = [c for c in chosen if c not in all_cases]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(all_cases)}")
    if args.markdown:  # and the plot, redrawn
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
        plot(rows, results / "cpu_peers.png")
        print(markdown(rows))
        return
    results.mkdir(parents=True, exist_ok=True)
    done = set()
    if csv_path.exists() and not args.fresh:
        with open(csv_path, newline="") as f:
            done = {(r["case"], r["seq_len"], r["pass"]) for r in csv.DictReader(
                line for line in f if not line.startswith("#"))}
    else:
        with open(csv_path, "w", newline="") as f:
            f.write(f"# {platform.machine()}, {torch.get_num_threads()} threads, torch "
                    f"{torch.__version__}, spattn {spattn.__version__}, B={B} H={H} D={D} "
                    f"float32; best of about {CELL_S:.0f} s of calls of each exact method "
                    f"(at least {args.repeats} rounds, at most {MAX_ROUNDS}; peers computing "
                    f"something else {args.repeats}) after a warm-up, interleaved\n")
            csv.DictWriter(f, FIELDS).writeheader()
    for case in chosen:
        for n in args.seq_lens:
            for what in args.passes:
                if (case, str(n), what) in done:
                    continue
                begin = time.perf_counter()
                rows = measure(case, all_cases[case], n, what == "fwd+bwd", args.repeats,
                               args.budget_s, tuple(args.peers))
                with open(csv_path, "a", newline="") as f:
                    csv.DictWriter(f, FIELDS).writerows(rows)
                summary = ", ".join(f"{r['method']} {r['ms'] or r['same']}" for r in rows)
                print(f"{case} N={n} {what}: {summary} ({time.perf_counter() - begin:.0f} s)",
                      flush=True)
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    plot(rows, results / "cpu_peers.png")
    print("\nspattn time / peer time where the peer computes the same thing (<= 1: spattn as "
          "fast or faster):")
    for r in rows:
        if r["method"] != "spattn" and r["same"] == "yes":
            flag = "" if float(r["spattn_over_method"]) <= 1.0 else "  <-- peer faster"
            print(f"  {r['case']:<28} N={int(r['seq_len']):>6} {r['pass']:<8} vs "
                  f"{r['method']:<11} {float(r['spattn_over_method']):.2f}{flag}")


if __name__ == "__main__":
    main()
