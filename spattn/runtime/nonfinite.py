"""Non-finite inputs reach exactly the rows that attend them (docs/semantics.md, "Mixing
branches"): a NaN or inf in q, k or v makes NaN every output row, and every gradient, whose
allowed pairs include it, and never one whose pairs exclude it.

A kernel cannot do that by itself: a masked pair's weight is 0, and 0 * NaN is NaN, so a NaN
value row leaks into every row of its tile; torch's fused CPU kernel even drops a NaN query row
at some sizes. So the backends compute on finite inputs only, and the non-finite rows are put
back afterwards:

    forward:  run on q, k, v with every non-finite row zeroed; then a row is NaN if its own q
              is not finite and it has a key, or if it attends a key whose k or v is not;
    backward: the rows whose output or dO is not finite (and that have a key) contribute
              nothing to the run, and their dQ, and the dK and dV of every key they attend,
              are NaN.

Which rows attend which keys comes from one more call of the same pattern on indicator tensors
(head_dim 2, zero scores: the output is the mean, over a row's keys, of [key is bad, 1]), on the
PyTorch backend. All of it runs only when a cheap check (one float32 sum per tensor) finds a
non-finite value: a call with finite inputs pays those sums and nothing else. That check reads
one number back to the host (a device sync per call), so decoding does without it: a KVCache
flags the non-finite rows of its keys as they arrive and stores them zeroed, and the rows they
poison are computed on the device, branch-free (runtime/cached.py, `bad_keys`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def finite(*tensors: torch.Tensor) -> bool:
    """Whether every element of `tensors` is finite. A sum that overflows (huge finite values)
    answers False too: the caller then takes the exact path, which is correct for any input."""
    total = 0.0
    for t in tensors:
        if t.numel():
            total = total + t.sum(dtype=torch.float64 if t.dtype == torch.float64
                                  else torch.float32)
    return bool(torch.isfinite(torch.as_tensor(total)))


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., N) True where the row x[..., i, :] holds only finite values."""
    return torch.isfinite(x).all(-1)


def zeroed(x: torch.Tensor, good: torch.Tensor) -> torch.Tensor:
    """x with the rows where `good` is False set to 0."""
    return torch.where(good.unsqueeze(-1), x, x.new_zeros(()))


# reach(bad_keys (B, Hkv, N) bool) -> (attends_bad, has_key), each (B, H, Nq) bool
Reach = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def indicator_values(bad_keys: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, N, 2) float32 values [bad, 1]: attended with equal scores, a row's output is
    (the share of its key weight on bad keys, 1 if it has a key else 0)."""
    bad = bad_keys.to(torch.float32)
    return torch.stack([bad, torch.ones_like(bad)], -1)


def read_reach(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(attends_bad, has_key) from the output of attention over indicator_values."""
    return out[..., 0] > 0, out[..., 1] > 0


def guard_forward(run: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
                  reach: Reach, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """run(q, k, v) -> (O, LSE or None), with non-finite inputs reaching exactly the rows that
    attend them: O and LSE NaN there."""
    if finite(q, k, v):
        return run(q, k, v)
    good_q, good_kv = finite_rows(q), finite_rows(k) & finite_rows(v)
    out, lse = run(zeroed(q, good_q), zeroed(k, good_kv), zeroed(v, good_kv))
    attends_bad, has_key = reach(~good_kv)
    poisoned = attends_bad | (has_key & ~good_q)
    out = out.masked_fill(poisoned.unsqueeze(-1), float("nan"))
    return out, None if lse is None else lse.masked_fill(poisoned, float("nan"))


def guard_backward(run: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                   reach: Reach, attended: Callable[[torch.Tensor], torch.Tensor],
                   do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """run(dO, q, k, v, O, LSE) -> (dQ, dK, dV), exact where every input is finite; where some
    is not, the gradients that depend on it are NaN and the others are those of the finite
    rows. `attended(rows (B, H, N) bool)` -> (B, Hkv, N) bool: the keys those rows attend."""
    if finite(do, q, k, v, out):
        return run(do, q, k, v, out, lse)
    good_q, good_kv = finite_rows(q), finite_rows(k) & finite_rows(v)
    _, has_key = reach(~good_kv)
    # a row that attends a non-finite key already has a NaN output (the forward's guard)
    clean = finite_rows(out) & finite_rows(do) & good_q
    bad_rows = has_key & ~clean
    keep = clean  # a row without keys gets no gradient anyway: its dO may go too
    dq, dk, dv = run(zeroed(do, keep), zeroed(q, good_q), zeroed(k, good_kv),
                     zeroed(v, good_kv), zeroed(out, keep),
                     lse.masked_fill(bad_rows, float("inf")))  # +inf: P = 0 on those rows
    bad_keys = attended(bad_rows).unsqueeze(-1)
    return (dq.masked_fill(bad_rows.unsqueeze(-1), float("nan")),
            dk.masked_fill(bad_keys, float("nan")), dv.masked_fill(bad_keys, float("nan")))
