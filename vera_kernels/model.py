"""Patching a model in place with VeRA adapters, with PEFT's semantics; every call validates before it changes anything.

A patched model keeps its class and its module paths; each targeted layer becomes a VeraLinear, each module in
``modules_to_save`` a ModulesToSave, and the model carries a small ``VeraState`` (configs, active adapters, the one
shared VeraProjections) under the attribute ``_vera_kernels_state``.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Union

import torch
from torch import nn

from .backends import check_backend_name
from .config import VeraConfig, adapter_name_check
from .layer import ModulesToSave, VeraLinear
from .projections import VeraProjections
from .targeting import Target, find_targets

STATE_ATTR = "_vera_kernels_state"


@dataclass
class VeraState:
    configs: dict[str, VeraConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    projections: Optional[VeraProjections] = None
    # requires_grad of every parameter (by name) before the first patch, restored by unpatch_model
    original_requires_grad: dict[str, bool] = field(default_factory=dict)


@dataclass
class PatchPlan:
    """Everything a patch will do, computed (and validated) before the model is touched."""

    config: VeraConfig
    adapter_name: str
    targets: list[Target]
    modules_to_save: list[tuple[str, nn.Module]]
    projections: VeraProjections  # the model's existing one, or a new one
    new_projections: bool


# ---------------------------------------------------------------------------------------------- helpers
def get_state(model: nn.Module) -> Optional[VeraState]:
    return getattr(model, STATE_ATTR, None)


def _require_state(model: nn.Module) -> VeraState:
    state = get_state(model)
    if state is None:
        raise ValueError("this model is not patched with VeRA adapters (call vera_kernels.patch_model first)")
    return state


def _require_adapter(state: VeraState, name: str, missing: str = "not found.") -> None:
    if name not in state.configs:  # PEFT's words: "Adapter x not found." (delete_adapter: "does not exist")
        raise ValueError(f"Adapter {name} {missing} This model has the adapters {list(state.configs)}.")


def vera_layers(model: nn.Module) -> Iterator[tuple[str, VeraLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, VeraLinear):
            yield name, module


def _wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            yield name, module


def _adapter_parameters(model: nn.Module, adapter_name: Optional[str] = None) -> list[nn.Parameter]:
    """Every adapter's (or one adapter's) trainable tensors: lambdas and modules_to_save copies."""
    params: list[nn.Parameter] = []
    for _, layer in vera_layers(model):
        for d in (layer.vera_lambda_b, layer.vera_lambda_d):
            params += [p for n, p in d.items() if adapter_name in (None, n)]
    for _, wrapper in _wrappers(model):
        for n, module in wrapper.modules_to_save.items():
            if adapter_name in (None, n):
                params += list(module.parameters())
    return params


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _find_modules_to_save(model: nn.Module, config: VeraConfig, may_match_nothing: Iterable[str] = (),
                          ) -> list[tuple[str, nn.Module]]:
    """PEFT's rule: a module whose name ends with an entry; nested matches keep the outermost. An entry that
    matches nothing is an error here (PEFT ignores it silently, leaving the head the user meant to train frozen),
    except those in ``may_match_nothing``: the task heads PEFT adds whatever the model has."""
    if not config.modules_to_save:
        return []
    found: list[tuple[str, nn.Module]] = []
    hit = {m: False for m in config.modules_to_save}
    for name, module in model.named_modules():
        if not name or any(name.startswith(f + ".") for f, _ in found):
            continue
        if isinstance(module, (VeraLinear, VeraProjections)) or _inside_vera(model, name):
            continue
        entries = [m for m in config.modules_to_save if name.endswith(m)]
        if entries:
            for m in entries:
                hit[m] = True
            found.append((name, module))
    exempt = set(may_match_nothing)
    missing = [m for m, ok in hit.items() if not ok and m not in exempt]
    if missing:
        raise ValueError(f"modules_to_save entries {missing} match no module of the model")
    return found


def _inside_vera(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    for i in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:i])), (VeraLinear, ModulesToSave)):
            return True
    return False


# ---------------------------------------------------------------------------------------------- planning
def _task_heads(state: Optional[VeraState], cfg: VeraConfig) -> tuple[str, ...]:
    """The heads a new adapter trains for its task: PEFT's model class (PeftModelFor<Task>, chosen by the first
    adapter's task_type) appends them to every adapter's modules_to_save, added or loaded later ones included."""
    first = next(iter(state.configs.values()), None) if state is not None else None
    return (first if first is not None and first.task_type is not None else cfg).task_heads()


def plan_patch(
    model: nn.Module,
    config: Any,
    adapter_name: str,
    projections_override: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    from_checkpoint: bool = False,
) -> PatchPlan:
    """Validate a new adapter against the model (and its existing adapters) and say what patching would do.

    ``from_checkpoint``: the config was read from an adapter_config.json, whose modules_to_save entries may match
    nothing (PEFT writes ["classifier", "score"] for every classification model); the checkpoint's tensors are
    checked key by key instead, so nothing it trained can be dropped."""
    cfg = VeraConfig.from_any(config)
    cfg.validate()
    adapter_name_check(adapter_name)
    state = get_state(model)
    if state is not None and adapter_name in state.configs:
        raise ValueError(f"Adapter with name '{adapter_name}' already exists.")  # PEFT's words
    heads = _task_heads(state, cfg)
    if heads:  # what PEFT stores and saves: the user's entries, then the heads (PEFT repeats those already there)
        given = list(cfg.modules_to_save or [])
        cfg.modules_to_save = given + [h for h in heads if h not in given]

    targets = find_targets(model, cfg, VeraLinear, ModulesToSave)
    for t in targets:  # PEFT forces fan_in_fan_out by layer type, warning when the config disagreed
        if t.kind == "conv1d" and not cfg.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True.")
            cfg.fan_in_fan_out = True
        elif t.kind != "conv1d" and cfg.fan_in_fan_out:
            warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to False.")
            cfg.fan_in_fan_out = False

    existing = state.projections if state is not None and state.configs else None
    if existing is not None:
        others = list(state.configs.values())
        if any(o.projection_prng_key != cfg.projection_prng_key for o in others):
            raise ValueError(
                "Vera PRNG initialisation key must be the same for all adapters. Got "
                f"config.projection_prng_key={cfg.projection_prng_key!r} but previous config had "
                f"{others[0].projection_prng_key}."
            )
        if any(o.save_projection != cfg.save_projection for o in others):
            raise ValueError(
                "VeRA projection weights must be saved for all adapters or none, but got multiple different values: "
                f"{sorted({o.save_projection for o in others} | {cfg.save_projection})} (save_projection="
                f"{cfg.save_projection} for this adapter, {others[0].save_projection} for the model's adapters)"
            )
        if cfg.bias != "none" and any(o.bias != "none" for o in others):
            raise ValueError("VeRA supports only 1 adapter with bias. When using multiple adapters, set bias to 'none' "
                             "for all adapters.")
        for t in targets:
            existing.check_fits(t.in_features, t.out_features, cfg.r, where=t.name)
        if projections_override is not None:
            A, B = projections_override
            if A.shape != existing.vera_A.shape or B.shape != existing.vera_B.shape or not (
                torch.equal(A.cpu(), existing.vera_A.cpu()) and torch.equal(B.cpu(), existing.vera_B.cpu())
            ):
                raise ValueError(
                    f"incompatible adapters: the checkpoint's vera_A {tuple(A.shape)} / vera_B {tuple(B.shape)} "
                    "differ from the projections this model's adapters already share, vera_A "
                    f"{tuple(existing.vera_A.shape)} / vera_B {tuple(existing.vera_B.shape)}"
                    + (" (same shapes, other values)" if A.shape == existing.vera_A.shape
                       and B.shape == existing.vera_B.shape else "")
                )
        projections, new = existing, False
    else:
        in_max = max(t.in_features for t in targets)
        out_max = max(t.out_features for t in targets)
        if projections_override is not None:
            A, B = projections_override
            if tuple(A.shape) != (cfg.r, in_max) or tuple(B.shape) != (out_max, cfg.r):
                raise ValueError(
                    f"the checkpoint's vera_A {tuple(A.shape)} / vera_B {tuple(B.shape)} do not fit this model: "
                    f"r={cfg.r} and the targeted layers need ({cfg.r}, {in_max}) / ({out_max}, {cfg.r})"
                )
            projections = VeraProjections(A.detach().clone(), B.detach().clone(), cfg.projection_prng_key,
                                          cfg.save_projection)
        else:
            projections = VeraProjections.from_key(cfg.r, in_max, out_max, cfg.projection_prng_key,
                                                   cfg.save_projection)
        device = next((p.device for t in targets for p in t.module.parameters() if p.device.type != "meta"), None)
        if device is not None:
            projections.to(device)
        new = True
    may_match_nothing = cfg.modules_to_save if from_checkpoint else heads
    mts = _find_modules_to_save(model, cfg, may_match_nothing or ())
    if heads and not from_checkpoint and not any(name.endswith(h) for name, _ in mts for h in heads):
        warnings.warn(
            f"task_type={cfg.task_type!r} trains the task's head, which PEFT looks for as modules_to_save entries "
            f"{list(heads)}, but no module of the model is named so: no head is trained or saved. If the model has "
            "one under another name, add that name to modules_to_save."
        )
    return PatchPlan(cfg, adapter_name, targets, mts, projections, new)


def _apply_plan(model: nn.Module, plan: PatchPlan, backend: str) -> None:
    """Carry out a validated plan. Nothing here can fail on user input."""
    state = get_state(model)
    first = state is None or not state.configs
    if state is None:
        state = VeraState(original_requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
        setattr(model, STATE_ATTR, state)
        _attach(model)
    snapshot = None if first else [(p, p.requires_grad) for p in model.parameters()]
    if plan.new_projections:
        # no adapter uses the old projections any more (first patch, or every adapter deleted): all layers,
        # including adapter-less ones left by delete_adapter, switch to the new pair
        state.projections = plan.projections
        for _, layer in vera_layers(model):
            layer.vera_projections = plan.projections

    cfg, name = plan.config, plan.adapter_name
    for t in plan.targets:
        layer = t.existing
        if layer is None:
            layer = VeraLinear(t.module, t.kind, state.projections, backend)
            _set_submodule(model, t.name, layer)
        layer.add_adapter(name, cfg.r, cfg.vera_dropout, cfg.init_weights, cfg.d_initial)
    for mname, module in plan.modules_to_save:
        wrapper = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
        if wrapper is not module:
            _set_submodule(model, mname, wrapper)
        wrapper.add_adapter(name)
    state.configs[name] = cfg

    if first:
        state.active = [name]
        _mark_trainable(model, state)
    else:
        for p, flag in snapshot:
            p.requires_grad_(flag)
        for _, m in list(vera_layers(model)) + list(_wrappers(model)):
            m.set_active(state.active)


def _mark_trainable(model: nn.Module, state: VeraState) -> None:
    """PEFT's first-injection rule: freeze everything, then the active adapters' lambdas, their bias mode's biases
    and their modules_to_save copies become trainable."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, m in list(vera_layers(model)) + list(_wrappers(model)):
        m.set_active(state.active)
    for name in state.active:
        bias = state.configs[name].bias
        if bias == "all":
            for pname, p in model.named_parameters():
                if (pname == "bias" or pname.endswith(".bias")) and not _in_wrapper_internals(pname):
                    p.requires_grad_(True)
        elif bias == "vera_only":
            for _, layer in vera_layers(model):
                if getattr(layer.base_layer, "bias", None) is not None:
                    layer.base_layer.bias.requires_grad_(True)


def _attach(model: nn.Module) -> None:
    """What a patched model carries besides its modules: the projections in its state_dict, and (for a transformers
    model) what makes Trainer and ``save_pretrained`` treat it as PEFT's adapter-trained models."""
    from . import integrations, mixed
    from .projections import register_state_dict_hooks

    register_state_dict_hooks(model)
    integrations.attach(model)
    mixed.attach(model)


def _detach(model: nn.Module) -> None:
    from . import integrations, mixed
    from .projections import remove_state_dict_hooks

    remove_state_dict_hooks(model)
    integrations.detach(model)
    mixed.detach(model)


def _in_wrapper_internals(param_name: str) -> bool:
    return ".original_module." in param_name or ".modules_to_save." in param_name


# ---------------------------------------------------------------------------------------------- public API
def patch_model(model: nn.Module, config: Any, adapter_name: str = "default", backend: str = "auto") -> nn.Module:
    """Inject a VeRA adapter into ``model`` in place (and return it), exactly as ``peft.get_peft_model`` would.

    ``config`` is a vera_kernels.VeraConfig, a peft.VeraConfig or an adapter_config.json dict. The new adapter is
    active and trainable; every other parameter is frozen except as ``bias``/``modules_to_save`` say.
    """
    check_backend_name(backend)
    if get_state(model) is not None and get_state(model).configs:
        raise ValueError("this model is already patched; use vera_kernels.add_adapter to add another adapter")
    plan = plan_patch(model, config, adapter_name)
    _apply_plan(model, plan, backend)
    return model


def add_adapter(model: nn.Module, adapter_name: str, config: Any, backend: Optional[str] = None) -> None:
    """Add another adapter (not active, not trainable, as in PEFT); it shares the model's projections."""
    state = _require_state(model)
    backend = check_backend_name(backend) if backend is not None else _current_backend(model)
    plan = plan_patch(model, config, adapter_name)
    del state
    _apply_plan(model, plan, backend)


def _current_backend(model: nn.Module) -> str:
    return next((layer.backend for _, layer in vera_layers(model)), "auto")


def set_adapter(model: nn.Module, adapter_name: Union[str, list[str]]) -> None:
    """Make ``adapter_name`` (or a list of names) the active, trainable adapter(s)."""
    state = _require_state(model)
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    for n in names:
        _require_adapter(state, n)
    for path, wrapper in _wrappers(model):
        wrapper.check_active(names, path)
    if any(layer.merged for _, layer in vera_layers(model)):
        # PEFT's behaviour: a merged model is unmerged before the active adapter changes
        warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.")
        unmerge_adapter(model)
    state.active = names
    for _, m in list(vera_layers(model)) + list(_wrappers(model)):
        m.set_active(names)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove an adapter. A merged adapter must be unmerged first (its delta would stay in the weights unrecorded)."""
    state = _require_state(model)
    _require_adapter(state, adapter_name, "does not exist.")
    merged_in = [n for n, layer in vera_layers(model) if adapter_name in layer.merged_adapters]
    if merged_in:  # PEFT's words
        raise ValueError(f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them first.")
    for _, m in list(vera_layers(model)) + list(_wrappers(model)):
        if adapter_name in getattr(m, "vera_lambda_d", {}) or adapter_name in getattr(m, "modules_to_save", {}):
            m.delete_adapter(adapter_name)
    del state.configs[adapter_name]
    if adapter_name in state.active:
        state.active = [a for a in state.active if a != adapter_name] or list(state.configs)[:1]
        for _, m in list(vera_layers(model)) + list(_wrappers(model)):
            m.set_active(state.active)


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Inside the block the model behaves as its base model (merged adapters are unmerged, as PEFT does) and, as in
    PEFT, no adapter parameter (lambdas, modules_to_save copies) is trainable; on exit every flag is as it was."""
    state = _require_state(model)
    for name in state.active:
        bias = state.configs[name].bias
        if bias != "none":  # PEFT's words
            warnings.warn(f"Careful, disabling adapter layers with bias configured to be '{bias}' does not produce the "
                          "same output as the base model would without adaption.")
    modules = [m for _, m in list(vera_layers(model)) + list(_wrappers(model))]
    before = [m.disable_adapters for m in modules]
    params = _adapter_parameters(model)
    grad_before = [p.requires_grad for p in params]
    try:
        for m in modules:
            m.disable_adapters = True
        for p in params:
            p.requires_grad_(False)
        yield model
    finally:
        for m, flag in zip(modules, before):
            m.disable_adapters = flag
        for p, flag in zip(params, grad_before):
            p.requires_grad_(flag)


def set_backend(model: nn.Module, backend: str) -> None:
    """Switch every VeraLinear of the model to another backend ("auto", "reference", "torch", "triton")."""
    check_backend_name(backend)
    _require_state(model)
    for _, layer in vera_layers(model):
        layer.backend = backend


def set_h_sharing(model: nn.Module, enabled: bool = True, dropout_mask: str = "per-layer") -> None:
    """Whether sibling layers that read one input tensor share h = x A_s^T (on by default; see
    vera_kernels.sharing), and, with adapter dropout, whether each layer draws its own mask ("per-layer", PEFT's
    behaviour: nothing is shared) or the layers reading one input share one mask ("per-input": one h per input
    again). Results without dropout are the same either way; the reference backend never shares (bit-identity)."""
    from .sharing import DROPOUT_MASKS

    if dropout_mask not in DROPOUT_MASKS:
        raise ValueError(f"dropout_mask={dropout_mask!r}: choose one of {DROPOUT_MASKS}")
    state = _require_state(model)
    table = state.projections.shared_h
    table.clear()
    table.enabled, table.dropout_mask = bool(enabled), dropout_mask


def merge_adapter(model: nn.Module, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
    """Fold adapters (default: the active ones) into the base weights. With ``safe_merge`` every merged weight is
    checked for NaN/inf first, and nothing is merged anywhere if one is not finite."""
    state = _require_state(model)
    names = list(state.active) if adapter_names is None else list(adapter_names)
    for n in names:
        _require_adapter(state, n)
    todo = [(path, layer, layer.pending(names)) for path, layer in vera_layers(model)]
    for _, layer, pending in todo:
        if pending:
            layer._check_mergeable()
    # safe_merge: every merged weight finite before any is merged. Quantized layers are always checked: their merge
    # refuses a non-finite result, and that must happen before the first layer changes, not in the middle.
    for path, layer, pending in todo:
        if safe_merge or layer.quantized:
            _check_finite_after(path, layer, pending, 1.0, "merged", "nothing was merged")
    already = list(dict.fromkeys(n for _, layer, _ in todo for n in layer.merged_adapters))
    if already:  # PEFT's words (PEFT says it once per layer)
        more = [n for n in names if any(n in pending for _, _, pending in todo)]
        warnings.warn(f"Already following adapters were merged {','.join(already)}. You are now additionally "
                      f"merging {','.join(more)}." if more else "All adapters are already merged, nothing to do.")
    for _, layer, _ in todo:
        layer.merge(names)


def _check_finite_after(path: str, layer: VeraLinear, names: list[str], sign: float, what: str, outcome: str) -> None:
    """Raise if adding ``sign`` * the deltas of ``names`` to the layer's weight, in order, gives a non-finite weight
    (in the dtype bitsandbytes quantizes from, for a quantized layer: float16 for int8, where overflow is inf too)."""
    if not names:
        return
    dense = layer.dense_base_weight()
    w = dense.float()
    check_dtype = dense.dtype
    if layer.quantized:
        from .quant.merge import quantizer_input_dtype

        check_dtype = quantizer_input_dtype(layer.base_layer)
    for n in names:
        w = w + sign * layer.get_delta_weight(n).to(w.device)
        if not torch.isfinite(w.to(check_dtype)).all():
            raise ValueError(
                f"NaNs detected in the {what} weights. The adapter {n} seems to be broken (layer {path}); {outcome}"
            )


def unmerge_adapter(model: nn.Module) -> None:
    """Undo every merge (the base weights come back up to float rounding, as in PEFT)."""
    _require_state(model)
    pairs = [(path, layer) for path, layer in vera_layers(model) if layer.merged]
    if not pairs:
        warnings.warn("Already unmerged. Nothing to do.")
    for _, layer in pairs:
        layer._check_mergeable()
    for path, layer in pairs:  # a quantized unmerge refuses a non-finite result: find it before any layer changes
        if layer.quantized:
            _check_finite_after(path, layer, layer.merged_adapters[::-1], -1.0, "unmerged", "nothing was unmerged")
    for _, layer in pairs:
        layer.unmerge()


def unpatch_model(model: nn.Module, merge: bool = False) -> nn.Module:
    """Put plain modules back. ``merge=True`` first folds the active adapters into the weights; with
    ``merge=False`` merged adapters are unmerged first, so the base model comes back as it was. Modules in
    modules_to_save become the active adapter's trained copy (PEFT's unload). Parameters get back the
    requires_grad they had before the first patch."""
    _require_state(model)
    if merge:
        merge_adapter(model)
    elif any(layer.merged for _, layer in vera_layers(model)):
        unmerge_adapter(model)
    return _unload(model)


def merge_and_unload(model: nn.Module, progressbar: bool = False, safe_merge: bool = False,
                     adapter_names: Optional[list[str]] = None) -> nn.Module:
    """PEFT's ``merge_and_unload``: merge ``adapter_names`` (default: the active adapters) into the base weights,
    then put plain modules back, as ``unpatch_model(model, merge=True)`` does. Returns the model (patched in place,
    so the returned object is the one passed in). ``progressbar`` is accepted for PEFT's signature and shows nothing.
    """
    del progressbar
    _require_state(model)
    merge_adapter(model, adapter_names=adapter_names, safe_merge=safe_merge)
    return _unload(model)


def _unload(model: nn.Module) -> nn.Module:
    """Put plain modules back, merges kept as they are. Nothing here can fail."""
    state = _require_state(model)
    layers = list(vera_layers(model))
    for path, layer in layers:
        _set_submodule(model, path, layer.base_layer)
        if layer.quantized:  # merged for good: free the pre-merge tensors kept for an exact unmerge
            from .quant.merge import release_original

            release_original(layer.base_layer)
    for path, wrapper in list(_wrappers(model)):
        _set_submodule(model, path, wrapper.current())
    for name, p in model.named_parameters():  # module paths are the original ones again
        if name in state.original_requires_grad:
            p.requires_grad_(state.original_requires_grad[name])
    _detach(model)
    delattr(model, STATE_ATTR)
    return model


def get_nb_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters), counted as PEFT's ``PeftModel.get_nb_trainable_parameters`` does
    (a bitsandbytes 4-bit weight counts 2 values per stored byte; the shared projections are buffers, not counted)."""
    trainable = total = 0
    for _, p in model.named_parameters():
        n = p.numel()
        if n == 0 and hasattr(p, "ds_numel"):  # DeepSpeed ZeRO-3 keeps empty placeholders
            n = p.ds_numel
        if p.__class__.__name__ == "Params4bit":  # two 4-bit values per byte of its storage dtype
            n *= 2 * p.element_size()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """PEFT's ``print_trainable_parameters``, same line."""
    trainable, total = get_nb_trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


def adapter_names(model: nn.Module) -> list[str]:
    return list(_require_state(model).configs)


def active_adapters(model: nn.Module) -> list[str]:
    return list(_require_state(model).active)


def get_adapter_config(model: nn.Module, adapter_name: str = "default") -> VeraConfig:
    state = _require_state(model)
    _require_adapter(state, adapter_name)
    return state.configs[adapter_name].copy()


def iter_adapter_targets(model: nn.Module, adapter_name: str) -> Iterable[tuple[str, VeraLinear]]:
    return ((p, layer) for p, layer in vera_layers(model) if adapter_name in layer.vera_lambda_d)
