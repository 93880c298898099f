"""The benchmark scripts end to end on CPU, at tiny sizes: each checks its methods, times them
and writes its CSV (benchmarks/bench_gpu.py's GPU sweep runs the same code as its CPU check);
and the hand-written peers against the float64 reference."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_bench(script: str, tmp_path: Path, *args: str) -> str:
    """Run benchmarks/`script` with `args`, its results in tmp_path; its standard output."""
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args, "--results",
                           str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def csv_rows(path: Path) -> tuple[str, list[dict]]:
    """A results CSV: its first (comment) line and its rows."""
    lines = path.read_text().splitlines()
    return lines[0], list(csv.DictReader(line for line in lines if not line.startswith("#")))


def test_cpu_check_runs_end_to_end(tmp_path):
    out = run_bench("bench_gpu.py", tmp_path, "--cpu-check", "--seq-lens", "256", "--patterns",
                    "longnet-lm", "sink-window", "--methods", "spattn", "sdpa", "gather",
                    "--repeats", "1")
    [path] = tmp_path.glob("harness_*.csv")
    first, rows = csv_rows(path)
    assert first.startswith("# CPU") and "torch" in first and "triton" in first
    spattn_rows = [r for r in rows if r["method"] == "spattn"]
    assert {r["pass"] for r in spattn_rows} == {"fwd", "fwd+bwd"}
    for row in rows:
        if row["check_error"]:  # every method against the reference, before timing
            assert float(row["check_error"]) < 1e-4, row
    assert all(float(r["check_error_triton"]) < 2e-4 for r in spattn_rows if
               r["check_error_triton"])
    lnet = [r for r in spattn_rows if r["pattern"].startswith("longnet-lm")]
    assert all(r["status"] == "ok" and float(r["ms"]) > 0 and r["vs_sdpa"] and r["vs_gather"]
               for r in lnet)
    gather_sink = [r for r in rows if r["method"] == "gather" and "sink" in r["pattern"]]
    assert gather_sink and all(r["status"].startswith("n/a") for r in gather_sink)
    assert "vs X = X's time / spattn's" in out


def test_cpu_peers_runs_end_to_end_and_says_which_peers_compute_the_pattern(tmp_path):
    out = run_bench("bench_cpu_peers.py", tmp_path, "--seq-lens", "512", "--cases",
                    "longnet-lm/16", "dense-causal", "sliding-window/8", "--peers", "dense SDPA",
                    "masked SDPA", "gather", "window blocks", "--repeats", "1")
    first, rows = csv_rows(tmp_path / "cpu_peers.csv")
    assert first.startswith("# ") and "threads" in first
    same = {(r["case"], r["pass"], r["method"]): r["same"] for r in rows}
    # gather and masked SDPA (log 2 where two branches give a pair) compute longnet-lm
    # exactly, dense SDPA does not; all three compute dense-causal
    assert same["longnet-lm/16", "fwd", "gather"] == "yes"
    assert same["longnet-lm/16", "fwd", "masked SDPA"] == "yes"
    assert same["dense-causal", "fwd+bwd", "masked SDPA"] == "yes"
    assert same["longnet-lm/16", "fwd", "dense SDPA"] == "no"
    assert same["dense-causal", "fwd+bwd", "dense SDPA"] == "yes"
    assert same["sliding-window/8", "fwd+bwd", "window blocks"] == "yes"  # W = 512: one block
    assert same["longnet-lm/16", "fwd", "window blocks"] == "not one causal window"
    assert all(float(r["ms"]) > 0 for r in rows if r["ms"])
    assert (tmp_path / "cpu_peers.png").stat().st_size > 0
    assert "spattn time / peer time" in out


def test_cpu_sharing_times_each_way_of_planning(tmp_path):
    run_bench("bench_cpu_sharing.py", tmp_path, "--seq-lens", "256", "--cases", "longnet-lm",
              "--repeats", "1")
    _, rows = csv_rows(tmp_path / "cpu_sharing.csv")
    assert [(r["pass"], r["chains"]) for r in rows] == [("fwd", "((0, 1, 2), (3, 4))"),
                                                        ("fwd+bwd", "((0, 1, 2), (3, 4))")]
    assert all(float(r[f"{way}_ms"]) > 0 for r in rows for way in ("never", "always", "model"))


def test_cpu_scale_run_times_every_length_and_its_memory(tmp_path):
    run_bench("bench_cpu_longnet.py", tmp_path, "--scale", "--heads", "1", "--seq-lens", "1024",
              "4096", "--repeats", "1")
    _, rows = csv_rows(tmp_path / "cpu_longnet_scale.csv")
    assert [(r["method"], int(r["seq_len"])) for r in rows] == [("spattn", 1024), ("spattn", 4096)]
    # memory grows with N, measured in each length's own process from its own start
    assert 0 < float(rows[0]["peak_mb"]) < float(rows[1]["peak_mb"])
    assert all(float(r["us_per_token"]) > 0 for r in rows)
    assert (tmp_path / "cpu_longnet_scale.png").stat().st_size > 0


def test_cpu_shapes_times_spattn_and_both_longnet_peers_at_every_shape(tmp_path):
    out = run_bench("bench_cpu_shapes.py", tmp_path, "--seq-len", "512", "--cases",
                    "longnet-lm", "--repeats", "1")
    _, rows = csv_rows(tmp_path / "cpu_shapes.csv")
    shapes = {(r["batch"], r["heads"], r["kv_heads"], r["head_dim"], r["dtype"]) for r in rows}
    assert len(shapes) == 5 and ("1", "8", "2", "64", "float32") in shapes
    assert {(r["pass"], r["method"]) for r in rows} == {
        (p, m) for p in ("fwd", "fwd+bwd") for m in ("spattn", "gather", "strided")}
    assert all(float(r["ms"]) > 0 for r in rows)
    assert "| longnet-lm | fwd+bwd | 2 | 4/4 | 64 | float32 |" in out


def test_hand_written_peers_compute_the_pattern():
    """The two ways of writing LongNet's method (index lists, strided views) against the float64
    reference: odd lengths, GQA, a last short segment; their LSE is float32, hence 1e-5. Window
    blocks too (several blocks, a last short one), forward and backward."""
    import torch
    from reference import reference_attention

    sys.path.insert(0, str(BENCHMARKS))
    import peers

    import spattn
    from spattn.patterns.report import scale_pattern

    for name in ("longnet-lm", "longnet-geometric", "longvit", "dense-causal"):
        pattern = scale_pattern(spattn.load_pattern(name), 64)
        for n, heads, kv_heads in ((100, 4, 4), (257, 4, 2), (64, 2, 1)):
            q = torch.randn(2, heads, n, 8, dtype=torch.float64)
            k, v = (torch.randn(2, kv_heads, n, 8, dtype=torch.float64) for _ in range(2))
            want = reference_attention(q, k, v, pattern)
            for method in (peers.gather_sdpa_scatter, peers.strided_sdpa_scatter):
                torch.testing.assert_close(method(pattern)(q, k, v), want, rtol=0, atol=1e-5)
    window = scale_pattern(spattn.load_pattern("sliding-window"), 128)  # W = 32
    for n, heads, kv_heads in ((100, 4, 4), (32, 2, 2), (257, 4, 2), (20, 2, 1)):
        q = torch.randn(2, heads, n, 8, dtype=torch.float64, requires_grad=True)
        k, v = (torch.randn(2, kv_heads, n, 8, dtype=torch.float64, requires_grad=True)
                for _ in range(2))
        got, want = peers.window_blocks(window)(q, k, v), reference_attention(q, k, v, window)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
        grad = torch.randn_like(got)
        for g, w in zip(torch.autograd.grad(got, (q, k, v), grad),
                        torch.autograd.grad(want, (q, k, v), grad), strict=True):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)
