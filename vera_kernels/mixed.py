"""Mixed-adapter batches: each row of a batch runs its own adapter, in one forward and one backward.

    with vk.adapter_batch(model, ["a", "b", "__base__", "a"]):
        out = model(input_ids)                      # row 0 and 3 adapter "a", row 1 "b", row 2 the base model
    out = model(input_ids, adapter_names=[...])     # PEFT's spelling, on forward and on generate

VeRA's A and B are shared by every adapter, so for rows n with adapters a(n)

    y[n] = base(x[n]) + lambda_b[a(n)] * ((lambda_d[a(n)] * (x[n] A_s^T)) B_s^T)

is the same two GEMMs as one adapter, with per-row gathers of the lambdas (``ops.run_mixed``, the backends'
``up_mixed``): h = x A_s^T is one GEMM for every row, whatever its adapter. A batch over 64 adapters costs what one
costs. PEFT's VeRA has no per-row path: it runs the active adapter on every row, silently.

This module keeps the bookkeeping in one place: which adapter a row runs (``RowAdapters``, set on every VeraLinear
and ModulesToSave of the model for the duration of the block), what a layer stacks for its call
(``RowAdapters.layer_call``), the checks (all made before anything runs), and the ``adapter_names=`` keyword on a
patched model's forward and ``generate``.

Semantics (PEFT's LoRA mixed batches, where PEFT has them): rows are dim 0 of every adapted layer's input; a row
naming "__base__", or an adapter a layer does not have, gets that layer's base output; the active adapters play no
part inside the block; adapter dropout applies per adapter on its rows in training. Unlike PEFT, training is
allowed: each adapter's lambdas get the gradient of its own rows only (deterministic), so several adapters train in
one step with one optimizer (make them trainable first, e.g. ``vk.set_adapter(model, ["a", "b"])`` or
``requires_grad_``: the block never changes what is trainable).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter on this row"
_ROWS_ATTR = "_row_adapters"  # on VeraLinear and ModulesToSave: the RowAdapters in force, or None
_HOOKS_ATTR = "_vera_kernels_adapter_names_hooks"
_STACK_ATTR = "_vera_kernels_adapter_names_stack"


class RowAdapters:
    """Which adapter each row runs: ``names`` (one per row), ``used`` (the distinct adapters, in order of first use).

    ``repeats_ok``: rows may come repeated consecutively (a batch of len(names) * k rows, row i of the original batch
    at rows i*k .. i*k+k-1): what ``generate`` does for beams and num_return_sequences. Outside generate the batch
    must have exactly len(names) rows.
    """

    def __init__(self, names: Sequence[str], repeats_ok: bool = False):
        self.names = tuple(names)
        self.used = tuple(dict.fromkeys(n for n in self.names if n != BASE_ADAPTER))
        self.repeats_ok = repeats_ok
        # one adapter on every row: the layers run their plain single-adapter path (exactly its cost)
        self.single = self.used[0] if len(self.used) == 1 and BASE_ADAPTER not in self.names else None
        self._index: dict = {}

    def repeats(self, batch: int, where: str) -> int:
        """How many times each row is repeated in a batch of ``batch`` rows (1 outside generate); raises when the
        batch does not match the names."""
        rows = len(self.names)
        if batch == rows:
            return 1
        if self.repeats_ok and batch % rows == 0:
            return batch // rows
        raise ValueError(
            f"vera_kernels: {rows} adapter names were given for a batch of {batch} rows{where} (dimension 0 of the "
            "layer's input); give one name per row"
            + (" (inside generate the rows may be repeated for beams or num_return_sequences, a multiple of them)"
               if self.repeats_ok else "")
        )

    def row_index(self, device: torch.device, repeats: int) -> torch.Tensor:
        """(rows,) int64 on ``device``: the row's position in ``used``, or len(used) for "__base__" (the zero row
        every layer stacks last). Made once per device for the block, shared by every layer."""
        key = (device, repeats, torch.is_inference_mode_enabled())
        index = self._index.get(key)
        if index is None:
            slots = {n: i for i, n in enumerate(self.used)}
            base = len(self.used)
            index = torch.tensor([slots.get(n, base) for n in self.names for _ in range(repeats)],
                                 dtype=torch.int64).to(device)
            self._index[key] = index
        return index

    def layer_call(self, layer, x: torch.Tensor, training: bool):
        """What ``layer`` (a VeraLinear) runs for input ``x`` under this plan:
        - ``None``: no row runs one of the layer's adapters: the base alone;
        - ``[(lambda_d, lambda_b, p)]``: one adapter on every row: the plain path (what a single-adapter call runs);
        - ``(adapters, (LD, LB, row_index, ps))``: the mixed path. LD (K, r) and LB (K, out) stack the used
          adapters' lambdas (zeros for an adapter the layer lacks) plus a last zero row for "__base__"; ``ps`` the
          dropout probability of each stacked row (None where no adapter runs); ``adapters`` the triples of the
          layer's adapters in the batch (for the layer's checks)."""
        if x.dim() < 2:
            raise ValueError(f"vera_kernels: a mixed-adapter batch needs a batch dimension; this layer's input has "
                             f"shape {tuple(x.shape)} ({layer.extra_repr()})")
        repeats = self.repeats(x.shape[0], f" at a layer with {layer.extra_repr()}")
        lambdas_d = layer._modules["vera_lambda_d"]._parameters
        lambdas_b = layer._modules["vera_lambda_b"]._parameters
        present = [n for n in self.used if n in lambdas_d]
        if not present:
            return None
        if self.single is not None:
            n = self.single
            return [(lambdas_d[n], lambdas_b[n], layer.vera_dropout[n] if training else 0.0)]
        some_ld = lambdas_d[present[0]]
        zero_d = some_ld.new_zeros(some_ld.shape)
        zero_b = lambdas_b[present[0]].new_zeros(layer.out_features)
        LD = torch.stack([lambdas_d[n] if n in lambdas_d else zero_d for n in self.used] + [zero_d])
        LB = torch.stack([lambdas_b[n] if n in lambdas_b else zero_b for n in self.used] + [zero_b])
        ps = tuple((layer.vera_dropout[n] if training else 0.0) if n in lambdas_d else None for n in self.used)
        adapters = [(lambdas_d[n], lambdas_b[n], layer.vera_dropout[n] if training else 0.0) for n in present]
        return adapters, (LD, LB, self.row_index(x.device, repeats), ps + (None,))

    def row_groups(self, batch: int, device: torch.device):
        """[(name, row indices (int64 tensor on ``device``))] per distinct name, in order of first use: for modules
        run per row group (ModulesToSave)."""
        repeats = self.repeats(batch, "")
        names = [n for n in self.names for _ in range(repeats)]
        groups: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            groups.setdefault(n, []).append(i)
        return [(n, torch.tensor(rows, dtype=torch.int64, device=device)) for n, rows in groups.items()]


# ---------------------------------------------------------------------------------------------- checks
def check_adapter_names(model: nn.Module, adapter_names) -> list[str]:
    """The names as a list, or a clear error (PEFT's words where PEFT has them), before anything runs."""
    from .model import _require_state, vera_layers

    state = _require_state(model)
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise TypeError(f"Got adapter names of type {type(adapter_names)}, expected a list of str.")
    names = list(adapter_names)
    if not names:
        raise ValueError("vera_kernels: adapter_names is empty; give one adapter name (or '__base__') per row")
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"vera_kernels: adapter names must be strings, got {bad[:3]}")
    unknown = sorted({n for n in names if n != BASE_ADAPTER} - set(state.configs))
    if unknown:
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}")
    if any(layer.merged for _, layer in vera_layers(model)):
        raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` "
                         "first.")
    return names


def _batch_size(args, kwargs) -> Optional[int]:
    for key in ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features"):
        t = kwargs.get(key)
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            return t.shape[0]
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 1:
        return args[0].shape[0]
    return None


# ---------------------------------------------------------------------------------------------- the block
def _row_modules(model: nn.Module) -> list[nn.Module]:
    from .layer import ModulesToSave, VeraLinear

    return [m for m in model.modules() if isinstance(m, (VeraLinear, ModulesToSave))]


@contextlib.contextmanager
def _rows_in_force(model: nn.Module, rows: RowAdapters):
    modules = _row_modules(model)
    before = [getattr(m, _ROWS_ATTR, None) for m in modules]
    try:
        for m in modules:
            m.__dict__[_ROWS_ATTR] = rows
        yield model
    finally:
        for m, prev in zip(modules, before):
            m.__dict__[_ROWS_ATTR] = prev


@contextlib.contextmanager
def adapter_batch(model: nn.Module, adapter_names: Iterable[str]):
    """Inside the block, row i (dim 0) of every batch the model sees runs adapter ``adapter_names[i]`` ("__base__":
    none), in forward, backward and ``generate`` (a row keeps its adapter for every generated token). Rows of one
    adapter need not be contiguous; any number of adapters may be mixed at one adapter's cost.

    Raises before anything runs for: names that are not a list of str, an unknown adapter, a merged adapter; and at
    the first adapted layer for a batch whose size is not the number of names. Blocks nest (the inner one wins)."""
    names = check_adapter_names(model, adapter_names)
    with _rows_in_force(model, RowAdapters(names)):
        yield model


# ---------------------------------------------------------------------------------------------- adapter_names=
def _pre_forward(module: nn.Module, args, kwargs):
    names = kwargs.pop("adapter_names", None)
    stack = module.__dict__.setdefault(_STACK_ATTR, [])
    if names is None:
        stack.append(None)
        return None
    names = check_adapter_names(module, names)
    batch = _batch_size(args, kwargs)
    if batch is not None and batch != len(names):  # PEFT's check and words, before any layer runs
        raise ValueError("Length of `adapter_names` should be the same as the number of inputs, but got "
                         f"{len(names)} and {batch} respectively.")
    rows = RowAdapters(names)
    ctx = _rows_in_force(module, rows)
    ctx.__enter__()
    stack.append(ctx)
    return args, kwargs


def _post_forward(module: nn.Module, args, kwargs, output):
    stack = module.__dict__.get(_STACK_ATTR)
    ctx = stack.pop() if stack else None
    if ctx is not None:
        ctx.__exit__(None, None, None)
    return None


class _Generate:
    """``model.generate`` of a patched model (an instance attribute): the model's own ``generate``; with
    ``adapter_names``, inside ``adapter_batch`` (rows repeated for beams or num_return_sequences keep their adapter).
    A callable object rather than a bound method so that pickling and deep-copying the model rebind it to the copy."""

    def __init__(self, model: nn.Module):
        self.__self__ = model
        self.__doc__ = type(model).generate.__doc__

    def __call__(self, *args, adapter_names=None, **kwargs):
        model = self.__self__
        generate = type(model).generate.__get__(model)
        if adapter_names is None:
            return generate(*args, **kwargs)
        names = check_adapter_names(model, adapter_names)
        with _rows_in_force(model, RowAdapters(names, repeats_ok=True)):
            return generate(*args, **kwargs)

    def __reduce__(self):
        return (_Generate, (self.__self__,))


def attach(model: nn.Module) -> None:
    """``adapter_names=`` on the patched model's forward (a pre-forward hook that takes it out of the keywords) and
    on ``generate`` where the model has one. Undone by ``detach``."""
    if _HOOKS_ATTR in model.__dict__:
        return
    model.__dict__[_HOOKS_ATTR] = (
        model.register_forward_pre_hook(_pre_forward, with_kwargs=True),
        model.register_forward_hook(_post_forward, with_kwargs=True, always_call=True),
    )
    if callable(getattr(type(model), "generate", None)):
        model.__dict__["generate"] = _Generate(model)


def detach(model: nn.Module) -> None:
    for handle in model.__dict__.pop(_HOOKS_ATTR, ()):
        handle.remove()
    model.__dict__.pop(_STACK_ATTR, None)
    if isinstance(model.__dict__.get("generate"), _Generate):
        del model.__dict__["generate"]


def modules_to_save_forward(wrapper, rows: RowAdapters, args, kwargs):
    """A ModulesToSave under a mixed batch: each row group through its adapter's copy (the original module for
    "__base__" and adapters without one), outputs put back in row order. Tensor outputs only."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("vera_kernels: a modules_to_save module under a mixed-adapter batch needs its batch as the "
                         "first positional tensor argument")
    groups = rows.row_groups(x.shape[0], x.device)
    copies = wrapper.modules_to_save
    module_of = {n: (copies[n] if n in copies else wrapper.original_module) for n, _ in groups}
    if len({id(m) for m in module_of.values()}) == 1:  # every row runs the same module
        return next(iter(module_of.values()))(*args, **kwargs)
    outs, order = [], []
    for n, index in groups:
        out = module_of[n](x.index_select(0, index), *args[1:], **kwargs)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"vera_kernels: modules_to_save module returned {type(out).__name__}; a mixed-adapter "
                            "batch can only reassemble tensor outputs")
        outs.append(out)
        order.append(index)
    out = torch.cat(outs)
    inverse = torch.empty_like(torch.cat(order))
    inverse[torch.cat(order)] = torch.arange(inverse.numel(), device=inverse.device)
    return out.index_select(0, inverse)

