"""Dequantization of bitsandbytes weights (4-bit nf4/fp4 and LLM.int8 row-wise), bit-exact with bitsandbytes.

Public API::

    dequantize_4bit(packed, quant_state, out_dtype=None, *, impl=None, negative_zero=None) -> Tensor
    dequantize_int8_rowwise(CB, SCB, out_dtype=torch.float32, *, mode="vectorwise", impl=None) -> Tensor
    dequantize_weight(module, out_dtype=None, *, impl=None, int8_mode="vectorwise") -> Tensor
    unpack_cpu_packed_weight(packed, quant_state) -> (packed_std, QuantState-like namespace)
    native_status() -> str

``impl`` selects the backend: ``"native"`` (C++/OpenMP or CUDA extension, error if unavailable), ``"torch"``
(pure-PyTorch, vectorised, works on any device) or ``"auto"`` (native when loaded and it has a kernel for the
tensor's device, else torch). ``None`` means ``$VERA_KERNELS_DEQUANT_IMPL`` or ``"auto"``. Both backends give
the same bits; nothing is compiled or loaded before the first call (see :mod:`._native`).

Bit-exact arithmetic (bitsandbytes 0.50.2: ``functional.dequantize_4bit``, ``backends/cpu/ops.py``,
``backends/default/ops.py``, the CUDA kernel ``kDequantizeBlockwise``):

4-bit (``n = prod(quant_state.shape)`` elements, packed two per byte, ``(n + 1) // 2`` bytes):
  * element ``i`` is the HIGH nibble of byte ``i // 2`` when ``i`` is even, the LOW nibble when odd
    (``quantize_4bit`` packs ``(q[2j] << 4) | q[2j+1]`` and pads an odd count with a zero nibble);
  * the code table is bitsandbytes' ``get_4bit_type(quant_type)``: 16 float32 values (nf4 as listed, fp4
    ``[0, .0625, 8, 12, 4, 6, 2, 3, 0, -.0625, ...] / 12`` computed in float32). ``quant_state.code`` is
    ignored, as bitsandbytes' ``dequantize_4bit`` does. Only the sign of fp4 code 0b1000's zero depends on
    bitsandbytes' kernel (``-0.0`` from its CUDA and scalar CPU kernels, ``+0.0`` from its AVX-512 CPU and
    generic ones); by default it is reproduced per device/shape (:func:`bnb_fp4_negative_zero`);
  * blocks are FLAT over the ``n`` elements: element ``i`` uses ``absmax[i // blocksize]`` (the last block
    may be partial);
  * ``out[i] = cast(fl32(code[q_i] * absmax[i // blocksize]))``: one float32 product, then a single
    round-to-nearest-even cast to the output dtype (for fp32 no cast). Never multiplied in fp16/bf16;
  * absmax that is not float32 is first converted with ``.float()``;
  * nested (``compress_statistics=True``): ``absmax = dequantize_blockwise(quant_state.absmax,
    quant_state.state2)`` then ``absmax += quant_state.offset`` (in ``state2.dtype``, normally float32) then
    ``.float()``; with float32 this is ``absmax[b] = fl32(fl32(code2[qabsmax[b]] * absmax2[b // bs2]) +
    offset)``, ``code2`` = ``state2.code`` (256 entries), ``bs2`` = ``state2.blocksize`` (256);
  * output shape: ``quant_state.shape``; like bitsandbytes, when ``packed.shape[0] == 1`` (its old transposed
    layout, also hit by 1- or 2-element tensors) the result is returned transposed (``.t()``, <= 2-D).
    (bitsandbytes' CPU kernel returns ``(1, n)`` for an even 1-D shape ``(n,)``; its CUDA and generic
    kernels, and this module, return ``(n,)``.)
  * ``out_dtype`` defaults to ``quant_state.dtype``; another dtype gives ``cast(fl32(...))`` directly, i.e.
    bitsandbytes' result for a QuantState whose ``dtype`` is ``out_dtype``.

int8 row-wise (``Linear8bitLt`` / ``Int8Params``: ``CB`` int8 ``(out, in)``, ``SCB`` float32 ``(out,)``,
``C = float32(1/127) = 7.874015718698502e-3``):
  * ``mode="vectorwise"`` (``bitsandbytes.functional.int8_vectorwise_dequant``, ``A * stats.view(-1, 1) *
    7.874015718698502e-3``): ``out = cast(fl32(fl32(CB * SCB[row]) * C))``;
  * ``mode="matmul_fp"`` (what the CPU/XPU training path ``MatMul8bitFp`` multiplies with:
    ``CB.to(dt).mul_(SCB.unsqueeze(1).mul(1.0 / 127.0))``): ``out = cast(fl32(CB * fl32(SCB[row] * C)))``.
  The two orders differ in the last bit for some entries; ``vectorwise`` is the default.

bitsandbytes 0.50.2 quirks this module does NOT reproduce (it reproduces what bitsandbytes means, which is also
what its CUDA kernel and its device-generic default kernel compute):
  * its CPU ``dequantize_4bit`` AVX-512 kernel (used when the last dim is a multiple of 16 and blocksize < 2048
    on AVX-512 machines) indexes absmax per ROW (``row * (ncols // blocksize) + col // blocksize``), which is
    wrong for 2-D+ shapes whose last dim is not a multiple of blocksize (e.g. (33, 80) with blocksize 64):
    it then does not invert bitsandbytes' own ``quantize_4bit``. For every other shape the results agree.
  * ``_convert_weight_packed_for_cpu_inverse`` leaves a non-nested absmax in its transposed (K/bs, N) order,
    so bitsandbytes' own dequantization of an un-packed CPU weight is scrambled; see
    :func:`unpack_cpu_packed_weight`.
NaN payloads may differ (no NaN arises from finite inputs).
"""

from __future__ import annotations

import math
import os
import types
from typing import Optional

import torch

from . import _native

__all__ = [
    "dequantize_4bit",
    "dequantize_int8_rowwise",
    "dequantize_weight",
    "unpack_cpu_packed_weight",
    "get_4bit_code",
    "bnb_fp4_negative_zero",
    "native_status",
]

ENV_IMPL = "VERA_KERNELS_DEQUANT_IMPL"
INT8_INV_127 = 7.874015718698502e-3  # == float32(1 / 127), the constant bitsandbytes multiplies with
_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT8_MODES = {"vectorwise": 0, "matmul_fp": 1}
# Bounds the pure-PyTorch fallback's temporaries (int64 indices): elements per chunk (a multiple of blocksize).
_TORCH_CHUNK = 1 << 22

_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]
_FP4 = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]
_code_cache: dict = {}


def native_status() -> str:
    """What the native backend is: ``prebuilt: ...``, ``jit: <build dir> [...]`` or ``none: <reason>``.

    Triggers the (lazy) load."""
    return _native.native_status(load=True)


def get_4bit_code(quant_type: str, device="cpu", negative_zero: bool = False) -> torch.Tensor:
    """The 16-entry float32 code table of bitsandbytes' ``get_4bit_type(quant_type)`` (same construction).

    ``negative_zero=True`` (fp4 only) makes entry 8 (sign bit set, magnitude 0) ``-0.0`` instead of ``+0.0``:
    that is what bitsandbytes' CUDA kernel and its scalar CPU kernel compute (``lut[v & 7] * sign``), while its
    Python table, its AVX-512 CPU kernel and its device-generic kernel use ``+0.0``."""
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    device = torch.device(device)
    negative_zero = bool(negative_zero) and quant_type == "fp4"
    key = (quant_type, device, negative_zero)
    code = _code_cache.get(key)
    if code is None:
        data = torch.tensor(_NF4 if quant_type == "nf4" else _FP4, dtype=torch.float32)
        data.div_(data.abs().max())
        if negative_zero:
            data[8] = -0.0
        code = data.to(device)
        _code_cache[key] = code
    return code


def _bnb_native_cpu_lib() -> bool:
    """Whether bitsandbytes' CPU library is in use (assumed when bitsandbytes is not imported yet)."""
    import sys

    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return True
    try:
        from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib

        return not isinstance(lib, ErrorHandlerMockBNBNativeLibrary)
    except Exception:
        return True


def bnb_fp4_negative_zero(device, shape, blocksize: int) -> bool:
    """Sign of zero bitsandbytes 0.50.2 gives fp4 code 0b1000 for this device/shape (True: ``-0.0``).

    CUDA: always ``-0.0``. CPU: ``-0.0`` exactly when bitsandbytes' ``dequantize_4bit`` CPU kernel takes its
    scalar branch: native library present, even last dim (1-D shapes count as ``(1, n)``), not (AVX-512 and
    blocksize >= 2048, which use the device-generic torch code) and not its AVX-512 branch (AVX-512 CPU, last
    dim a multiple of 16, blocksize >= 16). Otherwise ``+0.0``. Values are equal either way; only the sign bit
    of that zero differs."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return True
    if dev.type != "cpu":
        return False
    last = int(shape[-1]) if len(shape) else 1
    if last % 2:
        return False
    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    if avx512 and blocksize >= 2048:
        return False
    if not _bnb_native_cpu_lib():
        return False
    if avx512 and last % 16 == 0 and blocksize >= 16:
        return False
    return True


# --------------------------------------------------------------------------------------------- helpers
def _resolve_impl(impl: Optional[str]) -> str:
    impl = (impl or os.environ.get(ENV_IMPL) or "auto").lower()
    if impl not in ("auto", "native", "torch"):
        raise ValueError(f"impl must be 'auto', 'native' or 'torch', got {impl!r}")
    return impl


def _use_native(impl: str, device: torch.device) -> bool:
    if impl == "torch":
        return False
    ok = _native.native_supports(device.type)
    if impl == "native" and not ok:
        raise RuntimeError(
            f"native dequantization requested for a {device.type} tensor but it is unavailable: "
            f"{_native.native_status(load=False)}"
        )
    return ok


def _check_out_dtype(dtype) -> torch.dtype:
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
    return dtype


def _as_uint8(packed: torch.Tensor) -> torch.Tensor:
    if packed.dtype == torch.uint8:
        return packed
    return packed.contiguous().view(torch.uint8)


def _offset_tensor(offset, device) -> torch.Tensor:
    if isinstance(offset, torch.Tensor):
        return offset.to(device=device)
    return torch.tensor(float(offset), dtype=torch.float32, device=device)


def _dequant_blockwise_torch(A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, dtype):
    """bitsandbytes' 8-bit ``dequantize_blockwise`` arithmetic: cast(fl32(code[A[i]] * absmax[i // blocksize]))."""
    flat = A.reshape(-1)
    n = flat.numel()
    vals = code.to(device=flat.device, dtype=torch.float32)[flat.long()]
    scale = absmax.to(device=flat.device, dtype=torch.float32)
    out = _scale_blocks(vals, scale, blocksize, n)
    return out.reshape(A.shape).to(dtype)


def _scale_blocks(vals: torch.Tensor, absmax: torch.Tensor, blocksize: int, n: int) -> torch.Tensor:
    """fl32(vals[i] * absmax[i // blocksize]) for a flat float32 ``vals`` of n elements starting at a block."""
    full = (n // blocksize) * blocksize
    out = torch.empty(n, dtype=torch.float32, device=vals.device)
    if full:
        out[:full] = (vals[:full].view(-1, blocksize) * absmax[: full // blocksize].view(-1, 1)).reshape(-1)
    if n > full:
        out[full:] = vals[full:] * absmax[full // blocksize]
    return out


def _resolve_absmax_torch(quant_state) -> torch.Tensor:
    """Plain float32 absmax of a QuantState, computed exactly as bitsandbytes' dequantize_4bit does."""
    absmax = quant_state.absmax
    if getattr(quant_state, "nested", False):
        s2 = quant_state.state2
        absmax2 = _resolve_absmax_torch(s2) if getattr(s2, "nested", False) else s2.absmax
        absmax = _dequant_blockwise_torch(quant_state.absmax, absmax2, s2.code, s2.blocksize, s2.dtype)
        absmax += _offset_tensor(quant_state.offset, absmax.device)
    if absmax.dtype != torch.float32:
        absmax = absmax.float()
    return absmax


def _dequant_4bit_torch(A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, shape, dtype):
    """Pure-PyTorch 4-bit dequantization (any device), same bits as the kernels.

    Per block, the 16 possible outputs ``cast(fl32(code * absmax[b]))`` are computed once (a (blocks, 16)
    table: the very products and casts of the element-wise formula), then gathered by nibble."""
    n = math.prod(shape)
    out = torch.empty(n, dtype=dtype, device=A.device)
    if n == 0:
        return out.reshape(shape)
    nblocks = (n + blocksize - 1) // blocksize
    code = code.to(device=A.device, dtype=torch.float32)
    absmax = absmax.to(device=A.device, dtype=torch.float32)[:nblocks]
    table = (code.view(1, 16) * absmax.view(-1, 1)).to(dtype)
    flat = A.reshape(-1)
    base = blocksize if blocksize % 2 == 0 else 2 * blocksize  # chunks start on a block and on a byte
    chunk = max(1, _TORCH_CHUNK // base) * base
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        b0 = start // blocksize
        nb = (m + blocksize - 1) // blocksize
        by = flat[start // 2 : (start + m + 1) // 2]
        q = torch.stack((by >> 4, by & 0xF), dim=-1).reshape(-1)[:m]
        if nb * blocksize != m:
            q = torch.nn.functional.pad(q, (0, nb * blocksize - m))
        vals = torch.gather(table[b0 : b0 + nb], 1, q.view(nb, blocksize).long())
        out[start : start + m] = vals.view(-1)[:m]
    return out.reshape(shape)


# --------------------------------------------------------------------------------------------- 4-bit
def dequantize_4bit(
    packed: torch.Tensor,
    quant_state,
    out_dtype: Optional[torch.dtype] = None,
    *,
    impl=None,
    negative_zero: Optional[bool] = None,
):
    """Dequantize a bitsandbytes 4-bit tensor (nf4/fp4, plain or nested absmax), bit-exact with bitsandbytes.

    Args:
        packed: the packed weight (``Params4bit.data``), uint8 or any ``quant_storage`` dtype (viewed as uint8).
        quant_state: a ``bitsandbytes.functional.QuantState`` (fields used: absmax, shape, blocksize,
            quant_type, dtype, nested, offset, state2). A state converted to bitsandbytes' CPU-packed layout
            (``packing_format_for_cpu``) is handled through :func:`unpack_cpu_packed_weight`.
        out_dtype: float32, float16 or bfloat16; default ``quant_state.dtype``.
        impl: ``"auto"`` | ``"native"`` | ``"torch"`` (see the module docstring).
        negative_zero: fp4 only, the sign of the zero that code 0b1000 decodes to. ``None`` (default) follows
            what bitsandbytes 0.50.2 does for this device and shape (:func:`bnb_fp4_negative_zero`);
            ``False`` / ``True`` force ``+0.0`` / ``-0.0``.

    Returns the tensor bitsandbytes' ``functional.dequantize_4bit(packed, quant_state)`` returns (same shape,
    same bits); see the module docstring for the exact arithmetic.
    """
    impl = _resolve_impl(impl)
    qs = quant_state
    if getattr(qs, "packing_format_for_cpu", False):
        packed, qs = unpack_cpu_packed_weight(packed, qs)
    dtype = _check_out_dtype(out_dtype if out_dtype is not None else qs.dtype)
    if qs.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {qs.quant_type!r}")
    blocksize = int(qs.blocksize)
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    if qs.shape is None:
        raise ValueError("quant_state.shape is None")
    shape = tuple(int(d) for d in qs.shape)
    transpose = packed.dim() >= 1 and packed.shape[0] == 1 and len(shape) <= 2
    A = _as_uint8(packed)
    if negative_zero is None:
        negative_zero = qs.quant_type == "fp4" and bnb_fp4_negative_zero(A.device, shape, blocksize)
    code = get_4bit_code(qs.quant_type, A.device, negative_zero)
    n = math.prod(shape)
    if A.numel() < (n + 1) // 2:
        raise ValueError(f"packed holds {A.numel()} bytes, shape {shape} needs {(n + 1) // 2}")

    if _use_native(impl, A.device):
        ops = _native.ops()
        nested = getattr(qs, "nested", False)
        if nested and _nested_native_args_ok(qs):
            s2 = qs.state2
            out = ops.dequantize_4bit_nested(
                A,
                qs.absmax,
                s2.absmax,
                s2.code.to(A.device),
                int(s2.blocksize),
                _offset_tensor(qs.offset, A.device).reshape(()).float(),
                code,
                blocksize,
                list(shape),
                dtype,
            )
        else:
            absmax = _resolve_absmax_torch(qs) if nested else qs.absmax
            out = ops.dequantize_4bit(A, absmax, code, blocksize, list(shape), dtype)
    else:
        out = _dequant_4bit_torch(A, _resolve_absmax_torch(qs), code, blocksize, shape, dtype)
    return out.t() if transpose else out


def _nested_native_args_ok(qs) -> bool:
    """The fused nested kernel covers the standard case: float32 state2 (absmax, code, dtype), uint8 codes."""
    s2 = qs.state2
    if s2 is None or getattr(s2, "nested", False):
        return False
    off = qs.offset
    off_ok = not isinstance(off, torch.Tensor) or (off.dtype == torch.float32 and off.numel() == 1)
    return (
        off_ok
        and s2.dtype == torch.float32
        and qs.absmax.dtype == torch.uint8
        and s2.absmax.dtype == torch.float32
        and s2.code.dtype == torch.float32
        and s2.code.numel() == 256
    )


# --------------------------------------------------------------------------------------------- int8
def dequantize_int8_rowwise(
    CB: torch.Tensor,
    SCB: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    *,
    mode: str = "vectorwise",
    impl=None,
) -> torch.Tensor:
    """Dequantize LLM.int8 row-wise weights: ``W[r, c] = CB[r, c] * SCB[r] / 127``, bit-exact with bitsandbytes.

    ``mode="vectorwise"``: ``cast(fl32(fl32(CB * SCB[r]) * float32(1/127)))`` = bitsandbytes'
    ``int8_vectorwise_dequant(CB, SCB).to(out_dtype)``. ``mode="matmul_fp"``: ``cast(fl32(CB * fl32(SCB[r] *
    float32(1/127))))`` = the weight ``MatMul8bitFp`` (CPU/XPU training path) multiplies with. ``CB`` may have
    any number of leading dims (rows = all but the last), ``SCB`` one float per row.
    """
    impl = _resolve_impl(impl)
    dtype = _check_out_dtype(out_dtype)
    if mode not in _INT8_MODES:
        raise ValueError(f"mode must be one of {sorted(_INT8_MODES)}, got {mode!r}")
    if CB.dtype != torch.int8:
        raise ValueError(f"CB must be int8, got {CB.dtype}")
    if CB.dim() < 1:
        raise ValueError("CB must have at least one dimension")
    rows = math.prod(CB.shape[:-1])
    if SCB.numel() != rows:
        raise ValueError(f"SCB must hold one scale per row of CB ({rows}), got {SCB.numel()}")
    if _use_native(impl, CB.device):
        return _native.ops().dequantize_int8_rowwise(CB, SCB, _INT8_MODES[mode], dtype)
    cb2 = CB.reshape(rows, CB.shape[-1])
    scb = SCB.reshape(-1, 1)
    if scb.dtype != torch.float32:
        scb = scb.float()
    if mode == "vectorwise":
        out = cb2 * scb * INT8_INV_127
    else:
        out = cb2.to(torch.float32) * scb.mul(1.0 / 127.0)
    return out.to(dtype).reshape(CB.shape)


# --------------------------------------------------------------------------------------------- modules
def unpack_cpu_packed_weight(packed: torch.Tensor, quant_state, block_n: int = 32):
    """Undo bitsandbytes' CPU repacking (``_convert_weight_packed_for_cpu``) without touching the inputs.

    Since bitsandbytes 0.49 the first forward of a ``Linear4bit`` on an AVX512-BF16 CPU in eval mode with an
    input that needs no grad replaces ``weight.data`` by an ``(N, K/2)`` nibble-interleaved layout and the
    quant state by ``packing_format_for_cpu=True``, ``absmax`` = the (nested-dequantized) float32 absmax cast
    to bfloat16 and transposed to ``(K // blocksize, N)``, ``nested=False``, ``dtype=bfloat16``; the original
    settings are kept in ``original_dtype`` / ``original_nested`` / ``original_qshape`` /
    ``original_storage_type``. The bf16 rounding of absmax is lossy: the standard layout cannot be recovered
    bit for bit, only the weight the module now computes with.

    Returns ``(packed_std, state)``: ``packed_std`` uint8 in bitsandbytes' standard ``[(N*K+1)//2, 1]``
    layout (nibble codes unchanged), and a non-nested QuantState-like namespace whose ``absmax`` is the
    module's bf16 absmax in flat block order as float32 (exact), ``dtype = original_dtype``. Dequantizing
    these is exactly ``code[q] * float(absmax_bf16)`` then the cast, the weight the packed module uses.
    (bitsandbytes' own ``_convert_weight_packed_for_cpu_inverse`` gives the same nibbles but, for non-nested
    states, leaves absmax in the transposed order, and for nested ones re-quantizes the bf16 absmax.)
    """
    N, K = (int(d) for d in quant_state.shape)
    if N % block_n or K % 2:
        raise ValueError(f"CPU-packed weight of shape {(N, K)} is not a multiple of ({block_n}, 2)")
    P = _as_uint8(packed).reshape(N // block_n, K // 2, block_n)
    half = block_n // 2
    low = (P & 0xF).reshape(N // block_n, K // 2, half, 2)  # low nibble of byte p: row p // 2, col parity p % 2
    high = (P >> 4).reshape(N // block_n, K // 2, half, 2)  # high nibble: row half + p // 2
    codes = torch.cat((low, high), dim=2)  # [N/B, K/2, B, 2]
    codes = codes.permute(0, 2, 1, 3).reshape(N, K)
    packed_std = ((codes[:, 0::2] << 4) | codes[:, 1::2]).to(torch.uint8).reshape(-1, 1)
    blocksize = int(quant_state.blocksize)
    absmax = quant_state.absmax
    if absmax.dim() == 2:
        absmax = absmax.t()
    absmax = absmax.contiguous().reshape(-1).float()
    state = types.SimpleNamespace(
        absmax=absmax,
        shape=torch.Size((N, K)),
        code=get_4bit_code(quant_state.quant_type, absmax.device),
        blocksize=blocksize,
        quant_type=quant_state.quant_type,
        dtype=getattr(quant_state, "original_dtype", quant_state.dtype),
        offset=None,
        state2=None,
        nested=False,
        packing_format_for_cpu=False,
    )
    return packed_std, state


def quant_state_of(module):
    """The QuantState of a bitsandbytes 4-bit layer whose weight holds packed 4-bit data, else None (a float weight,
    or no 4-bit layer). The weight's own ``quant_state`` first; else the module's, when the weight is marked
    quantized, is not a float tensor, or is not (out_features, in_features) shaped (a ``Params4bit`` re-wrapped as a
    plain Parameter, as FSDP does, keeps its packed shape). The one rule merge and dequantization both use."""
    weight = module.weight
    qs = getattr(weight, "quant_state", None)
    if qs is not None:
        return qs
    qs = getattr(module, "quant_state", None)
    if qs is None:
        return None
    shape = (getattr(module, "out_features", None), getattr(module, "in_features", None))
    packed = (getattr(weight, "bnb_quantized", False) or not weight.is_floating_point()
              or tuple(weight.shape) != shape)
    return qs if packed else None


def dequantize_weight(module, out_dtype: Optional[torch.dtype] = None, *, impl=None, int8_mode: str = "vectorwise"):
    """Dense ``(out_features, in_features)`` weight of a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` module.

    * ``Linear4bit`` (weight with a ``quant_state``): ``dequantize_4bit(weight.data, quant_state)`` -- the bits
      of ``bitsandbytes.functional.dequantize_4bit``; default dtype ``quant_state.dtype``. A weight repacked
      by bitsandbytes for CPU inference (``quant_state.packing_format_for_cpu``) is dequantized from that
      layout without modifying the module (see :func:`unpack_cpu_packed_weight`; default dtype the original
      ``quant_state.dtype``).
    * ``Linear8bitLt`` with int8 weight: ``CB = weight.data``, ``SCB = weight.SCB`` before the first forward,
      ``module.state.SCB`` after it (``init_8bit_state`` moves it); ``dequantize_int8_rowwise(CB, SCB,
      out_dtype or float32, mode=int8_mode)``.
    * a module whose weight is a plain float tensor (``has_fp16_weights=True``, not yet quantized,
      ``nn.Linear``): a detached copy, cast to ``out_dtype`` if given.
    """
    weight = module.weight
    qs = quant_state_of(module)
    if qs is not None:
        if out_dtype is None and getattr(qs, "packing_format_for_cpu", False):
            out_dtype = getattr(qs, "original_dtype", None)
        return dequantize_4bit(weight.data, qs, out_dtype, impl=impl)
    if weight.dtype == torch.int8:
        scb = getattr(weight, "SCB", None)
        state = getattr(module, "state", None)
        if scb is None and state is not None:
            scb = getattr(state, "SCB", None)
        if scb is None:
            raise ValueError(
                "int8 weight without SCB: neither module.weight.SCB nor module.state.SCB is set "
                "(quantize the module with .to(device) first)"
            )
        return dequantize_int8_rowwise(
            weight.data, scb, out_dtype or torch.float32, mode=int8_mode, impl=impl
        )
    if weight.dtype == torch.uint8:
        raise ValueError("uint8 weight without a quant_state: cannot dequantize (was the quant state lost?)")
    return weight.detach().to(dtype=out_dtype or weight.dtype, copy=True)
