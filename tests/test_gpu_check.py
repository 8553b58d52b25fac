"""`make gpu-check` runs on the rare lent GPU, so a broken script costs device time we cannot get back: its
--cpu-smoke mode runs the same code paths (every correctness case kind, each base-GEMM arrangement, torch.compile, the
64-bit-offsets check and the per-kernel breakdown on tiny inputs, the native-dequantization cross-check on the CPU,
the layer table) through the Triton interpreter, here, on every CI run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_smoke(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", OUT=str(tmp_path), PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu-smoke", "--skip-model"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, check=False)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    assert "gpu-check PASSED" in out and "Phase A:" in out, out[-6000:]
    for case in ("odd-cublas-accumulate", "odd-fused", "dropout-cublas-accumulate"):
        assert case in out, f"case {case} not run\n{out[-4000:]}"
    assert "triton-cublas" in out, out[-4000:]  # the layer table ran the triton backend
    for check in ("offsets64-smoke", "breakdown-smoke", "compile", "dequant"):  # GPU-only checks, tiny inputs
        assert f"{check}  ok" in out, f"{check} did not pass\n{out[-4000:]}"
    assert (tmp_path / "gpu_check.json").exists()
