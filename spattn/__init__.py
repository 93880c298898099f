"""spattn: a compiler for sparse attention patterns (LongNet dilated attention first)."""

__version__ = "0.1.0"

from spattn.errors import PatternError, SpattnError  # noqa: E402
from spattn.modules import DilatedAttention, ModuleError, MultiheadDilatedAttention  # noqa: E402
from spattn.patterns import Pattern, load_pattern  # noqa: E402
from spattn.runtime import attention  # noqa: E402
from spattn.runtime.decode import KVCache  # noqa: E402

__all__ = [
    "DilatedAttention",
    "KVCache",
    "ModuleError",
    "MultiheadDilatedAttention",
    "Pattern",
    "PatternError",
    "SpattnError",
    "__version__",
    "attention",
    "load_pattern",
]
