"""transformers integration: a patched ``PreTrainedModel`` trains, saves and resumes under ``Trainer`` (and what builds on
it) as PEFT's models do, with no line beyond ``patch_model``.

What patching a transformers model does here (undone by ``unpatch_model``):

* ``model._hf_peft_config_loaded = True``: transformers' own mark of a model with adapters attached. Trainer then
  trains a quantized (bitsandbytes) base instead of refusing it ("You cannot perform fine-tuning on purely quantized
  models"), and gradient checkpointing makes the inputs require grad, as for PEFT models.
* ``model.save_pretrained(directory)`` writes the adapters in PEFT's format, as ``PeftModel.save_pretrained`` does
  ("default" in ``directory``, any other adapter in ``directory/<name>``), never the whole model: Trainer's
  ``save_model`` and its periodic checkpoints call it, so they hold adapter_config.json + adapter_model.safetensors
  that ``PeftModel.from_pretrained`` and ``vk.load_adapter`` load. (For a full model with the adapter folded in:
  ``vk.unpatch_model(model, merge=True).save_pretrained(...)``.)
* ``Trainer._load_from_checkpoint`` / ``Trainer._load_best_model`` (the two methods that load weights from a
  checkpoint folder) are wrapped once per process: for a patched model and a folder holding our adapter (and no
  full-model weights), the checkpoint is copied into the model's adapters in place; everything else goes to
  transformers' own code unchanged. transformers recognises only ``PeftModel`` instances there, and a model cannot be
  made one without changing its class. ``tests/test_trainer.py`` pins every transformers name used here.
"""

from __future__ import annotations

import functools
import os
import sys
import types
from typing import Any, Optional

from torch import nn

_HF_MARK = "_hf_peft_config_loaded"
_OUR_MARK = "_vera_kernels_hf_mark"  # set when the mark above is ours to remove
_WRAPPED = "__vera_kernels_wraps__"
_FULL_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                      "pytorch_model.bin.index.json")


def is_transformers_model(model: nn.Module) -> bool:
    modeling_utils = sys.modules.get("transformers.modeling_utils")  # a transformers model means it is imported
    return modeling_utils is not None and isinstance(model, modeling_utils.PreTrainedModel)


def attach(model: nn.Module) -> None:
    if not is_transformers_model(model):
        return
    if not getattr(model, _HF_MARK, False):
        setattr(model, _HF_MARK, True)
        model.__dict__[_OUR_MARK] = True
    model.__dict__["save_pretrained"] = types.MethodType(save_pretrained, model)
    install_trainer_hooks()


def detach(model: nn.Module) -> None:
    model.__dict__.pop("save_pretrained", None)
    if model.__dict__.pop(_OUR_MARK, False):
        model.__dict__.pop(_HF_MARK, None)


# ---------------------------------------------------------------------------------------------- save_pretrained
def save_pretrained(self: nn.Module, save_directory: str | os.PathLike, is_main_process: bool = True,
                    state_dict: Optional[dict] = None, selected_adapters: Optional[list[str]] = None,
                    safe_serialization: bool = True, **kwargs: Any) -> None:
    """Write the adapters in PEFT's format, as ``PeftModel.save_pretrained``: "default" into ``save_directory``,
    any other into ``save_directory/<name>``. ``state_dict``, when given, is the model's full (gathered) state dict
    to take the tensors from, as Trainer passes under FSDP on the main process only; without it the tensors are read
    from the model (gathered under FSDP, which is collective)."""
    from .checkpoint import _config_to_save, get_vera_state_dict, write_adapter_files
    from .model import _require_adapter, _require_state

    unsupported = {k: v for k, v in (("push_to_hub", kwargs.get("push_to_hub", False)),
                                     ("distributed_checkpoint", kwargs.get("distributed_checkpoint", False)),
                                     ("safe_serialization", not safe_serialization)) if v}
    if unsupported:
        raise ValueError(
            f"save_pretrained of a VeRA-patched model writes its adapters (adapter_config.json + "
            f"adapter_model.safetensors, PEFT's format); {sorted(unsupported)} not supported here"
        )
    state = _require_state(self)
    names = list(state.configs) if selected_adapters is None else list(selected_adapters)
    for name in names:
        _require_adapter(state, name)
    for name in names:
        if state_dict is None:
            tensors = get_vera_state_dict(self, name)
        else:
            tensors = _from_state_dict(self, state, name, state_dict)
        if is_main_process:
            folder = save_directory if name == "default" else os.path.join(save_directory, name)
            write_adapter_files(folder, tensors, _config_to_save(self, state, name))


def _from_state_dict(model: nn.Module, state, adapter_name: str, state_dict: dict) -> dict:
    from .checkpoint import KEY_A, KEY_B, _check_saved_shapes, _cpu_copy, _full, _saved_names, clean_name

    given = {clean_name(k): v for k, v in state_dict.items()}
    names = _saved_names(model, state, adapter_name)
    missing = [n for n in names.values() if n not in given]
    if missing:
        raise ValueError(f"the state dict given to save_pretrained lacks {len(missing)} of adapter {adapter_name!r}'s "
                         f"tensors, e.g. {missing[:3]}; nothing was written")
    tensors = {k: _cpu_copy(_full(given[n])) for k, n in names.items()}
    if state.configs[adapter_name].save_projection:  # buffers: never sharded, the model's own are whole
        tensors[KEY_A], tensors[KEY_B] = _cpu_copy(state.projections.vera_A), _cpu_copy(state.projections.vera_B)
    _check_saved_shapes(model, state, adapter_name, tensors)
    return tensors


# ---------------------------------------------------------------------------------------------- Trainer
def adapter_checkpoint_folders(model: nn.Module, folder: str | os.PathLike) -> dict[str, str]:
    """adapter name -> the folder of its checkpoint, for the patched model's adapters that ``folder`` holds in our
    layout (``save_pretrained``'s); empty when ``folder`` has full-model weights or none of these adapters."""
    from .checkpoint import CONFIG_NAME, unwrap_model
    from .model import get_state

    state = get_state(unwrap_model(model))
    folder = os.fspath(folder)
    if state is None or not os.path.isdir(folder) or any(
            os.path.isfile(os.path.join(folder, f)) for f in _FULL_WEIGHT_FILES):
        return {}
    found = {}
    for name in state.configs:
        sub = folder if name == "default" else os.path.join(folder, name)
        if os.path.isfile(os.path.join(sub, CONFIG_NAME)):
            found[name] = sub
    return found


def restore_checkpoint(model: nn.Module, folder: str | os.PathLike) -> list[str]:
    """Copy every adapter ``folder`` holds into the model's adapters in place; the names restored."""
    from .checkpoint import restore_adapter

    found = adapter_checkpoint_folders(model, folder)
    for name, sub in found.items():
        restore_adapter(model, sub, name)
    return list(found)


def _load_from_checkpoint(original, self, resume_from_checkpoint, model=None):
    target = self.model if model is None else model
    if not adapter_checkpoint_folders(target, resume_from_checkpoint):
        return original(self, resume_from_checkpoint, model)
    restore_checkpoint(target, resume_from_checkpoint)


def _load_best_model(original, self):
    best = self.state.best_model_checkpoint
    if best is None or not adapter_checkpoint_folders(self.model, best):
        return original(self)
    restore_checkpoint(self.model_wrapped if self.is_fsdp_enabled else self.model, best)


def _wrap(cls: type, name: str, replacement) -> None:
    current = getattr(cls, name)
    if getattr(current, _WRAPPED, None) is not None:
        return

    @functools.wraps(current)
    def wrapper(self, *args, **kwargs):
        return replacement(current, self, *args, **kwargs)

    setattr(wrapper, _WRAPPED, current)
    setattr(cls, name, wrapper)


def install_trainer_hooks() -> bool:
    """Wrap Trainer's checkpoint-loading methods (once per process); False where transformers' Trainer is absent."""
    try:
        from transformers import trainer as hf_trainer
    except ImportError:  # transformers without torch extras / accelerate: no Trainer to hook
        return False
    _wrap(hf_trainer.Trainer, "_load_from_checkpoint", _load_from_checkpoint)
    _wrap(hf_trainer.Trainer, "_load_best_model", _load_best_model)
    return True
