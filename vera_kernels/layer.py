"""VeraLinear: the module that replaces a targeted layer; parameter names map one to one onto PEFT's.

Inside a patched model a targeted ``<path>`` becomes a VeraLinear whose
    ``<path>.base_layer.weight`` / ``.bias``      is the original layer (PEFT's names too),
    ``<path>.vera_lambda_b.<adapter>`` (out,)     and ``<path>.vera_lambda_d.<adapter>`` (r,) are the trainable vectors,
    ``<path>.vera_projections``                   is the model's one shared (A, B) holder (non-persistent buffers).
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from ._dtypes import COMPUTE_DTYPES, PARAM_DTYPE, float32_preserving
from .backends import check_backend_name, resolve_backend
from .ops import vera_add_delta, vera_linear_prechecked
from .projections import VeraProjections
from .targeting import in_out_features


class Float32ParameterDict(nn.ParameterDict):
    """A ParameterDict whose float32 parameters stay float32 under ``.to(dtype)``/``.half()`` (device moves apply)."""

    def _apply(self, fn, recurse=True):
        return super()._apply(float32_preserving(fn), recurse)


class VeraLinear(nn.Module):
    """A linear layer (nn.Linear, transformers' Conv1D, or a bitsandbytes 4/8-bit linear) with VeRA adapters."""

    def __init__(self, base_layer: nn.Module, base_kind: str, projections: VeraProjections, backend: str = "auto"):
        super().__init__()
        self.base_layer = base_layer
        self.base_kind = base_kind
        self.in_features, self.out_features = in_out_features(base_layer, base_kind)
        self.fan_in_fan_out = base_kind == "conv1d"
        self.vera_projections = projections
        self.vera_lambda_b = Float32ParameterDict()
        self.vera_lambda_d = Float32ParameterDict()
        self.r: dict[str, int] = {}
        self.vera_dropout: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self.backend = check_backend_name(backend)

    # ------------------------------------------------------------------ adapters
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def add_adapter(self, name: str, r: int, vera_dropout: float, init_weights: bool, d_initial: float) -> None:
        """New lambdas for ``name``, float32 on the base weight's device, initialised as PEFT does.

        PEFT draws ``torch.randn(r)`` for lambda_d on every layer (then overwrites it when init_weights=True); we
        draw it too, so the global RNG stream, and lambda_d with init_weights=False, match PEFT's exactly.
        """
        self.vera_projections.check_fits(self.in_features, self.out_features, r)
        lambda_b = torch.ones(self.out_features, dtype=PARAM_DTYPE)
        lambda_d = torch.randn(r, dtype=PARAM_DTYPE)
        if init_weights:
            lambda_b.zero_()
            lambda_d.fill_(d_initial)
        device = self._param_device()
        self.vera_lambda_b[name] = nn.Parameter(lambda_b.to(device), requires_grad=False)
        self.vera_lambda_d[name] = nn.Parameter(lambda_d.to(device), requires_grad=False)
        self.r[name] = r
        self.vera_dropout[name] = float(vera_dropout)

    def delete_adapter(self, name: str) -> None:
        del self.vera_lambda_b[name]
        del self.vera_lambda_d[name]
        del self.r[name]
        del self.vera_dropout[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active(self, names: Iterable[str]) -> None:
        self.active_adapters = [n for n in names if n in self.vera_lambda_d]
        for n in self.vera_lambda_d:
            trainable = n in self.active_adapters
            self.vera_lambda_b[n].requires_grad_(trainable)
            self.vera_lambda_d[n].requires_grad_(trainable)

    def _param_device(self) -> torch.device:
        for p in self.base_layer.parameters():
            if p.device.type != "meta":
                return p.device
        return torch.device("cpu")

    # ------------------------------------------------------------------ merging
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """diag(lambda_b) B_s diag(lambda_d) A_s in float32, (out, in) or (in, out) for Conv1D: PEFT's formula."""
        lambda_d = self.vera_lambda_d[adapter].float()
        lambda_b = self.vera_lambda_b[adapter].float()
        A_s = self.vera_projections.vera_A[:, : self.in_features].to(lambda_d.device)
        B_s = self.vera_projections.vera_B[: self.out_features, :].to(lambda_d.device)
        delta = (lambda_b.unsqueeze(-1) * B_s) @ (lambda_d.unsqueeze(-1) * A_s)
        return delta.t() if self.fan_in_fan_out else delta

    @property
    def quantized(self) -> bool:
        return self.base_kind in ("bnb4bit", "bnb8bit")

    def _check_mergeable(self) -> None:
        """Raise (before anything changes) when the base weight cannot take a merge."""
        if self.quantized:
            from .quant.merge import check_mergeable

            check_mergeable(self.base_layer)

    def dense_base_weight(self) -> torch.Tensor:
        """The base weight as a dense tensor in the layer's (Linear or Conv1D) layout; dequantized for bnb bases."""
        if self.quantized:
            from .quant.dequant import dequantize_weight

            return dequantize_weight(self.base_layer, torch.float32)
        return self.base_layer.weight.detach()

    def _add_delta(self, name: str, sign: float) -> None:
        delta = self.get_delta_weight(name)
        if self.quantized:  # dequantize, add, requantize with bitsandbytes' own quantizer and the layer's settings
            from .quant.merge import add_to_quantized_weight_

            add_to_quantized_weight_(self.base_layer, delta, alpha=sign)
            return
        weight = self.base_layer.weight
        with torch.no_grad():
            weight.add_(delta.to(weight.device), alpha=sign)

    def pending(self, adapter_names: Iterable[str]) -> list[str]:
        """Those of ``adapter_names`` this layer has and has not merged yet: what a merge of them would add."""
        return [n for n in adapter_names if n in self.vera_lambda_d and n not in self.merged_adapters]

    def merge(self, adapter_names: Iterable[str]) -> None:
        todo = self.pending(adapter_names)
        if todo:
            self._check_mergeable()
        for name in todo:
            self._add_delta(name, 1.0)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if self.merged_adapters:
            self._check_mergeable()
        while self.merged_adapters:
            self._add_delta(self.merged_adapters[-1], -1.0)
            self.merged_adapters.pop()  # only once the weight no longer holds it: a failed step keeps the record

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"vera_kernels: the input's last dimension is {x.shape[-1]} but this layer expects "
                f"in_features={self.in_features} (input shape {tuple(x.shape)})"
            )
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self._base_forward(x, *args, **kwargs)
        if self.merged:
            return self._base_forward(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.vera_lambda_d]
        if not active:
            return self._base_forward(x, *args, **kwargs)

        backend = resolve_backend(self.backend, x.device)
        # the fused backends compute in the activation dtype: cached casts of the float32 projections
        dtype = x.dtype if backend != "reference" and x.dtype in COMPUTE_DTYPES else PARAM_DTYPE
        fused_base = self.base_kind in ("linear", "conv1d") and backend != "reference" and not args and not kwargs
        if fused_base:
            first, rest = active[0], active[1:]
            base = self.base_layer
            A_s, B_s = self.vera_projections.slices_for_compute(dtype, self.in_features, self.out_features)
            y = vera_linear_prechecked(
                x, base.weight, base.bias, A_s, B_s, self.vera_lambda_d[first], self.vera_lambda_b[first],
                self.vera_dropout[first], self.training, self.fan_in_fan_out, backend,
            )
        else:
            y, rest = self._base_forward(x, *args, **kwargs), active
        if rest:
            vera_A, vera_B = self.vera_projections.for_compute(dtype)
        for name in rest:
            y = vera_add_delta(
                y, x, vera_A, vera_B, self.vera_lambda_d[name], self.vera_lambda_b[name],
                dropout_p=self.vera_dropout[name], training=self.training, backend=backend,
            )
        return y

    def _base_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The base layer alone: bitsandbytes' forward for a quantized base, or dequantize-then-matmul where
        bitsandbytes has no kernel for the device (merged, disabled or adapter-free calls included)."""
        if self.quantized:
            from .quant.base import quantized_base_forward

            return quantized_base_forward(self.base_layer, x, *args, **kwargs)
        return self.base_layer(x, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, adapters={list(self.r)}, "
            f"active={self.active_adapters}, backend={self.backend!r}"
        )


class ModulesToSave(nn.Module):
    """A module trained in full next to the adapters (``modules_to_save``), PEFT's ModulesToSaveWrapper layout.

    ``<path>.original_module`` is the frozen original; ``<path>.modules_to_save.<adapter>`` a trainable copy per
    adapter. The active adapter's copy runs, or the original when adapters are disabled or none is active.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: Optional[str] = None
        self.disable_adapters = False

    def add_adapter(self, name: str) -> None:
        import copy

        clone = copy.deepcopy(self.original_module)
        clone.requires_grad_(False)
        self.modules_to_save[name] = clone

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def check_active(self, names: Iterable[str], path: str = "") -> None:
        """Raise if more than one of ``names`` has a copy here: which copy should run? (PEFT raises too.)"""
        mine = [n for n in names if n in self.modules_to_save]
        if len(mine) > 1:  # PEFT's words, naming the module by its path instead of its repr
            raise ValueError(
                f"Only one adapter can be set at a time for modules_to_save module '{path}', got {len(mine)}: {mine} "
                "all have a copy of it"
            )

    def set_active(self, names: Iterable[str]) -> None:
        names = [n for n in names if n in self.modules_to_save]
        self.active_adapter = names[0] if names else None
        for n, m in self.modules_to_save.items():
            m.requires_grad_(n == self.active_adapter)

    def current(self) -> nn.Module:
        if self.disable_adapters or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)
