"""A spattn pattern as a Hugging Face transformers attention implementation.

    import spattn.integrations.transformers as spattn_hf
    name = spattn_hf.register("longnet-lm")
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation=name)
    # or, on a loaded model: model.set_attn_implementation(name)

`register` adds two functions under one name: an attention function (`AttentionInterface`) that
runs `spattn.attention` on the model's query, key and value states, and a mask function
(`AttentionMaskInterface`) that hands it the 2-D padding mask as it is, so transformers never
builds an N x N mask. It serves any model that calls attention through the interface:

- padding: the (B, N) `attention_mask` becomes spattn's key_padding_mask (left padding in
  batched generation included); each row is segmented from its own first real token;
- the KV cache during `generate`: the new queries are the last positions of the keys
  (bottom-right), so cached decoding gives the rows of the full forward;
- grouped-query attention natively (no repeat of k and v), training with backward, any dtype
  spattn takes, and gpt-oss's attention sinks (`s_aux`).

The pattern replaces the model's own attention pattern: a model's `sliding_window` is not
applied on top of it (write the window into the pattern instead).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from spattn.errors import SpattnError
from spattn.patterns.loader import load_pattern
from spattn.patterns.spec import Pattern
from spattn.runtime.dispatch import attention


class IntegrationError(SpattnError, ValueError):
    """A model call that spattn's attention implementation cannot serve as asked."""


def implementation_name(pattern: Pattern) -> str:
    """The name spattn registers `pattern` under: its own prefix, the pattern's name and content
    hash. Never `org/repo` (a Hub kernel to transformers) nor a name with `sdpa` or `flash` in
    it (which transformers treats as those implementations)."""
    label = pattern.name
    if any(word in label for word in ("sdpa", "flash")):
        label = "pattern"
    return f"spattn-{label}-{pattern.content_hash()[:8]}"


def register(pattern: Pattern | str | os.PathLike[str], *, backend: str | None = None) -> str:
    """Register `pattern` (a Pattern, built-in name or YAML path) with transformers' attention
    and mask interfaces; returns the name to pass as `attn_implementation`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    pattern = load_pattern(pattern)
    name = implementation_name(pattern) + (f"-{backend}" if backend else "")

    def attention_function(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                           value: torch.Tensor, attention_mask: torch.Tensor | None,
                           dropout: float = 0.0, scaling: float | None = None,
                           **kwargs: Any) -> tuple[torch.Tensor, None]:
        return attention_forward(pattern, query, key, value, attention_mask, dropout=dropout,
                                 scaling=scaling, backend=backend, **kwargs)

    AttentionInterface.register(name, attention_function)
    AttentionMaskInterface.register(name, padding_mask)
    return name


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
                 kv_offset: int = 0, mask_function: Any = None,
                 attention_mask: torch.Tensor | None = None, **kwargs: Any
                 ) -> torch.Tensor | None:
    """The mask function: the (B, kv_length) bool padding mask (True at real tokens), or None
    when nothing is padded. spattn's pattern carries the causal structure itself."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:].bool()
    return None if bool(mask.all()) else mask


def attention_forward(pattern: Pattern, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None, *,
                      dropout: float = 0.0, scaling: float | None = None,
                      backend: str | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query (B, H, Nq, D), key/value (B, Hkv, Nk, D) as transformers passes them -> the output
    (B, Nq, H, D) and no attention weights."""
    if dropout:
        raise IntegrationError(f"spattn's attention has no dropout; got dropout={dropout} "
                               f"(set the model's attention_dropout to 0.0)")
    if kwargs.get("softcap") is not None:
        raise IntegrationError("spattn's attention does not support logit soft-capping "
                               "(softcap)")
    if kwargs.get("output_attentions"):
        raise IntegrationError("spattn's attention computes no attention weights "
                               "(output_attentions=True needs attn_implementation='eager')")
    sinks = kwargs.get("s_aux")
    padding = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise IntegrationError(
                f"spattn's attention takes the 2-D (batch, keys) padding mask its mask function "
                f"returns; got a {attention_mask.dim()}-D mask of shape "
                f"{tuple(attention_mask.shape)} (a custom 4-D mask cannot be honored)")
        keep = attention_mask.bool()
        # a static cache's unfilled slots: keys past the last real one in every row
        filled = int(keep.any(0).nonzero().max()) + 1 if keep.any() else keep.shape[1]
        if filled < key.shape[2]:
            key, value, keep = key[:, :, :filled], value[:, :, :filled], keep[:, :filled]
        padding = None if bool(keep.all()) else ~keep
    seq_lens = _packed_lengths(kwargs.get("position_ids"), query, key, padding)
    out = attention(query, key, value, pattern, backend=backend, scale=scaling,
                    key_padding_mask=padding, seq_lens=seq_lens,
                    sinks=None if sinks is None else sinks.to(query.dtype))
    return out.transpose(1, 2).contiguous(), None


def _packed_lengths(position_ids: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor,
                    padding: torch.Tensor | None) -> list[int] | None:
    """Sequence lengths when position_ids restart inside a row (packed training batches), as
    transformers' flash-attention path reads them; None for one sequence per row."""
    if position_ids is None or padding is not None or query.shape[2] != key.shape[2]:
        return None
    ids = position_ids.reshape(-1, position_ids.shape[-1])
    if ids.shape[-1] != key.shape[2]:
        return None
    starts = torch.nonzero(ids[:, 1:] != ids[:, :-1] + 1)
    if len(starts) == 0:
        return None
    if ids.shape[0] != 1 and not bool((ids == ids[:1]).all()):
        raise IntegrationError("packed sequences (position_ids that restart) must be packed the "
                               "same way in every batch row")
    bounds = [0, *(int(s) + 1 for s in starts[:, 1].unique()), key.shape[2]]
    return [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
