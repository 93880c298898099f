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


def _logits(model, name, ids, mask):
    model.set_attn_implementation(name)
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_dense_causal_gives_the_logits_of_sdpa(kind):
    model = _model(kind)
    ids, mask = _batch()
    want = _logits(model, "sdpa", ids, mask)
    got = _logits(model, spattn_hf.register("dense-causal"), ids, mask)
    real = mask.bool()  # padding rows are not compared: sdpa gives them arbitrary values
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_gpt_oss_sinks_match_eager():
    """gpt-oss passes its learnable sinks as s_aux; with a window longer than the sequence its
    eager attention is dense causal attention with sinks."""
    model = _model("gpt-oss")
    ids, mask = _batch()
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


def test_packed_position_ids_attend_each_sequence_alone():
    q = torch.randn(1, 4, 12, 16, dtype=torch.float64)
    k = torch.randn(1, 2, 12, 16, dtype=torch.float64)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    out, _ = spattn_hf.attention_forward(LONGNET_TINY, q, k, k, None, position_ids=position_ids)
    want = spattn.attention(q, k, k, LONGNET_TINY, seq_lens=[5, 7]).transpose(1, 2)
    torch.testing.assert_close(out, want)
