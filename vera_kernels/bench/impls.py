"""The implementations compared, and how each one is built on a layer container or a Llama model.

- "base":      the frozen model, no adapter: the floor (forward + backward to the activations, no optimizer).
- "peft":      PEFT's VeRA (peft.get_peft_model with peft.VeraConfig), the yardstick.
- "peft-lora": PEFT's LoRA r=16 on the same targets (model-level cases only).
- "reference", "torch", "triton": vera_kernels.patch_model(..., backend=name).

All variants of one case share the frozen base weights (one copy in memory; deepcopy with the parameters in the
memo), so every implementation reads the same weights and memory numbers are not inflated by duplicates.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import io
import os
import warnings
from typing import Optional

import torch
from torch import nn

IMPLS = ("base", "peft", "peft-lora", "reference", "torch", "triton")
OURS = ("reference", "torch", "triton")
LAYER_IMPLS = ("base", "peft", "reference", "torch", "triton")


@contextlib.contextmanager
def _quiet():
    """Silence import-time chatter of optional dependencies (e.g. bitsandbytes' CPU kernel notice)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            yield


_PEFT = None
_PEFT_ERR: Optional[str] = None


def import_peft():
    """peft, or None (with peft_error() saying why)."""
    global _PEFT, _PEFT_ERR
    if _PEFT is None and _PEFT_ERR is None:
        try:
            with _quiet():
                _PEFT = importlib.import_module("peft")
        except Exception as exc:
            _PEFT_ERR = f"peft is not installed ({type(exc).__name__}: {exc})"
    return _PEFT


def peft_error() -> Optional[str]:
    import_peft()
    return _PEFT_ERR


def unavailable_reason(impl: str, device: torch.device, explicit: bool) -> Optional[str]:
    """None when ``impl`` can run on ``device``; else a short reason shown as "n/a (reason)"."""
    if impl in ("peft", "peft-lora"):
        return peft_error()
    if impl in OURS:
        from ..backends import resolve_backend

        if impl == "triton" and device.type != "cuda" and not explicit:
            return ("CUDA only; on the CPU it runs only through Triton's slow interpreter: set TRITON_INTERPRET=1 "
                    "and name it in --backends (e.g. --backends all)")
        try:
            resolve_backend(impl, device)
        except Exception as exc:
            msg = str(exc)
            return msg.split(": ", 1)[-1] if "cannot run here" in msg else msg
        if impl == "triton":
            if importlib.util.find_spec("vera_kernels.ops.vera_triton") is None:
                return "vera_kernels.ops.vera_triton is not present"
            try:
                importlib.import_module("vera_kernels.ops.vera_triton")
            except Exception as exc:
                return f"vera_kernels.ops.vera_triton does not import ({type(exc).__name__}: {exc})"
    return None


# ---------------------------------------------------------------------------------------------- variants
def share_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters are the original's (the weights are shared, not copied)."""
    memo = {id(p): p for p in module.parameters()}
    return copy.deepcopy(module, memo)


def make_variant(impl: str, master: nn.Module, targets: list[str], r: int, lora_r: int = 16,
                 dropout: float = 0.0) -> nn.Module:
    """``master`` (frozen) adapted by ``impl`` (adapter dropout ``dropout``); returns the module to call (a PeftModel
    for PEFT)."""
    m = share_copy(master)
    if impl == "base":
        return m
    if impl == "peft":
        peft = import_peft()
        cfg = peft.VeraConfig(r=r, target_modules=list(targets), projection_prng_key=0, vera_dropout=dropout,
                              init_weights=True)
        with _quiet():
            return peft.get_peft_model(m, cfg)
    if impl == "peft-lora":
        peft = import_peft()
        cfg = peft.LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=list(targets), lora_dropout=dropout)
        with _quiet():
            return peft.get_peft_model(m, cfg)
    if impl in OURS:
        import vera_kernels as vk

        cfg = vk.VeraConfig(r=r, target_modules=list(targets), projection_prng_key=0, vera_dropout=dropout,
                            init_weights=True)
        return vk.patch_model(m, cfg, backend=impl)
    raise ValueError(f"unknown implementation {impl!r}")


def inner_module(variant: nn.Module, impl: str, name: str) -> nn.Module:
    """The adapted submodule ``name`` inside a variant (PEFT wraps the model in PeftModel.base_model.model)."""
    root = variant.base_model.model if impl in ("peft", "peft-lora") else variant
    return root.get_submodule(name)


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------- layer container
class LayerStack(nn.Module):
    """Several bias-free linear layers side by side in one module (l0, l1, ...): adapting them together sizes the
    shared VeRA projections as PEFT would for these layers. Each layer is called on its own."""

    def __init__(self, shapes, dtype, device, seed: int):
        super().__init__()
        gen = torch.Generator(device=device).manual_seed(seed)
        for k, (fin, fout) in enumerate(shapes):
            lin = nn.Linear(fin, fout, bias=False, device="meta")
            w = torch.empty(fout, fin, dtype=torch.float32, device=device)
            w.uniform_(-1 / fin ** 0.5, 1 / fin ** 0.5, generator=gen)
            lin.weight = nn.Parameter(w.to(dtype=dtype), requires_grad=False)
            setattr(self, f"l{k}", lin)

    def forward(self, x):  # pragma: no cover - never called as a whole
        raise RuntimeError("call the layers one at a time")


# ---------------------------------------------------------------------------------------------- llama models
@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_llama(preset, dtype: torch.dtype, device: torch.device, seed: int) -> nn.Module:
    """A LlamaForCausalLM from a LlamaConfig with random weights, created directly on ``device`` in ``dtype``
    (no CPU initialisation of GPU-sized weights, nothing downloaded). All parameters frozen."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    with _quiet():
        from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(
        vocab_size=preset.vocab, hidden_size=preset.hidden, intermediate_size=preset.intermediate,
        num_hidden_layers=preset.layers, num_attention_heads=preset.heads, num_key_value_heads=preset.kv_heads,
        max_position_embeddings=max(2048, preset.seq), use_cache=False, tie_word_embeddings=False,
        attention_dropout=0.0,
    )
    try:
        cfg._attn_implementation = "sdpa"
    except Exception:  # pragma: no cover - older/newer transformers
        pass
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    with _default_dtype(dtype), torch.device(device), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM(cfg)
    if any(p.dtype != dtype for p in model.parameters()):
        model.to(dtype=dtype)
    model.requires_grad_(False)
    model.train()
    return model


def require_grad_from_embeddings(model: nn.Module):
    """The floor model: make the embedding output require grad so backward runs through every layer's activations
    (what an adapted model's backward must do), with no parameter gradients."""
    emb = model.get_input_embeddings()
    return emb.register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))
