"""Launch configurations: the committed table covers every kernel on sm_80 and sm_90, launchers
use it, tuning picks among its candidates without changing a result, and flash-decoding's
chunks merge exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch
from generated_cases import inputs
from reference import reference_attention

import spattn
from spattn.runtime import configs, generated, tuning
from spattn.runtime.configs import FALLBACK, INTERPRETED, LaunchConfig

KERNELS = [(f"{kind}_rows", mode) for kind in ("dilated", "window", "global", "random")
           for mode in ("fwd", "bwd")]
KERNELS += [(f"{kind}_cols", "bwd") for kind in ("dilated", "window", "global", "random")]
KERNELS += [("decode_rows", "decode")]
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

PATTERN = spattn.Pattern.model_validate({
    "name": "tuned", "causal": True,
    "branches": [{"segment": 32, "dilation": 2}, {"window": {"size": 24}}]})


@pytest.mark.parametrize("capability", [80, 90])
def test_the_table_covers_every_kernel(capability):
    for dtype in DTYPES:
        for head_dim in (64, 128):
            for kernel, mode in KERNELS:
                with configs.recording(capability):
                    rows = configs.candidates(kernel, mode, torch.device("meta"), dtype,
                                              head_dim)
                where = configs.cell(capability, dtype, head_dim, kernel, mode)
                assert rows and rows != [FALLBACK], f"{where}: not in the table"
                for config in rows:
                    assert config.block_m in (16, 32, 64, 128), where
                    assert config.block_n in (16, 32, 64, 128), where
                    assert config.num_warps in (1, 2, 4, 8) and config.num_stages >= 1, where


def test_cells_by_head_dim_and_architecture():
    assert configs.cell(90, torch.float16, 40, "_window_rows", "fwd") == \
        "sm_90/fp16/64/window_rows/fwd"
    assert configs.cell(80, torch.float32, 96, "dilated_cols", "bwd") == \
        "sm_80/fp32/128/dilated_cols/bwd"
    with configs.recording(90):  # head dims past the table: small tiles
        assert configs.candidates("dilated_rows", "fwd", torch.device("meta"), torch.float16,
                                  256) == [FALLBACK]
    with configs.recording(86):  # less shared memory than an A100: small tiles first
        rows = configs.candidates("dilated_rows", "fwd", torch.device("meta"), torch.float16, 64)
        with configs.recording(80):
            a100 = configs.candidates("dilated_rows", "fwd", torch.device("meta"),
                                      torch.float16, 64)
        assert rows == [FALLBACK, *a100]
    # the interpreter: numpy tiles, whatever the dtype
    assert configs.candidates("dilated_rows", "fwd", torch.device("cpu"), torch.float32,
                              128) == [INTERPRETED]


def _grads(q, k, v, d_out):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = spattn.attention(*leaves, PATTERN, backend="triton")
    return (out, *torch.autograd.grad(out, leaves, d_out))


def test_tuning_keeps_the_fastest_and_results_exact(monkeypatch, tmp_path):
    options = [LaunchConfig(16, 16, 4, 1), LaunchConfig(32, 16, 4, 1), LaunchConfig(16, 32, 4, 1)]
    timings = []

    def timer(run):
        run()  # runs twice, as a real timer would: tuning must undo what the runs add
        run()
        timings.append(1)
        return 3.0 - (len(timings) - 1) % 3  # the last option of each tuning is the fastest

    monkeypatch.setattr(tuning, "candidates", lambda *args: options)
    monkeypatch.setattr(tuning, "tuning_enabled", lambda device: True)
    monkeypatch.setattr(tuning, "_timer", timer)
    monkeypatch.setenv("SPATTN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_CHOSEN", {})
    q, k, v = inputs(1, 4, 2, 70, 16, seed=3)
    d_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    got = _grads(q, k, v, d_out)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    out = reference_attention(*leaves, PATTERN)
    want = (out, *torch.autograd.grad(out, leaves, d_out.double()))
    for name, a, b in zip("O dQ dK dV".split(), got, want, strict=True):
        assert (a.double() - b).abs().max().item() < 2e-4 * max(1.0, b.abs().max().item()), name
    # 2 branches: rows forward, rows backward and columns each; 3 options timed per launch
    assert len(timings) == 6 * 3
    stored = json.loads(tuning.cache_path(q.device).read_text())
    assert len(stored) == 6 and all(row == [16, 32, 4, 1] for row in stored.values())
    assert all(key.startswith(PATTERN.content_hash()) for key in stored)
    # a new process reads the choices back instead of timing again
    monkeypatch.setattr(tuning, "_CHOSEN", {})
    again = _grads(q, k, v, d_out)
    assert len(timings) == 18
    for a, b in zip(got, again, strict=True):
        assert torch.equal(a, b)


def test_tuning_times_a_part_of_the_launch_and_keys_on_size_buckets():
    """Tuning runs the programs of the first (batch, head) items that fill the GPU a few times,
    so it saves and restores only their rows, never a whole accumulator; choices are shared by
    calls of nearby sizes."""
    grid, items = tuning._part((10, 65535, 3), 132)  # B*H = 196605 folded into axes 1 and 2
    assert items == -(-tuning.TIMED_WAVES * 132 // 10) and grid == (10, items, 1)
    assert tuning._part((100_000, 4, 1), 132) == ((100_000, 1, 1), 1)  # one item fills it
    assert tuning._part((2, 3, 1), 132) == ((2, 3, 1), 3)  # fewer items than that: all of them
    q = torch.empty((3, 5, 1, 64))
    keys = {tuning._key("h", "dilated_rows", "fwd", t, n, {"CAUSAL": True}) for t, n in
            ((q, 1000), (torch.empty((2, 8, 1, 64)), 1024), (torch.empty((16, 1, 1, 64)), 513))}
    assert len(keys) == 1, keys
    assert tuning._key("h", "dilated_rows", "fwd", q, 1025, {}) != tuning._key(
        "h", "dilated_rows", "fwd", q, 1024, {})


def test_tuning_is_off_without_a_gpu_or_when_asked(monkeypatch):
    assert not tuning.tuning_enabled(torch.device("cpu"))
    monkeypatch.setenv("SPATTN_TUNE", "0")
    assert not tuning.tuning_enabled(torch.device("cuda", 0))


def test_decode_chunks_fill_the_machine():
    with configs.recording(90):  # an H100's 132 SMs, 128-key granules
        chunk = generated.decode_chunk(torch.device("meta"), 100_000, 8)
        assert chunk % 128 == 0 and math.ceil(100_000 / chunk) * 8 >= 2 * 132
        assert generated.decode_chunk(torch.device("meta"), 100, 8) == 128  # one chunk
        assert generated.decode_chunk(torch.device("meta"), 100_000, 10_000) == 100_096
    # the interpreter pretends to have 4 SMs and 16-key granules, so tests merge chunks
    assert generated.decode_chunk(torch.device("cpu"), 40, 2) == 16


def test_merging_chunks_weighs_each_by_its_lse():
    out = torch.randn(1, 1, 2, 3, 4)
    lse = torch.tensor([[[[0.0, -math.inf, 1.0], [-math.inf] * 3]]])
    merged = generated.merge_splits(out, lse)
    w = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    assert torch.allclose(merged[0, 0, 0], w[0] * out[0, 0, 0, 0] + w[1] * out[0, 0, 0, 2])
    assert torch.equal(merged[0, 0, 1], torch.zeros(4))  # no chunk gave the row a key
    assert torch.equal(generated.merge_splits(out[:, :, :, :1], lse[..., :1]),
                       out[:, :, :, 0])
