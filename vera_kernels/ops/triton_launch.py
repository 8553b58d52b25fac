"""A fast path for launching an already compiled Triton kernel: ``launch(kernel, grid, *args, **kwargs)`` does what
``kernel[grid](*args, **kwargs)`` does, with a fraction of the host time once the kernel was compiled for such a call.

``kernel[grid](...)`` goes through ``JITFunction.run`` on every call: it binds the arguments, specialises each one
(``native_specialize_impl``), stringifies a cache key, looks the compiled kernel up, checks the kernel's global
values, builds launch metadata and only then calls the compiled kernel's launcher: tens of us of Python per launch
on a small host, which a host-bound training step pays for each of its launches (bench/host_overhead.py). Here a
call computes a key of its own from everything Triton specialises on, finds the compiled kernel Triton chose for
that key before, and calls its launcher with the arguments ``run`` would pass. Any other call, and the first one for
a key, goes through ``kernel[grid](...)`` unchanged (compiling if needed); its result is then kept for the key.

Invariants (what makes a hit launch the kernel Triton would launch, with the arguments Triton would pass):

1. The key is at least as fine as Triton's in-memory cache key (``compute_cache_key``: the specialisation of every
   argument plus the options dict ``run`` builds), so one key of ours never stands for two of Triton's. It holds
   - the current device (Triton keeps one kernel cache per device);
   - per positional argument: a tensor's dtype and whether ``data_ptr() % 16 == 0``; an int's width class (int32,
     int64 or uint64, as Triton types it), whether it equals 1 (Triton bakes a 1 in as a constant) and whether it is
     divisible by 16; ``float`` (Triton types every Python float fp32 and does not specialise its value); ``bool``
     and its value (Triton: u1, value not specialised); None;
   - the keyword arguments (constexprs and launch options: num_warps, num_stages, ...): names, types and values.
     The types keep ``True`` and ``1`` apart, which are equal in Python but not the same constexpr (Triton's own
     lookup, a dict keyed by the specialisation tuple, lets whichever it compiled first answer for both: finer here,
     never coarser). Only kwargs of types whose ``==`` says all that their ``str`` says (bool, int, str, None) are
     kept (not floats: ``-0.0 == 0.0``);
   - the debug flags ``run`` folds into the options (``fn.debug``, ``knobs.runtime.debug``).
   The triton version is fixed for the process and checked at import (invariant 5). A call that would need more in
   the key is never kept: an argument of another type (tuples, dtypes, numpy scalars, ...), a constexpr passed
   positionally, a parameter left to its default.
2. Only a plain ``JITFunction`` takes the fast path, and only while nothing can observe or alter the launch:
   ``JITFunction.run`` is Triton's (not patched, e.g. by tests/triton_compile_check.py's recorder), the kernel has no
   pre-run hooks, no launch enter/exit hook is registered (``knobs.runtime.launch_enter_hook`` / ``_exit_hook``:
   profilers such as proton add theirs there), no instrumentation mode, pipeline-inspection hook or (3.9) fpsan is
   set. Checked on every call; any of them sends the call through ``kernel[grid](...)``. Under ``TRITON_INTERPRET=1``
   the kernels are interpreter functions, not ``JITFunction``s (no compiled kernels): always the normal path.
3. A kernel is kept only when it is a ``CompiledKernel`` whose launcher takes the call ``run`` makes: parameters
   ``gridX, gridY, gridZ, stream, function`` then ``*args`` (3.6) or ``kernel_metadata, launch_metadata,
   launch_enter_hook, launch_exit_hook, *args`` (3.9). On every hit the kernel's launcher must still be the one
   checked, and the global values the kernel was compiled against unchanged, as ``run`` checks (a change takes the
   normal path, which raises Triton's error).
4. The launcher gets what ``run`` gives it: the grid padded to 3 dimensions, the current stream, the kernel's function
   handle and packed metadata, and every argument in signature order (constexprs included: the launcher drops
   them). ``run`` also passes the hook chains and launch metadata, which with no hook registered do nothing; here
   they are None, which both launchers skip.
5. Triton 3.6.x and 3.9.x only, the versions whose ``JITFunction.run`` and launchers this was written against; with
   any other version every launch takes the normal path.

Bound launches (``bind``, ``BoundLaunch``): cheaper still, for a call site that repeats one launch with the same
scalar arguments call after call (the triton backend's backward, per shape: ``vera_triton._LaunchPlan``). The
site records its launches once (``recording``), binds each one to its tensors' places ("slots"), and keys the bound
launches by what determines every scalar argument; a bound call then checks only each slot's dtype and alignment
(and invariants 2-4) before calling the launcher, and otherwise takes ``launch``. A bound launch keeps no tensor.
A replay outside Python (the triton up node's backward in C++, csrc/vera_up.cpp ``LaunchReplay``) makes the same
checks and calls from ``BoundLaunch.native_spec()``, with ``launch_guard`` (one Python call) for the invariants it
cannot read itself. tests/fast_launch_check.py checks every path against Triton's own launch.

``VERA_KERNELS_FAST_LAUNCH=0`` (read at import) switches the fast path off, bound launches included: every launch
through ``kernel[grid](...)``.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import threading
from typing import Any

import torch
import triton
from triton import knobs
from triton.compiler.compiler import CompiledKernel
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

ENV_FAST_LAUNCH = "VERA_KERNELS_FAST_LAUNCH"
SUPPORTED_TRITON = ("3.6", "3.9")

_TRITON_RUN = JITFunction.__dict__["run"]
# a version this was not written for, or a run already patched when this is imported: the fast path is off for good
_SUPPORTED = (".".join(triton.__version__.split(".")[:2]) in SUPPORTED_TRITON
              and getattr(_TRITON_RUN, "__module__", "") == "triton.runtime.jit")
_HOOK_CHAIN = getattr(knobs, "HookChain", None)
_HAS_FPSAN = hasattr(type(knobs.compilation), "fpsan_homomorphic_casts")  # 3.9: a knob run() puts into the options

# The launcher's parameters before ``*args``: 3.6 (the head alone) and 3.9 (the head, then the rest).
_LAUNCHER_HEAD = ("gridX", "gridY", "gridZ", "stream", "function")
_LAUNCHER_39 = ("kernel_metadata", "launch_metadata", "launch_enter_hook", "launch_exit_hook")
_PLAIN_TYPES = (bool, int, str, type(None))
_GRID_PAD = {1: (1, 1), 2: (1,), 3: ()}
_MISSING = object()


def _enabled_from_env() -> bool:
    env = os.environ.get(ENV_FAST_LAUNCH)
    if env is None or env == "1":
        return True
    if env == "0":
        return False
    raise ValueError(f"{ENV_FAST_LAUNCH}={env!r}: use 0 (off) or 1 (on, the default)")


# Read once: an environment lookup per launch would cost a good part of what the fast path saves.
ENABLED = _enabled_from_env()


class _KernelState:
    """Per kernel: whether the fast path applies to it at all, its parameter layout and the compiled kernels kept."""

    __slots__ = ("fn", "usable", "names", "n_leading", "constexpr_names", "entries")

    def __init__(self, fn):
        self.fn = fn
        self.usable = _SUPPORTED and type(fn) is JITFunction
        params = fn.params if self.usable else []
        self.names = tuple(p.name for p in params)
        # positional arguments are keyed as runtime arguments: those before the first constexpr parameter
        self.n_leading = next((i for i, p in enumerate(params) if p.is_constexpr), len(params))
        self.constexpr_names = frozenset(p.name for p in params if p.is_constexpr)
        self.entries: dict = {}  # key -> (CompiledKernel, its launcher, names of the parameters passed by keyword)


# id(kernel) -> _KernelState (by id: hashing a JITFunction hashes its source under a lock)
_STATES: dict = {}


def launch(fn, grid: tuple, *args, **kwargs):
    """``fn[grid](*args, **kwargs)``, through the kernel Triton compiled for such a call before when there is one
    (see the module docstring). Returns what Triton's launch returns: the compiled kernel."""
    if _RECORDING.calls is not None:
        _RECORDING.calls.append((fn, grid, args, kwargs))
    state = _STATES.get(id(fn))
    if state is None or state.fn is not fn:
        state = _STATES[id(fn)] = _KernelState(fn)
    pad = _GRID_PAD.get(len(grid)) if type(grid) is tuple else None  # a callable grid: the normal path
    if not (ENABLED and state.usable) or pad is None or _observed(fn):
        return fn[grid](*args, **kwargs)
    device = driver.active.get_current_device()
    key = call_key(state, device, args, kwargs)
    try:
        entry = state.entries.get(key) if key is not None else None
    except TypeError:  # an unhashable keyword value: not keyed
        entry = key = None
    if entry is not None:
        kernel, launcher, kw_params = entry
        if kernel.run is launcher and (not fn.used_global_vals or _globals_unchanged(fn)):
            g0, g1, g2 = grid + pad
            launcher(g0, g1, g2, driver.active.get_current_stream(device), kernel.function, kernel.packed_metadata,
                     None, None, None, *args, *map(kwargs.__getitem__, kw_params))
            return kernel
    kernel = fn.run(*args, grid=grid, warmup=False, **kwargs)
    if key is not None:
        _record(state, key, kernel, args, kwargs)
    return kernel


class BoundLaunch:
    """One launch kept to be repeated with other tensors in the same places (made by ``bind``): the cheapest
    relaunch, for a call site that launches one kernel with the same scalar arguments call after call (a layer's
    backward at a fixed shape). ``bound(slots)`` launches again with ``slots[j]`` wherever the bound call had the
    j-th slot's tensor; its cost is one dtype and alignment check per slot, not a key over every argument.

    Invariant (the caller's): whatever decides to reuse a BoundLaunch must determine every non-tensor argument
    (ints, floats, constexprs, the grid); they are replayed as bound. The BoundLaunch checks the rest, on every call:
    each slot's dtype and 16-byte alignment against the bound tensor's, the current device, and invariants 2 and 3
    of the module docstring (nothing observing the launch, the same launcher, unchanged globals, the switch on).
    Any difference sends the call through ``launch`` with the substituted arguments: never a kernel compiled for
    other tensors."""

    __slots__ = ("fn", "grid", "kwargs", "kernel", "launcher", "device", "template", "kw_values", "positions",
                 "slot_order", "specs", "g0", "g1", "g2")

    def __init__(self, fn, grid, kwargs, kernel, launcher, device, args, kw_params, positions, specs):
        self.fn, self.grid, self.kwargs = fn, grid, kwargs
        self.kernel, self.launcher, self.device = kernel, launcher, device
        # no tensor is kept (a kept one would outlive its step: memory, and the h that vera_kernels.sharing holds
        # weakly so that it dies with its graph): each call fills them in from its slots
        self.template = [None if isinstance(a, torch.Tensor) else a for a in args]
        self.kw_values = tuple(kwargs[n] for n in kw_params)
        self.positions = positions  # ((argument index, slot index), ...)
        self.slot_order = tuple(j for j, _, _ in specs)  # the slots used, each once
        self.specs = [(dtype, aligned) for _, dtype, aligned in specs]  # (a list: compared with a list per call)
        self.g0, self.g1, self.g2 = grid + _GRID_PAD[len(grid)]

    def __call__(self, slots):
        try:  # one comparison of every used slot's (dtype, aligned) with the bound ones (None: no data_ptr, falls back)
            same = [(t.dtype, t.data_ptr() % 16 == 0) for t in map(slots.__getitem__, self.slot_order)] == self.specs
        except AttributeError:
            same = False
        args = self.template.copy()
        for i, j in self.positions:
            args[i] = slots[j]
        if not (same and ENABLED and self.ready() and driver.active.get_current_device() == self.device):
            return launch(self.fn, self.grid, *args, **self.kwargs)
        kernel = self.kernel
        self.launcher(self.g0, self.g1, self.g2, driver.active.get_current_stream(self.device), kernel.function,
                      kernel.packed_metadata, None, None, None, *args, *self.kw_values)
        return kernel

    def ready(self) -> bool:
        """Invariants 2 and 3 for this launch, now: nothing observes it, the same launcher, unchanged globals."""
        fn = self.fn
        return (self.kernel.run is self.launcher and not _observed(fn)
                and (not fn.used_global_vals or _globals_unchanged(fn)))

    def native_spec(self) -> tuple:
        """This launch for a replay outside Python (csrc/vera_up.cpp, LaunchReplay, which does what ``__call__``
        does, with ``launch_guard`` for the checks it cannot make): (kernel, launcher, (g0, g1, g2), the bound
        arguments (tensor places None), ((argument index, slot), ...), ((slot, dtype, aligned), ...), the keyword
        values in launcher order)."""
        specs = tuple((j, dtype, aligned) for j, (dtype, aligned) in zip(self.slot_order, self.specs))
        return (self.kernel, self.launcher, (self.g0, self.g1, self.g2), tuple(self.template), self.positions, specs,
                self.kw_values)


def launch_guard(bounds, device):
    """What a replay of ``bounds`` (BoundLaunches bound on ``device``) outside Python checks before each relaunch,
    having compared every slot's dtype and alignment itself: the switch on, the same current device, and each
    launch ``ready()`` (inlined: this runs once per replayed backward). Returns the stream to launch on, or None
    (take the Python path)."""
    if not ENABLED or _observed_globally():
        return None
    active = driver.active
    if active.get_current_device() != device:
        return None
    for bound in bounds:
        fn = bound.fn
        if (bound.kernel.run is not bound.launcher or type(fn).run is not _TRITON_RUN or "run" in fn.__dict__
                or fn.pre_run_hooks or (fn.used_global_vals and not _globals_unchanged(fn))):
            return None
    return active.get_current_stream(device)


class _Recording(threading.local):
    calls = None  # a list while a thread records its launches (``recording``), else None


_RECORDING = _Recording()


@contextlib.contextmanager
def recording():
    """Collects the launches this thread makes inside the block, as (fn, grid, args, kwargs), for ``bind``."""
    saved, calls = _RECORDING.calls, []
    _RECORDING.calls = calls
    try:
        yield calls
    finally:
        _RECORDING.calls = saved


def bind(call: tuple, slots: tuple):
    """A ``BoundLaunch`` repeating ``call`` (fn, grid, args, kwargs), one recorded by ``recording``, with other
    ``slots`` (a tuple of tensors or None: every tensor argument of the call must be one of them, by identity); None
    where the call cannot be bound: the fast path did not keep the kernel it launched (it does not apply to this
    call, or the switch is off), or a tensor argument is not a slot."""
    fn, grid, args, kwargs = call
    state = _STATES.get(id(fn))
    if state is None or state.fn is not fn or not (ENABLED and state.usable) or type(grid) is not tuple \
            or len(grid) not in _GRID_PAD or _observed(fn):
        return None
    device = driver.active.get_current_device()
    key = call_key(state, device, args, kwargs)
    try:
        entry = state.entries.get(key) if key is not None else None
    except TypeError:
        return None
    if entry is None:
        return None
    positions, specs, seen = [], [], set()
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            j = next((j for j, t in enumerate(slots) if t is a), None)
            if j is None:
                return None
            positions.append((i, j))
            if j not in seen:
                seen.add(j)
                specs.append((j, a.dtype, a.data_ptr() % 16 == 0))
    kernel, launcher, kw_params = entry
    return BoundLaunch(fn, grid, dict(kwargs), kernel, launcher, device, args, kw_params, tuple(positions),
                       tuple(specs))


_PLAN_CACHES: list = []


def plan_cache(limit: int = 256) -> "PlanCache":
    """A dict for a call site's bound launches, by the site's own key; ``clear()`` empties it with the kernels."""
    cache = PlanCache(limit)
    _PLAN_CACHES.append(cache)
    return cache


class PlanCache(dict):
    """A call site's plans by key, emptied when it would grow past ``limit`` (shapes that change every step)."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def put(self, key, plan) -> None:
        if len(self) >= self.limit:
            self.clear()
        self[key] = plan


def call_key(state: _KernelState, device, args: tuple, kwargs: dict):
    """The cache key of a call (invariant 1), or None when the call is not keyed (an argument of a type the key does
    not cover, or a constexpr passed positionally).

    A tuple: device, fn.debug, knobs.runtime.debug, the keyword arguments as three tuples (names, types, values),
    then per positional argument, flat: a tensor -> dtype, aligned16; an int -> width (0 int32, 1 int64, 2 uint64,
    3 out of range: Triton raises), == 1, divisible by 16; a float -> ``float``; None -> None; a bool -> ``bool``,
    value. Each kind's first item (a dtype, a small int, a type, None) tells it apart from every other kind's, so two
    different argument lists never flatten to one key."""
    if len(args) > state.n_leading:
        return None
    values = tuple(kwargs.values())
    # types before values: tuples compare item by item, so values of different types are never compared
    key = [device, state.fn.debug, knobs.runtime.debug, tuple(kwargs), tuple(map(type, values)), values]
    append = key.append
    for a in args:
        if type(a) is int:
            append(0 if -0x80000000 <= a <= 0x7FFFFFFF else _int_width(a))
            append(a == 1)
            append(a % 16 == 0)
        elif isinstance(a, torch.Tensor):
            append(a.dtype)
            append(a.data_ptr() % 16 == 0)
        elif type(a) is float:
            append(float)
        elif a is None:
            append(None)
        elif type(a) is bool:
            append(bool)
            append(a)
        else:
            return None
    return tuple(key)


def _int_width(a: int) -> int:
    """Triton's type for an int argument: 0 int32, 1 int64, 2 uint64, 3 none (Triton raises)."""
    if -0x80000000 <= a <= 0x7FFFFFFF:
        return 0
    if -0x8000000000000000 <= a <= 0x7FFFFFFFFFFFFFFF:
        return 1
    return 2 if 0 <= a <= 0xFFFFFFFFFFFFFFFF else 3


def _observed(fn: JITFunction) -> bool:
    """Invariant 2: something could observe or alter this launch, or ``run`` is not Triton's."""
    return bool(type(fn).run is not _TRITON_RUN or "run" in fn.__dict__ or fn.pre_run_hooks or _observed_globally())


def _observed_globally() -> bool:
    """Invariant 2's part common to every kernel: a launch hook, an inspection hook, instrumentation, fpsan."""
    rt = knobs.runtime
    enter, exit_ = rt.launch_enter_hook, rt.launch_exit_hook  # (_hook_set, inlined)
    return bool((enter is not None and (type(enter) is not _HOOK_CHAIN or bool(enter.calls)))
                or (exit_ is not None and (type(exit_) is not _HOOK_CHAIN or bool(exit_.calls)))
                or rt.add_stages_inspection_hook is not None or knobs.compilation.instrumentation_mode
                or (_HAS_FPSAN and knobs.compilation.fpsan_homomorphic_casts))


def _globals_unchanged(fn: JITFunction) -> bool:
    # the check run() makes before each launch (the normal path raises its error)
    for (name, _), (val, globals_dict) in fn.used_global_vals.items():
        if globals_dict.get(name, _MISSING) != val:
            return False
    return True


def _record(state: _KernelState, key, kernel, args: tuple, kwargs: dict) -> None:
    """Keep ``kernel`` (what Triton's launch returned) for ``key`` where invariants 1 and 3 hold."""
    if not isinstance(kernel, CompiledKernel):  # e.g. an async-compile future
        return
    kw_params = state.names[len(args):]
    if any(n not in kwargs or n not in state.constexpr_names for n in kw_params):
        return  # a parameter left to its default, or a runtime one passed by keyword
    if any(type(v) not in _PLAIN_TYPES for v in kwargs.values()):
        return
    launcher = kernel.run
    if _known_launcher(launcher):
        state.entries[key] = (kernel, launcher, kw_params)


def _known_launcher(launcher: Any) -> bool:
    """Invariant 3: the launcher takes the positional call run() makes."""
    try:
        params = list(inspect.signature(launcher).parameters.values())
    except (TypeError, ValueError):
        return False
    if not params or params[-1].kind is not inspect.Parameter.VAR_POSITIONAL:
        return False
    if any(p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params[:-1]):
        return False
    return tuple(p.name for p in params[:-1]) in (_LAUNCHER_HEAD, _LAUNCHER_HEAD + _LAUNCHER_39)


def cached_kernels(fn) -> dict:
    """The kernels kept for ``fn``, by key (for tests)."""
    state = _STATES.get(id(fn))
    return dict(state.entries) if state is not None and state.fn is fn else {}


_CLEAR_HOOKS: list = []  # called by clear(): what keeps bound launches elsewhere (native_up.clear_replays)


def on_clear(hook) -> None:
    """Have ``clear()`` call ``hook()`` too (once per hook)."""
    if hook not in _CLEAR_HOOKS:
        _CLEAR_HOOKS.append(hook)


def clear() -> None:
    """Forget every kept kernel (Triton's own cache is untouched), every plan and whatever ``on_clear`` registered."""
    for state in _STATES.values():
        state.entries.clear()
    for cache in _PLAN_CACHES:
        cache.clear()
    for hook in _CLEAR_HOOKS:
        hook()
