"""The collectives the distributed runtime calls, the subgroups it calls them in, and a counter of
the bytes they move.

Bytes are the payload a rank sends to and receives from *other* ranks (its own slot of a
collective stays local and is not counted), whatever algorithm the backend uses underneath:
an all-gather over g ranks of an S-byte buffer sends (g - 1) * S and receives (g - 1) * S; an
all-to-all of g slots of S bytes the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

_COUNTERS: list[CommCounter] = []
_SUBGROUPS: dict[tuple[str, tuple[int, ...]], dist.ProcessGroup] = {}


@dataclass(frozen=True)
class Record:
    op: str
    phase: str  # "check", "forward" or "backward"
    group_size: int
    sent: int  # bytes to other ranks
    received: int  # bytes from other ranks


@dataclass
class CommCounter:
    """`with CommCounter() as c: ...` records every collective this process calls inside."""

    records: list[Record] = field(default_factory=list)

    def __enter__(self) -> CommCounter:
        _COUNTERS.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _COUNTERS.remove(self)

    def sent(self, phase: str | None = None) -> int:
        return sum(r.sent for r in self.records if phase in (None, r.phase))

    def received(self, phase: str | None = None) -> int:
        return sum(r.received for r in self.records if phase in (None, r.phase))


def _record(op: str, phase: str, group_size: int, slot_bytes: int) -> None:
    moved = (group_size - 1) * slot_bytes
    for counter in _COUNTERS:
        counter.records.append(Record(op, phase, group_size, moved, moved))


def comm_device(group: dist.ProcessGroup) -> torch.device:
    """Where this group's tensors live: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather(x: torch.Tensor, group: dist.ProcessGroup, phase: str) -> torch.Tensor:
    """(g, *x.shape): slot m is member m's x."""
    size = dist.get_world_size(group)
    x = x.contiguous()
    out = x.new_empty((size, *x.shape))
    dist.all_gather(list(out.unbind(0)), x, group=group)
    _record("all_gather", phase, size, x.numel() * x.element_size())
    return out


def all_to_all(x: torch.Tensor, group: dist.ProcessGroup, phase: str) -> torch.Tensor:
    """x (g, ...): slot m goes to member m; returns (g, ...) whose slot m came from member m."""
    size = dist.get_world_size(group)
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    _record("all_to_all", phase, size, x[0].numel() * x.element_size())
    return out


def subgroup(group: dist.ProcessGroup, span: int) -> tuple[dist.ProcessGroup, int]:
    """The subgroup of `span` consecutive ranks of `group` holding this rank, and the rank's
    position in it. Created once, by its own members only (local synchronization)."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if span == size:
        return group, rank
    first = rank - rank % span
    ranks = tuple(dist.get_global_rank(group, r) for r in range(first, first + span))
    key = (group.group_name, ranks)
    if key not in _SUBGROUPS:
        _SUBGROUPS[key] = dist.new_group(list(ranks), use_local_synchronization=True)
    return _SUBGROUPS[key], rank - first
