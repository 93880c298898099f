"""The plan (spattn/compiler/plan.py): tiles and pairs against masks materialized by brute force."""

from __future__ import annotations

import json
import time
import tracemalloc

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_counting import patterns

from spattn.compiler.plan import DilatedPlan, GlobalPlan, Plan, build_plan
from spattn.compiler.tiles import Band, TokenTiles
from spattn.errors import SpattnError
from spattn.patterns.counting import branch_mask, count_pairs, useful_flops
from spattn.patterns.geometry import resolve
from spattn.patterns.loader import load_pattern, load_pattern_text
from spattn.patterns.spec import Pattern

BLOCKS = st.sampled_from([1, 2, 3, 4, 5, 8, 16])


def brute_tiles(mask: torch.Tensor, block_m: int, block_n: int) -> set[tuple[int, int, bool]]:
    """(i, j, full) for every tile of `mask` holding an allowed pair; full: all pairs allowed."""
    rows, cols = mask.shape
    out = set()
    for i in range(0, rows, block_m):
        for j in range(0, cols, block_n):
            tile = mask[i:i + block_m, j:j + block_n]
            if tile.any():
                out.add((i // block_m, j // block_n, bool(tile.all())))
    return out


def listed(tiles: Band | TokenTiles) -> set[tuple[int, int, bool]]:
    rows, cols, full = tiles.tiles()
    out = set(zip(rows.tolist(), cols.tolist(), full.tolist(), strict=True))
    assert len(out) == len(rows)  # no tile listed twice
    assert tiles.count() == len(out)
    assert tiles.count("full") == sum(f for _, _, f in out)
    assert tiles.count("partial") == len(out) - tiles.count("full")
    return out


def check_against_masks(pattern: Pattern, n: int, heads: int, plan: Plan) -> None:
    """Every branch's listed tiles are exactly those of its mask, each pair in one tile."""
    for g, branch in zip(resolve(pattern, n, heads), plan.branches, strict=True):
        for head in range(heads):
            mask = branch_mask(g, head, n, pattern.causal)
            if not isinstance(branch, DilatedPlan):
                assert listed(branch.tiles) == brute_tiles(mask, plan.block_m, plan.block_n)
                continue
            (group,) = [grp for grp in branch.groups if head in grp.heads]
            s, r = group.offset, branch.dilation
            covered = torch.zeros_like(mask)
            for run in group.runs:
                tiles = listed(run.tiles)
                for c in range(run.count):
                    a = run.start + c * run.length
                    pos = torch.arange(a + s, a + run.length, r)  # the dilated rows
                    assert len(pos) == run.rows
                    sub = mask[pos][:, pos]
                    assert tiles == brute_tiles(sub, plan.block_m, plan.block_n)
                    covered[pos[:, None], pos[None, :]] |= sub
            assert torch.equal(covered, mask)  # no allowed pair outside the segments' problems


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patterns(max_size=40), BLOCKS, BLOCKS)
def test_plan_matches_brute_force(case: tuple[Pattern, int, int], block_m: int,
                                  block_n: int) -> None:
    check_plan(*case, block_m, block_n)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patterns(max_size=150), st.sampled_from([4, 8, 16, 32]), st.sampled_from([4, 8, 16, 32]))
def test_plan_matches_brute_force_longer(case: tuple[Pattern, int, int], block_m: int,
                                         block_n: int) -> None:
    check_plan(*case, block_m, block_n)


def check_plan(pattern: Pattern, n: int, heads: int, block_m: int, block_n: int) -> None:
    plan = build_plan(pattern, n, heads, block_m=block_m, block_n=block_n)
    counts = count_pairs(pattern, n, heads)
    assert plan.pairs == counts.total
    assert tuple(b.pairs for b in plan.branches) == counts.branches
    assert plan.tile_count() == plan.tile_count("full") + plan.tile_count("partial")
    check_against_masks(pattern, n, heads, plan)


def test_dilated_segments_by_hand() -> None:
    # w=10, r=3, N=23: segments [0,10) [10,20) [20,23); offset 0 keeps 4, 4, 1 rows, offset 2
    # keeps 3, 3, 1, and offset 1 keeps 3, 3, 1.
    pattern = load_pattern_text("name: t\ncausal: true\nbranches:\n"
                                "  - {segment: 10, dilation: 3}\n")
    (branch,) = build_plan(pattern, 23, 3, block_m=2, block_n=2).branches
    assert branch.segment == 10 and branch.offsets == (0, 1, 2)
    runs = {g.offset: [(r.start, r.length, r.count, r.rows) for r in g.runs]
            for g in branch.groups}
    assert runs == {0: [(0, 10, 2, 4), (20, 3, 1, 1)], 1: [(0, 10, 2, 3), (20, 3, 1, 1)],
                    2: [(0, 10, 2, 3), (20, 3, 1, 1)]}
    # 4 rows in 2x2 tiles, causal: (0,0) (1,0) (1,1): 2 diagonal partial, 1 full.
    assert branch.groups[0].runs[0].tiles.count("partial") == 2
    assert branch.groups[0].runs[0].tiles.count("full") == 1


def test_segment_longer_than_sequence() -> None:
    pattern = load_pattern_text("name: t\nbranches:\n  - {segment: 1000, dilation: 2}\n")
    (branch,) = build_plan(pattern, 300, 2).branches
    assert branch.segment == 1000  # w as written; the one segment is N long
    assert [(r.start, r.length, r.count, r.rows) for g in branch.groups for r in g.runs] == [
        (0, 300, 1, 150), (0, 300, 1, 150)]
    assert branch.tile_count() == 2 * 3 * 3 and branch.tile_count("partial") == 0


def test_global_and_window_tiles() -> None:
    sinks = load_pattern_text("name: s\ncausal: true\nbranches:\n"
                              "  - global: {tokens: [0, 1, 2, 3, 500]}\n  - window: {size: 4}\n")
    tokens, window = build_plan(sinks, 256, 1).branches
    assert isinstance(tokens, GlobalPlan) and tokens.tokens == (0, 1, 2, 3)
    assert tokens.tile_count() == 4 and tokens.tile_count("full") == 0  # column 0 and a row
    assert window.tile_count() == 4 + 3 and window.tile_count("partial") == 4 + 3


def test_n_equals_one() -> None:
    plan = build_plan(load_pattern("longnet-lm"), 1, 4, head_dim=16)
    # Token 0 is kept by the heads whose offset is 0: r = 1, 2, 4, 6, 12 -> 4 + 2 + 1 + 1 + 1.
    assert plan.pairs == 9 and plan.tile_count() == 9
    assert plan.tile_count("full") == 9  # a 1 x 1 problem: its one pair is allowed


def test_flops_and_density() -> None:
    plan = build_plan(load_pattern("longvit"), 4096, 4, head_dim=32)
    assert plan.flops() == useful_flops(plan.pairs, 32)
    assert plan.flops(head_dim=64, batch=3) == useful_flops(plan.pairs, 64, 3)
    assert plan.computed_flops() == useful_flops(plan.tile_count() * 64 * 64, 32)
    assert plan.density == plan.pairs / (4 * 4096 * 4096)
    with pytest.raises(SpattnError, match="head_dim"):
        build_plan(load_pattern("longvit"), 64, 4).flops()


def test_longnet_million_tokens_is_small_and_fast() -> None:
    pattern = load_pattern("longnet-lm")
    tracemalloc.start()
    started = time.perf_counter()
    plan = build_plan(pattern, 1 << 20, 16, head_dim=128)
    tiles, pairs = plan.tile_count(), plan.pairs
    text = plan.to_json()
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 1.0 and peak < 100 * 2**20
    assert pairs == count_pairs(pattern, 1 << 20, 16).total
    # Every branch costs about the same: the last one, w=32768 r=12, keeps 2731 or 2730 rows.
    assert tiles == sum(b.tile_count() for b in plan.branches)
    assert json.loads(text)["tiles"]["total"] == tiles


def test_to_json_is_deterministic() -> None:
    text = ("name: mix\ncausal: true\noverlap: union\nheads: 4\nhead_dim: 32\nbranches:\n"
            "  - {segment: 64, dilation: 2}\n  - window: {size: 16}\n"
            "  - global: {tokens: [0]}\n  - dense: {}\n")
    first = build_plan(load_pattern_text(text), 200, 4).to_json()
    again = build_plan(load_pattern_text("description: other words\n" + text), 200, 4).to_json()
    assert first == again
    data = json.loads(first)
    assert json.dumps(data, indent=2, sort_keys=True) + "\n" == first
    assert data["content_hash"] == load_pattern_text(text).content_hash()
    assert [b["kind"] for b in data["branches"]] == ["dilated", "window", "global", "dense"]
    assert data["pairs"] == count_pairs(load_pattern_text(text), 200, 4).total
    assert data["forward_flops"] == useful_flops(data["pairs"], 32)
    assert data["branches"][0]["groups"][1] == {
        "offset": 1, "heads": [1, 3],
        "runs": [{"start": 0, "length": 64, "count": 3, "rows": 32, "tiles_per_segment": 1},
                 {"start": 192, "length": 8, "count": 1, "rows": 4, "tiles_per_segment": 1}],
        "tiles": {"full": 0, "partial": 8, "total": 8}}


def test_plan_parameters() -> None:
    pattern = load_pattern_text("name: g\nheads: 8\nkv_heads: 2\nhead_dim: 64\nsoftmax_scale: 0.5"
                                "\nbranches:\n  - {segment: 32, dilation: 4}\n")
    plan = build_plan(pattern, 100, 8, block_m=32, block_n=16)
    assert (plan.pattern, plan.heads, plan.kv_heads, plan.head_dim) == ("g", 8, 2, 64)
    assert (plan.block_m, plan.block_n, plan.softmax_scale, plan.causal) == (32, 16, 0.5, False)
    assert plan.content_hash == pattern.content_hash()
    assert plan.branches[0].offsets == tuple(h % 4 for h in range(8))
    assert build_plan(load_pattern("longvit"), 100, 8).kv_heads == 8
    assert build_plan(load_pattern("longvit"), 100, 8, kv_heads=2).kv_heads == 2


@pytest.mark.parametrize("kwargs, fragment", [
    ({"heads": 4}, "heads"),
    ({"heads": 8, "kv_heads": 4}, "kv_heads"),
    ({"heads": 8, "head_dim": 32}, "head_dim"),
    ({"heads": 8, "block_m": 0}, "block_m"),
    ({"heads": 8, "seq_len": 0}, "seq_len"),
])
def test_plan_errors(kwargs: dict, fragment: str) -> None:
    pattern = load_pattern_text("name: g\nheads: 8\nkv_heads: 2\nhead_dim: 64\nbranches:\n"
                                "  - {segment: 32, dilation: 4}\n")
    kwargs = {"seq_len": 64, **kwargs}
    with pytest.raises(SpattnError, match=fragment):
        build_plan(pattern, **kwargs)


def test_plan_errors_without_fixed_sizes() -> None:
    with pytest.raises(SpattnError, match="kv_heads"):
        build_plan(load_pattern("longvit"), 64, 6, kv_heads=4)
    with pytest.raises(ValueError, match="kind"):
        build_plan(load_pattern("longvit"), 64, 6).tile_count("masked")
