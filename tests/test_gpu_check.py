"""`make gpu-check` runs on the rare lent GPU, so a broken script costs device time we cannot get back: its
--cpu-smoke mode runs the same code paths (every correctness case kind, each base-GEMM arrangement, torch.compile, the
64-bit-offsets check and the per-kernel breakdown on tiny inputs, the native-dequantization cross-check on the CPU,
the layer table) through the Triton interpreter, here, on every CI run."""

from __future__ import annotations

import importlib.util
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
    for check in ("offsets64-smoke", "breakdown-smoke", "compile", "cuda-graph-dropout-smoke",
                  "checkpoint-dropout-smoke", "dequant", "mixed-bench-smoke"):  # GPU-only checks, tiny inputs
        assert f"{check}  ok" in out, f"{check} did not pass\n{out[-4000:]}"
    # the dequantization speed table against bitsandbytes (where it imports; carried to the GPU by `make gpu-carry`)
    assert "Dequantization vs bitsandbytes" in out, out[-4000:]
    if importlib.util.find_spec("bitsandbytes") is not None:
        rows = [line for line in out.splitlines() if line.split()[:1] in (["nf4"], ["nf4-nested"], ["fp4"], ["int8"])]
        assert rows and all(line.endswith(" yes") for line in rows), out[-4000:]  # bit-exact column
    assert (tmp_path / "gpu_check.json").exists()


def test_gpu_carry_copies_a_working_trimmed_bitsandbytes(tmp_path):
    """`make gpu-carry`'s copy imports and quantizes from its own folder, and leaves out the other CUDA libraries."""
    pytest.importorskip("bitsandbytes")
    dest = tmp_path / "site"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_carry.py"), "--dest", str(dest)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    libs = sorted(p.name for p in (dest / "bitsandbytes").glob("*.so"))
    assert "libbitsandbytes_cpu.so" in libs and all("cuda1" not in n or "cuda13" in n for n in libs), libs
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import torch, bitsandbytes, bitsandbytes.functional as F; "
             "assert bitsandbytes.__file__.startswith(sys.argv[1]), bitsandbytes.__file__; "
             "q, s = F.quantize_4bit(torch.randn(64, 64), blocksize=64, quant_type='nf4'); "
             "print(F.dequantize_4bit(q, s).shape)")
    res = subprocess.run([sys.executable, "-c", probe, str(dest)], capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0 and "torch.Size([64, 64])" in res.stdout, res.stdout + res.stderr[-3000:]
