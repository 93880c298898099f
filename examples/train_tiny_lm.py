"""Train a tiny byte-level causal language model whose attention is LongNet dilated attention.

    python examples/train_tiny_lm.py                      # CPU: about 3-4 minutes on 2 cores
    python examples/train_tiny_lm.py --steps 50 --batch 4 # a quick look

The model is a small pre-norm transformer (token and position embeddings, `--layers` blocks of
`spattn.MultiheadDilatedAttention` + a GELU MLP, a tied output head) over bytes (vocabulary 256).
Its attention pattern is LongNet's schedule scaled to the context: for context 512, segments
64/128/256/512 with dilations 1/2/4/8, causal.

It trains on text this repository ships: every *.md file under the repository root, the
built-in pattern library (spattn/patterns/library/*.yaml) and the package's Python sources
(spattn/**/*.py). The last 10% of every file is held out for validation. Train and validation
losses (nats per byte) are measured on fixed batches at the start and at the end; a line is
printed every --log-every steps. The same script runs on a GPU unchanged (--device auto picks
CUDA when there is one). On CPU, a run is deterministic for a given --seed.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import spattn
from spattn import MultiheadDilatedAttention

ROOT = Path(__file__).resolve().parents[1]


def corpus_files(root: Path = ROOT) -> list[Path]:
    """The repository's own text: markdown, pattern YAML and the package sources, sorted."""
    markdown = [p for p in root.rglob("*.md")
                if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    yaml = (root / "spattn" / "patterns" / "library").glob("*.yaml")
    python = (root / "spattn").rglob("*.py")
    return sorted(set(markdown) | set(yaml) | set(python))


def load_corpus(val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(train bytes, validation bytes, number of files): the last `val_fraction` of each file is
    validation, so both splits mix prose, YAML and code."""
    train, val = bytearray(), bytearray()
    files = corpus_files()
    for path in files:
        data = path.read_bytes()
        cut = int(len(data) * (1 - val_fraction))
        train += data[:cut]
        val += data[cut:]
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8).long()  # noqa: E731
    return as_tensor(train), as_tensor(val), len(files)


def longnet_pattern(context: int) -> spattn.Pattern:
    """LongNet's geometric schedule scaled to `context`: segments context/8 .. context, dilation
    doubling from 1 (for 512: 64/1, 128/2, 256/4, 512/8), causal."""
    branches, segment, dilation = [], max(context // 8, 1), 1
    while True:
        branches.append({"segment": segment, "dilation": dilation})
        if segment >= context:
            break
        segment, dilation = min(2 * segment, context), 2 * dilation
    return spattn.Pattern.model_validate({
        "name": f"longnet-tiny-{context}", "causal": True, "branches": branches})


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, dim: int, heads: int, pattern: spattn.Pattern,
                 backend: str | None = None) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = MultiheadDilatedAttention(dim, heads, pattern, backend=backend)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, cache: spattn.KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache=cache)
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, context: int, dim: int, heads: int, layers: int,
                 pattern: spattn.Pattern, vocab: int = 256, backend: str | None = None) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, pattern, backend) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, idx: torch.Tensor, caches: list[spattn.KVCache] | None = None,
                start: int = 0) -> torch.Tensor:
        """Logits of the tokens `idx` at positions start, start + 1, ...; with one KVCache per
        layer, `idx` continues the sequence those caches have seen."""
        x = self.tok(idx) + self.pos(torch.arange(start, start + idx.shape[1], device=idx.device))
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return self.head(self.ln(x))


@torch.no_grad()
def generate(model: TinyLM, prompt: torch.Tensor, count: int, temperature: float = 0.7,
             seed: int = 0) -> tuple[list[int], float]:
    """Sample `count` bytes after `prompt` (1-D), one KVCache per layer. Returns the bytes and
    the largest difference between the decoded logits and those of a full forward."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    caches = [block.attn.new_cache() for block in model.blocks]
    logits = [model(prompt[None], caches)[0, -1]]
    tokens = prompt.tolist()
    for _ in range(count):
        probs = torch.softmax(logits[-1].float().cpu() / temperature, dim=-1)
        tokens.append(int(torch.multinomial(probs, 1, generator=gen)))
        logits.append(model(torch.tensor([[tokens[-1]]], device=prompt.device), caches,
                            start=len(tokens) - 1)[0, -1])
    full = model(torch.tensor([tokens], device=prompt.device))[0, len(prompt) - 1:]
    model.train()
    return tokens[len(prompt):], (torch.stack(logits) - full).abs().max().item()


def batch(data: torch.Tensor, starts: torch.Tensor, context: int,
          device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.stack([data[s:s + context + 1] for s in starts.tolist()])
    return rows[:, :-1].to(device), rows[:, 1:].to(device)


@torch.no_grad()
def evaluate(model: nn.Module, data: torch.Tensor, starts: torch.Tensor, context: int,
             device: torch.device, batch_size: int) -> float:
    """Mean cross-entropy (nats per byte) over the windows starting at `starts`."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        x, y = batch(data, starts[i:i + batch_size], context, device)
        logits = model(x)
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train()
    return total / count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps")
    parser.add_argument("--context", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks")
    parser.add_argument("--dim", type=int, default=128, help="model width")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda...")
    parser.add_argument("--backend", default=None,
                        help="spattn backend (torch, triton); default: chosen automatically")
    parser.add_argument("--log-every", type=int, default=50, help="print every N steps")
    parser.add_argument("--eval-windows", type=int, default=48,
                        help="windows of --context bytes in each fixed evaluation set")
    parser.add_argument("--generate", type=int, default=300,
                        help="bytes to generate at the end, after a prompt from held-out text")
    args = parser.parse_args(argv)
    t_start = time.perf_counter()

    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.manual_seed(args.seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    train, val, n_files = load_corpus()
    if min(len(train), len(val)) <= args.context:
        raise SystemExit(f"the corpus is too small for --context {args.context}")
    pattern = longnet_pattern(args.context)
    model = TinyLM(args.context, args.dim, args.heads, args.layers, pattern,
                   backend=args.backend).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    branches = ", ".join(f"{b.segment}/{b.dilation}" for b in pattern.branches)
    print(f"corpus: {n_files} files of this repository, {len(train):,} train bytes, "
          f"{len(val):,} validation bytes")
    print(f"model: {args.layers} layers, d_model {args.dim}, {args.heads} heads, "
          f"{n_params:,} parameters; pattern {pattern.name} (segment/dilation {branches}, "
          f"causal); device {device}, {torch.get_num_threads()} CPU threads")

    gen = torch.Generator().manual_seed(args.seed)
    fixed = torch.Generator().manual_seed(args.seed + 1)
    train_eval = torch.randint(0, len(train) - args.context, (args.eval_windows,), generator=fixed)
    val_windows = (len(val) - 1) // args.context  # non-overlapping, evenly spread
    val_eval = torch.linspace(0, len(val) - args.context - 1,
                              min(args.eval_windows, max(val_windows, 1))).long()

    def losses() -> tuple[float, float]:
        return (evaluate(model, train, train_eval, args.context, device, args.batch),
                evaluate(model, val, val_eval, args.context, device, args.batch))

    start_train, start_val = losses()
    print(f"start: train loss {start_train:.4f}, val loss {start_val:.4f} "
          f"(ln 256 = {math.log(256):.4f})")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                            weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))))
    t0 = t_log = time.perf_counter()
    tokens_since, running = 0, None
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, len(train) - args.context, (args.batch,), generator=gen)
        x, y = batch(train, starts, args.context, device)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        tokens_since += y.numel()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if step % args.log_every == 0 or step == args.steps:
            now = time.perf_counter()
            print(f"step {step:5d}/{args.steps}  train loss {loss.item():.4f} "
                  f"(avg {running:.4f})  lr {sched.get_last_lr()[0]:.2e}  "
                  f"{tokens_since / (now - t_log):,.0f} tokens/s  {now - t0:6.1f} s", flush=True)
            t_log, tokens_since = now, 0
    train_time = time.perf_counter() - t0

    end_train, end_val = losses()
    wall = time.perf_counter() - t_start
    print(f"end: train loss {end_train:.4f}, val loss {end_val:.4f}")
    print(f"summary: train loss {start_train:.4f} -> {end_train:.4f}, val loss {start_val:.4f} "
          f"-> {end_val:.4f}, {args.steps} steps, {args.steps * args.batch * args.context:,} "
          f"tokens, {train_time:.1f} s training, {wall:.1f} s wall (with data and evaluation)")
    count = min(args.generate, args.context - 48)
    if count > 0:
        line = int((val[:-48] == ord("\n")).nonzero()[0]) + 1  # a prompt from a line start
        prompt = val[line:line + 48].to(device)
        started = time.perf_counter()
        tokens, diff = generate(model, prompt, count, seed=args.seed)
        seconds = time.perf_counter() - started
        text = bytes(tokens).decode("utf-8", errors="replace")
        print(f"generated {count} bytes (temperature 0.7) with a KVCache per layer in "
              f"{seconds:.1f} s (logits within {diff:.1e} of a full forward); prompt|continuation:")
        print(bytes(prompt.tolist()).decode("utf-8", errors="replace") + "|" + text)


if __name__ == "__main__":
    main()
