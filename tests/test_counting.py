"""Analytic pair counts (spattn/patterns/counting.py) against masks materialized by brute force."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from work_meter import metered

from spattn.patterns.counting import (
    brute_force_pairs,
    count_pairs,
    dense_pairs,
    density,
    speedup_bound,
    useful_flops,
)
from spattn.patterns.geometry import resolve
from spattn.patterns.loader import load_pattern, load_pattern_text
from spattn.patterns.spec import Pattern

KINDS = ("dilated", "dilated", "dilated", "window", "global", "dense")
ALL_KINDS = (*KINDS, "strided", "random", "random")  # with docs/branches.md's
RANDOM_HEAVY = ("random", "random", "random", "dilated", "window", "global", "strided")


@st.composite
def patterns(draw: st.DrawFn, max_size: int = 24, kinds: tuple[str, ...] = KINDS
             ) -> tuple[Pattern, int, int]:
    """A random small pattern, a sequence length and a head count that fits it.

    Sizes run past N on purpose (w > N, windows wider than N, global tokens at or past N), and
    segments are rarely multiples of their dilation. Branch kinds are drawn from `kinds`;
    strided and random ones (ALL_KINDS) have strides of 1 and past N, random blocks past N (or
    not dividing it) and more blocks drawn than there are.
    """
    heads = draw(st.integers(1, 4))
    size = st.integers(1, max_size + 6)
    branches = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(kinds))
        if kind == "strided":
            branch = {"strided": {"stride": draw(st.integers(1, 4) | size)}}
        elif kind == "random":
            seed = draw(st.integers(0, 3) | st.integers(0, 2**63 - 1))
            branch = {"random": {"block": draw(st.integers(1, 4) | size),
                                 "blocks": draw(st.integers(1, 6)), "seed": seed}}
        elif kind == "dilated":
            dilation = draw(st.integers(1, 5))
            branch = {"segment": draw(size), "dilation": dilation}
            if draw(st.booleans()) and draw(st.booleans()):  # explicit offsets, now and then
                branch["offsets"] = draw(st.lists(st.integers(0, dilation - 1),
                                                  min_size=heads, max_size=heads))
        elif kind == "window":
            branch = {"window": {"size": draw(size)}}
        elif kind == "global":
            branch = {"global": {"tokens": draw(st.lists(st.integers(0, max_size + 4),
                                                         min_size=1, max_size=4))}}
        else:
            branch = {"dense": {}}
        if draw(st.integers(0, 3)) == 0:  # a branch for some heads only, now and then
            branch["heads"] = draw(st.lists(st.integers(0, heads - 1), min_size=1,
                                            max_size=heads, unique=True))
        branches.append(branch)
    data = {
        "name": "random",
        "causal": draw(st.booleans()),
        "overlap": draw(st.sampled_from(["multiset", "union"])),
        "head_offsets": draw(st.sampled_from(["paper", "blocked"])),
        "branches": branches,
    }
    if draw(st.booleans()):
        data["heads"] = heads
    if draw(st.integers(0, 5)) == 0:  # the geometric shorthand instead of a branch list
        del data["branches"]
        data["schedule"] = {"geometric": {"segment": draw(st.integers(1, 8)),
                                          "dilation": draw(st.integers(1, 3)),
                                          "ratio": draw(st.integers(2, 3)),
                                          "count": draw(st.integers(1, 3))}}
    pattern = Pattern.model_validate(data)
    return pattern, draw(st.integers(1, max_size)), pattern.required_heads() or heads


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patterns())
def test_counts_match_brute_force(case: tuple[Pattern, int, int]) -> None:
    pattern, n, heads = case
    assert count_pairs(pattern, n, heads) == brute_force_pairs(pattern, n, heads)


@settings(max_examples=40, deadline=None)
@given(patterns(max_size=90))
def test_counts_match_brute_force_longer(case: tuple[Pattern, int, int]) -> None:
    pattern, n, heads = case
    assert count_pairs(pattern, n, heads) == brute_force_pairs(pattern, n, heads)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patterns(kinds=ALL_KINDS))
def test_strided_and_random_counts_match_brute_force(case: tuple[Pattern, int, int]) -> None:
    pattern, n, heads = case
    assert count_pairs(pattern, n, heads) == brute_force_pairs(pattern, n, heads)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patterns(max_size=40, kinds=RANDOM_HEAVY))
def test_unions_of_random_blocks_match_brute_force(case: tuple[Pattern, int, int]) -> None:
    # several random branches overlap (their runs are merged) beside the other kinds
    pattern, n, heads = case
    pattern = pattern.model_copy(update={"overlap": "union"})
    assert count_pairs(pattern, n, heads) == brute_force_pairs(pattern, n, heads)


@settings(max_examples=40, deadline=None)
@given(patterns(max_size=90, kinds=ALL_KINDS))
def test_strided_and_random_counts_match_brute_force_longer(case: tuple[Pattern, int, int]
                                                            ) -> None:
    pattern, n, heads = case
    assert count_pairs(pattern, n, heads) == brute_force_pairs(pattern, n, heads)


@pytest.mark.parametrize("overlap", ["multiset", "union"])
@pytest.mark.parametrize("name", ["longnet-lm", "longvit", "sink-window", "longnet-geometric",
                                  "sliding-window", "dense-causal", "bigbird",
                                  "sparse-transformer-strided"])
def test_builtins_match_brute_force(name: str, overlap: str) -> None:
    pattern = load_pattern(name).model_copy(update={"overlap": overlap})
    for n in (1, 37, 130):
        assert count_pairs(pattern, n, 3) == brute_force_pairs(pattern, n, 3)


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_past_its_window_matches_brute_force(causal: bool) -> None:
    # At N = 700 most random blocks lie outside the window and the global rows: the union
    # counts whole tiles there, and row by row near the window.
    pattern = load_pattern("bigbird").model_copy(update={"causal": causal})
    counts = count_pairs(pattern, 700, 2)
    assert counts == brute_force_pairs(pattern, 700, 2)
    assert counts.total < sum(counts.branches)


def test_hand_counted_dilated() -> None:
    # w=4, r=2, N=10: segments [0,4) [4,8) [8,10); each head keeps 2, 2, 1 rows.
    text = "name: t\nbranches:\n  - {segment: 4, dilation: 2}\n"
    assert count_pairs(load_pattern_text(text), 10, 2).total == 2 * (4 + 4 + 1)
    causal = load_pattern_text("causal: true\n" + text)
    assert count_pairs(causal, 10, 2).total == 2 * (3 + 3 + 1)
    # offset 1 in a segment of length 1 keeps nothing: N=9 has a last segment [8, 9).
    assert count_pairs(load_pattern_text(text), 9, 2).total == (4 + 4 + 1) + (4 + 4 + 0)


def test_hand_counted_window_and_global() -> None:
    window = load_pattern_text("name: w\ncausal: true\nbranches:\n  - window: {size: 3}\n")
    assert count_pairs(window, 5, 1).total == 1 + 2 + 3 + 3 + 3
    sinks = load_pattern_text("name: g\nbranches:\n  - global: {tokens: [0, 2, 9]}\n")
    assert count_pairs(sinks, 5, 1).total == 2 * 2 * 5 - 4  # token 9 is past N


def test_hand_counted_strided() -> None:
    # L = 3, N = 10: residue classes {0, 3, 6, 9}, {1, 4, 7}, {2, 5, 8}.
    text = "name: s\nbranches:\n  - strided: {stride: 3}\n"
    assert count_pairs(load_pattern_text(text), 10, 2).total == 2 * (16 + 9 + 9)
    assert count_pairs(load_pattern_text("causal: true\n" + text), 10, 2).total == 2 * (10 + 6 + 6)
    # a stride of 1 is dense attention; one of N or more, the diagonal
    assert count_pairs(load_pattern_text(text.replace("3", "1")), 10, 1).total == 100
    assert count_pairs(load_pattern_text(text.replace("3", "10")), 10, 1).total == 10
    # with a window of 3 beside it (union): the classes add their pairs 3 or more apart
    window = "name: s\noverlap: union\nbranches:\n  - window: {size: 3}\n  - strided: {stride: 3}\n"
    assert count_pairs(load_pattern_text(window), 10, 1).total == (10 + 2 * 17) + 2 * (6 + 3 + 3)


def test_hand_counted_random() -> None:
    # Blocks of 4 at N = 10: 3 query blocks of 4, 4 and 2 rows; with 3 (or more) blocks drawn,
    # every query block sees every candidate: dense attention, or causal dense attention.
    text = "name: r\nbranches:\n  - random: {block: 4, blocks: 3, seed: 7}\n"
    assert count_pairs(load_pattern_text(text), 10, 2).total == 2 * 100
    assert count_pairs(load_pattern_text("causal: true\n" + text), 10, 2).total == 2 * 55
    # one block drawn: each query block sees one whole key block (the last has 2 tokens)
    one = load_pattern_text(text.replace("blocks: 3", "blocks: 1"))
    table = resolve(one, 10, 2)[0].table()
    rows = [4, 4, 2]
    assert count_pairs(one, 10, 2).total == sum(rows[i] * rows[int(table[h, i, 0])]
                                                for h in range(2) for i in range(3))


def test_costs() -> None:
    assert dense_pairs(4, 2, causal=False) == 32
    assert dense_pairs(4, 2, causal=True) == 20
    assert useful_flops(10, head_dim=64, batch=2) == 4 * 64 * 2 * 10
    assert density(16, 4, 2, causal=False) == 0.5
    assert speedup_bound(16, 4, 2, causal=False) == 2.0
    assert speedup_bound(0, 4, 2, causal=False) == float("inf")


def test_paper_cost_formula() -> None:
    # Non-causal, w | N and r | w: exactly H * N * w / r^2 pairs per branch (eqs. 16-17).
    pattern = load_pattern("longvit")
    n, heads = 2**20, 16
    counts = count_pairs(pattern, n, heads)
    for branch, pairs in zip(pattern.expanded_branches(), counts.branches, strict=True):
        assert pairs == heads * n * branch.segment // branch.dilation**2


def test_million_tokens_is_bounded() -> None:
    for overlap in ("multiset", "union"):
        for name in ("longnet-lm", "sink-window", "bigbird", "sparse-transformer-strided"):
            pattern = load_pattern(name).model_copy(update={"overlap": overlap})
            with metered() as meter:
                counts = count_pairs(pattern, 1_000_000, 8)
            # closed forms and cells, not masks: about 1e6 elements at most (bigbird's union)
            assert meter.declared < 4 * 10**6 and meter.cells <= 2**17, (name, meter)
            assert meter.draws <= 8 and meter.peak_mb < 64, (name, meter)
            assert 0 < counts.total <= sum(counts.branches)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patterns(kinds=ALL_KINDS), st.integers(0, 2**32 - 1))
def test_add_counts_stacks_dilated_branches_exactly(case: tuple[Pattern, int, int],
                                                    seed: int) -> None:
    """add_counts evaluates the dilated branches of a small call together: the same counts as
    each branch's own per-head predicate, on a whole (N, N) grid and on a few queries against
    scattered kept keys (decoding), branches for some heads included."""
    import torch

    from spattn.patterns import geometry

    pattern, n, heads = case
    branches = resolve(pattern, n, heads)
    gen = torch.Generator().manual_seed(seed)
    pos = torch.arange(n)
    kept = torch.randperm(n, generator=gen)[:max(1, n // 2)].sort().values
    for qpos, kpos in ((pos[:, None], pos[None, :]), (pos[-2:, None], kept[None, :])):
        shape = torch.broadcast_shapes(qpos.shape, kpos.shape)
        want = torch.zeros((heads, *shape))
        for g in branches:
            want += torch.stack([g.allows(h, qpos, kpos).expand(shape) for h in range(heads)])
        got = geometry.add_counts(torch.zeros((heads, *shape)), branches, heads, qpos, kpos)
        assert torch.equal(got, want)
        dilated = tuple(g for g in branches if isinstance(g, geometry.Dilated))
        if dilated:  # the stacked evaluation itself, whatever the size limit decides
            alone = sum(g.allows_heads(heads, qpos, kpos).long() for g in dilated)
            assert torch.equal(geometry._dilated_counts(dilated, heads, qpos, kpos), alone)
