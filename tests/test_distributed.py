"""`spattn.distributed` on 2 and 4 gloo processes of this CPU.

Each world is spawned once and runs every case: each rank computes the single-process result
(spattn.attention, float64) of the full sequence, runs the distributed attention on its chunk,
and reports the difference of its output and dQ/dK/dV from the single-process slice, the bytes its
collectives moved (counted by comm.CommCounter) and the errors bad calls raised. The tests below
check those reports against the plan.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from datetime import timedelta
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import spattn
from spattn.distributed import CommCounter, PlanError, build_plan
from spattn.distributed import attention as distributed_attention
from spattn.runtime import torch_backend
from spattn.runtime.dispatch import InputError

TOL = 1e-10


def _pattern(name: str, causal: bool, branches=None, schedule=None, **extra) -> spattn.Pattern:
    spec = {"name": name, "causal": causal, **extra}
    spec.update({"branches": branches} if branches else {"schedule": schedule})
    return spattn.Pattern.model_validate(spec)


LM = [{"segment": 8, "dilation": 1}, {"segment": 16, "dilation": 2}, {"segment": 32, "dilation": 2},
      {"segment": 64, "dilation": 4}, {"dense": {}}]
GQA = [{"segment": 12, "dilation": 1}, {"segment": 48, "dilation": 5},
       {"segment": 96, "dilation": 7}, {"segment": 1000, "dilation": 3}]  # 1000: w' = N
OFFSETS = [{"segment": 16, "dilation": 1}, {"segment": 64, "dilation": 4, "offsets": [3, 3, 0, 1]}]
GEOMETRIC = {"geometric": {"segment": 16, "dilation": 1, "ratio": 2, "count": 3}}


def cases(world: int) -> dict[str, tuple[spattn.Pattern, tuple[int, int, int, int, int]]]:
    """name -> (pattern, (B, H, Hkv, N, D)). With 2 ranks some branches are local and some span
    2; with 4, others span 2 and 4. GQA: offsets differ within a kv group and l % r != 0.
    Inputs are float64 except in the *-float32 case."""
    return {
        "lm-causal": (_pattern("lm", True, LM), (2, 4, 4, 64, 8)),
        "lm-causal-float32": (_pattern("lm", True, LM), (1, 4, 2, 64, 8)),
        "lm": (_pattern("lm", False, LM), (1, 4, 4, 64, 8)),
        "gqa-causal": (_pattern("gqa", True, GQA), (1, 6, 2, 96, 8)),
        "gqa": (_pattern("gqa", False, GQA), (2, 6, 2, 96, 8)),
        "offsets": (_pattern("offsets", True, OFFSETS), (1, 4, 2, 64, 8)),
        # the same schedule, N = 32 * P: its spanning branch always spans 2 ranks
        "geometric": (_pattern("geometric", True, schedule=GEOMETRIC, head_offsets="blocked"),
                      (1, 4, 2, 32 * world, 8)),
    }


def _dtype(name: str) -> torch.dtype:
    return torch.float32 if name.endswith("float32") else torch.float64


def _inputs(shape, dtype: torch.dtype = torch.float64, seed: int = 0):
    b, h, hkv, n, d = shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, heads, n, d, generator=gen, dtype=dtype)
               for heads in (h, hkv, hkv))
    return q, k, v, torch.randn(b, h, n, d, generator=gen, dtype=dtype)


def _single_and_distributed(pattern, q, k, v, do, rank: int, world: int,
                            forward: CommCounter, backward: CommCounter):
    """The single-process forward and backward of the whole sequence, and this rank's
    distributed one of its chunk (its collectives counted): (expected, leaves, out, mine, part)."""
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = spattn.attention(*full, pattern, backend="torch")
    expected.backward(do)
    n = q.shape[2] // world
    part = slice(rank * n, (rank + 1) * n)
    mine = [t[:, :, part].clone().requires_grad_() for t in (q, k, v)]
    with forward:
        out = distributed_attention(*mine, pattern)
    with backward:
        out.backward(do[:, :, part])
    return expected, full, out, mine, part


def _run_case(pattern, shape, rank: int, world: int, dtype: torch.dtype) -> dict:
    forward, backward = CommCounter(), CommCounter()
    expected, full, out, mine, part = _single_and_distributed(
        pattern, *_inputs(shape, dtype), rank, world, forward, backward)
    diffs = {"out": (out - expected[:, :, part]).abs().max().item()}
    for name, got, want in zip("qkv", mine, full, strict=True):
        diffs["d" + name] = (got.grad - want.grad[:, :, part]).abs().max().item()
    return {"diffs": diffs, "check": forward.sent("check"),
            "forward": [forward.sent("forward"), forward.received("forward")],
            "backward": [backward.sent("backward"), backward.received("backward")],
            "ops": [r.op for r in forward.records + backward.records]}


def _views(shape, rank: int, world: int, expanded: bool) -> list[torch.Tensor]:
    """This rank's q, k, v as views with unusual strides, of leaves that require grad: an unbound
    trailing axis, a key stored (B, H, D, N) and transposed, every other column of a wider v;
    or (expanded) a batch, a kv head and a head dim of stride 0."""
    b, h, hkv, n, d = shape
    rows = n // world
    gen = torch.Generator().manual_seed(rank)

    def leaf(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, dtype=torch.float64).requires_grad_()

    if expanded:
        return [leaf(1, h, rows, d).expand(b, h, rows, d),
                leaf(b, 1, rows, d).expand(b, hkv, rows, d),
                leaf(b, hkv, rows, 1).expand(b, hkv, rows, d)]
    return [leaf(b, h, rows, d, 3).unbind(-1)[1], leaf(b, hkv, d, rows).transpose(-1, -2),
            leaf(b, hkv, rows, 2 * d)[..., ::2]]


def _stride_case(rank: int, world: int, expanded: bool) -> float:
    """The largest difference in output and dQ/dK/dV between views and contiguous copies."""
    pattern = cases(world)["lm-causal"][0]
    views = _views((2, 4, 2, 64, 16), rank, world, expanded)
    copies = [t.detach().contiguous().requires_grad_() for t in views]
    do = torch.randn(views[0].shape, generator=torch.Generator().manual_seed(9),
                     dtype=torch.float64)
    diffs = []
    results = []
    for inputs in (views, copies):
        out = distributed_attention(*inputs, pattern)
        results.append((out, *torch.autograd.grad(out, inputs, do)))
    for got, want in zip(*results, strict=True):
        diffs.append((got - want).abs().max().item())
    return max(diffs)


def _error(call) -> list[str]:
    try:
        call()
    except Exception as error:
        return [type(error).__name__, str(error)]
    return ["no error", ""]


def _error_cases(rank: int, world: int) -> dict:
    """Bad calls; each must raise on every rank without hanging the group."""
    pattern, shape = cases(world)["lm-causal"]
    q, k, v, _ = _inputs(shape)
    n = shape[3] // world
    q, k, v = (t[:, :, rank * n:(rank + 1) * n] for t in (q, k, v))
    last = rank == world - 1
    other = _pattern("other", True, [{"segment": 8, "dilation": 2}])
    return {
        "chunk shape": _error(lambda: distributed_attention(
            q[:, :, :n // 2] if last else q, k[:, :, :n // 2] if last else k,
            v[:, :, :n // 2] if last else v, pattern)),
        "pattern": _error(lambda: distributed_attention(q, k, v, other if last else pattern)),
        "dtype": _error(lambda: distributed_attention(
            *(t.float() if last else t for t in (q, k, v)), pattern)),
        "one rank's bad tensor": _error(lambda: distributed_attention(
            q[0] if rank == 0 else q, k, v, pattern)),
        "one rank's step raises": _error(lambda: _raising(last, "forward", lambda: (
            distributed_attention(q, k, v, pattern)))),
        "scale": _error(lambda: distributed_attention(q, k, v, pattern, scale=0.0)),
        "one rank's scale": _error(lambda: distributed_attention(
            q, k, v, pattern, scale=float("nan") if rank == 0 else None)),
        "timeout": _error(lambda: distributed_attention(q, k, v, pattern, timeout=-1)),
        "segment inside a chunk": _error(lambda: distributed_attention(
            q, k, v, _pattern("bad", False, [{"segment": 3 * n // 2, "dilation": 2}]))),
        "window": _error(lambda: distributed_attention(
            q, k, v, _pattern("win", False, [{"window": {"size": 4}}]))),
    }


def _raising(fail: bool, step: str, call):
    """call(), with torch_backend's `step` raising where `fail`."""
    if not fail:
        return call()
    error = RuntimeError(f"injected failure in the {step}")
    with mock.patch.object(torch_backend, step, side_effect=error):
        return call()


def _nan_case(rank: int, world: int, where: str) -> dict:
    """NaN at a few rows of q, k or v of the whole sequence: each rank's output and gradients
    must be NaN exactly where the single process's are (which test_nonfinite checks against
    the reference's pair counts). Returns the mismatches and how many NaN rows there were."""
    pattern, shape = cases(world)["lm-causal"]
    q, k, v, do = _inputs(shape, seed=3)
    target = {"q": q, "k": k, "v": v}[where]
    for row in (5, shape[3] // world + 2):  # one on rank 0, one on rank 1
        target[0, 1, row, 0] = float("nan")
    expected, full, out, mine, part = _single_and_distributed(
        pattern, q, k, v, do, rank, world, CommCounter(), CommCounter())
    report = {"mismatched": [], "nan rows": 0}
    for name, got, want in (("out", out, expected[:, :, part]),
                            *((f"d{x}", a.grad, b.grad[:, :, part])
                              for x, a, b in zip("qkv", mine, full, strict=True))):
        got_nan, want_nan = got.isnan().any(-1), want.isnan().any(-1)
        report["nan rows"] += int(want_nan.sum())
        if not torch.equal(got_nan, want_nan):
            report["mismatched"].append(name)
        elif (got - want)[~want_nan].abs().max().item() > TOL:
            report["mismatched"].append(name + " values")
    return report


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    report = {}
    try:
        report["cases"] = {name: _run_case(pattern, shape, rank, world, _dtype(name))
                           for name, (pattern, shape) in cases(world).items()}
        report["errors"] = _error_cases(rank, world)
        report["strides"] = {name: _stride_case(rank, world, name == "expanded")
                             for name in ("strided", "expanded")}
        report["nan"] = {where: _nan_case(rank, world, where) for where in "qkv"}
        # after all those errors the group still works
        report["after errors"] = _run_case(*cases(world)["gqa-causal"], rank, world,
                                           torch.float64)
        report["faults"] = _faults(rank, world)  # last: they leave groups broken, a rank gone
    except Exception:
        report["crash"] = traceback.format_exc()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    os._exit(0)  # no teardown of the groups the faults left broken


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[int, list[dict]]:
    """world size -> every rank's report."""
    runs = {}
    for world in (2, 4):
        tmp = tmp_path_factory.mktemp(f"world{world}")
        mp.spawn(_worker, args=(world, str(tmp / "init"), str(tmp)), nprocs=world)
        runs[world] = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]
        for rank, report in enumerate(runs[world]):
            assert "crash" not in report, f"rank {rank} of {world}:\n{report['crash']}"
    return runs


def _plan(name: str, world: int):
    pattern, (b, h, hkv, n, d) = cases(world)[name]
    return build_plan(pattern, n, world, heads=h, kv_heads=hkv, head_dim=d, batch=b,
                      dtype=_dtype(name))


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", list(cases(2)))
def test_every_rank_matches_the_single_process_slice(reports, world, name):
    tol = TOL if _dtype(name) == torch.float64 else 1e-5
    for rank, report in enumerate(reports[world]):
        for tensor, diff in report["cases"][name]["diffs"].items():
            assert diff < tol, f"{name}, rank {rank} of {world}: {tensor} off by {diff:.3g}"


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("where", list("qkv"))
def test_nan_reaches_exactly_the_rows_it_reaches_in_one_process(reports, world, where):
    total = 0
    for rank, report in enumerate(reports[world]):
        case = report["nan"][where]
        assert case["mismatched"] == [], (rank, case)
        total += case["nan rows"]
    assert total > 0  # the case puts NaN where rows attend it


@pytest.mark.parametrize("world", [2, 4])
def test_cases_cover_local_and_spanning_branches(world):
    spans = {b.span for name in cases(world) for b in _plan(name, world).branches}
    assert {1, 2} <= spans and (world == 2 or 4 in spans)
    assert any(b.padding_rows for b in _plan("gqa", world).branches)  # l % r != 0


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", list(cases(2)))
def test_bytes_communicated_equal_the_plan(reports, world, name):
    plan = _plan(name, world)
    forward, backward = plan.forward_total(), plan.backward_total()
    check = plan.check()
    for report in reports[world]:
        measured = report["cases"][name]
        assert measured["check"] == check.sent_bytes
        assert measured["forward"] == [forward.sent_bytes - check.sent_bytes,
                                       forward.received_bytes - check.received_bytes]
        assert measured["backward"] == [backward.sent_bytes, backward.received_bytes]
        spanning = sum(not b.local for b in plan.branches)
        assert measured["ops"] == ["all_gather"] * (1 + spanning) + ["all_to_all"] * spanning


def test_bytes_per_rank_stay_constant_as_n_and_p_double(reports):
    """The paper's constant communication: the geometric schedule at N = 32 P moves the same
    bytes per rank at P = 2 and 4 (measured) and up to 64 (planned); gathering everything grows."""
    measured = [reports[world][0]["cases"]["geometric"] for world in (2, 4)]
    assert measured[0]["forward"] == measured[1]["forward"] != [0, 0]
    assert measured[0]["backward"] == measured[1]["backward"] != [0, 0]
    pattern, (b, h, hkv, _, d) = cases(2)["geometric"]
    data, everything = [], []
    for world in (2, 4, 8, 16, 32, 64):
        plan = build_plan(pattern, 32 * world, world, heads=h, kv_heads=hkv, head_dim=d, batch=b,
                          dtype=torch.float64)
        data.append(sum(plan.forward(branch).sent_bytes for branch in plan.branches))
        everything.append(plan.gather_everything()[0].sent_bytes)
    assert data == [measured[0]["forward"][0]] * len(data)
    assert all(later > earlier for earlier, later in zip(everything, everything[1:], strict=False))


@pytest.mark.parametrize("world", [2, 4])
def test_bad_calls_raise_on_every_rank(reports, world):
    expected = {
        "chunk shape": ("InputError", "disagree on local seq_len"),
        "pattern": ("InputError", "disagree on pattern"),
        "dtype": ("InputError", "disagree on dtype"),
        "segment inside a chunk": ("PlanError", "branch 0 (dilated w="),
        "window": ("PlanError", "window branches are not supported distributed yet"),
    }
    for rank, report in enumerate(reports[world]):
        for case, (kind, text) in expected.items():
            assert report["errors"][case][0] == kind, (case, rank, report["errors"][case])
            assert text in report["errors"][case][1], (case, rank, report["errors"][case])
        got = report["errors"]["one rank's bad tensor"]
        assert got[0] == ("InputError" if rank == 0 else "DistributedError")
        assert ("" if rank == 0 else "rank 0 failed: InputError: ") + "q must be 4-D" in got[1]
        got = report["errors"]["one rank's step raises"]
        assert got[0] == ("RuntimeError" if rank == world - 1 else "DistributedError")
        assert got[1].endswith("injected failure in the forward" if rank == world - 1 else
                               f"rank {world - 1} failed: RuntimeError: injected failure in the "
                               "forward (no data was exchanged; every rank raises)")
        assert report["errors"]["scale"] == ["ScaleError",
                                             "scale must be a finite number > 0, got 0.0"]
        got = report["errors"]["one rank's scale"]
        assert got[0] == ("ScaleError" if rank == 0 else "DistributedError")
        assert ("" if rank == 0 else "rank 0 failed: ScaleError: ") + \
            "scale must be a finite number > 0, got nan" in got[1]
        assert report["errors"]["timeout"] == [
            "InputError", "timeout must be > 0 seconds and fit a datetime.timedelta, got -1"]
        assert max(report["after errors"]["diffs"].values()) < TOL


@pytest.mark.parametrize("world", [2, 4])
def test_views_with_any_strides_match_contiguous_copies(reports, world):
    for rank, report in enumerate(reports[world]):
        for name, diff in report["strides"].items():
            assert diff < TOL, f"{name} views, rank {rank} of {world}: off by {diff:.3g}"


FAULT_TIMEOUT = 2.0  # seconds each collective may wait in the fault tests


def _faults(rank: int, world: int) -> dict[str, tuple[str, str, float]]:
    """Ranks that fail later than the check, never call in or exit: each on a fresh group (a
    timed-out collective leaves its group unusable); (error, message, seconds) per case."""
    pattern, shape = cases(world)["lm-causal"]  # spans 2 ranks (and 4 with 4)
    n = shape[3] // world
    q, k, v, do = (t[:, :, rank * n:(rank + 1) * n].clone() for t in _inputs(shape))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    silent = 1

    def backward_raises(group) -> None:
        out = distributed_attention(q, k, v, pattern, group=group, timeout=FAULT_TIMEOUT)
        _raising(rank == world - 1, "backward", lambda: out.backward(do))

    def never_calls(group) -> None:
        if rank == silent:
            time.sleep(FAULT_TIMEOUT + 0.5)
        else:
            distributed_attention(q, k, v, pattern, group=group,
                                  timeout=timedelta(seconds=FAULT_TIMEOUT))

    def exits(group) -> None:
        if rank == world - 1:
            raise SystemExit  # the worker writes its report and exits
        distributed_attention(q, k, v, pattern, group=group, timeout=FAULT_TIMEOUT)

    report = {}
    for name, case in (("backward raises", backward_raises), ("never calls", never_calls),
                       ("exits", exits)):
        group = dist.new_group(list(range(world)))
        start = time.monotonic()
        try:
            case(group)
            report[name] = ("no error", "", time.monotonic() - start)
        except SystemExit:
            break
        except Exception as error:
            report[name] = (type(error).__name__, str(error), time.monotonic() - start)
    return report


@pytest.mark.parametrize("world", [2, 4])
def test_a_failed_or_missing_rank_raises_within_the_timeout(reports, world):
    for rank, report in enumerate(reports[world]):
        faults = report["faults"]
        kind, text, seconds = faults["backward raises"]
        if rank == world - 1:
            assert (kind, text) == ("RuntimeError", "injected failure in the backward")
        else:
            assert kind == "CollectiveError", (rank, text)
            assert f"rank {rank}: the backward all-to-all of branch " in text
            # with 4 ranks, rank 2 waits in branch 2's subgroup {2, 3}, 0 and 1 in branch 3's
            waits = {0: "ranks 1, 2, 3", 1: "ranks 0, 2, 3"} if world == 4 else {}
            waits = waits.get(rank, f"rank {world - 1} (it")
            assert f" timed out after {FAULT_TIMEOUT:g} s waiting on {waits}" in text
            assert FAULT_TIMEOUT - 0.5 < seconds < FAULT_TIMEOUT + 4
        kind, text, seconds = faults["never calls"]
        if rank != 1:
            assert kind == "CollectiveError", (rank, text)
            assert f"rank {rank}: the metadata check timed out after 2 s waiting on rank" in text
            assert FAULT_TIMEOUT - 0.5 < seconds < FAULT_TIMEOUT + 4
        if rank != world - 1:
            kind, text, seconds = faults["exits"]
            assert kind == "CollectiveError", (rank, text)
            assert f"rank {rank}: the metadata check " in text
            assert seconds < FAULT_TIMEOUT + 4


def test_plan_errors_without_a_process_group():
    pattern = _pattern("lm", True, LM)
    with pytest.raises(PlanError, match="not divisible by the world size"):
        build_plan(pattern, 64, 3, heads=4)
    with pytest.raises(PlanError, match=r"branch 1 \(dilated w=16 r=2\).*l=24 .*24 % 16 != 0"):
        build_plan(pattern, 96, 4, heads=4)
    with pytest.raises(PlanError, match=r"branch 2 \(dilated w=48 r=1\).*N=64.*64 % 48 != 0"):
        build_plan(_pattern("t", False, [{"segment": 8, "dilation": 1}] * 2 +
                            [{"segment": 48, "dilation": 1}]), 64, 4, heads=4)
    with pytest.raises(PlanError, match="overlap: union is not supported"):
        build_plan(_pattern("u", False, LM, overlap="union"), 64, 2, heads=4)
    for i, (kind, branch) in enumerate((("strided", {"stride": 4}),
                                        ("random", {"block": 8, "blocks": 2, "seed": 0}))):
        with pytest.raises(PlanError, match=rf"branch {i + 1} \({kind}\): {kind} branches are "
                                            "not supported distributed yet"):
            build_plan(_pattern(kind, True, [{"segment": 8, "dilation": 1}] * (i + 1) +
                                [{kind: branch}]), 64, 2, heads=4)
    with pytest.raises(InputError, match="not initialized"):
        distributed_attention(*_inputs((1, 4, 4, 64, 8))[:3], pattern)


def test_plan_rows_are_the_rows_each_rank_holds():
    """The plan's per-position row counts, against the positions selected by brute force."""
    pattern = _pattern("gqa", False, GQA)
    plan = build_plan(pattern, 96, 4, heads=6, kv_heads=2, head_dim=8)
    for branch in plan.branches:
        for p in range(branch.span):
            for s in set(branch.offsets):
                tokens = [t for t in range(p * 24, (p + 1) * 24) if t % branch.dilation == s]
                assert branch.row_count(p, s) == len(tokens)
                if tokens:
                    assert branch.first_row(p, s) == tokens[0] - p * 24
        for (_, s), rows in zip(branch.combos, branch.combo_rows, strict=True):
            assert rows == max(branch.row_count(p, s) for p in range(branch.span))


def test_one_rank_keeps_every_branch_local():
    """With P = 1 nothing spans and a short last segment is fine, as in one process."""
    plan = build_plan(_pattern("lm", True, LM), 40, 1, heads=4)
    assert all(b.local for b in plan.branches)
    assert plan.forward_total().sent_bytes == plan.backward_total().sent_bytes == 0
