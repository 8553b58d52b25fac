"""PEFT-format checkpoints both ways: vk.save_adapter -> PeftModel.from_pretrained, PEFT's save_pretrained ->
vk.load_adapter; state dicts compared key by key with get_peft_model_state_dict. save_projection True and False,
bias modes, modules_to_save, a checkpoint loaded as a second adapter."""

from __future__ import annotations

import copy
import json
import os
import warnings

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

import vera_kernels as vk
from helpers import (
    MODEL_BACKENDS,
    TARGETS,
    assert_tensors_equal,
    find_projections,
    lambda_params,
    logits,
    make_pair,
    peft_projections,
    set_random_lambdas,
    strip_peft,
    token_ids,
    trainable_names,
)


def cfg(arch: str, **kw) -> dict:
    base = dict(r=5, target_modules=TARGETS[arch], init_weights=False, projection_prng_key=1234)
    base.update(kw)
    return base


def perturb_trained_tensors(pm, om, seed: int) -> None:
    """Give both models the same random lambdas, trainable biases and modules_to_save copies, as training would."""
    set_random_lambdas(pm, seed)
    set_random_lambdas(om, seed)
    po = {strip_peft(n): p for n, p in pm.named_parameters() if p.requires_grad and "lambda" not in n}
    oo = {n: p for n, p in om.named_parameters() if p.requires_grad and "lambda" not in n}
    assert po.keys() == oo.keys()
    with torch.no_grad():
        for i, name in enumerate(sorted(po)):
            noise = 0.1 * torch.randn(po[name].shape, generator=torch.Generator().manual_seed(seed + i))
            po[name].add_(noise)
            oo[name].add_(noise)


def quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


CASES = [
    ("llama", dict(save_projection=True)),
    ("llama", dict(save_projection=False)),
    ("gpt2", dict(save_projection=True)),
    ("gpt2", dict(save_projection=False)),
    ("gpt2", dict(bias="all")),
    ("gpt2", dict(bias="vera_only", save_projection=False)),
    ("llama", dict(modules_to_save=["lm_head"])),
]
IDS = [f"{a}-" + "-".join(f"{k}={v}" for k, v in kw.items()) for a, kw in CASES]


@pytest.mark.parametrize("arch,extra", CASES, ids=IDS)
def test_state_dict_matches_peft(arch, extra):
    _, pm, om = make_pair(arch, cfg(arch, **extra))
    perturb_trained_tensors(pm, om, 1)
    ours = vk.get_vera_state_dict(om)
    theirs = {k: v.detach() for k, v in get_peft_model_state_dict(pm).items()}
    assert_tensors_equal(ours, theirs, "adapter state dict")
    assert ("base_model.vera_A" in ours) == extra.get("save_projection", True)
    # the state dict holds copies: changing it does not change the model
    k = next(k for k in ours if "lambda_d" in k)
    ours[k].add_(1.0)
    assert not torch.equal(vk.get_vera_state_dict(om)[k], ours[k])


@pytest.mark.parametrize("arch,extra", CASES, ids=IDS)
def test_ours_to_peft(arch, extra, tmp_path):
    base, pm, om = make_pair(arch, cfg(arch, **extra))
    perturb_trained_tensors(pm, om, 2)
    vk.save_adapter(om, tmp_path)
    on_disk = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert_tensors_equal(on_disk, vk.get_vera_state_dict(om), "file")
    with open(os.path.join(tmp_path, "adapter_config.json")) as f:
        conf = json.load(f)
    assert conf["peft_type"] == "VERA" and conf["r"] == 5 and conf["projection_prng_key"] == 1234
    loaded_cfg = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded_cfg, peft.VeraConfig)
    assert loaded_cfg.save_projection == extra.get("save_projection", True)
    assert sorted(loaded_cfg.target_modules) == sorted(TARGETS[arch])

    loaded = quiet(PeftModel.from_pretrained, copy.deepcopy(base), tmp_path)
    ids = token_ids(2)
    out = logits(om, ids)
    assert not torch.allclose(out, logits(base, ids))
    assert torch.equal(logits(loaded, ids), out)
    assert_tensors_equal({k: v.detach() for k, v in get_peft_model_state_dict(loaded).items()},
                         vk.get_vera_state_dict(om), "PEFT-loaded state dict")


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
@pytest.mark.parametrize("arch,extra", CASES, ids=IDS)
def test_peft_to_ours(arch, extra, backend, tmp_path):
    base, pm, om = make_pair(arch, cfg(arch, **extra))
    perturb_trained_tensors(pm, om, 3)
    pm.save_pretrained(tmp_path)
    fresh = copy.deepcopy(base)
    quiet(vk.load_adapter, fresh, tmp_path, backend=backend, is_trainable=True)
    assert vk.adapter_names(fresh) == ["default"] and vk.active_adapters(fresh) == ["default"]
    assert_tensors_equal(vk.get_vera_state_dict(fresh), {k: v.detach() for k, v in
                                                         get_peft_model_state_dict(pm).items()}, "loaded")
    A, B = peft_projections(pm)
    assert torch.equal(find_projections(fresh).vera_A, A) and torch.equal(find_projections(fresh).vera_B, B)
    # is_trainable=True: the adapter is trainable, as in the PEFT model that was saved
    assert trainable_names(fresh) == trainable_names(pm)
    ids = token_ids(3)
    out_p = logits(pm, ids)
    out_o = logits(fresh, ids)
    if backend == "reference":
        assert torch.equal(out_o, out_p)
    else:
        torch.testing.assert_close(out_o, out_p, rtol=1e-4, atol=1e-5 * out_p.abs().max().item())
    # round trip: our save of what we loaded is PEFT's file
    vk.save_adapter(fresh, tmp_path / "again")
    assert_tensors_equal(load_file(os.path.join(tmp_path, "again", "adapter_model.safetensors")),
                         load_file(os.path.join(tmp_path, "adapter_model.safetensors")), "re-saved")


def test_checkpoint_projections_are_used(tmp_path):
    """save_projection=True: the checkpoint's vera_A/vera_B are loaded (not redrawn from the key), as PEFT does."""
    base, pm, om = make_pair("llama", cfg("llama"))
    set_random_lambdas(pm, 4)
    A, B = peft_projections(pm)
    with torch.no_grad():
        A.mul_(-1.5)  # shared by every layer of the PEFT model
        B.add_(0.25)
    pm.save_pretrained(tmp_path)
    fresh = quiet(vk.load_adapter, copy.deepcopy(base), tmp_path, backend="reference")
    assert torch.equal(find_projections(fresh).vera_A, A) and torch.equal(find_projections(fresh).vera_B, B)
    ids = token_ids(4)
    assert torch.equal(logits(fresh, ids), logits(pm, ids))


def test_save_projection_false_rebuilds_from_key(tmp_path):
    base, pm, om = make_pair("gpt2", cfg("gpt2", save_projection=False))
    set_random_lambdas(om, 5)
    vk.save_adapter(om, tmp_path)
    assert not any("vera_A" in k or "vera_B" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    fresh = quiet(vk.load_adapter, copy.deepcopy(base), tmp_path, backend="reference")
    assert torch.equal(find_projections(fresh).vera_A, find_projections(om).vera_A)
    ids = token_ids(5)
    torch.testing.assert_close(logits(fresh, ids), logits(om, ids), rtol=0, atol=0)


@pytest.mark.parametrize("save_projection", [True, False])
def test_load_second_adapter_matches_peft(save_projection, tmp_path):
    """A checkpoint loaded into a patched model is added next to the others, not active (PEFT's load_adapter); new
    layers it adapts run on the backend the model was patched with (load_adapter's backend default is "auto")."""
    base, pm, om = make_pair("llama", cfg("llama", save_projection=save_projection))
    set_random_lambdas(pm, 6)
    set_random_lambdas(om, 6)
    # a second adapter trained elsewhere: same key/save_projection, other targets with the same largest in/out
    # features (52 / 40), so the same shared projections
    _, pm2, _ = make_pair("llama", cfg("llama", save_projection=save_projection,
                                       target_modules=["o_proj", "down_proj"]), lambda_seed=9)
    set_random_lambdas(pm2, 7)
    pm2.save_pretrained(tmp_path)
    ids = token_ids(6)
    quiet(vk.load_adapter, om, tmp_path, adapter_name="other")
    quiet(pm.load_adapter, tmp_path, adapter_name="other")
    assert vk.adapter_names(om) == ["default", "other"] and vk.active_adapters(om) == ["default"]
    # layers created for the new adapter (o_proj) use the model's backend, as with vk.add_adapter
    assert {m.backend for m in om.modules() if isinstance(m, vk.VeraLinear)} == {"reference"}
    assert torch.equal(logits(om, ids), logits(pm, ids))
    assert trainable_names(om) == trainable_names(pm)
    vk.set_adapter(om, "other")
    pm.set_adapter("other")
    out = logits(om, ids)
    assert torch.equal(out, logits(pm, ids))
    assert torch.equal(out, logits(pm2, ids))  # the model it was trained in
    ol, pl = lambda_params(om), lambda_params(pm)
    assert ol.keys() == pl.keys()
    assert all(torch.equal(ol[k], pl[k]) for k in pl)


def test_load_second_adapter_trained_with_other_projections_warns(tmp_path):
    """Better than PEFT (requested): a save_projection=False checkpoint whose own targets give projections of another
    shape than the ones this model's adapters share. Trained on its own, that adapter used A = draw(r, in_max'), but
    loaded next to others it gets the shared A[:, :in] -- other random numbers, so its outputs silently differ from
    the model it was trained in (PEFT's load_adapter does the same, silently). Loading may go on (the checkpoint
    cannot say whether it was trained as a second adapter), but the user must be warned."""
    base, pm, om = make_pair("llama", cfg("llama", save_projection=False))  # shared A: (5, 52), B: (40, 5)
    _, pm2, _ = make_pair("llama", cfg("llama", save_projection=False, target_modules=["o_proj"]),
                          lambda_seed=9)  # trained with A: (5, 40), B: (40, 5)
    set_random_lambdas(pm2, 7)
    pm2.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vk.load_adapter(om, tmp_path, adapter_name="other")
    messages = [str(w.message) for w in caught]
    assert any("vera_A" in m or "projection" in m.lower() for m in messages if "PRNG" not in m), messages
