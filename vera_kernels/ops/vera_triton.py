"""The "triton" backend: fused VeRA forward and backward.

Reads top to bottom: reference -> @triton.jit kernels -> launchers (check, allocate, pick blocks, launch) ->
custom ops (torch.library, with fake implementations, so torch.compile sees them) -> autograd.Function -> public
function. Nothing here queries CUDA at import time; triton itself is imported only when this module is.

The op is two autograd nodes, as in the torch backend (see vera_torch): a down node h = drop(x) A_s^T, one per
distinct input (sibling layers share it), and an up node y = base + h R^T per layer and adapter.
Math (x: (N, in), A_s = A[:, :in] (r, in), B_s = B[:out] (out, r), m the dropout keep-mask, s = 1/(1-p)):
    h = (s m * x) A_s^T                        (N, r)  kept for backward, in x's dtype
    y = base + (h diag(lambda_d)) (diag(lambda_b) B_s)^T
Kernels:
    _vera_down_kernel   C = X W (X (M, K) row tiles, W read as (K, N)), dropout on X fused, optional column scale
                        and partial of sum_m C*H (grad lambda_d) in the epilogue.
                        down node, with dropout: h = drop(x) A_s^T (without dropout cuBLAS's x A_s^T is faster);
                        up node backward: gB = g diag(lambda_b) B_s -> dlambda_d partials, grad_h = gB diag(lambda_d).
    _vera_up_kernel     OUT = [ACC_IN +] [XB WB +] [bias +] drop?(H V), K = r small.
                        up node, fused base arrangement "triton" only: y = x W^T + b + h R^T;
                        down node backward, with dropout: grad_x = drop(grad_h A_s) (mask in the epilogue).
    _scale_projection_kernel  diag(lambda_b) B_s as one small (out, r) operand for the up node's backward, and from
                        the same reads of B_s dlambda_b[o] = sum_k B_s[o,k] lambda_d[k] (g^T h)[o,k], with g^T h
                        (out, r) from one cuBLAS GEMM, never (N x out). dlambda_d = the column sums of the down
                        kernel's per-tile partials.
    _vera_up_mixed_kernel  the mixed-adapter up node (each batch row its own adapter, the lambdas stacked (K, r) and
                        (K, out)): y = base + LB[a] * ((h * LD[a]) B_s^T), the lambdas gathered per row in the
                        prologue (into each h tile) and the epilogue (into the accumulator).
    _vera_up_mixed_grad_h_kernel  its backward's grad_h = ((g * LB[a]) B_s) * LD[a], gathered the same way.
                        In both, when batch rows are at least a row tile long (training), a tile's tokens lie in at
                        most two rows and each gathered lambda tile is two vectors and a select (FEW_ROWS); shorter
                        rows gather per (row, col), with smaller tiles.
    _vera_mixed_lambda_grad_kernel  its backward's lambda gradients, per adapter, from G_k = g_k^T h_k formed tile by
                        tile over the adapter's tokens (batch rows sorted by adapter) and reduced both ways in the
                        epilogue into per-program partials (never K x out x r); the partials' sums are the gradients.
Launches per layer (no dropout): forward none (aten folds R, cuBLAS runs x A_s^T once per input and h R^T into the
base output); backward 2 Triton (scale_projection, down) + cuBLAS's g^T h + the partials' column sum, and cuBLAS's
grad_h A_s once per input. With dropout the down node is the down kernel (forward) and the up kernel (backward), and
one small kernel draws the seed on the device (vera_kernels.ops.draw_dropout_seed), which the kernels read there.
Mixed-adapter up node: forward 1 Triton launch (nothing materialised besides y); backward 2 Triton (grad_h;
lambda gradients) + a sort and a searchsorted of the (batch rows,) adapter ids and the partials' two sums.
A Triton launch costs the host several torch ops (bench/host_overhead.py), which is what small (host-bound) steps
pay for: launches are only used where they save GPU time (a fused mask, fused reductions) or hold the fused base GEMM.
A is read as a strided view of the shared projection in the compute dtype (the layer passes a cached cast); B and
the lambdas are float32, folded into small operands; every dot accumulates in float32, so tiles go from memory to
the tensor cores with no conversion in the main loops (except in the mixed-adapter kernels, whose per-row lambdas
cannot be folded into one operand: they scale the h or g tile and round B_s's float32 tile in the loop).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ..backends import env_value
from .triton_launch import bind, launch, launch_guard, on_clear, plan_cache, recording



# ============================================================================================ reference
# The math the kernels below implement, in plain torch (differentiable; float64 in the tests and gpu-check).
from .reference import vera_formula  # noqa: E402,F401
from .vera_torch import _apply, _as, _fold, eager_native, native_first  # noqa: E402
from .vera_torch import down as torch_down  # noqa: E402


# ============================================================================================ kernels
@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr):
    # input_precision only matters for fp32 operands: "ieee" mirrors torch's default fp32 matmul, "tf32" its
    # allow_tf32 / set_float32_matmul_precision("high") mode.
    if PRECISION == "ieee":
        acc = tl.dot(a, b, acc, input_precision="ieee")
    elif PRECISION == "tf32":
        acc = tl.dot(a, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _dropout_keep(seed, pid_m, local_rows, cols, n_cols, p, BLOCK_M: tl.constexpr, ROW_GROUP_LOG2: tl.constexpr):
    """Keep-mask of elements (row, col) of a (rows, n_cols) input: Philox(seed', row_local * n_cols + col) >= p.

    Rows are grouped in blocks of 2**ROW_GROUP_LOG2 (a multiple of every BLOCK_M) so that the 32-bit counter never
    overflows; the group index is folded into the seed. The same element gets the same bit whatever tile shape a
    kernel uses, so backward regenerates the forward's mask exactly.
    """
    group = (pid_m * BLOCK_M) >> ROW_GROUP_LOG2
    seed_g = seed + group * 1000003
    offs = local_rows[:, None] * n_cols + cols[None, :]
    return tl.rand(seed_g, offs) >= p


@triton.jit
def _scale_projection_kernel(B, LB, LD, OUT, G, DLB, N_OUT, R, stride_bo, stride_br, stride_go, stride_gr,
                             HAS_LD: tl.constexpr, HAS_DLB: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr):
    """OUT (out, r) = diag(lambda_b) B_s [diag(lambda_d)] in the compute dtype: the scales folded once per call into
    a small operand, so the GEMM kernels feed tiles straight from memory to the tensor cores.
    HAS_DLB (backward): also DLB[o] = sum_k G[o, k] B_s[o, k] lambda_d[k], i.e. dlambda_b from G = g^T h (one cuBLAS
    GEMM, never (N x out) elementwise), reading B_s once for both. Each program sums its rows in a fixed order."""
    offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_mask = offs_o < N_OUT
    rows = offs_o.to(tl.int64)
    lb = tl.load(LB + offs_o, mask=o_mask, other=0.0).to(tl.float32)
    if HAS_DLB:
        acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        cols = r0 + tl.arange(0, BLOCK_R)
        r_mask = cols < R
        mask = o_mask[:, None] & r_mask[None, :]
        b = tl.load(B + rows[:, None] * stride_bo + cols[None, :] * stride_br, mask=mask, other=0.0).to(tl.float32)
        if HAS_LD or HAS_DLB:
            ld = tl.load(LD + cols, mask=r_mask, other=0.0).to(tl.float32)
        if HAS_DLB:
            g = tl.load(G + rows[:, None] * stride_go + cols[None, :] * stride_gr, mask=mask, other=0.0)
            acc += tl.sum(g.to(tl.float32) * b * ld[None, :], axis=1)
        scaled = b * lb[:, None]
        if HAS_LD:
            scaled = scaled * ld[None, :]
        tl.store(OUT + rows[:, None] * R + cols[None, :], scaled.to(OUT.dtype.element_ty), mask=mask)
    if HAS_DLB:
        tl.store(DLB + offs_o, acc, mask=o_mask)


@triton.jit
def _vera_down_kernel(
    X, W, OUT, NSCALE, H, PART,
    M, N, K,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_om, stride_on, stride_hm, stride_hn, stride_pm,
    SEED, p, drop_scale,
    HAS_DROPOUT: tl.constexpr, HAS_NSCALE: tl.constexpr, HAS_PARTIAL: tl.constexpr,
    ROW_GROUP_LOG2: tl.constexpr, PRECISION: tl.constexpr, N_FASTEST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C = drop(X) W (X (M, K), W read as (K, N), N = r): OUT = C [diag(NSCALE)]; PART[pid_m] = sum_m C * H.

    forward (with dropout only, fused here so the mask is never stored): OUT = h = drop(x) A_s^T (saved).
    backward: gB = g (lambda_b B_s) -> PART = dlambda_d, OUT = grad_h = gB lambda_d.
    With N_FASTEST the column blocks vary fastest over the grid: the N / BLOCK_N programs that read the same rows of
    X (the large operand: x or g) run side by side, so X comes from HBM once and from L2 for the others. (Off only
    when the row tiles outnumber a grid's second dimension, 65535.)
    """
    if N_FASTEST:
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
    else:
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_m.to(tl.int64)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk
    w_ptrs = W + offs_k[:, None].to(tl.int64) * stride_wk + offs_n[None, :].to(tl.int64) * stride_wn
    local_rows = offs_m - ((pid_m * BLOCK_M) >> ROW_GROUP_LOG2 << ROW_GROUP_LOG2)
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, pid_m, local_rows, k0 + offs_k, K, p, BLOCK_M, ROW_GROUP_LOG2)
            x = tl.where(keep, x.to(tl.float32) * drop_scale, 0.0).to(x.dtype)
        acc = _mma(x, w, acc, PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    mn_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_PARTIAL:
        h = tl.load(H + rows[:, None] * stride_hm + offs_n[None, :] * stride_hn, mask=mn_mask, other=0.0)
        tl.store(PART + pid_m * stride_pm + offs_n, tl.sum(acc * h.to(tl.float32), axis=0), mask=n_mask)
    if HAS_NSCALE:
        acc = acc * tl.load(NSCALE + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + rows[:, None] * stride_om + offs_n[None, :] * stride_on, acc.to(OUT.dtype.element_ty),
             mask=mn_mask)


@triton.jit
def _vera_up_kernel(
    HH, V, OUT, ACC_IN, XB, WB, BIAS,
    M, N, K, KB,
    stride_hm, stride_hk, stride_vk, stride_vn, stride_om, stride_on, stride_am, stride_an,
    stride_xbm, stride_xbk, stride_wbk, stride_wbn,
    SEED, p, drop_scale,
    HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ROW_GROUP_LOG2: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """OUT = [ACC_IN +] [XB WB + BIAS +] drop(HH V), V and WB read as (K, N); K = r is small.

    forward (fused base only): y = x W^T + b + h R^T with R = diag(lambda_b) B_s diag(lambda_d) (one accumulator,
              one write of y).
    backward: grad_x = g W + drop(grad_h A_s) (the mask applies to the rank-r part, so dropout is never combined
              with the fused base).
    One-dimensional grid in GROUP_M-row super-tiles (Triton's matmul swizzle): programs that run together share
    rows of XB and columns of WB, which then come from L2; this matters for the fused base GEMM, whose operands
    do not fit in L2 (the rank-r operands HH and V do).
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_BASE:
        xb_ptrs = XB + rows[:, None] * stride_xbm + offs_k[None, :].to(tl.int64) * stride_xbk
        wb_ptrs = WB + offs_k[:, None].to(tl.int64) * stride_wbk + cols[None, :] * stride_wbn
        for k0 in range(0, KB, BLOCK_K):
            k_mask = (k0 + offs_k) < KB
            a = tl.load(xb_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(wb_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = _mma(a, b, acc, PRECISION)
            xb_ptrs += BLOCK_K * stride_xbk
            wb_ptrs += BLOCK_K * stride_wbk
    h_ptrs = HH + rows[:, None] * stride_hm + offs_k[None, :].to(tl.int64) * stride_hk
    v_ptrs = V + offs_k[:, None].to(tl.int64) * stride_vk + cols[None, :] * stride_vn
    if HAS_DROPOUT:
        acc_r = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc_r = acc
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        hh = tl.load(h_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc_r = _mma(hh, v, acc_r, PRECISION)
        h_ptrs += BLOCK_K * stride_hk
        v_ptrs += BLOCK_K * stride_vk

    mn_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_DROPOUT:
        local_rows = offs_m - ((pid_m * BLOCK_M) >> ROW_GROUP_LOG2 << ROW_GROUP_LOG2)
        keep = _dropout_keep(tl.load(SEED), pid_m, local_rows, offs_n, N, p, BLOCK_M, ROW_GROUP_LOG2)
        acc = acc + tl.where(keep, acc_r * drop_scale, 0.0)
    else:
        acc = acc_r
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if ACCUMULATE:
        acc += tl.load(ACC_IN + rows[:, None] * stride_am + cols[None, :] * stride_an, mask=mn_mask, other=0.0).to(
            tl.float32
        )
    tl.store(OUT + rows[:, None] * stride_om + cols[None, :] * stride_on, acc.to(OUT.dtype.element_ty), mask=mn_mask)


@triton.jit
def _tile_adapters(ROW_ADAPTER, offs_m, m_mask, pid_m, M, T, BLOCK_M: tl.constexpr, FEW_ROWS: tl.constexpr):
    """The adapters of a row tile's tokens (token m belongs to batch row m // T), for _row_lambdas.

    FEW_ROWS (T >= BLOCK_M): the tile's tokens lie in at most two batch rows, so (adapter_0, adapter_1, in_first):
    two scalars and which rows take the first. Else the adapter of every row (int32: the lambda tables are indexed
    in int32, which the launcher checks; a (rows x cols) int64 offset tile costs as many registers as the
    accumulator)."""
    if FEW_ROWS:
        first_row = (pid_m * BLOCK_M) // T
        adapter_0 = tl.load(ROW_ADAPTER + first_row).to(tl.int32)
        adapter_1 = tl.load(ROW_ADAPTER + tl.minimum(first_row + 1, (M - 1) // T)).to(tl.int32)
        in_first = (offs_m // T) == first_row
        adapter = adapter_0
    else:
        adapter = tl.load(ROW_ADAPTER + offs_m // T, mask=m_mask, other=0).to(tl.int32)
        adapter_0 = 0
        adapter_1 = 0
        in_first = m_mask
    return adapter, adapter_0, adapter_1, in_first


@triton.jit
def _row_lambdas(TABLE, stride_k, stride_c, cols, c_mask, m_mask, adapter, adapter_0, adapter_1, in_first,
                 FEW_ROWS: tl.constexpr):
    """TABLE[a(m), cols] for a tile's rows (see _tile_adapters): with FEW_ROWS two vector loads and a select (the
    gathered tile never exists in memory, nor in registers beyond the select), else one load per (row, col)."""
    if FEW_ROWS:
        lam_0 = tl.load(TABLE + adapter_0 * stride_k + cols * stride_c, mask=c_mask, other=0.0)
        lam_1 = tl.load(TABLE + adapter_1 * stride_k + cols * stride_c, mask=c_mask, other=0.0)
        lam = tl.where(in_first[:, None], lam_0[None, :], lam_1[None, :])
    else:
        lam = tl.load(TABLE + (adapter * stride_k)[:, None] + cols[None, :] * stride_c,
                      mask=m_mask[:, None] & c_mask[None, :], other=0.0)
    return lam.to(tl.float32)


@triton.jit
def _vera_up_mixed_kernel(
    HH, V, LD, LB, ROW_ADAPTER, BASE, OUT,
    M, N, K, T,
    stride_hm, stride_hk, stride_vk, stride_vn, stride_ldk, stride_ldr, stride_lbk, stride_lbo,
    stride_bm, stride_bn, stride_om, stride_on,
    FEW_ROWS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """OUT = BASE + LB[a] * ((HH * LD[a]) V) with a = ROW_ADAPTER[m // T] per row, V = B_s read as (K, N), K = r.

    Mixed-adapter up node, forward: lambda_d is gathered per row into the h tile before the dot (prologue), lambda_b
    per row into the accumulator (epilogue) (_row_lambdas), so no (tokens x out) scale tile or intermediate exists
    outside the program. B_s is float32 and rounded to the compute dtype tile by tile (K = r: a few iterations)."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    m_mask = offs_m < M
    n_mask = offs_n < N
    adapter, adapter_0, adapter_1, in_first = _tile_adapters(ROW_ADAPTER, offs_m, m_mask, pid_m, M, T, BLOCK_M,
                                                             FEW_ROWS)
    h_ptrs = HH + rows[:, None] * stride_hm + offs_k[None, :].to(tl.int64) * stride_hk
    v_ptrs = V + offs_k[:, None].to(tl.int64) * stride_vk + cols[None, :] * stride_vn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        mk_mask = m_mask[:, None] & k_mask[None, :]
        hh = tl.load(h_ptrs, mask=mk_mask, other=0.0)
        ld = _row_lambdas(LD, stride_ldk, stride_ldr, k0 + offs_k, k_mask, m_mask, adapter, adapter_0, adapter_1,
                          in_first, FEW_ROWS)
        v = tl.load(v_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        hl = (hh.to(tl.float32) * ld).to(HH.dtype.element_ty)  # one rounding of h * lambda_d, as a folded R has
        acc = _mma(hl, v.to(HH.dtype.element_ty), acc, PRECISION)
        h_ptrs += BLOCK_K * stride_hk
        v_ptrs += BLOCK_K * stride_vk
    mn_mask = m_mask[:, None] & n_mask[None, :]
    lb = _row_lambdas(LB, stride_lbk, stride_lbo, offs_n, n_mask, m_mask, adapter, adapter_0, adapter_1, in_first,
                      FEW_ROWS)
    base = tl.load(BASE + rows[:, None] * stride_bm + cols[None, :] * stride_bn, mask=mn_mask, other=0.0)
    y = base.to(tl.float32) + lb * acc  # float32 sum, one rounding to the base's dtype
    tl.store(OUT + rows[:, None] * stride_om + cols[None, :] * stride_on, y.to(OUT.dtype.element_ty), mask=mn_mask)


@triton.jit
def _vera_up_mixed_grad_h_kernel(
    G, W, LD, LB, ROW_ADAPTER, OUT,
    M, N, K, T,
    stride_gm, stride_gk, stride_wk, stride_wn, stride_ldk, stride_ldr, stride_lbk, stride_lbo,
    stride_om, stride_on,
    FEW_ROWS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """OUT = ((G * LB[a]) W) * LD[a] with a = ROW_ADAPTER[m // T] per row, W = B_s read as (K, N) (K = out, N = r).

    Mixed-adapter up node, backward: grad_h, with lambda_b gathered per row into each g tile before the dot and
    lambda_d per row in the epilogue. Column blocks vary fastest over the grid: the programs reading the same rows
    of g (the large operand) run side by side, so g comes from HBM once."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    m_mask = offs_m < M
    n_mask = offs_n < N
    adapter, adapter_0, adapter_1, in_first = _tile_adapters(ROW_ADAPTER, offs_m, m_mask, pid_m, M, T, BLOCK_M,
                                                             FEW_ROWS)
    g_ptrs = G + rows[:, None] * stride_gm + offs_k[None, :].to(tl.int64) * stride_gk
    w_ptrs = W + offs_k[:, None].to(tl.int64) * stride_wk + cols[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        mk_mask = m_mask[:, None] & k_mask[None, :]
        g = tl.load(g_ptrs, mask=mk_mask, other=0.0)
        lb = _row_lambdas(LB, stride_lbk, stride_lbo, k0 + offs_k, k_mask, m_mask, adapter, adapter_0, adapter_1,
                          in_first, FEW_ROWS)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        gl = (g.to(tl.float32) * lb).to(OUT.dtype.element_ty)
        acc = _mma(gl, w.to(OUT.dtype.element_ty), acc, PRECISION)
        g_ptrs += BLOCK_K * stride_gk
        w_ptrs += BLOCK_K * stride_wk
    mn_mask = m_mask[:, None] & n_mask[None, :]
    ld = _row_lambdas(LD, stride_ldk, stride_ldr, offs_n, n_mask, m_mask, adapter, adapter_0, adapter_1, in_first,
                      FEW_ROWS)
    tl.store(OUT + rows[:, None] * stride_om + cols[None, :] * stride_on, (acc * ld).to(OUT.dtype.element_ty),
             mask=mn_mask)


@triton.jit
def _vera_mixed_lambda_grad_kernel(
    G, H, B, LD, LB, SORTED_ROWS, ROW_START, PART_LD, PART_LB,
    N_OUT, R, T, n_split,
    stride_gm, stride_go, stride_hm, stride_hr, stride_bo, stride_br, stride_ldk, stride_ldr, stride_lbk, stride_lbo,
    stride_pld_s, stride_pld_k, stride_plb_s, stride_plb_k,
    PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Per-adapter lambda gradients from G_k = g_k^T h_k (g_k, h_k: the tokens of the batch rows using adapter k),
    one (BLOCK_O x BLOCK_R) tile of G_k per program, accumulated over the adapter's tokens and never stored:
        PART_LB[s, k, o]  = sum_{kk in the r-tile}  B_s[o, kk] lambda_d[k, kk] G_k[o, kk]
        PART_LD[s', k, kk] = sum_{o in the out-tile} B_s[o, kk] lambda_b[k, o] G_k[o, kk]
    with s = split * r_tiles + r-tile and s' = split * out_tiles + out-tile; the caller sums dim 0 (a fixed order).
    Grid (r-tiles, out-tiles, adapters * n_split); r-tiles vary fastest, so the programs reading the same g tile run
    side by side. SORTED_ROWS lists the batch rows ordered by adapter, adapter k's being
    SORTED_ROWS[ROW_START[k]:ROW_START[k + 1]]; its tokens, taken in that order (T per row), are split into n_split
    contiguous runs of whole BLOCK_T chunks, one per program (more programs when few adapters hold many tokens).
    Token chunks are gathered row by row, so they are dense whatever T is."""
    pid_r = tl.program_id(0)
    pid_o = tl.program_id(1)
    pid_ks = tl.program_id(2)
    adapter = pid_ks // n_split
    split = pid_ks % n_split
    row_lo = tl.load(ROW_START + adapter).to(tl.int32)
    row_hi = tl.load(ROW_START + adapter + 1).to(tl.int32)
    n_tok = (row_hi - row_lo) * T
    per_split = tl.cdiv(tl.cdiv(n_tok, n_split), BLOCK_T) * BLOCK_T
    j_lo = split * per_split
    j_hi = tl.minimum(n_tok, j_lo + per_split)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_t = tl.arange(0, BLOCK_T)
    o_mask = offs_o < N_OUT
    r_mask = offs_r < R
    outs = offs_o.to(tl.int64)
    ranks = offs_r.to(tl.int64)
    acc = tl.zeros((BLOCK_O, BLOCK_R), dtype=tl.float32)
    for j0 in range(j_lo, j_hi, BLOCK_T):
        j = j0 + offs_t
        t_mask = j < j_hi
        batch_row = tl.load(SORTED_ROWS + row_lo + j // T, mask=t_mask, other=0)
        tok = batch_row.to(tl.int64) * T + (j % T)
        g = tl.load(G + outs[:, None] * stride_go + tok[None, :] * stride_gm, mask=o_mask[:, None] & t_mask[None, :],
                    other=0.0)
        h = tl.load(H + tok[:, None] * stride_hm + ranks[None, :] * stride_hr, mask=t_mask[:, None] & r_mask[None, :],
                    other=0.0)
        acc = _mma(g.to(H.dtype.element_ty), h, acc, PRECISION)
    b = tl.load(B + outs[:, None] * stride_bo + ranks[None, :] * stride_br, mask=o_mask[:, None] & r_mask[None, :],
                other=0.0)
    ld = tl.load(LD + adapter * stride_ldk + ranks * stride_ldr, mask=r_mask, other=0.0)
    lb = tl.load(LB + adapter * stride_lbk + outs * stride_lbo, mask=o_mask, other=0.0)
    gb = acc * b.to(tl.float32)
    n_r_tiles = tl.num_programs(0)
    n_o_tiles = tl.num_programs(1)
    slot_lb = (split * n_r_tiles + pid_r).to(tl.int64) * stride_plb_s + adapter * stride_plb_k
    slot_ld = (split * n_o_tiles + pid_o).to(tl.int64) * stride_pld_s + adapter * stride_pld_k
    tl.store(PART_LB + slot_lb + offs_o, tl.sum(gb * ld.to(tl.float32)[None, :], axis=1), mask=o_mask)
    tl.store(PART_LD + slot_ld + offs_r, tl.sum(gb * lb.to(tl.float32)[:, None], axis=0), mask=r_mask)


# ============================================================================================ launchers
ROW_GROUP_MIN = 256  # >= every BLOCK_M used below
GRID_Y_MAX = 65535  # CUDA's limit on a grid's second dimension


def _row_group_log2(n_cols: int) -> int:
    """log2 of the rows per dropout counter group: the largest power of two G with G * n_cols < 2**31."""
    g = max(1, (2**31 - 1) // max(1, n_cols))
    log2 = int(math.floor(math.log2(g)))
    if (1 << log2) < ROW_GROUP_MIN:
        raise ValueError(f"vera_kernels: dropout on inputs with {n_cols} features is not supported (over 2**23)")
    return log2


def _precision(dtype: torch.dtype) -> str:
    if dtype != torch.float32:
        return ""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _pow2_at_least(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(1, n) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # (triton.cdiv is a jit function: slow to call from the host)


@functools.lru_cache(maxsize=512)
def _config(kind: str, M: int, N: int, K: int, dtype: torch.dtype, device: torch.device, dropout: bool = False) -> dict:
    """Block sizes, warps and stages per kernel and shape (a heuristic measured on an H100; see bench/results/).

    The interpreter gets small tiles and no scheduling hints (odd test shapes still span several tiles), of a
    different height per kernel so that tests catch anything (such as the dropout mask) that depends on the tiling.
    On a GPU, no configuration may spill registers, on triton 3.6 or 3.9, sm_80 or sm_90: tests/triton_compile_check.py
    compiles every one without a GPU and fails on spills. Philox dropout holds its counters for a whole tile in
    registers, so masked tiles are kept to <= 32 elements per thread: the masked x tile of "down" (BLOCK_M x BLOCK_K)
    and the masked output tile of "up" (BLOCK_M x BLOCK_N, backward only).
    """
    down_like = kind in ("down", "up_mixed_grad_h", "up_mixed_grad_h_gather")  # (M x r) outputs with a long K
    if device.type != "cuda":
        if kind == "up_mixed_lambdas":
            return dict(BLOCK_T=16, BLOCK_O=32, BLOCK_R=16)
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32) if down_like else dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16)
    wide = dtype != torch.float32  # tensor-core dtypes take bigger tiles than ieee fp32 FMA
    if kind == "up_mixed_lambdas":  # (out x r) tiles of G_k = g_k^T h_k (M = out, N = r), K = the adapter's tokens
        if not wide:
            return dict(BLOCK_T=32, BLOCK_O=64, BLOCK_R=min(64, _pow2_at_least(N)), num_warps=4, num_stages=2)
        return dict(BLOCK_T=64, BLOCK_O=128, BLOCK_R=min(128, _pow2_at_least(N)), num_warps=8, num_stages=3)
    # The mixed-adapter kinds: "_gather" when batch rows are shorter than BLOCK_M (see _mixed_config), whose
    # per-(row, col) lambda tiles hold a float32 value and an offset per element: smaller tiles (ieee fp32's FMA dot
    # spills at 64 x 64 on sm_80 with them).
    if kind == "up_mixed_gather":
        return dict(BLOCK_M=64, BLOCK_N=64 if wide else 32, BLOCK_K=min(64 if wide else 32, _pow2_at_least(K)),
                    num_warps=4, num_stages=2)
    if kind == "up_mixed_grad_h_gather":
        return dict(BLOCK_M=64, BLOCK_N=min(64 if wide else 32, _pow2_at_least(N)), BLOCK_K=32, num_warps=4,
                    num_stages=3 if wide else 2)
    if not wide:
        return dict(BLOCK_M=64, BLOCK_N=64 if not down_like else min(64, _pow2_at_least(N)), BLOCK_K=32,
                    num_warps=4, num_stages=2)
    if kind == "up_mixed_grad_h":  # the down kernel's tiles; each g tile is scaled by a lambda_b tile before the dot
        bm = 128 if M >= 2048 else 64
        bn = min(128, _pow2_at_least(N))
        return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=32, num_warps=8 if bm * bn >= 64 * 128 else 4, num_stages=3)
    if kind == "up_mixed":  # the up kernel's tiles; lambda_d scales each h tile, lambda_b the accumulator
        bm = 128 if M >= 1024 else 64
        bn = 64 if K <= 16 else 128
        return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=min(64, _pow2_at_least(K)),
                    num_warps=8 if bm >= 128 else 4, num_stages=3)
    if kind == "down":  # (M x r), K = in (forward) or out (backward): long K, narrow N
        bm = 128 if M >= 2048 else 64
        bn = min(128, _pow2_at_least(N))
        warps = 8 if bm * bn >= 64 * 128 else 4
        bk = 32 if dropout else 64
        return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=4)
    if kind == "up":  # (M x out or in), K = r: a rank-r update read-modify-writing its output
        bm = 128 if M >= 1024 else 64
        bn = 64 if dropout or K <= 16 else 128  # K <= 16: triton 3.6 spills at 128 x 128 (the ACC_IN load is hoisted)
        return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=min(64, _pow2_at_least(K)),
                    num_warps=8 if bm >= 128 else 4, num_stages=3)
    if kind == "up_base":  # a full GEMM (K = in or out) plus the rank-r update
        bm = 128 if M >= 1024 else 64
        return dict(BLOCK_M=bm, BLOCK_N=256 if bm >= 128 else 128, BLOCK_K=64, num_warps=8, num_stages=3)
    raise ValueError(kind)


def _seed_arg(seed: Optional[torch.Tensor], p: float, like: torch.Tensor, dummy: torch.Tensor) -> torch.Tensor:
    """The SEED pointer argument: the dropout seed, read by the kernels on the device (never a host value baked into
    the launch, so a captured CUDA graph draws a fresh one per replay); any tensor when there is no dropout."""
    if p <= 0:
        return dummy
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError("vera_kernels: dropout needs its seed as a one-element int64 tensor")
    if seed.device != like.device:  # a copy here would be a host value again (and a sync)
        raise ValueError(f"vera_kernels: the dropout seed is on {seed.device} but the input is on {like.device}; "
                         "draw it with vera_kernels.ops.draw_dropout_seed(x.device)")
    return seed


def vera_down(x, w_kn, *, nscale=None, h=None, seed=None, p=0.0, out=None):
    """(C [diag(nscale)], partials): C (M, N) = drop(x) W with W given as a (K, N) view; with ``h``, also the
    per-tile partials (num_m_tiles, N) of sum_m C * h (float32), else None. With ``p`` > 0, ``seed`` is the dropout
    seed as a 0-dim int64 tensor (see _seed_arg). ``out``: C's tensor, (M, N) in x's dtype (else a new one)."""
    M, K = x.shape
    N = w_kn.shape[1]
    if out is None:
        out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    cfg = _config("down", M, N, K, x.dtype, x.device, p > 0)
    n_mtiles = _cdiv(M, cfg["BLOCK_M"])
    part = torch.empty((n_mtiles, N), device=x.device, dtype=torch.float32) if h is not None else None
    if M == 0:
        return out, part
    seed_arg = _seed_arg(seed, p, x, out)
    n_ntiles = _cdiv(N, cfg["BLOCK_N"])
    n_fastest = n_mtiles <= GRID_Y_MAX
    launch(_vera_down_kernel, (n_ntiles, n_mtiles) if n_fastest else (n_mtiles, n_ntiles),
        x, w_kn, out, nscale if nscale is not None else out, h if h is not None else out,
        part if part is not None else out,
        M, N, K,
        x.stride(0), x.stride(1), w_kn.stride(0), w_kn.stride(1), out.stride(0), out.stride(1),
        h.stride(0) if h is not None else 0, h.stride(1) if h is not None else 0,
        part.stride(0) if part is not None else 0,
        seed_arg, p, 1.0 / (1.0 - p) if p > 0 else 1.0,
        HAS_DROPOUT=p > 0, HAS_NSCALE=nscale is not None, HAS_PARTIAL=h is not None, ROW_GROUP_LOG2=_row_group_log2(K) if p > 0 else 31, PRECISION=_precision(x.dtype),
        N_FASTEST=n_fastest, **cfg,
    )
    return out, part


def vera_up(hh, v_kn, out, *, acc_in=None, xb=None, wb_kn=None, bias=None, seed=None, p=0.0):
    """OUT = [acc_in +] [xb WB + bias +] drop(hh V), V and WB given as (K, N) views. ``acc_in`` may be ``out``."""
    M, K = hh.shape
    N = v_kn.shape[1]
    if M == 0 or N == 0:
        return out
    KB = xb.shape[1] if xb is not None else 0
    seed_arg = _seed_arg(seed, p, hh, out)
    cfg = _config("up_base" if xb is not None else "up", M, N, K, hh.dtype, hh.device, p > 0)
    grid = (_cdiv(M, cfg["BLOCK_M"]) * _cdiv(N, cfg["BLOCK_N"]),)
    launch(_vera_up_kernel, grid,
        hh, v_kn, out, acc_in if acc_in is not None else out,
        xb if xb is not None else out, wb_kn if wb_kn is not None else out, bias if bias is not None else out,
        M, N, K, KB,
        hh.stride(0), hh.stride(1), v_kn.stride(0), v_kn.stride(1), out.stride(0), out.stride(1),
        acc_in.stride(0) if acc_in is not None else 0, acc_in.stride(1) if acc_in is not None else 0,
        xb.stride(0) if xb is not None else 0, xb.stride(1) if xb is not None else 0,
        wb_kn.stride(0) if wb_kn is not None else 0, wb_kn.stride(1) if wb_kn is not None else 0,
        seed_arg, p, 1.0 / (1.0 - p) if p > 0 else 1.0,
        HAS_BASE=xb is not None, HAS_BIAS=bias is not None, ACCUMULATE=acc_in is not None, HAS_DROPOUT=p > 0,
        ROW_GROUP_LOG2=_row_group_log2(N) if p > 0 else 31,
        PRECISION=_precision(hh.dtype), GROUP_M=8 if xb is not None else 1,
        **cfg,
    )
    return out


def scale_projection(B_s, lambda_b, dtype, *, fold_d=None, dlb_from=None, out=None, dlb=None):
    """(P, dlambda_b): P = diag(lambda_b) B_s [diag(fold_d)], a contiguous (out, r) tensor in ``dtype``; with
    ``dlb_from = (G, lambda_d)``, G = g^T h (out, r), also dlambda_b = rowsum(G * B_s * lambda_d) in float32 (else
    None), from the same reads of B_s. One small launch. ``out`` / ``dlb``: their tensors (else new ones)."""
    assert fold_d is None or dlb_from is None, "lambda_d is folded in (fused base) or used for dlambda_b, not both"
    n_out, R = B_s.shape
    if out is None:
        out = torch.empty((n_out, R), device=B_s.device, dtype=dtype)
    G, ld = dlb_from if dlb_from is not None else (None, fold_d)
    if dlb is None and G is not None:
        dlb = torch.empty((n_out,), device=B_s.device, dtype=torch.float32)
    if n_out:
        block_o = 64
        launch(_scale_projection_kernel, (_cdiv(n_out, block_o),),
            B_s, lambda_b, ld if ld is not None else lambda_b, out, G if G is not None else out,
            dlb if dlb is not None else out, n_out, R, B_s.stride(0), B_s.stride(1),
            G.stride(0) if G is not None else 0, G.stride(1) if G is not None else 0,
            HAS_LD=fold_d is not None, HAS_DLB=G is not None, BLOCK_O=block_o,
            # with dlambda_b, four fp32 tiles are live: 64 x 128 of them spill at 4 warps (tests/triton_compile_check.py)
            BLOCK_R=min(64 if G is not None else 128, _pow2_at_least(R)),
        )
    return out, dlb


def _check_int32_tables(*tables: torch.Tensor) -> None:
    """The mixed kernels index the stacked lambdas with int32 offsets (fewer registers for their gathered tiles)."""
    for t in tables:
        if sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()) if n) >= 2**31:
            raise ValueError(f"vera_kernels: stacked lambdas of shape {tuple(t.shape)} are too large for up_mixed")


def _mixed_config(kind: str, M: int, N: int, K: int, dtype: torch.dtype, device: torch.device,
                  tokens_per_row: int) -> tuple[dict, bool]:
    """(blocks, FEW_ROWS) of a mixed-adapter kernel: FEW_ROWS when a row tile's tokens lie in at most two batch rows
    (tokens_per_row >= BLOCK_M: training batches), else the per-row gather's (smaller) tiles."""
    cfg = _config(kind, M, N, K, dtype, device)
    if tokens_per_row < cfg["BLOCK_M"]:
        cfg = _config(kind + "_gather", M, N, K, dtype, device)
    return cfg, tokens_per_row >= cfg["BLOCK_M"]


def vera_up_mixed(base, h, B_s, lambda_d, lambda_b, row_adapter, tokens_per_row):
    """y = base + LB[a] * ((h * LD[a]) B_s^T) per token, a = row_adapter[token // tokens_per_row]: one launch
    reading base, h, B_s and the lambdas and writing y (in base's dtype)."""
    M, K = h.shape
    N = B_s.shape[0]
    out = torch.empty((M, N), device=base.device, dtype=base.dtype)
    if M == 0 or N == 0:
        return out
    _check_int32_tables(lambda_d, lambda_b)
    cfg, few_rows = _mixed_config("up_mixed", M, N, K, h.dtype, h.device, tokens_per_row)
    grid = (_cdiv(M, cfg["BLOCK_M"]) * _cdiv(N, cfg["BLOCK_N"]),)
    launch(_vera_up_mixed_kernel, grid,
        h, B_s, lambda_d, lambda_b, row_adapter, base, out,
        M, N, K, tokens_per_row,
        h.stride(0), h.stride(1), B_s.stride(1), B_s.stride(0), lambda_d.stride(0), lambda_d.stride(1),
        lambda_b.stride(0), lambda_b.stride(1), base.stride(0), base.stride(1), out.stride(0), out.stride(1),
        FEW_ROWS=few_rows, PRECISION=_precision(h.dtype), **cfg,
    )
    return out


def vera_up_mixed_grad_h(g, B_s, lambda_d, lambda_b, row_adapter, tokens_per_row, dtype):
    """grad_h = ((g * LB[a]) B_s) * LD[a] per token, in ``dtype`` (h's): one launch."""
    M, K = g.shape
    N = B_s.shape[1]
    out = torch.empty((M, N), device=g.device, dtype=dtype)
    if M == 0 or N == 0:
        return out
    _check_int32_tables(lambda_d, lambda_b)
    cfg, few_rows = _mixed_config("up_mixed_grad_h", M, N, K, dtype, g.device, tokens_per_row)
    grid = (_cdiv(M, cfg["BLOCK_M"]) * _cdiv(N, cfg["BLOCK_N"]),)
    launch(_vera_up_mixed_grad_h_kernel, grid,
        g, B_s, lambda_d, lambda_b, row_adapter, out,
        M, N, K, tokens_per_row,
        g.stride(0), g.stride(1), B_s.stride(0), B_s.stride(1), lambda_d.stride(0), lambda_d.stride(1),
        lambda_b.stride(0), lambda_b.stride(1), out.stride(0), out.stride(1),
        FEW_ROWS=few_rows, PRECISION=_precision(dtype), **cfg,
    )
    return out


_ASSUMED_SMS = 132  # an H100's; only sizes the token split (no device query per call)


def _lambda_grad_splits(n_tokens: int, n_adapters: int, n_tiles: int, device: torch.device) -> int:
    """How many programs share one adapter's tokens: enough programs for the card when few adapters hold many
    tokens (K = 1: one adapter, all tokens), never runs of under ~512 tokens on average. Two in the interpreter, so
    the tests cover the split."""
    if device.type != "cuda":
        return 2
    per_adapter = n_tokens // max(1, n_adapters)
    wanted = _cdiv(4 * _ASSUMED_SMS, max(1, n_tiles * n_adapters))
    return max(1, min(16, wanted, per_adapter // 512))


def vera_mixed_lambda_grads(g, h, B_s, lambda_d, lambda_b, row_adapter, tokens_per_row):
    """(dlambda_d (K, r), dlambda_b (K, out)) in float32, per adapter k over the tokens of the batch rows using it:
        dlambda_d[k, j] = sum_o B_s[o, j] lambda_b[k, o] G_k[o, j]
        dlambda_b[k, o] = sum_j B_s[o, j] lambda_d[k, j] G_k[o, j]
    with G_k = g_k^T h_k formed tile by tile in one launch (never stored: K x out x r). Deterministic: the batch rows
    are ordered by a stable sort, every program reduces its tokens in order and writes its own partial, and the
    partials are summed in a fixed order; an adapter without rows gets zeros."""
    M, R = h.shape
    n_out = B_s.shape[0]
    n_adapters = lambda_d.shape[0]
    cfg = _config("up_mixed_lambdas", n_out, R, M, h.dtype, h.device)
    n_r_tiles, n_o_tiles = _cdiv(R, cfg["BLOCK_R"]), _cdiv(n_out, cfg["BLOCK_O"])
    n_split = _lambda_grad_splits(M, n_adapters, n_r_tiles * n_o_tiles, h.device)
    part_ld = torch.empty((n_split * n_o_tiles, n_adapters, R), device=h.device, dtype=torch.float32)
    part_lb = torch.empty((n_split * n_r_tiles, n_adapters, n_out), device=h.device, dtype=torch.float32)
    if part_ld.numel() and part_lb.numel():
        adapters_sorted, sorted_rows = torch.sort(row_adapter, stable=True)
        row_start = torch.searchsorted(adapters_sorted, torch.arange(n_adapters + 1, device=h.device,
                                                                     dtype=adapters_sorted.dtype))
        launch(_vera_mixed_lambda_grad_kernel, (n_r_tiles, n_o_tiles, n_adapters * n_split),
            g, h, B_s, lambda_d, lambda_b, sorted_rows, row_start, part_ld, part_lb,
            n_out, R, tokens_per_row, n_split,
            g.stride(0), g.stride(1), h.stride(0), h.stride(1), B_s.stride(0), B_s.stride(1),
            lambda_d.stride(0), lambda_d.stride(1), lambda_b.stride(0), lambda_b.stride(1),
            part_ld.stride(0), part_ld.stride(1), part_lb.stride(0), part_lb.stride(1),
            PRECISION=_precision(h.dtype), **cfg,
        )
    return part_ld.sum(0), part_lb.sum(0)


@triton.jit
def _dropout_mask_kernel(OUT, M, N, SEED, p, ROW_GROUP_LOG2: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    local_rows = offs_m - ((pid_m * BLOCK_M) >> ROW_GROUP_LOG2 << ROW_GROUP_LOG2)
    keep = _dropout_keep(tl.load(SEED), pid_m, local_rows, offs_n, N, p, BLOCK_M, ROW_GROUP_LOG2)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(OUT + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], keep.to(tl.int8), mask=mask)


def dropout_keep_mask(seed, shape: tuple[int, int], p: float, device: torch.device) -> torch.Tensor:
    """The keep-mask the triton kernels use for ``seed`` (an int or a 0-dim int64 tensor) on an input of ``shape``
    (for tests and checks)."""
    M, N = shape
    out = torch.empty((M, N), dtype=torch.int8, device=device)
    if M and N:
        seed_t = torch.as_tensor(seed, dtype=torch.int64, device=device)
        grid = (_cdiv(M, 64), _cdiv(N, 16))
        launch(_dropout_mask_kernel, grid, out, M, N, seed_t, float(p), ROW_GROUP_LOG2=_row_group_log2(N),
               BLOCK_M=64, BLOCK_N=16)
    return out.bool()


# ============================================================================================ base-GEMM policy
ENV_BASE_GEMM = "VERA_KERNELS_BASE_GEMM"
BASE_GEMMS = ("cublas", "cublas-accumulate", "triton")


def base_gemm_mode() -> str:
    """How the base GEMM (y = x W^T + b forward, grad_x = g W backward) meets the rank-r update:

    - "cublas": cuBLAS writes the base, then adds the rank-r update into it (forward: h R^T by cuBLAS; backward:
      grad_h A_s by the up kernel, with the dropout mask).
    - "cublas-accumulate": the rank-r update (and bias) is written first; cuBLAS then accumulates the base GEMM into
      it (beta = 1), so the (N x out) read happens in the big GEMM's epilogue, overlapped with its main loop, instead
      of in the memory-bound rank-r GEMM. Same bytes moved.
    - "triton": the base GEMM runs inside the up kernel (one accumulator, one write of y).
    Measured on an H100 (bench/results/, bf16, fwd+bwd GPU time): the Triton GEMM reaches ~590-700 TFLOP/s against
    cuBLAS's ~760-805, which costs more than the pass it saves, at 512 and 8192 tokens, out = 4096 and 11008; so
    "cublas" is the default. "cublas-accumulate" was 1-4% faster than "cublas" at 8192 tokens and 1-3% slower at 512
    in one run (2685fc4), within that run's noise; ``make gpu-check`` compares all three;
    ``VERA_KERNELS_BASE_GEMM`` selects one.
    """
    env = env_value(ENV_BASE_GEMM)
    if env:
        if env not in BASE_GEMMS:
            raise ValueError(f"{ENV_BASE_GEMM}={env!r}: choose one of {BASE_GEMMS}")
        return env
    return "cublas"


# ============================================================================================ custom ops
def _weight_kn(weight: torch.Tensor, fan_in_fan_out: bool, backward: bool) -> torch.Tensor:
    """The base weight as a (K, N) view for y = x W^T (forward) or grad_x = g W (backward)."""
    # Linear stores (out, in); Conv1D (fan_in_fan_out) stores (in, out).
    if backward:
        return weight.t() if fan_in_fan_out else weight  # (out, in)
    return weight if fan_in_fan_out else weight.t()  # (in, out)


def _down_fwd_impl(x: torch.Tensor, vera_A_s: torch.Tensor, seed: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """h = drop(x) A_s^T with the Philox mask applied while the down kernel loads x (never stored). Dropout only:
    without it cuBLAS's x A_s^T is faster (gpu-check at 2685fc4: 428 TFLOP/s against 163-357 for the kernel).
    (Launched through a plan per signature after the first call: see _LaunchPlan.)"""
    return _down_fwd_planned(x, vera_A_s, seed, dropout_p)[0]


def _down_bwd_impl(grad_h: torch.Tensor, vera_A_s: torch.Tensor, seed: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """grad_x = drop(grad_h A_s): the up kernel regenerates the forward's mask in its epilogue."""
    return _down_bwd_planned(grad_h, vera_A_s, seed, dropout_p)[0]


def _down_fwd_planned(x, vera_A_s, seed, dropout_p):
    w_kn = _as(vera_A_s, x.dtype).t()  # (the C++ node's replay makes the same view: csrc/vera_up.cpp)
    key = (x.shape, x.stride(), w_kn.shape, w_kn.stride(), x.dtype, x.device, dropout_p, _precision_key(x.dtype))
    plan = _DOWN_FWD_PLANS.get(key)
    if plan is not None:
        return plan(x, w_kn, seed)[0], plan
    with recording() as calls:
        h = vera_down(x, w_kn, seed=seed, p=dropout_p)[0]
    return h, _LaunchPlan.keep(_DOWN_FWD_PLANS, key, calls, (x, w_kn, seed), (h,))


def _down_bwd_planned(grad_h, vera_A_s, seed, dropout_p):
    A = _as(vera_A_s, grad_h.dtype)
    key = (grad_h.shape, grad_h.stride(), A.shape, A.stride(), grad_h.dtype, grad_h.device, dropout_p,
           _precision_key(grad_h.dtype))
    plan = _DOWN_BWD_PLANS.get(key)
    if plan is not None:
        return plan(grad_h, A, seed)[0], plan
    grad_x = torch.empty((grad_h.shape[0], A.shape[1]), device=grad_h.device, dtype=grad_h.dtype)
    with recording() as calls:
        vera_up(grad_h, A, grad_x, seed=seed, p=dropout_p)
    return grad_x, _LaunchPlan.keep(_DOWN_BWD_PLANS, key, calls, (grad_h, A, seed), (grad_x,))


def _with_replay(planned):
    """``planned`` for the C++ nodes (native_up.native_triton_nodes): (output, the plan's LaunchReplay or None), the
    replay kept there by signature to relaunch the same plan without Python next time."""

    def native(*args):
        out, plan = planned(*args)
        return out, plan.replay() if plan is not None else None

    native.__name__ = native.__qualname__ = planned.__name__.replace("_planned", "_native")
    return native


def _up_fwd_impl(
    base: Optional[torch.Tensor],
    h: torch.Tensor,
    vera_B_s: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
    x: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    fan_in_fan_out: bool,
    base_gemm: str,
) -> torch.Tensor:
    """y = base + h R^T with R = diag(lambda_b) B_s diag(lambda_d), or with ``x``/``weight`` given (the fused base
    arrangements, see base_gemm_mode) y = x W^T + b + h R^T.

    R is folded by aten (two small ops on (out, r), cheaper on the host than a Triton launch and as fast on the GPU at
    these sizes); the rank-r GEMM is cuBLAS's, measured faster than the up kernel on the H100 (0.217 against 0.270 ms
    at 4096->11008, 8192 tokens). The fused arrangement "triton" keeps the up kernel: its accumulator holds x W^T."""
    cd = h.dtype
    R_kn = _fold(vera_B_s, lambda_d, lambda_b, cd).t()  # (r, out)
    if x is None:
        return torch.addmm(base, h, R_kn)
    w_kn = _weight_kn(weight, fan_in_fan_out, False)
    if base_gemm == "triton":
        y = torch.empty((x.shape[0], R_kn.shape[1]), device=x.device, dtype=cd)
        return vera_up(h, R_kn, y, xb=x, wb_kn=w_kn, bias=bias)
    y = torch.addmm(bias, h, R_kn) if bias is not None else torch.mm(h, R_kn)  # "cublas-accumulate"
    return y.addmm_(x, w_kn)


def _up_bwd_impl(
    g: torch.Tensor,
    h: torch.Tensor,
    vera_B_s: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
    need_lambdas: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_h, dlambda_d, dlambda_b): grad_h in g's dtype, the lambda gradients in float32 (empty when not asked).

    cuBLAS's G = g^T h, then the two Triton launches of ``_up_bwd_into``, then the partials' sum. The C++ node
    (native_up.py, ``VeraUpPyBackward``) does the same with G, the outputs and the sum in C++."""
    lambda_d, lambda_b = lambda_d.contiguous(), lambda_b.contiguous()  # the kernels index them densely
    n_out, r = vera_B_s.shape
    G = torch.mm(g.t(), h) if need_lambdas else None  # (out, r): the rank-r GEMM over tokens, no (N x out) products
    Bl = torch.empty((n_out, r), device=g.device, dtype=g.dtype)
    dlb = torch.empty((n_out,), device=g.device, dtype=torch.float32) if need_lambdas else None
    grad_h = torch.empty((g.shape[0], r), device=g.device, dtype=g.dtype)
    part_ld = _up_bwd_into(g, h, vera_B_s, lambda_d, lambda_b, G, Bl, dlb, grad_h)
    if need_lambdas:
        return grad_h, part_ld.sum(0), dlb
    return grad_h, g.new_empty((0,), dtype=torch.float32), g.new_empty((0,), dtype=torch.float32)  # no aliasing


def _up_bwd_into(g, h, vera_B_s, lambda_d, lambda_b, G, Bl, dlb, grad_h) -> Optional[torch.Tensor]:
    """The up node's backward launches, into outputs the caller made (new, contiguous): Bl (out, r) in g's dtype,
    dlb (out,) float32, grad_h (N, r) in g's dtype; with G = g^T h (out, r), or G and dlb None without the lambda
    gradients. Returns the (num_m_tiles, r) float32 partials of dlambda_d (the caller sums them), or None.

    scale_projection writes Bl = diag(lambda_b) B_s and finishes dlambda_b from G in the same pass over B_s; the
    down kernel gives grad_h = g Bl diag(lambda_d) and per-tile partials of dlambda_d = sum_n (g Bl) * h
    (deterministic: summed in a fixed order). The first call of a signature runs the launchers and keeps both
    launches as a _LaunchPlan; the next ones relaunch only (a layer's backward repeats its shapes)."""
    return _up_bwd_planned(g, h, vera_B_s, lambda_d, lambda_b, G, Bl, dlb, grad_h)[0]


def _up_bwd_planned(g, h, vera_B_s, lambda_d, lambda_b, G, Bl, dlb, grad_h):
    need_lambdas = G is not None
    key = (g.shape, g.stride(), h.shape, h.stride(), vera_B_s.shape, vera_B_s.stride(), g.dtype, g.device,
           need_lambdas, _precision_key(g.dtype))
    plan = _UP_BWD_PLANS.get(key)
    if plan is not None:
        return plan(g, h, vera_B_s, lambda_d, lambda_b, G, Bl, dlb, grad_h)[0], plan
    with recording() as calls:
        scale_projection(vera_B_s, lambda_b, g.dtype, dlb_from=(G, lambda_d) if need_lambdas else None, out=Bl,
                         dlb=dlb)
        _, part_ld = vera_down(g, Bl, nscale=lambda_d, h=h if need_lambdas else None, out=grad_h)
    plan = _LaunchPlan.keep(_UP_BWD_PLANS, key, calls, (g, h, vera_B_s, lambda_d, lambda_b, G, Bl, dlb, grad_h),
                            (part_ld,))
    return part_ld, plan


_up_bwd_native = _with_replay(_up_bwd_planned)
_down_fwd_native = _with_replay(_down_fwd_planned)
_down_bwd_native = _with_replay(_down_bwd_planned)


def _precision_key(dtype: torch.dtype):
    """What of the float32 matmul precision the kernels specialise on (their PRECISION constexpr), for plan keys."""
    return torch.get_float32_matmul_precision() if dtype == torch.float32 else None


class _LaunchPlan:
    """A host function's Triton launches bound (triton_launch.BoundLaunch) for one signature of its inputs, kept in
    a triton_launch.PlanCache by the function's own key. A call allocates the outputs (the shapes and dtypes the
    first call made) and relaunches with them: no launcher code runs, no config is looked up, no argument is keyed.

    The key must hold everything the launches' scalar arguments and the outputs' shapes are computed from (shapes,
    strides, dtypes, device, flags, dropout p, the float32 matmul precision); each bound launch checks every tensor's
    dtype and alignment itself and otherwise takes the normal launch (tests/fast_launch_check.py, "plans")."""

    __slots__ = ("launches", "outputs", "device", "_replay")

    @classmethod
    def keep(cls, cache, key, calls, inputs: tuple, outputs: tuple) -> Optional["_LaunchPlan"]:
        """Bind ``calls`` (what ``recording`` collected) to the slots ``inputs + outputs`` and keep the plan under
        ``key``; nothing is kept where a launch cannot be bound (no fast path, the switch off, a launch skipped).
        Returns the plan kept, or None."""
        if not calls:
            return None
        slots = inputs + outputs
        launches = tuple(bind(call, slots) for call in calls)
        if any(b is None for b in launches):
            return None
        plan = cls()
        plan.launches = launches
        plan.outputs = tuple((tuple(t.shape), t.dtype) if t is not None else None for t in outputs)
        plan.device = inputs[0].device
        plan._replay = None
        cache.put(key, plan)
        return plan

    def replay(self):
        """This plan as a C++ LaunchReplay (native_up.launch_replay; made once), or None where the module does not
        load."""
        if self._replay is None:
            from .native_up import clear_replays, launch_replay

            on_clear(clear_replays)
            guard = functools.partial(launch_guard, self.launches, self.launches[0].device)
            self._replay = launch_replay(guard, [b.native_spec() for b in self.launches], list(self.outputs))
        return self._replay

    def __call__(self, *inputs):
        device = self.device
        outputs = tuple(torch.empty(o[0], device=device, dtype=o[1]) if o is not None else None
                        for o in self.outputs)
        slots = inputs + outputs
        for bound in self.launches:
            bound(slots)
        return outputs


_UP_BWD_PLANS = plan_cache()
_DOWN_FWD_PLANS = plan_cache()
_DOWN_BWD_PLANS = plan_cache()


def _up_mixed_fwd_impl(base: torch.Tensor, h: torch.Tensor, vera_B_s: torch.Tensor, lambda_d: torch.Tensor,
                       lambda_b: torch.Tensor, row_adapter: torch.Tensor, tokens_per_row: int) -> torch.Tensor:
    """y = base + LB[a] * ((h * LD[a]) B_s^T), a = row_adapter[token // tokens_per_row]: one Triton launch."""
    return vera_up_mixed(base, h, vera_B_s, lambda_d, lambda_b, row_adapter, tokens_per_row)


def _up_mixed_bwd_impl(
    g: torch.Tensor,
    h: torch.Tensor,
    vera_B_s: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
    row_adapter: torch.Tensor,
    tokens_per_row: int,
    need_h: bool,
    need_lambdas: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_h, dlambda_d, dlambda_b): grad_h in h's dtype, the stacked lambdas' gradients (K, r) and (K, out) in
    float32; each empty when not asked. One Triton launch each (see the Function's docstring)."""
    empty = g.new_empty((0,), dtype=torch.float32)
    grad_h = (vera_up_mixed_grad_h(g, vera_B_s, lambda_d, lambda_b, row_adapter, tokens_per_row, h.dtype) if need_h
              else g.new_empty((0,), dtype=h.dtype))
    if not need_lambdas:
        return grad_h, empty, empty.clone()  # (outputs may not alias one another)
    grad_ld, grad_lb = vera_mixed_lambda_grads(g, h, vera_B_s, lambda_d, lambda_b, row_adapter, tokens_per_row)
    return grad_h, grad_ld, grad_lb


# torch.compile sees these ops (with their fake implementations); eager calls skip the dispatcher's overhead.
triton_vera_down_fwd = torch.library.custom_op("vera_kernels::triton_vera_down_fwd", mutates_args=())(_down_fwd_impl)
triton_vera_down_bwd = torch.library.custom_op("vera_kernels::triton_vera_down_bwd", mutates_args=())(_down_bwd_impl)
triton_vera_up_fwd = torch.library.custom_op("vera_kernels::triton_vera_up_fwd", mutates_args=())(_up_fwd_impl)
triton_vera_up_bwd = torch.library.custom_op("vera_kernels::triton_vera_up_bwd", mutates_args=())(_up_bwd_impl)
triton_vera_up_mixed_fwd = torch.library.custom_op("vera_kernels::triton_vera_up_mixed_fwd",
                                                   mutates_args=())(_up_mixed_fwd_impl)
triton_vera_up_mixed_bwd = torch.library.custom_op("vera_kernels::triton_vera_up_mixed_bwd",
                                                   mutates_args=())(_up_mixed_bwd_impl)


@triton_vera_down_fwd.register_fake
def _(x, vera_A_s, seed, dropout_p):
    return x.new_empty((x.shape[0], vera_A_s.shape[0]))


@triton_vera_down_bwd.register_fake
def _(grad_h, vera_A_s, seed, dropout_p):
    return grad_h.new_empty((grad_h.shape[0], vera_A_s.shape[1]))


@triton_vera_up_fwd.register_fake
def _(base, h, vera_B_s, lambda_d, lambda_b, x, weight, bias, fan_in_fan_out, base_gemm):
    return h.new_empty((h.shape[0], vera_B_s.shape[0]))


@triton_vera_up_bwd.register_fake
def _(g, h, vera_B_s, lambda_d, lambda_b, need_lambdas):
    n_d, n_b = (vera_B_s.shape[1], vera_B_s.shape[0]) if need_lambdas else (0, 0)
    return (g.new_empty(h.shape), g.new_empty((n_d,), dtype=torch.float32),
            g.new_empty((n_b,), dtype=torch.float32))


@triton_vera_up_mixed_fwd.register_fake
def _(base, h, vera_B_s, lambda_d, lambda_b, row_adapter, tokens_per_row):
    return base.new_empty((base.shape[0], vera_B_s.shape[0]))


@triton_vera_up_mixed_bwd.register_fake
def _(g, h, vera_B_s, lambda_d, lambda_b, row_adapter, tokens_per_row, need_h, need_lambdas):
    grad_h = g.new_empty(h.shape, dtype=h.dtype) if need_h else g.new_empty((0,), dtype=h.dtype)
    if not need_lambdas:
        return grad_h, g.new_empty((0,), dtype=torch.float32), g.new_empty((0,), dtype=torch.float32)
    return (grad_h, g.new_empty(lambda_d.shape, dtype=torch.float32),
            g.new_empty(lambda_b.shape, dtype=torch.float32))


def _call(op, impl, *args):
    return op(*args) if torch.compiler.is_compiling() else impl(*args)


# ============================================================================================ autograd
class VeraDownTritonFunction(torch.autograd.Function):
    r"""h = drop(x) A_s^T with the mask fused into the down kernel's loads (dropout only; without dropout the layer
    uses the torch backend's cuBLAS down node). Same derivation as vera_torch.VeraDownFunction:
        dL/dx = s m * (dL/dh A_s)      (the up kernel applies the regenerated mask in its epilogue)
    Saved: A_s (a view of the model's projections) and the seed (a 0-dim device tensor)."""

    @staticmethod
    def forward(ctx, x, vera_A_s, seed, dropout_p):
        ctx.save_for_backward(vera_A_s, seed)
        ctx.dropout_p = dropout_p
        return _call(triton_vera_down_fwd, _down_fwd_impl, x, vera_A_s, seed, dropout_p)

    @staticmethod
    def backward(ctx, grad_h):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        vera_A_s, seed = ctx.saved_tensors
        return _call(triton_vera_down_bwd, _down_bwd_impl, grad_h, vera_A_s, seed, ctx.dropout_p), None, None, None


class VeraUpTritonFunction(torch.autograd.Function):
    r"""y = base + (h diag(lambda_d)) (diag(lambda_b) B_s)^T, or x W^T + b + ... in the fused base arrangements.
    Same derivation as vera_torch.VeraUpFunction, with the lambda reductions fused:
        gB = g diag(lambda_b) B_s;   dlambda_d = sum_n gB * h;   dL/dh = gB diag(lambda_d)
        dlambda_b[o] = sum_k B_s[o, k] lambda_d[k] (g^T h)[o, k]     (no (N x out) tensor)
        fused base only: dL/dx = g W_eff,  dW = g^T x (x^T g for Conv1D),  db = sum_n g
    Saved: h (N x r, the compute dtype), references to B_s and the lambdas (plus x only when the base weight needs
    grad). Reductions over tokens are deterministic: per-tile partials and one GEMM, summed in a fixed order. A
    float32-atomics variant would need a zero-fill launch in place of the partials' sum, so there is one path,
    deterministic whatever ``torch.use_deterministic_algorithms`` says.
    """

    @staticmethod
    def forward(ctx, base, h, vera_B_s, lambda_d, lambda_b, x, weight, bias, fan_in_fan_out, base_gemm):
        y = _call(triton_vera_up_fwd, _up_fwd_impl, base, h, vera_B_s, lambda_d, lambda_b, x, weight, bias,
                  fan_in_fan_out, base_gemm)
        needs_w = weight is not None and ctx.needs_input_grad[6]
        ctx.save_for_backward(h, vera_B_s, lambda_d, lambda_b, x if needs_w else None, weight)
        ctx.fan_in_fan_out = fan_in_fan_out
        return y

    @staticmethod
    def backward(ctx, g):
        h, vera_B_s, lambda_d, lambda_b, x, weight = ctx.saved_tensors
        need_base, need_h, _, need_ld, need_lb, need_x, need_w, need_b = ctx.needs_input_grad[:8]
        grad_h, grad_ld, grad_lb = _call(triton_vera_up_bwd, _up_bwd_impl, g, h, vera_B_s, lambda_d, lambda_b,
                                         need_ld or need_lb)
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = torch.mm(g, _weight_kn(weight, ctx.fan_in_fan_out, True))
        if need_w:
            grad_w = (x.t() @ g) if ctx.fan_in_fan_out else (g.t() @ x)
        if need_b:
            grad_b = g.sum(0)
        return (g if need_base else None, grad_h if need_h else None, None,
                grad_ld.to(lambda_d.dtype) if need_ld else None, grad_lb.to(lambda_b.dtype) if need_lb else None,
                grad_x, grad_w, grad_b, None, None)


class VeraUpMixedTritonFunction(torch.autograd.Function):
    r"""The mixed-adapter up node: each batch row uses its own adapter of the K stacked in LD (K, r) and LB (K, out)
    (the shared A and B make h = x A_s^T one GEMM for every row: the down node). With T = tokens_per_row and
    a(n) = row_adapter[n // T]:
        forward:   y[n] = base[n] + LB[a] * ((h[n] * LD[a]) B_s^T)         (one kernel, lambdas gathered per row)
    Backward, with g = dL/dy (N, out) and, per adapter k, g_k, h_k the rows of g and h of the tokens with a(n) = k:
        dL/dbase       = g                                                 (passed through, no copy)
        dL/dh[n]       = ((g[n] * LB[a]) B_s) * LD[a]                      (one kernel, lambdas gathered per row)
        dL/dLD[k, j]   = sum_{n: a(n)=k} ((g[n] * LB[k]) B_s)[j] h[n, j]
                       = sum_o B_s[o, j] LB[k, o] G_k[o, j],   G_k = g_k^T h_k   (out, r)
        dL/dLB[k, o]   = sum_{n: a(n)=k} g[n, o] ((h[n] * LD[k]) B_s^T)[o]
                       = sum_j B_s[o, j] LD[k, j] G_k[o, j]
    (both from sum_n g[n, o] LB[a, o] B_s[o, j] LD[a, j] h[n, j], summed over n per adapter). One kernel forms G_k
    tile by tile over the adapter's tokens (never stored: K x out x r) and reduces each tile both ways into
    per-program partials, summed in a fixed order: deterministic, no atomics; an adapter with no rows gets zeros.
    Saved: h (N x r), row_adapter and references to B_s and the stacked lambdas.
    """

    @staticmethod
    def forward(ctx, base, h, vera_B_s, lambda_d, lambda_b, row_adapter, tokens_per_row):
        ctx.save_for_backward(h, vera_B_s, lambda_d, lambda_b, row_adapter)
        ctx.tokens_per_row = tokens_per_row
        return _call(triton_vera_up_mixed_fwd, _up_mixed_fwd_impl, base, h, vera_B_s, lambda_d, lambda_b,
                     row_adapter, tokens_per_row)

    @staticmethod
    def backward(ctx, g):
        h, vera_B_s, lambda_d, lambda_b, row_adapter = ctx.saved_tensors
        need_base, need_h, _, need_ld, need_lb = ctx.needs_input_grad[:5]
        grad_h = grad_ld = grad_lb = None
        if need_h or need_ld or need_lb:
            grad_h, grad_ld, grad_lb = _call(triton_vera_up_mixed_bwd, _up_mixed_bwd_impl, g, h, vera_B_s, lambda_d,
                                             lambda_b, row_adapter, ctx.tokens_per_row, need_h, need_ld or need_lb)
        return (g if need_base else None, grad_h if need_h else None, None,
                grad_ld.to(lambda_d.dtype) if need_ld else None, grad_lb.to(lambda_b.dtype) if need_lb else None,
                None, None)


def _native_node(which: int):
    """The C++ node ``which`` (0: the up node without a fused base, 1: the dropout down node) of native_up.py's
    ``native_triton_nodes``, registered with this module's implementations, or None where it does not load."""
    from .native_up import native_triton_nodes

    nodes = native_triton_nodes(_up_bwd_native, _down_fwd_native, _down_bwd_native)
    return nodes[which] if nodes is not None else None


def _apply_up_plain():
    """The up node without a fused base: the C++ node whose backward calls ``_up_bwd_into`` (``VeraUpPyBackward``,
    the same forward as the torch backend's C++ node) where it loads, else VeraUpTritonFunction."""

    def python_apply(base, h, vera_B_s, lambda_d, lambda_b):
        return apply_up(base, h, vera_B_s, lambda_d, lambda_b, None, None, None, False, "cublas")

    return native_first(python_apply, lambda: _native_node(0))


def _linear_plain_native():
    from .native_up import native_linear_plain

    fn = native_linear_plain()
    if fn is None or _native_node(0) is None:  # (registers the up node's backward, which its up node calls)
        return None
    return functools.partial(fn, True)


# the C++ vera_linear_plain with this backend's up node (VeraUpPyBackward), or None: see ops.run_linear
linear_plain = eager_native(_linear_plain_native)

# the dropout down node: the C++ VeraDownPy (forward and backward through _down_fwd_impl / _down_bwd_impl) where it
# loads, else VeraDownTritonFunction
apply_down_dropout = native_first(_apply(VeraDownTritonFunction), lambda: _native_node(1))
apply_up = _apply(VeraUpTritonFunction)
apply_up_plain = _apply_up_plain()
apply_up_mixed = _apply(VeraUpMixedTritonFunction)


# ============================================================================================ public
FLAT = True  # (N, features) tensors; the layer flattens leading dimensions once
SEEDED = True  # dropout masks regenerated from a seed drawn on the input device
SHARES_H = True  # sibling layers may share h (vera_kernels.sharing)


def down(x: torch.Tensor, vera_A_s: torch.Tensor, dropout_p: float, seed: Optional[torch.Tensor]) -> torch.Tensor:
    """h = dropout(x) A_s^T for x (N, in) and A_s (r, in) (cast to x's dtype if it is not in it; the given tensor is
    what backward keeps): the fused-mask kernel with dropout, cuBLAS
    (the torch backend's down node) without."""
    if dropout_p > 0.0:
        return apply_down_dropout(x, vera_A_s, _seed_arg(seed, dropout_p, x, x), dropout_p)
    if vera_A_s.dtype == x.dtype:  # torch_down's own first case, without its frame (aten's C++ mm node)
        return torch.mm(x, vera_A_s.t())
    return torch_down(x, vera_A_s, 0.0, None)


def up(base: Optional[torch.Tensor], h: torch.Tensor, vera_B_s: torch.Tensor, lambda_d: torch.Tensor,
       lambda_b: torch.Tensor, fused_base=None) -> torch.Tensor:
    """base + h R^T (base (N, out), h (N, r) in the compute dtype, B_s (out, r) and the lambdas float32); with
    ``fused_base = (x, weight, bias, fan_in_fan_out, mode)`` and base None, the base GEMM is computed here."""
    if fused_base is None:
        return apply_up_plain(base, h, vera_B_s, lambda_d, lambda_b)
    x, weight, bias, fan_in_fan_out, mode = fused_base
    if mode not in ("cublas-accumulate", "triton"):
        raise ValueError(f"vera_kernels: base_gemm={mode!r} is not a fused arrangement")
    return apply_up(None, h, vera_B_s, lambda_d, lambda_b, x, weight, bias, fan_in_fan_out, mode)


def up_mixed(base: torch.Tensor, h: torch.Tensor, vera_B_s: torch.Tensor, LD: torch.Tensor, LB: torch.Tensor,
             row_adapter: torch.Tensor, tokens_per_row: int) -> torch.Tensor:
    """base + LB[a] * ((h * LD[a]) B_s^T) per token, each batch row with its own adapter: base (N, out) in the
    model's dtype, h (N, r) in the compute dtype, B_s (out, r) float32 (any strides), LD (K, r) and LB (K, out)
    float32 (the stacked lambdas of the batch's adapters), row_adapter (Bsz,) int64 on the device with values in
    [0, K), and N = Bsz * tokens_per_row (token n belongs to batch row n // tokens_per_row)."""
    n_rows = row_adapter.shape[0]
    if h.shape[0] != n_rows * tokens_per_row or base.shape[0] != h.shape[0]:
        raise ValueError(f"vera_kernels: up_mixed needs N = batch rows x tokens_per_row, got base {tuple(base.shape)}, "
                         f"h {tuple(h.shape)}, {n_rows} rows x {tokens_per_row} tokens")
    return apply_up_mixed(base, h, vera_B_s, LD, LB, row_adapter, tokens_per_row)
