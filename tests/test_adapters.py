"""Several adapters on one model (add / set / delete / disable, against PEFT), safe_merge, unpatch's restoring of
requires_grad, and dtype casts after patching."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch

import vera_kernels as vk
from helpers import (
    BUILDERS,
    MODEL_BACKENDS,
    TARGETS,
    assert_unchanged,
    find_projections,
    lambda_params,
    logits,
    make_pair,
    random_output_weights,
    set_random_lambdas,
    snapshot,
    strip_peft,
    token_ids,
    trainable_names,
)


def cfg(arch: str, **kw) -> dict:
    base = dict(r=6, target_modules=TARGETS[arch], init_weights=False, projection_prng_key=11)
    base.update(kw)
    return base


def close(a, b, exact: bool, what: str = "") -> None:
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), what
    if exact:
        assert torch.equal(a, b), f"{what}: max diff {(a - b).abs().max()}"
    else:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(b.abs().max().item(), 1e-3), msg=what)


def loss_of(model, ids):
    out = logits(model, ids)
    return (out * random_output_weights(out.shape, 5)).sum()


def grads(model):
    return {strip_peft(n): p.grad for n, p in model.named_parameters() if p.requires_grad}


def two_adapter_pair(arch, backend, second=None, **first):
    """PEFT and our model with adapters "default" and "other" (both init_weights=False, same RNG), random lambdas
    everywhere; "default" is active."""
    base, pm, om = make_pair(arch, cfg(arch, **first), backend=backend)
    second = cfg(arch, **(second or {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(21)
        pm.add_adapter("other", peft.VeraConfig(**second))
        torch.manual_seed(21)
        vk.add_adapter(om, "other", peft.VeraConfig(**second))
    for lam in (lambda_params(pm), lambda_params(om)):
        assert any(k.endswith(".other") for k in lam)
    assert {k: v for k, v in lambda_params(om).items()}.keys() == lambda_params(pm).keys()
    for k, v in lambda_params(pm).items():
        assert torch.equal(lambda_params(om)[k], v), k
    set_random_lambdas(pm, 31)
    set_random_lambdas(om, 31)
    return base, pm, om


# ---------------------------------------------------------------------------------------------- several adapters
@pytest.mark.parametrize("backend", MODEL_BACKENDS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_two_adapters_match_peft(arch, backend):
    base, pm, om = two_adapter_pair(arch, backend, second=dict(target_modules=TARGETS[arch][:1]))
    exact = backend == "reference"
    ids = token_ids(1)
    assert vk.adapter_names(om) == ["default", "other"] and vk.active_adapters(om) == ["default"]
    # a new adapter is neither active nor trainable (PEFT's rule)
    assert trainable_names(om) == trainable_names(pm)
    assert not any(n.endswith(".other") for n in trainable_names(om))
    close(logits(om, ids), logits(pm, ids), exact, "default active")

    vk.set_adapter(om, "other")
    pm.set_adapter("other")
    assert vk.active_adapters(om) == ["other"]
    assert trainable_names(om) == trainable_names(pm)
    assert all(n.endswith(".other") for n in trainable_names(om))
    out_other = logits(om, ids)
    close(out_other, logits(pm, ids), exact, "other active")
    loss_of(om, ids).backward()
    loss_of(pm, ids).backward()
    og, pg = grads(om), grads(pm)
    assert og.keys() == pg.keys()
    for k in pg:
        close(og[k], pg[k], exact, k)

    # both active: the deltas add up
    vk.set_adapter(om, ["default", "other"])
    pm.base_model.set_adapter(["default", "other"])
    assert trainable_names(om) == trainable_names(pm)
    both = logits(om, ids)
    close(both, logits(pm, ids), exact, "both active")
    assert not torch.allclose(both, out_other)


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_modules_to_save_follow_active_adapter(backend):
    base, pm, om = two_adapter_pair("llama", backend, second=dict(modules_to_save=["lm_head"]),
                                    modules_to_save=["lm_head"])
    for model in (pm, om):
        head = model.get_submodule(("base_model.model." if model is pm else "") + "lm_head")
        with torch.no_grad():
            for i, name in enumerate(["default", "other"]):
                w = head.modules_to_save[name].weight
                w.add_(0.1 * torch.randn(w.shape, generator=torch.Generator().manual_seed(i)))
    ids = token_ids(2)
    exact = backend == "reference"
    for name in ["other", "default"]:
        vk.set_adapter(om, name)
        pm.set_adapter(name)
        assert trainable_names(om) == trainable_names(pm)
        assert f"lm_head.modules_to_save.{name}.weight" in trainable_names(om)
        close(logits(om, ids), logits(pm, ids), exact, name)


@pytest.mark.parametrize("which", ["default", "other"])
def test_delete_adapter_matches_peft(which):
    base, pm, om = two_adapter_pair("llama", "reference")
    ids = token_ids(3)
    vk.delete_adapter(om, which)
    pm.delete_adapter(which)
    remaining = "other" if which == "default" else "default"
    assert vk.adapter_names(om) == [remaining] == list(pm.peft_config)
    assert vk.active_adapters(om) == list(pm.base_model.active_adapters)
    assert not any(which in k.split(".")[-1] for k in lambda_params(om))
    assert trainable_names(om) == trainable_names(pm)
    close(logits(om, ids), logits(pm, ids), True, "after delete")
    # the deleted name can be used again
    vk.add_adapter(om, which, cfg("llama"))
    assert which in vk.adapter_names(om)


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
@pytest.mark.parametrize("merged", [False, True])
def test_disable_adapter_gives_base_model(backend, merged):
    base, pm, om = make_pair("gpt2", cfg("gpt2"), backend=backend)
    set_random_lambdas(om, 4)
    ids = token_ids(4)
    adapted = logits(om, ids)
    base_out = logits(base, ids)
    assert not torch.allclose(adapted, base_out)
    if merged:
        vk.merge_adapter(om)
    with vk.disable_adapter(om):
        inside = logits(om, ids)
    if merged:  # PEFT's rule: disabling unmerges (weights come back up to rounding)
        torch.testing.assert_close(inside, base_out, rtol=1e-4, atol=1e-4)
        assert not any(m.merged for m in om.modules() if isinstance(m, vk.VeraLinear))
    else:
        assert torch.equal(inside, base_out)
    close(logits(om, ids), adapted, exact=False, what="after the block")


# ---------------------------------------------------------------------------------------------- better than PEFT
def test_safe_merge_checks_every_layer_first():
    """Better than PEFT: with safe_merge=True every layer's merged weight is checked before any is merged, so a
    broken (non-finite) adapter in one layer leaves the whole model unmerged. PEFT checks and merges layer by layer,
    leaving the layers before the broken one merged."""
    _, _, om = make_pair("llama", cfg("llama"))
    set_random_lambdas(om, 5)
    last = [m for m in om.modules() if isinstance(m, vk.VeraLinear)][-1]
    with torch.no_grad():
        last.vera_lambda_b["default"][3] = float("inf")
    before = snapshot(om)
    with pytest.raises(ValueError, match="(?i)nan"):
        vk.merge_adapter(om, safe_merge=True)
    assert_unchanged(om, before)
    assert not any(m.merged for m in om.modules() if isinstance(m, vk.VeraLinear))


def test_safe_merge_merges_finite_adapter():
    _, pm, om = make_pair("gpt2", cfg("gpt2"))
    set_random_lambdas(om, 6)
    set_random_lambdas(pm, 6)
    vk.merge_adapter(om, safe_merge=True)
    pm.base_model.merge_adapter(safe_merge=True)
    for k, v in pm.state_dict().items():
        if "base_layer.weight" in k:
            assert torch.equal(om.state_dict()[strip_peft(k)], v), k


def test_unpatch_unmerges_and_restores_requires_grad():
    """Better than PEFT: unpatch_model(merge=False) unmerges merged adapters (PEFT's unload() drops the wrappers and
    leaves the merged deltas in the weights) and gives every parameter back the requires_grad it had before patching
    (PEFT leaves the base model frozen)."""
    base = BUILDERS["llama"](0)
    model = BUILDERS["llama"](0)
    model.model.embed_tokens.weight.requires_grad_(False)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert not all(flags.values()) and any(flags.values())
    vk.patch_model(model, vk.VeraConfig(**cfg("llama")))
    set_random_lambdas(model, 7)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lambda" not in n)
    vk.merge_adapter(model)
    assert any(not torch.equal(model.get_submodule(n).base_layer.weight, base.get_submodule(n).weight)
               for n, m in model.named_modules() if isinstance(m, vk.VeraLinear))
    plain = vk.unpatch_model(model, merge=False)
    assert {n: p.requires_grad for n, p in plain.named_parameters()} == flags
    sb = base.state_dict()
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(v, sb[k], rtol=0, atol=1e-5)
    ids = token_ids(7)
    torch.testing.assert_close(logits(plain, ids), logits(base, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
@pytest.mark.parametrize("cast", ["half", "bfloat16"])
def test_dtype_casts_keep_float32(backend, cast):
    """Better than PEFT: after patching, model.half() / model.to(torch.bfloat16) casts the base model but the lambdas
    and the shared projections stay float32 (PEFT casts its lambdas and vera_A/vera_B with the model, so its
    projections are no longer the bits its projection_prng_key defines). The half model then runs and stays within
    the dtype's error of the float32 model (judged against PEFT's own error after the same cast)."""
    dtype = torch.float16 if cast == "half" else torch.bfloat16
    base, pm, om = make_pair("llama", cfg("llama"), backend=backend)
    set_random_lambdas(om, 8)
    set_random_lambdas(pm, 8)
    ids = token_ids(8)
    ref = logits(om, ids)
    proj = find_projections(om)
    A, B = proj.vera_A.clone(), proj.vera_B.clone()
    lambdas = {k: v.detach().clone() for k, v in lambda_params(om).items()}
    if cast == "half":
        om.half()
        pm.half()
    else:
        om.to(torch.bfloat16)
        pm.to(torch.bfloat16)
    assert om.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == dtype
    proj = find_projections(om)
    assert proj.vera_A.dtype == proj.vera_B.dtype == torch.float32
    assert torch.equal(proj.vera_A, A) and torch.equal(proj.vera_B, B)
    for k, v in lambda_params(om).items():
        assert v.dtype == torch.float32 and torch.equal(v, lambdas[k]), k
    assert trainable_names(om) == set(lambdas)
    out = logits(om, ids)
    assert out.dtype == dtype
    err_ours = (out.float() - ref).abs().max().item()
    err_peft = (logits(pm, ids).float() - ref).abs().max().item()
    assert err_ours <= 4 * err_peft + 1e-3, f"{dtype} model error {err_ours} vs PEFT's {err_peft}"
    loss_of(om, ids).backward()
    for k, p in lambda_params(om).items():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), k
    # and back to float32: bit-identical projections, float32 everything
    om.float()
    assert torch.equal(find_projections(om).vera_A, A)


def test_set_adapter_on_merged_model_unmerges_first():
    """PEFT's rule: switching adapters on a merged model first unmerges (with a warning), so the newly active adapter
    is what runs; keeping the old adapter merged would silently run base + old delta."""
    base, pm, om = two_adapter_pair("llama", "reference")
    ids = token_ids(9)
    vk.merge_adapter(om)
    pm.base_model.merge_adapter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.set_adapter("other")
        vk.set_adapter(om, "other")
    assert not any(m.merged for m in om.modules() if isinstance(m, vk.VeraLinear))
    out_p = logits(pm, ids)
    torch.testing.assert_close(logits(om, ids), out_p, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change", [dict(projection_prng_key=99), dict(r=3), dict(r=3, projection_prng_key=99),
                                    dict(target_modules=["o_proj", "gate_proj"])],
                         ids=["other_key", "other_r", "other_r_and_key", "other_targets"])
@pytest.mark.parametrize("how", ["add_adapter", "patch_model"])
def test_new_adapter_after_deleting_all(change, how):
    """Once every adapter is deleted nothing shares the old projections. A new adapter must then either behave
    exactly like one on a freshly patched model (its own projections, in every layer and in its checkpoint), or be
    refused with the model left as it was -- never half-applied, never running on stale projections."""
    model = BUILDERS["llama"](0)
    vk.patch_model(model, cfg("llama"))
    vk.delete_adapter(model, "default")
    new_cfg = cfg("llama", **change)
    before = snapshot(model)
    torch.manual_seed(3)
    try:
        if how == "add_adapter":
            vk.add_adapter(model, "new", new_cfg)
        else:
            vk.patch_model(model, new_cfg, adapter_name="new")
    except ValueError:
        assert_unchanged(model, before)
        return
    vk.set_adapter(model, "new")
    fresh = BUILDERS["llama"](0)
    torch.manual_seed(3)
    vk.patch_model(fresh, new_cfg, adapter_name="new")
    fresh_A = find_projections(fresh).vera_A
    for name, layer in model.named_modules():
        if isinstance(layer, vk.VeraLinear) and "new" in layer.r:
            assert torch.equal(layer.vera_projections.vera_A, fresh_A), f"{name} runs on stale projections"
    ids = token_ids(10)
    torch.testing.assert_close(logits(model, ids), logits(fresh, ids), rtol=1e-5, atol=1e-6)
    assert torch.equal(vk.get_vera_state_dict(model, "new")["base_model.vera_A"], fresh_A)


def test_unpatch_restores_requires_grad_of_modules_to_save():
    """(e) for modules_to_save: unpatch puts the trained copy in place of the original; the parameter under that name
    gets back the requires_grad flag the original had before patching (here: a frozen lm_head)."""
    model = BUILDERS["llama"](0)
    model.lm_head.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    vk.patch_model(model, cfg("llama", modules_to_save=["lm_head"]))
    with torch.no_grad():
        model.lm_head.modules_to_save["default"].weight.add_(0.5)
    plain = vk.unpatch_model(model)
    assert not torch.equal(plain.lm_head.weight, BUILDERS["llama"](0).lm_head.weight)  # the trained copy
    assert {n: p.requires_grad for n, p in plain.named_parameters()} == flags


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_projection_storage_swapped_in_place_is_seen(backend):
    """The layers' cached slices of the shared projections follow a change of their storage (``.data =``), as the
    cached casts follow in-place writes: zeroing A through ``.data`` leaves the base model's output."""
    _, _, model = make_pair("llama", cfg("llama"), backend=backend)
    ids = token_ids()
    patched_out = logits(model, ids)
    proj = find_projections(model)
    proj.vera_A.data = torch.zeros_like(proj.vera_A)
    with vk.disable_adapter(model):
        base_out = logits(model, ids)
    assert not torch.equal(patched_out, base_out)
    close(logits(model, ids), base_out, exact=True, what="A zeroed through .data")
