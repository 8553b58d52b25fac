"""The triton backend's mixed-adapter up node (``vera_triton.up_mixed``: each batch row with its own adapter) against
a float64 evaluation of its formula (CPU: Triton's interpreter; tiny, odd shapes).

    y[n] = base[n] + LB[a] * ((h[n] * LD[a]) B_s^T),   a = row_adapter[n // T]

Forward and every gradient are judged per dtype against PyTorch's own error in that dtype (the same formula in plain
torch ops, a gather per row, vs float64), as in test_triton.py, and element by element against float64 within the
row's (atol, rtol). bf16 is verified on a GPU only (bench/gpu_check.py): the interpreter's bf16 tl.dot is broken.
"""

from __future__ import annotations

import pytest
import torch

from triton_cases import mixed_inputs, mixed_yardstick

vt = pytest.importorskip("vera_kernels.ops.vera_triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = DEVICE.type != "cuda"
FLOOR = {torch.float32: 2e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}
FACTOR = 4.0
# (dtype, atol, rtol): element-wise bounds against float64, atol relative to the tensor's largest magnitude
DTYPE_ROWS = [
    pytest.param(torch.float32, 1e-6, 1e-5, id="float32"),
    pytest.param(torch.float16, 1e-3, 1e-2, id="float16"),
    pytest.param(torch.bfloat16, 8e-3, 8e-2, id="bfloat16",
                 marks=pytest.mark.skipif(INTERPRETED, reason="the Triton interpreter's bf16 tl.dot is broken; "
                                                              "bf16 is checked on a GPU by bench/gpu_check.py")),
]

# name -> (batch rows, tokens per row T, out, r, adapters K, row_adapter); none a multiple of the interpreter's tiles
CASES = {
    # adapter 1 has no rows; adapter 2 repeated and interleaved with the others
    "odd": (5, 7, 37, 19, 4, [2, 0, 2, 3, 2]),
    "T=1": (9, 1, 37, 19, 3, [0, 1, 2, 1, 0, 0, 2, 1, 1]),
    "Bsz=1": (1, 23, 37, 19, 1, [0]),
    "Bsz=1-of-3": (1, 23, 37, 19, 3, [1]),
    "one-adapter": (4, 9, 29, 8, 1, [0, 0, 0, 0]),
    # several token chunks per adapter, r and out over several tiles, every adapter used
    "wide": (3, 40, 70, 40, 2, [1, 0, 1]),
    "even": (4, 16, 32, 16, 2, [0, 1, 1, 0]),
}


def make_inputs(case, dtype, *, seed=0, **layout):
    """(base, h, B_s, LD, LB, row_adapter, T) on DEVICE for one of CASES (see triton_cases.mixed_inputs)."""
    n_rows, T, n_out, r, K, rows = CASES[case]
    return mixed_inputs(n_rows, T, n_out, r, K, dtype, device=DEVICE, seed=seed, rows=rows, **layout)


def _grad_out(y, seed=7):
    return torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, y.dtype)


def run_ours(base, h, B_s, LD, LB, row_adapter, T, g):
    y = vt.up_mixed(base, h, B_s, LD, LB, row_adapter, T)
    return [y] + list(torch.autograd.grad(y, [base, h, LD, LB], g))


def run_reference(base, h, B_s, LD, LB, row_adapter, T, g, dtype):
    return mixed_yardstick((base, h, B_s, LD, LB, row_adapter, T), g, dtype)


NAMES = ["y", "grad_base", "grad_h", "grad_LD", "grad_LB"]


def check(inputs, atol, rtol):
    base, h = inputs[0], inputs[1]
    dtype = base.dtype
    g = _grad_out(torch.empty(base.shape, dtype=dtype))
    ours = run_ours(*inputs, g)
    truth = run_reference(*inputs, g, torch.float64)
    theirs = run_reference(*inputs, g, dtype)
    expected_dtypes = [dtype, dtype, h.dtype, torch.float32, torch.float32]
    for name, o, th, tr, edt in zip(NAMES, ours, theirs, truth, expected_dtypes):
        assert o.shape == tr.shape and o.dtype == edt, (name, o.shape, o.dtype)
        assert torch.isfinite(o).all(), f"{name} has non-finite values"
        denom = tr.norm().item() or 1.0
        err = (o.double() - tr).norm().item() / denom
        torch_err = (th.double() - tr).norm().item() / denom
        assert err <= max(FACTOR * torch_err, FLOOR[dtype]), f"{name}: error {err:.3e} vs torch's {torch_err:.3e}"
        scale = tr.abs().max().item() or 1.0
        torch.testing.assert_close(o.double(), tr, atol=atol * scale, rtol=rtol, msg=lambda m: f"{name}: {m}")
    return ours, g


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_ROWS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64(case, dtype, atol, rtol):
    check(make_inputs(case, dtype), atol, rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_ROWS)
@pytest.mark.parametrize("case", ["odd", "T=1", "wide"])
def test_strided_inputs(case, dtype, atol, rtol):
    check(make_inputs(case, dtype, strided=True, seed=3), atol, rtol)


@pytest.mark.parametrize("zero", [("LD", "LB"), ("LD",), ("LB",)], ids=["no-adapter", "LD", "LB"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPE_ROWS)
def test_zero_lambda_rows_are_adapters_like_any_other(dtype, atol, rtol, zero):
    """Rows of an adapter with a zero lambda (both zero: the "no adapter" row) get y = base exactly and grad_h = 0;
    each lambda's gradient is proportional to the other lambda: zero exactly where the formula says."""
    inputs = make_inputs("odd", dtype, zero_adapter=2, zero=zero, seed=5)
    (y, _, grad_h, grad_LD, grad_LB), g = check(inputs, atol, rtol)
    base, row_adapter, T = inputs[0], inputs[5], inputs[6]
    uses_zero = (row_adapter == 2).repeat_interleave(T)
    assert torch.equal(y[uses_zero], base.detach()[uses_zero])
    assert torch.equal(grad_h[uses_zero], torch.zeros_like(grad_h[uses_zero]))
    assert bool((grad_LD[2] == 0).all()) == ("LB" in zero)
    assert bool((grad_LB[2] == 0).all()) == ("LD" in zero)


def test_branch_dtype_apart_from_the_base_dtype():
    """h in float32 on a float16 base (a float32 branch, as the torch backend computes on the CPU): y in the base's
    dtype (float32 sum, one rounding), grad_h in h's, the lambda gradients float32."""
    base, h, B_s, LD, LB, row_adapter, T = make_inputs("odd", torch.float16, seed=4)
    h = h.detach().float().requires_grad_(True)
    g = _grad_out(base)
    y, grad_base, grad_h, grad_LD, grad_LB = run_ours(base, h, B_s, LD, LB, row_adapter, T, g)
    assert (y.dtype, grad_h.dtype, grad_LD.dtype, grad_LB.dtype) == (torch.float16, torch.float32, torch.float32,
                                                                      torch.float32)
    truth = run_reference(base, h, B_s, LD, LB, row_adapter, T, g, torch.float64)
    for name, o, tr in zip(NAMES, [y, grad_base, grad_h, grad_LD, grad_LB], truth):
        err = (o.double() - tr).norm().item() / (tr.norm().item() or 1.0)
        assert err <= (1e-3 if name == "y" else 2e-6 if name == "grad_base" else 1e-5), (name, err)


def test_adapters_without_rows_get_zero_gradients():
    inputs = make_inputs("odd", torch.float32)  # adapter 1 has no rows
    _, _, _, grad_LD, grad_LB = run_ours(*inputs, _grad_out(inputs[0]))
    assert torch.equal(grad_LD[1], torch.zeros_like(grad_LD[1]))
    assert torch.equal(grad_LB[1], torch.zeros_like(grad_LB[1]))
    assert all(grad_LD[k].abs().sum() > 0 and grad_LB[k].abs().sum() > 0 for k in (0, 2, 3))


def test_one_adapter_matches_the_plain_up_node():
    """K = 1, every row on it: the same math as the single-adapter up node (vt.up)."""
    base, h, B_s, LD, LB, row_adapter, T = make_inputs("one-adapter", torch.float32)
    g = _grad_out(base)
    ours = run_ours(base, h, B_s, LD, LB, row_adapter, T, g)
    ld, lb = LD.detach()[0].clone().requires_grad_(True), LB.detach()[0].clone().requires_grad_(True)
    y = vt.up(base, h, B_s, ld, lb)
    plain = [y] + list(torch.autograd.grad(y, [base, h, ld, lb], g))
    plain[3:] = [plain[3][None], plain[4][None]]
    for name, a, b in zip(NAMES, ours, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_grad_base_is_passed_through():
    inputs = make_inputs("odd", torch.float32)
    g = _grad_out(inputs[0])
    grad_base = run_ours(*inputs, g)[1]
    assert grad_base.data_ptr() == g.data_ptr()


def test_results_are_bit_identical_across_runs():
    inputs = make_inputs("wide", torch.float32, seed=11)
    g = _grad_out(inputs[0])
    first, second = run_ours(*inputs, g), run_ours(*inputs, g)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("where", ["h", "base", "LD", "LB", "g"])
def test_nan_propagates(where):
    """A NaN in any input reaches every output element the formula says it reaches (it is never masked away)."""
    base, h, B_s, LD, LB, row_adapter, T = make_inputs("odd", torch.float32)
    g = _grad_out(base)
    nan = float("nan")
    with torch.no_grad():
        if where == "h":
            h[9, 4] = nan
        elif where == "base":
            base[3, 5] = nan
        elif where == "LD":
            LD[3, 7] = nan  # adapter 3: batch row 3
        elif where == "LB":
            LB[0, 11] = nan  # adapter 0: batch row 1
        else:
            g[20, 2] = nan
    inputs = (base, h, B_s, LD, LB, row_adapter, T)
    ours = run_ours(*inputs, g)
    truth = run_reference(*inputs, g, torch.float64)
    assert any(bool(torch.isnan(t).any()) for t in truth)
    for name, o, tr in zip(NAMES, ours, truth):
        assert torch.equal(torch.isnan(o), torch.isnan(tr)), name


def test_skips_the_gradients_not_asked_for(monkeypatch):
    base, h, B_s, LD, LB, row_adapter, T = make_inputs("odd", torch.float32)
    g = _grad_out(base)

    def refuse(*args, **kwargs):
        raise AssertionError("computed a gradient that was not asked for")

    with monkeypatch.context() as m:
        m.setattr(vt, "vera_mixed_lambda_grads", refuse)
        y = vt.up_mixed(base, h, B_s, LD.detach(), LB.detach(), row_adapter, T)
        (grad_h,) = torch.autograd.grad(y, [h], g)
        assert grad_h.shape == h.shape
    with monkeypatch.context() as m:
        m.setattr(vt, "vera_up_mixed_grad_h", refuse)
        y = vt.up_mixed(base, h.detach(), B_s, LD, LB, row_adapter, T)
        grad_LD, grad_LB = torch.autograd.grad(y, [LD, LB], g)
        assert grad_LD.shape == LD.shape and grad_LB.shape == LB.shape
    with monkeypatch.context() as m:
        m.setattr(vt, "vera_mixed_lambda_grads", refuse)
        m.setattr(vt, "vera_up_mixed_grad_h", refuse)
        y = vt.up_mixed(base, h.detach(), B_s, LD.detach(), LB.detach(), row_adapter, T)
        (grad_base,) = torch.autograd.grad(y, [base], g)
        assert grad_base.data_ptr() == g.data_ptr()


def test_zero_tokens():
    _, _, B_s, LD, LB, _, _ = make_inputs("odd", torch.float32)
    base = torch.zeros(0, 37, device=DEVICE, requires_grad=True)
    h = torch.zeros(0, 19, device=DEVICE, requires_grad=True)
    row_adapter = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    y = vt.up_mixed(base, h, B_s, LD, LB, row_adapter, 7)
    assert y.shape == (0, 37)
    grad_h, grad_LD, grad_LB = torch.autograd.grad(y.sum(), [h, LD, LB])
    assert grad_h.shape == (0, 19)
    assert torch.equal(grad_LD, torch.zeros_like(LD)) and torch.equal(grad_LB, torch.zeros_like(LB))


def test_tokens_per_row_must_match():
    base, h, B_s, LD, LB, row_adapter, T = make_inputs("odd", torch.float32)
    with pytest.raises(ValueError, match="tokens_per_row"):
        vt.up_mixed(base, h, B_s, LD, LB, row_adapter, T + 1)


@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)], ids=["all", "h-only", "lambdas-only"])
def test_custom_ops_opcheck(need):
    """Schema and fake (meta) implementations of the registered ops agree with the real ones."""
    base, h, B_s, LD, LB, row_adapter, T = [t.detach() if isinstance(t, torch.Tensor) else t
                                            for t in make_inputs("odd", torch.float32)]
    check_utils = dict(test_utils=("test_schema", "test_faketensor"))
    fwd_args = (base, h, B_s, LD, LB, row_adapter, T)
    torch.library.opcheck(torch.ops.vera_kernels.triton_vera_up_mixed_fwd.default, fwd_args, **check_utils)
    g = _grad_out(base)
    torch.library.opcheck(torch.ops.vera_kernels.triton_vera_up_mixed_bwd.default,
                          (g, h, B_s, LD, LB, row_adapter, T, *need), **check_utils)


def test_torch_compile_traces_the_custom_ops():
    """fullgraph=True (any graph break raises): the node and its backward trace as the registered custom ops, and
    the compiled result matches eager."""
    torch._dynamo.reset()
    base, h, B_s, LD, LB, row_adapter, T = make_inputs("odd", torch.float32, seed=2)
    g = _grad_out(base)

    def step(base, h, LD, LB):
        return vt.up_mixed(base, h, B_s, LD, LB, row_adapter, T) * 2.0

    seen_ops = []

    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def recording_backend(gm, example_inputs):  # aot_eager, recording the graphs' ops
        seen_ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm)

    compiled = torch.compile(step, fullgraph=True, backend=aot_autograd(fw_compiler=recording_backend,
                                                                          bw_compiler=recording_backend))
    eager_out = step(base, h, LD, LB)
    eager = [eager_out] + list(torch.autograd.grad(eager_out, [base, h, LD, LB], g))
    out = compiled(base, h, LD, LB)
    got = [out] + list(torch.autograd.grad(out, [base, h, LD, LB], g))
    for name, a, b in zip(NAMES, got, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert any("triton_vera_up_mixed_fwd" in op for op in seen_ops), seen_ops
    assert any("triton_vera_up_mixed_bwd" in op for op in seen_ops), seen_ops
