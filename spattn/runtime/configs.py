"""Launch configurations: the tile sizes, warps and pipeline stages each generated kernel is
launched with, per GPU architecture, dtype, head dim, kernel and mode.

The committed table `launch_configs.json` lists, for every cell, the configurations that compiled
on that architecture for every built-in pattern with no register spills and shared memory within
the target (`python benchmarks/sweep_configs.py` makes it with `spattn check`'s compiler), best
first. The first is the untuned default; on a GPU, spattn.runtime.tuning times the others at
first use and caches the fastest. Under the CPU interpreter every kernel gets 16 x 16 tiles.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

__all__ = ["ARCHS", "INTERPRETED", "LaunchConfig", "candidates", "cell", "launch_config",
           "recording", "recording_capability"]

TABLE = Path(__file__).with_name("launch_configs.json")
ARCHS = (80, 90, 100)  # the architectures the table may cover, exactly
HEAD_DIMS = (64, 128)  # the table's head-dim columns: BLOCK_D <= 64, and 128
DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int

    def kwargs(self) -> dict[str, int]:
        """The launch keywords: the kernels' BLOCK_M and BLOCK_N, triton's warps and stages."""
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, num_warps=self.num_warps,
                    num_stages=self.num_stages)

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}"


INTERPRETED = LaunchConfig(16, 16, 4, 1)  # numpy tiles: small is fast
# a cell the table lacks (a head dim past 128, an architecture below sm_80): small tiles, which
# fit every target the table was made for
FALLBACK = LaunchConfig(32, 32, 4, 1)

# set while `spattn check` drives a launcher whose kernels only record (compiler/aot.py): the
# compute capability whose table rows the launcher uses
_RECORDING: ContextVar[int | None] = ContextVar("spattn_recording", default=None)


@contextmanager
def recording(capability: int = 90) -> Iterator[None]:
    """Launchers skip the device check and use `capability`'s launch configurations, for a
    module whose kernels record their launches instead of running (spattn check)."""
    token = _RECORDING.set(capability)
    try:
        yield
    finally:
        _RECORDING.reset(token)


def recording_capability() -> int | None:
    return _RECORDING.get()


@lru_cache(maxsize=1)
def _table() -> dict[str, list[LaunchConfig]]:
    cells = json.loads(TABLE.read_text(encoding="utf-8"))["cells"]
    return {key: [LaunchConfig(*row) for row in rows] for key, rows in cells.items()}


def cell(capability: int, dtype: torch.dtype, head_dim: int, kernel: str, mode: str) -> str:
    """The table's key: e.g. 'sm_90/fp16/128/dilated_cols/bwd'. Head dims up to 64 share the 64
    column (their tiles are at most 64 wide); up to 128 the 128 one."""
    column = next((d for d in HEAD_DIMS if head_dim <= d), head_dim)
    return f"sm_{capability}/{DTYPES.get(dtype, dtype)}/{column}/{kernel.lstrip('_')}/{mode}"


def _capability(device: torch.device) -> int | None:
    """The compute capability whose table rows apply; None under the interpreter."""
    recorded = _RECORDING.get()
    if recorded is not None:
        return recorded
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def candidates(kernel: str, mode: str, device: torch.device, dtype: torch.dtype,
               head_dim: int) -> list[LaunchConfig]:
    """The configurations known to fit this kernel on this device, best first (the first is the
    untuned default)."""
    capability = _capability(device)
    if capability is None:
        return [INTERPRETED]
    table = _table()
    if capability in ARCHS:
        return table.get(cell(capability, dtype, head_dim, kernel, mode)) or [FALLBACK]
    # another architecture (sm_86, sm_89, sm_120: less shared memory than the A100's): small
    # tiles by default; a tuning GPU also tries the sm_80 ones, skipping those that fail there
    return [FALLBACK, *table.get(cell(80, dtype, head_dim, kernel, mode), [])]


def launch_config(kernel: str, mode: str, device: torch.device, dtype: torch.dtype,
                  head_dim: int) -> LaunchConfig:
    """The untuned configuration: the table's first for this cell."""
    return candidates(kernel, mode, device, dtype, head_dim)[0]
