"""The "reference" backend: PEFT's VeRA forward, unfused and in float32. Autograd does the backward.

    result = base(x)
    x32    = x.to(float32)                       # PEFT casts the input to the adapter's dtype
    result = result + lambda_b * F.linear(lambda_d * F.linear(dropout(x32), A_s), B_s)
    return result.to(base dtype)

split as ``down`` (x -> h, the part sibling layers can share) and ``up`` (h, base, lambdas -> y).

Dropout here is ``F.dropout`` on torch's global generator, as PEFT's ``nn.Dropout``; the seed argument is unused.
Autograd keeps (tokens x r) and (tokens x out) float32 intermediates for backward: this is the memory the other
backends save.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


FLAT = False  # PEFT's math on the input as the layer got it (any leading dimensions): bit-identical to PEFT
SEEDED = False  # PEFT's F.dropout on torch's global generator: no seed
SHARES_H = False  # never: PEFT computes h per layer, and summing siblings' grad_h first would round differently


def linear_plain():
    """No one-call linear (ops.run_linear): PEFT's ops, one by one."""
    return None


def down(x: torch.Tensor, vera_A_s: torch.Tensor, dropout_p: float, seed: Optional[torch.Tensor]) -> torch.Tensor:
    """h = F.linear(dropout(x.to(A's dtype)), A_s): PEFT's first adapter GEMM, in float32 (the seed is unused: the
    mask is PEFT's F.dropout on torch's global generator)."""
    x_ad = x.to(vera_A_s.dtype)
    if dropout_p > 0.0:
        x_ad = F.dropout(x_ad, dropout_p, training=True)
    return F.linear(x_ad, vera_A_s)


def up(base: torch.Tensor, h: torch.Tensor, vera_B_s: torch.Tensor, lambda_d: torch.Tensor, lambda_b: torch.Tensor,
       fused_base=None) -> torch.Tensor:
    """(base + lambda_b * F.linear(lambda_d * h, B_s)).to(base's dtype): the rest of PEFT's branch."""
    if fused_base is not None:
        raise ValueError("vera_kernels: the reference backend has no fused base GEMM")
    return (base + lambda_b * F.linear(lambda_d * h, vera_B_s.to(h.dtype))).to(base.dtype)


def up_mixed(base: torch.Tensor, h: torch.Tensor, vera_B_s: torch.Tensor, LD: torch.Tensor, LB: torch.Tensor,
             row_adapter: torch.Tensor, tokens_per_row=None) -> torch.Tensor:
    """A mixed-adapter batch the plain way, the yardstick of the others: PEFT's branch (``up``) for each stacked
    adapter k on the whole batch, kept on the rows (dim 0) that run it. K times the work of one adapter."""
    y = base
    take_shape = (row_adapter.shape[0],) + (1,) * (base.dim() - 1)
    for k in range(LD.shape[0]):
        rows_k = (row_adapter == k).view(take_shape)
        y = torch.where(rows_k, up(base, h, vera_B_s, LD[k], LB[k]), y)
    return y


def vera_formula(x, weight, bias, vera_A, vera_B, lambda_d, lambda_b, *, fan_in_fan_out=False, keep=None,
                 p: float = 0.0):
    """y = x W^T + b + lambda_b * ((lambda_d * (dropout(x) A_s^T)) B_s^T), differentiable, in x's dtype.

    The yardstick of the tests and of ``make gpu-check``: called on float64 tensors it is the exact reference, on
    low-precision tensors a plain PyTorch implementation in that dtype (whose error every backend is judged against).
    ``keep`` is a dropout keep-mask shaped like x, applied with scale 1/(1-p); A and B may be the full shared
    projections or already sliced."""
    W = weight.t() if fan_in_fan_out else weight
    out_f, in_f = W.shape
    A_s = vera_A[:, :in_f].to(x.dtype)
    B_s = vera_B[:out_f, :].to(x.dtype)
    x_ad = x if keep is None else x * keep.to(x.dtype) / (1.0 - p)
    base = x @ W.t().to(x.dtype)
    if bias is not None:
        base = base + bias.to(x.dtype)
    return base + lambda_b.to(x.dtype) * ((lambda_d.to(x.dtype) * (x_ad @ A_s.t())) @ B_s.t())
