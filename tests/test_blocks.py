"""Random blocks (docs/branches.md): the vectorized draw against the plain-integer one the
reference uses, and the properties the draw promises."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from reference import random_key_blocks

from spattn.patterns.blocks import random_blocks


@settings(max_examples=150, deadline=None, derandomize=True)
@given(block=st.integers(1, 9), blocks=st.integers(1, 6), seed=st.integers(0, 2**40),
       n=st.integers(0, 200), heads=st.integers(1, 3), causal=st.booleans())
def test_table_is_the_documented_draw(block, blocks, seed, n, heads, causal):
    table = random_blocks(block, blocks, seed, n, heads, causal)
    total = -(-n // block)
    assert tuple(table.shape) == (heads, total, blocks)
    spec = {"block": block, "blocks": blocks, "seed": seed}
    for h in range(heads):
        for i in range(total):
            row = [j for j in table[h, i].tolist() if j >= 0]
            candidates = i + 1 if causal else total
            assert row == sorted(set(row)), "distinct and increasing"
            assert len(row) == min(blocks, candidates)
            assert all(0 <= j < candidates for j in row)
            assert table[h, i, len(row):].eq(-1).all()
            assert set(row) == random_key_blocks(spec, h, i, n, causal)


def test_causal_draws_do_not_depend_on_the_sequence_length():
    short = random_blocks(4, 3, 11, 64, 2, True)
    long = random_blocks(4, 3, 11, 4096, 2, True)
    assert (long[:, :short.shape[1]] == short).all()


def test_heads_and_seeds_draw_differently():
    table = random_blocks(8, 3, 0, 8 * 200, 2, False)
    assert (table[0] != table[1]).any()
    assert (random_blocks(8, 3, 1, 8 * 200, 2, False) != table).any()


def test_draws_spread_over_the_candidates():
    # 1,000 query blocks, 4 draws each from 1,000 blocks: every quarter of the sequence gets
    # about a quarter of the draws (a biased hash would pile them up)
    table = random_blocks(1, 4, 5, 1000, 1, False)[0]
    quarters = (table // 250).flatten().bincount(minlength=4)
    assert ((quarters - 1000).abs() < 150).all(), quarters
