"""Random inputs of one VeRA op case, shared by tests/test_triton.py and ``make gpu-check`` (a plain module: the GPU
image runs gpu-check without pytest)."""

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
