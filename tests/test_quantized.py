"""VeRA on bitsandbytes bases (issue 5, layer side): tiny Llama models quantized by transformers exactly as a user gets
them (``save_pretrained`` of a random model, then ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...),
device_map="cpu")``; lm_head stays unquantized), nf4 / fp4, with and without double quantization, compute dtypes fp32
and bf16 (one model loaded in bf16), and LLM.int8 (``Linear8bitLt``).

* patching: targeted bnb layers become VeraLinear around the very same bnb module; shared A/B sized from them;
* parity with PEFT on the same quantized model: forward in train mode (bitsandbytes' matmul) and eval mode (its CPU
  repacked / int8 kernels), every lambda gradient; "reference" backend bit-identical, "torch" within fp32/bf16 rounding;
* merge / unmerge / unpatch(merge=True) / safe_merge through the layer hooks, for both CPU layouts of Linear4bit:
  the merged weight is bit-identical to bitsandbytes' own ``quantize(dequantize(W) + delta)`` computed independently
  here with bitsandbytes' functions (so the merge error IS the requantization error, nothing more), and unmerge gives
  back the original bits (the kept pre-merge tensors; with ``KEEP_ORIGINAL=False`` bit-identical to requantizing again);
* PEFT's merge of a CPU-repacked 4-bit layer is wrong (see ``test_merge_vs_peft``);
* the dequantize-then-matmul fallback of ``vera_kernels.quant.base`` (forced on the CPU) against bitsandbytes' forward.

Random model, inputs and lambdas differ per run: ``VK_TEST_SEED`` fixes the session's base seed (printed on failure).
Runs on the CPU (bitsandbytes' CPU backend), where the 4-bit repacking happens only on AVX512-BF16 machines; the
repacked-layout cases are skipped elsewhere.
"""

from __future__ import annotations

import copy
import os
import random
import warnings
import zlib

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
BF = pytest.importorskip("bitsandbytes.functional")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import vera_kernels as vk  # noqa: E402
from vera_kernels.quant import base as qbase  # noqa: E402
from vera_kernels.quant import merge as qmerge  # noqa: E402

from peft.tuners.vera.layer import Linear as PeftVeraLinear  # noqa: E402

from helpers import lambda_params, random_output_weights, strip_peft  # noqa: E402

_BASE_SEED = int(os.environ.get("VK_TEST_SEED", random.SystemRandom().randrange(2**31)))
HAS_REPACK = bool(BF.has_avx512bf16())
TARGETS = ["q_proj", "v_proj", "down_proj"]  # 64->64, 64->32, 128->64: in_max 128, out_max 64
BNB_4BIT = (bnb.nn.Linear4bit,)
BNB_8BIT = (bnb.nn.Linear8bitLt,)

# name -> (BitsAndBytesConfig kwargs, model dtype)
QUANTS = {
    "nf4": (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                 bnb_4bit_compute_dtype=torch.float32), torch.float32),
    "nf4-dq-bf16": (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=torch.bfloat16), torch.float32),
    "fp4-dq": (dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=torch.float32), torch.float32),
    "fp4-bf16model": (dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
                           bnb_4bit_compute_dtype=torch.bfloat16), torch.bfloat16),
    "int8": (dict(load_in_8bit=True), torch.float32),
}
LAYOUTS = ["standard", "repacked"]


# ---------------------------------------------------------------------------------------------- fixtures / helpers
@pytest.fixture
def seed(request):
    s = (_BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % (2**31)
    print(f"seed={s} (VK_TEST_SEED={_BASE_SEED})")
    torch.manual_seed(s)
    return s


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A random 2-layer Llama with random biases, saved once per session (every N a multiple of 32, K of 64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(_BASE_SEED)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False,
                      attention_bias=True, mlp_bias=True)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.copy_(0.05 * torch.randn(p.shape))
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    return str(path)


def load(saved_model: str, quant: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs, dtype = QUANTS[quant]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            saved_model, quantization_config=BitsAndBytesConfig(**kwargs), device_map="cpu", dtype=dtype)
    return model.eval()


def vera_cfg(**kw) -> dict:
    base = dict(r=8, target_modules=TARGETS, init_weights=False, projection_prng_key=int(torch.randint(2**30, ())))
    base.update(kw)
    return base


def patch_ours(model, cfg: dict, backend: str = "reference", lambda_seed: int = 1):
    torch.manual_seed(lambda_seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return vk.patch_model(model, peft.VeraConfig(**cfg), backend=backend)


def patch_peft(model, cfg: dict, lambda_seed: int = 1):
    torch.manual_seed(lambda_seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.VeraConfig(**cfg))


def vera_layers(model) -> dict:
    return {strip_peft(n): m for n, m in model.named_modules() if isinstance(m, vk.VeraLinear)}


def set_lambdas(model, seed: int, ratio: float = 0.3) -> dict:
    """Random lambdas (never zero) scaled per layer so that ||delta|| = ratio * ||W||; returns {name: value}."""
    gen = torch.Generator().manual_seed(seed)
    values = {}
    with torch.no_grad():
        for path, layer in vera_layers(model).items():
            for name in layer.vera_lambda_d:
                lb, ld = layer.vera_lambda_b[name], layer.vera_lambda_d[name]
                lb.copy_(torch.randn(lb.shape, generator=gen).sign() * (0.5 + torch.rand(lb.shape, generator=gen)))
                ld.copy_(torch.randn(ld.shape, generator=gen))
                scale = ratio * layer.dense_base_weight().norm() / layer.get_delta_weight(name).norm()
                ld.mul_(scale)
    for name, p in lambda_params(model).items():
        values[name] = p.detach().clone()
    return values


def copy_lambdas(values: dict, model) -> None:
    params = lambda_params(model)
    assert set(params) == set(values)
    with torch.no_grad():
        for k, v in values.items():
            params[k].copy_(v)


def ids_for(seed: int, batch: int = 2, length: int = 6) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def run(model, ids, mode: str) -> torch.Tensor:
    """Logits in train mode (bitsandbytes' matmul, no repacking) or eval mode without grad (repacks 4-bit on CPU)."""
    model.train(mode == "train")
    with torch.no_grad():
        out = model(ids).logits.float()
    model.eval()
    assert torch.isfinite(out).all()
    return out


def repack(model) -> None:
    """One eval forward without grad: bitsandbytes repacks every 4-bit layer for its CPU kernel."""
    run(model, ids_for(0, 1, 3), "eval")


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def is_repacked(module) -> bool:
    return bool(getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False))


# --- independent reference: bitsandbytes' own functions only (not vera_kernels.quant.dequant)
def bnb_dense(module) -> torch.Tensor:
    """The float32 weight the layer computes with, via bitsandbytes' functions (the repacked layout through its
    inverse, with the transposed absmax order its inverse leaves behind put right)."""
    w = module.weight
    if isinstance(module, BNB_8BIT):
        scb = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB
        return BF.int8_vectorwise_dequant(w.data, scb).float()
    qs = w.quant_state
    data = w.data
    if getattr(qs, "packing_format_for_cpu", False):
        packed_absmax = qs.absmax
        data, _ = BF._convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(qs))
        qs = BF.QuantState(absmax=packed_absmax.t().reshape(-1).float(), shape=qs.shape, blocksize=qs.blocksize,
                           quant_type=qs.quant_type, dtype=torch.float32, code=qs.code)
    else:
        qs = copy.copy(qs)
        qs.dtype = torch.float32
    return BF.dequantize_4bit(data, qs).float()


def settings(module) -> dict:
    """A bnb layer's quantization settings (for 4-bit: as loaded, whatever CPU repacking did to the quant state)."""
    if isinstance(module, BNB_8BIT):
        return dict(kind="8bit", dtype=module.weight.dtype, has_fp16_weights=module.state.has_fp16_weights)
    w, qs = module.weight, module.weight.quant_state
    packed = is_repacked(module)
    return dict(kind="4bit", quant_type=qs.quant_type, blocksize=qs.blocksize, storage=w.quant_storage,
                nested=qs.original_nested if packed else qs.nested, compress_statistics=w.compress_statistics,
                dtype=qs.original_dtype if packed else qs.dtype, compute_dtype=module.compute_dtype)


def bnb_requantized(S: dict, W: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' dequantize(quantize(W)) with the settings ``S`` (from :func:`settings`), as float32."""
    if S["kind"] == "8bit":
        CB, SCB, _ = BF.int8_vectorwise_quant(W.to(torch.float16))
        return BF.int8_vectorwise_dequant(CB, SCB).float()
    packed, new_qs = BF.quantize_4bit(W.to(S["dtype"]), blocksize=S["blocksize"], compress_statistics=S["nested"],
                                      quant_type=S["quant_type"], quant_storage=S["storage"])
    new_qs.dtype = torch.float32
    return BF.dequantize_4bit(packed, new_qs).float()


def raw_bits(module) -> dict:
    """Every tensor that defines a bnb layer's weight (packed data, statistics, CB/SCB), cloned."""
    w = module.weight
    out = {"data": w.data.clone(), "dtype": str(w.dtype)}
    if isinstance(module, BNB_4BIT):
        qs = w.quant_state
        out.update(absmax=qs.absmax.clone(), qs_dtype=str(qs.dtype), nested=qs.nested, repacked=is_repacked(module),
                   blocksize=qs.blocksize, quant_type=qs.quant_type)
        if qs.nested:
            out.update(absmax2=qs.state2.absmax.clone(), offset=qs.offset.clone(), code2=qs.state2.code.clone())
    else:
        out["SCB"] = (w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB).clone()
    return out


def assert_bits_equal(a: dict, b: dict, what: str) -> None:
    assert set(a) == set(b), f"{what}: fields {sorted(set(a) ^ set(b))}"
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), f"{what}: {k}"
        else:
            assert a[k] == b[k], f"{what}: {k} {a[k]} vs {b[k]}"


def layer_inputs(layer, seed: int, dtype) -> torch.Tensor:
    return torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(seed)).to(dtype)


def base_out(module, x, mode: str) -> torch.Tensor:
    module.train(mode == "train")
    with torch.no_grad():
        y = module(x).float()
    module.eval()
    return y


def exact_out(x, W, bias) -> torch.Tensor:
    y = x.double() @ W.double().t()
    return y if bias is None else y + bias.double()


# ---------------------------------------------------------------------------------------------- structure
@pytest.mark.parametrize("quant", ["nf4", "nf4-dq-bf16", "int8"])
def test_patch_wraps_bnb_layers_and_sizes_projections(saved_model, quant, seed):
    """Targeted bnb layers are wrapped (the same module objects), the shared A/B are sized from them and are the
    float32 projections PEFT builds for the same key on the unquantized model.

    PEFT quirk (peft 0.21.2): on a Linear4bit with ``compute_dtype`` bf16/fp16, PEFT's
    ``_move_adapter_to_device_of_base_layer`` casts the SHARED vera_A / vera_B (and the layer's freshly drawn lambdas)
    to that compute dtype before ``autocast_adapter_dtype`` casts them back to float32: its projections are rounded
    to bf16 on such models (and its init lambda_d is bf16(0.1) = 0.10009765625), so they depend on how the base was
    quantized. We keep the exact float32 projections; the parity tests below give PEFT our projections."""
    from transformers import AutoModelForCausalLM

    model = load(saved_model, quant)
    originals = {n: m for n, m in model.named_modules() if n.split(".")[-1] in TARGETS}
    kind, cls = ("bnb8bit", BNB_8BIT) if quant == "int8" else ("bnb4bit", BNB_4BIT)
    assert originals and all(isinstance(m, cls) for m in originals.values())
    assert type(model.lm_head) is torch.nn.Linear  # transformers keeps lm_head unquantized
    cfg = vera_cfg()
    pm = patch_peft(load(saved_model, quant), cfg)
    plain = patch_peft(AutoModelForCausalLM.from_pretrained(saved_model), cfg)
    om = patch_ours(model, cfg)
    layers = vera_layers(om)
    assert set(layers) == set(originals)
    for path, layer in layers.items():
        assert layer.base_kind == kind and layer.base_layer is originals[path]
        assert not any(p.requires_grad for p in layer.base_layer.parameters())
    proj = next(m for m in om.modules() if isinstance(m, vk.VeraProjections))
    assert tuple(proj.vera_A.shape) == (8, 128) and tuple(proj.vera_B.shape) == (64, 8)
    assert proj.vera_A.dtype == proj.vera_B.dtype == torch.float32
    assert torch.equal(proj.vera_A, plain.base_model.vera_A["default"])
    assert torch.equal(proj.vera_B, plain.base_model.vera_B["default"])
    compute = QUANTS[quant][0].get("bnb_4bit_compute_dtype", torch.float32)
    peft_ab = (pm.base_model.vera_A["default"], pm.base_model.vera_B["default"])
    for ours, theirs in zip((proj.vera_A, proj.vera_B), peft_ab):
        assert torch.equal(theirs, ours) or torch.equal(theirs, ours.to(compute).float())
    trainable = {strip_peft(n) for n, p in om.named_parameters() if p.requires_grad}
    assert trainable == {strip_peft(n) for n, p in pm.named_parameters() if p.requires_grad}


def give_peft_our_projections(om, pm) -> None:
    """PEFT rounds its shared projections to a 4-bit layer's compute dtype (see above): give it ours."""
    proj = next(m for m in om.modules() if isinstance(m, vk.VeraProjections))
    pm.base_model.vera_A["default"] = proj.vera_A.clone()
    pm.base_model.vera_B["default"] = proj.vera_B.clone()
    peft_layers = [m for m in pm.modules() if isinstance(m, PeftVeraLinear)]
    assert peft_layers and all(torch.equal(m.vera_A["default"], proj.vera_A) for m in peft_layers)


# ---------------------------------------------------------------------------------------------- PEFT parity
def bf16_branch_peft(saved_model, quant, cfg, om, values):
    """PEFT with its adapter branch in bf16 (bf16 lambdas and projections): a plain bf16 implementation, the yardstick
    for what computing the branch in bf16 may cost."""
    pm = patch_peft(load(saved_model, quant), cfg)
    give_peft_our_projections(om, pm)
    copy_lambdas(values, pm)
    with torch.no_grad():
        for p in lambda_params(pm).values():
            p.data = p.data.bfloat16()
        for key in ("vera_A", "vera_B"):
            buffers = getattr(pm.base_model, key)
            buffers["default"] = buffers["default"].bfloat16()
    return pm


def forward_backward(model, ids, seed):
    model.train()
    out = model(ids).logits
    (out.float() * random_output_weights(out.shape, seed)).sum().backward()
    return out.detach().float(), {strip_peft(n): p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("quant", list(QUANTS))
def test_forward_and_gradients_match_peft(saved_model, quant, backend, seed):
    """Same quantized model, same projections and lambdas: logits and every lambda gradient in train mode
    (bitsandbytes' autograd matmul), logits in eval mode (its CPU inference kernels). "reference" backend:
    bit-identical. "torch" backend: fp32 models within fp32 rounding; where bf16 is involved (bf16 model, bf16
    compute dtype, or bitsandbytes' bf16 CPU kernel for repacked 4-bit weights in eval mode: a last-bit difference
    can flip a rounding in the next layer's bf16 cast), norm-wise within 4x the error of a plain bf16 implementation of
    the branch (PEFT with bf16 lambdas/projections)."""
    cfg = vera_cfg()
    pm = patch_peft(load(saved_model, quant), cfg)
    om = patch_ours(load(saved_model, quant), cfg, backend=backend)
    give_peft_our_projections(om, pm)
    values = set_lambdas(om, seed, ratio=0.5)
    copy_lambdas(values, pm)
    ids = ids_for(seed)
    exact = backend == "reference"
    kwargs, dtype = QUANTS[quant]
    low_precision = torch.bfloat16 in (dtype, kwargs.get("bnb_4bit_compute_dtype"))
    # bitsandbytes' CPU kernel for repacked 4-bit weights computes in bf16 whatever the compute dtype
    low_precision_eval = low_precision or (HAS_REPACK and quant != "int8")
    plain = bf16_branch_peft(saved_model, quant, cfg, om, values) if low_precision_eval and not exact else None

    def check(ours, theirs, what, yardstick=None):
        assert torch.isfinite(ours).all() and torch.isfinite(theirs).all(), what
        if exact:
            assert torch.equal(ours, theirs), f"{what}: max diff {(ours - theirs).abs().max()}"
        elif yardstick is not None:
            err, plain_err = rel(ours, theirs), rel(yardstick, theirs)
            assert err <= 4 * plain_err + 1e-6, f"{what}: rel err {err:.3g}, plain bf16 branch {plain_err:.3g}"
        else:
            scale = theirs.abs().max().item()
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * scale, msg=what)

    out_p, grads_p = forward_backward(pm, ids, seed)
    out_o, grads_o = forward_backward(om, ids, seed)
    out_y, grads_y = forward_backward(plain, ids, seed) if low_precision and not exact else (None, {})
    check(out_o, out_p, "train-mode logits", out_y)
    assert set(grads_o) == set(grads_p) and grads_o
    for name, g in grads_p.items():
        assert g.abs().sum() > 0, f"{name}: zero gradient"
        check(grads_o[name], g, f"grad {name}", grads_y.get(name))
    # eval mode without grad: bitsandbytes' inference kernels (CPU repacked 4-bit, int8 matmul)
    check(run(om, ids, "eval"), run(pm, ids, "eval"), "eval-mode logits", run(plain, ids, "eval") if plain else None)
    if HAS_REPACK and quant != "int8":
        assert all(is_repacked(layer.base_layer) for layer in vera_layers(om).values())


# ---------------------------------------------------------------------------------------------- merging
def _merge_case(saved_model, quant, layout, seed, backend="reference"):
    if layout == "repacked" and not HAS_REPACK:
        pytest.skip("bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs")
    model = patch_ours(load(saved_model, quant), vera_cfg(), backend=backend)
    set_lambdas(model, seed)
    mode = "eval" if layout == "repacked" else "train"  # train-mode forwards leave the standard layout alone
    if layout == "repacked":
        repack(model)
    layers = vera_layers(model)
    for layer in layers.values():
        assert is_repacked(layer.base_layer) == (layout == "repacked" and quant != "int8")
    return model, layers, mode


def _check_merged_layer(path, layer, W0, delta, S, mode, x, out_y0):
    """The merged layer's weight is bitsandbytes' quantize(W0 + delta) bit for bit; its output error is the
    requantization error of that weight (plus, in eval mode, the CPU kernel's own error, measured unmerged)."""
    module = layer.base_layer
    assert settings(module) == S, f"{path}: quantization settings changed"
    expected = bnb_requantized(S, W0 + delta)
    merged = bnb_dense(module)
    assert torch.equal(merged, expected), f"{path}: merged weight is not bitsandbytes' quantize(W + delta)"
    assert torch.equal(layer.dense_base_weight(), merged), f"{path}: dense_base_weight disagrees with bitsandbytes"
    bias = module.bias.detach().float() if module.bias is not None else None
    target = exact_out(x, W0 + delta, bias)
    y = base_out(module, x, mode)
    err = rel(y, target)
    requant_err = rel(exact_out(x, expected, bias), target)
    kernel_err = rel(out_y0, exact_out(x, W0, bias))  # the unmerged layer's own kernel/rounding error
    assert err <= requant_err + 2 * kernel_err + 1e-6, (
        f"{path}: merged output error {err:.4g} > requantization error {requant_err:.4g} "
        f"+ kernel error {kernel_err:.4g}")
    return err


@pytest.mark.parametrize("keep", [True, False], ids=["keep-original", "requantize"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("quant", list(QUANTS))
def test_merge_unmerge(saved_model, quant, layout, keep, seed, monkeypatch):
    monkeypatch.setattr(qmerge, "KEEP_ORIGINAL", keep)
    model, layers, mode = _merge_case(saved_model, quant, layout, seed)
    ids = ids_for(seed)
    W0, deltas, bits0, S, y0, xs = {}, {}, {}, {}, {}, {}
    for path, layer in layers.items():
        module = layer.base_layer
        W0[path] = bnb_dense(module)
        assert torch.equal(layer.dense_base_weight(), W0[path]), f"{path}: our dequantization != bitsandbytes'"
        deltas[path] = layer.get_delta_weight("default")
        assert deltas[path].abs().sum() > 0
        bits0[path] = raw_bits(module)
        S[path] = settings(module)
        xs[path] = layer_inputs(layer, seed, QUANTS[quant][1])
        y0[path] = base_out(module, xs[path], mode)
    logits0 = run(model, ids, mode)

    vk.merge_adapter(model)
    errs = {}
    for path, layer in layers.items():
        assert layer.merged_adapters == ["default"]
        assert qmerge.has_original(layer.base_layer) == keep
        errs[path] = _check_merged_layer(path, layer, W0[path], deltas[path], S[path], mode, xs[path], y0[path])
    merged_logits = run(model, ids, mode)  # runs the merged bnb layers (and repacks them again in eval mode)
    if quant != "int8" and mode == "eval":
        assert all(is_repacked(layer.base_layer) for layer in layers.values())
    print(f"{quant}/{layout}: merged layer output error vs exact: "
          + ", ".join(f"{p}={e:.4f}" for p, e in errs.items()))
    assert rel(merged_logits, logits0) < 0.5

    W1 = {path: bnb_dense(layer.base_layer) for path, layer in layers.items()}
    vk.unmerge_adapter(model)
    for path, layer in layers.items():
        module = layer.base_layer
        assert not layer.merged_adapters and not qmerge.has_original(module)
        if keep:  # the very bits the layer had before the merge (its layout too)
            assert_bits_equal(raw_bits(module), bits0[path], f"{path} after unmerge")
        else:  # bitsandbytes' quantize(merged - delta): requantization noise, computed independently
            assert settings(module) == S[path]
            expected = bnb_requantized(S[path], W1[path] - deltas[path])
            assert torch.equal(bnb_dense(module), expected), f"{path}: unmerged weight"
            print(f"{path}: merge+unmerge without the kept original moves W by {rel(expected, W0[path]):.4f} (rel)")
    logits2 = run(model, ids, mode)
    if keep:
        assert torch.equal(logits2, logits0)
    else:
        assert rel(logits2, logits0) < 0.5


@pytest.mark.parametrize("quant", ["nf4", "nf4-dq-bf16", "int8"])
def test_unpatch_merge(saved_model, quant, seed):
    model, layers, _ = _merge_case(saved_model, quant, "standard", seed)
    ids = ids_for(seed)
    paths = list(layers)
    W0 = {p: bnb_dense(layers[p].base_layer) for p in paths}
    deltas = {p: layers[p].get_delta_weight("default") for p in paths}
    modules = {p: layers[p].base_layer for p in paths}
    S = {p: settings(modules[p]) for p in paths}
    vk.merge_adapter(model)
    merged_logits = run(model, ids, "train")
    vk.unmerge_adapter(model)

    plain = vk.unpatch_model(model, merge=True)
    assert not any(isinstance(m, vk.VeraLinear) for m in plain.modules())
    for p in paths:
        module = plain.get_submodule(p)
        assert module is modules[p] and settings(module) == S[p]
        assert torch.equal(bnb_dense(module), bnb_requantized(S[p], W0[p] + deltas[p])), p
        qmerge.release_original(module)  # nothing to unmerge any more: free the kept pre-merge tensors
        assert not qmerge.has_original(module)
    assert torch.equal(run(plain, ids, "train"), merged_logits)
    out = run(plain, ids, "eval")  # the merged layers still run bitsandbytes' inference path (repacking 4-bit)
    assert rel(out, merged_logits) < 0.05


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("quant", ["nf4", "fp4-dq", "int8"])
def test_merge_vs_peft(saved_model, quant, layout, seed):
    """Our merge against PEFT's (``peft.utils.quantization_utils.Bnb4bitBackend`` / ``Bnb8bitBackend``), fp32 models.

    Standard layout (no eval forward yet): both dequantize, add, and requantize with bitsandbytes: identical bits.
    For int8 this is also the pre-forward placement of CB/SCB (on the weight); "repacked" puts them in module.state.

    PEFT's bug (peft 0.21.2 with bitsandbytes >= 0.49 on an AVX512-BF16 CPU): once a 4-bit layer has run one
    eval-mode forward, bitsandbytes has repacked it for its CPU kernel (``quant_state.packing_format_for_cpu``: (N, K/2)
    nibble-interleaved data, absmax transposed to (K/blocksize, N) in bf16). PEFT's ``get_base_weight`` calls
    ``bitsandbytes.functional.dequantize_4bit(weight.data, weight.quant_state)``, which ignores that layout, so it
    merges the delta into scrambled weights: the merged layer's output error is larger than the output itself
    (measured here and printed: ~1.3 relative error for nf4 and fp4 where ours is ~0.09 / ~0.12, the requantization
    error), and PEFT's unmerge cannot bring the layer back. Ours dequantizes the repacked layout: its error is the
    requantization error of bitsandbytes' quantize(W + delta), computed independently here.
    """
    if layout == "repacked" and not HAS_REPACK:
        pytest.skip("bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs")
    cfg = vera_cfg()
    om = patch_ours(load(saved_model, quant), cfg)
    pm = patch_peft(load(saved_model, quant), cfg)
    give_peft_our_projections(om, pm)
    copy_lambdas(set_lambdas(om, seed), pm)
    mode = "eval" if layout == "repacked" else "train"
    if layout == "repacked":
        repack(om)
        repack(pm)
    peft_layers = {strip_peft(n): m for n, m in pm.named_modules() if isinstance(m, PeftVeraLinear)}
    layers = vera_layers(om)
    assert set(peft_layers) == set(layers)
    W0, deltas, xs, S = {}, {}, {}, {}
    for path, layer in layers.items():
        S[path] = settings(layer.base_layer)
        W0[path] = bnb_dense(layer.base_layer)
        assert torch.equal(W0[path], bnb_dense(peft_layers[path].base_layer))
        deltas[path] = layer.get_delta_weight("default")
        assert torch.equal(deltas[path], peft_layers[path].get_delta_weight("default"))
        xs[path] = layer_inputs(layer, seed, torch.float32)
        if quant == "int8":
            module = layer.base_layer
            on_weight = module.weight.SCB is not None
            assert on_weight == (layout == "standard") and (module.state.SCB is None) == on_weight
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.merge_adapter()
    vk.merge_adapter(om)
    if quant == "int8":  # CB/SCB stay where bitsandbytes keeps them, CB is the weight's data
        for layer in layers.values():
            module = layer.base_layer
            owner, other = (module.weight, module.state) if layout == "standard" else (module.state, module.weight)
            assert owner.CB is not None and owner.SCB is not None and other.CB is None and other.SCB is None
            assert owner.CB.data_ptr() == module.weight.data.data_ptr()
    report = []
    for path, layer in layers.items():
        module, peft_module = layer.base_layer, peft_layers[path].base_layer
        bias = module.bias.detach().float() if module.bias is not None else None
        target = exact_out(xs[path], W0[path] + deltas[path], bias)
        ours = rel(base_out(module, xs[path], mode), target)
        theirs = rel(base_out(peft_module, xs[path], mode), target)
        assert settings(module) == S[path]
        expected = bnb_requantized(S[path], W0[path] + deltas[path])
        bound = rel(exact_out(xs[path], expected, bias), target)
        kernel = rel(base_out(module, xs[path], mode), exact_out(xs[path], bnb_dense(module), bias))
        report.append(f"{path}: ours {ours:.4f} (requantization bound {bound:.4f}) peft {theirs:.4f}")
        assert ours <= bound + 2 * kernel + 1e-6, report[-1]
        if layout == "standard":
            assert torch.equal(bnb_dense(module), bnb_dense(peft_module)), f"{path}: merged bits differ from PEFT's"

    print(f"{quant}/{layout} merged-layer output error vs exact x(W + delta)^T + b:\n  " + "\n  ".join(report))


@pytest.mark.parametrize("quant", ["nf4-dq-bf16", "int8"])
def test_safe_merge(saved_model, quant, seed):
    layout = "repacked" if HAS_REPACK else "standard"
    model, layers, _ = _merge_case(saved_model, quant, layout, seed)
    paths = list(layers)
    before = {p: raw_bits(layers[p].base_layer) for p in paths}
    S = {p: settings(layers[p].base_layer) for p in paths}
    W0 = {p: bnb_dense(layers[p].base_layer) for p in paths}
    deltas = {p: layers[p].get_delta_weight("default") for p in paths}
    broken = layers[paths[-1]]
    good = broken.vera_lambda_d["default"].detach().clone()
    for bad in (float("nan"), float("inf")):
        with torch.no_grad():
            broken.vera_lambda_d["default"][1] = bad
        with pytest.raises(ValueError, match="NaNs detected"):
            vk.merge_adapter(model, safe_merge=True)
        for p in paths:  # nothing merged anywhere, the bits untouched
            assert not layers[p].merged_adapters
            assert_bits_equal(raw_bits(layers[p].base_layer), before[p], f"{p} after a refused safe_merge")
    with torch.no_grad():
        broken.vera_lambda_d["default"].copy_(good)
    vk.merge_adapter(model, safe_merge=True)
    for p in paths:
        module = layers[p].base_layer
        expected = bnb_requantized(S[p], W0[p] + deltas[p])
        assert settings(module) == S[p]
        assert layers[p].merged_adapters == ["default"] and torch.equal(bnb_dense(module), expected), p


def test_non_finite_merge_changes_nothing(saved_model, seed):
    """A delta that makes the weight non-finite, in float32 or in the float16 the 8-bit quantizer starts from, is
    refused before the layer changes (safe_merge's float32 check cannot see the float16 overflow)."""
    for quant, bad in (("nf4", float("nan")), ("int8", 1e6)):
        model = patch_ours(load(saved_model, quant), vera_cfg())
        layer = next(m for m in vera_layers(model).values() if m.in_features != m.out_features)
        before = raw_bits(layer.base_layer)
        delta = torch.randn(layer.out_features, layer.in_features)
        delta[0, 3] = bad
        with pytest.raises(ValueError, match="non-finite"):
            qmerge.add_to_quantized_weight_(layer.base_layer, delta, 1.0)
        assert_bits_equal(raw_bits(layer.base_layer), before, quant)
        with pytest.raises(ValueError, match="shape"):
            qmerge.add_to_quantized_weight_(layer.base_layer, delta.t(), 1.0)
        want = torch.float16 if quant == "int8" else QUANTS[quant][1]
        assert qmerge.quantizer_input_dtype(layer.base_layer) == want


def test_two_adapters_and_changed_lambdas(saved_model, seed):
    """LIFO: two merged adapters come off in reverse order, each step restoring its exact pre-merge bits. If the
    lambdas change while merged, unmerge cannot be an exact undo: it requantizes (bitsandbytes' quantize(W - delta'))
    and forgets the kept tensors; same when the weights were changed behind our back."""
    layout = "repacked" if HAS_REPACK else "standard"
    model, layers, _ = _merge_case(saved_model, "nf4-dq-bf16", layout, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vk.add_adapter(model, "other", peft.VeraConfig(**vera_cfg(projection_prng_key=vk.get_adapter_config(
            model, "default").projection_prng_key)))
    set_lambdas(model, seed + 1)
    paths = list(layers)
    bits0 = {p: raw_bits(layers[p].base_layer) for p in paths}
    S = {p: settings(layers[p].base_layer) for p in paths}
    vk.merge_adapter(model, ["default"])
    bits1 = {p: raw_bits(layers[p].base_layer) for p in paths}
    vk.merge_adapter(model, ["other"])
    for p in paths:
        assert layers[p].merged_adapters == ["default", "other"]
        layer = layers[p]
        layer.unmerge()  # pops "other" then "default"
        assert_bits_equal(raw_bits(layer.base_layer), bits0[p], p)

    # lambdas changed while merged -> requantization
    vk.merge_adapter(model, ["default"])
    p = paths[0]
    layer, module = layers[p], layers[p].base_layer
    for q in paths:
        assert_bits_equal(raw_bits(layers[q].base_layer), bits1[q], f"{q} merged again")
    W1 = bnb_dense(module)
    with torch.no_grad():
        layer.vera_lambda_d["default"].mul_(1.5)
    new_delta = layer.get_delta_weight("default")
    layer.unmerge()
    expected = bnb_requantized(S[p], W1 - new_delta)
    assert torch.equal(bnb_dense(module), expected)
    assert not qmerge.has_original(module)

    # weights modified in place behind our back -> the kept tensors no longer apply
    q = paths[1]
    layer, module = layers[q], layers[q].base_layer
    with torch.no_grad():
        module.weight.add_(0)  # an in-place write to the parameter (as load_state_dict's copy_ does)
    assert qmerge.has_original(module)
    W1 = bnb_dense(module)
    delta = layer.get_delta_weight("default")
    layer.unmerge()
    assert not qmerge.has_original(module)
    assert torch.equal(bnb_dense(module), bnb_requantized(S[q], W1 - delta))


def test_float_weight_bnb_layers(seed):
    """Linear8bitLt(has_fp16_weights=True) and a Linear4bit not moved to a device keep float weights: a merge is a
    plain add; the 8-bit layer's cached quantization of the old weight is dropped so its next forward sees the merge."""
    lin8 = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=True).to("cpu")
    lin8.weight.requires_grad_(False)  # frozen, as under an adapter (bitsandbytes' CPU backend lacks int8_double_quant)
    x = torch.randn(6, 64)
    lin8.eval()
    with torch.no_grad():
        lin8(x.half())  # caches an int8 quantization of W in lin8.state
    W = lin8.weight.detach().float().clone()
    delta = 0.3 * W.abs().mean() * torch.randn(32, 64)
    qmerge.add_to_quantized_weight_(lin8, delta, 1.0)
    assert torch.equal(lin8.weight.detach(), (W + delta).to(lin8.weight.dtype))
    with torch.no_grad():
        y = lin8(x.half()).float()
    target = exact_out(x, W + delta, lin8.bias.detach().float())
    assert rel(y, target) < 0.1 * rel(exact_out(x, W, lin8.bias.detach().float()), target)

    lin4 = bnb.nn.Linear4bit(64, 32, quant_type="nf4")
    W = lin4.weight.detach().clone()
    qmerge.add_to_quantized_weight_(lin4, delta, -1.0)
    assert torch.equal(lin4.weight.detach(), W - delta) and not lin4.weight.bnb_quantized


def test_check_mergeable_refuses_without_changes(saved_model, seed):
    model = patch_ours(load(saved_model, "nf4-dq-bf16"), vera_cfg())
    set_lambdas(model, seed)
    layers = vera_layers(model)
    paths = list(layers)
    before = {p: raw_bits(layers[p].base_layer) for p in paths}
    module = layers[paths[-1]].base_layer
    qs = module.weight.quant_state
    qs.state2.blocksize = 128  # nested statistics bitsandbytes' quantizer cannot reproduce
    with pytest.raises(NotImplementedError, match="nested"):
        vk.merge_adapter(model)
    qs.state2.blocksize = 256
    module.weight.quant_state, module.quant_state = None, None  # quant state lost (e.g. a bad conversion)
    with pytest.raises(ValueError, match="quant_state"):
        vk.merge_adapter(model)
    module.weight.quant_state = module.quant_state = qs
    for p in paths:
        assert not layers[p].merged_adapters
        assert_bits_equal(raw_bits(layers[p].base_layer), before[p], p)
    meta = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False, device="meta")
    with pytest.raises(ValueError, match="meta"):
        qmerge.check_mergeable(meta)
    with pytest.raises(TypeError):
        qmerge.check_mergeable(torch.nn.Linear(4, 4))


# ---------------------------------------------------------------------------------------------- fallback forward
def test_bnb_supports_device(monkeypatch):
    assert qbase.bnb_supports_device("cpu", "4bit") and qbase.bnb_supports_device("cpu", "8bit")
    assert not qbase.bnb_supports_device("xla", "4bit")  # not a bitsandbytes device
    monkeypatch.setattr(qbase, "FORCE_FALLBACK", True)
    assert not qbase.bnb_supports_device("cpu", "4bit")


@pytest.mark.parametrize("quant", ["nf4", "nf4-dq-bf16", "fp4-bf16model", "int8"])
def test_fallback_forward_matches_bitsandbytes(saved_model, quant, seed, monkeypatch):
    """Forced dequantize-then-matmul vs bitsandbytes' forward on the CPU: bit-identical in train mode (its
    gemm_4bit / MatMul8bitFp multiply with the same dequantized weight), logits and gradients; in eval mode the same
    computation, about as close to the exact product as bitsandbytes' inference kernels (CPU repacked 4-bit in bf16,
    int8 activations; measured ratio of errors 0.4-0.95)."""
    cfg = vera_cfg()
    ids = ids_for(seed)
    results = {}
    for fallback in (False, True):
        monkeypatch.setattr(qbase, "FORCE_FALLBACK", fallback)
        monkeypatch.setattr(qbase, "_warned", set())
        model = patch_ours(load(saved_model, quant), cfg)
        set_lambdas(model, seed, ratio=0.5)
        model.train()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = model(ids).logits
            model(ids)
        fallback_warnings = [w for w in caught if issubclass(w.category, qbase.QuantizedFallbackWarning)]
        assert len(fallback_warnings) == (1 if fallback else 0)
        (out.float() * random_output_weights(out.shape, seed)).sum().backward()
        grads = {strip_peft(n): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        layers = vera_layers(model)
        per_layer = {}
        for path, layer in layers.items():
            x = layer_inputs(layer, seed, QUANTS[quant][1]).requires_grad_(True)
            y = qbase.quantized_base_forward(layer.base_layer, x)
            y.float().sum().backward()
            per_layer[path] = (y.detach(), x.grad, x)
        dense = {path: bnb_dense(layer.base_layer) for path, layer in layers.items()}  # before any repacking
        eval_out = {}
        for path, layer in layers.items():
            layer.base_layer.eval()
            with torch.no_grad():
                eval_out[path] = qbase.quantized_base_forward(layer.base_layer, per_layer[path][2].detach()).float()
        bias = {path: None if layer.base_layer.bias is None else layer.base_layer.bias.detach().float()
                for path, layer in layers.items()}
        results[fallback] = (out.detach(), grads, per_layer, eval_out, dense, bias)
    out_b, grads_b, layer_b, eval_b, dense, bias = results[False]
    out_f, grads_f, layer_f, eval_f, _, _ = results[True]
    assert torch.equal(out_f, out_b), f"train-mode logits: max diff {(out_f - out_b).abs().max()}"
    assert set(grads_f) == set(grads_b) and grads_b
    for name in grads_b:
        assert torch.equal(grads_f[name], grads_b[name]), name
    for path in layer_b:
        assert torch.equal(layer_f[path][0], layer_b[path][0]), f"{path}: output"
        assert torch.equal(layer_f[path][1], layer_b[path][1]), f"{path}: input gradient"
        target = exact_out(layer_b[path][2].detach(), dense[path], bias[path])
        # eval mode: the fallback is the train-mode computation (4-bit: the same bits; int8: bitsandbytes' own
        # dequantization rounding instead of MatMul8bitFp's), and about as accurate as bitsandbytes' inference kernels
        if quant == "int8":
            torch.testing.assert_close(eval_f[path], layer_f[path][0].float(), rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(eval_f[path], layer_f[path][0].float()), path
        assert rel(eval_f[path], target) <= 1.25 * rel(eval_b[path], target) + 1e-6, path


# ---------------------------------------------------------------------------------------------- failure handling
@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_merge_and_unmerge_refusals_change_nothing_anywhere(saved_model, quant, seed):
    """merge_adapter without safe_merge and unmerge_adapter on quantized layers: a non-finite result on the LAST
    layer is found before the first layer changes (no layer merged or unmerged, bits untouched), and a refused unmerge
    keeps the adapter recorded as merged (its delta is still in the weight)."""
    model = patch_ours(load(saved_model, quant), vera_cfg())
    set_lambdas(model, seed)
    layers = vera_layers(model)
    paths = list(layers)
    broken = layers[paths[-1]]
    good = broken.vera_lambda_d["default"].detach().clone()
    before = {p: raw_bits(layers[p].base_layer) for p in paths}
    with torch.no_grad():
        broken.vera_lambda_d["default"][1] = float("nan")
    with pytest.raises(ValueError, match="nothing was merged"):
        vk.merge_adapter(model)
    for p in paths:
        assert not layers[p].merged_adapters, p
        assert_bits_equal(raw_bits(layers[p].base_layer), before[p], f"{p} after a refused merge")
    with torch.no_grad():
        broken.vera_lambda_d["default"].copy_(good)
    vk.merge_adapter(model)
    merged = {p: raw_bits(layers[p].base_layer) for p in paths}
    with torch.no_grad():  # the lambdas change while merged (a diverged step): no exact undo, and no finite one
        broken.vera_lambda_d["default"][1] = float("nan")
    with pytest.raises(ValueError, match="nothing was unmerged"):
        vk.unmerge_adapter(model)
    for p in paths:
        assert layers[p].merged_adapters == ["default"], p
        assert_bits_equal(raw_bits(layers[p].base_layer), merged[p], f"{p} after a refused unmerge")
    with pytest.raises(ValueError, match="non-finite"):  # the layer's own unmerge (disable_adapter's path) as well
        broken.unmerge()
    assert broken.merged_adapters == ["default"]
    with torch.no_grad():
        broken.vera_lambda_d["default"].copy_(good)
    vk.unmerge_adapter(model)
    for p in paths:
        assert not layers[p].merged_adapters
        assert_bits_equal(raw_bits(layers[p].base_layer), before[p], f"{p} after the exact unmerge")


def test_merge_checks_only_layers_that_take_the_adapter(saved_model, seed, monkeypatch):
    """A layer without the adapter being merged is not asked whether it can take a merge (merge_adapter's pre-check
    skips it, so the layer must too, or a refusal there would stop the merge after other layers changed)."""
    model = patch_ours(load(saved_model, "nf4"), vera_cfg())
    set_lambdas(model, seed)
    layers = vera_layers(model)
    lonely = layers[list(layers)[0]]
    lonely.delete_adapter("default")  # this layer has no "default" adapter now
    refused = []

    def refuse(module):
        if module is lonely.base_layer:
            refused.append(module)
            raise NotImplementedError("refused")

    monkeypatch.setattr(qmerge, "check_mergeable", refuse)
    vk.merge_adapter(model)
    assert not refused
    assert all(layer.merged_adapters == ["default"] for layer in layers.values() if layer is not lonely)


def test_dequantize_and_merge_find_the_module_quant_state(saved_model, seed):
    """A Linear4bit whose weight was re-wrapped as a plain Parameter (as FSDP does) keeps its QuantState on the
    module only: dequantization and merge use it, as bitsandbytes' forward does."""
    from vera_kernels.quant.dequant import dequantize_weight

    model = patch_ours(load(saved_model, "nf4"), vera_cfg())
    set_lambdas(model, seed)
    layer = next(iter(vera_layers(model).values()))
    module = layer.base_layer
    dense = bnb_dense(module)
    module.weight = torch.nn.Parameter(module.weight.data, requires_grad=False)
    assert torch.equal(dequantize_weight(module, torch.float32), dense)
    vk.merge_adapter(model)
    assert layer.merged_adapters == ["default"]
    assert rel(dequantize_weight(module, torch.float32), dense + layer.get_delta_weight("default")) < 0.2


def test_requantization_keeps_the_quant_states_double_quantization(saved_model, seed):
    """Double quantization on merge follows the layer's statistics, not a Params4bit attribute bitsandbytes may
    have rebuilt with defaults."""
    model = patch_ours(load(saved_model, "nf4"), vera_cfg())
    set_lambdas(model, seed)
    layer = next(iter(vera_layers(model).values()))
    assert not layer.base_layer.weight.quant_state.nested
    layer.base_layer.weight.compress_statistics = True  # what a rebuilt Params4bit says by default
    vk.merge_adapter(model)
    assert not layer.base_layer.weight.quant_state.nested


@pytest.mark.parametrize("state", ["merged", "disabled"])
def test_fallback_also_serves_merged_and_disabled_calls(saved_model, seed, monkeypatch, state):
    """Where bitsandbytes has no kernel for the device (forced here), the merged and the adapter-disabled forwards
    run the dequantize-then-matmul fallback too, not only the adapter one."""
    monkeypatch.setattr(qbase, "FORCE_FALLBACK", True)
    monkeypatch.setattr(qbase, "_warned", set())
    model = patch_ours(load(saved_model, "nf4"), vera_cfg())
    set_lambdas(model, seed)
    calls = []
    real = qbase.quantized_base_forward
    monkeypatch.setattr(qbase, "quantized_base_forward", lambda m, x, *a, **k: calls.append(m) or real(m, x, *a, **k))
    ids = ids_for(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", qbase.QuantizedFallbackWarning)
        if state == "merged":
            vk.merge_adapter(model)
            run(model, ids, "train")
        else:
            with vk.disable_adapter(model):
                run(model, ids, "train")
    assert len(calls) == len(vera_layers(model))


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_merged_model_pickles_and_its_copy_unmerges(saved_model, quant, seed):
    """torch.save / deepcopy of a merged quantized model work; the copy keeps the merged weights and, without the
    exact-undo snapshots (tied to the original's tensors), unmerges by requantizing; the original still restores its
    exact bits."""
    import io

    model = patch_ours(load(saved_model, quant), vera_cfg())
    set_lambdas(model, seed)
    layers = vera_layers(model)
    before = {p: raw_bits(layer.base_layer) for p, layer in layers.items()}
    W0 = {p: bnb_dense(layer.base_layer) for p, layer in layers.items()}
    vk.merge_adapter(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for copied in (torch.load(buf, weights_only=False), copy.deepcopy(model)):
        copied_layers = vera_layers(copied)
        for p, layer in copied_layers.items():
            assert layer.merged_adapters == ["default"] and not qmerge.has_original(layer.base_layer)
            assert_bits_equal(raw_bits(layer.base_layer), raw_bits(layers[p].base_layer), f"{p} copy")
        vk.unmerge_adapter(copied)
        for p, layer in copied_layers.items():
            assert not layer.merged_adapters
            # back to the original weight within two requantizations' noise (nf4 ~0.1 each, int8 ~0.01)
            assert rel(bnb_dense(layer.base_layer), W0[p]) < (0.05 if quant == "int8" else 0.25), p
    vk.unmerge_adapter(model)
    for p, layer in layers.items():
        assert_bits_equal(raw_bits(layer.base_layer), before[p], f"{p} exact unmerge of the original")
