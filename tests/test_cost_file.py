"""The tuned cost file (runtime/costs.py) is not trusted: anything but a regular file of valid
figures is ignored with one warning naming it, and attention goes on with the default model;
`spattn tune` writes a regular file or refuses in one line."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from planted import KINDS, finishes, plant

import spattn
from spattn.cli.main import main
from spattn.runtime import costs

GOOD = {"call_us": 40.0, "copy_gbps": 3.0, "pair_ns": 8.0, "mask_ns": 0.5, "block_us": 5.0,
        "piece_us": 30.0, "merge_ns": 1.0}
PATTERN = spattn.Pattern.model_validate({"name": "tiny", "causal": True, "branches": [
    {"segment": 8, "dilation": 2}, {"window": {"size": 3}}]})


@pytest.fixture(autouse=True)
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPATTN_CACHE_DIR", str(tmp_path / "cache"))
    costs._read.cache_clear()
    yield costs._path()
    costs._read.cache_clear()


def _attend():
    q, k, v = torch.randn(3, 1, 2, 40, 16, generator=torch.Generator().manual_seed(0))
    assert spattn.attention(q, k, v, PATTERN, backend="torch").isfinite().all()


def _warnings_of(fn):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in seen if issubclass(w.category, costs.CostFileWarning)]


def test_a_valid_file_is_used(cache):
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({**GOOD, "call_us": 40}))  # an integer is a number too
    assert _warnings_of(costs.current) == []
    assert costs.current().call_us == 40.0 and costs.current().source.startswith("tuned")


BAD = {  # what is written -> the field the warning names
    "zero-rate": ({**GOOD, "copy_gbps": 0}, "copy_gbps"),
    "negative": ({**GOOD, "pair_ns": -1.0}, "pair_ns"),
    "string": ({**GOOD, "call_us": "40"}, "call_us"),
    "null": ({**GOOD, "merge_ns": None}, "merge_ns"),
    "boolean": ({**GOOD, "block_us": True}, "block_us"),
    "nan": (json.dumps({**GOOD, "mask_ns": float("nan")}), "mask_ns"),
    "inf": (json.dumps({**GOOD, "copy_gbps": float("inf")}), "copy_gbps"),
    "missing": ({k: v for k, v in GOOD.items() if k != "piece_us"}, "piece_us"),
    "extra": ({**GOOD, "bogus": 1.0}, "bogus"),
    "list": ([GOOD], "the file"),
    "number": (3, "the file"),
    "not-json": ("{call_us: 40", "the file"),
    "not-utf8": (b"\xff\xfe{}", "the file"),
    "huge": (json.dumps(GOOD) + " " * (4 << 20), "larger than"),  # valid JSON, padded
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_file_is_ignored_once_with_a_warning(case, cache):
    content, field = BAD[case]
    cache.parent.mkdir(parents=True)
    if isinstance(content, bytes):
        cache.write_bytes(content)
    else:
        cache.write_text(content if isinstance(content, str) else json.dumps(content))

    def twice():
        assert costs.current() == costs.DEFAULT
        _attend()
        _attend()
    said = _warnings_of(twice)
    assert len(said) == 1 and str(cache) in said[0] and field in said[0], said


@pytest.mark.parametrize("kind", KINDS)
def test_a_planted_file_is_ignored_without_hanging(kind, cache, tmp_path):
    cache.parent.mkdir(parents=True)
    # a link to valid figures elsewhere is refused too: only a regular file is read
    untouched = plant(cache, kind, tmp_path / "outside", text=json.dumps(GOOD))
    said = finishes(lambda: _warnings_of(lambda: (costs.current(), _attend())))
    assert costs.current() == costs.DEFAULT
    assert len(said) == 1 and str(cache) in said[0] and "not a regular file" in said[0], said
    untouched()


@pytest.mark.parametrize("kind", KINDS)
def test_tune_writes_a_regular_file_or_refuses_in_one_line(kind, cache, tmp_path, monkeypatch,
                                                          capsys):
    measured = costs.CostModel(**GOOD, source="tuned")
    monkeypatch.setattr(costs, "measure", lambda repeats=5, progress=None: measured)
    cache.parent.mkdir(parents=True)
    untouched = plant(cache, kind, tmp_path / "outside")
    assert finishes(lambda: main(["tune"])) == 2
    err = capsys.readouterr().err
    assert str(cache) in err and "not a regular file" in err
    assert len([line for line in err.splitlines() if line.startswith("spattn")]) == 1, err
    untouched()
    if kind == "folder":
        cache.rmdir()
    else:
        cache.unlink()
    assert main(["tune"]) == 0 and json.loads(cache.read_text()) == GOOD


def test_tune_does_not_write_through_a_linked_costs_folder(cache, tmp_path, monkeypatch,
                                                          capsys):
    measured = costs.CostModel(**GOOD, source="tuned")
    monkeypatch.setattr(costs, "measure", lambda repeats=5, progress=None: measured)
    (tmp_path / "elsewhere").mkdir()
    cache.parent.parent.mkdir(parents=True)
    cache.parent.symlink_to(tmp_path / "elsewhere")
    assert main(["tune"]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert list((tmp_path / "elsewhere").iterdir()) == []
