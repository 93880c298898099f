"""spattn.modules: DilatedAttention and MultiheadDilatedAttention against spattn.attention and
against a dense SDPA reference built from the same weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import spattn
from spattn.errors import PatternError, SpattnError
from spattn.modules import DilatedAttention, ModuleError, MultiheadDilatedAttention

SMALL_LONGNET = spattn.Pattern.model_validate({
    "name": "small-longnet", "causal": True,
    "branches": [{"segment": 8, "dilation": 1}, {"segment": 16, "dilation": 2},
                 {"segment": 32, "dilation": 4}]})


def _sdpa_reference(m: MultiheadDilatedAttention, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor) -> torch.Tensor:
    """The module's computation written with F.linear and dense causal SDPA."""
    b, n, e = query.shape
    h, hkv, d = m.num_heads, m.kv_heads, m.head_dim
    q = F.linear(query, m.q_proj.weight, m.q_proj.bias).view(b, n, h, d).transpose(1, 2)
    k = F.linear(key, m.k_proj.weight, m.k_proj.bias).view(b, n, hkv, d).transpose(1, 2)
    v = F.linear(value, m.v_proj.weight, m.v_proj.bias).view(b, n, hkv, d).transpose(1, 2)
    k, v = (t.repeat_interleave(h // hkv, dim=1) for t in (k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.linear(out.transpose(1, 2).reshape(b, n, e), m.out_proj.weight, m.out_proj.bias)


@pytest.mark.parametrize("pattern", ["dense-causal", SMALL_LONGNET])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_dilated_attention_equals_functional(pattern, heads, kv_heads):
    torch.manual_seed(0)
    q = torch.randn(2, heads, 40, 8, dtype=torch.float64)
    k, v = (torch.randn(2, kv_heads, 40, 8, dtype=torch.float64) for _ in range(2))
    module = DilatedAttention(pattern)
    torch.testing.assert_close(module(q, k, v), spattn.attention(q, k, v, pattern),
                               rtol=0, atol=0)
    scaled = DilatedAttention(pattern, scale=0.3, backend="torch")
    torch.testing.assert_close(scaled(q, k, v), spattn.attention(q, k, v, pattern, scale=0.3),
                               rtol=0, atol=0)
    assert isinstance(module.pattern, spattn.Pattern)


def test_dilated_attention_loads_a_path_once(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("name: from-file\ncausal: true\nbranches:\n  - {segment: 4, dilation: 2}\n")
    module = DilatedAttention(path)
    path.unlink()  # loaded at construction, not per call
    q = torch.randn(1, 2, 9, 4)
    torch.testing.assert_close(module(q, q, q), spattn.attention(q, q, q, module.pattern))
    assert module.pattern.name == "from-file"


@pytest.mark.parametrize("kv_heads", [None, 4, 2, 1])
def test_multihead_dense_causal_equals_sdpa_reference(kv_heads):
    torch.manual_seed(1)
    m = MultiheadDilatedAttention(32, 4, "dense-causal", kv_heads=kv_heads, dtype=torch.float64)
    assert m.kv_heads == (kv_heads or 4) and m.head_dim == 8
    x = torch.randn(3, 37, 32, dtype=torch.float64)
    torch.testing.assert_close(m(x), _sdpa_reference(m, x, x, x), rtol=1e-10, atol=1e-10)
    key, value = torch.randn(2, 3, 37, 32, dtype=torch.float64)  # distinct key / value inputs
    torch.testing.assert_close(m(x, key, value), _sdpa_reference(m, x, key, value),
                               rtol=1e-10, atol=1e-10)


def test_multihead_batch_first_false_and_no_bias():
    torch.manual_seed(2)
    m = MultiheadDilatedAttention(16, 2, "dense-causal", bias=False, batch_first=False,
                                  dtype=torch.float64)
    assert all(p.bias is None for p in (m.q_proj, m.k_proj, m.v_proj, m.out_proj))
    x = torch.randn(11, 2, 16, dtype=torch.float64)  # (N, B, E)
    out = m(x)
    assert out.shape == x.shape
    ref = _sdpa_reference(m, *(x.transpose(0, 1),) * 3).transpose(0, 1)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_gradients_reach_every_parameter_and_match_reference():
    torch.manual_seed(3)
    m = MultiheadDilatedAttention(32, 4, "dense-causal", kv_heads=2, dtype=torch.float64)
    x = torch.randn(2, 20, 32, dtype=torch.float64, requires_grad=True)
    m(x).square().sum().backward()
    grads = {name: p.grad.clone() for name, p in m.named_parameters()}
    assert set(grads) == {f"{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")} | {
        "out_proj.weight", "out_proj.bias"}
    assert all(g.abs().sum() > 0 for g in grads.values())
    dx = x.grad.clone()
    m.zero_grad()
    x.grad = None
    _sdpa_reference(m, x, x, x).square().sum().backward()
    for name, p in m.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(dx, x.grad, rtol=1e-9, atol=1e-9)


def test_sparse_pattern_trains_float32():
    torch.manual_seed(4)
    m = MultiheadDilatedAttention(32, 4, SMALL_LONGNET, kv_heads=2)
    x = torch.randn(2, 50, 32)
    m(x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_initialization_like_nn_multihead_attention():
    torch.manual_seed(5)
    m = MultiheadDilatedAttention(64, 4, "dense-causal")
    for proj in (m.q_proj, m.k_proj, m.v_proj, m.out_proj):
        assert torch.count_nonzero(proj.bias) == 0
    bound = (6 / (64 + 64)) ** 0.5  # xavier_uniform_ on a 64 x 64 weight
    assert m.q_proj.weight.abs().max() <= bound
    assert m.q_proj.weight.abs().max() > 0.9 * bound


def test_state_dict_round_trip():
    torch.manual_seed(6)
    a = MultiheadDilatedAttention(32, 4, SMALL_LONGNET, kv_heads=2)
    b = MultiheadDilatedAttention(32, 4, SMALL_LONGNET, kv_heads=2)
    state = a.state_dict()
    assert set(state) == {f"{p}_proj.{w}" for p in ("q", "k", "v", "out")
                          for w in ("weight", "bias")}
    assert state["k_proj.weight"].shape == (16, 32)
    b.load_state_dict(state)
    x = torch.randn(2, 33, 32)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_device_and_dtype_factory_arguments():
    m = MultiheadDilatedAttention(16, 2, "dense-causal", device="cpu", dtype=torch.float64)
    assert {p.dtype for p in m.parameters()} == {torch.float64}
    assert {p.device.type for p in m.parameters()} == {"cpu"}


def _fixed(**sizes) -> spattn.Pattern:
    return spattn.Pattern.model_validate({"name": "fixed", "causal": True,
                                          "branches": [{"dense": {}}], **sizes})


@pytest.mark.parametrize("kwargs,message", [
    (dict(embed_dim=30, num_heads=4), r"embed_dim \(30\) must be divisible by num_heads \(4\)"),
    (dict(num_heads=4, kv_heads=3), r"num_heads \(4\) must be divisible by kv_heads \(3\)"),
    (dict(num_heads=0), r"num_heads must be a positive integer, got 0"),
    (dict(dropout=0.1), r"dropout must be 0.0 .*got 0.1"),
    (dict(pattern=_fixed(heads=8)),
     r"pattern 'fixed' fixes heads = 8, but the module has num_heads = 4"),
    (dict(pattern=_fixed(kv_heads=1)),
     r"pattern 'fixed' fixes kv_heads = 1, but the module has kv_heads = 4"),
    (dict(pattern=_fixed(head_dim=16)),
     r"pattern 'fixed' fixes head_dim = 16, but the module has head_dim .* = 8"),
    (dict(pattern=spattn.Pattern.model_validate({
        "name": "offsets", "branches": [{"segment": 4, "dilation": 2, "offsets": [0, 1]}]})),
     r"per-head offsets for 2 heads, but the module has num_heads = 4"),
    (dict(pattern=3), r"pattern must be a spattn.Pattern, a built-in name or a YAML path"),
])
def test_construction_errors(kwargs, message):
    args = dict(embed_dim=32, num_heads=4, pattern="dense-causal") | kwargs
    with pytest.raises(SpattnError, match=message) as info:  # ModuleError; PatternError for a
        MultiheadDilatedAttention(**args)                     # pattern of the wrong type
    assert isinstance(info.value, ModuleError | PatternError)
    assert isinstance(info.value, ValueError)


def test_unknown_pattern_name_is_a_spattn_error():
    with pytest.raises(SpattnError, match="no built-in pattern of that name"):
        MultiheadDilatedAttention(32, 4, "no-such-pattern")


def test_matching_fixed_pattern_is_accepted():
    m = MultiheadDilatedAttention(32, 4, _fixed(heads=4, kv_heads=2, head_dim=8), kv_heads=2)
    assert m(torch.randn(1, 5, 32)).shape == (1, 5, 32)


@pytest.mark.parametrize("args,message", [
    ((torch.randn(5, 32),),
     r"query must be 3-D \(batch, seq_len, embed_dim\), got shape \(5, 32\)"),
    ((torch.randn(1, 2, 5, 32),), r"query must be 3-D .*got shape \(1, 2, 5, 32\)"),
    ((torch.randn(2, 5, 16),),
     r"query's last dimension must be embed_dim = 32, got shape \(2, 5, 16\)"),
    ((torch.randn(2, 5, 32), torch.randn(2, 5, 32)), r"give both key and value, or neither"),
    ((torch.randn(2, 5, 32), torch.randn(2, 6, 32), torch.randn(2, 6, 32)),
     r"key and value must have the query's shape \(2, 5, 32\), got \(2, 6, 32\)"),
    ((torch.randn(2, 5, 32), torch.randn(2, 5, 8), torch.randn(2, 5, 32)),
     r"key's last dimension must be embed_dim = 32"),
])
def test_forward_input_errors(args, message):
    m = MultiheadDilatedAttention(32, 4, "dense-causal")
    with pytest.raises(ModuleError, match=message):
        m(*args)


def test_decoding_through_the_module_matches_its_full_forward():
    pattern = spattn.Pattern.model_validate({
        "name": "lm", "causal": True,
        "branches": [{"segment": 8, "dilation": 1}, {"segment": 32, "dilation": 4}]})
    torch.manual_seed(0)
    mha = spattn.MultiheadDilatedAttention(32, 4, pattern, kv_heads=2).double()
    x = torch.randn(2, 70, 32, dtype=torch.float64)
    full = mha(x)
    cache = mha.new_cache()
    steps = [mha(x[:, :10], cache=cache)] + [mha(x[:, i:i + 1], cache=cache)
                                             for i in range(10, 70)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-12, atol=1e-12)
    assert cache.seen == 70 and cache.kept <= cache.bound
    with pytest.raises(spattn.ModuleError, match="a cache decodes self-attention"):
        mha(x[:, :1], x[:, :1], x[:, :1], cache=cache)
