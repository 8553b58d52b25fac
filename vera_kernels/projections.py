"""The shared projections A and B: drawing them bit-identically to PEFT, and holding them once per model.

PEFT draws, from a CPU ``torch.Generator`` seeded with ``projection_prng_key``, first A of shape (r, in_max) then
B of shape (out_max, r), each uniform(-bound, bound) with bound = sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in being the
tensor's second dimension. in_max / out_max are the largest in/out features over all targeted layers.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
from torch import nn

from ._dtypes import PARAM_DTYPE, float32_preserving
from .sharing import SharedH


class _Slices(NamedTuple):
    """A cached pair of one layer's views and what they were cut from (valid while A, B and storage are the same)."""

    A: torch.Tensor
    B: torch.Tensor
    storage: tuple[int, int]
    A_s: torch.Tensor
    B_s: torch.Tensor


def _normal_tensors():
    """A context in which cached casts and views are normal tensors even when the caller is in inference mode."""
    return torch.inference_mode(False) if torch.is_inference_mode_enabled() else contextlib.nullcontext()


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform (gain sqrt(2), fan_in = shape[1]) drawn from ``generator``: PEFT's ``_kaiming_init``."""
    bound = math.sqrt(3.0) * (math.sqrt(2.0) / math.sqrt(shape[1]))
    return torch.empty(shape, dtype=PARAM_DTYPE).uniform_(-bound, bound, generator=generator)


def init_projections(r: int, in_max: int, out_max: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) for this key, bit-identical to PEFT's vera_A / vera_B: A first, then B, from one generator."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    vera_A = kaiming_uniform((r, in_max), generator)
    vera_B = kaiming_uniform((out_max, r), generator)
    return vera_A, vera_B


class VeraProjections(nn.Module):
    """The one pair (A, B) a patched model shares across all its adapted layers and adapters.

    It is a child of every VeraLinear (so ``model.to(device)`` moves it once; ``named_modules`` lists it once), its
    buffers are non-persistent (so the model's own state_dict is not polluted with copies), and it keeps float32
    under dtype casts: the projections must stay bit-identical to PEFT's.
    """

    def __init__(self, vera_A: torch.Tensor, vera_B: torch.Tensor, projection_prng_key: int, save_projection: bool):
        super().__init__()
        if vera_A.dim() != 2 or vera_B.dim() != 2 or vera_A.shape[0] != vera_B.shape[1]:
            raise ValueError(
                f"vera_A must be (r, in_max) and vera_B (out_max, r); got {tuple(vera_A.shape)} and {tuple(vera_B.shape)}"
            )
        self.register_buffer("vera_A", vera_A.to(PARAM_DTYPE), persistent=False)
        self.register_buffer("vera_B", vera_B.to(PARAM_DTYPE), persistent=False)
        self.projection_prng_key = projection_prng_key
        self.save_projection = save_projection
        self._cast_cache: dict = {}
        self.shared_h = SharedH()  # h = x A_s^T shared by sibling layers within a forward (vera_kernels.sharing)
        self._slice_cache: dict = {}

    @classmethod
    def from_key(cls, r: int, in_max: int, out_max: int, key: int, save_projection: bool) -> "VeraProjections":
        return cls(*init_projections(r, in_max, out_max, key), projection_prng_key=key, save_projection=save_projection)

    @property
    def r(self) -> int:
        return self.vera_A.shape[0]

    @property
    def in_max(self) -> int:
        return self.vera_A.shape[1]

    @property
    def out_max(self) -> int:
        return self.vera_B.shape[0]

    def check_fits(self, in_features: int, out_features: int, r: int, where: str = "") -> None:
        """PEFT's checks when a later adapter reuses the projections, plus ours: the rank must be equal.

        PEFT accepts a smaller rank here and then fails at the first forward with a broadcasting error; we refuse it
        up front (the shared A has r rows, every adapter's lambda_d must have r entries).
        """
        at = f" (at {where})" if where else ""
        if self.in_max < in_features:
            raise ValueError(
                f"vera_A has a size of {self.in_max} but {in_features} or greater is required{at}; this probably "
                "happened because an additional VeRA adapter was added after the first one with incompatible shapes."
            )
        if self.out_max < out_features:
            raise ValueError(
                f"vera_B has a size of {self.out_max} but {out_features} or greater is required{at}; this probably "
                "happened because an additional VeRA adapter was added after the first one with incompatible shapes."
            )
        if r > self.r:  # PEFT's first words for a higher rank; its advice (load in reverse order) does not apply
            raise ValueError(
                f"vera_A has a size of {self.r} but {r} or greater is required{at}: r={r} for this adapter, but all "
                f"VeRA adapters on one model share vera_A/vera_B, made for the first adapter's r={self.r}; they must "
                "use the same r."
            )
        if r != self.r:
            raise ValueError(
                f"r={r} differs from the rank {self.r} of the shared projections vera_A/vera_B{at}: all VeRA adapters "
                "on one model share A and B, so they must use the same r."
            )

    def for_compute(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in ``dtype``: the float32 masters themselves, or casts cached in eager mode and refreshed whenever
        the masters change (version counter), move or are replaced. Saves two cast kernels per layer call.
        A cast made during ``torch.inference_mode()`` is made outside it: an inference tensor in the cache would
        break every later training step ("Inference tensors cannot be saved for backward")."""
        buffers = self._buffers  # (not Module.__getattr__: this runs in every adapted layer's forward)
        A, B = buffers["vera_A"], buffers["vera_B"]
        if dtype == A.dtype:
            return A, B
        if torch.compiler.is_compiling():
            return A.to(dtype), B.to(dtype)
        key = (A.device, A.data_ptr(), B.data_ptr(), A._version, B._version)
        hit = self._cast_cache.get(dtype)
        if hit is None or hit[0] != key:
            with _normal_tensors():
                hit = (key, A.to(dtype), B.to(dtype))
            self._cast_cache[dtype] = hit
        return hit[1], hit[2]

    def operands(self, dtype: torch.dtype, in_features: int, out_features: int):
        """One layer's operands: (A[:, :in_features] in ``dtype``, B[:out_features] in float32). The fused backends
        take A in the compute dtype (a cached cast) and fold B with the float32 lambdas; the reference takes both in
        float32. The views are cached per (dtype, shape) while the tensors behind them stay the same (`.data =`,
        swap_tensors, a device move or a new cast all refresh them), saving the slicing ops per layer call."""
        B = self._buffers["vera_B"]
        A = self._buffers["vera_A"]
        if dtype != A.dtype:  # (for_compute's own first case, A itself, without its frame)
            A = self.for_compute(dtype)[0]
        if torch.compiler.is_compiling():
            return A[:, :in_features], B[:out_features]
        key = (dtype, in_features, out_features)
        storage = (A.data_ptr(), B.data_ptr())
        hit = self._slice_cache.get(key)
        if hit is None or hit.A is not A or hit.B is not B or hit.storage != storage:
            with _normal_tensors():
                hit = _Slices(A, B, storage, A[:, :in_features], B[:out_features])
            self._slice_cache[key] = hit
        return hit.A_s, hit.B_s

    def _apply(self, fn, recurse=True):
        self._cast_cache.clear()  # casts and views of the tensors being moved or replaced
        self._slice_cache.clear()
        self.shared_h.clear()
        return super()._apply(float32_preserving(fn), recurse)

    def extra_repr(self) -> str:
        return f"r={self.r}, in_max={self.in_max}, out_max={self.out_max}, key={self.projection_prng_key}"


# ---------------------------------------------------------------------------------------------- the model's state dict
# A patched model's own state_dict() carries the shared projections once, under the path named_modules() gives the one
# VeraProjections (its first adapted layer's ``vera_projections``), by PEFT's save_projection rule: save_projection=
# True -> vera_A and vera_B, which a load restores exactly; False -> the identity they are drawn from,
# [projection_prng_key, r, in_max, out_max] (int64), which a load checks. Either way a state dict from a model with
# other projections is refused, never loaded into different logits. The buffers stay non-persistent: as a child of
# every adapted layer, persistent buffers would be written once per layer. Root-level hooks, registered by patching.
IDENTITY = "projection_identity"
_HOOKS_ATTR = "_vera_kernels_state_dict_hooks"


def _identity(p: VeraProjections) -> torch.Tensor | None:
    key = p.projection_prng_key
    if not -(2**63) <= key < 2**63:  # does not fit int64: such a key is written as the projections themselves
        return None
    return torch.tensor([key, p.r, p.in_max, p.out_max], dtype=torch.int64)


def _shared(model: nn.Module) -> tuple[str, VeraProjections] | None:
    from .checkpoint import clean_name

    for name, m in model.named_modules():
        if isinstance(m, VeraProjections):
            return clean_name(name), m
    return None


def _entries(p: VeraProjections) -> dict[str, torch.Tensor]:
    identity = None if p.save_projection else _identity(p)
    if identity is None:
        return {"vera_A": p.vera_A.detach(), "vera_B": p.vera_B.detach()}
    return {IDENTITY: identity}


def _state_dict_hook(module: nn.Module, state_dict, prefix: str, local_metadata) -> None:
    found = _shared(module)
    if found is not None:
        path, p = found
        for leaf, t in _entries(p).items():
            state_dict[f"{prefix}{path}.{leaf}"] = t


def _load_state_dict_pre_hook(module: nn.Module, state_dict, prefix: str, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
    """Take this model's projection entries out of the state dict (they belong to no module's own state), check them
    against the model's projections and raise before anything is loaded if they differ; vera_A/vera_B of a
    save_projection=True model are copied in (an exact restore)."""
    found = _shared(module)
    if found is None:
        return
    path, p = found
    leaves = ("vera_A", "vera_B", IDENTITY)
    given: dict[str, list[tuple[str, torch.Tensor]]] = {leaf: [] for leaf in leaves}
    for k in [k for k in state_dict if k.startswith(prefix) and k.rpartition(".")[0].endswith("vera_projections")]:
        leaf = k.rpartition(".")[2]
        if leaf in given:
            given[leaf].append((k, state_dict.pop(k)))
    if not any(given.values()):  # reported as torch reports any missing key (an error under strict)
        missing_keys.extend(f"{prefix}{path}.{leaf}" for leaf in _entries(p))
        return
    if p.save_projection and bool(given["vera_A"]) != bool(given["vera_B"]):
        raise ValueError(f"the state dict holds only one of {path}.vera_A / .vera_B; nothing was loaded")
    mine = _identity(p)
    for k, t in given[IDENTITY]:
        if mine is None or not torch.equal(t.cpu().to(torch.int64), mine):
            raise ValueError(
                f"{k}: the state dict's projections {t.tolist()} ([projection_prng_key, r, in_max, out_max]) are not "
                f"this model's {None if mine is None else mine.tolist()}: it was saved from a model patched with "
                "another projection_prng_key or other targets; nothing was loaded"
            )
    for leaf, own in (("vera_A", p.vera_A), ("vera_B", p.vera_B)):
        for k, t in given[leaf]:
            if tuple(t.shape) != tuple(own.shape):
                raise ValueError(f"{k} has shape {tuple(t.shape)} but this model's {leaf} is {tuple(own.shape)}: "
                                 "the state dict is of a model patched differently; nothing was loaded")
            if not p.save_projection and not torch.equal(t.to(own.device, own.dtype), own):
                raise ValueError(
                    f"{k} differs from this model's {leaf}, which save_projection=False draws from "
                    f"projection_prng_key={p.projection_prng_key}: the state dict is of a model with other "
                    "projections; nothing was loaded"
                )
    if p.save_projection:
        with torch.no_grad():
            for leaf, own in (("vera_A", p.vera_A), ("vera_B", p.vera_B)):
                if given[leaf]:
                    own.copy_(given[leaf][0][1])


def register_state_dict_hooks(model: nn.Module) -> None:
    if _HOOKS_ATTR not in model.__dict__:
        model.__dict__[_HOOKS_ATTR] = (model.register_state_dict_post_hook(_state_dict_hook),
                                       model.register_load_state_dict_pre_hook(_load_state_dict_pre_hook))


def remove_state_dict_hooks(model: nn.Module) -> None:
    for handle in model.__dict__.pop(_HOOKS_ATTR, ()):
        handle.remove()
