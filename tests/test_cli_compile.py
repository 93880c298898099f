"""`spattn compile`: files written, what it prints, and clean errors."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest
from planted import KINDS, finishes, plant

from spattn.cli import compile_cmd
from spattn.cli.main import main


def test_compile_writes_module_and_plan(tmp_path, capsys, monkeypatch):
    calls = _count(monkeypatch, "render", "build_plan", "write_atomically")
    assert main(["compile", "longnet-lm", "-o", str(tmp_path), "--head-dim", "64"]) == 0
    # one module rendered, one plan built, two files written: no work beyond them
    assert calls == {"render": 1, "build_plan": 1, "write_atomically": 2}
    out = capsys.readouterr().out
    module, plan = tmp_path / "longnet_lm.py", tmp_path / "longnet_lm.plan.json"
    assert module.exists() and plan.exists() and str(module) in out and str(plan) in out
    data = json.loads(plan.read_text())
    assert data["pattern"] == "longnet-lm" and data["seq_len"] == 32768
    assert 0 < data["density"] < 1 and data["forward_flops"] == 4 * 64 * data["pairs"]
    assert "HEAD_DIM=64" in module.read_text()  # a fixed head_dim becomes a constexpr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["longnet_lm.plan.json", "longnet_lm.py"]


def _count(monkeypatch, *names):
    """Count the calls compile_cmd makes to each of `names`."""
    calls = dict.fromkeys(names, 0)

    def counting(name, real):
        def counted(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return counted
    for name in names:
        monkeypatch.setattr(compile_cmd, name, counting(name, getattr(compile_cmd, name)))
    return calls


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


@pytest.mark.parametrize("which", ["module", "plan", "lock"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_planted_output_is_refused_in_one_line(which, kind, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    name = {"module": "longnet_lm.py", "plan": "longnet_lm.plan.json",
            "lock": ".longnet_lm.lock"}[which]
    untouched = plant(out / name, kind, tmp_path / "outside")
    assert finishes(lambda: main(["compile", "longnet-lm", "-o", str(out)])) == 2
    _one_line_error(capsys, "not a regular file")
    untouched()
    assert [p.name for p in out.iterdir()] == [name]  # nothing written beside it


# Compiles of two patterns with one module name (a-b and a_b) race into one folder. One process
# imports spattn and, each round, forks one child per pattern; they wait at a barrier (the
# pipe's write end closing) and run `spattn compile` at once, each child's stderr to a file.
RACE = textwrap.dedent("""
    import json, os, sys
    from spattn.cli.main import main
    root, rounds, patterns = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    codes = []
    for r in range(rounds):
        barrier, go = os.pipe()
        children = []
        for i, pattern in enumerate(patterns):
            pid = os.fork()
            if pid == 0:
                os.close(go)
                os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
                os.dup2(os.open(f"{root}/{r}.{i}.err", os.O_WRONLY | os.O_CREAT, 0o644), 2)
                os.read(barrier, 1)
                try:
                    code = main(["compile", pattern, "-o", f"{root}/out{r}"])
                except BaseException:
                    code = 3
                sys.stderr.flush()
                os._exit(code)
            children.append(pid)
        os.close(barrier)
        os.close(go)
        codes.append([os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in children])
    print(json.dumps(codes))
""")


def test_concurrent_compiles_of_one_module_name_never_mix(tmp_path):
    patterns = []
    for name, branch in (("a-b", "{segment: 64, dilation: 2}"), ("a_b", "{window: {size: 16}}")):
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"name: {name}\ncausal: true\nbranches:\n  - {branch}\n")
        patterns.append(str(path))
    rounds = 6
    done = subprocess.run([sys.executable, "-c", RACE, str(tmp_path), str(rounds), *patterns],
                          capture_output=True, text=True, timeout=300)  # hang guard
    assert done.returncode == 0, done.stderr
    for r, codes in enumerate(json.loads(done.stdout)):
        assert sorted(codes) == [0, 2], (r, codes)  # exactly one wins
        loser = (tmp_path / f"{r}.{codes.index(2)}.err").read_text()
        assert loser.startswith("spattn: error: ") and len(loser.strip().splitlines()) == 1
        assert "refusing to overwrite" in loser, loser
        out = tmp_path / f"out{r}"
        assert sorted(p.name for p in out.iterdir()) == ["a_b.plan.json", "a_b.py"]
        winner = ["a-b", "a_b"][codes.index(0)]
        assert f"# spattn-pattern: {winner}\n" in (out / "a_b.py").read_text()
        assert json.loads((out / "a_b.plan.json").read_text())["pattern"] == winner


def test_warm_compiles_every_kernel_into_tritons_cache(tmp_path, monkeypatch, capsys):
    """`spattn compile --warm`: the module's kernels, compiled ahead of time on all cores into
    the cache triton's runtime reads, one file set per kernel (4 for longnet-lm at one dtype
    and head dim: forward, backward rows and columns, decoding)."""
    cache = tmp_path / "triton-cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    status = main(["compile", "longnet-lm", "-o", str(tmp_path / "out"), "--head-dim", "64",
                   "--warm", "--target", "sm_90", "--dtype", "fp16"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "warmed 4/4 kernels" in out and "for sm_90" in out, out
    cubins = sorted(p.name for p in cache.rglob("*.cubin"))
    assert len(cubins) == 4 and {"_dilated_rows.cubin", "_dilated_cols.cubin",
                                 "_decode_rows.cubin"} <= set(cubins), cubins


def test_warm_without_a_gpu_needs_a_target(tmp_path, capsys):
    assert main(["compile", "longnet-lm", "-o", str(tmp_path), "--warm"]) == 2
    assert "--warm needs --target" in capsys.readouterr().err
