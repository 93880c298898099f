"""`spattn run PATTERN --seq-len N`: run a pattern on random data here and say what it did."""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from spattn.cli.args import DTYPES as DTYPE_NAMES
from spattn.cli.args import add_dtype, positive
from spattn.errors import SpattnError
from spattn.patterns.counting import count_pairs, density, useful_flops
from spattn.patterns.geometry import describe, resolve
from spattn.patterns.loader import load_pattern
from spattn.runtime.dispatch import attention, resolve_scale

BASELINE_FLOPS = 2e12  # dense work past which the SDPA baseline is left out (minutes on a CPU)
MAX_PIECES = 20_000  # (head, branch) pieces a run may take: each has its Python overhead
MEMORY_SHARE = 0.8  # of the machine's available memory the tensors may take

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # float16 ... float64


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run", help="run a pattern on random data and report time and accuracy",
        description="Run PATTERN forward (and backward) on random unit-normal q, k, v: one "
                    "warm-up call, then --repeat timed calls, interleaved with dense "
                    "scaled_dot_product_attention on the same tensors; print the median times, "
                    "the useful GFLOP/s and a check of a few query rows against a direct "
                    "float64 computation.")
    p.add_argument("pattern", metavar="PATTERN", help="built-in name or YAML file")
    p.add_argument("--seq-len", "-n", type=positive, required=True, metavar="N",
                   help="sequence length (1e5 and 100_000 work too)")
    p.add_argument("--batch", type=positive, default=1, metavar="B", help="batch size (default 1)")
    p.add_argument("--heads", type=positive, default=None, metavar="H",
                   help="query heads (default: the pattern's, else 4)")
    p.add_argument("--kv-heads", type=positive, default=None, metavar="HKV",
                   help="key/value heads (default: the pattern's, else H)")
    p.add_argument("--head-dim", type=positive, default=None, metavar="D",
                   help="head dimension (default: the pattern's, else 64)")
    add_dtype(p, default="float32")
    p.add_argument("--backend", default=None,
                   help="torch or triton (default: chosen by device and dtype)")
    p.add_argument("--backward", action="store_true",
                   help="also time forward + backward")
    p.add_argument("--repeat", type=positive, default=5, metavar="R",
                   help="timed calls after one warm-up; the median is printed (default 5)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the dense SDPA baseline (skipped anyway when its N x N work "
                        f"passes {BASELINE_FLOPS:.0e} FLOP)")
    p.add_argument("--check-rows", type=int, default=4, metavar="K",
                   help="query rows per head checked against float64 (default 4, 0 to skip)")
    p.add_argument("--seed", type=int, default=0, help="random seed of q, k, v (default 0)")
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


def _available_memory() -> int | None:
    """Bytes of memory available now (Linux), or None where that is unknown."""
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_memory(batch: int, heads: int, kv_heads: int, n: int, dim: int, dtype: torch.dtype,
                  backward: bool) -> None:
    """Refuse sizes whose tensors alone would not fit, before allocating anything."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    tensors = batch * n * dim * (2 * heads + 2 * kv_heads) * itemsize  # q, k, v, out
    accumulators = batch * heads * n * (dim + 1) * 4  # the running (O, LSE) in float32
    need = (2 if backward else 1) * tensors + accumulators
    have = _available_memory()
    if have is not None and need > MEMORY_SHARE * have:
        raise SpattnError(f"N={n:,} B={batch} H={heads} D={dim} needs about "
                          f"{need / 2**30:,.1f} GiB for q, k, v and the output, but only "
                          f"{have / 2**30:,.1f} GiB is available; use a smaller --seq-len")


def _median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def run(args: argparse.Namespace) -> int:
    pattern = load_pattern(args.pattern)
    heads = _first(args.heads, pattern.required_heads(), 4)
    kv_heads = _first(args.kv_heads, pattern.kv_heads, heads)
    dim = _first(args.head_dim, pattern.head_dim, 64)
    n, batch = args.seq_len, args.batch
    if args.check_rows < 0:
        raise SpattnError(f"--check-rows must be 0 or more, got {args.check_rows}")
    dtype = DTYPES[args.dtype]
    branches = len(pattern.expanded_branches())
    if heads * branches > MAX_PIECES:
        raise SpattnError(f"--heads: {heads:,} heads x {branches} branches is more than "
                          f"{MAX_PIECES:,} (head, branch) pieces, which run one by one here")
    _check_memory(batch, heads, kv_heads, n, dim, dtype, args.backward)
    gen = torch.Generator().manual_seed(args.seed)
    q = torch.randn(batch, heads, n, dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, n, dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, n, dim, generator=gen).to(dtype)
    for t in (q, k, v):
        t.requires_grad_(args.backward)
    grad = torch.randn(q.shape, generator=gen).to(dtype)

    counts = count_pairs(pattern, n, heads)
    flops = useful_flops(counts.total, dim, batch)
    dense_pairs = heads * (n * (n + 1) // 2 if pattern.causal else n * n)
    dense_flops = useful_flops(dense_pairs, dim, batch)
    branches = resolve(pattern, n, heads)
    print(f"spattn run {pattern.name}: N={n} B={batch} H={heads} Hkv={kv_heads} D={dim} "
          f"{args.dtype} {'causal' if pattern.causal else 'non-causal'} {pattern.overlap}, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"  pattern   {len(branches)} branches ({', '.join(describe(g) for g in branches)})")
    print(f"            {counts.total:,} allowed (head, query, key) pairs, density "
          f"{density(counts.total, n, heads, pattern.causal):.4f} of dense, "
          f"{flops / 1e9:.2f} useful GFLOP forward")

    scale = resolve_scale(pattern, None, dim)
    out = attention(q, k, v, pattern, backend=args.backend)  # checks the call; the warm-up
    if args.backend in (None, "torch"):  # on CPU the PyTorch backend runs it: its plan
        from spattn.runtime import torch_backend

        problem = torch_backend.Problem(branches, n, heads, kv_heads, pattern.causal,
                                        pattern.overlap == "union", scale)
        first, *calls = torch_backend.describe(problem, dim)
        print(f"  plan      {first}")
        for line in calls:
            print(f"            {line}")

    def spattn_call() -> torch.Tensor:
        result = attention(q, k, v, pattern, backend=args.backend)
        if args.backward:
            result.backward(grad)
        return result

    def dense_call() -> None:
        result = F.scaled_dot_product_attention(q, k, v, is_causal=pattern.causal, scale=scale,
                                                enable_gqa=kv_heads != heads)
        if args.backward:
            result.backward(grad)

    calls = {"spattn": spattn_call}
    baseline = not args.no_baseline and dense_flops * (3.5 if args.backward else 1) \
        <= BASELINE_FLOPS
    if baseline:
        calls["dense SDPA"] = dense_call
        dense_call()  # its warm-up
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.repeat):  # interleaved, so drift on a shared machine hits both alike
        for name, call in calls.items():
            start = time.perf_counter()
            result = call()
            times[name].append(time.perf_counter() - start)
            if name == "spattn":
                out = result
    what = "forward+backward" if args.backward else "forward"
    work = 3.5 if args.backward else 1.0  # a backward counts 2.5 forwards
    ms = _median_ms(times["spattn"])
    print(f"  {what:<17}{ms:9.1f} ms  {work * flops / ms / 1e6:8.2f} useful GFLOP/s  "
          f"(median of {args.repeat} after a warm-up)")
    if baseline:
        dense_ms = _median_ms(times["dense SDPA"])
        print(f"  dense SDPA       {dense_ms:9.1f} ms  "
              f"{work * dense_flops / dense_ms / 1e6:8.2f} useful GFLOP/s  "
              f"(is_causal={pattern.causal}): spattn takes {ms / dense_ms:.2f}x its time")
    elif not args.no_baseline:
        print(f"  dense SDPA       skipped: {work * dense_flops / 1e12:.1f} TFLOP per call is "
              f"past {BASELINE_FLOPS / 1e12:.0f} TFLOP")
    finite = bool(torch.isfinite(out).all())
    print(f"  output    {tuple(out.shape)} {args.dtype}, mean {out.float().mean():+.4f}, "
          f"std {out.float().std():.4f}, {'all finite' if finite else 'NOT FINITE'}")

    if args.check_rows:
        rows = torch.randperm(n, generator=gen)[: args.check_rows].sort().values
        want = _direct_rows(q.detach(), k.detach(), v.detach(), pattern, heads, rows, scale)
        error = (out.detach()[:, :, rows].double() - want).abs().max().item()
        print(f"  check     rows {rows.tolist()} of every head against a direct float64 "
              f"computation: max abs error {error:.2e}")
    return 0 if finite else 1
