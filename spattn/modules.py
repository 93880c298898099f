"""`torch.nn` modules around `spattn.attention`.

- `DilatedAttention(pattern)`: the core op as a module, shaped like
  `scaled_dot_product_attention`: q (B, H, N, D), k/v (B, Hkv, N, D) -> (B, H, N, D).
- `MultiheadDilatedAttention(embed_dim, num_heads, pattern)`: a drop-in for
  `nn.MultiheadAttention(batch_first=True)` over (B, N, E) inputs, with the query, key, value and
  output projections, grouped-query attention (`kv_heads < num_heads`) and the sparse pattern in
  place of dense attention. It returns the output tensor only (no attention weights). With a
  `cache=module.new_cache()` it decodes a sequence a few tokens at a time (`spattn.KVCache`).

Both take a `Pattern`, a built-in pattern name or a YAML path, loaded once at construction.
Configuration mistakes raise `ModuleError` (a `SpattnError` and a `ValueError`) saying what was
expected.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from spattn.errors import SpattnError
from spattn.limits import check_scale
from spattn.patterns.loader import load_pattern
from spattn.patterns.spec import Pattern
from spattn.runtime import attention
from spattn.runtime.decode import KVCache

PatternLike = Pattern | str | os.PathLike[str]

__all__ = ["DilatedAttention", "ModuleError", "MultiheadDilatedAttention"]


class ModuleError(SpattnError, ValueError):
    """A module built with inconsistent sizes, or called with inputs of the wrong shape."""


class DilatedAttention(nn.Module):
    """`spattn.attention(q, k, v, pattern)` as a module, with no parameters.

    Args:
        pattern: a `spattn.Pattern`, a built-in name (`spattn list`) or a path to a YAML file;
            loaded once here.
        scale: softmax scale; defaults to the pattern's `softmax_scale`, else 1/sqrt(D).
        backend: a backend name (`"torch"`, `"triton"`) or None to choose automatically.

    `forward(q, k, v)` takes q (B, H, N, D) and k, v (B, Hkv, N, D) with H a multiple of Hkv and
    returns (B, H, N, D) in q's dtype, differentiable in q, k and v.
    """

    def __init__(self, pattern: PatternLike, *, scale: float | None = None,
                 backend: str | None = None) -> None:
        super().__init__()
        self.pattern: Pattern = load_pattern(pattern)
        self.scale = None if scale is None else check_scale(scale)
        self.backend = backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                key_padding_mask: torch.Tensor | None = None,
                seq_lens: list[int] | torch.Tensor | None = None,
                sinks: torch.Tensor | None = None) -> torch.Tensor:
        """Sparse attention of q over k, v by the module's pattern; several sequences per call
        as `spattn.attention` takes them (a (B, N) key_padding_mask True at padding, or packed
        seq_lens), and attention sinks (H,)."""
        return attention(q, k, v, self.pattern, backend=self.backend, scale=self.scale,
                         key_padding_mask=key_padding_mask, seq_lens=seq_lens, sinks=sinks)

    def extra_repr(self) -> str:
        parts = [f"pattern={self.pattern.name!r}"]
        if self.scale is not None:
            parts.append(f"scale={self.scale}")
        if self.backend is not None:
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)


class MultiheadDilatedAttention(nn.Module):
    """Multi-head attention over (B, N, E) sequences with a spattn pattern in place of dense
    attention.

    The query is projected E -> E (num_heads heads of head_dim = E // num_heads), key and value
    E -> kv_heads * head_dim, and the attention output back E -> E. With kv_heads < num_heads
    this is grouped-query attention: query head h reads key/value head
    h // (num_heads // kv_heads). Initialization follows `nn.MultiheadAttention`: xavier_uniform_
    on the query, key and value projections, the output projection as `nn.Linear`, and zero
    biases.

    Args:
        embed_dim: model width E.
        num_heads: query heads; must divide embed_dim.
        pattern: a `spattn.Pattern`, a built-in name or a YAML path. If it fixes `heads`,
            `kv_heads` or `head_dim` (or has per-head offsets), they must match this module.
        kv_heads: key/value heads (default num_heads); must divide num_heads.
        bias: add biases to the four projections.
        batch_first: inputs and output are (B, N, E) when True, else (N, B, E).
        dropout: attention dropout; only 0.0 is supported.
        device, dtype: where and in which dtype to create the parameters.
        backend: passed to `spattn.attention` (None chooses automatically).
        sinks: hold a learnable attention-sink logit per head (gpt-oss), initialized to 0:
            exp(sinks[h]) joins every softmax denominator of head h.
        subln: a LayerNorm on the attention output before the output projection, as
            torchscale's MultiheadAttention has with `subln` (its `inner_attn_ln`).

    `forward(query, key=None, value=None)` returns the (B, N, E) output only. With key and
    value None it is self-attention. Key and value must have the query's batch and length
    (a pattern maps query positions to key positions of one sequence).
    """

    def __init__(self, embed_dim: int, num_heads: int, pattern: PatternLike,
                 kv_heads: int | None = None, bias: bool = True, batch_first: bool = True,
                 dropout: float = 0.0, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, backend: str | None = None,
                 sinks: bool = False, subln: bool = False) -> None:
        super().__init__()
        kv_heads = num_heads if kv_heads is None else kv_heads
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads),
                            ("kv_heads", kv_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModuleError(f"{name} must be a positive integer, got {value!r}")
        if embed_dim % num_heads:
            raise ModuleError(f"embed_dim ({embed_dim}) must be divisible by num_heads "
                              f"({num_heads})")
        if num_heads % kv_heads:
            raise ModuleError(f"num_heads ({num_heads}) must be divisible by kv_heads "
                              f"({kv_heads})")
        if dropout != 0.0:
            raise ModuleError(f"dropout must be 0.0 (attention dropout is not supported), "
                              f"got {dropout}")
        self.embed_dim, self.num_heads, self.kv_heads = embed_dim, num_heads, kv_heads
        self.head_dim = embed_dim // num_heads
        self.batch_first = batch_first
        self.dropout = dropout
        self.attn = DilatedAttention(pattern, backend=backend)
        self._check_pattern(self.attn.pattern)

        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        kv_dim = kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.sinks = nn.Parameter(torch.zeros(num_heads, **factory)) if sinks else None
        self.inner_attn_ln = nn.LayerNorm(embed_dim, **factory) if subln else None
        self.reset_parameters()

    @property
    def pattern(self) -> Pattern:
        return self.attn.pattern

    def _check_pattern(self, pattern: Pattern) -> None:
        for field, fixed, ours, what in (
            ("heads", pattern.heads, self.num_heads, "num_heads"),
            ("kv_heads", pattern.kv_heads, self.kv_heads, "kv_heads"),
            ("head_dim", pattern.head_dim, self.head_dim, "head_dim (embed_dim // num_heads)"),
        ):
            if fixed is not None and fixed != ours:
                raise ModuleError(f"pattern '{pattern.name}' fixes {field} = {fixed}, but the "
                                  f"module has {what} = {ours}")
        offsets_heads = pattern.required_heads()
        if offsets_heads is not None and offsets_heads != self.num_heads:
            raise ModuleError(f"pattern '{pattern.name}' has per-head offsets for "
                              f"{offsets_heads} heads, but the module has num_heads = "
                              f"{self.num_heads}")

    def reset_parameters(self) -> None:
        """Initialize like `nn.MultiheadAttention`."""
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight)
        self.out_proj.reset_parameters()
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        if self.sinks is not None:
            nn.init.zeros_(self.sinks)
        if self.inner_attn_ln is not None:
            self.inner_attn_ln.reset_parameters()

    def _check_input(self, name: str, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise ModuleError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        layout = "(batch, seq_len, embed_dim)" if self.batch_first else \
            "(seq_len, batch, embed_dim)"
        if x.dim() != 3:
            raise ModuleError(f"{name} must be 3-D {layout}, got shape {tuple(x.shape)}")
        if x.shape[-1] != self.embed_dim:
            raise ModuleError(f"{name}'s last dimension must be embed_dim = {self.embed_dim}, "
                              f"got shape {tuple(x.shape)}")

    def new_cache(self) -> KVCache:
        """A KVCache for decoding with this module (its pattern, backend and scale)."""
        return KVCache(self.pattern, backend=self.attn.backend, scale=self.attn.scale)

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None,
                value: torch.Tensor | None = None, *,
                key_padding_mask: torch.Tensor | None = None,
                seq_lens: list[int] | torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Attend `query` over `key`/`value` (default: `query`, self-attention).

        Shapes are (B, N, E) (or (N, B, E) with batch_first=False); returns the same shape.
        `key_padding_mask` (B, N) is True at padding, as in `nn.MultiheadAttention` (each row's
        real tokens one contiguous run; padding rows come out as the output projection's bias);
        `seq_lens` packs several sequences along N. With a `cache` (from `new_cache()`), `query`
        is the next tokens of a sequence decoded so far (self-attention, no autograd), and the
        output is their rows of the full causal forward.
        """
        if (key is None) != (value is None):
            raise ModuleError("give both key and value, or neither (self-attention)")
        if cache is not None and (key is not None or key_padding_mask is not None
                                  or seq_lens is not None):
            raise ModuleError("a cache decodes self-attention of one sequence per batch row: "
                              "no key/value, key_padding_mask or seq_lens")
        self._check_input("query", query)
        if key is None:
            key = value = query
        else:
            self._check_input("key", key)
            self._check_input("value", value)
            if key.shape != query.shape or value.shape != query.shape:
                raise ModuleError(f"key and value must have the query's shape "
                                  f"{tuple(query.shape)}, got {tuple(key.shape)} and "
                                  f"{tuple(value.shape)}")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, n, _ = query.shape
        q = self.q_proj(query).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(key).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            out = cache.attend(q, k, v, sinks=self.sinks)
        else:
            out = self.attn(q, k, v, key_padding_mask=key_padding_mask, seq_lens=seq_lens,
                            sinks=self.sinks)
        out = out.transpose(1, 2).reshape(b, n, self.embed_dim)
        if self.inner_attn_ln is not None:
            out = self.inner_attn_ln(out)
        out = self.out_proj(out)
        return out if self.batch_first else out.transpose(0, 1)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
                f"pattern={self.pattern.name!r}, batch_first={self.batch_first}, "
                f"sinks={self.sinks is not None}, subln={self.inner_attn_ln is not None}")
