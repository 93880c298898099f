"""One name for a dtype: every command that takes --dtype takes torch's names (float16, bfloat16,
float32, float64 where it makes sense) and the short ones (fp16, bf16, fp32, fp64, half, ...),
lists torch's names in --help, and refuses anything else in one line that lists the choices."""

from __future__ import annotations

import argparse

import pytest

from spattn.cli import check_cmd
from spattn.cli.args import DTYPE_ALIASES, DTYPES, dtype_parser
from spattn.cli.main import main

# every command taking --dtype: a command line before it, and the dtypes it takes
COMMANDS = {
    "run": (["run", "sliding-window", "-n", "32", "--repeat", "1", "--no-baseline",
             "--check-rows", "1"], DTYPES),
    "plan": (["plan", "longnet-lm", "-n", "4096", "-p", "2"], DTYPES),
    "check": (["check", "longnet-lm", "--target", "sm_90", "--head-dim", "64"],
              ("float16", "bfloat16", "float32")),
}
SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}
CASES = [(command, name) for command, (_, names) in COMMANDS.items() for name in names]


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as stop:
        return int(stop.code or 0)


@pytest.fixture
def checked(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The dtypes `spattn check` would compile for, without compiling anything."""
    calls: list[list[str]] = []

    def check(pattern, target, dtypes, head_dims, progress):
        calls.append(list(dtypes))
        return []

    monkeypatch.setattr(check_cmd, "check", check)
    return calls


def test_the_parser_maps_every_spelling_to_torch_names() -> None:
    parse = dtype_parser()
    for name in DTYPES:
        assert parse(name) == parse(f"torch.{name}") == parse(name.upper()) == name
    for alias, name in DTYPE_ALIASES.items():
        assert parse(alias) == name
    with pytest.raises(argparse.ArgumentTypeError, match="choose from float16, bfloat16"):
        parse("int8")
    with pytest.raises(argparse.ArgumentTypeError, match=r"'fp64' \(choose from float16, float32;"):
        dtype_parser(("float16", "float32"))("fp64")  # a name only where it makes sense


@pytest.mark.parametrize("command, name", CASES)
def test_torch_and_short_names_do_the_same(command: str, name: str, checked: list[list[str]],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    argv = COMMANDS[command][0]
    outputs = []
    for spelling in (name, SHORT[name]):
        assert _run([*argv, "--dtype", spelling]) in (0, 1)
        out = capsys.readouterr().out
        outputs.append(out.split("ms")[0] if command == "run" else out)  # times differ
    assert outputs[0] == outputs[1]
    if command == "check":
        assert checked[0] == checked[1] and len(checked[0]) == 1
    elif command == "run":
        assert f" {name} " in outputs[0]  # the run's header names torch's dtype


def test_check_defaults_to_every_dtype(checked: list[list[str]]) -> None:
    assert _run(COMMANDS["check"][0]) in (0, 1)
    assert _run([*COMMANDS["check"][0], "--dtype", "float16", "bf16", "--dtype", "half"]) in (0, 1)
    assert checked == [["fp16", "bf16", "fp32"], ["fp16", "bf16"]]  # the compiler's own names


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_lists_torch_names(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert ", ".join(COMMANDS[command][1]) in text


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("dtype", ["int8", "fp8", "float", "Float16x"])
def test_an_unknown_dtype_is_one_line_listing_the_choices(
        command: str, dtype: str, checked: list[list[str]],
        capsys: pytest.CaptureFixture[str]) -> None:
    names = COMMANDS[command][1]
    status = _run([*COMMANDS[command][0], "--dtype", dtype])
    err = capsys.readouterr().err
    if dtype == "float":  # torch's float is float32: taken everywhere
        assert status in (0, 1), err
        return
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("spattn: error: ") and ", ".join(names) in err and "Traceback" not in err
