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
from torch.nn.modules import module as _nn_module

from ._dtypes import PARAM_DTYPE, autocast_dtype, branch_dtype, float32_preserving
from .backends import check_backend_name, get_impl, resolve_backend
from .ops import linear_base, run_adapters, run_linear, run_mixed
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
        self._row_adapters = None  # a mixed.RowAdapters inside vk.adapter_batch: each row runs its own adapter
        # the forward a base layer's class must have for the base to be computed here as a plain GEMM (_plain_base):
        # nn.Linear's own, or transformers' Conv1D's (a subclass that overrides forward runs as itself)
        self._plain_forward = (nn.Linear.forward if base_kind == "linear" else
                               type(base_layer).forward if base_kind == "conv1d"
                               and type(base_layer).__module__.startswith("transformers") else None)

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
        """base(x) + the active adapters' deltas. The host path is kept short (a small eager step is bound by it):
        the base runs as F.linear / addmm on the flattened input when the base layer is a plain Linear or Conv1D
        with no hooks (else through the layer itself, hooks, offloading and quantized forwards included), and the
        adapters run as backend nodes on cached operand views (``ops.run_adapters``), sharing h with siblings."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"vera_kernels: the input's last dimension is {x.shape[-1]} but this layer expects "
                f"in_features={self.in_features} (input shape {tuple(x.shape)})"
            )
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self._base_forward(x, *args, **kwargs)
        mixed = None
        rows = self._row_adapters
        if rows is not None:  # a mixed-adapter batch (vk.adapter_batch): the row plan decides, not the active set
            if self.merged:  # PEFT's words
                raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call "
                                 "`unmerge_adapter` first.")
            adapters = rows.layer_call(self, x, self.training)
            if adapters is None:
                return self._base_forward(x, *args, **kwargs)
            if isinstance(adapters, tuple):
                adapters, mixed = adapters
        else:
            active = self.active_adapters
            if self.merged_adapters or not active:  # (self.merged, without its property frame)
                return self._base_forward(x, *args, **kwargs)
            lambdas_d = self._modules["vera_lambda_d"]._parameters
            lambdas_b = self._modules["vera_lambda_b"]._parameters
            training = self.training
            if len(active) == 1:  # (the common case, without a comprehension's frame)
                name = active[0]
                adapters = [(lambdas_d[name], lambdas_b[name], self.vera_dropout[name] if training else 0.0)]
            else:
                adapters = [(lambdas_d[n], lambdas_b[n], self.vera_dropout[n] if training else 0.0) for n in active]
        device = x.device
        dropout = adapters[0][2] > 0.0 if len(adapters) == 1 else any(a[2] > 0.0 for a in adapters)
        concrete = resolve_backend(self.backend, device, dropout)
        impl = get_impl(concrete)
        if adapters[0][0].is_meta:
            raise RuntimeError(
                f"vera_kernels: the adapter's lambdas of this layer are on the meta device (not materialised, e.g. "
                f"offloaded by accelerate); move the patched model to a device before running it ({self.extra_repr()})"
            )
        plain = self._plain_base(args, kwargs)
        # the base layer runs as set up (hooks, offloading, quantized kernels, autocast) unless it is a plain GEMM
        base_out = self._base_forward(x, *args, **kwargs) if plain is None else None
        ac = autocast_dtype(device.type)
        if ac is None:
            y = self._adapted(x, x, concrete, impl, plain, base_out, adapters, mixed)
        else:
            with torch.autocast(device.type, enabled=False):  # the branch in autocast's dtype, computed as set here
                if plain is not None:
                    weight, bias = plain
                    plain = (weight.to(ac), bias.to(ac) if bias is not None else None)
                y = self._adapted(x, x.to(ac), concrete, impl, plain, base_out, adapters, mixed)
        if impl.FLAT and x.dim() != 2:
            return y.view(*x.shape[:-1], self.out_features)
        return y

    def _adapted(self, x, xc, concrete, impl, plain, base_out, adapters, mixed):
        """base + deltas on ``xc`` (x in autocast's dtype where autocast is on, else x): the base GEMM here when
        ``plain`` = (weight, bias) is given, else the base layer's output ``base_out``; flat (N, features) tensors
        for the flat backends. ``x`` is the layer's input as it came (the key for sharing h with siblings)."""
        xf = xc.reshape(-1, self.in_features) if impl.FLAT and xc.dim() != 2 else xc
        # (a plain base's output has the input's dtype: linear_base checks the weight's)
        cd = branch_dtype(concrete, base_out.dtype if base_out is not None else xf.dtype, xf.dtype, x.device.type)
        projections = self._modules["vera_projections"]
        A_s, B_s = projections.operands(cd, self.in_features, self.out_features)
        share = projections.shared_h.slot(x, (self.in_features, cd, concrete)) if impl.SHARES_H else None
        if mixed is None:
            if plain is not None:
                return run_linear(concrete, impl, xf, plain[0], plain[1], self.fan_in_fan_out, A_s, B_s, adapters,
                                  compute_dtype=cd, share=share)
            if impl.FLAT and base_out.dim() != 2:
                base_out = base_out.reshape(-1, self.out_features)
            return run_adapters(impl, xf, base_out, A_s, B_s, adapters, compute_dtype=cd, share=share)
        if plain is not None:
            base_out = linear_base(concrete, impl, xf, plain[0], plain[1], self.fan_in_fan_out, fuse=False)[0]
        elif impl.FLAT and base_out.dim() != 2:
            base_out = base_out.reshape(-1, self.out_features)
        return run_mixed(impl, xf, base_out, A_s, B_s, *mixed, compute_dtype=cd, share=share)

    def _plain_base(self, args, kwargs):
        """(weight, bias) when the base layer may be computed here as a plain GEMM, else None: only an nn.Linear or
        Conv1D of its class's own forward, called with x alone, with no module hooks (its own or global ones) and
        no replaced forward (accelerate's hooks patch ``forward`` on the instance). A weight on the meta device
        with nothing to materialise it is an error, not a read of garbage."""
        base = self._modules["base_layer"]
        if args or kwargs or self._plain_forward is None or type(base).forward is not self._plain_forward:
            return None
        if (base._forward_hooks or base._forward_pre_hooks or base._backward_hooks or base._backward_pre_hooks
                or "forward" in base.__dict__ or _nn_module._global_forward_hooks
                or _nn_module._global_forward_pre_hooks or _nn_module._global_backward_hooks
                or _nn_module._global_backward_pre_hooks):
            return None
        weight = base._parameters["weight"]
        if weight.is_meta:
            raise RuntimeError(
                "vera_kernels: the base layer's weight is on the meta device and no hook materialises it (was the "
                f"model offloaded or loaded with device_map and its hooks removed?): {self.extra_repr()}"
            )
        return weight, base._parameters.get("bias")

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
        self._row_adapters = None  # a mixed.RowAdapters inside vk.adapter_batch

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
        if self._row_adapters is not None and not self.disable_adapters:
            from .mixed import modules_to_save_forward

            return modules_to_save_forward(self, self._row_adapters, args, kwargs)
        return self.current()(*args, **kwargs)
