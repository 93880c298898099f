"""`spattn inspect`: hop distances against brute force, the report, the CLI and the picture."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import networkx as nx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from test_counting import patterns
from test_layouts import brute_layout

from spattn.cli.main import main
from spattn.compiler.layouts import block_sparse_tiles
from spattn.compiler.plan import build_plan
from spattn.errors import SpattnError
from spattn.patterns.counting import branch_mask
from spattn.patterns.geometry import resolve
from spattn.patterns.hops import Hops, hop_distance, hop_table, token_graph
from spattn.patterns.loader import load_pattern, load_pattern_text
from spattn.patterns.picture import draw_mask
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


@pytest.mark.parametrize("name", ["longnet-lm", "longvit", "sink-window"])
def test_hops_match_networkx(name: str) -> None:
    pattern = scale_pattern(load_pattern(name), 256)  # segments 8, 16, ... for N = 50
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


def test_hops_at_4096_are_fast() -> None:
    started = time.perf_counter()
    report = inspect_pattern(load_pattern("longnet-lm"), 4096, scale=16)
    assert time.perf_counter() - started < 5.0
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
    started = time.perf_counter()
    assert cli(["inspect", "longnet-lm", "--seq-len", "1000000"]) == 0
    assert time.perf_counter() - started < 10.0
    out = capsys.readouterr().out
    assert "17,060,023,426" in out  # five branches at 8 heads, summed
    # 4,298,744 tiles of 64x64 against 7,966,328 of 128x128 (the 32768-token segments' triangles)
    assert "4,298,744" in out and "7,966,328" in out and "7.41x less work" in out
    assert "not computed for N > 8,192" in out and "4,096" in out


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


def test_png_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    with pytest.raises(SpattnError, match=r"pip install spattn\[plot\]"):
        draw_mask(load_pattern("longvit"), 64, 2, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
