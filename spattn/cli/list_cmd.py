"""`spattn list`: the built-in patterns, one aligned line each."""

from __future__ import annotations

import argparse
from typing import Any

from spattn.patterns.loader import builtin_patterns, load_pattern
from spattn.patterns.spec import (
    DenseBranch,
    DilatedBranch,
    GlobalBranch,
    Pattern,
    RandomBranch,
    StridedBranch,
    WindowBranch,
)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "list",
        help="list the built-in patterns",
        description="List the built-in patterns: name, causality, branches and description. "
                    "Any command that takes a pattern file also takes one of these names.",
    )
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    rows = []
    for builtin in builtin_patterns():
        pattern = load_pattern(builtin.path)
        causal = "causal" if pattern.causal else "non-causal"
        rows.append((builtin.name, causal, summarize(pattern), builtin.description))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)]
        print("  ".join([*cells, row[3]]).rstrip())
    return 0


def summarize(pattern: Pattern) -> str:
    """The branches in a few words, e.g. '5 dilated branches  w 2048..32768  r 1..12' or
    'window 128 + strided 128'."""
    branches = pattern.expanded_branches()
    dilated = [b for b in branches if isinstance(b, DilatedBranch)]
    parts = []
    if dilated:
        noun = "branch" if len(dilated) == 1 else "branches"
        parts.append(f"{len(dilated)} dilated {noun}  w {_span(b.segment for b in dilated)}  "
                     f"r {_span(b.dilation for b in dilated)}")
    for branch in branches:
        if isinstance(branch, WindowBranch):
            parts.append(f"window {branch.window.size}")
        elif isinstance(branch, GlobalBranch):
            count = len(set(branch.global_.tokens))
            parts.append(f"{count} global token{'s' if count > 1 else ''}")
        elif isinstance(branch, StridedBranch):
            parts.append(f"strided {branch.strided.stride}")
        elif isinstance(branch, RandomBranch):
            spec = branch.random
            parts.append(f"random {spec.blocks} block{'s' if spec.blocks > 1 else ''} "
                         f"of {spec.block}")
        elif isinstance(branch, DenseBranch):
            parts.append("dense")
    summary = " + ".join(parts)
    return f"{summary} (geometric)" if pattern.schedule is not None else summary


def _span(values: Any) -> str:
    values = list(values)
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}..{high}"
