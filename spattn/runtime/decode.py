"""`spattn.KVCache`: incremental decoding of a causal pattern.

Each `attend(q, k, v)` takes the next T >= 1 tokens and returns their outputs, the same rows a
full causal forward over every token so far would give. The cache keeps only the keys and values
that a later query can still attend (patterns/retention.py), so for a pattern of dilated, window
and global branches its memory is bounded by the pattern, not by the sequence.

The first call runs the ordinary forward over its tokens (a prompt of any length); later calls
attend their queries to the kept keys and their own, each key weighed by how many branches give
it (once under `overlap: union`).

Keys and values live in preallocated buffers with lazy eviction: new tokens are written after
the last slot in use, a key no later query needs is only marked dead in the host's bookkeeping
(the pattern itself gives it to no later query, so its slot may stay as it is), and the live
keys are compacted, in order, only when the buffer is full. A bounded pattern's buffer holds
at most twice its bound, so a compaction frees room for at least `bound` more tokens: O(1)
copying per token, amortized, where concatenating every step would copy every kept key.

On the PyTorch backend decoding is a masked softmax over the kept keys, built from the branches'
position predicates a chunk of queries at a time; on the Triton backend it is the pattern's
generated decode kernel (`decode_attention` in the emitted module).

No host syncs in the steady state. A step that needs no new buffer (no growth, no compaction)
reads nothing back from the device and copies nothing to it: positions are written on the
device (`torch.arange`), what dies is worked out on the host from positions it computed itself,
and non-finite inputs are tracked on the device (a flag per cached key, its row stored zeroed),
so the NaN contract holds without the guard's check. Such a step can be captured in a CUDA graph
(after a warm-up step at the same shapes has built the device tables); a replay re-runs the
captured step (the same slots and positions) on whatever its input tensors then hold.
"""

from __future__ import annotations

import itertools
import weakref

import numpy as np
import torch

from spattn.errors import SpattnError
from spattn.limits import check_scale
from spattn.patterns.loader import load_pattern
from spattn.patterns.retention import cache_bound, last_use
from spattn.patterns.spec import Pattern
from spattn.runtime import nonfinite
from spattn.runtime.cached import decode
from spattn.runtime.dispatch import (
    InputError,
    attention,
    check_sinks,
    check_tensors,
    pick_backend,
    resolve_scale,
)

# the position of an unused slot: after every query (positions stay below 2^30), so causal order
# hides it from all of them; int32, as the decode kernels read positions
DEAD = 2**31 - 1

_CACHES: weakref.WeakValueDictionary[str, KVCache] = weakref.WeakValueDictionary()  # by name
_NAMES = itertools.count()


class KVCache:
    """Decode a causal pattern a few tokens at a time, keeping only the keys it still needs.

        cache = spattn.KVCache("longnet-lm")
        out = cache.attend(q, k, v)    # q (B, H, T, D), k/v (B, Hkv, T, D): the next T tokens

    `attend` runs without autograd (decoding is inference). `bound` is the most tokens the cache
    ever holds (None when the pattern keeps every key); `kept` and `memory_bytes` say what it
    holds now.

    With `check_finite` (default) a NaN or inf in q, k or v reaches exactly the rows that attend
    it, as in `spattn.attention`, tracked on the device (no host sync). `check_finite=False`
    drops that bookkeeping (a byte per cached key and head, and a pass over each step's mask):
    non-finite inputs are then not tracked and may also reach rows that do not attend them.

    Under `torch.compile(fullgraph=True)` a call is one opaque op (`spattn::kv_cache_attend`)
    that runs this eager step: its host bookkeeping (what to keep, when to compact) changes
    from step to step and cannot be traced, so the compiler optimizes the model around it.
    """

    def __init__(self, pattern: Pattern | str, *, backend: str | None = None,
                 scale: float | None = None, check_finite: bool = True) -> None:
        self.pattern = load_pattern(pattern)
        if not self.pattern.causal:
            raise SpattnError(f"pattern '{self.pattern.name}' is not causal: decoding needs a "
                              f"causal pattern (a query must not see keys that have not arrived)")
        self.backend = backend
        self.scale = None if scale is None else check_scale(scale)
        self.check_finite = check_finite
        self.seen = 0  # tokens attended so far
        # slots [0, used) of the buffers: live and dead keys, in arrival order
        self._keys: torch.Tensor | None = None  # (B, Hkv, capacity, D)
        self._values: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None  # (capacity,) int64; DEAD: unused
        self._bad: torch.Tensor | None = None  # (B, Hkv, capacity) bool: k or v not finite
        self._last_use = np.zeros(0, dtype=np.int64)  # (capacity,) retention.last_use; -1 dead
        self._used = 0
        self._shape: tuple | None = None  # (B, H, Hkv, D, dtype, device) of the first call
        self._bound: int | None = None
        self._backend_name: str | None = None
        # for torch.compile: the name the op finds this cache by, and a count of its calls that
        # the op mutates (so a graph keeps the calls, in order)
        self._name = f"kv-cache-{next(_NAMES)}"
        self._calls = torch.zeros((), dtype=torch.int64)
        _CACHES[self._name] = self

    # ---- what the cache holds -----------------------------------------------------------------

    @property
    def kept(self) -> int:
        """Tokens whose keys and values the cache holds now (live ones)."""
        return int((self._last_use[:self._used] >= 0).sum())

    @property
    def capacity(self) -> int:
        """Slots the buffers have now."""
        return len(self._last_use)

    @property
    def positions(self) -> torch.Tensor | None:
        """(kept,) int64: the token positions of the live keys, in order."""
        if self._positions is None:
            return None
        return self._positions[:self._used][self._alive()]

    @property
    def keys(self) -> torch.Tensor | None:
        """(B, Hkv, kept, D): the live keys, in order (a copy; a key whose k or v was not
        finite reads back as NaN)."""
        return self._live(self._keys)

    @property
    def values(self) -> torch.Tensor | None:
        """(B, Hkv, kept, D): the live values, in order (a copy, NaN as for `keys`)."""
        return self._live(self._values)

    def _live(self, buffer: torch.Tensor | None) -> torch.Tensor | None:
        if buffer is None:
            return None
        alive = self._alive()
        live = buffer[:, :, :self._used][:, :, alive]
        if self._bad is None:
            return live
        return live.masked_fill(self._bad[:, :, :self._used][:, :, alive].unsqueeze(-1),
                                float("nan"))

    def _alive(self) -> torch.Tensor:
        return torch.from_numpy(self._last_use[:self._used] >= 0).to(self._positions.device)

    @property
    def bound(self) -> int | None:
        """The most tokens the cache ever holds (None: every token, the pattern forgets none).
        Known once the number of heads is: from the pattern or the first call."""
        heads = self._shape[1] if self._shape else self.pattern.required_heads()
        if heads is None:
            raise SpattnError("the bound depends on the number of heads: call attend first, or "
                              "give the pattern 'heads'")
        if self._shape is None:
            return cache_bound(self.pattern, heads)
        return self._bound

    @property
    def memory_bytes(self) -> int:
        """Bytes the cache's buffers take now: keys, values, and per slot 16 bytes of
        bookkeeping and (with check_finite) a byte per batch row and key head."""
        if self._keys is None:
            return 0
        return self.capacity * self._slot_bytes()

    def bound_bytes(self) -> int | None:
        """The most `memory_bytes` ever reaches: buffers of twice the bound (None when
        unbounded); known after the first call."""
        if self._shape is None:
            raise SpattnError("the bound in bytes depends on the tensors: call attend first")
        if self._bound is None:
            return None
        return 2 * self._bound * self._slot_bytes()

    def _slot_bytes(self) -> int:
        batch, _, kv_heads, dim, dtype, _ = self._shape
        flags = batch * kv_heads if self.check_finite else 0
        return 2 * batch * kv_heads * dim * dtype.itemsize + 16 + flags

    def reset(self) -> None:
        """Forget every token (a new sequence of the same shapes); the buffers are kept."""
        self.seen = self._used = 0
        self._last_use[:] = -1

    # ---- decoding -----------------------------------------------------------------------------

    @torch.no_grad()
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               sinks: torch.Tensor | None = None) -> torch.Tensor:
        """Outputs (B, H, T, D) of the next T tokens, given their q (B, H, T, D) and k, v
        (B, Hkv, T, D): rows seen .. seen+T-1 of the full causal forward. `sinks` (H,) are
        attention sinks, as `spattn.attention` takes them."""
        if torch.compiler.is_compiling():
            return kv_cache_attend(q, k, v, sinks, self._calls, self._name)
        return self._attend(q, k, v, sinks)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                sinks: torch.Tensor | None) -> torch.Tensor:
        call = check_tensors(q, k, v)
        self._check_shape(call)
        sinks = check_sinks(sinks, call)
        scale = resolve_scale(self.pattern, self.scale, call.head_dim)
        first, t = self.seen, call.seq_len
        if t == 0:
            return q.new_zeros(q.shape)
        if first == 0:  # a prompt: the ordinary forward over its tokens
            out = attention(q, k, v, self.pattern, backend=self._backend_name, scale=scale,
                            sinks=sinks)
            uses = last_use(self.pattern, call.heads, np.arange(t))
            keep = np.flatnonzero(uses >= t)  # what a later query attends
            index = torch.from_numpy(keep).to(k.device)
            self._append(k[:, :, index], v[:, :, index], index + first, uses[keep])
            self.seen = t
            return out
        # chunks of at most `bound` tokens: the buffers never pass twice the bound
        step = t if self._bound is None else max(1, self._bound)
        outs = [self._step(q[:, :, lo:lo + step], k[:, :, lo:lo + step], v[:, :, lo:lo + step],
                           scale, sinks) for lo in range(0, t, step)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              sinks: torch.Tensor | None) -> torch.Tensor:
        """Decode T new tokens: add their keys, attend, then mark what no later query needs."""
        first, t = self.seen, q.shape[2]
        positions = torch.arange(first, first + t, device=k.device)  # on the device: no copy
        self._append(k, v, positions, last_use(self.pattern, q.shape[1],
                                               np.arange(first, first + t)))
        used = self._used
        out = self._decode(q, self._keys[:, :, :used], self._values[:, :, :used],
                           self._positions[:used], first, scale, sinks,
                           None if self._bad is None else self._bad[:, :, :used])
        self.seen += t
        self._evict()
        return out

    def _append(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                uses: np.ndarray) -> None:
        """Write keys and values after the last slot in use, making room first if needed."""
        t = k.shape[2]
        if self._keys is None or self._used + t > self.capacity:
            self._compact()
            # at least half the buffer free after a compaction, so the next one is far off
            # (up to twice the bound, which leaves `bound` free slots)
            want = max(self._used + t, 2 * self._used)
            if self._bound is not None:
                want = min(want, max(2 * self._bound, self._used + t))
            if self._keys is None or want > self.capacity:
                self._grow(want)
        at = slice(self._used, self._used + t)
        if self._bad is not None:  # the buffers hold finite rows; the flags say which were not
            good = nonfinite.finite_rows(k) & nonfinite.finite_rows(v)
            k, v = nonfinite.zeroed(k, good), nonfinite.zeroed(v, good)
            self._bad[:, :, at] = ~good
        self._keys[:, :, at] = k
        self._values[:, :, at] = v
        self._positions[at] = positions
        self._last_use[at] = np.maximum(uses, -1)  # -1: no query attends it (dead at once)
        self._used += t

    def _evict(self) -> None:
        """Mark the keys no query from `seen` on attends dead, in the host's bookkeeping only:
        the pattern gives them to no later query (that is what last_use says), so their slots
        need no change on the device until a compaction drops them."""
        uses = self._last_use[:self._used]
        uses[(uses >= 0) & (uses < self.seen)] = -1

    def _compact(self) -> None:
        """Move the live keys, in order, to the front of the buffers."""
        alive = self._last_use[:self._used] >= 0
        if self._keys is None or alive.all():
            return
        index = torch.from_numpy(np.flatnonzero(alive)).to(self._positions.device)
        live = len(index)
        self._keys[:, :, :live] = self._keys[:, :, index]
        self._values[:, :, :live] = self._values[:, :, index]
        self._positions[:live] = self._positions[index]
        if self._bad is not None:
            self._bad[:, :, :live] = self._bad[:, :, index]
        self._last_use[:live] = self._last_use[:self._used][alive]
        self._last_use[live:] = -1
        self._positions[live:] = DEAD
        self._used = live

    def _grow(self, need: int) -> None:
        """Buffers of `need` slots (at least 16), the slots in use copied over."""
        capacity = max(need, 16)
        batch, _, kv_heads, dim, dtype, device = self._shape
        keys = torch.empty((batch, kv_heads, capacity, dim), dtype=dtype, device=device)
        values = torch.empty_like(keys)
        positions = torch.full((capacity,), DEAD, dtype=torch.int64, device=device)
        bad = torch.zeros((batch, kv_heads, capacity), dtype=torch.bool, device=device) \
            if self.check_finite else None
        last = np.full(capacity, -1, dtype=np.int64)
        used = self._used
        if used:
            keys[:, :, :used] = self._keys[:, :, :used]
            values[:, :, :used] = self._values[:, :, :used]
            positions[:used] = self._positions[:used]
            if bad is not None:
                bad[:, :, :used] = self._bad[:, :, :used]
            last[:used] = self._last_use[:used]
        self._keys, self._values, self._positions, self._last_use = keys, values, positions, last
        self._bad = bad

    def _decode(self, q, keys, values, positions, first, scale, sinks, bad=None) -> torch.Tensor:
        return decode(q, keys, values, positions, first, self.pattern, scale, sinks,
                      self._backend_name, bad)

    def _check_shape(self, call) -> None:
        """The first call fixes B, H, Hkv, D, dtype and device (and the backend); later calls
        must match them."""
        shape = (call.batch, call.heads, call.kv_heads, call.head_dim, call.dtype, call.device)
        if self._shape is None:
            self._backend_name = pick_backend(call, self.pattern, self.backend)
            self._bound = cache_bound(self.pattern, call.heads)
            self._shape = shape
            return
        names = ("batch", "heads", "kv_heads", "head_dim", "dtype", "device")
        for name, want, got in zip(names, self._shape, shape, strict=True):
            if want != got:
                raise InputError(f"this cache decodes {name} = {want} (from its first call), "
                                 f"got {got}; use a new KVCache (or reset() and the same "
                                 f"shapes) for another sequence")


@torch.library.custom_op("spattn::kv_cache_attend", mutates_args=("calls",))
def kv_cache_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    sinks: torch.Tensor | None, calls: torch.Tensor, cache: str) -> torch.Tensor:
    """`KVCache.attend` of the cache named `cache`, as one op: what a compiled model calls. The
    step runs eagerly (its bookkeeping lives on the host); `calls` counts the calls. (A CPU
    tensor, it also keeps a CUDA graph of the compiled model from capturing the step, whose
    slots and positions change from call to call.)"""
    with torch.no_grad():
        out = _CACHES[cache]._attend(q, k, v, sinks)
    calls.add_(1)
    return out.contiguous()


@kv_cache_attend.register_fake
def _(q, k, v, sinks, calls, cache):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
