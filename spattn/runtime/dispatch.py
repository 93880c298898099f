"""`spattn.attention`: check the call, pick a backend, run it.

Each backend says why it cannot take a call (xformers-style); an explicitly requested backend
that cannot run raises with its reasons and never falls back silently.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spattn.errors import SpattnError
from spattn.limits import check_scale
from spattn.patterns.loader import load_pattern
from spattn.patterns.spec import Pattern
from spattn.runtime import costs, nonfinite, ops, varlen

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class InputError(SpattnError, ValueError):
    """Tensors or arguments that do not fit the call."""


class BackendError(SpattnError, RuntimeError):
    """A backend that was asked for and cannot run the call."""


@dataclass(frozen=True)
class Call:
    batch: int
    heads: int
    kv_heads: int
    seq_len: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    needs_grad: bool
    query_len: int | None = None  # q's rows when fewer than the keys' N (bottom-right)

    @property
    def queries(self) -> int:
        return self.seq_len if self.query_len is None else self.query_len


class Backend:
    """A way to run calls: says why it cannot take one, else runs it as the custom op."""

    name: str

    def why_not(self, call: Call, pattern: Pattern) -> str | None:
        raise NotImplementedError

    def run(self, q, k, v, key: str, scale: float, sinks: torch.Tensor | None = None
            ) -> torch.Tensor:
        return ops.attention(q, k, v, key, scale, self.name, sinks)


class TorchBackend(Backend):
    """Strided views + torch's fused attention with LSE + log-sum-exp merge. Runs anywhere."""

    name = "torch"

    def why_not(self, call: Call, pattern: Pattern) -> str | None:
        if call.dtype not in DTYPES:
            return f"dtype {call.dtype} is not one of float32, float64, bfloat16, float16"
        return None


class TritonBackend(Backend):
    """The generated Triton kernels, forward and backward. On CPU they run under the Triton
    interpreter when TRITON_INTERPRET=1 and the backend is asked for by name."""

    name = "triton"

    def why_not(self, call: Call, pattern: Pattern) -> str | None:
        # (generated.py imports this module: import it here, when a call is checked)
        from spattn.runtime.generated import MAX_TOKENS, interpreter_problem

        problem = interpreter_problem(call.device)
        if problem:
            return problem
        if call.seq_len is not None and (call.seq_len > MAX_TOKENS
                                         or call.seq_len * call.head_dim >= 2**31):
            return (f"its kernels take N <= 2^30 tokens and N * D < 2^31 (32-bit offsets), got "
                    f"N = {call.seq_len}, D = {call.head_dim}")
        if call.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"dtype {call.dtype} is not one of float32, float16, bfloat16"
        return None


BACKENDS = {b.name: b for b in (TritonBackend(), TorchBackend())}  # in order of preference


def _auto(name: str, call: Call) -> bool:
    """Automatic selection leaves the (slow) Triton interpreter to explicit requests."""
    return name != "triton" or call.device.type == "cuda"


def check_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  shorter_queries: bool = False) -> Call:
    """Shapes, dtypes and devices of one call; with `shorter_queries`, q may hold fewer rows
    than k and v (the last ones of the sequence)."""
    for arg, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise InputError(f"{arg} must be 4-D (batch, heads, seq_len, head_dim), "
                             f"got shape {tuple(t.shape)}")
    b, h, nq, d = q.shape
    n = k.shape[2]
    if k.shape != v.shape:
        raise InputError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    hkv = k.shape[1]
    if h < 1 or d < 1:
        raise InputError(f"q must have at least one head and head_dim >= 1, got shape "
                         f"{tuple(q.shape)}")
    if (k.shape[0], k.shape[3]) != (b, d) or (n != nq and not shorter_queries):
        raise InputError(f"k and v must be (B={b}, Hkv, N={nq}, D={d}) to match q "
                         f"{tuple(q.shape)}, got {tuple(k.shape)}")
    if nq > n:
        raise InputError(f"q has more rows ({nq}) than k and v ({n}): queries are the last "
                         f"positions of the keys' sequence, so Nq <= Nk")
    if hkv == 0 or h % hkv:
        raise InputError(f"q's heads ({h}) must be a multiple of k/v's heads ({hkv})")
    if not (q.dtype == k.dtype == v.dtype):
        raise InputError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise InputError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return Call(b, h, hkv, n, d, q.dtype, q.device, needs_grad, nq if nq != n else None)


def check_fixed(call: Call, name: str, heads: int | None = None, kv_heads: int | None = None,
                head_dim: int | None = None, offsets_heads: int | None = None) -> None:
    """The call's sizes against what pattern `name` fixes."""
    for field, expected, got in (("heads", heads, call.heads), ("kv_heads", kv_heads,
                                 call.kv_heads), ("head_dim", head_dim, call.head_dim)):
        if expected is not None and expected != got:
            raise InputError(f"pattern '{name}' fixes {field} = {expected}, "
                             f"but the tensors have {got}")
    if offsets_heads is not None and offsets_heads != call.heads:
        raise InputError(f"pattern '{name}' has per-head offsets for {offsets_heads} heads, "
                         f"but q has {call.heads}")


_CHOSEN: dict[tuple, tuple[str, str, float, bool | None]] = {}  # _choose's answers
_CHOSEN_MAX = 1024


def _choose(pattern: Pattern, sizes: tuple[int, int, int, int, int], dtype: torch.dtype,
            device: torch.device, needs_grad: bool, backend: str | None, scale: float | None
            ) -> tuple[str, str, float, bool | None]:
    """(backend name, pattern key, scale, dense) for a checked eager call, `dense` the causality
    of a call that is plain dense attention, which runs as SDPA (else None). Remembered per
    call shape and cost model: right after a large kernel call, with the caches cold, working
    it out again costs tens of microseconds."""
    if scale is not None and type(scale) is not float:  # a tensor or other object: not kept
        return _choose_anew(pattern, sizes, dtype, device, needs_grad, backend, scale)
    memo = (ops.register(pattern), sizes, dtype, device, needs_grad, backend, scale,
            costs.current())
    found = _CHOSEN.get(memo)
    if found is None:
        found = _choose_anew(pattern, sizes, dtype, device, needs_grad, backend, scale)
        if len(_CHOSEN) >= _CHOSEN_MAX:
            _CHOSEN.clear()
        _CHOSEN[memo] = found
    return found


def _choose_anew(pattern: Pattern, sizes: tuple[int, int, int, int, int],
                 dtype: torch.dtype,
                 device: torch.device, needs_grad: bool, backend: str | None, scale: object
                 ) -> tuple[str, str, float, bool | None]:
    call = Call(*sizes, dtype, device, needs_grad)
    check_fixed(call, pattern.name, pattern.heads, pattern.kv_heads, pattern.head_dim,
                pattern.required_heads())
    if pattern.min_heads() > call.heads:
        raise InputError(f"pattern '{pattern.name}' has a branch for head "
                         f"{pattern.min_heads() - 1}, but q has {call.heads} heads")
    name, key = pick_backend(call, pattern, backend), ops.register(pattern)
    scale = resolve_scale(pattern, scale, call.head_dim)
    dense = None
    # plain dense attention runs as torch's own SDPA call: its flash kernel on a GPU (the
    # generated kernels still serve it under the interpreter, where they are what is tested)
    if call.seq_len and (name == "torch" or call.device.type == "cuda"):
        dense = ops.dense_causality(key, call.heads, call.kv_heads, call.seq_len, call.head_dim,
                                    scale)
    return name, key, scale, dense


def _traced_choice(pattern: Pattern | str, call: Call, backend: str | None, scale: object
                   ) -> tuple[str, str, float, bool]:
    """(backend, key, scale, whether the pattern is causal): _choose under torch.compile, where
    B, H, N and D may be symbolic (a compiled model sees many lengths, or dynamic=True): what
    depends on no size is worked out once at trace time (_choose_unsized), the rest is checked
    in the graph. The dense shortcut, decided from sizes, is not taken: the op serves every
    size."""
    given = scale if scale is None or type(scale) is float else None
    name, key, fixed, default = _choose_unsized(pattern, call.dtype, call.device,
                                                call.needs_grad, backend, given)
    heads, kv_heads, head_dim, offsets_heads, min_heads, label, causal = fixed
    check_fixed(call, label, heads, kv_heads, head_dim, offsets_heads)
    if min_heads > call.heads:
        raise InputError(f"pattern '{label}' has a branch for head {min_heads - 1}, but q has "
                         f"{call.heads} heads")
    if given is None and scale is not None:
        default = check_scale(scale)
    return name, key, default if default is not None else 1.0 / math.sqrt(call.head_dim), causal


@torch._dynamo.assume_constant_result
def _choose_unsized(pattern: Pattern | str, dtype: torch.dtype, device: torch.device,
                    needs_grad: bool, backend: str | None, scale: float | None
                    ) -> tuple[str, str, tuple, float | None]:
    """(backend, pattern key, what the pattern fixes, the scale unless it is 1/sqrt(D)) of a
    traced call, from constants only."""
    pattern = load_pattern(pattern)
    call = Call(None, None, None, None, None, dtype, device, needs_grad)
    if scale is None and pattern.softmax_scale:
        scale = pattern.softmax_scale
    fixed = (pattern.heads, pattern.kv_heads, pattern.head_dim, pattern.required_heads(),
             pattern.min_heads(), pattern.name, pattern.causal)
    return (pick_backend(call, pattern, backend), ops.register(pattern), fixed,
            None if scale is None else check_scale(scale))


def resolve_scale(pattern: Pattern, scale: object, head_dim: int) -> float:
    """The softmax scale of a call: `scale` if given, else the pattern's `softmax_scale`, else
    1/sqrt(D); a finite number > 0 (spattn.limits.check_scale) or a clear error."""
    if scale is None:
        scale = pattern.softmax_scale or 1.0 / math.sqrt(head_dim)
    return check_scale(scale)


def pick_backend(call: Call, pattern: Pattern, backend: str | None) -> str:
    """The backend named `backend` if it can run `call` (else a BackendError saying why), or
    the first backend in order of preference that can."""
    if backend is not None:
        if backend not in BACKENDS:
            raise BackendError(f"unknown backend '{backend}'; available: {', '.join(BACKENDS)}")
        reason = BACKENDS[backend].why_not(call, pattern)
        if reason:
            raise BackendError(f"backend '{backend}' cannot run this call: {reason}")
        return backend
    reasons = {name: b.why_not(call, pattern) for name, b in BACKENDS.items()
               if _auto(name, call)}
    usable = [name for name, reason in reasons.items() if reason is None]
    if not usable:
        raise BackendError("no backend can run this call: " +
                           "; ".join(f"{n}: {r}" for n, r in reasons.items()))
    return usable[0]


LAYOUTS = ("bhnd", "bnhd")
SHORT_QUERIES = 64  # query rows up to which an inference call attends the keys directly


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern | str, *,
              backend: str | None = None, scale: float | None = None,
              seq_lens: Iterable[int] | torch.Tensor | None = None,
              cu_seqlens: Iterable[int] | torch.Tensor | None = None,
              key_padding_mask: torch.Tensor | None = None, layout: str = "bhnd",
              sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Sparse attention of q (B, H, Nq, D) over k, v (B, Hkv, N, D) by `pattern`.

    `pattern` is a Pattern, a built-in name or a YAML path. `scale` defaults to the pattern's
    softmax_scale, else 1/sqrt(D). Returns (B, H, Nq, D) in q's dtype, differentiable in q, k,
    v (and sinks) on every backend, and traceable by torch.compile(fullgraph=True).

    Queries may be fewer than keys (Nq <= N): they are then the last Nq positions of the
    sequence (bottom-right, flash-attn's convention), and the output is those rows of the full
    forward. `layout="bnhd"` takes and returns (B, N, H, D) tensors instead. `sinks` (H,) adds
    exp(sinks[h]) to every softmax denominator of head h, a logit with no value (gpt-oss).

    Several sequences per call (runtime/varlen.py): packed along N, by their lengths `seq_lens`
    or cumulative offsets `cu_seqlens` (flash-attn's varlen layout, the same in every batch row);
    or padded, by a (B, N) bool `key_padding_mask`, True at padding (`nn.MultiheadAttention`'s
    convention), each row's real tokens one contiguous run. Each sequence is segmented from its
    own first token and never attends another; padding rows get zeros.
    """
    if not torch.compiler.is_compiling():  # traced, _choose loads it, once, at trace time
        pattern = load_pattern(pattern)
    if layout not in LAYOUTS:
        raise InputError(f"layout must be 'bhnd' (B, H, N, D) or 'bnhd' (B, N, H, D), got "
                         f"{layout!r}")
    if layout == "bnhd":  # views: every backend takes any strides
        q, k, v = (t.transpose(1, 2) if isinstance(t, torch.Tensor) else t for t in (q, k, v))
    call = check_tensors(q, k, v, shorter_queries=True)
    sinks = check_sinks(sinks, call)
    if seq_lens is not None or cu_seqlens is not None or key_padding_mask is not None:
        out = _several(q, k, v, pattern, call, backend, scale, seq_lens, cu_seqlens,
                       key_padding_mask, sinks)
    else:
        out = _one(q, k, v, pattern, call, backend, scale, sinks)
    return out.transpose(1, 2) if layout == "bnhd" else out


def _one(q, k, v, pattern: Pattern, call: Call, backend: str | None, scale: object,
         sinks: torch.Tensor | None) -> torch.Tensor:
    compiling = torch.compiler.is_compiling()
    if compiling:
        name, key, scale, causal = _traced_choice(pattern, call, backend, scale)
        dense = None
    else:
        sizes = (call.batch, call.heads, call.kv_heads, call.seq_len, call.head_dim)
        name, key, scale, dense = _choose(pattern, sizes, call.dtype, call.device,
                                          call.needs_grad, backend, scale)
        causal = pattern.causal
    if call.queries == 0 or call.batch == 0:
        return q.new_zeros(q.shape) + varlen.connected_zero(q, k, v)
    first = call.seq_len - call.queries  # the position of query row 0
    if not first and dense is not None and sinks is None and nonfinite.finite(q, k, v):
        # exactly torch's own attention, unchanged (folding the heads into the batch measured
        # no faster at 1K-16K tokens and cost about 30 us a call in reshapes); a non-finite
        # input takes the op, whose guard puts NaN exactly where it belongs (SDPA's fused CPU
        # kernel drops a NaN query row at some sizes)
        return F.scaled_dot_product_attention(q, k, v, is_causal=dense, scale=scale)
    if not first:
        return BACKENDS[name].run(q, k, v, key, scale, sinks)
    grad = call.needs_grad or (sinks is not None and sinks.requires_grad
                               and torch.is_grad_enabled())
    if causal and not grad and call.queries <= SHORT_QUERIES:  # decoding
        if compiling:  # the same path, as one op
            return ops.decode_forward(q, k, v, sinks, key, scale, name)
        from spattn.runtime.cached import decode  # (it imports what imports this)

        positions = torch.arange(call.seq_len, device=q.device)
        return decode(q, k, v, positions, first, pattern, scale, sinks, name)
    # the rows of the full forward, by it: zero queries in front (their dO is 0, so they add
    # nothing to dK and dV)
    full = torch.cat([q.new_zeros(call.batch, call.heads, first, call.head_dim), q], 2)
    return BACKENDS[name].run(full, k, v, key, scale, sinks)[:, :, first:]


def check_sinks(sinks: object, call: Call) -> torch.Tensor | None:
    """Attention sinks: None, or a floating tensor of shape (H,) on the tensors' device."""
    if sinks is None:
        return None
    if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point():
        raise InputError(f"sinks must be a floating-point tensor of shape (H={call.heads},), "
                         f"got {getattr(sinks, 'dtype', type(sinks).__name__)}")
    if tuple(sinks.shape) != (call.heads,):
        raise InputError(f"sinks must have shape (H={call.heads},), one logit per query head, "
                         f"got {tuple(sinks.shape)}")
    if sinks.device != call.device:
        raise InputError(f"sinks must be on the tensors' device {call.device}, got "
                         f"{sinks.device}")
    return sinks


def _several(q, k, v, pattern, call, backend, scale, seq_lens, cu_seqlens, key_padding_mask,
             sinks) -> torch.Tensor:
    def one(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
        return _one(q_, k_, v_, pattern, check_tensors(q_, k_, v_, shorter_queries=True),
                    backend, scale, sinks)

    if key_padding_mask is None:
        return varlen.packed(q, k, v, varlen.packed_bounds(call.seq_len, seq_lens, cu_seqlens),
                             one)
    if seq_lens is not None or cu_seqlens is not None:
        raise InputError("give packed sequences (seq_lens or cu_seqlens) or a key_padding_mask, "
                         "not both")
    return varlen.padded(q, k, v, varlen.padding_bounds(key_padding_mask, call.batch,
                                                         call.seq_len), one)
