"""Fine-tune a tiny random Llama with a LongNet pattern as its attention, on CPU, and generate.

    python examples/finetune_hf_llama.py [--steps 60]

The model is built from a config (nothing is downloaded). The data repeats a random block of
`--period` tokens, so after the first block every token can be predicted by attending `period`
positions back: through the pattern's dilated branches, since a local window of 16 alone does
not always reach. The script prints the loss as it trains (scored after the first block), then
checks that greedy generation gives the same tokens with and without the KV cache and how many
generated tokens continue the period correctly.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import spattn
import spattn.integrations.transformers as spattn_hf

PATTERN = spattn.Pattern.model_validate({
    "name": "longnet-tiny", "causal": True,
    "branches": [{"segment": 16, "dilation": 1}, {"segment": 32, "dilation": 2},
                 {"segment": 64, "dilation": 4}],
})


def periodic_batch(batch: int, period: int, length: int, vocab: int, gen: torch.Generator
                   ) -> torch.Tensor:
    block = torch.randint(0, vocab, (batch, period), generator=gen)
    return block.repeat(1, -(-length // period))[:, :length]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="training steps (default 100)")
    parser.add_argument("--period", type=int, default=12, help="block length (default 12)")
    parser.add_argument("--length", type=int, default=64, help="sequence length (default 64)")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256)
    name = spattn_hf.register(PATTERN)
    model = LlamaForCausalLM(config)
    model.set_attn_implementation(name)
    print(f"attn_implementation={name!r}: {PATTERN.name}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters")

    gen = torch.Generator().manual_seed(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    model.train()
    for step in range(1, args.steps + 1):
        ids = periodic_batch(16, args.period, args.length, config.vocab_size, gen)
        labels = ids.clone()
        labels[:, : args.period] = -100  # the first block cannot be predicted
        loss = model(ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 1 or step % 10 == 0:
            print(f"step {step:3d}  loss {loss.item():.3f}")
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f} s")

    model.eval()
    whole = periodic_batch(4, args.period, args.length, config.vocab_size, gen)
    prompt, rest = whole[:, : 2 * args.period], whole[:, 2 * args.period:]
    kwargs = {"max_new_tokens": rest.shape[1], "do_sample": False, "pad_token_id": 0,
              "attention_mask": torch.ones_like(prompt)}
    cached = model.generate(prompt, use_cache=True, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    right = cached[:, prompt.shape[1]:] == rest
    print(f"generate: same tokens with and without the KV cache: {torch.equal(cached, uncached)}"
          f"; {int(right.sum())}/{right.numel()} generated tokens continue the period")


if __name__ == "__main__":
    main()
