"""Launching a generated kernel with a tuned configuration.

On a GPU, the first launch of a kernel for a shape times every configuration the committed table
lists as fitting (spattn/runtime/configs.py) and keeps the fastest; the choice is cached in
memory and on disk, one JSON file per device name and spattn and triton versions, keyed by the
pattern's hash, the kernel and its constants, and the launch's size to the next power of two
(batch x heads and tokens). Timing runs a part of the launch, the programs of the first few
(batch, head) items (kernels fold them into grid axes 1 and 2), enough to fill the GPU several
times; only those items' rows of what the kernel writes (the running O and LSE, the gradient
accumulators) are saved before timing and restored after, so tuning never changes a result and
never copies a whole accumulator.

SPATTN_TUNE=0 turns tuning off (the table's first configuration is used); SPATTN_CACHE_DIR
moves the cache (default ~/.cache/spattn).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import triton

from spattn.compiler.files import locked, read_regular, write_atomically
from spattn.runtime.configs import LaunchConfig, candidates
from spattn.runtime.triton_backend import cache_dir

__all__ = ["cache_path", "launch", "tuning_enabled"]

Grid = Callable[[LaunchConfig], tuple[int, ...]]
_CHOSEN: dict[tuple[str, str], LaunchConfig] = {}  # (cache file, key) -> choice


def tuning_enabled(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("SPATTN_TUNE", "1") != "0"


def _timer(run: Callable[[], None]) -> float:
    """Milliseconds per run, median of repeats after warm-up (triton's benchmark timer)."""
    return triton.testing.do_bench(run, warmup=5, rep=20, return_mode="median")


def cache_path(device: torch.device) -> Path:
    """This device's tuning file for these spattn and triton versions (new kernels, new
    choices)."""
    from spattn import __version__
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    safe = "".join(c if c.isalnum() or c in "-." else "-" for c in name)
    return cache_dir() / "tuning" / f"{safe}-spattn-{__version__}-triton-{triton.__version__}.json"


TUNING_FILE_BYTES = 1 << 22  # a tuning file past this is not spattn's
LOCK_WAIT_S = 10.0


def _read(path: Path) -> dict[str, list[int]]:
    try:
        data = json.loads(read_regular(path, TUNING_FILE_BYTES).decode("utf-8"))
    except (OSError, ValueError):  # missing, planted, too large or damaged: start afresh
        return {}
    return data if isinstance(data, dict) else {}


def _remember(path: Path, key: str, config: LaunchConfig) -> None:
    """Add one choice to the file, under a lock, keeping what other processes added."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with locked(path.with_name(path.name + ".lock"), LOCK_WAIT_S):
            data = _read(path)
            data[key] = [config.block_m, config.block_n, config.num_warps, config.num_stages]
            write_atomically(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
    except OSError:  # a read-only home, a planted or held lock: it lasts for this process
        pass


def _bucket(size: int) -> int:
    return 1 << max(0, size - 1).bit_length()


def _key(pattern_hash: str, name: str, mode: str, q: torch.Tensor, size: int,
         meta: dict) -> str:
    """What a choice depends on: the pattern, the kernel and its constants, dtype, head dim, and
    batch x heads and the sequence length each to the next power of two (programs per
    launch)."""
    shape = ",".join(f"{k}={v}" for k, v in sorted(meta.items())
                     if isinstance(v, (bool, int, str)) and k not in ("BLOCK_M", "BLOCK_N"))
    return (f"{pattern_hash}|{name}|{mode}|{str(q.dtype).removeprefix('torch.')}|D={q.shape[-1]}"
            f"|B*H~{_bucket(q.shape[0] * q.shape[1])}|N~{_bucket(size)}|{shape}")


TIMED_WAVES = 4  # programs timed per configuration: this many times the GPU's processors


def _part(grid: tuple[int, ...], processors: int) -> tuple[tuple[int, int, int], int]:
    """(the grid of a part of a launch, the (batch, head) items it covers): the first items
    whose programs fill the GPU TIMED_WAVES times (all of them if fewer)."""
    programs, folded = grid[0], grid[1] * grid[2] if len(grid) > 2 else grid[1]
    items = min(folded, max(1, -(-TIMED_WAVES * processors // max(programs, 1))))
    return (programs, items, 1), items


def _processors(device: torch.device) -> int:
    """The GPU's multiprocessors (4 elsewhere: a test's pretend device)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tune(kernel: object, options: Sequence[LaunchConfig], grid: Grid, args: tuple, meta: dict,
          writes: Sequence[torch.Tensor], processors: int) -> LaunchConfig:
    """The fastest of `options`, timed on a part of the launch (_part); the rows of `writes`
    (each indexed by the folded (batch, head) item first) that part changes are restored after.
    A configuration that fails to launch on this device is passed over."""
    parts = {config: _part(grid(config), processors) for config in options}
    items = max(covered for _, covered in parts.values())
    saved = [t[:items].clone() for t in writes]
    best, best_ms = options[0], float("inf")
    try:
        for config in options:
            def run(config: LaunchConfig = config) -> None:
                kernel[parts[config][0]](*args, **meta, **config.kwargs())

            try:
                ms = _timer(run)
            except Exception:  # noqa: BLE001 - e.g. out of resources on this device
                continue
            if ms < best_ms:
                best, best_ms = config, ms
    finally:
        for tensor, copy in zip(writes, saved, strict=True):
            tensor[:items].copy_(copy)
    return best


def launch(kernel: object, name: str, mode: str, grid: Grid, args: tuple, meta: dict, *,
           q: torch.Tensor, size: int, pattern_hash: str,
           writes: Sequence[torch.Tensor | None] = ()) -> None:
    """Launch `kernel` (named `name`, e.g. 'dilated_rows'; mode fwd, bwd or decode) with the
    grid `grid(config)` for its configuration: tuned on a GPU, the table's default otherwise.
    `writes`: the tensors the kernel reads and writes, restored after tuning."""
    options = candidates(name, mode, q.device, q.dtype, q.shape[-1])
    config = options[0]
    if len(options) > 1 and tuning_enabled(q.device):
        path = cache_path(q.device)
        key = _key(pattern_hash, name, mode, q, size, meta)
        config = _CHOSEN.get((str(path), key))
        if config is None:
            stored = _read(path).get(key)
            config = LaunchConfig(*stored) if stored in [
                [c.block_m, c.block_n, c.num_warps, c.num_stages] for c in options] else None
        if config is None:
            config = _tune(kernel, options, grid, args, meta, [t for t in writes if t is not None],
                           _processors(q.device))
            _remember(path, key, config)
        _CHOSEN[(str(path), key)] = config
    kernel[grid(config)](*args, **meta, **config.kwargs())
