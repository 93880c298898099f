"""The pattern language (pydantic, at the YAML edge) and its resolved geometry."""

from spattn.patterns.geometry import (
    Dense,
    Dilated,
    Geometry,
    Global,
    RandomBlocks,
    Strided,
    Window,
    resolve,
)
from spattn.patterns.loader import builtin_names, load_pattern
from spattn.patterns.spec import Pattern

__all__ = ["Dense", "Dilated", "Geometry", "Global", "Pattern", "RandomBlocks", "Strided",
           "Window", "builtin_names", "load_pattern", "resolve"]
