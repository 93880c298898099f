"""What generated modules call at run time: input checks, head offsets, global-token tables,
launch configurations and the autograd Function. Generated code imports only torch, triton and this
module."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch

from spattn.limits import check_scale
from spattn.patterns.blocks import random_blocks
from spattn.patterns.geometry import head_offsets as _offsets
from spattn.runtime import nonfinite
from spattn.runtime.configs import launch_config, recording, recording_capability
from spattn.runtime.dispatch import Call, InputError, check_fixed, check_tensors
from spattn.runtime.tuning import launch

__all__ = ["MAX_TOKENS", "check", "check_decode", "check_scale", "decode_chunk", "fold",
           "interpreter_problem", "interpreter_state", "launch", "launch_config", "merge_splits",
           "recording"]

# Positions are int32 in the kernels, and the sizes codegen prints are capped here (any size >= N
# acts as N): the kernels take sequences up to this length.
MAX_TOKENS = 1 << 30


def check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: dict,
          kernel: object = None) -> tuple[int, int, int, int, int]:
    """(B, H, N, D, Hkv) after the same checks as spattn.attention, against the pattern's
    fixed heads / kv_heads / head_dim; `kernel` (one of the module's @triton.jit functions)
    tells whether triton runs the module the way the tensors need (interpret.py)."""
    call = check_tensors(q, k, v)
    _check_heads(call, pattern)
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise InputError(f"the generated kernels take float32, float16 or bfloat16, got {q.dtype}")
    if call.seq_len > MAX_TOKENS:
        raise InputError(f"the generated kernels take at most 2^30 tokens, got {call.seq_len}; "
                         f"use backend='torch'")
    _check_row_offsets(call.seq_len, call.head_dim)
    _check_interpreter(q.device, kernel)
    return call.batch, call.heads, call.seq_len, call.head_dim, call.kv_heads


def _check_heads(call: Call, pattern: dict) -> None:
    """The call's sizes against what the pattern fixes, and enough query heads for every branch
    that lists some."""
    check_fixed(call, pattern["name"], pattern.get("heads"), pattern.get("kv_heads"),
                pattern.get("head_dim"), pattern.get("offsets_heads"))
    if pattern.get("min_heads", 1) > call.heads:
        raise InputError(f"pattern '{pattern['name']}' has a branch for head "
                         f"{pattern['min_heads'] - 1}, but q has {call.heads} heads")


@dataclass(frozen=True)
class InterpreterState:
    """Whether triton runs kernels on the interpreter. Triton 3.9 decides per @triton.jit
    function, when it is decorated (runtime/jit.py reads knobs.runtime.interpret, i.e.
    TRITON_INTERPRET): its own library functions when triton is imported, a generated module's
    kernels when that module is imported. Interpreted kernels calling compiled library functions
    fail ("Cannot call @triton.jit'd outside of the scope of a kernel"), compiled kernels on CPU
    tensors fail ("0 active drivers")."""

    requested: bool  # what TRITON_INTERPRET asks for now (what @triton.jit would do now)
    active: bool | None  # the mode triton's library was made in; None: triton not imported yet

    @property
    def consistent(self) -> bool:
        return self.active is None or self.active == self.requested


def _interpreted(function: object) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(function, InterpretedFunction)


def interpreter_state() -> InterpreterState:
    """Whether triton is actually in interpreter mode, and whether the environment agrees."""
    triton = sys.modules.get("triton")
    if triton is None or not hasattr(triton, "knobs"):
        value = os.environ.get("TRITON_INTERPRET", "").lower()
        return InterpreterState(value in ("1", "true", "on", "yes"), None)  # as triton reads it
    from triton.language import standard

    return InterpreterState(bool(triton.knobs.runtime.interpret), _interpreted(standard.cdiv))


def interpreter_problem(device: torch.device, kernel: object = None) -> str | None:
    """Why generated kernels cannot run on `device` in this process (None if they can): triton
    in one mode and the kernels in the other, or compiled kernels and tensors off the GPU.
    `kernel`: one of an already imported module's @triton.jit functions; without it, the
    module imported next is judged (decorated as TRITON_INTERPRET says now)."""
    state = interpreter_state()
    interpreted = state.requested if kernel is None else _interpreted(kernel)
    if interpreted and state.active is False:
        return ("TRITON_INTERPRET=1 was set after triton was imported, so triton is not in "
                "interpreter mode; set it before importing torch, triton or spattn (e.g. in the "
                "shell: TRITON_INTERPRET=1 python ...)")
    unset = ("TRITON_INTERPRET was unset after triton was imported in interpreter mode"
             if not interpreted and state.active else "")
    if not interpreted and device.type != "cuda":
        return (f"these tensors are on {device.type}; the generated kernels need a CUDA device, "
                f"or run with TRITON_INTERPRET=1 set before importing torch, triton or spattn "
                f"(e.g. in the shell)" + (f" ({unset})" if unset else ""))
    if unset:
        return f"{unset}; set it (or not) once, before importing torch, triton or spattn"
    return None


def _check_interpreter(device: torch.device, kernel: object) -> None:
    if recording_capability() is not None:
        return
    problem = interpreter_problem(device, kernel)
    if problem:
        raise InputError(problem)


def _check_row_offsets(rows: int, dim: int) -> None:
    """Row offsets (row * D in contiguous rows) are 32-bit in the kernels."""
    if rows * dim >= 2**31:
        raise InputError(f"the generated kernels index rows with 32-bit offsets: N * D = "
                         f"{rows} * {dim} must stay below 2^31; use backend='torch'")


def rows_contiguous(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Kernels index rows with strides but need each row's D elements contiguous, and k and v
    with the same strides. Row offsets (row * row stride) are 32-bit in the kernels, so a layout
    whose rows are too far apart for that (e.g. (B, N, H, D) transposed, past ~2M tokens) is
    made contiguous, where the row stride is D."""
    q, k, v = tensors
    n = q.shape[2]
    if q.stride(-1) != 1 or q.stride(2) * n >= 2**31:
        q = q.contiguous()
    if k.stride() != v.stride() or k.stride(-1) != 1 or k.stride(2) * n >= 2**31:
        k, v = k.contiguous(), v.contiguous()
    return q, k, v


def decode_chunk(device: torch.device, keys: int, programs: int) -> int:
    """Keys per decoding program (flash-decoding): enough chunks that `programs` row programs
    times the chunks fill the GPU about twice, each chunk a multiple of 128 keys (of any BLOCK_N
    the table holds). Under the interpreter, 16-key granules and a pretend 4-SM device, so that
    tests merge several chunks."""
    if device.type == "cuda":
        processors, granule = torch.cuda.get_device_properties(device).multi_processor_count, 128
    elif recording_capability() is not None:
        processors, granule = 132, 128  # an H100's SMs
    else:
        processors, granule = 4, 16
    splits = max(1, min(_cdiv(2 * processors, max(programs, 1)), _cdiv(keys, granule)))
    return _cdiv(_cdiv(keys, splits), granule) * granule


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def merge_parts(out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge parts of rows by log-sum-exp: out (..., S, D) each part's normalized output, lse
    (..., S) its natural-log LSE (-inf: the part gave the row no key). Returns (..., D) and
    (...,), -inf where no part gave a key."""
    top = lse.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0.0)
    weight = torch.exp(lse - top)  # 0 where -inf
    total = weight.sum(-1, keepdim=True)
    merged = (out * (weight / torch.where(total > 0, total, 1.0))[..., None]).sum(-2)
    has = total[..., 0] > 0
    return merged, torch.where(has, top[..., 0] + torch.log(torch.where(has, total[..., 0], 1.0)),
                               float("-inf"))


def merge_splits(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Merge flash-decoding's chunks: out (B, H, T, S, D) each chunk's normalized output, lse
    (B, H, T, S) its natural-log LSE (-inf: the chunk gave the row no key)."""
    if out.shape[3] == 1:
        return out[:, :, :, 0]
    return merge_parts(out, lse)[0]


FP32_DOT = ("tf32x3", "ieee", "tf32")  # SPATTN_FP32_DOT: the first is the default


def dot_precision(dtype: torch.dtype) -> str:
    """How `tl.dot` multiplies float32 inputs: "tf32x3" (the default: three TF32 tensor-core
    products of the split operands, close to float32 accuracy), "ieee" (float32 FMA, no tensor
    cores) or "tf32" (one TF32 product, about 3 digits fewer), chosen by SPATTN_FP32_DOT.
    Half-precision inputs ignore the setting."""
    if dtype != torch.float32:
        return "tf32"
    choice = os.environ.get("SPATTN_FP32_DOT", FP32_DOT[0])
    if choice not in FP32_DOT:
        raise InputError(f"SPATTN_FP32_DOT must be one of {', '.join(FP32_DOT)}, got {choice!r}")
    return choice


class GeneratedAttention(torch.autograd.Function):
    """A generated module's forward and backward kernels as one differentiable op. The forward
    keeps only O and the merged LSE for the backward. Non-finite inputs reach exactly the rows
    that attend them (runtime/nonfinite.py)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                kernels: tuple[Callable, Callable], pattern: dict | None = None
                ) -> torch.Tensor:
        forward, backward = kernels
        reach, _ = _guards(pattern, q, k, scale)
        out, lse = nonfinite.guard_forward(lambda *t: forward(*t, scale=scale), reach, q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.backward, ctx.pattern = scale, backward, pattern
        return out

    @staticmethod
    def backward(ctx, d_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        reach, attended = _guards(ctx.pattern, q, k, ctx.scale)
        dq, dk, dv = nonfinite.guard_backward(
            lambda *t: ctx.backward(*t, scale=ctx.scale), reach, attended, d_out, q, k, v, out,
            lse)
        return dq, dk, dv, None, None, None


def _guards(pattern: dict | None, q: torch.Tensor, k: torch.Tensor, scale: float
            ) -> tuple[nonfinite.Reach, Callable[[torch.Tensor], torch.Tensor]]:
    """nonfinite's reach and attended for a module's PATTERN, worked out only when asked (a
    call whose inputs are all finite never asks)."""
    def problem():
        from spattn.patterns.spec import Pattern
        from spattn.runtime import ops  # (it imports what imports this)

        if pattern is None or "spec" not in pattern:
            raise InputError("non-finite inputs need the module's PATTERN spec: compile the "
                             "module again")
        return ops, ops.problem_of(Pattern.model_validate(pattern["spec"]), q, k, scale)

    def reach(bad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ops, found = problem()
        return ops.reach(found, q)(bad)

    def attended(rows: torch.Tensor) -> torch.Tensor:
        ops, found = problem()
        return ops.attended(found, q)(rows)

    return reach, attended


GRID_AXIS = 65535  # the most programs grid axes 1 and 2 take


def fold(programs: int, count: int) -> tuple[int, int, int]:
    """A grid of `programs` along axis 0 for each of `count` (batch x heads) items, the count
    folded into axes 1 and 2 so that neither passes its limit (the kernels' _folded)."""
    return programs, min(count, GRID_AXIS), _cdiv(count, GRID_AXIS)


def segments(n: int, segment: int, dilation: int, strided: bool) -> tuple[int, int]:
    """(segments, most rows one head keeps in a segment) of a dilated branch at length n, as the
    kernels' _segments computes them: a strided branch's segments are its residue classes."""
    if strided:
        return min(n, dilation), _cdiv(n, dilation)
    w = min(n, segment)
    return _cdiv(n, w), _cdiv(w, dilation)


class Branches:
    """What every branch's launches share in one forward or backward call of a generated
    module's launcher: the tensors and their strides, the union tables, the constants. `rows`
    and `cols` launch a row or column kernel with a branch's own tensors and sizes; a kernel
    whose results go to a scratch tensor first takes it as `store`."""

    def __init__(self, pattern: dict, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 o: torch.Tensor | None, lse: torch.Tensor, do: torch.Tensor | None,
                 delta: torch.Tensor | None, dq: torch.Tensor | None, dk: torch.Tensor | None,
                 dv: torch.Tensor | None, scale: float, **constants: object) -> None:
        self.pattern, self.q, self.scale = pattern, q, scale
        self.batch, self.heads, self.n, dim = q.shape
        self.kv_heads = k.shape[1]
        self.device = q.device
        self.backward = dq is not None
        self.mode = "bwd" if self.backward else "fwd"
        self.inputs = (q, k, v)
        self.o, self.lse, self.do, self.delta, self.dq, self.dk, self.dv = o, lse, do, delta, \
            dq, dk, dv
        per_query = do if self.backward else o  # O, dO, dQ share strides; so do L and Delta
        self.strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                        k.stride(2), per_query.stride(0), per_query.stride(1), lse.stride(0),
                        lse.stride(1))
        on_heads = head_table(pattern, self.heads, q.device)  # None: every branch, every head
        # overlap: union: every branch drops the pairs earlier branches give (_pairs_given)
        self.tables = ((on_heads, *pair_tables(pattern, self.heads, self.n, q.device))
                       if constants["UNION"] else (on_heads, None, None, None, None))
        self.meta = dict(constants, GROUP=self.heads // self.kv_heads,
                         BLOCK_D=_next_power_of_2(max(16, dim)), PRECISION=dot_precision(q.dtype))

    def stores(self) -> tuple[torch.Tensor, ...]:
        """What the row kernels write: the running (O, LSE) forward, dQ backward."""
        return (self.dq,) if self.backward else (self.o, self.lse)

    def key_stores(self) -> tuple[torch.Tensor, ...]:
        return self.dk, self.dv

    def scratch(self, rows: int) -> tuple[torch.Tensor, ...]:
        """Row kernels' results for `rows` rows a head, to merge after: an empty (O, LSE)
        forward, zero dQ backward."""
        shape = (self.batch * self.heads, rows)
        o = torch.zeros((*shape, self.q.shape[-1]), dtype=torch.float32, device=self.device)
        if self.backward:
            return (o,)
        return o, torch.full(shape, float("-inf"), dtype=torch.float32, device=self.device)

    def key_scratch(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.batch * self.kv_heads, rows, self.q.shape[-1])
        return (torch.zeros(shape, dtype=torch.float32, device=self.device),
                torch.zeros(shape, dtype=torch.float32, device=self.device))

    def _run(self, kernel: object, name: str, programs: Callable, count: int, args: tuple,
             constants: dict, writes: tuple) -> None:
        launch(kernel, name, self.mode, lambda c: fold(programs(c), count), args,
               {**self.meta, **constants}, q=self.q, size=self.n,
               pattern_hash=self.pattern["hash"], writes=writes)

    def rows(self, kernel: object, name: str, programs: Callable, tensors: tuple,
             sizes: tuple, index: int, store: tuple | None = None, **constants: object) -> None:
        """A row kernel over `programs(config)` programs a (batch, head)."""
        q, k, v = self.inputs
        target = store or self.stores()
        if self.backward:
            o, lse, dq = self.o, self.lse, target[0]
        else:
            (o, lse), dq = target, None
        extra = () if store is None else (target[0].stride(0), target[0].stride(1),
                                          target[-1].stride(0), target[-1].stride(1))
        args = (q, k, v, o, lse, self.do, self.delta, dq, *tensors, self.n, self.heads,
                self.batch * self.heads, self.scale, *sizes, index, *self.tables,
                *self.strides, *extra)
        self._run(kernel, name, programs, self.batch * self.heads, args,
                  dict(constants, BACKWARD=self.backward, EARLIER=self._earlier(index)), target)

    def cols(self, kernel: object, name: str, programs: Callable, tensors: tuple,
             sizes: tuple, index: int, store: tuple | None = None, **constants: object) -> None:
        """A column kernel (backward only) over `programs(config)` programs a (batch, key
        head)."""
        if not self.backward:
            return
        q, k, v = self.inputs
        dk, dv = store or self.key_stores()
        extra = () if store is None else (dk.stride(0), dk.stride(1))
        args = (q, k, v, self.lse, self.do, self.delta, dk, dv, *tensors, self.n, self.heads,
                self.batch * self.kv_heads, self.scale, *sizes, index, *self.tables,
                *self.strides, dk.stride(0), dk.stride(1), *extra)
        self._run(kernel, name, programs, self.batch * self.kv_heads, args,
                  dict(constants, EARLIER=self._earlier(index)), (dk, dv))

    def _earlier(self, index: int) -> int:
        """The branches a union kernel's pair predicate compiles in (the ones before its own);
        0 without union, so that every branch shares the kernel."""
        return index if self.meta["UNION"] else 0

    def merge_rows(self, rows: torch.Tensor, scratch: tuple, chunks: int) -> None:
        """Fold a scratch of `chunks` parts per row (rows chunk * len(rows) + i) into `rows`:
        by log-sum-exp into (O, LSE) forward, summed into dQ backward."""
        g = len(rows)
        if self.backward:
            part = scratch[0].view(-1, chunks, g, scratch[0].shape[-1]).sum(1)
            self.dq.index_add_(1, rows, part)
            return
        part_o = scratch[0].view(-1, chunks, g, self.o.shape[-1]).transpose(1, 2)
        part_l = scratch[1].view(-1, chunks, g).transpose(1, 2)
        outs = torch.cat([self.o[:, rows, None], part_o], 2)  # (BH, G, 1 + chunks, D)
        lses = torch.cat([self.lse[:, rows, None], part_l], 2)
        merged_o, merged_l = merge_parts(outs, lses)
        self.o[:, rows] = merged_o
        self.lse[:, rows] = merged_l

    def merge_keys(self, keys: torch.Tensor, scratch: tuple, chunks: int) -> None:
        """Sum a scratch of dK, dV parts (rows chunk * len(keys) + i) into `keys` of dK, dV."""
        g = len(keys)
        for total, part in zip((self.dk, self.dv), scratch, strict=True):
            total.index_add_(1, keys, part.view(-1, chunks, g, part.shape[-1]).sum(1))


def _next_power_of_2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


@lru_cache(maxsize=256)
def _offsets_cached(offsets: tuple[int, ...] | None, mode: str, dilation: int, heads: int,
                    device: str) -> torch.Tensor:
    values = offsets if offsets is not None else _offsets(mode, dilation, heads)
    return torch.tensor(values, dtype=torch.int32, device=device)


def head_offsets(offsets: list[int] | None, mode: str, dilation: int, heads: int,
                 device: torch.device) -> torch.Tensor:
    """Per-head offsets s_h as an int32 tensor (explicit, or by the pattern's head_offsets)."""
    fixed = tuple(offsets) if offsets is not None else None
    return _offsets_cached(fixed, mode, dilation, heads, str(device))


@lru_cache(maxsize=64)
def _tokens_cached(tokens: tuple[int, ...], n: int, device: str
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    kept = sorted({t for t in tokens if t < n})
    is_global = torch.zeros(n, dtype=torch.int8, device=device)
    index = torch.tensor(kept, dtype=torch.int64, device=device)
    is_global[index] = 1
    return index.to(torch.int32), is_global


@lru_cache(maxsize=64)
def _heads_cached(on: tuple[tuple[int, ...] | None, ...], heads: int, device: str
                  ) -> torch.Tensor | None:
    if all(listed is None for listed in on):
        return None
    table = torch.ones((len(on), heads), dtype=torch.int8)
    for i, listed in enumerate(on):
        if listed is not None:
            table[i] = 0
            table[i, list(listed)] = 1
    return table.to(device)


def head_table(pattern: dict, heads: int, device: torch.device) -> torch.Tensor | None:
    """(branches, H) int8, 1 where a branch applies to a query head, for the kernels (a branch
    with `heads:` gives the other heads nothing); None when every branch applies to every head.
    H must be at least the pattern's min_heads (check)."""
    on = tuple(tuple(b["heads"]) if b.get("heads") is not None else None
               for b in pattern["branches"])
    return _heads_cached(on, heads, str(device))


KIND_CODES = {"dense": 0, "dilated": 1, "window": 2, "global": 3, "strided": 4, "random": 5}


def _table_branch(branch: dict) -> tuple:
    """A branch as the pair tables need it (hashable): kind, sizes, offsets, tokens, draws."""
    return (branch["kind"], branch.get("segment", branch.get("size", branch.get(
        "stride", branch.get("block", 0)))), branch.get("dilation", branch.get("blocks", 0)),
        tuple(branch["offsets"]) if branch.get("offsets") else None,
        tuple(branch.get("tokens", ())), branch.get("seed"))


@lru_cache(maxsize=64)
def _pair_tables_cached(branches: tuple[tuple, ...], mode: str, heads: int, n: int,
                        causal: bool, device: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    shapes = torch.zeros((len(branches), 4), dtype=torch.int32)
    offsets = torch.zeros((len(branches), heads), dtype=torch.int32)
    flags = torch.zeros((len(branches), max(n, 1)), dtype=torch.int8)
    drawn = [torch.full((1,), -1, dtype=torch.int32)]  # one entry: never an empty tensor
    start = 1
    for i, (kind, size, extra, explicit, tokens, seed) in enumerate(branches):
        shapes[i, :3] = torch.tensor([KIND_CODES[kind], size, extra])
        if kind == "dilated":
            offsets[i] = torch.tensor(explicit or _offsets(mode, extra, heads))
        flags[i, [t for t in tokens if t < n]] = 1
        if kind == "random":  # (H, ceil(N / block), draws) flattened, after the others
            table = random_blocks(size, extra, seed, n, heads, causal).to(torch.int32)
            shapes[i, 3] = start
            drawn.append(table.reshape(-1))
            start += table.numel()
    return (shapes.to(device), offsets.to(device), flags.to(device),
            torch.cat(drawn).to(device))


def pair_tables(pattern: dict, heads: int, n: int, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the kernels' _pairs_given reads to tell which branches give a pair (union overlap,
    decoding): every branch's kind and sizes (branches, 4) int32 (kind code, size, dilation or
    draws, where a random branch's draws start), per-head offsets (branches, H) int32,
    global-token flags (branches, N) int8, and the random branches' draws, (H, ceil(N / block),
    draws) int32 each, one after another."""
    branches = tuple(_table_branch(b) for b in pattern["branches"])
    return _pair_tables_cached(branches, pattern["head_offsets"], heads, n, pattern["causal"],
                               str(device))


def table_length(n: int) -> int:
    """A length >= n at which decoding builds its tables: the next power of two, so a decoder
    rebuilds them O(log N) times. Exact for causal patterns, whose rows below n never depend on
    the tokens after them."""
    return 1 << max(0, n - 1).bit_length()


def check_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                 first: int, pattern: dict, kernel: object = None
                 ) -> tuple[int, int, int, int, int, int]:
    """(B, H, T, D, Hkv, M) of a decode call: q (B, H, T, D) new queries, k, v (B, Hkv, M, D)
    cached keys at `positions` (M,), for a causal pattern; `kernel` as for check."""
    if not pattern["causal"]:
        raise InputError(f"pattern '{pattern['name']}' is not causal: decoding needs a causal "
                         f"pattern (a query must not see keys that have not arrived)")
    for arg, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise InputError(f"{arg} must be a 4-D tensor, got {getattr(t, 'shape', t)}")
    batch, heads, t, dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != dim or heads % k.shape[1]:
        raise InputError(f"k and v must be (B={batch}, Hkv, M, D={dim}) with Hkv dividing "
                         f"{heads}, got {tuple(k.shape)} and {tuple(v.shape)}")
    if positions.shape != (k.shape[2],):
        raise InputError(f"positions must be ({k.shape[2]},), one per cached key, got "
                         f"{tuple(positions.shape)}")
    if first < 0 or first + t > MAX_TOKENS:
        raise InputError(f"first must be in [0, 2^30 - T], got {first}")
    _check_row_offsets(max(t, k.shape[2]), dim)
    call = Call(batch, heads, k.shape[1], t, dim, q.dtype, q.device, False)
    _check_heads(call, pattern)
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype \
            or v.dtype != q.dtype:
        raise InputError(f"the generated kernels take float32, float16 or bfloat16 tensors of "
                         f"one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.stride(-1) != 1 or k.stride() != v.stride() or k.stride(-1) != 1:
        raise InputError("q, k and v need contiguous rows (stride 1 along D), k and v the same "
                         "strides")
    _check_interpreter(q.device, kernel)
    return batch, heads, t, dim, k.shape[1], k.shape[2]


@lru_cache(maxsize=64)
def _random_cached(block: int, draws: int, seed: int, n: int, heads: int, causal: bool,
                   device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    table = random_blocks(block, draws, seed, n, heads, causal)  # (H, blocks, draws)
    head, query, _ = (table >= 0).nonzero(as_tuple=True)
    by_key = head * table.shape[1] + table[table >= 0]  # (head, key block), flattened
    first = torch.zeros(heads * table.shape[1] + 1, dtype=torch.int64)
    first[1:] = torch.bincount(by_key, minlength=heads * table.shape[1]).cumsum(0)
    query = query[torch.argsort(by_key, stable=True)]
    return tuple(x.to(torch.int32).to(device) for x in (table, first, query))


def random_tables(block: int, draws: int, seed: int, n: int, heads: int, causal: bool,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random branch's draws (H, blocks, draws) int32 for the row kernels, and the same pairs
    by key block for the column kernels: the query blocks that drew key block j for head h are
    query_blocks[first[h * blocks + j] : first[h * blocks + j + 1]]."""
    return _random_cached(block, draws, seed, n, heads, causal, str(device))


def global_tokens(tokens: list[int], n: int, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The global tokens below N (sorted, int32) and an int8 flag per position."""
    return _tokens_cached(tuple(tokens), n, str(device))
