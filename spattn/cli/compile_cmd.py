"""`spattn compile PATTERN -o DIR`: write the generated Triton module and its plan."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from spattn.cli.args import positive
from spattn.compiler.codegen import module_name, read_header, render, specialize
from spattn.compiler.files import write_atomically
from spattn.compiler.names import check_module_name
from spattn.compiler.plan import build_plan
from spattn.errors import SpattnError
from spattn.limits import WorkLimitError
from spattn.patterns.loader import load_pattern
from spattn.patterns.spec import Pattern

PLAN_SEQ_LEN = 32768


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compile", help="emit a Python module of Triton kernels for a pattern",
        description="Write DIR/<name>.py (Triton kernels + launcher; `from <name> import "
                    "attention`) and DIR/<name>.plan.json (tiles, density, FLOPs at --seq-len).")
    p.add_argument("pattern", metavar="PATTERN", help="built-in name or YAML file")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--module", metavar="NAME",
                   help="module name (default: the pattern's name, with - as _)")
    p.add_argument("--heads", type=positive, metavar="H", help="fix the number of query heads")
    p.add_argument("--kv-heads", type=positive, metavar="HKV",
                   help="fix the number of k/v heads")
    p.add_argument("--head-dim", type=positive, metavar="D", help="fix the head dimension")
    p.add_argument("--seq-len", type=positive, default=PLAN_SEQ_LEN, metavar="N",
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
    name = check_module_name(args.module or module_name(pattern), out)
    module, plan_path = out / f"{name}.py", out / f"{name}.plan.json"
    _refuse_other_pattern(module, plan_path, pattern)
    heads = pattern.required_heads() or max(8, pattern.min_heads())
    try:
        plan = build_plan(pattern, args.seq_len, heads, pattern.kv_heads, pattern.head_dim or 64)
    except WorkLimitError as error:
        raise SpattnError(f"{error}; give the plan file a smaller --seq-len (the module itself "
                          f"takes any N)") from None
    _write(out, {module: render(pattern, name), plan_path: plan.to_json()})
    took = time.perf_counter() - start
    size = module.stat().st_size
    print(f"wrote {module} ({size:,} bytes, pattern hash {pattern.content_hash()})")
    tiles = plan.tile_count()
    print(f"wrote {plan_path} (N={args.seq_len:,}, H={heads}: density {plan.density:.4f}, "
          f"{plan.flops() / 1e9:.1f} useful GFLOP forward, {tiles:,} tiles of "
          f"{plan.block_m}x{plan.block_n})")
    print(f"compiled in {took * 1e3:.0f} ms; use it with: "
          f"import sys; sys.path.insert(0, {str(out.resolve())!r}); from {name} import attention")
    return 0


def _refuse_other_pattern(module: Path, plan_path: Path, pattern: Pattern) -> None:
    """Recompiling a pattern overwrites its files; another pattern's (a-b then a_b share a
    module name) or a file spattn did not write is refused."""
    if module.exists():
        header = read_header(module)
        if header is None:
            raise SpattnError(f"{module} exists and is not a spattn module; refusing to "
                              f"overwrite it (choose --module NAME or another -o folder)")
        _same_pattern(module, header["pattern"], pattern)
    if plan_path.exists():
        try:
            owner = json.loads(plan_path.read_text(encoding="utf-8")).get("pattern")
        except (OSError, ValueError, AttributeError):
            owner = None
        if not isinstance(owner, str):
            raise SpattnError(f"{plan_path} exists and is not a spattn plan; refusing to "
                              f"overwrite it (choose --module NAME or another -o folder)")
        _same_pattern(plan_path, owner, pattern)


def _same_pattern(path: Path, owner: str, pattern: Pattern) -> None:
    if owner != pattern.name:
        raise SpattnError(f"{path} holds pattern '{owner}', not '{pattern.name}'; refusing to "
                          f"overwrite it (choose --module NAME or another -o folder)")


def _write(out: Path, files: dict[Path, str]) -> None:
    """Write every file atomically, or none: on an OSError (read-only folder, disk full) remove
    what this call wrote and the folders it made, and raise one SpattnError."""
    made = [p for p in (out, *out.parents) if not p.exists()]
    written, path = [], out
    try:
        for path, text in files.items():
            existed = path.exists()
            write_atomically(path, text)
            if not existed:
                written.append(path)
    except OSError as error:
        for path in written:
            path.unlink(missing_ok=True)
        for folder in made:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break
        where = error.filename or path
        raise SpattnError(f"cannot write {where}: {error.strerror or error}") from None
