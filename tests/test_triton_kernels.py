"""Generated kernels, forward and backward, run by the Triton interpreter: O, dQ, dK, dV against
the float64 reference and its autograd."""

from __future__ import annotations

import pytest
import torch
from generated_cases import INTERPRETED, ODD_SIZES, generated_patterns, inputs, scaled
from hypothesis import given, settings
from reference import reference_attention

import spattn
from spattn.compiler.codegen import compile_module
from spattn.patterns.loader import builtin_names
from spattn.runtime.triton_backend import import_module_file

# unit-normal inputs: errors are relative to the largest reference value
TOLERANCE = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}


@pytest.fixture(autouse=True)
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPATTN_CACHE_DIR", str(tmp_path / "cache"))


def _reference(pattern, q, k, v, d_out, scale=None):
    leaves = [t.double().cpu().requires_grad_() for t in (q, k, v)]
    out = reference_attention(*leaves, pattern, scale=scale)
    return out, torch.autograd.grad(out, leaves, d_out.double())


def _check(pattern, shape, dtype=torch.float32, seed=0, attention=None):
    """Output and gradients of the generated kernels against the reference's autograd."""
    q, k, v = inputs(*shape, seed=seed)
    d_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1))
    want_out, want_grads = _reference(pattern, q, k, v, d_out)
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    d_out = d_out.to(q.device)
    if attention is None:
        out = spattn.attention(*leaves, pattern, backend="triton")
    else:
        out = attention(*leaves)
    grads = torch.autograd.grad(out, leaves, d_out.to(dtype))
    for name, got, want in zip("O dQ dK dV".split(), (out, *grads), (want_out, *want_grads),
                               strict=True):
        assert got.dtype == dtype and got.shape == want.shape, name
        if not got.numel():
            continue
        error = (got.double().cpu() - want).abs().max().item()
        bound = TOLERANCE[dtype] * max(1.0, want.abs().max().item())
        assert error < bound, f"{name}: max abs error {error:.2e} > {bound:.2e}"


@settings(INTERPRETED, max_examples=30)
@given(generated_patterns())
def test_random_patterns(case):
    pattern, shape = case
    _check(pattern, shape)


@pytest.mark.parametrize("pattern,shape", ODD_SIZES.values(), ids=ODD_SIZES.keys())
def test_odd_sizes(pattern, shape):
    _check(pattern, shape)


@pytest.mark.parametrize("name", builtin_names())
def test_builtin_patterns_scaled_down(name):
    # segments / 64: longnet-lm becomes w = 32 ... 512; 160 tokens cover several segments.
    # bigbird / 8: window 24, random blocks of 8 (one-token blocks crawl under the interpreter)
    _check(scaled(name, 8 if name == "bigbird" else 64), (1, 4, 2, 160, 16))


def test_every_branch_kind_with_gqa_and_groups_of_offsets():
    # four query heads on one key head, each head with its own offset: dK/dV of one key row
    # gather contributions from several heads
    pattern = spattn.Pattern.model_validate({
        "name": "mixed", "causal": True, "branches": [
            {"segment": 20, "dilation": 3, "offsets": [0, 2, 2, 1]}, {"window": {"size": 6}},
            {"global": {"tokens": [0, 17, 33]}}, {"dense": {}}]})
    _check(pattern, (2, 4, 1, 50, 32))


@pytest.mark.parametrize("dim, overlap", [(96, "multiset"), (128, "union")])
def test_wide_float32_heads_take_the_two_halves_backward(dim, overlap):
    # float32 past 64 columns: the row kernels' backward reads q and dO from memory and
    # multiplies in two halves of the head dim (96: padded to 128, the halves masked unevenly)
    pattern = spattn.Pattern.model_validate({"name": "wide", "causal": True, "overlap": overlap,
                                             "branches": SOME_HEADS})
    _check(pattern, (1, 4, 2, 37, dim))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_union_overlap_counts_each_pair_once(causal):
    # every kind overlaps an earlier one: the dense branch first, so later branches add nothing
    # to its pairs; then global tokens before a window, a window before dilated rows
    for branches in ([{"dense": {}}, {"segment": 16, "dilation": 2}, {"window": {"size": 5}},
                      {"global": {"tokens": [1, 30]}}],
                     [{"global": {"tokens": [1, 30]}}, {"window": {"size": 7}},
                      {"segment": 12, "dilation": 2, "offsets": [1, 0, 0, 1]}, {"dense": {}}]):
        pattern = spattn.Pattern.model_validate({"name": "union", "causal": causal,
                                                 "overlap": "union", "branches": branches})
        _check(pattern, (1, 4, 2, 45, 16))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_strided_and_random_blocks(causal):
    # residue classes of two sizes (N % stride != 0), stride > N; random blocks that do not
    # divide N, one-token blocks, two random branches with different blocks and draws, one of
    # them earlier than a strided branch under union (the hook reads the stacked draw tables)
    for overlap, branches in (
            ("multiset", [{"strided": {"stride": 7}}, {"strided": {"stride": 60}}]),
            ("multiset", [{"random": {"block": 6, "blocks": 3, "seed": 2}},
                          {"random": {"block": 1, "blocks": 2}}]),
            ("union", [{"random": {"block": 6, "blocks": 3, "seed": 2}},
                       {"random": {"block": 16, "blocks": 2}}, {"strided": {"stride": 5}},
                       {"window": {"size": 4}}])):
        pattern = spattn.Pattern.model_validate({"name": "new-kinds", "causal": causal,
                                                 "overlap": overlap, "branches": branches})
        _check(pattern, (1, 4, 2, 53, 16))


# every kind for some heads only; H = 4 on Hkv = 2, so each key head's group has heads with and
# without a branch; head 3 has no branch at all (zero output and gradients)
SOME_HEADS = [{"segment": 12, "dilation": 3, "heads": [0, 2]},
              {"window": {"size": 5}, "heads": [1]},
              {"global": {"tokens": [2, 20]}, "heads": [0, 1]},
              {"strided": {"stride": 5}, "heads": [2]},
              {"random": {"block": 6, "blocks": 2, "seed": 3}, "heads": [1, 2]},
              {"dense": {}, "heads": [0]}]
# union: an earlier branch drops pairs only on its own heads
EARLIER_HEADS = [{"window": {"size": 6}, "heads": [0, 3]}, {"segment": 10, "dilation": 2},
                 {"dense": {}, "heads": [1]}, {"global": {"tokens": [4]}, "heads": [2, 3]}]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("overlap, branches", [("multiset", SOME_HEADS), ("union", SOME_HEADS),
                                               ("union", EARLIER_HEADS)],
                         ids=["multiset", "union", "union-earlier"])
def test_branches_for_some_heads(overlap, branches, causal):
    pattern = spattn.Pattern.model_validate({"name": "some-heads", "causal": causal,
                                             "overlap": overlap, "branches": branches})
    _check(pattern, (1, 4, 2, 37, 16))


def test_too_few_heads_for_a_branch(tmp_path):
    pattern = spattn.Pattern.model_validate({"name": "head-three", "branches": [
        {"window": {"size": 3}}, {"dense": {}, "heads": [3]}]})
    module = import_module_file(compile_module(pattern, tmp_path))
    q, k, v = inputs(1, 2, 1, 8, 16)
    with pytest.raises(spattn.SpattnError, match="a branch for head 3, but q has 2 heads"):
        module.attention(q, k, v)


@pytest.mark.parametrize("dtype", [
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="the Triton interpreter mishandles bfloat16")),
], ids=["float16", "bfloat16"])
def test_half_precision(dtype):
    _check(scaled("longnet-lm", 64), (1, 2, 2, 96, 32), dtype=dtype)


def test_queries_without_keys_get_zero_gradients():
    # one segment of 10 rows, r = 4, offsets 3: rows 0-2 of every segment attend nothing
    pattern = spattn.Pattern.model_validate({
        "name": "gaps", "causal": False, "branches": [{"segment": 10, "dilation": 4,
                                                        "offsets": [3]}]})
    q, k, v = (t.requires_grad_() for t in inputs(1, 1, 1, 30, 16))
    out = spattn.attention(q, k, v, pattern, backend="triton")
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    assert q.grad[0, 0, :3].abs().max() == 0 and k.grad[0, 0, :3].abs().max() == 0
    _check(pattern, (1, 1, 1, 30, 16))


def test_emitted_module_is_differentiable_on_its_own(tmp_path):
    pattern = scaled("sink-window", 64)
    module = import_module_file(compile_module(pattern, tmp_path))
    _check(pattern, (1, 2, 1, 90, 16), attention=module.attention)


def test_forward_saves_only_inputs_output_and_lse():
    pattern = scaled("longnet-lm", 64)
    q, k, v = (t.requires_grad_() for t in inputs(1, 2, 2, 96, 16))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t,
                                                  lambda t: t):
        spattn.attention(q, k, v, pattern, backend="triton")
    assert saved and all(torch.Size(s).numel() <= q.numel() for s in saved), saved
    assert (1, 2, 96) in saved  # the merged LSE
