"""The quickstart's pattern in a model: spattn.attention, the modules, and a check of a few rows.

    python examples/quickstart_model.py
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

import spattn

PATTERN = spattn.load_pattern(Path(__file__).with_name("quickstart.yaml"))


def main() -> None:
    torch.manual_seed(0)
    q = torch.randn(1, 8, 16384, 64, requires_grad=True)  # (B, H, N, D)
    k = torch.randn(1, 2, 16384, 64, requires_grad=True)  # (B, Hkv, N, D): grouped-query
    v = torch.randn(1, 2, 16384, 64, requires_grad=True)
    start = time.perf_counter()
    out = spattn.attention(q, k, v, PATTERN)  # like scaled_dot_product_attention
    out.sum().backward()  # exact gradients, branch mixing included
    took = time.perf_counter() - start
    print(f"spattn.attention: {tuple(out.shape)} forward + backward in {took:.2f} s on "
          f"{torch.get_num_threads()} CPU threads; dq finite: {bool(q.grad.isfinite().all())}")

    last = spattn.attention(q[:, :, -16:], k, v, PATTERN)  # the last 16 queries (a KV cache)
    print(f"16 queries against 16,384 keys equal the full forward's last rows: "
          f"{torch.allclose(last, out[:, :, -16:], atol=1e-5)}")

    mha = spattn.MultiheadDilatedAttention(embed_dim=512, num_heads=8, pattern=PATTERN,
                                           kv_heads=2, sinks=True)
    x = torch.randn(2, 4096, 512)
    print(f"MultiheadDilatedAttention(512, 8, kv_heads=2, sinks=True): {tuple(x.shape)} -> "
          f"{tuple(mha(x).shape)}, {sum(p.numel() for p in mha.parameters()):,} parameters")


if __name__ == "__main__":
    main()
