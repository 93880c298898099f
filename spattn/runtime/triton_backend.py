"""The generated-kernel backend: compile on first use, cache on disk, import, launch.

Modules are cached in $SPATTN_CACHE_DIR (default ~/.cache/spattn), one folder per pattern hash
and emitter key (spattn, triton and jinja2 versions, the templates and codegen), so a changed
pattern or a new spattn never reuses a stale module. The cache is not trusted: a cached file is
used only if it is byte for byte what spattn would emit now (emitted text is deterministic), so a
truncated, emptied, hand-edited or foreign file is rebuilt, atomically and under a file lock so
that concurrent first uses in many processes all succeed. Nothing planted in the cache is followed
or waited on: a link or a FIFO in place of a module or folder is a clear error (spattn writes
regular files only), and a lock that is not a regular file, or stays held over LOCK_WAIT_S, is
done without (the atomic rename of a deterministic text keeps that correct, with repeated work).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import ModuleType

from spattn.errors import SpattnError
from spattn.patterns.spec import Pattern

_loaded: dict[Path, ModuleType] = {}


class CacheError(SpattnError):
    """The compile cache cannot be written."""


def cache_dir() -> Path:
    return Path(os.environ.get("SPATTN_CACHE_DIR") or Path.home() / ".cache" / "spattn")


def cache_path(pattern: Pattern) -> Path:
    """Where the module of `pattern` is cached."""
    from spattn.compiler.codegen import emitter_key, module_name

    return cache_dir() / f"{pattern.content_hash()}-{emitter_key()}" / f"{module_name(pattern)}.py"


def import_module_file(path: Path, text: str | None = None) -> ModuleType:
    """Run a generated module's source (`text`, else the file's) as a fresh module whose
    __file__ is `path`. Its name is unique to the path and it is not put in sys.modules, so a
    pattern named like a real package (torch, os) shadows nothing; no bytecode is cached."""
    text = Path(path).read_text(encoding="utf-8") if text is None else text
    digest = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:16]
    module = ModuleType(f"_spattn_generated_{digest}_{Path(path).stem}")
    module.__file__ = str(path)
    exec(compile(text, str(path), "exec"), module.__dict__)  # noqa: S102 - our own emitted code
    return module


def compiled_module(pattern: Pattern) -> ModuleType:
    """The generated module of `pattern`, compiled into the cache on first use (or rebuilt when
    the cached file is not exactly what spattn emits now)."""
    from spattn.compiler.codegen import render

    path = cache_path(pattern)
    if path not in _loaded:
        text = render(pattern)
        if _read(path, len(text.encode("utf-8"))) != text:
            _rebuild(path, text)
        _loaded[path] = import_module_file(path, text)
    return _loaded[path]


def _read(path: Path, max_bytes: int) -> str | None:
    """The cached module's text if it is a regular file of at most `max_bytes` in a real folder
    (anything else is not what spattn emits: None)."""
    from spattn.compiler.files import read_regular

    try:
        if path.parent.is_symlink():
            return None
        return read_regular(path, max_bytes).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _rebuild(path: Path, text: str) -> None:
    from spattn.compiler.files import NotRegularFileError, own_folder, write_atomically

    try:
        own_folder(path.parent)
        with _locked(path.parent):
            if _read(path, len(text.encode("utf-8"))) != text:  # another process wrote it
                write_atomically(path, text)
    except OSError as error:
        why = error.strerror or str(error)
        where = error.filename if isinstance(error, NotRegularFileError) else path.parent
        raise CacheError(f"cannot write the compile cache at {where} ({why}); set "
                         f"SPATTN_CACHE_DIR to a writable folder") from None


LOCK_WAIT_S = 10.0  # writing a module takes milliseconds: a lock held longer is not waited on


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on folder/.lock if one can be had within LOCK_WAIT_S; if not (its
    file is a link, a FIFO, not writable, or held too long), go on without: writes are atomic
    renames of the same text, so the cache stays correct, only the work may be repeated."""
    from spattn.compiler.files import locked

    with ExitStack() as stack:
        try:
            stack.enter_context(locked(folder / ".lock", LOCK_WAIT_S))
        except OSError:
            pass
        yield
