"""`spattn check` on every built-in pattern, for each target: every kernel compiled ahead of time
with triton's ptxas on this CPU machine (no GPU).

    python benchmarks/check_builtins.py [--targets sm_80 sm_90] [--patterns NAME ...]
                                        [--dtype float16 bfloat16 float32]
                                        [--head-dim 64 128] [--results DIR] [--strict]

Writes benchmarks/results/check_<target>.txt: per pattern, the command, its table and last
line and how long it took, then one total line. Each file is rewritten after every pattern, so
an interrupted sweep keeps what it finished; a run of some patterns replaces just their sections.
"""

from __future__ import annotations

import argparse
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import triton

from spattn.cli.args import add_dtype
from spattn.compiler.aot import TARGETS, WORKERS
from spattn.patterns.loader import builtin_patterns

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="+", choices=tuple(TARGETS), default=["sm_80", "sm_90"])
    parser.add_argument("--patterns", nargs="+", metavar="NAME",
                        default=[b.name for b in builtin_patterns()])
    add_dtype(parser, ("float16", "bfloat16", "float32"), many=True)
    parser.add_argument("--head-dim", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--results", type=Path, default=RESULTS, metavar="DIR",
                        help="where check_<target>.txt goes (default benchmarks/results)")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 unless every kernel compiled, none spills and all use "
                             "tensor cores (CI)")
    args = parser.parse_args()
    clean = True
    for target in args.targets:
        dtypes = args.dtype or ["float16", "bfloat16", "float32"]
        clean &= sweep(target, args.patterns, dtypes, args.head_dim, args.results)
    if args.strict and not clean:
        sys.exit(1)


def sweep(target: str, patterns: list[str], dtypes: list[str], head_dims: list[int],
          results: Path = RESULTS) -> bool:
    """Check `patterns` for `target`; whether every kernel compiled, none with spills and all
    with tensor cores."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"check_{target}.txt"
    head = [f"# spattn check on every built-in pattern for {target}: triton {triton.__version__}"
            f" and its bundled ptxas, {WORKERS} compile processes on {platform.machine()} "
            f"(no GPU); tiles, warps and stages from spattn/runtime/launch_configs.json",
            f"# spattn at commit {_commit()}; each section below names the command that made it",
            "# regs: registers per thread; spills: bytes of spill stores; smem: shared memory "
            "bytes per block; tc: the tensor-core instruction in the PTX", ""]
    sections = _sections(path)  # pattern name -> its section, from an earlier run
    for name in patterns:
        argv = ["check", name, "--target", target, "--dtype", *dtypes,
                "--head-dim", *map(str, head_dims)]
        begin = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "spattn.cli.main", *argv],
                              capture_output=True, text=True)
        took = time.perf_counter() - begin
        out = done.stdout.rstrip() or done.stderr.strip()
        sections[name] = (f"$ spattn {' '.join(argv)}\n{out}\n(exit {done.returncode}, "
                          f"{took:.0f} s)\n")
        path.write_text("\n".join(head + list(sections.values()) + [_total(sections, target)])
                        + "\n")
        print(f"{target} {name}: {out.splitlines()[-1]} ({took:.0f} s)", flush=True)
    total = _total(sections, target)
    print(total, flush=True)
    compiled, kernels, spills, plain = _counts(total)
    return compiled == kernels and spills == plain == 0


def _commit() -> str:
    done = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                          text=True, cwd=Path(__file__).parent)
    return done.stdout.strip() or "unknown"


def _sections(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    parts = re.split(r"^(?=\$ spattn check )", path.read_text(), flags=re.M)[1:]
    parts = [part.split("\nall ")[0].rstrip("\n") + "\n" for part in parts]
    return {part.split()[3]: part for part in parts}


def _total(sections: dict[str, str], target: str) -> str:
    totals = [0, 0, 0, 0]  # compiled, kernels, with spills, without tensor cores
    seconds = 0
    for section in sections.values():
        lines = section.strip().splitlines()
        _add(totals, lines[-2])
        seconds += int(lines[-1].split(", ")[-1].split()[0])
    return (f"all {len(sections)} patterns: {totals[0]}/{totals[1]} kernels compiled for "
            f"{target}, {totals[2]} with spills, {totals[3]} without tensor cores ({seconds} s)")


def _counts(total: str) -> tuple[int, int, int, int]:
    """(compiled, kernels, with spills, without tensor cores) of an `all N patterns: ...` line."""
    words = total.split(": ", 1)[1].split()
    compiled, kernels = map(int, words[0].split("/"))
    return compiled, kernels, int(words[5]), int(words[8])


def _add(totals: list[int], last: str) -> None:
    """Add a `check: X/Y kernels compiled for T, Z with spills, W without tensor cores` line."""
    if not last.startswith("check: "):
        return
    words = last.split()
    compiled, kernels = map(int, words[1].split("/"))
    spills, plain = int(words[6]), int(words[9])
    for i, value in enumerate((compiled, kernels, spills, plain)):
        totals[i] += value


if __name__ == "__main__":
    main()
