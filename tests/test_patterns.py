"""The pattern loader: built-ins, the YAML edge, and line-numbered errors for malformed files."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from spattn.cli import list_cmd
from spattn.errors import PatternError
from spattn.patterns.loader import (
    builtin_names,
    builtin_patterns,
    load_pattern,
    load_pattern_text,
)
from spattn.patterns.spec import (
    DenseBranch,
    DilatedBranch,
    GlobalBranch,
    Pattern,
    RandomBranch,
    StridedBranch,
    WindowBranch,
)

MALFORMED = Path(__file__).parent / "data" / "malformed"
LIBRARY = Path(__file__).parent.parent / "spattn" / "patterns" / "library"

# file, field (None: not about one field), line, a piece of the message
CASES = [
    ("unknown-top-level-key.yaml", "dropout", 4, "unknown key; expected one of: name,"),
    ("unknown-branch-key.yaml", "branches[1].stride", 5, "expected one of: segment, dilation"),
    ("typo-branch-key.yaml", "branches[1].dilaton", 7, "did you mean 'dilation'?"),
    ("typo-top-level-key.yaml", "casual", 2, "did you mean 'causal'?"),
    ("string-for-int.yaml", "branches[1].segment", 4, "expected an integer, got the string '4096'"),
    ("float-for-int.yaml", "branches[1].dilation", 4, "expected an integer, got 1.5"),
    ("list-for-mapping.yaml", "branches[0].window", 4, "expected a mapping, got a list"),
    ("int-for-bool.yaml", "causal", 2, "expected true or false, got 1"),
    ("zero-segment.yaml", "branches[0].segment", 4, "expected an integer > 0, got 0"),
    ("negative-dilation.yaml", "branches[1].dilation", 5, "expected an integer > 0, got -2"),
    ("zero-window.yaml", "branches[1].window.size", 6, "expected an integer > 0, got 0"),
    ("negative-global-token.yaml", "branches[0].global.tokens[1]", 5, ">= 0, got -1"),
    ("empty-global-tokens.yaml", "branches[1].global.tokens", 5, "at least 1 item, got an empty"),
    ("offset-too-large.yaml", "branches[1].offsets[2]", 10, "offset in [0, 2)"),
    ("offsets-too-long.yaml", "branches[1].offsets", 5, "expected 4 offsets"),
    ("offsets-too-short.yaml", "branches[1].offsets", 8, "expected 8 offsets"),
    ("offsets-different-lengths.yaml", "branches[2].offsets", 5, "as in branches[1].offsets"),
    ("heads-not-divisible.yaml", "kv_heads", 3, "expected a divisor of heads (12), got 5"),
    ("branches-and-schedule.yaml", "schedule", 5, "exactly one of 'branches' and 'schedule'"),
    ("neither-branches-nor-schedule.yaml", "branches", 2, "got neither"),
    ("empty-branches.yaml", "branches", 3, "expected at least 1 item, got an empty list"),
    ("geometric-ratio-one.yaml", "schedule.geometric.ratio", 7, "expected an integer >= 2, got 1"),
    ("geometric-missing-count.yaml", "schedule.geometric.count", 4, "required key is missing"),
    ("missing-dilation.yaml", "branches[1].dilation", 4, "required key is missing"),
    ("invalid-name.yaml", "name", 1, "got the string 'LongNet LM'"),
    ("bad-head-offsets.yaml", "head_offsets", 2, "expected 'paper' or 'blocked'"),
    ("bad-overlap.yaml", "overlap", 2, "expected 'multiset' or 'union', got the string 'max'"),
    ("unknown-branch-kind.yaml", "branches[0]", 4, "got a mapping with keys sliding"),
    ("dense-null.yaml", "branches[0].dense", 4, "expected a mapping, got nothing (null)"),
    ("negative-softmax-scale.yaml", "softmax_scale", 2,
     "must be a finite number > 0, got -0.125"),
    ("bad-indentation.yaml", None, 5, "check the indentation"),
    ("unclosed-bracket.yaml", None, 4, "expected ',' or ']'"),
    ("empty.yaml", None, 1, "empty"),
    ("comments-only.yaml", None, 1, "empty"),
    ("top-level-list.yaml", None, 1, "at the top level, got a list"),
    ("duplicate-key.yaml", "branches[0].segment", 6, "duplicate key 'segment' (first given on "
                                                     "line 4)"),
    ("duplicate-top-level-key.yaml", "causal", 5, "duplicate key 'causal'"),
    ("tab-indentation.yaml", None, 3, "not tabs"),
    ("zero-stride.yaml", "branches[1].strided.stride", 6, "expected an integer > 0, got 0"),
    ("float-stride.yaml", "branches[0].strided.stride", 5, "expected an integer, got 12.5"),
    ("typo-stride-key.yaml", "branches[1].strided.strid", 5, "did you mean 'stride'?"),
    ("random-missing-blocks.yaml", "branches[1].random.blocks", 4, "required key is missing"),
    ("unknown-random-key.yaml", "branches[2].random.replace", 6,
     "unknown key; expected one of: block, blocks, seed"),
    ("negative-random-seed.yaml", "branches[0].random.seed", 6, "expected an integer >= 0, got -1"),
    # YAML 1.1 readings (octal, sexagesimal, 1_024, yes, dates) are not YAML 1.2's: refused
    ("leading-zero-int.yaml", "branches[1].dilation", 5, "ambiguous integer '02': a leading zero"),
    ("sexagesimal-int.yaml", "branches[0].segment", 4,
     "expected an integer, got the string '1:30'"),
    ("underscore-int.yaml", "branches[0].segment", 4,
     "expected an integer, got the string '1_024'"),
    ("yes-for-bool.yaml", "causal", 2, "expected true or false, got the string 'yes'"),
    ("timestamp-tag.yaml", "description", 2, "the tag !!timestamp is not supported"),
    ("duplicate-merge-key.yaml", "branches[1].<<", 6, "duplicate merge key '<<' (first given on "
                                                       "line 5)"),
    ("merged-twice.yaml", "branches[2].<<", 5, "key 'segment' is given by two merged mappings "
                                                "(lines 3 and 4)"),
]


def test_every_malformed_file_has_a_case() -> None:
    assert sorted(p.name for p in MALFORMED.glob("*.yaml")) == sorted(c[0] for c in CASES)


@pytest.mark.parametrize(("filename", "field", "line", "fragment"), CASES,
                         ids=[c[0].removesuffix(".yaml") for c in CASES])
def test_malformed(filename: str, field: str | None, line: int, fragment: str) -> None:
    path = MALFORMED / filename
    with pytest.raises(PatternError) as info:
        load_pattern(path)
    error = info.value
    assert (error.field, error.line) == (field, line)
    assert error.source == str(path)
    text = str(error)
    assert text.startswith(f"{path}:{line}: ")
    if field is not None:
        assert f": {field}: " in text
    assert fragment in text
    assert error.errors[0] == (field, line, error.message)


def test_several_problems_report_the_first_line_and_keep_all() -> None:
    text = (
        "name: Bad Name\n"                     # line 1
        "causal: 1\n"                          # line 2
        "branches:\n"
        "  - {segment: 2048, dilation: 1}\n"
        "  - {segment: -1, dilation: 2}\n"     # line 5
    )
    with pytest.raises(PatternError) as info:
        load_pattern_text(text, source="two.yaml")
    error = info.value
    assert (error.field, error.line) == ("name", 1)
    assert "(and 2 more problems)" in str(error)
    assert [(f, line) for f, line, _ in error.errors] == [
        ("name", 1), ("causal", 2), ("branches[1].segment", 5)]


def test_non_utf8_and_unreadable(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"name: caf\xe9\nbranches:\n  - dense: {}\n")
    with pytest.raises(PatternError, match="not UTF-8") as info:
        load_pattern(bad)
    assert info.value.line == 1
    with pytest.raises(PatternError, match="cannot read a directory as a pattern"):
        load_pattern(tmp_path)


# --- built-ins ----------------------------------------------------------------------------------

def dilated(pattern: Pattern) -> list[tuple[int, int]]:
    return [(b.segment, b.dilation) for b in pattern.expanded_branches()]


BUILTINS = ["bigbird", "dense-causal", "longnet-geometric", "longnet-lm", "longvit",
            "sink-window", "sliding-window", "sparse-transformer-strided"]


def test_builtin_names() -> None:
    assert builtin_names() == BUILTINS
    assert [b.name for b in builtin_patterns()] == builtin_names()
    for builtin in builtin_patterns():
        assert builtin.description and Path(builtin.path).name == f"{builtin.name}.yaml"


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_loads(name: str) -> None:
    pattern = load_pattern(name)
    assert pattern.name == name
    assert pattern.description
    assert pattern.causal == (name not in ("longvit", "bigbird"))


def test_builtin_branches() -> None:
    assert dilated(load_pattern("longnet-lm")) == [
        (2048, 1), (4096, 2), (8192, 4), (16384, 6), (32768, 12)]
    assert dilated(load_pattern("longnet-geometric")) == [
        (2048 * 2**i, 2**i) for i in range(5)]
    assert load_pattern("longnet-geometric").schedule is not None
    assert dilated(load_pattern("longvit")) == [
        (1024, 1), (2048, 2), (4096, 4), (8192, 8), (16384, 16)]
    (window,) = load_pattern("sliding-window").branches
    assert isinstance(window, WindowBranch) and window.window.size == 4096
    sink, window = load_pattern("sink-window").branches
    assert isinstance(sink, GlobalBranch) and sink.global_.tokens == (0, 1, 2, 3)
    assert isinstance(window, WindowBranch) and window.window.size == 4096
    (dense,) = load_pattern("dense-causal").branches
    assert isinstance(dense, DenseBranch)
    bigbird = load_pattern("bigbird")
    tokens, window, random = bigbird.branches
    assert isinstance(tokens, GlobalBranch) and tokens.global_.tokens == tuple(range(64))
    assert isinstance(window, WindowBranch) and window.window.size == 192
    assert isinstance(random, RandomBranch)
    assert (random.random.block, random.random.blocks, random.random.seed) == (64, 3, 0)
    assert bigbird.overlap == "union"
    strided = load_pattern("sparse-transformer-strided")
    window, stride = strided.branches
    assert isinstance(window, WindowBranch) and window.window.size == 128
    assert isinstance(stride, StridedBranch) and stride.strided.stride == 128
    assert strided.overlap == "union"


def test_load_by_path_and_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    by_name = load_pattern("longnet-lm")
    assert load_pattern(LIBRARY / "longnet-lm.yaml") == by_name
    assert load_pattern(str(LIBRARY / "longnet-lm.yaml")) == by_name
    mine = tmp_path / "mine.yaml"
    mine.write_text("name: mine\nbranches:\n  - window: {size: 8}\n")
    monkeypatch.chdir(tmp_path)
    assert load_pattern("mine.yaml").name == "mine"


def test_unknown_name_lists_builtins() -> None:
    with pytest.raises(PatternError) as info:
        load_pattern("longnet-xl")
    text = str(info.value)
    assert text.startswith("longnet-xl: no such file")
    assert all(name in text for name in builtin_names())
    assert "Traceback" not in text


# --- the spec itself ----------------------------------------------------------------------------

def test_model_validate_dict() -> None:
    pattern = Pattern.model_validate({
        "name": "gqa", "heads": 8, "kv_heads": 2,
        "branches": [{"segment": 64, "dilation": 2, "offsets": [0, 1] * 4},
                     {"global": {"tokens": [0]}}],
    })
    assert isinstance(pattern.branches[0], DilatedBranch)
    assert pattern.required_heads() == 8
    for bad in ({"name": "x", "branches": [{"segment": 4, "dilation": 2, "offsets": [2]}]},
                {"name": "x", "heads": 4, "kv_heads": 3, "branches": [{"dense": {}}]},
                {"name": "x"}):
        with pytest.raises(ValidationError):
            Pattern.model_validate(bad)


def test_geometric_expands() -> None:
    pattern = load_pattern_text(
        "name: geo\nschedule:\n  geometric: {segment: 512, dilation: 3, ratio: 4, count: 3}\n")
    assert dilated(pattern) == [(512 * 4**i, 3 * 4**i) for i in range(3)]


def test_content_hash_stable_and_ignores_description() -> None:
    block = "name: p\ncausal: true\nbranches:\n  - segment: 64\n    dilation: 2\n"
    flow = "# same thing\nbranches: [{dilation: 2, segment: 64}]\ncausal: true\nname: p\n"
    described = block + "description: something else entirely\n"
    hashes = {load_pattern_text(t).content_hash() for t in (block, flow, described, block)}
    assert len(hashes) == 1
    assert load_pattern_text(block.replace("true", "false")).content_hash() not in hashes
    # the geometric shorthand hashes like the branches it stands for
    explicit = "name: longnet-geometric\ncausal: true\nbranches:\n" + "".join(
        f"  - {{segment: {2048 * 2**i}, dilation: {2**i}}}\n" for i in range(5))
    assert load_pattern_text(explicit).content_hash() == load_pattern("longnet-geometric") \
        .content_hash()


def test_loading_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def snapshot() -> dict[str, float]:
        return {str(p): p.stat().st_mtime_ns for d in (tmp_path, LIBRARY, MALFORMED)
                for p in d.rglob("*")}

    good = tmp_path / "good.yaml"
    good.write_text("name: good\nbranches:\n  - dense: {}\n")
    monkeypatch.chdir(tmp_path)
    before = snapshot()
    load_pattern(good)
    for name in builtin_names():
        load_pattern(name)
    for filename, *_ in CASES:
        with pytest.raises(PatternError):
            load_pattern(MALFORMED / filename)
    assert snapshot() == before
    assert os.listdir(tmp_path) == ["good.yaml"]


# --- spattn list --------------------------------------------------------------------------------

def test_list_command(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    list_cmd.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["list"])
    assert args.run(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == builtin_names()
    lm = next(line for line in lines if line.startswith("longnet-lm "))
    assert lm.split()[1] == "causal" and "  5 dilated branches  w 2048..32768  r 1..12  " in lm
    summaries = {line.split()[0]: line for line in lines}
    assert "  64 global tokens + window 192 + random 3 blocks of 64  " in summaries["bigbird"]
    assert summaries["bigbird"].split()[1] == "non-causal"
    assert "  window 128 + strided 128  " in summaries["sparse-transformer-strided"]
    one = load_pattern_text("name: r\nbranches:\n  - random: {block: 8, blocks: 1}\n")
    assert list_cmd.summarize(one) == "random 1 block of 8"
    descriptions = {b.name: b.description for b in builtin_patterns()}
    columns = {line.index(descriptions[line.split()[0]]) for line in lines}
    assert len(columns) == 1  # the descriptions line up
