"""How accurate attention is with each float32 `tl.dot` mode the generated kernels offer
(SPATTN_FP32_DOT), by emulating the modes in PyTorch on CPU.

    python benchmarks/fp32_dot_accuracy.py

"tf32" rounds both operands to TF32 (10 mantissa bits) for one tensor-core product; "tf32x3"
splits each operand into a TF32 part and a TF32 remainder and adds three products (big*big,
big*small, small*big), as triton does; "ieee" is a float32 product. The error is the largest
absolute difference from float64 attention on unit-normal inputs (the Triton interpreter ignores
the mode, so this is measured by emulation; a GPU run confirms it). Writes
benchmarks/results/fp32_dot_accuracy.md.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "fp32_dot_accuracy.md"


def to_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 rounded to nearest with a 10-bit mantissa (TF32)."""
    bits = x.contiguous().view(torch.int32)
    rounded = (bits + 0x1000) & ~0x1FFF
    return rounded.view(torch.float32)


def dot(a: torch.Tensor, b: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "ieee":
        return a @ b
    big_a, big_b = to_tf32(a), to_tf32(b)
    if mode == "tf32":
        return big_a @ big_b
    small_a, small_b = to_tf32(a - big_a), to_tf32(b - big_b)
    return big_a @ small_b + small_a @ big_b + big_a @ big_b


def attention(q, k, v, mode: str) -> torch.Tensor:
    scores = dot(q, k.transpose(-1, -2), mode) / math.sqrt(q.shape[-1])
    p = torch.softmax(scores, -1)
    return dot(p, v, mode)


def main() -> None:
    rows = []
    for n, d in ((1024, 64), (4096, 64), (4096, 128)):
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, n, d, generator=gen) for _ in range(3))
        want = attention(q.double(), k.double(), v.double(), "ieee")
        errors = [float((attention(q, k, v, m).double() - want).abs().max())
                  for m in ("ieee", "tf32x3", "tf32")]
        rows.append(f"| {n:,} | {d} | {errors[0]:.1e} | {errors[1]:.1e} | {errors[2]:.1e} |")
    table = "\n".join(["| N | D | ieee | tf32x3 (default) | tf32 |", "|---:|---:|---:|---:|---:|",
                       *rows])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("Largest absolute error of dense attention against float64, float32 "
                       "unit-normal inputs, each `tl.dot` mode emulated on CPU "
                       "(benchmarks/fp32_dot_accuracy.py).\n\n" + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
