"""torch.compile(fullgraph=True) of a training step with adapter dropout: no graph break (the torch
backend's mask is a counter-based hash of a seed tensor drawn on the device: no host generator, no .item()), the
same result as eager for the same torch.manual_seed under aot_eager (which replays eager's RNG calls), and under
inductor a reproducible result per seed (inductor draws the seed with its own RNG)."""

from __future__ import annotations

import pytest
import torch

import vera_kernels as vk
from helpers import set_random_lambdas, tiny_llama, token_ids



def llama_step(model, ids, seed):
    torch.manual_seed(seed)
    loss = model(ids).logits.float().square().mean()
    params = [p for p in model.parameters() if p.requires_grad]
    return [loss] + list(torch.autograd.grad(loss, params))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_llama_training_step_compiles_with_dropout(compile_backend, backend="torch"):
    """(The triton backend: the same check on a block in test_triton.py; the interpreter is too slow for a model.)"""
    torch._dynamo.reset()
    model = tiny_llama(num_hidden_layers=2)
    cfg = vk.VeraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False, vera_dropout=0.3)
    vk.patch_model(model, cfg, backend=backend)
    set_random_lambdas(model, seed=1)
    model.train()
    ids = token_ids(0, batch=2, length=5)
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)  # any graph break raises
    first, again, other = (llama_step(compiled, ids, s) for s in (5, 5, 6))
    for a, b in zip(first, again):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(first[0], other[0])  # another seed, another mask
    if compile_backend == "aot_eager":
        for a, b in zip(first, llama_step(model, ids, 5)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    model.eval()  # and without dropout the compiled model is eager's
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-6)
