"""torchscale LongNet configs and checkpoints (spattn.integrations.torchscale)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import spattn
from spattn.integrations.torchscale import (
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
