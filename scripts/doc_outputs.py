"""Regenerate the outputs shown in README.md and docs/*.md by running what they show, run their
Python examples, and check their links.

    python scripts/doc_outputs.py [FILE ...]          # default: README.md and docs/*.md
    python scripts/doc_outputs.py --check [FILE ...]  # list the marked blocks, run nothing
    python scripts/doc_outputs.py --python [FILE ...] # run every ```python block, write nothing
    python scripts/doc_outputs.py --links [FILE ...]  # check every relative link and #anchor

In a markdown file, a fenced block right after a marker line is rewritten:

    <!-- command: spattn inspect longnet-lm -n 4096 -->   the command (bash, from the repo root)
                                                           and its output, as `$ CMD` + output
    <!-- file: examples/quickstart.yaml -->               the file's text

`--python` runs each ```python block as it is, in a fresh `python -c` process from the repo
root; a block must run on a CPU in seconds. A block that cannot run here is marked, with the
reason, and is not run (keep these few):

    <!-- python: skip: needs torchrun, one process per rank -->

`--links` checks every link that is not a URL: the file (or folder) must exist inside the
repository, and a `#fragment` must be the anchor GitHub gives one of the target's headings
(lowercase, punctuation removed, spaces to '-', '-1', '-2', ... on repeats). Links inside code
are not links.

A command that fails stops the script with its output, and nothing is written; `--python` and
`--links` print every failure and exit 1.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^<!-- (command|file|python): (.+?) -->$")
FENCE = re.compile(r"^```\w*$")
PYTHON_TIMEOUT = 600  # seconds a block may take before it counts as failed


def blocks(lines: list[str]) -> list[tuple[int, int, int, str, str]]:
    """(marker line, fence start, fence end, kind, argument) of every marked block."""
    found = []
    for i, line in enumerate(lines):
        match = MARKER.match(line.strip())
        if not match:
            continue
        start = i + 1
        if start >= len(lines) or not FENCE.match(lines[start].strip()):
            raise SystemExit(f"line {i + 1}: a marker must be followed by a fenced block")
        end = next((j for j in range(start + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise SystemExit(f"line {start + 1}: the fenced block is never closed")
        found.append((i, start, end, match.group(1), match.group(2)))
    return found


def output(kind: str, argument: str) -> list[str]:
    if kind == "file":
        return (ROOT / argument).read_text().rstrip("\n").split("\n")
    print(f"$ {argument}", file=sys.stderr, flush=True)
    done = subprocess.run(["bash", "-c", argument], cwd=ROOT, capture_output=True, text=True)
    text = (done.stdout + done.stderr).rstrip("\n")
    if done.returncode != 0 and "# exit 2" not in argument:
        raise SystemExit(f"`{argument}` failed ({done.returncode}):\n{text}")
    shown = argument.split(" # ")[0]  # a trailing comment (e.g. '# exit 2') is not shown
    return [f"$ {shown}", *text.split("\n")]


def regenerate(path: Path, check: bool) -> None:
    lines = path.read_text().split("\n")
    for _, start, end, kind, argument in reversed(blocks(lines)):
        if kind == "python":
            continue
        if check:
            print(f"{path.relative_to(ROOT)}:{start}: {kind}: {argument}")
            continue
        lines[start + 1:end] = output(kind, argument)
    if not check:
        path.write_text("\n".join(lines))


def _shown(path: Path) -> str:
    """A path as messages show it: relative to the repository when it is inside."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# --- fenced code --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fence:
    """A fenced code block: its info string, the lines of its opening and closing fences
    (0-based) and its text, dedented by the fence's indentation."""

    info: str
    start: int
    end: int
    code: str


def fences(lines: list[str]) -> list[Fence]:
    found, i = [], 0
    while i < len(lines):
        stripped = lines[i].lstrip()
        if not stripped.startswith("```"):
            i += 1
            continue
        indent = len(lines[i]) - len(stripped)
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise SystemExit(f"line {i + 1}: the fenced block is never closed")
        body = [line[indent:] if line[:indent].strip() == "" else line
                for line in lines[i + 1:end]]
        found.append(Fence(stripped[3:].strip(), i, end, "\n".join(body) + "\n"))
        i = end + 1
    return found


# --- python blocks ------------------------------------------------------------------------------

@dataclass(frozen=True)
class PythonBlock:
    path: Path
    line: int          # 1-based line of the opening fence
    code: str
    skip: str | None   # the reason, for a block marked `<!-- python: skip: REASON -->`

    @property
    def where(self) -> str:
        return f"{_shown(self.path)}:{self.line}"


def python_blocks(path: Path) -> list[PythonBlock]:
    """Every ```python block of a markdown file, with its skip reason if it is marked."""
    lines = path.read_text().split("\n")
    found = []
    for fence in fences(lines):
        if fence.info not in ("python", "py"):
            continue
        skip = None
        above = lines[fence.start - 1].strip() if fence.start else ""
        match = MARKER.match(above)
        if match and match.group(1) == "python":
            reason = re.fullmatch(r"skip:\s*(\S.*)", match.group(2))
            if reason is None:
                raise SystemExit(f"{path}:{fence.start}: a python marker is "
                                 f"'<!-- python: skip: REASON -->', got {above!r}")
            skip = reason.group(1)
        found.append(PythonBlock(path, fence.start + 1, fence.code, skip))
    return found


def run_python(block: PythonBlock, timeout: float = PYTHON_TIMEOUT) -> str | None:
    """Run one block in a fresh process from the repo root; None if it succeeds, else what went
    wrong (its exit status and the end of its output)."""
    try:
        done = subprocess.run([sys.executable, "-c", block.code], cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        return f"{block.where}: the python block ran past {timeout:g} s"
    if done.returncode == 0:
        return None
    tail = "\n".join((done.stdout + done.stderr).rstrip("\n").split("\n")[-15:])
    return f"{block.where}: the python block exited with status {done.returncode}:\n{tail}"


# --- links --------------------------------------------------------------------------------------

HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]"      # [text], one level of [] inside
                         r"\(\s*<?([^()\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")  # (target "title")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$")
HTML_LINK = re.compile(r"<(?:a|img)\s[^>]*?(?:href|src)=\"([^\"]*)\"", re.IGNORECASE)
URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading (before de-duplication): its text as rendered,
    lowercased, every character but letters, digits, '_', '-' and spaces removed, and each space
    turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, repeats numbered as GitHub numbers them."""
    lines = path.read_text().split("\n")
    in_code = _code_lines(lines)
    seen: dict[str, int] = {}
    found = set()
    for i, line in enumerate(lines):
        match = HEADING.match(line)
        if i in in_code or not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def _code_lines(lines: list[str]) -> set[int]:
    return {i for fence in fences(lines) for i in range(fence.start, fence.end + 1)}


def links(path: Path) -> list[tuple[int, str]]:
    """(1-based line, target) of every link, image and reference definition outside code."""
    lines = path.read_text().split("\n")
    in_code = _code_lines(lines)
    found = []
    for i, line in enumerate(lines):
        if i in in_code:
            continue
        text = re.sub(r"(`+).*?\1", "", line)  # inline code spans are not links
        targets = [m.group(1) for m in INLINE_LINK.finditer(text)]
        targets += [m.group(1) for m in HTML_LINK.finditer(text)]
        reference = REFERENCE.match(text)
        if reference:
            targets.append(reference.group(1))
        found += [(i + 1, target) for target in targets]
    return found


def check_links(path: Path, root: Path = ROOT) -> list[str]:
    """What is broken among a markdown file's relative links and anchors: one line each."""
    problems = []
    root = root.resolve()
    for line, target in links(path):
        if URL.match(target):
            continue
        where = f"{_shown(path)}:{line}: {target}"
        file_part, _, fragment = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path.resolve()
        if not resolved.is_relative_to(root):
            problems.append(f"{where}: points outside the repository ({resolved})")
            continue
        if not resolved.exists():
            problems.append(f"{where}: no such file")
            continue
        if not fragment:
            continue
        if resolved.suffix != ".md" or resolved.is_dir():
            problems.append(f"{where}: an anchor into a file that is not markdown")
        elif fragment not in anchors(resolved):
            problems.append(f"{where}: no heading of {resolved.name} has the anchor "
                            f"#{fragment}")
    return problems


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="list the marked blocks, run nothing")
    mode.add_argument("--python", action="store_true", help="run every python block")
    mode.add_argument("--links", action="store_true", help="check relative links and anchors")
    args = parser.parse_args()
    files = [path.resolve() for path in args.files] or doc_files()
    if args.python or args.links:
        problems = []
        for path in files:
            if args.links:
                problems += check_links(path)
                continue
            for block in python_blocks(path):
                if block.skip:
                    print(f"{block.where}: skipped ({block.skip})", flush=True)
                    continue
                problem = run_python(block)
                print(f"{block.where}: {'ok' if problem is None else 'FAILED'}", flush=True)
                problems += [problem] if problem else []
        if problems:
            print("\n".join(problems), file=sys.stderr)
        raise SystemExit(1 if problems else 0)
    for path in files:
        regenerate(path, args.check)


if __name__ == "__main__":
    main()
