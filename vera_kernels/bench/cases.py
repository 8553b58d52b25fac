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
        "adapters": None, "fwd_nograd_ms": None,  # mixed-adapter rows only
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


# ---------------------------------------------------------------------------------------------- mixed-adapter batches
MIXED_IMPLS = ("peft", "peft-lora", "reference", "torch", "triton")
MIXED_MODE = "eval mode (dropout off), vera_dropout/lora_dropout 0"
REFERENCE_MIXED_OPT_IN = ("timed only when named in --backends (e.g. --backends torch,reference,peft-lora): its mixed "
                          "path runs every adapter's branch on the whole batch, K times one adapter's work "
                          "(about 17x at 64 adapters on a CPU)")
PEFT_VERA_NO_MIXED = ("PEFT's VeRA has no mixed-adapter batches: it ignores adapter_names and runs the active adapter "
                      "on every row")


def mixed_assignment(n_adapters: int, rows: int, seed: int) -> list[str]:
    """Row i's adapter name: adapters a0 .. a{n-1} round-robin over the rows, then the rows shuffled (fixed seed), so
    one adapter's rows are not contiguous. Every adapter gets rows // n or one more."""
    names = [f"a{i % n_adapters}" for i in range(rows)]
    perm = torch.randperm(rows, generator=torch.Generator().manual_seed(seed + 7)).tolist()
    return [names[p] for p in perm]


def _mixed_variant(impl: str, master, n_adapters: int, r: int, lora_r: int):
    """``master`` with ``n_adapters`` adapters a0 .. a{n-1} on every linear layer, all of them trainable (VeRA: the
    lambdas; LoRA: A and B), in eval mode."""
    names = [f"a{i}" for i in range(n_adapters)]
    m = I.share_copy(master)
    if impl == "peft-lora":
        peft = I.import_peft()

        def cfg():
            return peft.LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=list(LLAMA_TARGETS),
                                   lora_dropout=0.0)

        with I._quiet():
            m = peft.get_peft_model(m, cfg(), adapter_name=names[0])
            for n in names[1:]:
                m.add_adapter(n, cfg())
        marker = "lora_"
    elif impl in I.OURS:
        import vera_kernels as vk

        for k, n in enumerate(names):
            cfg = vk.VeraConfig(r=r, target_modules=list(LLAMA_TARGETS), projection_prng_key=0, vera_dropout=0.0,
                                init_weights=True)
            if k == 0:
                m = vk.patch_model(m, cfg, n, backend=impl)
            else:
                vk.add_adapter(m, n, cfg)
        marker = "vera_lambda_"
    else:
        raise ValueError(f"{impl!r} has no mixed-adapter batches")
    for name, p in m.named_parameters():
        if marker in name:
            p.requires_grad_(True)
    return m.eval()


def mixed_case(preset, counts, dtype_name: str, r: int, impls: list[str], reasons: dict, warmup: int, repeats: int,
               ctx: RunCtx) -> list[dict]:
    """One batch of ``preset.batch`` rows over each of ``counts`` distinct adapters: every implementation's model
    holds max(counts) adapters; per count, the rows get a fixed shuffled assignment. Two workloads per
    (implementation, count), all alternated in one pass: a forward under torch.no_grad (fwd_nograd_ms), and forward +
    backward of the LM loss (fwd_ms, bwd_ms, fwdbwd_ms: the gradients of every adapter in the batch; no optimizer).
    All in eval mode, which PEFT's LoRA requires for adapter_names."""
    dtype = dtype_of(dtype_name)
    dev = ctx.device
    shape = preset.shape()
    impls = [i for i in impls if i in MIXED_IMPLS]
    runnable = [i for i in impls if reasons.get(i) is None and i != "peft"]
    master = I.build_llama(preset, dtype, dev, ctx.seed)
    gen = torch.Generator(device="cpu").manual_seed(ctx.seed + 2)
    batches = [torch.randint(0, preset.vocab, (preset.batch, preset.seq), generator=gen).to(dev)
               for _ in range(N_INPUTS)]
    assignments = {k: mixed_assignment(k, preset.batch, ctx.seed) for k in counts}
    models, build_err = {}, {}
    for impl in runnable:
        try:
            models[impl] = _mixed_variant(impl, master, max(counts), r, preset.lora_r)
        except Exception as exc:
            build_err[impl] = f"could not build: {type(exc).__name__}: {exc}"[:160]
            free_memory(dev)
    label = {(impl, k): f"{impl}@{k}" for impl in models for k in counts}
    workloads = []
    for impl in models:
        for k in counts:
            workloads.append(_mixed_workload(label[impl, k] + "/no-grad", models[impl], batches, assignments[k],
                                             grad=False))
            workloads.append(_mixed_workload(label[impl, k], models[impl], batches, assignments[k], grad=True))
    # one alternation over every (implementation, count, no-grad forward | fwd+bwd), so that no timing is taken while
    # the machine was busier than for another; no CUDA-graph replay: the row plans build small index tensors on the
    # host every call
    both = run_alternating(workloads, dev, warmup, repeats, ctx.time_cap_s, ctx.min_rounds, N_INPUTS, ctx.tick,
                           graph=False)
    measured = {key: m for key, m in both.items() if not key.endswith("/no-grad")}
    measured_infer = {key.removesuffix("/no-grad"): m for key, m in both.items() if key.endswith("/no-grad")}
    rows: list[dict] = []
    for k in counts:
        case = f"mixed {k} adapter" + ("" if k == 1 else "s")
        for impl in impls:
            key = label.get((impl, k))
            reason = PEFT_VERA_NO_MIXED if impl == "peft" and not reasons.get(impl) else (
                reasons.get(impl) or build_err.get(impl) or (None if key in measured else "not run"))
            if reason is not None:
                row = _row(case, "mixed", impl, dtype_name, preset.tokens, r, shape, ctx, reason=reason)
            else:
                m_inf, m = measured_infer[key], measured[key]
                row = _row(case, "mixed", impl, dtype_name, preset.tokens, r, shape, ctx, m=m)
                if row["available"] and m_inf.error is not None:
                    row = _row(case, "mixed", impl, dtype_name, preset.tokens, r, shape, ctx,
                               reason="no-grad forward: " + m_inf.error)
                if row["available"]:
                    s = summarize(m_inf.times["fwd_ms"])
                    row["fwd_nograd_ms"] = s["median"]
                    row["spread"]["fwd_nograd_ms"] = {q: s[q] for q in ("q1", "q3", "min", "max")}
                    # no optimizer here: the step is the forward + backward, shown as such
                    row["step_ms"] = row["tokens_per_s"] = None
                    row["spread"].pop("step_ms", None)
                    if dev.type == "cuda":
                        row["gpu_note"] = "not measured for mixed-adapter batches (host-built row indices)"
            row["adapter"] = _adapter(impl, r, preset.lora_r)
            row["adapters"] = k
            rows.append(row)
    del workloads, both, measured, measured_infer, models, master, batches
    gc.collect()
    free_memory(dev)
    return rows


def _mixed_workload(label: str, model, batches, names: list[str], grad: bool) -> Workload:
    params = I.trainable(model)

    if grad:
        def forward(i):
            ids = batches[i]
            return model(input_ids=ids, labels=ids, adapter_names=names).loss

        def backward(loss, i):
            loss.backward()
    else:
        def forward(i):
            with torch.no_grad():
                return model(input_ids=batches[i], adapter_names=names).logits

        def backward(out, i):
            pass

    def zero():
        for p in params:
            p.grad = None

    def not_activations():
        return module_storage_ptrs(model) | storage_ptrs(batches)

    return Workload(label, forward, backward, None, zero, not_activations, keep=[model])
