"""The generated-kernel backend: compile on first use, cache on disk, import, launch.

Modules are cached in $SPATTN_CACHE_DIR (default ~/.cache/spattn), one folder per pattern hash
and emitter key (spattn, triton and jinja2 versions, the templates and codegen), so a changed
pattern or a new spattn never reuses a stale module. The cache is not trusted: a cached file is
used only if it is byte for byte what spattn would emit now (emitted text is deterministic), so a
truncated, emptied, hand-edited or foreign file is rebuilt, atomically and under a file lock so
that concurrent first uses in many processes all succeed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

from spattn.errors import SpattnError
from spattn.patterns.spec import Pattern

try:
    import fcntl
except ImportError:  # not POSIX: renames alone keep the cache consistent, with repeated work
    fcntl = None

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
        if _read(path) != text:
            _rebuild(path, text)
        _loaded[path] = import_module_file(path, text)
    return _loaded[path]


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _rebuild(path: Path, text: str) -> None:
    from spattn.compiler.files import write_atomically

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path.parent):
            if _read(path) != text:  # another process may have written it meanwhile
                write_atomically(path, text)
    except OSError as error:
        why = error.strerror or str(error)
        raise CacheError(f"cannot write the compile cache at {path.parent} ({why}); set "
                         f"SPATTN_CACHE_DIR to a writable folder") from None


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on folder/.lock (released when the file closes)."""
    with open(folder / ".lock", "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        yield
