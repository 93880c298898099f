"""`spattn run` and the command-line conventions shared by every subcommand."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from spattn.cli.main import main


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as stop:  # argparse's own errors
        return int(stop.code)


def test_run_reports_time_and_a_float64_check(capsys):
    assert main(["run", "longnet-lm", "--seq-len", "300", "--heads", "2", "--head-dim", "8",
                 "--backward", "--check-rows", "3"]) == 0
    out = capsys.readouterr().out
    assert "forward" in out and "backward" in out and "all finite" in out
    error = float(re.search(r"max abs error (\S+)", out).group(1))
    assert error < 1e-5


@pytest.mark.parametrize("argv,message", [
    (["run", "longnet-lm", "--seq-len", "8", "--heads", "0"], "--heads must be at least 1"),
    (["run", "no-such-pattern", "--seq-len", "8"], "no built-in pattern"),
    (["run", "longnet-lm", "--seq-len", "8", "--heads", "4", "--kv-heads", "3"],
     "multiple of k/v's heads"),
    (["run", "longnet-lm", "--seq-len", "8", "--backend", "nope"], "unknown backend"),
    (["run", "longnet-lm"], "--seq-len"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_console_script_help_and_version():
    for argv in (["--help"], ["run", "--help"], ["inspect", "--help"], ["list", "--help"]):
        done = subprocess.run([sys.executable, "-m", "spattn.cli.main", *argv],
                              capture_output=True, text=True)
        assert done.returncode == 0 and "usage: spattn" in done.stdout
    done = subprocess.run([sys.executable, "-m", "spattn.cli.main", "--version"],
                          capture_output=True, text=True)
    assert done.stdout.startswith("spattn ")
