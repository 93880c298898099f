"""Writing emitted files: atomically (temporary file, then rename), with the mode a plain
`open()` would give, and cleaning up the temporary files that killed writers left behind."""

from __future__ import annotations

import os
import re
import secrets
import socket
import time
from pathlib import Path

STALE_AFTER_S = 3600.0  # a temporary file this old is junk, whoever wrote it
# the host goes into temporary names: a process id means something only on its own machine
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def temp_path(path: Path) -> Path:
    """A fresh hidden name beside `path` that says who writes it: .NAME.PID@HOST.RANDOM.tmp"""
    return path.parent / f".{path.name}.{os.getpid()}@{_HOST}.{secrets.token_hex(4)}.tmp"


def write_atomically(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: never half a file. The file gets
    mode 0o666 & ~umask, like open(); stale temporary files of `path` are removed first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
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
    than `stale_after_s`; a live writer's file is left alone. Returns what was removed."""
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
            old = now - entry.stat().st_mtime > stale_after_s
        except OSError:
            continue
        dead = pid is not None and host == _HOST and not _alive(int(pid))
        if old or dead:
            try:
                entry.unlink()
                removed.append(entry)
            except OSError:
                pass
    return removed
