"""The generated-kernel backend: compile on first use, cache by pattern hash, import, launch.

Modules are cached in $SPATTN_CACHE_DIR (default ~/.cache/spattn), one folder per pattern hash
and spattn version, so a changed pattern or a new spattn never reuses a stale module.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import spattn
from spattn.patterns.spec import Pattern

_loaded: dict[Path, ModuleType] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("SPATTN_CACHE_DIR") or Path.home() / ".cache" / "spattn")


def import_module_file(path: Path) -> ModuleType:
    """Import a generated module from its file alone (no sys.path changes)."""
    name = f"spattn_generated_{path.parent.name}_{path.stem}".replace("-", "_").replace(".", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compiled_module(pattern: Pattern) -> ModuleType:
    """The generated module of `pattern`, compiled into the cache on first use."""
    from spattn.compiler.codegen import compile_module, module_name

    folder = cache_dir() / f"{pattern.content_hash()}-{spattn.__version__}"
    path = folder / f"{module_name(pattern)}.py"
    if path not in _loaded:
        if not path.exists():
            compile_module(pattern, folder)
        _loaded[path] = import_module_file(path)
    return _loaded[path]
