"""The short table a GPU session prints last: its tests, its compile check and its benchmark.

    python scripts/gpu_summary.py OUT     # OUT: the folder scripts/gpu_session.sh wrote
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_gpu import summary  # noqa: E402


def _last_line(path: Path) -> str:
    lines = path.read_text().strip().splitlines() if path.exists() else []
    return lines[-1] if lines else "(nothing: the step did not run or timed out)"


def _number(text: str) -> object:
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text else value


def bench_rows(out: Path) -> list[dict]:
    """The rows of the newest benchmark CSV in `out` (comment lines skipped)."""
    paths = sorted(out.glob("*.csv"), key=lambda p: p.stat().st_mtime)
    if not paths:
        return []
    lines = [line for line in paths[-1].read_text().splitlines() if not line.startswith("#")]
    return [{key: _number(value) for key, value in row.items()}
            for row in csv.DictReader(lines)]


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
    print(f"tests:  {_last_line(out / 'gpu_session_tests.log')}")
    print(f"check:  {_last_line(out / 'gpu_session_check.txt')}")
    print(f"tuning: {_tuned(out)}")
    rows = bench_rows(out)
    print(summary(rows) if rows else "bench:  no CSV (the step did not run or timed out)")


def _tuned(out: Path) -> str:
    """How many launches the benchmark's warm-up tuned, and to which configurations."""
    choices: dict[str, int] = {}
    for path in sorted((out / "spattn-cache" / "tuning").glob("*.json")):
        for row in json.loads(path.read_text()).values():
            name = "{}x{} w{} s{}".format(*row)
            choices[name] = choices.get(name, 0) + 1
    if not choices:
        return "no launch tuned (no GPU, or SPATTN_TUNE=0)"
    ranked = sorted(choices.items(), key=lambda item: -item[1])
    return (f"{sum(choices.values())} launches tuned: "
            + ", ".join(f"{name} x{count}" for name, count in ranked))


if __name__ == "__main__":
    main()
