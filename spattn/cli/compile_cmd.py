"""`spattn compile PATTERN -o DIR`: write the generated Triton module and its plan."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from spattn.compiler.codegen import compile_module, module_name, specialize, write_atomically
from spattn.compiler.plan import build_plan
from spattn.errors import SpattnError
from spattn.patterns.loader import load_pattern

PLAN_SEQ_LEN = 32768


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compile", help="emit a Python module of Triton kernels for a pattern",
        description="Write DIR/<name>.py (Triton kernels + launcher; `from <name> import "
                    "attention`) and DIR/<name>.plan.json (tiles, density, FLOPs at --seq-len).")
    p.add_argument("pattern", metavar="PATTERN", help="built-in name or YAML file")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--heads", type=int, metavar="H", help="fix the number of query heads")
    p.add_argument("--kv-heads", type=int, metavar="HKV", help="fix the number of k/v heads")
    p.add_argument("--head-dim", type=int, metavar="D", help="fix the head dimension")
    p.add_argument("--seq-len", type=int, default=PLAN_SEQ_LEN, metavar="N",
                   help=f"sequence length the plan file describes (default {PLAN_SEQ_LEN}); "
                        "the module itself takes any N")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    for flag, value in (("--heads", args.heads), ("--kv-heads", args.kv_heads),
                        ("--head-dim", args.head_dim), ("--seq-len", args.seq_len)):
        if value is not None and value < 1:
            raise SpattnError(f"{flag} must be at least 1, got {value}")
    pattern = specialize(load_pattern(args.pattern), args.heads, args.kv_heads, args.head_dim)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SpattnError(f"-o {out}: exists and is not a folder")
    module = compile_module(pattern, out)
    heads = pattern.required_heads() or 8
    plan = build_plan(pattern, args.seq_len, heads, pattern.kv_heads, pattern.head_dim or 64)
    plan_path = out / f"{module_name(pattern)}.plan.json"
    write_atomically(plan_path, plan.to_json())
    took = time.perf_counter() - start
    size = module.stat().st_size
    print(f"wrote {module} ({size:,} bytes, pattern hash {pattern.content_hash()})")
    tiles = plan.tile_count()
    print(f"wrote {plan_path} (N={args.seq_len:,}, H={heads}: density {plan.density:.4f}, "
          f"{plan.flops() / 1e9:.1f} useful GFLOP forward, {tiles:,} tiles of "
          f"{plan.block_m}x{plan.block_n})")
    print(f"compiled in {took * 1e3:.0f} ms; use it with: "
          f"import sys; sys.path.insert(0, '{out}'); from {module.stem} import attention")
    return 0
