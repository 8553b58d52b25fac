"""The base forward of a bitsandbytes layer under a VeRA adapter.

``quantized_base_forward(module, x, *args, **kwargs)`` runs the bitsandbytes module's own forward (its kernels, its
CPU repacking, its autograd functions) whenever bitsandbytes can compute on ``x``'s device. Otherwise it falls back
to dequantize-then-matmul, warning once per device type (:class:`QuantizedFallbackWarning`):

* ``Linear4bit``: ``F.linear(x.to(cd), dequantize_weight(module, cd), bias.to(cd)).to(x.dtype)`` with ``cd`` the
  dtype bitsandbytes computes in: ``module.compute_dtype``, set on first use from the input as bitsandbytes'
  ``set_compute_type`` does (fp32/bf16 input -> its dtype; fp16 input keeps the configured one; none -> x's dtype).
  bitsandbytes 0.50.2's own ``gemm_4bit`` multiplies with exactly ``dequantize_4bit(..., dtype=cd)``: on the same
  weights the two agree bit for bit (tests/test_quantized.py checks it on CPU).
* ``Linear8bitLt``: ``F.linear(x, W, bias)`` in x's dtype, ``W`` the dequantized int8 weight (in training mode with
  the rounding of bitsandbytes' CPU/XPU training path ``MatMul8bitFp``, bit-identical to it; in eval mode
  bitsandbytes would also quantize the activations to int8, which the fallback does not).

Whether bitsandbytes can compute on a device (:func:`bnb_supports_device`): the device type is in
``bitsandbytes.supported_torch_devices`` and every ``torch.ops.bitsandbytes`` operator the layer's forward uses has a
kernel for the device's dispatch key (its own, or bitsandbytes' device-generic ``CompositeExplicitAutograd`` one);
for CUDA also bitsandbytes' native library must be loaded (its CUDA kernels call it). ``FORCE_FALLBACK = True``
forces the fallback everywhere (tests, debugging).
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from .dequant import dequantize_weight

__all__ = ["quantized_base_forward", "bnb_supports_device", "QuantizedFallbackWarning", "FORCE_FALLBACK"]

FORCE_FALLBACK = False

# bitsandbytes 0.50.2 operators each layer's forward may call (autograd/_functions.py, nn/modules.py).
_OPS = {
    "4bit": ("gemm_4bit", "gemv_4bit", "dequantize_4bit", "dequantize_blockwise"),
    "8bit": ("int8_vectorwise_quant", "int8_scaled_mm", "int8_mixed_scaled_mm", "int8_vectorwise_dequant"),
}
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "xpu": "XPU", "mps": "MPS", "hpu": "HPU", "meta": "Meta",
                  "mtia": "MTIA", "xla": "XLA", "lazy": "Lazy", "ipu": "IPU", "maia": "MAIA", "vulkan": "Vulkan"}
_GENERIC_KEYS = ("CompositeExplicitAutograd", "CompositeImplicitAutograd")
_warned: set = set()


class QuantizedFallbackWarning(RuntimeWarning):
    """bitsandbytes has no kernel for this device: the quantized base runs as dequantize-then-matmul."""


def _layer_kind(module) -> str:
    return "4bit" if hasattr(module.weight, "quant_type") or hasattr(module, "compute_type_is_set") else "8bit"


def _dispatch_key(device_type: str) -> str | None:
    key = _DISPATCH_KEYS.get(device_type)
    if key is None:
        try:
            if device_type == torch._C._get_privateuse1_backend_name():
                key = "PrivateUse1"
        except Exception:  # pragma: no cover - very old torch
            pass
    return key


@functools.lru_cache(maxsize=None)
def _supports(device_type: str, kind: str) -> bool:
    try:
        import bitsandbytes as bnb
    except Exception:  # pragma: no cover - a bnb layer exists, so bnb imports
        return False
    supported = getattr(bnb, "supported_torch_devices", None)
    if supported is not None and device_type not in supported and device_type != "meta":
        return False
    key = _dispatch_key(device_type)
    if key is None:
        return False
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    for op in _OPS[kind]:
        name = f"bitsandbytes::{op}"
        try:
            if not torch._C._dispatch_has_kernel(name):
                continue  # an operator this bitsandbytes version does not define is not used by its forward
            if not any(has(name, k) for k in (key,) + _GENERIC_KEYS):
                return False
        except RuntimeError:
            return False
    if device_type == "cuda":
        try:
            from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib

            if isinstance(lib, ErrorHandlerMockBNBNativeLibrary):
                return False
        except Exception:
            return False
    return True


def bnb_supports_device(device, kind: str = "4bit") -> bool:
    """Whether bitsandbytes can run a ``kind`` ("4bit" / "8bit") layer's forward on ``device``."""
    if FORCE_FALLBACK:
        return False
    return _supports(torch.device(device).type, kind)


def _warn_once(device_type: str, module) -> None:
    if device_type in _warned:
        return
    _warned.add(device_type)
    warnings.warn(
        f"vera_kernels: bitsandbytes has no kernel for device type {device_type!r}; {type(module).__name__} layers "
        "run as dequantize-then-matmul there (same weights, slower, more memory per call)",
        QuantizedFallbackWarning,
        stacklevel=3,
    )


def _compute_dtype_4bit(module, x: torch.Tensor) -> torch.dtype:
    """The dtype bitsandbytes' Linear4bit.forward computes in, with its lazy ``set_compute_type`` applied."""
    if not getattr(module, "compute_type_is_set", True):
        if x.dtype in (torch.float32, torch.bfloat16):
            module.compute_dtype = x.dtype
        module.compute_type_is_set = True
    return getattr(module, "compute_dtype", None) or x.dtype


def quantized_base_forward(module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``module(x)`` through bitsandbytes where it has kernels for x's device, else dequantize-then-matmul."""
    kind = _layer_kind(module)
    if args or kwargs or bnb_supports_device(x.device, kind):
        return module(x, *args, **kwargs)
    _warn_once(x.device.type, module)
    bias = module.bias
    if kind == "4bit":
        dtype = _compute_dtype_4bit(module, x)
        weight = dequantize_weight(module, dtype).to(x.device)
        out = F.linear(x.to(dtype), weight, None if bias is None else bias.to(device=x.device, dtype=dtype))
        return out.to(x.dtype)
    mode = "matmul_fp" if module.training else "vectorwise"
    weight = dequantize_weight(module, x.dtype, int8_mode=mode).to(x.device)
    return F.linear(x, weight, None if bias is None else bias.to(device=x.device, dtype=x.dtype))
