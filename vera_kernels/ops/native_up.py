"""The up node in C++ (``csrc/vera_up.cpp``): loaded once, on first use; else the Python Functions.

``vera_torch.VeraUpFunction`` and the C++ ``VeraUp`` run the same aten ops with the same dtype rules (bit-identical,
``tests/test_native_up.py``). The C++ one keeps the autograd engine in C++ for the whole layer: no Python frame in
forward's node or in backward, ~45-60 us per adapted layer call on the development machine, where a small eager step is
bound by the host (``bench/host_overhead.py``). The triton backend's up node (no fused base) is ``VeraUpPyBackward``:
the same C++ forward, and a backward that calls the triton backend's Python ``_up_bwd_into`` (its Triton launches)
and nothing else in Python; its dropout down node is ``VeraDownPy``, whose forward and backward call
``_down_fwd_native`` / ``_down_bwd_native`` (``native_triton_nodes``). The torch backend's down node with dropout
(or a cast A_s) is ``VeraDown``, whose dropout on the CPU is one fused pass (``dropout_apply``) where the Python
one runs ~40 int64 tensor ops. The triton nodes replay their launches from C++
once a signature has been seen (``launch_replay``), entering Python only for the launch guard.

Loading (first success wins, once per process, under a lock):
1. ``VERA_KERNELS_NATIVE_UP=0`` or ``VERA_KERNELS_NO_NATIVE=1`` -> the Python Function, silently.
2. A JIT build with ``torch.utils.cpp_extension.load`` (about 20 s on a 2-core machine, once: the build folder, next
   to the dequantization extension's, is keyed by a hash of the source, the flags and the torch and Python versions).
3. Otherwise the Python Function, and ONE ``NativeUnavailableWarning`` saying why (results are the same).
The C++ node is used in eager mode only: torch.compile and functorch transforms trace the Python Function.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import warnings
from typing import Callable, Optional

import torch

ENV_NATIVE_UP = "VERA_KERNELS_NATIVE_UP"
SOURCE = "vera_up.cpp"

_lock = threading.Lock()
GENERATION = [0]  # bumped when what the loaders return may change (reset_for_tests, a registration): see native_first
_loaded: list = []  # [callable or None] once loaded
_status = ["not loaded yet (loaded on first use)"]


def _disabled() -> Optional[str]:
    from ..quant import _native

    if _native._truthy(os.environ.get("VERA_KERNELS_NO_NATIVE")):  # (_native.ENV_NO_NATIVE)
        return "disabled by VERA_KERNELS_NO_NATIVE=1"
    value = os.environ.get(ENV_NATIVE_UP)
    if value is not None and not _native._truthy(value):
        return f"disabled by {ENV_NATIVE_UP}={value}"
    return None


def _build():
    from torch.utils import cpp_extension

    from ..quant import _native

    source = _native.csrc_dir() / SOURCE
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found (set {_native.ENV_CSRC})")
    err = _native._ensure_ninja()
    if err:
        raise RuntimeError(err)
    cflags = ["-O2"] if os.name != "nt" else ["/O2"]
    tag = hashlib.sha256(f"{torch.__version__}|{sys.version}|{sys.platform}|{cflags}".encode()
                         + source.read_bytes()).hexdigest()[:16]
    build_dir = _native._cache_base() / f"vera_kernels_up-{tag}"
    with _native.build_lock(build_dir):
        module = cpp_extension.load(name="vera_kernels_up", sources=[str(source)], extra_cflags=cflags,
                                    build_directory=str(build_dir), verbose=_native._truthy(
                                        os.environ.get("VERA_KERNELS_VERBOSE_BUILD")), is_python_module=True)
    return module


def native_up() -> Optional[Callable]:
    """The C++ ``vera_up(base, h, B_s, lambda_d, lambda_b)``, or None (disabled or not buildable here)."""
    module = _module()
    return module.vera_up if module is not None else None


def native_down() -> Optional[Callable]:
    """The C++ ``vera_down(x, A_s, seed, p)`` (the torch backend's down node, VeraDownFunction in C++; on the CPU its
    dropout is one fused pass, no int64 mask tensors), or None (disabled or not buildable here)."""
    module = _module()
    return module.vera_down if module is not None else None


def native_dropout_apply() -> Optional[Callable]:
    """The C++ ``dropout_apply(t, seed, p, inplace=False)`` (vera_torch's seeded dropout of a 2-D tensor, bit for
    bit), or None."""
    module = _module()
    return module.dropout_apply if module is not None else None


def native_linear_plain() -> Optional[Callable]:
    """The C++ ``vera_linear_plain(triton_backward, x, weight, bias, A_s, h, B_s, lambda_d, lambda_b) -> (y, h)``
    (a plain linear base and one adapter without dropout in one call: ops.run_linear), or None. With
    ``triton_backward`` its up node is the triton one, which needs ``native_triton_nodes`` first."""
    module = _module()
    return module.vera_linear_plain if module is not None else None


_triton_nodes: dict = {}  # the functions registered -> (vera_up_py_backward, vera_down_py); one set per process


def native_triton_nodes(up_backward: Callable, down_forward: Callable, down_backward: Callable):
    """The triton backend's C++ nodes ``(vera_up_py_backward, vera_down_py)`` with these Python functions registered
    (``vera_up_py_backward(base, h, B_s, lambda_d, lambda_b)``: the up node's C++ forward, a backward that computes
    G = g^T h, allocates the outputs and sums the partials in C++ and calls ``up_backward(g, h, B_s, lambda_d,
    lambda_b, G, Bl, dlb, grad_h) -> (partials of dlambda_d, LaunchReplay or None)`` for the launches (G, dlb None:
    no lambda gradients; the replay, see ``launch_replay``, runs the same launches at that signature next time);
    ``vera_down_py(x, A_s, seed, p)``: ``down_forward(x, A_s, seed, p) -> (h, LaunchReplay or None)`` and
    ``down_backward(grad_h, A_s, seed, p) -> (grad_x, LaunchReplay or None)``), or None (disabled or not buildable
    here)."""
    key = (up_backward, down_forward, down_backward)
    nodes = _triton_nodes.get(key)
    if nodes is not None:
        return nodes
    module = _module()
    if module is None:
        return None
    with _lock:
        if key not in _triton_nodes:
            if _triton_nodes:
                raise RuntimeError("vera_kernels: the C++ triton nodes' Python functions are already registered")
            module.set_triton_functions(*key)
            _triton_nodes[key] = (module.vera_up_py_backward, module.vera_down_py)
            GENERATION[0] += 1
    return _triton_nodes[key]


def launch_replay(guard: Callable, launches: list, outputs: list):
    """A C++ ``LaunchReplay`` (csrc/vera_up.cpp) of one launch plan, or None where the module does not load.

    ``launches``: ``triton_launch.BoundLaunch.native_spec()`` of each launch; ``outputs``: (shape, dtype) of each
    tensor the plan allocates (appended to the slots, in order); ``guard()``: the stream to launch on, or None to
    take the Python path (``triton_launch.launch_guard``). The up node's backward keeps the replay its Python function
    returns under the call's signature, and later backwards at that signature run it without entering Python but for
    the guard."""
    module = _module()
    return module.LaunchReplay(guard, launches, outputs) if module is not None else None


def clear_replays() -> None:
    """Forget the replays the C++ up node keeps (``triton_launch.clear`` calls this)."""
    if _loaded and _loaded[0] is not None:
        _loaded[0].clear_replays()


def replay_stats() -> dict:
    """How the triton nodes' launches ran, per site (``up_backward``, ``down_forward``, ``down_backward``):
    ``<site>_replayed`` (from C++, by the replays kept now), ``<site>_python`` (through its Python function: a new
    signature, or a call a replay refused) and ``<site>_replays`` (kept)."""
    module = _module()
    return dict(module.replay_stats()) if module is not None else {}


def _module():
    if _loaded:
        return _loaded[0]
    with _lock:
        if not _loaded:
            fn, why = None, _disabled()
            if why is None:
                try:
                    fn = _build()
                    why = "jit-built"
                except Exception as exc:  # never let loading break the caller: the Python Function runs instead
                    from ..quant import _native

                    why = f"build failed: {_native._short(exc, 1500, tail=True)}"
                    warnings.warn(f"vera_kernels: the C++ up node is unavailable ({why}); the torch and triton backends use "
                                  "their Python autograd.Functions (same results, more host time per layer)",
                                  _native.NativeUnavailableWarning, stacklevel=4)
            _status[0] = why
            _loaded.append(fn)
    return _loaded[0]


def native_up_status() -> str:
    return _status[0]


def reset_for_tests() -> None:
    with _lock:
        GENERATION[0] += 1
        _loaded.clear()
        _triton_nodes.clear()
        _status[0] = "not loaded yet (loaded on first use)"
