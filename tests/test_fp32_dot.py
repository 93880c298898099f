"""float32 inputs on tensor cores: the generated kernels' `tl.dot` mode (SPATTN_FP32_DOT), its
accuracy (emulated; the Triton interpreter ignores the mode) and its instructions (compiled for
sm_90 without a GPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import spattn
from spattn.runtime.generated import dot_precision

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from fp32_dot_accuracy import attention  # noqa: E402


def test_default_is_tf32x3_and_ieee_is_an_option(monkeypatch):
    monkeypatch.delenv("SPATTN_FP32_DOT", raising=False)
    assert dot_precision(torch.float32) == "tf32x3"
    assert dot_precision(torch.float16) == dot_precision(torch.bfloat16) == "tf32"
    monkeypatch.setenv("SPATTN_FP32_DOT", "ieee")
    assert dot_precision(torch.float32) == "ieee"
    monkeypatch.setenv("SPATTN_FP32_DOT", "fast")
    with pytest.raises(spattn.SpattnError, match="SPATTN_FP32_DOT must be one of"):
        dot_precision(torch.float32)


def test_tf32x3_is_about_as_accurate_as_float32():
    """FlashAttention's rule: at most about 2x the error of the float32 computation."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 2048, 64, generator=gen) for _ in range(3))
    want = attention(q.double(), k.double(), v.double(), "ieee")
    error = {mode: float((attention(q, k, v, mode).double() - want).abs().max())
             for mode in ("ieee", "tf32x3", "tf32")}
    assert error["tf32x3"] <= 2 * error["ieee"]
    assert error["tf32"] > 20 * error["ieee"]  # one TF32 product is not


def test_float32_kernels_use_tensor_cores_on_sm_90(capsys):
    from spattn.cli.main import main

    assert main(["check", "dense-causal", "--target", "sm_90", "--dtype", "fp32",
                 "--head-dim", "64"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.endswith(", 0 without tensor cores"), last
