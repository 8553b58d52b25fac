"""The dtype rules of vera_kernels, in one place.

- The adapter's trainable vectors (lambda_d, lambda_b) and the shared projections (A, B) are float32 whatever the
  model's dtype, as in PEFT. They stay float32 when the model is cast with ``.to(dtype)``/``.half()``.
- The "reference" backend computes the adapter branch in float32 (PEFT's "autocast adapter dtype"), then casts the
  result back to the base output's dtype.
- The "torch" and "triton" backends compute in the activation dtype (fp32/fp16/bf16) with float32 accumulation and
  float32 lambdas (the torch backend on the CPU: float32 for fp16, and for bf16 where the CPU has no native bf16,
  see adapter_compute_dtype); A is cast to the compute dtype once and cached, B is folded with the lambdas in
  float32.
"""

from __future__ import annotations

import os

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
    output), with float32 accumulation and float32 lambdas, except the torch backend on the CPU, which computes an
    fp16 model's branch in float32 as PEFT does, and a bf16 model's too where the CPU has no native bf16
    (``cpu_bf16_native``). Emulated, a bf16 GEMM is ~100x slower than float32 (an AVX2 development machine,
    512x1376x256: 348 against 3.2 ms), which made the adapter cost half a bf16 step; native (AVX512-BF16, AMX), it
    is 4-7x faster than float32 (an AMX machine, 1024x2048x256, one thread: 1.0-1.9 against 7.1 ms), which took a
    2048x2048 bf16 layer's fwd+bwd from 0.99x PEFT's time to 0.49x. fp16 GEMMs ran at float32's speed on both.
    (The triton backend on the CPU is the interpreter, for tests: it keeps the activation dtype so that the
    low-precision kernels are what is tested.)"""
    if backend == "reference":
        return PARAM_DTYPE
    if backend == "torch" and device_type == "cpu" and activation_dtype in (torch.float16, torch.bfloat16):
        return torch.bfloat16 if activation_dtype == torch.bfloat16 and cpu_bf16_native() else PARAM_DTYPE
    return activation_dtype


ENV_CPU_BF16 = "VERA_KERNELS_CPU_BF16"
_CPU_BF16: list = []  # [bool] once asked


def cpu_bf16_native() -> bool:
    """Whether the torch backend runs a bf16 model's branch in bf16 on the CPU: where the CPU multiplies bf16
    natively (AVX512-BF16 or AMX tiles, torch.cpu's feature probes), unless ``VERA_KERNELS_CPU_BF16`` says otherwise
    (0: float32, as on a CPU without; 1: bf16). Decided once per process (``reset_cpu_bf16`` for tests)."""
    if not _CPU_BF16:
        env = os.environ.get(ENV_CPU_BF16)
        if env in (None, "", "auto"):
            native = _cpu_has("_is_avx512_bf16_supported") or _cpu_has("_is_amx_tile_supported")
        elif env in ("0", "1"):
            native = env == "1"
        else:
            raise ValueError(f"{ENV_CPU_BF16}={env!r}: use 0 (float32 branch), 1 (bf16 branch) or auto (the default)")
        _CPU_BF16.append(native)
    return _CPU_BF16[0]


def _cpu_has(probe_name: str) -> bool:
    """torch.cpu's feature probe ``probe_name``; False where this torch build lacks it or it cannot run."""
    probe = getattr(torch.cpu, probe_name, None)
    try:
        return bool(probe is not None and probe())
    except Exception:
        return False


def reset_cpu_bf16() -> None:
    """Forget the decision (and every dtype rule derived from it): the next call asks the CPU and the environment."""
    _CPU_BF16.clear()
    _BRANCH_DTYPES.clear()


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
