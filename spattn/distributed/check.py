"""The check every distributed call starts with, before any data moves.

Each rank checks its own inputs and builds the plan, then all ranks all-gather one small metadata
tensor (`CHECK_ELEMENTS` integers; zeros from a rank whose work failed). If a rank failed, they
also all-gather every rank's error message (`MESSAGE_BYTES`), so that every rank raises: the
failed rank its own error, the others a `DistributedError` naming it. If the ranks disagree on a
shape, the dtype, the pattern or the scale, every rank raises the same `InputError`.
"""

from __future__ import annotations

import math
import numbers
import struct
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

from spattn.distributed import comm
from spattn.distributed.comm import DistributedError
from spattn.distributed.plan import CHECK_ELEMENTS, DistributedPlan, build_plan
from spattn.patterns.loader import load_pattern
from spattn.patterns.spec import Pattern
from spattn.runtime.dispatch import (
    BackendError,
    InputError,
    check_fixed,
    check_tensors,
    resolve_scale,
)

DTYPE_CODES = {torch.float32: 1, torch.float64: 2, torch.bfloat16: 3, torch.float16: 4}
DEVICE_CODES = {"cpu": 1, "cuda": 2}
FIELDS = ("inputs", "batch", "heads", "kv_heads", "local seq_len", "head_dim", "dtype",
          "device type", "requires grad", "pattern (content hash)", "pattern (content hash)",
          "softmax scale", "world size")
MESSAGE_BYTES = 512  # of each failed rank's error, all-gathered only when some rank failed


@dataclass(frozen=True)
class Prepared:
    plan: DistributedPlan
    scale: float
    needs_grad: bool
    pattern_hash: str
    device_type: str


def prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern | str,
            backend: str | None, scale: float | None, world: int, group: dist.ProcessGroup
            ) -> Prepared:
    """This rank's own checks and plan; raises on bad input (before any communication)."""
    pattern = load_pattern(pattern)
    call = check_tensors(q, k, v)
    check_fixed(call, pattern.name, pattern.heads, pattern.kv_heads, pattern.head_dim,
                pattern.required_heads())
    if backend not in (None, "torch"):
        raise BackendError(f"backend '{backend}' cannot run distributed attention yet; it runs "
                           f"on the 'torch' backend's pieces (backend=None or 'torch')")
    if call.dtype not in DTYPE_CODES:
        raise InputError(f"dtype {call.dtype} is not one of float32, float64, bfloat16, float16")
    device = comm.comm_device(group)
    if call.device.type != device.type:
        raise InputError(f"the group's {dist.get_backend(group)} backend communicates "
                         f"{device.type} tensors, but q, k, v are on {call.device}")
    scale = resolve_scale(pattern, scale, call.head_dim)
    plan = build_plan(pattern, call.seq_len * world, world, heads=call.heads,
                      kv_heads=call.kv_heads, head_dim=call.head_dim, batch=call.batch,
                      dtype=call.dtype)
    return Prepared(plan, scale, call.needs_grad, pattern.content_hash(), call.device.type)


def as_timeout(value: float | timedelta | None) -> timedelta | None:
    """`timeout=` as a timedelta: seconds (a finite real > 0) or a positive timedelta."""
    if value is None or isinstance(value, timedelta) and value > timedelta(0):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real | timedelta):
        raise InputError(f"timeout must be seconds (a number) or a datetime.timedelta, got "
                         f"{type(value).__name__}")
    try:
        if 0 < float(value) < math.inf:
            return timedelta(seconds=float(value))
    except (OverflowError, TypeError):  # TypeError: a timedelta <= 0
        pass
    shown = repr(value) if len(repr(value)) < 40 else repr(value)[:37] + "..."
    raise InputError(f"timeout must be > 0 seconds and fit a datetime.timedelta, got {shown}")


def _metadata(prepared: Prepared | None, world: int) -> list[int]:
    if prepared is None:
        return [0] * CHECK_ELEMENTS
    p = prepared.plan
    digest = int(prepared.pattern_hash, 16)
    scale_bits = struct.unpack("<q", struct.pack("<d", prepared.scale))[0]
    values = [1, p.batch, p.heads, p.kv_heads, p.chunk, p.head_dim, DTYPE_CODES[p.dtype],
              DEVICE_CODES.get(prepared.device_type, 3),
              int(prepared.needs_grad), digest >> 32, digest & 0xFFFFFFFF, scale_bits, world]
    return values + [0] * (CHECK_ELEMENTS - len(values))


def _show(field: int, row: list[int]) -> str:
    value = row[field]
    if FIELDS[field] == "dtype":
        return next(str(d).removeprefix("torch.") for d, c in DTYPE_CODES.items() if c == value)
    if FIELDS[field].startswith("pattern"):
        return f"{(row[9] << 32) | row[10]:016x}"
    if FIELDS[field] == "device type":
        return next((name for name, c in DEVICE_CODES.items() if c == value), "other")
    if FIELDS[field] == "softmax scale":
        return f"{struct.unpack('<d', struct.pack('<q', value))[0]:.6g}"
    return str(value)


def _encode(text: str, device: torch.device) -> torch.Tensor:
    data = text.encode()[:MESSAGE_BYTES]
    out = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8)
    out[:len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    return out.to(device)


def _decode(row: torch.Tensor) -> str:
    data = bytes(row.cpu().tolist()).rstrip(b"\0")
    text = data.decode(errors="replace")
    return text + "..." if len(data) == MESSAGE_BYTES else text


NONFINITE = CHECK_ELEMENTS - 1  # the slot where a rank says its inputs are not all finite


def agree(prepared: Prepared | None, error: Exception | None, group: dist.ProcessGroup,
          timeout: timedelta | None, nonfinite: bool = False) -> bool:
    """All-gather every rank's metadata; raise on every rank if one failed or they disagree:
    a failed rank its own error, the others a DistributedError with the failed ranks' messages.
    Every rank calls it exactly once per call, with `error` set where its own work failed.
    Returns whether some rank's inputs were not all finite (`nonfinite`), so that every rank
    takes the exact path for them together."""
    world, device = dist.get_world_size(group), comm.comm_device(group)
    meta = _metadata(None if error is not None else prepared, world)
    meta[NONFINITE] = int(nonfinite)
    local = torch.tensor(meta, dtype=torch.int64, device=device)
    rows = comm.all_gather(local, group, "check", "the metadata check", timeout).cpu().tolist()
    failed = [r for r, row in enumerate(rows) if row[0] == 0]
    if failed:  # every rank knows it: exchange the messages too
        text = f"{type(error).__name__}: {error}" if error is not None else ""
        notes = comm.all_gather(_encode(text, device), group, "check", "the failure report",
                                timeout)
        if error is not None:
            raise error
        shown = "; ".join(f"rank {dist.get_global_rank(group, r)} failed: {_decode(notes[r])}"
                          for r in failed[:4])
        more = f"; and {len(failed) - 4} more ranks" if len(failed) > 4 else ""
        raise DistributedError(f"{shown}{more} (no data was exchanged; every rank raises)")
    for field in range(1, len(FIELDS)):
        values = {r: rows[r][field] for r in range(world)}
        if len(set(values.values())) > 1:
            shown = ", ".join(f"rank {dist.get_global_rank(group, r)}: {_show(field, rows[r])}"
                              for r in range(world))
            raise InputError(f"ranks disagree on {FIELDS[field]} ({shown}); every rank must call "
                             f"with the same pattern, dtype and chunk shape")
    return any(row[NONFINITE] for row in rows)


def fail(error: Exception, group: dist.ProcessGroup, timeout: timedelta | None) -> NoReturn:
    """Join the metadata check as a failed rank, then raise `error` (every other rank raises a
    DistributedError naming this rank)."""
    agree(None, error, group, timeout)
    raise error  # not reached: _agree raises it
