"""Decode a LongNet pattern token by token with spattn.KVCache, and check it against the full
causal forward.

    python examples/decode_longnet.py                    # longnet-lm scaled 1/16: w = 128 ... 2048
    python examples/decode_longnet.py --scale 1 --tokens 70000   # the real schedule (slow on CPU)

A prompt goes through the ordinary forward; every later token attends the keys the cache kept.
The cache holds at most `bound` tokens, however long the sequence: it prints what it holds as
the sequence grows, next to what a dense KV cache would hold, and the time per token next to a
dense cache's (a preallocated buffer of every key and SDPA over it), step by step interleaved.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import spattn
from spattn.patterns.report import scale_pattern


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pattern", default="longnet-lm")
    parser.add_argument("--scale", type=int, default=16, help="divide segment lengths by this")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args()
    pattern = scale_pattern(spattn.load_pattern(args.pattern), args.scale)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    shapes = [(1, args.heads, args.tokens, args.head_dim)] + \
        [(1, args.kv_heads, args.tokens, args.head_dim)] * 2
    q, k, v = (torch.randn(s, generator=gen).to(device) for s in shapes)
    full = spattn.attention(q, k, v, pattern)  # the reference: one causal forward over it all

    cache = spattn.KVCache(pattern)
    branches = ", ".join(f"w={b.segment} r={b.dilation}" for b in pattern.expanded_branches())
    print(f"{pattern.name} ({branches}), H={args.heads} Hkv={args.kv_heads} "
          f"D={args.head_dim}, float32 on {device}")
    out = cache.attend(q[:, :, :args.prompt], k[:, :, :args.prompt], v[:, :, :args.prompt])
    dense_k, dense_v = torch.zeros_like(k), torch.zeros_like(v)  # a dense cache, preallocated
    dense_k[:, :, :args.prompt], dense_v[:, :, :args.prompt] = k[:, :, :args.prompt], \
        v[:, :, :args.prompt]
    worst = (out - full[:, :, :args.prompt]).abs().max().item()
    print(f"prompt of {args.prompt} tokens; cache bound {cache.bound:,} tokens "
          f"({cache.bound_bytes() / 2**20:.2f} MiB)")
    print(f"{'tokens':>8} {'most kept':>10} {'cache MiB':>10} {'dense cache MiB':>16} "
          f"{'max diff':>9}")
    dense_per_token = 2 * args.kv_heads * args.head_dim * 4
    most = recent = cache.kept  # the most tokens held: overall, and since the last line
    recent_bytes = cache.memory_bytes
    seconds = dense_seconds = 0.0
    for i in range(args.prompt, args.tokens):
        started = time.perf_counter()
        row = cache.attend(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1])
        seconds += time.perf_counter() - started
        started = time.perf_counter()
        dense_k[:, :, i], dense_v[:, :, i] = k[:, :, i], v[:, :, i]
        F.scaled_dot_product_attention(q[:, :, i:i + 1], dense_k[:, :, :i + 1],
                                       dense_v[:, :, :i + 1], enable_gqa=True)
        dense_seconds += time.perf_counter() - started
        worst = max(worst, (row - full[:, :, i:i + 1]).abs().max().item())
        recent, recent_bytes = max(recent, cache.kept), max(recent_bytes, cache.memory_bytes)
        if (i + 1) % (args.tokens // 8) == 0 or i + 1 == args.tokens:
            print(f"{i + 1:>8,} {recent:>10,} {recent_bytes / 2**20:>10.2f} "
                  f"{(i + 1) * dense_per_token / 2**20:>16.2f} {worst:>9.1e}")
            most, recent, recent_bytes = max(most, recent), 0, 0
    steps = args.tokens - args.prompt
    print(f"decoded {steps:,} tokens one at a time in {seconds:.1f} s "
          f"({1e3 * seconds / steps:.2f} ms per token; a dense cache with SDPA: "
          f"{1e3 * dense_seconds / steps:.2f} ms); the cache held at most {most:,} tokens "
          f"(bound {cache.bound:,}); a dense cache ends at {args.tokens:,}")
    ok = worst < 1e-4 and most <= cache.bound
    print("OK: every decoded row equals the full forward's" if ok else "MISMATCH")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
