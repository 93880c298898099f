"""What a loaded pattern can be trusted to be: immutable all the way down, read from YAML as the
YAML 1.2 core schema reads it, and read only from a regular file (a built-in otherwise)."""

from __future__ import annotations

import copy
import os
import pickle
import re
import socket
import stat
import threading
import typing
from collections.abc import Iterator, MutableMapping, MutableSequence, MutableSet
from pathlib import Path
from typing import Any

import pytest
import torch
from generated_cases import generated_patterns
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

import spattn
from spattn.cli.main import main
from spattn.errors import PatternError
from spattn.patterns import loader, spec
from spattn.patterns.loader import builtin_names, load_pattern, load_pattern_text
from spattn.patterns.spec import Pattern
from spattn.runtime import ops

HANG_GUARD = 60.0  # seconds: only for what could block forever (each case takes milliseconds)

# --- immutable all the way down -------------------------------------------------------------

SPEC_MODELS = [model for model in vars(spec).values() if isinstance(model, type)
               and issubclass(model, BaseModel) and model.__module__ == spec.__name__]
MUTABLE = (MutableSequence, MutableMapping, MutableSet, bytearray)


def _annotation_types(annotation: Any) -> Iterator[Any]:
    """`annotation` and every type inside it (Annotated, unions, tuple items...)."""
    yield annotation
    for arg in typing.get_args(annotation):
        yield from _annotation_types(arg)


@pytest.mark.parametrize("model", SPEC_MODELS, ids=lambda m: m.__name__)
def test_no_field_can_hold_a_mutable_container(model: type[BaseModel]) -> None:
    assert model.model_config.get("frozen")
    for name, field in model.model_fields.items():
        for inner in _annotation_types(field.annotation):
            origin = typing.get_origin(inner) or inner
            assert not (isinstance(origin, type) and issubclass(origin, (list, dict, set, *MUTABLE))
                        ), f"{model.__name__}.{name} may hold a {origin.__name__}"


def _reachable(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(path, value) of `value` and of everything reachable from it: fields, items."""
    yield path, value
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _reachable(getattr(value, name), f"{path}.{name}")
    elif isinstance(value, tuple | list | dict | set | frozenset):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            yield from _reachable(item, f"{path}[{key}]")


def assert_immutable(pattern: Pattern) -> None:
    """No mutation path: every container reachable is immutable, every model refuses every
    assignment and deletion, and the pattern's hash and content hash are what they were."""
    before, content = hash(pattern), pattern.content_hash()
    for path, value in _reachable(pattern, "pattern"):
        assert not isinstance(value, MUTABLE), f"{path} is a {type(value).__name__}"
        hash(value)  # a mutable container anywhere below would make it unhashable
        if isinstance(value, BaseModel):
            for name in type(value).model_fields:
                old = getattr(value, name)
                with pytest.raises(ValidationError, match="frozen"):
                    setattr(value, name, old)
                with pytest.raises(ValidationError, match="frozen"):
                    delattr(value, name)
        if isinstance(value, tuple) and value:
            with pytest.raises(TypeError):
                value[0] = value[0]  # type: ignore[index]
    assert (hash(pattern), pattern.content_hash()) == (before, content)


@pytest.mark.parametrize("name", builtin_names())
def test_builtins_are_immutable(name: str) -> None:
    assert_immutable(load_pattern(name))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(generated_patterns())
def test_random_patterns_are_immutable(case: tuple[Pattern, Any]) -> None:
    pattern, _ = case
    assert_immutable(pattern)
    assert_immutable(load_pattern_text(_yaml(pattern)))  # the same pattern read from YAML


def _yaml(pattern: Pattern) -> str:
    """The pattern as flow YAML (JSON is YAML)."""
    return pattern.model_dump_json(by_alias=True, exclude_none=True)


FULL = """\
name: full
description: every field given
causal: true
heads: 4
kv_heads: 2
head_dim: 16
softmax_scale: 0.25
branches:
  - {segment: 8, dilation: 2, offsets: [0, 1, 1, 0], heads: [0, 1, 2]}
  - {window: {size: 3}, heads: [3]}
  - global: {tokens: [0, 5]}
  - strided: {stride: 4}
  - random: {block: 2, blocks: 1, seed: 3}
  - dense: {}
"""


def test_every_field_given_is_immutable() -> None:
    assert_immutable(load_pattern_text(FULL))
    assert_immutable(load_pattern_text(
        "name: geo\nschedule:\n  geometric: {segment: 8, dilation: 1, ratio: 2, count: 3}\n"))


def test_the_callers_lists_are_copied() -> None:
    tokens, heads = [0, 1], [0]
    branches = [{"global": {"tokens": tokens}, "heads": heads}]
    pattern = Pattern.model_validate({"name": "g", "branches": branches})
    tokens.append(7)
    heads.append(1)
    branches.append({"dense": {}})
    assert pattern.branches[0].global_.tokens == (0, 1) and pattern.branches[0].heads == (0,)
    assert len(pattern.branches) == 1
    assert Pattern(name="g", branches=({"dense": {}},)).branches[0].heads is None  # tuples too


def test_model_copy_validates_its_update() -> None:
    pattern = load_pattern("sink-window")
    copied = pattern.model_copy(update={"branches": [{"global": {"tokens": [0, 9]}}]})
    assert copied.branches[0].global_.tokens == (0, 9)
    assert_immutable(copied)
    assert copied.content_hash() == load_pattern_text(_yaml(copied)).content_hash()
    assert copied.content_hash() != pattern.content_hash()
    branch = pattern.branches[0].model_copy(update={"global": {"tokens": [3]}})  # the alias
    assert branch.global_.tokens == (3,)
    for update in ({"overlap": "max"}, {"bogus": 1}, {"heads": 2**40},
                   {"branches": [{"global": {"tokens": [-1]}}]}, {"schedule": {}}):
        with pytest.raises(ValidationError):
            pattern.model_copy(update=update)
    assert pattern.model_copy() == pattern and pattern.model_copy(deep=True) == pattern
    assert pattern.model_copy(update={"causal": True}).model_fields_set == \
        pattern.model_fields_set | {"causal"}


def test_copies_and_pickles_stay_equal_and_immutable() -> None:
    pattern = load_pattern_text(FULL)
    for other in (copy.copy(pattern), copy.deepcopy(pattern), pickle.loads(pickle.dumps(pattern))):
        assert other == pattern and hash(other) == hash(pattern)
        assert other.content_hash() == pattern.content_hash()
        assert_immutable(other)


def test_what_is_keyed_on_a_pattern_stays_its_own() -> None:
    """A refused mutation leaves the pattern, its op key and its output as they were."""
    pattern = load_pattern("sink-window")
    q, k, v = (torch.randn(1, 2, 16, 8, generator=torch.Generator().manual_seed(i))
               for i in range(3))
    key, out = ops.register(pattern), spattn.attention(q, k, v, pattern)
    with pytest.raises(AttributeError):
        pattern.branches[0].global_.tokens.append(9)  # type: ignore[attr-defined]
    assert ops.register(pattern) == key == pattern.content_hash()
    assert torch.equal(spattn.attention(q, k, v, pattern), out)


# --- YAML 1.2 core scalars ------------------------------------------------------------------


def core_int(text: str) -> int | None:
    """What the YAML 1.2 core schema reads a plain scalar as, if an integer (spec 10.3.2)."""
    if re.fullmatch(r"[-+]?[0-9]+", text):
        return int(text, 10)
    if re.fullmatch(r"0o[0-7]+|0x[0-9a-fA-F]+", text):
        return int(text, 0)
    return None


def _segment(text: str) -> str:
    return f"name: p\nbranches:\n  - dilation: 1\n    segment: {text}\n"


NUMBERISH = st.from_regex(
    r"[-+]?[0-9](?:[0-9_]|:[0-9]){0,6}(\.[0-9]{0,3})?([eE][-+]?[0-9]{1,2})?"
    r"|0[xXoObB][0-9a-fA-F_]{1,6}",
    fullmatch=True)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(NUMBERISH)
def test_an_integer_is_read_as_written_or_refused(text: str) -> None:
    """Never a number the YAML 1.2 reading does not give (010 is not 8, 1:30 not 90, 1_000 not
    1000): either that reading, or an error naming the field and its line."""
    try:
        segment = load_pattern_text(_segment(text), source="n.yaml").branches[0].segment
    except PatternError as error:
        assert (error.field, error.line) == ("branches[0].segment", 4), str(error)
        return
    assert segment == core_int(text), text


@pytest.mark.parametrize("text, value", [("16", 16), ("+16", 16), ("0x10", 16), ("0o20", 16)])
def test_core_integers(text: str, value: int) -> None:
    assert load_pattern_text(_segment(text)).branches[0].segment == value


@pytest.mark.parametrize("text, fragment", [
    ("010", "ambiguous integer '010': a leading zero"), ("-010", "ambiguous integer"),
    ("0009", "write 9"), ("1:30", "got the string '1:30'"), ("1_000", "got the string '1_000'"),
    ("0b11", "got the string '0b11'"), ("0X10", "got the string '0X10'"),
    ("1:30:00.5", "got the string"), ("!!int 1:30", "cannot read '1:30' as an integer"),
    ("!!int 010", "ambiguous integer"), ("!!int 1_000", "cannot read"),
])
def test_yaml_11_integers_are_refused(text: str, fragment: str) -> None:
    with pytest.raises(PatternError) as info:
        load_pattern_text(_segment(text), source="n.yaml")
    assert (info.value.field, info.value.line) == ("branches[0].segment", 4)
    assert fragment in str(info.value)


BOOLISH = ["true", "True", "TRUE", "false", "False", "FALSE", "yes", "Yes", "YES", "no", "No",
           "NO", "y", "Y", "n", "N", "on", "On", "ON", "off", "Off", "OFF", "tRUE", "!!bool yes",
           "!!bool on", "!!bool true"]


@pytest.mark.parametrize("text", BOOLISH)
def test_a_boolean_is_true_or_false_as_written(text: str) -> None:
    source = f"name: p\ncausal: {text}\nbranches:\n  - dense: {{}}\n"
    word = text.removeprefix("!!bool ")
    if word in ("true", "True", "TRUE", "false", "False", "FALSE"):
        assert load_pattern_text(source).causal == (word.lower() == "true")
        return
    with pytest.raises(PatternError) as info:
        load_pattern_text(source, source="b.yaml")
    assert (info.value.field, info.value.line) == ("causal", 2)


@pytest.mark.parametrize("text, value", [("0.25", 0.25), (".5", 0.5), ("1e-3", 1e-3),
                                         ("+2.5E-1", 0.25), ("!!float 2", 2.0)])
def test_core_floats(text: str, value: float) -> None:
    source = f"name: p\nsoftmax_scale: {text}\nbranches:\n  - dense: {{}}\n"
    assert load_pattern_text(source).softmax_scale == value


@pytest.mark.parametrize("text", ["1:30.5", "1_0.5", "!!float abc", "!!float 1_0.5"])
def test_yaml_11_floats_are_refused(text: str) -> None:
    with pytest.raises(PatternError) as info:
        load_pattern_text(f"name: p\nsoftmax_scale: {text}\nbranches:\n  - dense: {{}}\n")
    assert (info.value.field, info.value.line) == ("softmax_scale", 2)


def test_dates_are_strings_and_other_tags_are_refused() -> None:
    dated = load_pattern_text("name: p\ndescription: 2001-12-14\nbranches:\n  - dense: {}\n")
    assert dated.description == "2001-12-14"
    for tagged in ("!!timestamp 2001-12-14", "!!binary aGk=", "!!set {a}", "!!omap [a: 1]",
                   "!!pairs [a: 1]", "!!null x"):
        with pytest.raises(PatternError) as info:
            load_pattern_text(f"name: p\ndescription: {tagged}\nbranches:\n  - dense: {{}}\n")
        assert (info.value.field, info.value.line) == ("description", 2), tagged


@pytest.mark.parametrize("text, field, line", [
    ("name: p\n<<: {causal: true}\n<<: {causal: false}\nbranches:\n  - dense: {}\n", "<<", 3),
    ("name: p\nbranches:\n  - <<: {segment: 8}\n    dilation: 1\n    <<: {segment: 16}\n",
     "branches[0].<<", 5),
    ("name: p\nbranches:\n  - {<<: {segment: 8, dilation: 1}, <<: {segment: 16}}\n",
     "branches[0].<<", 3),
])
def test_duplicate_merge_keys_are_refused(text: str, field: str, line: int) -> None:
    with pytest.raises(PatternError, match="duplicate merge key") as info:
        load_pattern_text(text)
    assert (info.value.field, info.value.line) == (field, line)


def test_merges() -> None:
    merged = load_pattern_text("name: p\nbranches:\n  - &a {segment: 8, dilation: 1}\n"
                               "  - <<: *a\n    dilation: 2\n")  # a key given overrides
    assert [(b.segment, b.dilation) for b in merged.branches] == [(8, 1), (8, 2)]
    for text, line in [
        ("name: p\nbranches:\n  - &a {segment: 8, dilation: 1}\n  - &b {segment: 9}\n"
         "  - <<: [*a, *b]\n", 5),
        ("name: p\nbranches:\n  - &a {segment: 8, dilation: 1}\n  - &b {<<: *a}\n"
         "  - <<: [*b, {dilation: 3}]\n", 5),  # one merged through another
    ]:
        with pytest.raises(PatternError, match="given by two merged mappings") as info:
            load_pattern_text(text)
        assert (info.value.field, info.value.line) == ("branches[2].<<", line)
    with pytest.raises(PatternError, match="duplicate key 'dilation'") as info:
        load_pattern_text("name: p\nbranches:\n  - <<: {segment: 8, dilation: 1,\n"
                          "           dilation: 2}\n")
    assert (info.value.field, info.value.line) == ("branches[0].<<.dilation", 4)


# --- only a regular file is a pattern file --------------------------------------------------


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("name", builtin_names())
def test_a_folder_named_like_a_builtin_leaves_the_builtin(name: str, in_tmp: Path) -> None:
    (in_tmp / name).mkdir()
    assert load_pattern(name) == load_pattern(loader._library() / f"{name}.yaml")
    assert load_pattern(Path(name)) == load_pattern(name)
    with pytest.raises(PatternError, match="cannot read a directory as a pattern") as info:
        load_pattern(f"./{name}")  # a path, not a name
    assert str(info.value).startswith(f"./{name}: ")


def test_compile_into_a_folder_named_like_the_builtin(in_tmp: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    for _ in range(2):  # the second run finds the folder the first one made
        assert main(["compile", "longnet-lm", "-o", "longnet-lm"]) == 0
    assert main(["inspect", "longnet-lm", "-n", "64", "--no-hops", "--no-tiles"]) == 0
    assert "longnet-lm: causal" in capsys.readouterr().out
    q = torch.randn(1, 2, 32, 8)
    assert spattn.attention(q, q, q, "longnet-lm").shape == q.shape


def test_a_regular_file_named_like_a_builtin_is_read(in_tmp: Path) -> None:
    (in_tmp / "dense-causal").write_text("name: mine\nbranches:\n  - window: {size: 2}\n")
    assert load_pattern("dense-causal").name == "mine"
    (in_tmp / "link.yaml").symlink_to(in_tmp / "dense-causal")
    assert load_pattern("link.yaml").name == "mine"  # a link to a regular file is one


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _socket(path: Path) -> Path:
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(path))
    except OSError as error:  # a path too long for a socket address
        pytest.skip(f"cannot bind a socket there: {error}")
    finally:
        sock.close()
    return path


NOT_FILES = {
    "directory": (lambda p: p.mkdir() or p, "a directory"),
    "fifo": (_fifo, "a FIFO (named pipe)"),
    "socket": (_socket, "a socket"),
    "device": (lambda p: Path(os.devnull), "a character device"),
    "link-to-fifo": (lambda p: (_fifo(p.with_name("f")), p.symlink_to(p.with_name("f")), p)[-1],
                     "a FIFO (named pipe)"),
}


def load_guarded(path: str | os.PathLike[str]) -> Pattern | BaseException:
    """load_pattern(path) in a thread: its result or error, or a failure if it blocks."""
    result: list[Pattern | BaseException] = []

    def run() -> None:
        try:
            result.append(load_pattern(path))
        except BaseException as error:  # noqa: BLE001 - handed to the test
            result.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG_GUARD)
    if thread.is_alive():  # blocked opening a FIFO: a writer lets it go
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        pytest.fail(f"load_pattern({path}) blocked")
    return result[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("kind", list(NOT_FILES))
def test_only_a_regular_file_is_read(kind: str, in_tmp: Path) -> None:
    make, what = NOT_FILES[kind]
    path = make(in_tmp / "p.yaml")
    if not os.path.exists(path):
        pytest.skip(f"no {path}")
    error = load_guarded(path)
    assert isinstance(error, PatternError), error
    assert str(error) == f"{path}: cannot read {what} as a pattern: a pattern file is a " \
                         f"regular file"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_file_swapped_for_a_fifo_is_not_read(in_tmp: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked again once open: a FIFO that was a regular file when looked at is refused, and
    opening it does not wait for a writer."""
    fifo = _fifo(in_tmp / "swapped.yaml")
    monkeypatch.setattr(loader, "_file_mode", lambda path: (stat.S_IFREG | 0o644, None))
    error = load_guarded(fifo)
    assert isinstance(error, PatternError) and "cannot read a FIFO" in str(error), error
