"""VeraConfig: PEFT's VeRA configuration fields and defaults, and conversion from/to PEFT's config and JSON."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Union

BIAS_MODES = ("none", "all", "vera_only")

# PEFT's TaskType values (peft.utils.peft_types.TaskType).
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# The heads PEFT's PeftModelFor<Task> classes append to modules_to_save (whatever the model has), so that they are
# trained and saved with the adapter (peft_model.py, 0.21).
TASK_HEAD_MODULES: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}

# Keys PEFT writes into adapter_config.json besides the VeRA fields; we write them too so PEFT reads our files.
_PEFT_COMMON_KEYS = {
    "peft_type": "VERA",
    "base_model_name_or_path": None,
    "revision": None,
    "inference_mode": True,
}
# Every other key PeftConfig itself has: known, not VeRA fields, not warned about when read.
_PEFT_OTHER_KEYS = ("auto_mapping", "peft_version")


@dataclass
class VeraConfig:
    """The configuration of a VeRA adapter: the same fields, defaults and meaning as ``peft.VeraConfig``.

    ``patch_model`` also accepts a ``peft.VeraConfig`` (or a dict as found in ``adapter_config.json``) as is.
    """

    r: int = 256
    target_modules: Optional[Union[list[str], str]] = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    task_type: Optional[str] = None

    def __post_init__(self) -> None:
        self.task_type = getattr(self.task_type, "value", self.task_type)  # peft.TaskType -> its string
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError naming the first field that is wrong. Called again by every entry point that uses it."""
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"VeraConfig.r must be a positive integer, got {self.r!r}")
        if not isinstance(self.vera_dropout, (int, float)) or not (0.0 <= float(self.vera_dropout) < 1.0):
            raise ValueError(f"VeraConfig.vera_dropout must be in [0, 1), got {self.vera_dropout!r}")
        if not isinstance(self.d_initial, (int, float)) or not math.isfinite(float(self.d_initial)):
            raise ValueError(f"VeraConfig.d_initial must be a finite number, got {self.d_initial!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"VeraConfig.bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if isinstance(self.projection_prng_key, bool) or not isinstance(self.projection_prng_key, int):
            raise ValueError(f"VeraConfig.projection_prng_key must be an int, got {self.projection_prng_key!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
        if self.layers_to_transform is not None:
            ltt = self.layers_to_transform
            items = [ltt] if isinstance(ltt, int) else ltt
            if not isinstance(items, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in items
            ):
                raise ValueError(f"VeraConfig.layers_to_transform must be an int or a list of ints, got {ltt!r}")
        tm = self.target_modules
        if tm is not None and not isinstance(tm, str):
            if not isinstance(tm, (list, tuple, set)) or not all(isinstance(t, str) for t in tm):
                raise ValueError(f"VeraConfig.target_modules must be a list of names or a regex string, got {tm!r}")
            if len(tm) == 0:
                raise ValueError("VeraConfig.target_modules is an empty list: no module would be adapted")
        if self.modules_to_save is not None and not all(isinstance(m, str) for m in self.modules_to_save):
            raise ValueError(f"VeraConfig.modules_to_save must be a list of names, got {self.modules_to_save!r}")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(  # PEFT's words
                f"Invalid task type: '{self.task_type}'. Must be one of the following task types: "
                f"{', '.join(TASK_TYPES)}."
            )

    def task_heads(self) -> tuple[str, ...]:
        """The modules_to_save entries PEFT adds for this config's task_type (none for most task types)."""
        return TASK_HEAD_MODULES.get(self.task_type, ())

    # ------------------------------------------------------------------ conversion
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_any(cls, config: Any) -> "VeraConfig":
        """A fresh VeraConfig from ours, ``peft.VeraConfig`` (read by field name) or an adapter_config.json dict.

        Always returns a new object: the caller's config is never mutated.
        """
        if isinstance(config, dict):
            peft_type = config.get("peft_type", "VERA")
            if str(peft_type).upper() != "VERA":
                raise ValueError(f"not a VeRA configuration: peft_type is {peft_type!r}")
            values = {k: config[k] for k in cls.field_names() if k in config}
            unknown = sorted(set(config) - set(cls.field_names()) - set(_PEFT_COMMON_KEYS) - set(_PEFT_OTHER_KEYS))
            if unknown:
                warnings.warn(  # PEFT's words (PeftConfig.from_peft_type)
                    f"Unexpected keyword arguments {unknown} for class VeraConfig, these are ignored. This probably "
                    "means that you're loading a configuration file that was saved using a higher version of the "
                    "library and additional parameters have been introduced since. It is highly recommended to "
                    "upgrade the PEFT version before continuing (e.g. by running `pip install -U peft`)."
                )
        else:
            peft_type = getattr(config, "peft_type", None)
            if peft_type is not None and str(getattr(peft_type, "value", peft_type)).upper() != "VERA":
                raise ValueError(f"not a VeRA configuration: peft_type is {peft_type!r}")
            missing = [k for k in ("r", "target_modules", "projection_prng_key") if not hasattr(config, k)]
            if missing:
                raise TypeError(
                    f"expected a vera_kernels.VeraConfig, a peft.VeraConfig or a dict, got {type(config).__name__} "
                    f"(missing fields {missing})"
                )
            values = {k: getattr(config, k) for k in cls.field_names() if hasattr(config, k)}
        values = {k: (list(v) if isinstance(v, (set, tuple)) else v) for k, v in values.items()}
        if isinstance(values.get("target_modules"), list):
            values["target_modules"] = sorted(values["target_modules"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The adapter_config.json dict, in PEFT's format (``peft_type: "VERA"`` and PEFT's common keys)."""
        out = dict(_PEFT_COMMON_KEYS)
        for k in self.field_names():
            v = getattr(self, k)
            out[k] = list(v) if isinstance(v, (set, tuple)) else v
        return out

    def copy(self, **changes) -> "VeraConfig":
        return dataclasses.replace(self, **changes)


def adapter_name_check(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"adapter_name must be a non-empty string, got {name!r}")
    if "." in name:
        raise ValueError(f"adapter_name must not contain '.', got {name!r} (it becomes part of parameter names)")
    return name


__all__ = ["VeraConfig", "BIAS_MODES", "TASK_TYPES", "TASK_HEAD_MODULES", "adapter_name_check"]
