"""The dtype rules of vera_kernels, in one place.

- The adapter's trainable vectors (lambda_d, lambda_b) and the shared projections (A, B) are float32 whatever the
  model's dtype, as in PEFT. They stay float32 when the model is cast with ``.to(dtype)``/``.half()``.
- The "reference" backend computes the adapter branch in float32 (PEFT's "autocast adapter dtype"), then casts the
  result back to the base output's dtype.
- The "torch" and "triton" backends compute in the activation dtype (fp32/fp16/bf16) with float32 accumulation and
  float32 lambdas (the torch backend on the CPU: float32, see adapter_compute_dtype); A is cast to the compute dtype
  once and cached, B is folded with the lambdas in float32.
"""

from __future__ import annotations

import torch

PARAM_DTYPE = torch.float32
COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# float64 is accepted by the reference and torch backends so tests can evaluate the formula exactly.
REFERENCE_DTYPES = COMPUTE_DTYPES + (torch.float64,)


def allowed_dtypes(backend: str) -> tuple:
    """The activation dtypes a concrete backend takes (float64 only where tests evaluate the formula exactly)."""
    return COMPUTE_DTYPES if backend == "triton" else REFERENCE_DTYPES


def adapter_compute_dtype(backend: str, activation_dtype: torch.dtype, device_type: str = "cuda") -> torch.dtype:
    """The dtype of the adapter branch's GEMMs (and of h): float32 for the reference (PEFT's "autocast adapter
    dtype"); for the fused backends the activation dtype (for a quantized base: its compute dtype, the dtype of its
    output), with float32 accumulation and float32 lambdas, except the torch backend on the CPU, which computes a
    bf16/fp16 model's branch in float32 as PEFT does: CPUs without native bf16 (AVX2, most AVX-512) run bf16 GEMMs
    emulated, ~100x slower than float32 on the development machine (512x1376x256: 348 against 3.2 ms), which made
    the adapter cost half a bf16 step. (The triton backend on the CPU is the interpreter, for tests: it keeps the
    activation dtype so that the low-precision kernels are what is tested.)"""
    if backend == "reference":
        return PARAM_DTYPE
    if backend == "torch" and device_type == "cpu" and activation_dtype in (torch.float16, torch.bfloat16):
        return PARAM_DTYPE
    return activation_dtype


def check_activation_dtype(x: torch.Tensor, allowed=COMPUTE_DTYPES, what: str = "input") -> None:
    _check_dtype(x.dtype, allowed, what)


def _check_dtype(dtype: torch.dtype, allowed, what: str) -> None:
    if dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"vera_kernels: {what} has dtype {dtype}; supported dtypes are {names}")


_BRANCH_DTYPES: dict = {}  # (backend, base dtype, input dtype, device type) -> compute dtype, for the combinations seen


def branch_dtype(backend: str, base_dtype: torch.dtype, x_dtype: torch.dtype, device_type: str) -> torch.dtype:
    """One adapted call's dtype rules: the input's dtype checked against ``allowed_dtypes(backend)`` (TypeError),
    then ``adapter_compute_dtype(backend, base_dtype, device_type)``. A combination seen before costs one dict
    lookup (this runs in every adapted layer's forward)."""
    key = (backend, base_dtype, x_dtype, device_type)
    cd = _BRANCH_DTYPES.get(key)
    if cd is None:
        _check_dtype(x_dtype, allowed_dtypes(backend), "input")
        cd = _BRANCH_DTYPES[key] = adapter_compute_dtype(backend, base_dtype, device_type)
    return cd


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)  # one C call, in every adapted layer's forward


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast would run a linear layer in on this device type, or None when autocast is off."""
    if _any_autocast is not None and not _any_autocast():
        return None
    if device_type not in ("cuda", "cpu", "xpu") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def float32_preserving(fn):
    """Wrap a ``Module._apply`` function so that it may move tensors between devices but never change their dtype.

    Used by the modules that hold the adapter's float32 tensors, so ``model.half()`` or ``model.to(torch.bfloat16)``
    after patching leaves the trainable vectors and the bit-exact projections in float32.
    """

    def apply(t: torch.Tensor) -> torch.Tensor:
        moved = fn(t)
        if moved.dtype != t.dtype and t.is_floating_point():
            return t.to(device=moved.device)
        return moved

    return apply
