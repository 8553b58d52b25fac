"""Dispatch between the implementations of the VeRA op, in one place.

- "reference": PEFT's unfused math in float32: the yardstick every other backend is tested against.
- "torch": a torch.autograd.Function with a hand-derived, memory-lean backward (any device).
- "triton": fused Triton kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1, for testing).
- "auto": the measured faster one for the call (``auto_backend``): torch, or triton for CUDA tensors with adapter
  dropout. ``VERA_KERNELS_BACKEND`` overrides "auto".

Asking for a backend that cannot run on the given tensors raises a clear error; nothing falls back silently.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("reference", "torch", "triton")
BACKEND_CHOICES = ("auto",) + BACKENDS
ENV_BACKEND = "VERA_KERNELS_BACKEND"


# CPython's os.environ keeps its values in a dict of encoded keys; read there with its own codecs, a lookup costs a
# third of os.environ.get's three Python frames (the switches below are read in every adapted layer's forward)
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_ENCODE = getattr(os.environ, "encodekey", None)
_ENV_DECODE = getattr(os.environ, "decodevalue", None)
_ENV_KEYS: dict = {}


def env_value(name: str) -> str | None:
    """``os.environ.get(name)``, cheaper where CPython's os.environ allows (under torch.compile: os.environ.get)."""
    if _ENV_DATA is None or _ENV_ENCODE is None or _ENV_DECODE is None or torch.compiler.is_compiling():
        return os.environ.get(name)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = _ENV_ENCODE(name)
    raw = _ENV_DATA.get(key)
    return None if raw is None else _ENV_DECODE(raw)


def check_backend_name(backend: str) -> str:
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKEND_CHOICES}")
    return backend


_TRITON_STATUS: list = []  # [None | reason], filled on first use (a plain cache: torch.compile traces through it)


def triton_import_error() -> str | None:
    """None when triton imports, else why not. Imported lazily: `import vera_kernels` never imports triton."""
    if not _TRITON_STATUS:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _TRITON_STATUS.append(None)
        except Exception as exc:  # pragma: no cover - depends on the machine
            _TRITON_STATUS.append(f"triton is not importable ({type(exc).__name__}: {exc})")
    return _TRITON_STATUS[0]


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unavailable_reason(device: torch.device) -> str | None:
    err = triton_import_error()
    if err:
        return err
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreter_on():
        return None
    return (
        f"the triton backend runs on CUDA tensors (got a {device.type} tensor); on the CPU it runs only through "
        "Triton's interpreter: set TRITON_INTERPRET=1 before importing triton"
    )


def auto_backend(device: torch.device, dropout: bool) -> str:
    """What "auto" runs, by measurement (bench/results/2026-11-27-H100.md, gpu-check at 320080d, bf16, r = 256):

    - Without adapter dropout: "torch". Both backends now run the same forward (aten and cuBLAS, no launch); in
      backward the triton one fuses the lambda reductions into 2 launches where the torch one runs ~6 small aten
      ops. On the H100 the two were within 1% of each other in GPU time at 8192 tokens (4096->4096; at 4096->11008
      the torch backend was 2% faster), and where the triton one was faster (512 tokens: 0.125 against 0.147 ms)
      the eager step is bound by the host, on which the torch backend is the cheaper (bench/host_overhead.py).
      So there is no size, in tokens x out, at which triton wins an eager step: no crossover to switch at.
    - With dropout, on CUDA: "triton". Its mask is drawn inside the down kernel's loads; the torch backend's
      counter-based mask is ~12 elementwise int64 passes over the (tokens x in) input on CUDA, several times the
      layer's own memory traffic at any size. (On the CPU the torch backend's down node drops x in one fused C++
      pass, csrc/vera_up.cpp dropout_apply: "torch" there, with or without dropout.)
    Re-measure with ``make gpu-check`` when either backend changes."""
    if device.type == "cuda" and dropout and triton_import_error() is None:
        return "triton"
    return "torch"


def resolve_backend(backend: str, device: torch.device, dropout: bool = False) -> str:
    """The concrete backend that runs on ``device`` (``dropout``: whether this call applies adapter dropout, which
    "auto" weighs); raises if the requested one cannot."""
    if backend == "auto":  # (first: this runs in every adapted layer's forward)
        env = env_value(ENV_BACKEND)
        if not env:
            return auto_backend(device, dropout)
        env = env.strip()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"{ENV_BACKEND}={env!r} is not a backend; choose one of {BACKEND_CHOICES}")
            backend = env
        else:
            return auto_backend(device, dropout)
    elif (backend, device.type) in _RUNNABLE:
        return backend
    else:
        check_backend_name(backend)
    if backend == "triton":
        reason = triton_unavailable_reason(device)
        if reason:
            raise RuntimeError(f"vera_kernels: backend 'triton' cannot run here: {reason}")
        if device.type != "cuda":  # the interpreter on the CPU: an environment switch, asked on every call
            return backend
    _RUNNABLE.add((backend, device.type))
    return backend


# (backend, device type) pairs found runnable where that cannot change within a process (triton on CUDA: importable
# once is importable for good), so that an explicit backend is resolved with one set lookup per layer call
_RUNNABLE: set = set()


def fused_base_mode(backend: str):
    """The fused base-GEMM arrangement the up node should use ("cublas-accumulate" or "triton", see
    vera_triton.base_gemm_mode), or None when the base runs as its own GEMM (the default, and every backend but
    triton)."""
    if backend != "triton":
        return None
    mode = get_impl("triton").base_gemm_mode()
    return None if mode == "cublas" else mode


_IMPLS: dict = {}


def get_impl(backend: str):
    """The module of a concrete backend (imported on first use): ``down(x, A_s, dropout_p, seed) -> h`` and
    ``up(base, h, B_s, lambda_d, lambda_b, fused_base=None) -> y`` autograd nodes, ``FLAT`` (whether they take
    (N, features) tensors) and ``SEEDED`` (whether dropout needs a seed from ops.draw_dropout_seed)."""
    impl = _IMPLS.get(backend)
    if impl is None:
        impl = _IMPLS[backend] = _load_impl(backend)
    return impl


def _load_impl(backend: str):
    if backend == "reference":
        from .ops import reference

        return reference
    if backend == "torch":
        from .ops import vera_torch

        return vera_torch
    if backend == "triton":
        from .ops import vera_triton

        return vera_triton
    raise ValueError(f"not a concrete backend: {backend!r}")
