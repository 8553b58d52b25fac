"""Saving that cannot lose training, and loading that refuses what does not fit (issue 14, items 1 and 5; single
process: the distributed wrappers are in test_distributed.py).

* wrapped models (DataParallel, torch.compile, activation-checkpoint wrappers) save PEFT's keys, without prefixes;
* a lambda of the wrong shape (what an FSDP shard looks like) is refused, and no file is written;
* writes are atomic: a save that fails half-way (a full disk) leaves the previous checkpoint as it was;
* a truncated adapter_model.safetensors, bad JSON, missing config fields, another model's checkpoint: clear errors
  naming the file, the model unchanged;
* the model's own state_dict carries the projections (save_projection=True) or their identity (False): a state dict
  from a model with another projection_prng_key is restored exactly or refused, never loaded into other logits.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import re
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

import vera_kernels as vk
from helpers import (
    assert_tensors_equal,
    assert_unchanged,
    logits,
    set_random_lambdas,
    snapshot,
    tiny_gpt2,
    tiny_llama,
    token_ids,
)

TARGETS = ["q_proj", "v_proj", "down_proj"]


def patched(seed: int = 0, key: int = 7, **kw):
    cfg = dict(r=4, target_modules=TARGETS, init_weights=False, projection_prng_key=key)
    cfg.update(kw)
    model = vk.patch_model(tiny_llama(seed), cfg, backend="reference")
    set_random_lambdas(model, seed + 11)
    return model


def quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


def peft_values(directory, seed: int = 0) -> dict[str, torch.Tensor]:
    loaded = quiet(PeftModel.from_pretrained, tiny_llama(seed), directory)
    return {k: v.detach() for k, v in get_peft_model_state_dict(loaded).items()}


# ---------------------------------------------------------------------------------------------- wrappers
def _checkpoint_wrapped(model):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, LlamaDecoderLayer))
    return model


WRAPPERS = {
    "DataParallel": lambda m: torch.nn.DataParallel(m),
    "torch.compile": lambda m: torch.compile(m),
    "activation-checkpointing": _checkpoint_wrapped,
    "compile(checkpointed)": lambda m: torch.compile(_checkpoint_wrapped(m)),
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_save_wrapped_model(wrapper, tmp_path):
    """A model inside its training wrappers saves exactly what the bare model saves (before: DataParallel said "not
    patched"; compile and checkpoint wrappers wrote `_orig_mod.` / `_checkpoint_wrapped_module.` keys, which PEFT
    ignores, loading the init values)."""
    model = patched()
    want = vk.get_vera_state_dict(model)
    wrapped = WRAPPERS[wrapper](model)
    assert_tensors_equal(vk.get_vera_state_dict(wrapped), want, "wrapped state dict")
    vk.save_adapter(wrapped, tmp_path)
    assert_tensors_equal(load_file(tmp_path / "adapter_model.safetensors"), want, "file")
    assert_tensors_equal(peft_values(tmp_path), want, "PEFT-loaded")


@pytest.mark.parametrize("bad_shape", [(0,), (17,)])
def test_wrong_lambda_shape_is_refused_and_nothing_written(bad_shape, tmp_path):
    """What an FSDP1 rank's view of a lambda looks like outside summon_full_params: empty or cut. Before, it was
    written and PEFT loaded the file with only a warning, every lambda at its init value."""
    model = patched()
    layer = model.model.layers[1].self_attn.v_proj
    layer.vera_lambda_b["default"].data = torch.randn(bad_shape)
    with pytest.raises(ValueError, match=r"refusing to save.*vera_lambda_b.*\(20,\)"):
        vk.save_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
    with pytest.raises(ValueError, match="refusing to save"):
        vk.get_vera_state_dict(model)


# ---------------------------------------------------------------------------------------------- atomic writes
def _files(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


@pytest.mark.parametrize("fails", ["weights", "config"])
def test_failed_save_keeps_previous_checkpoint(fails, tmp_path, monkeypatch):
    """A disk that fills up half-way through a save leaves the previous checkpoint intact and no stray file (before,
    the file was rewritten in place: half a file, the previous training gone)."""
    import safetensors.torch

    model = patched()
    vk.save_adapter(model, tmp_path)
    before = _files(tmp_path)
    set_random_lambdas(model, 99)  # a later save of other values

    def disk_full(path_or_obj, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if fails == "weights":
        real = safetensors.torch.save_file

        def half_written(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)
            disk_full(filename)

        monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    else:

        def half_dump(obj, f, **kw):
            f.write(json.dumps(obj, **kw)[:20])
            disk_full(f)

        monkeypatch.setattr(json, "dump", half_dump)
    with pytest.raises(OSError, match="No space"):
        vk.save_adapter(model, tmp_path)
    assert _files(tmp_path) == before
    monkeypatch.undo()
    # and a save that succeeds replaces both files
    vk.save_adapter(model, tmp_path)
    assert _files(tmp_path).keys() == before.keys()
    assert_tensors_equal(load_file(tmp_path / "adapter_model.safetensors"), vk.get_vera_state_dict(model), "new")


# ---------------------------------------------------------------------------------------------- load validation
@pytest.fixture
def saved(tmp_path):
    model = patched()
    vk.save_adapter(model, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _assert_refused(folder, match):
    """Loading the damaged checkpoint raises an error naming the file, into a fresh model (which stays unpatched)
    and as a second adapter (the patched model unchanged)."""
    fresh = tiny_llama()
    before_fresh = snapshot(fresh)
    with pytest.raises(ValueError, match=match):
        quiet(vk.load_adapter, fresh, folder)
    assert_unchanged(fresh, before_fresh)
    other = patched(seed=3)
    before = snapshot(other)
    with pytest.raises(ValueError, match=match):
        quiet(vk.load_adapter, other, folder, adapter_name="second")
    assert_unchanged(other, before)


@pytest.mark.parametrize("cut", [0, 5, 100, -8])
def test_truncated_safetensors(saved, cut):
    path = saved / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut >= 0 else data[:cut])
    _assert_refused(saved, re.escape(str(path)) + r".*truncated or corrupt")


def test_corrupt_safetensors_header(saved):
    path = saved / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"\xff\xfe{{{{{["
    path.write_bytes(bytes(data))
    _assert_refused(saved, re.escape(str(path)) + r".*truncated or corrupt")


@pytest.mark.parametrize("text", ['{"peft_type": "VERA", "r": 4', "", "\xff\xfe", "[1, 2]"])
def test_bad_json(saved, text):
    path = saved / "adapter_config.json"
    path.write_bytes(text.encode("latin-1"))
    _assert_refused(saved, re.escape(str(path)) + r".*(not valid JSON|not the object)")


@pytest.mark.parametrize("field", ["r", "target_modules", "projection_prng_key"])
def test_missing_config_field(saved, field):
    path = saved / "adapter_config.json"
    cfg = json.loads(path.read_text())
    del cfg[field]
    path.write_text(json.dumps(cfg))
    _assert_refused(saved, re.escape(str(path)) + rf".*lacks the field\(s\) \['{field}'\]")


def test_checkpoint_of_another_model(tmp_path):
    """Shapes that do not fit (another hidden size) and targets that match nothing (a GPT-2 checkpoint into a Llama):
    errors naming the checkpoint folder, the model as it was."""
    wider = vk.patch_model(tiny_llama(0, hidden_size=48), dict(r=4, target_modules=TARGETS, init_weights=False,
                                                               projection_prng_key=7))
    vk.save_adapter(wider, tmp_path / "wider")
    _assert_refused(tmp_path / "wider", re.escape(str(tmp_path / "wider")) + ".*(does not fit|vera_A)")
    gpt2 = quiet(vk.patch_model, tiny_gpt2(0), dict(r=4, target_modules=["c_attn"], init_weights=False,
                                             projection_prng_key=7))
    vk.save_adapter(gpt2, tmp_path / "gpt2")
    _assert_refused(tmp_path / "gpt2", re.escape(str(tmp_path / "gpt2")))


# ---------------------------------------------------------------------------------------------- the model's state dict
@pytest.mark.parametrize("save_projection", [True, False])
def test_state_dict_carries_projections(save_projection):
    """Issue 14 item 5: a full state dict loaded strictly into a model patched with another projection_prng_key raised
    nothing and gave logits 1.3 away. Now: save_projection=True restores the projections exactly (as PEFT's
    state dict, which holds vera_A/vera_B, does); False holds their identity and a mismatch is refused."""
    src = patched(key=1, save_projection=save_projection)
    sd = src.state_dict()
    proj_keys = [k for k in sd if ".vera_projections." in k]
    assert len(proj_keys) == (2 if save_projection else 1), proj_keys  # once, not once per layer
    ids = token_ids(1)
    want = logits(src, ids)

    dst = patched(seed=0, key=2, save_projection=save_projection)
    assert not torch.allclose(logits(dst, ids), want)
    if save_projection:
        dst.load_state_dict(sd, strict=True)
        assert torch.equal(logits(dst, ids), want)
    else:
        before = snapshot(dst)
        with pytest.raises(ValueError, match="projection_prng_key"):
            dst.load_state_dict(sd, strict=True)
        assert_unchanged(dst, before)
        # the same key: the identity fits and the load is exact
        same = patched(seed=5, key=1, save_projection=False)
        same.load_state_dict(sd, strict=True)
        assert torch.equal(logits(same, ids), want)


def test_state_dict_projection_shape_and_missing_entries():
    src = patched(key=1)
    sd = src.state_dict()
    # a model with other targets has other projections: shapes differ -> refused before anything is loaded
    narrow = vk.patch_model(tiny_llama(0), dict(r=4, target_modules=["q_proj", "v_proj"], init_weights=False))
    before = snapshot(narrow)
    with pytest.raises(ValueError, match="vera_A has shape"):
        narrow.load_state_dict(sd, strict=False)
    assert_unchanged(narrow, before)
    # an entry missing from the state dict is a missing key under strict, skipped otherwise
    partial = {k: v for k, v in sd.items() if ".vera_projections." not in k}
    dst = patched(seed=2, key=1)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*vera_projections\.vera_A"):
        dst.load_state_dict(partial, strict=True)
    result = dst.load_state_dict(partial, strict=False)
    assert not result.unexpected_keys
    assert sorted(result.missing_keys) == sorted(k for k in sd if ".vera_projections." in k)


def test_state_dict_round_trip_and_unpatched():
    """A patched model's state dict round-trips strictly (also through DataParallel's `module.` prefix); after
    unpatch_model the model's state dict and strict loads are the base model's again."""
    src = patched(key=3)
    with torch.no_grad():
        src.model.layers[0].self_attn.q_proj.vera_projections.vera_A.mul_(-2.0)  # as loaded from a checkpoint
    ids = token_ids(2)
    want = logits(src, ids)
    dst = patched(seed=4, key=3)
    torch.nn.DataParallel(dst).load_state_dict(torch.nn.DataParallel(src).state_dict(), strict=True)
    assert torch.equal(logits(dst, ids), want)

    base = tiny_llama(0)
    plain = vk.unpatch_model(patched(key=3))
    assert set(plain.state_dict()) == set(base.state_dict())
    plain.load_state_dict(base.state_dict(), strict=True)
    assert not plain._state_dict_hooks and not plain._load_state_dict_pre_hooks


def test_torch_dcp_state_dict_functions():
    """torch.distributed.checkpoint's state_dict helpers (what accelerate and FSDP2 users call) walk every key to an
    attribute of the model: our projection entries resolve, and set_model_state_dict restores them."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    src = patched(key=1)
    sd = get_model_state_dict(src)
    assert sum(".vera_projections." in k for k in sd) == 2
    dst = patched(seed=1, key=2)
    set_model_state_dict(dst, sd)
    ids = token_ids(3)
    assert torch.equal(logits(dst, ids), logits(src, ids))


def test_deepcopy_keeps_hooks():
    src = patched(key=1)
    twin = copy.deepcopy(src)
    assert sum(".vera_projections." in k for k in twin.state_dict()) == 2
    vk.unpatch_model(twin)
    assert sum(".vera_projections." in k for k in src.state_dict()) == 2  # the original's hooks are its own
    assert not any(".vera_projections." in k for k in twin.state_dict())


def test_restore_adapter_in_place_and_refusals(tmp_path):
    """restore_adapter (Trainer's resume) copies a checkpoint into the existing adapter without replacing a parameter;
    a checkpoint of another adapter layout or trained on other projections is refused before anything changes."""
    from vera_kernels.checkpoint import restore_adapter

    src = patched(key=7)
    vk.save_adapter(src, tmp_path / "same")
    dst = patched(seed=2, key=7)
    ids_before = [id(p) for p in dst.parameters()]
    restore_adapter(dst, tmp_path / "same")
    assert [id(p) for p in dst.parameters()] == ids_before
    assert_tensors_equal(vk.get_vera_state_dict(dst), vk.get_vera_state_dict(src), "restored")

    vk.save_adapter(patched(key=8), tmp_path / "other-key")
    vk.save_adapter(patched(key=7, r=3), tmp_path / "other-r")
    for folder, match in (("other-key", "projection_prng_key"), ("other-r", "r: checkpoint 3")):
        victim = patched(seed=4, key=7)
        before = snapshot(victim)
        with pytest.raises(ValueError, match=match):
            restore_adapter(victim, tmp_path / folder)
        assert_unchanged(victim, before)
    # same config, but the model's projections were replaced (loaded from elsewhere): refused
    victim = patched(seed=4, key=7)
    with torch.no_grad():
        victim.model.layers[0].self_attn.q_proj.vera_projections.vera_B.add_(1.0)
    before = snapshot(victim)
    with pytest.raises(ValueError, match="other projections"):
        restore_adapter(victim, tmp_path / "same")
    assert_unchanged(victim, before)
