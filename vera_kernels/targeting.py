"""Which modules a VeRA config adapts: PEFT's matching rules, its per-architecture defaults, and layer kinds."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional

from torch import nn

from .config import VeraConfig

# PEFT's TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING (peft 0.21): the LoRA table with phi narrowed.
DEFAULT_TARGET_MODULES: dict[str, list[str] | str] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}

ALL_LINEAR = "all-linear"


# ---------------------------------------------------------------------------------------------- layer kinds
def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, Conv1D)


def layer_kind(module: nn.Module) -> Optional[str]:
    """"linear", "conv1d", "bnb4bit", "bnb8bit", or None for a layer VeRA cannot adapt."""
    cls = type(module)
    if cls.__module__.startswith("bitsandbytes"):
        if cls.__name__ in ("Linear4bit", "LinearNF4", "LinearFP4"):
            return "bnb4bit"
        if cls.__name__ == "Linear8bitLt":
            return "bnb8bit"
        return None
    if isinstance(module, nn.Linear):
        return "linear"
    if _is_conv1d(module):
        return "conv1d"
    return None


def in_out_features(module: nn.Module, kind: str) -> tuple[int, int]:
    if kind == "conv1d":
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


# ---------------------------------------------------------------------------------------------- matching
def resolve_target_modules(model: nn.Module, config: VeraConfig, vera_linear_cls: Optional[type] = None,
                           wrapper_cls: Optional[type] = None) -> list[str] | str:
    """target_modules as given, the per-architecture default when None, or every linear layer for "all-linear".

    On a patched model "all-linear" counts an adapted layer (``vera_linear_cls``) as the linear layer it wraps, and
    nothing inside one or inside a modules_to_save wrapper (``wrapper_cls``) as a layer of the model (PEFT's rule).
    """
    tm = config.target_modules
    if tm is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGET_MODULES:
            raise ValueError(
                "target_modules is None and there is no default for this model "
                f"(model_type={model_type!r}); please specify target_modules in the config."
            )
        return DEFAULT_TARGET_MODULES[model_type]
    if isinstance(tm, str) and tm.lower() == ALL_LINEAR:
        return sorted(_all_linear_names(model, config, vera_linear_cls, wrapper_cls))
    return tm


# PEFT's SEQ_CLS_HEAD_NAMES, in its order: the attribute "all-linear" leaves out on a classification model
SEQ_CLS_HEAD_NAMES = ("score", "classifier")


def _all_linear_names(model: nn.Module, config: VeraConfig, vera_linear_cls: Optional[type],
                      wrapper_cls: Optional[type]) -> set[str]:
    """PEFT's _maybe_include_all_linear_layers: every linear layer except the output embeddings (or, on a SEQ_CLS
    model without them, the classification head)."""
    adapter_classes = tuple(c for c in (vera_linear_cls, wrapper_cls) if c is not None)
    names: set[str] = set()
    inside: list[str] = []
    for n, m in model.named_modules():
        if not n or any(n.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, adapter_classes):
            inside.append(n)
        if layer_kind(m) is not None or (vera_linear_cls is not None and isinstance(m, vera_linear_cls)):
            names.add(n)
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    exclude = out_emb
    if out_emb is None and config.task_type == "SEQ_CLS":
        exclude = next((getattr(model, h) for h in SEQ_CLS_HEAD_NAMES if getattr(model, h, None) is not None), None)
    if exclude is not None:
        names -= {n for n, m in model.named_modules() if m is exclude}
    return names


def _layer_index(key: str, layers_pattern) -> Optional[int]:
    if not layers_pattern:
        # The first numbered segment: "model.layers.3.mlp" -> 3 (not an expert index further down).
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def is_module_to_save(key: str, modules_to_save: Optional[Iterable[str]]) -> bool:
    return bool(modules_to_save) and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in modules_to_save)


def matches_target(key: str, target_modules: list[str] | str, config: VeraConfig) -> bool:
    """PEFT's check_target_module_exists for VeRA configs."""
    if is_module_to_save(key, config.modules_to_save):
        return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, key) is not None
    if key in target_modules:
        return True
    if not any(key.endswith(f".{t}") for t in target_modules):
        return False
    ltt = config.layers_to_transform
    if ltt is None or (isinstance(ltt, list) and len(ltt) == 0):
        return True
    idx = _layer_index(key, config.layers_pattern)
    if idx is None:
        return False
    return idx == ltt if isinstance(ltt, int) else idx in ltt


@dataclass
class Target:
    name: str
    module: nn.Module  # the base layer (inside an existing VeraLinear when re-targeted)
    kind: str
    in_features: int
    out_features: int
    existing: Optional[nn.Module] = None  # the VeraLinear already wrapping it, if any


def find_targets(model: nn.Module, config: VeraConfig, vera_linear_cls: type, wrapper_cls: type) -> list[Target]:
    """Every module the config targets, in ``named_modules`` order; raises before anything is changed.

    Modules inside a VeraLinear (its base_layer, the shared projections) or inside a modules_to_save wrapper
    (``wrapper_cls``: the original and the trained copies) are never targets themselves: a target name that resolves
    to a VeraLinear adds the adapter to it.
    """
    target_modules = resolve_target_modules(model, config, vera_linear_cls, wrapper_cls)
    inside: list[str] = []
    targets: list[Target] = []
    unsupported: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, (vera_linear_cls, wrapper_cls)):
            inside.append(name)
        if not name or not matches_target(name, target_modules, config):
            continue
        if isinstance(module, vera_linear_cls):
            base = module.base_layer
            targets.append(Target(name, base, module.base_kind, module.in_features, module.out_features, module))
            continue
        kind = layer_kind(module)
        if kind is None:
            unsupported.append(f"{name} ({type(module).__name__})")
            continue
        fin, fout = in_out_features(module, kind)
        targets.append(Target(name, module, kind, fin, fout))
    if unsupported:
        raise TypeError(
            "VeRA can only adapt torch.nn.Linear, transformers' Conv1D and bitsandbytes' Linear4bit/Linear8bitLt; "
            f"target_modules={target_modules!r} also matches unsupported modules: {', '.join(unsupported[:8])}"
            + (" ..." if len(unsupported) > 8 else "")
        )
    if not targets:
        where = "".join(f", {k}={getattr(config, k)!r}" for k in ("layers_to_transform", "layers_pattern")
                        if getattr(config, k) is not None)
        raise ValueError(  # PEFT's first sentence, then what matched nothing
            "No layers types compatible with VeRA were found. Please check `peft_config.target_modules`. "
            f"(target_modules={target_modules!r}{where} matches no linear layer of the model; compare it with "
            "model.named_modules().)"
        )
    return targets
