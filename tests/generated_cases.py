"""Shared cases for the generated-kernel tests: inputs, built-ins scaled down, random patterns."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import spattn
from spattn.patterns.report import scale_pattern

# hypothesis settings for interpreter runs: slow examples, the same draws every run
INTERPRETED = settings(deadline=None, derandomize=True,
                       suppress_health_check=[HealthCheck.too_slow,
                                              HealthCheck.function_scoped_fixture])


def _odd(spec: dict, causal: bool) -> spattn.Pattern:
    return spattn.Pattern.model_validate({"name": "odd", "causal": causal, "branches": [spec]})


# name -> (pattern, (B, H, Hkv, N, D)): the sizes that break index arithmetic
ODD_SIZES = {
    f"{name}-{'causal' if causal else 'bidirectional'}": (_odd(spec, causal), shape)
    for name, spec, shape in [
        ("n1", {"segment": 8, "dilation": 1}, (1, 2, 2, 1, 16)),  # N = 1
        ("ragged", {"segment": 24, "dilation": 5}, (1, 5, 5, 61, 32)),  # N % w, w % r != 0
        ("w>n-gqa", {"segment": 500, "dilation": 3}, (2, 4, 2, 70, 64)),  # w > N, GQA
        ("w1", {"segment": 1, "dilation": 1}, (1, 1, 1, 20, 16)),  # one-row segments
    ]
    for causal in (True, False)
}


# the generated kernels run on the GPU when there is one, else on CPU under the interpreter
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def inputs(batch, heads, kv_heads, n, dim, seed=0, device=DEVICE):
    """Unit-normal q, k, v (float32), the same numbers on every device."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, n, dim, generator=gen).to(device),
            torch.randn(batch, kv_heads, n, dim, generator=gen).to(device),
            torch.randn(batch, kv_heads, n, dim, generator=gen).to(device))


def scaled(name: str, factor: int) -> spattn.Pattern:
    """A built-in with every segment and window divided by `factor` (global tokens kept)."""
    small = scale_pattern(spattn.load_pattern(name), factor)
    return small.model_copy(update={"name": f"{name}-small"})


@st.composite
def branch_specs(draw, heads: int, length: int, kinds: tuple[str, ...] = (
        "dilated", "dilated", "window", "global", "strided", "random", "dense")) -> dict:
    """One branch of any kind in `kinds`, its sizes drawn up to about `length` tokens, now and
    then for some of the `heads` only (`heads:`)."""
    branch = draw(_kind_specs(heads, length, kinds))
    if draw(st.integers(0, 3)) == 0:
        branch["heads"] = draw(st.lists(st.integers(0, heads - 1), min_size=1, max_size=heads,
                                        unique=True))
    return branch


@st.composite
def _kind_specs(draw, heads: int, length: int, kinds: tuple[str, ...]) -> dict:
    kind = draw(st.sampled_from(kinds))
    if kind == "dilated":
        r = draw(st.integers(1, 5))
        branch = {"segment": draw(st.integers(1, length)), "dilation": r}
        if draw(st.booleans()):
            branch["offsets"] = draw(st.lists(st.integers(0, r - 1), min_size=heads,
                                              max_size=heads))
        return branch
    if kind == "window":
        return {"window": {"size": draw(st.integers(1, max(1, length // 2)))}}
    if kind == "global":
        return {"global": {"tokens": draw(st.lists(st.integers(0, length), min_size=1,
                                                   max_size=3))}}
    if kind == "strided":  # (one program per residue class: long strides crawl when interpreted)
        return {"strided": {"stride": draw(st.integers(1, max(1, length // 6)))}}
    if kind == "random":  # blocks from 3 tokens: one-token blocks crawl under the interpreter
        return {"random": {"block": draw(st.integers(3, max(3, length // 3))),
                           "blocks": draw(st.integers(1, 4)), "seed": draw(st.integers(0, 9))}}
    return {"dense": {}}


@st.composite
def generated_patterns(draw, max_n: int = 90):
    heads = draw(st.sampled_from([1, 2, 4]))
    kv_heads = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0]))
    n = draw(st.integers(1, max_n))
    branches = draw(st.lists(branch_specs(heads, 100), min_size=1, max_size=3))
    spec = {"name": "random", "causal": draw(st.booleans()), "branches": branches,
            "head_offsets": draw(st.sampled_from(["paper", "blocked"])),
            "overlap": draw(st.sampled_from(["multiset", "union"]))}
    dim = draw(st.sampled_from([16, 24, 32, 40, 64]))  # 24, 40: tiles wider than the head
    return spattn.Pattern.model_validate(spec), (draw(st.integers(1, 2)), heads, kv_heads, n, dim)
