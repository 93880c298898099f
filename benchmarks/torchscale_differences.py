"""Where torchscale's LongNet code differs from the paper, measured against spattn.

    python benchmarks/torchscale_differences.py

`torchscale_like` below re-states, in plain PyTorch, what torchscale's DilatedAttention forward
does (its `gathering`, `dense_to_sparse`, `sparse_to_dense` and `scattering`): the sequence is
zero-padded to a multiple of each segment length, each segment is zero-padded to a multiple of
its dilation before the rows are picked, the outputs are laid back at the padded positions and
cut to N, and the branches are mixed with weights computed under no_grad. spattn computes the
paper's definition (docs/semantics.md). On inputs where none of that matters the two agree to
rounding, which checks the re-statement; the other rows of the table show what each difference
does. Writes benchmarks/results/torchscale_differences.md.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

import spattn
from spattn.integrations.torchscale import pattern_from_config

RESULTS = Path(__file__).parent / "results" / "torchscale_differences.md"


def _attend(q, k, v, causal: bool):
    """(..., M, D) attention with its log-sum-exp, causal top-left as flash-attn does it."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        m = scores.shape[-1]
        scores = scores.masked_fill(torch.ones(m, m, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, -1) @ v, torch.logsumexp(scores, -1)


def torchscale_like(q, k, v, segments, ratios, causal: bool):
    """q, k, v (B, N, H, D) -> (B, N, H, D) as torchscale's DilatedAttention computes it."""
    b, n, heads, d = q.shape
    outs, lses = [], []
    for w, r in zip(segments, ratios, strict=True):
        w = min(w, n)
        nseg = -(-n // w)
        g = w + (-w) % r  # torchscale pads each segment to a multiple of r
        per = -(-heads // r)  # heads per offset: the blocked rule
        out = torch.zeros(b, nseg, g, heads, d, dtype=q.dtype)
        lse = torch.full((b, nseg, g, heads), -1e8, dtype=q.dtype)
        x = [F.pad(t, (0, 0, 0, 0, 0, nseg * w - n)).view(b, nseg, w, heads, d) for t in (q, k, v)]
        x = [F.pad(t, (0, 0, 0, 0, 0, g - w)) for t in x]  # zero rows, attended like any other
        for h in range(heads):
            rows = torch.arange(h // per, g, r)
            o, s = _attend(*(t[:, :, rows, h] for t in x), causal)
            out[:, :, rows, h], lse[:, :, rows, h] = o, s
        lse = lse.masked_fill(lse == 0, -1e8)
        # laid back at padded positions (segment j's rows start at j*g, not j*w), cut to N
        outs.append(out.reshape(b, nseg * g, heads, d)[:, :n])
        lses.append(lse.reshape(b, nseg * g, heads)[:, :n])
    with torch.no_grad():  # torchscale mixes the branches with detached weights
        weights = torch.softmax(torch.stack(lses), 0)
    return sum(wt.unsqueeze(-1) * o for wt, o in zip(weights, outs, strict=True))


CASES = [  # (what, segments, ratios, N, causal)
    ("N a multiple of every w, w of r (causal)", [16, 32, 64], [1, 2, 4], 128, True),
    ("N a multiple of every w, w of r (non-causal)", [16, 32, 64], [1, 2, 4], 128, False),
    ("N not a multiple of w, causal", [16, 32, 64], [1, 2, 4], 100, True),
    ("N not a multiple of w, non-causal: zero keys attended", [16, 32, 64], [1, 2, 4], 100,
     False),
    ("w not a multiple of r: rows shifted", [12, 24, 48], [1, 5, 7], 96, True),
    ("LongNet-lm schedule / 64 (w = 256, 512 not multiples of r = 6, 12), N = 512, causal",
     [32, 64, 128, 256, 512], [1, 2, 4, 6, 12], 512, True),
    ("the same, N = 500, non-causal", [32, 64, 128, 256, 512],
     [1, 2, 4, 6, 12], 500, False),
]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def main() -> None:
    rows = []
    for what, segments, ratios, n, causal in CASES:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, n, 8, 16, generator=gen, dtype=torch.float64,
                               requires_grad=True) for _ in range(3))
        pattern = pattern_from_config(segments, ratios, causal=causal)
        ours = spattn.attention(q, k, v, pattern, layout="bnhd")
        theirs = torchscale_like(q, k, v, segments, ratios, causal)
        grad = torch.randn(ours.shape, generator=gen, dtype=torch.float64)
        g_ours = torch.autograd.grad(ours, (q, k, v), grad)
        g_theirs = torch.autograd.grad(theirs, (q, k, v), grad)
        rows.append((what, relative(theirs, ours), float((theirs - ours).detach().abs().max()),
                     *(relative(a, b) for a, b in zip(g_theirs, g_ours, strict=True))))
    lines = ["| case | output rel. error | output max abs | dQ rel. error | dK rel. error | "
             "dV rel. error |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {what} | {o:.2e} | {m:.2e} | {dq:.2e} | {dk:.2e} | {dv:.2e} |"
              for what, o, m, dq, dk, dv in rows]
    table = "\n".join(lines)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("torchscale's DilatedAttention (re-stated in "
                       "benchmarks/torchscale_differences.py) against spattn, float64, B=2, "
                       "H=8, D=16, unit-normal q, k, v; relative errors are ||a - b|| / ||b||.\n\n"
                       + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
