"""A spattn pattern as a Hugging Face transformers attention implementation.

    import spattn.integrations.transformers as spattn_hf
    name = spattn_hf.register("longnet-lm")
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation=name)
    # or, on a loaded model: model.set_attn_implementation(name)

`register` adds two functions under one name: an attention function (`AttentionInterface`) that
runs `spattn.attention` on the model's query, key and value states, and a mask function
(`AttentionMaskInterface`) that hands it a (B, N) tensor of sequence ids (0 at padding), so
transformers never builds an N x N mask. It serves any model that calls attention through the
interface:

- padding, left, right or both (batched generation, fixed-length or pad-to-multiple training
  batches): each row's real tokens, in order, are its sequence, segmented from its first one;
- packed sequences exactly where transformers' own mask separates them: it reads them from
  position_ids only without an attention_mask and a cache, at every step that is not +1 (the
  mask function asks transformers' mask about each token and the one before it; a
  chunked-attention model's chunks would read as packed sequences too);
- the KV cache during `generate`: the new queries are the last positions of the keys
  (bottom-right), so cached decoding gives the rows of the full forward; a static cache's
  slots past the last query are unfilled and dropped;
- grouped-query attention natively (no repeat of k and v), training with backward, any dtype
  spattn takes, and gpt-oss's attention sinks (`s_aux`).

The pattern replaces the model's own attention pattern: a model's `sliding_window` is not
applied on top of it (write the window into the pattern instead).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from spattn.errors import SpattnError
from spattn.patterns.loader import load_pattern
from spattn.patterns.spec import Pattern
from spattn.runtime.dispatch import attention
from spattn.runtime.varlen import connected_zero


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
                 attention_mask: torch.Tensor | None = None, use_vmap: bool = False,
                 **kwargs: Any) -> torch.Tensor:
    """The mask function: the sequence ids of the key slots, a (B, L) int64 tensor, 0 at padding;
    a row's tokens with one id are one sequence. L stops at the last query's slot (a static
    cache's later slots are unfilled). The pattern carries the causal structure itself."""
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    length = min(max(q_offset + q_length - kv_offset, q_length), kv_length)
    if attention_mask is not None:  # transformers reads no packing from position_ids then
        real = attention_mask.bool()
        if real.shape[1] < kv_offset + length:  # as transformers pads it: the rest is padding
            real = F.pad(real, (0, kv_offset + length - real.shape[1]))
        return real[:, kv_offset:kv_offset + length].long()
    device = kwargs.get("device")
    if q_offset == 0 and kv_offset == 0 and q_length == kv_length:
        return _split_where_transformers_does(mask_function, batch_size, q_length, device,
                                              use_vmap)
    return torch.ones(batch_size, length, dtype=torch.long, device=device)


def _split_where_transformers_does(mask_function: Any, batch_size: int, length: int,
                                   device: Any, use_vmap: bool) -> torch.Tensor:
    """(B, N) sequence ids with a new id wherever transformers' own mask keeps a token from the
    one before it: the packed sequences it reads from position_ids (without attention_mask or
    cache), exactly as it decides them. Its mask is asked about those N - 1 pairs only."""
    ids = torch.ones(batch_size, length, dtype=torch.long, device=device)
    if mask_function is None or length < 2:
        return ids
    batch = torch.arange(batch_size, device=device)
    head = torch.zeros((), dtype=torch.long, device=device)
    query = torch.arange(1, length, device=device)
    if use_vmap:  # a mask function that only works element by element, as transformers runs it
        from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex

        pairs = torch.vmap(torch.vmap(mask_function, in_dims=(None, None, 0, 0)),
                           in_dims=(0, None, None, None))
        with TransformGetItemToIndex():
            sees = pairs(batch, head, query, query - 1)
    else:
        sees = mask_function(batch[:, None], head, query[None], query[None] - 1)
    starts = ~torch.as_tensor(sees, device=device).bool().expand(batch_size, length - 1)
    ids[:, 1:] += starts.cumsum(1)
    return ids


def attention_forward(pattern: Pattern, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None, *,
                      dropout: float = 0.0, scaling: float | None = None,
                      backend: str | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query (B, H, Nq, D), key/value (B, Hkv, Nk, D) as transformers passes them -> the output
    (B, Nq, H, D) and no attention weights.

    `attention_mask` is None or (B, L) with Nq <= L <= Nk: nonzero at real tokens (a bool or
    0/1 padding mask, or the sequence ids `padding_mask` gives: a row's tokens with one id are
    one sequence). Key slots past L are a static cache's unfilled slots and are dropped; the
    queries are the last Nq of the L slots. Without a mask, position_ids that restart (do not
    increase) start a new packed sequence; positions that grow with gaps stay one sequence."""
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
    sinks = None if sinks is None else sinks.to(query.dtype)

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            seq_lens: list[int] | None = None) -> torch.Tensor:
        return attention(q, k, v, pattern, backend=backend, scale=scaling, seq_lens=seq_lens,
                         sinks=sinks)

    ids = _sequence_ids(attention_mask, kwargs.get("position_ids"), query, key)
    if ids is not None and ids.shape[1] < key.shape[2]:  # a static cache's unfilled slots
        key, value = key[:, :, :ids.shape[1]], value[:, :, :ids.shape[1]]
    if ids is None or _one_sequence_per_row(ids):
        out = run(query, key, value)
    else:
        out = _by_row(query, key, value, ids, run)
    return out.transpose(1, 2).contiguous(), None


def _sequence_ids(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                  query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
    """The (B, L) sequence ids of the key slots (0 at padding), or None for one whole sequence
    per row."""
    batch, nq, nk = query.shape[0], query.shape[2], key.shape[2]
    if attention_mask is None:
        return _restarts(position_ids, batch, nq, nk)
    if attention_mask.dim() != 2:
        raise IntegrationError(
            f"spattn's attention takes the 2-D (batch, keys) padding mask its mask function "
            f"returns; got a {attention_mask.dim()}-D mask of shape "
            f"{tuple(attention_mask.shape)} (a custom 4-D mask cannot be honored)")
    rows, length = attention_mask.shape
    if rows != batch or not nq <= length <= nk:
        raise IntegrationError(f"the padding mask must be (batch={batch}, keys) with {nq} to "
                               f"{nk} keys (the queries' to the cache's); got "
                               f"{tuple(attention_mask.shape)}")
    if attention_mask.dtype == torch.bool or attention_mask.is_floating_point():
        return (attention_mask != 0).long()
    return attention_mask.long()


def _restarts(position_ids: torch.Tensor | None, batch: int, nq: int,
              nk: int) -> torch.Tensor | None:
    """Sequence ids from position_ids that restart inside a row (packed sequences), a new one
    wherever the position does not increase; None when no row restarts."""
    if position_ids is None or nq != nk or position_ids.dim() != 2:
        return None
    if position_ids.shape[1] != nk or position_ids.shape[0] not in (1, batch):
        return None
    starts = position_ids[:, 1:] <= position_ids[:, :-1]
    if not bool(starts.any()):
        return None
    ids = torch.ones(position_ids.shape, dtype=torch.long, device=position_ids.device)
    ids[:, 1:] += starts.cumsum(1)
    return ids.expand(batch, -1)


def _one_sequence_per_row(ids: torch.Tensor) -> bool:
    """No padding and one sequence id in every row."""
    return bool((ids == ids[:, :1]).all()) and bool((ids[:, :1] != 0).all())


def _by_row(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ids: torch.Tensor,
            run: Any) -> torch.Tensor:
    """Each batch row's real tokens (nonzero ids), in order, as its sequence, packed where the
    id changes; zeros at padding queries. The queries are the last Nq key slots, so a row's real
    queries are the last of its real keys."""
    nq, nk = query.shape[2], key.shape[2]
    ids = ids.cpu()
    rows = []
    for row in range(len(ids)):
        keys = ids[row].nonzero().flatten()
        queries = keys[keys >= nk - nq] - (nk - nq)
        out = query.new_zeros(1, *query.shape[1:])
        if len(queries):
            got = run(_take(query[row:row + 1], queries), _take(key[row:row + 1], keys),
                      _take(value[row:row + 1], keys), _run_lengths(ids[row, keys]))
            out = out.index_copy(2, queries.to(query.device), got)
        rows.append(out)
    out = torch.cat(rows)
    if not out.requires_grad and torch.is_grad_enabled():  # every row padding: zero gradients
        out = out + connected_zero(query, key, value)
    return out


def _take(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor[:, :, index]: a view where the (sorted, non-empty) index is one run."""
    first, count = int(index[0]), len(index)
    if int(index[-1]) - first + 1 == count:
        return tensor[:, :, first:first + count]
    return tensor.index_select(2, index.to(tensor.device))


def _run_lengths(ids: torch.Tensor) -> list[int] | None:
    """The lengths of the runs of equal ids (packed sequences); None for a single run."""
    change = (torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1).tolist()
    if not change:
        return None
    bounds = [0, *change, len(ids)]
    return [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
