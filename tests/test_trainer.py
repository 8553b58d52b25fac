"""transformers' Trainer with a patched model and no line beyond patch_model (issue 14, items 2 and 3).

* the loss curve equals PEFT's VeRA under Trainer, bit for bit with backend="reference", on a plain tiny Llama and on
  a bitsandbytes nf4 one (which Trainer refused: "You cannot perform fine-tuning on purely quantized models");
* periodic checkpoints and save_model hold a PEFT adapter (adapter_config.json + adapter_model.safetensors, no full
  model) equal to PEFT's own checkpoint at that step, loadable by PeftModel.from_pretrained and vk.load_adapter;
* resume_from_checkpoint continues exactly (losses and final lambdas equal an uninterrupted run);
* model.save_pretrained writes the adapters, as PeftModel.save_pretrained does;
* every transformers name vera_kernels.integrations relies on is pinned here, so a transformers change fails loudly.
"""

from __future__ import annotations

import inspect
import os

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

import vera_kernels as vk
from helpers import assert_tensors_equal, quiet, save_nf4_llama, set_random_lambdas, tiny_llama, trainer_base_model

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

CFG = dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False, projection_prng_key=3)
STEPS, SAVE_EVERY = 4, 2


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 8, length: int = 8):
        self.ids = torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Losses(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def train(model, out, resume=None):
    """A short Trainer run (AdamW, linear schedule, a checkpoint every SAVE_EVERY steps); its per-step losses."""
    losses = Losses()
    args = TrainingArguments(str(out), per_device_train_batch_size=2, max_steps=STEPS, learning_rate=1e-2,
                             logging_steps=1, save_strategy="steps", save_steps=SAVE_EVERY, report_to=[],
                             use_cpu=True, disable_tqdm=True, seed=0, data_seed=0, log_level="error")
    trainer = quiet(Trainer, model=model, args=args, train_dataset=Tokens(), callbacks=[losses])
    quiet(trainer.train, resume_from_checkpoint=resume)
    return losses.losses, trainer


@pytest.fixture(scope="module")
def nf4_base(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    return save_nf4_llama(tmp_path_factory.mktemp("llama"))


def ours(kind, nf4_base=None):
    torch.manual_seed(1)
    return vk.patch_model(trainer_base_model(kind, nf4_base), CFG, backend="reference")


def adapter_files(folder) -> list[str]:
    return sorted(f for f in os.listdir(folder) if "adapter" in f or f.startswith("model") or f == "config.json")


@pytest.mark.parametrize("kind", ["plain", "nf4"])
def test_trainer_matches_peft_and_resumes(kind, tmp_path, request):
    nf4 = request.getfixturevalue("nf4_base") if kind == "nf4" else None
    torch.manual_seed(1)
    pm = quiet(peft.get_peft_model, trainer_base_model(kind, nf4), peft.VeraConfig(**CFG))
    want, _ = train(pm, tmp_path / "peft")
    om = ours(kind, nf4)
    got, trainer = train(om, tmp_path / "ours")
    assert len(got) == STEPS and all(torch.isfinite(torch.tensor(got)))
    assert got == want, "loss curve differs from PEFT's"

    # every checkpoint: the adapter only, equal to PEFT's checkpoint of the same step, loadable both ways
    for step in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY):
        ck, pk = tmp_path / "ours" / f"checkpoint-{step}", tmp_path / "peft" / f"checkpoint-{step}"
        assert adapter_files(ck) == ["adapter_config.json", "adapter_model.safetensors"]
        tensors = load_file(ck / "adapter_model.safetensors")
        assert_tensors_equal(tensors, load_file(pk / "adapter_model.safetensors"), f"checkpoint-{step}")
        loaded = quiet(PeftModel.from_pretrained, trainer_base_model(kind, nf4), ck)
        assert_tensors_equal({k: v.detach() for k, v in get_peft_model_state_dict(loaded).items()}, tensors,
                             "PEFT-loaded")
        assert_tensors_equal(vk.get_vera_state_dict(quiet(vk.load_adapter, trainer_base_model(kind, nf4), ck)), tensors,
                             "vk-loaded")
    final = vk.get_vera_state_dict(om)
    assert_tensors_equal(load_file(tmp_path / "ours" / f"checkpoint-{STEPS}" / "adapter_model.safetensors"), final,
                         "last checkpoint")

    trainer.save_model(str(tmp_path / "final"))
    assert adapter_files(tmp_path / "final") == ["adapter_config.json", "adapter_model.safetensors"]
    assert_tensors_equal(load_file(tmp_path / "final" / "adapter_model.safetensors"), final, "save_model")

    # resume from the first checkpoint: the same later losses and the same final lambdas, exactly
    resumed_model = ours(kind, nf4)
    set_random_lambdas(resumed_model, 5)  # whatever the model holds is replaced by the checkpoint
    resumed, _ = train(resumed_model, tmp_path / "ours", resume=str(tmp_path / "ours" / f"checkpoint-{SAVE_EVERY}"))
    assert resumed == got[SAVE_EVERY:]
    assert_tensors_equal(vk.get_vera_state_dict(resumed_model), final, "resumed")


def test_trainer_refuses_unpatched_quantized_model(nf4_base, tmp_path):
    """The mark patch_model sets is what lets Trainer train a quantized base: without it Trainer refuses, as before
    (pins transformers' check)."""
    model = trainer_base_model("nf4", nf4_base)
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[], max_steps=1)
    with pytest.raises(ValueError, match="purely quantized"):
        Trainer(model=model, args=args, train_dataset=Tokens())
    quiet(vk.patch_model, model, CFG)
    Trainer(model=model, args=args, train_dataset=Tokens())
    vk.unpatch_model(model)
    with pytest.raises(ValueError, match="purely quantized"):
        Trainer(model=model, args=args, train_dataset=Tokens())


def test_save_pretrained_writes_adapters(tmp_path):
    """model.save_pretrained of a patched model writes its adapters as PeftModel.save_pretrained does ("default" in
    the folder, others in subfolders), never the base weights with VeRA keys in them (which from_pretrained loaded
    "successfully" with random weights in every adapted layer); after unpatch_model it saves the full model again."""
    model = ours("plain")
    vk.add_adapter(model, "other", dict(CFG, init_weights=False))
    set_random_lambdas(model, 3)
    model.save_pretrained(tmp_path / "out")
    assert adapter_files(tmp_path / "out") == ["adapter_config.json", "adapter_model.safetensors"]
    assert adapter_files(tmp_path / "out" / "other") == ["adapter_config.json", "adapter_model.safetensors"]
    for name, folder in (("default", tmp_path / "out"), ("other", tmp_path / "out" / "other")):
        assert_tensors_equal(load_file(folder / "adapter_model.safetensors"), vk.get_vera_state_dict(model, name),
                             name)
    loaded = quiet(PeftModel.from_pretrained, tiny_llama(0), tmp_path / "out")
    quiet(loaded.load_adapter, tmp_path / "out" / "other", adapter_name="other")
    for name in ("default", "other"):
        assert_tensors_equal({k: v.detach() for k, v in get_peft_model_state_dict(loaded, adapter_name=name).items()},
                             vk.get_vera_state_dict(model, name), f"PEFT {name}")
    with pytest.raises(OSError):  # no full model in the folder: from_pretrained cannot mistake it for one
        quiet(transformers.LlamaForCausalLM.from_pretrained, tmp_path / "out")

    # Trainer's FSDP path hands over the gathered full state dict: its values are the ones written
    sd = model.state_dict()
    key = "model.layers.1.mlp.down_proj.vera_lambda_d.default"
    sd[key] = sd[key] + 1.0
    model.save_pretrained(tmp_path / "from_sd", state_dict=sd, selected_adapters=["default"])
    assert torch.equal(load_file(tmp_path / "from_sd" / "adapter_model.safetensors")[
        "base_model.model.model.layers.1.mlp.down_proj.vera_lambda_d"], sd[key])
    assert not (tmp_path / "from_sd" / "other").exists()
    model.save_pretrained(tmp_path / "not_main", is_main_process=False)
    assert not (tmp_path / "not_main").exists()
    with pytest.raises(ValueError, match="push_to_hub"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)

    vk.unpatch_model(model)
    assert "save_pretrained" not in model.__dict__ and not getattr(model, "_hf_peft_config_loaded", False)
    quiet(model.save_pretrained, tmp_path / "full")
    assert "model.safetensors" in os.listdir(tmp_path / "full")


# ---------------------------------------------------------------------------------------------- pins
def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_transformers_names_pinned():
    """What vera_kernels.integrations relies on in transformers. If this fails, transformers changed: re-read
    Trainer's checkpoint loading/saving and adapt integrations.py before changing this test."""
    from transformers import trainer as hf_trainer
    from transformers import trainer_utils
    from transformers.modeling_utils import PreTrainedModel

    vk.patch_model(tiny_llama(0), CFG)  # installs the wrappers
    for name, params in (("_load_from_checkpoint", ["self", "resume_from_checkpoint", "model"]),
                         ("_load_best_model", ["self"])):
        wrapped = getattr(hf_trainer.Trainer, name)
        original = getattr(wrapped, "__vera_kernels_wraps__", None)
        assert original is not None, f"Trainer.{name} is not wrapped"
        assert _params(original) == params, f"Trainer.{name} signature changed: {_params(original)}"
    module_src = inspect.getsource(hf_trainer)
    assert "self._load_from_checkpoint(resume_from_checkpoint" in module_src, "Trainer no longer resumes through it"
    assert "self._load_best_model()" in module_src, "Trainer no longer loads the best model through it"
    # the model-side entry points: Trainer._save calls save_pretrained(output_dir, state_dict=, is_main_process=)
    save_src = inspect.getsource(hf_trainer.Trainer._save)
    assert ".save_pretrained(" in save_src and "is_main_process" in save_src and "state_dict=state_dict" in save_src
    assert {"save_directory", "is_main_process", "state_dict"} <= set(_params(PreTrainedModel.save_pretrained))
    # the quantized-training check reads the mark patch_model sets
    assert "_hf_peft_config_loaded" in inspect.getsource(trainer_utils.validate_quantization_for_training)
    assert "validate_quantization_for_training" in inspect.getsource(hf_trainer.Trainer.__init__)
    # what the wrappers read from the Trainer
    best_src = inspect.getsource(inspect.unwrap(hf_trainer.Trainer._load_best_model))
    assert "self.state.best_model_checkpoint" in best_src and "self.is_fsdp_enabled" in best_src
    assert "model_wrapped" in inspect.getsource(hf_trainer.Trainer.__init__)


def test_load_best_model_at_end(tmp_path):
    """load_best_model_at_end goes through Trainer._load_best_model: the best checkpoint's adapter comes back into the
    model in place (transformers' own code looked for a full model there)."""
    model = ours("plain")
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=2, max_steps=STEPS, learning_rate=5e-2,
                             eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                             load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True,
                             report_to=[], use_cpu=True, disable_tqdm=True, seed=0, log_level="error")
    trainer = quiet(Trainer, model=model, args=args, train_dataset=Tokens(), eval_dataset=Tokens(n=2))
    quiet(trainer.train)
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith(f"checkpoint-{STEPS}"), best  # the worst loss is not the last
    assert_tensors_equal(vk.get_vera_state_dict(model), load_file(os.path.join(best, "adapter_model.safetensors")),
                         "best checkpoint")
