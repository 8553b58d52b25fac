"""Every Triton kernel compiles for sm_80 and sm_90, fits the card's shared memory, and does not spill on sm_90.

The interpreter tests (test_triton.py) check what the kernels compute; they never lower a kernel to a GPU. These
tests compile every launch the backend makes at GPU shapes, with Triton's own LLVM and ptxas and no GPU
(tests/triton_compile_check.py), under the installed triton and under the GPU image's triton (3.6), whose code
generator once rejected a kernel the interpreter and triton 3.9 accepted.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
# minutes on a 2-core CPU (two triton versions, every kernel for two architectures): CI runs them (`make test`),
# `make test-fast` does not
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "triton_compile_check.py"
TRITON_MODULE = ROOT / "vera_kernels" / "ops" / "vera_triton.py"
GPU_IMAGE_TRITON = "3.6.0"  # the lent H100s' image (torch 2.11, triton 3.6): see bench/results/


def _run(tmp_path, *args, triton_version=None):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    version = ["--triton", triton_version] if triton_version else []
    out = tmp_path / "rows.json"
    res = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out), *version, *args], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=900, check=False)
    rows = json.loads(out.read_text()) if out.exists() else None
    return res, rows


def _launched_kernels() -> set[str]:
    """Every @triton.jit kernel defined in the backend module (helpers called from kernels excluded)."""
    return set(re.findall(r"@triton\.jit[^\n]*\ndef (_\w+_kernel)\(", TRITON_MODULE.read_text()))


@pytest.mark.parametrize("triton_version", [None, GPU_IMAGE_TRITON], ids=["installed", f"triton-{GPU_IMAGE_TRITON}"])
def test_every_kernel_compiles_fits_and_does_not_spill(tmp_path, triton_version):
    # the installed triton for sm_80 and sm_90; the GPU image's triton for the GPU it runs on (sm_90: H100/H200),
    # which keeps CI's time in bounds (the two compile every kernel configuration: minutes on 2 cores)
    archs = ("80", "90") if triton_version is None else ("90",)
    res, rows = _run(tmp_path, "--arch", ",".join(archs), "--fail-on-spills", "90", triton_version=triton_version)
    report = res.stdout[-6000:] + res.stderr[-3000:]
    assert res.returncode == 0, report
    if triton_version:
        assert rows["triton"] == triton_version, report
    assert all(isinstance(r.get("regs"), int) and r["regs"] > 0 for r in rows["rows"]), report  # usage was read
    compiled = {r["kernel"] for r in rows["rows"] if r["ok"]}
    assert compiled == _launched_kernels(), f"kernels never launched by the check: {_launched_kernels() - compiled}"
    for arch in (f"sm_{a}" for a in archs):
        # the goal shapes' bf16 configurations are among those compiled for every target
        assert any(r["arch"] == arch and r["config"].startswith("bf16 M=128 N=128") for r in rows["rows"]), report


def _broken_copy(tmp_path, old: str, new: str) -> Path:
    src = TRITON_MODULE.read_text()
    assert old in src, f"the test's anchor {old!r} is gone from vera_triton.py"
    path = tmp_path / "vera_triton_broken.py"
    path.write_text(src.replace(old, new, 1))
    return path


def test_check_fails_on_a_kernel_that_does_not_compile(tmp_path):
    # a non-power-of-two block: the code generator rejects it
    anchor = "cols = r0 + tl.arange(0, BLOCK_R)"
    path = _broken_copy(tmp_path, anchor, anchor.replace("BLOCK_R)", "BLOCK_R + 1)"))
    res, rows = _run(tmp_path, "--module", str(path), "--arch", "90", "--dtypes", "bf16",
                     "--kernels", "_scale_projection_kernel")
    assert res.returncode == 1, res.stdout + res.stderr
    assert rows["rows"] and not any(r["ok"] for r in rows["rows"])
    assert "FAIL" in res.stdout
    assert all("CompilationError" in r["error"] and "power of 2" in r["error"] for r in rows["rows"]), rows


def test_check_fails_on_a_config_over_the_shared_memory_limit(tmp_path):
    # 4 stages of a 128 x 256 x 256 bf16 tile pair need ~512 KiB of shared memory: no card has that
    path = _broken_copy(tmp_path, "return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=4)",
                        "return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=256, num_warps=8, num_stages=4)")
    res, rows = _run(tmp_path, "--module", str(path), "--arch", "90", "--dtypes", "bf16",
                     "--kernels", "_vera_down_kernel")
    assert res.returncode == 1, res.stdout + res.stderr
    assert any("shared memory" in r.get("error", "") for r in rows["rows"]), res.stdout
