"""`spattn inspect`: hop distances against brute force, the report, the CLI and the picture."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import networkx as nx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from test_counting import ALL_KINDS, patterns
from test_layouts import brute_layout
from work_meter import metered

from spattn.cli.main import main
from spattn.compiler.layouts import block_sparse_tiles
from spattn.compiler.plan import build_plan
from spattn.errors import SpattnError
from spattn.patterns.counting import branch_mask, brute_force_pairs
from spattn.patterns.geometry import resolve
from spattn.patterns.hops import Hops, hop_distance, hop_table, token_graph
from spattn.patterns.loader import load_pattern, load_pattern_text
from spattn.patterns.picture import draw_mask, mask_image
from spattn.patterns.report import inspect_pattern, scale_pattern
from spattn.patterns.spec import Pattern

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

SMALL = """\
name: small
causal: false
branches:
  - {segment: 4, dilation: 2}
  - window: {size: 2}
"""


def cli(argv: list[str]) -> int:
    """`spattn ARGV`'s exit status (argparse itself exits on a malformed command line)."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)


def brute_force_hops(pattern: Pattern, n: int, heads: int) -> tuple[int, int]:
    """(largest finite hop count, unreachable pairs) by powers of the boolean adjacency matrix."""
    adjacency = torch.zeros(n, n, dtype=torch.bool)
    for g in resolve(pattern, n, heads):
        for head in range(heads):
            adjacency |= branch_mask(g, head, n, pattern.causal)
    wanted = torch.ones(n, n, dtype=torch.bool)
    wanted = wanted.tril(-1) if pattern.causal else wanted & ~torch.eye(n, dtype=torch.bool)
    reach, hops = torch.eye(n, dtype=torch.bool), 0
    step = adjacency.float()
    while True:
        grown = reach | ((reach.float() @ step) > 0)
        if torch.equal(grown, reach):
            break
        reach, hops = grown, hops + 1
    return hops, int((wanted & ~reach).sum())


# --- hop distance -------------------------------------------------------------------------------


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patterns(max_size=30))
def test_hops_match_brute_force(case: tuple[Pattern, int, int]) -> None:
    pattern, n, heads = case
    hops = hop_distance(pattern, n, heads)
    assert (hops.hops, hops.unreachable) == brute_force_hops(pattern, n, heads)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patterns(max_size=30, kinds=ALL_KINDS))
def test_strided_and_random_hops_match_brute_force(case: tuple[Pattern, int, int]) -> None:
    pattern, n, heads = case
    hops = hop_distance(pattern, n, heads)
    assert (hops.hops, hops.unreachable) == brute_force_hops(pattern, n, heads)


SMALL_BIGBIRD = """\
name: small-bigbird
causal: {causal}
overlap: union
branches:
  - global: {{tokens: [0]}}
  - window: {{size: 2}}
  - random: {{block: 3, blocks: 2, seed: 5}}
"""


@pytest.mark.parametrize("name", ["longnet-lm", "longvit", "sink-window",
                                  "sparse-transformer-strided", "bigbird", "small-bigbird",
                                  "small-bigbird-causal"])
def test_hops_match_networkx(name: str) -> None:
    if name.startswith("small-bigbird"):  # bigbird's 64 global tokens would link everything
        pattern = load_pattern_text(SMALL_BIGBIRD.format(causal=str(name.endswith("causal"))
                                                         .lower()))
    else:  # segments 8, 16, ...; window and stride 8 (/ 16); bigbird's blocks of 1 (/ 256)
        pattern = scale_pattern(load_pattern(name), 16 if "strided" in name else 256)
    n, heads = 50, 4
    lengths = dict(nx.all_pairs_shortest_path_length(token_graph(pattern, n, heads)))
    pairs = [(p, k) for p in range(n) for k in range(n)
             if p != k and (k < p or not pattern.causal)]
    finite = [lengths[p][k] for p, k in pairs if k in lengths[p]]
    hops = hop_distance(pattern, n, heads)
    assert hops == Hops(n, max(finite), len(pairs), len(pairs) - len(finite))


def test_hops_by_hand() -> None:
    window = load_pattern_text("name: w\ncausal: true\nbranches:\n  - window: {size: 3}\n")
    assert hop_distance(window, 10, 1) == Hops(10, 5, 45, 0)  # 2 tokens back per hop
    # Segments of 4 never meet: tokens of different segments are never connected.
    blocks = load_pattern_text("name: b\nbranches:\n  - {segment: 4, dilation: 1}\n")
    assert hop_distance(blocks, 8, 1) == Hops(8, 1, 56, 32)
    # ... until a dilated branch over the whole sequence links them through its rows.
    linked = load_pattern_text("name: l\nbranches:\n  - {segment: 4, dilation: 1}\n"
                               "  - {segment: 8, dilation: 4}\n")
    assert hop_distance(linked, 8, 1) == Hops(8, 3, 56, 0)
    assert hop_distance(window, 1, 1) == Hops(1, 0, 0, 0)


def test_strided_and_random_hops_by_hand() -> None:
    # Residue classes mod 3 never meet: within one, every earlier token is one hop away.
    strided = load_pattern_text("name: s\ncausal: true\nbranches:\n  - strided: {stride: 3}\n")
    assert hop_distance(strided, 9, 1) == Hops(9, 1, 36, 36 - 3 * 3)
    # A window of 2 beside it: 2 hops back along the class, then up to 2 steps of the window.
    linked = load_pattern_text("name: s\ncausal: true\nbranches:\n  - window: {size: 2}\n"
                               "  - strided: {stride: 3}\n")
    assert hop_distance(linked, 9, 1) == Hops(9, 3, 36, 0)
    # One block drawn per query block out of one: the whole sequence, one hop.
    single = load_pattern_text("name: r\nbranches:\n  - random: {block: 4, blocks: 1}\n")
    assert hop_distance(single, 4, 2) == Hops(4, 1, 12, 0)


def test_hop_table_lengths() -> None:
    table = hop_table(load_pattern("longvit"), 100, 2)
    assert [h.seq_len for h in table] == [16, 32, 64, 100]
    assert [h.seq_len for h in hop_table(load_pattern("longvit"), 10, 2)] == [10]


def test_hops_grow_slowly_for_scaled_longnet() -> None:
    pattern = scale_pattern(load_pattern("longvit"), 64)  # w = 16 ... 256, r = 1 ... 16
    table = hop_table(pattern, 256, 16)
    assert all(h.connected for h in table)
    assert [h.hops for h in table] == sorted(h.hops for h in table)
    assert table[-1].hops <= 4


def test_hops_at_4096_are_bounded() -> None:
    with metered() as meter:
        report = inspect_pattern(load_pattern("longnet-lm"), 4096, scale=16)
    # the hop searches up to N = 4096 read about 8e6 words, all parts together about 1e7
    assert meter.declared < 2 * 10**7 and meter.cells == 0 and meter.peak_mb < 64
    assert report.hops is not None and report.hops.seq_len == 4096
    assert [h.seq_len for h in report.hop_table][-1] == 4096


# --- the report ---------------------------------------------------------------------------------


def test_report_numbers() -> None:
    report = inspect_pattern(load_pattern_text(SMALL), 10, heads=2, head_dim=8, batch=3)
    dilated, window = report.branches
    assert dilated.pairs == 18 and window.pairs == 2 * (10 + 2 * 9)
    assert report.total.pairs == 18 + 56
    assert report.dense.pairs == 200
    assert report.total.density == pytest.approx(74 / 200)
    assert report.total.flops == 4 * 8 * 3 * 74
    assert report.total.speedup == pytest.approx(200 / 74)
    assert report.hops == hop_distance(load_pattern_text(SMALL), 10, 2)


def test_report_tiles() -> None:
    pattern = load_pattern_text(SMALL)
    report = inspect_pattern(pattern, 10, heads=2, hops=False, block_m=2, block_n=2, block=4)
    tiles = report.tiles
    assert (tiles.block_m, tiles.block_n, tiles.block) == (2, 2, 4)
    plan = build_plan(pattern, 10, 2, block_m=2, block_n=2)
    _, per_branch = brute_layout(pattern, 10, 2, 4)
    assert [r.spattn for r in tiles.branches] == [b.tile_count() for b in plan.branches]
    assert [r.block_sparse for r in tiles.branches] == per_branch
    # The dilated branch keeps 2, 2 and 1 rows per segment and head: one 2x2 tile each, and one
    # 4x4 tile each over original positions.
    dilated, window = tiles.branches
    assert (dilated.spattn, dilated.block_sparse) == (6, 6)
    assert dilated.spattn_useful == 18 / (6 * 4) and dilated.block_sparse_useful == 18 / (6 * 16)
    assert tiles.total.spattn == 6 + window.spattn and tiles.total.pairs == 74
    assert tiles.total.block_sparse == block_sparse_tiles(pattern, 10, 2, 4)
    assert tiles.spattn_products == tiles.total.spattn * 4
    assert inspect_pattern(pattern, 10, heads=2, hops=False, tiles=False).tiles is None


@pytest.mark.parametrize("name", ["bigbird", "sparse-transformer-strided"])
def test_report_new_kinds(name: str) -> None:
    pattern = load_pattern(name)
    report = inspect_pattern(pattern, 300, heads=3, hops=False, tiles=False)
    assert [r.label for r in report.branches] == {
        "bigbird": ["global 64 tokens", "window 192", "random 3 blocks of 64 (seed 0)"],
        "sparse-transformer-strided": ["window 128", "strided 128"]}[name]
    counts = brute_force_pairs(pattern, 300, 3)
    assert [r.pairs for r in report.branches] == list(counts.branches)
    assert report.total.pairs == counts.total < sum(counts.branches)


def test_report_heads() -> None:
    fixed = load_pattern_text("name: f\nheads: 4\nbranches:\n  - {segment: 8, dilation: 2}\n")
    assert inspect_pattern(fixed, 16, hops=False).heads == 4
    assert inspect_pattern(load_pattern_text(SMALL), 16, hops=False).heads == 8
    with pytest.raises(SpattnError, match="--heads"):
        inspect_pattern(fixed, 16, heads=3)


def test_scale_pattern() -> None:
    scaled = scale_pattern(load_pattern("longnet-geometric"), 1024)
    assert [(b.segment, b.dilation) for b in scaled.expanded_branches()] == [
        (2, 1), (4, 2), (8, 4), (16, 8), (32, 16)]
    assert scale_pattern(load_pattern("sink-window"), 10**6).branches[1].window.size == 1
    # strides and random block sizes are lengths too; block counts, seeds and tokens stay
    window, strided = scale_pattern(load_pattern("sparse-transformer-strided"), 16).branches
    assert (window.window.size, strided.strided.stride) == (8, 8)
    tokens, window, random = scale_pattern(load_pattern("bigbird"), 16).branches
    assert tokens == load_pattern("bigbird").branches[0] and window.window.size == 12
    assert (random.random.block, random.random.blocks, random.random.seed) == (4, 3, 0)
    assert scale_pattern(load_pattern("bigbird"), 10**6).branches[2].random.block == 1
    with pytest.raises(SpattnError):
        scale_pattern(load_pattern("sink-window"), 0)


# --- the command line ---------------------------------------------------------------------------


def test_cli_small(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "small.yaml"
    path.write_text(SMALL)
    assert cli(["inspect", str(path), "--seq-len", "10", "--heads", "2"]) == 0
    out = capsys.readouterr().out
    lines = {line.split("  ")[0]: line for line in out.splitlines()}
    assert " 18 " in lines["dilated w=4 r=2 (paper offsets)"]
    assert " 56 " in lines["window 2"]
    assert " 74 " in lines["total (multiset)"] and "2.7x" in lines["total (multiset)"]
    assert " 200 " in lines["dense attention"]
    assert "spattn 64x64 tiles" in out and "block-sparse 128x128 tiles" in out
    assert "query-key products" in out
    assert "hops: every token reaches every other token in at most" in out
    assert "log2 N" not in out  # N = 10 < 16: the table is the single row N = 10


def test_million_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    with metered() as meter:
        assert cli(["inspect", "longnet-lm", "--seq-len", "1000000"]) == 0
    # analytic: no mask cell evaluated; the hop table (to 4096) is most of the work declared
    assert meter.cells == 0 and meter.declared < 2 * 10**7 and meter.peak_mb < 64
    out = capsys.readouterr().out
    assert "17,060,023,426" in out  # five branches at 8 heads, summed
    # 4,298,744 tiles of 64x64 against 7,966,328 of 128x128 (the 32768-token segments' triangles)
    assert "4,298,744" in out and "7,966,328" in out and "7.41x less work" in out
    assert "not computed for N > 8,192" in out and "4,096" in out


@pytest.mark.parametrize("name, labels", [
    ("bigbird", ["global 64 tokens", "window 192", "random 3 blocks of 64 (seed 0)"]),
    ("sparse-transformer-strided", ["window 128", "strided 128"]),
])
def test_million_tokens_new_kinds(name: str, labels: list[str],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    with metered() as meter:
        assert cli(["inspect", name, "--seq-len", "1000000", "--no-hops", "--no-tiles"]) == 0
    # bigbird: its 8 heads' draws and the union's cells (about 1e6), a 64 x 1024 token block
    assert meter.declared < 4 * 10**6 and meter.cells <= 2**17 and meter.draws <= 8
    assert meter.peak_mb < 64
    out = capsys.readouterr().out
    rows = [line.split("  ")[0] for line in out.splitlines()]
    assert rows[rows.index("branch") + 1:][:len(labels) + 1] == [*labels, "total (union)"]


@pytest.mark.parametrize("name,sentence", [
    ("sink-window", "a KV cache keeps at most 4,099 tokens' keys and values"),  # 4 + window
    ("sliding-window", "a KV cache keeps at most 4,095 tokens' keys and values"),
    ("sparse-transformer-strided", "a KV cache keeps every token"),
    ("longvit", None),  # bidirectional: no decoding
])
def test_decoding_cache_size(name: str, sentence: str | None,
                             capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["inspect", name, "--seq-len", "20000", "--no-hops", "--no-tiles"]) == 0
    out = capsys.readouterr().out
    if sentence is None:
        assert "decoding" not in out
    else:
        assert f"decoding: {sentence}" in out


def test_scaled_longnet_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["inspect", "longnet-lm", "--seq-len", "4096", "--scale", "16"]) == 0
    out = capsys.readouterr().out
    assert "scaled by 1/16" in out and "dilated w=128 r=1" in out
    assert "log2 N" in out and "unconnected" in out


@pytest.mark.parametrize("argv, fragment", [
    (["inspect", "longnet-lm", "--seq-len", "0"], "--seq-len"),
    (["inspect", "longnet-lm", "--seq-len", "ten"], "--seq-len"),
    (["inspect", "longnet-lm"], "--seq-len"),
    (["inspect", "no-such-pattern.yaml", "--seq-len", "10"], "no-such-pattern.yaml"),
    (["inspect", "longnet-lm", "--seq-len", "10", "--scale", "0"], "--scale"),
    (["inspect", "longnet-lm", "--seq-len", "10", "--block-m", "0"], "--block-m"),
    (["inspect", "longnet-lm", "--seq-len", "10", "--flex-block", "x"], "--flex-block"),
    (["inspect", "longnet-lm", "--seq-len", "10", "--head", "x", "--png", "a.png"], "--head"),
    (["inspect", "longnet-lm", "--seq-len", "10", "--head", "8", "--png", "a.png"], "--head"),
    (["inspect", "longnet-lm", "--seq-len", "10", "--png", "/no/such/dir/a.png"], "--png"),
    (["inspect", "longnet-lm", "--seq-len", "10", "--png", "a.png", "--png-tokens", "99999"],
     "--png-tokens"),
])
def test_cli_errors(argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and fragment in err and "Traceback" not in err


def test_cli_heads_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "fixed.yaml"
    path.write_text("name: fixed\nbranches:\n  - {segment: 8, dilation: 2, offsets: [0, 1]}\n")
    assert cli(["inspect", str(path), "--seq-len", "16", "--heads", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "2 heads" in err


def test_bad_yaml_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nbranches:\n  - {segment: 0, dilation: 2}\n")
    assert cli(["inspect", str(path), "--seq-len", "16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ":3:" in err and "segment" in err


# --- the picture --------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["0", "all"])
def test_png(tmp_path: Path, head: str, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "mask.png"
    argv = ["inspect", "longnet-lm", "--seq-len", "300", "--scale", "16", "--heads", "4",
            "--no-hops", "--png", str(target), "--head", head, "--png-tokens", "64"]
    assert cli(argv) == 0
    assert target.read_bytes().startswith(PNG_MAGIC)
    assert os.listdir(tmp_path) == ["mask.png"]  # no temporary file left behind
    assert "first 64 tokens" in capsys.readouterr().out


def test_mask_image_new_kinds() -> None:
    # every head of a random branch draws its own blocks; white where no branch allows a pair
    pattern = load_pattern_text(SMALL_BIGBIRD.format(causal="true"))
    for head in range(3):
        image = mask_image(pattern, 40, 3, head, 32)
        union = torch.zeros(32, 32, dtype=torch.bool)
        for g in resolve(pattern, 40, 3):
            union |= branch_mask(g, head, 40, True, tokens=32)
        assert torch.equal(torch.from_numpy((image < 1).any(-1)), union)


def test_mask_image_of_branches_for_some_heads() -> None:
    # a branch listing its heads draws on those heads only, random blocks included
    pattern = load_pattern_text("name: some\nbranches:\n  - {segment: 8, dilation: 2, heads: [1]}\n"
                                "  - {random: {block: 2, blocks: 2, seed: 1}, heads: [0]}\n")
    for head in range(3):
        image = mask_image(pattern, 24, 3, head, 24)
        union = torch.zeros(24, 24, dtype=torch.bool)
        for g in resolve(pattern, 24, 3):
            union |= branch_mask(g, head, 24, False)
        assert torch.equal(torch.from_numpy((image < 1).any(-1)), union)
        assert union.any() == (head < 2)


def test_png_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    with pytest.raises(SpattnError, match=r"pip install spattn\[plot\]"):
        draw_mask(load_pattern("longvit"), 64, 2, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
