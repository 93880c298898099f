"""`spattn check`: every kernel a launcher would launch, compiled ahead of time for a GPU target
with triton's ptxas (no GPU needed); what is recorded, the table's last line, one-line errors."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
import torch

from spattn.cli.main import main
from spattn.compiler import aot
from spattn.patterns.loader import load_pattern_text
from spattn.runtime import configs, generated

SMALL = """\
name: small-check
causal: true
branches:
  - {segment: 256, dilation: 2}
  - {window: {size: 128}}
"""

EVERY_KIND = """\
name: every-kind
causal: true
branches:
  - {segment: 256, dilation: 2}
  - {window: {size: 128}}
  - {global: {tokens: [0, 5]}}
  - {strided: {stride: 64}}
  - {random: {block: 64, blocks: 2, seed: 1}}
  - {dense: {}}
"""

LAST = re.compile(r"check: (\d+)/(\d+) kernels compiled for sm_90, (\d+) with spills, "
                  r"(\d+) without tensor cores")


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as stop:  # argparse's own errors
        return int(stop.code)


def _specs(text: str, target: str = "sm_90", dtypes=("fp16",), head_dims=(64,)):
    pattern = load_pattern_text(text)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "checked.py"
        module = aot.load_module(aot.render(pattern, "checked"), path)
        return aot.specializations(pattern, module, target, dtypes, head_dims)


def test_records_forward_backward_and_decode_of_every_branch_kind():
    specs = _specs(EVERY_KIND)
    seen = {(s.kernel, s.mode) for s in specs}
    for kind in ("dilated", "window", "global", "random"):
        assert {(f"_{kind}_rows", "fwd"), (f"_{kind}_rows", "bwd"),
                (f"_{kind}_cols", "bwd")} <= seen, kind
    assert ("_decode_rows", "decode") in seen
    # one kernel per (kernel, mode, STRIDED): every branch of a kind shares it, sizes are
    # run-time arguments (dense is a dilated branch; strided its own STRIDED=True kernel)
    kernels = [(s.kernel, s.mode, s.constexprs.get("STRIDED")) for s in specs]
    assert len(kernels) == len(set(kernels)) == 16, kernels
    assert all(not {"SEGMENT", "DILATION", "WINDOW", "BLOCK", "BRANCH", "GLOBAL_QUERIES"}
               & set(s.constexprs) for s in specs)
    strided = [s for s in specs if s.constexprs.get("STRIDED")]
    assert {s.mode for s in strided} == {"fwd", "bwd"} and len(strided) == 3
    # launches served: dilated + dense rows forward 2; global rows twice a pass
    launches = {(s.kernel, s.mode, s.constexprs.get("STRIDED")): s.launches for s in specs}
    assert launches[("_dilated_rows", "fwd", False)] == 2
    assert launches[("_global_rows", "fwd", None)] == 2
    assert launches[("_global_cols", "bwd", None)] == 2
    # the table's configurations for sm_90, though this process runs the interpreter
    for s in specs:
        with configs.recording(90):
            want = configs.launch_config(s.kernel, s.mode, torch.device("meta"),
                                         aot.DTYPES[s.dtype], s.head_dim)
        assert {k: s.constexprs[k] for k in want.kwargs()} == want.kwargs(), s.kernel
    # outside the recording: the interpreter's tiles
    assert generated.launch_config("dilated_rows", "fwd", torch.device("cpu"), torch.float16,
                                   64) == configs.INTERPRETED


def test_duplicate_launches_are_one_specialization():
    specs = _specs(SMALL, dtypes=("fp16", "fp16"), head_dims=(64, 64))
    assert len(specs) == 7  # 2 kinds x (rows fwd, rows bwd, cols) + decode
    assert [s.launches for s in specs] == [4] * 7  # fp16 and 64 given twice each


def test_a_second_pattern_of_the_same_kinds_needs_no_other_kernel():
    """Branch sizes are run-time arguments: patterns whose branches differ only in sizes, count
    and offsets make the same specializations (triton compiles each once)."""
    other = SMALL.replace("small-check", "other").replace(
        "segment: 256, dilation: 2}", "segment: 512, dilation: 4}\n  - {segment: 4096, "
        "dilation: 1}\n  - {segment: 2048, dilation: 8, offsets: [1, 2, 3, 4, 5, 6, 7, 0]}"
    ).replace("size: 128", "size: 7")
    def keys(text: str) -> list[tuple[str, ...]]:
        pattern = load_pattern_text(text)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "checked.py"
            module = aot.load_module(aot.render(pattern, "checked"), path)
            backend = aot._backend(90)
            return [aot.specialization_key(module, backend, spec) for spec in
                    aot.specializations(pattern, module, "sm_90", ("fp16",), (64,))]

    assert keys(other) == keys(SMALL)


def test_check_compiles_every_kernel_for_sm_90(tmp_path, capsys):
    path = tmp_path / "small.yaml"
    path.write_text(SMALL)
    status = main(["check", str(path), "--target", "sm_90", "--dtype", "fp16",
                   "--head-dim", "64"])
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert status == 0, out
    last = LAST.fullmatch(lines[-1])
    assert last and last[1] == last[2] == "7" and last[4] == "0", lines[-1]
    rows = [line.split() for line in lines[1:-1]]
    assert len(rows) == 7
    header = lines[0].split()
    for row in rows:
        assert row[header.index("status")] == "ok"
        # fp16 on Hopper: warpgroup MMA for tiles of 64 rows and more, else mma.sync
        assert row[header.index("tc")] in ("wgmma", "mma")
        assert int(row[header.index("regs")]) <= 255 and int(row[header.index("smem")]) > 0
    assert {row[header.index("mode")] for row in rows} == {"fwd", "bwd", "decode"}
    assert any(row[header.index("tc")] == "wgmma" for row in rows)


def test_fp16_on_sm_80_uses_mma():
    specs = [s for s in _specs(SMALL, target="sm_80") if s.kernel == "_window_rows"
             and s.mode == "fwd"]
    pattern = load_pattern_text(SMALL)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "checked.py"
        aot.load_module(aot.render(pattern, "checked"), path)
        (result,) = aot.compile_specs(specs, path, "sm_80")
    assert result.ok and result.tensor_core == "mma", result


def test_float32_window_backward_fits_sm_80_registers():
    """The table's configuration for bigbird's window rows backward (float32, head dim 128, its
    union predicate compiled in) on sm_80: the kernel that spilled at 255 registers with one
    pipeline stage fits with two."""
    from spattn.patterns.loader import load_pattern

    pattern = load_pattern("bigbird")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bigbird.py"
        module = aot.load_module(aot.render(pattern, "bigbird"), path)
        specs = [s for s in aot.specializations(pattern, module, "sm_80", ("fp32",), (128,))
                 if s.kernel == "_window_rows" and s.mode == "bwd"]
        assert specs
        results = aot.compile_specs(specs, path, "sm_80")
    for spec, result in zip(specs, results, strict=True):
        assert result.ok and result.spills == 0 and result.tensor_core == "mma", (spec, result)


@pytest.mark.parametrize("argv", [
    ["--target", "sm_75"],
    ["--target", "sm_90", "--dtype", "fp8"],
    ["--target", "sm_90", "--head-dim", "0"],
    ["--target", "sm_90", "--head-dim", "4096"],
    [],
])
def test_bad_arguments_are_one_line_and_exit_2(argv, tmp_path, capsys):
    path = tmp_path / "small.yaml"
    path.write_text(SMALL)
    assert _exit_code(["check", str(path), *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("spattn: error: "), err


def test_unknown_pattern_is_one_line(capsys):
    assert _exit_code(["check", "no-such-pattern", "--target", "sm_90"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
