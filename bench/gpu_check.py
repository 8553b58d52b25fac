"""`make gpu-check`: every kernel against the reference in bf16/fp16/fp32, then the benchmark table. One script,
under 6 minutes on one H100. Run from the repository root with the machine's python (torch, triton, transformers,
peft installed; vera_kernels is imported from the checkout).

Phases
  A  correctness (three processes in parallel, one per dtype, which also compiles the Triton kernels into the shared
     on-disk cache): triton vs a float64 evaluation of the formula, forward and every gradient, on odd shapes, slices,
     strided and 3-D inputs, Conv1D layout, bias/no bias, dropout (mask regenerated from the seed), N = 0, each of the
     three base-GEMM arrangements (cuBLAS then update, update then cuBLAS accumulating, fused Triton GEMM),
     deterministic and atomic reductions; the mixed-adapter up node (vera_triton.up_mixed: forward, every gradient,
     a bit-identical rerun). Each error is judged against PyTorch's own error
     in that dtype (the same formula in plain torch ops, vs float64). Outputs are poisoned (freed NaN memory is reused).
     Plus a > 2**31-element input (64-bit offsets), torch.compile(fullgraph=True) of a patched layer, dropout in a
     captured CUDA graph (a fresh mask per replay, each checked against its own seed) and under activation
     checkpointing (the recomputation regenerates the masks), and (in a
     fourth process, which JIT-builds the C++/CUDA extension) the native dequantization kernels against the
     PyTorch path bit for bit on CUDA (tests/dequant_crosscheck.py; the GPU image has no bitsandbytes), then their
     throughput against bitsandbytes' CUDA dequantization where bitsandbytes imports (`make gpu-carry` prepares a
     trimmed copy in .gpu_carry/ to carry to the device).
  B  layer benchmark (bf16): frozen nn.Linear, PEFT's VeRA, our reference/torch/triton (three base arrangements), at
     the issue's shapes; fwd+bwd time (CUDA events via triton.testing.do_bench, medians, implementations alternated,
     inputs rotated), saved activation bytes, peak memory; the kernel breakdown; the mixed-adapter up node with 64
     adapters and with one, against the plain up node.
  C  model benchmark: `python -m vera_kernels.bench --device cuda --model llama-1b --quick` (time-boxed).
Everything printed is measured in this run; the JSON lands in $OUT (or bench/results/) when set.

    python bench/gpu_check.py               # all phases
    python bench/gpu_check.py --cpu-smoke   # the same code paths on tiny shapes on the CPU (Triton interpreter)

On a lent device: `make gpu-carry` here first (a trimmed bitsandbytes in .gpu_carry/, for the dequantization
timings), then run, carrying ".gpu_carry":  export PYTHONUNBUFFERED=1 GIT_COMMIT=<hash>;
timeout 420 python3 bench/gpu_check.py --model-timeout 130 2>&1 | tee $OUT/gpu_check.log
Commit the log and JSON under bench/results/raw/ and the tables in bench/results/<date>-<card>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(1, os.path.join(ROOT, "tests"))  # the plain case/check modules shared with the tests

TOL_FLOOR = {"float32": 2e-6, "float16": 2e-4, "bfloat16": 2e-3}
TOL_FACTOR = 4.0
ENV_BASE_GEMM = "VERA_KERNELS_BASE_GEMM"  # read by vera_triton.base_gemm_mode at each call


def _base_gemms():
    """vera_triton.BASE_GEMMS, imported late (TRITON_INTERPRET must be set before triton is imported)."""
    from vera_kernels.ops import vera_triton

    assert vera_triton.ENV_BASE_GEMM == ENV_BASE_GEMM
    return vera_triton.BASE_GEMMS


def _env_without_switches() -> dict:
    """os.environ without this script's per-measurement switches: a child process runs the defaults."""
    return {k: v for k, v in os.environ.items() if k != ENV_BASE_GEMM}


# how the base arrangements are named in case and row labels
BASE_LABELS = {"cublas": "cublas", "cublas-accumulate": "cublas-acc", "triton": "fused"}


def _failure(exc: BaseException, trace_chars: int = 1500) -> dict:
    """A check or case that raised: failed, with what and where. An exception raised while handling another (a
    CUDA-graph capture that ends in error after the real one) keeps the first one's words too."""
    out = dict(ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-trace_chars:])
    if exc.__context__ is not None:
        out["first_error"] = f"{type(exc.__context__).__name__}: {exc.__context__}"[:1000]
    return out


def _for_each_base(fn) -> dict:
    """{base: fn()} with VERA_KERNELS_BASE_GEMM set to each base-GEMM arrangement in turn (unset afterwards)."""
    out = {}
    try:
        for base in _base_gemms():
            os.environ[ENV_BASE_GEMM] = base
            out[base] = fn()
    finally:
        os.environ.pop(ENV_BASE_GEMM, None)
    return out


def _rel_err(ours, truth) -> float:
    """||ours - truth|| / ||truth||, in float64."""
    truth = truth.double()
    return ((ours.double() - truth).norm() / truth.norm()).item()


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _dt(name):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


# ============================================================================================ phase A: correctness
def correctness_cases(smoke: bool):
    """(name, kwargs) of every case; tiny on the CPU smoke run."""
    if smoke:
        big = dict(N=37, fin=45, fout=29, r=19, in_max=50, out_max=33)
        return [
            ("odd", dict(big)),
            ("odd-cublas-accumulate", dict(big, base="cublas-accumulate")),
            ("odd-fused", dict(big, base="triton")),
            ("conv1d-nobias", dict(big, fifo=True, bias=False)),
            ("dropout", dict(big, p=0.25)),
            ("dropout-cublas-accumulate", dict(big, p=0.25, base="cublas-accumulate")),
            ("dropout-fused", dict(big, p=0.25, base="triton")),
            ("strided-2d", dict(big, strided=True)),
            ("strided-3d", dict(big, strided=True, lead=(3,))),
            ("atomic", dict(big, deterministic=False)),
            ("weight-grad", dict(big, weight_grad=True)),
            ("N=0", dict(big, N=0)),
        ]
    cases = []
    for base in _base_gemms():
        tag = BASE_LABELS[base]
        cases += [
            (f"odd-{tag}", dict(N=1000, fin=1001, fout=777, r=63, in_max=1111, out_max=1501, base=base)),
            (f"llama-{tag}", dict(N=4096, fin=2048, fout=5632, r=256, in_max=5632, out_max=5632, base=base)),
            (f"conv1d-{tag}", dict(N=555, fin=768, fout=2304, r=200, in_max=3072, out_max=3072, fifo=True,
                                   bias=True, base=base)),
            (f"dropout-{tag}", dict(N=1023, fin=1000, fout=1200, r=128, in_max=1000, out_max=1200, p=0.1,
                                    base=base)),
            (f"strided2d-{tag}", dict(N=300, fin=513, fout=257, r=64, in_max=600, out_max=300, strided=True,
                                      base=base)),
            (f"strided3d-{tag}", dict(N=300, fin=513, fout=257, r=64, in_max=600, out_max=300, strided=True,
                                      lead=(3,), base=base)),
            (f"wgrad-{tag}", dict(N=257, fin=320, fout=640, r=1024, in_max=320, out_max=640, weight_grad=True,
                                  base=base)),
        ]
    cases += [
        ("atomic", dict(N=2048, fin=1024, fout=1024, r=256, in_max=1024, out_max=1024, deterministic=False)),
        ("r=8-nobias", dict(N=333, fin=256, fout=512, r=8, in_max=256, out_max=512, bias=False)),
        ("N=0", dict(N=0, fin=256, fout=512, r=32, in_max=256, out_max=512)),
        ("N=1", dict(N=1, fin=4096, fout=4096, r=256, in_max=4096, out_max=11008)),
    ]
    return cases


def _poison(device):
    import torch

    if device.type == "cuda":
        # NaN into memory the caching allocator hands out next: an output a kernel leaves unwritten shows as NaN
        torch.empty(64 * 2**20, device=device).fill_(float("nan"))


def run_case(dtype_name, N, fin, fout, r, in_max, out_max, fifo=False, bias=True, p=0.0, base="cublas",
             strided=False, lead=(), deterministic=True, weight_grad=False, device="cuda"):
    import torch

    from vera_kernels.ops import draw_dropout_seed, seed_device, vera_linear
    from vera_kernels.ops import vera_triton as vt
    from vera_kernels.ops.reference import vera_formula

    from triton_cases import random_inputs

    dtype = _dt(dtype_name)
    dev = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(N * 7919 + fin * 31 + fout + r)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dev)

    total = N
    x, W, b, A, B, ld, lb = random_inputs(  # strided: every other column of a wider tensor, leading dims
        N, fin, fout, r, in_max, out_max, dtype, device=dev, generator=gen, fifo=fifo, bias=bias, strided=strided,
        lead=lead, wgrad=weight_grad)
    os.environ[ENV_BASE_GEMM] = base
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    _poison(dev)
    torch.manual_seed(1234)
    y = vera_linear(x, W, b, A, B, ld, lb, dropout_p=p, training=True, fan_in_fan_out=fifo, backend="triton")
    keep = None
    if p > 0:
        torch.manual_seed(1234)
        seed = int(draw_dropout_seed(seed_device("triton", x)))  # the op's draw, repeated (on the GPU's generator)
        keep = vt.dropout_keep_mask(seed, (x.reshape(-1, fin).shape[0], fin), p, dev).reshape(x.shape)
    gy = rnd(*y.shape).to(dtype)
    inputs = [x, ld, lb] + ([W] if weight_grad else []) + ([b] if weight_grad and bias else [])
    _poison(dev)
    grads = torch.autograd.grad(y, inputs, gy) if total else [torch.zeros_like(t) for t in inputs]
    torch.use_deterministic_algorithms(False)

    def yardstick(dt):
        ins = [t.detach().to(torch.float64 if dt == torch.float64 else t.dtype).requires_grad_(True) for t in inputs]
        xx, ldd, lbb = ins[0], ins[1], ins[2]
        WW = ins[3] if weight_grad else W.detach()
        bb = ins[4] if (weight_grad and bias) else (b.detach() if bias else None)
        yy = vera_formula(xx, WW, bb, A, B, ldd, lbb, fan_in_fan_out=fifo, keep=keep, p=p)
        gg = torch.autograd.grad(yy, ins, gy.to(yy.dtype)) if total else [torch.zeros_like(t) for t in ins]
        return yy, gg

    y64, g64 = yardstick(torch.float64)
    yd, gd = yardstick(dtype)
    names = ["y", "x", "lambda_d", "lambda_b"] + (["W"] if weight_grad else []) + (["b"] if weight_grad and bias else [])
    rows_out = []
    ok = True
    for name, ours, theirs, truth in zip(names, [y] + list(grads), [yd] + list(gd), [y64] + list(g64)):
        denom = truth.norm().item() or 1.0
        err = (ours.double() - truth).norm().item() / denom
        base_err = (theirs.double() - truth).norm().item() / denom
        finite = bool(torch.isfinite(ours).all())
        tol = max(TOL_FACTOR * base_err, TOL_FLOOR[dtype_name])
        passed = finite and err <= tol
        ok &= passed
        rows_out.append(dict(tensor=name, err=err, torch_err=base_err, tol=tol, finite=finite, ok=passed))
    os.environ.pop(ENV_BASE_GEMM, None)
    return ok, rows_out


def mixed_correctness_cases(smoke: bool):
    """(name, kwargs) of the mixed-adapter up node's cases (vera_triton.up_mixed): rows longer than a row tile (the
    two-rows-per-tile path) and shorter (the per-row gather), adapters without rows, a zero lambda row, strided
    views; tiny on the CPU smoke run."""
    if smoke:
        return [("mixed-odd", dict(n_rows=5, T=7, n_out=37, r=19, K=4, rows=[2, 0, 2, 3, 2], zero_adapter=3)),
                ("mixed-long-rows", dict(n_rows=3, T=40, n_out=70, r=40, K=2, rows=[1, 0, 1], strided=True))]
    return [
        ("mixed-train", dict(n_rows=8, T=300, n_out=2048, r=256, K=64)),  # most of the 64 adapters without rows
        ("mixed-odd", dict(n_rows=5, T=77, n_out=777, r=63, K=4, rows=[2, 0, 2, 3, 2], zero_adapter=3)),
        ("mixed-T=1", dict(n_rows=333, T=1, n_out=1000, r=32, K=7)),
        ("mixed-strided", dict(n_rows=6, T=129, n_out=513, r=64, K=3, strided=True)),
        ("mixed-K=1", dict(n_rows=2, T=1024, n_out=1024, r=128, K=1)),
    ]


def run_mixed_case(dtype_name, n_rows, T, n_out, r, K, rows=None, strided=False, zero_adapter=None, device="cuda"):
    """One mixed-adapter up-node case: y and every gradient against float64, judged as run_case judges."""
    import torch

    from vera_kernels.ops import vera_triton as vt

    from triton_cases import mixed_inputs, mixed_yardstick

    dtype = _dt(dtype_name)
    dev = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(n_rows * 7919 + T * 31 + n_out + r + K)
    inputs = mixed_inputs(n_rows, T, n_out, r, K, dtype, device=dev, generator=gen, rows=rows, strided=strided,
                          zero_adapter=zero_adapter)
    base, h, B_s, LD, LB, row_adapter, _ = inputs
    g = torch.randn(base.shape, generator=gen).to(dev, dtype)
    _poison(dev)
    y = vt.up_mixed(*inputs)
    _poison(dev)
    ours = [y] + list(torch.autograd.grad(y, [base, h, LD, LB], g))
    truth, theirs = mixed_yardstick(inputs, g, torch.float64), mixed_yardstick(inputs, g, dtype)
    rows_out, ok = [], True
    for name, o, th, tr in zip(["y", "base", "h", "LD", "LB"], ours, theirs, truth):
        denom = tr.norm().item() or 1.0
        err = (o.double() - tr).norm().item() / denom
        base_err = (th.double() - tr).norm().item() / denom
        finite = bool(torch.isfinite(o).all())
        tol = max(TOL_FACTOR * base_err, TOL_FLOOR[dtype_name])
        passed = finite and err <= tol
        ok &= passed
        rows_out.append(dict(tensor=name, err=err, torch_err=base_err, tol=tol, finite=finite, ok=passed))
    again = vt.up_mixed(*inputs)  # deterministic: the same bits again, gradients included
    again = [again] + list(torch.autograd.grad(again, [base, h, LD, LB], g))
    same = all(torch.equal(a, b) for a, b in zip(ours, again))
    rows_out.append(dict(tensor="rerun bit-identical", err=0.0 if same else 1.0, torch_err=0.0, tol=0.0,
                         finite=True, ok=same))
    return ok and same, rows_out


def mixed_bench(smoke: bool = False, tokens=8192, n_out=4096, r=256):
    """fwd+bwd of the up node at one shape, bf16: the plain single-adapter up (vt.up) against up_mixed with one
    adapter and with 64, 64 batch rows of tokens/64 (both up_mixed rows through the same function). ``smoke``:
    tiny fp16 shapes on the CPU (interpreter), one timed call each: keeps the code working."""
    import torch

    from vera_kernels.ops import vera_triton as vt

    if smoke:
        tokens, n_out, r = 64, 40, 16

        def do_bench(fn, **_):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    else:
        from triton.testing import do_bench
    dev, dt = (torch.device("cpu"), torch.float16) if smoke else (torch.device("cuda"), torch.bfloat16)
    n_rows = 64
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(tokens, n_out, generator=gen).to(dev, dt).requires_grad_(True)
    h = torch.randn(tokens, r, generator=gen).to(dev, dt).requires_grad_(True)
    B_s = (torch.randn(n_out, r, generator=gen) * r**-0.5).to(dev)
    g = torch.randn(tokens, n_out, generator=gen).to(dev, dt)
    ld, lb = torch.randn(r, device=dev, requires_grad=True), torch.randn(n_out, device=dev, requires_grad=True)
    LD64 = torch.randn(64, r, generator=gen).to(dev).requires_grad_(True)
    LB64 = torch.randn(64, n_out, generator=gen).to(dev).requires_grad_(True)
    rows64 = torch.arange(n_rows, device=dev) % 64
    LD1, LB1 = ld.detach()[None].clone().requires_grad_(True), lb.detach()[None].clone().requires_grad_(True)
    rows1 = torch.zeros(n_rows, dtype=torch.int64, device=dev)
    T = tokens // n_rows

    def fwd_bwd(fn, params):
        return lambda: torch.autograd.grad(fn(), params, g)

    cases = [
        ("up (one adapter, plain)", lambda: vt.up(base, h, B_s, ld, lb), [base, h, ld, lb]),
        ("up_mixed, K=1", lambda: vt.up_mixed(base, h, B_s, LD1, LB1, rows1, T), [base, h, LD1, LB1]),
        ("up_mixed, K=64", lambda: vt.up_mixed(base, h, B_s, LD64, LB64, rows64, T), [base, h, LD64, LB64]),
    ]
    print(f"\nMixed-adapter up node, {dt}, tokens={tokens} ({n_rows} rows of {T}), out={n_out}, r={r}")
    print(f"{'':>26} {'fwd ms':>8} {'fwd+bwd ms':>11}")
    out = []
    for name, fn, params in cases:
        with torch.no_grad():
            t_f = do_bench(fn, warmup=10, rep=40, return_mode="median")
        t_fb = do_bench(fwd_bwd(fn, params), warmup=10, rep=40, return_mode="median")
        print(f"{name:>26} {t_f:8.4f} {t_fb:11.4f}")
        out.append(dict(case=name, fwd_ms=t_f, fwd_bwd_ms=t_fb))
    return out


CARRIED_SITE = os.path.join(ROOT, ".gpu_carry", "site")  # `make gpu-carry`: a trimmed bitsandbytes for the GPU image


def dequant_speed(device: str, smoke: bool) -> dict:
    """Dequantization throughput of the native kernels against bitsandbytes' own (vera_kernels/bench/dequant.py),
    bit-exactness against bitsandbytes included, where bitsandbytes imports with kernels for ``device``. The GPU
    image has none; `make gpu-carry` prepares a trimmed copy (.gpu_carry/site, put on this worker's path) that the
    device run carries along."""
    import torch

    try:
        import bitsandbytes
        import bitsandbytes.functional as F

        F.quantize_4bit(torch.randn(64, 64, device=device, dtype=torch.float16), blocksize=64, quant_type="nf4")
    except Exception as exc:
        return dict(ok=True, skipped=f"bitsandbytes unusable on {device}: {type(exc).__name__}: {str(exc)[:200]}")
    from vera_kernels.bench.dequant import DEFAULT_SIZES, format_table, run

    sizes = ((64, 256),) if smoke else DEFAULT_SIZES
    try:
        rows = run(device, sizes=sizes, repeats=1 if smoke else 20, impls=("vera-native",))
    except Exception as exc:  # a timing failure is reported, it does not fail the check (the kernels passed above)
        return dict(ok=True, skipped=f"timing failed: {type(exc).__name__}: {str(exc)[:300]}",
                    trace=traceback.format_exc()[-1500:])
    # a bit mismatch against bitsandbytes' own CUDA kernels does fail it
    return dict(ok=all(r["bitexact_vs_bnb"] for r in rows), bitsandbytes=bitsandbytes.__version__, rows=rows,
                table=format_table(rows))


def dequant_worker(smoke: bool, out_path: str):
    """The native dequantization kernels (built here, JIT) against the PyTorch path, bit for bit, on CUDA (the CPU in
    the smoke run): tests/dequant_crosscheck.py, which needs no bitsandbytes; then their speed against bitsandbytes
    where it imports (dequant_speed). Run in its own process (the build)."""
    import torch

    from dequant_crosscheck import check_4bit, check_int8, count_cases

    from vera_kernels.quant import _native

    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    t0 = time.time()
    res = dict(device=device)
    try:
        toolkit, why_not = _native._cuda_wanted() if device == "cuda" else (True, "")
        if not toolkit:  # nothing of ours to check here: said, not failed
            res.update(ok=True, skipped=f"no CUDA build possible: {why_not}")
        elif _native.get_native() is None or not _native.native_supports(device):
            res.update(ok=False, error=f"native extension has no {device} kernels: {_native.native_status()}")
        else:
            res["build_s"] = round(time.time() - t0, 1)
            errors = check_4bit(device) + check_int8(device)
            res.update(ok=not errors, cases=count_cases(), mismatches=len(errors), first=errors[:3],
                       status=_native.native_status())
            # timings only once phase A has left the GPU (the main process touches the go file)
            deadline = time.time() + 240
            while not os.path.exists(out_path + ".go") and time.time() < deadline:
                time.sleep(0.5)
            if os.path.exists(out_path + ".go"):
                speed = dequant_speed(device, smoke)
            else:
                speed = dict(ok=True, skipped="phase A did not finish in time: no timings")
            res["speed"] = speed
            res["ok"] = res["ok"] and speed["ok"]
    except Exception as exc:
        res.update(_failure(exc))
    res["s"] = round(time.time() - t0, 1)
    with open(out_path, "w") as f:
        json.dump(res, f)


def phase_a_worker(dtype_name: str, smoke: bool, out_path: str):
    """One dtype's correctness cases (run in its own process); writes JSON lines."""
    import torch

    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    results = []
    for name, kw in correctness_cases(smoke):
        if smoke and dtype_name == "bfloat16":
            break  # the interpreter's bf16 dot is broken; bf16 is verified on the GPU
        t0 = time.time()
        try:
            ok, rows = run_case(dtype_name, device=device, **kw)
            results.append(dict(case=name, dtype=dtype_name, ok=ok, rows=rows, s=time.time() - t0))
        except Exception as exc:  # a failing case must not hide the others
            results.append(dict(_failure(exc, 2000), case=name, dtype=dtype_name, s=time.time() - t0))
    for name, kw in mixed_correctness_cases(smoke):
        if smoke and dtype_name == "bfloat16":
            break
        t0 = time.time()
        try:
            ok, rows = run_mixed_case(dtype_name, device=device, **kw)
            results.append(dict(case=name, dtype=dtype_name, ok=ok, rows=rows, s=time.time() - t0))
        except Exception as exc:
            results.append(dict(_failure(exc, 2000), case=name, dtype=dtype_name, s=time.time() - t0))
    with open(out_path, "w") as f:
        json.dump(results, f)


def big_offsets_check(smoke: bool = False):
    """A > 2**31-element input and output: 64-bit offsets (forward and backward, rows sampled against torch).
    ``smoke``: the same code on a tiny float32 input on the CPU (interpreter), to keep this function working."""
    import torch

    dev = torch.device("cpu" if smoke else "cuda")
    dt = torch.float32 if smoke else torch.bfloat16
    N, fin, fout, r = (37, 45, 29, 8) if smoke else (2**19 + 3, 4096 + 8, 4096 + 8, 16)  # > 2**31 elements each
    x = torch.randn(N, fin, device=dev, dtype=dt, requires_grad=True)
    W = (torch.randn(fout, fin, device=dev) * fin**-0.5).to(dt)
    A = torch.randn(r, fin, device=dev) * 0.03
    B = torch.randn(fout, r, device=dev) * 0.3
    ld = torch.randn(r, device=dev, requires_grad=True)
    lb = torch.randn(fout, device=dev, requires_grad=True)
    out = _for_each_base(lambda: _offsets_case(x, W, A, B, ld, lb, N, dev))
    out["ok"] = all(v["ok"] for v in out.values())
    return out


def _offsets_case(x, W, A, B, ld, lb, N, dev):
    """One base arrangement of big_offsets_check: sampled rows of y and grad_x against float64."""
    import torch

    from vera_kernels.ops import vera_linear

    y = vera_linear(x, W, None, A, B, ld, lb, backend="triton")
    idx = torch.tensor([0, 1, N // 2, N - 2, N - 1], device=dev)
    xs = x.detach()[idx].double()
    Bl = lb.double()[:, None] * B.double()
    ref = xs @ W.double().t() + ((xs @ A.double().t()) * ld.double()) @ Bl.t()
    err = _rel_err(y.detach()[idx], ref)
    gy = torch.ones_like(y)
    (gx,) = torch.autograd.grad(y, [x], gy)
    gref = gy[idx].double() @ W.double() + ((gy[idx].double() @ Bl) * ld.double()) @ A.double()
    gerr = _rel_err(gx[idx], gref)
    return dict(y_err=err, gx_err=gerr, ok=err < 2e-2 and gerr < 2e-2 and bool(torch.isfinite(y).all()))


def cuda_graph_dropout_check(smoke: bool = False):
    """Adapter dropout captured in a CUDA graph with its backward (triton backend in each base arrangement, and the
    torch backend), replayed three times: each replay must draw a fresh seed on the device (a fresh mask) and give
    the output and gradients of the formula with the mask regenerated from the seed that replay wrote, and not those
    of another replay's mask (which shows the check can fail).
    ``smoke``: the same code run eagerly on the CPU (interpreter), no capture."""
    import torch

    dev = torch.device("cpu" if smoke else "cuda")
    dt = torch.float32 if smoke else torch.bfloat16
    N, fin, fout, r = (37, 45, 29, 8) if smoke else (1000, 1032, 2072, 64)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(N, fin, generator=gen).to(dev, dt).requires_grad_(True)
    W = (torch.randn(fout, fin, generator=gen) * fin**-0.5).to(dev, dt)
    A = (torch.randn(r, fin, generator=gen) * 0.1).to(dev)
    B = (torch.randn(fout, r, generator=gen) * 0.3).to(dev)
    ld = torch.randn(r, generator=gen).to(dev).requires_grad_(True)
    lb = torch.randn(fout, generator=gen).to(dev).requires_grad_(True)
    gy = torch.randn(N, fout, generator=gen).to(dev, dt)
    inputs = (x, W, A, B, ld, lb, gy)

    def one_base():  # a failure in one arrangement still lets the others report
        try:
            return _graph_dropout_case(inputs, smoke)
        except Exception as exc:
            return _failure(exc)

    out = _for_each_base(one_base)
    try:  # the torch backend's counter-based mask, seeded on the device too: the same replay check
        out["torch"] = _graph_dropout_case(inputs, smoke, backend="torch")
    except Exception as exc:
        out["torch"] = _failure(exc)
    out["ok"] = all(v["ok"] for v in out.values())
    return out


def _graph_dropout_case(inputs, smoke: bool, p: float = 0.3, backend: str = "triton") -> dict:
    import torch

    import vera_kernels.ops as ops
    from vera_kernels.backends import get_impl
    from vera_kernels.ops.reference import vera_formula

    mask_of = get_impl(backend).dropout_keep_mask

    x, W, A, B, ld, lb, gy = inputs
    seeds, draw = [], ops.draw_dropout_seed

    def spy(device=None):  # the seed tensor the op draws: inside the graph, each replay rewrites it
        seeds.append(draw(device))
        return seeds[-1]

    def step():
        y = ops.vera_linear(x, W, None, A, B, ld, lb, dropout_p=p, training=True, backend=backend)
        return [y] + list(torch.autograd.grad(y, [x, ld, lb], gy))

    runs = []
    ops.draw_dropout_seed = spy
    try:
        if smoke:
            for _ in range(3):
                outs = step()
                runs.append((outs, int(seeds[-1])))
        else:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the default stream: Triton compiles, cuBLAS workspaces
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static = step()
            seed_t = seeds[-1]
            for _ in range(3):
                graph.replay()
                torch.cuda.synchronize()
                runs.append(([t.clone() for t in static], int(seed_t.item())))
    finally:
        ops.draw_dropout_seed = draw

    N, fin = x.shape

    def err_vs(outs, seed):
        keep = mask_of(seed, (N, fin), p, x.device)
        ins = [t.detach().double().requires_grad_(True) for t in (x, ld, lb)]
        yy = vera_formula(ins[0], W.double(), None, A.double(), B.double(), ins[1], ins[2], keep=keep, p=p)
        ref = [yy] + list(torch.autograd.grad(yy, ins, gy.double()))
        return max(_rel_err(o, t) for o, t in zip(outs, ref))

    tol = 3e-2 if x.dtype == torch.bfloat16 else 1e-4
    errs = [err_vs(outs, seed) for outs, seed in runs]
    crossed = min(err_vs(runs[i][0], runs[(i + 1) % len(runs)][1]) for i in range(len(runs)))
    distinct = len({seed for _, seed in runs}) == len(runs)
    finite = all(bool(torch.isfinite(t).all()) for outs, _ in runs for t in outs)
    return dict(captured=not smoke, seeds_distinct=distinct, max_err=max(errs), other_mask_err=crossed, tol=tol,
                ok=distinct and finite and max(errs) < tol and crossed > 10 * tol)


def checkpoint_dropout_check(smoke: bool = False):
    """Activation checkpointing with adapter dropout (triton backend, reentrant and not): the recomputed forward
    must draw the same seeds from the restored CUDA generator, so its gradients equal the plain step's (and differ
    from another seed's). ``smoke``: on the CPU."""
    import torch

    from triton_cases import checkpointed_dropout_grads

    dev = torch.device("cpu" if smoke else "cuda")
    out = {}
    for reentrant in (True, False):
        g = checkpointed_dropout_grads("triton", dev, reentrant)
        err = max(_rel_err(a, b) for a, b in zip(g["checkpointed"], g["plain"]))
        other = max(_rel_err(a, b) for a, b in zip(g["other_seed"], g["plain"]))
        out["reentrant" if reentrant else "non-reentrant"] = dict(err=err, other_seed_err=other,
                                                                  ok=err < 1e-4 and other > 1e-2)
    out["ok"] = all(v["ok"] for v in out.values())
    return out


def compile_check(device: str):
    """torch.compile(fullgraph=True) of a patched model with the triton backend; must match eager."""
    import torch
    from torch import nn

    import vera_kernels as vk

    torch.manual_seed(0)
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(96, 160)
            self.down = nn.Linear(160, 96)

        def forward(self, x):
            return self.down(torch.nn.functional.gelu(self.up(x))) + x

    m = Block().to(dev, dtype)
    vk.patch_model(m, vk.VeraConfig(r=32, target_modules=["up", "down"], init_weights=False), backend="triton")
    x = torch.randn(4, 33, 96, device=dev, dtype=dtype, requires_grad=True)
    y_eager = m(x)
    g_eager = torch.autograd.grad(y_eager.float().square().mean(), [x] + [p for p in m.parameters() if p.requires_grad])
    cm = torch.compile(m, fullgraph=True)
    y_c = cm(x)
    g_c = torch.autograd.grad(y_c.float().square().mean(), [x] + [p for p in m.parameters() if p.requires_grad])
    err = max([(y_c.float() - y_eager.float()).abs().max().item()] +
              [((a - b).float().norm() / (b.float().norm() + 1e-12)).item() for a, b in zip(g_c, g_eager)])
    return dict(max_err=err, ok=err < (5e-2 if dtype != torch.float32 else 1e-4))


# ============================================================================================ phase B: layer bench
def saved_activation_bytes(fn, exclude):
    import torch

    seen, total = set(), [0]
    excl = {t.untyped_storage().data_ptr() for t in exclude if t is not None}

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in seen and ptr not in excl:
            seen.add(ptr)
            total[0] += st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


def layer_bench(smoke: bool):
    import torch
    from torch import nn

    import vera_kernels as vk
    from vera_kernels.bench.measure import graph_replay_ms  # GPU time only: the step as a CUDA-graph replay

    dev = torch.device("cuda" if not smoke else "cpu")
    dtype = torch.bfloat16 if not smoke else torch.float32
    if smoke:
        shapes = [(64, 48, 40, 16)]
    else:
        shapes = [
            (8192, 4096, 4096, 256), (8192, 4096, 11008, 256),
            (8192, 4096, 4096, 64), (8192, 4096, 4096, 1024),
            (512, 4096, 4096, 256), (512, 4096, 11008, 256),
        ]
    try:
        from triton.testing import do_bench
    except Exception:  # pragma: no cover
        do_bench = None
    rows = []
    for tokens, fin, fout, r in shapes:
        torch.manual_seed(0)

        class One(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(fin, fout, bias=False)

            def forward(self, x):
                return self.lin(x)

        base = One().to(dev, dtype).requires_grad_(False)
        impls = {"base": base}
        import copy

        try:
            from peft import VeraConfig as PeftVeraConfig
            from peft import get_peft_model

            impls["peft"] = get_peft_model(copy.deepcopy(base), PeftVeraConfig(r=r, target_modules=["lin"],
                                                                               init_weights=False))
        except Exception as exc:
            print(f"  peft unavailable: {exc}")
        variants = [("reference", None), ("torch", None)] + [("triton", mode) for mode in _base_gemms()]
        if smoke:
            variants = [("reference", None), ("torch", None), ("triton", "cublas")]
        for backend, mode in variants:
            m = vk.patch_model(copy.deepcopy(base), vk.VeraConfig(r=r, target_modules=["lin"], init_weights=False),
                               backend=backend)
            impls[backend if mode is None else f"triton-{BASE_LABELS[mode]}"] = (m, mode)
        xs = [torch.randn(tokens, fin, device=dev, dtype=dtype, requires_grad=True) for _ in range(3)]
        gy = torch.randn(tokens, fout, device=dev, dtype=dtype)
        state = {"i": 0}

        def make_step(mod, mode, xs=xs, gy=gy):
            def step():
                if mode is not None:
                    os.environ[ENV_BASE_GEMM] = mode
                x = xs[state["i"] % len(xs)]
                state["i"] += 1
                y = mod(x)
                y.backward(gy)
                x.grad = None
            return step

        steps = {}
        for name, obj in impls.items():
            mod, mode = obj if isinstance(obj, tuple) else (obj, None)
            steps[name] = make_step(mod, mode)
        times = {n: [] for n in steps}
        gtimes = {}
        rounds = 3 if not smoke else 1
        for _ in range(rounds):
            for name, step in steps.items():  # alternated: A B C ... A B C ...
                if do_bench is not None and dev.type == "cuda":
                    times[name].append(do_bench(step, warmup=10, rep=40, return_mode="median"))
                else:
                    t0 = time.perf_counter()
                    step()
                    times[name].append((time.perf_counter() - t0) * 1e3)
        if dev.type == "cuda":
            for name, step in steps.items():
                try:
                    gtimes[name] = graph_replay_ms(step, dev, replays=40)
                except Exception as exc:
                    gtimes[name] = None
                    print(f"  graph capture failed for {name}: {type(exc).__name__}: {str(exc)[:200]}")
        for name, obj in impls.items():
            mod, mode = obj if isinstance(obj, tuple) else (obj, None)
            if mode is not None:
                os.environ[ENV_BASE_GEMM] = mode
            x = xs[0]
            params = [p for p in mod.parameters()] + [b for b in mod.buffers()]
            for sub in mod.modules():  # the cached casts of the shared projections are model state, not activations
                for hit in getattr(sub, "_cast_cache", {}).values():
                    params += list(hit[1:])
            saved, y = saved_activation_bytes(lambda: mod(x), params + [x])
            del y
            peak = None
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                steps[name]()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - before
            med = sorted(times[name])[len(times[name]) // 2]
            rows.append(dict(tokens=tokens, fin=fin, fout=fout, r=r, impl=name, fwd_bwd_ms=med, graph_ms=gtimes.get(name),
                             spread_ms=(min(times[name]), max(times[name])), saved_bytes=saved, peak_bytes=peak))
        os.environ.pop(ENV_BASE_GEMM, None)
        del impls, steps, xs, gy
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_layer_table(rows):
    print("\nLayer fwd+bwd (bf16 on GPU). eager: wall per step, CPU launch overhead included (medians of alternated"
          " rounds); graph: the same step replayed from a CUDA graph (GPU time only). Ratios within this run.")
    hdr = (f"{'tokens':>6} {'in->out':>11} {'r':>5} {'impl':>15} {'eager ms':>8} {'graph ms':>8} {'x base':>7} "
           f"{'peft/x':>7} {'saved MiB':>10} {'saved/(N*r*2)':>13} {'peak MiB':>9}")
    print(hdr)
    key = lambda r: (r["tokens"], r["fin"], r["fout"], r["r"])
    groups = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    for k, rs in groups.items():
        base = next((r for r in rs if r["impl"] == "base"), None)
        peft = next((r for r in rs if r["impl"] == "peft"), None)
        def ratio(a, b):  # GPU (graph) time where both have it, else wall time for both: never one over the other
            if a is None or b is None:
                return float("nan")
            if a.get("graph_ms") and b.get("graph_ms"):
                return a["graph_ms"] / b["graph_ms"]
            return a["fwd_bwd_ms"] / b["fwd_bwd_ms"]

        for r in rs:
            xb = ratio(r, base)
            sp = ratio(peft, r)
            lim = r["tokens"] * r["r"] * 2
            peak = f"{r['peak_bytes'] / 2**20:9.1f}" if r["peak_bytes"] is not None else f"{'-':>9}"
            gms = f"{r['graph_ms']:8.3f}" if r.get("graph_ms") else f"{'-':>8}"
            print(f"{k[0]:>6} {str(k[1]) + '->' + str(k[2]):>11} {k[3]:>5} {r['impl']:>15} {r['fwd_bwd_ms']:8.3f} "
                  f"{gms} {xb:7.3f} {sp:7.2f} {r['saved_bytes'] / 2**20:10.2f} {r['saved_bytes'] / lim:13.2f} {peak}")


def kernel_breakdown(tokens=8192, fin=4096, fout=11008, r=256, smoke=False):
    """Each Triton kernel against the cuBLAS call doing the same math, bf16, at one issue shape.
    ``smoke``: tiny shapes in fp16 on the CPU (interpreter), one timed call each: keeps every case's code working."""
    import torch

    from vera_kernels.ops import vera_triton as vt

    if smoke:
        def do_bench(fn, **_):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    else:
        from triton.testing import do_bench
    dev, dt = (torch.device("cpu"), torch.float16) if smoke else (torch.device("cuda"), torch.bfloat16)
    x = torch.randn(tokens, fin, device=dev, dtype=dt)
    g = torch.randn(tokens, fout, device=dev, dtype=dt)
    W = torch.randn(fout, fin, device=dev, dtype=dt) * fin**-0.5
    A = torch.randn(r, fin, device=dev, dtype=dt) * fin**-0.5
    B32 = torch.randn(fout, r, device=dev) * r**-0.5
    ld = torch.randn(r, device=dev)
    lb = torch.randn(fout, device=dev)
    h = x @ A.t()
    R = vt.scale_projection(B32, lb, dt, fold_d=ld)[0]
    Bc = B32.to(dt)  # the cached compute-dtype cast a layer passes
    seed = torch.tensor(12345, device=dev)  # a dropout seed, read by the kernel on the device
    y = x @ W.t()
    gx = g @ W
    G = g.t() @ h
    Nf, Nr = 2.0 * tokens * r, 2.0 * tokens * fin * fout
    cases = [
        ("scale_projection (out x r)", lambda: vt.scale_projection(B32, lb, dt, fold_d=ld), 0,
         lambda: (B32 * lb[:, None] * ld[None, :]).to(dt)),
        # the forward runs these two on cuBLAS (its column), the kernels only with dropout / the fused base
        ("down kernel: h = x A^T", lambda: vt.vera_down(x, A.t()), Nf * fin, lambda: x @ A.t()),
        ("down kernel, dropout 0.1: h = drop(x) A^T", lambda: vt.vera_down(x, A.t(), seed=seed, p=0.1), Nf * fin,
         lambda: torch.nn.functional.dropout(x, 0.1) @ A.t()),
        ("up kernel: y += h R^T", lambda: vt.vera_up(h, R.t(), y, acc_in=y), Nf * fout,
         lambda: y.addmm_(h, R.t())),
        ("fwd up+base (fused)", lambda: vt.vera_up(h, R.t(), y, xb=x, wb_kn=W.t()), Nf * fout + Nr,
         lambda: torch.mm(x, W.t())),
        # "cublas-accumulate": the rank-r product only writes y, then cuBLAS accumulates the base GEMM (beta = 1)
        ("up kernel, write only: y = h R^T", lambda: vt.vera_up(h, R.t(), y), Nf * fout, lambda: torch.mm(h, R.t())),
        ("cuBLAS y += x W^T vs y = x W^T", lambda: y.addmm_(x, W.t()), Nr, lambda: torch.mm(x, W.t())),
        ("bwd down: gB, dlambda_d", lambda: vt.vera_down(g, R, nscale=ld, h=h), Nf * fout, lambda: g @ R),
        ("bwd: g^T h (cuBLAS), then diag(lb) B + dlambda_b",
         lambda: vt.scale_projection(Bc, lb, dt, dlb_from=(g.t() @ h, ld)), Nf * fout, lambda: g.t() @ h),
        ("bwd: diag(lb) B + dlambda_b alone", lambda: vt.scale_projection(Bc, lb, dt, dlb_from=(G, ld)), 0,
         lambda: (Bc.float() * lb[:, None]).to(dt)),
        ("bwd up: gx += grad_h A", lambda: vt.vera_up(h, A, gx, acc_in=gx), Nf * fin, lambda: gx.addmm_(h, A)),
        ("bwd up+base (fused)", lambda: vt.vera_up(h, A, gx, xb=g, wb_kn=W), Nf * fin + Nr, lambda: torch.mm(g, W)),
        ("bwd up, write only: gx = grad_h A", lambda: vt.vera_up(h, A, gx), Nf * fin, lambda: torch.mm(h, A)),
        ("cuBLAS gx += g W vs gx = g W", lambda: gx.addmm_(g, W), Nr, lambda: torch.mm(g, W)),
    ]
    out = []
    print(f"\nKernel breakdown, bf16, tokens={tokens}, {fin}->{fout}, r={r} (cuBLAS/torch doing the same math; "
          "fused rows compare with the base GEMM alone)")
    print(f"{'kernel':>40} {'triton ms':>10} {'TFLOP/s':>8} {'torch ms':>9} {'TFLOP/s':>8}")
    for name, fn, flops, ref in cases:
        t_tr = do_bench(fn, warmup=10, rep=50, return_mode="median")
        t_ref = do_bench(ref, warmup=10, rep=50, return_mode="median")
        tf = lambda t: flops / (t * 1e-3) / 1e12 if flops else 0.0
        print(f"{name:>40} {t_tr:10.4f} {tf(t_tr):8.1f} {t_ref:9.4f} {tf(t_ref):8.1f}")
        out.append(dict(kernel=name, triton_ms=t_tr, torch_ms=t_ref, flops=flops))
    return out


# ============================================================================================ main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU through the Triton interpreter")
    ap.add_argument("--phase-a-worker", nargs=2, metavar=("DTYPE", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--dequant-worker", metavar="OUT", help=argparse.SUPPRESS)
    ap.add_argument("--dequant-timeout", type=int, default=300,
                    help="seconds for building the extension and checking the dequantization kernels")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--model-timeout", type=int, default=150)
    args = ap.parse_args()
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.phase_a_worker:
        phase_a_worker(args.phase_a_worker[0], args.cpu_smoke, args.phase_a_worker[1])
        return 0
    if args.dequant_worker:
        dequant_worker(args.cpu_smoke, args.dequant_worker)
        return 0

    import torch

    out_dir = os.environ.get("OUT") or (os.path.join(ROOT, "bench", "results", "raw") if not args.cpu_smoke
                                        else os.path.join("/tmp", "vera_gpu_check_smoke"))
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.time()
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    commit = os.environ.get("GIT_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dev_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    report["machine"] = dict(device=dev_name, torch=torch.__version__, triton=triton_version, commit=commit or None)
    print(f"gpu-check on {dev_name}; torch {torch.__version__}, triton {triton_version}, commit {commit}", flush=True)

    # ---- phase A: one process per dtype, in parallel (also fills the Triton cache for phase B)
    procs = []
    for dt in ("bfloat16", "float16", "float32"):
        path = os.path.join(out_dir, f"gpu_check_{dt}.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--phase-a-worker", dt, path]
        if args.cpu_smoke:
            cmd.insert(2, "--cpu-smoke")
        _remove(path)  # a worker that dies without writing must not be read as an earlier run's pass
        procs.append((dt, path, subprocess.Popen(cmd, cwd=ROOT, env=_env_without_switches())))
    dq_path = os.path.join(out_dir, "gpu_check_dequant.json")
    _remove(dq_path)
    _remove(dq_path + ".go")
    dq_cmd = [sys.executable, os.path.abspath(__file__), "--dequant-worker", dq_path]
    dq_cmd += ["--cpu-smoke"] if args.cpu_smoke else []
    # builds the extension while phase A runs; its own process group, so a timeout also stops ninja/nvcc
    dq_env = dict(os.environ, VERA_KERNELS_VERBOSE_BUILD="1")  # the compiler's own words in the log if it fails
    if os.path.isdir(CARRIED_SITE):
        dq_env["PYTHONPATH"] = os.pathsep.join(p for p in (CARRIED_SITE, dq_env.get("PYTHONPATH")) if p)
    dq_proc = subprocess.Popen(dq_cmd, cwd=ROOT, start_new_session=True, env=dq_env)
    dq_start = time.time()
    on_gpu = torch.cuda.is_available() and not args.cpu_smoke
    checks = ((("compile", lambda: compile_check("cuda")), ("offsets64", big_offsets_check),
               ("cuda-graph-dropout", cuda_graph_dropout_check), ("checkpoint-dropout", checkpoint_dropout_check))
              if on_gpu else
              (("offsets64-smoke", lambda: big_offsets_check(smoke=True)),
               ("breakdown-smoke", lambda: dict(ok=bool(kernel_breakdown(64, 48, 40, 16, smoke=True)))),
               ("mixed-bench-smoke", lambda: dict(ok=bool(mixed_bench(smoke=True)))),
               ("compile", lambda: compile_check("cpu")),
               ("cuda-graph-dropout-smoke", lambda: cuda_graph_dropout_check(smoke=True)),
               ("checkpoint-dropout-smoke", lambda: checkpoint_dropout_check(smoke=True))))
    extra = {}
    for name, fn in checks:
        t0 = time.time()
        try:
            extra[name] = fn()
        except Exception as exc:
            extra[name] = _failure(exc)
        extra[name]["s"] = round(time.time() - t0, 1)
        if on_gpu:
            torch.cuda.empty_cache()
    results = []
    for dt, path, p in procs:
        rc = p.wait()
        try:
            with open(path) as f:
                results += json.load(f)
            if rc:
                results.append(dict(case="(worker)", dtype=dt, ok=False, error=f"worker exited with rc={rc}"))
        except Exception as exc:
            results.append(dict(case="(worker)", dtype=dt, ok=False, error=f"worker rc={rc}: {exc}"))
    with open(dq_path + ".go", "w"):  # phase A is off the GPU: the dequantization worker may time now
        pass
    try:
        rc = dq_proc.wait(timeout=max(1.0, args.dequant_timeout - (time.time() - dq_start)))
        with open(dq_path) as f:
            extra["dequant"] = json.load(f)
        if rc:
            extra["dequant"].update(ok=False, error=f"worker exited with rc={rc}")
    except subprocess.TimeoutExpired:
        try:
            os.killpg(dq_proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        dq_proc.wait()
        extra["dequant"] = dict(ok=False, error=f"timed out after {args.dequant_timeout} s (build + check)")
    except Exception as exc:
        extra["dequant"] = dict(ok=False, error=f"worker rc={dq_proc.returncode}: {exc}")
    report["correctness"] = results
    report["extra_checks"] = extra
    report_path = os.path.join(out_dir, "gpu_check.json")

    def dump():  # after every phase: a run cut short still leaves what it measured
        report["total_s"] = round(time.time() - t_start, 1)
        with open(report_path, "w") as f:
            json.dump(report, f, indent=1, default=str)

    dump()
    n_ok = sum(r["ok"] for r in results)
    print(f"\nPhase A: {n_ok}/{len(results)} correctness cases pass  ({time.time() - t_start:.0f} s)")
    print(f"{'dtype':>9} {'case':>26} {'ok':>3}  worst tensor: err vs fp64 (torch's own err, tol)")
    for r in results:
        if "rows" in r:
            # (a bit-identity row has tol 0: it ranks last when it holds, first when it does not)
            worst = max(r["rows"], key=lambda x: x["err"] / x["tol"] if x["tol"] else (0.0 if x["err"] == 0
                                                                                        else float("inf")))
            print(f"{r['dtype']:>9} {r['case']:>26} {'ok' if r['ok'] else 'NO':>3}  {worst['tensor']}: "
                  f"{worst['err']:.2e} ({worst['torch_err']:.2e}, {worst['tol']:.1e})")
        else:
            print(f"{r['dtype']:>9} {r['case']:>26} {'NO':>3}  {r.get('error')}")
    for name, res in extra.items():
        print(f"{'extra':>9} {name:>26} {'ok' if res.get('ok') else 'NO':>3}  "
              + json.dumps({k: v for k, v in res.items() if k not in ('trace', 'speed')}))
    speed = extra.get("dequant", {}).get("speed")
    if speed:
        print("\nDequantization vs bitsandbytes (GB/s of output; ms/bnb = our time / bnb's):")
        print(speed.get("table") or f"  skipped: {speed.get('skipped')}")

    # ---- phase B: layer benchmark
    t0 = time.time()
    try:
        rows = layer_bench(args.cpu_smoke)
        report["layer_bench"] = rows
        print_layer_table(rows)
    except Exception as exc:
        report["layer_bench_error"] = traceback.format_exc()[-3000:]
        print("layer bench failed:", exc)
        traceback.print_exc()
    if torch.cuda.is_available() and not args.cpu_smoke:
        for shape in ((8192, 4096, 11008, 256), (8192, 4096, 4096, 256)):
            try:
                report.setdefault("kernel_breakdown", []).append(kernel_breakdown(*shape))
            except Exception as exc:
                print("kernel breakdown failed:", exc)
                traceback.print_exc()
            torch.cuda.empty_cache()
        try:
            report["mixed_bench"] = mixed_bench()
        except Exception as exc:
            print("mixed-adapter bench failed:", exc)
            traceback.print_exc()
        torch.cuda.empty_cache()
    print(f"(phase B {time.time() - t0:.0f} s)", flush=True)
    dump()

    # ---- phase C: model benchmark (the bench CLI), time-boxed
    if not args.skip_model:
        t0 = time.time()
        json_path = os.path.join(out_dir, "gpu_check_model.json")
        cmd = [sys.executable, "-m", "vera_kernels.bench", "--json", json_path]
        cmd += ["--device", "cuda", "--model", "llama-1b", "--quick"] if not args.cpu_smoke else ["--quick"]
        text_path = os.path.join(out_dir, "gpu_check_model.txt")  # the whole table (the log gets its tail)
        _remove(json_path)
        _remove(text_path)
        try:
            proc = subprocess.run(cmd, cwd=ROOT, timeout=args.model_timeout, capture_output=True, text=True,
                                  env=dict(_env_without_switches(), PYTHONPATH=ROOT))
            stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:  # what it printed so far (bytes, whatever text=True says)
            stdout, stderr = [(x.decode(errors="replace") if isinstance(x, bytes) else x) or ""
                              for x in (exc.stdout, exc.stderr)]
            rc = "timeout"
        with open(text_path, "w") as f:
            f.write(stdout + "\n--- stderr ---\n" + stderr)
        print(stdout[-6000:])
        if rc == "timeout":
            print(f"model bench timed out after {args.model_timeout} s; where it got to:\n{stderr[-2000:]}")
        elif rc:
            print(stderr[-3000:])
        report["model_bench_rc"] = rc
        print(f"(phase C {time.time() - t0:.0f} s)")

    dump()
    model_rc = report.get("model_bench_rc", 0)
    ok = (all(r["ok"] for r in results) and all(v.get("ok") for v in extra.values())
          and model_rc in (0, "timeout"))  # a crash of the model bench is a bug; running out of time is not
    print(f"\ngpu-check {'PASSED' if ok else 'FAILED'} in {report['total_s']} s"
          + (f" (model bench: {model_rc})" if model_rc else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
