"""Choose the launch-configuration table (spattn/runtime/launch_configs.json) by compiling
candidates ahead of time, on this CPU machine, with triton's ptxas (no GPU).

    python benchmarks/sweep_configs.py [--targets sm_80 sm_90] [--keep 3]
    python benchmarks/sweep_configs.py --refit   # under a second triton (3.6: the H200 image's)

Every kernel specialization the built-in patterns' launchers make (fp16, bf16, fp32; head dims
64 and 128) is grouped by table cell: architecture, dtype, head dim, kernel and mode. Each cell
tries its candidates, largest tiles first (FlashAttention's Triton kernels are the model: 128-row
forward tiles with 8 warps, 32 x 128 dK/dV tiles), on every distinct kernel body of the cell,
and keeps the first `--keep` that compile for all of them with no register spills and shared
memory within the target. The first kept is the untuned default; a GPU times all kept ones at
first use (spattn/runtime/tuning.py). Every compile is written to
benchmarks/results/sweep_configs_<target>.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import triton

from spattn.compiler import aot
from spattn.compiler.codegen import render
from spattn.patterns.loader import builtin_names, load_pattern
from spattn.runtime import configs
from spattn.runtime.configs import LaunchConfig

RESULTS = Path(__file__).parent / "results"
C = LaunchConfig
# candidates per kernel role, best first: (BLOCK_M, BLOCK_N, num_warps, num_stages); 8 warps
# halve each thread's share of a tile (float32's three-product dots need it); two stages let
# the loads go straight to shared memory (cp.async), which frees registers in the small tiles
ROWS_FORWARD = [C(128, 64, 8, 3), C(128, 64, 8, 2), C(128, 32, 8, 2), C(64, 64, 4, 3),
                C(64, 64, 4, 2), C(64, 64, 8, 2), C(64, 32, 4, 2), C(64, 32, 8, 2),
                C(32, 32, 4, 2), C(32, 32, 8, 1), C(32, 16, 4, 1), C(16, 32, 4, 2),
                C(16, 16, 4, 1)]
ROWS_BACKWARD = [C(128, 64, 8, 2), C(128, 32, 8, 2), C(64, 64, 4, 2), C(64, 64, 8, 2),
                 C(64, 32, 4, 2), C(64, 32, 8, 2), C(32, 32, 4, 2), C(32, 32, 8, 2),
                 C(32, 32, 8, 1), C(32, 16, 8, 2), C(32, 16, 4, 1), C(32, 16, 8, 1),
                 C(16, 32, 8, 2), C(16, 32, 8, 1), C(16, 16, 8, 2), C(16, 16, 4, 2),
                 C(16, 16, 4, 1), C(16, 16, 8, 1), C(16, 16, 2, 1)]
COLUMNS = [C(32, 128, 8, 2), C(64, 64, 8, 2), C(64, 64, 4, 2), C(32, 64, 4, 2), C(32, 64, 8, 2),
           C(32, 64, 8, 1), C(32, 32, 4, 2), C(32, 32, 8, 1), C(16, 32, 4, 1), C(16, 32, 8, 1),
           C(16, 16, 4, 1), C(16, 16, 8, 1)]
# random blocks are 64 rows in the built-ins: tiles past the block would idle
RANDOM_ROWS = [C(64, 64, 4, 3), C(64, 64, 4, 2), C(64, 64, 8, 2), C(64, 32, 4, 2),
               C(64, 32, 8, 2), C(32, 32, 4, 2), C(32, 32, 8, 1), C(32, 16, 4, 1),
               C(16, 16, 8, 2), C(16, 16, 4, 1), C(16, 16, 8, 1)]
RANDOM_COLUMNS = [C(64, 64, 4, 2), C(64, 64, 8, 2), C(32, 64, 4, 2), C(32, 64, 8, 1),
                  C(32, 32, 4, 2), C(32, 32, 8, 1), C(16, 32, 4, 1), C(16, 16, 4, 1)]
DECODE = [C(16, 128, 4, 3), C(16, 64, 4, 3), C(16, 64, 4, 2), C(16, 32, 4, 2), C(16, 16, 4, 1)]


def candidates(kernel: str, mode: str) -> list[LaunchConfig]:
    if kernel == "decode_rows":
        return DECODE
    if kernel.startswith("random"):
        return RANDOM_COLUMNS if kernel.endswith("_cols") else RANDOM_ROWS
    if kernel.endswith("_cols"):
        return COLUMNS
    return ROWS_BACKWARD if mode == "bwd" else ROWS_FORWARD


SIZES = ("EARLIER", "BLOCK_M", "BLOCK_N", "num_warps", "num_stages")


def _hopeless(cell: str, config: LaunchConfig) -> bool:
    """Float32 row backward at head dim 128 past 32 x 32 tiles: every such candidate spilled
    hundreds of bytes in the sweep of 2026-12-01 (and ptxas takes minutes on each)."""
    return ("/fp32/128/" in cell and cell.endswith("_rows/bwd")
            and config.block_m * config.block_n > 32 * 32)


def _body(spec: aot.Spec, pattern: str) -> tuple:
    """What shapes a kernel's code, tiles aside: its flags, which tables it gets, and under union
    the pattern and the branches before its own, whose predicate is printed into it (branch
    sizes are run-time arguments)."""
    c = spec.constexprs
    flags = tuple((k, v) for k, v in c.items() if k not in SIZES)
    printed = (pattern, c.get("EARLIER")) if c.get("UNION") else ()
    return flags, tuple(a is None for a in spec.args), printed


def collect(target: str, folder: Path) -> dict[str, list[tuple[aot.Spec, Path]]]:
    """cell -> one (spec, module) per distinct kernel body of the built-ins."""
    cells: dict[str, dict[tuple, tuple[aot.Spec, Path]]] = defaultdict(dict)
    capability = aot.target_capability(target)
    for pattern in map(load_pattern, builtin_names()):
        name = pattern.name.replace("-", "_")
        path = folder / f"{name}.py"
        module = aot.load_module(render(pattern, name), path)
        for spec in aot.specializations(pattern, module, target, list(aot.DTYPES), [64, 128]):
            kernel = spec.kernel.lstrip("_")
            key = configs.cell(capability, aot.DTYPES[spec.dtype], spec.head_dim, kernel,
                               spec.mode)
            cells[key].setdefault((spec.kernel, _body(spec, pattern.name)), (spec, path))
    return {key: list(bodies.values()) for key, bodies in sorted(cells.items())}


def csv_path(target: str, refit: bool = False) -> Path:
    """A sweep's record of every compile; a refit's is named by its triton version."""
    suffix = f"_triton-{triton.__version__}" if refit else ""
    return RESULTS / f"sweep_configs_{target}{suffix}.csv"


def sweep(target: str, keep: int, refit: bool = False, only: list[str] | None = None,
          extend: bool = False) -> dict[str, list[list[int]]]:
    """Try each cell's candidates in order; return cell -> the kept configurations. With
    `refit`, the candidates are the cell's rows of the committed table (made with another
    triton) and every one that fits is kept: the rows then fit both versions; with `extend`
    too, the sweep's smaller candidates after them (for a cell none of whose rows fits: run
    the refit under each version in turn). `only`: these cells alone."""
    with tempfile.TemporaryDirectory(prefix="spattn-sweep-") as folder:
        cells = collect(target, Path(folder))
        if only:
            cells = {key: bodies for key, bodies in cells.items() if key in only}
        print(f"{target}: {len(cells)} cells, "
              f"{sum(len(v) for v in cells.values())} kernel bodies", flush=True)
        if refit:
            keep = max(len(rows) for rows in table_rows().values())
            pending = {key: list(table_rows().get(key, [])) for key in cells}
            if extend:
                for key, rows in pending.items():
                    order = candidates(key.split("/")[3], key.split("/")[4])
                    last = max((order.index(c) for c in rows if c in order), default=-1)
                    rows += [c for c in order[last + 1:] if not _hopeless(key, c)]
                    pending[key] = rows
        else:
            pending = {key: [c for c in candidates(key.split("/")[3], key.split("/")[4])
                             if not _hopeless(key, c)] for key in cells}
        kept: dict[str, list[LaunchConfig]] = defaultdict(list)
        known, rows = _known(csv_path(target, refit))  # earlier verdicts: not compiled again
        while pending:
            for key in list(pending):  # settle what the earlier sweep decided
                while pending[key] and (key, str(pending[key][0])) in known \
                        and len(kept[key]) < keep:
                    config = pending[key].pop(0)
                    if known[key, str(config)]:
                        kept[key].append(config)
                if len(kept[key]) >= keep or not pending[key]:
                    del pending[key]
            if not pending:
                break
            # one round: each open cell's next candidate, compiled for all its bodies at once
            batch = [(key, config) for key, left in pending.items() for config in left[:1]]
            jobs = [(key, config, spec.with_config(config), path) for key, config in batch
                    for spec, path in cells[key]]
            begin = time.perf_counter()
            results = aot.compile_specs([j[2] for j in jobs], [j[3] for j in jobs], target)
            fits: dict[tuple[str, LaunchConfig], bool] = defaultdict(lambda: True)
            for (key, config, spec, _), result in zip(jobs, results, strict=True):
                ok = result.ok and not result.spills
                fits[key, config] &= ok
                rows.append([key, str(config), spec.kernel, spec.mode, spec.dtype,
                             spec.head_dim, _shape(spec), result.registers, result.spills,
                             result.shared, result.tensor_core, result.error or "ok"])
            for key, config in batch:
                pending[key].pop(0)
                if fits[key, config]:
                    kept[key].append(config)
                if len(kept[key]) >= keep or not pending[key]:
                    del pending[key]
            print(f"{target}: {len(jobs)} compiles in {time.perf_counter() - begin:.0f} s, "
                  f"{len(pending)} cells open", flush=True)
    with open(csv_path(target, refit), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["cell", "config", "kernel", "mode", "dtype", "head_dim", "shape",
                         "registers", "spills", "shared", "tensor_core", "status"])
        writer.writerows(rows)
    if refit:
        return refitted(target, {key: kept.get(key, []) for key in cells})
    return from_csv(target, keep)


def table_rows() -> dict[str, list[LaunchConfig]]:
    """The committed table's rows per cell."""
    cells = json.loads(configs.TABLE.read_text())["cells"]
    return {key: [LaunchConfig(*row) for row in rows] for key, rows in cells.items()}


def refitted(target: str, kept: dict[str, list[LaunchConfig]]) -> dict[str, list[list[int]]]:
    """A refit's rows: per cell, the table's rows that also fit this triton, in their order. A
    cell where none does keeps its rows, and says so: it needs a sweep under both versions."""
    chosen = {}
    for key, fit in kept.items():
        if not fit:
            print(f"{target}: {key}: none of its rows fits triton {triton.__version__} "
                  f"without spills; kept as they are", file=sys.stderr)
            fit = table_rows()[key]
        chosen[key] = [[c.block_m, c.block_n, c.num_warps, c.num_stages] for c in fit]
    return chosen


def _known(path: Path) -> tuple[dict[tuple[str, str], bool], list[list]]:
    """(cell, config) -> whether it fit every body an earlier sweep compiled, and its rows."""
    if not path.exists():
        return {}, []
    with open(path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    known: dict[tuple[str, str], bool] = {}
    for row in rows:
        ok = row[-1] == "ok" and row[8] in ("0", "")
        known[row[0], row[1]] = known.get((row[0], row[1]), True) and ok
    return known, rows


def _shape(spec: aot.Spec) -> str:
    return ",".join(f"{k}={v}" for k, v in spec.constexprs.items() if k not in aot.COMMON)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="+", choices=tuple(aot.TARGETS),
                        default=["sm_80", "sm_90"])
    parser.add_argument("--keep", type=int, default=3, help="configurations kept per cell")
    parser.add_argument("--from-csv", action="store_true",
                        help="rebuild the targets' table rows from their sweep CSVs, compiling "
                             "nothing")
    parser.add_argument("--refit", action="store_true",
                        help="under a second triton version: keep, of each cell's table rows, "
                             "those that compile without spills here too, so the table fits both")
    parser.add_argument("--extend", action="store_true",
                        help="with --refit: try the smaller candidates after a cell's rows too")
    parser.add_argument("--cells", nargs="+", metavar="CELL",
                        help="sweep these cells only (e.g. sm_80/fp16/128/dilated_rows/bwd)")
    args = parser.parse_args()
    for target in args.targets:
        if args.from_csv:
            chosen = from_csv(target, args.keep)
        else:
            chosen = sweep(target, args.keep, args.refit, args.cells, args.extend)
        write_table(target, chosen, refit=args.refit, partial=bool(args.cells))


def from_csv(target: str, keep: int) -> dict[str, list[list[int]]]:
    """The kept configurations of a sweep, from its CSV: per cell, in candidate order, the first
    `keep` that compiled without spills for every kernel body. A cell where none did keeps the
    one with the fewest spilling kernels, then the fewest bytes (and says so)."""
    fits: dict[str, dict[str, bool]] = defaultdict(dict)
    # (kernels that spill, most bytes spilled); inf: a kernel failed to compile
    worst: dict[str, dict[str, tuple[float, float]]] = defaultdict(dict)
    with open(csv_path(target), newline="") as f:
        for row in csv.DictReader(f):
            compiled = row["status"] == "ok"
            spilled = int(row["spills"] or 0) if compiled else float("inf")
            tried, most = fits[row["cell"]], worst[row["cell"]]
            tried[row["config"]] = tried.get(row["config"], True) and spilled == 0
            kernels, bytes_ = most.get(row["config"], (0, 0))
            most[row["config"]] = (kernels + (spilled > 0), max(bytes_, spilled))
    chosen = {}
    for cell, tried in fits.items():
        order = candidates(cell.split("/")[3], cell.split("/")[4])
        kept = [c for c in order if tried.get(str(c))][:keep]
        if not kept:
            least = min((c for c in order if str(c) in worst[cell]),
                        key=lambda c: worst[cell][str(c)])
            kernels, bytes_ = worst[cell][str(least)]
            print(f"{target}: {cell}: no candidate fits without spills; keeping {least} "
                  f"({kernels:.0f} kernels spill, at most {bytes_:.0f} bytes)", file=sys.stderr)
            kept = [least]
        chosen[cell] = [[c.block_m, c.block_n, c.num_warps, c.num_stages] for c in kept]
    return chosen


def write_table(target: str, chosen: dict[str, list[list[int]]], refit: bool = False,
                partial: bool = False) -> None:
    """Replace the target's rows of the committed table (`partial`: only the chosen cells'); a
    refit adds its triton version to the versions the table's rows fit."""
    old = json.loads(configs.TABLE.read_text())
    cells = {k: v for k, v in old.get("cells", {}).items()
             if partial or not k.startswith(target + "/")}
    cells.update(chosen)
    versions = sorted(set(old.get("tritons", [])) | {triton.__version__}) if refit \
        else [triton.__version__]
    table = {"about": "launch configurations per cell, [BLOCK_M, BLOCK_N, num_warps, "
                      "num_stages], best first; made by benchmarks/sweep_configs.py (and "
                      "--refit under each further triton): each compiles with no spills for "
                      "every built-in kernel of its cell under every triton listed",
             "tritons": versions,
             "cells": dict(sorted(cells.items()))}
    configs.TABLE.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {target}'s rows of {configs.TABLE}")


if __name__ == "__main__":
    main()
