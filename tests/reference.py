"""The float64 oracle, written from SEMANTICS.md (and docs/branches.md for strided and random
branches) alone: explicit masks, plain loops, small N.

It shares nothing with spattn's backends but the pydantic Pattern it reads.
"""

from __future__ import annotations

import math

import torch


def _branches(pattern) -> list[dict]:
    """The pattern's branches as plain dicts, the geometric schedule written out (eqs. 11-12)."""
    if pattern.branches is not None:
        return [b.model_dump(by_alias=True) for b in pattern.branches]
    g = pattern.schedule.geometric
    return [{"segment": g.segment * g.ratio**i, "dilation": g.dilation * g.ratio**i,
             "offsets": None} for i in range(g.count)]


def _offset(branch: dict, mode: str, h: int, heads: int) -> int:
    r = branch["dilation"]
    if branch.get("offsets"):
        return branch["offsets"][h]
    if mode == "paper":
        return h % r
    return h // math.ceil(heads / r)


_M64 = (1 << 64) - 1


def _mix(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def random_key_blocks(spec: dict, h: int, i: int, n: int, causal: bool) -> set[int]:
    """R(h, i) of docs/branches.md: Floyd's draw of `blocks` of C candidate key blocks."""
    blocks, seed = spec["blocks"], spec["seed"]
    total = -(-n // spec["block"])
    candidates = i + 1 if causal else total
    if candidates <= blocks:
        return set(range(candidates))
    chosen: set[int] = set()
    for j in range(candidates - blocks, candidates):
        t = _mix((_mix((_mix((_mix(seed) + h) & _M64) + i) & _M64) + j) & _M64) % (j + 1)
        chosen.add(j if t in chosen else t)
    return chosen


def branch_mask(branch: dict, mode: str, h: int, heads: int, n: int, causal: bool) -> torch.Tensor:
    """(N, N) bool: query p (row) may see key k (column) through this branch, for head h."""
    mask = torch.zeros(n, n, dtype=torch.bool)
    if branch.get("heads") is not None and h not in branch["heads"]:
        return mask  # a branch for other heads
    for p in range(n):
        for k in range(n):
            if causal and k > p:
                continue
            if "segment" in branch:
                w = min(branch["segment"], n)
                r, s = branch["dilation"], _offset(branch, mode, h, heads)
                a = (p // w) * w  # start of p's segment
                ok = (k // w) * w == a and (p - a - s) % r == 0 and (k - a - s) % r == 0
                ok = ok and p - a >= s and k - a >= s
            elif "window" in branch:
                ok = abs(p - k) < branch["window"]["size"]
            elif "global" in branch:
                tokens = [t for t in branch["global"]["tokens"] if t < n]
                ok = p in tokens or k in tokens
            elif "strided" in branch:
                ok = (p - k) % branch["strided"]["stride"] == 0
            elif "random" in branch:
                b = branch["random"]["block"]
                ok = k // b in random_key_blocks(branch["random"], h, p // b, n, causal)
            else:
                ok = True
            mask[p, k] = ok
    return mask


def pair_counts(pattern, n: int, heads: int) -> torch.Tensor:
    """(H, N, N) how many times each key counts for each query: multiset sum or union 0/1."""
    counts = torch.zeros(heads, n, n, dtype=torch.float64)
    for h in range(heads):
        for branch in _branches(pattern):
            counts[h] += branch_mask(branch, pattern.head_offsets, h, heads, n, pattern.causal)
    if pattern.overlap == "union":
        counts = (counts > 0).double()
    return counts


def reference_attention(q, k, v, pattern, scale: float | None = None, sinks=None) -> torch.Tensor:
    """Float64 attention by explicit masks; differentiable (autograd) in q, k, v and sinks.

    q may hold fewer rows than k, v: they are the last positions of the sequence. `sinks` (H,)
    adds exp(sinks[h]) to every softmax denominator of head h."""
    b, heads, nq, d = q.shape
    n = k.shape[2]
    group = heads // k.shape[1]
    scale = scale if scale is not None else (pattern.softmax_scale or 1 / math.sqrt(d))
    q, k, v = q.double(), k.double(), v.double()
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    counts = pair_counts(pattern, n, heads)[:, n - nq:]  # the queries' rows of the full mask
    scores = scale * q @ k.transpose(-1, -2)
    # a key counted c times contributes c * exp(score): add log c to its score
    logits = torch.where(counts > 0, scores + counts.clamp(min=1).log(), float("-inf"))
    has_key = (counts > 0).any(-1, keepdim=True)
    if sinks is not None:  # one more logit per row, with no value
        sink = sinks.double().view(1, heads, 1, 1).expand(b, heads, nq, 1)
        weights = torch.softmax(torch.cat([logits, sink], -1), dim=-1)[..., :n]
        return weights @ v
    logits = torch.where(has_key, logits, 0.0)
    out = torch.softmax(logits, dim=-1) @ v
    return torch.where(has_key, out, 0.0)
