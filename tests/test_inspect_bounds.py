"""`spattn inspect` stays inside its work bounds on every path and option combination: pictures
(one head or a grid), tiles, hop distances, random tables per head and the CPU plan, at huge head
counts and lengths. Each part is computed within its bound or refused in one line; what is
asserted is counted (mask cells, head draws, planned rows, declared work, peak memory), never
timed."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_counting import ALL_KINDS, patterns
from work_meter import metered, peak_rss_mb

from spattn.cli.main import main
from spattn.errors import SpattnError
from spattn.limits import MAX_PICTURE_HEADS, MAX_PICTURE_WORK, MAX_PLAN_WORK
from spattn.patterns import picture
from spattn.patterns.counting import branch_mask
from spattn.patterns.geometry import resolve
from spattn.patterns.loader import load_pattern
from spattn.patterns.picture import branch_image, draw_mask
from spattn.patterns.spec import Pattern

pytest.importorskip("matplotlib")

MANY_HEADS = "name: many\nheads: 65536\nbranches:\n  - {segment: 8, dilation: 2}\n"
MANY_RANDOM = ("name: many-random\nheads: 65536\noverlap: union\nbranches:\n"
               "  - global: {tokens: [0, 1, 2, 3]}\n  - window: {size: 192}\n"
               "  - random: {block: 64, blocks: 3, seed: 0}\n")
HUGE_RANDOM = "name: huge-random\nbranches:\n  - random: {block: 1, blocks: 256}\n"
MAX_RSS_MB = 1536  # a process that imports torch and matplotlib starts near 400 MB
MAX_DRAWS = 30_000  # head draws of random tables: blocks.py draws head by head


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "many.yaml").write_text(MANY_HEADS)
    (tmp_path / "many-random.yaml").write_text(MANY_RANDOM)
    (tmp_path / "huge-random.yaml").write_text(HUGE_RANDOM)
    return {name: str(tmp_path / f"{name}.yaml") for name in ("many", "many-random", "huge-random")
            } | {"png": str(tmp_path / "out.png")}


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        status = main(argv)
    except SystemExit as stop:
        status = int(stop.code or 0)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _ends_cleanly(status: int, err: str) -> None:
    assert status in (0, 2), err
    assert "internal error" not in err and "out of memory" not in err, err
    if status == 2:
        assert len(err.strip().splitlines()) == 1 and err.startswith("spattn: error: "), err


# --- every combination of the hostile shapes and the options that make work -------------------

SHAPES = {
    "16 heads x 4096": ["longnet-lm", "-n", "4096", "--heads", "16"],
    "pattern with 65536 heads": ["{many}", "-n", "4096"],
    "bigbird, --heads 65536": ["bigbird", "-n", "4096", "--heads", "65536"],
    "random with 65536 heads, 1e12": ["{many-random}", "-n", "1e12"],
    "bigbird, blocks of 1 token": ["bigbird", "-n", "8192", "--scale", "64"],
    "256 draws of 1 token, 16 heads": ["{huge-random}", "-n", "1e9", "--heads", "16"],
}
OPTIONS = {
    "report": [],
    "tiny tiles": ["--block-m", "1", "--block-n", "1", "--flex-block", "1", "--no-hops"],
    "plan": ["--plan", "--no-hops", "--no-tiles"],
    "png of every head": ["--png", "{png}", "--head", "all", "--png-tokens", "4096",
                          "--no-hops", "--no-tiles"],
    "png of the last head": ["--png", "{png}", "--head", "15", "--png-tokens", "4096",
                             "--no-hops", "--no-tiles"],
    "png grid of 256 tokens": ["--png", "{png}", "--head", "all", "--no-hops", "--no-tiles"],
}
COMBINATIONS = list(itertools.product(SHAPES, OPTIONS))


@pytest.mark.parametrize("shape, options", COMBINATIONS,
                         ids=[f"{s}, {o}" for s, o in COMBINATIONS])
def test_every_inspect_combination_is_bounded(shape: str, options: str, files: dict[str, str],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["inspect", *(a.format(**files) for a in [*SHAPES[shape], *OPTIONS[options]])]
    with metered() as meter:
        status, out, err = _run(argv, capsys)
    _ends_cleanly(status, err)
    assert meter.cells <= MAX_PICTURE_WORK, meter
    assert meter.draws <= MAX_DRAWS and meter.drawn <= 5 * 10**7, meter
    # matplotlib takes about 250 MB to render a 300 dpi figure, whatever the image in it
    assert meter.plan_rows <= MAX_PLAN_WORK and meter.peak_mb < 512, meter
    assert meter.declared <= 10**9, meter  # every part within its bound (hops: 2e8 a length)
    if status == 0 and "--png" in argv:
        assert Path(files["png"]).read_bytes().startswith(b"\x89PNG")


# --- peak memory of the whole command, in a fresh process --------------------------------------

MEMORY_CASES = {
    "grid of 16 heads x 4096 tokens": (
        ["longnet-lm", "-n", "4096", "--heads", "16", "--head", "all", "--png", "{png}",
         "--png-tokens", "4096"], 2),
    "one head of 4096 tokens": (
        ["longnet-lm", "-n", "4096", "--png", "{png}", "--png-tokens", "4096", "--no-hops",
         "--no-tiles"], 0),
    "grid of 65536 heads": (
        ["{many}", "-n", "4096", "--head", "all", "--png", "{png}", "--no-hops", "--no-tiles"], 2),
    "plan of 65536 heads": (["{many}", "-n", "4096", "--plan"], 2),
    "plan at 1e12 tokens": (["longnet-lm", "-n", "1e12", "--plan", "--no-hops", "--no-tiles"], 2),
    "bigbird's hops with 65536 heads": (["bigbird", "-n", "4096", "--heads", "65536"], 0),
}


@pytest.mark.parametrize("case", list(MEMORY_CASES))
def test_hostile_inspect_peak_memory(case: str, files: dict[str, str]) -> None:
    argv, expected = MEMORY_CASES[case]
    status, err, rss = peak_rss_mb(["inspect", *(a.format(**files) for a in argv)])
    _ends_cleanly(status, err)
    assert status == expected, err
    assert rss < MAX_RSS_MB, f"peak RSS {rss:.0f} MB"


# --- the picture: refused before the report, and right where drawn --------------------------


@pytest.mark.parametrize("argv, fragment", [
    (["longnet-lm", "-n", "4096", "--heads", "16", "--head", "all", "--png-tokens", "4096"],
     "--png-tokens"),
    (["{many}", "-n", "4096", "--head", "all"], f"the {MAX_PICTURE_HEADS} one picture draws"),
])
def test_a_picture_past_its_bound_is_refused_before_any_work(
        argv: list[str], fragment: str, files: dict[str, str],
        capsys: pytest.CaptureFixture[str]) -> None:
    with metered() as meter:
        status, out, err = _run(["inspect", *(a.format(**files) for a in argv), "--png",
                                 files["png"]], capsys)
    assert status == 2 and fragment in err and out == "", err
    assert meter.cells == 0 and meter.declared == 0 and not Path(files["png"]).exists()


def test_draw_mask_refuses_a_grid_past_its_bound(tmp_path: Path) -> None:
    pattern = load_pattern("longnet-lm")
    with metered() as meter, pytest.raises(SpattnError, match="--head all"):
        draw_mask(pattern, 4096, MAX_PICTURE_HEADS + 1, tmp_path / "x.png", head=None, tokens=8)
    assert meter.cells == 0 and not (tmp_path / "x.png").exists()


def _topmost(pattern: Pattern, n: int, heads: int, head: int, tokens: int) -> np.ndarray:
    """1 + the last branch allowing each cell (0: none), from whole masks."""
    out = np.zeros((tokens, tokens), dtype=np.int64)
    for i, g in enumerate(resolve(pattern, n, heads)):
        out[branch_mask(g, head, n, pattern.causal, tokens=tokens).numpy()] = i + 1
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patterns(max_size=30, kinds=ALL_KINDS), st.integers(1, 5), st.integers(1, 64))
def test_pictures_drawn_in_bands_and_pooled_match_whole_masks(
        case: tuple[Pattern, int, int], pool: int, band_cells: int) -> None:
    pattern, n, heads = case
    exact = _topmost(pattern, n, heads, heads - 1, n)
    side = -(-n // pool)
    padded = np.zeros((side * pool, side * pool), dtype=np.int64)
    padded[:n, :n] = exact
    pooled = padded.reshape(side, pool, side, pool).max(axis=(1, 3))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(picture, "BAND_CELLS", band_cells)  # many bands, some of one row
        image = branch_image(resolve(pattern, n, heads), heads - 1, n, pattern.causal, n, pool)
    assert np.array_equal(image, pooled)
