"""Dequantization throughput: vera_kernels (native extension, and its pure-PyTorch fallback) vs bitsandbytes' own.

Throughput = bytes of OUTPUT written per second (GB/s = 1e9 B/s). Implementations are timed alternately (A, B, C, A,
B, C, ...) after a warm-up; the median of ``repeats`` runs is reported; CPU timings use time.perf_counter, CUDA
timings the GPU time of a CUDA-graph replay (measure.graph_replay_ms). Every case is also checked bit for bit against
bitsandbytes.
``run(device, sizes, repeats)`` returns one dict per (case, implementation); ``format_table`` renders them. Used by
``python -m vera_kernels.bench`` (the "dequant" case) and by ``bench/bench_dequant.py``.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Iterable, Optional

import torch

from ..quant import dequant as D

DEFAULT_SIZES = ((4096, 4096), (11008, 4096))
DEFAULT_FORMATS = ("nf4", "nf4-nested", "fp4", "int8")
DEFAULT_OUT_DTYPES = (torch.bfloat16, torch.float32)
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    if device.type == "cuda":
        from .measure import graph_replay_ms

        def time_cuda(fn):
            # GPU time only: a ~15 us kernel is shorter than one Python call of either library, so events around an
            # eager call would time the host. Replayed from a CUDA graph (L2 flushed before each replay); a call
            # that cannot be captured falls back to events around 10 back-to-back calls.
            try:
                return graph_replay_ms(fn, device, replays=5) / 1e3
            except Exception:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(10):
                    fn()
                end.record()
                end.synchronize()
                return start.elapsed_time(end) / 1e4

        return time_cuda

    def time_cpu(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return time_cpu


def _make_case(fmt: str, rows: int, cols: int, out_dtype: torch.dtype, device: torch.device):
    """Returns (callables by implementation name, reference output from bitsandbytes)."""
    import bitsandbytes.functional as F

    if fmt == "int8":
        A = torch.randn(rows, cols, dtype=torch.float16, device=device)
        CB, SCB, _ = F.int8_vectorwise_quant(A)
        fns = {
            "vera-native": lambda: D.dequantize_int8_rowwise(CB, SCB, out_dtype, impl="native"),
            "bitsandbytes": lambda: F.int8_vectorwise_dequant(CB, SCB).to(out_dtype),
            "vera-torch": lambda: D.dequantize_int8_rowwise(CB, SCB, out_dtype, impl="torch"),
        }
        return fns
    quant_type = fmt.split("-")[0]
    nested = fmt.endswith("nested")
    A = torch.randn(rows, cols, dtype=out_dtype, device=device)
    q, qs = F.quantize_4bit(A, blocksize=64, quant_type=quant_type, compress_statistics=nested)
    return {
        "vera-native": lambda: D.dequantize_4bit(q, qs, impl="native"),
        "bitsandbytes": lambda: F.dequantize_4bit(q, qs),
        "vera-torch": lambda: D.dequantize_4bit(q, qs, impl="torch"),
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.element_size() == 4 else t.view(torch.int16)


def run(
    device="cpu",
    sizes: Iterable[tuple[int, int]] = DEFAULT_SIZES,
    repeats: int = 10,
    formats: Iterable[str] = DEFAULT_FORMATS,
    out_dtypes: Iterable[torch.dtype] = DEFAULT_OUT_DTYPES,
    impls: Optional[Iterable[str]] = ("vera-native",),
    warmup: int = 2,
) -> list[dict]:
    """Benchmark; one dict per (format, shape, out dtype, implementation).

    ``impls``: which of "vera-native", "vera-torch" to time besides "bitsandbytes" (None: all)."""
    device = torch.device(device)
    timer = _timer(device)
    results = []
    for rows, cols in sizes:
        for fmt in formats:
            for out_dtype in out_dtypes:
                if fmt == "int8" and out_dtype != torch.float32:
                    continue  # bitsandbytes' int8 dequant produces float32 only
                fns = _make_case(fmt, rows, cols, out_dtype, device)
                if impls is not None:
                    fns = {k: v for k, v in fns.items() if k in set(impls) | {"bitsandbytes"}}
                ref = fns["bitsandbytes"]()
                exact = {}
                for name, fn in fns.items():
                    out = fn()
                    exact[name] = out.shape == ref.shape and torch.equal(_bits(out), _bits(ref))
                for _ in range(warmup):
                    for fn in fns.values():
                        fn()
                times = {name: [] for name in fns}
                for _ in range(repeats):
                    for name, fn in fns.items():  # alternate A, B, C every round
                        times[name].append(timer(fn))
                nbytes = rows * cols * torch.empty((), dtype=out_dtype).element_size()
                t_bnb = statistics.median(times["bitsandbytes"])
                for name, ts in times.items():
                    med = statistics.median(ts)
                    results.append(
                        {
                            "device": str(device),
                            "format": fmt,
                            "shape": (rows, cols),
                            "out_dtype": _DTYPE_NAMES[out_dtype],
                            "impl": name,
                            "median_ms": med * 1e3,
                            "gbps": nbytes / med / 1e9,
                            "ratio_vs_bnb": med / t_bnb,  # ours / theirs, as every ratio of the benchmark
                            "bitexact_vs_bnb": bool(exact[name]),
                            "repeats": repeats,
                        }
                    )
    return results


def format_table(results: list[dict]) -> str:
    header = f"{'format':<11} {'shape':>12} {'out':>4} {'impl':<13} {'ms':>9} {'GB/s':>7} {'ms/bnb':>6} exact"
    lines = [header, "-" * len(header)]
    for r in results:
        shape = "x".join(map(str, r["shape"]))
        lines.append(
            f"{r['format']:<11} {shape:>12} {r['out_dtype']:>4} {r['impl']:<13} {r['median_ms']:>9.3f} "
            f"{r['gbps']:>7.2f} {r['ratio_vs_bnb']:>6.2f} {'yes' if r['bitexact_vs_bnb'] else 'NO'}"
        )
    return "\n".join(lines)
