"""The files spattn writes and reads back, none of them trusted.

Writes are atomic (temporary file, then rename), with the mode a plain `open()` would give, and
clean up the temporary files that killed writers left behind. A destination that is not a
regular file (a symbolic link, a FIFO, a device, a folder) is refused, never replaced or written
through. Reads (`read_regular`) and locks (`locked`) open only regular files, never follow a
link, never block on a FIFO, and are bounded: a read by size, a lock by time.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import socket
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no locks; atomic renames alone keep files whole
    fcntl = None

STALE_AFTER_S = 3600.0  # a temporary file this old is junk, whoever wrote it
# the host goes into temporary names: a process id means something only on its own machine
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class NotRegularFileError(OSError):
    """A path spattn reads, writes or locks is there but is not a regular file (or, for a
    folder, not a real folder); `kind` says what it is ("a FIFO")."""

    kind = "a special file"


class LockError(OSError):
    """A lock could not be taken: its file is not a regular file, or it stayed held too long."""


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"),
             (stat.S_ISREG, "a regular file"))
    return next((name for test, name in kinds if test(mode)), "a special file")


def _not_regular(path: Path, mode: int, what: str = "a regular file") -> NotRegularFileError:
    error = NotRegularFileError(errno.EEXIST, f"is {_kind(mode)}, not {what}; refusing to use "
                                f"it", str(path))
    error.kind = _kind(mode)
    return error


def check_regular(path: str | os.PathLike[str]) -> bool:
    """Whether `path` exists (without following a link); a NotRegularFileError if it exists
    and is not a regular file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(mode):
        raise _not_regular(Path(path), mode)
    return True


def own_folder(path: str | os.PathLike[str]) -> Path:
    """Create `path` (and its parents) if missing and check that it is a real folder, not a
    link to one elsewhere (for folders spattn names inside its own cache)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    mode = os.lstat(path).st_mode
    if not stat.S_ISDIR(mode):
        raise _not_regular(path, mode, "a folder")
    return path


def _open_regular(path: Path, flags: int, mode: int = 0o666) -> int:
    """An fd of the regular file `path`: a special file is refused before it is opened (opening
    a device can do things), a link is never followed, a FIFO swapped in meanwhile never blocks
    the open (O_NONBLOCK) and is refused after it (fstat)."""
    check_regular(path)
    fd = os.open(path, flags | _NOFOLLOW | _NONBLOCK | _CLOEXEC, mode)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st.st_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | os.PathLike[str], max_bytes: int, *, truncate: bool = False
                 ) -> bytes:
    """The bytes of the regular file `path`, at most `max_bytes` of them: a link, a FIFO, a
    device or a folder is a NotRegularFileError, a larger file an OSError (EFBIG), or with
    `truncate` its first `max_bytes`."""
    path = Path(path)
    if not check_regular(path):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    fd = _open_regular(path, os.O_RDONLY)
    try:
        chunks, size = [], 0
        while size <= max_bytes:
            chunk = os.read(fd, max_bytes + 1 - size)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if truncate:
        return b"".join(chunks)[:max_bytes]
    raise OSError(errno.EFBIG, f"is larger than {max_bytes:,} bytes; refusing to read it",
                  str(path))


@contextmanager
def locked(path: str | os.PathLike[str], wait_s: float, remove: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on the regular file `path` (created if missing), waiting at most
    `wait_s` for another holder; a LockError if it stays held or `path` is not a regular file.
    With `remove`, the file is deleted on release (a waiter that locked the deleted file
    notices and takes the new one). Without fcntl (not POSIX) nothing is locked."""
    path = Path(path)
    if fcntl is None:
        yield
        return
    deadline = time.monotonic() + wait_s
    fd = _acquire(path, deadline, wait_s)
    try:
        yield
    finally:
        if remove:
            try:
                os.unlink(path)
            except OSError:
                pass
        os.close(fd)  # releases the lock


def _acquire(path: Path, deadline: float, wait_s: float) -> int:
    """An fd of `path` holding its lock, taken before `deadline`."""
    while True:
        try:
            fd = _open_regular(path, os.O_RDWR | os.O_CREAT)
        except NotRegularFileError as error:
            raise LockError(error.errno, error.strerror, str(path)) from None
        try:
            _flock(fd, deadline, path, wait_s)
            if _same_file(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder removed the file we locked: take the one there now


def _flock(fd: int, deadline: float, path: Path, wait_s: float) -> None:
    """Lock `fd` exclusively, polling (never blocking) until `deadline`."""
    pause = 0.005
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise LockError(errno.ETIMEDOUT, f"held by another process for over "
                                f"{wait_s:g} s", str(path)) from None
            time.sleep(pause)
            pause = min(2 * pause, 0.1)


def _same_file(fd: int, path: Path) -> bool:
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def temp_path(path: Path) -> Path:
    """A fresh hidden name beside `path` that says who writes it: .NAME.PID@HOST.RANDOM.tmp"""
    return path.parent / f".{path.name}.{os.getpid()}@{_HOST}.{secrets.token_hex(4)}.tmp"


def write_atomically(path: str | os.PathLike[str], text: str) -> None:
    """Write to a temporary file beside `path`, then rename: never half a file. The file gets
    mode 0o666 & ~umask, like open(); stale temporary files of `path` are removed first. A
    `path` that is not a regular file (a link, a FIFO, a device) is a NotRegularFileError:
    spattn writes regular files only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_regular(path)
    clean_stale_temps(path)
    tmp = temp_path(path)
    # O_EXCL never follows a link; the umask applies to the mode
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        check_regular(path)  # again, just before the rename
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_stale_temps(path: Path, stale_after_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the temporary files of `path` whose writer is dead (same host) or that are older
    than `stale_after_s`; a live writer's file is left alone, and so is anything not a regular
    file (spattn's temporary files are). Returns what was removed."""
    name = re.compile(rf"\.{re.escape(path.name)}\.(?:(\d+)@([A-Za-z0-9-]+)\.)?\w+\.tmp")
    removed = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = name.fullmatch(entry.name)
        if not match:
            continue
        pid, host = match.groups()
        try:
            st = os.lstat(entry)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        old = now - st.st_mtime > stale_after_s
        dead = pid is not None and host == _HOST and not _alive(int(pid))
        if old or dead:
            try:
                entry.unlink()
                removed.append(entry)
            except OSError:
                pass
    return removed
