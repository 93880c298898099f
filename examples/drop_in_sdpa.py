"""spattn.attention as a drop-in for scaled_dot_product_attention in a small attention layer.

    python examples/drop_in_sdpa.py

Builds one causal self-attention layer, runs it with dense SDPA and with the built-in
`longnet-lm` pattern scaled down to this sequence, and trains both for a few steps on random data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import spattn

# longnet-lm's schedule, segments divided by 64 so that 512 tokens cover several of them
PATTERN = spattn.Pattern.model_validate({
    "name": "longnet-lm-small", "causal": True,
    "branches": [{"segment": w // 64, "dilation": r}
                 for w, r in [(2048, 1), (4096, 2), (8192, 4), (16384, 6), (32768, 12)]]})


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, sparse: bool) -> None:
        super().__init__()
        self.heads, self.sparse = heads, sparse
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        if self.sparse:
            y = spattn.attention(q, k, v, PATTERN)  # the only line that changes
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, n, -1))


def main() -> None:
    torch.manual_seed(0)
    x, target = torch.randn(2, 512, 64), torch.randn(2, 512, 64)
    for sparse in (False, True):
        torch.manual_seed(1)
        layer = SelfAttention(64, heads=4, sparse=sparse)
        opt = torch.optim.Adam(layer.parameters(), lr=3e-3)
        losses = []
        for _ in range(30):
            loss = F.mse_loss(layer(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        name = "spattn longnet-lm/64" if sparse else "dense SDPA          "
        print(f"{name}  loss {losses[0]:.4f} -> {losses[-1]:.4f} in {len(losses)} steps")


if __name__ == "__main__":
    main()
