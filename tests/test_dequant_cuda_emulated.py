"""The CUDA dequantization kernels' own code, run on the CPU over the whole launch grid, against the PyTorch path
bit for bit (no GPU needed).

csrc/dequant_cuda.cu writes each kernel as a __global__ shell around a __host__ __device__ function that does one
thread's work; csrc/dequant_cuda_emulate.cu runs those functions, with the launchers' own grid and vector-path
planning, for every (block, thread) on host memory. This test builds that file with nvcc (skipped where nvcc is
absent), routes ``impl="native"`` through it (the same argument preparation as csrc/ops.cpp's CUDA binding), and
runs tests/dequant_crosscheck.py's cases three ways: the real grid, a one-block grid (every thread loops: the
grid-stride path) and a misaligned output pointer (the scalar path). Outputs start as NaN, so an element no thread
writes fails. What stays for a GPU: shared memory, __ldg and the launch (``make gpu-check``).
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from vera_kernels.quant import _native
from vera_kernels.quant import dequant as D

from dequant_crosscheck import bit_mismatch, check_4bit, check_int8, random_4bit

CSRC = Path(__file__).resolve().parent.parent / "csrc"
OUT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
i64, ptr = ctypes.c_int64, ctypes.c_void_p


def _nvcc():
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: the CUDA kernels' host emulation needs it to compile them")
    release = re.search(r"release (\d+)\.", subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout)
    if release is None or int(release.group(1)) < 13:
        pytest.skip("the host emulation needs CUDA 13 headers (host versions of the fp16/bf16 intrinsics)")
    lib_path = tmp_path_factory.mktemp("cuda_emulator") / "libvk_dequant_emulate.so"
    # PTX only for the device side (no ptxas: the device code is not run here); -ffp-contract=off keeps the host
    # arithmetic to one rounding per operation, as __fmul_rn/__fadd_rn do on the GPU.
    cmd = [nvcc, "-std=c++17", "-O2", "-shared", "-Xcompiler", "-fPIC", "-Xcompiler", "-ffp-contract=off",
           "-gencode", "arch=compute_80,code=compute_80", f"-I{CSRC}", str(CSRC / "dequant_cuda_emulate.cu"),
           "-o", str(lib_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"building the emulator failed:\n{proc.stderr[-3000:]}"
    lib = ctypes.CDLL(str(lib_path))
    lib.vk_emulate_dequant_4bit.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ctypes.c_int, i64]
    lib.vk_emulate_dequant_4bit_nested.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, ctypes.c_int,
                                                   i64]
    lib.vk_emulate_dequant_int8_rowwise.argtypes = [ptr, ptr, i64, i64, ctypes.c_int, ptr, ctypes.c_int, i64]
    for fn in (lib.vk_emulate_dequant_4bit, lib.vk_emulate_dequant_4bit_nested, lib.vk_emulate_dequant_int8_rowwise):
        fn.restype = ctypes.c_int
    return lib


class EmulatedCudaOps:
    """Stands in for ``torch.ops.vera_kernels_quant`` with csrc/ops.cpp's CUDA binding's preparation (contiguous
    inputs, float32 tables) and the emulated kernels. ``max_blocks`` caps the grid (0: the launcher's own grid);
    ``skew_out`` hands the kernels an output pointer one element off 16-byte alignment."""

    def __init__(self, lib, max_blocks=0, skew_out=False):
        self.lib, self.max_blocks, self.skew_out = lib, max_blocks, skew_out
        self.calls = 0

    def _out(self, shape, dtype):
        n = math.prod(shape)
        buf = torch.full((n + int(self.skew_out),), float("nan"), dtype=dtype)  # unwritten elements fail
        return buf[int(self.skew_out):].view(shape)

    def _check(self, rc):
        assert rc == 0, f"emulated kernel returned cudaError {rc}"
        self.calls += 1

    def dequantize_4bit(self, packed, absmax, code, blocksize, shape, dtype):
        packed, absmax, code = packed.contiguous(), absmax.float().contiguous(), code.float().contiguous()
        out = self._out(shape, dtype)
        self._check(self.lib.vk_emulate_dequant_4bit(
            packed.data_ptr(), out.numel(), blocksize, code.data_ptr(), absmax.data_ptr(), out.data_ptr(),
            OUT_CODES[dtype], self.max_blocks))
        return out

    def dequantize_4bit_nested(self, packed, qabsmax, absmax2, code2, blocksize2, offset, code, blocksize, shape,
                               dtype):
        packed, qabsmax, offset = packed.contiguous(), qabsmax.contiguous(), offset.float().contiguous()
        absmax2, code2, code = absmax2.float().contiguous(), code2.float().contiguous(), code.float().contiguous()
        out = self._out(shape, dtype)
        self._check(self.lib.vk_emulate_dequant_4bit_nested(
            packed.data_ptr(), out.numel(), blocksize, code.data_ptr(), qabsmax.data_ptr(), absmax2.data_ptr(),
            code2.data_ptr(), blocksize2, offset.data_ptr(), out.data_ptr(), OUT_CODES[dtype], self.max_blocks))
        return out

    def dequantize_int8_rowwise(self, CB, SCB, mode, dtype):
        CB, SCB = CB.contiguous(), SCB.float().contiguous()
        out = self._out(tuple(CB.shape), dtype)
        rows = math.prod(CB.shape[:-1])
        self._check(self.lib.vk_emulate_dequant_int8_rowwise(
            CB.data_ptr(), SCB.data_ptr(), rows, CB.shape[-1], mode, out.data_ptr(), OUT_CODES[dtype],
            self.max_blocks))
        return out


def _route_native_to(monkeypatch, ops):
    monkeypatch.setattr(_native, "ops", lambda: ops)
    monkeypatch.setattr(_native, "native_supports", lambda device_type: device_type == "cpu")


LAUNCHES = {"launch_grid": dict(), "one_block": dict(max_blocks=1), "misaligned_out": dict(skew_out=True)}


@pytest.mark.parametrize("check", [check_4bit, check_int8], ids=["4bit", "int8"])
@pytest.mark.parametrize("launch", list(LAUNCHES))
def test_emulated_cuda_kernels_equal_torch_path(emulator, monkeypatch, check, launch):
    ops = EmulatedCudaOps(emulator, **LAUNCHES[launch])
    _route_native_to(monkeypatch, ops)
    errors = check("cpu", seed=3)
    assert ops.calls > 10, "the checks did not go through the emulated kernels"
    assert not errors, f"{len(errors)} mismatches, first: {errors[:3]}"


def test_emulation_detects_a_wrong_kernel(emulator, monkeypatch):
    """The comparison can fail: a code table with one entry changed by one ulp gives different bits, and a plan
    the kernel cannot run (odd blocksize) is refused with an error code rather than computed."""
    gen = torch.Generator().manual_seed(5)
    packed, state = random_4bit((33, 80), 64, "nf4", False, "cpu", gen)
    ops = EmulatedCudaOps(emulator)
    _route_native_to(monkeypatch, ops)
    ref = D.dequantize_4bit(packed, state, torch.float32, impl="torch")
    code = D.get_4bit_code("nf4", "cpu").clone()
    code[7] = torch.nextafter(code[7], torch.tensor(2.0))
    wrong = ops.dequantize_4bit(packed, state.absmax, code, 64, [33, 80], torch.float32)
    assert bit_mismatch(wrong, ref, "one-ulp code table") is not None
    out = torch.empty(10)
    rc = emulator.vk_emulate_dequant_4bit(packed.data_ptr(), 10, 63, code.data_ptr(), state.absmax.data_ptr(),
                                          out.data_ptr(), 0, 0)
    assert rc != 0
