"""A few queries of a causal pattern against keys at listed positions: the PyTorch path of
decoding (KVCache) and of short query runs at the end of a long sequence (queries shorter than
keys), on any device.

Each query's weights over the keys come from the branches' position predicates, a chunk of
queries at a time within a budget, so no (N, N) mask is ever built.
"""

from __future__ import annotations

import torch

from spattn.patterns.geometry import add_counts, resolve
from spattn.patterns.spec import Pattern
from spattn.runtime import nonfinite
from spattn.runtime.generated import table_length

WEIGHT_BUDGET = 1 << 24  # (batch, head, query, key) scores built at once


def decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
           first: int, pattern: Pattern, scale: float, sinks: torch.Tensor | None,
           backend: str) -> torch.Tensor:
    """Queries at positions first .. first+T-1 against keys at `positions`: the generated decode
    kernel on the triton backend (without sinks), else attend_cached. Non-finite inputs reach
    exactly the rows that attend them (runtime/nonfinite.py)."""
    def run(q, keys, values):
        if backend == "triton" and sinks is None:
            from spattn.runtime import triton_backend  # (it imports what imports this)

            module = triton_backend.compiled_module(pattern)
            return module.decode_attention(q.contiguous(), keys.contiguous(),
                                           values.contiguous(), positions, first,
                                           scale=scale), None
        return attend_cached(q, keys, values, positions, first, pattern, scale, sinks), None

    def reach(bad_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zq = torch.zeros(*q.shape[:3], 2, device=q.device)
        zk = torch.zeros(*keys.shape[:3], 2, device=q.device)
        out = attend_cached(zq, zk, nonfinite.indicator_values(bad_keys), positions, first,
                            pattern, 1.0)
        return nonfinite.read_reach(out)

    return nonfinite.guard_forward(run, reach, q, keys, values)[0]


def attend_cached(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  positions: torch.Tensor, first: int, pattern: Pattern, scale: float,
                  sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Queries q (B, H, T, D) at positions first .. first+T-1 against keys and values
    (B, Hkv, M, D) at token `positions` (M,), by a causal pattern. `sinks` (H,) adds
    exp(sinks[h]) to every softmax denominator of head h."""
    batch, heads, t, dim = q.shape
    kv_heads, m = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    # any length >= first + t gives these rows the same masks (causal); a rounded one lets the
    # random-block tables be reused from step to step
    branches = resolve(pattern, table_length(first + t), heads)
    kpos = positions.to(q.device)
    kf, vf = keys.to(acc).unsqueeze(2), values.to(acc).unsqueeze(2)  # (B, Hkv, 1, M, D)
    sink = None if sinks is None else sinks.to(acc).view(1, heads, 1, 1)
    out = torch.zeros((batch, heads, t, dim), dtype=acc, device=q.device)
    step = max(1, WEIGHT_BUDGET // max(1, batch * heads * m))  # queries per chunk
    for lo in range(0, t, step):
        hi = min(t, lo + step)
        qpos = torch.arange(first + lo, first + hi, device=q.device)
        weight = torch.zeros((heads, hi - lo, m), dtype=acc, device=q.device)
        add_counts(weight, branches, heads, qpos[:, None], kpos[None, :])
        if pattern.overlap == "union":
            weight.clamp_(max=1)
        weight *= kpos[None, :] <= qpos[:, None]
        # a key that c branches give counts c times: add log c to its score
        scores = scale * q[:, :, lo:hi].to(acc).view(batch, kv_heads, group, hi - lo, dim) \
            @ kf.transpose(-1, -2)
        scores = scores.view(batch, heads, hi - lo, m) + weight.log()
        has = (weight > 0).any(-1)[..., None]  # (H, T, 1): rows with a key
        scores = torch.where(has, scores, float("-inf"))
        if sink is not None:  # one more logit with no value
            scores = torch.cat([scores, sink.expand(batch, heads, hi - lo, 1)], -1)
        else:  # a row with no key: any finite logits, its output is zeroed below
            scores = torch.where(has, scores, 0.0)
        p = torch.softmax(scores, dim=-1)[..., :m]
        rows = (p.view(batch, kv_heads, group, hi - lo, m) @ vf).view(batch, heads, hi - lo, dim)
        out[:, :, lo:hi] = torch.where(has, rows, 0.0)
    return out.to(q.dtype)
