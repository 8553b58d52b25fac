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
        A, B = self.vera_A, self.vera_B
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
        A, B = self.for_compute(dtype)[0], self.vera_B
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
