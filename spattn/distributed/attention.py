"""`spattn.distributed.attention`: a pattern's attention over a sequence split across ranks.

Each rank passes its contiguous chunk of l = N/P tokens and gets its chunk of the output. The
plan (plan.py) says which branches are local and which span subgroups of g ranks.

Forward, on every rank:
1. check its own inputs and build the plan, compute the local branches (the PyTorch backend over
   the local chunk; segments are aligned to chunks) and pack its dilated K/V rows: all the work
   that can fail before anything waits on another rank;
2. (check.py) all-gather one small metadata tensor over the group (zeros from a rank that
   failed, then every failed rank's message), so that a failure or a disagreement between ranks
   raises on every rank (never a deadlock) before any data moves;
3. spanning branches, in plan order: all-gather the rank's dilated K/V rows within the subgroup,
   attend the local dilated queries to them (causal: the earlier ranks' rows in full, plus the
   rank's own rows causally), and merge every piece into one (O, LSE) by log-sum-exp.

Every collective takes the call's `timeout`: a failure later than step 2 (or in the backward)
leaves the other ranks waiting only that long, then raises `CollectiveError` on them.

Backward (exact, DESIGN.md): with the merged O and LSE, P_i = exp(S_i - LSE),
D = rowsum(dO * O), dS_i = P_i * (dO V^T - D) for every piece; dQ stays local, and the gathered
rows' dK/dV go back to their owners with one all-to-all per spanning branch (the all-gather's
adjoint), where they are summed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from spattn.distributed import comm
from spattn.distributed.check import Prepared, agree, as_timeout, fail, prepare
from spattn.distributed.plan import BranchPlan, DistributedPlan, grad_dtype
from spattn.patterns.spec import Pattern
from spattn.runtime import nonfinite, torch_backend
from spattn.runtime.dispatch import InputError
from spattn.runtime.kernels import attend, attend_backward

# --- the spanning branches ------------------------------------------------------------------


@dataclass(frozen=True)
class _OffsetGroup:
    """Query heads of one spanning branch that share an offset: same rows, same key counts."""

    heads: torch.Tensor  # (nh,) query heads
    kv: torch.Tensor  # (nh,) their kv heads
    rows: torch.Tensor  # (m,) chunk rows they keep
    keys: torch.Tensor  # (nh, Mk) rows of the gathered (g * R) buffer each head attends


class _Span:
    """One spanning branch as seen from this rank."""

    def __init__(self, branch: BranchPlan, plan: DistributedPlan, group, device: torch.device):
        self.branch, self.parent = branch, group
        self.position = dist.get_rank(group) % branch.span
        r, g, p = branch.dilation, branch.span, self.position
        starts, start = {}, 0
        self.pack_rows = []  # (kv head, chunk rows, first buffer row)
        for combo, rows in zip(branch.combos, branch.combo_rows, strict=True):
            kvh, s = combo
            starts[combo] = start
            own = branch.first_row(p, s) + r * torch.arange(branch.row_count(p, s), device=device)
            self.pack_rows.append((kvh, own, start))
            start += rows
        size = branch.buffer_rows
        per_group = plan.heads // plan.kv_heads
        members = range(p) if plan.causal else range(g)
        self.groups = []
        for s in sorted(set(branch.offsets)):
            heads = [h for h in range(plan.heads) if branch.offsets[h] == s]
            rows = branch.first_row(p, s) + r * torch.arange(branch.row_count(p, s), device=device)
            if not rows.numel():
                continue
            keys = [torch.cat([m * size + starts[(h // per_group, s)] +
                               torch.arange(branch.row_count(m, s), device=device)
                               for m in members] or [torch.zeros(0, dtype=torch.int64,
                                                                 device=device)])
                    for h in heads]
            self.groups.append(_OffsetGroup(
                torch.tensor(heads, device=device),
                torch.tensor([h // per_group for h in heads], device=device), rows,
                torch.stack(keys)))

    @property
    def group(self) -> dist.ProcessGroup:
        """The subgroup, created on first use: after the check, when every rank is known well."""
        return comm.subgroup(self.parent, self.branch.span)[0]

    def step(self, what: str) -> str:
        return f"the {what} of branch {self.branch.index} ({self.branch.label})"

    def pack(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """This rank's kept K and V rows, (2, B, R, D), zero padded."""
        b, _, _, d = k.shape
        buf = k.new_zeros((2, b, self.branch.buffer_rows, d))
        for kvh, rows, start in self.pack_rows:
            buf[0, :, start:start + len(rows)] = k[:, kvh, rows]
            buf[1, :, start:start + len(rows)] = v[:, kvh, rows]
        return buf

    def unpack_add(self, grads: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
        for kvh, rows, start in self.pack_rows:
            dk[:, kvh, rows] += grads[0, :, start:start + len(rows)]
            dv[:, kvh, rows] += grads[1, :, start:start + len(rows)]


def _merge(out, lse, grp: _OffsetGroup, o: torch.Tensor, s: torch.Tensor) -> None:
    """Fold one piece's (O, LSE) into the running accumulators at the group's rows."""
    at = (slice(None), grp.heads[:, None], grp.rows[None, :])
    l_acc, s = lse[at], s.to(lse.dtype)
    l_new = torch.logaddexp(l_acc, s)
    has = l_new != float("-inf")  # rows still without keys stay 0; a NaN stays NaN
    w_acc = torch.where(has, torch.exp(l_acc - l_new), 0).unsqueeze(-1)
    w_new = torch.where(has, torch.exp(s - l_new), 0).unsqueeze(-1)
    out[at] = out[at] * w_acc + o.to(out.dtype) * w_new
    lse[at] = l_new


# --- the autograd function ------------------------------------------------------------------


@dataclass(frozen=True)
class _Run:
    prepared: Prepared
    local: torch_backend.Problem | None
    spans: tuple[_Span, ...]
    group: dist.ProcessGroup
    timeout: timedelta | None
    pattern: Pattern | str

    @property
    def plan(self) -> DistributedPlan:
        return self.prepared.plan

    @property
    def scale(self) -> float:
        return self.prepared.scale


def _local_problem(plan: DistributedPlan, scale: float) -> torch_backend.Problem | None:
    branches = tuple(b.geometry() for b in plan.branches if b.local)
    if not branches:
        return None
    return torch_backend.Problem(branches, plan.chunk, plan.heads, plan.kv_heads, plan.causal,
                                 False, scale)


class _DistributedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, run: _Run):
        acc, causal, scale = grad_dtype(q.dtype), run.plan.causal, run.scale
        bad_here = not nonfinite.finite(q, k, v)
        good_q = nonfinite.finite_rows(q)
        if bad_here:  # the work runs on finite inputs; the NaN goes back where it belongs
            good_kv = nonfinite.finite_rows(k) & nonfinite.finite_rows(v)
            q, k, v = (nonfinite.zeroed(x, good) for x, good in ((q, good_q), (k, good_kv),
                                                                 (v, good_kv)))
        try:  # everything that can fail before the first collective
            if run.local is not None:
                out, lse = torch_backend.forward(q, k, v, run.local)
                out, lse = out.to(acc), lse.to(acc)
            else:
                out = q.new_zeros(q.shape, dtype=acc)
                lse = q.new_full(q.shape[:3], float("-inf"), dtype=acc)
            packed = [span.pack(k, v) for span in run.spans]
        except Exception as exc:
            fail(exc, run.group, run.timeout)
        any_bad = agree(run.prepared, None, run.group, run.timeout, bad_here)
        gathered = []
        for span, buf in zip(run.spans, packed, strict=True):
            rows = comm.all_gather(buf, span.group, "forward", span.step("forward all-gather"),
                                   run.timeout)  # (g, 2, B, R, D)
            kv = rows.permute(1, 2, 0, 3, 4).flatten(2, 3)  # (2, B, g * R, D)
            gathered.append(kv)
            for grp in span.groups:
                qh = q[:, grp.heads[:, None], grp.rows[None, :]]
                if grp.keys.shape[1]:
                    o, s = attend(qh, kv[0][:, grp.keys], kv[1][:, grp.keys], scale, False, None)
                    _merge(out, lse, grp, o, s)
                if causal:  # the rank's own rows: the same rows as its queries, causally
                    own = (slice(None), grp.kv[:, None], grp.rows[None, :])
                    o, s = attend(qh, k[own], v[own], scale, True, None)
                    _merge(out, lse, grp, o, s)
        if any_bad:  # every rank: some rank's inputs were not all finite
            bad_keys = ~good_kv if bad_here else torch.zeros(k.shape[:3], dtype=torch.bool,
                                                             device=k.device)
            attends_bad, has_key = _reach(run, q, k, bad_keys)
            poisoned = attends_bad | (has_key & ~good_q)
            out = out.masked_fill(poisoned.unsqueeze(-1), float("nan"))
            lse = lse.masked_fill(poisoned, float("nan"))
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, good_q, *gathered)
        ctx.run, ctx.any_bad = run, any_bad
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, good_q, *gathered = ctx.saved_tensors
        run, do = ctx.run, do.contiguous()
        acc, causal, scale = grad_dtype(q.dtype), run.plan.causal, run.scale
        bad_rows = None
        if ctx.any_bad:  # as nonfinite.guard_backward, every rank together
            no_keys = torch.zeros(k.shape[:3], dtype=torch.bool, device=k.device)
            _, has_key = _reach(run, q, k, no_keys)
            clean = nonfinite.finite_rows(out) & nonfinite.finite_rows(do) & good_q
            bad_rows = has_key & ~clean
            do, out = nonfinite.zeroed(do, clean), nonfinite.zeroed(out, clean)
            lse = lse.masked_fill(bad_rows, float("inf"))  # P = 0 on those rows
        if run.local is not None:
            dq, dk, dv = (g.to(acc) for g in torch_backend.backward(do, q, k, v, out, lse,
                                                                     run.local))
        else:
            dq, dk, dv = q.new_zeros(q.shape, dtype=acc), k.new_zeros(k.shape, dtype=acc), \
                v.new_zeros(v.shape, dtype=acc)
        b, hkv, n, d = k.shape
        dk, dv = dk.contiguous(), dv.contiguous()  # viewed as rows below
        dk_rows, dv_rows = dk.view(b, hkv * n, d), dv.view(b, hkv * n, d)
        for span, kv in zip(run.spans, gathered, strict=True):
            dkv = kv.new_zeros(kv.shape, dtype=acc)  # gradients of the gathered rows
            for grp in span.groups:
                at = (slice(None), grp.heads[:, None], grp.rows[None, :])
                qh, doh, oh, lh = q[at], do[at], out[at], lse[at]
                if grp.keys.shape[1]:
                    gq, gk, gv = attend_backward(doh, qh, kv[0][:, grp.keys], kv[1][:, grp.keys],
                                                 oh, lh, scale, False, None)
                    dq[at] += gq.to(acc)
                    dkv[0].index_add_(1, grp.keys.flatten(), gk.flatten(1, 2).to(acc))
                    dkv[1].index_add_(1, grp.keys.flatten(), gv.flatten(1, 2).to(acc))
                if causal:
                    own = (slice(None), grp.kv[:, None], grp.rows[None, :])
                    gq, gk, gv = attend_backward(doh, qh, k[own], v[own], oh, lh, scale, True,
                                                 None)
                    dq[at] += gq.to(acc)
                    flat = (grp.kv[:, None] * n + grp.rows[None, :]).flatten()
                    dk_rows.index_add_(1, flat, gk.flatten(1, 2).to(acc))
                    dv_rows.index_add_(1, flat, gv.flatten(1, 2).to(acc))
            g = span.branch.span
            send = dkv.unflatten(2, (g, -1)).permute(2, 0, 1, 3, 4)  # slot m: member m's rows
            grads = comm.all_to_all(send, span.group, "backward",
                                    span.step("backward all-to-all"), run.timeout)
            span.unpack_add(grads.sum(0), dk, dv)
        if bad_rows is not None:
            bad_keys = _attended(run, q, k, bad_rows).unsqueeze(-1)
            dq = dq.masked_fill(bad_rows.unsqueeze(-1), float("nan"))
            dk, dv = (g.masked_fill(bad_keys, float("nan")) for g in (dk, dv))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def _indicator_call(run: _Run, q: torch.Tensor, k: torch.Tensor, values: torch.Tensor
                    ) -> torch.Tensor:
    """The pattern's distributed attention of zero queries and keys over `values` (float32):
    every allowed pair weighs the same. Every rank calls it together."""
    zq = torch.zeros(*q.shape[:3], values.shape[-1], device=q.device)
    zk = torch.zeros(values.shape, device=q.device)
    return attention(zq, zk, values, run.pattern, group=run.group, scale=1.0,
                     timeout=run.timeout)


def _reach(run: _Run, q: torch.Tensor, k: torch.Tensor, bad_keys: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows that attend a bad key on any rank, rows with a key): nonfinite's reach."""
    with torch.no_grad():
        out = _indicator_call(run, q, k, nonfinite.indicator_values(bad_keys))
    return nonfinite.read_reach(out)


def _attended(run: _Run, q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """This rank's keys that `rows` of any rank attend: dV of the indicator call with dO = 1
    on those rows."""
    values = torch.zeros(*k.shape[:3], 1, device=k.device, requires_grad=True)
    with torch.enable_grad():
        out = _indicator_call(run, q, k, values)
        (grad,) = torch.autograd.grad(out, values, rows.to(torch.float32).unsqueeze(-1))
    return grad[..., 0] > 0


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern | str, *,
              group: dist.ProcessGroup | None = None, backend: str | None = None,
              scale: float | None = None, timeout: float | timedelta | None = None
              ) -> torch.Tensor:
    """`pattern`'s attention over a sequence split across the ranks of `group` (default: all).

    Rank j passes its chunk q (B, H, N/P, D), k, v (B, Hkv, N/P, D) of tokens [j*N/P, (j+1)*N/P)
    and gets its chunk of the output; differentiable in q, k, v. Every rank of the group must
    call it together (and, if it needs gradients, run the backward together). A call that fails
    on one rank before any data moves raises on every rank. `timeout` (seconds or a timedelta;
    None: the process group's own) bounds each of spattn's collectives, forward and backward:
    a rank left waiting on a peer that failed later, exited or never called raises
    `CollectiveError` naming the step and the ranks it waited on.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise InputError("torch.distributed is not initialized: call "
                         "torch.distributed.init_process_group first (or use spattn.attention)")
    group = dist.group.WORLD if group is None else group
    limit = None
    try:
        limit = as_timeout(timeout)
        prepared = prepare(q, k, v, pattern, backend, scale, dist.get_world_size(group), group)
        plan = prepared.plan
        spans = tuple(_Span(b, plan, group, q.device) for b in plan.branches if not b.local)
        run = _Run(prepared, _local_problem(plan, prepared.scale), spans, group, limit, pattern)
    except Exception as exc:  # raised after the metadata check, so no rank waits forever
        fail(exc, group, limit)
    return _DistributedAttention.apply(q, k, v, run)
