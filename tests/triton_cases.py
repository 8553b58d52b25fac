"""Random inputs of one VeRA op case, and the activation-checkpointing dropout check, shared by the tests and
``make gpu-check`` (a plain module: the GPU image runs gpu-check without pytest)."""

from __future__ import annotations

import torch


def random_inputs(N, fin, fout, r, in_max, out_max, dtype, *, device, seed=0, generator=None, fifo=False, bias=True,
                  strided=False, lead=(), wgrad=False):
    """(x, W, b, A, B, lambda_d, lambda_b), drawn in that order from ``generator`` (a CPU generator; the caller may
    draw more from it afterwards), or from a fresh one seeded with ``seed``.

    x (*lead, N, fin) in ``dtype`` requires grad; with ``strided`` it is every other column of a wider tensor.
    W is (out, in), or (in, out) with ``fifo`` (Conv1D), scaled by fin**-0.5; W and b require grad with ``wgrad``.
    A (r, in_max) and B (out_max, r) are float32 with Kaiming-uniform-like scales, lambdas float32 requiring grad.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    if strided:
        x = rnd(*lead, N, 2 * fin).to(dtype)[..., ::2]
    else:
        x = rnd(*lead, N, fin).to(dtype)
    x.requires_grad_(True)
    W = (rnd(fin, fout) if fifo else rnd(fout, fin)).mul(fin**-0.5).to(dtype).requires_grad_(wgrad)
    b = rnd(fout).to(dtype).requires_grad_(wgrad) if bias else None
    A = rnd(r, in_max, scale=(6 / in_max) ** 0.5)
    B = rnd(out_max, r, scale=(6 / r) ** 0.5)
    ld = rnd(r).requires_grad_(True)
    lb = rnd(fout).requires_grad_(True)
    return x, W, b, A, B, ld, lb


def checkpointed_dropout_grads(backend: str, device, use_reentrant: bool, dtype=torch.float32) -> dict:
    """Gradients of one training step of a patched two-layer block with adapter dropout, three ways: plainly, under
    torch.utils.checkpoint (which re-runs the forward in backward and must draw the same dropout seeds: torch
    restores the RNG state of the CPU and of the arguments' devices), and plainly with another seed (other masks).
    Returns {"plain", "checkpointed", "other_seed"}: lists of gradients (x, then the trainable lambdas)."""
    from torch import nn
    from torch.utils.checkpoint import checkpoint

    import vera_kernels as vk

    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 24)).to(device, dtype)
    cfg = vk.VeraConfig(r=8, target_modules=["0", "2"], init_weights=False, vera_dropout=0.5)
    vk.patch_model(block, cfg, backend=backend)
    block.train()
    x = torch.randn(2, 9, 24, device=device, dtype=dtype, requires_grad=True)
    params = [x] + [q for q in block.parameters() if q.requires_grad]

    def grads(run, seed=11):  # .backward(): the reentrant checkpoint refuses autograd.grad
        for q in params:
            q.grad = None
        torch.manual_seed(seed)
        run(x).float().square().sum().backward()
        return [q.grad.clone() for q in params]

    return dict(plain=grads(block), checkpointed=grads(lambda t: checkpoint(block, t, use_reentrant=use_reentrant)),
                other_seed=grads(block, seed=12))


def mixed_inputs(n_rows, T, n_out, r, K, dtype, *, device, seed=0, generator=None, rows=None, strided=False,
                 zero_adapter=None, zero=("LD", "LB")):
    """(base, h, B_s, LD, LB, row_adapter, T) of one mixed-adapter up-node case (vera_triton.up_mixed), drawn from
    ``generator`` (a CPU generator) or a fresh one seeded with ``seed``: fresh random values, never zero.

    base (N, out) and h (N, r) in ``dtype`` require grad, N = n_rows * T; B_s (out, r) float32 is a row slice of a
    larger shared B (frozen); LD (K, r) and LB (K, out) float32 require grad. ``rows``: each batch row's adapter
    (default: drawn uniformly from [0, K)). ``strided``: base, h and B_s are column-strided views (h transposed too).
    ``zero_adapter``: that adapter's rows of the lambdas named in ``zero`` are zeros (both: the "no adapter" row)."""
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    N = n_rows * T

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    if strided:  # cast first, then sliced: the views reach the op
        base = rnd(N, 2 * n_out).to(device, dtype)[:, ::2]
        h = rnd(2 * r, N).to(device, dtype)[::2].t()
        B = rnd(n_out + 5, 2 * r, scale=(6 / r) ** 0.5).to(device)[:, ::2]
    else:
        base = rnd(N, n_out).to(device, dtype)
        h = rnd(N, r).to(device, dtype)
        B = rnd(n_out + 5, r, scale=(6 / r) ** 0.5).to(device)
    LD, LB = rnd(K, r), rnd(K, n_out)
    if zero_adapter is not None:
        for name, lam in (("LD", LD), ("LB", LB)):
            if name in zero:
                lam[zero_adapter] = 0.0
    if rows is None:
        rows = torch.randint(0, K, (n_rows,), generator=gen).tolist()
    row_adapter = torch.tensor(rows, dtype=torch.int64, device=device)
    return (base.requires_grad_(True), h.requires_grad_(True), B[:n_out], LD.to(device).requires_grad_(True),
            LB.to(device).requires_grad_(True), row_adapter, T)


def mixed_up_formula(base, h, B_s, LD, LB, row_adapter, T):
    """y[n] = base[n] + LB[a] * ((h[n] * LD[a]) B_s^T), a = row_adapter[n // T], in plain torch, differentiable,
    every operand in base's dtype, the lambdas gathered per token. On float64 tensors the exact reference; on
    low-precision ones plain PyTorch in that dtype (whose error the kernels are judged against)."""
    dtype = base.dtype
    a = row_adapter.repeat_interleave(T)
    return base + LB.to(dtype)[a] * ((h.to(dtype) * LD.to(dtype)[a]) @ B_s.to(dtype).t())


def mixed_yardstick(inputs, g, dtype):
    """[y, dL/dbase, dL/dh, dL/dLD, dL/dLB] of mixed_up_formula for ``inputs`` (as mixed_inputs returns them) and
    dL/dy = ``g``, with base, h and the lambdas in ``dtype``."""
    base, h, B_s, LD, LB, row_adapter, T = inputs
    ins = [t.detach().to(dtype).requires_grad_(True) for t in (base, h, LD, LB)]
    y = mixed_up_formula(ins[0], ins[1], B_s, ins[2], ins[3], row_adapter, T)
    if not y.numel():
        return [y] + [torch.zeros_like(t) for t in ins]
    return [y] + list(torch.autograd.grad(y, ins, g.to(y.dtype)))
