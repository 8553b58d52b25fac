"""The VeRA op: base linear + VeRA delta, with the shared A/B passed whole and sliced here.

    y = x W^T + b + lambda_b * ((lambda_d * (dropout(x) A[:, :in]^T)) B[:out]^T)

Every backend computes it as two autograd nodes (see ``vera_kernels.backends``): ``down`` (x -> h = dropout(x) A_s^T,
the part that depends on the input only, so layers reading one input can share it: ``vera_kernels.sharing``) and
``up`` (h, base, lambdas -> y, one per layer and adapter). ``vera_linear`` is the public function;
``vera_add_delta`` adds the delta to a base output computed elsewhere (for base layers whose forward is not a plain
matmul, such as quantized ones). Both check their inputs, slice the projections as views, honour autocast, draw the
dropout seed on the input's device from torch's generator, and run ``run_adapters``, which VeraLinear calls too.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _dtypes
from ..backends import fused_base_mode, get_impl, resolve_backend

__all__ = ["vera_linear", "vera_add_delta", "draw_dropout_seed", "run_adapters", "run_linear", "run_mixed"]


def draw_dropout_seed(device: Optional[torch.device] = None) -> torch.Tensor:
    """A 0-dim int64 tensor on ``device`` (default CPU) drawn from that device's default generator, which
    ``torch.manual_seed`` seeds.

    The seeded backends (torch, triton) draw their seed on the input's device and regenerate the mask from it there:
    no host value is baked into a launch, so a CUDA graph that captures the layer draws a fresh seed (a fresh mask)
    on every replay, as it does for torch's own dropout, and torch.compile keeps the whole step on the device."""
    return torch.randint(0, 2**62, (), dtype=torch.int64, device=device)


def seed_device(backend: str, x: torch.Tensor) -> torch.device:
    """Where a seeded backend's dropout seed lives: on the input's device, for every backend."""
    return x.device


def run_adapters(impl, x: torch.Tensor, base: Optional[torch.Tensor], vera_A_s: torch.Tensor,
                 vera_B_s: torch.Tensor, adapters, *, compute_dtype: Optional[torch.dtype] = None, fused_base=None,
                 share=None) -> torch.Tensor:
    """``base`` plus the delta of every adapter in ``adapters`` ((lambda_d, lambda_b, dropout_p) triples, dropout
    already zero outside training), computed by backend module ``impl`` (see backends.get_impl).

    ``x`` and ``base`` are as the backend takes them (flattened to (N, features) for the fused backends; base in the
    model's dtype). ``x`` is cast to ``compute_dtype`` (``_dtypes.adapter_compute_dtype``) only when an h has to be
    computed here, not when a sibling's is reused. ``vera_A_s`` in the compute dtype or
    float32 (cast by the down node; the layer passes a cached cast), ``vera_B_s`` and the lambdas float32.
    Adapters without dropout share one h (A is the same for all of them);
    ``share`` (a ``sharing.HSlot`` or None) also shares it with sibling layers that read the same input. With
    ``fused_base = (weight, bias, fan_in_fan_out, mode)`` and base None, the first adapter's up node computes the
    base GEMM too (the triton backend's fused arrangements)."""
    hs: dict = {}  # this call's h per dropout probability: the dropout-free one serves every adapter without it
    xc = None  # x in the compute dtype, made on first use
    for lambda_d, lambda_b, p in adapters:
        h, xc = _h_for(impl, x, xc, vera_A_s, p, share, hs, compute_dtype)
        if fused_base is not None and base is None:
            weight, bias, fan_in_fan_out, mode = fused_base
            base = impl.up(None, h, vera_B_s, lambda_d, lambda_b, fused_base=(x, weight, bias, fan_in_fan_out, mode))
        else:
            base = impl.up(base, h, vera_B_s, lambda_d, lambda_b)
    return base


def _h_for(impl, x, xc, vera_A_s, p: float, share, hs: dict, compute_dtype):
    """(h, xc): the h for dropout probability ``p``: this call's (``hs``), a sibling layer's (``share``), or computed
    here (from ``xc``, x in the compute dtype, made on first use and returned for the next call)."""
    shared = share is not None and (p == 0.0 or share.shares_dropout())
    h = hs.get(p) if shared or p == 0.0 else None
    if h is None and shared:
        h = share.get(p)
    if h is None:
        if xc is None:  # quantized bases compute in their compute dtype; the fused delta follows it
            xc = x if compute_dtype is None or x.dtype == compute_dtype else x.to(compute_dtype)
        h = impl.down(xc, vera_A_s, p, draw_dropout_seed(x.device) if p > 0.0 and impl.SEEDED else None)
        if shared:
            share.put(h, p)
    if shared or p == 0.0:
        hs[p] = h
    return h, xc


# tensor types the one-call linear takes: a subclass (a quantized or distributed weight) may handle F.linear through
# __torch_function__, which a call from C++ would skip, so it takes the Python ops
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def run_linear(backend: str, impl, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               fan_in_fan_out: bool, vera_A_s: torch.Tensor, vera_B_s: torch.Tensor, adapters, *,
               compute_dtype: torch.dtype, share=None) -> torch.Tensor:
    """A plain linear base (weight, bias) on ``x`` plus the adapters' deltas: ``linear_base`` then ``run_adapters``,
    or, in the common case, one native call (``impl.linear_plain()``, csrc/vera_up.cpp ``vera_linear_plain``) that
    runs the same ops in the same order: one adapter without dropout, an nn.Linear layout, everything in x's dtype
    (the base weight and bias, A_s and the compute dtype), plain tensors (no subclass), no fused base arrangement.
    h is shared with siblings
    through ``share`` as ``run_adapters`` does."""
    if len(adapters) == 1:
        lambda_d, lambda_b, p = adapters[0]
        dtype = x.dtype
        if (p == 0.0 and not fan_in_fan_out and compute_dtype == dtype and vera_A_s.dtype == dtype
                and weight.dtype == dtype and (bias is None or bias.dtype == dtype)
                and type(x) is torch.Tensor and type(weight) in _PLAIN and (bias is None or type(bias) in _PLAIN)
                and (backend != "triton" or impl.base_gemm_mode() == "cublas")):
            fn = impl.linear_plain()
            if fn is not None:
                h = share.get(0.0) if share is not None else None
                y, h_new = fn(x, weight, bias, vera_A_s, h, vera_B_s, lambda_d, lambda_b)
                if share is not None and h is None:
                    share.put(h_new, 0.0)
                return y
    base, fused = linear_base(backend, impl, x, weight, bias, fan_in_fan_out)
    return run_adapters(impl, x, base, vera_A_s, vera_B_s, adapters, compute_dtype=compute_dtype, fused_base=fused,
                        share=share)


def run_mixed(impl, x: torch.Tensor, base: torch.Tensor, vera_A_s: torch.Tensor, vera_B_s: torch.Tensor,
              LD: torch.Tensor, LB: torch.Tensor, row_index: torch.Tensor, ps, *,
              compute_dtype: Optional[torch.dtype] = None, share=None) -> torch.Tensor:
    """``base`` plus, on each row (dim 0 of the layer's input), the delta of that row's adapter: a mixed-adapter
    batch (``vera_kernels.mixed``). LD (K, r) and LB (K, out) stack the lambdas, ``row_index`` (rows,) says which
    stacked row each batch row uses, ``ps`` the dropout probability per stacked row (None: no adapter there).

    One h = dropout(x) A_s^T serves every row (A is shared by every adapter) when the adapters in the batch have one
    dropout probability; otherwise one h per distinct probability, each row taking its own (rows of the first one
    are kept where no adapter runs: their lambdas are zero). Then one ``up_mixed`` node gathers each row's lambdas.
    ``x``/``base`` as for run_adapters; for the flat backends the rows are contiguous blocks of x's N = rows * T."""
    hs: dict = {}
    xc = None
    rows = row_index.shape[0]
    distinct = list(dict.fromkeys(p for p in ps if p is not None))
    h = None
    for p in distinct:
        h_p, xc = _h_for(impl, x, xc, vera_A_s, p, share, hs, compute_dtype)
        if h is None:
            h = h_p
            continue
        with_p = torch.tensor([k for k, q in enumerate(ps) if q == p], dtype=row_index.dtype, device=x.device)
        take = torch.isin(row_index, with_p).view(rows, 1, 1)
        h = torch.where(take, h_p.reshape(rows, -1, h.shape[-1]), h.reshape(rows, -1, h.shape[-1])).view(h.shape)
    tokens_per_row = x.shape[0] // rows if impl.FLAT else None
    return impl.up_mixed(base, h, vera_B_s, LD, LB, row_index, tokens_per_row)


def linear_base(backend: str, impl, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                fan_in_fan_out: bool, fuse: bool = True):
    """(base, fused_base) for a plain linear base on the backend's input ``x``: base = x W^T + b computed here
    (F.linear, or Conv1D's own addmm on the flattened input, so the reference stays bit-identical to PEFT), or, in
    the triton backend's fused arrangements (unless ``fuse`` is False: mixed batches), base None and ``fused_base``
    for ``run_adapters``."""
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(
            f"vera_kernels: dtype mismatch: input is {x.dtype}, weight is {weight.dtype}"
            + (f", bias is {bias.dtype}" if bias is not None else "")
        )
    mode = fused_base_mode(backend) if fuse and backend == "triton" else None  # (the only one with fused modes)
    if mode is not None:
        return None, (weight, bias, fan_in_fan_out, mode)
    if not fan_in_fan_out:
        return F.linear(x, weight, bias), None
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # transformers' Conv1D: (in, out) weight
    y = torch.addmm(bias, x2, weight) if bias is not None else torch.mm(x2, weight)
    return (y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[1])), None


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


def _delta_op(x, weight, bias, base_out, vera_A, vera_B, lambda_d, lambda_b, dropout_p, training, fan_in_fan_out,
              backend):
    """The op-level path shared by vera_linear and vera_add_delta: resolve the backend, apply autocast and the dtype
    rules, flatten for the fused backends, compute the base (or take base_out), add the delta, restore the shape."""
    concrete = resolve_backend(backend, x.device, bool(training and float(dropout_p) > 0.0))
    impl = get_impl(concrete)
    in_f = x.shape[-1]
    out_f = lambda_b.shape[0]
    ac = _dtypes.autocast_dtype(x.device.type)
    if ac is not None:
        x = x.to(ac)
        if weight is not None:
            weight, bias = weight.to(ac), (bias.to(ac) if bias is not None else None)
    lead = x.shape[:-1]
    with torch.autocast(x.device.type, enabled=False) if ac is not None else contextlib.nullcontext():
        _dtypes.check_activation_dtype(x, _dtypes.allowed_dtypes(concrete))  # (before the base GEMM runs)
        if impl.FLAT:
            x = x.reshape(-1, in_f)
            if base_out is not None:
                base_out = base_out.reshape(-1, out_f)
        fused = None
        if base_out is None:
            base_out, fused = linear_base(concrete, impl, x, weight, bias, fan_in_fan_out)
        cd = _dtypes.branch_dtype(concrete, base_out.dtype if base_out is not None else x.dtype, x.dtype,
                                  x.device.type)
        # the nodes cast A to the compute dtype (keeping this view, not the cast) and fold B with the lambdas
        A_s, B_s = vera_A[:, :in_f], vera_B[:out_f, :]
        p = float(dropout_p) if training else 0.0
        y = run_adapters(impl, x, base_out, A_s, B_s, [(lambda_d, lambda_b, p)], compute_dtype=cd, fused_base=fused)
    return y.view(*lead, out_f) if impl.FLAT and len(lead) != 1 else y


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
    return _delta_op(x, weight, bias, None, vera_A, vera_B, lambda_d, lambda_b, dropout_p, training,
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
    if base_out.shape != (*x.shape[:-1], out_f):
        raise ValueError(
            f"vera_kernels: base output shape {tuple(base_out.shape)} does not match input {tuple(x.shape)} "
            f"and out_features={out_f}"
        )
    return _delta_op(x, None, None, base_out, vera_A, vera_B, lambda_d, lambda_b, dropout_p, training, False,
                     backend)
