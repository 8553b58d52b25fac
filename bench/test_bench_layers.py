"""pytest-benchmark cases for the layer-level comparisons of `python -m vera_kernels.bench` (NOT part of CI).

    PYTHONPATH=. .venv/bin/python -m pytest bench/test_bench_layers.py --benchmark-only \
        --benchmark-group-by=group --benchmark-columns=median,iqr,min,max,rounds

Same cases as the CLI: on CPU 2048x2048 and 2048x5632 (both in one module, so the shared A/B are sized as PEFT
would), 1024 tokens, r=256, fp32 and bf16, 2 threads; on GPU 4096x4096 and 4096x11008, 8192 tokens, bf16. Each
benchmark is one forward+backward of one layer (x requires grad, weight frozen), inputs rotating among 3 tensors;
`extra_info` holds the bytes autograd saves for backward. pytest-benchmark runs one case's rounds back to back (no
alternation between implementations), so for ratios use the CLI, which alternates; these are for tracking over
time (--benchmark-autosave / --benchmark-compare).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from vera_kernels.bench import impls as I
from vera_kernels.bench.measure import SavedBytesCounter, module_storage_ptrs, storage_ptrs

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEV.type == "cpu":
    torch.set_num_threads(2)
SHAPES = [(2048, 2048), (2048, 5632)] if DEV.type == "cpu" else [(4096, 4096), (4096, 11008)]
TOKENS = 1024 if DEV.type == "cpu" else 8192
R = 256
DTYPES = ["fp32", "bf16"] if DEV.type == "cpu" else ["bf16"]
IMPLS = ["base", "peft", "reference", "torch", "triton"]
ROUNDS = 10 if DEV.type == "cpu" else 50
_DT = {"fp32": torch.float32, "bf16": torch.bfloat16}

_cache: dict = {}


def _variants(dtype: str):
    """One layer stack per dtype and one variant per implementation, all sharing the frozen weights."""
    if dtype not in _cache:
        _cache.clear()
        master = I.LayerStack(SHAPES, _DT[dtype], DEV, seed=0)
        _cache[dtype] = (master, {})
    return _cache[dtype]


def _sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{a}x{b}" for a, b in SHAPES])
@pytest.mark.parametrize("impl", IMPLS)
def test_layer_fwd_bwd(benchmark, impl, shape, dtype):
    reason = I.unavailable_reason(impl, DEV, explicit=False)
    if reason:
        pytest.skip(reason)
    master, variants = _variants(dtype)
    if impl not in variants:
        variants[impl] = I.make_variant(impl, master, [f"l{k}" for k in range(len(SHAPES))], R)
    variant = variants[impl]
    layer = I.inner_module(variant, impl, f"l{SHAPES.index(shape)}")
    gen = torch.Generator(device="cpu").manual_seed(1)
    xs = [torch.randn(TOKENS, shape[0], generator=gen).to(DEV, _DT[dtype]).requires_grad_(True) for _ in range(3)]
    gs = [torch.randn(TOKENS, shape[1], generator=gen).to(DEV, _DT[dtype]) for _ in range(3)]
    turn = itertools.cycle(range(3))

    def step():
        i = next(turn)
        xs[i].grad = None
        for p in layer.parameters():
            p.grad = None
        layer(xs[i]).backward(gs[i])
        _sync()

    counter = SavedBytesCounter()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        y = layer(xs[0])
    saved = counter.bytes(module_storage_ptrs(variant) | storage_ptrs(xs))
    y.backward(gs[0])
    del y
    benchmark.group = f"layer {shape[0]}x{shape[1]} {dtype} {TOKENS} tokens r={R}"
    benchmark.extra_info.update(impl=impl, saved_bytes=saved, tokens=TOKENS, r=R, dtype=dtype)
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=2, iterations=1)
