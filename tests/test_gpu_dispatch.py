"""What a CUDA call runs: plain dense attention goes to torch's SDPA (its flash kernel) on either
backend; the generated kernels serve it only under the interpreter, where they are tested."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import spattn
from spattn.runtime import dispatch


def test_a_dense_call_on_cuda_is_sdpa_on_the_triton_backend_too(monkeypatch):
    """The choice itself, for a CUDA call shape (no device needed: nothing runs)."""
    monkeypatch.setattr(dispatch, "pick_backend", lambda call, pattern, backend: "triton")
    pattern = spattn.load_pattern("dense-causal")
    sizes = (1, 4, 4, 4096, 64)
    for device, dense in ((torch.device("cuda", 0), True), (torch.device("cpu"), None)):
        name, _, _, got = dispatch._choose_anew(pattern, sizes, torch.bfloat16, device, False,
                                                None, None)
        assert (name, got) == ("triton", dense)
    window = spattn.load_pattern("sliding-window")  # 4096 wide: dense causal up to 4096 tokens
    assert dispatch._choose_anew(window, (1, 4, 4, 8192, 64), torch.bfloat16,
                                 torch.device("cuda", 0), False, None, None)[3] is None


@pytest.mark.gpu
def test_dense_patterns_on_cuda_call_sdpa(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(kwargs.get("is_causal"))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counted)
    q, k, v = (torch.randn(1, 4, 1024, 64, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    out = spattn.attention(q, k, v, "dense-causal")
    assert calls == [True]
    torch.testing.assert_close(out, real(q, k, v, is_causal=True))
