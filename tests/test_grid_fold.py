"""Grids of the generated kernels: batch x heads folded into axes 1 and 2, so no axis passes
CUDA's limits (axis 0 < 2^31, axes 1 and 2 <= 65535) at any size the API takes."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from generated_cases import inputs
from reference import reference_attention

import spattn
from spattn.compiler import aot
from spattn.runtime import generated

EVERY_KIND = spattn.Pattern.model_validate({
    "name": "every-kind-fold", "causal": True, "overlap": "union", "branches": [
        {"segment": 256, "dilation": 2}, {"window": {"size": 128}},
        {"global": {"tokens": [0, 5]}}, {"strided": {"stride": 64}},
        {"random": {"block": 64, "blocks": 2, "seed": 1}}, {"dense": {}}]})


def test_fold_keeps_every_axis_in_bounds():
    for count in (0, 1, 65535, 65536, 10**6, 65535**2):
        x, y, z = generated.fold(7, count)
        assert x == 7 and y <= 65535 and z <= 65535 and y * z >= count


@pytest.mark.parametrize("bh", [(70_000, 1), (1, 70_000)])
def test_launches_past_65535_batch_x_heads_stay_in_bounds(bh, monkeypatch):
    """Every launch of forward, backward and decoding, recorded on meta tensors with a GPU's
    tiles, for B*H = 70,000: each grid axis in bounds, every (batch, head) item covered."""
    grids: list[tuple[int, ...]] = []
    batch, heads = bh

    def record(kernel, name, mode, grid, args, meta, **_):
        grids.append(grid(generated.launch_config(name, mode, torch.device("meta"),
                                                  torch.float16, 64)))

    monkeypatch.setattr(generated, "launch", record)
    with tempfile.TemporaryDirectory() as folder:
        module = aot.load_module(aot.render(EVERY_KIND, "folded"), Path(folder) / "folded.py")
        monkeypatch.setattr(module._rt, "launch", record)
        meta = dict(dtype=torch.float16, device="meta")
        q = torch.empty((batch, heads, 512, 64), **meta)
        with generated.recording(90):
            out, lse = module.attention_with_lse(q, q, q)
            module.attention_backward(torch.empty_like(out), q, q, q, out, lse)
            module.decode_attention(q[:, :, :1], q, q, torch.arange(512, device="meta"), 511)
    assert len(grids) > 10
    for x, y, z in grids:
        assert 0 < x < 2**31 and y <= 65535 and z <= 65535 and y * z >= batch * heads


def test_folded_grids_give_the_reference_answer(monkeypatch):
    """With axis 1 capped at 3 (as 65535 is on a GPU), B*H = 8 items fold into 3 x 3 programs,
    one idle: every branch kind still matches the float64 reference, forward and backward."""
    monkeypatch.setattr(generated, "GRID_AXIS", 3)
    q, k, v = inputs(2, 4, 2, 40, 16, seed=5)
    d_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(6))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = spattn.attention(*leaves, EVERY_KIND, backend="triton")
    got = (out, *torch.autograd.grad(out, leaves, d_out))
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*exact, EVERY_KIND)
    want = (ref, *torch.autograd.grad(ref, exact, d_out.double()))
    for name, a, b in zip("O dQ dK dV".split(), got, want, strict=True):
        assert (a.double() - b).abs().max().item() < 2e-4 * max(1.0, b.abs().max().item()), name
