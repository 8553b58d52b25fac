"""Native dequantization kernels against the pure-PyTorch path, bit for bit, with no bitsandbytes (see
tests/dequant_crosscheck.py). On the CPU here; on CUDA wherever a GPU and the extension's CUDA kernels are present
(the GPU image, which lacks bitsandbytes: test_dequant.py skips there, this does not)."""

from __future__ import annotations

import os

import pytest
import torch

from vera_kernels.quant import _native

from dequant_crosscheck import check_4bit, check_int8, random_4bit

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def native_kernels():
    if _native._truthy(os.environ.get(_native.ENV_NO_NATIVE)):
        pytest.skip(f"{_native.ENV_NO_NATIVE} is set")
    assert _native.get_native() is not None, f"native extension failed to load: {_native.native_status()}"


def _require(device):
    if not _native.native_supports(device):
        pytest.skip(f"the native extension has no {device} kernels here: {_native.native_status()}")


@pytest.mark.parametrize("device", DEVICES)
def test_native_4bit_equals_torch_path(native_kernels, device):
    _require(device)
    errors = check_4bit(device, seed=1)
    assert not errors, f"{len(errors)} mismatches, first: {errors[:3]}"


@pytest.mark.parametrize("device", DEVICES)
def test_native_int8_equals_torch_path(native_kernels, device):
    _require(device)
    errors = check_int8(device, seed=2)
    assert not errors, f"{len(errors)} mismatches, first: {errors[:3]}"


def test_crosscheck_detects_a_wrong_scale(native_kernels):
    """The comparison can fail: one absmax changed by one ulp between the two paths is reported."""
    from vera_kernels.quant import dequant as D

    from dequant_crosscheck import bit_mismatch

    packed, state = random_4bit((33, 70), 64, "nf4", False, "cpu", torch.Generator().manual_seed(3))
    ref = D.dequantize_4bit(packed, state, torch.float32, impl="torch")
    state.absmax[5] = torch.nextafter(state.absmax[5], torch.tensor(10.0))
    out = D.dequantize_4bit(packed, state, torch.float32, impl="native")
    assert bit_mismatch(out, ref, "skewed") is not None
