"""The C++ up node (csrc/vera_up.cpp, vera_kernels/ops/native_up.py) against the Python VeraUpFunction: the same
aten ops and dtype rules, so forward and every gradient must be bit-identical; plus loading, switching off and the
fallback when it cannot be built."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vera_kernels.ops import native_up as NU
from vera_kernels.ops import vera_torch as VT

ROOT = Path(__file__).resolve().parent.parent
CAN_BUILD = shutil.which(os.environ.get("CXX", "c++")) is not None or shutil.which("g++") is not None
DISABLED = NU._disabled()

# (base dtype, branch dtype): the branch's compute dtype is the base's, or float32 on the CPU for fp16 models (and bf16
# ones where the CPU has no native bf16: _dtypes.adapter_compute_dtype)
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
          (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float64, torch.float64)]


def _native():
    if DISABLED:
        pytest.skip(f"the C++ up node is {DISABLED}")
    fn = NU.native_up()
    if fn is None:
        if CAN_BUILD:
            pytest.fail(f"a C++ compiler is here but the C++ up node did not load: {NU.native_up_status()}")
        pytest.skip(f"no C++ compiler: {NU.native_up_status()}")
    return fn


def _inputs(base_dtype, cd, n=13, out=11, r=7, seed=0, strided=False):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, out, generator=gen).to(base_dtype).requires_grad_()
    h = torch.randn(n, r, generator=gen).to(cd).requires_grad_()
    B = torch.randn(out + 5, r, generator=gen)
    B_s = B[:out]  # a row slice of the shared B, as the layer passes it
    if strided:
        B_s = torch.randn(r, out + 3, generator=gen)[:, :out].t()  # not contiguous
    ld = torch.randn(r, generator=gen).requires_grad_()
    lb = torch.randn(out, generator=gen).requires_grad_()
    g = torch.randn(n, out, generator=gen).to(base_dtype)
    return base, h, B_s, ld, lb, g


def _run(fn, base, h, B_s, ld, lb, g, need=(True, True, True, True)):
    leaves = [t.detach().clone().requires_grad_(flag) for t, flag in zip((base, h, ld, lb), need)]
    b, hh, d, bb = leaves
    y = fn(b, hh, B_s, d, bb)
    y.backward(g)
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("base_dtype,cd", DTYPES)
@pytest.mark.parametrize("strided", [False, True])
def test_bit_identical_to_the_python_function(base_dtype, cd, strided):
    native = _native()
    python = VT.VeraUpFunction.apply
    args = _inputs(base_dtype, cd, strided=strided)
    y_n, g_n = _run(native, *args)
    y_p, g_p = _run(python, *args)
    assert y_n.dtype == y_p.dtype == base_dtype
    assert torch.isfinite(y_n).all()
    assert torch.equal(y_n, y_p)
    for name, a, b in zip(("base", "h", "lambda_d", "lambda_b"), g_n, g_p):
        assert a is not None and b is not None, name
        assert a.dtype == b.dtype and torch.equal(a, b), name
        assert a.abs().max() > 0, name


@pytest.mark.parametrize("need", [(True, True, False, False), (False, False, True, True), (False, True, True, False),
                                  (True, False, False, True)])
def test_only_what_is_needed(need):
    _check_only_what_is_needed(_native(), VT.VeraUpFunction.apply, _inputs(torch.float32, torch.float32, seed=1),
                               need)


def _check_only_what_is_needed(native, python, args, need):
    _, g_n = _run(native, *args, need=need)
    _, g_p = _run(python, *args, need=need)
    for flag, a, b in zip(need, g_n, g_p):
        assert (a is None) == (not flag) and (b is None) == (not flag)
        if flag:
            assert torch.equal(a, b)


def test_non_contiguous_upstream_gradient_and_nan():
    native = _native()
    base, h, B_s, ld, lb, _ = _inputs(torch.float32, torch.float32, seed=2)
    g = torch.randn(base.shape[1], base.shape[0]).t()  # a transposed (non-contiguous) gradient
    y_n, g_n = _run(native, base, h, B_s, ld, lb, g)
    y_p, g_p = _run(VT.VeraUpFunction.apply, base, h, B_s, ld, lb, g)
    assert torch.equal(y_n, y_p) and all(torch.equal(a, b) for a, b in zip(g_n, g_p))
    h_nan = h.detach().clone()
    h_nan[3, 2] = float("nan")
    y_nan, _ = _run(native, base, h_nan, B_s, ld, lb, g)
    assert torch.isnan(y_nan[3]).all() and torch.isfinite(y_nan[:3]).all()  # NaN is never hidden


@pytest.mark.parametrize("backend,node_name", [("torch", "VeraUp"), ("triton", "VeraUpPyBackward")])
def test_the_backend_runs_it_in_eager_mode(backend, node_name):
    import vera_kernels as vk
    from helpers import tiny_llama, token_ids

    _triton() if backend == "triton" else _native()
    model = vk.patch_model(tiny_llama(0), vk.VeraConfig(r=4, target_modules=["q_proj"], init_weights=False),
                           backend=backend)
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, layer.in_features, requires_grad=True)
    node = layer(x).grad_fn.next_functions[0][0]  # (under the view back to x's leading dimensions)
    assert "CppNode" in node.name() and node.name().endswith(f"{node_name}>"), node.name()
    model(token_ids(0)).logits.sum().backward()
    assert layer.vera_lambda_d["default"].grad.abs().max() > 0


def _fresh(env: dict, code: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, cwd=ROOT,
                          timeout=300, check=False)


_PROBE = """
import warnings, torch
warnings.simplefilter("always")
from vera_kernels.ops import vera_torch as VT, native_up as NU
h = torch.randn(4, 3, requires_grad=True)
y = VT.up(torch.randn(4, 5), h, torch.randn(5, 3), torch.randn(3), torch.randn(5))
print("NODE", y.grad_fn.name(), "|", NU.native_up_status())
"""


def test_switched_off_is_the_python_function():
    res = _fresh({NU.ENV_NATIVE_UP: "0"}, _PROBE)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "NODE VeraUpFunctionBackward" in res.stdout and f"disabled by {NU.ENV_NATIVE_UP}=0" in res.stdout


def test_a_failed_build_falls_back_with_one_warning(tmp_path):
    res = _fresh({"VERA_KERNELS_CSRC": str(tmp_path), NU.ENV_NATIVE_UP: "1"}, _PROBE)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "NODE VeraUpFunctionBackward" in res.stdout and "build failed" in res.stdout
    assert res.stderr.count("the C++ up node is unavailable") == 1, res.stderr[-3000:]


# ============================================================================================ the torch down node
# VeraDown (VeraDownFunction in C++) and its dropout: on the CPU one fused pass (dropout_apply), elsewhere the Python
# function's integer ops in aten; both must give vera_torch's mask and values bit for bit.
DROPOUT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _dropout_apply():
    _native()
    return NU.native_dropout_apply()


@pytest.mark.parametrize("dtype", DROPOUT_DTYPES)
@pytest.mark.parametrize("shape", [(37, 53), (1, 1), (129, 7), (3, 301)])
@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
@pytest.mark.parametrize("fused", [True, False])
def test_dropout_apply_is_the_python_dropout(dtype, shape, p, fused):
    apply = _dropout_apply()
    # (a seed per case that is the same in every process: str hashes are salted per process)
    gen = torch.Generator().manual_seed(DROPOUT_DTYPES.index(dtype) * 10**6 + shape[0] * 1000 + shape[1] + int(p * 100))
    seed = torch.randint(0, 2**62, (), generator=gen)
    x = torch.randn(*shape, generator=gen).to(dtype)
    want = VT._dropped(x, seed, p)
    got = apply(x, seed, p, False, fused)
    assert got.dtype == dtype and torch.equal(got, want)
    y = x.clone()
    out = apply(y, seed, p, True, fused)  # in place into a contiguous tensor
    assert out.data_ptr() == y.data_ptr() and torch.equal(y, want)
    xt = torch.randn(shape[1], shape[0], generator=gen).to(dtype).t()  # strided
    assert torch.equal(apply(xt, seed, p, False, fused), VT._dropped(xt, seed, p))
    if fused and not xt.is_contiguous():  # in place on a strided CPU tensor: a new result, the input left as it was
        before = xt.clone()
        assert torch.equal(apply(xt, seed, p, True, fused), VT._dropped(before, seed, p)) and torch.equal(xt, before)


def test_dropout_apply_is_a_dropout():
    apply = _dropout_apply()
    x = torch.randn(300, 257, generator=torch.Generator().manual_seed(1))
    x[5, 7] = float("nan")
    seeds = [torch.tensor(s) for s in (0, 1, 2**40 + 3)]
    outs = [apply(x, s, 0.25) for s in seeds]
    for out in outs:
        kept = out != 0
        assert abs(kept.float().mean().item() - 0.75) < 0.01
        assert torch.equal(out[kept & ~x.isnan()], (x * (1 / 0.75))[kept & ~x.isnan()])
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])  # every seed its own mask
    # NaN is kept where the mask keeps it (and dropped to 0 where it drops it, as masked_fill does)
    assert torch.equal(outs[0][5, 7].isnan(), VT.dropout_keep_mask(seeds[0], x.shape, 0.25, x.device)[5, 7])
    with pytest.raises(RuntimeError, match="rows, cols"):
        apply(torch.randn(2, 3, 4), seeds[0], 0.25)
    # tensors that are not plain CPU memory take the aten ops (a fake tensor, as torch.export and FakeTensorMode
    # run, has no data to read; a meta tensor no memory)
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode():
        fake = apply(torch.randn(7, 9), torch.tensor(5), 0.3)
    assert isinstance(fake, FakeTensor) and fake.shape == (7, 9)
    h = NU.native_down()(torch.randn(3, 4, device="meta"), torch.randn(2, 4, device="meta"),
                         torch.tensor(3, device="meta"), 0.2)
    assert h.shape == (3, 2) and h.is_meta
    with pytest.raises(RuntimeError, match=r"\[0, 1\)"):
        apply(x, seeds[0], 1.0)


@pytest.mark.parametrize("dtype,a_dtype,p", [(torch.float32, torch.float32, 0.3), (torch.float64, torch.float64, 0.1),
                                             (torch.bfloat16, torch.bfloat16, 0.3), (torch.float16, torch.float32, 0.2),
                                             (torch.float32, torch.bfloat16, 0.0)])
@pytest.mark.parametrize("strided", [False, True])
def test_torch_down_node_bit_identical_to_the_python_function(dtype, a_dtype, p, strided):
    _native()
    gen = torch.Generator().manual_seed(9)
    x = (torch.randn(53, 41, generator=gen).t() if strided else torch.randn(41, 53, generator=gen)).to(dtype)
    A_s = torch.randn(19, 60, generator=gen)[:, :53].to(a_dtype)  # a column slice of the shared A
    seed = torch.tensor(987654321) if p > 0 else None
    gh = torch.randn(41, 19, generator=gen).to(dtype)
    outs = []
    for fn in (NU.native_down(), VT.VeraDownFunction.apply):
        xx = x.clone().requires_grad_()
        h = fn(xx, A_s, seed, p)
        h.backward(gh)
        outs.append((h.detach(), xx.grad))
    (h_n, gx_n), (h_p, gx_p) = outs
    assert h_n.dtype == h_p.dtype == dtype and gx_n.dtype == dtype
    assert torch.equal(h_n, h_p) and torch.equal(gx_n, gx_p)
    assert torch.isfinite(h_n.float()).all() and h_n.abs().max() > 0
    if p > 0:
        dropped = (gx_n == 0).float().mean().item()
        assert abs(dropped - p) < 0.06, dropped
    with torch.no_grad():  # no gradient wanted: forward only, the same h
        assert torch.equal(NU.native_down()(x, A_s, seed, p), h_p)


# ============================================================================================ the triton backend's
# VeraUpPyBackward: the C++ forward (the same aten ops as VeraUpTritonFunction's) and a backward through the triton
# backend's _up_bwd_native (its Triton kernels, run by the interpreter here)
def _triton():
    if not os.environ.get("TRITON_INTERPRET"):
        pytest.skip("the triton backend runs on the CPU through Triton's interpreter (TRITON_INTERPRET=1)")
    pytest.importorskip("triton")
    from vera_kernels.ops import vera_triton as VTr

    _native()
    nodes = NU.native_triton_nodes(VTr._up_bwd_native, VTr._down_fwd_native, VTr._down_bwd_native)
    assert nodes is not None, NU.native_up_status()
    return VTr, nodes[0]


def _triton_python(VTr):
    def apply(base, h, B_s, ld, lb):
        return VTr.VeraUpTritonFunction.apply(base, h, B_s, ld, lb, None, None, None, False, "cublas")
    return apply


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("strided", [False, True])
def test_triton_node_bit_identical_to_its_python_function(dtype, strided):
    VTr, native = _triton()
    args = _inputs(dtype, dtype, n=37, out=45, r=19, seed=3, strided=strided)
    y_n, g_n = _run(native, *args)
    y_p, g_p = _run(_triton_python(VTr), *args)
    assert torch.isfinite(y_n.float()).all() and torch.equal(y_n, y_p)
    for name, a, b in zip(("base", "h", "lambda_d", "lambda_b"), g_n, g_p):
        assert a is not None and b is not None, name
        assert a.dtype == b.dtype and torch.equal(a, b), name
        assert a.abs().max() > 0, name
    # and both are VeRA's gradient: the float64 autograd of the formula
    base, h, B_s, ld, lb, g = (t.detach().double() for t in args)
    leaves = [t.clone().requires_grad_() for t in (base, h, ld, lb)]
    y64 = leaves[0] + leaves[3] * ((leaves[1] * leaves[2]) @ B_s.t())
    y64.backward(g)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for name, a, ref in zip(("base", "h", "lambda_d", "lambda_b"), g_n, leaves):
        err = (a.double() - ref.grad).abs().max() / ref.grad.abs().max()
        assert err < tol, (name, float(err))


@pytest.mark.parametrize("need", [(True, True, False, False), (False, False, True, True), (False, True, True, False),
                                  (True, False, False, True)])
def test_triton_node_only_what_is_needed(need):
    VTr, native = _triton()
    _check_only_what_is_needed(native, _triton_python(VTr), _inputs(torch.float32, torch.float32, n=21, out=17, r=5,
                                                                     seed=4), need)


def test_triton_node_backward_error_reaches_the_caller(monkeypatch):
    VTr, native = _triton()
    base, h, B_s, ld, lb, g = _inputs(torch.float32, torch.float32, seed=5)
    y = native(base, h, B_s, ld, lb)

    def broken(*args):
        raise ValueError("a broken backward")

    NU._triton_nodes.clear()
    try:  # re-registered in the module: the node's next backward calls it
        NU.native_triton_nodes(broken, VTr._down_fwd_native, VTr._down_bwd_native)
        with pytest.raises(RuntimeError, match="a broken backward"):
            y.backward(g)
    finally:
        NU._triton_nodes.clear()
        assert NU.native_triton_nodes(VTr._up_bwd_native, VTr._down_fwd_native, VTr._down_bwd_native) is not None
    _, grads = _run(native, base, h, B_s, ld, lb, g)  # and the real one is back
    assert all(t is not None and torch.isfinite(t).all() for t in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("p", [0.3, 0.05])
def test_triton_dropout_down_node_bit_identical_to_its_python_function(dtype, p):
    VTr, _ = _triton()
    native = NU.native_triton_nodes(VTr._up_bwd_native, VTr._down_fwd_native, VTr._down_bwd_native)[1]
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(41, 53, generator=gen).to(dtype)
    A_s = torch.randn(19, 60, generator=gen)[:, :53].to(dtype)  # a column slice of the shared A, cast
    seed = torch.tensor(123456789, dtype=torch.int64)
    gh = torch.randn(41, 19, generator=gen).to(dtype)
    outs = []
    for fn in (native, VTr.VeraDownTritonFunction.apply):
        xx = x.clone().requires_grad_()
        h = fn(xx, A_s, seed, p)
        h.backward(gh)
        outs.append((h.detach(), xx.grad))
    (h_n, gx_n), (h_p, gx_p) = outs
    assert torch.equal(h_n, h_p) and torch.equal(gx_n, gx_p)
    assert torch.isfinite(h_n.float()).all() and h_n.abs().max() > 0
    # the mask is a real dropout mask: about p of x's elements are dropped (grad_x is zero exactly there, for
    # every row of grad_h A_s that is nowhere zero)
    dropped = (gx_n == 0).float().mean().item()
    assert abs(dropped - p) < 0.05, dropped


@pytest.mark.parametrize("backend,node_name", [("torch", "VeraDown"), ("triton", "VeraDownPy")])
def test_the_backend_runs_its_dropout_node_in_eager_mode(backend, node_name):
    import vera_kernels as vk
    from helpers import tiny_llama, token_ids

    _triton() if backend == "triton" else _native()
    model = vk.patch_model(tiny_llama(0), vk.VeraConfig(r=4, target_modules=["q_proj"], init_weights=False,
                                                         vera_dropout=0.2), backend=backend)
    model.train()
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, layer.in_features, requires_grad=True)
    up = layer(x).grad_fn.next_functions[0][0]
    down = next(f for f, _ in up.next_functions if f is not None and "VeraDown" in f.name())
    assert "CppNode" in down.name() and down.name().endswith(f"{node_name}>"), down.name()
    model(token_ids(0)).logits.sum().backward()
    assert layer.vera_lambda_d["default"].grad.abs().max() > 0


# ============================================================================================ one-call linear
# ops.run_linear: a plain nn.Linear base with one adapter and no dropout runs as one C++ call (vera_linear_plain:
# aten's linear, mm, then the backend's up node); it must be the two-step path (linear_base + run_adapters)
# exactly, sharing h with siblings the same way, and fall back to it wherever one of its conditions fails.
class _Three(torch.nn.Module):
    """Three siblings reading one input (h shared), one without bias, one of another width."""

    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(12, 10)
        self.k = torch.nn.Linear(12, 7, bias=False)
        self.v = torch.nn.Linear(12, 10)

    def forward(self, x):
        return self.q(x).sum(-1) * 1.5 + self.k(x).sum(-1) - self.v(x).square().sum(-1)


def _three(backend, dtype, dropout=0.0):
    import vera_kernels as vk
    from helpers import set_random_lambdas

    torch.manual_seed(0)
    m = _Three().to(dtype)
    vk.patch_model(m, vk.VeraConfig(r=4, target_modules=["q", "k", "v"], init_weights=False, vera_dropout=dropout),
                   backend=backend)
    set_random_lambdas(m, seed=2)
    return m.train()


def _step(m, dtype, shape=(2, 5, 12)):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3)).to(dtype).requires_grad_()
    y = m(x)
    y.sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32), ("torch", torch.float64),
                                           ("triton", torch.float32), ("triton", torch.float16)])
def test_one_call_linear_is_the_two_step_path(backend, dtype, monkeypatch):
    from vera_kernels.backends import get_impl

    _triton() if backend == "triton" else _native()
    impl = get_impl(backend)
    m = _three(backend, dtype)
    real = impl.linear_plain
    calls = []

    def counting():
        fn = real()
        assert fn is not None

        def run(x, weight, bias, A_s, h, *rest):
            calls.append(h is not None)
            return fn(x, weight, bias, A_s, h, *rest)
        return run

    monkeypatch.setattr(impl, "linear_plain", counting)
    y1, gx1, grads1 = _step(m, dtype)
    assert calls == [False, True, True], calls  # q computes h, k and v take it
    monkeypatch.setattr(impl, "linear_plain", lambda: None)  # the two-step path
    y2, gx2, grads2 = _step(m, dtype)
    assert torch.isfinite(y1.float()).all() and torch.equal(y1, y2) and torch.equal(gx1, gx2)
    assert grads1.keys() == grads2.keys() and len(grads1) == 6  # lambda_d and lambda_b of three layers
    for name in grads1:
        assert torch.equal(grads1[name], grads2[name]), name
        assert grads1[name].abs().max() > 0, name


class _Marked(torch.Tensor):
    """A tensor subclass (as quantized or distributed weights are): handled through __torch_function__."""


@pytest.mark.parametrize("case", ["dropout", "fp16 on the CPU", "two adapters", "subclass input"])
def test_one_call_linear_not_taken_outside_its_case(case, monkeypatch):
    from vera_kernels.backends import get_impl

    _native()
    impl = get_impl("torch")
    dtype = torch.float16 if case == "fp16 on the CPU" else torch.float32  # (branch in float32 there)
    m = _three("torch", dtype, dropout=0.2 if case == "dropout" else 0.0)
    if case == "two adapters":
        import vera_kernels as vk

        vk.add_adapter(m, "other", vk.VeraConfig(r=4, target_modules=["q", "k", "v"], init_weights=False))
        vk.set_adapter(m, ["default", "other"])
    monkeypatch.setattr(impl, "linear_plain", lambda: pytest.fail("the one-call path was taken"))
    if case == "subclass input":
        x = torch.randn(2, 5, 12).as_subclass(_Marked).requires_grad_()
        y = m(x)
        y.sum().backward()
        assert torch.isfinite(y.float()).all() and x.grad.abs().max() > 0
        return
    y, gx, grads = _step(m, dtype)
    assert torch.isfinite(y.float()).all() and gx.abs().max() > 0
