"""The VeRA op: base linear + VeRA delta, with the shared A/B passed whole and sliced here.

    y = x W^T + b + lambda_b * ((lambda_d * (dropout(x) A[:, :in]^T)) B[:out]^T)

``vera_linear`` is the public function; ``vera_add_delta`` adds the delta to a base output computed elsewhere (for
base layers whose forward is not a plain matmul, such as quantized ones). Both check their inputs, slice the
projections as views, honour autocast, draw the dropout seed from torch's default generator, and dispatch to a
backend (see ``vera_kernels.backends``), which takes any leading dimensions (the fused backends flatten them inside
their autograd node, so no view nodes surround it).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .. import _dtypes
from ..backends import BACKENDS, get_impl, resolve_backend

__all__ = ["vera_linear", "vera_add_delta", "draw_dropout_seed"]


def draw_dropout_seed(device: Optional[torch.device] = None) -> torch.Tensor:
    """A 0-dim int64 tensor on ``device`` (default CPU) drawn from that device's default generator, which
    ``torch.manual_seed`` seeds.

    The triton backend draws its seed on the input's device and its kernels read it from there: no host value is
    baked into a launch, so a CUDA graph that captures the layer draws a fresh seed (a fresh mask) on every replay,
    as it does for torch's own dropout, and torch.compile keeps the whole step on the device. The torch backend
    seeds a host-side generator, so it draws on the CPU (and refuses CUDA-graph capture with dropout, see
    ``_check_capture``)."""
    return torch.randint(0, 2**62, (), dtype=torch.int64, device=device)


def seed_device(backend: str, x: torch.Tensor) -> torch.device:
    """Where a concrete backend's dropout seed lives (see draw_dropout_seed)."""
    return x.device if backend == "triton" else torch.device("cpu")


def _check_capture(backend: str, x: torch.Tensor) -> None:
    """Adapter dropout under CUDA-graph capture: only the backends whose masks come from the device's generator can
    be replayed (a fresh mask every replay); the torch backend's host-seeded mask would fail inside the capture."""
    if backend == "torch" and x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "vera_kernels: adapter dropout with backend='torch' cannot be captured in a CUDA graph (its mask is "
            "drawn from a host-seeded generator); use backend='triton' or 'reference', or vera_dropout=0"
        )


def _check_vera_inputs(x, in_f, out_f, vera_A, vera_B, lambda_d, lambda_b, dropout_p, tensors_on_device):
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise TypeError("vera_kernels: x must be a tensor with at least one dimension")
    if x.shape[-1] != in_f:
        raise ValueError(
            f"vera_kernels: the input's last dimension is {x.shape[-1]} but the layer expects in_features={in_f} "
            f"(input shape {tuple(x.shape)})"
        )
    if vera_A.dim() != 2 or vera_B.dim() != 2:
        raise ValueError(f"vera_A and vera_B must be 2-D, got {tuple(vera_A.shape)} and {tuple(vera_B.shape)}")
    r = vera_A.shape[0]
    if vera_B.shape[1] != r:
        raise ValueError(f"vera_A is {tuple(vera_A.shape)} but vera_B is {tuple(vera_B.shape)}: their ranks differ")
    if vera_A.shape[1] < in_f:
        raise ValueError(f"vera_A has {vera_A.shape[1]} columns but the layer has in_features={in_f}")
    if vera_B.shape[0] < out_f:
        raise ValueError(f"vera_B has {vera_B.shape[0]} rows but the layer has out_features={out_f}")
    if lambda_d.shape != (r,):
        raise ValueError(f"lambda_d must have shape ({r},) to match vera_A, got {tuple(lambda_d.shape)}")
    if lambda_b.shape != (out_f,):
        raise ValueError(f"lambda_b must have shape ({out_f},) to match out_features, got {tuple(lambda_b.shape)}")
    if vera_A.requires_grad or vera_B.requires_grad:
        raise ValueError("vera_A and vera_B are frozen in VeRA; they must not require grad")
    for name, t in [("lambda_d", lambda_d), ("lambda_b", lambda_b), ("vera_A", vera_A), ("vera_B", vera_B)]:
        if not t.is_floating_point():
            raise TypeError(f"vera_kernels: {name} must be a floating tensor, got {t.dtype}")
    for name, t in tensors_on_device:
        if t is not None and t.device != x.device:
            raise ValueError(f"vera_kernels: device mismatch: input is on {x.device} but {name} is on {t.device}")
    if not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"vera_kernels: dropout_p must be in [0, 1), got {dropout_p}")


def _dispatch(x, weight, bias, base_out, vera_A_s, vera_B_s, lambda_d, lambda_b, dropout_p, training, fan_in_fan_out,
              backend):
    concrete = backend if backend in BACKENDS else resolve_backend(backend, x.device)
    if base_out is not None and base_out.dtype != x.dtype and concrete != "reference":
        x = x.to(base_out.dtype)  # quantized bases compute in their compute dtype; the fused delta follows it
    allowed = _dtypes.REFERENCE_DTYPES if concrete in ("reference", "torch") else _dtypes.COMPUTE_DTYPES
    _dtypes.check_activation_dtype(x, allowed)
    p = float(dropout_p) if training else 0.0
    seed = None
    if p > 0.0 and concrete != "reference":  # the reference backend is PEFT's F.dropout on the global generator
        _check_capture(concrete, x)
        seed = draw_dropout_seed(seed_device(concrete, x))
    return get_impl(concrete)(  # any leading dimensions: each backend flattens them inside its autograd node
        x, weight, bias, base_out, vera_A_s, vera_B_s, lambda_d, lambda_b, dropout_p=p, seed=seed,
        fan_in_fan_out=fan_in_fan_out,
    )


def vera_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    vera_A: torch.Tensor,
    vera_B: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
    *,
    dropout_p: float = 0.0,
    training: bool = False,
    fan_in_fan_out: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Base linear plus VeRA delta. ``weight`` is (out, in), or (in, out) with ``fan_in_fan_out`` (GPT-2's Conv1D).

    vera_A (r, in_max) and vera_B (out_max, r) are the full shared projections; the op uses A[:, :in] and B[:out].
    Dropout (probability ``dropout_p``, only when ``training``) applies to x on the adapter branch only.
    Gradients reach x, lambda_d, lambda_b, and weight/bias when they require grad.
    """
    if weight is None or weight.dim() != 2:
        raise ValueError("vera_kernels: weight must be a 2-D tensor")
    in_f, out_f = (weight.shape[0], weight.shape[1]) if fan_in_fan_out else (weight.shape[1], weight.shape[0])
    if bias is not None and bias.shape != (out_f,):
        raise ValueError(f"vera_kernels: bias must have shape ({out_f},), got {tuple(bias.shape)}")
    _check_vera_inputs(
        x, in_f, out_f, vera_A, vera_B, lambda_d, lambda_b, dropout_p,
        [("weight", weight), ("bias", bias), ("vera_A", vera_A), ("vera_B", vera_B), ("lambda_d", lambda_d),
         ("lambda_b", lambda_b)],
    )
    return vera_linear_prechecked(x, weight, bias, vera_A[:, :in_f], vera_B[:out_f, :], lambda_d, lambda_b,
                                  dropout_p, training, fan_in_fan_out, backend)


def vera_linear_prechecked(x, weight, bias, vera_A_s, vera_B_s, lambda_d, lambda_b, dropout_p, training,
                           fan_in_fan_out, backend):
    """``vera_linear`` without the shape/device validation and on the layer's slices A[:, :in], B[:out], for callers
    whose tensors are consistent by construction (VeraLinear checks the input width itself). Autocast and the dtype
    rules still apply."""
    ac = _dtypes.autocast_dtype(x.device.type)
    if ac is not None:
        x, weight = x.to(ac), weight.to(ac)
        bias = bias.to(ac) if bias is not None else None
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(
            f"vera_kernels: dtype mismatch: input is {x.dtype}, weight is {weight.dtype}"
            + (f", bias is {bias.dtype}" if bias is not None else "")
        )
    with torch.autocast(x.device.type, enabled=False) if ac is not None else contextlib.nullcontext():
        return _dispatch(x, weight, bias, None, vera_A_s, vera_B_s, lambda_d, lambda_b, dropout_p, training,
                         fan_in_fan_out, backend)


def vera_add_delta(
    base_out: torch.Tensor,
    x: torch.Tensor,
    vera_A: torch.Tensor,
    vera_B: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
    *,
    dropout_p: float = 0.0,
    training: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """``base_out`` + VeRA delta of ``x`` (returns a new tensor in base_out's dtype; the gradient passes through)."""
    out_f = lambda_b.shape[0] if lambda_b.dim() == 1 else -1
    _check_vera_inputs(
        x, x.shape[-1] if x.dim() else -1, out_f, vera_A, vera_B, lambda_d, lambda_b, dropout_p,
        [("base_out", base_out), ("vera_A", vera_A), ("vera_B", vera_B), ("lambda_d", lambda_d),
         ("lambda_b", lambda_b)],
    )
    in_f = x.shape[-1]
    if base_out.shape != (*x.shape[:-1], out_f):
        raise ValueError(
            f"vera_kernels: base output shape {tuple(base_out.shape)} does not match input {tuple(x.shape)} "
            f"and out_features={out_f}"
        )
    ac = _dtypes.autocast_dtype(x.device.type)
    if ac is not None:
        x = x.to(ac)
    with torch.autocast(x.device.type, enabled=False) if ac is not None else contextlib.nullcontext():
        return _dispatch(x, None, None, base_out, vera_A[:, :in_f], vera_B[:out_f, :], lambda_d, lambda_b,
                         dropout_p, training, False, backend)
