"""The GPU session's time plan, checked without a GPU: `spattn check` compiles (for the GPU's
target) every kernel the session's benchmark will build, and the sum of their compile times
says whether each benchmark step's deadline holds them.

    python scripts/gpu_plan.py --check-file OUT/check.txt --deadline setup=20 --deadline \\
        tests=140 --deadline headline=90 --step headline=longnet-lm ... [--no-gate]

scripts/gpu_session.sh runs it: in --rehearse (CPU, CI) it gates (exit 1 when the plan does not
fit), on the GPU machine it runs in the background beside the benchmark, for the record.

The estimate, per benchmark step, is the sum over the kernels it will build of each kernel's
compile time as `spattn check` measured it (its table's `s` column), times the number of launch
configurations the GPU's warm-up tunes for it (spattn/runtime/tuning.py compiles each one the
committed table lists: spattn.runtime.configs.candidates), plus an allowance for what is not
compiling (imports, the float64 reference, the timed calls). Scaling assumption: `spattn check`
compiles in 2 worker processes here, but each kernel's own compile time is what it measures, and
the benchmark compiles in ONE process, one kernel after another (triton's JIT), so the GPU
machine's 16 cores do not shorten that sum: it is taken as it is, one core there counted as fast
as one core here (on this shared 2-core machine a compile only looks slower, so the estimate errs
long). Only the tests step (pytest-xdist over 16 workers) uses the 16 cores, and it is not
estimated here: it has a deadline of its own. FlexAttention's compile (inductor) is not measured
either: the flex step's estimate is an assumed constant (FLEX_COMPILE_S).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

TIMED_MODES = ("fwd", "bwd")  # the benchmark decodes nothing: decode kernels are not built
FLEX_COMPILE_S = 35.0  # assumed: flex_attention compiled at the check's N, then fwd and bwd at
# the timed cell (dynamic=False), ~10 s each on a GPU machine's core
HEADER = re.compile(r"^# (?P<name>\S+): (?P<kernels>\d+) kernels\b.*?"
                    r"(?:(?P<compiling>[\d.]+) s of compiling )?in (?P<took>[\d.]+) s "
                    r"\((?P<workers>\d+) process")


@dataclass
class Checked:
    """One pattern's `spattn check`: its kernels, their compile seconds, the tuned configs."""

    name: str
    ok: bool
    took: float = 0.0
    kernels: list[tuple[str, str, float]] = field(default_factory=list)  # kernel, mode, s
    configs: list[int] = field(default_factory=list)  # launch configurations tuned per kernel
    line: str = ""

    @property
    def compile_s(self) -> float:
        """Seconds the benchmark will spend compiling this pattern's kernels."""
        return sum(s * c for (_, mode, s), c in zip(self.kernels, self.configs, strict=True)
                   if mode in TIMED_MODES)

    @property
    def built(self) -> int:
        return sum(c for (_, mode, _s), c in zip(self.kernels, self.configs, strict=True)
                   if mode in TIMED_MODES)


def parse_check(name: str, text: str, stderr_line: str | None = None) -> Checked:
    """The kernels of `spattn check`'s table (columns found by the header's names), each with its
    compile seconds (the `s` column; else the pattern's compile time shared evenly)."""
    lines = text.splitlines()
    head = next((i for i, line in enumerate(lines) if line.split()[:2] == ["kernel", "mode"]),
                None)
    summary = next((line for line in lines if line.startswith("# ")), stderr_line or "")
    match = HEADER.match(summary)
    checked = Checked(name, ok=head is not None and match is not None, line=summary)
    if head is None or match is None:
        return checked
    columns = lines[head].split()
    rows = []
    for line in lines[head + 1:]:
        if line.startswith(("#", "check:")) or not line.strip():
            break
        cells = line.split()
        rows.append(dict(zip(columns, cells, strict=False)))
    took = float(match["took"])
    total = float(match["compiling"] or took * int(match["workers"]))
    even = total / max(1, len(rows))
    for row in rows:
        seconds = _float(row.get("s"))
        checked.kernels.append((row["kernel"], row["mode"], even if seconds is None else seconds))
    checked.took = took
    return checked


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def tuned_configs(checked: Checked, target: str, dtype: str, head_dim: int) -> list[int]:
    """How many launch configurations the GPU's tuning compiles for each checked kernel."""
    import torch

    from spattn.compiler.aot import DTYPES, TARGETS
    from spattn.runtime import configs

    with configs.recording(TARGETS[target]):
        return [len(configs.candidates(kernel, mode, torch.device("meta"), DTYPES[dtype],
                                       head_dim)) for kernel, mode, _ in checked.kernels]


def run_check(pattern: str, target: str, dtype: str, head_dim: int, timeout: float) -> tuple[
        str, int]:
    """`spattn check PATTERN` (this Python): its table and lines, and its exit status."""
    command = [sys.executable, "-m", "spattn.cli.main", "check", pattern, "--target", target,
               "--dtype", dtype, "--head-dim", str(head_dim)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"# {pattern}: spattn check timed out after {timeout:.0f} s\n", 124
    # the table, then the '# NAME: K kernels ...' line (stderr), then the 'check:' line
    table = [line for line in done.stdout.splitlines() if not line.startswith("check:")]
    last = [line for line in done.stdout.splitlines() if line.startswith("check:")]
    notes = [line for line in done.stderr.splitlines() if line.startswith("# ")]
    errors = [line for line in done.stderr.splitlines() if line and not line.startswith("# ")]
    return "\n".join([*table, *notes, *errors[-5:], *last]) + "\n", done.returncode


def _pairs(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, _, value = item.partition("=")
        pairs[key] = value
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check-file", type=Path, required=True, help="the checks' output")
    parser.add_argument("--target", default="sm_90")
    parser.add_argument("--dtype", default="bf16", help="the benchmark's dtype (short name)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--budget", type=float, default=420.0, help="the whole run's seconds")
    parser.add_argument("--deadline", action="append", default=[], metavar="STEP=S",
                        help="each step's deadline, in the order the session runs them")
    parser.add_argument("--step", action="append", default=[], metavar="STEP=P1,P2",
                        help="a benchmark step and the spattn patterns it times")
    parser.add_argument("--flex-step", default=None, help="the step that times FlexAttention")
    parser.add_argument("--allowance", action="append", default=[], metavar="STEP=S",
                        help="a benchmark step's seconds for what is not compiling (default 30)")
    parser.add_argument("--check-timeout", type=float, default=300.0)
    parser.add_argument("--no-gate", action="store_true", help="report only; exit 0 if it ran")
    args = parser.parse_args(argv)
    deadlines = {k: float(v) for k, v in _pairs(args.deadline).items()}
    steps = {k: [p for p in v.split(",") if p] for k, v in _pairs(args.step).items()}
    allowances = {k: float(v) for k, v in _pairs(args.allowance).items()}

    checked: dict[str, Checked] = {}
    status = 0
    with open(args.check_file, "a") as out:
        for pattern in dict.fromkeys(p for patterns in steps.values() for p in patterns):
            text, rc = run_check(pattern, args.target, args.dtype, args.head_dim,
                                 args.check_timeout)
            out.write(text)
            out.flush()
            one = parse_check(pattern, text)
            if rc != 0 or not one.ok:
                status = 1
                print(f"spattn check {pattern} failed (exit {rc}):", file=sys.stderr)
                print(text[-2000:], file=sys.stderr)
            if one.ok:
                one.configs = tuned_configs(one, args.target, args.dtype, args.head_dim)
            checked[pattern] = one
            print(f"{one.line or '# ' + pattern + ': no result'}", flush=True)
        report, fits = plan(deadlines, steps, allowances, checked, args)
        out.write(report + "\n")
    print(report)
    if args.no_gate:
        return status
    return status or (0 if fits else 1)


def plan(deadlines: dict[str, float], steps: dict[str, list[str]], allowances: dict[str, float],
         checked: dict[str, Checked], args: argparse.Namespace) -> tuple[str, bool]:
    """The plan's table and whether it fits: the deadlines within the budget, each benchmark
    step's compile estimate plus its allowance within its deadline."""
    lines = [f"plan for the GPU session ({args.target}, {args.dtype}, head dim {args.head_dim}): "
             "step deadlines, and each benchmark step's estimated compile time"]
    fits, compiling, expected = True, 0.0, 0.0
    for step, deadline in deadlines.items():
        expected += deadline
        note = ""
        estimate = None
        if step in steps:
            parts = [checked[p] for p in steps[step] if p in checked]
            estimate = sum(c.compile_s for c in parts)
            note = "; ".join(f"{c.name}: {c.built} kernel builds, {c.compile_s:.0f} s"
                             for c in parts)
        elif step == args.flex_step:
            estimate, note = FLEX_COMPILE_S, "FlexAttention's compile, assumed"
        if estimate is not None:
            allowance = allowances.get(step, 30.0)
            ok = estimate + allowance <= deadline
            fits = fits and ok
            compiling += estimate
            expected += estimate + allowance - deadline
            note = (f"compile ~{estimate:.0f} s + {allowance:.0f} s for the rest: "
                    f"{'fits' if ok else 'DOES NOT FIT'} ({note})")
        lines.append(f"  {step:<10} {deadline:5.0f} s  {note}".rstrip())
    total = sum(deadlines.values())
    within = total <= args.budget
    fits = fits and within
    lines.append(f"estimate: the deadlines add up to {total:.0f} s of the {args.budget:.0f} s "
                 f"budget ({'fits' if within else 'OVER BUDGET'}); the benchmark's compiling "
                 f"~{compiling:.0f} s of it (serial, as measured here); expected run "
                 f"~{expected:.0f} s (the benchmark steps at their estimates, the others at "
                 f"their deadlines)")
    lines.append("plan: fits" if fits else "plan: DOES NOT FIT")
    return "\n".join(lines), fits


if __name__ == "__main__":
    sys.exit(main())
