"""PEFT-format VeRA checkpoints: adapter_config.json + adapter_model.safetensors, written and read both ways.

Keys (PEFT's ``save_pretrained`` layout, adapter name removed):
    base_model.model.<module path>.vera_lambda_b / .vera_lambda_d      every adapted layer
    base_model.vera_A / base_model.vera_B                             when save_projection=True
    base_model.model.<param name>                                     biases (bias="all" / "vera_only")
    base_model.model.<module path>.<state key>                        modules_to_save copies
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Optional

import torch
from torch import nn

from .backends import check_backend_name
from .layer import ModulesToSave
from .model import (
    PatchPlan,
    _adapter_parameters,
    _apply_plan,
    _current_backend,
    get_state,
    _in_wrapper_internals,
    _require_adapter,
    _require_state,
    _wrappers,
    plan_patch,
    vera_layers,
)

PREFIX = "base_model.model."
KEY_A = "base_model.vera_A"
KEY_B = "base_model.vera_B"
CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"


def _bias_param_names(model: nn.Module, bias_mode: str) -> list[str]:
    """Names (in the patched model) of the biases an adapter with this bias mode trains and saves."""
    if bias_mode == "all":
        return [n for n, _ in model.named_parameters() if (n == "bias" or n.endswith(".bias"))
                and not _in_wrapper_internals(n)]
    if bias_mode == "vera_only":
        return [f"{path}.base_layer.bias" for path, layer in vera_layers(model)
                if getattr(layer.base_layer, "bias", None) is not None]
    return []


def get_vera_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The dict PEFT's ``save_pretrained`` writes for this adapter (CPU copies; the model is not touched)."""
    state = _require_state(model)
    _require_adapter(state, adapter_name)
    cfg = state.configs[adapter_name]
    out: dict[str, torch.Tensor] = {}
    for path, layer in vera_layers(model):
        if adapter_name in layer.vera_lambda_d:
            out[f"{PREFIX}{path}.vera_lambda_b"] = layer.vera_lambda_b[adapter_name]
            out[f"{PREFIX}{path}.vera_lambda_d"] = layer.vera_lambda_d[adapter_name]
    if cfg.save_projection:
        out[KEY_A] = state.projections.vera_A
        out[KEY_B] = state.projections.vera_B
    params = dict(model.named_parameters())
    for name in _bias_param_names(model, cfg.bias):
        out[PREFIX + name] = params[name]
    for path, wrapper in _wrappers(model):
        if adapter_name in wrapper.modules_to_save:
            for k, v in wrapper.modules_to_save[adapter_name].state_dict().items():
                out[f"{PREFIX}{path}.{k}"] = v
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in out.items()}


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` as PEFT's ``save_pretrained`` does."""
    from safetensors.torch import save_file

    state = _require_state(model)
    _require_adapter(state, adapter_name)
    tensors = get_vera_state_dict(model, adapter_name)
    cfg = state.configs[adapter_name].to_dict()
    cfg["base_model_name_or_path"] = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, SAFETENSORS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def read_adapter(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config dict, tensors) of a PEFT VeRA checkpoint; clear errors when it is not one."""
    cfg_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!s}: not a PEFT adapter checkpoint")
    with open(cfg_path) as f:
        cfg = json.load(f)
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "VERA":
        raise ValueError(f"{directory!s} is not a VeRA checkpoint: its peft_type is {cfg.get('peft_type')!r}")
    st_path = os.path.join(directory, SAFETENSORS_NAME)
    bin_path = os.path.join(directory, BIN_NAME)
    if os.path.isfile(st_path):
        from safetensors.torch import load_file

        tensors = load_file(st_path)
    elif os.path.isfile(bin_path):
        tensors = torch.load(bin_path, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"no {SAFETENSORS_NAME} (or {BIN_NAME}) in {directory!s}")
    return cfg, tensors


def _expected_tensors(model: nn.Module, plan: PatchPlan) -> dict[str, tuple[str, tuple[int, ...]]]:
    """checkpoint key -> (parameter/buffer name in the patched model, shape), from the plan, before patching."""
    cfg, name = plan.config, plan.adapter_name
    expected: dict[str, tuple[str, tuple[int, ...]]] = {}
    for t in plan.targets:
        expected[f"{PREFIX}{t.name}.vera_lambda_b"] = (f"{t.name}.vera_lambda_b.{name}", (t.out_features,))
        expected[f"{PREFIX}{t.name}.vera_lambda_d"] = (f"{t.name}.vera_lambda_d.{name}", (cfg.r,))
    target_paths = {t.name: t for t in plan.targets if t.existing is None}

    def patched_name(param_name: str) -> str:
        owner, _, leaf = param_name.rpartition(".")
        return f"{owner}.base_layer.{leaf}" if owner in target_paths else param_name

    params = dict(model.named_parameters())
    if cfg.bias == "all":
        for n, p in params.items():
            if (n == "bias" or n.endswith(".bias")) and not _in_wrapper_internals(n):
                expected[PREFIX + patched_name(n)] = (patched_name(n), tuple(p.shape))
    elif cfg.bias == "vera_only":
        for t in plan.targets:
            b = getattr(t.module, "bias", None)
            if b is not None:
                expected[f"{PREFIX}{t.name}.base_layer.bias"] = (f"{t.name}.base_layer.bias", tuple(b.shape))
    for mname, module in plan.modules_to_save:
        source = module.original_module if isinstance(module, ModulesToSave) else module
        for k, v in source.state_dict().items():
            expected[f"{PREFIX}{mname}.{k}"] = (f"{mname}.modules_to_save.{name}.{k}", tuple(v.shape))
    return expected


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    backend: Optional[str] = None,
    is_trainable: bool = False,
) -> nn.Module:
    """Load a PEFT VeRA checkpoint (ours or PEFT's). Patches the model if it is not patched yet (the adapter is then
    active); otherwise adds the adapter next to the others (not active, as PEFT's load_adapter).
    ``is_trainable`` as in ``PeftModel.from_pretrained`` / ``load_adapter``: False (the default) loads for inference,
    the adapter frozen (on an unpatched model nothing is trainable) and the model put in eval mode, as PEFT does;
    True makes the loaded adapter's lambdas and modules_to_save copies trainable, even when it is not active (as
    PEFT's ``set_requires_grad``), and leaves train/eval as it was.
    ``backend`` defaults to the model's current backend ("auto" for an unpatched model).
    Everything is checked against the model before the model changes."""
    first = get_state(model) is None or not get_state(model).configs
    if backend is None:
        backend = _current_backend(model) if get_state(model) is not None else "auto"
    check_backend_name(backend)
    cfg_dict, tensors = read_adapter(directory)
    save_projection = bool(cfg_dict.get("save_projection", True))
    has_proj = KEY_A in tensors and KEY_B in tensors
    override: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    if save_projection:
        if not has_proj:
            raise ValueError(
                "Specified to load vera_A and vera_B from state dictionary however they were not present! "
                f"({directory!s} has save_projection=True but no {KEY_A}/{KEY_B})"
            )
        override = (tensors[KEY_A].float(), tensors[KEY_B].float())
    elif has_proj:
        warnings.warn(
            "Specified to not load vera_A and vera_B from state dictionary however they are present in state "
            "dictionary! They are rebuilt from projection_prng_key, as PEFT does."
        )
    plan = plan_patch(model, cfg_dict, adapter_name, projections_override=override, from_checkpoint=True)
    if not plan.new_projections and not save_projection:
        in_max = max(t.in_features for t in plan.targets)
        out_max = max(t.out_features for t in plan.targets)
        shared = plan.projections
        if (in_max, out_max) != (shared.in_max, shared.out_max):
            warnings.warn(
                f"the adapter in {directory!s} was saved without its projections (save_projection=False); its own "
                f"targets would draw A/B of shapes ({plan.config.r}, {in_max}) / ({out_max}, {plan.config.r}), but "
                f"this model shares ({shared.r}, {shared.in_max}) / ({shared.out_max}, {shared.r}). If it was trained "
                "alone, it ran on different random projections than the ones it will use here."
            )
    expected = _expected_tensors(model, plan)
    given = {k: v for k, v in tensors.items() if k not in (KEY_A, KEY_B)}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(given[k].shape)} vs model {expected[k][1]}"
             for k in sorted(set(given) & set(expected)) if tuple(given[k].shape) != expected[k][1]]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} tensor(s) for modules this model does not target, e.g. {unexpected[:3]}")
        if wrong:
            parts.append(f"shape mismatch: {wrong[:3]}")
        raise ValueError(f"the checkpoint in {directory!s} does not fit this model: " + "; ".join(parts))

    _apply_plan(model, plan, backend)
    named = dict(model.named_parameters())
    named.update(dict(model.named_buffers()))
    with torch.no_grad():
        for key, (target_name, _) in expected.items():
            named[target_name].copy_(given[key])
    if not is_trainable:
        if first:
            model.requires_grad_(False)
        model.eval()
    elif not first:
        for p in _adapter_parameters(model, adapter_name):
            p.requires_grad_(True)
    return model
