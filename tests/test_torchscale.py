"""torchscale LongNet configs and checkpoints (spattn.integrations.torchscale)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import spattn
from spattn.integrations.torchscale import (
    TorchscaleError,
    convert_state_dict,
    from_torchscale,
    parse_int_list,
    pattern_from_config,
)


@pytest.mark.parametrize("text,values", [
    ("[2048,4096,8192]", [2048, 4096, 8192]), (" [ 1, 2 ,4, ] ", [1, 2, 4]), ("(3,)", [3]),
    ([16, 32], [16, 32]), ((5,), [5]),
])
def test_config_lists_parse(text, values):
    assert parse_int_list(text, "segment_length") == values


@pytest.mark.parametrize("text", [
    "__import__('os').system('true')", "[2048, 4096] + [1]", "[2048.0]", "[-1]", "[]", "",
    "[" + "1," * 5000 + "1]", "[[1]]", 2048, [1.5], [True], None,
])
def test_anything_but_a_list_of_integers_is_refused(text):
    with pytest.raises(spattn.SpattnError):
        pattern_from_config(text, "[1]", causal=True)


def test_pattern_from_config_is_blocked_dilated_branches():
    pattern = pattern_from_config("[2048,4096]", "[1,2]", causal=True)
    assert pattern.head_offsets == "blocked" and pattern.causal and pattern.overlap == "multiset"
    assert [(b.segment, b.dilation) for b in pattern.branches] == [(2048, 1), (4096, 2)]
    with pytest.raises(spattn.SpattnError, match="one entry per branch"):
        pattern_from_config("[2048,4096]", "[1]", causal=False)
    with pytest.raises(spattn.SpattnError, match="segment"):
        pattern_from_config("[0]", "[1]", causal=False)


def _torchscale_state_dict(embed=32, subln=True, multiway=False, prefix="layer.self_attn."):
    gen = torch.Generator().manual_seed(0)
    names = ["k_proj", "v_proj", "q_proj", "out_proj"] + (["inner_attn_ln"] if subln else [])
    state = {}
    for name in names:
        for copy in (("A.", "B.") if multiway else ("",)):
            shape = (embed,) if name == "inner_attn_ln" else (embed, embed)
            state[f"{prefix}{name}.{copy}weight"] = torch.randn(*shape, generator=gen)
            state[f"{prefix}{name}.{copy}bias"] = torch.randn(embed, generator=gen)
    state["layer.ffn.fc1.weight"] = torch.randn(4, 4)  # other layers' parameters are skipped
    return state


def test_state_dict_loads_and_computes_projections_pattern_and_subln():
    state = _torchscale_state_dict()
    layer = from_torchscale(state, prefix="layer.self_attn.", num_heads=4,
                            segment_length="[8,16]", dilated_ratio="[1,2]", causal=True)
    x = torch.randn(2, 24, 32)
    p = {k.removeprefix("layer.self_attn."): v for k, v in state.items()}

    def proj(name, t):
        return F.linear(t, p[f"{name}.weight"], p[f"{name}.bias"])

    q, k, v = (proj(n, x).view(2, 24, 4, 8) for n in ("q_proj", "k_proj", "v_proj"))
    attn = spattn.attention(q, k, v, pattern_from_config("[8,16]", "[1,2]", causal=True),
                            layout="bnhd").reshape(2, 24, 32)
    attn = F.layer_norm(attn, (32,), p["inner_attn_ln.weight"], p["inner_attn_ln.bias"])
    torch.testing.assert_close(layer(x), proj("out_proj", attn))


def test_multiway_copies_and_unsupported_parameters():
    state = _torchscale_state_dict(multiway=True, subln=False, prefix="")
    state.pop("layer.ffn.fc1.weight")
    with pytest.raises(spattn.SpattnError, match="multiway"):
        convert_state_dict(state)
    b = convert_state_dict(state, multiway="B")
    assert torch.equal(b["q_proj.weight"], state["q_proj.B.weight"]) and len(b) == 8
    layer = from_torchscale(state, num_heads=2, segment_length=[8], dilated_ratio=[2],
                            causal=False, multiway="A")
    assert layer.inner_attn_ln is None and torch.equal(layer.k_proj.bias, state["k_proj.A.bias"])
    with pytest.raises(spattn.SpattnError, match="xPos"):
        convert_state_dict({"xpos.scale": torch.ones(4)})
    with pytest.raises(spattn.SpattnError, match="no torchscale attention parameters"):
        convert_state_dict(state, prefix="decoder.")


LINEAR = ["q_proj", "k_proj", "v_proj", "out_proj"]
PARAMS = [f"{p}.{w}" for p in LINEAR + ["inner_attn_ln"] for w in ("weight", "bias")]


def _load(state, multiway=None, prefix="layer.self_attn."):
    return from_torchscale(state, prefix=prefix, num_heads=4, segment_length="[8]",
                           dilated_ratio="[1]", causal=True, multiway=multiway)


@pytest.fixture
def no_copy(monkeypatch):
    """Fails a test that reaches load_state_dict: a bad checkpoint is refused before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("load_state_dict was called on a checkpoint that should be refused")
    monkeypatch.setattr(spattn.MultiheadDilatedAttention, "load_state_dict", refuse)


def _variants(multiway):
    """(state, multiway, prefix, the key its copy uses) for a plain and a multiway layer."""
    if multiway:
        state = _torchscale_state_dict(multiway=True, prefix="enc.")
        return state, "B", "enc.", lambda name: "enc." + name.replace(".", ".B.")
    return _torchscale_state_dict(), None, "layer.self_attn.", lambda n: f"layer.self_attn.{n}"


@pytest.mark.parametrize("multiway", [False, True])
@pytest.mark.parametrize("name", PARAMS)
def test_a_missing_parameter_is_named(name, multiway, no_copy):
    state, copy, prefix, key = _variants(multiway)
    del state[key(name)]
    if name.endswith("bias") and not name.startswith("inner"):
        match = rf"biases on .* only: .*missing {key(name)}"
    else:
        shape = r"\(embed_dim, embed_dim\)" if name == "q_proj.weight" else r"\(32(, 32)?,?\)"
        match = rf"no {key(name)} in the state dict \(expected shape {shape}\)"
    with pytest.raises(TorchscaleError, match=match):
        _load(state, copy, prefix)


@pytest.mark.parametrize("multiway", [False, True])
@pytest.mark.parametrize("name", PARAMS)
def test_a_wrongly_shaped_parameter_is_named_with_both_shapes(name, multiway, no_copy):
    state, copy, prefix, key = _variants(multiway)
    shape = tuple(state[key(name)].shape)
    bad = (shape[0], 16) if len(shape) == 2 else (33,)
    state[key(name)] = torch.zeros(bad)
    expected = r"\(embed_dim, embed_dim\)" if name == "q_proj.weight" else re.escape(str(shape))
    with pytest.raises(TorchscaleError,
                       match=rf"{key(name)}: expected shape {expected}.*got {re.escape(str(bad))}"):
        _load(state, copy, prefix)


@pytest.mark.parametrize("shape", [(32,), (32, 32, 1), (16, 32), ()])
def test_a_q_proj_weight_that_is_not_square_is_refused(shape, no_copy):
    state = _torchscale_state_dict()
    state["layer.self_attn.q_proj.weight"] = torch.zeros(shape)
    with pytest.raises(TorchscaleError, match=rf"q_proj.weight: expected shape \(embed_dim, "
                                              rf"embed_dim\), got {re.escape(str(shape))}"):
        _load(state)


@pytest.mark.parametrize("biased", [["q_proj"], ["k_proj", "out_proj"], LINEAR[1:]])
def test_biases_on_only_some_projections_are_refused(biased, no_copy):
    state = _torchscale_state_dict()
    for name in LINEAR:
        if name not in biased:
            del state[f"layer.self_attn.{name}.bias"]
    missing = [f"layer.self_attn.{n}.bias" for n in LINEAR if n not in biased]
    with pytest.raises(TorchscaleError,
                       match=rf"biases on {', '.join(biased)} only: .*{', '.join(missing)}"):
        _load(state)


@pytest.mark.parametrize("value", [[1.0] * 32, torch.zeros(32, dtype=torch.long), None])
def test_a_value_that_is_not_a_float_tensor_is_named(value, no_copy):
    state = _torchscale_state_dict()
    state["layer.self_attn.v_proj.bias"] = value
    with pytest.raises(TorchscaleError, match="v_proj.bias: expected a floating-point tensor"):
        _load(state)


@pytest.mark.parametrize("key", ["q_proj.weight_g", "out_proj", "k_proj.A.B.weight",
                                 "inner_attn_ln.running_mean"])
def test_an_unknown_parameter_is_named(key, no_copy):
    state = _torchscale_state_dict()
    state[f"layer.self_attn.{key}"] = torch.zeros(32)
    with pytest.raises(TorchscaleError, match=rf"{re.escape(key)}: not a parameter"):
        _load(state)


def test_without_biases_or_subln_it_loads():
    state = {k: v for k, v in _torchscale_state_dict(subln=False).items()
             if not k.endswith("bias")}
    layer = _load(state)
    assert layer.q_proj.bias is None and layer.inner_attn_ln is None
    assert torch.equal(layer.out_proj.weight, state["layer.self_attn.out_proj.weight"])
