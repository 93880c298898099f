"""`spattn compile PATTERN -o DIR`: write the generated Triton module and its plan.

Two compiles into one folder whose patterns share a module name (a-b and a_b) race: the check
that the files are absent or this pattern's and the writes happen under one lock per folder and
module name (DIR/.NAME.lock, removed after), so one wins and the other is refused, and the folder
never holds the module of one pattern beside the plan of another.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from spattn.cli.args import add_dtype, positive
from spattn.cli.check_cmd import HEAD_DIMS, TORCH_NAMES
from spattn.compiler.aot import TARGETS, warm
from spattn.compiler.codegen import module_name, render, specialize
from spattn.compiler.files import (
    NotRegularFileError,
    check_regular,
    locked,
    read_regular,
    write_atomically,
)
from spattn.compiler.names import check_module_name
from spattn.compiler.plan import build_plan
from spattn.errors import SpattnError
from spattn.limits import WorkLimitError
from spattn.patterns.loader import load_pattern
from spattn.patterns.spec import Pattern

PLAN_SEQ_LEN = 32768
LOCK_WAIT_S = 30.0  # the lock is held for a check and two writes: milliseconds
MAX_PLAN_BYTES = 64 << 20  # an existing plan read back to see whose it is
HEADER_BYTES = 16 << 10  # where an emitted module's header lines are


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
    p.add_argument("--warm", action="store_true",
                   help="also compile every kernel the module launches (forward, backward, "
                        "decode) into triton's cache, on all cores, so that the first call on "
                        "the GPU loads them")
    p.add_argument("--target", choices=tuple(TARGETS),
                   help="with --warm: the GPU architecture (default: this machine's GPU)")
    add_dtype(p, tuple(TORCH_NAMES), many=True, what="with --warm: input dtypes")
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
    text = render(pattern, name)
    _write(out, name, pattern, {module: text, plan_path: plan.to_json()})
    took = time.perf_counter() - start
    print(f"wrote {module} ({len(text.encode()):,} bytes, pattern hash {pattern.content_hash()})")
    tiles = plan.tile_count()
    print(f"wrote {plan_path} (N={args.seq_len:,}, H={heads}: density {plan.density:.4f}, "
          f"{plan.flops() / 1e9:.1f} useful GFLOP forward, {tiles:,} tiles of "
          f"{plan.block_m}x{plan.block_n})")
    print(f"compiled in {took * 1e3:.0f} ms; use it with: "
          f"import sys; sys.path.insert(0, {str(out.resolve())!r}); from {name} import attention")
    if args.warm:
        return _warm(pattern, module, args)
    return 0


def _warm(pattern: Pattern, module: Path, args: argparse.Namespace) -> int:
    """Compile the module's kernels into triton's cache; 1 if one failed."""
    target = args.target or _this_gpu()
    dtypes = [TORCH_NAMES[name] for name in dict.fromkeys(args.dtype or TORCH_NAMES)]
    head_dims = [pattern.head_dim] if pattern.head_dim else list(HEAD_DIMS)
    workers = os.cpu_count() or 1
    start = time.perf_counter()
    results = warm(pattern, module, target, dtypes, head_dims, workers)
    failed = [r for r in results if not r.ok]
    launches = sum(r.spec.launches for r in results)
    print(f"warmed {len(results) - len(failed)}/{len(results)} kernels ({launches} launches) "
          f"for {target} in {time.perf_counter() - start:.0f} s on {workers} processes")
    for result in failed[:3]:
        print(f"  {result.spec.kernel} {result.spec.mode} {result.spec.dtype} "
              f"D={result.spec.head_dim}: {result.error}")
    return 1 if failed else 0


def _this_gpu() -> str:
    import torch

    if not torch.cuda.is_available():
        raise SpattnError("--warm needs --target (sm_80, sm_90, sm_100) on a machine without "
                          "a GPU")
    major, minor = torch.cuda.get_device_capability()
    target = f"sm_{major * 10 + minor}"
    if target not in TARGETS:
        raise SpattnError(f"this GPU is {target}; --warm compiles for {', '.join(TARGETS)}: "
                          f"give --target")
    return target


def _refuse_other_pattern(module: Path, plan_path: Path, pattern: Pattern) -> None:
    """Recompiling a pattern overwrites its files; another pattern's (a-b then a_b share a
    module name), a file spattn did not write, or anything not a regular file is refused."""
    if _exists(module):
        owner = _module_owner(module)
        if owner is None:
            raise SpattnError(f"{module} exists and is not a spattn module; refusing to "
                              f"overwrite it (choose --module NAME or another -o folder)")
        _same_pattern(module, owner, pattern)
    if _exists(plan_path):
        try:
            owner = json.loads(read_regular(plan_path, MAX_PLAN_BYTES)).get("pattern")
        except (OSError, ValueError, AttributeError):
            owner = None
        if not isinstance(owner, str):
            raise SpattnError(f"{plan_path} exists and is not a spattn plan; refusing to "
                              f"overwrite it (choose --module NAME or another -o folder)")
        _same_pattern(plan_path, owner, pattern)


def _exists(path: Path) -> bool:
    """Whether `path` is there (a link is not followed); one that is not a regular file is
    refused: spattn never replaces a link, FIFO or device with its output."""
    try:
        return check_regular(path)
    except NotRegularFileError as error:
        raise SpattnError(f"{path} is {error.kind}, not a regular file; refusing to overwrite "
                          f"it (choose --module NAME or another -o folder)") from None


def _module_owner(path: Path) -> str | None:
    """The pattern named in the header of the spattn module at `path` (None if it is not one):
    the `# spattn-pattern:` and `# spattn-hash:` lines among its first 40."""
    try:
        head = read_regular(path, HEADER_BYTES, truncate=True).decode("utf-8", "replace")
    except OSError:
        return None
    header = dict(line[len("# spattn-"):].split(": ", 1) for line in head.splitlines()[:40]
                  if line.startswith("# spattn-") and ": " in line)
    return header.get("pattern") if "hash" in header else None


def _same_pattern(path: Path, owner: str, pattern: Pattern) -> None:
    if owner != pattern.name:
        raise SpattnError(f"{path} holds pattern '{owner}', not '{pattern.name}'; refusing to "
                          f"overwrite it (choose --module NAME or another -o folder)")


def _write(out: Path, name: str, pattern: Pattern, files: dict[Path, str]) -> None:
    """Under the lock of (`out`, `name`), check again that the files are absent or `pattern`'s,
    then write them all or none. On an error (read-only folder, disk full, a lock held too long,
    another pattern's files) remove the folders this call made and raise one SpattnError."""
    made = [p for p in (out, *out.parents) if not os.path.lexists(p)]
    try:
        out.mkdir(parents=True, exist_ok=True)
        with locked(out / f".{name}.lock", LOCK_WAIT_S, remove=True):
            _refuse_other_pattern(*files, pattern)
            _write_all(files)
    except (OSError, SpattnError) as error:
        for folder in made:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break
        if isinstance(error, SpattnError):
            raise
        raise SpattnError(f"cannot write {error.filename or out}: {error.strerror or error}"
                          ) from None


def _write_all(files: dict[Path, str]) -> None:
    """Write every file atomically, or none: on an OSError remove the files this call created
    (the error names the file being written)."""
    written = []
    for path, text in files.items():
        try:
            existed = check_regular(path)
            write_atomically(path, text)
        except OSError as error:
            for done in written:
                done.unlink(missing_ok=True)
            error.filename = error.filename or str(path)
            raise
        if not existed:
            written.append(path)
