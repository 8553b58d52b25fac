"""bench/host_overhead.py runs (Triton's real launch path on CPU tensors, no GPU) and the launch budget holds.

The host time itself is a benchmark number, not asserted here (this machine is shared and noisy). What is asserted
is deterministic: how many device kernels one adapted layer's forward+backward issues. Triton launches cost the
host several times a torch op (see the tool's docstring), so a change that adds one must show up here on purpose.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parent.parent
# What one adapted layer's forward+backward issues (x requiring grad, a dense upstream gradient), per backend.
# torch: forward F.linear's mm, the down mm (x A_s^T), the fold of R (outer, *B_s), h R^T into the base output;
#        backward: the fold again, g R, G = g^T h, G * B_s, two mv (dlambda_b, dlambda_d), the down mm's grad_h A_s,
#        the base's g W, the sum of x's two gradient contributions, and three gradient accumulations (x, lambdas)
TORCH_ATEN_KERNELS = 18
# triton: the same forward; backward cuBLAS's G = g^T h, the partials' column sum, grad_h A_s, g W, the x-gradient
#         sum, three accumulations; the fold of diag(lambda_b) B_s with dlambda_b and the down kernel (grad_h,
#         dlambda_d partials) are the two Triton launches
TRITON_LAUNCHES = 2
TRITON_ATEN_KERNELS = 13


def _run_tool(tmp_path, *args) -> dict:
    """bench/host_overhead.py with ``args`` (Triton's compiled launch path, not the interpreter): its JSON."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "host.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "host_overhead.py"), *args, "--json", str(out)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, check=False)
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
    return json.loads(out.read_text())


def test_host_overhead_tool_and_launch_budget(tmp_path):
    rows = {r["impl"]: r for r in _run_tool(tmp_path, "--repeats", "5")["rows"]}
    assert set(rows) == {"base", "peft", "reference", "torch", "triton"}, rows
    assert all(r["us"] > 0 for r in rows.values())
    assert rows["triton"]["triton_launches"] == TRITON_LAUNCHES, rows["triton"]
    assert rows["triton"]["aten_kernels"] == TRITON_ATEN_KERNELS, rows["triton"]
    assert rows["torch"]["aten_kernels"] == TORCH_ATEN_KERNELS, rows["torch"]
    assert all(rows[i]["triton_launches"] == 0 for i in ("base", "peft", "reference", "torch"))
    # the reference backend is PEFT's math: the same kernels
    assert rows["reference"]["aten_kernels"] == rows["peft"]["aten_kernels"], rows


# With adapter dropout (training): the triton backend's down node is the fused-mask kernel, one launch forward
# (h = drop(x) A_s^T) and one backward (grad_x = drop(grad_h A_s) in the up kernel's epilogue), in place of the
# forward's mm and backward's grad_h A_s; the aten side loses the down mm's two GEMMs and gains the seed draw.
TRITON_DROPOUT_LAUNCHES = 4
TRITON_DROPOUT_ATEN_KERNELS = 12
# torch: the 18 above, the seed draw, and the seed read by the C++ down node's fused CPU dropout pass, once forward,
# once backward (csrc/vera_up.cpp dropout_apply: no aten op, where the Python mask runs ~40 int64 ops per pass; on
# CUDA the node runs those in aten, from C++)
TORCH_DROPOUT_ATEN_KERNELS = TORCH_ATEN_KERNELS + 3


def test_host_overhead_with_dropout_and_its_launch_budget(tmp_path):
    data = _run_tool(tmp_path, "--repeats", "3", "--dropout", "0.1", "--impls", "peft,torch,triton")
    assert "dropout 0.1" in data["header"]
    rows = {r["impl"]: r for r in data["rows"]}
    assert rows["triton"]["triton_launches"] == TRITON_DROPOUT_LAUNCHES, rows["triton"]
    assert rows["triton"]["aten_kernels"] == TRITON_DROPOUT_ATEN_KERNELS, rows["triton"]
    assert rows["torch"]["aten_kernels"] == TORCH_DROPOUT_ATEN_KERNELS, rows["torch"]
    # PEFT's nn.Dropout is there: more kernels than without dropout
    assert rows["peft"]["aten_kernels"] > 19 and rows["peft"]["triton_launches"] == 0, rows["peft"]


def test_host_overhead_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "host_overhead.py"), "--repeats", "1"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, check=False)
    assert res.returncode != 0 and "TRITON_INTERPRET" in res.stderr, res.stdout + res.stderr


def test_torch_dropout_cpu_benchmark_runs():
    """bench/torch_dropout_cpu.py (the torch backend's CPU dropout, C++ against its Python mask) on a tiny layer."""
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "torch_dropout_cpu.py"), "--tokens", "40",
                          "--in-features", "37", "--out-features", "29", "--r", "5", "--repeats", "2"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
    rows = [line.split() for line in res.stdout.splitlines() if "x PEFT" in line]
    assert [r[0] for r in rows] == ["peft", "torch", "torch"] and all(float(r[-1]) > 0 for r in rows), res.stdout
