"""A LongNet attention layer with its sequence split across ranks, forward and backward, checked
against the same layer in one process.

    torchrun --nproc-per-node 2 examples/distributed_longnet.py       # CPU: gloo
    torchrun --nproc-per-node 4 examples/distributed_longnet.py       # GPUs: NCCL, one per rank

Every rank builds the same layer and input (same seeds), runs the whole sequence in-process for
reference, then its own chunk of N/P tokens through `spattn.distributed.attention`. The parameter
gradients of the chunks are summed over the ranks (all-reduce), as data-parallel training would.
Rank 0 prints each rank's largest difference from the single-process result, the bytes each
rank's attention actually communicated against the plan, and OK.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import spattn
from spattn.distributed import CommCounter, build_plan
from spattn.distributed import attention as distributed_attention

# longnet-lm's schedule with segments divided by 16: at N = 1024 the longer ones span ranks
PATTERN = spattn.Pattern.model_validate({
    "name": "longnet-lm-16", "causal": True,
    "branches": [{"segment": w // 16, "dilation": r}
                 for w, r in [(2048, 1), (4096, 2), (8192, 4), (16384, 6), (32768, 12)]]})


class LongNetAttention(nn.Module):
    """Projections around spattn's attention; `distributed` makes it run on one chunk."""

    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, distributed: bool) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.kv_heads, -1).permute(2, 0, 3, 1, 4)
        if distributed:
            y = distributed_attention(q, k, v, PATTERN)
        else:
            y = spattn.attention(q, k, v, PATTERN, backend="torch")
        return self.out(y.transpose(1, 2).reshape(b, n, -1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    n, chunk = args.seq_len, args.seq_len // world
    mine = slice(rank * chunk, (rank + 1) * chunk)

    torch.manual_seed(0)
    layer = LongNetAttention(args.dim, args.heads, args.kv_heads).double().to(device)
    x = torch.randn(2, n, args.dim, dtype=torch.float64, device=device)
    target = torch.randn_like(x)

    # the whole sequence in this process
    x_full = x.clone().requires_grad_()
    y_full = layer(x_full, distributed=False)
    (y_full * target).sum().backward()
    reference = {name: p.grad.clone() for name, p in layer.named_parameters()}
    layer.zero_grad()

    # this rank's chunk across the ranks
    x_mine = x[:, mine].clone().requires_grad_()
    with CommCounter() as counted:
        y_mine = layer(x_mine, distributed=True)
        (y_mine * target[:, mine]).sum().backward()
    for p in layer.parameters():
        dist.all_reduce(p.grad)  # the loss is the sum of the chunks' losses

    diffs = torch.tensor([
        (y_mine - y_full[:, mine]).abs().max().item(),
        (x_mine.grad - x_full.grad[:, mine]).abs().max().item(),
        max((p.grad - reference[name]).abs().max().item() for name, p in layer.named_parameters()),
        counted.sent(), counted.received()], dtype=torch.float64, device=device)
    every = [torch.zeros_like(diffs) for _ in range(world)]
    dist.all_gather(every, diffs)

    if rank == 0:
        plan = build_plan(PATTERN, n, world, heads=args.heads, kv_heads=args.kv_heads,
                          head_dim=args.dim // args.heads, batch=2, dtype=torch.float64)
        predicted = plan.forward_total().sent_bytes + plan.backward_total().sent_bytes
        places = ", ".join(f"{b.label.removeprefix('dilated ')} "
                           f"{'local' if b.local else f'spans {b.span}'}" for b in plan.branches)
        print(f"{PATTERN.name} over {world} ranks ({dist.get_backend()}), N = {n}, "
              f"{chunk} tokens per rank; {places}")
        for r, row in enumerate(every):
            out, dx, dw, sent, received = row.tolist()
            print(f"rank {r}: max abs diff vs single process: output {out:.1e}, dx {dx:.1e}, "
                  f"dW {dw:.1e}; sent {int(sent):,} B, received {int(received):,} B "
                  f"(plan: {predicted:,} B each way)")
        worst = max(max(row[:3].tolist()) for row in every)
        exact = all(int(row[3]) == int(row[4]) == predicted for row in every)
        if worst < 1e-9 and exact:
            print(f"OK: every rank agrees with the single-process layer (max diff {worst:.1e}) "
                  f"and communicated exactly the bytes the plan predicts")
        else:
            print(f"FAILED: max diff {worst:.1e}, bytes as planned: {exact}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
