"""Optional native extension ``vera_kernels._C`` (the metadata lives in pyproject.toml).

The extension (csrc/: C++/OpenMP CPU kernels, plus CUDA kernels when nvcc and a CUDA build of torch are both
present) is built only where it can be:

* ``VERA_KERNELS_NO_NATIVE=1`` skips it entirely;
* torch must be importable while building. pip's default isolated build environment has no torch, so a plain
  ``pip install .`` installs pure Python and the extension is JIT-compiled on first use instead (see
  vera_kernels/quant/_native.py). To get it prebuilt: ``pip install --no-build-isolation .`` (or ``-e .``)
  in an environment that already has torch, a C++ compiler and ninja;
* a failed native build never fails the install: it prints a warning and installs pure Python (the JIT build,
  or the pure-PyTorch fallback, takes over at run time).

The C++/CUDA sources are also copied into the package (``vera_kernels/_csrc``) so that an installed wheel can
JIT-build them; a source checkout / editable install uses ``csrc/`` directly.
"""

import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py


def _truthy(value):
    return value is not None and value.strip().lower() not in ("", "0", "false", "no", "off")


def _say(msg):
    print(f"vera_kernels setup: {msg}", file=sys.stderr)


def _native_extension():
    """(ext_modules, cmdclass) for the optional native build, or ([], {}) when it is skipped."""
    if _truthy(os.environ.get("VERA_KERNELS_NO_NATIVE")):
        _say("VERA_KERNELS_NO_NATIVE is set: not building the native extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # isolated build env without torch, broken torch, ...
        _say(f"torch is not importable at build time ({exc}); skipping the native extension "
             "(it is JIT-built on first use)")
        return [], {}
    cxx = os.environ.get("CXX", "c++")
    if os.name != "nt" and not (shutil.which(cxx) or shutil.which("g++") or shutil.which("clang++")):
        _say(f"no C++ compiler ({cxx}) found; skipping the native extension")
        return [], {}

    here = os.path.dirname(os.path.abspath(__file__))
    csrc = os.path.join(here, "csrc")
    sources = [os.path.join("csrc", name) for name in ("ops.cpp", "dequant_cpu.cpp")]
    openmp = sys.platform != "darwin"  # Apple clang has no -fopenmp
    if os.name == "nt":
        cxx_flags = ["/O2", "/fp:precise"] + (["/openmp"] if openmp else [])
        link_flags = []
    else:
        cxx_flags = ["-O3", "-ffp-contract=off"] + (["-fopenmp"] if openmp else [])
        link_flags = ["-fopenmp"] if openmp else []
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    use_cuda = bool(torch.version.cuda) and nvcc is not None and os.path.isfile(nvcc)
    use_cuda = use_cuda and not _truthy(os.environ.get("VERA_KERNELS_NO_CUDA"))
    if use_cuda:
        ext = CUDAExtension(
            "vera_kernels._C",
            sources + [os.path.join("csrc", "dequant_cuda.cu")],
            include_dirs=[csrc],
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=link_flags,
        )
    else:
        ext = CppExtension(
            "vera_kernels._C",
            sources,
            include_dirs=[csrc],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    _say(f"building the native extension vera_kernels._C ({'CPU + CUDA' if use_cuda else 'CPU'})")

    class OptionalBuildExtension(BuildExtension):
        """torch's BuildExtension, but a failure only warns (pure-Python install, JIT/fallback at run time)."""

        def _skip(self, exc):
            _say(f"WARNING: building the native extension failed, installing pure Python "
                 f"(it will be JIT-built on first use, or the pure-PyTorch fallback used): {exc}")
            self.extensions = []

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - anything: never fail the install
                self._skip(exc)

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:  # noqa: BLE001
                self._skip(exc)

        def get_outputs(self):
            return super().get_outputs() if self.extensions else []

    return [ext], {"build_ext": OptionalBuildExtension}


class BuildPyWithSources(build_py):
    """Also ship csrc/ inside the package (vera_kernels/_csrc) so that installed wheels can JIT-build it."""

    def run(self):
        super().run()
        src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
        if not os.path.isdir(src):
            return
        dst = os.path.join(self.build_lib, "vera_kernels", "_csrc")
        os.makedirs(dst, exist_ok=True)
        for name in sorted(os.listdir(src)):
            if name.endswith((".cpp", ".cu", ".h", ".cuh", ".sh")):
                self.copy_file(os.path.join(src, name), os.path.join(dst, name))


ext_modules, cmdclass = _native_extension()
cmdclass["build_py"] = BuildPyWithSources
setup(ext_modules=ext_modules, cmdclass=cmdclass)
