"""`spattn check PATTERN --target sm_90`: compile every kernel the pattern's launcher would
launch for a GPU target, without a GPU, and report registers, spills, shared memory and the
tensor-core instruction of each."""

from __future__ import annotations

import argparse
import sys
import time

from spattn.cli.args import add_dtype, positive
from spattn.compiler.aot import COMMON, DTYPES, TARGETS, WORKERS, Result, check
from spattn.errors import SpattnError
from spattn.patterns.loader import load_pattern

HEAD_DIMS = (64, 128)
MAX_CHECK_HEAD_DIM = 512  # one tile holds a whole head: past this nothing would fit
# torch's name of each dtype the compiler checks -> its own short name (spattn.compiler.aot)
TORCH_NAMES = {str(dtype).removeprefix("torch."): name for name, dtype in DTYPES.items()}
SHOWN = {name: torch_name for torch_name, name in TORCH_NAMES.items()}
COLUMNS = ("kernel", "mode", "dtype", "D", "launches", "shape", "BM", "BN", "warps", "stages",
           "regs", "spills", "smem", "tc", "s", "status")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "check", help="compile every kernel of a pattern for a GPU target, without a GPU",
        description="Compile every kernel specialization the pattern's generated module would "
                    "launch (forward, backward, decode; every branch) for a GPU target with "
                    "triton's own ptxas, and print registers, spilled bytes, shared memory and "
                    "tensor-core instruction per kernel. Exit 0 when every kernel compiles and "
                    "fits the target, else 1.")
    p.add_argument("pattern", metavar="PATTERN", help="built-in name or YAML file")
    p.add_argument("--target", required=True, choices=tuple(TARGETS), help="GPU architecture")
    add_dtype(p, tuple(TORCH_NAMES), many=True, what="input dtypes")
    p.add_argument("--head-dim", action="extend", nargs="+", type=positive, metavar="N",
                   help="head dims (default: the pattern's, else 64 and 128)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    pattern = load_pattern(args.pattern)
    dtypes = [TORCH_NAMES[name] for name in dict.fromkeys(args.dtype or TORCH_NAMES)]
    head_dims = _head_dims(args.head_dim, pattern.head_dim)
    start = time.perf_counter()
    results = check(pattern, args.target, dtypes, head_dims, _progress)
    took = time.perf_counter() - start
    rows = [COLUMNS, *(_row(r) for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]).rstrip())
    compiling = sum(r.seconds or 0.0 for r in results)
    print(f"# {pattern.name}: {len(results)} kernels for {sum(r.spec.launches for r in results)} "
          f"launches, {compiling:.0f} s of compiling in {took:.0f} s ({WORKERS} processes), "
          f"triton {_triton_version()}", file=sys.stderr)
    print(summary(results, args.target))
    return 0 if all(r.ok for r in results) else 1


def _head_dims(asked: list[int] | None, fixed: int | None) -> list[int]:
    if fixed is not None:
        if asked and set(asked) != {fixed}:
            raise SpattnError(f"the pattern fixes head_dim {fixed}; --head-dim "
                              f"{' '.join(map(str, asked))} cannot be checked")
        return [fixed]
    head_dims = list(dict.fromkeys(asked or HEAD_DIMS))
    too_big = [d for d in head_dims if d > MAX_CHECK_HEAD_DIM]
    if too_big:
        raise SpattnError(f"--head-dim {too_big[0]}: check compiles head dims up to "
                          f"{MAX_CHECK_HEAD_DIM}")
    return head_dims


def summary(results: list[Result], target: str) -> str:
    """The last line: how many kernels compiled, spill and lack tensor cores."""
    ok = [r for r in results if r.ok]
    spills = sum(1 for r in ok if r.spills)
    plain = sum(1 for r in ok if r.tensor_core == "none")
    return (f"check: {len(ok)}/{len(results)} kernels compiled for {target}, {spills} with "
            f"spills, {plain} without tensor cores")


def _row(result: Result) -> tuple[str, ...]:
    spec, consts = result.spec, result.spec.constexprs
    shape = ",".join(f"{k}={_short(v)}" for k, v in consts.items() if k not in COMMON) or "-"
    status = "ok" if result.ok else f"error: {result.error}"
    dtype = SHOWN.get(spec.dtype, spec.dtype)  # torch's name, as --dtype takes it
    return (spec.kernel.lstrip("_"), spec.mode, dtype, str(spec.head_dim),
            str(spec.launches), shape, str(consts["BLOCK_M"]),
            str(consts["BLOCK_N"]), str(result.num_warps), str(result.num_stages),
            _number(result.registers), _number(result.spills), _number(result.shared),
            result.tensor_core or "-",
            "-" if result.seconds is None else f"{result.seconds:.1f}", status)


def _short(value: object) -> str:
    return {True: "T", False: "F"}[value] if isinstance(value, bool) else str(value)


def _number(value: int | None) -> str:
    return "-" if value is None else str(value)


def _triton_version() -> str:
    import triton

    return triton.__version__


def _progress(done: int, total: int) -> None:
    """A counter line on stderr, rewritten in place on a terminal."""
    if sys.stderr.isatty():
        end = "\n" if done == total else ""
        print(f"\rcompiled {done}/{total} kernels", end=end, file=sys.stderr, flush=True)
