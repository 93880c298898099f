"""torchscale's LongNet (`torchscale.component.dilated_attention.DilatedAttention`) in spattn.

    pattern = pattern_from_config("[2048,4096,8192]", "[1,2,4]", causal=True)
    layer = from_torchscale(state_dict, num_heads=16, segment_length="[2048,4096,8192]",
                            dilated_ratio="[1,2,4]", causal=True)

torchscale configures LongNet with two strings, `segment_length` and `dilated_ratio` (it reads
them with `eval`; here they are parsed as lists of integers and nothing else). Its head rule is
spattn's `head_offsets: blocked`. A DilatedAttention layer's parameters map one to one onto
`MultiheadDilatedAttention`:

    q_proj.weight, q_proj.bias     -> q_proj.weight, q_proj.bias
    k_proj.*, v_proj.*, out_proj.* -> the same names
    inner_attn_ln.weight, .bias    -> inner_attn_ln.* (torchscale's `subln`; subln=True here)

A multiway layer (BEiT-3) holds two copies of each, `q_proj.A.weight` and `q_proj.B.weight`:
choose one with `multiway="A"` or `"B"`. xPos (`xpos.*`) is not supported.

spattn computes LongNet as the paper defines it; docs/torchscale.md says, with numbers, where
torchscale's code differs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import torch

from spattn.errors import SpattnError
from spattn.limits import MAX_BRANCHES
from spattn.modules import MultiheadDilatedAttention
from spattn.patterns.spec import Pattern

_LIST = re.compile(r"\[\s*\d+(\s*,\s*\d+)*\s*,?\s*\]|\(\s*\d+(\s*,\s*\d+)*\s*,?\s*\)")
_MAX_TEXT = 4096  # characters of one config string
_LINEAR = ("q_proj", "k_proj", "v_proj", "out_proj")
_PROJECTIONS = (*_LINEAR, "inner_attn_ln")
_PARAMS = ("weight", "bias")


class TorchscaleError(SpattnError, ValueError):
    """A torchscale config value or state dict that spattn cannot take."""


def parse_int_list(value: str | Sequence[int], field: str) -> list[int]:
    """torchscale's "[2048,4096]" (or a list of ints) as a list of ints; never `eval`."""
    if isinstance(value, str):
        text = value.strip()
        if len(text) > _MAX_TEXT or not _LIST.fullmatch(text):
            shown = text if len(text) <= 60 else text[:57] + "..."
            raise TorchscaleError(f"{field} must be a list of integers such as '[2048,4096]', "
                                  f"got {shown!r}")
        values = [int(x) for x in re.findall(r"\d+", text)]
    elif isinstance(value, Sequence):
        values = list(value)
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in values):
            raise TorchscaleError(f"{field} must hold integers, got {values[:8]!r}")
    else:
        raise TorchscaleError(f"{field} must be a string such as '[2048,4096]' or a list of "
                              f"integers, got {type(value).__name__}")
    if not values or len(values) > MAX_BRANCHES:
        raise TorchscaleError(f"{field} must list 1 to {MAX_BRANCHES} values, got {len(values)}")
    return values


def pattern_from_config(segment_length: str | Sequence[int], dilated_ratio: str | Sequence[int],
                        *, causal: bool, name: str = "torchscale-longnet") -> Pattern:
    """The spattn Pattern of a torchscale LongNet config: one dilated branch per
    (segment_length[i], dilated_ratio[i]), torchscale's head rule (`blocked`), multiset mixing
    (the paper's eqs. 9-10, which torchscale's scattering implements)."""
    segments = parse_int_list(segment_length, "segment_length")
    ratios = parse_int_list(dilated_ratio, "dilated_ratio")
    if len(segments) != len(ratios):
        raise TorchscaleError(f"segment_length and dilated_ratio must have one entry per branch, "
                              f"got {len(segments)} and {len(ratios)}")
    if not isinstance(causal, bool):
        raise TorchscaleError(f"causal must be True or False, got {causal!r}")
    from pydantic import ValidationError

    try:
        return Pattern.model_validate({
            "name": name, "causal": causal, "head_offsets": "blocked",
            "description": "torchscale LongNet config: segment_length "
                           f"{segments}, dilated_ratio {ratios}",
            "branches": [{"segment": w, "dilation": r} for w, r in zip(segments, ratios,
                                                                      strict=True)],
        })
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise TorchscaleError(f"{where}: {first['msg']}") from None


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], *, prefix: str = "",
                       multiway: str | None = None) -> dict[str, torch.Tensor]:
    """A torchscale DilatedAttention's parameters (those under `prefix`) renamed for
    MultiheadDilatedAttention."""
    return {name: value for name, (_, value) in _collect(state_dict, prefix, multiway).items()}


def _collect(state_dict: Mapping[str, torch.Tensor], prefix: str,
             multiway: str | None) -> dict[str, tuple[str, torch.Tensor]]:
    """MultiheadDilatedAttention's name -> (the checkpoint's key, its value)."""
    if multiway not in (None, "A", "B"):
        raise TorchscaleError(f"multiway must be None, 'A' or 'B', got {multiway!r}")
    found: dict[str, tuple[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        part = key[len(prefix):].split(".")
        if part[0] == "xpos":
            raise TorchscaleError(f"{key}: xPos relative positions are not supported by spattn")
        if part[0] not in _PROJECTIONS or part[-1] not in _PARAMS or len(part) not in (2, 3):
            raise TorchscaleError(f"{key}: not a parameter of torchscale's DilatedAttention "
                                  f"(expected {', '.join(_PROJECTIONS)} with .weight or .bias)")
        if len(part) == 3:  # a multiway copy: q_proj.A.weight
            if multiway is None:
                raise TorchscaleError(f"{key}: a multiway layer; choose its copy with "
                                      f"multiway='A' or 'B'")
            if part[1] != multiway:
                continue
            part = [part[0], part[2]]
        found[".".join(part)] = (key, value)
    if not found:
        raise TorchscaleError(f"no torchscale attention parameters under prefix {prefix!r}")
    return found


def _check(params: Mapping[str, tuple[str, torch.Tensor]], key_of: Callable[[str], str]
           ) -> tuple[int, bool, bool]:
    """The whole checkpoint checked before anything is copied: (embed_dim, bias, subln)."""
    for key, value in params.values():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            got = getattr(value, "dtype", type(value).__name__)
            raise TorchscaleError(f"{key}: expected a floating-point tensor, got {got}")
    if "q_proj.weight" not in params:
        raise TorchscaleError(f"no {key_of('q_proj.weight')} in the state dict (expected shape "
                              f"(embed_dim, embed_dim))")
    q_key, weight = params["q_proj.weight"]
    if weight.dim() != 2 or weight.shape[0] != weight.shape[1]:
        raise TorchscaleError(f"{q_key}: expected shape (embed_dim, embed_dim), got "
                              f"{tuple(weight.shape)}")
    embed = weight.shape[1]
    biased = [p for p in _LINEAR if f"{p}.bias" in params]
    if biased and len(biased) < len(_LINEAR):
        missing = ", ".join(key_of(f"{p}.bias") for p in _LINEAR if p not in biased)
        raise TorchscaleError(f"biases on {', '.join(biased)} only: torchscale's four "
                              f"projections have biases or none; missing {missing} (expected "
                              f"shape ({embed},))")
    subln = any(name.startswith("inner_attn_ln.") for name in params)
    expected = {f"{p}.weight": (embed, embed) for p in _LINEAR}
    expected |= {f"{p}.bias": (embed,) for p in biased}
    if subln:
        expected |= {"inner_attn_ln.weight": (embed,), "inner_attn_ln.bias": (embed,)}
    for name, shape in expected.items():
        if name not in params:
            raise TorchscaleError(f"no {key_of(name)} in the state dict (expected shape {shape})")
        key, value = params[name]
        if tuple(value.shape) != shape:
            raise TorchscaleError(f"{key}: expected shape {shape} (embed_dim {embed}, from "
                                  f"{q_key}), got {tuple(value.shape)}")
    return embed, bool(biased), subln


def from_torchscale(state_dict: Mapping[str, torch.Tensor], *, num_heads: int,
                    segment_length: str | Sequence[int], dilated_ratio: str | Sequence[int],
                    causal: bool, prefix: str = "", multiway: str | None = None,
                    backend: str | None = None) -> MultiheadDilatedAttention:
    """A MultiheadDilatedAttention with a torchscale DilatedAttention's config and weights:
    sizes, biases and `subln` read from the state dict, every key and shape checked before
    anything is copied."""
    params = _collect(state_dict, prefix, multiway)

    copy = multiway if any(key.count(".") - prefix.count(".") == 2
                           for key, _ in params.values()) else None

    def key_of(name: str) -> str:  # a missing parameter's key, as the checkpoint spells keys
        projection, param = name.split(".")
        return f"{prefix}{projection}.{copy + '.' if copy else ''}{param}"

    embed, bias, subln = _check(params, key_of)
    weight = params["q_proj.weight"][1]
    layer = MultiheadDilatedAttention(
        embed, num_heads, pattern_from_config(segment_length, dilated_ratio, causal=causal),
        bias=bias, subln=subln, dtype=weight.dtype, device=weight.device, backend=backend)
    layer.load_state_dict({name: value for name, (_, value) in params.items()})
    return layer
