"""The fast launch path (vera_kernels/ops/triton_launch.py) launches the kernel Triton's own launch would, with the
arguments Triton's launch would pass, for every launch the triton backend makes; checked without a GPU.

1. selection: every distinct launch the backend makes at tests/triton_compile_check.py's GPU shapes and dtypes (its
   recorder drives the launchers on meta tensors), and variants of each: a pointer 16-byte misaligned, of another
   dtype or None; an int argument replaced by 1 (a stride of 1 in another position), a multiple of 16, neither, and
   int64/uint64 values; a float replaced by an int; a bool constexpr passed as an int; other num_warps; another
   target device (sm_80 after sm_90); Triton's debug mode. Each call goes through ``triton_launch.launch`` and then
   through Triton's ``JITFunction.run``; both must reach the same compiled kernel with the same launcher arguments.
   Compilation is replaced by a stand-in ``CompiledKernel`` per Triton cache key (what is checked is which kernel
   each path picks; compiling some ten thousand variants would take hours), made inside Triton's own
   ``_do_compile`` slot, so Triton's binder, specialisation and cache key run unchanged.
   Then the same calls again: every one must be a fast-path hit (the path is really taken).
2. mutations: the same, with the fast path's key blind to one thing it covers (a tensor's dtype, its alignment, an
   int's equal-to-1 / divisible-by-16 / width class, floats, None, keyword values, the device, debug mode), on one
   launch per kernel and its variants; each must produce a wrong selection, which shows that the variants of 1.
   exercise every component of the key.
3. fallbacks: a launch enter hook, a pre-run hook, an instrumentation mode, a patched ``JITFunction.run``,
   ``ENABLED = False`` (``VERA_KERNELS_FAST_LAUNCH=0``) and a launcher of unknown signature each send a call through
   Triton's launch.
4. compiled: one kernel really compiled for sm_90 (Triton's bundled LLVM and ptxas, the stand-in driver of
   tests/triton_compile_check.py, only the final launcher call stubbed): the fast path launches Triton's compiled
   kernel, and a misaligned pointer gets the kernel Triton compiled for it. Both launchers (3.6 and 3.9 signatures)
   are recognised.
5-6. bound launches and the triton backend's launch plans (see bound_runs, plan_runs).
7. replays: the up node's backward replayed from C++ (see replay_runs).

    python tests/fast_launch_check.py [--json FILE] [--triton 3.6.0]
Prints one JSON object (the counts); tests/test_fast_launch.py runs it under the installed triton and triton 3.6.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_compile_check as tcc  # noqa: E402  (sets TRITON_INTERPRET=0 before triton is imported)

if __name__ == "__main__":
    tcc._reexec_with_triton(sys.argv[1:], __file__)

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.compiler.compiler import CompiledKernel  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from vera_kernels.ops import triton_launch as tl  # noqa: E402

OTHER_DTYPE = {torch.float32: torch.float16, torch.float16: torch.bfloat16, torch.bfloat16: torch.float32,
               torch.int64: torch.int32, torch.int8: torch.uint8}
INT_VARIANTS = (1, 7, 112, 2**31 + 16, 2**31 + 7, 2**63 + 16)  # 1, neither, a multiple of 16, int64 x2, uint64


# ============================================================================================ stand-ins
class LauncherCalls:
    """Records every launcher call: (kernel, grid, stream, function, packed metadata, took_fast_path, kernel args)."""

    def __init__(self):
        self.calls = []

    def launcher_for(self, kernel):
        def launcher(gridX, gridY, gridZ, stream, function, *args):
            packed, launch_metadata, enter, exit_ = args[:4]
            if enter is not None:  # as the real launchers do
                enter(launch_metadata)
            # run() always passes its hook chains and launch metadata; the fast path passes None for all three
            self.calls.append((kernel, (gridX, gridY, gridZ), stream, function, packed,
                               launch_metadata is None and enter is None and exit_ is None, args[4:]))
        return launcher


class StandInKernel(CompiledKernel):
    """A CompiledKernel without a binary: one per Triton cache key, created where Triton would compile."""

    run = None  # an instance attribute here (CompiledKernel's is a property that loads the binary)

    def __init__(self, key, launcher_factory):  # noqa: the base __init__ reads a compiled artifact
        self.key, self.name, self.src = key, "stand-in", None
        self.module, self._module_pid = "stand-in", None  # _init_handles: nothing to load
        self.function, self.packed_metadata = object(), object()
        self.run = launcher_factory(self)

    def __del__(self):
        pass


class StandInCompiler:
    """Replaces JITFunction._do_compile: a StandInKernel per Triton key, stored in Triton's kernel cache as Triton
    stores what it compiles."""

    def __init__(self, record: LauncherCalls):
        self.record = record
        self.launcher_factory = record.launcher_for
        self.compiled = 0

    def __enter__(self):
        compiler = self
        self._saved = JITFunction.__dict__["_do_compile"]

        def do_compile(fn, key, signature, device, constexprs, options, attrs, warmup):
            kernel = StandInKernel(key, compiler.launcher_factory)
            fn.device_caches[device][0][key] = kernel
            compiler.compiled += 1
            return kernel

        JITFunction._do_compile = do_compile
        return self

    def __exit__(self, *exc):
        JITFunction._do_compile = self._saved
        return False


def standin_tensor(dtype, misaligned=False):
    """A meta tensor of ``dtype`` whose data_ptr is 16-byte aligned or not (meta pointers are offset * itemsize)."""
    return torch.empty(64, dtype=dtype, device="meta")[1 if misaligned else 0:]


# ============================================================================================ calls
def backend_launches():
    """Every distinct launch the backend makes at the compile check's GPU shapes: [(fn, args, kwargs)]."""
    launches = tcc.record_launches(tcc.load_backend(None))
    return [(launch.fn, tuple(launch.args), dict(launch.kwargs)) for launch in launches]


def variants(fn, args, kwargs):
    """The call itself, then calls that differ from it in one thing Triton specialises on (or does not: floats)."""
    yield args, kwargs
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            yield _with(args, i, standin_tensor(a.dtype, misaligned=True)), kwargs
            yield _with(args, i, standin_tensor(OTHER_DTYPE[a.dtype])), kwargs
            yield _with(args, i, None), kwargs
        elif type(a) is int:
            for v in INT_VARIANTS:
                if v != a:
                    yield _with(args, i, v), kwargs
        elif type(a) is float:
            yield _with(args, i, a + 0.25), kwargs  # same Triton kernel: floats are not specialised
            yield _with(args, i, 0), kwargs  # an int where a float was: another kernel
    for k, v in kwargs.items():
        if type(v) is bool:
            yield args, {**kwargs, k: int(v)}
    yield args, {**kwargs, "num_warps": 8 if kwargs.get("num_warps", 4) != 8 else 2}


def _with(args, i, value):
    return args[:i] + (value,) + args[i + 1:]


def grid_for(n: int) -> tuple:
    return ((3,), (3, 5), (3, 5, 7))[n % 3]


def compare(calls, record: LauncherCalls) -> dict:
    """Each call through the fast path, then through Triton's run(); the launcher calls must agree."""
    out = dict(calls=0, wrong_kernel=0, wrong_args=0, fast=0)
    for n, (fn, args, kwargs) in enumerate(calls):
        grid = grid_for(n)
        record.calls.clear()
        tl.launch(fn, grid, *args, **kwargs)
        fn.run(*args, grid=grid, warmup=False, **kwargs)
        (kf, gf, sf, ff, pf, fast, af), (kr, gr, sr, fr, pr, fast_r, ar) = record.calls
        assert not fast_r
        out["calls"] += 1
        out["fast"] += fast
        if kf is not kr:
            out["wrong_kernel"] += 1
        elif (gf, sf, ff, pf) != (gr, sr, fr, pr) or len(af) != len(ar) or any(
                x is not y and not (type(x) is type(y) and type(x) in (int, float) and x == y) for x, y in zip(af, ar)):
            out["wrong_args"] += 1
    return out


def selection_runs(launches) -> dict:
    """Section 1 for one key function: the variants on sm_90, again (all hits expected), then on sm_80, then with
    Triton's debug mode; Triton's and the fast path's caches start empty."""
    record = LauncherCalls()
    calls = [(fn, a, k) for fn, args, kwargs in launches for a, k in variants(fn, args, kwargs)]
    fns = {fn for fn, _, _ in launches}
    results = {}
    with StandInCompiler(record) as compiler:
        try:
            for fn in fns:
                fn.device_caches.clear()
            tl.clear()
            driver.set_active(tcc._TargetOnlyDriver(90))
            results["sm_90"] = compare(calls, record)
            results["sm_90 again"] = compare(calls, record)
            driver.set_active(tcc._TargetOnlyDriver(80))
            results["sm_80"] = compare([(fn, a, k) for fn, a, k in launches], record)
            driver.set_active(tcc._TargetOnlyDriver(90))
            saved_debug = knobs.runtime.debug
            knobs.runtime.debug = True
            try:
                results["debug"] = compare([(fn, a, k) for fn, a, k in launches], record)
            finally:
                knobs.runtime.debug = saved_debug
        finally:
            driver.set_active(None)
            for fn in fns:
                fn.device_caches.clear()
            tl.clear()
    results["triton_kernels"] = compiler.compiled
    return results


# ============================================================================================ mutations
def _blind_arg(what, a):
    if isinstance(a, torch.Tensor):
        aligned = a.data_ptr() % 16 == 0
        if what == "dtype":
            return standin_tensor(torch.float32, misaligned=not aligned)
        if what == "alignment":
            return standin_tensor(a.dtype)
    elif type(a) is int:
        if what == "int_one" and a == 1:
            return 3
        if what == "int_div16" and a != 1 and a % 16 == 0:
            return a + 3
        if what == "int_width" and not -2**31 <= a < 2**31:
            return a % 16 + 32
    elif type(a) is float and what == "float":
        return 0
    elif a is None and what == "none":
        return standin_tensor(torch.float32)
    return a


def blind_key(what):
    """triton_launch.call_key made blind to one thing: it keys the call as if that thing were erased."""
    real = tl.call_key

    def key(state, device, args, kwargs):
        if what == "device":
            device = 0
        elif what == "kw_types":
            kwargs = {k: int(v) if type(v) is bool else v for k, v in kwargs.items()}
        elif what == "kw_values":
            kwargs = {k: type(v)() for k, v in kwargs.items()}
        elif what == "debug":
            saved, knobs.runtime.debug = knobs.runtime.debug, False
            try:
                return real(state, device, args, kwargs)
            finally:
                knobs.runtime.debug = saved
        else:
            args = tuple(_blind_arg(what, a) for a in args)
        return real(state, device, args, kwargs)

    return key


# (Keyword types are in the key as well, but Triton's own lookup cannot tell them apart: its kernel_key_cache is a
# dict keyed by the specialisation tuple, where ("constexpr", True) == ("constexpr", 1), so it gives a 1 whatever
# it compiled for True first. The fast path keeps the two apart, which is finer and so never wrong.)
MUTATIONS = ("dtype", "alignment", "int_one", "int_div16", "int_width", "float", "none", "kw_values", "device",
             "debug")


def mutation_runs(launches) -> dict:
    out = {}
    real = tl.call_key
    for what in MUTATIONS:
        tl.call_key = blind_key(what)
        try:
            res = selection_runs(launches)
        finally:
            tl.call_key = real
        out[what] = sum(r["wrong_kernel"] + r["wrong_args"] for k, r in res.items() if isinstance(r, dict))
    return out


# ============================================================================================ fallbacks
def fallback_runs(launches) -> dict:
    """Section 3: each condition sends an already cached call through Triton's launch; afterwards it is fast again."""
    record = LauncherCalls()
    fn, args, kwargs = launches[0]

    def took_fast():
        record.calls.clear()
        tl.launch(fn, (2,), *args, **kwargs)
        return record.calls[-1][5]

    def hook(*a, **k):
        hook.calls += 1
    hook.calls = 0
    out = {}
    with StandInCompiler(record) as compiler:
        driver.set_active(tcc._TargetOnlyDriver(90))
        try:
            out["first call (compiles)"] = took_fast()
            out["cached"] = took_fast()
            knobs.runtime.launch_enter_hook.add(hook)
            try:
                out["launch enter hook"] = took_fast()
            finally:
                knobs.runtime.launch_enter_hook.remove(hook)
            out["launch enter hook called"] = hook.calls
            knobs.runtime.launch_exit_hook.add(hook)
            try:
                out["launch exit hook"] = took_fast()
            finally:
                knobs.runtime.launch_exit_hook.remove(hook)
            fn.add_pre_run_hook(hook)
            try:
                out["pre-run hook"] = took_fast()
            finally:
                fn.pre_run_hooks.remove(hook)
            saved = knobs.compilation.instrumentation_mode
            knobs.compilation.instrumentation_mode = "stand-in"
            try:
                out["instrumentation mode"] = took_fast()
            finally:
                knobs.compilation.instrumentation_mode = saved
            tl.ENABLED = False
            try:
                out["switched off"] = took_fast()
            finally:
                tl.ENABLED = True
            real_run = JITFunction.__dict__["run"]
            seen = []

            def patched_run(self, *a, **k):
                seen.append(self)
                return real_run(self, *a, **k)
            JITFunction.run = patched_run
            try:
                out["patched run"] = took_fast()
            finally:
                JITFunction.run = real_run
            out["patched run called"] = len(seen)
            out["cached again"] = took_fast()
            # a compiled kernel whose launcher takes another call: never kept
            compiler.launcher_factory = lambda kernel: (lambda *a: record.launcher_for(kernel)(*a))
            fn.device_caches.clear()
            tl.clear()
            out["unknown launcher, first"] = took_fast()
            out["unknown launcher, again"] = took_fast()
            out["unknown launcher kept"] = len(tl.cached_kernels(fn))
        finally:
            driver.set_active(None)
            fn.device_caches.clear()
            tl.clear()
    return out


# ============================================================================================ bound launches
def _slots_of(args) -> tuple:
    slots = []
    for a in args:
        if isinstance(a, torch.Tensor) and not any(a is t for t in slots):
            slots.append(a)
    return tuple(slots)


def _like(t: torch.Tensor, dtype=None, misaligned=None) -> torch.Tensor:
    """A fresh stand-in tensor like ``t``: the same dtype and 16-byte alignment unless told otherwise."""
    aligned = t.data_ptr() % 16 == 0
    return standin_tensor(dtype or t.dtype, misaligned=(not aligned) if misaligned is None else misaligned)


def bound_runs(launches, blind: bool = False) -> dict:
    """Section 5: triton_launch.bind / BoundLaunch. Every backend launch is bound, then repeated with fresh tensors
    of the same dtypes and alignments (the bound launcher call must be taken: no triton_launch.launch) and with one
    slot at a time misaligned or of another dtype (it must fall back to launch); each call's launcher arguments are
    compared with Triton's own run() on the same arguments. A bound launch must keep no tensor. With ``blind`` its
    per-slot dtype and alignment check is removed: that must produce wrong kernels (the check is what holds)."""
    record = LauncherCalls()
    out = dict(calls=0, unbindable=0, kept_tensors=0, wrong_kernel=0, wrong_args=0, same=0, took_bound=0,
               variant=0, fell_back=0)
    real_launch = tl.launch
    fallbacks = []

    def counting_launch(*a, **k):
        fallbacks.append(1)
        return real_launch(*a, **k)

    with StandInCompiler(record):
        driver.set_active(tcc._TargetOnlyDriver(90))
        try:
            for n, (fn, args, kwargs) in enumerate(launches):
                grid = grid_for(n)
                slots = _slots_of(args)
                with tl.recording() as calls:
                    tl.launch(fn, grid, *args, **kwargs)
                bound = tl.bind(calls[0], slots)
                if bound is None:
                    out["unbindable"] += 1
                    continue
                out["kept_tensors"] += sum(isinstance(a, torch.Tensor) for a in bound.template)
                if blind:
                    bound.specs, bound.slot_order = [], ()
                trials = [("same", tuple(_like(t) for t in slots))]
                for j, t in enumerate(slots):
                    base = [_like(u) for u in slots]
                    trials.append(("variant", tuple(base[:j] + [_like(t, misaligned=t.data_ptr() % 16 == 0)]
                                                    + base[j + 1:])))
                    trials.append(("variant", tuple(base[:j] + [_like(t, dtype=OTHER_DTYPE[t.dtype])]
                                                    + base[j + 1:])))
                for kind, new in trials:
                    sub = tuple(new[next(j for j, t in enumerate(slots) if t is a)] if isinstance(a, torch.Tensor)
                                else a for a in args)
                    record.calls.clear()
                    fallbacks.clear()
                    tl.launch = counting_launch
                    try:
                        bound(new)
                    finally:
                        tl.launch = real_launch
                    fn.run(*sub, grid=grid, warmup=False, **kwargs)
                    (kf, gf, sf, ff, pf, _, af), (kr, gr, sr, fr, pr, _, ar) = record.calls
                    out["calls"] += 1
                    out[kind] += 1
                    out["took_bound" if not fallbacks else "fell_back"] += 1
                    if kf is not kr:
                        out["wrong_kernel"] += 1
                    elif (gf, sf, ff, pf) != (gr, sr, fr, pr) or len(af) != len(ar) or any(
                            x is not y and not (type(x) is type(y) and type(x) in (int, float) and x == y)
                            for x, y in zip(af, ar)):
                        out["wrong_args"] += 1
        finally:
            tl.launch = real_launch
            driver.set_active(None)
            for fn, _, _ in launches:
                fn.device_caches.clear()
            tl.clear()
    return out


def _tensor_spec(a):
    if isinstance(a, torch.Tensor):
        return ("tensor", a.dtype, tuple(a.shape), a.stride(), a.data_ptr() % 16 == 0)
    return a


# (tokens, out, r, dtype, strided) of the plan and replay sections: odd shapes, GPU shapes, every dtype
PLAN_CASES = [(37, 45, 19, torch.float32, False), (300, 4096, 256, torch.bfloat16, False),
              (129, 11008, 64, torch.float16, True), (64, 64, 16, torch.float32, True)]


def rows(M, n, dtype, strided=False, misaligned=False):
    """An (M, n) meta tensor: contiguous, transposed (strided) or 16-byte misaligned."""
    if strided:
        return torch.empty((n, M), dtype=dtype, device="meta").t()
    return torch.empty(M * n + 1, dtype=dtype, device="meta")[1 if misaligned else 0:][:M * n].view(M, n)


@contextlib.contextmanager
def _standin_sm90(record, vt):
    """Stand-in compiled kernels recorded by ``record`` under the sm_90 stand-in driver; undone (and every kept
    kernel, plan and replay forgotten) on exit."""
    with StandInCompiler(record):
        driver.set_active(tcc._TargetOnlyDriver(90))
        try:
            yield
        finally:
            driver.set_active(None)
            for fn in (vt._scale_projection_kernel, vt._vera_down_kernel, vt._vera_up_kernel):
                fn.device_caches.clear()
            tl.clear()


def plan_runs() -> dict:
    """Section 6: the triton backend's launch plans (vera_triton._LaunchPlan: the up node's backward, the dropout
    down node's forward and backward) launch what their unplanned paths launch: the same kernels with the same
    arguments (tensors compared by dtype, shape, strides and alignment), at odd shapes, with a strided input, in
    every dtype, with and without the lambda gradients; a misaligned input on a planned signature gets the kernel
    the unplanned path picks for it; a plan keeps no tensor alive."""
    import gc
    import weakref

    vt = tcc.load_backend(None)
    record = LauncherCalls()
    out = dict(signatures=0, planned=0, same_launches=0, misaligned=0, misaligned_same=0, alive_after=0)
    caches = (vt._UP_BWD_PLANS, vt._DOWN_FWD_PLANS, vt._DOWN_BWD_PLANS)
    seed = torch.empty((), dtype=torch.int64, device="meta")

    def sites(M, n_out, r, dtype, strided, misaligned=False):
        """(name, function, args maker, expected launches) per plan site."""
        B_s = torch.empty((n_out + 3, r), device="meta")[:n_out]
        lambdas = (torch.empty(r, device="meta"), torch.empty(n_out, device="meta"))
        A_s = torch.empty((r, n_out), dtype=dtype, device="meta")
        for need in (True, False):
            yield (f"up_bwd need={need}", vt._up_bwd_impl, lambda need=need: (
                rows(M, n_out, dtype, strided, misaligned), torch.empty((M, r), dtype=dtype, device="meta"), B_s,
                *lambdas, need), 2)
        yield ("down_fwd", vt._down_fwd_impl, lambda: (rows(M, n_out, dtype, strided, misaligned), A_s, seed, 0.1), 1)
        yield ("down_bwd", vt._down_bwd_impl, lambda: (rows(M, r, dtype, strided, misaligned), A_s, seed, 0.1), 1)

    def launched(fn, args):
        record.calls.clear()
        result = fn(*args)
        calls = [(k, grid, tuple(map(_tensor_spec, a))) for k, grid, _, _, _, _, a in record.calls]
        record.calls.clear()  # (they hold the tensors)
        return calls, result

    with _standin_sm90(record, vt):
        for M, n_out, r, dtype, strided in PLAN_CASES:
            for (name, fn, make, n_launches), (_, _, make_odd, _) in zip(
                    sites(M, n_out, r, dtype, strided), sites(M, n_out, r, dtype, strided, misaligned=True)):
                for cache in caches:
                    cache.clear()
                first, _ = launched(fn, make())  # builds the plan
                out["signatures"] += 1
                out["planned"] += sum(len(c) for c in caches)
                again, result = launched(fn, make())  # through the plan
                out["same_launches"] += again == first and len(first) == n_launches
                ref = weakref.ref(result[0] if isinstance(result, tuple) else result)
                del result
                gc.collect()
                out["alive_after"] += ref() is not None
                if not strided:
                    out["misaligned"] += 1
                    planned, _ = launched(fn, make_odd())
                    for cache in caches:
                        cache.clear()
                    unplanned, _ = launched(fn, make_odd())
                    out["misaligned_same"] += planned == unplanned and planned != first
    return out


def replay_runs() -> dict:
    """Section 7: the triton C++ nodes' launches replayed in C++ (csrc/vera_up.cpp LaunchReplay, from the plans'
    BoundLaunch.native_spec): the up node's backward, and the dropout down node's forward and backward. A replay
    launches what the Python path launches: the same kernels, grids, streams, function handles, packed metadata and
    arguments (tensors by dtype, shape, strides and alignment), with no hook or launch metadata passed, at odd
    shapes, with a strided input, in every dtype, with and without the lambda gradients, at two dropout p. A
    misaligned input on a replayed signature, a launch hook, the switch off and another float32 matmul precision each
    send the pass through Python, which launches what the unplanned path launches."""
    from vera_kernels.ops import native_up as NU

    vt = tcc.load_backend(None)
    node, down_node = vt._native_node(0), vt._native_node(1)
    out = dict(native=node is not None and down_node is not None, signatures=0, replayed=0, same_launches=0, misaligned=0, misaligned_same=0,
               refused=0, refused_same=0)
    if not out["native"]:
        return out
    record = LauncherCalls()

    def meta(shape, dtype, grad=False):
        return torch.empty(shape, dtype=dtype, device="meta").requires_grad_(grad)

    def run_pass(M, n_out, r, dtype, variant, strided=False, misaligned=False):
        """The launches of one pass, and how many of its sites ran replayed (up: the backward, 1 site; down: its
        forward and backward, 2), with whether every launch was the fast path's call."""
        kind, value = variant
        before = NU.replay_stats()
        record.calls.clear()
        if kind == "up":
            B_s = torch.empty((n_out + 3, r), device="meta")[:n_out]
            y = node(meta((M, n_out), dtype, True), meta((M, r), dtype, True), B_s, meta(r, torch.float32, value),
                     meta(n_out, torch.float32, value))
            record.calls.clear()  # (the forward launches nothing)
            y.backward(rows(M, n_out, dtype, strided, misaligned))
            sites = ("up_backward",)
        else:
            x = rows(M, n_out, dtype, strided, misaligned).requires_grad_()
            h = down_node(x, meta((r, n_out), dtype), meta((), torch.int64), value)
            h.backward(rows(M, r, dtype))
            sites = ("down_forward", "down_backward")
        calls = [(k, grid, stream, function, packed, tuple(map(_tensor_spec, a)))
                 for k, grid, stream, function, packed, _, a in record.calls]
        fast = all(c[5] for c in record.calls)  # no hook chain or launch metadata passed (the fast path's call)
        record.calls.clear()
        after = NU.replay_stats()
        return calls, (sum(after[f"{s}_replayed"] - before[f"{s}_replayed"] for s in sites), fast)

    def refusals(M, n_out, r, dtype):
        """(name, context) of each change that must send a replayed signature's backward through Python."""
        def hook(*a, **k):
            return None

        @contextlib.contextmanager
        def enter_hook():
            saved = knobs.runtime.launch_enter_hook
            knobs.runtime.launch_enter_hook = hook
            try:
                yield
            finally:
                knobs.runtime.launch_enter_hook = saved

        @contextlib.contextmanager
        def switched_off():
            tl.ENABLED = False
            try:
                yield
            finally:
                tl.ENABLED = True

        @contextlib.contextmanager
        def precision():
            saved = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("high" if saved != "high" else "highest")
            try:
                yield
            finally:
                torch.set_float32_matmul_precision(saved)

        yield "launch hook", enter_hook
        yield "switch off", switched_off
        if dtype == torch.float32:
            yield "precision", precision

    with _standin_sm90(record, vt):
        for M, n_out, r, dtype, strided in PLAN_CASES:
            for variant in (("up", True), ("up", False), ("down", 0.1), ("down", 0.3)):
                sites = 1 if variant[0] == "up" else 2
                tl.clear()
                first, replayed_first = run_pass(M, n_out, r, dtype, variant, strided)  # plans, keeps the replays
                again, replayed = run_pass(M, n_out, r, dtype, variant, strided)
                out["signatures"] += 1
                out["replayed"] += replayed == (sites, True) and replayed_first[0] == 0
                out["same_launches"] += again == first and len(first) == 2
                if strided:
                    continue
                out["misaligned"] += 1
                odd, replayed_odd = run_pass(M, n_out, r, dtype, variant, misaligned=True)
                tl.clear()
                unplanned, _ = run_pass(M, n_out, r, dtype, variant, misaligned=True)
                # (the down node's backward gradient stays aligned: its replay may run, the forward's may not)
                out["misaligned_same"] += replayed_odd[0] == sites - 1 and odd == unplanned and odd != first
                for _, context in refusals(M, n_out, r, dtype):
                    tl.clear()
                    run_pass(M, n_out, r, dtype, variant)
                    run_pass(M, n_out, r, dtype, variant)  # replayed from here on
                    with context():
                        refused, replayed_refused = run_pass(M, n_out, r, dtype, variant)
                        tl.clear()
                        unplanned, _ = run_pass(M, n_out, r, dtype, variant)
                    out["refused"] += 1
                    out["refused_same"] += replayed_refused[0] == 0 and refused == unplanned
    return out


# ============================================================================================ compiled
def compiled_run() -> dict:
    """Section 4: _scale_projection_kernel compiled for sm_90, the launcher call recorded (no GPU)."""
    from triton.backends.nvidia.driver import CudaLauncher

    vt = tcc.load_backend(None)
    fn = vt._scale_projection_kernel
    record = LauncherCalls()
    saved = (CompiledKernel.__dict__["run"], CompiledKernel.__dict__["_init_handles"])
    launchers = {}
    CompiledKernel.run = property(lambda k: launchers.setdefault(id(k), record.launcher_for(k)))
    CompiledKernel._init_handles = lambda k: None
    driver.set_active(tcc._TargetOnlyDriver(90))
    out = {}
    try:
        B, lb = standin_tensor(torch.float32), standin_tensor(torch.float32)
        P = standin_tensor(torch.bfloat16)
        kwargs = dict(HAS_LD=False, HAS_DLB=False, BLOCK_O=64, BLOCK_R=16)
        rows = []
        for P_arg in (P, standin_tensor(torch.bfloat16, misaligned=True)):
            args = (B, lb, lb, P_arg, P_arg, P_arg, 4096, 16, 16, 1, 0, 0)
            for _ in range(2):
                record.calls.clear()
                tl.launch(fn, (64,), *args, **kwargs)
                triton_choice = fn.run(*args, grid=(64,), warmup=True, **kwargs)  # compiles or finds; no launch
                kernel, fast = record.calls[0][0], record.calls[0][5]
                rows.append(dict(fast=fast, same=kernel is triton_choice, compiled=isinstance(kernel, CompiledKernel),
                                 kernel=id(kernel)))
        out["launches"] = rows
    finally:
        CompiledKernel.run, CompiledKernel._init_handles = saved
        driver.set_active(None)
        fn.device_caches.clear()
        tl.clear()
    known = {"nvidia": tl._known_launcher(CudaLauncher.__new__(CudaLauncher))}
    try:
        from triton.backends.amd.driver import HIPLauncher
        known["amd"] = tl._known_launcher(HIPLauncher.__new__(HIPLauncher))
    except ImportError:
        pass
    out["launchers known"] = known
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("--triton", metavar="VERSION", help="run under triton==VERSION (as triton_compile_check.py)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    launches = backend_launches()
    result = dict(triton=triton.__version__, supported=tl._SUPPORTED, launches=len(launches))
    result["selection"] = selection_runs(launches)
    # one launch per kernel is enough for a blind key to pick a wrong kernel among its variants
    result["mutations"] = mutation_runs(list({fn.__name__: (fn, a, k) for fn, a, k in launches}.values()))
    result["fallbacks"] = fallback_runs(launches)
    result["bound"] = bound_runs(launches)
    result["bound, blind"] = bound_runs(launches, blind=True)
    result["plans"] = plan_runs()
    result["replays"] = replay_runs()
    result["compiled"] = compiled_run()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
