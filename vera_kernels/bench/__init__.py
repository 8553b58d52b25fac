"""``python -m vera_kernels.bench``: throughput and memory of vera_kernels against PEFT's VeRA and the reference path.

Run with no arguments on whatever machine it finds (under 3 minutes on a 2-core CPU). It measures, for every
implementation that can run here, alternated in one process:

- layer-level cases: bias-free linear layers living in ONE module (so VeRA's shared A/B are sized as PEFT would size
  them for those layers), each timed on its own: forward, backward (x requires grad, weight frozen) and a full step
  (+ AdamW on the layer's lambdas). CPU default: 2048x2048 and 2048x5632, 1024 tokens, r=256, fp32 and bf16
  (where the CPU goals are stated). GPU default: 4096x4096 and 4096x11008, bf16, 8192 tokens at r=256, plus r=64,
  r=1024 and 512 tokens (the GPU goals' cases);
- a Llama-shaped model (transformers LlamaConfig, random weights, nothing downloaded; ``--model`` tiny on CPU,
  llama-1b / llama-7b-layers on GPU) with every linear layer targeted: training-step time and tokens/s;
- a short training run (fp32, fixed synthetic data, same seed): our loss curve against PEFT's, step for step;
- dequantization of bitsandbytes weights (nf4, nested nf4, fp4, int8) by our native extension against bitsandbytes'
  own, bit-exactness checked (when bitsandbytes is installed);
- only with ``--cases mixed`` (or ``all``; ~40 s on a 2-core CPU, so not in the default run): mixed-adapter batches,
  one batch of 64 rows whose rows run 1, 8 or 64 distinct adapters (``model(ids, adapter_names=names)``; 64 adapters
  loaded, row i runs adapter i % n, rows shuffled with a fixed seed), every linear layer of a small Llama targeted
  (CPU: hidden 512, 2 layers, 64 rows x 8 tokens; GPU: hidden 2048, 4 layers, 64 x 128), in eval mode (PEFT LoRA
  allows adapter_names only there), dropout 0: a forward under torch.no_grad, and forward + backward of the LM loss
  (the gradients of every adapter in the batch, no optimizer). Ours (torch; the reference only when named in
  ``--backends``: it runs each adapter's branch on the whole batch) against PEFT's LoRA r=16; PEFT's VeRA is n/a (it
  ignores adapter_names). Goal: 64 adapters / 1 adapter <= 1.15x, both timings, torch backend.

Implementations: "base" (the frozen model: the floor), "peft" (PEFT's VeRA), "peft-lora" (PEFT's LoRA r=16, model
case only), and our backends "reference", "torch", "triton" (triton only on CUDA unless named in ``--backends``).
One that cannot run is reported as "n/a (reason)".

Measurement: warm-up, then timed rounds in which implementations alternate (A B C, B C A, ...) and inputs rotate
among 3 tensors; medians with quartiles. CPU: ``time.perf_counter`` (``--threads``, default 1: stable ratios on a shared machine). GPU: CUDA events,
with a 256 MiB L2 flush before each iteration. Saved bytes: a ``saved_tensors_hooks`` pack hook counts each saved
storage once (by data_ptr), excluding parameters, buffers and inputs. Peak: on GPU ``max_memory_allocated`` growth
over one step; on CPU peak RSS growth over one step (heap trimmed, then /proc/self/clear_refs resets VmHWM).

Python entry points::

    from vera_kernels.bench import run, format_table, validate_results
    results = run(["--device", "cuda", "--model", "llama-1b", "--quick"])   # prints the table, returns the dict
    print(format_table(results))

Results object (also what ``--json PATH`` writes; schema "vera_kernels.bench/4": /3 lacked the mixed rows, "adapters",
"fwd_nograd_ms", "ratio_vs_one_adapter" and config "mixed"; /2 had dequant "speedup_vs_bnb" (bnb's time / ours) where
/3 has "ratio_vs_bnb" (ours / bnb's), checks named by "issue" instead of "goal"/"where" and stated as speedups; /1
lacked gpu_fwdbwd_ms/gpu_note)::

    {
      "schema": "vera_kernels.bench/4",
      "machine": {"device": "cpu"|"cuda", "cpu": str, "cpu_flags": [str], "cpu_count": int, "threads": int,
                  "gpu": str|null, "gpu_memory_bytes": int|null, "cuda": str|null, "python": str, "platform": str,
                  "timing": str, "loadavg": {"start": [float]|null, "end": [float]|null},
                  "cpu_bf16_branch": "bfloat16"|"float32" (the torch backend's bf16 branch dtype on this CPU),
                  "versions": {"torch", "triton", "transformers", "peft", "vera_kernels": str|null}},
      "config": {"argv": [str], "device": str, "dtypes": [str], "model_dtype": str, "r": [int], "tokens": [int],
                 "shapes": ["INxOUT"], "model": str, "model_description": str, "backends": [str], "cases": [str],
                 "quick": bool, "seed": int, "threads": int, "threads_from": "default"|"--threads"|"torch",
                 "repeats": {"layer": int, "model": int, "mixed": int},
                 "warmup": {"layer": int, "model": int, "mixed": int}, "time_cap_s": float, "train_steps": int,
                 "unavailable": {impl: reason},
                 "mixed": null | {"model", "rows", "seq", "tokens", "adapters": [int], "adapters_loaded", "vera_r",
                                  "lora_r", "targets", "assignment", "rows_per_adapter": {count: [int]}, "mode",
                                  "call", "fwd_nograd", "fwdbwd"}},
      "results": [{
          "case": "layer 2048x5632" | "model tiny" | "train train-tiny" | "mixed 64 adapters",
          "kind": "layer"|"model"|"train"|"mixed",
          "impl": "base"|"peft"|"peft-lora"|"reference"|"torch"|"triton", "dtype": "fp32"|"bf16"|"fp16",
          "tokens": int (per call / step), "r": int|null (the case's VeRA rank), "shape": str,
          "adapter": {"type": "vera"|"lora"|null, "r": int|null},
          "available": bool, "reason": str|null (why n/a),
          "fwd_ms", "bwd_ms", "fwdbwd_ms", "step_ms": float|null (medians; train rows: step_ms only),
          "tokens_per_s": float|null (= tokens / step_ms),
          "saved_bytes": int|null, "peak_bytes": int|null, "peak_kind": "rss_delta"|"cuda_alloc_delta",
          "gpu_fwdbwd_ms": float|null (CUDA: one fwd+bwd replayed from a CUDA graph, GPU time only, no host
                           overhead), "gpu_note": str|null (why gpu_fwdbwd_ms is null),
          "timing": str, "repeats": int (timed rounds),
          "spread": {metric: {"q1", "q3", "min", "max"}},
          "ratio_vs_peft": {metric: float}, "ratio_vs_base": {metric: float},
          "ratio_vs_peft_lora": {metric: float}  (model and mixed rows only),
          "adapters": int|null (mixed rows: distinct adapters over the batch's rows),
          "fwd_nograd_ms": float|null (mixed rows: the forward under torch.no_grad; their fwd/bwd/fwdbwd_ms are the
                           forward + backward of the loss, step_ms and tokens_per_s null: no optimizer),
          "ratio_vs_one_adapter": {metric: float}  (mixed rows only: / the same impl's row with 1 adapter)
        }, ...],
      "training": null | {"model", "dtype", "steps", "lr", "optimizer", "tokens_per_step", "seed", "r",
                          "n_batches", "data", "timed_from_step", "impls": [str], "loss": {impl: [float]},
                          "abs_diff_vs_peft": {impl: [float]}, "max_abs_diff_vs_peft": {impl: float},
                          "max_rel_diff_vs_peft": {impl: float}, "step_ms": {impl: float}},
      "training_skipped": str|null,
      "dequant": null | [{"device", "format": "nf4"|"nf4-nested"|"fp4"|"int8", "shape": [rows, cols],
                          "out_dtype", "impl": "vera-native"|"bitsandbytes", "median_ms", "gbps" (output bytes / s),
                          "ratio_vs_bnb" (this median / bitsandbytes' median), "bitexact_vs_bnb": bool,
                          "repeats"}],
      "dequant_skipped": str|null,
      "checks": [{"goal": str (the goal in words, e.g. "layer fwd+bwd / frozen base <= 1.20x"), "where": str (the
                  case it is stated at), "case": str|null (the row checked; null: this run did not measure the
                  goal's case, "reason" says why), "kind", "impl", "dtype", "tokens", "r", "metric" (e.g.
                  "ratio_vs_base.fwdbwd_ms"), "value": float|null, "op": "<="|null, "threshold": float|null (null:
                  reported only), "ok": bool|null, "reason": str|null, "spread": float|null (the larger relative
                  half-IQR of the timings a time ratio divides), "noisy": bool (spread > 10%), "note"}],
      "wall_s": float
    }

Every ratio is ``this row's metric / that implementation's metric`` in the same case (same kind, case, dtype,
tokens, r), both measured in this run: below 1 means less time / fewer bytes (for tokens_per_s, above 1 = faster).
The table, the goals and the plot show time and byte ratios only, all ours / theirs.
A ratio is absent when either number is missing or the denominator is 0 (a frozen layer saves nothing).
"""

from .cli import BenchUsageError, build_parser, main, run
from .report import format_table
from .schema import validate_results

__all__ = ["run", "main", "format_table", "validate_results", "build_parser", "BenchUsageError"]
