"""The native dequantization kernels (C++/OpenMP, CUDA) against the pure-PyTorch path, bit for bit, without
bitsandbytes.

tests/test_dequant.py proves both paths bit-exact against bitsandbytes where bitsandbytes is installed (CI's CPU).
The GPU image has no bitsandbytes, so there the CUDA kernels are judged against the PyTorch path on the same CUDA
tensors; that path is the one CI proves equal to bitsandbytes. Dequantization is defined for any bytes, so the
inputs are random packed weights and random (plain or nested) scales, not bitsandbytes' quantizer output: every
nibble value, odd element counts, partial last blocks, and an unaligned packed pointer (the kernels' scalar path).

Used by tests/test_dequant_crosscheck.py and by ``make gpu-check`` (plain functions; no pytest needed).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from vera_kernels.quant import dequant as D

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES_4BIT = [(1,), (2,), (63,), (4097,), (33, 70), (33, 80), (256, 1024), (5, 3, 48)]
BLOCKSIZES = (64, 128, 4096)
SHAPES_INT8 = [(1, 1), (33, 70), (17, 1000), (64, 4096), (2, 3, 40)]


def random_4bit(shape, blocksize, quant_type, nested, device, gen):
    """(packed uint8, a QuantState-like namespace) with random bytes and scales: every code, both nibbles."""
    n = math.prod(shape)
    n_blocks = -(-n // blocksize)
    packed = torch.randint(0, 256, ((n + 1) // 2, 1), generator=gen, dtype=torch.uint8)
    state = SimpleNamespace(shape=torch.Size(shape), blocksize=blocksize, quant_type=quant_type,
                            dtype=torch.bfloat16, nested=nested, offset=None, state2=None)
    if nested:
        bs2 = 256
        code2 = torch.sort(torch.rand(256, generator=gen) * 2 - 1).values  # a 256-entry dynamic map, like bnb's
        state.absmax = torch.randint(0, 256, (n_blocks,), generator=gen, dtype=torch.uint8).to(device)
        state.state2 = SimpleNamespace(absmax=(torch.rand(-(-n_blocks // bs2), generator=gen) * 3 + 0.1).to(device),
                                       code=code2.to(device), blocksize=bs2, dtype=torch.float32, nested=False)
        state.offset = (torch.rand((), generator=gen) * 2).to(device)
    else:
        state.absmax = (torch.rand(n_blocks, generator=gen) * 3 + 0.01).to(device)
    return packed.to(device), state


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float32 / float16 / bfloat16 tensor, as int32 / int16 (signed zeros and NaNs included)."""
    return t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def bit_mismatch(out, ref, what):
    """None when ``out`` and ``ref`` have the same dtype, shape and bits; else what differs, and where first.
    (Also what tests/test_dequant.py's bit-exactness assertions use.)"""
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return f"{what}: {tuple(out.shape)} {out.dtype} vs {tuple(ref.shape)} {ref.dtype}"
    o, r = bits(out), bits(ref)
    if not torch.equal(o, r):
        bad = (o != r).nonzero()
        i = tuple(bad[0].tolist())
        return f"{what}: {bad.shape[0]} of {o.numel()} differ; first at {i}: {out[i].item()!r} vs {ref[i].item()!r}"
    return None


def check_4bit(device: str, seed: int = 0) -> list[str]:
    """Mismatches (empty when the native 4-bit kernels equal the PyTorch path bit for bit on ``device``)."""
    gen = torch.Generator().manual_seed(seed)
    errors = []
    for quant_type in ("nf4", "fp4"):
        for nested in (False, True):
            for shape in SHAPES_4BIT:
                for bs in BLOCKSIZES:
                    packed, state = random_4bit(shape, bs, quant_type, nested, device, gen)
                    for dtype in DTYPES:
                        for neg in ((False, True) if quant_type == "fp4" else (False,)):
                            what = f"{device} {quant_type} nested={nested} {shape} bs={bs} {dtype} -0={neg}"
                            out = D.dequantize_4bit(packed, state, dtype, impl="native", negative_zero=neg)
                            ref = D.dequantize_4bit(packed, state, dtype, impl="torch", negative_zero=neg)
                            errors.append(bit_mismatch(out, ref, what))
                    if packed.numel() > 8:  # unaligned packed pointer: the kernels' scalar path
                        skew = torch.empty(packed.numel() + 1, dtype=torch.uint8, device=device)[1:].view_as(packed)
                        skew.copy_(packed)
                        out = D.dequantize_4bit(skew, state, torch.float32, impl="native", negative_zero=False)
                        ref = D.dequantize_4bit(packed, state, torch.float32, impl="torch", negative_zero=False)
                        errors.append(bit_mismatch(out, ref, f"{device} {quant_type} nested={nested} {shape} unaligned"))
    return [e for e in errors if e]


def check_int8(device: str, seed: int = 0) -> list[str]:
    """Mismatches of the native int8 row-wise kernels against the PyTorch path on ``device``."""
    gen = torch.Generator().manual_seed(seed)
    errors = []
    for shape in SHAPES_INT8:
        CB = torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8).to(device)
        SCB = (torch.rand(math.prod(shape[:-1]), generator=gen) * 10 + 0.01).to(device)
        for dtype in DTYPES:
            for mode in ("vectorwise", "matmul_fp"):
                out = D.dequantize_int8_rowwise(CB, SCB, dtype, mode=mode, impl="native")
                ref = D.dequantize_int8_rowwise(CB, SCB, dtype, mode=mode, impl="torch")
                errors.append(bit_mismatch(out, ref, f"{device} int8 {shape} {dtype} {mode}"))
    return [e for e in errors if e]


def count_cases() -> int:
    """Comparisons check_4bit + check_int8 make (the unaligned-pointer ones included)."""
    per_4bit = sum(len(DTYPES) * (2 if qt == "fp4" else 1) for qt in ("nf4", "fp4"))
    unaligned = sum(1 for shape in SHAPES_4BIT if (math.prod(shape) + 1) // 2 > 8)
    return (2 * len(BLOCKSIZES) * (len(SHAPES_4BIT) * per_4bit + 2 * unaligned)
            + len(SHAPES_INT8) * len(DTYPES) * 2)
