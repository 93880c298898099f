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
    assert main(["run", "longnet-lm", "--seq-len", "3e2", "--heads", "2", "--head-dim", "8",
                 "--backward", "--check-rows", "3", "--repeat", "3"]) == 0
    out = capsys.readouterr().out
    assert "forward+backward" in out and "all finite" in out
    assert "median of 3 after a warm-up" in out
    ms = float(re.search(r"forward\+backward\s+(\S+) ms", out).group(1))
    dense_ms = float(re.search(r"dense SDPA\s+(\S+) ms", out).group(1))
    ratio = float(re.search(r"spattn takes (\S+)x its time", out).group(1))
    # the ratio of the unrounded times: within what rounding to 0.1 ms allows
    assert (ms - 0.05) / (dense_ms + 0.05) - 0.01 <= ratio <= (ms + 0.05) / max(
        dense_ms - 0.05, 1e-9) + 0.01
    error = float(re.search(r"max abs error (\S+)", out).group(1))
    assert error < 1e-5


def test_run_without_baseline(capsys):
    assert main(["run", "sliding-window", "-n", "1_000", "--heads", "1", "--head-dim", "8",
                 "--no-baseline", "--repeat", "1", "--check-rows", "0"]) == 0
    out = capsys.readouterr().out
    assert "dense SDPA" not in out and "median of 1" in out


def test_every_run_option_has_help():
    from spattn.cli.main import build_parser

    run = build_parser()._subparsers._group_actions[0].choices["run"]
    for action in run._actions:
        assert action.help, f"{action.option_strings or action.dest} has no help text"


def test_sizes_too_large_for_memory_are_refused_before_allocating(capsys):
    assert _exit_code(["run", "longnet-lm", "--seq-len", "1e12"]) == 2
    err = capsys.readouterr().err
    assert "GiB" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("error,message", [
    (TypeError("boom"), "internal error (TypeError: boom); this is a bug in spattn"),
    (PermissionError(13, "Permission denied", "/x"), "/x: Permission denied"),
    (OSError(28, "No space left on device"), "No space left on device"),
    (MemoryError(), "out of memory"),
    (RecursionError(), "nested too deeply"),
    (ValueError("x\n" * 1000), "..."),
])
def test_unexpected_errors_are_still_one_line_and_exit_2(monkeypatch, capsys, error, message):
    from spattn.cli import list_cmd

    def fail(args):
        raise error

    monkeypatch.setattr(list_cmd, "run", fail)
    monkeypatch.delenv("SPATTN_DEBUG", raising=False)
    assert _exit_code(["list"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and len(err) < 500


@pytest.mark.parametrize("argv,message", [
    (["run", "longnet-lm", "--seq-len", "8", "--heads", "0"], "expected an integer from 1"),
    (["run", "longnet-lm", "--seq-len", "1e13"], "(2^40)"),
    (["run", "longnet-lm", "--seq-len", "nan"], "--seq-len"),
    (["run", "longnet-lm", "--seq-len", "16", "--heads", "65536"], "pieces"),
    (["plan", "longnet-lm", "--seq-len", "1e12", "--world-size", "1e12"], "2^20"),
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
