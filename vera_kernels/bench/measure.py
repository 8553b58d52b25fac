"""Measuring: timers (CPU perf_counter, CUDA events), statistics, saved-activation bytes, peak memory, and the
alternating runner every case goes through.

A *workload* is one implementation of one case: forward(i) -> tensor, backward(out, i), an optional optimizer step,
zero() to clear gradients, and the storages that are not activations (parameters, buffers, inputs). The runner
warms every workload up, takes one memory pass per workload, then times rounds in which the implementations
alternate (A B C, B C A, C A B, ...: never AAA BBB), rotating among a few input tensors.
"""

from __future__ import annotations

import ctypes
import gc
import math
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..sharing import observing_hook

TIME_KEYS = ("fwd_ms", "bwd_ms", "fwdbwd_ms", "step_ms")


# ---------------------------------------------------------------------------------------------- statistics
def summarize(xs: list[float]) -> dict:
    """median, quartiles (inclusive method), min, max and count of a sample."""
    xs = sorted(float(x) for x in xs)
    if not xs:
        return {"median": None, "q1": None, "q3": None, "min": None, "max": None, "n": 0}
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {"median": statistics.median(xs), "q1": q1, "q3": q3, "min": xs[0], "max": xs[-1], "n": len(xs)}


# ---------------------------------------------------------------------------------------------- workloads
@dataclass
class Workload:
    impl: str
    forward: Callable[[int], torch.Tensor]
    backward: Callable[[torch.Tensor, int], None]
    opt_step: Optional[Callable[[], None]]
    zero: Callable[[], None]
    not_activations: Callable[[], set]  # storage data_ptrs that are not activations (params, buffers, inputs)
    keep: list = field(default_factory=list)  # objects the workload needs alive (models, optimizers)


def storage_ptrs(tensors) -> set:
    out = set()
    for t in tensors:
        if isinstance(t, torch.Tensor):
            try:
                out.add(t.untyped_storage().data_ptr())
            except Exception:  # pragma: no cover - tensors without storage
                pass
    return out


def _cached_tensors(obj, out: list, depth: int = 0) -> None:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif depth < 3 and isinstance(obj, (tuple, list)):
        for o in obj:
            _cached_tensors(o, out, depth + 1)
    elif depth < 3 and isinstance(obj, dict):
        for o in obj.values():
            _cached_tensors(o, out, depth + 1)


def module_storage_ptrs(module: torch.nn.Module) -> set:
    """Storages of the module's state: parameters, buffers, and tensors held in per-module caches (attributes whose
    name ends in "_cache", e.g. VeraProjections' cached dtype casts of A and B): model state, not activations."""
    tensors = list(module.parameters()) + list(module.buffers())
    for sub in module.modules():
        for name, val in vars(sub).items():
            if name.endswith("_cache") and isinstance(val, dict):
                _cached_tensors(val, tensors)
    return storage_ptrs(tensors)


# ---------------------------------------------------------------------------------------------- timers
class CpuTimer:
    """Wall-clock time with time.perf_counter around each phase (CPU work is synchronous)."""

    method = "time.perf_counter"

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        pass

    def iteration(self, w: Workload, i: int) -> tuple[float, float, float]:
        t0 = time.perf_counter()
        out = w.forward(i)
        t1 = time.perf_counter()
        w.backward(out, i)
        del out
        t2 = time.perf_counter()
        if w.opt_step is not None:
            w.opt_step()
        t3 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3


def l2_flush_buffer(device: torch.device) -> torch.Tensor:
    """256 MiB whose zeroing evicts everything from the L2 cache (H100: 50 MiB) before a timed iteration."""
    return torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)


class CudaTimer:
    """CUDA events around each phase; before each iteration a 256 MiB buffer is zeroed so that the L2 cache holds
    nothing of the previous implementation's data (as triton.testing.do_bench does)."""

    method = "cuda events (L2 flushed before each iteration)"

    def __init__(self, device: torch.device):
        self.device = device
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        self.flush_buf = l2_flush_buffer(device)

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def iteration(self, w: Workload, i: int) -> tuple[float, float, float]:
        e0, e1, e2, e3 = self.events
        self.flush_buf.zero_()
        e0.record()
        out = w.forward(i)
        e1.record()
        w.backward(out, i)
        del out
        e2.record()
        if w.opt_step is not None:
            w.opt_step()
        e3.record()
        e3.synchronize()
        return e0.elapsed_time(e1), e1.elapsed_time(e2), e2.elapsed_time(e3)


def make_timer(device: torch.device):
    return CudaTimer(device) if device.type == "cuda" else CpuTimer(device)


# ---------------------------------------------------------------------------------------------- saved bytes
class SavedBytesCounter:
    """saved_tensors_hooks pack hook: records every storage autograd keeps for backward, once per storage
    (deduplicated by data_ptr). ``bytes(excluded)`` sums them without the storages in ``excluded`` (parameters,
    buffers, caches, inputs), computed after the forward so that state created lazily during it is known."""

    def __init__(self, excluded: Optional[set] = None):
        self.excluded = excluded or set()
        self.storages: dict = {}

    def pack(self, t):
        try:
            st = t.untyped_storage()
            ptr, nbytes = st.data_ptr(), st.nbytes()
        except Exception:  # pragma: no cover - e.g. tensor subclasses without storage
            return t
        if ptr:
            self.storages[ptr] = nbytes
        return t

    observing_hook(pack)  # an observer: sibling layers still share h while it counts (vera_kernels.sharing)

    @staticmethod
    def unpack(t):
        return t

    def bytes(self, excluded: Optional[set] = None) -> int:
        ex = self.excluded | (excluded or set())
        return sum(n for p, n in self.storages.items() if p not in ex)

    @property
    def total(self) -> int:
        return self.bytes()


# ---------------------------------------------------------------------------------------------- peak memory
def _read_status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss_bytes() -> Optional[int]:
    kb = _read_status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except Exception:
        return None


def _malloc_trim() -> None:
    """Give free heap pages back to the OS (glibc), so the RSS baseline of a memory pass is not inflated by
    memory freed earlier and the pass's growth shows up. A no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


class CpuPeak:
    """Peak RSS growth over one pass: trim the heap, reset the kernel's high-water mark (VmHWM, by writing 5 to
    /proc/self/clear_refs), run, read VmHWM - RSS at the start. Falls back to sampling RSS from a thread."""

    kind = "rss_delta"

    def __init__(self):
        self._sampler: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._max = 0
        self.base = 0
        self.mode = None

    def start(self) -> None:
        _malloc_trim()
        self.base = _rss_bytes() or 0
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            if _read_status_kb("VmHWM") is None:
                raise OSError("no VmHWM")
            self.mode = "hwm"
            return
        except OSError:
            pass
        if _rss_bytes() is None:
            self.mode = None
            return
        self.mode = "sampler"
        self._max = self.base
        self._stop.clear()

        def loop():
            while not self._stop.is_set():
                v = _rss_bytes() or 0
                if v > self._max:
                    self._max = v
                time.sleep(0.0005)

        self._sampler = threading.Thread(target=loop, daemon=True)
        self._sampler.start()

    def stop(self) -> Optional[int]:
        if self.mode == "hwm":
            hwm = _read_status_kb("VmHWM")
            return max(0, hwm * 1024 - self.base) if hwm is not None else None
        if self.mode == "sampler":
            self._stop.set()
            self._sampler.join()
            return max(0, self._max - self.base)
        return None


class CudaPeak:
    """torch.cuda.max_memory_allocated over one pass, minus what was allocated when it started."""

    kind = "cuda_alloc_delta"

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0

    def start(self) -> None:
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)

    def stop(self) -> Optional[int]:
        torch.cuda.synchronize(self.device)
        return max(0, torch.cuda.max_memory_allocated(self.device) - self.base)


def make_peak(device: torch.device):
    return CudaPeak(device) if device.type == "cuda" else CpuPeak()


# ---------------------------------------------------------------------------------------------- the runner
def _short_error(exc: BaseException) -> str:
    msg = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return msg if len(msg) <= 160 else msg[:157] + "..."


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())) or "out of memory" in str(exc).lower()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


@dataclass
class Measured:
    """What the runner measured for one workload (or why it could not)."""

    impl: str
    error: Optional[str] = None
    times: dict = field(default_factory=dict)  # key -> list of ms
    saved_bytes: Optional[int] = None
    peak_bytes: Optional[int] = None
    gpu_fwdbwd_ms: Optional[float] = None  # CUDA only: one fwd+bwd replayed from a CUDA graph (no host overhead)
    gpu_note: Optional[str] = None  # why gpu_fwdbwd_ms is missing


def graph_replay_ms(step: Callable[[], None], device: torch.device, reset: Callable[[], None] = lambda: None,
                    replays: int = 10) -> float:
    """GPU time of ``step`` captured in a CUDA graph and replayed: what it costs when the host (Python, dispatch,
    kernel launches) is out of the picture, as with CUDA graphs in training or a host fast enough to keep the GPU
    fed. Median of ``replays`` replays timed with CUDA events, the L2 cache flushed before each (outside the timed
    region, as CudaTimer and triton.testing.do_bench do). PyTorch's whole-network recipe: warm-up on a side stream;
    ``reset`` (e.g. gradients to None) before the capture, so that the tensors the step allocates (gradients
    included) come from the graph's pool; ``reset`` again at the end."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            reset()
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    reset()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        flush = l2_flush_buffer(device)
        times = []
        for _ in range(replays + 2):
            flush.zero_()
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times[2:])
    finally:
        del graph
        reset()


def graph_fwdbwd_ms(w: Workload, device: torch.device, replays: int = 10) -> float:
    """graph_replay_ms of one forward+backward of ``w`` on input 0."""

    def step():
        out = w.forward(0)
        w.backward(out, 0)

    return graph_replay_ms(step, device, w.zero, replays)


def run_alternating(workloads: list[Workload], device: torch.device, warmup: int, repeats: int,
                    time_cap_s: float, min_rounds: int, n_inputs: int, tick: Callable[[int], None],
                    graph: bool = True) -> dict:
    """Measure every workload: warm-up round, memory pass, more warm-up, then alternated timed rounds, then (CUDA,
    ``graph``) one CUDA-graph replay timing per workload.

    ``tick(n)`` advances the progress display by n iterations. Returns impl -> Measured. A workload that raises is
    recorded with its error and leaves the rotation; the others go on.
    """
    timer = make_timer(device)
    peak = make_peak(device)
    res = {w.impl: Measured(w.impl, times={k: [] for k in TIME_KEYS}) for w in workloads}
    alive = list(workloads)

    def guarded(w: Workload, fn):
        try:
            return fn()
        except Exception as exc:  # an implementation that cannot run this case: n/a with the reason
            res[w.impl].error = ("out of memory: " if _is_oom(exc) else "") + _short_error(exc)
            alive.remove(w)
            try:
                w.zero()
            except Exception:
                pass
            free_memory(device)
            return None

    def warm(w: Workload, i: int):
        w.zero()
        timer.iteration(w, i)

    def mem_pass(w: Workload, i: int):
        w.zero()
        counter = SavedBytesCounter()
        peak.start()
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            out = w.forward(i)
        saved = counter.bytes(w.not_activations())  # while the graph (and every saved storage) is alive
        w.backward(out, i)
        del out
        if w.opt_step is not None:
            w.opt_step()
        p = peak.stop()
        res[w.impl].saved_bytes = saved
        res[w.impl].peak_bytes = p

    # 1) one warm-up round (first calls: lazy inits, kernel compilation, optimizer state)
    for w in list(alive):
        guarded(w, lambda: warm(w, 0))
        tick(1)
    # 2) memory pass, one workload at a time
    for w in list(alive):
        guarded(w, lambda: mem_pass(w, 1))
        tick(1)
        if device.type == "cuda":
            free_memory(device)
    # 3) the remaining warm-up rounds, alternated
    for k in range(1, warmup):
        for w in list(alive):
            guarded(w, lambda: warm(w, k))
            tick(1)
    # 4) timed rounds: implementations alternate, the first one rotates, inputs rotate
    gc_was = gc.isenabled()
    gc.disable()
    try:
        t_start = time.perf_counter()
        rounds = 0
        for k in range(repeats):
            if k >= min_rounds and time.perf_counter() - t_start > time_cap_s:
                break
            order = alive[k % len(alive):] + alive[: k % len(alive)] if alive else []
            for w in order:
                w.zero()
                timer.sync()
                t = guarded(w, lambda: timer.iteration(w, k % n_inputs))
                tick(1)
                if t is None:
                    continue
                f, b, o = t
                m = res[w.impl].times
                m["fwd_ms"].append(f)
                m["bwd_ms"].append(b)
                m["fwdbwd_ms"].append(f + b)
                m["step_ms"].append(f + b + o)
            rounds += 1
    finally:
        if gc_was:
            gc.enable()
    for w in alive:
        try:
            w.zero()
        except Exception:
            pass
    # 5) CUDA: each implementation's fwd+bwd as GPU time only (a CUDA-graph replay), after the timed rounds so that a
    #    capture that fails cannot disturb them
    if device.type == "cuda" and graph:
        for w in alive:
            try:
                res[w.impl].gpu_fwdbwd_ms = graph_fwdbwd_ms(w, device)
            except Exception as exc:  # not capturable (host syncs, CPU tensors, ...): reported, not fatal
                res[w.impl].gpu_note = "not capturable in a CUDA graph: " + _short_error(exc)
                try:
                    torch.cuda.synchronize(device)
                    free_memory(device)
                except Exception:  # a capture failure that left a CUDA error: keep the eager timings measured
                    pass
    else:
        for w in alive:
            res[w.impl].gpu_note = "CUDA only" if device.type != "cuda" else "not measured (--no-graph)"
    return res


def finite_or_none(x) -> Optional[float]:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def default_threads() -> int:
    """torch's CPU threads when --threads is not given. One: on a shared machine (2 cores, other jobs running),
    two threads per process oversubscribe the cores and a ratio of two timings swings with whoever else runs (the
    frozen base measured 1.2-1.75x PEFT's time, which is impossible on a quiet machine); one thread per process leaves
    the timings of one run comparable with each other (see the README's benchmark section for the spreads)."""
    return 1
