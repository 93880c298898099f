"""Render a pattern into a Python module of Triton kernels, and write it atomically.

The kernels live in templates/kernels.py.jinja; templates/module.py.jinja prints the launcher,
one launch per branch, with what the pattern fixes (segment, dilation, causal, head_dim) as
constexprs. Same pattern and versions in, byte-identical module out.
"""

from __future__ import annotations

import os
import re
import tempfile
from importlib import resources
from pathlib import Path

import jinja2
import triton
from pydantic import ValidationError

import spattn
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


def module_name(pattern: Pattern) -> str:
    """A valid Python module name from the pattern's name: longnet-lm -> longnet_lm."""
    name = re.sub(r"\W", "_", pattern.name)
    return name if name[0].isalpha() else f"p_{name}"


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


def _branch(branch: object) -> dict:
    if isinstance(branch, DilatedBranch):
        return {"kind": "dilated", "segment": branch.segment, "dilation": branch.dilation,
                "offsets": list(branch.offsets) if branch.offsets else None}
    if isinstance(branch, WindowBranch):
        return {"kind": "window", "size": branch.window.size}
    if isinstance(branch, GlobalBranch):
        return {"kind": "global", "tokens": sorted(set(branch.global_.tokens))}
    if isinstance(branch, StridedBranch):
        return {"kind": "strided", "stride": branch.strided.stride}
    if isinstance(branch, RandomBranch):
        spec = branch.random
        return {"kind": "random", "block": spec.block, "blocks": spec.blocks, "seed": spec.seed}
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
        "offsets_heads": pattern.required_heads(),
        "branches": [_branch(b) for b in pattern.expanded_branches()],
    }


def _template(name: str) -> jinja2.Template:
    text = resources.files("spattn.compiler").joinpath("templates", name).read_text()
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    return env.from_string(text)


def _random_table_shape(branches: list[dict]) -> dict[str, int]:
    """How the union hook indexes the random branches' stacked draw tables (rows per head are
    ceil(N / smallest block), draws per row the most any branch makes)."""
    random = [b for b in branches if b["kind"] == "random"]
    return {"random_min_block": min((b["block"] for b in random), default=1),
            "random_max_draws": max((b["blocks"] for b in random), default=1)}


def render(pattern: Pattern) -> str:
    """The module's source text."""
    literal = pattern_literal(pattern)
    return _template("module.py.jinja").render(
        name=pattern.name, module=module_name(pattern), pattern_hash=literal["hash"],
        spattn_version=spattn.__version__, triton_version=triton.__version__,
        pattern_literal=repr(literal),
        kernels=_template("kernels.py.jinja").render(branches=literal["branches"],
                                                     **_random_table_shape(literal["branches"])),
        softmax_scale=pattern.softmax_scale, head_dim=pattern.head_dim, causal=pattern.causal,
        head_offsets=pattern.head_offsets, branches=literal["branches"],
        union=pattern.overlap == "union")


def write_atomically(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def compile_module(pattern: Pattern, out_dir: str | os.PathLike[str]) -> Path:
    """Render `pattern` and write DIR/<name>.py atomically; returns the path."""
    path = Path(out_dir) / f"{module_name(pattern)}.py"
    write_atomically(path, render(pattern))
    return path
