"""The docs as a reader meets them: every ```python block of README.md and docs/*.md runs as it is
(in a fresh process from the repo root), every relative link and #anchor resolves, and the marked
command outputs are well formed. `scripts/doc_outputs.py` does the work; it is also the command
that regenerates the outputs."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("doc_outputs", ROOT / "scripts" / "doc_outputs.py")
docs = importlib.util.module_from_spec(_spec)
sys.modules["doc_outputs"] = docs  # dataclasses look their module up by name
_spec.loader.exec_module(docs)

DOC_FILES = docs.doc_files()
BLOCKS = [block for path in DOC_FILES for block in docs.python_blocks(path)]


def test_the_doc_files_are_found():
    names = {str(path.relative_to(ROOT)) for path in DOC_FILES}
    assert {"README.md", "docs/semantics.md", "docs/torchscale.md"} <= names
    assert len(BLOCKS) >= 8  # README steps 4 and 5, decoding, torchscale, kyegomez, ...


@pytest.mark.parametrize("block", BLOCKS, ids=[block.where for block in BLOCKS])
def test_python_block_runs(block):
    if block.skip:
        pytest.skip(block.skip)
    problem = docs.run_python(block)
    assert problem is None, problem


def test_python_blocks_skipped_are_few_and_say_why():
    skipped = [block for block in BLOCKS if block.skip]
    assert len(skipped) <= 2, [block.where for block in skipped]
    assert all(len(block.skip.split()) >= 3 for block in skipped)


def test_a_failing_or_slow_python_block_is_reported(tmp_path):
    page = (tmp_path / "page.md").resolve()
    page.write_text("# Page\n\n```python\nimport sys\nprint('fine')\n```\n\ntext\n\n"
                    "  ```python\n  raise SystemExit('broken snippet')\n  ```\n\n"
                    "<!-- python: skip: needs a GPU we do not have -->\n"
                    "```python\nraise SystemExit(5)\n```\n\n"
                    "```py\nimport time\ntime.sleep(30)\n```\n\n```bash\nexit 1\n```\n")
    fine, broken, skipped, slow = docs.python_blocks(page)
    assert (fine.line, broken.line, skipped.line, slow.line) == (3, 10, 15, 19)
    assert docs.run_python(fine) is None
    problem = docs.run_python(broken)
    assert problem.startswith(f"{page}:10: the python block exited with status 1")
    assert "broken snippet" in problem
    assert skipped.skip == "needs a GPU we do not have"
    assert "ran past 2 s" in docs.run_python(slow, timeout=2)


def test_a_python_marker_must_be_a_skip_with_a_reason(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- python: skip -->\n```python\npass\n```\n")
    with pytest.raises(SystemExit, match="python: skip: REASON"):
        docs.python_blocks(page)


def test_every_relative_link_and_anchor_resolves():
    problems = [problem for path in DOC_FILES for problem in docs.check_links(path)]
    assert problems == []


def test_broken_links_and_anchors_are_reported(tmp_path):
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "other.md").write_text("# Other page\n\n## Runs: on `CPU`, too!\n\n"
                                            "## Runs: on `CPU`, too!\n")
    (root / "data.csv").write_text("a,b\n")
    (tmp_path / "outside.md").write_text("# Outside\n")
    page = (root / "docs" / "page.md").resolve()
    page.write_text(
        "# The page\n\n"
        "[ok](other.md) [ok](other.md#runs-on-cpu-too) [ok](other.md#runs-on-cpu-too-1)\n"
        "[ok](#the-page) ![ok](../data.csv) [ok](https://example.com/x#y) [ok](./)\n"
        "[gone](missing.md) [bad anchor](other.md#runs-on-cpu-too-2) [self](#no-such)\n"
        "[out](../../outside.md) [csv anchor](../data.csv#a)\n"
        "`[in code](missing.md)`\n\n```\n[in a block](missing.md)\n```\n"
        "[ref]: nowhere.md\n")
    problems = docs.check_links(page, root=root)
    targets = [re.match(r".*?:\d+: (\S+): ", problem).group(1) for problem in problems]
    assert targets == ["missing.md", "other.md#runs-on-cpu-too-2", "#no-such",
                       "../../outside.md", "../data.csv#a", "nowhere.md"], problems
    assert "outside the repository" in problems[3]
    assert f"{page}:5: missing.md: no such file" == problems[0]


@pytest.mark.parametrize("heading, anchor", [
    ("Distributed: one sequence across ranks", "distributed-one-sequence-across-ranks"),
    ("`spattn plan`: what each rank sends, before you launch",
     "spattn-plan-what-each-rank-sends-before-you-launch"),
    ("Coming from kyegomez/LongNet", "coming-from-kyegomezlongnet"),
    ("Branch kinds beyond docs/semantics.md: strided and random blocks",
     "branch-kinds-beyond-docssemanticsmd-strided-and-random-blocks"),
    ("Ready for GPUs, checked without one", "ready-for-gpus-checked-without-one"),
    ("[Links](x.md) and *emphasis*: head_dim", "links-and-emphasis-head_dim"),
])
def test_anchors_follow_githubs_rules(heading, anchor):
    assert docs.slug(heading) == anchor


def test_command_markers_match_the_commands_shown():
    for path in DOC_FILES:
        lines = path.read_text().split("\n")
        for _, start, _, kind, argument in docs.blocks(lines):
            if kind == "command":
                shown = argument.split(" # ")[0]
                assert lines[start + 1] == f"$ {shown}", f"{path}:{start + 2}"


def test_the_test_count_is_stated_in_one_place():
    stated = [(path.name, match.group(0)) for path in DOC_FILES
              for match in re.finditer(r"\b[\d,]+ tests\b", path.read_text())]
    assert len(stated) == 1 and stated[0][0] == "README.md", stated
