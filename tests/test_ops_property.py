"""Property tests of vk.ops.vera_linear / vera_add_delta against a float64 evaluation of the VeRA formula.

Random shapes (odd sizes, 0-3 leading dims, N = 0 tokens), projection slices, strided inputs and parameters,
fp32/fp16/bf16 (and fp64 where the backend takes it), bias / frozen or trainable base, dropout (the forward's mask is
regenerated from the seed and the gradients are checked against it). Plus: the torch backend keeps only
h = dropout(x) A_s^T for backward (saved_tensors_hooks), and autocast.
"""

from __future__ import annotations

import importlib
import math
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import vera_kernels as vk
from vera_kernels._dtypes import adapter_compute_dtype
from helpers import BACKENDS, assert_close_f64, f64_leaf, vera_formula

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def backend_dtypes(backend: str) -> list[torch.dtype]:
    if backend == "triton":
        # the interpreter's bf16 tl.dot is broken on CPU; fp64 is not a triton compute dtype
        return [torch.float32, torch.float16] if not torch.cuda.is_available() else FLOAT_DTYPES
    return FLOAT_DTYPES + [torch.float64]


def max_examples(backend: str) -> int:
    """Per (backend, dtype, dropout) cell. The Triton interpreter is slow: keep its cases few and tiny."""
    return 8 if backend == "triton" else 20


# ---------------------------------------------------------------------------------------------- cases
@st.composite
def op_cases(draw, backend: str, dtype: torch.dtype, dropout: bool):
    """Shapes come from hypothesis strategies (which favour edge sizes such as 1); the on/off flags come from a
    random.Random seeded by a drawn integer, so every flag combination is covered evenly in few examples."""
    tiny = backend == "triton"
    dim_max = 40 if tiny else 70
    flags = random.Random(draw(st.integers(0, 2**32 - 1)))
    # triton: under 64 tokens (the interpreter is slow)
    lead = draw(st.lists(st.integers(1, 7), min_size=0, max_size=2) if tiny else
                st.lists(st.integers(1, 5), min_size=0, max_size=3))
    if lead and flags.random() < 0.15:
        lead[flags.randrange(len(lead))] = 0  # N = 0 tokens
    c = dict(
        dtype=dtype,
        in_f=draw(st.integers(1, dim_max)),
        out_f=draw(st.integers(1, dim_max)),
        r=draw(st.integers(1, 12)),
        in_extra=draw(st.integers(0, 6)),
        out_extra=draw(st.integers(0, 6)),
        lead=lead,
        layout=flags.choice(["contiguous", "transposed", "step_last", "step_lead"]),
        fan_in_fan_out=flags.random() < 0.5,
        bias=flags.random() < 0.6,
        x_grad=flags.random() < 0.8,
        weight_grad=flags.random() < 0.5,
        bias_grad=flags.random() < 0.5,
        strided_params=flags.random() < 0.5,
        p=flags.choice([0.1, 0.5, 0.9]) if dropout else flags.choice([0.0, 0.3]),
        training=dropout or flags.random() < 0.5,  # p > 0 in eval mode: no dropout
        add_delta=flags.random() < 0.3,
        seed=flags.randrange(2**31),
    )
    return c


def _strided(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The same values as ``t`` (1-D), as a stride-2 view of a larger tensor."""
    big = torch.randn(t.numel() * 2, generator=gen, dtype=torch.float32).to(t.dtype)
    big[::2] = t
    return big[::2]


def build_inputs(c: dict) -> dict:
    gen = torch.Generator().manual_seed(c["seed"])
    dt, in_f, out_f, r, lead = c["dtype"], c["in_f"], c["out_f"], c["r"], list(c["lead"])

    def randn(*shape, scale=1.0, dtype=dt):
        return (scale * torch.randn(*shape, generator=gen)).to(dtype)

    layout = c["layout"]
    if layout == "transposed" and lead:
        x_src = randn(*lead[:-1], in_f, lead[-1]).requires_grad_(c["x_grad"])
        x = x_src.transpose(-1, -2)
    elif layout == "step_last":
        x_src = randn(*lead, 2 * in_f).requires_grad_(c["x_grad"])
        x = x_src[..., ::2]
    elif layout == "step_lead" and lead:
        x_src = randn(2 * lead[0], *lead[1:], in_f).requires_grad_(c["x_grad"])
        x = x_src[::2]
    else:
        x_src = randn(*lead, in_f).requires_grad_(c["x_grad"])
        x = x_src[...]  # a non-leaf view, so .grad is kept the same way in every layout
    if c["x_grad"]:
        x.retain_grad()

    strided = c["strided_params"]

    def param(shape, scale, dtype, requires_grad):
        """A tensor of ``shape``; with strided_params a non-contiguous view (transposed / stride 2) of a leaf."""
        if not strided:
            return randn(*shape, scale=scale, dtype=dtype).requires_grad_(requires_grad)
        if len(shape) == 2:
            src = randn(*reversed(shape), scale=scale, dtype=dtype).requires_grad_(requires_grad)
            view = src.t()
        else:
            src = randn(2 * shape[0], scale=scale, dtype=dtype).requires_grad_(requires_grad)
            view = src[::2]
        if requires_grad:
            view.retain_grad()
        return view

    w_shape = (in_f, out_f) if c["fan_in_fan_out"] else (out_f, in_f)
    weight = param(w_shape, 1 / math.sqrt(in_f), dt, c["weight_grad"])
    bias = param((out_f,), 1.0, dt, c["bias_grad"]) if c["bias"] else None
    A = randn(r, in_f + c["in_extra"], scale=1 / math.sqrt(in_f), dtype=torch.float32)
    B = randn(out_f + c["out_extra"], r, scale=1 / math.sqrt(r), dtype=torch.float32)
    ld = param((r,), 1.0, torch.float32, True)
    lb = param((out_f,), 1.0, torch.float32, True)
    g = randn(*lead, out_f, dtype=torch.float32).to(dt)
    return dict(x=x, weight=weight, bias=bias, A=A, B=B, ld=ld, lb=lb, g=g)


def regenerate_keep_mask(backend: str, seed: int, x: torch.Tensor, in_f: int, p: float):
    """The dropout keep-mask the backend used after torch.manual_seed(seed), shaped like x; None if unknown."""
    x2 = x.detach().reshape(-1, in_f)
    torch.manual_seed(seed)
    if backend == "reference":  # PEFT's F.dropout on the global generator, on x.to(float32) as the layer got x
        return F.dropout(torch.ones_like(x.detach(), dtype=torch.float32), p, training=True) != 0
    # seeded backends: the op draws a seed from the default generator, the backend module regenerates the mask
    module = importlib.import_module(f"vera_kernels.ops.vera_{backend}")
    mask_fn = getattr(module, "dropout_keep_mask", None)
    if mask_fn is None:
        return None
    s = int(vk.ops.draw_dropout_seed(vk.ops.seed_device(backend, x2)))  # the op's draw, repeated
    return mask_fn(s, tuple(x2.shape), p, x2.device).reshape(x.shape)


def run_op(backend: str, c: dict, t: dict, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    if c["add_delta"]:
        w_eff = t["weight"] if c["fan_in_fan_out"] else t["weight"].t()
        base = t["x"] @ w_eff
        if t["bias"] is not None:
            base = base + t["bias"]
        torch.manual_seed(seed)
        return vk.ops.vera_add_delta(base, t["x"], t["A"], t["B"], t["ld"], t["lb"], dropout_p=c["p"],
                                     training=c["training"], backend=backend)
    return vk.ops.vera_linear(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["ld"], t["lb"], dropout_p=c["p"],
                              training=c["training"], fan_in_fan_out=c["fan_in_fan_out"], backend=backend)


def check_case(backend: str, c: dict) -> None:
    t = build_inputs(c)
    dt, in_f = c["dtype"], c["in_f"]
    dropout_on = c["training"] and c["p"] > 0
    op_seed = c["seed"] ^ 0x5EED

    y = run_op(backend, c, t, op_seed)
    assert y.dtype == dt
    assert tuple(y.shape) == (*c["lead"], c["out_f"])
    y.backward(t["g"])

    keep = regenerate_keep_mask(backend, op_seed, t["x"], in_f, c["p"]) if dropout_on else None
    if dropout_on:
        # same seed -> bit-identical forward
        with torch.no_grad():
            y_again = run_op(backend, c, t, op_seed)
        assert torch.equal(y.detach(), y_again), "same seed gave a different dropout result"
    if dropout_on and keep is None:
        # a backend without dropout_keep_mask: check the lambda_b gradient against the forward's own delta
        if dt not in (torch.float32, torch.float64):
            return
        with torch.no_grad():
            w_eff = t["weight"] if c["fan_in_fan_out"] else t["weight"].t()
            base = t["x"].double() @ w_eff.double() + (t["bias"].double() if t["bias"] is not None else 0)
            delta_over_lb = (y.double() - base) / t["lb"].double()
            want = (t["g"].double() * delta_over_lb).reshape(-1, c["out_f"]).sum(0)
        assert_close_f64(t["lb"].grad, want, None, torch.float32 if dt == torch.float64 else dt, "grad lambda_b")
        return

    # float64 reference with the same mask, and a plain PyTorch run in the op's dtype (the error yardstick)
    x64, w64, ld64, lb64 = f64_leaf(t["x"]), f64_leaf(t["weight"]), f64_leaf(t["ld"]), f64_leaf(t["lb"])
    b64 = f64_leaf(t["bias"])
    y64 = vera_formula(x64, w64, b64, t["A"].double(), t["B"].double(), ld64, lb64,
                       fan_in_fan_out=c["fan_in_fan_out"], keep=keep, p=c["p"])
    y64.backward(t["g"].double())
    xp, wp, ldp, lbp = (v.detach().clone().requires_grad_(True) for v in (t["x"], t["weight"], t["ld"], t["lb"]))
    bp = t["bias"].detach().clone().requires_grad_(True) if t["bias"] is not None else None
    yp = vera_formula(xp, wp, bp, t["A"], t["B"], ldp, lbp, fan_in_fan_out=c["fan_in_fan_out"], keep=keep, p=c["p"])
    yp.backward(t["g"])

    assert_close_f64(y, y64, yp, dt, "forward")
    assert t["ld"].grad is not None and t["lb"].grad is not None, "no gradient reached the lambdas"
    assert t["ld"].grad.dtype == torch.float32 and t["lb"].grad.dtype == torch.float32
    assert_close_f64(t["ld"].grad, ld64.grad, ldp.grad, dt, "grad lambda_d")
    assert_close_f64(t["lb"].grad, lb64.grad, lbp.grad, dt, "grad lambda_b")
    if c["x_grad"]:
        assert_close_f64(t["x"].grad, x64.grad, xp.grad, dt, "grad x")
    if t["weight"].requires_grad:
        assert_close_f64(t["weight"].grad, w64.grad, wp.grad, dt, "grad weight")
    else:
        assert t["weight"].grad is None
    if t["bias"] is not None and t["bias"].requires_grad:
        assert_close_f64(t["bias"].grad, b64.grad, bp.grad, dt, "grad bias")
    elif t["bias"] is not None:
        assert t["bias"].grad is None


ALL_DTYPES = FLOAT_DTYPES + [torch.float64]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("dropout", [False, True], ids=["nodrop", "dropout"])
def test_vera_linear_matches_float64_formula(backend, dtype, dropout):
    if dtype not in backend_dtypes(backend):
        pytest.skip("dtype not run for this backend on this machine")

    # no shrinking under the Triton interpreter: a failing case would cost minutes of CI to shrink
    phases = [Phase.explicit, Phase.reuse, Phase.generate] + ([] if backend == "triton" else [Phase.shrink])

    @settings(max_examples=max_examples(backend), deadline=None, derandomize=True, database=None, phases=phases,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(c=op_cases(backend, dtype, dropout))
    def run(c):
        check_case(backend, c)

    run()


# ---------------------------------------------------------------------------------------------- explicit cases
def _case(**kw):
    c = dict(dtype=torch.float32, in_f=37, out_f=29, r=5, in_extra=3, out_extra=2, lead=[3, 7], layout="contiguous",
             fan_in_fan_out=False, bias=True, x_grad=True, weight_grad=True, bias_grad=True, strided_params=False,
             p=0.0, training=False, add_delta=False, seed=1234)
    c.update(kw)
    return c


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead", [[], [5], [0], [2, 0], [2, 3, 4]], ids=lambda v: "lead" + "x".join(map(str, v)))
def test_leading_dims_and_dtypes(backend, dtype, lead):
    """Any leading dims (none, N = 0 tokens, 3 dims), every compute dtype, trainable base weight and bias."""
    if dtype not in backend_dtypes(backend):
        pytest.skip("dtype not run for this backend on this machine")
    check_case(backend, _case(dtype=dtype, lead=lead, seed=len(lead) * 7 + 1))


@pytest.mark.parametrize("switch", ["0", "1"])
def test_cpu_bf16_branch_follows_the_switch(switch, monkeypatch):
    """The torch backend's CPU branch dtype for a bf16 model: bf16 where the CPU multiplies bf16 natively, float32
    elsewhere (VERA_KERNELS_CPU_BF16 forces either); both within bf16's tolerance of the float64 formula, and the
    h kept for backward in that dtype."""
    from vera_kernels import _dtypes

    monkeypatch.setenv(_dtypes.ENV_CPU_BF16, switch)
    _dtypes.reset_cpu_bf16()
    try:
        want = torch.bfloat16 if switch == "1" else torch.float32
        assert _dtypes.cpu_bf16_native() is (switch == "1")
        assert _dtypes.adapter_compute_dtype("torch", torch.bfloat16, "cpu") == want
        assert _dtypes.adapter_compute_dtype("torch", torch.float16, "cpu") == torch.float32  # fp16: float32 always
        assert _dtypes.adapter_compute_dtype("torch", torch.bfloat16, "cuda") == torch.bfloat16
        assert _dtypes.adapter_compute_dtype("reference", torch.bfloat16, "cpu") == torch.float32
        check_case("torch", _case(dtype=torch.bfloat16, lead=[4, 9], seed=21))
        check_case("torch", _case(dtype=torch.bfloat16, lead=[3, 5], p=0.3, training=True, seed=22))
        t = build_inputs(_case(dtype=torch.bfloat16, lead=[6], seed=23))
        _, nbytes = saved_activation_bytes(
            lambda: vk.ops.vera_linear(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["ld"], t["lb"],
                                       backend="torch"),
            [t[k] for k in ("x", "weight", "bias", "A", "B", "ld", "lb")])
        assert nbytes == 6 * 5 * want.itemsize  # h (tokens x r) in the branch's dtype, nothing else
        monkeypatch.setenv(_dtypes.ENV_CPU_BF16, "yes")
        _dtypes.reset_cpu_bf16()
        with pytest.raises(ValueError, match=_dtypes.ENV_CPU_BF16):
            _dtypes.cpu_bf16_native()
    finally:
        monkeypatch.delenv(_dtypes.ENV_CPU_BF16)
        _dtypes.reset_cpu_bf16()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "step_last", "step_lead"])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_strided_inputs(backend, layout, fan_in_fan_out):
    check_case(backend, _case(layout=layout, fan_in_fan_out=fan_in_fan_out, strided_params=True, seed=99))


def _noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """Same values, non-contiguous: a stride-2 view (1-D) or a transposed view (2-D)."""
    if t.dim() == 1:
        big = torch.zeros(2 * t.numel(), dtype=t.dtype)
        big[::2] = t
        return big[::2]
    return t.t().contiguous().t()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["weight", "bias", "lambda_d", "lambda_b", "vera_A", "vera_B"])
def test_one_non_contiguous_operand(backend, which):
    """Each operand alone as a non-contiguous view (same values) gives the float64 formula's forward and gradients."""
    g = torch.Generator().manual_seed(17)
    ops = dict(x=torch.randn(3, 7, 37, generator=g), weight=torch.randn(29, 37, generator=g) / 6,
               bias=torch.randn(29, generator=g), vera_A=torch.randn(5, 40, generator=g) / 6,
               vera_B=torch.randn(31, 5, generator=g) / 2, lambda_d=torch.randn(5, generator=g),
               lambda_b=torch.randn(29, generator=g))
    ops[which] = _noncontiguous(ops[which])
    assert not ops[which].is_contiguous()
    leaves = {k: ops[k].requires_grad_(True) for k in ("x", "lambda_d", "lambda_b")}
    y = vk.ops.vera_linear(ops["x"], ops["weight"], ops["bias"], ops["vera_A"], ops["vera_B"], ops["lambda_d"],
                           ops["lambda_b"], backend=backend)
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)
    o64 = {k: f64_leaf(v, k in leaves) for k, v in ops.items()}
    y64 = vera_formula(o64["x"], o64["weight"], o64["bias"], o64["vera_A"], o64["vera_B"], o64["lambda_d"],
                       o64["lambda_b"])
    y64.backward(gy.double())
    assert_close_f64(y, y64, None, torch.float32, f"forward, non-contiguous {which}")
    for k, v in leaves.items():
        assert_close_f64(v.grad, o64[k].grad, None, torch.float32, f"grad {k}, non-contiguous {which}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dropout_gradients_use_forward_mask(backend, dtype):
    if dtype not in backend_dtypes(backend):
        pytest.skip("dtype not run for this backend on this machine")
    check_case(backend, _case(dtype=dtype, p=0.4, training=True, seed=7))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_seed_controls_mask(backend):
    """Same torch.manual_seed -> same result; another seed -> another mask; eval mode -> no dropout at all."""
    t = build_inputs(_case(lead=[16, 8]))
    args = (t["x"], t["weight"], t["bias"], t["A"], t["B"], t["ld"], t["lb"])
    with torch.no_grad():
        torch.manual_seed(3)
        y1 = vk.ops.vera_linear(*args, dropout_p=0.5, training=True, backend=backend)
        torch.manual_seed(3)
        y2 = vk.ops.vera_linear(*args, dropout_p=0.5, training=True, backend=backend)
        torch.manual_seed(4)
        y3 = vk.ops.vera_linear(*args, dropout_p=0.5, training=True, backend=backend)
        y_eval = vk.ops.vera_linear(*args, dropout_p=0.5, training=False, backend=backend)
        y_nodrop = vk.ops.vera_linear(*args, dropout_p=0.0, training=True, backend=backend)
    assert torch.isfinite(y1).all()
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)
    assert not torch.equal(y1, y_eval)
    assert torch.equal(y_eval, y_nodrop)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_checkpointing_regenerates_the_dropout_masks(backend, use_reentrant):
    """torch.utils.checkpoint re-runs the forward in backward: it must draw the same dropout seeds (torch restores
    the RNG state), so the gradients equal those of the same step without checkpointing (gpu-check: on CUDA)."""
    from triton_cases import checkpointed_dropout_grads

    g = checkpointed_dropout_grads(backend, torch.device("cpu"), use_reentrant)
    assert not all(torch.equal(a, b) for a, b in zip(g["plain"], g["other_seed"]))  # the masks matter
    for a, b in zip(g["checkpointed"], g["plain"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_torch_backend_mask_is_the_documented_one():
    """The torch backend's mask is dropout_keep_mask(draw_dropout_seed() after manual_seed): its forward equals the
    float64 formula with exactly that mask (not merely some mask)."""
    c = _case(p=0.3, training=True, lead=[4, 9], seed=11)
    t = build_inputs(c)
    with torch.no_grad():
        y = run_op("torch", c, t, 77)
    keep = regenerate_keep_mask("torch", 77, t["x"], c["in_f"], 0.3)
    assert 0 < keep.float().mean() < 1
    y64 = vera_formula(t["x"].double(), t["weight"].double(), t["bias"].double(), t["A"].double(), t["B"].double(),
                       t["ld"].double(), t["lb"].double(), keep=keep, p=0.3)
    assert_close_f64(y, y64, None, torch.float32, "forward with regenerated mask")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(backend, dtype):
    """Under CPU autocast the op runs in the autocast dtype and matches the formula in that dtype's tolerance."""
    if dtype not in backend_dtypes(backend):
        pytest.skip("dtype not run for this backend on this machine")
    t = build_inputs(_case(lead=[2, 5], seed=5))
    with torch.autocast("cpu", dtype=dtype):
        y = vk.ops.vera_linear(t["x"], t["weight"], t["bias"], t["A"], t["B"], t["ld"], t["lb"], backend=backend)
    assert y.dtype == dtype
    xs, ws, bs = (v.detach().to(dtype) for v in (t["x"], t["weight"], t["bias"]))
    y64 = vera_formula(xs.double(), ws.double(), bs.double(), t["A"].double(), t["B"].double(), t["ld"].double(),
                       t["lb"].double())
    plain = vera_formula(xs, ws, bs, t["A"], t["B"], t["ld"], t["lb"])
    assert_close_f64(y, y64, plain, dtype, "autocast forward")


# ---------------------------------------------------------------------------------------------- saved memory
def saved_activation_bytes(fn, exclude: list[torch.Tensor]):
    """Run fn() under saved_tensors_hooks; bytes of saved tensors whose storage is none of ``exclude`` (parameters,
    buffers, the input), deduplicated by storage."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
    saved: dict[int, int] = {}

    def pack(t):
        st_ = t.untyped_storage()
        is_seed = t.dim() == 0 and t.dtype == torch.int64  # "plus a seed": a 0-dim int64 tensor is allowed
        if st_.data_ptr() not in excluded and not is_seed:
            saved[st_.data_ptr()] = st_.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(saved.values())


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["frozen_base", "weight_grad", "bias_grad", "dropout", "strided_x", "conv1d"])
def test_fused_backend_saves_only_h(backend, dtype, case):
    """The torch (and triton) backend keeps for backward only h = dropout(x) A_s^T (tokens x r, x's dtype) plus a
    seed; the reference (PEFT's unfused math) keeps (tokens x out) and (tokens x r) float32 tensors."""
    if dtype not in backend_dtypes(backend):
        pytest.skip("dtype not run for this backend on this machine")
    lead, in_f, out_f, r = (3, 7), 37, 45, 5
    tokens = math.prod(lead)
    gen = torch.Generator().manual_seed(0)
    fan = case == "conv1d"
    weight = torch.randn((in_f, out_f) if fan else (out_f, in_f), generator=gen).to(dtype)
    bias = torch.randn(out_f, generator=gen).to(dtype)
    weight.requires_grad_(case == "weight_grad")
    bias.requires_grad_(case == "bias_grad")
    A = torch.randn(r, in_f + 4, generator=gen)
    B = torch.randn(out_f + 3, r, generator=gen)
    ld = torch.randn(r, generator=gen).requires_grad_(True)
    lb = torch.randn(out_f, generator=gen).requires_grad_(True)
    if case == "strided_x":
        x = torch.randn(lead[1], lead[0], in_f, generator=gen).to(dtype).requires_grad_(True).transpose(0, 1)
    else:
        x = torch.randn(*lead, in_f, generator=gen).to(dtype).requires_grad_(True)
    p, training = (0.25, True) if case == "dropout" else (0.0, False)
    exclude = [weight, bias, A, B, ld, lb, x]

    def call(backend):
        return vk.ops.vera_linear(x, weight, bias, A, B, ld, lb, dropout_p=p, training=training,
                                  fan_in_fan_out=fan, backend=backend)

    y, nbytes = saved_activation_bytes(lambda: call(backend), exclude)
    assert torch.isfinite(y).all()
    # h is in the branch's compute dtype: the activation dtype, or float32 for the torch backend on the CPU
    itemsize = torch.empty((), dtype=adapter_compute_dtype(backend, dtype, "cpu")).element_size()
    assert nbytes == tokens * r * itemsize, f"{backend} backend saved {nbytes} bytes, want {tokens * r * itemsize}"
    y.sum().backward()  # the saved tensors are enough for backward
    assert ld.grad is not None and torch.isfinite(ld.grad).all()

    y_ref, ref_bytes = saved_activation_bytes(lambda: call("reference"), exclude)
    assert ref_bytes >= tokens * (out_f + r) * 4 > nbytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vera_linear_layer_saves_only_h(dtype):
    """The same through a patched model's VeraLinear (torch backend): only tokens x r is kept per adapted layer."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(33, 21))
    model.add_module("act", nn.Tanh())
    model.add_module("out", nn.Linear(21, 19, bias=False))
    model.to(dtype)
    r = 6
    vk.patch_model(model, vk.VeraConfig(r=r, target_modules=["out"], init_weights=False), backend="torch")
    x = torch.randn(4, 11, 33, dtype=dtype)
    with torch.no_grad():
        hidden = model.act(model.proj(x))
    layer = model.out
    assert isinstance(layer, vk.VeraLinear)
    # the module's own state is not activation memory: parameters, buffers, and the projections' cached casts
    exclude = [hidden] + list(layer.parameters()) + list(layer.buffers())
    if hasattr(layer.vera_projections, "for_compute"):
        exclude += list(layer.vera_projections.for_compute(dtype))
    y, nbytes = saved_activation_bytes(lambda: layer(hidden), exclude)
    assert torch.isfinite(y).all()
    assert nbytes == 44 * r * torch.empty((), dtype=adapter_compute_dtype("torch", dtype, "cpu")).element_size()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead", [(13,), (3, 5)], ids=["2d", "3d"])
def test_output_takes_in_place_ops(backend, lead):
    """The op's output is a tensor of its own, not a view made inside an autograd.Function: a following in-place op
    (nn.ReLU(inplace=True), logits /= T) works, and the gradients are those of the out-of-place computation."""
    gen = torch.Generator().manual_seed(21)
    in_f, out_f, r = 24, 20, 6
    x = torch.randn(*lead, in_f, generator=gen, requires_grad=True)
    W = torch.randn(out_f, in_f, generator=gen) * in_f**-0.5
    A, B = torch.randn(r, in_f + 3, generator=gen), torch.randn(out_f + 2, r, generator=gen)
    ld = torch.randn(r, generator=gen, requires_grad=True)
    lb = torch.randn(out_f, generator=gen, requires_grad=True)
    gy = torch.randn(*lead, out_f, generator=gen)
    grads = []
    for in_place in (False, True):
        y = vk.ops.vera_linear(x, W, None, A, B, ld, lb, backend=backend)
        y = y.relu_() if in_place else y.relu()
        grads.append(torch.autograd.grad(y, [x, ld, lb], gy))
    for a, b in zip(*grads):
        assert torch.isfinite(a).all() and torch.equal(a, b)
