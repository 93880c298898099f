"""`spattn compile`: files written, what it prints, and clean errors."""

from __future__ import annotations

import json
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
    (["compile", "longnet-lm", "-o", "OUT", "--heads", "0"], "--heads must be at least 1"),
    (["compile", "nope", "-o", "OUT"], "no built-in pattern"),
])
def test_compile_errors_are_one_line(argv, message, tmp_path, capsys):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
