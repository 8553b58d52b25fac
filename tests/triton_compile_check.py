"""Compile every Triton kernel of the triton backend for real GPU targets, on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1, how CI runs the kernels) never lowers a kernel: a kernel can pass every
interpreter test and still fail to compile on a GPU (an H100 run once lost the triton backend to a CompilationError
that only triton 3.6's code generator raised), or compile and then be refused at launch for asking more shared memory
than the card has. This script catches both without a GPU:

1. It drives the backend's own launchers (the down, up and mixed-adapter up nodes' ``_*_impl`` and
   ``dropout_keep_mask``) on meta tensors of GPU-sized shapes, with the block-size heuristic answering as it does
   for CUDA tensors, and records every launch (kernel, arguments, constexprs, warps, stages) instead of running it.
2. It compiles each distinct launch through the JIT (``run(..., warmup=True)``, which compiles and does not launch)
   with a stand-in driver that names an sm_80 or sm_90 target: Triton's bundled LLVM and ptxas need no GPU. It reads
   registers, local memory (spills) and shared memory of each kernel.
3. It fails when a kernel does not compile or needs more shared memory per block than the target has, and (with
   ``--fail-on-spills 90``) when a kernel spills registers on the named targets.

Meta tensors have address 0, so every pointer counts as 16-byte aligned, as fresh CUDA allocations are. Run it
under any triton version:
    python tests/triton_compile_check.py [--arch 80,90] [--json FILE]
    python tests/triton_compile_check.py --triton 3.6.0                   (the GPU image's triton)
``tests/test_triton_compile.py`` runs it in CI for the installed triton and for triton 3.6 (the GPU image's), with
spills failing on sm_90, the card the heuristic is tuned for.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

# The real JIT (not the interpreter) must build the kernels: this must happen before triton is imported.
os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is the behaviour we run with

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _reexec_with_triton(argv: list, script: str = __file__) -> None:
    """``--triton VERSION``: run ``script`` (this one, or another check) again with triton==VERSION first on the path,
    installed once (without dependencies) next to the venv, or in $TMPDIR when there is none (an install already next
    to the running interpreter's venv, as a git worktree sharing the main checkout's venv finds it, is used as is).
    Before triton is imported."""
    if "--triton" not in argv or os.environ.get("VK_TRITON_CHECK_REEXEC"):
        return
    i = argv.index("--triton")
    version, rest = argv[i + 1], argv[:i] + argv[i + 2:]
    base = ROOT / ".venv" if (ROOT / ".venv").is_dir() else Path(os.environ.get("TMPDIR", "/tmp"))
    target = base / f"triton-{version}"
    beside = Path(sys.prefix) / f"triton-{version}"
    if not (target / "triton" / "__init__.py").exists() and (beside / "triton" / "__init__.py").exists():
        target = beside
    if not (target / "triton" / "__init__.py").exists():
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), f"triton=={version}"]
        if subprocess.run(cmd, check=False).returncode:
            sys.exit(f"could not install triton {version} into {target}")
    env = dict(os.environ, VK_TRITON_CHECK_REEXEC="1",
               PYTHONPATH=os.pathsep.join([str(target), str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    os.execve(sys.executable, [sys.executable, str(Path(script).resolve()), *rest], env)


if __name__ == "__main__":
    _reexec_with_triton(sys.argv[1:])

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# Shared memory a block may use (bytes, opt-in maximum): A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SMEM_LIMIT = {80: 166912, 90: 232448}

# (tokens, in, out, r): the shapes of issue 3's goals, the small-batch end, ranks 8..1024, and odd sizes.
SHAPES = [
    (8192, 4096, 4096, 256),
    (8192, 4096, 11008, 256),
    (8192, 4096, 4096, 64),
    (8192, 4096, 4096, 1024),
    (512, 4096, 4096, 256),
    (512, 11008, 4096, 256),
    (1, 1000, 3001, 8),
    (2047, 1000, 3001, 7),
]
# The dropout seed reaches the kernels as a pointer to a 0-dim int64 tensor on the device
# (vera_kernels.ops.draw_dropout_seed); dropout_keep_mask also takes a plain int and makes that tensor.
REAL_SEED = 2**40 + 7
DTYPES = {"fp32-ieee": torch.float32, "fp32-tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "i8",
                 torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8", torch.bool: "i1"}


# ============================================================================================ recording
class Launch:
    def __init__(self, fn: JITFunction, args: tuple, kwargs: dict):
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.name = fn.__name__
        names = list(fn.arg_names)
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        self.options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        constexpr_names = {names[p.num] for p in fn.params if p.is_constexpr}
        self.signature, self.constexprs = {}, {}
        for name in names:
            value = bound[name]
            if name in constexpr_names or value is None:
                self.signature[name] = "constexpr"
                self.constexprs[name] = value
            else:
                self.signature[name] = _triton_type(value)

    def key(self):
        # The dropout counter's row-group shift varies with the width but cannot change whether a kernel compiles
        # or what it needs: one value per configuration is enough.
        constexprs = {k: ("*" if k == "ROW_GROUP_LOG2" else v) for k, v in self.constexprs.items()}
        return (self.name, tuple(self.signature.items()), tuple(sorted(constexprs.items(), key=str)),
                tuple(sorted(self.options.items())))

    def describe(self) -> str:
        blocks = {k: v for k, v in self.constexprs.items() if k.startswith("BLOCK")}
        flags = [k for k, v in self.constexprs.items() if k.startswith("HAS_") or k == "ACCUMULATE"]
        flags = [k for k in flags if self.constexprs[k]]
        ptr = next((t for t in self.signature.values() if t.startswith("*")), "")
        prec = self.constexprs.get("PRECISION") or ""
        return (f"{ptr[1:]}{'/' + prec if prec else ''} "
                + " ".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in blocks.items())
                + f" w{self.options.get('num_warps', 4)}s{self.options.get('num_stages', 3)}"
                + (" " + ",".join(f.replace("HAS_", "").lower() for f in flags) if flags else ""))


def _triton_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type a kernel argument of type {type(value).__name__}")


def load_backend(path: str | None):
    """The triton backend module: the package's, or (for the tests of this script) a modified copy at ``path``."""
    if path is None:
        from vera_kernels.ops import vera_triton

        return vera_triton
    import importlib.util

    name = "vera_kernels.ops._vera_triton_under_check"  # inside the package, so its relative imports resolve
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def record_launches(vt, dtypes=tuple(DTYPES)) -> list[Launch]:
    """Drive the launchers on meta tensors and return the distinct launches they would make on a CUDA device."""
    launches: dict = {}

    def fake_run(self, *args, grid, warmup, **kwargs):
        launch = Launch(self, args, kwargs)
        launches.setdefault(launch.key(), launch)

    heuristic = vt._config.__wrapped__  # the uncached heuristic, asked as for a CUDA tensor
    saved = (JITFunction.run, vt._config, torch.get_float32_matmul_precision())
    JITFunction.run = fake_run
    cuda = torch.device("cuda")
    vt._config = lambda kind, M, N, K, dtype, device, *rest: heuristic(kind, M, N, K, dtype, cuda, *rest)
    try:
        for dname in dtypes:
            dtype = DTYPES[dname]
            torch.set_float32_matmul_precision("highest" if dname == "fp32-ieee" else "high")
            for shape in SHAPES:
                _drive(vt, dtype, *shape)
        vt.dropout_keep_mask(REAL_SEED, (8192, 4096), 0.1, torch.device("meta"))
    finally:
        JITFunction.run, vt._config = saved[0], saved[1]
        torch.set_float32_matmul_precision(saved[2])
    return list(launches.values())


def _drive(vt, dtype, M, K, N, r):
    meta = dict(device="meta", dtype=dtype)
    x, g = torch.empty(M, K, **meta), torch.empty(M, N, **meta)
    weight, bias = torch.empty(N, K, **meta), torch.empty(N, **meta)
    # strided slices, as in a model: A in the compute dtype (the layer's cached cast), B float32
    A = torch.empty(r, K + 5, **meta)[:, :K]
    B = torch.empty(N + 3, r, device="meta", dtype=torch.float32)[:N]
    ld, lb = torch.empty(r, device="meta"), torch.empty(N, device="meta")
    seed = torch.empty((), dtype=torch.int64, device="meta")
    h = torch.empty(M, r, **meta)
    vt._down_fwd_impl(x, A, seed, 0.1)  # the down node's kernels run with dropout only (cuBLAS without)
    vt._down_bwd_impl(h, A, seed, 0.1)
    for base_gemm in vt.BASE_GEMMS:
        fused = base_gemm != "cublas"
        for b in (bias, None):
            vt._up_fwd_impl(None if fused else g, h, B, ld, lb, x if fused else None, weight if fused else None,
                            b if fused else None, False, base_gemm)
    for need_lambdas in (True, False):
        vt._up_bwd_impl(g, h, B, ld, lb, need_lambdas)
    # the mixed-adapter up node, 64 adapters' stacked lambdas: 16 batch rows (training: rows longer than a tile) and
    # one token per row (the per-row gather), or one row when the tokens do not split
    LD, LB = torch.empty(64, r, device="meta"), torch.empty(64, N, device="meta")
    for n_rows in (16, M) if M % 16 == 0 else (1, M):
        row_adapter = torch.empty(n_rows, dtype=torch.int64, device="meta")
        vt._up_mixed_fwd_impl(g, h, B, LD, LB, row_adapter, M // n_rows)
        vt._up_mixed_bwd_impl(g, h, B, LD, LB, row_adapter, M // n_rows, True, True)


# ============================================================================================ compiling
def _resource_usage(cubin: bytes) -> dict:
    """Registers, stack and local memory (spills) per thread, from cuobjdump on the cubin (bundled with Triton)."""
    tool = _cuobjdump_path()
    if tool is None:
        return {}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([tool, "--dump-resource-usage", str(path)], capture_output=True, text=True,
                              check=False).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", text)
    if not usage:
        return {}
    return {"regs": int(usage.group(1)), "stack_bytes": int(usage.group(2)), "local_bytes": int(usage.group(3))}


def _cuobjdump_path():
    from triton.backends import nvidia

    path = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
    return str(path) if path.exists() else None


class _TargetOnlyDriver:
    """Just enough of a Triton driver for ``JITFunction.run(..., warmup=True)``: it names a target (the device id is the
    compute capability, so each target gets its own JIT cache) and never touches a GPU. Going through the JIT, rather
    than calling ``triton.compile`` by hand, compiles with the specialisation a real launch would use (16-byte
    alignment and divisibility hints, equal-to-1 integers, do_not_specialize), on every triton version."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0


def compile_launch(launch: Launch, arch: int) -> dict:
    row = {"kernel": launch.name, "config": launch.describe(), "arch": f"sm_{arch}"}
    t0 = time.perf_counter()
    try:
        kernel = launch.fn.run(*launch.args, grid=(1,), warmup=True, **launch.kwargs)
    except Exception as exc:  # the failure this script exists to catch
        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).strip()[:2000]}")
        return row
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    shared = int(kernel.metadata.shared)
    row.update(shared=shared, **_resource_usage(kernel.asm["cubin"]))
    # Spilling = local memory (stack frame or local) used by a kernel that is at its register cap (255, or fewer when
    # a block's threads would overflow the 64K-register file). Below the cap, a small stack frame is not a spill.
    cap = min(255, 65536 // (32 * launch.options.get("num_warps", 4)))
    row["spills"] = bool(row.get("regs", 0) >= cap and (row.get("stack_bytes", 0) + row.get("local_bytes", 0)))
    if shared > SMEM_LIMIT[arch]:
        row.update(ok=False, error=f"needs {shared} B of shared memory per block; sm_{arch} has {SMEM_LIMIT[arch]} B")
    else:
        row["ok"] = True
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel compiles")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help=f"a subset of {','.join(DTYPES)}")
    ap.add_argument("--kernels", help="only these kernels (comma-separated names)")
    ap.add_argument("--fail-on-spills", default="", metavar="ARCHS",
                    help="also fail when a kernel spills registers on these targets (e.g. 90)")
    ap.add_argument("--module", help="check this copy of vera_kernels/ops/vera_triton.py instead (for tests)")
    ap.add_argument("--triton", metavar="VERSION",
                    help="check under triton==VERSION (installed next to the venv on first use), e.g. 3.6.0")
    args = ap.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",")]

    launches = record_launches(load_backend(args.module), args.dtypes.split(","))
    if args.kernels:
        launches = [launch for launch in launches if launch.name in args.kernels.split(",")]
    print(f"triton {triton.__version__}, torch {torch.__version__}: {len(launches)} distinct launches x "
          f"{len(archs)} targets", flush=True)
    if not launches:
        print("no launches recorded: nothing was checked")
        return 1
    from concurrent.futures import ThreadPoolExecutor  # LLVM and ptxas run outside the GIL
    from triton.runtime.driver import driver

    launches.sort(key=lambda launch: (launch.name, launch.describe()))
    t0 = time.perf_counter()
    rows = []
    try:
        for arch in archs:
            driver.set_active(_TargetOnlyDriver(arch))
            for launch in launches:  # create each kernel's JIT cache entry for this target before the threads use it
                launch.fn.device_caches[arch]
            with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
                rows += list(pool.map(compile_launch, launches, [arch] * len(launches)))
    finally:
        driver.set_active(None)  # the real driver is created lazily again on next use
    strict = {f"sm_{a}" for a in args.fail_on_spills.split(",") if a}
    for r in rows:
        if r["ok"] and r["arch"] in strict and r.get("regs") is None:  # no usage read: nothing was checked
            r.update(ok=False, error="register usage unavailable (cuobjdump missing or its output not understood)")
        elif r["ok"] and r.get("spills") and r["arch"] in strict:
            r.update(ok=False, error=f"spills: {r['regs']} registers, {r['stack_bytes']} B stack, "
                                    f"{r['local_bytes']} B local memory per thread")
    failed = [r for r in rows if not r["ok"]]
    rows_by_kernel = sorted(rows, key=lambda r: (r["kernel"], r["config"], r["arch"]))
    width = max(len(r["config"]) for r in rows)
    for r in rows_by_kernel:
        status = "ok  " if r["ok"] else "FAIL"
        usage = (f"regs {r.get('regs', '?'):>3}  stack {r.get('stack_bytes', '?'):>4} B  "
                 f"local {r.get('local_bytes', '?'):>4} B  smem {r['shared']:>6} B  {r['compile_s']:5.2f} s"
                 if r["ok"] else r["error"][:300])
        print(f"{status} {r['arch']}  {r['kernel']:<28} {r['config']:<{width}}  {usage}")
    spilled = [r for r in rows if r.get("spills")]
    print(f"{len(rows) - len(failed)}/{len(rows)} compiled and fit in {time.perf_counter() - t0:.1f} s; "
          f"{len(spilled)} spill registers", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"triton": triton.__version__, "rows": rows}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
