"""The cases: layer-level (one linear layer, forward + backward + optimizer on its lambdas) and model-level (a
Llama model's training step). Each case builds every implementation, runs them alternated, and returns rows."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import impls as I
from .measure import TIME_KEYS, Workload, free_memory, module_storage_ptrs, run_alternating, storage_ptrs, summarize
from .presets import LLAMA_TARGETS

N_INPUTS = 3  # inputs rotate among this many tensors so caches do not flatter


@dataclass
class RunCtx:
    device: torch.device
    seed: int
    time_cap_s: float
    min_rounds: int
    tick: Callable[[int], None]
    peak_kind: str
    timing: str
    graph: bool = True  # CUDA: also time each fwd+bwd as a CUDA-graph replay (GPU time only)


def dtype_of(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _adapter(impl: str, r: Optional[int], lora_r: int = 16) -> dict:
    if impl == "base":
        return {"type": None, "r": None}
    if impl == "peft-lora":
        return {"type": "lora", "r": lora_r}
    return {"type": "vera", "r": r}


def _row(case: str, kind: str, impl: str, dtype: str, tokens: int, r: Optional[int], shape: str, ctx: RunCtx,
         reason: Optional[str] = None, m=None) -> dict:
    row = {
        "case": case, "kind": kind, "impl": impl, "dtype": dtype, "tokens": int(tokens),
        "r": int(r) if r is not None else None, "shape": shape,
        "available": reason is None and (m is None or m.error is None),
        "reason": reason if reason is not None else (m.error if m is not None else None),
        "fwd_ms": None, "bwd_ms": None, "fwdbwd_ms": None, "step_ms": None, "tokens_per_s": None,
        "saved_bytes": None, "peak_bytes": None, "gpu_fwdbwd_ms": None, "gpu_note": None,
        "peak_kind": ctx.peak_kind, "timing": ctx.timing,
        "adapter": _adapter(impl, r), "repeats": 0, "spread": {},
        "ratio_vs_peft": {}, "ratio_vs_base": {},
    }
    if row["available"] and m is not None:
        for key in TIME_KEYS:
            s = summarize(m.times[key])
            row[key] = s["median"]
            row["spread"][key] = {k: s[k] for k in ("q1", "q3", "min", "max")}
            row["repeats"] = s["n"]
        if row["step_ms"]:
            row["tokens_per_s"] = tokens / (row["step_ms"] / 1e3)
        row["saved_bytes"] = m.saved_bytes
        row["peak_bytes"] = m.peak_bytes
        row["gpu_fwdbwd_ms"] = m.gpu_fwdbwd_ms
        row["gpu_note"] = m.gpu_note
        if row["repeats"] == 0:
            row["available"] = False
            row["reason"] = "no timed round completed"
    return row


# ---------------------------------------------------------------------------------------------- layer cases
def layer_cases(shapes, tokens: int, r: int, dtype_name: str, impls: list[str], reasons: dict, warmup: int,
                repeats: int, ctx: RunCtx) -> list[dict]:
    """All layers of ``shapes`` in one module; each layer is a case of its own (implementations alternate)."""
    dtype = dtype_of(dtype_name)
    dev = ctx.device
    runnable = [i for i in impls if reasons.get(i) is None]
    rows: list[dict] = []
    master = I.LayerStack(shapes, dtype, dev, seed=ctx.seed)
    variants, build_err = {}, {}
    for impl in runnable:
        try:
            variants[impl] = I.make_variant(impl, master, [f"l{k}" for k in range(len(shapes))], r)
        except Exception as exc:
            build_err[impl] = f"could not build: {type(exc).__name__}: {exc}"[:160]
    gen = torch.Generator(device=dev).manual_seed(ctx.seed + 1)  # inputs drawn where they live
    for k, (fin, fout) in enumerate(shapes):
        case = f"layer {fin}x{fout}"
        shape = f"{fin}x{fout}"
        name = f"l{k}"
        xs = [torch.randn(tokens, fin, generator=gen, device=dev).to(dtype).requires_grad_(True)
              for _ in range(N_INPUTS)]
        gs = [torch.randn(tokens, fout, generator=gen, device=dev).to(dtype) for _ in range(N_INPUTS)]
        workloads = []
        for impl, variant in variants.items():
            layer = I.inner_module(variant, impl, name)
            params = I.trainable(layer)
            workloads.append(_layer_workload(impl, layer, variant, params, xs, gs))
        measured = run_alternating(workloads, dev, warmup, repeats, ctx.time_cap_s, ctx.min_rounds, N_INPUTS,
                                   ctx.tick, graph=ctx.graph)
        for impl in impls:
            if impl in measured:
                rows.append(_row(case, "layer", impl, dtype_name, tokens, r, shape, ctx, m=measured[impl]))
            else:
                rows.append(_row(case, "layer", impl, dtype_name, tokens, r, shape, ctx,
                                 reason=reasons.get(impl) or build_err.get(impl) or "not run"))
        del workloads, measured, xs, gs
        free_memory(dev)
    del variants, master
    free_memory(dev)
    return rows


def _layer_workload(impl, layer, variant, params, xs, gs) -> Workload:
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def forward(i):
        return layer(xs[i])

    def backward(out, i):
        out.backward(gs[i])

    def zero():
        for x in xs:
            x.grad = None
        if opt is not None:
            opt.zero_grad(set_to_none=True)

    def not_activations():
        return module_storage_ptrs(variant) | storage_ptrs(xs)

    return Workload(impl, forward, backward, opt.step if opt is not None else None, zero, not_activations,
                    keep=[variant, opt])


# ---------------------------------------------------------------------------------------------- model case
def model_case(preset, dtype_name: str, r: int, impls: list[str], reasons: dict, warmup: int, repeats: int,
               ctx: RunCtx) -> list[dict]:
    dtype = dtype_of(dtype_name)
    dev = ctx.device
    case = f"model {preset.name}"
    shape = (f"h{preset.hidden} i{preset.intermediate} L{preset.layers} H{preset.heads}/{preset.kv_heads} "
             f"V{preset.vocab} {preset.batch}x{preset.seq}")
    rows: list[dict] = []
    runnable = [i for i in impls if reasons.get(i) is None]
    master = I.build_llama(preset, dtype, dev, ctx.seed)
    gen = torch.Generator(device="cpu").manual_seed(ctx.seed + 2)
    batches = [torch.randint(0, preset.vocab, (preset.batch, preset.seq), generator=gen).to(dev)
               for _ in range(N_INPUTS)]
    workloads, build_err = [], {}
    for impl in runnable:
        try:
            variant = I.make_variant(impl, master, LLAMA_TARGETS, r, lora_r=preset.lora_r)
            hook = I.require_grad_from_embeddings(variant) if impl == "base" else None
            workloads.append(_model_workload(impl, variant, batches, hook))
        except Exception as exc:
            build_err[impl] = f"could not build: {type(exc).__name__}: {exc}"[:160]
            free_memory(dev)
    measured = run_alternating(workloads, dev, warmup, repeats, ctx.time_cap_s, ctx.min_rounds, N_INPUTS, ctx.tick,
                               graph=ctx.graph)
    for impl in impls:
        if impl in measured:
            row = _row(case, "model", impl, dtype_name, preset.tokens, r, shape, ctx, m=measured[impl])
        else:
            row = _row(case, "model", impl, dtype_name, preset.tokens, r, shape, ctx,
                       reason=reasons.get(impl) or build_err.get(impl) or "not run")
        row["adapter"] = _adapter(impl, r, preset.lora_r)
        rows.append(row)
    del workloads, measured, master, batches
    gc.collect()
    free_memory(dev)
    return rows


def _model_workload(impl, model, batches, hook) -> Workload:
    params = I.trainable(model)
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def forward(i):
        ids = batches[i]
        return model(input_ids=ids, labels=ids).loss

    def backward(loss, i):
        loss.backward()

    def zero():
        if opt is not None:
            opt.zero_grad(set_to_none=True)

    def not_activations():
        return module_storage_ptrs(model) | storage_ptrs(batches)

    return Workload(impl, forward, backward, opt.step if opt is not None else None, zero, not_activations,
                    keep=[model, opt, hook])
