"""Lazy loading of the native dequantization extension.

Order (first success wins, done once per process, on first use, under a lock):

1. ``VERA_KERNELS_NO_NATIVE=1`` -> no native code at all.
2. ``import vera_kernels._C`` (built by ``setup.py`` at install time).
3. JIT build with :func:`torch.utils.cpp_extension.load` from the ``csrc/`` sources (``-O3 -fopenmp``; the
   CUDA sources are added only when ``torch.cuda.is_available()`` and nvcc is found). The build folder lives
   under ``$VERA_KERNELS_BUILD_DIR``, else ``$TORCH_EXTENSIONS_DIR/vera_kernels``, else
   ``$XDG_CACHE_HOME/vera_kernels`` (``~/.cache/vera_kernels``), in a sub-folder keyed by a hash of the
   sources, flags, torch and Python versions, so a rebuild happens only when one of them changes. Two
   processes building at once are serialised by a ``flock`` on the build folder (:func:`build_lock`), which
   also removes a baton left by a killed build, so a first use never hangs.
   If a CUDA build fails, a CPU-only build is tried; if ``-fopenmp`` is refused, a build without OpenMP.
4. Otherwise: ``None``, and ONE :class:`NativeUnavailableWarning` per process says why and that the
   pure-PyTorch fallback (bit-identical, slower) is used.

Importing this module loads nothing. :func:`get_native` triggers the load; :func:`native_status` reports it.

Environment: ``VERA_KERNELS_NO_NATIVE=1`` (disable), ``VERA_KERNELS_BUILD_DIR`` (build folder),
``VERA_KERNELS_CSRC`` (where the C++/CUDA sources are, default ``<repo>/csrc``, or ``vera_kernels/_csrc`` in
an installed wheel),
``VERA_KERNELS_VERBOSE_BUILD=1`` (show the compiler output).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

__all__ = [
    "NativeUnavailableWarning",
    "OPS_NAMESPACE",
    "get_native",
    "native_status",
    "native_supports",
    "ops",
    "reset_for_tests",
]

OPS_NAMESPACE = "vera_kernels_quant"
ENV_NO_NATIVE = "VERA_KERNELS_NO_NATIVE"
ENV_BUILD_DIR = "VERA_KERNELS_BUILD_DIR"
ENV_CSRC = "VERA_KERNELS_CSRC"
ENV_VERBOSE = "VERA_KERNELS_VERBOSE_BUILD"

_CPU_SOURCES = ("ops.cpp", "dequant_cpu.cpp")
_CUDA_SOURCES = ("dequant_cuda.cu",)
_HEADERS = ("vk_dequant.h", "vk_dequant_cuda.h")


class NativeUnavailableWarning(RuntimeWarning):
    """Native dequantization could not be loaded; the pure-PyTorch implementation is used instead."""


_lock = threading.RLock()
_loaded = False
_module = None
_status = "not loaded yet (loaded on first use)"
_warned = False
_fakes_registered = False


def _truthy(value: Optional[str]) -> bool:
    return value is not None and value.strip().lower() not in ("", "0", "false", "no", "off")


def _ops_registered() -> bool:
    try:
        return hasattr(torch.ops, OPS_NAMESPACE) and hasattr(getattr(torch.ops, OPS_NAMESPACE), "dequantize_4bit")
    except Exception:  # pragma: no cover - defensive
        return False


def _short(exc: BaseException, limit: int = 400, tail: bool = False) -> str:
    """One line; ``tail`` keeps the end (a build error starts with the whole compiler command, ends with why)."""
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " | ")
    if len(text) <= limit:
        return text
    return "..." + text[3 - limit:] if tail else text[: limit - 3] + "..."


def csrc_dir() -> Path:
    """The C++/CUDA sources: $VERA_KERNELS_CSRC, else the checkout's csrc/, else the copy setup.py ships in
    installed wheels (vera_kernels/_csrc)."""
    env = os.environ.get(ENV_CSRC)
    if env:
        return Path(env)
    pkg = Path(__file__).resolve().parent.parent
    for cand in (pkg.parent / "csrc", pkg / "_csrc"):
        if (cand / _CPU_SOURCES[0]).is_file():
            return cand
    return pkg.parent / "csrc"


def _cache_base() -> Path:
    env = os.environ.get(ENV_BUILD_DIR)
    if env:
        return Path(env)
    tdir = os.environ.get("TORCH_EXTENSIONS_DIR")
    if tdir:
        return Path(tdir) / "vera_kernels"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "vera_kernels"


def _ensure_ninja() -> Optional[str]:
    """Make sure ``ninja`` is on PATH (torch's JIT needs it). Returns an error text, or None when fine."""
    if shutil.which("ninja"):
        return None
    candidates = []
    try:  # the `ninja` PyPI package ships the binary
        import ninja  # type: ignore

        candidates.append(getattr(ninja, "BIN_DIR", None))
    except Exception:
        pass
    candidates.append(os.path.dirname(sys.executable))
    for cand in candidates:
        if cand and os.path.isfile(os.path.join(cand, "ninja")):
            os.environ["PATH"] = cand + os.pathsep + os.environ.get("PATH", "")
            return None
    return "ninja was not found (pip install ninja)"


def _is_toolkit(home: Optional[str]) -> bool:
    return bool(home) and os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
        os.path.join(home, "include", "cuda_runtime_api.h"))


def _cuda_toolkit() -> Optional[str]:
    """A CUDA toolkit folder with nvcc AND headers: torch's CUDA_HOME guess, else the toolkit an nvcc on PATH really
    belongs to (torch guesses dirname(dirname(nvcc)), wrong for a wrapper such as /usr/local/bin/nvcc), else
    /usr/local/cuda."""
    from torch.utils import cpp_extension

    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME,
                  os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None, "/usr/local/cuda"]
    for home in candidates:
        if _is_toolkit(home):
            return home
    if nvcc:  # a wrapper script: the toolkit it runs (e.g. exec /usr/local/cuda-13.0/bin/nvcc "$@")
        try:
            text = Path(nvcc).read_text(errors="ignore")[:4096]
        except OSError:
            text = ""
        for word in text.replace('"', " ").replace("'", " ").split():
            if word.endswith("/bin/nvcc") and _is_toolkit(os.path.dirname(os.path.dirname(word))):
                return os.path.dirname(os.path.dirname(word))
    return None


def _cuda_wanted() -> tuple[bool, str]:
    if not torch.cuda.is_available() or not torch.version.cuda:
        return False, "no CUDA device"
    try:
        home = _cuda_toolkit()
    except Exception as exc:  # pragma: no cover
        return False, _short(exc)
    if home is None:
        return False, "no CUDA toolkit with nvcc and headers found (set CUDA_HOME)"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME != home:  # the JIT build reads these
        os.environ["CUDA_HOME"] = home
        cpp_extension.CUDA_HOME = home
    return True, ""


def _build_tag(sources: list[Path], flags: list[str], cuda: bool) -> str:
    h = hashlib.sha256()
    h.update(f"{torch.__version__}|{sys.version}|{sys.platform}|{cuda}|{' '.join(flags)}".encode())
    for p in sorted(sources + [csrc_dir() / name for name in _HEADERS]):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _jit_build(cuda: bool, openmp: bool):
    from torch.utils import cpp_extension

    src = csrc_dir()
    names = list(_CPU_SOURCES) + (list(_CUDA_SOURCES) if cuda else [])
    sources = [src / n for n in names]
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"native sources not found: {', '.join(missing)} (set {ENV_CSRC})")
    if os.name == "nt":  # pragma: no cover - MSVC
        cflags = ["/O2", "/fp:precise"] + (["/openmp"] if openmp else [])
        ldflags: list[str] = []
    else:
        cflags = ["-O3", "-ffp-contract=off"] + (["-fopenmp"] if openmp else [])
        ldflags = ["-fopenmp"] if openmp else []
    cuda_cflags = ["-O3", "-DWITH_CUDA"]
    if cuda:
        cflags.append("-DWITH_CUDA")
    tag = _build_tag(sources, cflags + ldflags + cuda_cflags, cuda)
    name = "vera_kernels_C_" + ("cuda" if cuda else "cpu") + ("" if openmp else "_noomp")
    build_dir = _cache_base() / f"{name}-{tag}"
    with build_lock(build_dir):
        module = cpp_extension.load(
            name=name,
            sources=[str(s) for s in sources],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            extra_cuda_cflags=cuda_cflags if cuda else None,
            extra_include_paths=[str(src)],
            build_directory=str(build_dir),
            with_cuda=cuda,
            verbose=_truthy(os.environ.get(ENV_VERBOSE)),
            is_python_module=True,
        )
    return module, build_dir


STALE_LOCK_S = 900  # a build here takes seconds (CPU) to a couple of minutes (CUDA)
BUILD_WAIT_S = 600  # how long a first use waits for another live process's build of the same folder


def _clear_stale_lock(build_dir: Path) -> None:
    """Where no ``flock`` exists (Windows): torch's JIT build waits, with no timeout, on a ``lock`` file in the build
    folder, and a build killed midway leaves it behind. A lock older than any build takes is removed, with a warning."""
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return
    if age > STALE_LOCK_S:
        _remove_baton(lock, f"a stale build lock ({age / 60:.0f} min old)")


def _remove_baton(lock: Path, what: str) -> None:
    warnings.warn(f"vera_kernels: removing {what} in {lock.parent}", UserWarning, stacklevel=4)
    try:
        lock.unlink()
    except OSError:
        pass


@contextlib.contextmanager
def build_lock(build_dir: Path, wait_s: Optional[float] = None):
    """Hold the right to build in ``build_dir`` (every JIT build of ours runs under it).

    torch's file baton (a ``lock`` file it creates, waits on forever and deletes when done) survives a build killed
    midway (OOM, a job's time limit, Ctrl-C in a test run), and every later first use then hangs. The kernel's
    ``flock`` here is released when its holder dies, so it cannot go stale. Every builder of our folders takes it
    before torch's baton, so a baton found while holding it was left by a killed build, and is removed (with a
    warning). A live build by another process is waited for, at most ``wait_s`` seconds (``BUILD_WAIT_S``); then a
    TimeoutError says so, and the caller falls back to the Python implementation.
    """
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: the age rule alone
        _clear_stale_lock(build_dir)
        yield
        return
    wait_s = BUILD_WAIT_S if wait_s is None else wait_s
    with open(build_dir / "build.flock", "a+") as handle:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"another process has been building in {build_dir} for over {wait_s:.0f} s")
                time.sleep(0.1)
        try:
            baton = build_dir / "lock"
            if baton.exists():
                _remove_baton(baton, "a build lock left by a killed build")
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load() -> tuple[object, str]:
    if _truthy(os.environ.get(ENV_NO_NATIVE)):
        return None, f"none: disabled by {ENV_NO_NATIVE}=1"
    if _ops_registered():  # already loaded in this process (e.g. after reset_for_tests)
        return sys.modules.get("vera_kernels._C") or True, "loaded: ops already registered in this process"

    reasons = []
    # (b) prebuilt extension
    try:
        import vera_kernels._C as prebuilt  # type: ignore  # noqa: F401

        if _ops_registered():
            return prebuilt, f"prebuilt: vera_kernels._C [{_build_info()}]"
        reasons.append("vera_kernels._C imported but registered no ops")
    except Exception as exc:
        reasons.append(f"no prebuilt vera_kernels._C ({_short(exc, 200)})")

    # (c) JIT build
    if os.name != "nt":
        cxx = os.environ.get("CXX", "c++")
        if shutil.which(cxx) is None and shutil.which("g++") is None and shutil.which("clang++") is None:
            reasons.append(f"no C++ compiler found ({cxx})")
            return None, "none: " + "; ".join(reasons)
    err = _ensure_ninja()
    if err:
        reasons.append(err)
        return None, "none: " + "; ".join(reasons)
    cuda, why_not = _cuda_wanted()
    if torch.cuda.is_available() and why_not:
        reasons.append(f"no CUDA kernels: {why_not}")
    attempts = ([(True, True)] if cuda else []) + [(False, True), (False, False)]
    for use_cuda, openmp in attempts:
        try:
            module, build_dir = _jit_build(use_cuda, openmp)
            if _ops_registered():
                # a CUDA machine that got a CPU-only build says why
                why = f"; {'; '.join(reasons)}" if reasons and torch.cuda.is_available() else ""
                return module, f"jit: {build_dir} [{_build_info()}]{why}"
            reasons.append(f"JIT module {getattr(module, '__name__', module)} registered no ops")
        except Exception as exc:
            kind = ("cuda" if use_cuda else "cpu") + ("" if openmp else " without OpenMP")
            reasons.append(f"JIT build ({kind}) failed: {_short(exc, 1500, tail=True)}")
            if _ops_registered():  # partially succeeded (loaded but something after failed)
                return True, f"jit: loaded with errors [{_build_info()}]"
    return None, "none: " + "; ".join(reasons)


def _build_info() -> str:
    try:
        return str(ops().build_info())
    except Exception:
        return "?"


def _warn_once(reason: str) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"vera_kernels: native dequantization is unavailable ({reason}); using the pure-PyTorch fallback "
        "(bit-identical results, slower).",
        NativeUnavailableWarning,
        stacklevel=4,
    )


def get_native():
    """Return the loaded native module (truthy) or None. Loads it on the first call (thread-safe)."""
    global _loaded, _module, _status
    if _loaded:
        return _module
    with _lock:
        if not _loaded:
            try:
                module, status = _load()
            except Exception as exc:  # never let loading break the caller
                module, status = None, f"none: unexpected error while loading: {_short(exc)}"
            _module, _status, _loaded = module, status, True
            if module is None:
                _warn_once(status[len("none: "):] if status.startswith("none: ") else status)
            else:
                _register_fakes()
    return _module


def native_status(load: bool = True) -> str:
    """Describe what got loaded: ``prebuilt: ...``, ``jit: <build dir> [...]``, or ``none: <reason>``."""
    if load:
        get_native()
    return _status


def ops():
    """The native ops' namespace (``torch.ops.vera_kernels_quant``); callers check ``native_supports`` first."""
    return getattr(torch.ops, OPS_NAMESPACE)


def native_supports(device_type: str) -> bool:
    """True when the native ops are loaded and have a kernel for ``device_type`` ("cpu" or "cuda")."""
    if get_native() is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"{OPS_NAMESPACE}::dequantize_4bit", key))
    except Exception:  # pragma: no cover - private API moved
        return device_type == "cpu"


def reset_for_tests() -> None:
    """Forget the load result and the warning flag (a loaded library cannot be unloaded; it is found again)."""
    global _loaded, _module, _status, _warned
    with _lock:
        _loaded, _module, _status, _warned = False, None, "not loaded yet (loaded on first use)", False


# ------------------------------------------------------------------------------------------- fake impls
def _register_fakes() -> None:
    """Fake (meta) kernels so torch.compile / FakeTensor tracing can see through the native ops."""
    global _fakes_registered
    if _fakes_registered or not _ops_registered():
        return
    _fakes_registered = True
    ns = OPS_NAMESPACE

    def _check_out_dtype(dtype):
        torch._check(
            dtype in (torch.float32, torch.float16, torch.bfloat16),
            lambda: f"{ns}: output dtype must be float32, float16 or bfloat16, got {dtype}",
        )

    def _numel(shape):
        n = 1
        for d in shape:
            n *= d
        return n

    @torch.library.register_fake(f"{ns}::dequantize_4bit")
    def _fake_dequantize_4bit(packed, absmax, code, blocksize, shape, dtype):
        torch._check(packed.dtype == torch.uint8, lambda: f"{ns}::dequantize_4bit: packed must be uint8")
        torch._check(blocksize > 0, lambda: f"{ns}::dequantize_4bit: blocksize must be positive")
        torch._check(code.numel() == 16, lambda: f"{ns}::dequantize_4bit: code must have 16 entries")
        torch._check(packed.numel() >= (_numel(shape) + 1) // 2, lambda: f"{ns}::dequantize_4bit: packed too small")
        _check_out_dtype(dtype)
        return packed.new_empty(tuple(shape), dtype=dtype)

    @torch.library.register_fake(f"{ns}::dequantize_4bit_nested")
    def _fake_dequantize_4bit_nested(
        packed, absmax_q, absmax2, code2, blocksize2, offset, code, blocksize, shape, dtype
    ):
        torch._check(packed.dtype == torch.uint8, lambda: f"{ns}::dequantize_4bit_nested: packed must be uint8")
        torch._check(absmax_q.dtype == torch.uint8, lambda: f"{ns}::dequantize_4bit_nested: absmax_q must be uint8")
        torch._check(blocksize > 0 and blocksize2 > 0, lambda: f"{ns}::dequantize_4bit_nested: bad blocksize")
        torch._check(code.numel() == 16, lambda: f"{ns}::dequantize_4bit_nested: code must have 16 entries")
        torch._check(code2.numel() == 256, lambda: f"{ns}::dequantize_4bit_nested: code2 must have 256 entries")
        _check_out_dtype(dtype)
        return packed.new_empty(tuple(shape), dtype=dtype)

    @torch.library.register_fake(f"{ns}::dequantize_int8_rowwise")
    def _fake_dequantize_int8_rowwise(CB, SCB, mode, dtype):
        torch._check(CB.dtype == torch.int8, lambda: f"{ns}::dequantize_int8_rowwise: CB must be int8")
        torch._check(CB.dim() >= 1, lambda: f"{ns}::dequantize_int8_rowwise: CB must have a dimension")
        torch._check(mode in (0, 1), lambda: f"{ns}::dequantize_int8_rowwise: mode must be 0 or 1")
        _check_out_dtype(dtype)
        return torch.empty_like(CB, dtype=dtype, memory_format=torch.contiguous_format)
