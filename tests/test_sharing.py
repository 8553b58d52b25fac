"""One h = x A_s^T per block input (vera_kernels.sharing): the same numbers with sharing on and off, fewer
down-projections and less saved memory, and every case where reusing an h would be stale refused.

Counting is done on the backend's ``down`` (one call = one x A_s^T GEMM); the stale cases each build a situation
where a reused h would give a different (wrong) result than computing it afresh, so each fails without its guard.
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import vera_kernels as vk
from helpers import set_random_lambdas, tiny_llama, token_ids
from vera_kernels import sharing
from vera_kernels.ops import vera_torch

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def downs(monkeypatch):
    """Counts the torch backend's x A_s^T GEMMs: its down-node calls and the one-call linears (ops.run_linear) that
    were given no h."""
    calls = []
    real = vera_torch.down
    real_linear = vera_torch.linear_plain

    def counting(x, A_s, p, seed):
        calls.append(tuple(x.shape))
        return real(x, A_s, p, seed)

    def counting_linear():
        fn = real_linear()
        if fn is None:
            return None

        def run(x, weight, bias, A_s, h, *rest):
            if h is None:
                calls.append(tuple(x.shape))
            return fn(x, weight, bias, A_s, h, *rest)
        return run

    monkeypatch.setattr(vera_torch, "down", counting)
    monkeypatch.setattr(vera_torch, "linear_plain", counting_linear)
    return calls


def patched_llama(targets=LLAMA_ALL, backend="torch", **cfg):
    model = tiny_llama()
    vk.patch_model(model, vk.VeraConfig(r=8, target_modules=targets, init_weights=False, **cfg), backend=backend)
    set_random_lambdas(model, seed=3)
    return model


def step(model, ids, seed=0):
    """Loss, logits and the gradients of every trainable parameter of one forward+backward."""
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)
    out = model(ids).logits
    loss = out.float().square().mean()
    loss.backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_step(a, b, exact_forward=True):
    out_a, g_a = a
    out_b, g_b = b
    if exact_forward:
        assert torch.equal(out_a, out_b), (out_a - out_b).abs().max()
    else:
        torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-6)
    assert g_a.keys() == g_b.keys() and g_a
    for n in g_a:
        assert torch.isfinite(g_a[n]).all(), n
        torch.testing.assert_close(g_a[n], g_b[n], rtol=1e-5, atol=1e-7, msg=n)


# ---------------------------------------------------------------------------------------------- same numbers, fewer GEMMs
@pytest.mark.parametrize("targets, per_block", [(LLAMA_ALL, 4), (["q_proj", "v_proj"], 1)], ids=["all", "q_v"])
def test_llama_same_results_fewer_down_projections(downs, targets, per_block):
    model = patched_llama(targets)
    model.train()
    ids = token_ids(0)
    on = step(model, ids)
    n_on = len(downs)
    downs.clear()
    vk.set_h_sharing(model, enabled=False)
    off = step(model, ids)
    assert_same_step(on, off)
    n_layers = model.config.num_hidden_layers
    assert n_on == per_block * n_layers, downs
    assert len(downs) == len(targets) * n_layers


def phi3_like():
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    return Phi3ForCausalLM(Phi3Config(hidden_size=40, intermediate_size=52, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=4, vocab_size=128, max_position_embeddings=64,
                                      pad_token_id=0)).eval()


def gpt_neox_like():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=40, intermediate_size=52, num_hidden_layers=2,
                                            num_attention_heads=4, vocab_size=128, max_position_embeddings=64)).eval()


@pytest.mark.parametrize("build, targets, per_block", [
    (phi3_like, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], 4),  # fused qkv: nothing to share, 4 inputs
    (gpt_neox_like, ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"], 3),  # parallel attn+MLP input
], ids=["phi3", "gpt_neox"])
def test_fused_qkv_blocks_same_results(downs, build, targets, per_block):
    """Fused-qkv architectures: sharing finds what is shared (GPT-NeoX's parallel residual feeds one normed input
    to attention and MLP only when they use the same norm output; here each has its own LayerNorm) and nothing
    else; results identical."""
    model = build()
    vk.patch_model(model, vk.VeraConfig(r=8, target_modules=targets, init_weights=False), backend="torch")
    set_random_lambdas(model, seed=3)
    ids = token_ids(0)
    on = step(model, ids)
    n_on = len(downs)
    vk.set_h_sharing(model, enabled=False)
    downs.clear()
    off = step(model, ids)
    assert_same_step(on, off)
    assert len(downs) == len(targets) * 2
    assert n_on <= len(downs)


def test_saved_bytes_per_block(monkeypatch):
    """What autograd keeps for a Llama step with every linear adapted: 4 h per block instead of 7."""
    model = patched_llama()
    ids = token_ids(0)
    r = 8

    def saved_h_bytes():
        seen = {}

        @sharing.observing_hook
        def pack(t):
            if t.dim() == 2 and t.shape[1] == r and t.shape[0] == ids.numel():
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(ids).logits
        return out, sum(seen.values())

    out_on, on = saved_h_bytes()
    vk.set_h_sharing(model, enabled=False)
    out_off, off = saved_h_bytes()
    assert torch.equal(out_on, out_off)
    one_h = ids.numel() * r * 4
    assert on == 4 * 2 * one_h and off == 7 * 2 * one_h, (on, off)


def test_several_adapters_on_a_layer_share_h(downs):
    model = patched_llama(["q_proj"])
    vk.add_adapter(model, "other", vk.VeraConfig(r=8, target_modules=["q_proj"], init_weights=False))
    set_random_lambdas(model, seed=4, adapter="other")
    vk.set_adapter(model, ["default", "other"])
    ids = token_ids(1)
    on = step(model, ids)
    assert len(downs) == 2  # one per layer for both adapters
    vk.set_h_sharing(model, enabled=False)
    downs.clear()
    off = step(model, ids)
    assert len(downs) == 2  # still one per layer: the adapters of one call always share the dropout-free h
    assert_same_step(on, off)


# ---------------------------------------------------------------------------------------------- dropout
def test_dropout_per_layer_masks_share_nothing(downs):
    model = patched_llama(vera_dropout=0.3)
    model.train()
    step(model, token_ids(0))
    assert len(downs) == 7 * 2  # each layer draws its own mask, as in PEFT


def test_dropout_one_mask_per_input(downs):
    model = patched_llama(vera_dropout=0.3)
    model.train()
    vk.set_h_sharing(model, dropout_mask="per-input")
    ids = token_ids(0)
    out, grads = step(model, ids, seed=5)
    assert len(downs) == 4 * 2
    again = step(model, ids, seed=5)  # the same seeds: the same masks and results
    assert_same_step((out, grads), again)
    with pytest.raises(ValueError, match="dropout_mask"):
        vk.set_h_sharing(model, dropout_mask="per-token")


# ---------------------------------------------------------------------------------------------- stale h
class Siblings(nn.Module):
    """Two adapted linears reading one input, with something happening between them."""

    def __init__(self, between=None):
        super().__init__()
        self.a = nn.Linear(12, 10)
        self.b = nn.Linear(12, 6)
        self.between = between

    def forward(self, x):
        ya = self.a(x)
        if self.between is not None:
            self.between(x)
        return ya, self.b(x)


def siblings(between=None):
    torch.manual_seed(0)
    m = Siblings(between)
    vk.patch_model(m, vk.VeraConfig(r=4, target_modules=["a", "b"], init_weights=False), backend="torch")
    set_random_lambdas(m, seed=2)
    return m


def expected_b(m, x):
    with torch.no_grad():
        vk.set_h_sharing(m, enabled=False)
        try:
            return m.b(x)
        finally:
            vk.set_h_sharing(m, enabled=True)


def test_in_place_change_between_siblings():
    m = siblings(between=lambda x: x.mul_(3.0))
    x = torch.randn(5, 12)
    _, yb = m(x)  # b reads x after the in-place change
    assert torch.equal(yb, expected_b(m, x))


def test_freed_input_whose_id_is_reused():
    m = siblings()
    with torch.no_grad():
        for _ in range(50):
            x1 = torch.randn(5, 12)
            m.a(x1)
            old = id(x1)
            del x1
            x2 = torch.randn(5, 12)
            if id(x2) == old:
                break
        else:
            pytest.skip("the interpreter never reused the freed tensor's id")
        assert torch.equal(m.b(x2), expected_b(m, x2))


def test_no_grad_forward_then_grad_forward():
    m = siblings()
    x = torch.randn(5, 12, requires_grad=True)
    with torch.no_grad():
        m.a(x)  # an h without graph for x
    yb = m.b(x)
    (gx,) = torch.autograd.grad(yb.square().sum(), [x])
    vk.set_h_sharing(m, enabled=False)
    (want,) = torch.autograd.grad(m.b(x).square().sum(), [x])
    torch.testing.assert_close(gx, want)


def test_inference_mode_h_not_reused_outside():
    m = siblings()
    x = torch.randn(5, 12)
    with torch.inference_mode():
        m.a(x)
    ya, yb = m(x)
    (ya.sum() + yb.sum()).backward()  # an inference h in the graph would fail here
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_across_forwards_with_backward_between():
    """The same input object fed again after a backward: its h's graph is freed, so it must not be reused."""
    m = siblings()
    x = torch.randn(5, 12, requires_grad=True)
    for _ in range(3):
        ya, yb = m(x)
        (ya.sum() + yb.sum()).backward()


@pytest.mark.parametrize("x_grad", [True, False], ids=["x-grad", "x-frozen"])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing(use_reentrant, x_grad):
    """Checkpointing re-runs the forward inside backward (under its saved-tensor hooks, or with detached inputs):
    the gradients equal a plain step's, with an input that needs grad (the forward's h is then held only by a
    checkpoint holder) or not (its h has no graph at all)."""
    if use_reentrant and not x_grad:
        pytest.skip("the reentrant checkpoint gives no gradient when no input requires grad (torch's limitation)")
    from torch.utils.checkpoint import checkpoint

    m = siblings()
    x = torch.randn(5, 12, requires_grad=x_grad)

    def grads(run):
        for p in [x] + list(m.parameters()):
            p.grad = None
        ya, yb = run(x)
        (ya.square().sum() + yb.square().sum()).backward()
        return ([x.grad.clone()] if x_grad else []) + [p.grad.clone() for p in m.parameters() if p.requires_grad]

    plain = grads(m)
    ckpt = grads(lambda t: checkpoint(m, t, use_reentrant=use_reentrant))
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b)


def test_unknown_saved_tensor_hooks_turn_sharing_off(downs):
    """A pack hook we do not know might recompute (as checkpointing's does): no sharing under it; under torch's
    CPU offloading sharing stays on."""
    m = siblings()
    x = torch.randn(5, 12, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        m(x)
    assert len(downs) == 2
    downs.clear()
    with torch.autograd.graph.save_on_cpu():
        m(x)
    assert len(downs) == 1


def test_no_sharing_during_cuda_graph_capture(monkeypatch, downs):
    monkeypatch.setattr(sharing, "_capturing", lambda x: True)
    m = siblings()
    m(torch.randn(5, 12))
    assert len(downs) == 2


def test_table_holds_nothing_once_the_forward_is_gone():
    m = siblings()
    table = m.a.vera_projections.shared_h
    x = torch.randn(5, 12, requires_grad=True)
    ya, yb = m(x)
    assert len(table) == 1
    (ya.sum() + yb.sum()).backward()
    del x, ya, yb
    gc.collect()
    assert len(table) == 0


def test_model_copies_start_empty():
    import copy
    import pickle

    m = siblings()
    x = torch.randn(5, 12)
    m(x)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        t = clone.a.vera_projections.shared_h
        assert len(t) == 0 and t.enabled
        ya, yb = clone(x)
        torch.testing.assert_close(yb, m(x)[1])


# ---------------------------------------------------------------------------------------------- compile
def test_compiled_llama_block_has_one_down_projection_per_input():
    """Under torch.compile nothing is cached: the compiler sees each layer's identical x A_s^T and merges them
    (common-subexpression elimination in the min-cut partitioner inductor uses), in one graph (fullgraph=True)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    torch._dynamo.reset()
    model = patched_llama()
    layer = model.model.layers[0]
    r = 8
    forward_graphs = []

    def fw_compiler(gm, example_inputs):
        forward_graphs.append(gm)
        return gm.forward

    backend = aot_autograd(fw_compiler=fw_compiler, bw_compiler=lambda gm, example_inputs: gm.forward,
                           partition_fn=min_cut_rematerialization_partition)
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    hidden = torch.randn(2, 7, 40, requires_grad=True)
    pos = torch.arange(7).unsqueeze(0)
    emb = model.model.rotary_emb(hidden, pos)
    out = compiled(hidden, position_embeddings=emb, position_ids=pos)
    out = out[0] if isinstance(out, tuple) else out
    eager = layer(hidden, position_embeddings=emb, position_ids=pos)
    eager = eager[0] if isinstance(eager, tuple) else eager
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    assert len(forward_graphs) == 1
    downs = [n for n in forward_graphs[0].graph.nodes
             if n.op == "call_function" and str(n.target) == "aten.mm.default"
             and tuple(n.meta["val"].shape) == (hidden.shape[0] * hidden.shape[1], r)]
    assert len(downs) == 4, len(downs)  # q/k/v, o, gate/up, down: one x A_s^T per distinct input
