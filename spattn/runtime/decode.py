"""`spattn.KVCache`: incremental decoding of a causal pattern.

Each `attend(q, k, v)` takes the next T >= 1 tokens and returns their outputs, the same rows a
full causal forward over every token so far would give. The cache keeps only the keys and values
that a later query can still attend (patterns/retention.py), so for a pattern of dilated, window
and global branches its memory is bounded by the pattern, not by the sequence.

The first call runs the ordinary forward over its tokens (a prompt of any length); later calls
attend their queries to the kept keys and their own, each key weighed by how many branches give
it (once under `overlap: union`). On the PyTorch backend that is a masked softmax over the kept
keys, built from the branches' position predicates a chunk of queries at a time; on the Triton
backend it is the pattern's generated decode kernel (`decode_attention` in the emitted module).
"""

from __future__ import annotations

import numpy as np
import torch

from spattn.errors import SpattnError
from spattn.limits import check_scale
from spattn.patterns.loader import load_pattern
from spattn.patterns.retention import cache_bound, last_use
from spattn.patterns.spec import Pattern
from spattn.runtime import triton_backend
from spattn.runtime.cached import attend_cached
from spattn.runtime.dispatch import (
    InputError,
    attention,
    check_sinks,
    check_tensors,
    pick_backend,
    resolve_scale,
)


class KVCache:
    """Decode a causal pattern a few tokens at a time, keeping only the keys it still needs.

        cache = spattn.KVCache("longnet-lm")
        out = cache.attend(q, k, v)    # q (B, H, T, D), k/v (B, Hkv, T, D): the next T tokens

    `attend` runs without autograd (decoding is inference). `bound` is the most tokens the cache
    ever holds (None when the pattern keeps every key); `kept` and `memory_bytes` say what it
    holds now.
    """

    def __init__(self, pattern: Pattern | str, *, backend: str | None = None,
                 scale: float | None = None) -> None:
        self.pattern = load_pattern(pattern)
        if not self.pattern.causal:
            raise SpattnError(f"pattern '{self.pattern.name}' is not causal: decoding needs a "
                              f"causal pattern (a query must not see keys that have not arrived)")
        self.backend = backend
        self.scale = None if scale is None else check_scale(scale)
        self.seen = 0  # tokens attended so far
        self.keys: torch.Tensor | None = None  # (B, Hkv, kept, D)
        self.values: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None  # (kept,) int64 token positions
        self._last_use: torch.Tensor | None = None  # (kept,) int64, retention.last_use
        self._shape: tuple | None = None  # (B, H, Hkv, D, dtype, device) of the first call
        self._bound: int | None = None
        self._backend_name: str | None = None

    # ---- what the cache holds -----------------------------------------------------------------

    @property
    def kept(self) -> int:
        """Tokens whose keys and values the cache holds now."""
        return 0 if self.positions is None else len(self.positions)

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
        """Bytes the cache holds now: keys, values, and 16 bytes of bookkeeping per token."""
        if self.keys is None:
            return 0
        return 2 * self.keys.numel() * self.keys.element_size() + 16 * self.kept

    def bound_bytes(self) -> int | None:
        """`memory_bytes` at the bound (None when unbounded); known after the first call."""
        if self._shape is None:
            raise SpattnError("the bound in bytes depends on the tensors: call attend first")
        if self._bound is None:
            return None
        batch, _, kv_heads, dim, dtype, _ = self._shape
        itemsize = torch.empty((), dtype=dtype).element_size()
        return self._bound * (2 * batch * kv_heads * dim * itemsize + 16)

    def reset(self) -> None:
        """Forget every token (a new sequence of the same shapes)."""
        self.seen = 0
        self.keys = self.values = self.positions = self._last_use = None

    # ---- decoding -----------------------------------------------------------------------------

    @torch.no_grad()
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               sinks: torch.Tensor | None = None) -> torch.Tensor:
        """Outputs (B, H, T, D) of the next T tokens, given their q (B, H, T, D) and k, v
        (B, Hkv, T, D): rows seen .. seen+T-1 of the full causal forward. `sinks` (H,) are
        attention sinks, as `spattn.attention` takes them."""
        call = check_tensors(q, k, v)
        self._check_shape(call)
        sinks = check_sinks(sinks, call)
        scale = resolve_scale(self.pattern, self.scale, call.head_dim)
        first, t = self.seen, call.seq_len
        if t == 0:
            return q.new_zeros(q.shape)
        new = torch.arange(first, first + t, dtype=torch.int64, device=q.device)
        if first == 0:  # a prompt: the ordinary forward over its tokens
            out = attention(q, k, v, self.pattern, backend=self._backend_name, scale=scale,
                            sinks=sinks)
            keys, values, positions = k, v, new
        else:
            keys = torch.cat([self.keys, k], dim=2)
            values = torch.cat([self.values, v], dim=2)
            positions = torch.cat([self.positions, new])
            out = self._decode(q, keys, values, positions, first, scale, sinks)
        uses = torch.from_numpy(last_use(self.pattern, call.heads, np.arange(first, first + t)))
        uses = uses.to(q.device)
        if first:
            uses = torch.cat([self._last_use, uses])
        self.seen += t
        keep = uses >= self.seen
        self.keys, self.values = keys[:, :, keep].contiguous(), values[:, :, keep].contiguous()
        self.positions, self._last_use = positions[keep], uses[keep]
        return out

    def _decode(self, q, keys, values, positions, first, scale, sinks) -> torch.Tensor:
        if self._backend_name == "triton" and sinks is None:
            module = triton_backend.compiled_module(self.pattern)
            return module.decode_attention(q.contiguous(), keys, values, positions, first,
                                           scale=scale)
        return attend_cached(q, keys, values, positions, first, self.pattern, scale, sinks)

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
