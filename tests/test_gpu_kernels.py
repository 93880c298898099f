"""The generated kernels in half precision on a GPU: every built-in scaled down, the odd sizes and
decoding, float16 and bfloat16, output and gradients against the float64 reference (the float32
cases run in test_triton_kernels.py and test_decode.py). Skipped without CUDA: the interpreter
is slow in float16 and mishandles bfloat16. scripts/gpu_session.sh runs them first."""

from __future__ import annotations

import pytest
import torch
from generated_cases import DEVICE, ODD_SIZES, scaled
from reference import reference_attention
from test_decode import TRITON_CASES
from test_triton_kernels import TOLERANCE, _check

import spattn
from spattn.patterns.loader import builtin_names

pytestmark = pytest.mark.gpu
HALF = pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16],
                               ids=["float16", "bfloat16"])


@pytest.fixture(autouse=True)
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPATTN_CACHE_DIR", str(tmp_path / "cache"))


@HALF
@pytest.mark.parametrize("name", builtin_names())
def test_builtins_scaled_down_in_half_precision(name, dtype):
    # as test_builtin_patterns_scaled_down, at a head dim of 64 (tensor-core tiles)
    _check(scaled(name, 8 if name == "bigbird" else 64), (1, 4, 2, 160, 64), dtype=dtype)


@HALF
@pytest.mark.parametrize("pattern,shape", ODD_SIZES.values(), ids=ODD_SIZES.keys())
def test_odd_sizes_in_half_precision(pattern, shape, dtype):
    _check(pattern, shape, dtype=dtype)


@HALF
@pytest.mark.parametrize("dim", [64, 128])
def test_longnet_head_dims_in_half_precision(dim, dtype):
    _check(scaled("longnet-lm", 32), (2, 4, 2, 300, dim), dtype=dtype)


@HALF
@pytest.mark.parametrize("name", TRITON_CASES)
def test_generated_decode_kernel_in_half_precision(name, dtype):
    pattern = TRITON_CASES[name]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 70, 64, generator=gen) for h in (4, 2, 2))
    want = reference_attention(q.double(), k.double(), v.double(), pattern)
    cache = spattn.KVCache(pattern, backend="triton")
    q, k, v = (t.to(DEVICE, dtype) for t in (q, k, v))
    done = 0
    for size in [9, 1, 1, 4, 1, 30, 1, 23]:
        out = cache.attend(q[:, :, done:done + size], k[:, :, done:done + size],
                           v[:, :, done:done + size])
        assert out.dtype == dtype
        error = (out.double().cpu() - want[:, :, done:done + size]).abs().max().item()
        bound = TOLERANCE[dtype] * max(1.0, want.abs().max().item())
        assert error < bound, f"tokens {done}..{done + size}: max abs error {error:.2e}"
        done += size
