"""Odd command lines: every one ends in a result or one line and exit 2, in bounded memory,
never an internal error."""

from __future__ import annotations

import pytest
from work_meter import metered

from spattn.cli.main import main

OK = "name: x\nbranches:\n  - {segment: 8, dilation: 2}\n"


@pytest.fixture
def files(tmp_path):
    (tmp_path / "ok.yaml").write_text(OK)
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe")
    (tmp_path / "trunc.yaml").write_text("name: x\nbranches: [")
    (tmp_path / "dir").mkdir()
    return tmp_path


ARGVS = [line.split() for line in """\
inspect {dir} -n 10
inspect {bin} -n 10
inspect {trunc} -n 10
inspect /dev/null -n 10
inspect {ok} -n 0
inspect {ok} -n -5
inspect {ok} -n 10 --heads 100000
inspect {ok} -n 10 --png /nonexistent/dir/x.png
inspect {ok} -n 10 --png {dir}
inspect {ok} -n 10 --scale 0
inspect {ok} -n 10 --scale 1e30
inspect {ok} -n 10 --head 99
compile {ok} -o /dev/null
compile {ok} -o {ok}
compile {ok} -o {dir}/c --module 1abc
compile {ok} -o {dir}/c --module sys
compile {ok} -o {dir}/c --heads 3 --kv-heads 2
plan {ok} -n 16 --world-size 0
plan {ok} -n 16 --world-size 3
plan {ok} -n 1e12 --world-size 1e12
run {ok} -n 16 --dtype int8
run {ok} -n 16 --repeat 0
run {ok} -n 16 --check-rows -1
run {ok} -n 16 --heads 65537
run {ok} -n 16 --batch 1e9
list extra
nonsense""".splitlines()]


@pytest.mark.parametrize("argv", ARGVS, ids=[" ".join(a) for a in ARGVS])
def test_odd_command_lines_end_cleanly(argv, files, capsys):
    argv = [a.format(ok=files / "ok.yaml", bin=files / "bin.yaml", trunc=files / "trunc.yaml",
                     dir=files / "dir") for a in argv]
    with metered() as meter:
        try:
            status = main(argv)
        except SystemExit as stop:  # argparse's own errors
            status = stop.code
    err = capsys.readouterr().err
    # every one is refused, or done on a few tokens: nothing sizeable is evaluated or drawn
    assert meter.cells <= 10**4 and meter.draws <= 64 and meter.peak_mb < 64, meter
    assert status in (0, 2), err
    assert "internal error" not in err and "Traceback" not in err
    if status == 2:
        assert len(err.strip().splitlines()) == 1, err
