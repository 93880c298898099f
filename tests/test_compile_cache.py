"""The compile cache and emitted files: never trusted blindly, never junk, safe under concurrent
first uses, and clear errors where nothing can be written."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
import time
from importlib import resources
from types import SimpleNamespace

import pytest
import torch
from planted import KINDS, finishes, plant

import spattn
from spattn.compiler import codegen, files
from spattn.runtime import triton_backend

TINY = {"name": "tiny", "causal": True, "branches": [{"segment": 8, "dilation": 2},
                                                     {"window": {"size": 3}}]}


@pytest.fixture(autouse=True)
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPATTN_CACHE_DIR", str(tmp_path / "cache"))
    triton_backend._loaded.clear()
    yield
    triton_backend._loaded.clear()


def _tiny(**changes) -> spattn.Pattern:
    return spattn.Pattern.model_validate({**TINY, **changes})


def _agrees(pattern: spattn.Pattern) -> None:
    q, k, v = torch.randn(3, 1, 2, 20, 16, generator=torch.Generator().manual_seed(0))
    out = spattn.attention(q, k, v, pattern, backend="triton")
    assert (out - spattn.attention(q, k, v, pattern, backend="torch")).abs().max() < 1e-4


def test_cache_key_covers_pattern_and_emitter(monkeypatch, tmp_path):
    path = triton_backend.cache_path(_tiny())
    key = codegen.emitter_key()
    assert path.parent.name == f"{_tiny().content_hash()}-{key}"
    assert triton_backend.cache_path(_tiny(causal=False)) != path
    # a template's contents, and the triton, spattn and jinja2 versions
    templates = tmp_path / "root" / "templates"
    shutil.copytree(resources.files("spattn.compiler").joinpath("templates"), templates)
    with (templates / "kernels.py.jinja").open("a") as f:
        f.write("# changed\n")
    changes = [(codegen, "resources", SimpleNamespace(files=lambda _: tmp_path / "root"))]
    changes += [(module, "__version__", "0.0.0-test")
                for module in (codegen.triton, spattn, codegen.jinja2)]
    for module, attribute, value in changes:
        with monkeypatch.context() as patch:
            patch.setattr(module, attribute, value)
            codegen.emitter_key.cache_clear()
            assert triton_backend.cache_path(_tiny()).parent.name != path.parent.name
    codegen.emitter_key.cache_clear()
    assert triton_backend.cache_path(_tiny()) == path
    header = codegen.read_header(codegen.compile_module(_tiny(), path.parent))
    assert header == {"pattern": "tiny", "hash": _tiny().content_hash(),
                      "version": spattn.__version__, "emitter": codegen.emitter_key()}


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "other-pattern"])
def test_a_damaged_cached_module_is_rebuilt(damage):
    pattern = _tiny()
    path = triton_backend.cache_path(pattern)
    good = codegen.render(pattern)
    # the other pattern's module, named like this one: imports fine, computes something else
    other = codegen.render(_tiny(branches=[{"segment": 4, "dilation": 1}]))
    bad = {"truncated": good[: len(good) // 2].encode(), "empty": b"",
           "garbage": b"\x00\xff garbage(", "other-pattern": other.encode()}[damage]
    path.parent.mkdir(parents=True)
    path.write_bytes(bad)
    _agrees(pattern)
    assert path.read_text() == good
    assert sorted(p.name for p in path.parent.iterdir()) == [".lock", "tiny.py"]


def test_cached_modules_are_imported_under_unique_names():
    torch_named = _tiny(name="torch")
    _agrees(torch_named)
    assert sys.modules["torch"] is torch
    module = triton_backend.compiled_module(torch_named)
    assert module.__name__.startswith("_spattn_generated_") and module.__name__ not in sys.modules
    assert not list(triton_backend.cache_path(torch_named).parent.glob("__pycache__"))


def test_a_valid_read_only_cache_is_used_without_writing(monkeypatch):
    pattern = _tiny()
    triton_backend.compiled_module(pattern)
    triton_backend._loaded.clear()
    monkeypatch.setattr(files.os, "open", _read_only(os.open))
    monkeypatch.setattr(triton_backend, "open", _refuse, raising=False)
    _agrees(pattern)


def _refuse(path, *args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied", str(path))


def _read_only(real_open):
    """os.open on a read-only file system: opening to read works, to write or create not."""
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def open_(path, flags, *args, **kwargs):
        if flags & writes:
            _refuse(path)
        return real_open(path, flags, *args, **kwargs)
    return open_


@pytest.mark.parametrize("where", ["a-file", "read-only"])
def test_an_unwritable_cache_is_a_clear_error(where, tmp_path, monkeypatch):
    if where == "a-file":
        (tmp_path / "blocker").write_text("")
        monkeypatch.setenv("SPATTN_CACHE_DIR", str(tmp_path / "blocker"))
    else:
        monkeypatch.setattr(files.os, "open", _refuse)
        monkeypatch.setattr(triton_backend, "open", _refuse, raising=False)
    with pytest.raises(spattn.SpattnError, match="set SPATTN_CACHE_DIR to a writable folder"):
        _agrees(_tiny())
    monkeypatch.undo()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_emitted_files_get_the_mode_open_gives(umask, mode, tmp_path):
    old = os.umask(umask)
    try:
        path = codegen.compile_module(_tiny(), tmp_path)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


def test_stale_temporary_files_are_cleaned_and_live_ones_kept(tmp_path):
    path = tmp_path / "tiny.py"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    killed = tmp_path / f".tiny.py.{dead}@{files._HOST}.1a2b3c4d.tmp"  # writer gone
    live = files.temp_path(path)  # this process: a concurrent writer
    old = tmp_path / ".tiny.py.abc_123.tmp"  # an old-style name, hours old
    elsewhere = tmp_path / f".tiny.py.{dead}@another-host.00000000.tmp"  # can't tell: kept
    other = tmp_path / f".other.py.{dead}@{files._HOST}.00000000.tmp"  # another module's
    for temp in (killed, live, old, elsewhere, other):
        temp.write_text("partial")
    hours_ago = time.time() - 2 * files.STALE_AFTER_S
    os.utime(old, (hours_ago, hours_ago))
    codegen.compile_module(_tiny(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (path, live, elsewhere, other))


def test_a_killed_compile_is_cleaned_up_by_the_next(tmp_path):
    script = textwrap.dedent(f"""
        import os, spattn
        from spattn.compiler import codegen
        os.fsync = lambda fd: os._exit(9)  # dies holding a half-written temporary file
        codegen.compile_module(spattn.Pattern.model_validate({TINY!r}), {str(tmp_path)!r})
    """)
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    assert len(list(tmp_path.glob(".tiny.py.*.tmp"))) == 1
    codegen.compile_module(_tiny(), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.py"]


# One process imports spattn, then forks 8 that wait at a barrier (the pipe's write end closing)
# and then all make their first use of the pattern at once: no 8 torch imports on a small machine.
# Every write of a cached module is logged (one line each, appended) to count them.
RACE = textwrap.dedent("""
    import os, traceback
    import torch, spattn
    from spattn.compiler import files
    pattern = spattn.Pattern.model_validate({tiny!r})
    write = files.write_atomically
    def logged(path, text):
        with open({log!r}, "a") as log:
            log.write(f"{{path}}\\n")
        write(path, text)
    files.write_atomically = logged
    barrier, go = os.pipe()
    children = []
    for _ in range(8):
        pid = os.fork()
        if pid == 0:
            os.close(go)
            os.read(barrier, 1)
            try:
                q, k, v = torch.randn(3, 1, 2, 20, 16, generator=torch.Generator().manual_seed(0))
                out = spattn.attention(q, k, v, pattern, backend="triton")
                ref = spattn.attention(q, k, v, pattern, backend="torch")
                os._exit(0 if (out - ref).abs().max() < 1e-4 else 1)
            except BaseException:
                traceback.print_exc()
                os._exit(2)
        children.append(pid)
    os.close(go)
    print([os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children])
""")


def test_eight_processes_first_use_at_once(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "SPATTN_CACHE_DIR": str(tmp_path / "cache")}
    log = tmp_path / "writes.log"
    done = subprocess.run([sys.executable, "-c", RACE.format(tiny=TINY, log=str(log))],
                          capture_output=True, text=True, env=env, timeout=300)  # hang guard
    assert done.returncode == 0 and done.stdout.strip() == str([0] * 8), done.stderr
    folder = (tmp_path / "cache" / triton_backend.cache_path(_tiny()).parent.name)
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "tiny.py"]
    # under the lock, the first writes the module and the other seven find it written
    assert log.read_text().splitlines() == [str(folder / "tiny.py")]


@pytest.mark.parametrize("kind", KINDS)
def test_a_planted_lock_is_not_followed_or_waited_on(kind, tmp_path):
    folder = triton_backend.cache_path(_tiny()).parent
    folder.mkdir(parents=True)
    untouched = plant(folder / ".lock", kind, tmp_path / "outside")
    finishes(lambda: _agrees(_tiny()))  # done without the lock: still the right module
    untouched()
    assert triton_backend.cache_path(_tiny()).read_text() == codegen.render(_tiny())
    assert sorted(p.name for p in (tmp_path / "outside").iterdir()) == (
        ["target"] if kind == "link-to-file" else [])


def test_a_lock_held_too_long_is_not_waited_on_forever(monkeypatch):
    import fcntl

    folder = triton_backend.cache_path(_tiny()).parent
    folder.mkdir(parents=True)
    holder = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # a stuck process holds it
    monkeypatch.setattr(triton_backend, "LOCK_WAIT_S", 0.1)
    try:
        finishes(lambda: _agrees(_tiny()))
    finally:
        os.close(holder)
    assert triton_backend.cache_path(_tiny()).read_text() == codegen.render(_tiny())


@pytest.mark.parametrize("kind", KINDS)
def test_a_planted_module_is_refused_not_followed_or_replaced(kind, tmp_path):
    path = triton_backend.cache_path(_tiny())
    path.parent.mkdir(parents=True)
    # even a link to exactly the right text elsewhere is not used
    untouched = plant(path, kind, tmp_path / "outside", text=codegen.render(_tiny()))
    with pytest.raises(triton_backend.CacheError, match="not a regular file") as error:
        finishes(lambda: triton_backend.compiled_module(_tiny()))
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    untouched()


def test_a_pattern_folder_linked_elsewhere_is_not_written_through(tmp_path):
    folder = triton_backend.cache_path(_tiny()).parent
    folder.parent.mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    folder.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(triton_backend.CacheError, match="symbolic link, not a folder"):
        finishes(lambda: triton_backend.compiled_module(_tiny()))
    assert list((tmp_path / "elsewhere").iterdir()) == []
