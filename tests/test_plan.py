"""The plan (spattn/compiler/plan.py): tiles and pairs against masks materialized by brute force."""

from __future__ import annotations

import json
import tracemalloc

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_counting import patterns

from spattn.compiler.plan import (
    DilatedPlan,
    GlobalPlan,
    Plan,
    RandomPlan,
    StridedPlan,
    build_plan,
)
from spattn.compiler.tiles import Band, BlockPairs, TokenTiles
from spattn.errors import SpattnError
from spattn.patterns.counting import branch_mask, branch_pairs, count_pairs, useful_flops
from spattn.patterns.geometry import resolve
from spattn.patterns.loader import load_pattern, load_pattern_text
from spattn.patterns.spec import Pattern

BLOCKS = st.sampled_from([1, 2, 3, 4, 5, 8, 16])


def new_branch(max_size: int) -> st.SearchStrategy[dict]:
    """A strided or random branch; strides and blocks run past N, and blocks past their count."""
    size = st.integers(1, max_size + 6)
    return st.one_of(
        st.builds(lambda stride: {"strided": {"stride": stride}}, size),
        st.builds(lambda b, c, s: {"random": {"block": b, "blocks": c, "seed": s}},
                  size, st.integers(1, 6), st.integers(0, 3) | st.integers(0, 2**63 - 1)))


@st.composite
def with_new_kinds(draw: st.DrawFn, max_size: int = 24) -> tuple[Pattern, int, int]:
    """A pattern of `patterns`, with one or two strided or random branches put among (or in
    place of) its branches."""
    pattern, n, heads = draw(patterns(max_size=max_size))
    data = pattern.model_dump(by_alias=True, exclude_none=True)
    data.pop("schedule", None)
    branches = [] if draw(st.booleans()) else [
        b.model_dump(by_alias=True, exclude_none=True) for b in pattern.expanded_branches()]
    for extra in draw(st.lists(new_branch(max_size), min_size=1, max_size=2)):
        branches.insert(draw(st.integers(0, len(branches))), extra)
    return Pattern.model_validate({**data, "branches": branches}), n, heads


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
        pairs = 0
        for head in range(heads):
            mask = branch_mask(g, head, n, pattern.causal)
            pairs += int(mask.sum())
            if isinstance(branch, DilatedPlan | StridedPlan):
                check_rows(branch, head, n, mask, plan.block_m, plan.block_n)
            elif isinstance(branch, RandomPlan):
                check_block_pairs(branch.tiles, head, mask)
            elif branch.on_heads is not None and head not in branch.on_heads:
                assert not mask.any()  # a branch for other heads
            else:
                assert listed(branch.tiles) == brute_tiles(mask, plan.block_m, plan.block_n)
        assert branch.pairs == pairs


def check_rows(branch: DilatedPlan | StridedPlan, head: int, n: int, mask: torch.Tensor,
               block_m: int, block_n: int) -> None:
    """The dilated (or residue-class) problems of one head against its mask."""
    mine = [grp for grp in branch.groups if head in grp.heads]
    if branch.on_heads is not None and head not in branch.on_heads:
        assert not mine and not mask.any()  # a branch for other heads: no problem, no pair
        return
    (group,) = mine
    s, r = group.offset, branch.dilation
    covered = torch.zeros_like(mask)
    for run in group.runs:
        tiles = listed(run.tiles)
        for c in range(run.count):
            a = run.start + c * run.length
            end = n if isinstance(branch, StridedPlan) else a + run.length
            pos = torch.arange(a + s, end, r)  # the dilated rows, or the residue class
            assert len(pos) == run.rows
            sub = mask[pos][:, pos]
            assert tiles == brute_tiles(sub, block_m, block_n)
            covered[pos[:, None], pos[None, :]] |= sub
    assert torch.equal(covered, mask)  # no allowed pair outside the problems


def check_block_pairs(tiles: BlockPairs, head: int, mask: torch.Tensor) -> None:
    """Each drawn block pair's tiles against the mask inside the sequence: the rows and columns
    its tile grid spans (past the blocks, up to N), with the pairs of other blocks masked out."""
    n, b, bm, bn = tiles.extent, tiles.block, tiles.block_m, tiles.block_n
    got = tiles.tiles()
    assert len(got.rows) == tiles.count() == tiles.count("full") + tiles.count("partial")
    assert int(got.full.sum()) == tiles.count("full")
    mine = got.heads == head
    found = set(zip(got.qblocks[mine].tolist(), got.kblocks[mine].tolist(),
                    got.rows[mine].tolist(), got.cols[mine].tolist(), got.full[mine].tolist(),
                    strict=True))
    assert len(found) == int(mine.sum())
    expected, covered = set(), torch.zeros_like(mask)
    for i, j in ((i, j) for i, row in enumerate(tiles.table[head].tolist()) for j in row if j >= 0):
        rows = torch.arange(i * b, min(i * b + -(-min(b, n - i * b) // bm) * bm, n))
        cols = torch.arange(j * b, min(j * b + -(-min(b, n - j * b) // bn) * bn, n))
        inside = (rows // b == i)[:, None] & (cols // b == j)[None, :]
        sub = mask[rows][:, cols] & inside
        expected |= {(i, j, u, v, full) for u, v, full in brute_tiles(sub, bm, bn)}
        covered[rows[:, None], cols[None, :]] |= sub
    assert found == expected
    assert torch.equal(covered, mask)


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


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(with_new_kinds(max_size=40), BLOCKS, BLOCKS)
def test_plan_with_strided_and_random_matches_brute_force(case: tuple[Pattern, int, int],
                                                          block_m: int, block_n: int) -> None:
    check_plan(*case, block_m, block_n)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(with_new_kinds(max_size=130), st.sampled_from([4, 8, 16, 32]),
       st.sampled_from([4, 8, 16, 32]))
def test_plan_with_strided_and_random_longer(case: tuple[Pattern, int, int], block_m: int,
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


def test_strided_classes_by_hand() -> None:
    # L = 3, N = 10: class 0 holds tokens 0, 3, 6, 9; classes 1 and 2 hold three tokens each.
    pattern = load_pattern_text("name: s\ncausal: true\nbranches:\n  - strided: {stride: 3}\n")
    (branch,) = build_plan(pattern, 10, 2, block_m=2, block_n=2).branches
    assert isinstance(branch, StridedPlan) and branch.dilation == 3
    (group,) = branch.groups
    assert group.offset == 0 and group.heads == (0, 1)
    assert [(r.start, r.length, r.count, r.rows) for r in group.runs] == [(0, 1, 1, 4),
                                                                          (1, 1, 2, 3)]
    # Causal 2x2 tiles: (0,0) (1,0) (1,1) in each class; the diagonal ones are partial, except
    # the 1x1 corner of a 3-row class, whose one pair is allowed.
    assert branch.tile_count() == 2 * 3 * 3
    assert branch.tile_count("partial") == 2 * (2 + 2 * 1)
    assert branch.pairs == 2 * (10 + 2 * 6)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("branch", ["{segment: 12, dilation: 3}", "{window: {size: 5}}",
                                    "{global: {tokens: [3, 20]}}", "{strided: {stride: 4}}",
                                    "{random: {block: 6, blocks: 2, seed: 1}}", "{dense: {}}"])
def test_branch_for_some_heads_only(branch: str, causal: bool) -> None:
    """`heads: [0, 2]` of 4: those two heads' tiles and pairs, the others' none."""
    some = _one_branch(branch[:-1] + ", heads: [0, 2]}", causal, 45, heads=4)
    (one,), (two,) = _one_branch(branch, causal, 45, heads=4).branches, some.branches
    pattern = load_pattern_text(f"name: b\ncausal: {str(causal).lower()}\nbranches:\n"
                                f"  - {branch[:-1]}, heads: [0, 2]}}\n")
    check_plan(pattern, 45, 4, 4, 8)  # against the masks, by brute force
    assert two.on_heads == {0, 2} and some.summary()["branches"][0]["heads"] == [0, 2]
    if isinstance(one, DilatedPlan | StridedPlan):
        assert {h for g in two.groups for h in g.heads} == {0, 2}
    if isinstance(one, RandomPlan):  # draws differ per head; heads 1 and 3 draw nothing
        assert (two.tiles.table[[1, 3]] < 0).all()
        assert (two.tiles.table[[0, 2]] == one.tiles.table[[0, 2]]).all()
    elif not isinstance(one, DilatedPlan):  # the same tiles on every head: half of them
        assert 2 * two.tile_count() == one.tile_count() and 2 * two.pairs == one.pairs


def _one_branch(branch: str, causal: bool, n: int, heads: int = 3) -> Plan:
    text = f"name: b\ncausal: {str(causal).lower()}\nbranches:\n  - {branch}\n"
    return build_plan(load_pattern_text(text), n, heads, block_m=4, block_n=8)


def _same_tiles(plan: Plan, other: Plan) -> bool:
    return all(plan.tile_count(kind) == other.tile_count(kind) for kind in (None, "full",
                                                                             "partial"))


@pytest.mark.parametrize("causal", [True, False])
def test_stride_one_is_dense_and_stride_past_n_is_the_diagonal(causal: bool) -> None:
    one = _one_branch("strided: {stride: 1}", causal, 37)
    dense = _one_branch("dense: {}", causal, 37)
    assert _same_tiles(one, dense) and one.pairs == dense.pairs
    wide = _one_branch("strided: {stride: 50}", causal, 37).branches[0]
    assert [(r.start, r.count, r.rows) for r in wide.groups[0].runs] == [(0, 37, 1)]
    assert wide.tile_count() == wide.tile_count("full") == wide.pairs == 3 * 37


def test_random_tiles_cut_by_a_block_edge_are_partial() -> None:
    # N = 7 in blocks of 3 (3, 3 and 1 tokens), every block drawn: 9 problems per head. In 2x2
    # tiles a 3-token block's second row (or column) tile runs into the next block: partial.
    pattern = load_pattern_text("name: r\nbranches:\n  - random: {block: 3, blocks: 5, seed: 1}\n")
    (branch,) = build_plan(pattern, 7, 2, block_m=2, block_n=2).branches
    assert isinstance(branch, RandomPlan) and branch.tiles.table.shape == (2, 3, 5)
    assert branch.pairs == 2 * 7 * 7
    assert branch.tile_count() == 2 * 5 * 5 and branch.tile_count("full") == 2 * 3 * 3


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("branch", ["random: {block: 8, blocks: 7, seed: 3}",
                                    "random: {block: 64, blocks: 1, seed: 0}"],
                         ids=["blocks-past-their-count", "block-past-n"])
def test_random_drawing_every_block_tiles_like_dense(branch: str, causal: bool) -> None:
    # Every candidate is drawn, so this is dense (causal: its lower triangle); blocks of 8 line
    # up with 4x8 tiles, and a block past N is one block ending at N, so the tiles are dense's.
    random, dense = _one_branch(branch, causal, 50), _one_branch("dense: {}", causal, 50)
    assert _same_tiles(random, dense) and random.pairs == dense.pairs


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
    plan = build_plan(pattern, 1 << 20, 16, head_dim=128)
    tiles, pairs = plan.tile_count(), plan.pairs
    text = plan.to_json()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 100 * 2**20
    assert pairs == count_pairs(pattern, 1 << 20, 16).total
    # Every branch costs about the same: the last one, w=32768 r=12, keeps 2731 or 2730 rows.
    assert tiles == sum(b.tile_count() for b in plan.branches)
    assert json.loads(text)["tiles"]["total"] == tiles


@pytest.mark.parametrize("name", ["bigbird", "sparse-transformer-strided"])
def test_strided_and_random_million_tokens_are_fast(name: str) -> None:
    pattern, n = load_pattern(name), 1 << 20
    tracemalloc.start()
    plan = build_plan(pattern, n, 16, head_dim=64)
    tiles = [plan.tile_count(kind) for kind in (None, "full", "partial")]
    per_branch = [b.pairs for b in plan.branches]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 256 << 20
    assert tiles[0] == tiles[1] + tiles[2]
    assert per_branch == [branch_pairs(g, n, 16, pattern.causal) for g in resolve(pattern, n, 16)]
    last = plan.branches[-1]
    if isinstance(last, StridedPlan):  # 128 classes of 8192 rows: 128 x 129 / 2 tiles each
        assert last.tile_count() == 16 * 128 * (128 * 129 // 2)
    else:  # every drawn 64 x 64 block pair is one full 64 x 64 tile
        assert last.tile_count() == last.tile_count("full") == 16 * (n // 64) * 3


def test_to_json_strided_and_random() -> None:
    plan = build_plan(load_pattern("sparse-transformer-strided"), 300, 2)
    strided = json.loads(plan.to_json())["branches"][1]
    # 300 = 2 * 128 + 44: residues 0..43 hold 3 tokens, residues 44..127 hold 2.
    assert strided["kind"] == "strided" and strided["stride"] == 128
    assert strided["classes"] == [{"first": 0, "count": 44, "rows": 3, "tiles_per_class": 1},
                                  {"first": 44, "count": 84, "rows": 2, "tiles_per_class": 1}]
    assert strided["tiles"] == {"full": 0, "partial": 256, "total": 256}
    pattern = load_pattern("bigbird")
    data = json.loads(build_plan(pattern, 1000, 2).to_json())
    random = data["branches"][2]
    assert {k: random[k] for k in ("kind", "block", "blocks", "seed", "query_blocks")} == {
        "kind": "random", "block": 64, "blocks": 3, "seed": 0, "query_blocks": 16}
    assert random["block_pairs"] == 2 * 16 * 3  # 16 candidates: three drawn for each
    counts = count_pairs(pattern, 1000, 2)
    assert random["pairs"] == counts.branches[2] and data["pairs"] == counts.total


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
