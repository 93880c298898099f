"""The PyTorch backend: a pattern's pieces run as batched dense attention over strided views,
merged by log-sum-exp into one running (O, LSE); and the exact backward. `spattn.runtime.ops`
wraps the two as torch.library custom ops with autograd.

Each call shape gets a plan once (`plan`): the pieces grouped into calls (runtime/batches.py) as
the cost model (runtime/costs.py) predicts fastest, or, for a short sequence, the whole pattern
as one dense call with a mask. Memory is linear in N: the accumulators are (B, H, N, D) and
(B, H, N); each piece reads strided views of q, k, v, and a mask, when it needs one, covers
only that piece's rows (the whole-call mask only below DENSE_MASK_LIMIT entries).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import torch

from spattn.patterns.geometry import Geometry, Window
from spattn.runtime import costs
from spattn.runtime.batches import Batch, dense_masked, describe_plan, pair_counts, plan_batches
from spattn.runtime.kernels import Mask, accum_dtype, attend, attend_backward, unit_stride_rows
from spattn.runtime.pieces import nested_chains, plan_pieces
from spattn.runtime.rows import Rows

DENSE_MASK_LIMIT = 1 << 24  # (head, query, key) entries of a whole-call mask
WINDOW_DIVISORS = (8, 4, 2, 1)  # window chunks of W/8 .. W queries, as the model prefers
SHARE_PAIRS = "model"  # nested branches' common pairs computed once: "model", "always", "never"
# output elements one call writes, all batch rows together (16 MB in float32): a larger output
# comes from fresh pages, each faulted in on first touch (longnet-lm at 1M tokens: 11% slower)
CALL_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Problem:
    """Everything the backend needs besides the tensors."""

    branches: tuple[Geometry, ...]
    seq_len: int
    heads: int
    kv_heads: int
    causal: bool
    union: bool
    scale: float
    force_math: bool = False  # use the matmul fallback even where the fused kernel runs

    def kv_head(self, head: int) -> int:
        return head // (self.heads // self.kv_heads)


def plan(problem: Problem, head_dim: int, model: costs.CostModel, fused: bool = True,
         batch: int = 1) -> tuple[Batch, ...]:
    """The batches of a call shape, built once per (problem, head dim, cost model, batch size:
    calls are cut to write at most CALL_ELEMENTS output elements). Windows are
    cut in chunks of W/8, W/4, W/2 or W queries, and each chain of nested dilated branches
    shares the pairs its members give in common (all of it, a part, or not), whichever the
    model predicts fastest. With the fused CPU kernel (`fused`), a short sequence may instead
    run as one dense call with a mask (at most DENSE_MASK_LIMIT entries), when the model
    predicts that faster."""
    call_elements = max(1, CALL_ELEMENTS // batch)
    return _plan_of(problem, head_dim, model, fused, SHARE_PAIRS, call_elements)


@lru_cache(maxsize=64)
def _plan_of(problem: Problem, head_dim: int, model: costs.CostModel, fused: bool, share: str,
             call_elements: int) -> tuple[Batch, ...]:
    """The plan built with SHARE_PAIRS and the call bound as they are now (keys of the cache)."""
    windows = any(isinstance(g, Window) for g in problem.branches)
    made: dict[tuple, tuple[Batch, ...]] = {}

    def planned(divisor: int, shared: tuple[tuple[int, ...], ...]) -> tuple[Batch, ...]:
        if (divisor, shared) not in made:
            pieces = tuple(plan_pieces(problem.branches, problem.seq_len, problem.heads,
                                       problem.causal, problem.union, divisor=divisor,
                                       shared=shared))
            made[divisor, shared] = plan_batches(pieces, problem.heads, problem.kv_heads,
                                                 problem.seq_len, head_dim, model, call_elements)
        return made[divisor, shared]

    divisors = WINDOW_DIVISORS if windows else WINDOW_DIVISORS[:1]
    divisor = min(divisors, key=lambda d: _cost(planned(d, ())))
    best = planned(divisor, ())
    # shared pairs add log(count) to their scores: a mask the fused kernel takes as it is
    chains = nested_chains(problem.branches, problem.seq_len, problem.heads, problem.union) \
        if fused else ()
    if shared := _sharing(chains, share, lambda s: _cost(planned(divisor, s))):
        sharing = planned(divisor, shared)
        best = sharing if share == "always" else min(best, sharing, key=_cost)
    n = problem.seq_len
    small = problem.heads * n * n <= DENSE_MASK_LIMIT
    if fused and small and best and _dense(best, problem) is None:
        whole = dense_masked(problem.heads, n, problem.causal, head_dim, model, _cost(best))
        if whole.cost_us < _cost(best):
            return (whole,)
    return best


def _cost(batches: tuple[Batch, ...]) -> float:
    return sum(b.cost_us for b in batches)


def _sharing(chains: tuple[tuple[int, ...], ...], share: str,
             cost_of: Callable[[tuple[tuple[int, ...], ...]], float]
             ) -> tuple[tuple[int, ...], ...]:
    """Which nested branches share their pairs: every chain or none where `share` says so, else
    for each chain in turn the part (its first two members, three, ...) or nothing that the
    model predicts fastest."""
    if share != "model":
        return chains if share == "always" else ()
    chosen = list(chains)
    for i, chain in enumerate(chains):
        options = [chain[:length] for length in range(2, len(chain) + 1)] + [()]
        chosen[i] = min(options, key=lambda option: cost_of(
            tuple(c for c in chosen[:i] + [option] + chosen[i + 1:] if c)))
    return tuple(c for c in chosen if c)


def describe(problem: Problem, head_dim: int) -> list[str]:
    """The plan this machine's cost model chooses for a call shape (on CPU), a line per kind
    of call."""
    model = costs.current()
    return describe_plan(plan(problem, head_dim, model), model)


def _plan(problem: Problem, q: torch.Tensor) -> tuple[Batch, ...]:
    fused = q.device.type == "cpu" and not problem.force_math
    return plan(problem, q.shape[-1], costs.current(), fused, q.shape[0])


def _whole_mask(problem: Problem, device: torch.device, dtype: torch.dtype) -> Mask:
    """The (1, H, N, N) mask of a dense masked call: log(count) where a pair counts, -inf where
    it does not; kept like the pieces' masks."""
    def build() -> Mask:
        counts = pair_counts(problem.branches, problem.seq_len, problem.heads, problem.causal,
                             problem.union, device, accum_dtype(dtype))  # log 2 to the digit
        return Mask.of_counts(counts, dtype)

    return _kept((problem, str(device), dtype), build)


def _kv_for_heads(x: torch.Tensor, problem: Problem) -> torch.Tensor:
    """K or V with a head for every query head (a view when H == Hkv)."""
    group = problem.heads // problem.kv_heads
    return x if group == 1 else x.repeat_interleave(group, 1)


MASK_CACHE_BYTES = 256 << 20  # masks kept between calls (they cost more to build than to use)
MASK_CACHE_ENTRIES = 4096
_masks: OrderedDict[tuple, Mask] = OrderedDict()


def _kept(key: tuple, build: Callable[[], Mask]) -> Mask:
    """A mask built once and kept (least recently used first out) while the kept masks fit
    MASK_CACHE_BYTES: predicates over positions cost more than the kernel's use of them."""
    if (mask := _masks.get(key)) is not None:
        _masks.move_to_end(key)
        return mask
    mask = build()
    if mask.nbytes <= MASK_CACHE_BYTES:
        _masks[key] = mask
        while len(_masks) > MASK_CACHE_ENTRIES or \
                sum(m.nbytes for m in _masks.values()) > MASK_CACHE_BYTES:
            _masks.popitem(last=False)
    return mask


def _mask(batch: Batch, device: torch.device, dtype: torch.dtype) -> Mask | None:
    if not batch.pieces[0].masked:
        return None
    return _kept((batch.mask_key, str(device), dtype), lambda: batch.mask(device, dtype))


def _gather(batch: Batch, x: torch.Tensor, side: str, problem: Problem) -> torch.Tensor:
    """The batch's rows of x (B, H or Hkv, N, ...) as one (B', S, M, ...) tensor: a view of the
    folded (B*H, N, ...) tensor, one piece's view, or the pieces' rows stacked (a copy)."""
    rows = [getattr(p, side) for p in batch.pieces]
    if batch.folded:
        return rows[0].take(x.flatten(0, 1))
    heads = [p.head if side == "q" or x.shape[1] == problem.heads else problem.kv_head(p.head)
             for p in batch.pieces]
    parts = [r.take(x[:, h]) for r, h in zip(rows, heads, strict=True)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _targets(batch: Batch, x: torch.Tensor, side: str, problem: Problem
             ) -> Iterator[tuple[Rows, torch.Tensor, slice]]:
    """(rows, target view of x, slice of the batch's S axis) for each piece the batch writes: one
    for all heads when folded. Each view is made when its turn comes, after the writes before it
    (autograd refuses an in-place write through a view taken before another write)."""
    if batch.folded:
        yield batch.pieces[0].q if side == "q" else batch.pieces[0].k, x.flatten(0, 1), slice(None)
        return
    for i, p in enumerate(batch.pieces):
        rows = p.q if side == "q" else p.k
        h = p.head if side == "q" else problem.kv_head(p.head)
        yield rows, x[:, h], slice(i * rows.nseg, (i + 1) * rows.nseg)


def _merge(rows: Rows, o_acc_all: torch.Tensor, l_acc_all: torch.Tensor, o_p: torch.Tensor,
           l_p: torch.Tensor, fresh: bool) -> None:
    """Merge one result (O, LSE) into the running (O, LSE) of its rows by log-sum-exp:
    O += w (O_p - O) with w = exp(LSE_p - LSE_new), the new result's share of the softmax mass.
    In place where the rows are a view; written back where they were gathered."""
    if fresh:
        rows.put(o_acc_all, o_p)
        rows.put(l_acc_all, l_p)
        return
    acc = o_acc_all.dtype
    o_acc, l_acc = rows.take(o_acc_all), rows.take(l_acc_all)
    l_p = l_p.to(acc)
    l_new = torch.logaddexp(l_acc, l_p)
    # a row with no key yet on either side has l_new = -inf: no share (a NaN stays NaN)
    share = torch.exp(l_p - l_new).masked_fill_(l_new == float("-inf"), 0.0)
    o_acc.lerp_(o_p.to(acc), share.unsqueeze(-1))
    l_acc.copy_(l_new)
    if rows.index is not None or rows.starts is not None:  # take gathered a copy
        rows.put(o_acc_all, o_acc)
        rows.put(l_acc_all, l_acc)


def _dense(batches: tuple[Batch, ...], problem: Problem) -> Batch | None:
    """The one batch of a call that is plain dense attention over every head (a dense or causal
    pattern, or a window wider than the sequence): its results are the call's, as they come."""
    if len(batches) != 1 or not batches[0].folded:
        return None
    piece, whole = batches[0].pieces[0], Rows(0, problem.seq_len)
    return batches[0] if piece.q == whole and piece.k == whole and not piece.masked else None


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, problem: Problem
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """O (B, H, N, D) in q's dtype and LSE (B, H, N) (-inf where a query got no key)."""
    q, k, v = unit_stride_rows(q, k, v)  # once here, rather than per piece in `attend`
    acc = accum_dtype(q.dtype)
    batches = _plan(problem, q)
    if batches and batches[0].whole:  # one dense call over every head, its mask counting pairs
        o, o_lse = attend(q, _kv_for_heads(k, problem), _kv_for_heads(v, problem),
                          problem.scale, problem.causal, _whole_mask(problem, q.device, q.dtype))
        return o.contiguous(), o_lse.to(acc).contiguous()  # the layout the ops promise
    if (dense := _dense(batches, problem)) is not None:
        o, o_lse = attend(*(_gather(dense, x, "q", problem) for x in (q, k, v)), problem.scale,
                          dense.pieces[0].causal, None, problem.force_math)
        return o.reshape(q.shape).contiguous(), o_lse.to(acc).reshape(q.shape[:3]).contiguous()
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
    for batch in batches:
        first = batch.pieces[0]
        o, o_lse = attend(_gather(batch, q, "q", problem), _gather(batch, k, "k", problem),
                      _gather(batch, v, "k", problem), problem.scale, first.causal,
                      _mask(batch, q.device, q.dtype), problem.force_math)
        fresh = all(p.fresh for p in batch.pieces)
        for (rows, o_all, part), piece in zip(_targets(batch, out, "q", problem), batch.pieces,
                                              strict=False):
            l_all = lse.flatten(0, 1) if batch.folded else lse[:, piece.head]
            _merge(rows, o_all, l_all, o[:, part], o_lse[:, part],
                   fresh if batch.folded else piece.fresh)
    return out.to(q.dtype), lse


def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             out: torch.Tensor, lse: torch.Tensor, problem: Problem
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    do, q, k, v, out = unit_stride_rows(do, q, k, v, out)
    acc = accum_dtype(q.dtype)
    batches = _plan(problem, q)
    lse_kernel = lse if q.dtype == torch.float64 else lse.float()
    if batches and batches[0].whole:
        dq, dk, dv = attend_backward(do, q, _kv_for_heads(k, problem), _kv_for_heads(v, problem),
                                     out, lse_kernel, problem.scale, problem.causal,
                                     _whole_mask(problem, q.device, q.dtype))
        group = problem.heads // problem.kv_heads
        if group > 1:  # each key head's gradient sums its query heads'
            dk, dv = (g.unflatten(1, (problem.kv_heads, group)).sum(2) for g in (dk, dv))
        return dq.contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()
    if (dense := _dense(batches, problem)) is not None:
        grads = attend_backward(
            *(_gather(dense, x, "q", problem) for x in (do, q, k, v, out, lse_kernel)),
            problem.scale, dense.pieces[0].causal, None, problem.force_math)
        return tuple(g.reshape(x.shape).contiguous() for g, x in zip(grads, (q, k, v), strict=True))
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    for batch in batches:
        first = batch.pieces[0]
        grads = attend_backward(
            *(_gather(batch, x, "q", problem) for x in (do, q)),
            *(_gather(batch, x, "k", problem) for x in (k, v)),
            _gather(batch, out, "q", problem), _gather(batch, lse_kernel, "q", problem),
            problem.scale, first.causal, _mask(batch, q.device, q.dtype), problem.force_math)
        for rows, target, part in _targets(batch, dq, "q", problem):
            rows.add(target, grads[0][:, part])
        for grad, dx in zip(grads[1:], (dk, dv), strict=True):
            for rows, target, part in _targets(batch, dx, "k", problem):
                rows.add(target, grad[:, part])
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
