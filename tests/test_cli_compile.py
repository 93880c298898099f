"""`spattn compile`: files written, what it prints, and clean errors."""

from __future__ import annotations

import errno
import json
import os
import time

import pytest

from spattn.cli.main import main


def test_compile_writes_module_and_plan(tmp_path, capsys):
    start = time.perf_counter()
    assert main(["compile", "longnet-lm", "-o", str(tmp_path), "--head-dim", "64"]) == 0
    assert time.perf_counter() - start < 1.0
    out = capsys.readouterr().out
    module, plan = tmp_path / "longnet_lm.py", tmp_path / "longnet_lm.plan.json"
    assert module.exists() and plan.exists() and str(module) in out and str(plan) in out
    data = json.loads(plan.read_text())
    assert data["pattern"] == "longnet-lm" and data["seq_len"] == 32768
    assert 0 < data["density"] < 1 and data["forward_flops"] == 4 * 64 * data["pairs"]
    assert "HEAD_DIM=64" in module.read_text()  # a fixed head_dim becomes a constexpr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["longnet_lm.plan.json", "longnet_lm.py"]


@pytest.mark.parametrize("argv,message", [
    (["compile", "longnet-lm", "-o", "OUT", "--heads", "8", "--kv-heads", "3"], "kv_heads"),
    (["compile", "longnet-lm", "-o", "OUT", "--heads", "0"], "expected an integer from 1"),
    (["compile", "nope", "-o", "OUT"], "no built-in pattern"),
    (["compile", "bigbird", "-o", "OUT", "--seq-len", "1e9"], "smaller --seq-len"),
    (["compile", "longnet-lm", "-o", "OUT", "--seq-len", "1e13"], "(2^40)"),
])
def test_compile_errors_are_one_line(argv, message, tmp_path, capsys):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    try:
        status = main(argv)
    except SystemExit as stop:  # argparse's own errors
        status = stop.code
    assert status == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def _one_line_error(capsys, message):
    err = capsys.readouterr().err
    assert err.startswith("spattn: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1


def _left(folder):
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else None


def test_an_output_folder_under_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["compile", "longnet-lm", "-o", str(tmp_path / "file" / "out")]) == 2
    _one_line_error(capsys, "Not a directory")
    assert _left(tmp_path) == ["file"]


@pytest.mark.parametrize("failure", ["read-only", "disk-full-module", "disk-full-plan"])
def test_unwritable_output_is_one_line_and_leaves_nothing(failure, tmp_path, capsys,
                                                            monkeypatch):
    from spattn.compiler import files

    out = tmp_path / "new" / "out"
    if failure == "read-only":  # as root, chmod does not stop writes: refuse them here
        def refuse(path, *args):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        monkeypatch.setattr(files.os, "open", refuse)
    else:
        calls = []
        fsync = os.fsync

        def full(fd):
            calls.append(fd)
            if failure == "disk-full-module" or len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            fsync(fd)
        monkeypatch.setattr(files.os, "fsync", full)
    assert main(["compile", "longnet-lm", "-o", str(out)]) == 2
    monkeypatch.undo()
    _one_line_error(capsys, "Permission denied" if failure == "read-only"
                    else "No space left on device")
    assert _left(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder(tmp_path, capsys):
    tmp_path.chmod(0o500)
    try:
        assert main(["compile", "longnet-lm", "-o", str(tmp_path)]) == 2
    finally:
        tmp_path.chmod(0o700)
    _one_line_error(capsys, "Permission denied")
    assert _left(tmp_path) == []
