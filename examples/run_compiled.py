"""Import a module emitted by `spattn compile` from its file and run it, forward and backward.

    spattn compile longnet-lm -o out/ --head-dim 64
    python examples/run_compiled.py out/longnet_lm.py              # on a GPU: N = 16384
    TRITON_INTERPRET=1 python examples/run_compiled.py out/longnet_lm.py   # on CPU: N = 128

It checks the output and the gradients against the PyTorch backend on the same inputs and prints
what it did. Without a GPU the Triton interpreter runs the kernels (slowly), so N is kept small.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import torch

import spattn
from spattn.compiler.codegen import specialize
from spattn.patterns.loader import builtin_names


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def builtin(fixed: dict) -> spattn.Pattern | None:
    """The built-in pattern the module was compiled from (with its fixed sizes), if it is one."""
    if fixed["name"] not in builtin_names():
        return None
    pattern = specialize(spattn.load_pattern(fixed["name"]), fixed["heads"], fixed["kv_heads"],
                         fixed["head_dim"])
    return pattern if pattern.content_hash() == fixed["hash"] else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("module", type=Path, help="a module written by `spattn compile`")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="default: 16384 on a GPU, 128 under the interpreter")
    parser.add_argument("--heads", type=int, default=None, help="default: the pattern's, else 4")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("no GPU: run with TRITON_INTERPRET=1 to use the Triton interpreter")
    module = load(args.module)
    fixed = module.PATTERN
    device = "cuda" if cuda else "cpu"
    n = args.seq_len or (16384 if cuda else 128)
    heads = args.heads or fixed["heads"] or 4
    kv_heads, dim = fixed["kv_heads"] or heads, fixed["head_dim"] or 64
    gen = torch.Generator().manual_seed(0)
    shapes = [(1, heads, n, dim), (1, kv_heads, n, dim), (1, kv_heads, n, dim)]
    q, k, v = (torch.randn(s, generator=gen).to(device).requires_grad_() for s in shapes)
    grad = torch.randn(q.shape, generator=gen).to(device)

    start = time.perf_counter()
    out = module.attention(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    pattern = builtin(fixed)
    print(f"{args.module}: pattern '{fixed['name']}' (hash {fixed['hash']}), "
          f"{len(fixed['branches'])} branches, N={n} H={heads} Hkv={kv_heads} D={dim} float32 "
          f"on {'the GPU' if cuda else 'the Triton interpreter'}")
    print(f"  forward + backward  {seconds * 1e3:.0f} ms (first call, compile included)")
    if pattern is None:
        print("  (not a built-in pattern: no comparison with the PyTorch backend)")
        return
    want = spattn.attention(q, k, v, pattern, backend="torch")
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    for name, got, ref in zip(("output", "dQ", "dK", "dV"), (out, *grads), (want, *want_grads),
                              strict=True):
        print(f"  {name:<6} max abs difference from the PyTorch backend "
              f"{(got - ref).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
