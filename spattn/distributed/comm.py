"""The collectives the distributed runtime calls, the subgroups it calls them in, and a counter of
the bytes they move.

Bytes are the payload a rank sends to and receives from *other* ranks (its own slot of a
collective stays local and is not counted), whatever algorithm the backend uses underneath:
an all-gather over g ranks of an S-byte buffer sends (g - 1) * S and receives (g - 1) * S; an
all-to-all of g slots of S bytes the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import AllgatherOptions, AllToAllOptions

from spattn.errors import SpattnError

_COUNTERS: list[CommCounter] = []
_SUBGROUPS: dict[tuple[str, tuple[int, ...]], dist.ProcessGroup] = {}


class DistributedError(SpattnError, RuntimeError):
    """Another rank's call failed: raised on every rank that did not fail itself."""


class CollectiveError(DistributedError):
    """One of spattn's collectives did not complete (timed out, or a peer left): some rank it
    waited on failed later than the check, exited, or never called in."""


def _ranks(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]} (it"
    shown = ", ".join(map(str, ranks)) if len(ranks) <= 8 else \
        f"{ranks[0]}..{ranks[-1]} ({len(ranks)} ranks)"
    return f"ranks {shown} (one of them"


def _run(launch: Callable[[], dist.Work], group: dist.ProcessGroup, step: str,
         timeout: timedelta | None) -> None:
    """Launch one collective and wait for it; anything that stops it is a CollectiveError
    naming this rank, the step and the ranks it waited on."""
    try:
        work = launch()
        if timeout is None:
            work.wait()
        else:
            work.wait(timeout)
    except RuntimeError as exc:  # gloo: a timeout or a closed connection; NCCL: its watchdog
        me = dist.get_rank(group)
        others = [dist.get_global_rank(group, r) for r in range(dist.get_world_size(group))
                  if r != me]
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        cause = cause if len(cause) <= 160 else cause[:157] + "..."
        ended = "timed out" if "timed out" in cause.lower() else "failed"
        if ended == "timed out" and timeout is not None:
            ended += f" after {timeout.total_seconds():g} s"
        raise CollectiveError(
            f"rank {dist.get_rank()}: {step} {ended} waiting on {_ranks(others)} failed, "
            f"exited or never called in; the process group may be unusable now) [{cause}]"
        ) from exc


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


def _options(kind: type, timeout: timedelta | None):
    opts = kind()
    opts.asyncOp = False
    if timeout is not None:  # unset: the process group's own timeout
        opts.timeout = timeout
    return opts


def all_gather(x: torch.Tensor, group: dist.ProcessGroup, phase: str, step: str,
               timeout: timedelta | None = None) -> torch.Tensor:
    """(g, *x.shape): slot m is member m's x. `step` names it in errors."""
    size = dist.get_world_size(group)
    x = x.contiguous()
    out = x.new_empty((size, *x.shape))
    opts = _options(AllgatherOptions, timeout)
    _run(lambda: group.allgather([list(out.unbind(0))], [x], opts), group, step, timeout)
    _record("all_gather", phase, size, x.numel() * x.element_size())
    return out


def all_to_all(x: torch.Tensor, group: dist.ProcessGroup, phase: str, step: str,
               timeout: timedelta | None = None) -> torch.Tensor:
    """x (g, ...): slot m goes to member m; returns (g, ...) whose slot m came from member m."""
    size = dist.get_world_size(group)
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    opts = _options(AllToAllOptions, timeout)
    _run(lambda: group.all_to_all_single(out, x, [], [], opts), group, step, timeout)
    _record("all_to_all", phase, size, x[0].numel() * x.element_size())
    return out


def _own_timeout(group: dist.ProcessGroup) -> timedelta | None:
    """The group's own timeout, given to the subgroups made from it (None: torch's default)."""
    try:  # no public getter in torch 2.13
        return group._get_backend(comm_device(group)).options._timeout
    except (AttributeError, RuntimeError):
        return None


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
        _SUBGROUPS[key] = dist.new_group(list(ranks), timeout=_own_timeout(group),
                                       use_local_synchronization=True)
    return _SUBGROUPS[key], rank - first
