"""The "torch" backend: VeRA as a down node (x -> h) and an up node (h, base, lambdas -> y), each a small
autograd.Function with a hand-derived backward; only h = dropout(x) A_s^T is kept between them.

Reads top to bottom: the dropout mask (counter-based, traceable) -> the two autograd.Functions (derivations in their
docstrings) -> the backend's public functions ``down`` and ``up``. Runs on any device torch runs on; on CUDA it is
cuBLAS GEMMs with no (tokens x out) intermediate, on the CPU it is the backend "auto" picks.

Why two nodes: VeRA's A is shared by every layer and adapter, so layers that read one input (q/k/v, gate/up) can
share one h (``vera_kernels.sharing``); autograd then sums their grad_h into h before one down-node backward.
Why custom Functions and not composed aten ops: composed, the up node's ``addmm(base, h, R^T)`` would keep R
(out x r, per layer, per step) and the lambda products for backward; these keep h and references to parameters only.
Host cost (the eager step is host-bound at small sizes): each node is entered through the C-level apply (see
``_apply``), runs 2-4 aten ops in forward and 2-6 in backward, and never leaves the autograd engine's C++ loop for
anything but its own backward. In eager mode both nodes are their C++ twins where the extension loads
(ops/native_up.py: VeraUp, VeraDown): no Python frame at all.
"""

from __future__ import annotations

import functools

from typing import Optional

import torch

# ============================================================================================ dropout mask
_M31 = 0x7FFFFFFF


def _mix31(v: torch.Tensor) -> torch.Tensor:
    """A bijective 31-bit integer mixer (xorshift-multiply rounds) on int64 tensors holding values in [0, 2**31).
    Products stay below 2**63 (a 31-bit value times a 32-bit odd constant), so nothing relies on integer overflow."""
    v = v ^ (v >> 16)
    v = (v * 0x7FEB352D) & _M31
    v = v ^ (v >> 15)
    v = (v * 0x846CA68B) & _M31
    return v ^ (v >> 16)


def dropout_keep_mask(seed, shape, p: float, device: torch.device) -> torch.Tensor:
    """The Bernoulli(1 - p) keep-mask the torch backend uses for ``seed`` on an (rows, cols) input.

    Counter-based: element (i, j) is kept when mix(mix(mix(i + seed_lo) ^ seed_hi) ^ (j * phi)) >= p * 2**31, with
    the seed a 0-dim int64 tensor on ``device`` (drawn there by the op from torch's generator, so
    ``torch.manual_seed`` reproduces it). Pure tensor ops: no host generator and no ``.item()``, so torch.compile
    traces it into the graph and a CUDA graph replays it with each replay's fresh seed. Forward and backward
    regenerate it; it is never stored between them. In eager mode the C++ down node (csrc/vera_up.cpp, VeraDown)
    applies the same mask bit for bit: on a CPU tensor in one fused pass that never materialises it (reading the
    seed's value: the CPU has no graphs to capture), elsewhere with these ops in aten.
    """
    rows, cols = shape
    seed = torch.as_tensor(seed, dtype=torch.int64, device=device)
    lo, hi = seed & _M31, (seed >> 31) & _M31
    r = _mix31(_mix31((torch.arange(rows, device=device, dtype=torch.int64) + lo) & _M31) ^ hi)
    c = (torch.arange(cols, device=device, dtype=torch.int64) * 0x9E3779B1) & _M31
    return _mix31(r.unsqueeze(1) ^ c) >= int(p * 2**31)


def _dropped(x: torch.Tensor, seed, p: float) -> torch.Tensor:
    """dropout(x) with the seed's mask: (m * x) / (1 - p), in x's dtype (a new tensor)."""
    keep = dropout_keep_mask(seed, x.shape, p, x.device)
    return x.masked_fill(~keep, 0).mul_(1.0 / (1.0 - p))


# ============================================================================================ autograd
class VeraDownFunction(torch.autograd.Function):
    r"""h = dropout(x) A_s^T: the down node, one per distinct input (shared by the sibling layers that read it).

    Shapes: x (N, in), A_s (r, in), seed a 0-dim int64 tensor or None. A_s is cast to x's dtype here when it is not
    in it already (the layer passes a cached cast, so nothing is cast per call); the tensor given is what is saved,
    so a per-call cast is never kept for backward.
    With m the keep-mask and s = 1 / (1 - p):
        forward:   h = (s m * x) A_s^T
        backward:  dL/dx = s m * (dL/dh A_s)          (dL/dh summed by autograd over every layer using this h)
    Saved: A_s (a view of the model's projections) and the seed; the mask is regenerated, never stored.
    """

    @staticmethod
    def forward(ctx, x, vera_A_s, seed, dropout_p):
        x_ad = _dropped(x, seed, dropout_p) if dropout_p > 0.0 else x
        ctx.save_for_backward(vera_A_s, seed)
        ctx.dropout_p = dropout_p
        return torch.mm(x_ad, _as(vera_A_s, x.dtype).t())

    @staticmethod
    def backward(ctx, grad_h):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        vera_A_s, seed = ctx.saved_tensors
        grad_x = torch.mm(grad_h, _as(vera_A_s, grad_h.dtype))
        p = ctx.dropout_p
        if p > 0.0:
            keep = dropout_keep_mask(seed, grad_x.shape, p, grad_x.device)
            grad_x.masked_fill_(~keep, 0).mul_(1.0 / (1.0 - p))
        return grad_x, None, None, None


class VeraUpFunction(torch.autograd.Function):
    r"""y = base + h R^T with R = diag(lambda_b) B_s diag(lambda_d): the up node, one per layer and adapter.

    Shapes: base (N, out) in the model's dtype, h (N, r) in the compute dtype (the same, or float32 on the CPU:
    _dtypes.adapter_compute_dtype); B_s (out, r), lambda_d (r), lambda_b (out) float32.
    R is folded in float32 and rounded once to the compute dtype (no (N x r) or (N x out) elementwise pass):
        forward:   y = base + h R^T                                  (one addmm)
    Backward, with g = dL/dy (N, out) and G = g^T h (out, r), one rank-r GEMM over the tokens:
        dL/dbase       = g                                           (passed through, no copy)
        dL/dh          = g R                                         (N, r)
        dL/dlambda_b[o] = sum_k G[o, k] B_s[o, k] lambda_d[k]        = ((G * B_s) lambda_d)[o]
        dL/dlambda_d[k] = sum_o G[o, k] B_s[o, k] lambda_b[o]        = ((G * B_s)^T lambda_b)[k]
    (both from sum_n g[n, o] * (lambda_d * h[n]) B_s^T[o] rearranged: no (N x out) product is ever formed).
    Saved: h and references to B_s and the lambdas.
    """

    @staticmethod
    def forward(ctx, base, h, vera_B_s, lambda_d, lambda_b):
        ctx.save_for_backward(h, vera_B_s, lambda_d, lambda_b)
        R_t = _fold(vera_B_s, lambda_d, lambda_b, h.dtype).t()
        if base.dtype == h.dtype:
            return torch.addmm(base, h, R_t)
        # a float32 branch on a low-precision base (the CPU rule, _dtypes.adapter_compute_dtype): added in float32,
        # one rounding to the base's dtype, as PEFT's result + delta
        return torch.addmm(base.to(h.dtype), h, R_t).to(base.dtype)

    @staticmethod
    def backward(ctx, g):
        h, vera_B_s, lambda_d, lambda_b = ctx.saved_tensors
        need_base, need_h, _, need_ld, need_lb = ctx.needs_input_grad
        grad_h = grad_ld = grad_lb = None
        gc = _as(g, h.dtype)  # the branch's dtype (g is in the base's)
        if need_h:
            grad_h = torch.mm(gc, _fold(vera_B_s, lambda_d, lambda_b, h.dtype))
        if need_ld or need_lb:
            GB = torch.mm(gc.t(), h).float().mul_(vera_B_s)  # (out, r); .float() of a float32 G is G itself (ours)
            # (lambdas in another dtype, e.g. under FSDP2's bf16 MixedPrecisionPolicy: float32 math, the gradient
            # returned in the lambda's dtype)
            grad_lb = torch.mv(GB, lambda_d.float()).to(lambda_b.dtype) if need_lb else None
            grad_ld = torch.mv(GB.t(), lambda_b.float()).to(lambda_d.dtype) if need_ld else None
        return g if need_base else None, grad_h, None, grad_ld, grad_lb


class VeraUpMixedFunction(torch.autograd.Function):
    r"""y = base + lambda_b[a] * ((h * lambda_d[a]) B_s^T) per row: the up node of a mixed-adapter batch
    (vera_kernels.mixed), each batch row b with its own adapter a = a(b); one node per layer, whatever the number
    of adapters.

    Shapes: base (N, out), h (N, r) as for VeraUpFunction, N = rows * T (row b owns tokens b*T .. b*T+T-1);
    LD (K, r) and LB (K, out) the stacked lambdas (float32), row_adapter (rows,) int64 into them. With
    ld = LD[a(b)] (rows, r) and lb = LB[a(b)] (rows, out) gathered per row (never per token), hd = h * ld and
    u = hd B_s^T (N, out):
        forward:   y = base + u * lb                                     (one GEMM, one addcmul)
    Backward, with g = dL/dy and gb = (g * lb) B_s (N, r):
        dL/dbase    = g
        dL/dh       = gb * ld
        dL/dLD[k]   = sum over rows b with a(b) = k of sum_t gb[b, t] * h[b, t]
        dL/dLB[k]   = sum over rows b with a(b) = k of sum_t g[b, t] * u[b, t]        (u recomputed: one GEMM)
    The per-row sums are scattered to the adapters by a one-hot (K x rows) GEMM: a fixed order, deterministic on
    every device (index_add_ would use atomics on CUDA). A per-adapter g_k^T h_k (K x out x r) is never formed.
    Saved: h, the row index and references to B_s and the stacked lambdas.
    """

    @staticmethod
    def forward(ctx, base, h, vera_B_s, LD, LB, row_adapter, tokens_per_row):
        ctx.save_for_backward(h, vera_B_s, LD, LB, row_adapter)
        ctx.tokens_per_row = tokens_per_row
        rows, cd = row_adapter.shape[0], h.dtype
        out = vera_B_s.shape[0]
        ld = LD.index_select(0, row_adapter).unsqueeze(1)  # (rows, 1, r): float32 products, one rounding
        lb = LB.index_select(0, row_adapter).unsqueeze(1).to(cd)
        hd = (h.view(rows, tokens_per_row, -1) * ld).to(cd).view(h.shape)
        u = torch.mm(hd, _as(vera_B_s, cd).t()).view(rows, tokens_per_row, out)
        if base.dtype == cd:
            return torch.addcmul(base.view(rows, tokens_per_row, out), u, lb).view(base.shape)
        # the CPU's float32 branch on a low-precision base: added in float32, one rounding (as VeraUpFunction)
        return torch.addcmul(base.view(rows, tokens_per_row, out).to(cd), u, lb).to(base.dtype).view(base.shape)

    @staticmethod
    def backward(ctx, g):
        h, vera_B_s, LD, LB, row_adapter = ctx.saved_tensors
        need_base, need_h, _, need_ld, need_lb = ctx.needs_input_grad[:5]
        rows, T, cd = row_adapter.shape[0], ctx.tokens_per_row, h.dtype
        out, r = vera_B_s.shape
        B_c = _as(vera_B_s, cd)
        gc = _as(g, cd).reshape(rows, T, out)
        ld = LD.index_select(0, row_adapter).unsqueeze(1)
        h3 = h.view(rows, T, r)
        grad_h = grad_ld = grad_lb = None
        onehot = None
        if need_ld or need_lb:
            K = LD.shape[0]
            onehot = (row_adapter.unsqueeze(0) == torch.arange(K, device=h.device).unsqueeze(1)).to(torch.float32)
        if need_h or need_ld:
            lb = LB.index_select(0, row_adapter).unsqueeze(1).to(cd)
            gb = torch.mm((gc * lb).view(-1, out), B_c).view(rows, T, r)
            if need_h:
                grad_h = (gb * ld).to(cd).view(h.shape)
            if need_ld:
                per_row = (gb * h3).sum(1, dtype=torch.float32)  # (rows, r)
                grad_ld = torch.mm(onehot, per_row).to(LD.dtype)
        if need_lb:
            u = torch.mm((h3 * ld).to(cd).view(-1, r), B_c.t()).view(rows, T, out)
            per_row = (gc * u).sum(1, dtype=torch.float32)  # (rows, out)
            grad_lb = torch.mm(onehot, per_row).to(LB.dtype)
        return g if need_base else None, grad_h, None, grad_ld, grad_lb, None, None


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _fold(vera_B_s: torch.Tensor, lambda_d: torch.Tensor, lambda_b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """R = diag(lambda_b) B_s diag(lambda_d) (out, r): float32 products (whatever the lambdas' dtype), one rounding
    to ``dtype``."""
    return _as(torch.outer(lambda_b.float(), lambda_d.float()).mul_(vera_B_s), dtype)


def _apply(fn):
    """``fn.apply`` without torch.autograd.Function.apply's Python wrapper (argument binding for setup_context and
    functorch's dead-wrapper unwrapping: ~25 us a call on the development machine, against ~10 us for the C-level
    apply). The wrapper is kept where it does something: under functorch transforms and while torch.compile traces
    (dynamo recognises Function.apply)."""
    c_apply = super(torch.autograd.Function, fn).apply
    py_apply = fn.apply
    transforms_active = torch._C._are_functorch_transforms_active

    def apply(*args):
        if torch.compiler.is_compiling() or transforms_active():
            return py_apply(*args)
        return c_apply(*args)

    return apply


def eager_native(native):
    """``get()`` -> what ``native()`` returns (a C++ function, or None: not loadable here, see ops/native_up.py) in
    eager mode, None under torch.compile and functorch transforms (they trace the Python Functions). ``native()`` is
    asked once per load of the native module (native_up.GENERATION), not per call: its lookups are a good part of a
    small layer's host time."""
    from . import native_up

    transforms_active = torch._C._are_functorch_transforms_active
    is_compiling = torch.compiler.is_compiling
    generation = native_up.GENERATION
    resolved = [None, -1]  # [native() or None, the generation it was asked in]

    def get():
        if is_compiling() or transforms_active():
            return None
        fn, seen = resolved
        if seen != generation[0]:
            fn = resolved[0] = native()
            resolved[1] = generation[0]
        return fn

    return get


def native_first(python_apply, native):
    """An apply that runs the C++ node ``native()`` returns where ``eager_native`` gives it, else ``python_apply``."""
    get = eager_native(native)

    def apply(*args):
        fn = get()
        if fn is not None:
            return fn(*args)
        return python_apply(*args)

    return apply


def _apply_up_native_first():
    """The up node's apply: the C++ VeraUp (no Python frame in forward's node or in backward) where it loads, else
    VeraUpFunction."""
    from .native_up import native_up

    return native_first(_apply(VeraUpFunction), native_up)


def _apply_down_native_first():
    """The down node's apply: the C++ VeraDown (the same ops; on the CPU the dropout in one fused pass, see
    csrc/vera_up.cpp dropout_apply) where it loads, else VeraDownFunction."""
    from .native_up import native_down

    return native_first(_apply(VeraDownFunction), native_down)


apply_down = _apply_down_native_first()
apply_up = _apply_up_native_first()


def _linear_plain_native():
    from .native_up import native_linear_plain

    fn = native_linear_plain()
    return functools.partial(fn, False) if fn is not None else None


# the C++ vera_linear_plain with this backend's up node (VeraUp), or None: see ops.run_linear
linear_plain = eager_native(_linear_plain_native)
apply_up_mixed = _apply(VeraUpMixedFunction)


# ============================================================================================ public
FLAT = True  # this backend's nodes take (N, features) tensors; the layer flattens leading dimensions once
SEEDED = True  # dropout masks regenerated from a seed drawn on the input device
SHARES_H = True  # sibling layers may share h (vera_kernels.sharing)


def down(x: torch.Tensor, vera_A_s: torch.Tensor, dropout_p: float, seed: Optional[torch.Tensor]) -> torch.Tensor:
    """h = dropout(x) A_s^T for x (N, in) and A_s (r, in) (cast to x's dtype if it is not in it).

    Without dropout and with A_s already in x's dtype (the layer's cached cast) this is aten's mm, whose C++
    autograd node keeps a view of A_s and nothing else: no Python frame in forward or backward. Otherwise the
    VeraDownFunction node, which keeps the given A_s (never a per-call cast) and regenerates the mask."""
    if dropout_p == 0.0 and vera_A_s.dtype == x.dtype:
        return torch.mm(x, vera_A_s.t())
    return apply_down(x, vera_A_s, seed, dropout_p)


def up(base: torch.Tensor, h: torch.Tensor, vera_B_s: torch.Tensor, lambda_d: torch.Tensor, lambda_b: torch.Tensor,
       fused_base=None) -> torch.Tensor:
    """base + h R^T for base (N, out), h (N, r) in the compute dtype, B_s (out, r) and the lambdas float32."""
    if fused_base is not None:
        raise ValueError("vera_kernels: the torch backend has no fused base GEMM")
    return apply_up(base, h, vera_B_s, lambda_d, lambda_b)


def up_mixed(base: torch.Tensor, h: torch.Tensor, vera_B_s: torch.Tensor, LD: torch.Tensor, LB: torch.Tensor,
             row_adapter: torch.Tensor, tokens_per_row: int) -> torch.Tensor:
    """base + per-row adapter deltas (VeraUpMixedFunction): base (N, out), h (N, r), B_s (out, r), LD (K, r) and
    LB (K, out) float32, row_adapter (rows,) int64 with N = rows * tokens_per_row."""
    return apply_up_mixed(base, h, vera_B_s, LD, LB, row_adapter, tokens_per_row)
