"""The PyTorch backend's cost model: what one attention call, one copied byte and one scored pair
cost on this machine, used to choose a plan (`spattn.runtime.batches`).

The untuned model is a fixed table (measured on a 2-core x86 machine), so plans are the same
everywhere until `spattn tune` measures this machine. Its figures are kept in
`$SPATTN_CACHE_DIR/costs/<machine>-torch-<version>.json` and read by every later process. The
file is not trusted: it is read only if it is a regular file of at most MAX_FILE_BYTES, and used
only if every figure is there, a finite number in range and nothing else is; otherwise the
default model is used and a warning names the file and what is wrong with it.
"""

from __future__ import annotations

import json
import os
import platform
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from spattn.compiler.files import check_regular, own_folder, read_regular, write_atomically
from spattn.errors import SpattnError
from spattn.runtime.triton_backend import cache_dir

KV_SPLIT = 512  # keys per block of torch's fused CPU attention


def _q_split(rows: int) -> int:
    """Query rows per block of torch's fused CPU attention (its choice by query length)."""
    return 256 if rows >= 768 else 64 if rows >= 192 else 32


def busiest_pairs(problems: int, mq: int, mk: int, causal: bool, threads: int) -> int:
    """Pairs the busiest thread scores in one fused call over `problems` (mq x mk) problems.

    The kernel cuts each problem into query blocks and hands the (problem, block) list to the
    threads in equal contiguous runs; causal, a block scores its keys up to its last row, rounded
    up to whole key blocks. One causal problem on two threads thus leaves the first thread about
    a third of the work: stacking problems evens it out.
    """
    qs = _q_split(mq)
    blocks = -(-mq // qs)
    costs = []
    for i in range(blocks):
        rows = min(qs, mq - i * qs)
        keys = mk
        if causal:
            keys = min(mk, -(-min(mk, (i + 1) * qs) // KV_SPLIT) * KV_SPLIT)
        costs.append(rows * keys)
    items = problems * blocks
    prefix = [0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)

    def work(end: int) -> int:  # items 0 .. end-1: whole problems, then a partial one
        return end // blocks * prefix[-1] + prefix[end % blocks]

    per_thread = -(-items // max(1, threads))
    busiest = 0
    for first in range(0, items, per_thread):  # each thread's contiguous run of items
        busiest = max(busiest, work(min(items, first + per_thread)) - work(first))
    return busiest


@dataclass(frozen=True)
class CostModel:
    call_us: float  # fixed cost of one attention call with its merge
    copy_gbps: float  # gathering rows into a stacked batch (GB/s)
    pair_ns: float  # one (query, key) pair at head dim 64, on one thread
    mask_ns: float = 0.0  # more per pair when a mask is added to the scores
    block_us: float = 0.0  # one query block of one problem, beyond its pairs
    piece_us: float = 0.0  # one piece's views and merge, beyond its elements
    merge_ns: float = 0.0  # one output element merged into the running (O, LSE)
    source: str = "default"

    def merge(self, pieces: Sequence, head_dim: int) -> float:
        """Predicted microseconds of taking the pieces' rows and merging their results."""
        elements = sum(p.q.count * p.q.nseg for p in pieces) * (head_dim + 1)
        return len(pieces) * self.piece_us + elements * self.merge_ns / 1e3

    def call(self, problems: int, mq: int, mk: int, causal: bool, head_dim: int,
             masked: bool = False) -> float:
        """Predicted microseconds of one fused call."""
        threads = torch.get_num_threads()
        pairs = busiest_pairs(problems, mq, mk, causal, threads)
        blocks = -(-problems * -(-mq // _q_split(mq)) // threads)  # the busiest thread's
        per_pair = self.pair_ns * head_dim / 64 + (self.mask_ns if masked else 0.0)
        return self.call_us + pairs * per_pair / 1e3 + blocks * self.block_us

    def compare(self, pieces: Sequence, head_dim: int, item_bytes: int = 4
                ) -> tuple[float, float]:
        """Predicted microseconds of the same-shape pieces run one call each, and stacked into
        one call (the rows of q, k and v of every piece copied first)."""
        p = pieces[0]
        args = (p.q.count, p.k.count, p.causal, head_dim, p.masked)
        separate = len(pieces) * self.call(p.q.nseg, *args)
        rows = sum(x.q.count * x.q.nseg + 2 * x.k.count * x.k.nseg for x in pieces)
        copy_us = rows * head_dim * item_bytes / (self.copy_gbps * 1e3)
        return separate, self.call(p.q.nseg * len(pieces), *args) + copy_us

    def describe(self) -> str:
        return (f"{self.source}: {self.call_us:.0f} us a call, {self.copy_gbps:.1f} GB/s "
                f"gathered, {self.pair_ns:.2f} ns a pair a thread (D=64), "
                f"{self.mask_ns:.2f} ns more masked, {self.block_us:.1f} us a query block, "
                f"{self.piece_us:.0f} us + {self.merge_ns:.2f} ns an element a piece")


DEFAULT = CostModel(call_us=50.0, copy_gbps=4.0, pair_ns=9.5, mask_ns=0.8, block_us=6.0,
                    piece_us=40.0, merge_ns=1.2)  # `spattn tune` on a 2-core x86_64


def _path() -> Path:
    return _file(str(cache_dir()), torch.get_num_threads())


@lru_cache(maxsize=8)
def _file(root: str, threads: int) -> Path:
    machine = f"{platform.machine()}-{os.cpu_count()}cpu-{threads}threads"
    return Path(root) / "costs" / f"{machine}-torch-{torch.__version__}.json"


def current() -> CostModel:
    """The tuned model of this machine if `spattn tune` measured it, else the default. Asked
    on every call: the file is read once per cache folder and thread count."""
    return _read(os.environ.get("SPATTN_CACHE_DIR", ""), torch.get_num_threads())


MAX_FILE_BYTES = 64 * 1024  # a tuned file is a few hundred bytes
_LIMIT = 1e9  # beyond any real figure (a 1000 s call, 1e9 GB/s): keeps predictions finite
Positive = Annotated[float, Field(gt=0, le=_LIMIT, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, le=_LIMIT, allow_inf_nan=False)]


class TunedFile(BaseModel):
    """What a tuned cost file holds: every figure of CostModel, each a finite number (no
    strings, booleans or nulls); the measured ones positive, the differences at least 0."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    call_us: Positive
    copy_gbps: Positive  # divides: never 0
    pair_ns: Positive
    mask_ns: NonNegative
    block_us: NonNegative
    piece_us: NonNegative
    merge_ns: NonNegative


assert set(TunedFile.model_fields) == {f.name for f in fields(CostModel)} - {"source"}


class CostFileWarning(UserWarning):
    """The tuned cost file is unusable; the default model is used instead."""


@lru_cache(maxsize=8)
def _read(root: str, threads: int) -> CostModel:
    path = _path()
    try:
        data = read_regular(path, MAX_FILE_BYTES)
    except (FileNotFoundError, NotADirectoryError):  # untuned
        return DEFAULT
    except OSError as error:
        return _ignore(path, error.strerror or str(error))
    try:
        figures = TunedFile.model_validate_json(data)
    except ValidationError as error:
        return _ignore(path, _problem(error))
    return CostModel(**figures.model_dump(), source=f"tuned ({path.name})")


def _problem(error: ValidationError) -> str:
    """The first thing wrong, with its field: 'copy_gbps: Input should be greater than 0'."""
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "the file"
    return f"{field}: {first['msg']}"


def _ignore(path: Path, why: str) -> CostModel:
    """Say once (the caller is cached) that the tuned file is unusable, and use the default."""
    warnings.warn(f"ignoring the tuned cost model {path} ({why}); using the built-in default "
                  f"(run `spattn tune` to measure this machine again)", CostFileWarning,
                  stacklevel=4)
    return DEFAULT


def _best(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(repeats: int = 5, progress: Callable[[str], None] | None = None) -> CostModel:
    """Time the figures on this machine (a few seconds): a call on a tiny problem, a gather of
    strided rows, the pairs of a large dense problem (per thread, as `busiest_pairs` counts
    them) without and with a mask, many small problems, and merges of a tiny and a large
    result."""
    from spattn.runtime.kernels import Mask, attend

    say = progress or (lambda _: None)
    say("a call")
    tiny = torch.randn(1, 1, 16, 64)
    o_acc, l_acc = torch.zeros(1, 16, 64), torch.full((1, 16), float("-inf"))

    call = _best(lambda: attend(tiny, tiny, tiny, 0.125, False, None), repeats * 20)
    say("a gather")
    big = torch.randn(1, 1 << 16, 64)
    rows = [big[:, s::4].unsqueeze(1) for s in range(4)]
    gather = _best(lambda: torch.cat(rows, 1), repeats)
    say("the pairs")
    m = 1024
    q = torch.randn(1, 4, m, 64)
    pairs = _best(lambda: attend(q, q, q, 0.125, False, None), repeats) - call
    say("a mask")
    mask = Mask.of(torch.rand(1, m, m) < 0.5, q.dtype)
    masked = _best(lambda: attend(q, q, q, 0.125, False, mask), repeats) - call
    busiest = busiest_pairs(4, m, m, False, torch.get_num_threads())
    pair_ns = max(pairs, 0.0) * 1e9 / busiest
    say("small problems")
    small = torch.randn(1, 512, 32, 64)  # 512 problems of one 32-row block against 32 keys
    many = _best(lambda: attend(small, small, small, 0.125, False, None), repeats) - call
    threads = torch.get_num_threads()
    pairs_small = busiest_pairs(512, 32, 32, False, threads) * pair_ns / 1e9
    say("merges")
    tiny_piece = _best(lambda: _merge_one(o_acc, l_acc), repeats * 20)
    o_big, l_big = torch.zeros(1, 1 << 16, 64), torch.zeros(1, 1 << 16)
    big_piece = _best(lambda: _merge_one(o_big, l_big), repeats) - tiny_piece
    return CostModel(call_us=call * 1e6, copy_gbps=big.numel() * 4 / gather / 1e9,
                     pair_ns=pair_ns, mask_ns=max(masked - pairs, 0.0) * 1e9 / busiest,
                     block_us=max(many - pairs_small, 0.0) * 1e6 / -(-512 // threads),
                     piece_us=tiny_piece * 1e6,
                     merge_ns=max(big_piece, 0.0) * 1e9 / (l_big.numel() * 65),
                     source="tuned")


def _merge_one(o_acc: torch.Tensor, l_acc: torch.Tensor) -> None:
    """The backend's own merge of one result into a running (O, LSE) of every row of
    (1, N, D) and (1, N)."""
    from spattn.runtime.rows import Rows
    from spattn.runtime.torch_backend import _merge

    rows = Rows(0, o_acc.shape[1])
    _merge(rows, o_acc, l_acc, rows.take(o_acc).clone(), rows.take(l_acc).clone(), False)


def tune(repeats: int = 5, progress: Callable[[str], None] | None = None) -> tuple[CostModel,
                                                                                    Path]:
    """Measure this machine and keep the figures for later processes (an OSError, before any
    timing, if the file cannot go where it belongs: a link or FIFO in its place, a read-only
    cache)."""
    path = _path()
    own_folder(path.parent)
    check_regular(path)
    model = measure(repeats, progress)
    figures = {k: v for k, v in asdict(model).items() if k != "source"}
    try:
        TunedFile.model_validate(figures)
    except ValidationError as error:  # a timing gone wrong: never keep what no one can read
        raise SpattnError(f"measured figures are unusable ({_problem(error)}); run `spattn "
                          f"tune` again") from None
    write_atomically(path, json.dumps(figures, indent=1) + "\n")
    _read.cache_clear()
    return model, path
