"""The "torch" backend: VeRA as one autograd.Function with a hand-derived backward that keeps only h = x A_s^T.

Reads top to bottom: dropout-mask regeneration -> autograd.Function (derivation in its docstring) -> public function.
Runs on any device torch runs on; on CUDA it is a strong unfused baseline (cuBLAS GEMMs, no (tokens x out)
intermediate), on the CPU it is the backend "auto" picks.
"""

from __future__ import annotations

from typing import Optional

import torch


def dropout_keep_mask(seed: int, shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """The Bernoulli(1 - p) keep-mask the torch backend uses for ``seed``; forward and backward regenerate it.

    Drawn from a private generator seeded with ``seed`` (itself drawn from torch's default generator by the op, so
    ``torch.manual_seed`` reproduces it). Never stored between forward and backward.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.rand(shape, generator=gen, device=device) >= p


def with_leading_dims(y: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
    """A Function's (N, out) output given x's leading dimensions, as a tensor of its own rather than a view:
    autograd forbids in-place ops on views made inside a custom Function, and a layer's output must take them
    (``nn.ReLU(inplace=True)`` after it, ``logits /= T``). Used by the fused backends, which flatten inside."""
    if len(x_shape) == 2:
        return y
    return torch.ops.aten._unsafe_view(y.contiguous(), (*x_shape[:-1], y.shape[-1]))


class VeraLinearFunction(torch.autograd.Function):
    r"""y = base + lambda_b * ((lambda_d * (dropout(x) A_s^T)) B_s^T), with base = x W^T + b or a given tensor.

    Shapes: x (N, in) (any leading dimensions, flattened to N here), A_s (r, in), B_s (out, r), lambda_d (r),
    lambda_b (out), W (out, in) or, with fan_in_fan_out, (in, out). Let m be the dropout keep-mask and
    s = 1 / (1 - p), so dropout(x) = s (m * x).

    Forward, in x's dtype with float32 lambdas folded into B (no (N x r) elementwise pass):
        h = dropout(x) A_s^T                               (N, r)   <- the only activation saved
        R = diag(lambda_b) B_s diag(lambda_d)             (out, r) small, recomputed
        y = base + h R^T                                   (one addmm into the base output, in place)

    Backward, with g = dL/dy (N, out):
        Bl         = diag(lambda_b) B_s                    (out, r)
        gB         = g Bl                                  (N, r)   = dL/du, u = lambda_d * h
        dL/dlambda_d[k] = sum_n gB[n, k] h[n, k]
        dL/dh      = gB * lambda_d                         (N, r)
        dL/dx      = s m * (dL/dh A_s) + g W_eff           (the base's input gradient added by addmm)
        dL/dlambda_b[o] = sum_n g[n, o] v[n, o],  v = u B_s^T   -- would need (N, out); instead
                        = sum_k B_s[o, k] lambda_d[k] (g^T h)[o, k]    with g^T h (out, r): one extra rank-r GEMM
        dL/dW      = g^T x  (or x^T g with fan_in_fan_out),  dL/db = sum_n g[n]   (only when they require grad;
                                                              x is saved only then)
    So the graph keeps h (N x r, activation dtype) and a seed; the mask is regenerated from the seed.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, base_out, vera_A_s, vera_B_s, lambda_d, lambda_b, dropout_p, seed, fan_in_fan_out):
        x_shape = x.shape
        x = x.reshape(-1, x_shape[-1])  # leading dimensions are flattened here, not by autograd views around us
        if base_out is not None:
            base_out = base_out.reshape(-1, base_out.shape[-1])
        cd = x.dtype
        seed = int(seed) if seed is not None else None
        if dropout_p > 0.0:
            keep = dropout_keep_mask(seed, x.shape, dropout_p, x.device)
            x_ad = x.masked_fill(~keep, 0).mul_(1.0 / (1.0 - dropout_p))
            del keep
        else:
            x_ad = x
        h = torch.mm(x_ad, _as(vera_A_s, cd).t())
        del x_ad
        # R = diag(lambda_b) B_s diag(lambda_d), float32 products (the lambdas are float32), one rounding to cd
        R = _as(torch.mul(vera_B_s, lambda_b.unsqueeze(1)).mul_(lambda_d), cd)
        if base_out is None:
            w_t = weight if fan_in_fan_out else weight.t()
            y = torch.addmm(bias, x, w_t) if bias is not None else torch.mm(x, w_t)
            y.addmm_(h, R.t())
        else:
            y = torch.addmm(base_out, h, R.t())

        needs_w = weight is not None and ctx.needs_input_grad[1]
        ctx.save_for_backward(h, x if needs_w else None, weight, vera_A_s, vera_B_s, lambda_d, lambda_b)
        ctx.dropout_p = dropout_p
        ctx.seed = seed
        ctx.fan_in_fan_out = fan_in_fan_out
        ctx.x_shape = x_shape
        return with_leading_dims(y, x_shape)

    @staticmethod
    def backward(ctx, g_nd):
        h, x, weight, vera_A_s, vera_B_s, lambda_d, lambda_b = ctx.saved_tensors
        need_x, need_w, need_b, need_base, _, _, need_ld, need_lb = ctx.needs_input_grad[:8]
        g = g_nd.reshape(-1, g_nd.shape[-1])
        cd = g.dtype
        grad_x = grad_w = grad_b = grad_base = grad_ld = grad_lb = None

        if need_x or need_ld:
            gB = torch.mm(g, _as(torch.mul(vera_B_s, lambda_b.unsqueeze(1)), cd))  # dL/du, u = lambda_d * h
            if need_ld:
                grad_ld = torch.mul(gB, h).sum(0, dtype=torch.float32).to(lambda_d.dtype)
            if need_x:
                grad_h = gB.mul_(_as(lambda_d, cd))
                grad_x = torch.mm(grad_h, _as(vera_A_s, cd))
                if ctx.dropout_p > 0.0:
                    keep = dropout_keep_mask(ctx.seed, grad_x.shape, ctx.dropout_p, grad_x.device)
                    grad_x.masked_fill_(~keep, 0).mul_(1.0 / (1.0 - ctx.dropout_p))
                if weight is not None:
                    grad_x.addmm_(g, weight.t() if ctx.fan_in_fan_out else weight)
        if need_lb:
            G = torch.mm(g.t(), h)  # (out, r): sum over tokens, instead of keeping v = u B_s^T (N x out)
            grad_lb = torch.mv(torch.mul(G, vera_B_s).float(), lambda_d.float()).to(lambda_b.dtype)
        if need_w:
            grad_w = (x.t() @ g) if ctx.fan_in_fan_out else (g.t() @ x)
        if need_b:
            grad_b = g.sum(0)
        if need_base:
            grad_base = g_nd
        if grad_x is not None:
            grad_x = grad_x.reshape(ctx.x_shape)
        return grad_x, grad_w, grad_b, grad_base, None, None, grad_ld, grad_lb, None, None, None


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def vera_linear_torch(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    base_out: Optional[torch.Tensor],
    vera_A_s: torch.Tensor,
    vera_B_s: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
    *,
    dropout_p: float,
    seed: Optional[torch.Tensor],
    fan_in_fan_out: bool,
) -> torch.Tensor:
    return VeraLinearFunction.apply(
        x, weight, bias, base_out, vera_A_s, vera_B_s, lambda_d, lambda_b, dropout_p, seed, fan_in_fan_out
    )
