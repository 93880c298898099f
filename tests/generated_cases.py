"""Shared cases for the generated-kernel tests: inputs, built-ins scaled down, random patterns."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

import spattn


def inputs(batch, heads, kv_heads, n, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, n, dim, generator=gen),
            torch.randn(batch, kv_heads, n, dim, generator=gen),
            torch.randn(batch, kv_heads, n, dim, generator=gen))


def scaled(name: str, factor: int) -> spattn.Pattern:
    """A built-in with every segment and window divided by `factor` (global tokens kept)."""
    data = spattn.load_pattern(name).model_dump(by_alias=True, exclude_none=True)
    if "schedule" in data:
        data["schedule"]["geometric"]["segment"] //= factor
    for branch in data.get("branches", []):
        if "segment" in branch:
            branch["segment"] = max(1, branch["segment"] // factor)
        if "window" in branch:
            branch["window"]["size"] = max(1, branch["window"]["size"] // factor)
    data["name"] = f"{data['name']}-small"
    return spattn.Pattern.model_validate(data)



@st.composite
def generated_patterns(draw, max_n: int = 90):
    heads = draw(st.sampled_from([1, 2, 4]))
    kv_heads = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0]))
    n = draw(st.integers(1, max_n))
    branches = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["dilated", "dilated", "window", "global", "dense"]))
        if kind == "dilated":
            r = draw(st.integers(1, 5))
            branch = {"segment": draw(st.integers(1, 100)), "dilation": r}
            if draw(st.booleans()):
                branch["offsets"] = draw(st.lists(st.integers(0, r - 1), min_size=heads,
                                                  max_size=heads))
            branches.append(branch)
        elif kind == "window":
            branches.append({"window": {"size": draw(st.integers(1, 40))}})
        elif kind == "global":
            branches.append({"global": {"tokens": draw(st.lists(st.integers(0, 95), min_size=1,
                                                                max_size=3))}})
        else:
            branches.append({"dense": {}})
    spec = {"name": "random", "causal": draw(st.booleans()), "branches": branches,
            "head_offsets": draw(st.sampled_from(["paper", "blocked"]))}
    dim = draw(st.sampled_from([16, 32, 64]))
    return spattn.Pattern.model_validate(spec), (draw(st.integers(1, 2)), heads, kv_heads, n, dim)
