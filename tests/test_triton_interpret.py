"""Generated Triton modules (on CPU, by the Triton interpreter) against the float64 reference:
the forward alone, the compile cache, determinism and atomic writes. Built-ins, random patterns
and odd sizes, forward and backward together, are in test_triton_kernels.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from generated_cases import inputs, scaled
from reference import reference_attention

import spattn
from spattn.compiler.codegen import compile_module, render
from spattn.runtime import triton_backend

TOLERANCE = 2e-4  # float32, unit-normal inputs


@pytest.fixture(autouse=True)
def cache(monkeypatch, tmp_path):
    """Modules compile into a fresh cache; kernels run on the interpreter (tests/conftest.py)."""
    monkeypatch.setenv("SPATTN_CACHE_DIR", str(tmp_path / "cache"))


def _reference(pattern, q, k, v, **kwargs):
    return reference_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), pattern,
                               **kwargs)


def _check(pattern, shape, seed=0):
    q, k, v = inputs(*shape, seed=seed)
    out = spattn.attention(q, k, v, pattern, backend="triton")
    ref = _reference(pattern, q, k, v)
    assert out.dtype == q.dtype and out.shape == q.shape
    error = (out.double().cpu() - ref).abs().max().item() if out.numel() else 0.0
    assert error < TOLERANCE, f"max abs error {error:.2e}"


@pytest.mark.parametrize("dtype,tol", [
    (torch.float16, 4e-3),
    pytest.param(torch.bfloat16, 3e-2, marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="the Triton interpreter mishandles bfloat16")),
], ids=["float16", "bfloat16"])
def test_low_precision(dtype, tol):
    pattern = scaled("longnet-lm", 64)
    q, k, v = inputs(1, 2, 2, 128, 32)
    ref = _reference(pattern, q, k, v)
    out = spattn.attention(q.to(dtype), k.to(dtype), v.to(dtype), pattern, backend="triton")
    assert out.dtype == dtype and (out.double().cpu() - ref).abs().max() < tol


def test_compile_is_deterministic(tmp_path):
    pattern = spattn.load_pattern("longnet-lm")
    first = compile_module(pattern, tmp_path / "a").read_bytes()
    second = compile_module(pattern, tmp_path / "b").read_bytes()
    assert first == second and render(pattern).encode() == first
    header = first.decode().splitlines()
    assert any("spattn-hash: " + pattern.content_hash() in line for line in header[:20])
    assert any("triton-version: " in line for line in header[:20])


def test_emitted_module_imports_only_torch_triton_and_the_runtime():
    import ast

    tree = ast.parse(render(spattn.load_pattern("sink-window")))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported == {"math", "torch", "triton", "triton.language", "spattn.runtime"}


def test_emitted_module_imports_alone_in_a_fresh_process(tmp_path):
    pattern = scaled("sink-window", 64)
    path = compile_module(pattern, tmp_path)
    q, k, v = inputs(1, 2, 1, 100, 16, device="cpu")  # the child runs the interpreter
    torch.save((q, k, v), tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import importlib.util, torch
        spec = importlib.util.spec_from_file_location("emitted", {str(path)!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        q, k, v = torch.load({str(tmp_path / "inputs.pt")!r})
        torch.save(module.attention(q, k, v), {str(tmp_path / "out.pt")!r})
        print(module.PATTERN["name"])
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("sink-window-small")
    out = torch.load(tmp_path / "out.pt")
    ref = reference_attention(q.double(), k.double(), v.double(), pattern)
    assert (out.double() - ref).abs().max() < TOLERANCE


def test_a_killed_compile_leaves_no_partial_module(tmp_path):
    """The compile is stopped (SIGKILL) after writing the temporary file, before the rename."""
    script = textwrap.dedent(f"""
        import os, time
        import spattn
        from spattn.compiler import codegen
        def stall(fd):
            print("writing", flush=True)
            time.sleep(60)
        os.fsync = stall
        codegen.compile_module(spattn.load_pattern("longnet-lm"), {str(tmp_path)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "longnet_lm.py").exists()
    # an interrupted compile in-process cleans up its temporary file too
    from spattn.compiler import codegen

    def interrupted(fd):
        raise KeyboardInterrupt

    original = os.fsync
    os.fsync = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            codegen.compile_module(spattn.load_pattern("longnet-lm"), tmp_path / "again")
    finally:
        os.fsync = original
    assert list((tmp_path / "again").iterdir()) == []


def test_runtime_compiles_once_into_the_cache(tmp_path):
    pattern = scaled("longnet-lm", 64)
    q, k, v = inputs(1, 2, 2, 40, 16)
    spattn.attention(q, k, v, pattern, backend="triton")
    files = list((tmp_path / "cache").rglob("*.py"))
    assert len(files) == 1 and pattern.content_hash() in str(files[0])
    stamp = files[0].stat().st_mtime_ns
    time.sleep(0.01)
    triton_backend._loaded.clear()
    spattn.attention(q, k, v, pattern, backend="triton")
    assert files[0].stat().st_mtime_ns == stamp  # reused, not rewritten


def test_triton_backend_says_why_it_cannot_run(monkeypatch):
    pattern = scaled("longnet-lm", 64)
    q, k, v = inputs(1, 2, 2, 40, 16)
    with pytest.raises(spattn.SpattnError, match="dtype torch.float64"):
        spattn.attention(q.double(), k.double(), v.double(), pattern, backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(spattn.SpattnError, match="needs? a CUDA device"):
        spattn.attention(q.detach().cpu(), k.cpu(), v.cpu(), pattern, backend="triton")


def test_pattern_softmax_scale_and_explicit_scale():
    pattern = spattn.Pattern.model_validate({
        "name": "scaled", "causal": True, "softmax_scale": 0.3,
        "branches": [{"segment": 16, "dilation": 2}, {"window": {"size": 5}}]})
    _check(pattern, (1, 2, 2, 50, 16))
    q, k, v = inputs(1, 2, 2, 50, 16)
    out = spattn.attention(q, k, v, pattern, backend="triton", scale=0.7)
    ref = _reference(pattern, q, k, v, scale=0.7)
    assert (out.double().cpu() - ref).abs().max() < TOLERANCE


def test_rows_too_far_apart_for_32_bit_offsets_are_made_contiguous():
    from spattn.runtime.generated import rows_contiguous

    n, heads, dim = 1 << 22, 12, 64  # (B, N, H, D) transposed: rows 768 elements apart
    wide = torch.empty(1, n, heads, dim, device="meta").transpose(1, 2)
    q, k, v = rows_contiguous(wide, wide, wide)
    assert q.stride(2) == k.stride(2) == v.stride(2) == dim
    narrow = torch.empty(1, 2048, heads, dim, device="meta").transpose(1, 2)
    assert rows_contiguous(narrow, narrow, narrow)[0].stride(2) == heads * dim  # left as is


def _module(pattern, tmp_path):
    return triton_backend.import_module_file(compile_module(pattern, tmp_path))


VIEWS = {  # name -> (view of a leaf, the leaf's shape), for (B, H, N, D) = (2, 2, 24, 16)
    "expanded": (lambda x: x[:1, :1].expand(2, 2, 24, 16), (1, 1, 24, 16)),
    "expanded-rows": (lambda x: x[:, :, :1].expand(2, 2, 24, 16), (2, 2, 1, 16)),
    "transposed": (lambda x: x.transpose(1, 2), (2, 24, 2, 16)),
    "sliced": (lambda x: x[:, :, ::2], (2, 2, 48, 16)),
    "last-dim": (lambda x: x[..., ::2], (2, 2, 24, 32)),
    "contiguous": (lambda x: x, (2, 2, 24, 16)),
}


@pytest.mark.parametrize("kinds", [("expanded", "transposed", "sliced"),
                                   ("last-dim", "expanded-rows", "transposed")],
                         ids=lambda kinds: "-".join(kinds))
@pytest.mark.parametrize("backend", ["module", "triton", "torch"])
def test_any_input_strides_give_the_contiguous_answer(kinds, backend, tmp_path):
    """Views (stride 0, transposed, sliced, non-unit last-dim stride), forward and backward,
    give what their contiguous copies give."""
    pattern = spattn.Pattern.model_validate({
        "name": "strides", "causal": True,
        "branches": [{"segment": 8, "dilation": 2}, {"global": {"tokens": [0]}}]})
    if backend == "module":
        attention = _module(pattern, tmp_path).attention
    else:
        def attention(q, k, v):
            return spattn.attention(q, k, v, pattern, backend=backend)
    gen = torch.Generator().manual_seed(0)
    leaves = [torch.randn(VIEWS[kind][1], generator=gen) for kind in kinds]
    d_out = torch.randn(2, 24, 2, 16, generator=gen).transpose(1, 2)  # a strided dO too
    results = []
    for copy in (False, True):
        inputs_ = [leaf.clone().requires_grad_() for leaf in leaves]
        views = [VIEWS[kind][0](x) for kind, x in zip(kinds, inputs_, strict=True)]
        if copy:
            views = [view.contiguous() for view in views]
        out = attention(*views)
        results.append((out, *torch.autograd.grad(out, inputs_, d_out)))
    for got, want in zip(*results, strict=True):
        assert (got - want).abs().max() < 1e-6


def test_scale_must_be_finite_and_positive(tmp_path):
    module = _module(scaled("longnet-lm", 64), tmp_path)
    q, k, v = inputs(1, 2, 2, 16, 16)
    for scale in (0.0, -1.0, float("nan"), float("inf"), "0.5", True):
        with pytest.raises(spattn.SpattnError, match="scale must be a finite number > 0"):
            module.attention(q, k, v, scale=scale)
        with pytest.raises(spattn.SpattnError, match="scale must be a finite number > 0"):
            module.attention_with_lse(q, k, v, scale=scale)
    assert module.attention(q, k, v, scale=0.25).shape == q.shape


BIG = 2**32  # past int32: every size here acts as N (SEMANTICS: w' = min(w, N))


@pytest.mark.parametrize("overlap,branches", [
    ("multiset", [{"segment": BIG, "dilation": 2}]),
    ("multiset", [{"segment": 8, "dilation": BIG}, {"segment": BIG, "dilation": BIG}]),
    ("multiset", [{"window": {"size": BIG}}]),
    ("multiset", [{"strided": {"stride": BIG}}]),
    ("multiset", [{"random": {"block": BIG, "blocks": 2}}]),
    ("union", [{"segment": BIG, "dilation": 3}, {"window": {"size": BIG}},
               {"strided": {"stride": BIG}}, {"random": {"block": BIG, "blocks": 1}}]),
], ids=["segment", "dilation", "window", "stride", "block", "union-all"])
def test_sizes_past_int32_match_the_torch_backend(overlap, branches):
    pattern = spattn.Pattern.model_validate({"name": "big", "causal": True, "overlap": overlap,
                                             "branches": branches})
    gen = torch.Generator().manual_seed(0)
    q, k, v, d_out = torch.randn(4, 1, 3, 20, 16, generator=gen)
    results = []
    for backend in ("triton", "torch"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = spattn.attention(*leaves, pattern, backend=backend)
        results.append((out, *torch.autograd.grad(out, leaves, d_out)))
    for got, want in zip(*results, strict=True):
        assert (got - want).abs().max() < 1e-4


INTERPRETER_STATES = textwrap.dedent("""
    import os
    os.environ.pop("TRITON_INTERPRET", None)
    import torch, spattn
    from spattn.compiler.codegen import compile_module
    from spattn.runtime import generated, triton_backend
    pattern = spattn.Pattern.model_validate({"name": "tiny", "causal": True,
                                             "branches": [{"segment": 8, "dilation": 2}]})
    q = torch.randn(1, 1, 16, 16)
    print(generated.interpreter_state())
    compiled = triton_backend.import_module_file(compile_module(pattern, FOLDER))
    for call in (lambda: compiled.attention(q, q, q),
                 lambda: compiled.decode_attention(q, q, q, torch.arange(16), 0)):
        try:
            call()
        except spattn.SpattnError as error:
            print("error:", error)
    os.environ["TRITON_INTERPRET"] = "1"
    print(generated.interpreter_state())
    try:
        spattn.attention(q, q, q, pattern, backend="triton")
    except spattn.SpattnError as error:
        print("error:", error)
""")


def test_interpreter_mode_mismatches_are_clear_errors(tmp_path, monkeypatch):
    """Without the interpreter on CPU tensors, and with TRITON_INTERPRET=1 set after triton was
    imported: one SpattnError each, saying what to do (triton's own errors are obscure)."""
    from spattn.runtime.generated import interpreter_problem, interpreter_state

    assert interpreter_state().consistent
    if interpreter_state().active:  # this process interprets (tests/conftest.py): unset it
        assert interpreter_problem(torch.device("cpu")) is None
        with monkeypatch.context() as patch:
            patch.delenv("TRITON_INTERPRET")
            assert not interpreter_state().consistent
            assert "unset after triton was imported" in interpreter_problem(torch.device("cuda"))
            assert "need a CUDA device" in interpreter_problem(torch.device("cpu"))
    script = INTERPRETER_STATES.replace("FOLDER", repr(str(tmp_path)))
    env = {**os.environ, "SPATTN_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "InterpreterState(requested=False, active=False)"
    for line in lines[1:3]:
        assert line.startswith("error: these tensors are on cpu; the generated kernels need a "
                               "CUDA device, or run with TRITON_INTERPRET=1 set before "), line
    assert lines[3] == "InterpreterState(requested=True, active=False)"
    assert lines[4].startswith("error: backend 'triton' cannot run this call: "
                               "TRITON_INTERPRET=1 was set after triton was imported")
    assert len(lines) == 5
