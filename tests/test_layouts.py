"""Layout exports (spattn/compiler/layouts.py): FlexAttention against the float64 reference,
block layouts and block-sparse tile counts against masks materialized by brute force."""

from __future__ import annotations

import tracemalloc
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import reference_attention
from test_counting import patterns
from test_plan import with_new_kinds

from spattn.compiler.layouts import (
    block_sparse_counts,
    block_sparse_tiles,
    dense_layout,
    flex_mask_mod,
    overlaps,
    to_flex,
)
from spattn.errors import SpattnError
from spattn.patterns.counting import branch_mask
from spattn.patterns.geometry import resolve
from spattn.patterns.loader import load_pattern, load_pattern_text
from spattn.patterns.spec import Pattern


def blocks_of(mask: torch.Tensor, block: int) -> torch.Tensor:
    """(blocks, blocks) bool: the block holds an allowed pair."""
    n = mask.shape[-1]
    side = -(-n // block)
    padded = torch.zeros(side * block, side * block, dtype=torch.bool)
    padded[:n, :n] = mask
    return padded.view(side, block, side, block).any(3).any(1)


def brute_layout(pattern: Pattern, n: int, heads: int, block: int
                 ) -> tuple[torch.Tensor, list[int]]:
    """The union layout per head, and each branch's tile count summed over heads."""
    geometries = resolve(pattern, n, heads)
    per_branch, layout = [0] * len(geometries), []
    for head in range(heads):
        masks = [branch_mask(g, head, n, pattern.causal) for g in geometries]
        for i, mask in enumerate(masks):
            per_branch[i] += int(blocks_of(mask, block).sum())
        layout.append(blocks_of(torch.stack(masks).any(0), block).long())
    return torch.stack(layout), per_branch


def union_mask(pattern: Pattern, n: int, heads: int) -> torch.Tensor:
    return torch.stack([torch.stack([branch_mask(g, h, n, pattern.causal)
                                     for g in resolve(pattern, n, heads)]).any(0)
                        for h in range(heads)])


# --- block layouts and tile counts --------------------------------------------------------------


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patterns(max_size=40), st.integers(1, 9))
def test_layouts_match_brute_force(case: tuple[Pattern, int, int], block: int) -> None:
    check_layouts(*case, block)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(with_new_kinds(max_size=40), st.integers(1, 9))
def test_layouts_with_strided_and_random_match_brute_force(case: tuple[Pattern, int, int],
                                                           block: int) -> None:
    check_layouts(*case, block)


def check_layouts(pattern: Pattern, n: int, heads: int, block: int) -> None:
    layout, per_branch = brute_layout(pattern, n, heads, block)
    assert torch.equal(dense_layout(pattern, n, heads, block), layout)
    counts = block_sparse_counts(pattern, n, heads, block)
    assert counts.total == int(layout.sum()) and list(counts.branches) == per_branch
    assert block_sparse_tiles(pattern, n, heads, block) == counts.total
    assert block_sparse_tiles(pattern, n, heads, block, branch=0) == per_branch[0]


STRIDED_AND_RANDOM = [  # (branch, N): the edges of both kinds
    ("strided: {stride: 1}", 45),
    ("strided: {stride: 2}", 45),
    ("strided: {stride: 7}", 45),
    ("strided: {stride: 30}", 45),  # longer than some row tiles, shorter than N
    ("strided: {stride: 60}", 45),  # past N: only the diagonal
    ("random: {block: 5, blocks: 2, seed: 4}", 47),  # N not a multiple of the block
    ("random: {block: 13, blocks: 2, seed: 1}", 45),
    ("random: {block: 6, blocks: 9, seed: 0}", 45),  # blocks >= the number of blocks
    ("random: {block: 64, blocks: 2, seed: 2}", 45),  # block past N
]


def _mixed(branch: str, causal: bool) -> Pattern:
    return load_pattern_text(f"name: t\ncausal: {str(causal).lower()}\noverlap: union\n"
                             f"branches:\n  - {branch}\n  - window: {{size: 3}}\n")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("branch, n", STRIDED_AND_RANDOM)
def test_strided_and_random_layouts_at_the_edges(branch: str, n: int, causal: bool) -> None:
    pattern = _mixed(branch, causal)
    for block in (1, 4, 8, 16):
        layout, per_branch = brute_layout(pattern, n, 3, block)
        assert torch.equal(dense_layout(pattern, n, 3, block), layout)
        counts = block_sparse_counts(pattern, n, 3, block)
        assert list(counts.branches) == per_branch and counts.total == int(layout.sum())
    mask_mod = flex_mask_mod(pattern, n, 3)
    pos = torch.arange(n)
    union = union_mask(pattern, n, 3)
    for h in range(3):
        got = mask_mod(torch.tensor(0), torch.tensor(h), pos[:, None], pos[None, :])
        assert torch.equal(got, union[h])


@pytest.mark.parametrize("block", [1, 4, 8, 11, 12, 13, 16])
def test_dilation_wider_than_block(block: int) -> None:
    """A block narrower than the dilation leaves gaps between the tiles of one segment."""
    for causal in ("true", "false"):
        pattern = load_pattern_text(f"name: t\ncausal: {causal}\nbranches:\n"
                                    "  - {segment: 50, dilation: 12}\n"
                                    "  - {segment: 30, dilation: 7}\n")
        layout, per_branch = brute_layout(pattern, 133, 5, block)
        assert list(block_sparse_counts(pattern, 133, 5, block).branches) == per_branch
        assert block_sparse_tiles(pattern, 133, 5, block) == int(layout.sum())


def test_block_sparse_longnet_million_tokens() -> None:
    pattern = load_pattern("longnet-lm")
    tracemalloc.start()
    counts = block_sparse_counts(pattern, 1 << 20, 16)
    assert tracemalloc.get_traced_memory()[1] < 64 << 20  # analytic: far from N^2 anything
    tracemalloc.stop()
    # Block 128 >= every dilation: each segment's whole causal block triangle is computed, and
    # the w = 32768 segments hold every other branch's: 32 segments of 256 x 257 / 2 tiles.
    assert counts.total == 16 * 32 * (256 * 257 // 2)
    assert counts.branches[0] == 16 * 512 * (16 * 17 // 2)


def test_block_sparse_strided_and_random_million_tokens() -> None:
    n = 1 << 20
    tracemalloc.start()
    strided = block_sparse_counts(load_pattern("sparse-transformer-strided"), n, 16)
    bigbird = block_sparse_counts(load_pattern("bigbird"), n, 16)
    assert tracemalloc.get_traced_memory()[1] < 128 << 20
    tracemalloc.stop()
    # A 128-row tile holds every residue of the stride 128: the whole causal triangle.
    assert strided.total == strided.branches[1] == 16 * (8192 * 8193 // 2)
    # Two 64-token query blocks share a row tile: at most 2 x 3 key tiles per row tile.
    assert 16 * 8192 * 3 < bigbird.branches[2] <= 16 * 8192 * 6


def test_dense_layout_refuses_large_n() -> None:
    with pytest.raises(SpattnError, match="4,096"):
        dense_layout(load_pattern("longnet-lm"), 4097, 2, block=1)
    with pytest.raises(SpattnError, match="4,096"):
        dense_layout(load_pattern("longnet-lm"), 1 << 20, 2)
    assert dense_layout(load_pattern("longnet-lm"), 1 << 20, 2, block=1024).shape == (
        2, 1024, 1024)


def test_overlaps() -> None:
    assert overlaps(load_pattern("longnet-lm"), 100, 4)
    disjoint = load_pattern_text("name: d\nbranches:\n  - {segment: 8, dilation: 2, offsets: [0]}\n"
                                 "  - {segment: 8, dilation: 2, offsets: [1]}\n")
    assert not overlaps(disjoint, 100, 1)
    assert not overlaps(load_pattern("sliding-window"), 100, 2)


# --- FlexAttention ------------------------------------------------------------------------------


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: object) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "called without torch.compile()": eager is the point
        return flex_attention(q, k, v, block_mask=block_mask)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patterns(max_size=40), st.sampled_from([1, 4, 8, 16]))
def test_flex_mask_matches_brute_force(case: tuple[Pattern, int, int], block: int) -> None:
    check_flex_mask(*case, block)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(with_new_kinds(max_size=40), st.sampled_from([1, 4, 8, 16]))
def test_flex_mask_with_strided_and_random(case: tuple[Pattern, int, int], block: int) -> None:
    check_flex_mask(*case, block)


def check_flex_mask(pattern: Pattern, n: int, heads: int, block: int) -> None:
    """mask_mod is the union mask, and the BlockMask (built through vmap) is its layout."""
    mask_mod, block_mask = to_flex(pattern, n, heads, block_size=block)
    pos = torch.arange(n)
    union = union_mask(pattern, n, heads)
    for h in range(heads):
        got = mask_mod(torch.tensor(0), torch.tensor(h), pos[:, None], pos[None, :])
        assert torch.equal(got, union[h])
    assert torch.equal(block_mask.to_dense()[0].long(), dense_layout(pattern, n, heads, block))


MIXED = """\
name: mixed
causal: {causal}
overlap: {overlap}
branches:
  - {{segment: 12, dilation: 3}}
  - {{segment: 40, dilation: 2, offsets: [1, 0, 1]}}
  - window: {{size: 4}}
  - global: {{tokens: [5, 33]}}
"""
HOLES = """\
name: holes
causal: {causal}
branches:
  - {{segment: 16, dilation: 4}}
"""
DISJOINT = """\
name: disjoint
causal: {causal}
branches:
  - {{segment: 16, dilation: 2, offsets: [0, 1, 0]}}
  - {{segment: 16, dilation: 2, offsets: [1, 0, 1]}}
"""


def _scaled(name: str) -> Pattern:
    from spattn.patterns.report import scale_pattern

    return scale_pattern(load_pattern(name), 128).model_copy(update={"overlap": "union"})


BIGBIRD_SMALL = """\
name: bigbird-small
causal: {causal}
overlap: union
branches:
  - global: {{tokens: [0, 1, 2]}}
  - window: {{size: 6}}
  - random: {{block: 8, blocks: 2, seed: 5}}
"""
STRIDED_SMALL = """\
name: strided-small
causal: {causal}
overlap: union
branches:
  - window: {{size: 8}}
  - strided: {{stride: 8}}
"""
PER_HEAD = """\
name: per-head
causal: {causal}
overlap: union
branches:
  - {{segment: 12, dilation: 3, heads: [0, 2]}}
  - {{window: {{size: 4}}, heads: [1]}}
  - {{global: {{tokens: [5]}}, heads: [2]}}
  - {{random: {{block: 8, blocks: 2, seed: 5}}, heads: [0, 1]}}
  - {{strided: {{stride: 9}}, heads: [1]}}
"""


@pytest.mark.parametrize("make, n", [
    (lambda: load_pattern_text(MIXED.format(causal="true", overlap="union")), 45),
    (lambda: load_pattern_text(MIXED.format(causal="false", overlap="union")), 45),
    (lambda: load_pattern_text(DISJOINT.format(causal="true")), 50),
    (lambda: load_pattern_text(DISJOINT.format(causal="false")), 50),
    (lambda: load_pattern_text(HOLES.format(causal="true")), 40),
    (lambda: _scaled("longnet-lm"), 100),
    (lambda: _scaled("sink-window"), 70),
    (lambda: load_pattern_text(BIGBIRD_SMALL.format(causal="false")), 70),
    (lambda: load_pattern_text(BIGBIRD_SMALL.format(causal="true")), 70),
    (lambda: load_pattern_text(STRIDED_SMALL.format(causal="true")), 70),
    (lambda: load_pattern_text(PER_HEAD.format(causal="true")), 45),
    (lambda: load_pattern_text(PER_HEAD.format(causal="false")), 45),
], ids=["mixed-causal", "mixed", "disjoint-causal", "disjoint", "holes", "longnet-lm",
        "sink-window", "bigbird", "bigbird-causal", "strided-causal", "per-head-causal",
        "per-head"])
def test_flex_matches_reference(make: object, n: int) -> None:
    """flex_attention with the exported block mask computes the pattern (union semantics),
    queries that no branch selects included (zero output)."""
    pattern, heads = make(), 3
    assert pattern.overlap == "union" or not overlaps(pattern, n, heads)
    _, block_mask = to_flex(pattern, n, heads, block_size=16)
    generator = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(2, heads, n, 16, generator=generator) for _ in range(3))
    expected = reference_attention(q, k, v, pattern)
    assert torch.allclose(flex(q, k, v, block_mask).double(), expected, atol=2e-5)


@pytest.mark.parametrize("causal", ["true", "false"])
def test_per_head_branches_match_brute_force(causal: str) -> None:
    """Branches for some heads only: no tiles, no mask for the other heads."""
    pattern = load_pattern_text(PER_HEAD.format(causal=causal))
    for block in (1, 4, 16):
        check_layouts(pattern, 45, 3, block)
        check_layouts(pattern, 45, 4, block)  # head 3: no branch at all
    assert not dense_layout(pattern, 45, 4, 4)[3].any()


def test_mask_mod_is_elementwise() -> None:
    """mask_mod takes index tensors of any (broadcast) shape and never holds an N x N mask."""
    pattern = load_pattern_text("name: m\ncausal: true\nbranches:\n  - {segment: 16, dilation: 3}\n"
                                "  - window: {size: 5}\n  - global: {tokens: [2, 40]}\n")
    n, heads = 37, 3
    mask_mod = flex_mask_mod(pattern, n, heads)
    pos = torch.arange(n)
    for h in range(heads):
        got = mask_mod(torch.tensor(0), torch.tensor(h), pos[:, None], pos[None, :])
        assert torch.equal(got, union_mask(pattern, n, heads)[h])
    one = mask_mod(torch.tensor(0), torch.tensor(1), torch.tensor(5), torch.tensor(2))
    assert one.shape == () and bool(one)  # window
    cells = [c.cell_contents for c in mask_mod.__closure__ or ()]
    held = [t for mod in cells if isinstance(mod, list) for f in mod
            for t in (c.cell_contents for c in f.__closure__ or ()) if isinstance(t, torch.Tensor)]
    assert held and max(t.numel() for t in held) <= n


def test_random_mask_mod_holds_the_draw() -> None:
    """The random branch's mask_mod holds its (heads, query blocks, slots) table, no mask."""
    pattern = load_pattern_text("name: r\nbranches:\n  - random: {block: 4, blocks: 3, seed: 7}\n")
    mask_mod = flex_mask_mod(pattern, 37, 2)
    mods = next(c.cell_contents for c in mask_mod.__closure__ or ()
                if isinstance(c.cell_contents, list))
    (table,) = [c.cell_contents for c in mods[0].__closure__ or ()
                if isinstance(c.cell_contents, torch.Tensor)]
    assert table.shape == (2, 10, 3) and torch.equal(table, resolve(pattern, 37, 2)[0].table())
    q, k = torch.tensor(9), torch.tensor(4 * int(table[1, 2, 0]) + 1)  # query block 2, head 1
    assert bool(mask_mod(torch.tensor(0), torch.tensor(1), q, k))
