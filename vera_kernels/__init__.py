"""vera_kernels: fused kernels for VeRA fine-tuning of HuggingFace models, exactly compatible with PEFT.

    import vera_kernels as vk
    model = vk.patch_model(model, vk.VeraConfig(r=256, target_modules=["q_proj", "v_proj"]))

Importing this package imports neither triton nor bitsandbytes and queries no GPU.
"""

from . import ops
from .backends import BACKEND_CHOICES, BACKENDS
from .checkpoint import get_vera_state_dict, load_adapter, read_adapter, save_adapter
from .config import VeraConfig
from .layer import ModulesToSave, VeraLinear
from .mixed import adapter_batch
from .model import (
    active_adapters,
    adapter_names,
    add_adapter,
    delete_adapter,
    disable_adapter,
    get_adapter_config,
    get_nb_trainable_parameters,
    merge_adapter,
    merge_and_unload,
    patch_model,
    print_trainable_parameters,
    set_adapter,
    set_backend,
    set_h_sharing,
    unmerge_adapter,
    unpatch_model,
)
from .projections import VeraProjections, init_projections

__version__ = "0.1.0"

__all__ = [
    "VeraConfig",
    "VeraLinear",
    "ModulesToSave",
    "VeraProjections",
    "init_projections",
    "ops",
    "patch_model",
    "unpatch_model",
    "add_adapter",
    "set_adapter",
    "delete_adapter",
    "disable_adapter",
    "adapter_batch",
    "merge_adapter",
    "unmerge_adapter",
    "merge_and_unload",
    "print_trainable_parameters",
    "get_nb_trainable_parameters",
    "set_backend",
    "set_h_sharing",
    "adapter_names",
    "active_adapters",
    "get_adapter_config",
    "get_vera_state_dict",
    "save_adapter",
    "load_adapter",
    "read_adapter",
    "BACKENDS",
    "BACKEND_CHOICES",
]
