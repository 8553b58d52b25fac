"""Merging a VeRA delta into a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` weight, in place.

Public API (used by :class:`vera_kernels.layer.VeraLinear`)::

    check_mergeable(module) -> None                       # raises, changing nothing, if a merge cannot be done
    add_to_quantized_weight_(module, delta, alpha) -> None  # W <- requantize(dequantize(W) + alpha * delta)
    quantizer_input_dtype(module) -> torch.dtype           # the dtype a merged weight must be finite in
    has_original(module) -> bool                           # an exact pre-merge copy is kept (see below)
    release_original(module) -> None                       # drop it (e.g. after unpatch_model(merge=True))

Arithmetic: ``W' = dequantize(W) + alpha * delta`` in float32 (:func:`vera_kernels.quant.dequant.dequantize_weight`,
bit-exact with bitsandbytes, both CPU layouts of ``Linear4bit``), then bitsandbytes' OWN quantizer with the layer's
original settings:

* 4-bit: ``bitsandbytes.functional.quantize_4bit(W'.to(dtype), blocksize, compress_statistics, quant_type,
  quant_storage)``, ``dtype`` = the quant state's dtype (its ``original_dtype`` after bitsandbytes' CPU repacking),
  blocksize, quant_type and double quantization as the quant state has them, the storage dtype from the
  ``Params4bit``. The new packed data and quant state go into the SAME ``Params4bit``
  object (``weight.data`` / ``weight.quant_state``) and ``module.quant_state``: parameter identity, ``requires_grad``,
  ``compute_dtype`` and every other attribute stay. The result is in bitsandbytes' standard layout; the next
  eval-mode CPU forward repacks it, exactly as for a freshly loaded layer.
* 8-bit: ``CB, SCB = bitsandbytes.functional.int8_vectorwise_quant(W'.to(float16))`` (what ``Int8Params`` does),
  ``weight.data = CB`` and CB/SCB updated wherever the layer keeps them now (``weight.CB/SCB`` before the first
  forward, ``module.state.CB/SCB`` after it); derived caches in ``module.state`` are cleared.
* a layer whose weight is still a float tensor (``Linear8bitLt(has_fp16_weights=True)``, a ``Linear4bit`` not moved
  to a device yet) gets a plain in-place add (plus a reset of 8-bit cached quantizations).

Requantization is lossy. To make ``merge`` then ``unmerge`` give back the ORIGINAL bits (instead of the original
plus two rounds of requantization noise, measured in tests/test_quantized.py), every merge step keeps the layer's
pre-merge quantized tensors (the tensor objects themselves, no copy: they are replaced, not modified, by the merge)
in a LIFO stack on the module (attribute ``_vera_kernels_merge_stack``). A later call that exactly undoes the top
step (same delta bytes, opposite ``alpha``) restores that snapshot instead of requantizing. Anything else keeps the
arithmetic: another positive ``alpha`` pushes a new step; a negative ``alpha`` that does not undo the top step (the
lambdas were changed while merged), or weights that were replaced or modified in place since our last write (a
device move, ``load_state_dict``), drop the whole stack. Cost while merged: one extra copy of the layer's quantized
weight per merged adapter (4-bit: ~0.5 byte per weight plus statistics; 8-bit: 1 byte), freed by the matching
unmerge or :func:`release_original`. Set ``KEEP_ORIGINAL = False`` to never keep it. A pickled (``torch.save``) or
deep-copied model keeps its merged weights but not the snapshots: its unmerge requantizes.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .dequant import dequantize_weight, quant_state_of

__all__ = [
    "check_mergeable",
    "add_to_quantized_weight_",
    "quantizer_input_dtype",
    "has_original",
    "release_original",
    "KEEP_ORIGINAL",
]

KEEP_ORIGINAL = True
STACK_ATTR = "_vera_kernels_merge_stack"

_4BIT_CLASSES = ("Linear4bit", "LinearNF4", "LinearFP4")
_VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_8BIT_CACHES = ("CBt", "SBt", "subB", "SB")


# ---------------------------------------------------------------------------------------------- inspection
def _kind(module) -> str:
    name = type(module).__name__
    if name in _4BIT_CLASSES or hasattr(module.weight, "quant_type"):
        return "4bit"
    if name == "Linear8bitLt" or hasattr(module, "state") and hasattr(module.weight, "has_fp16_weights"):
        return "8bit"
    raise TypeError(f"vera_kernels: {type(module).__name__} is not a bitsandbytes Linear4bit / Linear8bitLt layer")


def _is_quantized_4bit(module) -> bool:
    w = module.weight
    return bool(getattr(w, "bnb_quantized", False)) or w.dtype == torch.uint8 or quant_state_of(module) is not None


def _scb_places(module) -> list[tuple[Any, str]]:
    """(object, attribute) pairs where this 8-bit layer keeps its CB / SCB now (weight before, state after forward)."""
    places = []
    for owner in (module.weight, getattr(module, "state", None)):
        if owner is None:
            continue
        for attr in ("CB", "SCB"):
            if getattr(owner, attr, None) is not None:
                places.append((owner, attr))
    return places


def _current_scb(module) -> Optional[torch.Tensor]:
    scb = getattr(module.weight, "SCB", None)
    if scb is None and getattr(module, "state", None) is not None:
        scb = getattr(module.state, "SCB", None)
    return scb


def _layer_name(module) -> str:
    return f"{type(module).__name__}(in_features={module.in_features}, out_features={module.out_features})"


def check_mergeable(module) -> None:
    """Raise (ValueError / TypeError / NotImplementedError), changing nothing, if a delta cannot be merged."""
    kind = _kind(module)
    w = module.weight
    where = _layer_name(module)
    if w.device.type == "meta":
        raise ValueError(f"vera_kernels: cannot merge into {where}: its weight is on the meta device (offloaded?)")
    if kind == "4bit":
        if not _is_quantized_4bit(module):
            if w.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"vera_kernels: cannot merge into {where}: unquantized weight of dtype {w.dtype}")
            return
        qs = quant_state_of(module)
        if qs is None:
            raise ValueError(f"vera_kernels: cannot merge into {where}: quantized weight without a quant_state")
        if qs.quant_type not in ("nf4", "fp4"):
            raise NotImplementedError(f"vera_kernels: cannot merge into {where}: quant_type {qs.quant_type!r}")
        if int(qs.blocksize) not in _VALID_BLOCKSIZES:
            raise NotImplementedError(f"vera_kernels: cannot merge into {where}: blocksize {qs.blocksize}")
        shape = tuple(int(d) for d in qs.shape)
        if shape != (module.out_features, module.in_features):
            raise ValueError(
                f"vera_kernels: cannot merge into {where}: quantized shape {shape} is not (out_features, in_features)"
            )
        packed = getattr(qs, "packing_format_for_cpu", False)
        dtype = getattr(qs, "original_dtype", qs.dtype) if packed else qs.dtype
        if dtype not in _FLOAT_DTYPES:
            raise NotImplementedError(f"vera_kernels: cannot merge into {where}: quant_state dtype {dtype}")
        if getattr(qs, "nested", False):
            s2 = qs.state2
            if s2 is None or int(s2.blocksize) != 256 or getattr(s2, "nested", False):
                raise NotImplementedError(
                    f"vera_kernels: cannot merge into {where}: nested statistics other than bitsandbytes' "
                    "(blocksize 256, one level) cannot be requantized with the same settings"
                )
        if packed:
            for attr in ("original_dtype", "original_nested"):
                if not hasattr(qs, attr):
                    raise ValueError(
                        f"vera_kernels: cannot merge into {where}: CPU-repacked quant_state without {attr}"
                    )
        return
    # 8-bit
    if w.dtype != torch.int8:
        if w.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"vera_kernels: cannot merge into {where}: weight of dtype {w.dtype}")
        return  # has_fp16_weights=True or not quantized yet: a float weight
    if _current_scb(module) is None:
        raise ValueError(
            f"vera_kernels: cannot merge into {where}: int8 weight without SCB (neither weight.SCB nor state.SCB)"
        )
    if tuple(w.shape) != (module.out_features, module.in_features):
        raise ValueError(f"vera_kernels: cannot merge into {where}: int8 weight of shape {tuple(w.shape)}")


# ---------------------------------------------------------------------------------------------- snapshots
@dataclass
class _Step:
    """A merge step: what the layer held before it, and how to recognise the call that undoes it."""

    delta_key: tuple
    alpha: float
    saved: dict


@dataclass
class _Stack:
    steps: list = field(default_factory=list)
    # what our last write installed, to notice a replacement / in-place change by someone else
    marks: tuple = ()

    def __reduce__(self):
        # torch.save / pickle / deepcopy of a merged model: the snapshots belong to this process's tensors (weak
        # references): a copy starts without them, so its unmerge requantizes instead of restoring the bits
        return (_Stack, ())


def _delta_key(delta: torch.Tensor, chunk_elems: int = 1 << 24) -> tuple:
    """Shape and a hash of the float32 bytes of ``delta`` (host copies in bounded chunks for device tensors)."""
    d = delta.detach().to(torch.float32).contiguous().reshape(-1)
    h = hashlib.blake2b(digest_size=20)
    for start in range(0, d.numel(), chunk_elems):
        h.update(d[start : start + chunk_elems].cpu().numpy())
    return tuple(delta.shape), h.hexdigest()


def _marks(module, kind: str) -> tuple:
    """What our last write installed (weak references and version counters; bitsandbytes' CPU repacking keeps them)."""
    w = module.weight
    if kind == "4bit":
        # the device too: Module.to swaps .data (no version bump) and moves the QuantState in place. Not the storage
        # pointer: bitsandbytes' CPU repacking swaps it, and an unmerge after it is still exact
        return (weakref.ref(w), w._version, w.device, weakref.ref(quant_state_of(module)))
    scb = _current_scb(module)
    return (weakref.ref(w), w._version, w.data.data_ptr(), weakref.ref(scb), scb._version)


def _still_ours(module, kind: str, marks: tuple) -> bool:
    if not marks:
        return False
    w = module.weight
    if kind == "4bit":
        ref_w, version, device, ref_qs = marks
        return ref_w() is w and w._version == version and w.device == device and ref_qs() is quant_state_of(module)
    ref_w, version, ptr, ref_scb, scb_version = marks
    scb = _current_scb(module)
    return (ref_w() is w and w._version == version and w.data.data_ptr() == ptr and ref_scb() is scb
            and scb is not None and scb._version == scb_version)


def _snapshot(module, kind: str) -> dict:
    w = module.weight
    if kind == "4bit":
        return dict(data=w.data, weight_qs=getattr(w, "quant_state", None),
                    module_qs=getattr(module, "quant_state", None), bnb_quantized=getattr(w, "bnb_quantized", True))
    return dict(data=w.data, CB=w.data, SCB=_current_scb(module))


def _restore(module, kind: str, saved: dict) -> None:
    w = module.weight
    w.data = saved["data"]
    if kind == "4bit":
        w.quant_state = saved["weight_qs"]
        if hasattr(module, "quant_state"):
            module.quant_state = saved["module_qs"] if saved["module_qs"] is not None else saved["weight_qs"]
        w.bnb_quantized = saved["bnb_quantized"]
        return
    _install_8bit(module, saved["CB"], saved["SCB"])


def has_original(module) -> bool:
    """Whether pre-merge quantized tensors are kept on ``module`` (a merge is pending that unmerge can undo exactly)."""
    stack = getattr(module, STACK_ATTR, None)
    return bool(stack is not None and stack.steps)


def release_original(module) -> None:
    """Forget the pre-merge tensors kept on ``module`` (unmerge then falls back to requantization)."""
    if STACK_ATTR in module.__dict__:
        delattr(module, STACK_ATTR)


# ---------------------------------------------------------------------------------------------- requantization
def _install_8bit(module, CB: torch.Tensor, SCB: torch.Tensor) -> None:
    w = module.weight
    state = getattr(module, "state", None)
    places = _scb_places(module)
    if not places:  # nothing set anywhere (cannot happen after check_mergeable): bitsandbytes' pre-forward layout
        places = [(w, "CB"), (w, "SCB")]
    w.data = CB
    for owner, attr in places:
        setattr(owner, attr, CB if attr == "CB" else SCB)
    if state is not None:
        for attr in _8BIT_CACHES:
            if getattr(state, attr, None) is not None:
                setattr(state, attr, None)


def quantizer_input_dtype(module) -> torch.dtype:
    """The dtype a merged weight is cast to before bitsandbytes quantizes it (a merge must be finite in it): the 4-bit
    layer's original float dtype (its quant state's dtype before any CPU repacking), float16 for an int8 weight (what
    ``Int8Params`` quantizes from), the weight's own dtype for a float weight."""
    check_mergeable(module)
    return _quantizer_input_dtype(module, _kind(module))


def _quantizer_input_dtype(module, kind: str) -> torch.dtype:
    """quantizer_input_dtype for a layer check_mergeable has accepted."""
    w = module.weight
    if kind == "4bit":
        if not _is_quantized_4bit(module):
            return w.dtype
        qs = quant_state_of(module)
        return qs.original_dtype if getattr(qs, "packing_format_for_cpu", False) else qs.dtype
    return torch.float16 if w.dtype == torch.int8 else w.dtype


def _requantize_4bit(module, W: torch.Tensor) -> None:
    """Quantize ``W`` (already in the layer's original float dtype) with bitsandbytes and the layer's settings."""
    import bitsandbytes.functional as F

    w = module.weight
    qs = quant_state_of(module)
    packed = getattr(qs, "packing_format_for_cpu", False)
    # double quantization as the layer's statistics are now (bitsandbytes may rebuild a Params4bit with default
    # attributes, e.g. fix_4bit_weight_quant_state_from_module: its compress_statistics is not to be trusted)
    compress = qs.original_nested if packed else bool(qs.nested)
    storage = getattr(w, "quant_storage", None)
    if storage is None:
        storage = getattr(qs, "original_storage_type", None) or (torch.uint8 if packed else w.dtype)
    data, new_qs = F.quantize_4bit(
        W, blocksize=int(qs.blocksize), compress_statistics=bool(compress), quant_type=qs.quant_type,
        quant_storage=storage,
    )
    w.data = data
    w.quant_state = new_qs
    if hasattr(module, "quant_state"):
        module.quant_state = new_qs
    w.bnb_quantized = True


def _requantize_8bit(module, W16: torch.Tensor) -> None:
    import bitsandbytes.functional as F

    CB, SCB, _ = F.int8_vectorwise_quant(W16)
    _install_8bit(module, CB, SCB)


def add_to_quantized_weight_(module, delta: torch.Tensor, alpha: float) -> None:
    """``W <- quantize(dequantize(W) + alpha * delta)`` in place, with bitsandbytes' quantizer and the layer's settings.

    ``delta`` is ``(out_features, in_features)`` (float32). Raises before anything changes when the layer cannot take
    a merge (:func:`check_mergeable`), when ``delta`` has the wrong shape, or when the result is not finite (also
    after the float16 cast an 8-bit layer quantizes from). See the module docstring for the exact-undo stack.
    """
    check_mergeable(module)
    kind = _kind(module)
    shape = (module.out_features, module.in_features)
    if tuple(delta.shape) != shape:
        raise ValueError(f"vera_kernels: delta of shape {tuple(delta.shape)} for a layer of shape {shape}")
    alpha = float(alpha)
    w = module.weight
    quantized = _is_quantized_4bit(module) if kind == "4bit" else w.dtype == torch.int8
    where = _layer_name(module)

    with torch.no_grad():
        if not quantized:  # a float weight: plain add, as for nn.Linear
            new = w.data.float() + alpha * delta.to(device=w.device, dtype=torch.float32)
            if not torch.isfinite(new.to(w.dtype)).all():
                raise ValueError(f"vera_kernels: merging into {where} gives non-finite weights; nothing was changed")
            w.data.copy_(new)
            state = getattr(module, "state", None)
            if state is not None and getattr(state, "CB", None) is not None and kind == "8bit":
                state.reset_grads()  # cached quantization of the old float weight
            release_original(module)
            return

        stack: Optional[_Stack] = getattr(module, STACK_ATTR, None)
        if stack is not None and not _still_ours(module, kind, stack.marks):
            release_original(module)  # the weights were replaced or changed since our last write
            stack = None
        key = _delta_key(delta) if (KEEP_ORIGINAL or stack is not None) else None
        if stack is not None and stack.steps:
            top = stack.steps[-1]
            if top.delta_key == key and top.alpha == -alpha:  # exactly undoes the last step: restore its bits
                stack.steps.pop()
                _restore(module, kind, top.saved)
                if stack.steps:
                    stack.marks = _marks(module, kind)
                else:
                    release_original(module)
                return

        W = dequantize_weight(module, torch.float32)
        W.add_(delta.to(device=W.device, dtype=torch.float32), alpha=alpha)
        target = W.to(_quantizer_input_dtype(module, kind))  # what bitsandbytes quantizes from
        if not torch.isfinite(target).all():
            raise ValueError(f"vera_kernels: merging into {where} gives non-finite weights; nothing was changed")
        saved = _snapshot(module, kind)
        if kind == "4bit":
            _requantize_4bit(module, target)
        else:
            _requantize_8bit(module, target)

        if KEEP_ORIGINAL and alpha > 0:
            if stack is None:
                stack = _Stack()
                setattr(module, STACK_ATTR, stack)
            stack.steps.append(_Step(key, alpha, saved))
            stack.marks = _marks(module, kind)
        else:
            release_original(module)  # a step that is not an exact undo: older snapshots no longer apply
