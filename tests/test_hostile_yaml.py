"""Hostile or malformed patterns cost little work and memory and end in one clear error.

Alias bombs, deep nesting, huge sizes, huge geometric schedules, long names, bad scales and
oversize files each give a PatternError naming the field and line; `spattn inspect` at
N = 10^9 and 10^12 answers, leaving out (with a note) what it cannot count exactly.
What each case costs is bounded by what can be counted, the same on any machine: the YAML
events read, the values constructed from YAML, the peak of Python's allocations. The only clock
is a hang guard of minutes, far above what any case takes however loaded the machine.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from pydantic import ValidationError
from work_meter import peak_megabytes

from spattn.cli.main import main
from spattn.errors import PatternError, SpattnError
from spattn.limits import (
    MAX_BRANCHES,
    MAX_NAME_LENGTH,
    MAX_SIZE,
    MAX_YAML_BYTES,
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    ScaleError,
    WorkLimitError,
    check_scale,
)
from spattn.patterns import bounded_yaml
from spattn.patterns.counting import count_pairs
from spattn.patterns.loader import builtin_names, load_pattern, load_pattern_text
from spattn.patterns.report import format_report, inspect_pattern
from spattn.patterns.spec import Pattern

HANG_GUARD = 600  # seconds: only a hang fails it, never a slow or loaded machine
MEGABYTES = 64  # Python allocations while loading one hostile pattern
EVENTS_PAST_TEXT = 16  # stream and document events: a document of n characters has fewer others


@contextmanager
def hang_guard(seconds: float = HANG_GUARD) -> Iterator[None]:
    """Fail, rather than hang, a block still running after `seconds` (where SIGALRM is)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() != threading.main_thread():
        yield
        return

    def expire(*_: Any) -> None:
        pytest.fail(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Work:
    """What a block did, counted."""

    events: int = 0  # YAML parser events read by the pass that bounds nesting and nodes
    objects: int = 0  # Python values constructed from YAML nodes (each alias use counts)
    megabytes: float = 0.0  # the peak of Python's allocations


@contextmanager
def counting(work: Work) -> Iterator[None]:
    """Count into `work` the YAML events bounded_yaml reads and the values it constructs."""
    check_events, construct = bounded_yaml._check_events, bounded_yaml._Checked.construct_object

    def counted_events(loader: Any) -> None:
        get_event = loader.get_event

        def counted() -> Any:
            work.events += 1
            return get_event()

        loader.get_event = counted
        check_events(loader)

    def counted_construct(self: Any, node: Any, deep: bool = False) -> Any:
        work.objects += 1
        return construct(self, node, deep)

    with mock.patch.object(bounded_yaml, "_check_events", counted_events), \
            mock.patch.object(bounded_yaml._Checked, "construct_object", counted_construct):
        yield


@contextmanager
def bounded(megabytes: float = MEGABYTES, objects: int = MAX_YAML_NODES) -> Iterator[Work]:
    """Fail when the block allocates more than `megabytes` at its peak or constructs more than
    `objects` values from YAML; its Work is yielded (complete once the block is done)."""
    work = Work()
    with hang_guard(), counting(work), \
            peak_megabytes(lambda mb: setattr(work, "megabytes", mb)):
        yield work
    assert work.megabytes < megabytes, f"allocated {work.megabytes:.0f} MB"
    assert work.objects <= objects, f"constructed {work.objects:,} values from YAML"


def refused(text: str, field: str | None, *fragments: str, objects: int = MAX_YAML_NODES
            ) -> PatternError:
    """Load `text` into a PatternError on `field` (ending in '*': a field it begins) whose
    message holds `fragments`, in one pass over its events (never more events than characters,
    whatever its aliases stand for) and constructing at most `objects` values."""
    with bounded(objects=objects) as work, pytest.raises(PatternError) as info:
        load_pattern_text(text, source="hostile.yaml")
    assert work.events <= len(text) + EVENTS_PAST_TEXT, f"read {work.events:,} YAML events"
    error = info.value
    if field is not None and field.endswith("*"):
        assert (error.field or "").startswith(field[:-1]), str(error)
    else:
        assert error.field == field, str(error)
    assert error.line is not None and str(error).startswith(f"hostile.yaml:{error.line}: ")
    for fragment in fragments:
        assert fragment in str(error)
    assert len(str(error)) < 400  # values shown short, whatever their size
    return error


GOOD = "name: p\nbranches:\n  - {segment: 64, dilation: 2}\n"


# --- aliases ---------------------------------------------------------------------------------


def laughs(levels: int = 9, fan: int = 10, leaf: str = "lol") -> tuple[str, str]:
    """Anchors &l0 .. &l{levels-1} under the key `x`, each a list of `fan` aliases of the one
    before: (their YAML, the last anchor's name)."""
    lines = [f"x:\n  - &l0 [{leaf}]"]
    for i in range(1, levels):
        lines.append(f"  - &l{i} [" + ", ".join([f"*l{i - 1}"] * fan) + "]")
    return "\n".join(lines) + "\n", f"*l{levels - 1}"


@pytest.mark.parametrize("levels, fan", [(9, 10), (6, 30), (30, 2), (4, 400)])
def test_alias_bomb_as_description(levels: int, fan: int) -> None:
    anchors, last = laughs(levels, fan)
    refused(GOOD + anchors + f"description: {last}\n", "x[*", "100,000 YAML values",
            "aliases are expanded", objects=0)  # refused before anything is constructed


def test_alias_bomb_used_once_is_named_where_used() -> None:
    # The anchors are small; only their use under `description` expands past the limit.
    anchors = "".join(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n"
                      for i in range(1, 4))
    text = "name: p\na0: &a0 [x, y]\n" + anchors + "description: [" + ", ".join(["*a3"] * 60) \
        + "]\nbranches:\n  - dense: {}\n"
    refused(text, "description", "100,000 YAML values", objects=0)


@pytest.mark.parametrize("where", ["branches", "tokens", "mapping", "key"])
def test_alias_bomb_elsewhere(where: str) -> None:
    if where == "mapping":  # mappings of mappings
        lines = ["x:", "  - &m0 {a: 1, b: 2, c: 3}"]
        lines += [f"  - &m{i} {{a: *m{i - 1}, b: *m{i - 1}, c: *m{i - 1}, d: *m{i - 1}}}"
                  for i in range(1, 12)]
        text = "name: p\n" + "\n".join(lines) + "\nbranches:\n  - dense: *m11\n"
        refused(text, "x[*", "100,000 YAML values", objects=0)
        return
    anchors, last = laughs(leaf="1")
    body = {"branches": f"branches: {last}\n",
            "tokens": f"branches:\n  - global: {{tokens: {last}}}\n",
            "key": f"branches:\n  - dense: {{}}\ny: {{? {last} : 1}}\n"}[where]
    refused("name: p\n" + anchors + body, "x[*", "100,000 YAML values", objects=0)


def test_alias_cycle() -> None:
    refused("name: p\nbranches: &a [*a]\n", None, "cycle", objects=0)
    refused("name: p\nbranches:\n  - &b {dense: *b}\n", None, "cycle", objects=0)


def test_alias_bomb_in_a_file_is_one_line_from_the_cli(tmp_path: Path) -> None:
    anchors, last = laughs()
    path = tmp_path / "bomb.yaml"
    path.write_text(GOOD + anchors + f"description: {last}\n")
    done = subprocess.run([sys.executable, "-c", PEAK_OF_MAIN, "inspect", str(path), "-n",
                           "1000"], capture_output=True, text=True, timeout=HANG_GUARD)
    assert done.returncode == 2
    grown = int(done.stdout)  # nothing else on stdout
    assert grown * MAXRSS_UNIT < 64 * 2**20, f"its peak grew by {grown * MAXRSS_UNIT:,} bytes"
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert f"{path}:" in done.stderr and "100,000 YAML values" in done.stderr


MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024  # bytes in ru_maxrss's unit
# The CLI's main, printing how far it raised the process's peak memory (ru_maxrss units).
PEAK_OF_MAIN = """
import resource, sys
from spattn.cli.main import main
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    code = main(sys.argv[1:])
except SystemExit as exit_:
    code = exit_.code
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
sys.exit(code)
"""


# --- nesting, size, unreadable values --------------------------------------------------------


@pytest.mark.parametrize("text, field", [
    ("name: p\nbranches: " + "[" * 100_000 + "]" * 100_000 + "\n", "branches[0][0][0]"),
    ("name: p\nbranches: " + "[" * 100_000 + "\n", "branches[0][0][0]"),  # never closed
    ("name: p\nbranches: " + "{a: " * 50_000 + "1" + "}" * 50_000 + "\n", "branches.a.a.a"),
    ("name: p\nbranches:\n" + "".join("  " * i + f"- k{i}:\n" for i in range(1, 100)),
     "branches[0].k1[0]"),
    ("name: p\ndescription: " + "[{a: " * 40 + "1" + "}]" * 40 + "\n", "description[0].a[0]"),
])
def test_deep_nesting(text: str, field: str) -> None:
    refused(text, field, f"nested more than {MAX_YAML_DEPTH} levels", objects=0)


def test_deep_nesting_through_aliases() -> None:
    lines = ["x:", "  - &d0 [1]"] + [f"  - &d{i} [[[[*d{i - 1}]]]]" for i in range(1, 30)]
    refused("name: p\n" + "\n".join(lines) + "\nbranches:\n  - dense: {}\n", "x[*",
            "nested more than", "aliases are expanded", objects=0)


def test_too_many_values() -> None:
    items = ", ".join(["0"] * (MAX_YAML_NODES + 10))
    refused(f"name: p\nbranches:\n  - global: {{tokens: [{items}]}}\n",
            "branches[0].global.tokens", f"more than {MAX_YAML_NODES:,} YAML values", objects=0)


def test_oversize_file_and_text(tmp_path: Path) -> None:
    big = GOOD + "# padding\n" * (MAX_YAML_BYTES // 10 + 1)
    with bounded(), pytest.raises(PatternError, match="larger than 1,048,576 bytes"):
        load_pattern_text(big)
    path = tmp_path / "big.yaml"
    path.write_text(GOOD + "description: " + "x" * (3 * MAX_YAML_BYTES) + "\n")
    with bounded(), pytest.raises(PatternError, match="larger than") as info:
        load_pattern(path)
    assert info.value.source == str(path)
    wide = GOOD + "description: " + "é" * (MAX_YAML_BYTES // 2 + 1) + "\n"  # 2 bytes each
    with pytest.raises(PatternError, match="larger than"):
        load_pattern_text(wide)


@pytest.mark.parametrize("value, fragment", [
    ("9" * 5000, "an integer of 5,000 characters is far too large"),
    ("9" * 100, "got an integer of 100 digits"),
    ("0x" + "f" * 40, "got an integer of 49 digits"),
])
def test_unreadably_huge_integers(value: str, fragment: str) -> None:
    refused(f"name: p\nbranches:\n  - {{segment: {value}, dilation: 1}}\n",
            "branches[0].segment", fragment)


@pytest.mark.parametrize("value, fragment", [
    ("!!timestamp 2001-13-45", "the tag !!timestamp is not supported"),
    ("!!float 1.5.5", "cannot read '1.5.5' as a number"),
    ("!!int 12:30", "cannot read '12:30' as an integer"),
    ("!!bool yes", "cannot read 'yes' as true or false"),
])
def test_unreadable_values(value: str, fragment: str) -> None:
    refused(f"name: p\ndescription: {value}\nbranches:\n  - dense: {{}}\n", "description",
            fragment)


# --- sizes -----------------------------------------------------------------------------------

# (YAML with {v} where the size goes, its field, the bound named in the message)
SIZE_FIELDS = [
    ("branches:\n  - {{segment: {v}, dilation: 1}}", "branches[0].segment", "2^40"),
    ("branches:\n  - {{segment: 8, dilation: {v}}}", "branches[0].dilation", "2^40"),
    ("branches:\n  - {{segment: 8, dilation: 2, offsets: [0, {v}]}}", "branches[0].offsets[1]",
     "2^40"),
    ("branches:\n  - window: {{size: {v}}}", "branches[0].window.size", "2^40"),
    ("branches:\n  - strided: {{stride: {v}}}", "branches[0].strided.stride", "2^40"),
    ("branches:\n  - random: {{block: {v}, blocks: 1}}", "branches[0].random.block", "2^40"),
    ("branches:\n  - random: {{block: 4, blocks: {v}}}", "branches[0].random.blocks", "<= 256"),
    ("branches:\n  - random: {{block: 4, blocks: 1, seed: {v}}}", "branches[0].random.seed",
     "2^63 - 1"),
    ("branches:\n  - global: {{tokens: [0, {v}]}}", "branches[0].global.tokens[1]", "2^40"),
    ("heads: {v}\nbranches:\n  - dense: {{}}", "heads", "2^16"),
    ("kv_heads: {v}\nbranches:\n  - dense: {{}}", "kv_heads", "2^16"),
    ("head_dim: {v}\nbranches:\n  - dense: {{}}", "head_dim", "2^16"),
    ("schedule:\n  geometric: {{segment: {v}, ratio: 2, count: 1}}", "schedule.geometric.segment",
     "2^40"),
    ("schedule:\n  geometric: {{segment: 8, dilation: {v}, ratio: 2, count: 1}}",
     "schedule.geometric.dilation", "2^40"),
    ("schedule:\n  geometric: {{segment: 8, ratio: {v}, count: 1}}", "schedule.geometric.ratio",
     "2^40"),
    ("schedule:\n  geometric: {{segment: 8, ratio: 2, count: {v}}}", "schedule.geometric.count",
     str(MAX_BRANCHES)),
]


@pytest.mark.parametrize("value", [2**63, 2**64 + 1, 10**40])
@pytest.mark.parametrize("template, field, bound", SIZE_FIELDS,
                         ids=[f for _, f, _ in SIZE_FIELDS])
def test_huge_sizes(template: str, field: str, bound: str, value: int) -> None:
    shown = str(value) if value < 10**30 else "an integer of 41 digits"
    refused("name: p\n" + template.format(v=value) + "\n", field, "expected an integer <=",
            bound, f"got {shown}")


@pytest.mark.parametrize("text", [
    "branches:\n  - {segment: 1099511627776, dilation: 1099511627776}",
    "branches:\n  - {segment: 8, dilation: 1099511627776, offsets: [0, 1099511627775]}",
    "branches:\n  - window: {size: 1099511627776}",
    "branches:\n  - strided: {stride: 1099511627776}",
    "branches:\n  - random: {block: 1099511627776, blocks: 256, seed: "
    "9223372036854775807}",
    "branches:\n  - global: {tokens: [1099511627776]}",
    "heads: 65536\nkv_heads: 65536\nhead_dim: 65536\nbranches:\n  - dense: {}",
    "schedule:\n  geometric: {segment: 1024, dilation: 1, ratio: 2, count: 31}",
])
def test_sizes_at_the_limit_load(text: str) -> None:
    load_pattern_text("name: p\n" + text + "\n")


def test_size_bounds_hold_in_python_too() -> None:
    for data in ({"name": "p", "branches": [{"segment": 2**63, "dilation": 1}]},
                 {"name": "p", "heads": 2**20, "branches": [{"dense": {}}]},
                 {"name": "p", "branches": [{"window": {"size": 2**70}}]}):
        with bounded(), pytest.raises(ValidationError, match=r"expected an integer <="):
            Pattern.model_validate(data)


def test_python_alias_bomb_fails_fast() -> None:
    laugh: list = ["lol"]
    for _ in range(9):
        laugh = [laugh] * 10  # 10^9 items, shared
    with bounded(), pytest.raises(ValidationError) as info:
        Pattern.model_validate({"name": "p", "description": laugh, "branches": [{"dense": {}}]})
    with bounded():
        assert "description" in str(info.value) and len(str(info.value)) < 400


@pytest.mark.parametrize("count", [1_000_000, 10**30, 2**63])
def test_geometric_count_huge(count: int) -> None:
    refused(f"name: p\nschedule:\n  geometric: {{segment: 2048, ratio: 2, count: {count}}}\n",
            "schedule.geometric.count", f"expected an integer <= {MAX_BRANCHES}")


@pytest.mark.parametrize("segment, dilation, ratio, count, most", [
    (2048, 1, 2, 100, 30),  # 2048 * 2^29 = 2^40 fits, 2^41 does not
    (2048, 1, 2, 31, 30),
    (1, 1, 10, 200, 13),  # 10^12 fits, 10^13 does not
    (8, 2**39, 2, 3, 2),  # the dilation is the first to pass 2^40
    (1, 1, MAX_SIZE, 3, 2),
])
def test_geometric_largest_segment_or_dilation(segment: int, dilation: int, ratio: int,
                                               count: int, most: int) -> None:
    text = (f"name: p\nschedule:\n  geometric: {{segment: {segment}, dilation: {dilation}, "
            f"ratio: {ratio}, count: {count}}}\n")
    refused(text, "schedule.geometric.count", f"expected a count <= {most}", f"got {count}")
    fitting = load_pattern_text(text.replace(f"count: {count}", f"count: {most}"))
    assert max(b.segment for b in fitting.expanded_branches()) <= MAX_SIZE


def test_too_many_branches_and_items() -> None:
    branches = "".join("  - dense: {}\n" for _ in range(MAX_BRANCHES + 1))
    refused("name: p\nbranches:\n" + branches, "branches", f"at most {MAX_BRANCHES} items",
            f"a list of {MAX_BRANCHES + 1} items")
    tokens = ", ".join(str(i) for i in range(2**16 + 1))
    refused(f"name: p\nbranches:\n  - global: {{tokens: [{tokens}]}}\n",
            "branches[0].global.tokens", "at most 65536 items")


@pytest.mark.parametrize("length", [MAX_NAME_LENGTH + 1, 300, 100_000])
def test_long_names(length: int) -> None:
    refused(f"name: {'a' * length}\nbranches:\n  - dense: {{}}\n", "name",
            f"at most {MAX_NAME_LENGTH} characters", f"{length:,} characters")
    load_pattern_text(f"name: {'a' * MAX_NAME_LENGTH}\nbranches:\n  - dense: {{}}\n")


def test_long_keys_and_strings_are_shown_short() -> None:
    refused(f"name: p\n{'k' * 1000}: 1\nbranches:\n  - dense: {{}}\n", "k" * 37 + "...",
            "unknown key")
    refused(f"name: p\ncausal: {'x' * 100_000}\nbranches:\n  - dense: {{}}\n", "causal",
            "a string of 100,000 characters")
    refused("name: p\ncausal: [" + ", ".join(["[1, 2, 3]"] * 5000) + "]\nbranches:\n"
            "  - dense: {}\n", "causal", "a list of 5,000 items")


# --- softmax scale ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, value", [
    (".inf", math.inf), ("-.inf", -math.inf), (".nan", math.nan), ("0", 0), ("0.0", 0.0),
    ("-1", -1), ("-1.0e-300", -1e-300), ("1.0e+400", math.inf),  # YAML 1.1: a signed exponent
])
def test_bad_softmax_scale(text: str, value: float) -> None:
    error = refused(f"name: p\nsoftmax_scale: {text}\nbranches:\n  - dense: {{}}\n",
                    "softmax_scale", "must be a finite number > 0")
    with pytest.raises(ScaleError) as api:  # the API refuses it in the same words
        check_scale(value, "the scale")
    assert error.message == str(api.value)
    with pytest.raises(ValidationError, match="must be a finite number > 0"):
        Pattern(name="p", softmax_scale=value, branches=[{"dense": {}}])


def test_good_softmax_scale() -> None:
    for text in ("0.125", "1", "1.0e-3"):
        pattern = load_pattern_text(f"name: p\nsoftmax_scale: {text}\nbranches:\n  - dense: {{}}\n")
        assert pattern.softmax_scale == float(text)


# --- the command line ------------------------------------------------------------------------


def cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)


HOSTILE_FILES = {
    "bomb": GOOD + laughs()[0] + f"description: {laughs()[1]}\n",
    "deep": "name: p\nbranches: " + "[" * 100_000 + "\n",
    "huge-segment": "name: p\nbranches:\n  - {segment: 9223372036854775808, dilation: 1}\n",
    "huge-geometric": "name: p\nschedule:\n  geometric: {segment: 2048, ratio: 2, count: 100}\n",
    "long-name": f"name: {'a' * 300}\nbranches:\n  - dense: {{}}\n",
    "inf-scale": "name: p\nsoftmax_scale: .inf\nbranches:\n  - dense: {}\n",
    "big-int": "name: p\nheads: " + "7" * 6000 + "\nbranches:\n  - dense: {}\n",
}


@pytest.mark.parametrize("name", list(HOSTILE_FILES))
@pytest.mark.parametrize("command", [["inspect", "-n", "1000"], ["compile", "-o", "out"]])
def test_cli_hostile_file(name: str, command: list[str], tmp_path: Path,
                          capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
                          ) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(HOSTILE_FILES[name])
    monkeypatch.chdir(tmp_path)
    argv = [command[0], str(path), *command[1:]]
    with bounded(megabytes=512):
        assert cli(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"spattn: error: {path}:") and len(err) < 400
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # nothing written


@pytest.mark.parametrize("n", ["1e9", "1e12"])
@pytest.mark.parametrize("name", builtin_names())
def test_inspect_huge_n_is_quick(name: str, n: str, capsys: pytest.CaptureFixture[str]) -> None:
    with bounded(megabytes=256):
        assert cli(["inspect", name, "-n", n]) == 0
    out = capsys.readouterr().out
    assert f"N = {int(float(n)):,} tokens" in out
    assert "dense attention" in out


def test_inspect_refuses_a_sequence_past_the_limit(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["inspect", "longnet-lm", "-n", str(MAX_SIZE + 1)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2^40" in err
    with pytest.raises(SpattnError, match="--seq-len"):
        inspect_pattern(load_pattern("longnet-lm"), MAX_SIZE + 1)


def test_parts_past_the_work_limit_are_left_out_with_a_note() -> None:
    with bounded(megabytes=256):
        report = inspect_pattern(load_pattern("bigbird"), 10**9)
    random, union = report.branches[2], report.total
    assert random.pairs is None and union.pairs is None and report.tiles is None
    assert report.branches[0].pairs == 8 * (2 * 64 * 10**9 - 64 * 64)  # global: still counted
    text = format_report(report)
    assert "not counted" in text and "note: not computed: random blocks" in text
    with pytest.raises(WorkLimitError, match="too large to compute exactly"):
        count_pairs(load_pattern("bigbird"), 10**9, 8)


HOSTILE_PATTERNS: dict[str, str] = {
    "many-windows-union": "name: w\noverlap: union\nbranches:\n" + "".join(
        f"  - window: {{size: {i}}}\n" for i in range(2, 200)),
    "many-dilated-union": "name: d\noverlap: union\ncausal: true\nbranches:\n" + "".join(
        f"  - {{segment: {64 * i}, dilation: {i % 5 + 1}}}\n" for i in range(1, 60)),
    "chain-window": "name: c\ncausal: true\nbranches:\n  - window: {size: 2}\n",
    "huge-random": "name: r\nbranches:\n  - random: {block: 1, blocks: 256}\n",
    "wide-stride": "name: s\noverlap: union\nbranches:\n  - strided: {stride: 129}\n"
                   "  - window: {size: 3}\n",
    "huge-segment": "name: h\noverlap: union\nbranches:\n  - {segment: 1099511627776, dilation: "
                    "1099511627775}\n  - {segment: 1099511627775, dilation: 1099511627773}\n",
}


@pytest.mark.parametrize("name", list(HOSTILE_PATTERNS))
@pytest.mark.parametrize("n", [4096, 10**6, 10**12])
def test_inspect_hostile_patterns_is_quick(name: str, n: int) -> None:
    pattern = load_pattern_text(HOSTILE_PATTERNS[name])
    with bounded(megabytes=256):
        text = format_report(inspect_pattern(pattern, n))
    assert f"N = {n:,} tokens" in text


def test_ignored_global_tokens_are_noted(capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text("name: g\nbranches:\n  - global: {tokens: [0, 5, 100, 7, 200]}\n"
                    "  - global: {tokens: [" + ", ".join(str(i) for i in range(50, 80)) + "]}\n")
    assert cli(["inspect", str(path), "-n", "60", "--no-hops", "--no-tiles"]) == 0
    out = capsys.readouterr().out
    assert "note: branches[0]: 2 global token(s) at or past N = 60 are ignored: 100, 200" in out
    assert "note: branches[1]: 20 global token(s) at or past N = 60 are ignored: 60, 61, " \
           "62, 63, 64, 65, 66, 67, ..." in out
    assert cli(["inspect", str(path), "-n", "1000", "--no-hops", "--no-tiles"]) == 0
    assert "ignored" not in capsys.readouterr().out


def test_png_of_a_huge_random_pattern(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from spattn.patterns.picture import draw_mask

    with bounded(megabytes=512):
        drawn = draw_mask(load_pattern("bigbird"), 10**12, 8, tmp_path / "b.png", tokens=512)
    assert drawn == 512 and (tmp_path / "b.png").stat().st_size > 0

