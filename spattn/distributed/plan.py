"""The distributed plan: which branch is local, which spans ranks, and what each rank sends.

Rank j of P holds tokens [j*l, (j+1)*l), l = N/P. A dilated branch with segments of w' = min(w, N)
tokens is

- *local* when w' <= l and l % w' == 0: every segment lies inside one rank's chunk;
- *spanning* g = w'/l ranks when w' > l, w' % l == 0 and N % w' == 0: the segment starting at
  token a*l is held by ranks a .. a+g-1 (a subgroup), which all-gather their dilated K/V rows.

A dense branch is one segment of N tokens with dilation 1 (it spans all P ranks, or is local when
P = 1). Anything else (window, global, strided and random branches included) is a `PlanError`
before any communication.

In a spanning segment the rank at position p of its subgroup holds segment-local tokens
[p*l, (p+1)*l); head h keeps the tokens t with t % r == s_h, i.e. local rows
first = (s_h - p*l) mod r, first + r, ... . Each rank sends, per (kv head, offset) combination some
query head uses, its kept K and V rows, padded to the largest count in the subgroup so that every
rank sends an equal buffer. Per spanning branch the forward all-gathers that buffer within the
subgroup, and the backward returns the gathered rows' gradients with an all-to-all (the adjoint;
gloo has no reduce-scatter), summed by the owner: both move (g - 1) buffers out of and into every
rank. Gradients travel in the accumulation dtype (float32, or float64 for float64 inputs).

Everything here is analytic: no communication, O(heads * g) work per branch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from spattn.errors import SpattnError
from spattn.limits import MAX_WORLD_SIZE
from spattn.patterns.geometry import (
    Dense,
    Dilated,
    Global,
    RandomBlocks,
    Strided,
    Window,
    resolve,
)
from spattn.patterns.spec import Pattern

CHECK_ELEMENTS = 16  # int64 metadata every rank all-gathers over the whole group before any data

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
# branch kinds the plan cannot partition over ranks (yet)
UNSUPPORTED = {Window: "window", Global: "global", Strided: "strided", RandomBlocks: "random"}


class PlanError(SpattnError, ValueError):
    """A pattern, sequence length and world size that the distributed plan cannot serve."""


def grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype gradients are accumulated and sent in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Traffic:
    """What one rank sends and receives (payload to and from other ranks, padding included)."""

    sent_elements: int = 0
    received_elements: int = 0
    sent_bytes: int = 0
    received_bytes: int = 0

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(self.sent_elements + other.sent_elements,
                       self.received_elements + other.received_elements,
                       self.sent_bytes + other.sent_bytes,
                       self.received_bytes + other.received_bytes)


def _symmetric(elements: int, itemsize: int) -> Traffic:
    return Traffic(elements, elements, elements * itemsize, elements * itemsize)


@dataclass(frozen=True)
class BranchPlan:
    """One branch as a dilated branch (dense: w' = N, r = 1), placed over the ranks."""

    index: int
    label: str
    segment: int  # w' = min(w, N) tokens
    dilation: int
    offsets: tuple[int, ...]  # s_h for every query head
    span: int  # g: ranks one segment covers; 1 = local
    chunk: int  # l tokens per rank
    combos: tuple[tuple[int, int], ...]  # (kv head, offset) whose K/V rows are gathered
    combo_rows: tuple[int, ...]  # rows each rank sends per combo: the subgroup's largest count

    @property
    def local(self) -> bool:
        return self.span == 1

    def geometry(self) -> Dilated:
        return Dilated(self.segment, self.dilation, self.offsets)

    def first_row(self, position: int, offset: int) -> int:
        """The first chunk row that offset `offset` keeps at subgroup position `position`."""
        return (offset - position * self.chunk) % self.dilation

    def row_count(self, position: int, offset: int) -> int:
        return max(0, math.ceil((self.chunk - self.first_row(position, offset)) / self.dilation))

    @property
    def buffer_rows(self) -> int:
        """Rows of K (and as many of V) in the buffer each rank contributes."""
        return sum(self.combo_rows)

    @property
    def padding_rows(self) -> int:
        """The most padding rows any rank sends (rows it holds fewer than the largest count)."""
        if self.local:
            return 0
        held = [sum(self.row_count(p, s) for _, s in self.combos) for p in range(self.span)]
        return self.buffer_rows - min(held)

    def subgroups(self, world_size: int) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(range(a, a + self.span)) for a in range(0, world_size, self.span))


@dataclass(frozen=True)
class DistributedPlan:
    pattern: str
    seq_len: int
    world_size: int
    heads: int
    kv_heads: int
    head_dim: int
    batch: int
    dtype: torch.dtype
    causal: bool
    branches: tuple[BranchPlan, ...]

    @property
    def chunk(self) -> int:
        return self.seq_len // self.world_size

    def buffer_elements(self, branch: BranchPlan) -> int:
        """K and V rows one rank contributes to a spanning branch's collective."""
        return 2 * self.batch * branch.buffer_rows * self.head_dim

    def forward(self, branch: BranchPlan) -> Traffic:
        """The branch's all-gather within its subgroup."""
        elements = (branch.span - 1) * self.buffer_elements(branch)
        return _symmetric(elements, self.dtype.itemsize)

    def backward(self, branch: BranchPlan) -> Traffic:
        """The adjoint all-to-all of the gathered rows' gradients."""
        elements = (branch.span - 1) * self.buffer_elements(branch)
        return _symmetric(elements, grad_dtype(self.dtype).itemsize)

    def check(self) -> Traffic:
        """The metadata all-gather over all ranks that every call starts with."""
        return _symmetric((self.world_size - 1) * CHECK_ELEMENTS, 8)

    def forward_total(self) -> Traffic:
        return sum((self.forward(b) for b in self.branches), self.check())

    def backward_total(self) -> Traffic:
        return sum((self.backward(b) for b in self.branches), Traffic())

    def gather_everything(self) -> tuple[Traffic, Traffic]:
        """(forward, backward) of all-gathering every rank's whole K and V over all P ranks."""
        elements = (self.world_size - 1) * 2 * self.batch * self.kv_heads * self.chunk * \
            self.head_dim
        return (_symmetric(elements, self.dtype.itemsize),
                _symmetric(elements, grad_dtype(self.dtype).itemsize))

    def gather_from_all(self) -> tuple[Traffic, Traffic]:
        """(forward, backward) of gathering the same dilated rows of every spanning branch from
        all P ranks instead of the subgroup (what the official LongNet code does)."""
        elements = sum((self.world_size - 1) * self.buffer_elements(b) for b in self.branches
                       if not b.local)
        return (_symmetric(elements, self.dtype.itemsize),
                _symmetric(elements, grad_dtype(self.dtype).itemsize))


def _place(index: int, label: str, g: Dilated, n: int, world: int, kv_heads: int
           ) -> BranchPlan:
    chunk, w, r = n // world, g.segment, g.dilation
    heads = len(g.offsets)
    if w <= chunk and (chunk % w == 0 or world == 1):  # one rank: a short last segment is fine
        return BranchPlan(index, label, w, r, g.offsets, 1, chunk, (), ())
    if w > chunk and w % chunk == 0 and n % w == 0:
        span = w // chunk
        group = heads // kv_heads
        combos = tuple(sorted({(h // group, g.offsets[h]) for h in range(heads)}))
        plan = BranchPlan(index, label, w, r, g.offsets, span, chunk, combos, ())
        rows = tuple(max(plan.row_count(p, s) for p in range(span)) for _, s in combos)
        return BranchPlan(index, label, w, r, g.offsets, span, chunk, combos, rows)
    if w <= chunk:
        why = f"{chunk} % {w} != 0, so segments straddle the rank boundaries"
    elif w % chunk:
        why = f"{w} % {chunk} != 0, so a segment ends inside a rank's chunk"
    else:
        why = f"{n} % {w} != 0, so the last segment ends inside a rank's chunk"
    raise PlanError(f"branch {index} ({label}): segments of w'={w} tokens do not fit chunks of "
                    f"l={chunk} tokens (N={n}, P={world}): {why}; a distributed plan needs "
                    f"l % w' == 0 (local) or w' % l == 0 and N % w' == 0 (spanning)")


def build_plan(pattern: Pattern, seq_len: int, world_size: int, *, heads: int,
               kv_heads: int | None = None, head_dim: int = 64, batch: int = 1,
               dtype: torch.dtype | str = torch.float32) -> DistributedPlan:
    """The plan for `pattern` over `world_size` ranks of `seq_len // world_size` tokens each."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise PlanError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    kv_heads = heads if kv_heads is None else kv_heads
    for name, value in (("seq_len", seq_len), ("world_size", world_size), ("heads", heads),
                        ("kv_heads", kv_heads), ("head_dim", head_dim), ("batch", batch)):
        if value < 1:
            raise PlanError(f"{name} must be >= 1, got {value}")
    if world_size > MAX_WORLD_SIZE:
        raise PlanError(f"world_size must be at most {MAX_WORLD_SIZE:,} (2^20) ranks, got "
                        f"{world_size:,}")
    if heads % kv_heads:
        raise PlanError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if seq_len % world_size:
        raise PlanError(f"N={seq_len} is not divisible by the world size P={world_size}: "
                        f"every rank must hold N/P tokens")
    if pattern.overlap == "union":
        raise PlanError(f"pattern '{pattern.name}': overlap: union is not supported distributed "
                        f"yet (use multiset)")
    try:
        geometries = resolve(pattern, seq_len, heads)
    except ValueError as error:
        raise PlanError(str(error)) from None
    branches = []
    for i, g in enumerate(geometries):
        if g.on_heads is not None:
            raise PlanError(f"branch {i}: branches for some heads only (`heads:`) are not "
                            f"supported distributed yet")
        kind = UNSUPPORTED.get(type(g))
        if kind is not None:
            raise PlanError(f"branch {i} ({kind}): {kind} branches are not supported distributed "
                            f"yet; dilated and dense branches are")
        if isinstance(g, Dense):
            g, label = Dilated(seq_len, 1, (0,) * heads), "dense"
        else:
            label = f"dilated w={g.segment} r={g.dilation}"
        branches.append(_place(i, label, g, seq_len, world_size, kv_heads))
    return DistributedPlan(pattern.name, seq_len, world_size, heads, kv_heads, head_dim, batch,
                           dtype, pattern.causal, tuple(branches))


# --- text -----------------------------------------------------------------------------------


def _size(n: int, unit: str = "B") -> str:
    for prefix, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {prefix}i{unit}"
    return f"{n} {unit}"


def _amount(t: Traffic) -> str:
    """Sent (= received, on every rank) elements and bytes."""
    return f"{t.sent_elements:,} ({_size(t.sent_bytes)})" if t.sent_elements else "0"


def _groups(branch: BranchPlan, world: int) -> str:
    groups = branch.subgroups(world)
    if branch.local:
        return "-"
    shown = " ".join("{" + f"{g[0]}..{g[-1]}" + "}" for g in groups[:2])
    return shown + (f" .. ({len(groups)})" if len(groups) > 2 else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                      for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()
            for row in [header, *rows]]


def format_plan(plan: DistributedPlan) -> str:
    """The plan as `spattn plan` prints it: elements (bytes) per rank per layer."""
    dtype = str(plan.dtype).removeprefix("torch.")
    lines = [
        f"{plan.pattern}: {'causal' if plan.causal else 'bidirectional'}, N = {plan.seq_len:,} "
        f"tokens over P = {plan.world_size} ranks (l = {plan.chunk:,} tokens each)",
        f"H = {plan.heads}, Hkv = {plan.kv_heads}, head_dim {plan.head_dim}, batch {plan.batch}, "
        f"{dtype} (gradients sent in {str(grad_dtype(plan.dtype)).removeprefix('torch.')})",
        "",
        "elements (bytes) each rank sends per layer; it receives as much, and every rank is alike",
    ]
    header = ["branch", "placement", "subgroups", "rows sent", "forward", "backward"]
    rows = []
    for b in plan.branches:
        place = "local" if b.local else f"spans {b.span} ranks"
        sent = "-" if b.local else f"{b.buffer_rows:,}" + (f" (+{b.padding_rows} pad)"
                                                           if b.padding_rows else "")
        rows.append([f"{b.index} {b.label}", place, _groups(b, plan.world_size), sent,
                     _amount(plan.forward(b)), _amount(plan.backward(b))])
    rows.append(["rank check", "metadata", "all ranks", "-", _amount(plan.check()), "0"])
    rows.append(["total", "", "", "", _amount(plan.forward_total()),
                 _amount(plan.backward_total())])
    for label, (forward, backward) in (("gather all K/V", plan.gather_everything()),
                                       ("rows from all P", plan.gather_from_all())):
        rows.append([label, "", "", "", _amount(forward), _amount(backward)])
    lines += _table(header, rows)
    lines += [
        "",
        "rows sent: K rows (and as many V rows) per (kv head, offset) a query head uses, padded to",
        "the subgroup's largest count (padding is sent and counted). Forward: one all-gather per",
        "spanning branch within its subgroup; backward: its adjoint, one all-to-all of the",
        "gathered rows' gradients. gather all K/V: all-gathering every rank's whole K and V over",
        "all P ranks. rows from all P: the same dilated rows gathered from every rank instead of",
        "the subgroup (the official LongNet code).",
    ]
    return "\n".join(lines)
