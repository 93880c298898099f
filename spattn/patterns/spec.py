"""The pattern language: pydantic models for the YAML of SEMANTICS.md.

A pattern is immutable all the way down: frozen models and tuples (a list given for a list field
becomes a tuple), and `model_copy(update=...)` validates its update like a new model. So a
pattern always computes what its content hash, and every cache keyed on it, say.

Pydantic stays at this edge. Everything past `Pattern` works on the plain frozen dataclasses of
`spattn.patterns.geometry`, resolved for one sequence length and head count.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    NonNegativeInt,
    PositiveInt,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticKnownError

from spattn.limits import (
    MAX_BRANCHES,
    MAX_DRAWS,
    MAX_HEAD_DIM,
    MAX_HEADS,
    MAX_LIST_ITEMS,
    MAX_NAME_LENGTH,
    MAX_SEED,
    MAX_SIZE,
    ScaleError,
    bound_text,
    check_scale,
    short_int,
)

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]*$"


def _at_most(limit: int) -> AfterValidator:
    """An upper bound with a message naming it, e.g. 'expected an integer <= 1099511627776
    (2^40), got 2^63': without one, a huge size overflows numpy far from the YAML."""
    def check(value: int) -> int:
        if value > limit:
            raise ValueError(f"expected an integer <= {bound_text(limit)}, got {short_int(value)}")
        return value

    return AfterValidator(check)


def _frozen(max_length: int) -> BeforeValidator:
    """A list becomes a tuple, so no list is ever stored; one longer than `max_length` is
    refused as pydantic's own too_long before it is copied."""
    def freeze(value: Any) -> Any:
        if not isinstance(value, list):
            return value  # a tuple validates as it is; anything else fails as 'not a list'
        if len(value) > max_length:
            raise PydanticKnownError("too_long", {"field_type": "List", "max_length": max_length,
                                                  "actual_length": len(value)})
        return tuple(value)

    return BeforeValidator(freeze)


Size = Annotated[PositiveInt, _at_most(MAX_SIZE)]  # a token count: segment, window, stride...
Position = Annotated[NonNegativeInt, _at_most(MAX_SIZE)]  # a token position or an offset


class LocatedValueError(ValueError):
    """A validation failure at `loc`, relative to the validator raising it.

    Pydantic reports a model validator's error at the model itself; the loader appends this `loc`
    (found in the error's ctx['error']) so the message can name the precise field and YAML line.
    """

    def __init__(self, message: str, loc: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        self.loc = loc


class _Spec(BaseModel):
    # Errors never print the input: a list of a billion shared items has no printable repr.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True,
                              hide_input_in_errors=True)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy; with `update`, the fields given so far and the update validated as a new
        model (pydantic's own copy stores an update unchecked: a list, an unknown key, a size
        past its bound)."""
        if not update:
            return super().model_copy(deep=deep)
        names = {field.alias: name for name, field in type(self).model_fields.items()
                 if field.alias}
        data = {name: getattr(self, name) for name in self.model_fields_set}
        data.update((names.get(key, key), value) for key, value in update.items())
        return self.model_validate(data)


class _Branch(_Spec):
    """What every branch kind may carry: `heads`, the query heads it applies to (all when
    absent); other heads get nothing from the branch."""

    heads: Annotated[tuple[Annotated[NonNegativeInt, _at_most(MAX_HEADS - 1)], ...],
                     _frozen(MAX_HEADS), Field(min_length=1, max_length=MAX_HEADS)] | None = None

    @field_validator("heads")
    @classmethod
    def _distinct_heads(cls, heads: tuple[int, ...] | None) -> tuple[int, ...] | None:
        seen: set[int] = set()
        for i, h in enumerate(heads or ()):
            if h in seen:
                raise LocatedValueError(f"head {h} is listed twice", (i,))
            seen.add(h)
        return heads

    def applies_to(self) -> frozenset[int] | None:
        return None if self.heads is None else frozenset(self.heads)


class DilatedBranch(_Branch):
    """LongNet dilated attention: segments of `segment` tokens, every `dilation`-th row kept."""

    segment: Size
    dilation: Size
    offsets: Annotated[tuple[Position, ...], _frozen(MAX_HEADS),
                       Field(min_length=1, max_length=MAX_HEADS)] | None = None

    @field_validator("offsets")
    @classmethod
    def _offsets_below_dilation(
        cls, offsets: tuple[int, ...] | None, info: ValidationInfo
    ) -> tuple[int, ...] | None:
        dilation = info.data.get("dilation")  # absent when the dilation itself was invalid
        for i, s in enumerate(offsets or ()):
            if dilation is not None and s >= dilation:
                raise LocatedValueError(
                    f"expected an offset in [0, {dilation}) (below the dilation), got {s}", (i,)
                )
        return offsets


class WindowSpec(_Spec):
    size: Size


class WindowBranch(_Branch):
    """Sliding window: keys with |p - k| < size (causal: p - size < k <= p)."""

    window: WindowSpec


class GlobalSpec(_Spec):
    tokens: Annotated[tuple[Position, ...], _frozen(MAX_LIST_ITEMS),
                      Field(min_length=1, max_length=MAX_LIST_ITEMS)]


class GlobalBranch(_Branch):
    """Global tokens: every query sees them, and they see every key."""

    global_: GlobalSpec = Field(alias="global")


class StridedSpec(_Spec):
    stride: Size


class StridedBranch(_Branch):
    """The Sparse Transformer's strided attention: keys k with (p - k) mod stride == 0."""

    strided: StridedSpec


class RandomSpec(_Spec):
    block: Size
    blocks: Annotated[PositiveInt, _at_most(MAX_DRAWS)]
    seed: Annotated[NonNegativeInt, _at_most(MAX_SEED)] = 0


class RandomBranch(_Branch):
    """BigBird's random attention: each query block sees `blocks` key blocks of `block` tokens,
    drawn per head from `seed` (docs/branches.md defines the draw exactly)."""

    random: RandomSpec


class DenseSpec(_Spec):
    pass


class DenseBranch(_Branch):
    """Every key (causal still applies)."""

    dense: DenseSpec


def _branch_kind(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        return {
            DilatedBranch: "dilated",
            WindowBranch: "window",
            GlobalBranch: "global",
            StridedBranch: "strided",
            RandomBranch: "random",
            DenseBranch: "dense",
        }.get(type(value))
    if not isinstance(value, dict):
        return None
    for key in ("window", "global", "strided", "random", "dense"):
        if key in value:
            return key
    if "segment" in value or "dilation" in value:
        return "dilated"
    return None


Branch = Annotated[
    Annotated[DilatedBranch, Tag("dilated")]
    | Annotated[WindowBranch, Tag("window")]
    | Annotated[GlobalBranch, Tag("global")]
    | Annotated[StridedBranch, Tag("strided")]
    | Annotated[RandomBranch, Tag("random")]
    | Annotated[DenseBranch, Tag("dense")],
    Discriminator(
        _branch_kind,
        custom_error_type="branch_kind",
        custom_error_message=(
            "a branch is a mapping with segment+dilation, or one of the keys window, global, "
            "strided, random, dense"
        ),
    ),
]


class GeometricSpec(_Spec):
    """The paper's geometric schedule (eqs. 11-12).

    Branch i has w_i = segment * ratio^i and r_i = dilation * ratio^i.
    """

    segment: Size
    dilation: Size = 1
    ratio: Annotated[int, Field(strict=True, ge=2), _at_most(MAX_SIZE)]
    count: Annotated[PositiveInt, _at_most(MAX_BRANCHES)]

    @model_validator(mode="after")
    def _largest_fits(self) -> GeometricSpec:
        # ratio >= 2, so the loop stops after at most 41 products, whatever the count.
        for field in ("segment", "dilation"):
            value = getattr(self, field)
            for i in range(1, self.count):
                value *= self.ratio
                if value > MAX_SIZE:
                    raise LocatedValueError(
                        f"expected a count <= {i} with {field} {getattr(self, field)} and ratio "
                        f"{self.ratio} (branch i has {field} * ratio^i, at most "
                        f"{bound_text(MAX_SIZE)}), got {self.count}", ("count",))
        return self


class Schedule(_Spec):
    geometric: GeometricSpec


class Pattern(_Spec):
    """A validated sparse-attention pattern (see SEMANTICS.md for what it computes)."""

    name: Annotated[str, Field(max_length=MAX_NAME_LENGTH, pattern=NAME_PATTERN)]
    description: str | None = None
    causal: bool = False
    head_offsets: Literal["paper", "blocked"] = "paper"
    overlap: Literal["multiset", "union"] = "multiset"
    softmax_scale: float | None = None
    heads: Annotated[PositiveInt, _at_most(MAX_HEADS)] | None = None
    kv_heads: Annotated[PositiveInt, _at_most(MAX_HEADS)] | None = None
    head_dim: Annotated[PositiveInt, _at_most(MAX_HEAD_DIM)] | None = None
    branches: Annotated[tuple[Branch, ...], _frozen(MAX_BRANCHES),
                        Field(min_length=1, max_length=MAX_BRANCHES)] | None = None
    schedule: Schedule | None = None

    @field_validator("softmax_scale")
    @classmethod
    def _finite_positive_scale(cls, scale: float | None) -> float | None:
        if scale is None:
            return None
        try:  # the same check, and words, as the scale= argument of the API
            return check_scale(scale, "the scale")
        except ScaleError as error:
            raise ValueError(str(error)) from None

    @field_validator("kv_heads")
    @classmethod
    def _kv_heads_divide_heads(cls, kv_heads: int | None, info: ValidationInfo) -> int | None:
        heads = info.data.get("heads")
        if heads is not None and kv_heads is not None and heads % kv_heads:
            raise ValueError(f"expected a divisor of heads ({heads}), got {kv_heads}")
        return kv_heads

    @model_validator(mode="after")
    def _consistent(self) -> Pattern:
        if self.branches is not None and self.schedule is not None:
            raise LocatedValueError("give exactly one of 'branches' and 'schedule', got both",
                                    ("schedule",))
        if self.branches is None and self.schedule is None:
            raise LocatedValueError("expected 'branches' or 'schedule', got neither",
                                    ("branches",))
        # Every offsets list has one entry per head: `heads` when given, else the first list's.
        expected, why = self.heads, f"heads is {self.heads}"
        for i, branch in enumerate(self.branches or ()):
            if not isinstance(branch, DilatedBranch) or branch.offsets is None:
                continue
            if expected is None:
                expected, why = len(branch.offsets), f"as in branches[{i}].offsets"
            elif len(branch.offsets) != expected:
                raise LocatedValueError(
                    f"expected {expected} offsets (one per head; {why}), got {len(branch.offsets)}",
                    ("branches", i, "offsets"),
                )
        for i, branch in enumerate(self.branches or ()):
            if self.heads is not None and branch.heads and max(branch.heads) >= self.heads:
                raise LocatedValueError(
                    f"expected heads in [0, {self.heads}) (heads is {self.heads}), got "
                    f"{max(branch.heads)}", ("branches", i, "heads", branch.heads.index(
                        max(branch.heads))))
        return self

    def min_heads(self) -> int:
        """The fewest query heads a call may have: one more than any branch's largest head."""
        return max((max(b.heads) + 1 for b in self.branches or () if b.heads), default=1)

    def dilated_with_offsets(self) -> list[DilatedBranch]:
        return [b for b in self.branches or () if isinstance(b, DilatedBranch) and b.offsets]

    def expanded_branches(self) -> tuple[Any, ...]:
        """The branch list, with a geometric schedule written out."""
        if self.branches is not None:
            return self.branches
        g = self.schedule.geometric
        return tuple(
            DilatedBranch(segment=g.segment * g.ratio**i, dilation=g.dilation * g.ratio**i)
            for i in range(g.count)
        )

    def required_heads(self) -> int | None:
        """H fixed by the pattern: `heads`, or the length of an explicit offsets list."""
        if self.heads is not None:
            return self.heads
        with_offsets = self.dilated_with_offsets()
        return len(with_offsets[0].offsets) if with_offsets else None

    def content_hash(self) -> str:
        """A stable hash of what the pattern computes (the description does not count)."""
        data = self.model_dump(mode="json", by_alias=True, exclude={"description"})
        data["branches"] = [  # (`heads` only where given: hashes from before it stay the same)
            b.model_dump(mode="json", by_alias=True, exclude=None if b.heads else {"heads"})
            for b in self.expanded_branches()
        ]
        data.pop("schedule", None)
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
