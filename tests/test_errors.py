"""Bad input: every case raises a clear error before anything changes, and the model is left exactly as it was
(module tree, every tensor, requires_grad flags, train/eval flags, VeRA state: see helpers.snapshot)."""

from __future__ import annotations

import os
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import vera_kernels as vk
from helpers import BACKENDS, MODEL_BACKENDS, assert_unchanged, make_pair, set_random_lambdas, snapshot, tiny_gpt2, \
    tiny_llama, token_ids

LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]


def llama_cfg(**kw) -> dict:
    base = dict(r=4, target_modules=LLAMA_TARGETS, init_weights=False, projection_prng_key=3)
    base.update(kw)
    return base


@pytest.fixture
def base():
    return tiny_llama(0)


@pytest.fixture
def patched():
    model = tiny_llama(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vk.patch_model(model, vk.VeraConfig(**llama_cfg()), backend="reference")
    set_random_lambdas(model, 1)
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)  # a user's own flag must survive too
    return model


def raises_unchanged(model, exc, match, fn, *args, **kwargs):
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)
    assert_unchanged(model, before)


# ---------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    "bad,exc,match",
    [
        (dict(target_modules=["nope"]), ValueError, "target_modules"),
        (dict(target_modules=r".*nothing_matches.*"), ValueError, "target_modules"),
        (dict(layers_to_transform=[7]), ValueError, "target_modules"),  # layer index out of range -> no target
        (dict(target_modules=["embed_tokens"]), TypeError, "(?i)linear"),  # an nn.Embedding
        (dict(target_modules=["q_proj", "input_layernorm"]), TypeError, "input_layernorm"),  # one good, one bad
        (dict(r=0), ValueError, r"\br\b"),
        (dict(r=-2), ValueError, r"\br\b"),
        (dict(vera_dropout=1.0), ValueError, "dropout"),
        (dict(vera_dropout=-0.1), ValueError, "dropout"),
        (dict(vera_dropout=float("nan")), ValueError, "dropout"),
        (dict(bias="lora_only"), ValueError, "bias"),
        (dict(bias="some"), ValueError, "bias"),
        (dict(layers_pattern="layers"), ValueError, "layers_to_transform"),
        (dict(modules_to_save=["no_such_head"]), ValueError, "no_such_head"),
        (dict(target_modules=[]), ValueError, "target_modules"),
    ],
    ids=lambda v: repr(v)[:40],
)
def test_bad_config_on_fresh_model(base, bad, exc, match):
    """Each bad config is refused (as a dict, as peft.VeraConfig where it constructs, as our VeraConfig at
    construction) and patch_model leaves the model untouched. modules_to_save entries that match nothing are refused:
    better than PEFT, which ignores them silently and leaves the head the user meant to train frozen."""
    as_dict = llama_cfg(**bad)
    raises_unchanged(base, exc, match, vk.patch_model, base, as_dict)
    try:
        pc = peft.VeraConfig(**as_dict)
    except Exception:  # PEFT validates some fields itself
        pc = None
    if pc is not None:
        raises_unchanged(base, exc, match, vk.patch_model, base, pc)
    if exc is ValueError and not ("target_modules" in bad or "modules_to_save" in bad or "layers_to_transform" in bad):
        with pytest.raises(ValueError, match=match):
            vk.VeraConfig(**as_dict)


def test_bad_backend_name(base, patched):
    raises_unchanged(base, ValueError, "backend", vk.patch_model, base, llama_cfg(), backend="cuda")
    raises_unchanged(patched, ValueError, "backend", vk.set_backend, patched, "fast")
    raises_unchanged(patched, ValueError, "backend", vk.add_adapter, patched, "other", llama_cfg(), backend="gpu")


def test_not_a_vera_config(base):
    lora = peft.LoraConfig(r=4, target_modules=["q_proj"])
    raises_unchanged(base, ValueError, "(?i)vera", vk.patch_model, base, lora)
    raises_unchanged(base, ValueError, "(?i)vera", vk.patch_model, base, {"peft_type": "LORA", "r": 4})


def test_calls_on_an_unpatched_model(base):
    for fn, args in [(vk.add_adapter, ("x", llama_cfg())), (vk.set_adapter, ("default",)),
                     (vk.delete_adapter, ("default",)), (vk.merge_adapter, ()), (vk.unmerge_adapter, ()),
                     (vk.unpatch_model, ()), (vk.set_backend, ("torch",)), (vk.get_vera_state_dict, ()),
                     (vk.adapter_names, ())]:
        raises_unchanged(base, ValueError, "not patched", fn, base, *args)


# ---------------------------------------------------------------------------------------------- adapters
@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(projection_prng_key=4), "(?i)key"),
        (dict(save_projection=False), "save_projection|saved for all adapters"),
        (dict(target_modules=["o_proj", "k_proj"], r=4), None),  # fits: control case, must NOT raise
    ],
    ids=["other_key", "other_save_projection", "control"],
)
def test_second_adapter_must_share_key_and_save_projection(patched, bad, match):
    if match is None:
        vk.add_adapter(patched, "other", llama_cfg(**bad))
        assert vk.adapter_names(patched) == ["default", "other"]
        return
    raises_unchanged(patched, ValueError, match, vk.add_adapter, patched, "other", llama_cfg(**bad))


def test_second_adapter_with_other_r_refused(patched):
    """Better than PEFT: a second adapter with another r is refused at add_adapter (A and B are shared, so every
    adapter must have their rank). PEFT accepts a smaller r and crashes with a broadcasting error at forward."""
    raises_unchanged(patched, ValueError, r"\br=2\b", vk.add_adapter, patched, "other", llama_cfg(r=2))
    raises_unchanged(patched, ValueError, r"\br=8\b", vk.add_adapter, patched, "other", llama_cfg(r=8))


def test_second_adapter_needing_larger_projections_refused():
    model = tiny_llama(0)
    vk.patch_model(model, llama_cfg(target_modules=["q_proj"]))  # A: (4, 40)
    raises_unchanged(model, ValueError, "vera_A has a size of 40 but 52", vk.add_adapter, model, "other",
                     llama_cfg(target_modules=["down_proj"]))  # in_features 52


def test_second_adapter_with_bias_refused():
    model = tiny_gpt2(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vk.patch_model(model, dict(r=4, target_modules=["c_attn"], bias="all"))
        raises_unchanged(model, ValueError, "bias", vk.add_adapter, model, "other",
                         dict(r=4, target_modules=["c_attn"], bias="vera_only"))


@pytest.mark.parametrize("name", ["default", "", "a.b", None])
def test_adapter_name_that_exists_or_is_invalid(patched, name):
    raises_unchanged(patched, ValueError, "(?i)adapter", vk.add_adapter, patched, name, llama_cfg())


def test_patch_twice_refused(patched):
    raises_unchanged(patched, ValueError, "already patched", vk.patch_model, patched, llama_cfg(), "other")


def test_adapter_name_that_does_not_exist(patched, tmp_path):
    vk.add_adapter(patched, "other", llama_cfg())
    for fn, args in [
        (vk.set_adapter, ("nope",)),
        (vk.set_adapter, (["other", "nope"],)),  # no partial switch
        (vk.delete_adapter, ("nope",)),
        (vk.merge_adapter, (["default", "nope"],)),  # nothing merged
        (vk.get_adapter_config, ("nope",)),
        (vk.get_vera_state_dict, ("nope",)),
    ]:
        raises_unchanged(patched, ValueError, "nope", fn, patched, *args)
    raises_unchanged(patched, ValueError, "nope", vk.save_adapter, patched, tmp_path / "ckpt", "nope")
    assert not (tmp_path / "ckpt").exists() or not os.listdir(tmp_path / "ckpt")


def test_delete_merged_adapter_refused(patched):
    """A merged adapter cannot be deleted (its delta would stay in the weights, unrecorded): it must be unmerged
    first. PEFT 0.21 refuses too; older PEFT deleted it silently."""
    vk.merge_adapter(patched)
    raises_unchanged(patched, ValueError, "(?i)unmerge", vk.delete_adapter, patched, "default")


# ---------------------------------------------------------------------------------------------- checkpoints
def _vera_checkpoint(tmp_path, name="ckpt", arch="llama", save_projection=True, **model_kw):
    model = tiny_llama(0, **model_kw) if arch == "llama" else tiny_gpt2(0, **model_kw)
    cfg = llama_cfg(save_projection=save_projection) if arch == "llama" else \
        dict(r=4, target_modules=["c_attn"], init_weights=False, projection_prng_key=3, save_projection=save_projection)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.VeraConfig(**cfg))
        pm.save_pretrained(tmp_path / name)
    return tmp_path / name


def test_checkpoint_that_is_not_vera(base, patched, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = peft.get_peft_model(tiny_llama(0), peft.LoraConfig(r=4, target_modules=["q_proj"]))
        lora.save_pretrained(tmp_path / "lora")
    for model in (base, patched):
        raises_unchanged(model, ValueError, "(?i)not a vera", vk.load_adapter, model, tmp_path / "lora", "x")
        raises_unchanged(model, FileNotFoundError, "adapter_config", vk.load_adapter, model, tmp_path / "none", "x")
    # a VeRA config without its weights file
    ckpt = _vera_checkpoint(tmp_path)
    os.remove(ckpt / "adapter_model.safetensors")
    raises_unchanged(base, FileNotFoundError, "adapter_model", vk.load_adapter, base, ckpt)


@pytest.mark.parametrize("save_projection", [True, False])
def test_checkpoint_for_other_shapes(base, patched, tmp_path, save_projection):
    """A checkpoint trained on a model with other sizes (hidden 48 instead of 40) does not fit: refused before the
    model changes, whether the projections come from the file or are redrawn from the key."""
    ckpt = _vera_checkpoint(tmp_path, save_projection=save_projection, hidden_size=48, intermediate_size=56)
    raises_unchanged(base, ValueError, "(?i)fit|size|shape", vk.load_adapter, base, ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not save_projection:
            patched_sp = tiny_llama(0)
            vk.patch_model(patched_sp, llama_cfg(save_projection=False))
            raises_unchanged(patched_sp, ValueError, "(?i)fit|size|shape", vk.load_adapter, patched_sp, ckpt, "b")
        else:
            raises_unchanged(patched, ValueError, "(?i)fit|size|shape|differ", vk.load_adapter, patched, ckpt, "b")


def test_checkpoint_for_another_architecture(base, tmp_path):
    ckpt = _vera_checkpoint(tmp_path, arch="gpt2")
    raises_unchanged(base, ValueError, "target_modules", vk.load_adapter, base, ckpt)


def test_checkpoint_second_adapter_with_other_projections_refused(patched, tmp_path):
    """save_projection=True checkpoint whose stored A/B differ from the ones this model's adapters share (here: other
    targets, so other shapes): a clear ValueError, model unchanged (PEFT fails with a size-mismatch RuntimeError)."""
    model = tiny_llama(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.VeraConfig(**llama_cfg(target_modules=["o_proj"])))
    pm.save_pretrained(tmp_path / "o")
    raises_unchanged(patched, ValueError, "vera_A|projection", vk.load_adapter, patched, tmp_path / "o", "other")


@pytest.mark.parametrize("edit", ["drop_lambda", "extra_tensor", "bad_shape", "drop_projection", "other_key"])
def test_checkpoint_tampered(base, patched, tmp_path, edit):
    ckpt = _vera_checkpoint(tmp_path)
    path = ckpt / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in sorted(tensors) if k.endswith("vera_lambda_d"))
    model = base
    if edit == "drop_lambda":
        del tensors[key]
    elif edit == "extra_tensor":
        tensors["base_model.model.model.layers.0.self_attn.k_proj.vera_lambda_d"] = torch.ones(4)
    elif edit == "bad_shape":
        tensors[key] = torch.ones(5)
    elif edit == "drop_projection":
        del tensors["base_model.vera_B"]
    elif edit == "other_key":  # as a second adapter: another projection_prng_key
        import json

        conf = json.loads((ckpt / "adapter_config.json").read_text())
        conf["projection_prng_key"] = 99
        (ckpt / "adapter_config.json").write_text(json.dumps(conf))
        model = patched
    save_file(tensors, path)
    raises_unchanged(model, ValueError, None, vk.load_adapter, model, ckpt, "other")


def test_load_under_existing_name(patched, tmp_path):
    ckpt = _vera_checkpoint(tmp_path)
    raises_unchanged(patched, ValueError, "already exists", vk.load_adapter, patched, ckpt, "default")


# ---------------------------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("backend", BACKENDS)
def test_op_input_last_dim_mismatch(backend):
    g = torch.Generator().manual_seed(0)
    W, b = torch.randn(7, 5, generator=g), torch.randn(7, generator=g)
    A, B = torch.randn(3, 6, generator=g), torch.randn(8, 3, generator=g)
    ld, lb = torch.randn(3, generator=g), torch.randn(7, generator=g)
    x = torch.randn(2, 4, 6, generator=g)  # 6 != in_features 5
    with pytest.raises(ValueError, match="last dimension is 6.*in_features=5"):
        vk.ops.vera_linear(x, W, b, A, B, ld, lb, backend=backend)
    # vera_add_delta has no weight: its in_features is x's; an x wider than A, or a base output of another shape
    with pytest.raises(ValueError, match="vera_A has 6 columns"):
        vk.ops.vera_add_delta(torch.randn(2, 4, 7), torch.randn(2, 4, 9), A, B, ld, lb, backend=backend)
    with pytest.raises(ValueError, match="base output shape"):
        vk.ops.vera_add_delta(torch.randn(2, 5, 7), x, A, B, ld, lb, backend=backend)
    # other op misuse
    x5 = x[..., :5]
    with pytest.raises(ValueError, match="dropout"):
        vk.ops.vera_linear(x5, W, b, A, B, ld, lb, dropout_p=1.0, training=True, backend=backend)
    with pytest.raises(ValueError, match="frozen"):
        vk.ops.vera_linear(x5, W, b, A.requires_grad_(True), B, ld, lb, backend=backend)
    A.requires_grad_(False)
    with pytest.raises(ValueError, match="lambda_d"):
        vk.ops.vera_linear(x5, W, b, A, B, torch.randn(4), lb, backend=backend)
    with pytest.raises(TypeError, match="dtype"):
        vk.ops.vera_linear(x5.half(), W, b, A, B, ld, lb, backend=backend)
    with pytest.raises(ValueError, match="vera_B"):
        vk.ops.vera_linear(x5, torch.randn(9, 5), torch.randn(9), A, B, ld, torch.randn(9), backend=backend)


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_layer_input_last_dim_mismatch(backend):
    """A VeraLinear given an input whose last dimension is not in_features raises the same clear ValueError (naming
    in_features) whatever the backend, and changes nothing."""
    _, _, om = make_pair("llama", llama_cfg(), backend=backend)
    layer = om.model.layers[0].self_attn.q_proj
    assert isinstance(layer, vk.VeraLinear)
    raises_unchanged(om, ValueError, "in_features=40", layer, torch.randn(2, 3, 41))


def test_model_forward_with_bad_ids_changes_nothing(patched):
    """Sanity: after all the failed calls above, a patched model still runs (fresh inputs)."""
    out = patched(token_ids(3)).logits
    assert torch.isfinite(out).all()
