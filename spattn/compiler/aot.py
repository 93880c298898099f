"""Compile every kernel a pattern's launcher would launch, ahead of time, for a GPU target.

No GPU is needed: the module is rendered and imported with its @triton.jit kernels replaced by
recorders, its forward, backward and decode launchers run on meta tensors (spattn.runtime.
generated.recording gives them a CUDA device's tile sizes), and each distinct launch is
specialized as triton's runtime would and compiled by triton's own ptxas in a worker process
(spattn/compiler/aot_worker.py). `spattn check` prints the result.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType

import torch
import triton

from spattn.compiler.codegen import SIZE_CAP, pattern_literal, render
from spattn.errors import SpattnError
from spattn.patterns.spec import Pattern
from spattn.runtime import generated
from spattn.runtime.configs import LaunchConfig

__all__ = ["DTYPES", "TARGETS", "Result", "Spec", "check", "compile_specs", "launches",
           "specialization_key", "specializations", "triton_cache", "warm"]

TARGETS = {"sm_80": 80, "sm_90": 90, "sm_100": 100}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# the most shared memory one block may ask for (opt-in), as the CUDA driver reports it
SHARED_LIMIT = {80: 166912, 90: 232448, 100: 232448}
WORKERS = 2
# constexprs every kernel has; the table shows the others as a kernel's shape
COMMON = ("CAUSAL", "GROUP", "HEAD_DIM", "BLOCK_D", "BLOCK_M", "BLOCK_N", "PRECISION", "UNION",
          "BACKWARD", "num_warps", "num_stages")


@dataclass(frozen=True)
class Spec:
    """One kernel specialization: a launch as JSON-ready values (tensors as their dtype)."""

    kernel: str
    dtype: str
    head_dim: int
    args: tuple
    kwargs: tuple[tuple[str, object], ...]
    launches: int = 1  # how many of the launcher's launches this one kernel serves

    @property
    def constexprs(self) -> dict[str, object]:
        return dict(self.kwargs)

    def with_config(self, config: LaunchConfig) -> Spec:
        """The same launch with another configuration's tiles, warps and stages."""
        return replace(self, kwargs=tuple({**dict(self.kwargs), **config.kwargs()}.items()))

    @property
    def mode(self) -> str:
        if self.kernel == "_decode_rows":
            return "decode"
        return "bwd" if self.kernel.endswith("_cols") or self.constexprs["BACKWARD"] else "fwd"


@dataclass
class Result:
    spec: Spec
    error: str | None = None  # one line; None: compiled and fits the target
    registers: int | None = None
    spills: int | None = None  # bytes of spill stores
    shared: int | None = None
    tensor_core: str | None = None  # wgmma, mma, tcgen05 or none
    num_warps: int = 4
    num_stages: int = 3
    seconds: float | None = None  # the compile's time in its worker

    @property
    def ok(self) -> bool:
        return self.error is None


def target_capability(target: str) -> int:
    if target not in TARGETS:
        raise SpattnError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    return TARGETS[target]


def load_module(source: str, path: Path) -> ModuleType:
    """The module compiled (never interpreted), whatever TRITON_INTERPRET says: its kernels are
    JITFunctions whose signatures and source triton can compile."""
    from spattn.runtime.triton_backend import import_module_file

    path.write_text(source, encoding="utf-8")
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = False
        return import_module_file(path)


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` is noted, not run."""

    def __init__(self, name: str, seen: list[tuple[str, tuple, dict]]) -> None:
        self.__name__, self.seen = name, seen

    def __getitem__(self, grid: object) -> Callable[..., None]:
        return lambda *args, **kwargs: self.seen.append((self.__name__, args, kwargs))


def _describe(value: object) -> object:
    """A launch argument as JSON: a tensor by its dtype (triton specializes pointers on dtype
    and alignment; every fresh allocation is 16-byte aligned)."""
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch.")}
    return value


def _sequence_length(pattern: Pattern) -> int:
    """An N at which the launcher makes every launch it makes for long sequences: each global
    branch has a token below N, and no random block is cut to N."""
    sizes = [4096]
    for branch in pattern_literal(pattern)["branches"]:
        if branch["kind"] == "global" and branch["tokens"]:
            sizes.append(min(branch["tokens"]) + 1)
        if branch["kind"] == "random":
            sizes.append(branch["block"])
    return min(SIZE_CAP, 1 << (max(sizes) - 1).bit_length())


def launches(module: ModuleType, pattern: Pattern, dtype: str, head_dim: int,
             capability: int = 90) -> list[Spec]:
    """Every launch of the module's forward, backward and (causal) decode entry points, for one
    dtype and head_dim, on meta tensors with the launch configurations of a GPU of this compute
    capability."""
    seen: list[tuple[str, tuple, dict]] = []
    kernels = {n: v for n, v in vars(module).items() if isinstance(v, triton.runtime.JITFunction)}
    saved = dict(kernels)
    for name in kernels:
        setattr(module, name, _Recorder(name, seen))
    heads = pattern.required_heads() or max(8, pattern.min_heads())
    kv_heads = pattern.kv_heads or heads
    n = _sequence_length(pattern)
    meta = dict(dtype=DTYPES[dtype], device="meta")

    def tensor(h: int, rows: int) -> torch.Tensor:
        return torch.empty((1, h, rows, head_dim), **meta)

    try:
        with generated.recording(capability):
            q, k, v = tensor(heads, n), tensor(kv_heads, n), tensor(kv_heads, n)
            out, lse = module.attention_with_lse(q, k, v)
            module.attention_backward(torch.empty_like(out), q, k, v, out, lse)
            if pattern.causal:
                positions = torch.arange(n, device="meta")
                module.decode_attention(tensor(heads, 1), k, v, positions, n - 1)
    finally:
        for name, kernel in saved.items():
            setattr(module, name, kernel)
    return [Spec(name, dtype, head_dim, tuple(_describe(a) for a in args),
                 tuple((key, _describe(value)) for key, value in kwargs.items()))
            for name, args, kwargs in seen]


RUN_KNOBS = ("instrumentation_mode", "fpsan_homomorphic_casts")


def specialize(kernel: triton.runtime.JITFunction, backend: object, args: Iterable,
               kwargs: dict) -> tuple[dict, dict, dict, object]:
    """(signature, constexprs, attrs, options) exactly as JITFunction.run would compute them."""
    from triton.runtime.jit import MockTensor, create_function_from_signature

    args = [MockTensor(getattr(torch, a["tensor"])) if isinstance(a, dict) else a for a in args]
    kwargs = dict(kwargs, debug=kernel.debug or triton.knobs.runtime.debug)
    # the compilation knobs JITFunction.run passes as options, those this triton has (3.6 has
    # instrumentation_mode, 3.9 fpsan_homomorphic_casts too)
    for knob in RUN_KNOBS:
        if hasattr(triton.knobs.compilation, knob):
            kwargs[knob] = getattr(triton.knobs.compilation, knob)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound,
                                                              specialization, options)
    return signature, constexprs, attrs, options


def _backend(capability: int) -> object:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    return make_backend(GPUTarget("cuda", capability, 32))


def specialization_key(module: ModuleType, backend: object, spec: Spec) -> tuple[str, ...]:
    """What triton compiles a launch by: the kernel, its argument types and divisibility, its
    constexprs and options. Equal keys, one compiled kernel."""
    signature, constexprs, attrs, options = specialize(getattr(module, spec.kernel), backend,
                                                       spec.args, dict(spec.kwargs))
    return spec.kernel, repr(signature), repr(constexprs), repr(attrs), repr(options)


def specializations(pattern: Pattern, module: ModuleType, target: str, dtypes: Iterable[str],
                    head_dims: Iterable[int]) -> list[Spec]:
    """The distinct specializations, in launch order: two launches that triton would compile
    to one kernel (same types, divisibility, constexprs, options) are one, which counts the
    launches it serves."""
    capability = target_capability(target)
    backend = _backend(capability)
    unique: dict[tuple, Spec] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # default: on
        for dtype in dtypes:
            for head_dim in head_dims:
                for spec in launches(module, pattern, dtype, head_dim, capability):
                    key = specialization_key(module, backend, spec)
                    first = unique.setdefault(key, spec)
                    unique[key] = replace(first, launches=first.launches + (first is not spec))
    return list(unique.values())


def compile_specs(specs: list[Spec], module_path: Path | list[Path], target: str,
                  progress: Callable[[int, int], None] | None = None,
                  workers: int = WORKERS, cache: Path | None = None) -> list[Result]:
    """Compile each spec in worker processes (at most `workers`), triton's cache in a temp dir,
    or (`cache`: to warm it) in that cache folder, with this process's environment as the
    kernels' own launches will see it, so their cache keys are the same. `module_path`: the
    module all specs come from, or one per spec."""
    capability = target_capability(target)
    results: list[Result | None] = [None] * len(specs)
    if not specs:
        return []
    with tempfile.TemporaryDirectory(prefix="spattn-check-") as home:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if cache is None:
            env.update(TRITON_HOME=home, TRITON_CACHE_DIR=str(Path(home) / "cache"),
                       TRITON_DUMP_PTXAS_LOG="1")
            env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default, without its warning
        else:  # TRITON_DEFAULT_FP_FUSION, when set, is part of every kernel's cache key
            env["TRITON_CACHE_DIR"] = str(cache)
        with open(Path(home) / "stderr", "w+") as errors:
            procs = [subprocess.Popen([sys.executable, "-m", "spattn.compiler.aot_worker"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=errors, env=env, text=True)
                     for _ in range(max(1, min(workers, len(specs))))]
            try:
                paths = ([str(p) for p in module_path] if isinstance(module_path, list)
                         else [str(module_path)] * len(specs))
                _serve(procs, specs, paths, capability, results, progress)
            finally:
                for proc in procs:
                    proc.kill()
                    proc.wait()
            missing = [i for i, r in enumerate(results) if r is None]
            if missing:
                errors.seek(0)
                tail = errors.read().strip().splitlines()[-1:] or ["no output"]
                raise SpattnError(f"the compile workers stopped early: {tail[0]}")
    return results  # type: ignore[return-value]


def _serve(procs: list[subprocess.Popen], specs: list[Spec], module_paths: list[str],
           capability: int, results: list, progress: Callable[[int, int], None] | None) -> None:
    """Hand the specs out one at a time to whichever worker is free."""
    todo = iter(range(len(specs)))
    busy: dict[subprocess.Popen, int] = {}
    selector = selectors.DefaultSelector()

    def give(proc: subprocess.Popen) -> None:
        index = next(todo, None)
        if index is None:  # nothing left for it: let it exit
            selector.unregister(proc.stdout)
            proc.stdin.close()
            return
        spec = specs[index]
        job = {"module": module_paths[index], "capability": capability, "kernel": spec.kernel,
               "args": spec.args, "kwargs": dict(spec.kwargs)}
        proc.stdin.write(json.dumps(job) + "\n")
        proc.stdin.flush()
        busy[proc] = index

    for proc in procs:
        selector.register(proc.stdout, selectors.EVENT_READ, proc)
        give(proc)
    done = 0
    while busy:
        for key, _ in selector.select():
            proc = key.data
            line = proc.stdout.readline()
            index = busy.pop(proc)
            if not line:  # the worker died (out of memory?): its kernel failed, the rest go on
                selector.unregister(proc.stdout)
                results[index] = Result(specs[index], f"the compile worker died (exit "
                                                      f"{proc.wait()})")
                continue
            results[index] = _result(specs[index], json.loads(line), capability)
            done += 1
            if progress:
                progress(done, len(specs))
            give(proc)


def _result(spec: Spec, reply: dict, capability: int) -> Result:
    result = Result(spec, reply.get("error"), reply.get("registers"), reply.get("spills"),
                    reply.get("shared"), reply.get("tensor_core"), reply.get("num_warps", 4),
                    reply.get("num_stages", 3), reply.get("seconds"))
    limit = SHARED_LIMIT[capability]
    if result.error is None and result.shared is not None and result.shared > limit:
        result.error = (f"out of resources: shared memory, needs {result.shared} bytes, "
                        f"sm_{capability} has {limit}")
    return result


def triton_cache() -> Path:
    """The folder triton's runtime keeps compiled kernels in (TRITON_CACHE_DIR or its
    default)."""
    knobs = getattr(triton, "knobs", None)
    folder = getattr(getattr(knobs, "cache", None), "dir", None)
    return Path(folder or os.environ.get("TRITON_CACHE_DIR")
                or Path.home() / ".triton" / "cache")


def warm(pattern: Pattern, module_path: Path, target: str, dtypes: Iterable[str],
         head_dims: Iterable[int], workers: int | None = None,
         progress: Callable[[int, int], None] | None = None) -> list[Result]:
    """Compile every kernel the module at `module_path` (emitted for `pattern`) launches for
    these dtypes and head dims into triton's own cache, in parallel on all cores, so that its
    first calls on a GPU of `target` load them instead of compiling."""
    with triton.knobs.runtime.scope():  # the recorded module: compiled, never interpreted
        triton.knobs.runtime.interpret = False
        from spattn.runtime.triton_backend import import_module_file

        module = import_module_file(module_path)
    specs = specializations(pattern, module, target, dtypes, head_dims)
    return compile_specs(specs, module_path, target, progress, workers or os.cpu_count() or 1,
                         cache=triton_cache())


def check(pattern: Pattern, target: str, dtypes: Iterable[str], head_dims: Iterable[int],
          progress: Callable[[int, int], None] | None = None) -> list[Result]:
    """Compile every specialization the pattern's launcher makes for these dtypes and head
    dims, for `target` (sm_80, sm_90, sm_100)."""
    target_capability(target)
    with tempfile.TemporaryDirectory(prefix="spattn-check-") as folder:
        path = Path(folder) / "checked_module.py"
        module = load_module(render(pattern, "checked_module"), path)
        specs = specializations(pattern, module, target, dtypes, head_dims)
        return compile_specs(specs, path, target, progress)
