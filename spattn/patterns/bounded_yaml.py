"""YAML read within limits: depth, nodes (aliases expanded) and values Python cannot read;
scalars read as YAML 1.2's core schema says, not as YAML 1.1.

PyYAML's composer and constructor recurse, and an alias is its anchored node used again, so
500 bytes of aliases can stand for a billion values. Before composing, one pass over the parser's
events (flat, never recursive) bounds the nesting and the nodes written; after composing, a count
memoized per node bounds them with every alias expanded, before anything is constructed.
libyaml parses when it is there (ten times faster); PyYAML's own parser explains any error.

PyYAML resolves plain scalars by YAML 1.1: `010` is 8, `1:30` is 90, `1_000` is 1000, `yes` and
`on` are true, `2001-12-14` is a date. Here they resolve by the YAML 1.2 core schema: null,
true/false, decimal, 0o and 0x integers, floats, everything else a string (`1:30` then fails as
'expected an integer, got the string'). A decimal integer with a leading zero, which YAML 1.1
reads as octal, is refused rather than read either way; so is an explicit tag outside the core
schema (`!!timestamp`, `!!set`...), and a key two merged mappings both give (PyYAML keeps the last,
YAML says the first).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import yaml

from spattn.limits import MAX_SIZE, MAX_YAML_DEPTH, MAX_YAML_NODES, bound_text

Loc = tuple[str | int, ...]  # a YAML path: ('branches', 1, 'dilation')


class Refused(Exception):
    """Past a limit, or a value Python cannot read: at `mark` (and `path`), or at `node`."""

    def __init__(self, message: str, mark: Any = None, path: Loc | None = None,
                 node: yaml.Node | None = None) -> None:
        super().__init__(message)
        self.message, self.mark, self.path, self.node = message, mark, path, node


class _Checked:
    """A loader whose constructor turns a value Python cannot read (a 5000-digit integer) into
    Refused at its node, and whose merges (`<<`) are never ambiguous."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)  # type: ignore[misc]
        except (ValueError, OverflowError) as error:
            if node.tag.endswith(":int"):
                message = (f"an integer of {len(str(node.value)):,} characters is far too large "
                           f"(sizes are at most {bound_text(MAX_SIZE)})")
            else:
                message = f"cannot read the value {clip(str(node.value))!r} ({clip(str(error))})"
            raise Refused(message, node.start_mark, node=node) from None

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        """PyYAML's merge, refusing a key that two mappings of one merge list both give."""
        for key, value in node.value:
            if key.tag == MERGE and isinstance(value, yaml.SequenceNode):
                for mapping in value.value:  # their own merges first (flattening is idempotent)
                    if isinstance(mapping, yaml.MappingNode):
                        self.flatten_mapping(mapping)
                _check_merge_list(key, value)  # PyYAML keeps the last one, YAML the first
        super().flatten_mapping(node)  # type: ignore[misc]


MERGE = "tag:yaml.org,2002:merge"
_TAG = "tag:yaml.org,2002:"

# The YAML 1.2 core schema's plain scalars (spec 10.3.2), and `<<` for merges: (kind, regular
# expression, the characters they may begin with). Integers are tried before floats.
_INT = r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+"
_FLOAT = (r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
          r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)")
_CORE = (
    ("null", r"null|Null|NULL|~|", ["n", "N", "~", ""]),
    ("bool", r"true|True|TRUE|false|False|FALSE", list("tTfF")),
    ("int", _INT, list("-+0123456789")),
    ("float", _FLOAT, list("-+0123456789.")),
    ("merge", r"<<", ["<"]),
)
_FORMS = {kind: re.compile(rf"(?:{regexp})\Z") for kind, regexp, _ in _CORE}
_LEADING_ZERO = re.compile(r"([-+]?)0+([0-9]+)\Z")
_WORDS = {"null": "null", "bool": "true or false",
          "int": "an integer (decimal digits, 0o octal or 0x hexadecimal)",
          "float": "a number (such as 1.5, 1e-3, .inf or .nan)"}


def _scalar(loader: Any, node: yaml.ScalarNode, kind: str) -> str:
    """The text of a scalar tagged `kind`, refused unless it has one of the kind's core forms."""
    text = loader.construct_scalar(node)
    if kind == "int" and (zero := _LEADING_ZERO.match(text)):
        sign, digits = zero.groups()  # digits: what follows the leading zeros
        octal = not sign and digits != "0" and set(digits) <= set("01234567")
        hint = f", or 0o{clip(digits, 20)} for octal" if octal else ""
        raise Refused(f"ambiguous integer {clip(text)!r}: a leading zero is octal in YAML 1.1 "
                      f"and decimal in YAML 1.2; write {clip(sign + digits, 20)}{hint}",
                      node.start_mark, node=node)
    if not _FORMS[kind].match(text):
        raise Refused(f"cannot read {clip(text)!r} as {_WORDS[kind]}", node.start_mark, node=node)
    return text


def _null(loader: Any, node: yaml.ScalarNode) -> None:
    _scalar(loader, node, "null")


def _bool(loader: Any, node: yaml.ScalarNode) -> bool:
    return _scalar(loader, node, "bool").lower() == "true"


def _int(loader: Any, node: yaml.ScalarNode) -> int:
    return int(_scalar(loader, node, "int"), 0)  # a ValueError past 4300 digits: _Checked's


def _float(loader: Any, node: yaml.ScalarNode) -> float:
    text = _scalar(loader, node, "float")
    special = text.lower().replace(".", "")
    return float(special if special.lstrip("+-") in ("inf", "nan") else text)


def _outside_core(loader: Any, node: yaml.Node) -> None:
    tag = node.tag.replace(_TAG, "!!")
    raise Refused(f"the tag {clip(tag)} is not supported: a pattern holds null, booleans, "
                  f"integers, floats, strings, lists and mappings (YAML 1.2's core schema)",
                  node.start_mark, node=node)


def _check_merge_list(key: yaml.Node, merged: yaml.SequenceNode) -> None:
    """Refuse a key that two mappings of `<<: [*a, *b]` both give, at the `<<` key's line."""
    first: dict[str, int] = {}
    for mapping in merged.value:
        if not isinstance(mapping, yaml.MappingNode):
            continue  # PyYAML's own error names it
        for name in dict.fromkeys(k.value for k, _ in mapping.value
                                  if isinstance(k, yaml.ScalarNode) and k.tag != MERGE):
            line = mapping.start_mark.line + 1
            if name in first:
                raise Refused(f"key '{clip(name)}' is given by two merged mappings (lines "
                              f"{first[name]} and {line}); give it once, or in the mapping "
                              f"itself", key.start_mark, node=merged)
            first[name] = line


def _core_schema(cls: type) -> type:
    """`cls` resolving and constructing scalars by the YAML 1.2 core schema."""
    cls.yaml_implicit_resolvers = {}
    for kind, _, first in _CORE:
        cls.add_implicit_resolver(_TAG + kind, _FORMS[kind], first)
    for kind, construct in (("null", _null), ("bool", _bool), ("int", _int), ("float", _float)):
        cls.add_constructor(_TAG + kind, construct)
    for kind in ("timestamp", "binary", "set", "omap", "pairs"):
        cls.add_constructor(_TAG + kind, _outside_core)
    return cls


@_core_schema
class _PyLoader(_Checked, yaml.SafeLoader):
    pass


_LOADERS: list[type] = [_PyLoader]
if getattr(yaml, "__with_libyaml__", False):
    @_core_schema
    class _CLoader(_Checked, yaml.CSafeLoader):
        pass

    _LOADERS.insert(0, _CLoader)


def clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def compose(text: str) -> tuple[Any, yaml.Node | None]:
    """(loader, its single document's node): dispose of the loader after constructing."""
    for i, cls in enumerate(_LOADERS):
        try:
            _check_events(cls(text))
            loader = cls(text)
            return loader, loader.get_single_node()
        except yaml.YAMLError:
            if i == len(_LOADERS) - 1:  # PyYAML's own parser: its messages are the clearer
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _check_events(loader: Any) -> None:
    """Refuse nesting past MAX_YAML_DEPTH and more than MAX_YAML_NODES nodes written, from the
    event stream; the path of the offending node names it."""
    stack: list[list[Any]] = []  # per open collection: [is mapping, label, expects a key, count]
    nodes = 0
    try:
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, yaml.CollectionEndEvent):
                stack.pop()
                continue
            if not isinstance(event, yaml.NodeEvent):
                continue
            if stack:
                top = stack[-1]
                if top[0]:  # in a mapping, keys and values alternate; a value's label is its key
                    top[1] = None if top[2] else top[3]
                    if top[2]:
                        top[3] = event.value if isinstance(event, yaml.ScalarEvent) else None
                    top[2] = not top[2]
                else:
                    top[1], top[3] = top[3], top[3] + 1
            if isinstance(event, yaml.AliasEvent):
                continue
            nodes += 1
            if nodes > MAX_YAML_NODES:
                raise Refused(f"more than {MAX_YAML_NODES:,} YAML values", event.start_mark,
                              _labels(stack))
            if isinstance(event, yaml.CollectionStartEvent):
                if len(stack) >= MAX_YAML_DEPTH:
                    raise Refused(f"YAML nested more than {MAX_YAML_DEPTH} levels deep",
                                  event.start_mark, _labels(stack))
                is_mapping = isinstance(event, yaml.MappingStartEvent)
                stack.append([is_mapping, None, True, None if is_mapping else 0])
    finally:
        loader.dispose()


def _labels(stack: list[list[Any]]) -> Loc:
    """The path of the node being read, cut short after four levels."""
    labels = tuple(frame[1] for frame in stack if isinstance(frame[1], str | int))
    return labels[:4]


def check_expansion(root: yaml.Node, written: Callable[[Loc], bool]) -> None:
    """Refuse a document whose aliases expand it past MAX_YAML_NODES nodes or MAX_YAML_DEPTH
    levels, naming the deepest place (`written(path)`: a path written in the file) whose value
    alone is too large.

    Sizes are memoized per node, so counting costs one visit per node written, however often
    aliases use it. Nodes are visited in document order and an anchor comes before its aliases,
    so an alias met while its node is still open is a cycle.
    """
    measured: dict[int, tuple[int, int]] = {}  # node id: (nodes, depth) when expanded
    open_: set[int] = set()

    def measure(node: yaml.Node) -> tuple[int, int]:
        if id(node) in measured:
            return measured[id(node)]
        if id(node) in open_:
            raise Refused("an alias inside the value it names (a cycle)", node.start_mark)
        open_.add(id(node))
        nodes, depth = 1, 1
        for _, child in _children(node):
            size, below = measure(child)
            nodes, depth = min(nodes + size, MAX_YAML_NODES + 1), max(depth, below + 1)
        open_.discard(id(node))
        measured[id(node)] = nodes, depth
        return nodes, depth

    nodes, depth = measure(root)
    if nodes <= MAX_YAML_NODES and depth <= MAX_YAML_DEPTH:
        return
    path: Loc = ()
    node = root
    while True:  # down to the deepest written place that alone is too large
        for key, child in _children(node):
            size, below = measured[id(child)]
            if key is not None and written((*path, key)) and (
                    size > MAX_YAML_NODES or below + len(path) + 1 > MAX_YAML_DEPTH):
                path, node = (*path, key), child
                break
        else:
            break
    raise Refused(f"more than {MAX_YAML_NODES:,} YAML values once its aliases are expanded"
                  if nodes > MAX_YAML_NODES else
                  f"YAML nested more than {MAX_YAML_DEPTH} levels deep once its aliases are "
                  f"expanded", path=path)


def _children(node: yaml.Node) -> list[tuple[str | int | None, yaml.Node]]:
    """(key or index, node) below `node`; a mapping's key nodes come with the label None."""
    if isinstance(node, yaml.SequenceNode):
        return list(enumerate(node.value))
    if isinstance(node, yaml.MappingNode):
        return [pair for k, v in node.value
                for pair in ((None, k), (k.value if isinstance(k, yaml.ScalarNode) else None, v))]
    return []
