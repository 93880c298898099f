"""Render a pattern into a Python module of Triton kernels, and write it atomically.

The kernels live in templates/kernels.py.jinja: a branch's sizes are run-time arguments, so one
compiled kernel serves every branch of its kind, and the kernels are the same for every pattern
without union overlap (a union pattern's kernels print its branches into the pair predicate).
templates/module.py.jinja prints the pattern's branch table and a launcher that loops over it,
with what the pattern fixes for every branch (causal, overlap, head_dim) as constexprs. Same
pattern and versions in, byte-identical module out.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

import jinja2
import triton
from pydantic import ValidationError

import spattn
from spattn.compiler.files import read_regular, write_atomically
from spattn.compiler.names import module_name
from spattn.errors import SpattnError
from spattn.patterns.spec import (
    DenseBranch,
    DilatedBranch,
    GlobalBranch,
    Pattern,
    RandomBranch,
    StridedBranch,
    WindowBranch,
)
from spattn.runtime.generated import MAX_TOKENS

__all__ = ["compile_module", "emitter_key", "module_name", "read_header", "render", "specialize",
           "write_atomically"]

# Sizes become int32 kernel constants. Any size >= N acts as N (SEMANTICS: w' = min(w, N)), so
# sizes are capped here: exact for every N up to the cap (the launcher refuses longer inputs),
# and small enough that `position + size` never leaves int32.
SIZE_CAP = MAX_TOKENS


def specialize(pattern: Pattern, heads: int | None = None, kv_heads: int | None = None,
               head_dim: int | None = None) -> Pattern:
    """The pattern with H, Hkv, D fixed (validated again, so heads % kv_heads etc. are checked)."""
    data = pattern.model_dump(by_alias=True, exclude_none=True)
    for key, value in (("heads", heads), ("kv_heads", kv_heads), ("head_dim", head_dim)):
        if value is not None:
            data[key] = value
    try:
        return Pattern.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "pattern"
        message = first["msg"].removeprefix("Value error, ")
        raise SpattnError(f"pattern '{pattern.name}': {field}: {message}") from None


def _size(value: int) -> int:
    return min(value, SIZE_CAP)


def _branch(branch: object) -> dict:
    """A branch as the templates print it, with the query heads it applies to (None: all)."""
    heads = sorted(branch.heads) if branch.heads is not None else None
    return {**_kind(branch), "heads": heads}


def _kind(branch: object) -> dict:
    """A branch's kind and sizes. A dilation past the cap keeps its meaning: the head offsets it
    gives (h mod r, h // ceil(H / r)) are the same for r = 2^30 while H < 2^30."""
    if isinstance(branch, DilatedBranch):
        return {"kind": "dilated", "segment": _size(branch.segment),
                "dilation": _size(branch.dilation),
                "offsets": list(branch.offsets) if branch.offsets else None}
    if isinstance(branch, WindowBranch):
        return {"kind": "window", "size": _size(branch.window.size)}
    if isinstance(branch, GlobalBranch):
        return {"kind": "global", "tokens": sorted({t for t in branch.global_.tokens
                                                    if t < SIZE_CAP})}
    if isinstance(branch, StridedBranch):
        return {"kind": "strided", "stride": _size(branch.strided.stride)}
    if isinstance(branch, RandomBranch):
        spec = branch.random
        return {"kind": "random", "block": _size(spec.block), "blocks": spec.blocks,
                "seed": spec.seed}
    if isinstance(branch, DenseBranch):
        return {"kind": "dense"}
    raise TypeError(f"unknown branch {branch!r}")


def pattern_literal(pattern: Pattern) -> dict:
    """What the generated module needs to know about its pattern, as a plain dict."""
    return {
        "name": pattern.name, "hash": pattern.content_hash(), "causal": pattern.causal,
        "overlap": pattern.overlap, "head_offsets": pattern.head_offsets,
        "softmax_scale": pattern.softmax_scale, "heads": pattern.heads,
        "kv_heads": pattern.kv_heads, "head_dim": pattern.head_dim,
        "offsets_heads": pattern.required_heads(), "min_heads": pattern.min_heads(),
        "branches": [_branch(b) for b in pattern.expanded_branches()],
        # the pattern itself, for the runtime's PyTorch reach of non-finite inputs
        "spec": pattern.model_dump(mode="json", by_alias=True, exclude_none=True),
    }


def _template(name: str) -> jinja2.Template:
    text = resources.files("spattn.compiler").joinpath("templates", name).read_text()
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    return env.from_string(text)


@lru_cache(maxsize=1)
def emitter_key() -> str:
    """A hash of everything besides the pattern that shapes the emitted text: spattn, triton
    and jinja2 versions, the templates and this file. The compile cache is keyed by it."""
    digest = hashlib.sha256()
    for part in (spattn.__version__, triton.__version__, jinja2.__version__):
        digest.update(part.encode() + b"\0")
    templates = resources.files("spattn.compiler").joinpath("templates")
    for item in sorted(templates.iterdir(), key=lambda t: t.name):
        digest.update(item.name.encode() + b"\0" + item.read_bytes() + b"\0")
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:16]


def render(pattern: Pattern, module: str | None = None) -> str:
    """The module's source text; `module` is the import name its docstring shows."""
    literal = pattern_literal(pattern)
    return _template("module.py.jinja").render(
        name=pattern.name, module=module or module_name(pattern), pattern_hash=literal["hash"],
        spattn_version=spattn.__version__, triton_version=triton.__version__,
        emitter_key=emitter_key(),
        pattern_literal=repr(literal),
        kernels=_template("kernels.py.jinja").render(branches=literal["branches"],
                                                     union=pattern.overlap == "union"),
        softmax_scale=pattern.softmax_scale, head_dim=pattern.head_dim, causal=pattern.causal,
        kinds=list(dict.fromkeys(b["kind"] for b in literal["branches"])),
        union=pattern.overlap == "union")


def read_header(path: Path) -> dict[str, str] | None:
    """The `# spattn-KEY: VALUE` lines at the top of an emitted module ({"pattern": ...,
    "hash": ..., "version": ...}); None if `path` is not a readable spattn module."""
    header = {}
    try:  # a regular file only, its first 16 KiB: never a FIFO, device or link
        text = read_regular(path, 1 << 14, truncate=True).decode("utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines()[:40]:
        if line.startswith("# spattn-") and ": " in line:
            key, value = line[len("# spattn-"):].split(": ", 1)
            header[key] = value
    return header if "pattern" in header and "hash" in header else None


def compile_module(pattern: Pattern, out_dir: str | os.PathLike[str], name: str | None = None
                   ) -> Path:
    """Render `pattern` and write DIR/<name>.py atomically (name: the pattern's module name by
    default); returns the path."""
    name = name or module_name(pattern)
    path = Path(out_dir) / f"{name}.py"
    write_atomically(path, render(pattern, name))
    return path
