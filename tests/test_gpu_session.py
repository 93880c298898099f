"""scripts/gpu_session.sh end to end on CPU (--dry-run): the same steps a GPU session runs, at
tiny sizes on the Triton interpreter, ending in its summary table."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_session_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_session.sh"), "--dry-run"],
                          capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = done.stdout.split("== summary")[-1].strip().splitlines()
    assert summary[0].startswith("tests:") and " passed" in summary[0]
    assert "failed" not in summary[0]
    assert summary[1].startswith("check:  check: ") and "kernels compiled for sm_90" in summary[1]
    assert summary[2].startswith("tuning: no launch tuned")  # the interpreter does not tune
    assert "spattn ms" in summary[3] and any("longnet-lm" in line for line in summary[4:])
    assert list(tmp_path.glob("*.csv")) and (tmp_path / "gpu_session_check.txt").exists()
