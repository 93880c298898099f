"""`spattn plan`: the table, numbers worked out by hand, and one-line errors."""

from __future__ import annotations

import re

import pytest

from spattn.cli.main import main

SMALL = """\
name: small
causal: true
branches:
  - {segment: 16, dilation: 1}
  - {segment: 32, dilation: 2}
  - {segment: 64, dilation: 3}
"""


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as stop:  # argparse's own errors
        return int(stop.code)


def _line(out: str, start: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(start))


def test_plan_table_by_hand(tmp_path, capsys):
    path = tmp_path / "small.yaml"
    path.write_text(SMALL)
    assert main(["plan", str(path), "--seq-len", "64", "--world-size", "4", "--heads", "4",
                 "--kv-heads", "2", "--head-dim", "8", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "N = 64 tokens over P = 4 ranks (l = 16 tokens each)" in out
    # w=16 fits a rank's 16 tokens: local, nothing sent
    assert re.fullmatch(r"0 dilated w=16 r=1\s+local\s+-\s+-\s+0\s+0", _line(out, "0 "))
    # w=32 spans ranks {0,1} and {2,3}. Heads 0..3 have offsets 0,1,0,1 and kv heads 0,0,1,1:
    # 4 (kv head, offset) combos of 16/2 = 8 rows: 32 K + 32 V rows of 8 = 512 elements, sent to
    # the 1 other rank of the pair: 512 elements, 2 KiB in float32 forward and backward.
    assert re.fullmatch(r"1 dilated w=32 r=2\s+spans 2 ranks\s+\{0\.\.1\} \{2\.\.3\}\s+32"
                        r"\s+512 \(2\.00 KiB\)\s+512 \(2\.00 KiB\)", _line(out, "1 "))
    # w=64 spans all 4 ranks. Offsets 0,1,2,0 with kv heads 0,0,1,1: combos (0,0) (0,1) (1,2)
    # (1,0). Rank p holds tokens 16p..16p+15; the rows t % 3 == s number 6,5,5 (p=0), 5,6,5
    # (p=1), 5,5,6 (p=2), 6,5,5 (p=3): each combo pads to 6, so 24 rows (+3 padding on every
    # rank), 2 * 24 * 8 = 384 elements to each of 3 others: 1,152 elements, 4.5 KiB.
    assert re.fullmatch(r"2 dilated w=64 r=3\s+spans 4 ranks\s+\{0\.\.3\}\s+24 \(\+3 pad\)"
                        r"\s+1,152 \(4\.50 KiB\)\s+1,152 \(4\.50 KiB\)", _line(out, "2 "))
    # metadata: 16 int64 to each of 3 others = 48 elements, 384 bytes: 7,040 bytes forward
    assert re.fullmatch(r"total\s+1,712 \(6\.88 KiB\)\s+1,664 \(6\.50 KiB\)", _line(out, "total"))
    # all of K and V: 2 * 2 kv heads * 16 tokens * 8 = 512 elements to each of 3 others
    assert re.fullmatch(r"gather all K/V\s+1,536 \(6\.00 KiB\)\s+1,536 \(6\.00 KiB\)",
                        _line(out, "gather all"))


def test_plan_of_the_builtin_lm_at_a_million_tokens(capsys):
    assert main(["plan", "longnet-lm", "-n", "1_048_576", "-p", "64", "--heads", "12"]) == 0
    out = capsys.readouterr().out
    assert _line(out, "3 dilated w=16384 r=6").split()[4] == "local"
    assert "spans 2 ranks" in _line(out, "4 dilated w=32768 r=12")
    assert "(32)" in _line(out, "4 ")  # 32 subgroups of 2


@pytest.mark.parametrize("argv,message", [
    (["-n", "1000", "-p", "3"], "N=1000 is not divisible by the world size P=3"),
    (["-n", "1000000", "-p", "8"], "branch 0 (dilated w=2048 r=1)"),
    # l = 16384: w=32768 spans 2 ranks, but P=3 ranks leave the last segment cut in half
    (["-n", "49152", "-p", "3"], "branch 4 (dilated w=32768 r=12)"),
    (["-n", "65536", "-p", "2", "--heads", "12", "--kv-heads", "5"], "multiple of kv_heads"),
    (["-n", "4096", "-p", "2", "--dtype", "int8"], "invalid choice"),
    (["-p", "2"], "--seq-len"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert _exit_code(["plan", "longnet-lm", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("pattern,message", [
    ("sliding-window", "window branches are not supported distributed yet"),
    ("sink-window", "global branches are not supported distributed yet"),
])
def test_unsupported_branch_kinds(pattern, message, capsys):
    assert _exit_code(["plan", pattern, "-n", "4096", "-p", "2"]) == 2
    assert message in capsys.readouterr().err
