"""The short table a GPU session prints last: its steps, its tests, its compile check, its
tuning and its benchmark.

    python scripts/gpu_summary.py OUT     # OUT: the folder scripts/gpu_session.sh wrote
    python scripts/gpu_summary.py OUT --tuning-dir CACHE/tuning --plot OUT/bench.png \\
        --step tests=passed:95s ...       # what gpu_session.sh runs at its end

With --tuning-dir it first folds the tuning files found there into OUT/tuning.json (one file);
with --plot it draws the benchmark's plot from whatever rows OUT/bench.csv holds (a failure to
draw is printed, never raised).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_gpu import add_ratios, read_rows, safe_plot, summary  # noqa: E402

CHECK = re.compile(r"^check: (\d+)/(\d+) kernels compiled for (\S+), (\d+) with spills, (\d+) "
                   r"without tensor cores")


def _last_line(path: Path) -> str:
    text = path.read_text() if path.exists() else ""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip("= ") if lines else "(nothing: the step did not run or timed out)"


def bench_csv(out: Path) -> Path | None:
    """The session's benchmark CSV: OUT/bench.csv, else the newest CSV in OUT."""
    if (out / "bench.csv").exists():
        return out / "bench.csv"
    paths = sorted(out.glob("*.csv"), key=lambda p: p.stat().st_mtime)
    return paths[-1] if paths else None


def bench_rows(out: Path) -> list[dict]:
    """The rows of the session's benchmark CSV (comment lines skipped), with the ratios."""
    path = bench_csv(out)
    if path is None:
        return []
    rows = read_rows(path)[1]
    add_ratios(rows)
    return rows


def checked(out: Path) -> str:
    """Every `spattn check` in OUT/check.txt, added up: kernels compiled, spills, tensor cores."""
    path = out / "check.txt"
    text = path.read_text() if path.exists() else ""
    found = [CHECK.match(line) for line in text.splitlines()]
    found = [m for m in found if m]
    if not found:
        return "(nothing: the step did not run or timed out)"
    ok, total, spills, plain = (sum(int(m[i]) for m in found) for i in (1, 2, 4, 5))
    targets = ", ".join(dict.fromkeys(m[3] for m in found))
    return (f"check: {ok}/{total} kernels compiled for {targets}, {spills} with spills, {plain} "
            f"without tensor cores ({len(found)} patterns)")


def plan_line(out: Path) -> str | None:
    path = out / "check.txt"
    lines = path.read_text().splitlines() if path.exists() else []
    return next((line for line in reversed(lines) if line.startswith("estimate: ")), None)


def fold_tuning(folder: Path, out: Path) -> None:
    """The tuning files of a cache folder as one OUT/tuning.json: {file name: its choices}."""
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if files:
        data = {}
        for path in files:
            try:
                data[path.name] = json.loads(path.read_text())
            except ValueError:
                continue
        (out / "tuning.json").write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def tuned(out: Path) -> str:
    """How many launches the benchmark's warm-up tuned, and to which configurations."""
    path = out / "tuning.json"
    try:
        files = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        files = {}
    choices: dict[str, int] = {}
    for table in files.values():
        for row in table.values():
            name = "{}x{} w{} s{}".format(*row)
            choices[name] = choices.get(name, 0) + 1
    if not choices:
        return "no launch tuned (no GPU, or SPATTN_TUNE=0)"
    ranked = sorted(choices.items(), key=lambda item: -item[1])
    return (f"{sum(choices.values())} launches tuned: "
            + ", ".join(f"{name} x{count}" for name, count in ranked))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--step", action="append", default=[], metavar="NAME=STATUS",
                        help="a step's outcome, printed first")
    parser.add_argument("--tuning-dir", type=Path, help="fold these tuning files into OUT")
    parser.add_argument("--plot", type=Path, help="draw the benchmark's plot here")
    args = parser.parse_args(argv)
    out = args.out
    if args.tuning_dir is not None:
        fold_tuning(args.tuning_dir, out)
    rows = bench_rows(out)
    if args.plot is not None and rows:
        comments = read_rows(bench_csv(out))[0]  # '# DEVICE, torch ..., triton ...'
        safe_plot(rows, args.plot, comments[0][2:].split(",")[0] if comments else "?")
    if args.step:
        print(f"steps:  {', '.join(args.step)}")
    print(f"tests:  {_last_line(out / 'tests.log')}")
    print(f"check:  {checked(out)}")
    plan = plan_line(out)
    if plan:
        print(f"plan:   {plan}")
    print(f"tuning: {tuned(out)}")
    print(summary(rows) if rows else "bench:  no CSV (the step did not run or timed out)")


if __name__ == "__main__":
    main()
