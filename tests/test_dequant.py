"""Bit-exactness of vera_kernels.quant.dequant against bitsandbytes (4-bit nf4/fp4 and int8 row-wise).

Both implementations are checked: the native extension (JIT-built once per session by the module fixture
``native``) and the pure-PyTorch fallback. Comparisons are on raw bits (int32/int16 views), no tolerance.

Inputs are random normal with a fresh seed per test: ``VK_TEST_SEED`` fixes the session's base seed (printed
on failure); each test adds a hash of its id.

bitsandbytes' reference is computed with torch.compile disabled (its device-generic kernel is wrapped in
``torch.compile(dynamic=False)``, which would recompile for every shape and cost seconds each; compiled and
eager give the same bits). For shapes where bitsandbytes 0.50.2's AVX-512 CPU kernel indexes absmax per row
(last dim a multiple of 16 but not of blocksize, more than one row) the reference is bitsandbytes' kernel on a
1-D view of the same data, i.e. the flat blocks its quantizer used (see ``test_bnb_avx512_row_quirk``).
"""

from __future__ import annotations

import copy
import math
import os
import random
import subprocess
import sys
import textwrap
import threading
import warnings
import zlib
from pathlib import Path

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

from dequant_crosscheck import bit_mismatch, bits  # noqa: E402
from vera_kernels.quant import _native  # noqa: E402
from vera_kernels.quant import dequant as D  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
_BASE_SEED = int(os.environ.get("VK_TEST_SEED", random.SystemRandom().randrange(2**31)))
_AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
HAS_CUDA = torch.cuda.is_available()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture
def seed(request):
    s = (_BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % (2**31)
    torch.manual_seed(s)
    return s


@pytest.fixture(scope="module")
def native():
    """Builds (JIT) or loads the native extension once for this module."""
    if _native._truthy(os.environ.get(_native.ENV_NO_NATIVE)):
        pytest.skip(f"{_native.ENV_NO_NATIVE} is set")
    status = D.native_status()
    assert _native.get_native() is not None, f"native extension failed to load: {status}"
    assert _native.native_supports("cpu"), status
    return status


def assert_bitexact(out: torch.Tensor, ref: torch.Tensor, what: str = ""):
    problem = bit_mismatch(out, ref, what)
    assert problem is None, f"{problem} (seed base {_BASE_SEED})"


def random_weights(shape, dtype):
    """Random normal values, plus a few tiny negatives (they quantize to fp4 code 0b1000, a signed zero)."""
    a = torch.randn(shape, dtype=torch.float32)
    flat = a.view(-1)
    if flat.numel() >= 8:
        idx = torch.randperm(flat.numel())[: max(1, flat.numel() // 50)]
        flat[idx] = -1e-4 * flat.abs().max()
    return a.to(dtype)


def with_dtype(qs, dtype):
    st = copy.copy(qs)
    st.dtype = dtype
    return st


def bnb_row_quirk(shape, blocksize) -> bool:
    """bitsandbytes 0.50.2's AVX-512 CPU dequantize_4bit indexes absmax per row: wrong for these shapes."""
    if not _AVX512 or len(shape) < 2 or blocksize >= 2048:
        return False
    rows = math.prod(shape[:-1])
    return rows > 1 and shape[-1] % 16 == 0 and shape[-1] % blocksize != 0


def bnb_dequant_4bit(q, qs, dtype):
    """bitsandbytes' own dequantize_4bit of (q, qs) in `dtype` (torch.compile disabled; flat blocks)."""
    st = with_dtype(qs, dtype)
    shape = tuple(qs.shape)
    with torch._dynamo.config.patch(disable=True):
        if q.device.type == "cpu" and bnb_row_quirk(shape, qs.blocksize):
            st.shape = torch.Size([math.prod(shape)])
            return F.dequantize_4bit(q, st).reshape(shape)
        ref = F.dequantize_4bit(q, st)
    if len(shape) == 1 and ref.dim() == 2:
        # bitsandbytes' CPU kernel returns (1, n) (or (n, 1) via its transpose shim) for an even 1-D shape;
        # its CUDA and generic kernels return (n,), as we do. Same values, same order.
        ref = ref.reshape(shape)
    return ref


def impls():
    return ("native", "torch")


# ------------------------------------------------------------------------------------------ code tables
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_code_tables_match_bnb(quant_type):
    ours = D.get_4bit_code(quant_type)
    ref = F.get_4bit_type(quant_type, device="cpu")
    assert torch.equal(bits(ours), bits(ref))
    neg = D.get_4bit_code(quant_type, negative_zero=True)
    if quant_type == "fp4":
        assert torch.signbit(neg[8]) and not torch.signbit(ours[8])
        assert torch.equal(neg, ours)  # equal values, only the sign bit of that zero differs
    else:
        assert torch.equal(bits(neg), bits(ours))


# ------------------------------------------------------------------------------------------ 4-bit
SHAPES = [(1,), (2,), (1, 2), (63,), (4097,), (33, 70), (64, 128), (5, 3, 48), (7, 96)]


@pytest.mark.parametrize("blocksize", [64, 128, 512, 4096])
@pytest.mark.parametrize("compress_statistics", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dequantize_4bit_bitexact(native, seed, shape, quant_type, compress_statistics, blocksize):
    in_dtype = DTYPES[seed % 3]
    A = random_weights(shape, in_dtype)
    q, qs = F.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type, compress_statistics=compress_statistics)
    for out_dtype in DTYPES:
        ref = bnb_dequant_4bit(q, qs, out_dtype)
        for impl in impls():
            out = D.dequantize_4bit(q, qs, out_dtype, impl=impl)
            assert_bitexact(out, ref, f"{impl} {quant_type} bs={blocksize} {in_dtype}->{out_dtype}")
    # default out dtype = quant_state.dtype, exactly bitsandbytes' call
    assert_bitexact(D.dequantize_4bit(q, qs), bnb_dequant_4bit(q, qs, qs.dtype), "default dtype")


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
def test_dequantize_4bit_all_blocksizes(native, seed, blocksize):
    A = random_weights((3, 4100), torch.bfloat16)
    for quant_type in ("nf4", "fp4"):
        for cs in (False, True):
            q, qs = F.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type, compress_statistics=cs)
            ref = bnb_dequant_4bit(q, qs, torch.bfloat16)
            for impl in impls():
                assert_bitexact(D.dequantize_4bit(q, qs, impl=impl), ref, f"{impl} {quant_type} cs={cs}")


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32, torch.int8])
def test_dequantize_4bit_quant_storage(native, seed, storage):
    A = random_weights((48, 64), torch.float16)
    q, qs = F.quantize_4bit(A, blocksize=64, quant_type="nf4", quant_storage=storage)
    assert q.dtype == storage
    ref = bnb_dequant_4bit(q, qs, torch.float16)
    for impl in impls():
        assert_bitexact(D.dequantize_4bit(q, qs, impl=impl), ref, impl)


def test_dequantize_4bit_extreme_scales(native, seed):
    """absmax over 1e-12..1e7: fp16 overflow to inf, fp16/bf16 subnormals; C++ casts == torch casts."""
    n = 64 * 400
    packed = torch.randint(0, 256, ((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = torch.exp(torch.empty(n // 64).uniform_(math.log(1e-12), math.log(1e7)))
    for quant_type in ("nf4", "fp4"):
        qs = F.QuantState(absmax=absmax, shape=torch.Size([n]), blocksize=64, quant_type=quant_type,
                          dtype=torch.float16, code=F.get_4bit_type(quant_type, device="cpu"))
        for dtype in DTYPES:
            ref = D.dequantize_4bit(packed, qs, dtype, impl="torch")
            assert_bitexact(D.dequantize_4bit(packed, qs, dtype, impl="native"), ref, f"{quant_type} {dtype}")
            assert_bitexact(D.dequantize_4bit(packed, qs, dtype), bnb_dequant_4bit(packed, qs, dtype), "bnb")
        assert torch.isinf(D.dequantize_4bit(packed, qs, torch.float16)).any()


def test_portable_scalar_kernel_matches(native, seed, monkeypatch):
    """VERA_KERNELS_NO_SIMD=1 forces the portable C++ path (the AVX-512 one is used where available)."""
    n = 64 * 300 + 37
    packed = torch.randint(0, 256, ((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = torch.exp(torch.empty((n + 63) // 64).uniform_(math.log(1e-12), math.log(1e7)))
    absmax[::17] = float("nan")
    absmax[::19] = float("inf")
    cases = []
    for quant_type in ("nf4", "fp4"):
        qs = F.QuantState(absmax=absmax, shape=torch.Size([n]), blocksize=64, quant_type=quant_type,
                          dtype=torch.float16, code=F.get_4bit_type(quant_type, device="cpu"))
        cases += [(qs, dtype) for dtype in DTYPES]
    A = random_weights((33, 70), torch.bfloat16)
    for cs in (False, True):
        q, qs = F.quantize_4bit(A, blocksize=128, quant_type="nf4", compress_statistics=cs)
        cases += [(qs, dtype) for dtype in DTYPES]
    results = []
    for qs, dtype in cases:
        src = packed if qs.shape[0] == n else q
        results.append(D.dequantize_4bit(src, qs, dtype, impl="native"))
    monkeypatch.setenv("VERA_KERNELS_NO_SIMD", "1")
    for (qs, dtype), simd in zip(cases, results):
        src = packed if qs.shape[0] == n else q
        scalar = D.dequantize_4bit(src, qs, dtype, impl="native")
        assert_bitexact(scalar, simd, f"scalar vs simd {dtype}")
        ref = D.dequantize_4bit(src, qs, dtype, impl="torch")
        ok = ~torch.isnan(ref)  # NaN payloads are not specified
        assert torch.isnan(scalar).eq(~ok).all()
        assert_bitexact(scalar[ok], ref[ok], f"scalar vs torch {dtype}")


def test_negative_zero_override(native, seed):
    A = random_weights((4, 70), torch.float32)
    q, qs = F.quantize_4bit(A, blocksize=64, quant_type="fp4")
    q.view(-1)[::5] = 0x88  # fp4 code 0b1000 in both nibbles
    assert_bitexact(D.dequantize_4bit(q, qs), bnb_dequant_4bit(q, qs, qs.dtype), "default follows bnb")
    for impl in impls():
        pos = D.dequantize_4bit(q, qs, impl=impl, negative_zero=False)
        neg = D.dequantize_4bit(q, qs, impl=impl, negative_zero=True)
        assert torch.equal(pos, neg)
        code8 = torch.stack((q.view(-1) >> 4, q.view(-1) & 15), -1).view(-1)[: A.numel()].view(A.shape) == 8
        assert code8.any()
        assert not torch.signbit(pos[code8]).any() and torch.signbit(neg[code8]).all()


@pytest.mark.skipif(not _AVX512, reason="bitsandbytes' AVX-512 CPU kernel not in use")
def test_bnb_avx512_row_quirk(native, seed):
    """Documents the bitsandbytes 0.50.2 CPU quirk the reference works around: for (33, 80) with blocksize 64
    its AVX-512 kernel does not invert its own quantize_4bit, while its device-generic kernel (and ours) do."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    A = random_weights((33, 80), torch.float32)
    q, qs = F.quantize_4bit(A, blocksize=64, quant_type="nf4")
    generic = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)(
        q.view(-1), qs.absmax, F.get_4bit_type("nf4", device="cpu"), 64, qs.shape, torch.float32
    )
    bnb_cpu = F.dequantize_4bit(q, qs)
    assert not torch.equal(bnb_cpu, generic)
    for impl in impls():
        assert_bitexact(D.dequantize_4bit(q, qs, impl=impl), generic, impl)


def test_dequantize_4bit_errors(native):
    A = torch.randn(64, 64)
    q, qs = F.quantize_4bit(A, blocksize=64, quant_type="nf4")
    ops = torch.ops.vera_kernels_quant
    code = D.get_4bit_code("nf4")
    with pytest.raises(RuntimeError, match="must be uint8"):
        ops.dequantize_4bit(q.view(torch.int8), qs.absmax, code, 64, [64, 64], torch.float32)
    with pytest.raises(RuntimeError, match="'absmax' has"):
        ops.dequantize_4bit(q, qs.absmax[:10], code, 64, [64, 64], torch.float32)
    with pytest.raises(RuntimeError, match="needs"):
        ops.dequantize_4bit(q[:10], qs.absmax, code, 64, [64, 64], torch.float32)
    with pytest.raises(RuntimeError, match="output dtype"):
        ops.dequantize_4bit(q, qs.absmax, code, 64, [64, 64], torch.float64)
    with pytest.raises(ValueError, match="out_dtype"):
        D.dequantize_4bit(q, qs, torch.int32)
    with pytest.raises(ValueError, match="impl"):
        D.dequantize_4bit(q, qs, impl="bogus")


# ------------------------------------------------------------------------------------------ int8
@pytest.mark.parametrize("shape", [(1, 1), (33, 70), (17, 1000), (2, 3, 40)], ids=lambda s: "x".join(map(str, s)))
def test_dequantize_int8_rowwise_bitexact(native, seed, shape):
    A = torch.randn(shape, dtype=torch.float16) * 3
    CB, SCB, _ = F.int8_vectorwise_quant(A.reshape(-1, shape[-1]))
    CB = CB.reshape(shape)
    vec = F.int8_vectorwise_dequant(CB.reshape(-1, shape[-1]), SCB).reshape(shape)  # bnb's dequant, float32
    for dtype in DTYPES:
        # MatMul8bitFp (CPU/XPU training path) literally:
        mm = CB.reshape(-1, shape[-1]).to(dtype).mul_(SCB.unsqueeze(1).mul(1.0 / 127.0)).reshape(shape)
        for impl in impls():
            out = D.dequantize_int8_rowwise(CB, SCB, dtype, impl=impl)
            assert_bitexact(out, vec.to(dtype), f"{impl} vectorwise {dtype}")
            out = D.dequantize_int8_rowwise(CB, SCB, dtype, mode="matmul_fp", impl=impl)
            assert_bitexact(out, mm, f"{impl} matmul_fp {dtype}")


def test_int8_modes_really_differ(native, seed):
    """The two multiplication orders are different functions (so testing both means something)."""
    CB = torch.arange(-127, 128, dtype=torch.int8).repeat(64, 1)
    SCB = torch.rand(64) * 10
    a = D.dequantize_int8_rowwise(CB, SCB, mode="vectorwise")
    b = D.dequantize_int8_rowwise(CB, SCB, mode="matmul_fp")
    assert not torch.equal(a, b)
    assert torch.allclose(a, b, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------ modules
def _linear4bit(quant_type, compress_statistics, weight_dtype, compute_dtype, n_out=96, n_in=192, blocksize=64):
    lin = bnb.nn.Linear4bit(n_in, n_out, bias=True, compute_dtype=compute_dtype,
                            compress_statistics=compress_statistics, quant_type=quant_type)
    lin.weight = bnb.nn.Params4bit(
        random_weights((n_out, n_in), weight_dtype), requires_grad=False, blocksize=blocksize,
        compress_statistics=compress_statistics, quant_type=quant_type, module=lin,
    )
    return lin.to("cpu")


def _bnb_dequant_packed_module(lin):
    """bitsandbytes' own pieces for a CPU-repacked weight: its inverse repacking of the nibbles, and its
    dequantize_4bit with the module's bf16 absmax in flat block order (bitsandbytes' inverse forgets to
    transpose it back for non-nested states, and re-quantizes it for nested ones)."""
    qs = lin.weight.quant_state
    q_std, _ = F._convert_weight_packed_for_cpu_inverse(lin.weight.data.clone(), copy.deepcopy(qs))
    st = F.QuantState(absmax=qs.absmax.t().contiguous().reshape(-1), shape=qs.shape, blocksize=qs.blocksize,
                      quant_type=qs.quant_type, dtype=qs.original_dtype, code=qs.code)
    return bnb_dequant_4bit(q_std, st, qs.original_dtype)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=["c_fp32", "c_bf16"])
@pytest.mark.parametrize("compress_statistics", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_weight_linear4bit(native, seed, quant_type, compress_statistics, compute_dtype):
    weight_dtype = compute_dtype
    lin = _linear4bit(quant_type, compress_statistics, weight_dtype, compute_dtype)
    qs = lin.weight.quant_state
    ref = bnb_dequant_4bit(lin.weight.data, qs, qs.dtype)
    for impl in impls():
        assert_bitexact(D.dequantize_weight(lin, impl=impl), ref, f"{impl} before forward")
        assert_bitexact(D.dequantize_weight(lin, torch.float32, impl=impl),
                        bnb_dequant_4bit(lin.weight.data, qs, torch.float32), f"{impl} fp32 out")
    dense_before = ref.float()

    lin.eval()
    with torch.no_grad():
        lin(torch.randn(3, 192, dtype=compute_dtype))
    repacked = getattr(lin.weight.quant_state, "packing_format_for_cpu", False)
    if bnb.functional.has_avx512bf16():
        assert repacked, "bitsandbytes did not repack the weight for CPU (its behaviour changed?)"
    if repacked:
        data_before = lin.weight.data.clone()
        ref = _bnb_dequant_packed_module(lin)
        for impl in impls():
            out = D.dequantize_weight(lin, impl=impl)
            assert_bitexact(out, ref, f"{impl} after CPU repacking")
            # the bf16 rounding of absmax is the only change: within bf16 precision of the original weight
            torch.testing.assert_close(out.float(), dense_before, rtol=2**-6, atol=0)
        assert torch.equal(lin.weight.data, data_before) and lin.weight.quant_state.packing_format_for_cpu
    else:
        for impl in impls():
            assert_bitexact(D.dequantize_weight(lin, impl=impl), bnb_dequant_4bit(lin.weight.data, qs, qs.dtype))


def test_unpack_cpu_packed_weight_roundtrip(native, seed):
    """Our un-packing inverts bitsandbytes' _convert_weight_packed_for_cpu on the nibbles, exactly."""
    A = random_weights((64, 256), torch.float32)
    q, qs = F.quantize_4bit(A, blocksize=64, quant_type="nf4", compress_statistics=True)
    packed, pqs = F._convert_weight_packed_for_cpu(q.clone(), copy.deepcopy(qs))
    q_std, st = D.unpack_cpu_packed_weight(packed, pqs)
    assert torch.equal(q_std, q)
    expected = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset  # bitsandbytes' nested absmax
    assert torch.equal(st.absmax, expected.to(torch.bfloat16).float())


@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16])
def test_dequantize_weight_linear8bitlt(native, seed, out_dtype):
    lin = bnb.nn.Linear8bitLt(96, 40, bias=True, has_fp16_weights=False)
    lin.weight = bnb.nn.Int8Params(torch.randn(40, 96) * 2, requires_grad=False, has_fp16_weights=False)
    lin = lin.to("cpu")
    assert lin.weight.dtype == torch.int8 and lin.weight.SCB is not None  # CB = weight.data, SCB on the weight
    CB, SCB = lin.weight.data, lin.weight.SCB
    dt = out_dtype or torch.float32
    ref = F.int8_vectorwise_dequant(CB, SCB).to(dt)
    for impl in impls():
        assert_bitexact(D.dequantize_weight(lin, out_dtype, impl=impl), ref, f"{impl} before forward")

    lin.eval()
    with torch.no_grad():
        lin(torch.randn(2, 96))
    assert lin.weight.SCB is None and lin.state.SCB is not None  # init_8bit_state moved SCB to module.state
    for impl in impls():
        assert_bitexact(D.dequantize_weight(lin, out_dtype, impl=impl), ref, f"{impl} after forward")

    # training-mode forward on CPU multiplies with MatMul8bitFp's weight: the same bits as mode="matmul_fp"
    lin.train()
    x = torch.randn(5, 96, dtype=dt)
    y = lin(x)
    for impl in impls():
        W = D.dequantize_weight(lin, dt, impl=impl, int8_mode="matmul_fp")
        assert_bitexact(torch.nn.functional.linear(x, W, lin.bias.to(dt)), y, f"{impl} matmul_fp forward")


def test_dequantize_weight_float_module(native):
    lin = torch.nn.Linear(8, 4)
    out = D.dequantize_weight(lin, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, lin.weight.detach().bfloat16())


# ------------------------------------------------------------------------------------------ torch.library
def test_opcheck(native, seed):
    A = random_weights((40, 64), torch.float32)
    q, qs = F.quantize_4bit(A, blocksize=64, quant_type="fp4", compress_statistics=True)
    ops = torch.ops.vera_kernels_quant
    code = D.get_4bit_code("fp4")
    s2 = qs.state2
    torch.library.opcheck(ops.dequantize_4bit.default,
                          (q, F.dequantize_blockwise(qs.absmax, s2), code, 64, [40, 64], torch.bfloat16))
    torch.library.opcheck(ops.dequantize_4bit_nested.default,
                          (q, qs.absmax, s2.absmax, s2.code, s2.blocksize, qs.offset, code, 64, [40, 64],
                           torch.float16))
    CB, SCB, _ = F.int8_vectorwise_quant(torch.randn(8, 24, dtype=torch.float16))
    for mode in (0, 1):
        torch.library.opcheck(ops.dequantize_int8_rowwise.default, (CB, SCB, mode, torch.float32))


def test_torch_compile_traces_native_ops(native, seed):
    A = random_weights((32, 64), torch.float32)
    q, qs = F.quantize_4bit(A, blocksize=64, quant_type="nf4")
    code = D.get_4bit_code("nf4")

    def f(q, absmax, code):
        return torch.ops.vera_kernels_quant.dequantize_4bit(q, absmax, code, 64, [32, 64], torch.bfloat16) * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert_bitexact(compiled(q, qs.absmax, code), f(q, qs.absmax, code), "compiled")


# ------------------------------------------------------------------------------------------ loader / fallback
@pytest.fixture
def fresh_loader(monkeypatch):
    saved = (_native._loaded, _native._module, _native._status, _native._warned)
    _native.reset_for_tests()
    yield monkeypatch
    _native._loaded, _native._module, _native._status, _native._warned = saved


def test_no_native_env_uses_fallback_and_warns_once(native, fresh_loader, seed):
    fresh_loader.setenv("VERA_KERNELS_NO_NATIVE", "1")
    calls = []
    real = D._dequant_4bit_torch
    fresh_loader.setattr(D, "_dequant_4bit_torch", lambda *a, **k: calls.append(1) or real(*a, **k))
    A = random_weights((16, 64), torch.float16)
    q, qs = F.quantize_4bit(A, blocksize=64, quant_type="nf4", compress_statistics=True)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        results = []
        threads = [threading.Thread(target=lambda: results.append(_native.get_native())) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out1 = D.dequantize_4bit(q, qs)
        out2 = D.dequantize_4bit(q, qs, impl="auto")
    got = [w for w in rec if issubclass(w.category, _native.NativeUnavailableWarning)]
    assert len(got) == 1, [str(w.message) for w in got]
    assert "VERA_KERNELS_NO_NATIVE" in str(got[0].message) and "fallback" in str(got[0].message)
    assert results == [None] * 4 and len(calls) == 2
    assert D.native_status().startswith("none:")
    assert_bitexact(out1, bnb_dequant_4bit(q, qs, qs.dtype))
    assert_bitexact(out2, out1)
    with pytest.raises(RuntimeError, match="unavailable"):
        D.dequantize_4bit(q, qs, impl="native")


def test_no_native_subprocess():
    """In a fresh process with VERA_KERNELS_NO_NATIVE=1: nothing built/imported, one warning, same bits."""
    code = textwrap.dedent(
        """
        import sys, warnings, torch
        warnings.simplefilter("always")
        import bitsandbytes.functional as F
        from vera_kernels.quant import dequant as D, _native
        torch.manual_seed(0)
        A = torch.randn(33, 70)
        q, qs = F.quantize_4bit(A, blocksize=64, quant_type="fp4", compress_statistics=True)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            a = D.dequantize_4bit(q, qs); b = D.dequantize_int8_rowwise(
                torch.ones(2, 3, dtype=torch.int8), torch.ones(2)); D.dequantize_4bit(q, qs)
        n = sum(issubclass(w.category, _native.NativeUnavailableWarning) for w in rec)
        ok = torch.equal(a.view(torch.int32), F.dequantize_4bit(q, qs).view(torch.int32))
        loaded = hasattr(torch.ops.vera_kernels_quant, "dequantize_4bit")
        print("RESULT", n, ok, loaded, D.native_status())
        """
    )
    env = dict(os.environ, VERA_KERNELS_NO_NATIVE="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and line, proc.stdout + proc.stderr
    _, n, ok, loaded, *status = line[0].split()
    assert (n, ok, loaded) == ("1", "True", "False"), line[0]
    assert " ".join(status).startswith("none: disabled")


def test_native_status_describes_build(native):
    assert native.startswith(("jit:", "prebuilt:", "loaded:")), native
    assert "cpu" in native


# ------------------------------------------------------------------------------------------ CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress_statistics", [False, True], ids=["plain", "nested"])
def test_cuda_dequantize_4bit_bitexact(native, seed, quant_type, compress_statistics):
    if not _native.native_supports("cuda"):
        pytest.skip(f"native extension has no CUDA kernels: {native}")
    for shape in [(1,), (2,), (63,), (4097,), (33, 70), (33, 80), (256, 1024), (5, 3, 48)]:
        for bs in (64, 128, 4096):
            A = random_weights(shape, torch.bfloat16).cuda()
            q, qs = F.quantize_4bit(A, blocksize=bs, quant_type=quant_type, compress_statistics=compress_statistics)
            for dtype in DTYPES:
                ref = bnb_dequant_4bit(q, qs, dtype)
                for impl in impls():
                    out = D.dequantize_4bit(q, qs, dtype, impl=impl)
                    assert_bitexact(out, ref, f"cuda {impl} {shape} bs={bs} {dtype}")
            # unaligned packed pointer (scalar path of the kernel)
            if q.numel() > 8:
                qq = torch.empty(q.numel() + 1, dtype=torch.uint8, device="cuda")[1:].view_as(q)
                qq.copy_(q)
                assert_bitexact(D.dequantize_4bit(qq, qs, impl="native"), D.dequantize_4bit(q, qs, impl="torch"))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_dequantize_int8_bitexact(native, seed):
    if not _native.native_supports("cuda"):
        pytest.skip(f"native extension has no CUDA kernels: {native}")
    for shape in [(1, 1), (33, 70), (17, 1000), (64, 4096)]:
        A = (torch.randn(shape, dtype=torch.float16) * 3).cuda()
        CB, SCB, _ = F.int8_vectorwise_quant(A)
        vec = F.int8_vectorwise_dequant(CB, SCB)
        for dtype in DTYPES:
            mm = CB.to(dtype).mul_(SCB.unsqueeze(1).mul(1.0 / 127.0))
            for impl in impls():
                assert_bitexact(D.dequantize_int8_rowwise(CB, SCB, dtype, impl=impl), vec.to(dtype), f"{impl}")
                assert_bitexact(D.dequantize_int8_rowwise(CB, SCB, dtype, mode="matmul_fp", impl=impl), mm, impl)


def test_stale_build_lock_is_cleared(tmp_path):
    """Without flock (Windows), torch's JIT build waits forever on a lock left by a killed build; one older than any
    build is removed (with a warning), a fresh one (a build in progress) is left alone."""
    import time

    lock = tmp_path / "lock"
    lock.write_text("")
    _native._clear_stale_lock(tmp_path)
    assert lock.exists()
    old = time.time() - _native.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with pytest.warns(UserWarning, match="stale build lock"):
        _native._clear_stale_lock(tmp_path)
    assert not lock.exists()
    _native._clear_stale_lock(tmp_path)  # no lock: nothing to do


def test_build_lock_removes_a_killed_builds_baton_and_waits_for_a_live_one(tmp_path):
    """A build killed midway leaves torch's baton (``lock``), on which torch waits forever; the flock our builds take
    first dies with its holder, so under it a baton of any age is removed. A live holder is waited for, then a
    TimeoutError (the caller falls back to Python) rather than a hang."""
    import subprocess
    import sys

    build_dir = tmp_path / "build"
    build_dir.mkdir()
    baton = build_dir / "lock"
    baton.write_text("")  # fresh: the age rule alone would have waited on it
    with pytest.warns(UserWarning, match="left by a killed build"):
        with _native.build_lock(build_dir):
            assert not baton.exists()
            baton.write_text("")  # torch's own baton, taken and released inside our lock
            baton.unlink()

    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('held', flush=True); time.sleep(120)", str(build_dir / "build.flock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TimeoutError, match="another process has been building"):
            with _native.build_lock(build_dir, wait_s=0.3):
                pass
        holder.kill()  # a killed holder releases the flock with it
        holder.wait(timeout=30)
        with _native.build_lock(build_dir, wait_s=30):
            pass
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_cuda_toolkit_found_behind_an_nvcc_wrapper(tmp_path, monkeypatch):
    """torch guesses CUDA_HOME as dirname(dirname(which nvcc)); for a wrapper script such as /usr/local/bin/nvcc
    that folder has no headers. The JIT build looks for a toolkit with nvcc AND cuda_runtime_api.h, following the
    wrapper to the toolkit it runs."""
    from torch.utils import cpp_extension

    toolkit = tmp_path / "cuda-99.0"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (toolkit / "include" / "cuda_runtime_api.h").write_text("")
    wrapper_dir = tmp_path / "wrapper" / "bin"
    wrapper_dir.mkdir(parents=True)
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec "{toolkit}/bin/nvcc" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", str(wrapper_dir))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path / "wrapper"))  # torch's guess: no headers there
    real = _native._is_toolkit  # only toolkits made here count (this machine may have a real one)
    monkeypatch.setattr(_native, "_is_toolkit", lambda home: str(home).startswith(str(tmp_path)) and real(home))
    assert _native._cuda_toolkit() == str(toolkit)
