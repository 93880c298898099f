"""The methods spattn is timed against, each as `fn(q, k, v) -> out` on (B, H, N, D) tensors.

- `dense_sdpa`: dense `scaled_dot_product_attention` (the flash backend on CUDA, else the next
  that takes the call; `.backend` names the one that ran): the speed reference.
- `masked_sdpa`: dense `scaled_dot_product_attention` with the pattern as an additive mask,
  log(count) where a pair counts (count 2 where two branches give it, in multiset mode) and -inf
  elsewhere: exact for every pattern, O(N^2) memory, the simplest correct way.
- `flex`: FlexAttention (compiled) with the BlockMask spattn exports for the pattern. FlexAttention
  holds one 0/1 mask, so it computes the *union* of overlapping branches.
- `gather_sdpa_scatter`: the official LongNet approach. Per dilated branch and head offset it
  gathers the dilated rows into a dense copy, runs dense attention that returns the log-sum-exp,
  scatters the result back, and merges the branches by their log-sum-exp. As in the official code
  the mixing weights get no gradient (the fused ops' LSE output is not differentiable), so its
  backward is about 2% off the true gradient; it is here for timing.
- `strided_sdpa_scatter`: the same method written as torchscale writes it, independently of the
  above: each segment's dilated rows are a strided view of the tensor (no index lists), the
  dense problems run on those views, and the outputs are written back through the same views.
- `window_blocks`: a causal sliding window the way one writes it by hand: query blocks of W rows,
  each over the 2W keys that end with it (an overlapping view), one masked SDPA call.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

import spattn
from spattn.compiler.layouts import flex_mask_mod
from spattn.patterns.counting import branch_mask
from spattn.patterns.geometry import Dense, Dilated, Window, resolve

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def run_pass(fn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             grad: torch.Tensor, backward: bool) -> torch.Tensor:
    """One timed unit: fn's forward, and with `backward` its backward with `grad` too."""
    out = fn(q, k, v)
    if backward:
        for t in (q, k, v):
            t.grad = None
        out.backward(grad)
    return out


def _every_head(pattern: spattn.Pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """K and V expanded to every query head (as LongNet's code does), and the softmax scale."""
    group = q.shape[1] // k.shape[1]
    scale = pattern.softmax_scale or 1.0 / math.sqrt(q.shape[-1])
    return k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), scale


def spattn_attention(pattern: spattn.Pattern, backend: str) -> Attention:
    return lambda q, k, v: spattn.attention(q, k, v, pattern, backend=backend)


# SDPA's CUDA backends in the order the benchmark wants them: the flash kernel first
SDPA_BACKENDS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


class DenseSDPA:
    """Dense `scaled_dot_product_attention`, on CUDA pinned to one backend at a time: flash
    first, else the next of SDPA_BACKENDS that takes the call. `backend` names the one that ran
    last (lower case: 'flash_attention', ...; 'cpu' on CPU), so a result can say what it timed."""

    def __init__(self, causal: bool) -> None:
        self.causal = causal
        self.backend: str | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not q.is_cuda:
            self.backend = "cpu"
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        names = list(SDPA_BACKENDS)
        if self.backend and self.backend.upper() in names:  # the one that ran last, first
            names.remove(self.backend.upper())
            names.insert(0, self.backend.upper())
        errors = []
        for name in names:
            try:
                with sdpa_kernel(getattr(SDPBackend, name)):
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as error:  # "No available kernel": this backend cannot
                errors.append(f"{name}: {str(error).splitlines()[0][:80]}")
                continue
            self.backend = name.lower()
            return out
        raise RuntimeError("no SDPA backend took the call: " + "; ".join(errors))


def dense_sdpa(causal: bool) -> DenseSDPA:
    return DenseSDPA(causal)


def pattern_bias(pattern: spattn.Pattern, seq_len: int, heads: int) -> torch.Tensor:
    """(1, H, N, N) float32: log of how many times each pair counts, -inf where it does not.
    Written from the branches' own masks rather than with the runtime's `pair_counts`, which
    spattn's dense masked plan uses: a peer that shared it could not catch its mistakes."""
    counts = torch.zeros(heads, seq_len, seq_len)
    for head in range(heads):
        masks = [branch_mask(g, head, seq_len, pattern.causal)
                 for g in resolve(pattern, seq_len, heads)]
        if pattern.overlap == "union":
            counts[head] = torch.stack(masks).any(0).float()
        else:
            counts[head] = torch.stack(masks).sum(0, dtype=torch.float32)
    return counts.log().unsqueeze(0)


def masked_sdpa(pattern: spattn.Pattern, seq_len: int, heads: int,
                device: torch.device) -> Attention:
    bias = pattern_bias(pattern, seq_len, heads).to(device)
    scale = pattern.softmax_scale

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        return out.nan_to_num(0.0)  # a query with no key: 0, as SEMANTICS.md says

    return run


def flex(pattern: spattn.Pattern, seq_len: int, heads: int, device: torch.device) -> Attention:
    """Compiled flex_attention with spattn's exported mask (built without an N x N tensor on
    CUDA: create_block_mask(_compile=True))."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    mask_mod = flex_mask_mod(pattern, seq_len, heads, device)
    block_mask = create_block_mask(mask_mod, None, heads, seq_len, seq_len, device=device,
                                   _compile=device.type == "cuda")
    compiled = torch.compile(flex_attention, dynamic=False)
    scale = pattern.softmax_scale

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return compiled(q, k, v, block_mask=block_mask, scale=scale,
                        enable_gqa=k.shape[1] != q.shape[1])

    return run


def sdpa_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention that also returns the log-sum-exp (B, H, N), float32."""
    if q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=scale)
    return out, lse.float()


def _segment_rows(n: int, segment: int, dilation: int, offset: int) -> list[torch.Tensor]:
    """Positions of one head offset's dilated rows: (segments, m) for the full segments, then the
    shorter last segment, each as one index tensor."""
    groups = []
    full = n // segment
    m = len(range(offset, segment, dilation))
    if full and m:
        starts = torch.arange(full)[:, None] * segment
        groups.append(starts + offset + dilation * torch.arange(m)[None, :])
    tail = full * segment
    if tail < n and offset < n - tail:
        groups.append((tail + torch.arange(offset, n - tail, dilation))[None, :])
    return groups


def _gather(t: torch.Tensor, index: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Copy the indexed (head, position) rows of t (B, H, N, D) into (problems, 1, m, D)."""
    b, h, n, d = t.shape
    rows = t.reshape(b, h * n, d).index_select(1, index)
    return rows.view(shape[0], 1, shape[1], d)


Branch = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Dilated,
                   bool, float], None]


def longnet_method(pattern: spattn.Pattern, one_branch: Branch) -> Attention:
    """LongNet's method around `one_branch(q, k, v, out, lse, branch, causal, scale)`, which
    writes one dilated branch's output and LSE: K and V expanded to every query head first,
    then each branch alone, then the branches merged by LSE."""
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, h, n, d = q.shape
        k, v, scale = _every_head(pattern, q, k, v)
        outs, lses = [], []
        for g in _dilated_branches(pattern, n, h):
            outs.append(q.new_zeros(q.shape))
            lses.append(q.new_full((b, h, n), float("-inf"), dtype=torch.float32))
            one_branch(q, k, v, outs[-1], lses[-1], g, pattern.causal, scale)
        return merge_by_lse(outs, lses)

    return run


def merge_by_lse(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> torch.Tensor:
    """The branches' outputs weighted by exp(branch LSE - total LSE); rows no branch reaches
    stay zero."""
    total = torch.logsumexp(torch.stack(lses), 0)
    total = torch.where(total.isfinite(), total, 0.0)
    return sum(o * torch.exp(branch_lse - total).unsqueeze(-1).to(o.dtype)
               for o, branch_lse in zip(outs, lses, strict=True))


def _dilated_branches(pattern: spattn.Pattern, n: int, heads: int) -> list[Dilated]:
    branches = []
    for g in resolve(pattern, n, heads):
        if isinstance(g, Dense):
            g = Dilated(segment=n, dilation=1, offsets=(0,) * heads)
        if not isinstance(g, Dilated):
            raise NotImplementedError("gather + SDPA + scatter covers dilated and dense "
                                      "branches only")
        branches.append(g)
    return branches


def _gathered_branch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     lse: torch.Tensor, g: Dilated, causal: bool, scale: float) -> None:
    b, h, n, d = q.shape
    for offset in sorted(set(g.offsets)):
        heads = torch.tensor([i for i in range(h) if g.offsets[i] == offset])
        for rows in _segment_rows(n, g.segment, g.dilation, offset):
            segs, m = rows.shape
            # (head, position) pairs as indices into the (B, H*N, ...) flattening
            index = (heads[:, None] * n + rows.flatten()[None, :]).flatten().to(q.device)
            shape = (b * len(heads) * segs, m)  # one dense problem per head and segment
            o, lse_part = sdpa_with_lse(*(_gather(t, index, shape) for t in (q, k, v)), causal,
                                        scale)
            out.view(b, h * n, d).index_copy_(1, index, o.reshape(b, -1, d))
            lse.view(b, h * n).index_copy_(1, index, lse_part.reshape(b, -1))


def gather_sdpa_scatter(pattern: spattn.Pattern) -> Attention:
    return longnet_method(pattern, _gathered_branch)


def _dilated_view(t: torch.Tensor, start: int, end: int, length: int, offset: int,
                  dilation: int) -> torch.Tensor:
    """Rows start..end of t (..., N, D) cut into segments of `length`, each segment's rows
    offset, offset + dilation, ...: (..., segments, m, D), a view."""
    return t[..., start:end, :].unflatten(-2, ((end - start) // length, length))[
        ..., offset::dilation, :]


def _strided_branch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, g: Dilated, causal: bool, scale: float) -> None:
    h, n = q.shape[1], q.shape[2]
    full = n // g.segment * g.segment
    runs = [(0, full, g.segment), (full, n, n - full)]  # whole segments, then the rest
    for offset in sorted(set(g.offsets)):
        heads = [i for i in range(h) if g.offsets[i] == offset]
        for start, end, length in runs:
            if offset >= length:  # (also: no rows in this run)
                continue
            for head in [slice(None)] if len(heads) == h else heads:
                views = [_dilated_view(t[:, head], start, end, length, offset, g.dilation)
                         for t in (q, k, v, out)]
                o, lse_part = sdpa_with_lse(*(t.flatten(0, -3)[:, None] for t in views[:3]),
                                            causal, scale)
                views[3].copy_(o.view(views[3].shape))
                _dilated_view(lse[:, head, :, None], start, end, length, offset,
                              g.dilation).copy_(lse_part.view(*views[3].shape[:-1], 1))


def strided_sdpa_scatter(pattern: spattn.Pattern) -> Attention:
    return longnet_method(pattern, _strided_branch)


def causal_window(pattern: spattn.Pattern, n: int, heads: int) -> int | None:
    """W if the pattern is one causal window on every head at this length, else None."""
    branches = resolve(pattern, n, heads)
    if (pattern.causal and len(branches) == 1 and isinstance(branches[0], Window)
            and branches[0].on_heads is None):
        return branches[0].size
    return None


def window_blocks(pattern: spattn.Pattern) -> Attention:
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, h, n, d = q.shape
        size = causal_window(pattern, n, h)
        if size is None:
            raise NotImplementedError("window blocks cover one causal window only")
        size = min(size, n)  # a window as long as the sequence: plain causal attention
        k, v, scale = _every_head(pattern, q, k, v)
        blocks = -(-n // size)
        q, k, v = (F.pad(t, (0, 0, 0, blocks * size - n)) for t in (q, k, v))
        first = [t[:, :, :size] for t in (q, k, v)]  # block 0: plain causal attention
        out = [F.scaled_dot_product_attention(*first, is_causal=True, scale=scale)]
        if blocks > 1:
            # block i > 0: queries (i W .. i W + W), keys ((i - 1) W .. i W + W); query row r
            # takes key column c when r < c <= r + W
            row, col = torch.arange(size)[:, None], torch.arange(2 * size)[None, :]
            band = ((col > row) & (col <= row + size)).to(q.device)
            rest = q[:, :, size:].reshape(b, h * (blocks - 1), size, d)
            keys = [t.as_strided((b, h, blocks - 1, 2 * size, d),
                                 (t.stride(0), t.stride(1), size * t.stride(2), t.stride(2),
                                  t.stride(3))).reshape(b, h * (blocks - 1), 2 * size, d)
                    for t in (k, v)]
            o = F.scaled_dot_product_attention(rest, *keys, attn_mask=band, scale=scale)
            out.append(o.view(b, h, (blocks - 1) * size, d))
        return torch.cat(out, 2)[:, :, :n]

    return run
