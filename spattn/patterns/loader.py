"""Load patterns from YAML files, strings and the built-in library, with line-numbered errors.

Every mistake becomes a `PatternError` naming the source, the field as a dotted path
(`branches[1].dilation`), its YAML line and what was expected versus found. All the problems
found are kept in `error.errors`, a list of (field, line, message) sorted by line; the message
reports the first. Loading only reads.
"""

from __future__ import annotations

import difflib
import errno
import os
import stat
import typing
from importlib import resources
from typing import TYPE_CHECKING, Any, NamedTuple

import yaml
from pydantic import BaseModel, ValidationError

from spattn.errors import PatternError
from spattn.limits import MAX_YAML_BYTES, short_int
from spattn.patterns import bounded_yaml, spec
from spattn.patterns.bounded_yaml import clip as _clip
from spattn.patterns.spec import Pattern

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

Loc = tuple[str | int, ...]  # a YAML path: ('branches', 1, 'dilation')
Problem = tuple[str | None, int, str]  # (field, line, message)

_BRANCH_TAGS: dict[str, type[BaseModel]] = {
    "dilated": spec.DilatedBranch,
    "window": spec.WindowBranch,
    "global": spec.GlobalBranch,
    "strided": spec.StridedBranch,
    "random": spec.RandomBranch,
    "dense": spec.DenseBranch,
}


class BuiltinPattern(NamedTuple):
    name: str
    description: str
    path: str


# --- public API ---------------------------------------------------------------------------------


def builtin_names() -> list[str]:
    """Names of the shipped patterns (files `spattn/patterns/library/<name>.yaml`), sorted."""
    return sorted(f.name[: -len(".yaml")] for f in _library().iterdir() if f.name.endswith(".yaml"))


def builtin_patterns() -> list[BuiltinPattern]:
    """(name, description, path) of every shipped pattern, for `spattn list`."""
    return [BuiltinPattern(name, _load_builtin(name).description or "",
                           str(_library() / f"{name}.yaml")) for name in builtin_names()]


def load_pattern(path_or_name: Pattern | str | os.PathLike[str]) -> Pattern:
    """Load a pattern from a YAML file or, failing that, the built-in pattern of that name; a
    Pattern is returned as it is. Anything else is a PatternError saying what is expected.

    Only a regular file (or a link to one) is a pattern file: a directory named like a built-in
    (what `spattn compile longnet-lm -o longnet-lm` makes) leaves the built-in found, and a FIFO,
    device or directory given as the path is refused without being read."""
    if isinstance(path_or_name, Pattern):
        return path_or_name
    if not isinstance(path_or_name, (str, os.PathLike)):
        raise PatternError(f"pattern must be a spattn.Pattern, a built-in name or a YAML path, "
                           f"got {type(path_or_name).__name__}")
    path = os.fspath(path_or_name)
    if not isinstance(path, str):  # a PathLike of bytes
        raise PatternError(f"pattern must be a spattn.Pattern, a built-in name or a YAML path, "
                           f"got a path of {type(path).__name__}")
    mode, unreadable = _file_mode(path)
    if mode is not None and stat.S_ISREG(mode):
        return load_pattern_text(_decode(_read_regular(path), path), source=path)
    if path in builtin_names():
        return _load_builtin(path)
    if mode is not None:
        raise _not_a_file(path, mode)
    if unreadable is not None:
        raise PatternError(f"cannot read the file: {unreadable}", source=path)
    raise PatternError(
        f"no such file, and no built-in pattern of that name "
        f"(built-ins: {', '.join(builtin_names())})",
        source=path,
    )


def load_pattern_text(text: str, source: str = "<string>") -> Pattern:
    """Validate a pattern written as YAML text; `source` names it in error messages."""
    # Characters first: a string of more characters than the limit has more bytes too.
    _check_size(len(text) if len(text) > MAX_YAML_BYTES else len(text.encode("utf-8", "replace")),
                source)
    data, lines = _parse(text, source)
    try:
        return Pattern.model_validate(data)
    except ValidationError as error:
        raise _pattern_error(error, lines, source) from None


# --- reading and parsing ------------------------------------------------------------------------


def _library() -> Traversable:
    return resources.files("spattn.patterns").joinpath("library")


def _file_mode(path: str) -> tuple[int | None, str | None]:
    """(the st_mode of what `path` names, links followed, or None; why it cannot be looked at,
    or None when it is there or nothing is)."""
    try:
        return os.stat(path).st_mode, None
    except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: a NUL in the path
        return None, None
    except OSError as error:
        return None, None if error.errno == errno.ENAMETOOLONG else error.strerror


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


def _not_a_file(path: str, mode: int) -> PatternError:
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return PatternError(f"cannot read {kind} as a pattern: a pattern file is a regular file",
                        source=path)


def _read_regular(path: str) -> bytes:
    """At most MAX_YAML_BYTES + 1 bytes of the regular file at `path`. Opened without blocking
    and checked again once open, so a file swapped for a FIFO or device is refused, not read."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) \
        | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as error:
        raise PatternError(f"cannot read the file: {error.strerror}", source=path) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_a_file(path, mode)
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_YAML_BYTES:  # never more, whatever the file's size
            chunk = os.read(fd, MAX_YAML_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as error:
        raise PatternError(f"cannot read the file: {error.strerror}", source=path) from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    _check_size(len(data), path)
    return data


def _load_builtin(name: str) -> Pattern:
    resource = _library() / f"{name}.yaml"
    return load_pattern_text(_decode(resource.read_bytes(), str(resource)), str(resource))


def _error(message: str, source: str, field: str | None, line: int | None,
           problems: list[Problem] | None = None) -> PatternError:
    error = PatternError(message, source=source, field=field, line=line)
    error.errors = problems if problems is not None else [(field, line, message)]
    return error


def _check_size(size: int, source: str) -> None:
    if size > MAX_YAML_BYTES:
        raise _error(f"the pattern is larger than {MAX_YAML_BYTES:,} bytes; a pattern file is a "
                     f"few lines", source, None, None)


def _decode(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise _error(f"not UTF-8 text (byte 0x{data[error.start]:02x})", source, None,
                     line) from None


def _parse(text: str, source: str) -> tuple[dict[str, Any], dict[Loc, int]]:
    """The YAML document as a dict, and the 1-based line of every key and list item in it."""
    loader = None
    paths: dict[int, Loc] = {}  # a node's first path, for errors found at the node
    lines: dict[Loc, int] = {(): 1}
    try:
        loader, node = bounded_yaml.compose(text)
        if node is None:
            raise _error("the pattern is empty: expected a mapping with 'name' and 'branches'",
                         source, None, 1)
        if not isinstance(node, yaml.MappingNode):
            kind = "a list" if isinstance(node, yaml.SequenceNode) else "a single value"
            raise _error(f"expected a mapping (name: ..., branches: ...) at the top level, "
                         f"got {kind}", source, None, 1)
        lines[()] = node.start_mark.line + 1
        _record_lines(node, (), lines, paths, source)
        bounded_yaml.check_expansion(node, lines.__contains__)
        return loader.construct_document(node), lines
    except yaml.YAMLError as error:
        raise _yaml_error(error, text, source) from None
    except bounded_yaml.Refused as refused:
        path = paths.get(id(refused.node), ()) if refused.node is not None else refused.path or ()
        line = refused.mark.line + 1 if refused.mark is not None else _line(path, lines)
        raise _error(refused.message, source, _dotted(path), line) from None
    finally:
        if loader is not None:
            loader.dispose()


def _record_lines(node: yaml.Node, path: Loc, lines: dict[Loc, int], seen: dict[int, Loc],
                  source: str) -> None:
    """Fill `lines` below `node` and `seen` (node id: its first path), and reject duplicate keys,
    merge keys `<<` included (PyYAML would keep the last one)."""
    if id(node) in seen:  # an alias: walk each node once, whatever the anchors
        return
    seen[id(node)] = path
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                continue
            line, child = key.start_mark.line + 1, (*path, key.value)
            if key.value in first_line:
                merge = key.tag == bounded_yaml.MERGE
                raise _error(f"duplicate {'merge ' if merge else ''}key '{_clip(key.value)}' "
                             f"(first given on line {first_line[key.value]})"
                             + ("; merge several mappings with one key: <<: [*a, *b]"
                                if merge else ""), source, _dotted(child), line)
            first_line[key.value] = lines[child] = line
            _record_lines(value, child, lines, seen, source)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, i)] = item.start_mark.line + 1
            _record_lines(item, (*path, i), lines, seen, source)


def _yaml_error(error: yaml.YAMLError, text: str, source: str) -> PatternError:
    if isinstance(error, yaml.reader.ReaderError):  # a character YAML does not allow
        line = text[: error.position].count("\n") + 1
        return _error(f"malformed YAML: character {error.character!r} is not allowed "
                      f"({error.reason})", source, None, line)
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    message = f"malformed YAML: {problem}"
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and context_mark is not None:
        message += f" ({context} started on line {context_mark.line + 1})"
    elif context:
        message += f" ({context})"
    if "'\\t'" in problem:
        message += "; YAML indentation must use spaces, not tabs"
    elif "mapping values are not allowed" in problem:
        message += "; check the indentation, or quote a value that contains ': '"
    return _error(message, source, None, mark.line + 1 if mark else None)


# --- validation errors --------------------------------------------------------------------------


def _pattern_error(error: ValidationError, lines: dict[Loc, int], source: str) -> PatternError:
    explained = [_explain(e) for e in error.errors()]
    # A typo shows up twice: an unknown key and the missing key it was meant to be; keep the first.
    meant = {replaces for _, _, replaces in explained if replaces is not None}
    problems: list[Problem] = sorted(
        ((_dotted(loc), _line(loc, lines), message)
         for loc, message, _ in explained if loc not in meant),
        key=lambda problem: problem[1],
    )
    field, line, message = problems[0]
    if len(problems) > 1:
        more = len(problems) - 1
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return _error(message, source, field, line, problems)


def _explain(error: Any) -> tuple[Loc, str, Loc | None]:
    """(YAML path, message, the path of a missing key this one was a typo for) of one error."""
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    tagged: Loc = tuple(error["loc"])
    loc = _yaml_loc(tagged)
    if kind == "value_error":
        cause = ctx.get("error")
        return (*loc, *getattr(cause, "loc", ())), str(cause or error["msg"]), None
    if kind == "extra_forbidden":
        allowed = _allowed_keys(tagged[:-1])
        key = str(loc[-1])
        close = difflib.get_close_matches(key, allowed, n=1) if len(key) <= SHOWN else []
        if close:
            return loc, f"unknown key (did you mean '{close[0]}'?)", (*loc[:-1], close[0])
        return loc, f"unknown key; expected one of: {', '.join(allowed)}", None
    return loc, _message(kind, ctx, value, error["msg"]), None


def _message(kind: str, ctx: dict[str, Any], value: Any, default: str) -> str:
    got = _show(value)
    number = "an integer" if isinstance(value, int) else "a number"
    if kind == "missing":
        return "required key is missing"
    if kind in ("greater_than", "greater_than_equal"):
        op, bound = (">", ctx.get("gt")) if kind == "greater_than" else (">=", ctx.get("ge"))
        return f"expected {number} {op} {bound}, got {got}"
    expected = {
        "int_type": "an integer",
        "bool_type": "true or false",
        "string_type": "a string",
        "float_type": "a number",
        "list_type": "a list",
        "tuple_type": "a list",
        "model_type": "a mapping",
        "dict_type": "a mapping",
        "literal_error": ctx.get("expected"),
        "string_pattern_mismatch": "a name of lowercase letters, digits, '-' and '_' "
                                   "(starting with a letter or digit)",
        "too_short": f"at least {ctx.get('min_length')} item"
                     + ("s" if ctx.get("min_length") != 1 else ""),
        "too_long": f"at most {ctx.get('max_length')} items",
        "string_too_long": f"a name of at most {ctx.get('max_length')} characters",
    }.get(kind)
    if kind == "branch_kind":
        return f"{default}; got {got}"
    return f"expected {expected}, got {got}" if expected else f"{default}, got {got}"


SHOWN = 60  # characters of a value, key or string quoted in a message


def _show(value: Any) -> str:
    """A value as the YAML author wrote it, with its kind where that helps; never long, and
    never a repr of a whole list or mapping (one may hold millions of items)."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return short_int(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return f"the string {_clip(value)!r}" if len(value) <= SHOWN else (
            f"a string of {len(value):,} characters, {_clip(value, 20)!r}")
    if isinstance(value, list | tuple):
        if not value:
            return "an empty list"
        if len(value) <= 8 and all(_is_small(x) for x in value):
            return f"a list {_clip(repr(list(value)), 40)}"
        return f"a list of {len(value):,} items"
    if isinstance(value, dict):
        if not value:
            return "an empty mapping"
        keys = ", ".join(_clip(str(k), 20) for k in list(value)[:6])
        return f"a mapping with keys {keys}" + (", ..." if len(value) > 6 else "")
    return f"{_clip(repr(value), 40)} ({type(value).__name__})"


def _is_small(value: Any) -> bool:
    return value is None or isinstance(value, bool | float) or (
        isinstance(value, int) and abs(value) < 10**30) or (
        isinstance(value, str) and len(value) <= 20)


def _yaml_loc(tagged: Loc) -> Loc:
    """Pydantic's loc as a YAML path: drop the branch union's tag, `global_` back to `global`."""
    loc = list(tagged)
    if len(loc) > 2 and loc[0] == "branches" and isinstance(loc[1], int) and loc[2] in _BRANCH_TAGS:
        del loc[2]
    return tuple("global" if part == "global_" else part for part in loc)


def _allowed_keys(tagged: Loc) -> list[str]:
    """The keys of the spec model that validates the mapping at `tagged` (a pydantic loc)."""
    model: type[BaseModel] | None = spec.Pattern
    for i, part in enumerate(tagged):
        if isinstance(part, int):
            continue
        if i == 2 and tagged[0] == "branches":  # the tag of the branch's kind
            model = _BRANCH_TAGS.get(part)
        elif model is not None:
            model = _submodel(model, part)
    if model is None:
        return []
    keys = [f.alias or name for name, f in model.model_fields.items()]
    return sorted(keys, key=lambda key: key == "heads")  # a kind's own keys first


def _submodel(model: type[BaseModel], key: str) -> type[BaseModel] | None:
    for name, field in model.model_fields.items():
        if key in (name, field.alias):
            for candidate in (field.annotation, *typing.get_args(field.annotation)):
                if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                    return candidate
    return None


def _line(loc: Loc, lines: dict[Loc, int]) -> int:
    """The line of `loc`, or of its nearest parent in the YAML (a missing key: its mapping)."""
    while loc not in lines:
        loc = loc[:-1]
    return lines[loc]


def _dotted(loc: Loc) -> str | None:
    """('branches', 1, 'dilation') -> 'branches[1].dilation'."""
    text = "".join(f"[{part}]" if isinstance(part, int) else f".{_clip(str(part), 40)}"
                   for part in loc)
    return text.lstrip(".") or None
