"""The emitted module's Python name, and what `spattn compile` refuses as one.

`spattn compile` prints `sys.path.insert(0, DIR); from NAME import attention`. That line works
only if NAME is an identifier and not a keyword, and if nothing else answers to NAME first: a
module already imported (sys.modules wins over sys.path) or one that DIR, being first on
sys.path, would shadow for the rest of the process. So spattn refuses keywords, the standard
library, the packages it and the emitted module import (listed, so the answer does not depend on
what happens to be installed), and any other top-level module importable here. Namespace packages
(bare folders, e.g. one named like the pattern in the current directory) are not refused: any
regular module wins over them, and refusing would depend on the working directory.
"""

from __future__ import annotations

import importlib.util
import keyword
import re
import sys
from pathlib import Path

from spattn.errors import SpattnError
from spattn.patterns.spec import Pattern

# what spattn and the emitted module import, and what torch imports lazily: refused whether or
# not this machine has them
RESERVED = frozenset({"spattn", "torch", "triton", "numpy", "jinja2", "pydantic", "yaml",
                      "typing_extensions", "sympy", "networkx", "filelock", "fsspec"})


def module_name(pattern: Pattern) -> str:
    """The default module name from the pattern's name: longnet-lm -> longnet_lm, 2x -> p_2x."""
    name = re.sub(r"\W", "_", pattern.name)
    return name if name[0].isalpha() else f"p_{name}"


def check_module_name(name: str, out_dir: Path | None = None) -> str:
    """`name` if `from name import attention` can import DIR/name.py (after sys.path.insert(0,
    DIR)), else a SpattnError saying why and what to do."""
    why = _why_not(name, out_dir)
    if why:
        raise SpattnError(f"module name '{name}' {why}; choose another with --module NAME")
    return name


def _why_not(name: str, out_dir: Path | None) -> str | None:
    if not (name.isascii() and name.isidentifier()):
        return "is not a Python identifier (letters, digits and _, not starting with a digit)"
    if keyword.iskeyword(name):
        return "is a Python keyword"
    if name.startswith("__") and name.endswith("__"):
        return "is a reserved (dunder) name"
    if name in sys.stdlib_module_names:
        return "would shadow the standard library module of that name"
    if name in RESERVED:
        return "would shadow a package spattn or the emitted module imports"
    if out_dir is not None and (Path(out_dir) / name).is_dir():
        return f"names a folder in {out_dir}, which Python would import instead"
    origin = _installed(name)
    if origin is not None and not _same_file(origin, out_dir, name):
        return f"would shadow the installed module {name} ({origin})"
    return None


def _same_file(origin: str, out_dir: Path | None, name: str) -> bool:
    """Whether `origin` is the file being written (recompiling into a folder on sys.path)."""
    return out_dir is not None and Path(origin).resolve() == (Path(out_dir) / f"{name}.py"
                                                              ).resolve()


def _installed(name: str) -> str | None:
    """Where an importable top-level module `name` lives (None if there is none, or only a
    namespace package)."""
    if name in sys.modules:
        return getattr(sys.modules[name], "__file__", None) or "already imported"
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin in (None, "namespace"):
        return None
    return spec.origin
