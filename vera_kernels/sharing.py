"""One down-projection per block input: sibling layers that read the same tensor share h = x A_s^T.

VeRA's A is shared by every adapted layer and adapter, so layers that read one input with the same in_features
(q/k/v of an attention block, gate/up of a gated MLP, several adapters on one layer) compute the very same
h = x A_s^T. The first of them computes it; the others reuse it, and autograd sums their gradients into h before one
down-node backward (one grad_h A_s GEMM instead of one per layer). A Llama block with all seven linears adapted
keeps 4 h instead of 7.

An h is reused only when it is provably the one the layer would compute now:
- the same input object (a weak reference, so a freed tensor whose id is reused never matches), at the same version
  counter (no in-place change in between), with the same compute dtype, in_features, backend, dropout and A slice;
- in the same grad mode and inference mode (no h of a no_grad forward in a grad one), and never for an inference
  tensor (it has no version counter);
- in grad mode, only while its graph is alive: the entry holds h weakly, and the up nodes that use it are what
  keep it (a finished backward frees them, so no forward ever reuses an h whose graph is gone);
- never while torch.compile traces (the compiler sees the identical GEMMs and merges them itself), under functorch
  transforms, under saved-tensor hooks other than observers and torch's CPU offloading (activation checkpointing:
  its recomputation must save exactly what the forward saved), inside a backward pass (checkpointing's
  recomputation), or during CUDA-graph capture (a captured read of an h computed outside the graph would replay
  stale data).
Entries die with their input: nothing is held once the forward's tensors are freed.

With adapter dropout each layer draws its own mask, so nothing is shared (PEFT's behaviour: every layer has its own
dropout module), unless the model is switched to one mask per shared input (``set_h_sharing(model,
dropout_mask="per-input")``): then the first layer's masked h serves its siblings.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch

DROPOUT_MASKS = ("per-layer", "per-input")

_saved_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)


def observing_hook(pack):
    """Mark a saved-tensors pack hook as an observer (it returns the tensor itself and nothing re-runs the forward,
    e.g. a counter of saved bytes), under which h is still shared. Returns ``pack``."""
    getattr(pack, "__func__", pack)._vera_kernels_observer = True
    return pack


def sharing_allowed(x: torch.Tensor) -> bool:
    """Whether an h may be reused at this call at all (see the module docstring): not under torch.compile or a
    functorch transform, not inside a backward (a graph task), not while a CUDA graph is captured, and under
    saved-tensor hooks only those known not to recompute the forward.

    Saved-tensor hooks are how activation checkpointing works: its recomputation must save exactly what the forward
    saved, and whether a sibling finds h alive differs between the two passes. So h is shared only under torch's own
    offloading (torch.autograd.graph.save_on_cpu) and observers (observing_hook). (One frame: this runs in every
    adapted layer's forward.)"""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    if _saved_hooks is None or _graph_task_id is None or _graph_task_id() != -1:
        return False
    hooks = _saved_hooks(False)
    if hooks is not None:
        pack = getattr(hooks[0], "__func__", hooks[0])
        if not (getattr(pack, "_vera_kernels_observer", False)
                or getattr(pack, "__module__", None) == "torch.autograd.graph"):
            return False
    return not _capturing(x)


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


class SharedH:
    """The model's table of live h, keyed by input tensor (one per patched model, held by its VeraProjections)."""

    def __init__(self, enabled: bool = True, dropout_mask: str = "per-layer"):
        self.enabled = enabled
        self.dropout_mask = dropout_mask
        self._by_input: dict[int, tuple] = {}  # id(x) -> (weakref to x, {key: (version, grad, h or weakref)})

    def slot(self, x: torch.Tensor, key: tuple) -> Optional["HSlot"]:
        """Where this call's h for input ``x`` is looked up and stored, or None when it must not be shared."""
        if not self.enabled or not sharing_allowed(x) or x.is_inference():
            return None  # (an inference tensor has no version counter: an in-place change could not be seen)
        return HSlot(self, x, key + (torch.is_grad_enabled(), torch.is_inference_mode_enabled()))

    def share_dropout(self) -> bool:
        return self.dropout_mask == "per-input"

    def _put(self, x, key, h):
        k = id(x)
        slot = self._by_input.get(k)
        if slot is None or slot[0]() is not x:
            slot = (weakref.ref(x, lambda ref, k=k: self._drop(k, ref)), {})
            self._by_input[k] = slot
        grad = h.requires_grad  # an h in a graph is held weakly: its up nodes keep it alive, and only them
        slot[1][key] = (x._version, grad, weakref.ref(h) if grad else h)

    def _drop(self, k, ref):
        slot = self._by_input.get(k)
        if slot is not None and slot[0] is ref:
            del self._by_input[k]

    def __len__(self) -> int:
        return len(self._by_input)

    def clear(self) -> None:
        self._by_input.clear()

    # a model copy (deepcopy, pickle) starts with an empty table and the same settings
    def __deepcopy__(self, memo):
        return SharedH(self.enabled, self.dropout_mask)

    def __getstate__(self):
        return {"enabled": self.enabled, "dropout_mask": self.dropout_mask}

    def __setstate__(self, state):
        self.__init__(state["enabled"], state["dropout_mask"])


class HSlot:
    """One call's view of the table: ``get(p)`` the sibling's h (or None), ``put(p, h)`` this call's."""

    __slots__ = ("table", "x", "key")

    def __init__(self, table: SharedH, x: torch.Tensor, key: tuple):
        self.table, self.x, self.key = table, x, key

    def get(self, p: float = 0.0):
        """The live h a sibling stored (SharedH._put) for this input, key and dropout probability, or None: one whose
        input is the same tensor at the same version."""
        x = self.x
        slot = self.table._by_input.get(id(x))
        if slot is None or slot[0]() is not x:
            return None
        entry = slot[1].get(self.key + (p,))
        if entry is None or entry[0] != x._version:
            return None
        return entry[2]() if entry[1] else entry[2]

    def put(self, h: torch.Tensor, p: float = 0.0) -> None:
        self.table._put(self.x, self.key + (p,), h)

    def shares_dropout(self) -> bool:
        return self.table.share_dropout()
