"""The PyTorch backend's plan (runtime/batches.py, runtime/costs.py): every strategy the cost
model can choose is exact against the float64 reference, forward and backward."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_attention import check_backend, problems, with_heads

import spattn
from spattn.patterns.geometry import resolve
from spattn.runtime import costs, torch_backend
from spattn.runtime.costs import CostModel, busiest_pairs
from spattn.runtime.pieces import nested_chains

# a model that stacks every group it can, and one that never stacks (each piece its own call);
# with DENSE allowed, ALWAYS also turns every short call into one dense masked call; "cut" stacks
# everything, then cuts each call into runs of a few segments (CALL_ELEMENTS made tiny)
ALWAYS = CostModel(call_us=1e9, copy_gbps=1e9, pair_ns=1.0, source="always")
NEVER = CostModel(call_us=0.0, copy_gbps=1e-9, pair_ns=1.0, source="never")
MODELS = {"stack-all": (ALWAYS, False), "stack-none": (NEVER, False), "dense": (ALWAYS, True),
          "cut": (ALWAYS, False)}


def _problem(pattern, shape):
    batch, heads, kv_heads, n, dim = shape
    return torch_backend.Problem(resolve(pattern, n, heads), n, heads, kv_heads, pattern.causal,
                                 pattern.overlap == "union", 1 / math.sqrt(dim))


def _check(pattern, shape, model, monkeypatch, force_math=False, dense=False):
    """Exact under `model`'s plan (dense masked calls allowed or not); returns that plan."""
    monkeypatch.setattr(costs, "current", lambda: model)
    if not dense:
        monkeypatch.setattr(torch_backend, "DENSE_MASK_LIMIT", 0)
    problem = check_backend(pattern, shape, force_math)
    return torch_backend.plan(problem, shape[-1], model, not force_math, shape[0])


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(problems(max_n=30))
@pytest.mark.parametrize("which", MODELS)
def test_every_plan_is_exact(which, monkeypatch, case):
    pattern, shape = case
    model, dense = MODELS[which]
    fused = shape[0] == 1  # the matmul fallback for batches of 2
    bound = 3 * 4 * shape[-1]  # output elements of a call: three segments of four rows
    if which == "cut":
        monkeypatch.setattr(torch_backend, "CALL_ELEMENTS", bound * shape[0])
    plan = _check(pattern, shape, model, monkeypatch, force_math=not fused, dense=dense)
    if which == "cut":  # every call within the bound, unless it has a single segment
        for b in plan:
            p = b.pieces[0]
            assert p.q.nseg == 1 or len(b.pieces) * p.q.nseg * p.q.count * shape[-1] <= bound
    if which == "stack-none":
        assert all(len(b.pieces) == 1 or b.folded for b in plan)
    whole = [b for b in plan if b.whole]
    assert len(whole) <= 1 and (not whole or len(plan) == 1)
    if which == "dense" and fused:  # several calls as pieces: one masked call instead
        calls = torch_backend.plan(_problem(*case), shape[-1], model, False)
        assert bool(whole) == (len(calls) > 1)
    if not fused or not dense:
        assert not whole


LONGNET = spattn.Pattern.model_validate({
    "name": "longnet-small", "causal": True,
    "branches": [{"segment": 16, "dilation": 1}, {"segment": 32, "dilation": 2},
                 {"segment": 64, "dilation": 4}]})


@pytest.mark.parametrize("model", [ALWAYS, NEVER], ids=["stack-all", "stack-none"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_strategies_on_a_dilated_schedule(model, kv_heads, monkeypatch):
    """Head offsets differ per head: stacking gathers rows (a copy); the dense segments read the
    same rows on every head: folded into one view when K has every head (unless they share
    pairs with the next branch, tested below)."""
    monkeypatch.setattr(torch_backend, "SHARE_PAIRS", "never")
    plan = _check(LONGNET, (2, 4, kv_heads, 100, 8), model, monkeypatch)
    strategies = {b.strategy for b in plan}
    assert ("heads folded (view)" in strategies) == (kv_heads == 4)
    assert ("stacked (gather)" in strategies) == (model is ALWAYS)
    if model is NEVER:
        assert "strided view" in strategies


@pytest.mark.parametrize("most", [1, 3, 5])
def test_large_calls_are_cut_into_runs_of_segments(most, monkeypatch):
    """A call over many segments becomes several over runs of at most `most` of them (as even as
    can be), each writing at most CALL_ELEMENTS output elements (all batch rows); the calls cut
    from one keep its mask key, so a mask the same for every segment (a window's band) is
    built once. Exact, forward and backward."""
    window = spattn.Pattern.model_validate({"name": "w", "causal": True,
                                            "branches": [{"window": {"size": 16}}]})
    batch, heads, n, dim = 2, 4, 200, 8
    shape = (batch, heads, heads, n, dim)
    monkeypatch.setattr(torch_backend, "DENSE_MASK_LIMIT", 0)
    whole = torch_backend.plan(_problem(window, shape), dim, costs.DEFAULT, True, batch)
    per_segment = heads * 16 * dim  # every head folded, window chunks of 16 queries
    assert all(b.folded and b.pieces[0].q.count <= 16 for b in whole)
    monkeypatch.setattr(torch_backend, "CALL_ELEMENTS", batch * per_segment * most)
    plan = _check(window, shape, costs.DEFAULT, monkeypatch)
    assert max(b.pieces[0].q.nseg for b in whole) > most
    assert max(b.pieces[0].q.nseg for b in plan) <= most
    assert len(plan) == sum(-(-b.pieces[0].q.nseg // most) for b in whole)  # no more calls
    shared = [b for b in plan if b.pieces[0].shared_mask]
    assert shared and len({b.mask_key for b in shared}) < len(shared)

    def rows(batches):  # each (head, query row) a call writes, with repeats
        return sorted((p.head, int(r)) for b in batches for p in b.pieces
                      for r in p.q.positions().flatten())

    assert rows(plan) == rows(whole)


@pytest.mark.parametrize("pattern", [
    {"name": "dense", "causal": True, "branches": [{"dense": {}}]},
    {"name": "wide-window", "causal": False, "branches": [{"window": {"size": 500}}]}])
def test_dense_calls_return_the_kernel_results_as_they_come(pattern, monkeypatch):
    pattern = spattn.Pattern.model_validate(pattern)
    problem = _problem(pattern, (2, 3, 3, 50, 8))
    plan = _check(pattern, (2, 3, 3, 50, 8), costs.DEFAULT, monkeypatch)
    assert torch_backend._dense(plan, problem) is not None


def test_busiest_thread_counts():
    # one thread does all the (rounded) work; two threads split a stack of problems evenly
    one = busiest_pairs(1, 2048, 2048, True, 1)
    assert one == sum(256 * min(2048, -(-(i + 1) * 256 // 512) * 512) for i in range(8))
    assert busiest_pairs(1, 2048, 2048, False, 1) == 2048 * 2048
    # a lone causal problem leaves one thread idle a third of the time; four stacked do not
    assert busiest_pairs(1, 2048, 2048, True, 2) > 0.65 * one
    assert busiest_pairs(4, 2048, 2048, True, 2) == 2 * one
    # 100 rows are blocks of 32, 32, 32 and 4: three blocks a thread, the first thread the most
    assert busiest_pairs(3, 100, 100, False, 4) == 3 * 32 * 100


def test_model_stacks_lone_causal_problems_not_balanced_ones():
    from spattn.runtime.batches import plan_batches
    from spattn.runtime.pieces import Piece
    from spattn.runtime.rows import Rows

    def stacked(pieces: list, model: CostModel) -> bool:  # one call for the four heads' pieces
        return len(plan_batches(tuple(pieces), 4, 4, 8192 + 4, 64, model, 1 << 21)) == 1

    model = CostModel(call_us=0.0, copy_gbps=5.0, pair_ns=5.0)
    lone = [Piece(h, Rows(h, 2048, 4), Rows(h, 2048, 4), causal=True) for h in range(4)]
    assert stacked(lone, model)  # threads evened out: worth the copy
    many = [Piece(h, Rows(h, 64, 4, 32, 256), Rows(h, 64, 4, 32, 256)) for h in range(4)]
    assert not stacked(many, model)  # already balanced, tiny problems: the copy costs more
    assert stacked(many, CostModel(call_us=1e6, copy_gbps=5.0, pair_ns=5.0))  # calls dear


def test_tune_keeps_the_figures_for_later_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("SPATTN_CACHE_DIR", str(tmp_path))
    assert costs.current() == costs.DEFAULT
    measured = CostModel(call_us=50.0, copy_gbps=3.0, pair_ns=2.0, source="tuned")
    monkeypatch.setattr(costs, "measure", lambda repeats=5, progress=None: measured)
    model, path = costs.tune()
    assert path.parent == tmp_path / "costs" and json.loads(path.read_text())["call_us"] == 50.0
    assert costs.current().call_us == 50.0 and costs.current().source.startswith("tuned")
    path.write_text("not json")  # a damaged file is ignored, never fatal
    costs._read.cache_clear()
    assert costs.current() == costs.DEFAULT


def test_measure_gives_positive_figures():
    model = costs.measure(repeats=1)
    assert model.call_us > 0 and model.copy_gbps > 0 and model.pair_ns > 0


def test_cli_tune_inspect_plan_and_run_print_the_plan(tmp_path, monkeypatch, capsys):
    from spattn.cli.main import main

    monkeypatch.setenv("SPATTN_CACHE_DIR", str(tmp_path))
    measured = CostModel(call_us=80.0, copy_gbps=4.0, pair_ns=3.0, source="tuned")
    monkeypatch.setattr(costs, "measure", lambda repeats=5, progress=None: measured)
    assert main(["tune", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "now   tuned: 80 us a call" in out and str(tmp_path / "costs") in out
    assert main(["inspect", "longnet-lm", "-n", "8192", "--scale", "4", "--heads", "4",
                 "--kv-heads", "2", "--no-hops", "--no-tiles", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "CPU plan for N=8,192 H=4 Hkv=2 D=64:" in out and "tuned (" in out
    assert "stacked (gather)" in out or "strided view" in out
    assert main(["inspect", "dense-causal", "-n", "64", "--heads", "4", "--kv-heads", "3",
                 "--plan"]) == 2  # 3 does not divide 4: one line, exit 2
    assert main(["run", "sliding-window", "-n", "300", "--repeat", "1", "--no-baseline",
                 "--check-rows", "1"]) == 0
    assert "  plan      1 calls for 4 pieces" in capsys.readouterr().out


@pytest.mark.parametrize("name, n, dense", [("dense-causal", 50, True),
                                           ("sliding-window", 300, True),
                                           ("longnet-lm", 300, False), ("sink-window", 50, False)])
def test_a_plain_dense_call_is_torchs_own_attention(name, n, dense, monkeypatch):
    """A call that is exactly dense attention (every pair once: dense-causal, a window wider than
    the sequence) runs as scaled_dot_product_attention itself; others never do."""
    import torch
    import torch.nn.functional as F
    from reference import reference_attention

    from spattn.runtime import dispatch

    calls, real = [], F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(dispatch.F, "scaled_dot_product_attention", spy)
    q, k, v = (torch.randn(2, 3, n, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pattern = spattn.load_pattern(name)
    out = spattn.attention(q, k, v, pattern, backend="torch")
    assert len(calls) == (1 if dense else 0)
    want = reference_attention(q, k, v, pattern)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-10)
    grad = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, (q, k, v), grad),
                    torch.autograd.grad(want, (q, k, v), grad), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_a_call_shape_is_worked_out_once(monkeypatch):
    """The backend, scale and dense check of a call are remembered per call shape and cost
    model: repeated calls skip them, and a new shape, scale or cost model works them out anew."""
    import torch

    from spattn.runtime import dispatch

    worked, real = [], dispatch._choose_anew

    def spy(*args):
        worked.append(args[1:])
        return real(*args)

    monkeypatch.setattr(dispatch, "_choose_anew", spy)
    monkeypatch.setattr(dispatch, "_CHOSEN", {})
    pattern = spattn.load_pattern("longnet-lm")
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    first = spattn.attention(q, k, v, pattern)
    for _ in range(3):
        torch.testing.assert_close(spattn.attention(q, k, v, pattern), first, rtol=0, atol=0)
    assert len(worked) == 1
    spattn.attention(q[:, :, :30], k[:, :, :30], v[:, :, :30], pattern)  # another shape
    spattn.attention(q, k, v, pattern, scale=0.5)  # another scale
    assert len(worked) == 3
    monkeypatch.setattr(costs, "current", lambda: ALWAYS)  # another cost model
    spattn.attention(q, k, v, pattern)
    assert len(worked) == 4
    with pytest.raises(spattn.SpattnError, match="scale"):  # errors are never remembered
        spattn.attention(q, k, v, pattern, scale=float("nan"))
    with pytest.raises(spattn.SpattnError, match="scale"):
        spattn.attention(q, k, v, pattern, scale=float("nan"))
    assert len(worked) == 6


@st.composite
def nested_schedules(draw):
    """LongNet-like schedules: dilated branches whose segment and dilation double (so each
    nests in the one before, when offsets and phases allow), now and then with a branch of
    another kind among them, custom offsets or a branch for some heads only."""
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 3]))
    segment, dilation = draw(st.integers(1, 12)), draw(st.integers(1, 3))
    branches = []
    for level in range(draw(st.integers(2, 4))):
        branch = {"segment": segment << level, "dilation": dilation << level}
        if draw(st.integers(0, 4)) == 0:
            branch["offsets"] = draw(st.lists(st.integers(0, (dilation << level) - 1),
                                              min_size=heads, max_size=heads))
        branches.append(draw(with_heads(branch, heads)) if draw(st.integers(0, 4)) == 0
                        else branch)
    if draw(st.booleans()):
        other = draw(st.sampled_from([{"window": {"size": 5}}, {"global": {"tokens": [0, 3]}},
                                      {"segment": 7, "dilation": 2}]))
        branches.insert(draw(st.integers(0, len(branches))), other)
    spec = {"name": "nested", "causal": draw(st.booleans()), "branches": branches,
            "head_offsets": draw(st.sampled_from(["paper", "blocked"]))}
    n = draw(st.integers(1, 70))
    return spattn.Pattern.model_validate(spec), (draw(st.integers(1, 2)), heads, kv_heads, n,
                                                 draw(st.sampled_from([1, 4, 8])))


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(nested_schedules())
def test_shared_pairs_of_nested_branches_are_exact(monkeypatch, case):
    """Pairs that nested branches give in common, computed once with log(count) added (the
    first member's mask, and the later members' between their halves): exact forward and
    backward, every chain that nests shared."""
    pattern, shape = case
    monkeypatch.setattr(torch_backend, "SHARE_PAIRS", "always")
    plan = _check(pattern, shape, costs.DEFAULT, monkeypatch)
    problem = _problem(pattern, shape)
    chains = nested_chains(problem.branches, problem.seq_len, problem.heads, problem.union)
    shared = [p for b in plan for p in b.pieces if p.also is not None]
    assert bool(shared) == bool(chains)


def test_which_branches_nest():
    lm = spattn.load_pattern("longnet-lm")
    # 2048/1, 4096/2 and 8192/4 nest (a chain of MAX_CHAIN = 3); 16384/6 and 32768/12 too up
    # to 16K (one segment each), but at 16K their 2731-row segments pass SHARE_ROWS, and at 64K
    # the second half's rows are out of phase (16384 is no multiple of 12); 8192/4 and 16384/6
    # never (6 is not 2 x 4)
    expected = {4096: ((0, 1, 2), (3, 4)), 16384: ((0, 1, 2),), 65536: ((0, 1, 2),)}
    for n, want in expected.items():
        assert nested_chains(resolve(lm, n, 8), n, 8, union=False) == want
    assert nested_chains(resolve(lm, 16384, 8), 16384, 8, union=True) == ()

    def chains(branches: list[dict], n: int, heads: int = 4) -> tuple:
        pattern = spattn.Pattern.model_validate({"name": "p", "branches": branches})
        return nested_chains(resolve(pattern, n, heads), n, heads, union=False)

    assert chains([{"segment": 12, "dilation": 3}, {"segment": 24, "dilation": 6}], 50) == \
        ((0, 1),)
    # 10 is no multiple of 6: the second half's rows are not every other one of the first's
    assert chains([{"segment": 10, "dilation": 3}, {"segment": 20, "dilation": 6}], 50) == ()
    assert chains([{"segment": 10, "dilation": 3}, {"segment": 20, "dilation": 6}], 10) == \
        ((0, 1),)  # one segment each: nothing out of phase
    # offsets that do not nest: head 1 keeps rows 1, 4, 7 ... of the outer and 0, 6 ... inner
    assert chains([{"segment": 12, "dilation": 3},
                   {"segment": 24, "dilation": 6, "offsets": [0, 0, 2, 3]}], 50) == ()
    # 8/4 nests in 4/2, but its rows are out of phase in 2/1's segments (2 is no multiple of
    # 4): the chain stops at two
    assert chains([{"segment": 2, "dilation": 1}, {"segment": 4, "dilation": 2},
                   {"segment": 8, "dilation": 4}], 64) == ((0, 1),)
    # at most MAX_CHAIN members; each branch in one chain
    assert chains([{"segment": 8, "dilation": 1}, {"segment": 16, "dilation": 2},
                   {"segment": 32, "dilation": 4}, {"segment": 64, "dilation": 8},
                   {"segment": 128, "dilation": 16}], 200) == ((0, 1, 2), (3, 4))
