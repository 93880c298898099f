"""A few queries of a causal pattern against keys at listed positions: the PyTorch path of
decoding (KVCache) and of short query runs at the end of a long sequence (queries shorter than
keys), on any device.

Each query's weights over the keys come from the branches' position predicates, a chunk of
queries at a time within a budget, so no (N, N) mask is ever built. The predicates read only
device tensors made once per branch and device (`_tables`): a decoding step copies nothing from
the host and reads nothing back (no host sync), so it can be captured in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import torch

from spattn.patterns.geometry import (
    Dense,
    Dilated,
    Geometry,
    Global,
    RandomBlocks,
    Strided,
    Window,
    resolve,
)
from spattn.patterns.spec import Pattern
from spattn.runtime import nonfinite
from spattn.runtime.generated import table_length
from spattn.runtime.kernels import on_device

WEIGHT_BUDGET = 1 << 24  # (batch, head, query, key) scores built at once


def decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
           first: int, pattern: Pattern, scale: float, sinks: torch.Tensor | None,
           backend: str, bad_keys: torch.Tensor | None = None) -> torch.Tensor:
    """Queries at positions first .. first+T-1 against keys at `positions`: the generated decode
    kernel on the triton backend (without sinks), else attend_cached. Non-finite inputs reach
    exactly the rows that attend them (runtime/nonfinite.py).

    Without `bad_keys`, that takes nonfinite.guard_forward's check (one host sync a call).
    With `bad_keys` (B, Hkv, M) bool, the caller (KVCache) vouches that keys and values are
    finite (the rows that were not zeroed, and flagged there): then the guard is branch-free,
    on the device, and exact, with no host sync."""
    def run(q, keys, values):
        if backend == "triton" and sinks is None:
            from spattn.runtime import triton_backend  # (it imports what imports this)

            module = triton_backend.compiled_module(pattern)
            keys, values = _same_strides(keys, values)
            return module.decode_attention(q.contiguous(), keys, values, positions, first,
                                           scale=scale), None
        return attend_cached(q, keys, values, positions, first, pattern, scale, sinks,
                             bad_keys), None

    def reach(bad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return reach_cached(bad, q.shape[1], q.shape[2], positions, first, pattern)

    with on_device(q.device):
        if bad_keys is None:
            return nonfinite.guard_forward(run, reach, q, keys, values)[0]
        if backend != "triton" or sinks is not None:  # attend_cached guards in its own pass
            return run(q, keys, values)[0]
        good_q = nonfinite.finite_rows(q)
        out = run(nonfinite.zeroed(q, good_q), keys, values)[0]
        attends_bad, has_key = reach(bad_keys)
        return out.masked_fill((attends_bad | (has_key & ~good_q)).unsqueeze(-1), float("nan"))


def _same_strides(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values as the decode kernel reads them: unit stride along D, one set of strides
    for both (a KVCache's buffers are that already: no copy of the cache per step)."""
    if keys.stride() == values.stride() and keys.stride(-1) == 1:
        return keys, values
    return keys.contiguous(), values.contiguous()


def attend_cached(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  positions: torch.Tensor, first: int, pattern: Pattern, scale: float,
                  sinks: torch.Tensor | None = None, bad_keys: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Queries q (B, H, T, D) at positions first .. first+T-1 against keys and values
    (B, Hkv, M, D) at token `positions` (M,), by a causal pattern. `sinks` (H,) adds
    exp(sinks[h]) to every softmax denominator of head h.

    `bad_keys` (B, Hkv, M) bool flags keys whose k or v was not finite (their rows given
    zeroed): then a row is NaN where it attends one, or where its own q is not finite and it
    has a key (the non-finite contract, computed on the device)."""
    batch, heads, t, dim = q.shape
    kv_heads, m = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    good_q = bad = None
    if bad_keys is not None:
        good_q = nonfinite.finite_rows(q)
        q = nonfinite.zeroed(q, good_q)
        bad = _per_query_head(bad_keys, group)
    kf, vf = keys.to(acc).unsqueeze(2), values.to(acc).unsqueeze(2)  # (B, Hkv, 1, M, D)
    sink = None if sinks is None else sinks.to(acc).view(1, heads, 1, 1)
    out = torch.zeros((batch, heads, t, dim), dtype=acc, device=q.device)
    for lo, hi, weight in _weights(pattern, batch, heads, t, first, positions.to(q.device), acc):
        # a key that c branches give counts c times: add log c to its score
        scores = scale * q[:, :, lo:hi].to(acc).view(batch, kv_heads, group, hi - lo, dim) \
            @ kf.transpose(-1, -2)
        scores = scores.view(batch, heads, hi - lo, m) + weight.log()
        allowed = weight > 0
        has = allowed.any(-1)[..., None]  # (H, T, 1): rows with a key
        scores = torch.where(has, scores, float("-inf"))
        if sink is not None:  # one more logit with no value
            scores = torch.cat([scores, sink.expand(batch, heads, hi - lo, 1)], -1)
        else:  # a row with no key: any finite logits, its output is zeroed below
            scores = torch.where(has, scores, 0.0)
        p = torch.softmax(scores, dim=-1)[..., :m]
        rows = (p.view(batch, kv_heads, group, hi - lo, m) @ vf).view(batch, heads, hi - lo, dim)
        rows = torch.where(has, rows, 0.0)
        if bad is not None:
            poisoned = (allowed & bad[:, :, None, :]).any(-1) | (has[..., 0] & ~good_q[:, :, lo:hi])
            rows = rows.masked_fill(poisoned.unsqueeze(-1), float("nan"))
        out[:, :, lo:hi] = rows
    return out.to(q.dtype)


def reach_cached(bad_keys: torch.Tensor, heads: int, t: int, positions: torch.Tensor, first: int,
                 pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor]:
    """(attends_bad, has_key), each (B, H, T) bool: the rows first .. first+T-1 that attend a
    key flagged in `bad_keys` (B, Hkv, M), and those with any key (nonfinite.Reach)."""
    batch, kv_heads, _ = bad_keys.shape
    bad = _per_query_head(bad_keys, heads // kv_heads)
    attends_bad = torch.zeros((batch, heads, t), dtype=torch.bool, device=bad.device)
    has_key = torch.zeros_like(attends_bad)
    for lo, hi, weight in _weights(pattern, batch, heads, t, first, positions.to(bad.device),
                                   torch.float32):
        allowed = weight > 0
        attends_bad[:, :, lo:hi] = (allowed & bad[:, :, None, :]).any(-1)
        has_key[:, :, lo:hi] = allowed.any(-1)
    return attends_bad, has_key


def _per_query_head(bad_keys: torch.Tensor, group: int) -> torch.Tensor:
    """(B, Hkv, M) -> (B, H, M), each key head's flags for its `group` query heads (a view
    expanded, then one copy: repeat_interleave may build its index on the host)."""
    if group == 1:
        return bad_keys
    b, hkv, m = bad_keys.shape
    return bad_keys[:, :, None].expand(b, hkv, group, m).reshape(b, hkv * group, m)


def _weights(pattern: Pattern, batch: int, heads: int, t: int, first: int, kpos: torch.Tensor,
             dtype: torch.dtype) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(lo, hi, weight (H, hi - lo, M)) for chunks of the queries first+lo .. first+hi-1: how
    many branches give each (head, query, key) pair (at most 1 under union), 0 past causality."""
    m = kpos.shape[0]
    # any length >= first + t gives these rows the same masks (causal); a rounded one lets the
    # random-block tables be reused from step to step
    branches = resolve(pattern, table_length(first + t), heads)
    step = max(1, WEIGHT_BUDGET // max(1, batch * heads * m))  # queries per chunk
    for lo in range(0, t, step):
        hi = min(t, lo + step)
        qpos = torch.arange(first + lo, first + hi, device=kpos.device)[:, None]
        weight = torch.zeros((heads, hi - lo, m), dtype=dtype, device=kpos.device)
        for g in branches:
            weight += _allows(g, heads, qpos, kpos[None, :])
        if pattern.overlap == "union":
            weight.clamp_(max=1)
        weight *= kpos[None, :] <= qpos
        yield lo, hi, weight


@lru_cache(maxsize=256)
def _tables(g: Geometry, heads: int, device: torch.device
            ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(the heads g applies to, (H, 1, 1) bool, or None for all; g's own table or None) on
    `device`, made once: the predicates then copy nothing from the host."""
    applies = None if g.on_heads is None else torch.tensor(
        [g.applies(h) for h in range(heads)], device=device).view(heads, 1, 1)
    table = None
    if isinstance(g, Dilated):  # each head's offset class, -1 (none) where g does not apply
        table = torch.tensor([g.offsets[h] if g.applies(h) else -1 for h in range(heads)],
                             device=device).view(heads, 1, 1)
    elif isinstance(g, Global):
        table = torch.tensor(g.tokens, dtype=torch.int64, device=device)  # sorted
    elif isinstance(g, RandomBlocks):
        table = g.table().to(device)  # (H, query blocks, draws)
    return applies, table


def _is_global(pos: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Whether each position is one of the sorted `tokens` (torch.isin may sync to size its
    work; a binary search does not)."""
    if not tokens.numel():
        return torch.zeros(pos.shape, dtype=torch.bool, device=pos.device)
    found = torch.searchsorted(tokens, pos).clamp_(max=tokens.numel() - 1)
    return tokens[found] == pos


def _allows(g: Geometry, heads: int, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
    """Geometry.allows_heads for query positions (T, 1) and key positions (1, M): (H or 1, T, M)
    bool, from device tables only."""
    applies, table = _tables(g, heads, qpos.device)
    if isinstance(g, Dilated):  # heads it skips have class -1: nothing
        same = (qpos // g.segment) == (kpos // g.segment)
        return same & (g.residue(qpos) == table) & (g.residue(kpos) == table)
    if isinstance(g, Window):
        allowed = ((qpos - kpos).abs() < g.size)[None]
    elif isinstance(g, Global):
        allowed = (_is_global(qpos, table) | _is_global(kpos, table))[None]
    elif isinstance(g, Strided):
        allowed = ((qpos - kpos) % g.stride == 0)[None]
    elif isinstance(g, RandomBlocks):
        chosen = table[:, qpos[:, 0] // g.block]  # (H, T, draws): the key blocks each drew
        key_block = kpos // g.block
        allowed = torch.zeros((heads, qpos.shape[0], kpos.shape[1]), dtype=torch.bool,
                              device=qpos.device)
        for j in range(chosen.shape[-1]):
            allowed |= chosen[:, :, j:j + 1] == key_block
    elif isinstance(g, Dense):
        allowed = torch.ones((1, qpos.shape[0], kpos.shape[1]), dtype=torch.bool,
                             device=qpos.device)
    else:
        raise TypeError(f"unknown branch {g!r}")
    return allowed if applies is None else allowed & applies
