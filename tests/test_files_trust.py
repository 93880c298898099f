"""spattn.compiler.files: what spattn writes, reads back and locks is a regular file, or refused;
nothing planted is followed, replaced or waited on forever."""

from __future__ import annotations

import os

import pytest
from planted import KINDS, finishes, plant

from spattn.compiler import files


@pytest.mark.parametrize("kind", KINDS)
def test_write_atomically_refuses_what_is_not_a_regular_file(kind, tmp_path):
    path = tmp_path / "out" / "x.py"
    path.parent.mkdir()
    untouched = plant(path, kind, tmp_path / "outside")
    with pytest.raises(files.NotRegularFileError, match="not a regular file"):
        finishes(lambda: files.write_atomically(path, "text"))
    untouched()
    assert [p.name for p in path.parent.iterdir()] == ["x.py"]  # no temporary file left


@pytest.mark.parametrize("kind", KINDS)
def test_read_regular_refuses_what_is_not_a_regular_file(kind, tmp_path):
    path = tmp_path / "x.json"
    untouched = plant(path, kind, tmp_path / "outside")
    with pytest.raises(files.NotRegularFileError):
        finishes(lambda: files.read_regular(path, 100))
    untouched()


def test_read_regular_is_bounded(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"0123456789")
    assert files.read_regular(path, 10) == b"0123456789"
    with pytest.raises(OSError, match="larger than 9 bytes"):
        files.read_regular(path, 9)
    assert files.read_regular(path, 4, truncate=True) == b"0123"


@pytest.mark.parametrize("kind", KINDS)
def test_a_lock_never_opens_a_planted_file(kind, tmp_path):
    path = tmp_path / ".lock"
    untouched = plant(path, kind, tmp_path / "outside")

    def take():
        with files.locked(path, wait_s=60.0):
            pass
    with pytest.raises(files.LockError):
        finishes(take)
    untouched()


def test_a_lock_held_too_long_is_an_error_not_a_hang(tmp_path):
    import fcntl

    path = tmp_path / ".lock"
    holder = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another open file: conflicts even in this process
    try:
        def take():
            with files.locked(path, wait_s=0.2):
                pass
        with pytest.raises(files.LockError, match="held by another process"):
            finishes(take)
    finally:
        os.close(holder)
    with files.locked(path, wait_s=0.2):  # released: taken at once
        pass


def test_a_removed_lock_leaves_nothing_and_is_taken_again(tmp_path):
    path = tmp_path / ".x.lock"
    for _ in range(2):
        with files.locked(path, wait_s=1.0, remove=True):
            assert path.exists()
        assert not path.exists()


@pytest.mark.parametrize("kind", ["fifo", "link-to-file", "dangling-link"])
def test_stale_cleanup_removes_only_regular_temporary_files(kind, tmp_path):
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    planted = tmp_path / f".x.py.{dead}@{files._HOST}.00000000.tmp"
    untouched = plant(planted, kind, tmp_path / "outside")
    junk = tmp_path / f".x.py.{dead}@{files._HOST}.11111111.tmp"
    junk.write_text("partial")
    assert files.clean_stale_temps(tmp_path / "x.py") == [junk]
    untouched()


def test_own_folder_refuses_a_link_to_a_folder_elsewhere(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(files.NotRegularFileError, match="symbolic link, not a folder"):
        files.own_folder(tmp_path / "link")
    assert files.own_folder(tmp_path / "a" / "b").is_dir()


@pytest.mark.parametrize("kind", KINDS)
def test_emitted_headers_and_tuning_files_are_read_only_from_regular_files(tmp_path, kind):
    """codegen.read_header and the tuning file's reader: a planted link, FIFO, device or folder
    reads as nothing (no header, no remembered choices), without blocking."""
    from spattn.compiler.codegen import read_header
    from spattn.runtime import tuning

    for name in ("module.py", "tuning.json"):
        path = tmp_path / name
        untouched = plant(path, kind, tmp_path / f"outside-{name}")
        read = read_header if name == "module.py" else tuning._read
        assert finishes(lambda read=read, path=path: read(path)) in (None, {})
        untouched()
