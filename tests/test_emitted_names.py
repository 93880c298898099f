"""Emitted module names: every import line `spattn compile` prints works, or the name is refused
with one line; one pattern's module never silently replaces another's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from spattn.cli.main import main
from spattn.compiler.names import check_module_name
from spattn.errors import SpattnError


def _pattern_file(folder, name, causal=False):
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "causal": causal,
                                    "branches": [{"segment": 8, "dilation": 2}]}))
    return str(path)


def _error(capsys):
    err = capsys.readouterr().err
    assert err.startswith("spattn: error: ") and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("name,why", [
    ("class", "keyword"), ("import", "keyword"), ("torch", "shadow a package"),
    ("triton", "shadow a package"), ("spattn", "shadow a package"), ("numpy", "shadow a package"),
    ("os", "standard library"), ("json", "standard library"), ("pytest", "installed module"),
])
def test_names_that_cannot_be_imported_or_would_shadow_are_refused(name, why, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compile", _pattern_file(tmp_path, name), "-o", str(out)]) == 2
    err = _error(capsys)
    assert f"'{name}'" in err and why in err and "--module" in err
    assert not out.exists()
    # --module picks a working name for the same pattern
    assert main(["compile", _pattern_file(tmp_path, name), "-o", str(out), "--module",
                 f"{name}_attn"]) == 0
    assert (out / f"{name}_attn.py").exists() and (out / f"{name}_attn.plan.json").exists()


@pytest.mark.parametrize("module", ["os", "for", "a-b", "1x", "a.b", "__init__", "héllo"])
def test_module_option_is_checked_the_same_way(module, tmp_path, capsys):
    assert main(["compile", "longnet-lm", "-o", str(tmp_path / "o"), "--module", module]) == 2
    assert f"'{module}'" in _error(capsys)


def test_a_folder_of_that_name_in_the_output_folder_is_refused(tmp_path):
    (tmp_path / "longnet_lm").mkdir()
    with pytest.raises(SpattnError, match="names a folder"):
        check_module_name("longnet_lm", tmp_path)


def test_another_patterns_module_is_not_overwritten(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["compile", _pattern_file(tmp_path, "a-b"), "-o", out]) == 0
    first = (tmp_path / "out" / "a_b.py").read_bytes()
    assert main(["compile", _pattern_file(tmp_path, "a_b"), "-o", out]) == 2
    err = _error(capsys)
    assert "'a-b'" in err and "'a_b'" in err
    assert (tmp_path / "out" / "a_b.py").read_bytes() == first
    # the same pattern again (here changed) overwrites its own module
    changed = _pattern_file(tmp_path, "a-b", causal=True)
    assert main(["compile", changed, "-o", out]) == 0
    assert (tmp_path / "out" / "a_b.py").read_bytes() != first
    # a file spattn did not write is not overwritten either
    (tmp_path / "out" / "mine.py").write_text("precious = 1\n")
    assert main(["compile", "longnet-lm", "-o", out, "--module", "mine"]) == 2
    assert "not a spattn module" in _error(capsys)
    assert (tmp_path / "out" / "mine.py").read_text() == "precious = 1\n"


def test_printed_import_lines_work_in_a_fresh_process(tmp_path, capsys):
    """Each printed line, run as is from another folder, imports the module it names."""
    out = tmp_path / "out dir"  # a space in the path too
    lines = {}
    for pattern, extra in (("a-b", []), ("2x", []), ("class", ["--module", "klass"])):
        assert main(["compile", _pattern_file(tmp_path, pattern), "-o", str(out), *extra]) == 0
        printed = capsys.readouterr().out.strip().splitlines()[-1]
        lines[pattern] = printed.split("use it with: ", 1)[1]
    script = "import torch\nq = torch.randn(1, 1, 16, 16)\n"
    for pattern, line in lines.items():
        script += f"{line}\nassert attention(q, q, q).shape == q.shape\n"
        script += f"assert attention.__globals__['PATTERN']['name'] == {pattern!r}\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr
    assert {line.split()[-3] for line in lines.values()} == {"a_b", "p_2x", "klass"}


def test_the_compile_cache_needs_no_name_check(tmp_path, monkeypatch):
    """The cache imports modules under unique names: a pattern named `os` runs."""
    import torch

    import spattn

    monkeypatch.setenv("SPATTN_CACHE_DIR", str(tmp_path))
    pattern = spattn.Pattern.model_validate({"name": "os", "branches": [{"segment": 8,
                                                                          "dilation": 2}]})
    q = torch.randn(1, 1, 16, 16)
    out = spattn.attention(q, q, q, pattern, backend="triton")
    assert (out - spattn.attention(q, q, q, pattern, backend="torch")).abs().max() < 1e-4
    assert sys.modules["os"] is os


def test_check_module_name_accepts_plain_names(tmp_path):
    assert check_module_name("longnet_lm", tmp_path) == "longnet_lm"
    assert check_module_name("match", tmp_path) == "match"  # soft keywords import fine


def test_recompiling_into_a_folder_on_sys_path(tmp_path, monkeypatch):
    """The module being rewritten does not shadow itself; the same name elsewhere would."""
    (tmp_path / "mine_attn.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert check_module_name("mine_attn", ".") == "mine_attn"
    with pytest.raises(SpattnError, match="would shadow the installed module mine_attn"):
        check_module_name("mine_attn", tmp_path / "elsewhere")
