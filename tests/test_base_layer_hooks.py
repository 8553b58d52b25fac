"""Base layers run as the user set them up (issue: offloaded or hooked base layers gave silent garbage), and no
cached tensor ever breaks a later training step (a first forward under torch.inference_mode()).

A plain nn.Linear / Conv1D base with no hooks is computed in place as one GEMM; any hook (the module's own or a
global one) or a replaced forward (accelerate's hooks) makes the base run through the layer itself, as PEFT's
``self.base_layer(x)`` does; weights or lambdas on the meta device with nothing to materialise them are an error."""

from __future__ import annotations

import pytest
import torch

import vera_kernels as vk
from helpers import make_pair, set_random_lambdas, tiny_llama, token_ids

CFG = dict(r=8, target_modules=["q_proj", "v_proj"], init_weights=False)


def q_base(model, peft_side=False):
    root = model.base_model.model if peft_side else model
    return root.model.layers[0].self_attn.q_proj.base_layer


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_hooks_on_the_base_layer_run_as_in_peft(backend):
    _, pm, om = make_pair("llama", CFG, backend=backend)
    ids = token_ids(0)
    fired = []
    for model, peft_side in ((pm, True), (om, False)):
        base = q_base(model, peft_side)
        base.register_forward_pre_hook(lambda mod, args: (args[0] * 0.5,))
        base.register_forward_hook(lambda mod, args, out, peft_side=peft_side: fired.append(peft_side) or out + 1.0)
    want, got = pm(ids).logits, om(ids).logits
    assert fired == [True, False]
    if backend == "reference":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_global_forward_hooks_fire():
    model = tiny_llama()
    vk.patch_model(model, vk.VeraConfig(**CFG), backend="torch")
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, args, out: seen.append(mod) if isinstance(mod, torch.nn.Linear) else None)
    try:
        model(token_ids(0))
    finally:
        handle.remove()
    assert q_base(model) in seen


def test_accelerate_cpu_offload_is_refused_clearly():
    accelerate = pytest.importorskip("accelerate")
    model = tiny_llama()
    vk.patch_model(model, vk.VeraConfig(**CFG), backend="torch")
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="meta device"):
        model(token_ids(0))


def test_meta_weight_without_hooks_is_an_error_not_garbage():
    model = tiny_llama()
    vk.patch_model(model, vk.VeraConfig(**CFG), backend="torch")
    base = q_base(model)
    base.weight = torch.nn.Parameter(torch.empty_like(base.weight, device="meta"), requires_grad=False)
    with pytest.raises(RuntimeError, match="meta device"):
        model.model.layers[0].self_attn.q_proj(torch.randn(2, 3, 40))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_inference_mode_first_then_training(dtype):
    """The projections' cached casts made during an inference-mode forward are normal tensors: training works
    afterwards (before: "Inference tensors cannot be saved for backward")."""
    model = tiny_llama()
    vk.patch_model(model, vk.VeraConfig(**CFG), backend="torch")
    set_random_lambdas(model, seed=1)
    model.to(dtype)
    ids = token_ids(0)
    with torch.inference_mode():
        evaluated = model(ids).logits
    model.train()
    loss = model(ids).logits.float().square().mean()
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "vera_lambda" in n and p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(ids).logits, evaluated, rtol=0, atol=0)
