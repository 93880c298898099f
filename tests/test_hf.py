"""spattn as a Hugging Face transformers attention implementation, on tiny random models
(nothing is downloaded): Llama, Qwen2, Mistral and gpt-oss (attention sinks)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import spattn  # noqa: E402
import spattn.integrations.transformers as spattn_hf  # noqa: E402

TINY = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}

LONGNET_TINY = spattn.Pattern.model_validate({"name": "longnet-tiny", "causal": True,
                                              "branches": [
    {"segment": 8, "dilation": 1}, {"segment": 16, "dilation": 2},
    {"segment": 32, "dilation": 4}]})


def _model(kind: str, dtype=torch.float32):
    torch.manual_seed(0)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY))
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**TINY,
                                                                           sliding_window=None))
    else:
        config = transformers.GptOssConfig(**{**TINY, "intermediate_size": 64}, head_dim=16,
                                           num_local_experts=4, num_experts_per_tok=2,
                                           sliding_window=512,
                                           layer_types=["sliding_attention", "full_attention"])
        model = transformers.GptOssForCausalLM(config)
    return model.to(dtype).eval()


def _batch(n=40, pad=(0, 7)):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (len(pad), n), generator=gen)
    mask = torch.ones(len(pad), n, dtype=torch.long)
    for row, p in enumerate(pad):
        mask[row, :p] = 0  # left padding, as batched generation pads
    return ids, mask


PADDINGS = {  # (left, right) padding per row
    "right-in-some-rows": [(0, 0), (0, 5), (0, 11)],
    "right-in-every-row": [(0, 3), (0, 5), (0, 1)],  # fixed-length or pad-to-multiple batches
    "left": [(0, 0), (7, 0), (1, 0)],
    "mixed": [(4, 0), (0, 6), (2, 3), (0, 0)],
    "one-real-token": [(0, 23), (23, 0), (0, 0)],
}


def _padded_batch(layout, n=24):
    """Random ids and a (B, n) attention_mask with (left, right) padding per row."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, TINY["vocab_size"], (len(layout), n), generator=gen)
    mask = torch.ones(len(layout), n, dtype=torch.long)
    for row, (left, right) in enumerate(layout):
        mask[row, :left] = 0
        mask[row, n - right:] = 0
    return ids, mask


def _logits(model, name, ids, mask, **kwargs):
    model.set_attn_implementation(name)
    with torch.no_grad():
        return model(ids, attention_mask=mask, **kwargs).logits


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_dense_causal_gives_the_logits_of_sdpa(kind):
    model = _model(kind)
    ids, mask = _batch()
    want = _logits(model, "sdpa", ids, mask)
    got = _logits(model, spattn_hf.register("dense-causal"), ids, mask)
    real = mask.bool()  # padding rows are not compared: sdpa gives them arbitrary values
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["left", "right-in-every-row", "mixed"])
def test_gpt_oss_sinks_match_eager(layout):
    """gpt-oss passes its learnable sinks as s_aux; with a window longer than the sequence its
    eager attention is dense causal attention with sinks."""
    model = _model("gpt-oss")
    ids, mask = _padded_batch(PADDINGS[layout])
    want = _logits(model, "eager", ids, mask)
    got = _logits(model, spattn_hf.register("dense-causal"), ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_longnet_generate_is_the_same_with_and_without_the_cache(kind):
    model = _model(kind)
    model.set_attn_implementation(spattn_hf.register(LONGNET_TINY))
    ids, mask = _batch(n=30)
    kwargs = {"attention_mask": mask, "max_new_tokens": 12, "do_sample": False}
    cached = model.generate(ids, use_cache=True, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    if kind == "llama":  # a static cache (unfilled slots at the end) too
        assert torch.equal(model.generate(ids, cache_implementation="static", **kwargs), cached)
        model.set_attn_implementation("sdpa")  # and the pattern really is not dense attention
        assert not torch.equal(model.generate(ids, **kwargs), cached)


def test_training_gradients_match_sdpa_for_dense_causal_and_flow_for_longnet():
    model = _model("llama").train()
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    grads = {}
    for name in ("sdpa", spattn_hf.register("dense-causal")):
        model.zero_grad()
        model.set_attn_implementation(name)
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
    ours, sdpa = grads.values()
    for n in sdpa:
        torch.testing.assert_close(ours[n], sdpa[n], rtol=1e-4, atol=1e-6, msg=n)
    model.set_attn_implementation(spattn_hf.register(LONGNET_TINY))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_bfloat16_runs_and_stays_close_to_sdpa():
    model = _model("qwen2", torch.bfloat16)
    ids, mask = _batch()
    want = _logits(model, "sdpa", ids, mask).float()
    got = _logits(model, spattn_hf.register("dense-causal"), ids, mask).float()
    real = mask.bool()
    assert (got[real] - want[real]).abs().max() < 0.1


def test_names_are_spattn_own():
    for pattern in ("dense-causal", "longnet-lm", LONGNET_TINY,
                    LONGNET_TINY.model_copy(update={"name": "flash-sdpa-like"})):
        name = spattn_hf.register(pattern)
        assert name.startswith("spattn-") and "/" not in name
        assert "sdpa" not in name and "flash" not in name
    changed = LONGNET_TINY.model_copy(update={"causal": False})
    assert spattn_hf.register(changed) != spattn_hf.register(LONGNET_TINY)


def test_calls_it_cannot_serve_are_clear_errors():
    q = torch.randn(1, 4, 8, 16)
    k = torch.randn(1, 2, 8, 16)
    with pytest.raises(spattn.SpattnError, match="2-D"):
        spattn_hf.attention_forward(LONGNET_TINY, q, k, k, torch.ones(1, 1, 8, 8))
    with pytest.raises(spattn.SpattnError, match="dropout"):
        spattn_hf.attention_forward(LONGNET_TINY, q, k, k, None, dropout=0.1)
    with pytest.raises(spattn.SpattnError, match="softcap"):
        spattn_hf.attention_forward(LONGNET_TINY, q, k, k, None, softcap=30.0)
    for shape in [(2, 8), (1, 9), (1, 7)]:  # other rows, more keys than k, fewer than q
        with pytest.raises(spattn.SpattnError, match=r"padding mask must be \(batch=1"):
            spattn_hf.attention_forward(LONGNET_TINY, q, k, k, torch.ones(shape))


def test_packed_position_ids_attend_each_sequence_alone():
    q = torch.randn(1, 4, 12, 16, dtype=torch.float64)
    k = torch.randn(1, 2, 12, 16, dtype=torch.float64)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    out, _ = spattn_hf.attention_forward(LONGNET_TINY, q, k, k, None, position_ids=position_ids)
    want = spattn.attention(q, k, k, LONGNET_TINY, seq_lens=[5, 7]).transpose(1, 2)
    torch.testing.assert_close(out, want)




@pytest.mark.parametrize("layout", PADDINGS)
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_padded_batches_give_the_logits_of_sdpa(kind, layout):
    model = _model(kind)
    ids, mask = _padded_batch(PADDINGS[layout])
    want = _logits(model, "sdpa", ids, mask)
    got = _logits(model, spattn_hf.register("dense-causal"), ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["right-in-every-row", "mixed"])
def test_training_on_padded_batches_gives_the_loss_and_gradients_of_sdpa(layout):
    model = _model("llama").train()
    ids, mask = _padded_batch(PADDINGS[layout])
    labels = ids.masked_fill(mask == 0, -100)
    losses, grads = [], []
    for name in ("sdpa", spattn_hf.register("dense-causal")):
        model.zero_grad()
        model.set_attn_implementation(name)
        loss = model(ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)


def _decode(model, name, ids, mask, new, cache):
    """Teacher-forced decoding: the prompt's logits, then one step per column of `new`."""
    model.set_attn_implementation(name)
    if cache == "static":
        cache = transformers.StaticCache(config=model.config,
                                         max_cache_len=ids.shape[1] + new.shape[1] + 5)
    else:
        cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        steps = [model(ids, attention_mask=mask, cache=cache, use_cache=True).logits]
        for column in new.T:
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            steps.append(model(column[:, None], attention_mask=mask, cache=cache,
                               use_cache=True).logits)
    return steps


@pytest.mark.parametrize("cache", ["static", "dynamic"])
@pytest.mark.parametrize("layout", ["no-mask", "right-in-every-row", "left", "mixed"])
def test_cached_decoding_of_padded_prompts_gives_the_logits_of_sdpa(layout, cache):
    """Decoding after a padded prompt; with a static cache its unfilled slots are dropped,
    and only those (a right-padded prompt's padding stays padding between the new tokens)."""
    model = _model("llama")
    ids, mask = _padded_batch(PADDINGS.get(layout, [(0, 0), (0, 0)]), n=16)
    if layout == "no-mask":
        mask = None
    new = torch.randint(0, TINY["vocab_size"], (len(ids), 4),
                        generator=torch.Generator().manual_seed(3))
    want = _decode(model, "sdpa", ids, mask, new, cache)
    got = _decode(model, spattn_hf.register("dense-causal"), ids, mask, new, cache)
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(got[0][real], want[0][real], rtol=1e-5, atol=1e-5)
    for step, (ours, sdpa) in enumerate(zip(got[1:], want[1:], strict=True)):
        torch.testing.assert_close(ours, sdpa, rtol=1e-5, atol=1e-5, msg=f"step {step}")


def _positions(*pieces):
    return torch.cat([torch.arange(a, b, step) for a, b, step in pieces])


POSITIONS = {  # two rows of 24 positions each
    "gaps-every-other": [_positions((0, 48, 2)), _positions((0, 48, 2))],
    "gap-in-the-middle": [_positions((0, 12, 1), (30, 42, 1)), _positions((0, 4, 1), (10, 30, 1))],
    "restart": [_positions((0, 5, 1), (0, 19, 1)), _positions((0, 5, 1), (0, 19, 1))],
    "restart-per-row": [_positions((0, 9, 1), (0, 6, 1), (0, 9, 1)),
                        _positions((0, 20, 1), (0, 4, 1))],
    "restart-and-gaps": [_positions((0, 10, 2), (0, 19, 1)), _positions((3, 27, 1))],
}


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("mask", ["none", "ones", "right-padded"])
@pytest.mark.parametrize("positions", POSITIONS)
def test_position_ids_give_the_logits_of_sdpa(positions, mask, use_cache):
    """transformers reads packed sequences from position_ids only without an attention_mask
    and a cache (then at every step that is not +1); spattn follows its decision."""
    model = _model("llama")
    ids, padding = _padded_batch([(0, 0), (0, 6)])
    attention_mask = {"none": None, "ones": torch.ones_like(padding),
                      "right-padded": padding}[mask]
    kwargs = {"position_ids": torch.stack(POSITIONS[positions]), "use_cache": use_cache}
    want = _logits(model, "sdpa", ids, attention_mask, **kwargs)
    got = _logits(model, spattn_hf.register("dense-causal"), ids, attention_mask, **kwargs)
    real = (padding if mask == "right-padded" else torch.ones_like(padding)).bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_packed_training_gives_the_gradients_of_sdpa():
    model = _model("llama").train()
    ids, _ = _padded_batch([(0, 0), (0, 0)])
    position_ids = torch.stack(POSITIONS["restart-per-row"])
    grads = []
    for name in ("sdpa", spattn_hf.register("dense-causal")):
        model.zero_grad()
        model.set_attn_implementation(name)
        model(ids, position_ids=position_ids, labels=ids, use_cache=False).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("use_vmap", [False, True])
def test_the_mask_function_reads_transformers_packing(use_vmap):
    from transformers.masking_utils import (
        and_masks,
        causal_mask_function,
        packed_sequence_mask_function,
    )

    packed = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    function = and_masks(causal_mask_function, packed_sequence_mask_function(packed))
    ids = spattn_hf.padding_mask(2, 6, 6, mask_function=function, use_vmap=use_vmap)
    assert torch.equal(ids, packed + 1)
    assert torch.equal(spattn_hf.padding_mask(2, 6, 6, mask_function=causal_mask_function),
                       torch.ones(2, 6, dtype=torch.long))


def _qkv(n=12, nq=None, batch=2):
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(batch, 4, nq or n, 16, dtype=torch.float64, generator=gen)
    k = torch.randn(batch, 2, n, 16, dtype=torch.float64, generator=gen)
    return q, k, torch.randn(batch, 2, n, 16, dtype=torch.float64, generator=gen)


@pytest.mark.parametrize("positions", [[0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22],
                                       [0, 1, 2, 3, 10, 11, 12, 13, 14, 15, 16, 17],
                                       [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]])
def test_positions_that_grow_with_gaps_are_one_sequence(positions):
    q, k, v = _qkv()
    out, _ = spattn_hf.attention_forward(LONGNET_TINY, q, k, v, None,
                                         position_ids=torch.tensor([positions]))
    torch.testing.assert_close(out, spattn.attention(q, k, v, LONGNET_TINY).transpose(1, 2))


def test_each_row_restarts_its_own_way():
    q, k, v = _qkv()
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8],
                                 [0, 2, 4, 6, 8, 1, 3, 5, 0, 1, 2, 3]])
    out, _ = spattn_hf.attention_forward(LONGNET_TINY, q, k, v, None, position_ids=position_ids)
    for row, lens in enumerate([[3, 9], [5, 3, 4]]):
        want = spattn.attention(q[row:row + 1], k[row:row + 1], v[row:row + 1], LONGNET_TINY,
                                seq_lens=lens)
        torch.testing.assert_close(out[row:row + 1], want.transpose(1, 2))


def test_a_mask_shorter_than_the_keys_drops_the_unfilled_cache_slots():
    q, k, v = _qkv(n=12, nq=2)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :3] = False  # left padding in row 1; slots 9.. are unfilled in both rows
    out, _ = spattn_hf.attention_forward(LONGNET_TINY, q, k, v, mask)
    want = [spattn.attention(q[:1], k[:1, :, :9], v[:1, :, :9], LONGNET_TINY),
            spattn.attention(q[1:], k[1:, :, 3:9], v[1:, :, 3:9], LONGNET_TINY)]
    torch.testing.assert_close(out, torch.cat(want).transpose(1, 2))
    full, _ = spattn_hf.attention_forward(LONGNET_TINY, q, k, v, torch.ones(2, 12))
    torch.testing.assert_close(full, spattn.attention(q, k, v, LONGNET_TINY).transpose(1, 2))
