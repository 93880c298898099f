"""`spattn run PATTERN --seq-len N`: run a pattern on random data here and say what it did."""

from __future__ import annotations

import argparse
import math
import time

import torch

from spattn.errors import SpattnError
from spattn.patterns.counting import count_pairs, density, useful_flops
from spattn.patterns.geometry import describe, resolve
from spattn.patterns.loader import load_pattern
from spattn.runtime.dispatch import attention

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run", help="run a pattern on random data and report time and accuracy",
        description="Run PATTERN forward (and backward) on random unit-normal q, k, v, time it, "
                    "and check a few query rows against a direct float64 computation.")
    p.add_argument("pattern", metavar="PATTERN", help="built-in name or YAML file")
    p.add_argument("--seq-len", type=int, required=True, metavar="N")
    p.add_argument("--batch", type=int, default=1, metavar="B")
    p.add_argument("--heads", type=int, default=None, metavar="H",
                   help="query heads (default: the pattern's, else 4)")
    p.add_argument("--kv-heads", type=int, default=None, metavar="HKV",
                   help="key/value heads (default: the pattern's, else H)")
    p.add_argument("--head-dim", type=int, default=None, metavar="D",
                   help="default: the pattern's, else 64")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--backend", default=None, help="default: chosen by device and dtype")
    p.add_argument("--backward", action="store_true", help="also time the backward pass")
    p.add_argument("--check-rows", type=int, default=4, metavar="K",
                   help="query rows per head checked against float64 (default 4, 0 to skip)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


def _first(*values: int | None) -> int:
    return next(v for v in values if v is not None)


def _direct_rows(q, k, v, pattern, heads: int, rows: torch.Tensor, scale: float) -> torch.Tensor:
    """Float64 outputs of the given query rows, from each branch's key predicate over all keys."""
    n = q.shape[2]
    branches = resolve(pattern, n, heads)
    group = heads // k.shape[1]
    keys = torch.arange(n)
    out = torch.zeros(q.shape[0], heads, len(rows), q.shape[3], dtype=torch.float64)
    for h in range(heads):
        for i, p in enumerate(rows.tolist()):
            qpos = torch.tensor(p)
            counts = sum(g.allows(h, qpos, keys).double() for g in branches)
            if pattern.causal:
                counts = counts * (keys <= p)
            if pattern.overlap == "union":
                counts = (counts > 0).double()
            if not counts.any():
                continue
            kh, vh = k[:, h // group].double(), v[:, h // group].double()
            scores = scale * kh @ q[:, h, p].double().unsqueeze(-1)
            logits = scores.squeeze(-1) + counts.log()
            out[:, h, i] = torch.softmax(logits, -1) @ vh
    return out


def run(args: argparse.Namespace) -> int:
    pattern = load_pattern(args.pattern)
    heads = _first(args.heads, pattern.required_heads(), 4)
    kv_heads = _first(args.kv_heads, pattern.kv_heads, heads)
    dim = _first(args.head_dim, pattern.head_dim, 64)
    n, batch = args.seq_len, args.batch
    for flag, value in (("--seq-len", n), ("--batch", batch), ("--heads", heads),
                        ("--kv-heads", kv_heads), ("--head-dim", dim)):
        if value < 1:
            raise SpattnError(f"{flag} must be at least 1, got {value}")
    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(args.seed)
    q = torch.randn(batch, heads, n, dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, n, dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, n, dim, generator=gen).to(dtype)
    for t in (q, k, v):
        t.requires_grad_(args.backward)

    counts = count_pairs(pattern, n, heads)
    flops = useful_flops(counts.total, dim, batch)
    branches = resolve(pattern, n, heads)
    print(f"spattn run {pattern.name}: N={n} B={batch} H={heads} Hkv={kv_heads} D={dim} "
          f"{args.dtype} {'causal' if pattern.causal else 'non-causal'} {pattern.overlap}, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"  pattern   {len(branches)} branches ({', '.join(describe(g) for g in branches)})")
    print(f"            {counts.total:,} allowed (head, query, key) pairs, density "
          f"{density(counts.total, n, heads, pattern.causal):.4f} of dense, "
          f"{flops / 1e9:.2f} useful GFLOP forward")

    start = time.perf_counter()
    out = attention(q, k, v, pattern, backend=args.backend)
    forward_s = time.perf_counter() - start
    print(f"  forward   {forward_s * 1e3:9.1f} ms  {flops / forward_s / 1e9:7.2f} useful GFLOP/s")
    if args.backward:
        start = time.perf_counter()
        out.backward(torch.randn(out.shape, generator=gen).to(dtype))
        backward_s = time.perf_counter() - start
        print(f"  backward  {backward_s * 1e3:9.1f} ms  "
              f"{2.5 * flops / backward_s / 1e9:7.2f} useful GFLOP/s")
    finite = bool(torch.isfinite(out).all())
    print(f"  output    {tuple(out.shape)} {args.dtype}, mean {out.float().mean():+.4f}, "
          f"std {out.float().std():.4f}, {'all finite' if finite else 'NOT FINITE'}")

    if args.check_rows:
        rows = torch.randperm(n, generator=gen)[: args.check_rows].sort().values
        scale = pattern.softmax_scale or 1 / math.sqrt(dim)
        want = _direct_rows(q.detach(), k.detach(), v.detach(), pattern, heads, rows, scale)
        error = (out.detach()[:, :, rows].double() - want).abs().max().item()
        print(f"  check     rows {rows.tolist()} of every head against a direct float64 "
              f"computation: max abs error {error:.2e}")
    return 0 if finite else 1
