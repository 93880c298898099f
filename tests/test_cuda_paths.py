"""What only a GPU runs, checked on CPU where its logic can be, and on a GPU (`gpu` tests) where
only a GPU can show it:

- the torch backend on CUDA runs torch's fused flash / efficient kernels with LSE (emulated
  here by stand-ins that check every layout rule the real kernels have and report the
  conventions they do: padded LSE rows, garbage in rows with no key);
- a KV cache decodes without host syncs in the steady state, and a step can be captured in a
  CUDA graph;
- kernel launches happen under the tensors' own CUDA device.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from reference import reference_attention

import spattn
from spattn.patterns.report import scale_pattern
from spattn.runtime import cached, kernels, ops
from spattn.runtime.kernels import Mask, attend, attend_backward, cuda_kernel

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}  # test_attention
NAN = float("nan")


@pytest.fixture(autouse=True)
def cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SPATTN_CACHE_DIR", str(tmp_path / "cache"))


# ---- which kernel takes a call ---------------------------------------------------------------


@pytest.mark.parametrize("dtype,dim,mq,mk,causal,masked,capability,backward,want", [
    (torch.bfloat16, 64, 128, 128, True, False, (9, 0), False, "flash"),
    (torch.float16, 256, 10, 30, False, False, (8, 0), True, "flash"),
    (torch.bfloat16, 64, 128, 128, False, True, (9, 0), False, "efficient"),  # a mask
    (torch.float32, 64, 128, 128, True, False, (9, 0), False, "efficient"),  # fp32
    (torch.float32, 4, 7, 9, False, True, (7, 5), False, "efficient"),  # 16-byte rows
    (torch.float16, 64, 128, 128, False, False, (7, 5), False, "efficient"),  # pre-sm80
    (torch.float16, 256, 64, 64, False, False, (8, 6), True, None),  # smem of sm86: neither
    (torch.float16, 256, 64, 64, False, False, (8, 6), False, "flash"),
    (torch.float16, 160, 64, 64, False, True, (8, 9), True, None),
    (torch.float16, 12, 64, 64, False, False, (9, 0), False, None),  # D % 8 != 0
    (torch.float32, 6, 64, 64, False, False, (9, 0), False, None),  # D % 4 != 0
    (torch.float32, 512, 64, 64, False, False, (9, 0), False, None),  # D > 256
    (torch.float64, 64, 64, 64, False, False, (9, 0), False, None),  # float64
    (torch.bfloat16, 64, 3, 64, True, False, (9, 0), False, None),  # causal, Mq != Mk
    (torch.bfloat16, 64, 0, 64, False, False, (9, 0), False, None),  # nothing to do
], ids=str)
def test_which_cuda_kernel_takes_a_call(dtype, dim, mq, mk, causal, masked, capability, backward,
                                        want):
    assert cuda_kernel(dtype, dim, mq, mk, causal, masked, capability, backward) == want


def test_cpu_and_forced_math_choices():
    x = torch.zeros(1, 1, 4, 8)
    assert kernels.kernel_for(x, x, False, False) == "cpu"
    assert kernels.kernel_for(x, x, False, False, force_math=True) is None
    meta = x.to("meta")  # neither CPU nor CUDA: the fallback
    assert kernels.kernel_for(meta, meta, False, False) is None


# ---- stand-ins for torch's CUDA kernels ------------------------------------------------------


def _check_rows(*tensors):
    """The real kernels load rows in 16-byte vectors: unit last stride, other strides and the
    start on 16-byte boundaries."""
    for t in tensors:
        align = 16 // t.element_size()
        assert t.stride(-1) == 1 and t.data_ptr() % 16 == 0, t.stride()
        assert all(s % align == 0 for s, n in zip(t.stride()[:-1], t.shape[:-1], strict=True)
                   if n > 1), t.stride()


def _check_grid(q):
    assert q.shape[0] <= kernels.MAX_GRID and q.shape[1] <= kernels.MAX_GRID, q.shape


def _check_bias(bias, q, k):
    if bias is None:
        return
    assert bias.shape == (*q.shape[:3], k.shape[2]) and bias.dtype == q.dtype
    _check_rows(bias)


def _scores(q, k, bias, causal, scale):
    s = scale * q.double() @ k.double().transpose(-1, -2)
    if bias is not None:
        s = s + bias.double()
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return s


def _forward64(q, k, v, bias, causal, scale):
    """What a kernel that does not guard empty rows computes: NaN there."""
    s = _scores(q, k, bias, causal, scale)
    lse = s.logsumexp(-1)
    return torch.exp(s - lse.unsqueeze(-1)) @ v.double(), lse


def _backward64(do, q, k, v, out, lse, bias, causal, scale):
    s = _scores(q, k, bias, causal, scale)
    p = torch.exp(s - lse[..., :q.shape[2]].double().unsqueeze(-1))
    delta = (do.double() * out.double()).sum(-1, keepdim=True)
    ds = p * (do.double() @ v.double().transpose(-1, -2) - delta)
    return (scale * ds @ k.double(), scale * ds.transpose(-1, -2) @ q.double(),
            p.transpose(-1, -2) @ do.double())


class FakeKernels:
    """Stand-ins with the real ops' signatures and conventions, counting their calls."""

    def __init__(self):
        self.calls = {"flash": 0, "flash_backward": 0, "efficient": 0, "efficient_backward": 0}

    def flash(self, q, k, v, dropout_p, is_causal, return_debug_mask, *, scale):
        self.calls["flash"] += 1
        assert q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0
        assert dropout_p == 0.0 and not return_debug_mask
        _check_rows(q, k, v)
        _check_grid(q)
        out, lse = _forward64(q, k, v, None, is_causal, scale)
        b, s, mq, d = q.shape  # flash writes (B, Mq, S, D) memory
        o = torch.empty((b, mq, s, d), dtype=q.dtype).transpose(1, 2).copy_(out)
        return (o, lse.float(), None, None, mq, k.shape[2], torch.empty(2, dtype=torch.int64),
                torch.empty((), dtype=torch.int64), torch.empty(0, dtype=q.dtype))

    def flash_backward(self, do, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, dropout_p,
                       is_causal, seed, offset, *, scale):
        self.calls["flash_backward"] += 1
        assert cum_q is None and cum_k is None and (max_q, max_k) == (q.shape[2], k.shape[2])
        assert out.dtype == do.dtype == q.dtype and dropout_p == 0.0
        assert lse.dtype == torch.float32 and lse.is_contiguous() and lse.shape == q.shape[:3]
        _check_rows(do, q, k, v, out)
        _check_grid(q)
        return tuple(g.to(q.dtype) for g in _backward64(do, q, k, v, out, lse, None, is_causal,
                                                         scale))

    def efficient(self, q, k, v, bias, compute_log_sumexp, dropout_p, is_causal, *, scale):
        self.calls["efficient"] += 1
        assert compute_log_sumexp and dropout_p == 0.0
        assert q.dtype in (torch.float16, torch.bfloat16, torch.float32)
        _check_rows(q, k, v)
        _check_bias(bias, q, k)
        _check_grid(q)
        out, lse = _forward64(q, k, v, bias, is_causal, scale)
        padded = torch.full((*lse.shape[:2], math.ceil(lse.shape[2] / 32) * 32), NAN)
        padded[..., :lse.shape[2]] = lse
        return out.to(q.dtype), padded, torch.empty(()), torch.empty(())

    def efficient_backward(self, do, q, k, v, bias, out, lse, seed, offset, dropout_p,
                           grad_input_mask, is_causal, *, scale):
        self.calls["efficient_backward"] += 1
        assert list(grad_input_mask) == [True, True, True, False] and dropout_p == 0.0
        assert lse.dtype == torch.float32 and lse.shape[:2] == q.shape[:2] \
            and lse.shape[2] == math.ceil(q.shape[2] / 32) * 32
        _check_rows(q, k, v)
        _check_bias(bias, q, k)
        _check_grid(q)
        grads = _backward64(do, q, k, v, out, lse, bias, is_causal, scale)
        return (*(g.to(q.dtype) for g in grads), None)


@pytest.fixture
def fake_cuda(monkeypatch):
    """CPU tensors take the CUDA branch (an sm90 device) and the stand-in kernels."""
    fake = FakeKernels()
    monkeypatch.setattr(kernels, "FLASH_FORWARD", fake.flash)
    monkeypatch.setattr(kernels, "FLASH_BACKWARD", fake.flash_backward)
    monkeypatch.setattr(kernels, "EFFICIENT_FORWARD", fake.efficient)
    monkeypatch.setattr(kernels, "EFFICIENT_BACKWARD", fake.efficient_backward)
    real = kernels.kernel_for

    def kernel_for(q, k, causal, masked, force_math=False, backward=False):
        if force_math or q.device.type != "cpu":
            return real(q, k, causal, masked, force_math, backward)
        return cuda_kernel(q.dtype, q.shape[-1], q.shape[2], k.shape[2], causal, masked, (9, 0),
                           backward)

    monkeypatch.setattr(kernels, "kernel_for", kernel_for)
    return fake


def _exact(q, k, v, bias, causal, scale):
    """Float64 attention with the contract (no key: O = 0, LSE = -inf), differentiable."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = _scores(q, k, bias, causal, scale)
    lse = s.logsumexp(-1)
    has = lse > float("-inf")
    p = torch.softmax(torch.where(has.unsqueeze(-1), s, 0.0), -1)
    return (q, k, v), torch.where(has.unsqueeze(-1), p @ v, 0.0), lse


def _masks(s, mq, mk, kind, dtype, device="cpu"):
    """A mask of some allowed pairs (per S entry, or one shared), query row 1 of entry 0 with
    no key; "counts": a multiset's log(count) added to the scores."""
    gen = torch.Generator().manual_seed(3)
    if kind is None:
        return None
    allowed = torch.rand(s if kind != "shared" else 1, mq, mk, generator=gen) < 0.6
    allowed[0, 1] = False
    if kind == "counts":
        counts = allowed * torch.randint(1, 4, allowed.shape, generator=gen)
        return Mask.of_counts(counts.to(device), dtype)
    return Mask.of(allowed.to(device), dtype)


@pytest.mark.parametrize("dtype,mask_kind,causal,kernel", [
    (torch.bfloat16, None, False, "flash"), (torch.float16, None, True, "flash"),
    (torch.float32, None, True, "efficient"), (torch.float32, "allowed", False, "efficient"),
    (torch.float16, "counts", False, "efficient"), (torch.bfloat16, "shared", True, "efficient"),
], ids=str)
def test_fused_cuda_kernels_forward_and_backward(fake_cuda, dtype, mask_kind, causal, kernel):
    b, s, m, d, scale = 2, 3, 40, 16, 0.3
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, s, m, d, generator=gen).to(dtype) for _ in range(3))
    mask = _masks(s, m, m, mask_kind, dtype)
    bias = None if mask is None else mask.bias.expand(b, -1, -1, -1)
    leaves, want, want_lse = _exact(q, k, v, bias, causal, scale)
    out, lse = attend(q, k, v, scale, causal, mask)
    assert fake_cuda.calls[kernel] == 1 and out.dtype == dtype and lse.dtype == torch.float32
    assert lse.shape == (b, s, m) and out.shape == q.shape
    tol = TOLERANCE[dtype]
    assert (out.double() - want).abs().max() <= tol
    finite = want_lse > float("-inf")
    assert torch.allclose(lse.double()[finite], want_lse[finite], atol=tol, rtol=tol)
    if mask is not None:  # the empty row: exactly 0 and -inf, whatever the kernel left
        assert (out[:, 0, 1] == 0).all() and (lse[:, 0, 1] == float("-inf")).all()
    do = torch.randn(q.shape, generator=gen).to(dtype)
    got = attend_backward(do, q, k, v, want.to(dtype), want_lse.float(), scale, causal, mask)
    assert fake_cuda.calls[kernel + "_backward"] == 1
    expected = torch.autograd.grad(want, leaves, do.double())
    for g, w in zip(got, expected, strict=True):
        assert g.dtype == dtype and torch.isfinite(g).all()
        assert (g.double() - w).abs().max() <= 4 * tol * max(1.0, w.abs().max().item())


def test_misaligned_rows_are_copied_for_the_fused_kernels(fake_cuda):
    """A view whose rows do not start at 16-byte boundaries (D = 8 of a 9-wide tensor) is
    copied; the stand-ins check every layout."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 17, 9, generator=gen).to(torch.bfloat16)[..., :8]
               for _ in range(3))
    assert q.stride(2) == 9
    out, lse = attend(q, k, v, 0.5, False, None)
    want = attend(q, k, v, 0.5, False, None, force_math=True)[0]
    assert fake_cuda.calls["flash"] == 1
    assert (out.double() - want.double()).abs().max() <= TOLERANCE[torch.bfloat16]
    allowed = torch.rand(3, 17, 13, generator=gen) < 0.5  # Mk = 13: a padded bias row
    mask = Mask.of(allowed, torch.float32)
    qf, kf, vf = (t.float() for t in (q, k[:, :, :13], v[:, :, :13]))
    out, _ = attend(qf, kf, vf, 0.5, False, mask)
    ref = attend(qf, kf, vf, 0.5, False, mask, force_math=True)[0]
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_cuda_kernel_calls_match_the_op_schemas():
    """The four ops called as attend calls them, on meta tensors (this torch's schemas and
    shape functions): the shapes and dtypes attend promises."""
    q = torch.empty(2, 3, 40, 64, device="meta", dtype=torch.bfloat16)
    bias = torch.empty(1, 3, 40, 48, device="meta", dtype=torch.bfloat16)[..., :40]
    mask = Mask(torch.empty(3, 40, 40, dtype=torch.bool, device="meta"), bias,
                torch.empty(1, 3, 40, dtype=torch.bool, device="meta"), True)
    for kernel, m in (("flash", None), ("efficient", None), ("efficient", mask)):
        out, lse = kernels._cuda_forward(kernel, q, q, q, 0.1, m is None, m)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert lse.shape == (2, 3, 40) and lse.dtype == torch.float32
        grads = kernels._cuda_backward(kernel, q, q, q, q, out, lse, 0.1, m is None, m)
        assert [(g.shape, g.dtype) for g in grads] == [(q.shape, q.dtype)] * 3


def test_calls_past_the_grid_limit_are_split(fake_cuda, monkeypatch):
    """B and S past CUDA's grid limit (65535; 2 here) run as several kernel calls."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(5, 7, 20, 8, generator=gen) for _ in range(3))
    for mask in (None, _masks(7, 20, 20, "allowed", torch.float32),
                 _masks(7, 20, 20, "shared", torch.float32)):
        whole = attend(q, k, v, 0.4, mask is None, mask)
        do = torch.randn(q.shape, generator=gen)
        grads = attend_backward(do, q, k, v, whole[0], whole[1], 0.4, mask is None, mask)
        with monkeypatch.context() as patch:
            patch.setattr(kernels, "MAX_GRID", 2)
            split = attend(q, k, v, 0.4, mask is None, mask)
            split_grads = attend_backward(do, q, k, v, whole[0], whole[1], 0.4, mask is None,
                                          mask)
        for got, want in zip((*split, *split_grads), (*whole, *grads), strict=True):
            torch.testing.assert_close(got, want, atol=0, rtol=0)


LONGNET = scale_pattern(spattn.load_pattern("longnet-lm"), 256)
MIXED = spattn.Pattern.model_validate({
    "name": "mixed", "causal": True,
    "branches": [{"segment": 16, "dilation": 2}, {"window": {"size": 12}},
                 {"global": {"tokens": [0, 5]}}]})
GAPS = spattn.Pattern.model_validate({  # rows with no key (test_attention.py)
    "name": "gaps", "causal": True,
    "branches": [{"segment": 8, "dilation": 2, "offsets": [1, 1]}, {"global": {"tokens": [5]}}]})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pattern", [LONGNET, MIXED, GAPS], ids=lambda p: p.name)
def test_torch_backend_through_the_fused_cuda_kernels(fake_cuda, pattern, dtype):
    """The whole torch backend with CUDA's kernel choice, forward and backward, against the
    float64 reference."""
    gen = torch.Generator().manual_seed(4)
    shape = (2, 2, 1, 90, 16) if pattern is not GAPS else (1, 2, 2, 12, 16)
    b, h, hkv, n, d = shape
    q = torch.randn(b, h, n, d, generator=gen).to(dtype).requires_grad_()
    k, v = (torch.randn(b, hkv, n, d, generator=gen).to(dtype).requires_grad_()
            for _ in range(2))
    out = spattn.attention(q, k, v, pattern, backend="torch")
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = reference_attention(*leaves, pattern)
    tol = TOLERANCE[dtype]
    assert (out.double() - want).abs().max() <= tol
    grad = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
    expected = torch.autograd.grad(want, leaves, grad.double())
    for g, w in zip(got, expected, strict=True):
        assert (g.double() - w).abs().max() <= 4 * tol * max(1.0, w.abs().max().item())
    assert sum(fake_cuda.calls.values()) > 0


def test_dense_pieces_reach_the_fused_kernels(fake_cuda):
    """A dense pattern with sinks (no SDPA shortcut) runs its one dense piece on flash."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=gen, dtype=torch.bfloat16) for _ in range(3))
    sinks = torch.zeros(2, dtype=torch.bfloat16)
    out = spattn.attention(q, k, v, "dense-causal", backend="torch", sinks=sinks)
    assert fake_cuda.calls["flash"] == 1
    want = reference_attention(q, k, v, spattn.load_pattern("dense-causal"), sinks=sinks)
    assert (out.double() - want).abs().max() <= TOLERANCE[torch.bfloat16]


# ---- the device guard ------------------------------------------------------------------------


def test_on_device_enters_the_tensors_cuda_device(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def device(d):
        entered.append(d)
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    with kernels.on_device(torch.device("cuda", 1)):
        pass
    with kernels.on_device(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)]


def test_entry_points_run_under_the_device_guard(monkeypatch):
    """The ops' forward and backward bodies and decoding enter the guard with q's device."""
    entered = []

    def guard(device):
        entered.append(device)
        return contextlib.nullcontext()

    monkeypatch.setattr(ops, "on_device", guard)
    monkeypatch.setattr(cached, "on_device", guard)
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=gen, requires_grad=True) for _ in range(3))
    spattn.attention(q, k, v, LONGNET).sum().backward()
    assert entered == [torch.device("cpu")] * 2
    cache = spattn.KVCache(LONGNET)
    with torch.no_grad():
        cache.attend(q[:, :, :30], k[:, :, :30], v[:, :, :30])  # the prompt: the op's forward
        cache.attend(q[:, :, 30:31], k[:, :, 30:31], v[:, :, 30:31])  # a step: decode
    assert entered == [torch.device("cpu")] * 4


@pytest.mark.gpu
def test_a_call_on_a_device_that_is_not_current():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 4, 256, 64, generator=gen) for _ in range(3))
    want = spattn.attention(q, k, v, LONGNET)
    with torch.cuda.device(0):
        for backend in ("torch", "triton"):
            got = spattn.attention(*(t.to("cuda:1") for t in (q, k, v)), LONGNET,
                                   backend=backend)
            assert got.device == torch.device("cuda", 1)
            torch.testing.assert_close(got.cpu(), want, atol=2e-4, rtol=2e-4)
        cache = spattn.KVCache(LONGNET, backend="triton")
        steps = [cache.attend(*(t[:, :, i:i + 1].to("cuda:1") for t in (q, k, v)))
                 for i in range(20)]
        torch.testing.assert_close(torch.cat(steps, 2).cpu(), want[:, :, :20], atol=2e-4,
                                   rtol=2e-4)


# ---- decoding without host syncs -------------------------------------------------------------


class Syncs:
    """Records every call that reads device memory back to the host, or brings host data to
    the device, while active: on a GPU each is a sync (or an illegal op in a CUDA graph)."""

    TENSOR = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__",
              "__index__", "nonzero", "unique", "masked_select")
    TORCH = ("nonzero", "unique", "masked_select", "isin", "from_numpy", "tensor", "as_tensor",
             "equal", "is_nonzero")

    def __init__(self, monkeypatch):
        self.seen: list[str] = []
        self.active = False
        for name in self.TENSOR:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name),
                                                               "Tensor." + name))
        for name in self.TORCH:
            monkeypatch.setattr(torch, name, self._wrap(getattr(torch, name), "torch." + name))
        getitem = torch.Tensor.__getitem__

        def indexed(tensor, index):  # a boolean mask as an index: nonzero, a sync
            parts = index if isinstance(index, tuple) else (index,)
            if self.active and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                   for i in parts):
                self.seen.append("boolean index")
            return getitem(tensor, index)

        monkeypatch.setattr(torch.Tensor, "__getitem__", indexed)

    def _wrap(self, fn, name):
        def wrapped(*args, **kwargs):
            if self.active:
                self.seen.append(name)
            return fn(*args, **kwargs)

        return wrapped


STEADY_PATTERNS = {
    "longnet": LONGNET,
    "every-kind": spattn.Pattern.model_validate({  # every branch kind, per-head, union
        "name": "every", "causal": True, "overlap": "union",
        "branches": [{"segment": 16, "dilation": 2, "offsets": [1, 0, 0, 1]},
                     {"window": {"size": 6}, "heads": [0, 2]}, {"global": {"tokens": [0, 9]}},
                     {"strided": {"stride": 5}}, {"random": {"block": 4, "blocks": 2, "seed": 3}},
                     {"dense": {}, "heads": [3]}]}),
}


@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("name", STEADY_PATTERNS)
def test_steady_state_decoding_has_no_host_sync(monkeypatch, name, sinks):
    pattern = STEADY_PATTERNS[name]
    gen = torch.Generator().manual_seed(8)
    n, prompt = 128, 70
    q = torch.randn(1, 4, n, 8, generator=gen)
    k, v = (torch.randn(1, 2, n, 8, generator=gen) for _ in range(2))
    s = torch.randn(4, generator=gen) if sinks else None
    want = reference_attention(q, k, v, pattern, sinks=s)
    cache = spattn.KVCache(pattern, backend="torch")
    syncs = Syncs(monkeypatch)
    outs = [cache.attend(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], sinks=s)]
    steady = 0
    for i in range(prompt, n):  # table_length stays 128: one set of device tables
        # steady: not the first step (it builds the tables), no growth or compaction
        syncs.active = i > prompt and cache._used < cache.capacity
        steady += syncs.active
        outs.append(cache.attend(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], sinks=s))
        syncs.active = False
    assert steady >= 20
    assert syncs.seen == []
    torch.testing.assert_close(torch.cat(outs, 2), want.float(), atol=2e-5, rtol=2e-5)


def test_predicates_match_the_geometry():
    """cached._allows (device tables) against Geometry.allows_heads, every kind."""
    from spattn.patterns.geometry import resolve

    pattern = STEADY_PATTERNS["every-kind"]
    for n in (16, 64, 128):
        qpos = torch.arange(n)[:, None]
        kpos = torch.arange(n)[None, :]
        for g in resolve(pattern, n, 4):
            got = cached._allows(g, 4, qpos, kpos).expand(4, n, n)
            assert torch.equal(got, g.allows_heads(4, qpos, kpos)), g


def _bad_rows(x):
    return torch.isnan(x).any(-1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cache_tracks_non_finite_inputs_on_the_device(backend):
    """NaN or inf in q, k or v reaches exactly the rows the full forward gives it, with the
    tracking on the device; the cache reads those keys back as NaN."""
    pattern = scale_pattern(spattn.load_pattern("longnet-lm"), 1024)
    gen = torch.Generator().manual_seed(9)
    n = 40
    q = torch.randn(1, 4, n, 16, generator=gen)
    k, v = (torch.randn(1, 2, n, 16, generator=gen) for _ in range(2))
    v[0, 0, 7, 2] = NAN  # in the prompt
    k[0, 1, 25, 0] = float("inf")  # decoded
    q[0, 2, 30, 3] = NAN
    full = spattn.attention(q, k, v, pattern, backend="torch")
    cache = spattn.KVCache(pattern, backend=backend)
    outs = [cache.attend(q[:, :, :20], k[:, :, :20], v[:, :, :20])]
    outs += [cache.attend(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1])
             for i in range(20, n)]
    steps = torch.cat(outs, 2)
    assert torch.equal(_bad_rows(steps), _bad_rows(full))
    assert _bad_rows(full)[0, :2, 7:].any() and not _bad_rows(full).all()
    good = ~_bad_rows(full)
    torch.testing.assert_close(steps[good], full[good], atol=2e-4, rtol=2e-4)
    kept = cache.positions.tolist()
    if 25 in kept:
        assert torch.isnan(cache.keys[0, 1, kept.index(25)]).all()


def test_unchecked_cache_decodes_finite_inputs_the_same():
    gen = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(1, 2, 50, 8, generator=gen) for _ in range(3))
    checked, unchecked = spattn.KVCache(LONGNET), spattn.KVCache(LONGNET, check_finite=False)
    for cache in (checked, unchecked):
        cache.attend(q[:, :, :10], k[:, :, :10], v[:, :, :10])
    for i in range(10, 50):
        a = checked.attend(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1])
        b = unchecked.attend(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1])
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert unchecked._bad is None
    assert checked.memory_bytes - unchecked.memory_bytes == checked.capacity * 2  # B * Hkv


# ---- on a GPU --------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,mask_kind,causal,kernel", [
    (torch.bfloat16, None, True, "flash"), (torch.float16, None, False, "flash"),
    (torch.float32, None, True, "efficient"), (torch.float32, "allowed", False, "efficient"),
    (torch.float16, "counts", False, "efficient"), (torch.bfloat16, "shared", False, "efficient"),
], ids=str)
def test_cuda_kernels_against_float64(dtype, mask_kind, causal, kernel):
    b, s, m, d, scale = 2, 3, 100, 64, 0.125
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, s, m, d, generator=gen).to(dtype) for _ in range(3))
    mask = _masks(s, m, m, mask_kind, dtype)
    bias = None if mask is None else mask.bias.expand(b, -1, -1, -1)
    leaves, want, want_lse = _exact(q, k, v, bias, causal, scale)
    cuda = [t.cuda() for t in (q, k, v)]
    cmask = _masks(s, m, m, mask_kind, dtype, "cuda")
    assert kernels.kernel_for(cuda[0], cuda[1], causal, cmask is not None) == kernel
    out, lse = attend(*cuda, scale, causal, cmask)
    tol = TOLERANCE[dtype]
    assert (out.double().cpu() - want).abs().max() <= tol
    finite = want_lse > float("-inf")
    assert torch.allclose(lse.double().cpu()[finite], want_lse[finite], atol=tol, rtol=tol)
    assert (lse.cpu()[~finite] == float("-inf")).all() and (out.cpu()[~finite] == 0).all()
    do = torch.randn(q.shape, generator=gen).to(dtype)
    got = attend_backward(do.cuda(), *cuda, want.to(dtype).cuda(), want_lse.float().cuda(),
                          scale, causal, cmask)
    for g, w in zip(got, torch.autograd.grad(want, leaves, do.double()), strict=True):
        assert (g.double().cpu() - w).abs().max() <= 4 * tol * max(1.0, w.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("pattern", [LONGNET, MIXED, GAPS], ids=lambda p: p.name)
def test_torch_backend_on_cuda_against_float64(pattern, dtype):
    gen = torch.Generator().manual_seed(4)
    b, h, hkv, n, d = (2, 4, 2, 300, 64) if pattern is not GAPS else (1, 2, 2, 12, 64)
    q = torch.randn(b, h, n, d, generator=gen).to(dtype)
    k, v = (torch.randn(b, hkv, n, d, generator=gen).to(dtype) for _ in range(2))
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    want = reference_attention(*leaves, pattern)
    cuda = [t.cuda().requires_grad_() for t in (q, k, v)]
    out = spattn.attention(*cuda, pattern, backend="torch")
    tol = TOLERANCE[dtype]
    assert (out.double().cpu() - want).abs().max() <= tol
    grad = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, cuda, grad.to(dtype).cuda())
    for g, w in zip(got, torch.autograd.grad(want, leaves, grad.double()), strict=True):
        assert (g.double().cpu() - w).abs().max() <= 4 * tol * max(1.0, w.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_decode_step_in_a_cuda_graph(backend):
    """A steady-state step captured in a CUDA graph and replayed gives the eager step's
    output: the same step of a second cache, fed the same tokens eagerly."""
    gen = torch.Generator().manual_seed(11)
    n, prompt = 100, 70
    q = torch.randn(1, 4, n, 64, generator=gen).cuda()
    k, v = (torch.randn(1, 2, n, 64, generator=gen).cuda() for _ in range(2))
    graphed = spattn.KVCache(LONGNET, backend=backend)
    graphed.attend(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt])
    for i in range(prompt, prompt + 3):  # warm-up: the device tables of this length
        graphed.attend(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1])
    i = prompt + 3
    assert graphed._used < graphed.capacity  # a steady step: no growth, no compaction
    static = [t[:, :, i:i + 1].clone() for t in (q, k, v)]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = graphed.attend(*static)
    for j in (i, i + 1):  # replay: the captured step (slot and position) on new inputs
        for s, t in zip(static, (q, k, v), strict=True):
            s.copy_(t[:, :, j:j + 1])
        graph.replay()
        twin = spattn.KVCache(LONGNET, backend=backend)
        twin.attend(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt])
        for t in range(prompt, i):
            twin.attend(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])
        want = twin.attend(*(t[:, :, j:j + 1] for t in (q, k, v)))
        torch.cuda.synchronize()
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
