"""A compile worker for spattn check (aot.py): reads one launch per line of stdin as JSON,
compiles it for the target with triton, writes one JSON result line. Run with TRITON_INTERPRET
unset (aot.py does), so the module's kernels are compiled ones."""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
import time
from functools import lru_cache
from pathlib import Path
from types import ModuleType

TENSOR_CORES = (("tcgen05", "tcgen05.mma"), ("wgmma", "wgmma.mma_async"), ("mma", "mma.sync"))


@lru_cache(maxsize=16)
def _module(path: str) -> ModuleType:
    from spattn.runtime.triton_backend import import_module_file

    return import_module_file(Path(path))


def tensor_core(ptx: str) -> str:
    """The tensor-core instruction the kernel's PTX uses, or none."""
    return next((name for name, op in TENSOR_CORES if op in ptx), "none")


def ptxas_figures(log: str) -> dict:
    """Registers and spilled bytes from ptxas -v (TRITON_DUMP_PTXAS_LOG prints it)."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return {"registers": int(regs.group(1)) if regs else None,
            "spills": int(spills.group(1)) if spills else None}


def error_line(error: Exception) -> str:
    """The first line of an error, and ptxas's own first error line when it has one."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    ptxas = next((line for line in lines if "error" in line and "ptx" in line.lower()
                  and line != first), None)
    return (f"{type(error).__name__}: {first}" + (f" ({ptxas})" if ptxas else ""))[:300]


def compile_one(job: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    from spattn.compiler.aot import _backend, specialize

    kernel = getattr(_module(job["module"]), job["kernel"])
    backend = _backend(job["capability"])
    signature, constexprs, attrs, options = specialize(kernel, backend, job["args"],
                                                       job["kwargs"])
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(triton.compiler.ASTSource(kernel, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", job["capability"], 32),
                                  options=options.__dict__)
    return {**ptxas_figures(log.getvalue()), "seconds": time.perf_counter() - start,
            "shared": compiled.metadata.shared,
            "num_warps": compiled.metadata.num_warps,
            "num_stages": compiled.metadata.num_stages,
            "tensor_core": tensor_core(compiled.asm["ptx"])}


def main() -> None:
    out = sys.stdout
    for line in sys.stdin:
        try:
            reply = compile_one(json.loads(line))
        except Exception as error:  # reported per kernel, as one line
            reply = {"error": error_line(error)}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
