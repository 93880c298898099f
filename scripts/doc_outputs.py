"""Regenerate the outputs shown in README.md and docs/*.md by running what they show.

    python scripts/doc_outputs.py [FILE ...]        # default: README.md and docs/*.md
    python scripts/doc_outputs.py --check [FILE ...] # list the blocks, run nothing

In a markdown file, a fenced block right after a marker line is rewritten:

    <!-- command: spattn inspect longnet-lm -n 4096 -->   the command (bash, from the repo root)
                                                           and its output, as `$ CMD` + output
    <!-- file: examples/quickstart.yaml -->               the file's text

A command that fails stops the script with its output, and nothing is written.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^<!-- (command|file): (.+?) -->$")
FENCE = re.compile(r"^```\w*$")


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
        if check:
            print(f"{path.relative_to(ROOT)}:{start}: {kind}: {argument}")
            continue
        lines[start + 1:end] = output(kind, argument)
    if not check:
        path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--check", action="store_true", help="list the blocks, run nothing")
    args = parser.parse_args()
    files = args.files or [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for path in files:
        regenerate(path.resolve(), args.check)


if __name__ == "__main__":
    main()
