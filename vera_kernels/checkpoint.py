"""PEFT-format VeRA checkpoints: adapter_config.json + adapter_model.safetensors, written and read both ways.

Keys (PEFT's ``save_pretrained`` layout, adapter name removed):
    base_model.model.<module path>.vera_lambda_b / .vera_lambda_d      every adapted layer
    base_model.vera_A / base_model.vera_B                             when save_projection=True
    base_model.model.<param name>                                     biases (bias="all" / "vera_only")
    base_model.model.<module path>.<state key>                        modules_to_save copies
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
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


# ---------------------------------------------------------------------------------------------- wrappers, gathering
# Module names that wrappers insert into parameter paths: FSDP1 units, activation checkpointing, torch.compile.
_WRAPPER_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The patched model inside DDP / DataParallel, FSDP1, torch.compile and checkpoint wrappers (FSDP2's
    ``fully_shard`` keeps the model object itself)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        inner = next((model._modules[k] for k in _WRAPPER_PARTS if k in model._modules), None)
        if inner is None:
            return model
        model = inner


def clean_name(name: str) -> str:
    """A parameter or module path without the components wrappers insert (``_fsdp_wrapped_module.`` ...)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@contextlib.contextmanager
def unsharded(model: nn.Module, writeback: bool = False):
    """Inside, FSDP1 units hold their full parameters (outside, each rank's views cover only its part of the flat
    shard: empty or cut lambdas). A collective: every rank must enter it. FSDP2 (DTensor) parameters are gathered one
    by one by ``_full`` instead; without FSDP1 this does nothing."""
    dist = torch.distributed
    roots: list[nn.Module] = []
    if dist.is_available() and dist.is_initialized():
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        roots = FSDP.fsdp_modules(model, root_only=True)
    with contextlib.ExitStack() as stack:
        for fsdp_root in roots:
            stack.enter_context(FSDP.summon_full_params(fsdp_root, writeback=writeback, rank0_only=False))
        yield


def _is_dtensor(t: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an FSDP2 / DTensor parameter is all-gathered (collective), any other comes back as is."""
    return t.full_tensor() if _is_dtensor(t) else t


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


def _tensor_at(root: nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer at a wrapper-free path (wrappers forward attribute access to what they wrap)."""
    obj: Any = root
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _saved_names(root: nn.Module, state, adapter_name: str) -> dict[str, str]:
    """PEFT checkpoint key -> wrapper-free name of the tensor in the patched model, for one adapter (vera_A/vera_B
    apart: they are not per-layer)."""
    cfg = state.configs[adapter_name]
    names: dict[str, str] = {}
    for path, layer in vera_layers(root):
        if adapter_name in layer.vera_lambda_d:
            path = clean_name(path)
            names[f"{PREFIX}{path}.vera_lambda_b"] = f"{path}.vera_lambda_b.{adapter_name}"
            names[f"{PREFIX}{path}.vera_lambda_d"] = f"{path}.vera_lambda_d.{adapter_name}"
    for name in _bias_param_names(root, cfg.bias):
        names[PREFIX + clean_name(name)] = clean_name(name)
    for path, wrapper in _wrappers(root):
        if adapter_name in wrapper.modules_to_save:
            path = clean_name(path)
            for k in wrapper.modules_to_save[adapter_name].state_dict():
                k = clean_name(k)
                names[f"{PREFIX}{path}.{k}"] = f"{path}.modules_to_save.{adapter_name}.{k}"
    return names


def _check_saved_shapes(root: nn.Module, state, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Every lambda as the layer needs it (lambda_b: out_features, lambda_d: r), no empty tensor, else an error: a
    wrong tensor in a checkpoint (a shard of a parameter, say) loses the training without a word."""
    r = state.configs[adapter_name].r
    wanted: dict[str, tuple[int, ...]] = {}
    for path, layer in vera_layers(root):
        if adapter_name in layer.vera_lambda_d:
            path = clean_name(path)
            wanted[f"{PREFIX}{path}.vera_lambda_b"] = (layer.out_features,)
            wanted[f"{PREFIX}{path}.vera_lambda_d"] = (r,)
    problems = [f"{k} has shape {tuple(tensors[k].shape)}, the layer needs {shape}"
                for k, shape in wanted.items() if tuple(tensors[k].shape) != shape]
    problems += [f"{k} is empty (shape {tuple(v.shape)})" for k, v in tensors.items() if k not in wanted and not v.numel()]
    if problems:
        raise ValueError(
            f"refusing to save adapter {adapter_name!r}: {len(problems)} tensor(s) do not fit the model, e.g. "
            f"{problems[:3]}. Under FSDP, pass the FSDP-wrapped model and call this on every rank (the parameters "
            "are gathered); nothing was written."
        )


def _config_to_save(root: nn.Module, state, adapter_name: str) -> dict[str, Any]:
    cfg = state.configs[adapter_name].to_dict()
    cfg["base_model_name_or_path"] = getattr(getattr(root, "config", None), "_name_or_path", None) or None
    return cfg


def _staged_path(path: str) -> str:
    """A temporary name next to ``path`` (same folder, hence same file system: the rename is atomic)."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_adapter_files(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Write a PEFT checkpoint atomically: both files go to temporary names in ``directory`` first (flushed to
    disk), then replace the old files by rename. A failure before the renames (a full disk, a crash) leaves the
    old checkpoint as it was and no temporary file behind."""
    from safetensors.torch import save_file

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    targets = [os.path.join(directory, SAFETENSORS_NAME), os.path.join(directory, CONFIG_NAME)]
    staged = [_staged_path(t) for t in targets]
    try:
        save_file(tensors, staged[0], metadata={"format": "pt"})
        with open(staged[1], "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        for path in staged:
            _fsync(path)
        for path, target in zip(staged, targets):
            os.replace(path, target)
    finally:
        for path in staged:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def get_vera_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The dict PEFT's ``save_pretrained`` writes for this adapter (full CPU copies; the model is not touched).

    ``model`` may be wrapped (DDP, FSDP1, FSDP2, torch.compile, activation checkpointing): names carry no wrapper
    prefix and sharded parameters are gathered, which under FSDP is collective (call it on every rank). Every tensor
    is checked against the layer it belongs to; a lambda of the wrong shape is an error, never a returned value."""
    root = unwrap_model(model)
    state = _require_state(root)
    _require_adapter(state, adapter_name)
    with unsharded(model):  # copies taken inside: on leaving, FSDP1 points the parameters back at their shards
        tensors = {key: _cpu_copy(_full(_tensor_at(root, name)))
                   for key, name in _saved_names(root, state, adapter_name).items()}
    if state.configs[adapter_name].save_projection:
        tensors[KEY_A] = _cpu_copy(state.projections.vera_A)
        tensors[KEY_B] = _cpu_copy(state.projections.vera_B)
    _check_saved_shapes(root, state, adapter_name, tensors)
    return tensors


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                 is_main_process: Optional[bool] = None) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` as PEFT's ``save_pretrained`` does.

    Accepts the model inside its training wrappers, as ``get_vera_state_dict`` does (under FSDP every rank must call
    it: the lambdas are gathered). Only the main process writes: by default rank 0 when torch.distributed is
    initialized, else this process. Both files are written to temporary files in ``directory`` and then renamed over
    the old ones, so a failed or interrupted save leaves the previous checkpoint as it was."""
    root = unwrap_model(model)
    state = _require_state(root)
    _require_adapter(state, adapter_name)
    tensors = get_vera_state_dict(model, adapter_name)
    if is_main_process is None:
        is_main_process = _rank() == 0
    if is_main_process:
        write_adapter_files(directory, tensors, _config_to_save(root, state, adapter_name))


def read_adapter(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config dict, tensors) of a PEFT VeRA checkpoint; clear errors when it is not one."""
    cfg_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!s}: not a PEFT adapter checkpoint")
    cfg = _read_config_file(cfg_path)
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "VERA":
        raise ValueError(f"{directory!s} is not a VeRA checkpoint: its peft_type is {cfg.get('peft_type')!r}")
    _check_config_fields(cfg, cfg_path)
    st_path = os.path.join(directory, SAFETENSORS_NAME)
    bin_path = os.path.join(directory, BIN_NAME)
    if os.path.isfile(st_path):
        tensors = _read_tensor_file(st_path)
    elif os.path.isfile(bin_path):
        tensors = _read_tensor_file(bin_path)
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
    try:
        plan = plan_patch(model, cfg_dict, adapter_name, projections_override=override, from_checkpoint=True)
    except ValueError as e:  # the checkpoint's config against this model: say which checkpoint
        raise ValueError(f"cannot load the checkpoint in {directory!s}: {e}") from e
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


# ---------------------------------------------------------------------------------------------- reading, validated
# Without these a checkpoint cannot be rebuilt as it was trained (PEFT falls back to defaults: r=256, key 0).
REQUIRED_CONFIG_FIELDS = ("r", "target_modules", "projection_prng_key")


def _read_config_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): the file is corrupt or was cut off") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} holds a JSON {type(cfg).__name__}, not the object of an adapter configuration")
    return cfg


def _check_config_fields(cfg: dict[str, Any], path: str) -> None:
    missing = [k for k in REQUIRED_CONFIG_FIELDS if k not in cfg]
    if missing:
        raise ValueError(f"{path} lacks the field(s) {missing}: the adapter cannot be rebuilt as it was trained")


def _read_tensor_file(path: str) -> dict[str, torch.Tensor]:
    """The tensors of an adapter_model.safetensors (or .bin), every one read in full: a truncated or corrupt file
    is an error naming the file, whatever part of it is damaged."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            tensors = load_file(path)
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors' and pickle's errors have no common base class
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e}): the file is truncated or corrupt") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise ValueError(f"{path} does not hold a dict of tensors")
    return tensors


# ---------------------------------------------------------------------------------------------- restoring in place
# Config fields that decide which tensors an adapter has and what they mean: a checkpoint restored into an existing
# adapter must agree on all of them.
_LAYOUT_FIELDS = ("r", "target_modules", "projection_prng_key", "save_projection", "bias", "modules_to_save",
                  "layers_to_transform", "layers_pattern")


def _copy_full_(dst: torch.Tensor, src: torch.Tensor) -> None:
    if _is_dtensor(dst):  # FSDP2: scatter the full value into this rank's shard (collective)
        from torch.distributed.tensor import distribute_tensor

        src = distribute_tensor(src.to(dst.device, dst.dtype), dst.device_mesh, dst.placements)
    dst.copy_(src)


def restore_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> None:
    """Copy a checkpoint of ``adapter_name`` into the model's existing adapter in place: the parameters stay the same
    objects (an optimizer holding them goes on), which is what resuming a training needs. The checkpoint must be of
    this very adapter (same r, targets, projections, bias and modules_to_save); everything is checked before any
    tensor changes. Accepts wrapped models as ``get_vera_state_dict`` does (under FSDP, call on every rank)."""
    from .config import VeraConfig

    root = unwrap_model(model)
    state = _require_state(root)
    _require_adapter(state, adapter_name)
    cfg_dict, tensors = read_adapter(directory)
    ours, theirs = state.configs[adapter_name], VeraConfig.from_any(cfg_dict)
    differ = [f"{f}: checkpoint {getattr(theirs, f)!r} vs model {getattr(ours, f)!r}"
              for f in _LAYOUT_FIELDS if getattr(theirs, f) != getattr(ours, f)]
    if differ:
        raise ValueError(f"the checkpoint in {directory!s} is not one of adapter {adapter_name!r}: {differ}")
    if ours.save_projection:
        A, B = tensors.get(KEY_A), tensors.get(KEY_B)
        P = state.projections
        if A is None or B is None or A.shape != P.vera_A.shape or B.shape != P.vera_B.shape or not (
                torch.equal(A.float(), P.vera_A.cpu()) and torch.equal(B.float(), P.vera_B.cpu())):
            raise ValueError(f"the checkpoint in {directory!s} was trained on other projections vera_A/vera_B than "
                             f"the ones adapter {adapter_name!r} uses")
    names = _saved_names(root, state, adapter_name)
    given = {k: v for k, v in tensors.items() if k not in (KEY_A, KEY_B)}
    missing, unexpected = sorted(set(names) - set(given)), sorted(set(given) - set(names))
    if missing or unexpected:
        raise ValueError(f"the checkpoint in {directory!s} does not fit adapter {adapter_name!r}: missing "
                         f"{missing[:3]} ({len(missing)}), unexpected {unexpected[:3]} ({len(unexpected)})")
    with unsharded(model, writeback=True), torch.no_grad():
        targets = {k: _tensor_at(root, n) for k, n in names.items()}
        wrong = [f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(t.shape)}"
                 for k, t in targets.items() if tuple(given[k].shape) != tuple(t.shape)]
        if wrong:
            raise ValueError(f"the checkpoint in {directory!s} does not fit this model: shape mismatch {wrong[:3]}")
        for k, t in targets.items():
            _copy_full_(t, given[k])
