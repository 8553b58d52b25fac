"""Parity with PEFT on real transformers architectures (tiny Llama and GPT-2 built from configs).

Identical A/B bits, identical targeted modules and trainable sets, forward and every lambda gradient (bit-identical
for the "reference" backend, fp32 tolerance for the others), merge / unmerge / unpatch against PEFT's
merge_and_unload / unload, bias modes, modules_to_save, user-unfrozen base weights.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch

import vera_kernels as vk
from helpers import (
    BUILDERS,
    HAS_TRITON_BACKEND,
    MODEL_BACKENDS,
    TARGETS,
    find_projections,
    lambda_params,
    logits,
    make_pair,
    peft_projections,
    random_output_weights,
    set_random_lambdas,
    strip_peft,
    token_ids,
    trainable_names,
)

ARCHS = ["llama", "gpt2"]
# the main forward/gradient parity runs every backend; triton (interpreter on CPU) only here
PARITY_BACKENDS = MODEL_BACKENDS + (["triton"] if HAS_TRITON_BACKEND else [])


def adapted_names(model) -> set[str]:
    from peft.tuners.vera.layer import VeraLayer

    return {strip_peft(n) for n, m in model.named_modules() if isinstance(m, (vk.VeraLinear, VeraLayer))}


def loss_of(model, ids, seed=123):
    out = logits(model, ids)
    return (out * random_output_weights(out.shape, seed)).sum()


def grads(model) -> dict[str, torch.Tensor]:
    return {strip_peft(n): p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_close_fp32(ours: torch.Tensor, theirs: torch.Tensor, what: str, exact: bool) -> None:
    assert ours is not None and theirs is not None, f"{what}: missing"
    assert torch.isfinite(ours).all() and torch.isfinite(theirs).all(), f"{what}: non-finite"
    if exact:
        assert torch.equal(ours, theirs), f"{what}: not bit-identical (max diff {(ours - theirs).abs().max()})"
    else:
        scale = theirs.abs().max().item()
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * max(scale, 1e-3), msg=what)


def assert_grads_match(om, pm, exact: bool) -> None:
    og, pg = grads(om), grads(pm)
    assert set(og) == set(pg)
    for name in pg:
        assert_close_fp32(og[name], pg[name], f"grad {name}", exact)


def cfg(arch: str, **kw) -> dict:
    base = dict(r=6, target_modules=TARGETS[arch], init_weights=False, projection_prng_key=0xBEEF)
    base.update(kw)
    return base


# ---------------------------------------------------------------------------------------------- structure
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("save_projection", [True, False])
def test_same_projections_targets_trainables(arch, save_projection):
    _, pm, om = make_pair(arch, cfg(arch, save_projection=save_projection))
    A, B = peft_projections(pm)
    proj = find_projections(om)
    assert proj.vera_A.dtype == torch.float32 and proj.vera_B.dtype == torch.float32
    assert torch.equal(proj.vera_A, A) and torch.equal(proj.vera_B, B), "A/B differ from PEFT's bits"
    # the same object is shared by every adapted layer
    assert len({id(m.vera_projections) for m in om.modules() if isinstance(m, vk.VeraLinear)}) == 1
    assert adapted_names(om) == adapted_names(pm) and adapted_names(om)
    assert trainable_names(om) == trainable_names(pm)
    ol, pl = lambda_params(om), lambda_params(pm)
    assert set(ol) == set(pl)
    for k in pl:
        assert ol[k].dtype == torch.float32 and torch.equal(ol[k], pl[k]), k
    # lambda_d really is random (init_weights=False), so later forward checks cannot pass vacuously
    assert any(v.std() > 0.1 for k, v in ol.items() if "lambda_d" in k)


@pytest.mark.parametrize("arch", ARCHS)
def test_default_init_is_identity_and_matches_peft(arch):
    """init_weights=True: lambda_d = d_initial, lambda_b = 0, so the patched model's output is the base model's."""
    base, pm, om = make_pair(arch, cfg(arch, init_weights=True, d_initial=0.37))
    for k, v in lambda_params(om).items():
        assert torch.equal(v, lambda_params(pm)[k])
        assert torch.all(v == (0.37 if "lambda_d" in k else 0.0))
    ids = token_ids(1)
    assert torch.equal(logits(om, ids), logits(base, ids))


@pytest.mark.parametrize(
    "arch,extra",
    [
        ("llama", dict(target_modules=None)),  # PEFT's per-architecture default
        ("gpt2", dict(target_modules=None)),
        ("llama", dict(target_modules=r".*\.(k_proj|up_proj)")),  # a regex must fully match
        ("llama", dict(target_modules=["q_proj", "down_proj"], layers_to_transform=1, layers_pattern="layers")),
        ("llama", dict(target_modules=["v_proj", "gate_proj"], layers_to_transform=[0])),
        ("gpt2", dict(target_modules=["c_attn", "c_fc"], layers_to_transform=[1], layers_pattern="h")),
        ("llama", dict(target_modules="all-linear")),
        ("gpt2", dict(target_modules=["attn.c_proj"])),  # suffix match on a dotted name
    ],
)
def test_targeting_matches_peft(arch, extra):
    _, pm, om = make_pair(arch, cfg(arch, **extra))
    assert adapted_names(om) == adapted_names(pm) and adapted_names(om)
    A, B = peft_projections(pm)
    proj = find_projections(om)
    assert proj.vera_A.shape == A.shape and proj.vera_B.shape == B.shape
    assert torch.equal(proj.vera_A, A) and torch.equal(proj.vera_B, B)
    assert trainable_names(om) == trainable_names(pm)


# ---------------------------------------------------------------------------------------------- forward + grads
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", PARITY_BACKENDS)
def test_forward_and_lambda_gradients(arch, backend):
    _, pm, om = make_pair(arch, cfg(arch), backend=backend)
    set_random_lambdas(pm, seed=5)
    set_random_lambdas(om, seed=5)
    ids = token_ids(2, batch=2, length=5 if backend == "triton" else 9)
    exact = backend == "reference"
    out_o, out_p = logits(om, ids), logits(pm, ids)
    base_out = logits(BUILDERS[arch](0), ids)
    assert (out_p - base_out).abs().max() > 1e-2, "the adapter changes nothing: this test could not fail"
    assert_close_fp32(out_o, out_p, "logits", exact)
    loss_of(om, ids).backward()
    loss_of(pm, ids).backward()
    assert_grads_match(om, pm, exact)
    assert all(g.abs().max() > 0 for g in grads(om).values())


@pytest.mark.parametrize("arch", ARCHS)
def test_training_mode_dropout_bit_identical_reference(arch):
    """vera_dropout in train mode: the reference backend draws PEFT's masks (nn.Dropout on the global generator) in
    PEFT's order, so forward and gradients are bit-identical for the same torch.manual_seed."""
    _, pm, om = make_pair(arch, cfg(arch, vera_dropout=0.3), backend="reference")
    set_random_lambdas(pm, seed=2)
    set_random_lambdas(om, seed=2)
    pm.train()
    om.train()
    ids = token_ids(3)
    torch.manual_seed(77)
    lo = loss_of(om, ids)
    torch.manual_seed(77)
    lp = loss_of(pm, ids)
    assert torch.equal(lo, lp)
    lo.backward()
    lp.backward()
    assert_grads_match(om, pm, exact=True)
    # and dropout is really on: eval-mode output differs
    pm.eval()
    assert not torch.equal(loss_of(pm, ids), lp)


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
@pytest.mark.parametrize("bias", ["all", "vera_only"])
def test_bias_modes_gpt2(backend, bias):
    """bias="all" trains every bias, "vera_only" those of adapted layers; gradients reach them (GPT-2 Conv1D)."""
    _, pm, om = make_pair("gpt2", cfg("gpt2", bias=bias), backend=backend)
    trainable = trainable_names(om)
    assert trainable == trainable_names(pm)
    biases = {n for n in trainable if n.endswith(".bias")}
    if bias == "all":
        assert "transformer.h.0.mlp.c_fc.bias" in biases and "transformer.h.0.ln_1.bias" in biases
    else:
        assert biases and all(".base_layer." in n for n in biases)
    set_random_lambdas(pm, 3)
    set_random_lambdas(om, 3)
    ids = token_ids(4)
    loss_of(om, ids).backward()
    loss_of(pm, ids).backward()
    assert_grads_match(om, pm, exact=backend == "reference")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_user_unfrozen_base_weight_gets_gradients(arch, backend):
    """A user who unfreezes an adapted layer's base weight and bias gets their gradients (fused backends included);
    frozen ones get none."""
    _, pm, om = make_pair(arch, cfg(arch), backend=backend)
    set_random_lambdas(pm, 4)
    set_random_lambdas(om, 4)
    layer = next(n for n in adapted_names(om))
    for model in (om, pm):
        prefix = "base_model.model." if model is pm else ""
        base_layer = model.get_submodule(prefix + layer).base_layer
        base_layer.weight.requires_grad_(True)
        if base_layer.bias is not None:
            base_layer.bias.requires_grad_(True)
    ids = token_ids(6)
    loss_of(om, ids).backward()
    loss_of(pm, ids).backward()
    assert_grads_match(om, pm, exact=backend == "reference")
    assert f"{layer}.base_layer.weight" in grads(om)
    frozen = [p for n, p in om.named_parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_modules_to_save_parity(backend):
    _, pm, om = make_pair("llama", cfg("llama", modules_to_save=["lm_head"]), backend=backend)
    assert trainable_names(om) == trainable_names(pm)
    assert "lm_head.modules_to_save.default.weight" in trainable_names(om)
    for model in (om, pm):
        set_random_lambdas(model, 8)
        head = model.get_submodule(("base_model.model." if model is pm else "") + "lm_head")
        with torch.no_grad():
            w = head.modules_to_save["default"].weight
            w.add_(0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1)))
    ids = token_ids(7)
    exact = backend == "reference"
    assert_close_fp32(logits(om, ids), logits(pm, ids), "logits", exact)
    loss_of(om, ids).backward()
    loss_of(pm, ids).backward()
    assert_grads_match(om, pm, exact)


@pytest.mark.parametrize("arch", ARCHS)
def test_half_precision_model_close_to_peft(arch):
    """On a bf16 model the lambdas and projections are float32 (as PEFT's); forward agrees with PEFT within bf16
    tolerance and the projections agree with PEFT's at bf16 precision (PEFT may round them through the model's
    dtype; we keep the exact float32 draw, see test_adapters.test_dtype_casts_keep_float32)."""
    base = BUILDERS[arch](0).to(torch.bfloat16)
    _, pm, om = make_pair(arch, cfg(arch), backend="torch", base=base)
    A, B = peft_projections(pm)
    proj = find_projections(om)
    assert proj.vera_A.dtype == torch.float32
    assert torch.equal(proj.vera_A.bfloat16(), A.bfloat16()) and torch.equal(proj.vera_B.bfloat16(), B.bfloat16())
    ids = token_ids(8)
    out_o, out_p = logits(om, ids).float(), logits(pm, ids).float()
    assert out_o.dtype == out_p.dtype
    ref = logits(make_pair(arch, cfg(arch), backend="reference", base=BUILDERS[arch](0))[2], ids)  # fp32 model
    err_o, err_p = (out_o - ref).abs().max(), (out_p - ref).abs().max()
    assert err_o <= 4 * err_p + 1e-2, f"bf16 error {err_o} vs PEFT's {err_p}"


# ---------------------------------------------------------------------------------------------- merge / unload
@pytest.mark.parametrize("arch", ARCHS)
def test_merge_unmerge_round_trip_matches_peft(arch):
    base, pm, om = make_pair(arch, cfg(arch))
    set_random_lambdas(pm, 9)
    set_random_lambdas(om, 9)
    ids = token_ids(9)
    before = logits(om, ids)
    vk.merge_adapter(om)
    pm.base_model.merge_adapter()
    ow = {strip_peft(k): v for k, v in om.state_dict().items() if "base_layer.weight" in k}
    pw = {strip_peft(k): v for k, v in pm.state_dict().items() if "base_layer.weight" in k}
    assert set(ow) == set(pw) and ow
    for k in pw:
        assert torch.equal(ow[k], pw[k]), f"merged weight {k} differs from PEFT's"
    bw = dict(base.state_dict())
    assert any(not torch.equal(ow[k], bw[k.replace(".base_layer", "")]) for k in ow)
    merged = logits(om, ids)
    torch.testing.assert_close(merged, before, rtol=1e-4, atol=1e-4)
    assert all(m.merged for m in om.modules() if isinstance(m, vk.VeraLinear))
    vk.unmerge_adapter(om)
    pm.base_model.unmerge_adapter()
    for k, v in om.state_dict().items():
        if "base_layer.weight" in k:
            torch.testing.assert_close(v, bw[k.replace(".base_layer", "")], rtol=0, atol=1e-5)
    assert_close_fp32(logits(om, ids), before, "after unmerge", exact=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_unpatch_merge_matches_merge_and_unload(arch):
    base, pm, om = make_pair(arch, cfg(arch))
    set_random_lambdas(pm, 10)
    set_random_lambdas(om, 10)
    ids = token_ids(10)
    before = logits(om, ids)
    plain_o = vk.unpatch_model(om, merge=True)
    plain_p = pm.merge_and_unload()
    assert [(n, type(m)) for n, m in plain_o.named_modules()] == [(n, type(m)) for n, m in base.named_modules()]
    assert not hasattr(plain_o, "_vera_kernels_state")
    so, sp = plain_o.state_dict(), plain_p.state_dict()
    assert set(so) == set(sp) == set(base.state_dict())
    for k in sp:
        assert torch.equal(so[k], sp[k]), k
    torch.testing.assert_close(logits(plain_o, ids), before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_unpatch_without_merge_restores_base_exactly(arch):
    base, pm, om = make_pair(arch, cfg(arch, modules_to_save=["lm_head"] if arch == "llama" else None))
    set_random_lambdas(om, 11)
    plain = vk.unpatch_model(om)
    unloaded = pm.unload()
    assert [(n, type(m)) for n, m in plain.named_modules()] == [(n, type(m)) for n, m in base.named_modules()]
    sb = base.state_dict()
    assert set(plain.state_dict()) == set(sb) == set(unloaded.state_dict())
    for k, v in plain.state_dict().items():
        assert torch.equal(v, sb[k]), k
    ids = token_ids(11)
    assert torch.equal(logits(plain, ids), logits(base, ids))
    # the base model's own requires_grad flags come back (all True for a fresh model)
    assert all(p.requires_grad for p in plain.parameters())


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_set_backend_switch_keeps_outputs(backend):
    _, pm, om = make_pair("gpt2", cfg("gpt2"), backend="reference")
    set_random_lambdas(om, 12)
    ids = token_ids(12)
    ref = logits(om, ids)
    vk.set_backend(om, backend)
    assert all(m.backend == backend for m in om.modules() if isinstance(m, vk.VeraLinear))
    assert_close_fp32(logits(om, ids), ref, "after set_backend", exact=backend == "reference")


def test_peft_config_not_mutated():
    """patch_model reads a peft.VeraConfig without changing it (PEFT flips fan_in_fan_out on its own copy)."""
    pc = peft.VeraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=False)
    before = copy.deepcopy(pc.to_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        om = vk.patch_model(BUILDERS["gpt2"](0), pc)
    assert pc.to_dict() == before
    assert vk.get_adapter_config(om).fan_in_fan_out is True  # Conv1D forces it, as in PEFT
