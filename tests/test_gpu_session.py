"""scripts/gpu_session.sh end to end on CPU (--rehearse): the same steps a GPU session runs, at
tiny sizes on the Triton interpreter, its time plan checked, ending in its summary; and a
failing correctness test stopping it before any timing."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SESSION_FILES = {"session.log", "tests.log", "check.txt", "bench.csv", "bench.png",
                 "tuning.json", "summary.txt"}


def rehearse(out: Path, **env: str) -> subprocess.CompletedProcess:
    """The rehearsal with this Python, results in `out`, the environment's additions."""
    full = {**os.environ, "OUT": str(out), "REHEARSE_PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_session.sh"), "--rehearse"],
                          capture_output=True, text=True, env=full, timeout=1200, cwd=ROOT)


def summary_lines(stdout: str) -> list[str]:
    return stdout.split("== summary")[-1].strip().splitlines()[1:]  # after '(at N s)'


def assert_files_fit(out: Path) -> None:
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    assert {p.name for p in files} <= SESSION_FILES, files
    assert all(p.parent == out for p in files), files  # no cache under OUT


def test_rehearsal_runs_every_step_and_brings_back_at_most_8_files(tmp_path):
    out = tmp_path / "out"
    done = rehearse(out, GPU_SESSION_PATTERNS="sliding-window",
                    GPU_SESSION_TESTS="tests/test_triton_kernels.py::test_odd_sizes[n1-causal] "
                                      "tests/test_gpu_kernels.py")
    # the plan's verdict depends on this machine's compile speed: scripts/test_triton36.sh
    # gates on it; here only its report is checked
    assert done.returncode in (0, 1), done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0 or "plan: DOES NOT FIT" in done.stdout, done.stdout[-3000:]
    assert_files_fit(out)
    assert "files in" in done.stdout and "of at most 8" in done.stdout

    summary = summary_lines(done.stdout)
    assert summary[0].startswith("steps:") and "tests=ok" in summary[0]
    assert all(f"{step}=ok" in summary[0] for step in ("headline", "flex", "others"))
    assert summary[1].startswith("tests:") and " passed" in summary[1]
    assert "failed" not in summary[1]
    assert summary[2].startswith("check:  check: ") and "kernels compiled for sm_90" in summary[2]
    assert summary[3].startswith("plan:   estimate: the deadlines add up to")
    assert summary[4].startswith("tuning: no launch tuned")  # the interpreter does not tune
    assert "spattn ms" in summary[5]
    assert any("longnet-lm" in line for line in summary[6:])
    assert any("sliding-window" in line for line in summary[6:])
    written = (out / "summary.txt").read_text().splitlines()
    assert written == summary[:len(written)]

    # the plan: every kernel of the benchmarked patterns compiled and counted, deadlines summed
    check = (out / "check.txt").read_text()
    assert "# longnet-lm:" in check and "# sliding-window:" in check
    assert "headline" in check and "kernel builds" in check and "plan: " in check

    lines = [line for line in (out / "bench.csv").read_text().splitlines()
             if not line.startswith("#")]
    rows = list(csv.DictReader(lines))
    spattn = [r for r in rows if r["method"] == "spattn" and r["status"] == "ok"]
    assert {(r["pattern"].split("-div")[0], r["pass"]) for r in spattn} == {
        (p, q) for p in ("longnet-lm", "sliding-window") for q in ("fwd", "fwd+bwd")}
    assert all(float(r["ms"]) > 0 and r["check_error"] for r in spattn)
    assert any(r["method"] == "flex" and r["status"] == "ok" for r in rows)
    longnet = [r for r in spattn if r["pattern"].startswith("longnet-lm")]
    assert all(r["vs_sdpa"] and r["vs_gather"] for r in longnet)  # ratios over all three steps
    assert any(r["vs_flex"] for r in longnet)
    assert (out / "session.log").read_text().count("== ") >= 5


def test_a_failing_correctness_test_stops_the_session_before_any_timing(tmp_path):
    planted = tmp_path / "test_planted.py"
    planted.write_text("def test_a_kernel_is_wrong():\n    assert 1 + 1 == 3, 'planted'\n\n\n"
                       "def test_another_is_right():\n    assert True\n")
    out = tmp_path / "out"
    done = rehearse(out, GPU_SESSION_TESTS=str(planted))
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "tests FAILED" in done.stdout
    assert "FAILED" in done.stdout and "test_a_kernel_is_wrong" in done.stdout
    assert "== headline" not in done.stdout and "== plan" not in done.stdout
    assert not (out / "bench.csv").exists()
    summary = summary_lines(done.stdout)
    assert summary[0].startswith("steps:") and "timings=skipped" in summary[0]
    assert summary[1].startswith("tests:") and "1 failed, 1 passed" in summary[1]
    assert "bench:  no CSV" in done.stdout
    assert_files_fit(out)
    assert (out / "tests.log").exists() and (out / "summary.txt").exists()
