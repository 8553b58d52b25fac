"""Options -> plan -> measurements -> results object, table, JSON/CSV/PNG. See the package docstring for the schema."""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import sys
import time
import warnings
from typing import Optional, Sequence

import torch

from . import presets as P
from .cases import (MIXED_IMPLS, MIXED_MODE, REFERENCE_MIXED_OPT_IN, RunCtx, layer_cases, mixed_assignment,
                    mixed_case, model_case)
from .impls import IMPLS, LAYER_IMPLS, OURS, unavailable_reason
from .machine import loadavg, machine_info
from .measure import CpuPeak, CpuTimer, CudaPeak, CudaTimer, default_threads, free_memory
from .progress import make_progress
from .report import add_ratios, format_table, goal_checks, threads_text, write_csv, write_plot
from .training import training_run

SCHEMA = "vera_kernels.bench/4"
CASES = ("layer", "model", "train", "dequant", "mixed")
# what runs without --cases: mixed-adapter batches are asked for by name (--cases mixed, or all), so the default run
# stays what it was (its time on a 2-core CPU: ~35 s more)
DEFAULT_CASES = ("layer", "model", "train", "dequant")


class BenchUsageError(ValueError):
    """A bad option value; main() prints it and exits with status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # raise instead of sys.exit, so run() can be called from Python
        raise BenchUsageError(message)


# ---------------------------------------------------------------------------------------------- option types
def _int_list(what: str, lo: int = 1):
    def parse(text: str) -> list[int]:
        items = [t.strip() for t in str(text).split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{what}: expected a comma-separated list of integers, got {text!r}")
        out = []
        for t in items:
            try:
                v = int(t)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{what}: {t!r} is not an integer") from None
            if v < lo:
                raise argparse.ArgumentTypeError(f"{what}: {v} is out of range (must be >= {lo})")
            out.append(v)
        if len(set(out)) != len(out):
            raise argparse.ArgumentTypeError(f"{what}: duplicate values in {text!r}")
        return out

    return parse


def _pos_int(what: str, lo: int = 1):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}: {text!r} is not an integer") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{what}: {v} is out of range (must be >= {lo})")
        return v

    return parse


def _pos_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"{v} must be a positive number")
    return v


def _choice_list(what: str, choices: Sequence[str], aliases: Optional[dict] = None):
    def parse(text: str) -> list[str]:
        items = [t.strip().lower() for t in str(text).split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{what}: empty list")
        out = []
        for t in items:
            t = aliases.get(t, t) if aliases else t
            if t == "all":
                out.extend(c for c in choices if c not in out)
                continue
            if t not in choices:
                raise argparse.ArgumentTypeError(f"{what}: unknown value {t!r}; choose from {', '.join(choices)}")
            if t not in out:
                out.append(t)
        return out

    return parse


def _shape_list(text: str) -> list[tuple[int, int]]:
    out = []
    for t in [t.strip() for t in str(text).split(",") if t.strip()]:
        parts = t.lower().split("x")
        try:
            a, b = (int(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--shapes: {t!r} is not IN x OUT (e.g. 2048x5632)") from None
        if a < 1 or b < 1:
            raise argparse.ArgumentTypeError(f"--shapes: {t!r} has a non-positive dimension")
        out.append((a, b))
    if not out:
        raise argparse.ArgumentTypeError("--shapes: empty list")
    return out


def _device(text: str) -> str:
    t = text.strip().lower()
    if t in ("auto", "cpu", "cuda") or (t.startswith("cuda:") and t[5:].isdigit()):
        return t
    raise argparse.ArgumentTypeError(f"unknown device {text!r}; use auto, cpu, cuda or cuda:N")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m vera_kernels.bench",
        description="Throughput and memory of vera_kernels' VeRA against PEFT's VeRA, the reference path and the "
                    "frozen base model: layer-level cases, a Llama-shaped model's training step, and a short "
                    "training run whose loss curve must match PEFT's.",
    )
    p.add_argument("--device", type=_device, default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", type=_choice_list("--dtype", ("fp32", "bf16", "fp16"), P.DTYPE_ALIASES),
                   help="comma list (fp32,bf16,fp16) for the layer cases; the model case uses the first. "
                        "Default: fp32,bf16 layers + fp32 model on CPU; bf16 on GPU")
    p.add_argument("--r", type=_int_list("--r"), help="VeRA rank(s), comma list; the first is primary, the others "
                   "are swept at the primary token count. Default 256 (64 with --quick on CPU); GPU: 256,64,1024")
    p.add_argument("--tokens", type=_int_list("--tokens"), help="tokens per layer call, comma list; the first is "
                   "primary. Default 1024 on CPU, 8192,512 on GPU")
    p.add_argument("--shapes", type=_shape_list, help="layer shapes IN x OUT, comma list (default: 2048x2048,"
                   "2048x5632 on CPU, 4096x4096,4096x11008 on GPU); all live in one module (shared A/B)")
    p.add_argument("--model", choices=sorted(P.MODEL_PRESETS), help="model preset: tiny (CPU default), llama-1b "
                   "(GPU default), llama-7b-layers")
    p.add_argument("--backends", type=_choice_list("--backends", IMPLS),
                   help=f"implementations to run, comma list of {', '.join(IMPLS)} or all (default: every one "
                        "that can run here; triton is never timed on the CPU unless named)")
    p.add_argument("--cases", type=_choice_list("--cases", CASES), default=list(DEFAULT_CASES),
                   help="which parts to run: layer, model, train, dequant, mixed, or all (default: layer, model, "
                        "train, dequant; mixed = one batch whose rows run 1, 8 or 64 distinct adapters, ours "
                        "against PEFT LoRA's adapter_names)")
    p.add_argument("--repeats", type=_pos_int("--repeats"), help="timed rounds per case (overrides the presets)")
    p.add_argument("--warmup", type=_pos_int("--warmup"), help="warm-up rounds per case (>= 1)")
    p.add_argument("--train-steps", type=_pos_int("--train-steps", 3), help="optimizer steps of the training run")
    p.add_argument("--threads", type=_pos_int("--threads"),
                   help="torch CPU threads (default on CPU: 1, which keeps ratios stable when other processes share "
                        "the cores; on CUDA: torch's default)")
    p.add_argument("--time-cap", type=_pos_float, help="seconds per case after which timed rounds stop early "
                   f"(at least {P.MIN_ROUNDS} rounds); default {P.CASE_TIME_CAP_S['cpu']:.0f} on CPU, "
                   f"{P.CASE_TIME_CAP_S['cuda']:.0f} on GPU")
    p.add_argument("--seed", type=_pos_int("--seed", 0), default=0)
    p.add_argument("--json", metavar="PATH", help="write the results object as JSON")
    p.add_argument("--csv", metavar="PATH", help="write one CSV line per result row and per "
                   "dequantization row")
    p.add_argument("--plot", metavar="PATH", help="write a PNG: bars of ours / PEFT's (time, saved activations, "
                   "peak memory) for every layer case and the model case measured")
    p.add_argument("--quick", action="store_true", help="a fast smoke run: smaller cases, fewer rounds "
                   "(under a minute on a 2-core CPU; on the CPU, not the goals' cases)")
    p.add_argument("--no-progress", action="store_true", help="no progress display on stderr")
    p.add_argument("--no-graph", action="store_true",
                   help="CUDA: skip timing each fwd+bwd as a CUDA-graph replay (the GPU-only column)")
    return p


def _check_out_path(opt: str, path: Optional[str]) -> None:
    if path is None:
        return
    if not path or os.path.isdir(path):
        raise BenchUsageError(f"{opt}: {path!r} is a directory or empty; give a file path")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise BenchUsageError(f"{opt}: directory {parent!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise BenchUsageError(f"{opt}: directory {parent!r} is not writable")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BenchUsageError(f"--device {args.device}: CUDA is not available here (torch {torch.__version__}"
                                  f"{', built without CUDA' if torch.version.cuda is None else ', no GPU found'})")
        idx = int(args.device.split(":")[1]) if ":" in args.device else 0
        if idx >= torch.cuda.device_count():
            raise BenchUsageError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s)")
    for opt in ("json", "csv", "plot"):
        _check_out_path("--" + opt, getattr(args, opt))
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise BenchUsageError("--plot needs matplotlib (pip install matplotlib)")
    return args


# ---------------------------------------------------------------------------------------------- the plan
def make_plan(args) -> dict:
    dev = torch.device(args.device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    dt = dev.type
    suite = P.layer_suite(dt, args.quick)
    shapes = [tuple(s) for s in (args.shapes or suite.shapes)]
    tokens = args.tokens or list(suite.tokens)
    rs = args.r or list(suite.r)
    layer_dtypes = args.dtype or list(suite.dtypes)
    model_dtype = args.dtype[0] if args.dtype else ("bf16" if dt == "cuda" else "fp32")
    model_name = args.model or ("llama-1b" if dt == "cuda" else "tiny")
    preset = P.model_preset(model_name, args.quick)
    train = P.TRAIN_QUICK if args.quick else P.TRAIN
    mixed = P.mixed_preset(dt, args.quick)
    if args.train_steps:
        train = P.TrainPreset(train.model, args.train_steps, train.lr, train.n_batches)
    points = [(tokens[0], rs[0])] + [(tokens[0], r) for r in rs[1:]] + [(t, rs[0]) for t in tokens[1:]]
    explicit = set(args.backends or [])
    impls = list(args.backends or IMPLS)
    reasons = {i: unavailable_reason(i, dev, i in explicit) for i in impls}
    # the mixed case times the reference only when it is named: it runs every stacked adapter's branch on the whole
    # batch (K times one adapter's work), minutes at 64 adapters on a CPU
    mixed_reasons = dict(reasons)
    if "reference" in impls and "reference" not in explicit and not reasons.get("reference"):
        mixed_reasons["reference"] = REFERENCE_MIXED_OPT_IN
    if args.threads:
        threads, threads_from = args.threads, "--threads"
    elif dt == "cpu":
        threads, threads_from = default_threads(), "default"
    else:
        threads, threads_from = None, "torch"  # the GPU does the work; the host's threads are left as torch set them
    return {
        "threads": threads, "threads_from": threads_from,
        "device": dev, "shapes": shapes, "tokens": tokens, "r": rs, "layer_dtypes": layer_dtypes,
        "model_dtype": model_dtype, "model": preset, "train": train, "points": points, "impls": impls,
        "mixed": mixed, "mixed_adapters": list(P.MIXED_ADAPTERS), "mixed_reasons": mixed_reasons,
        "mixed_repeats": args.repeats or mixed.repeats, "mixed_warmup": args.warmup or mixed.warmup,
        "reasons": reasons,
        "layer_repeats": args.repeats or suite.repeats, "layer_warmup": args.warmup or suite.warmup,
        "model_repeats": args.repeats or preset.repeats, "model_warmup": args.warmup or preset.warmup,
        "time_cap": args.time_cap or P.CASE_TIME_CAP_S["cuda" if dt == "cuda" else "cpu"],
    }


def _estimate(plan: dict, cases: list[str]) -> int:
    run_n = lambda names: sum(1 for i in names if plan["reasons"].get(i) is None)  # noqa: E731
    total = 0
    if "layer" in cases:
        n = run_n([i for i in plan["impls"] if i in LAYER_IMPLS])
        total += (len(plan["layer_dtypes"]) * len(plan["points"]) * len(plan["shapes"]) * n
                  * (plan["layer_warmup"] + 1 + plan["layer_repeats"]))
    if "model" in cases:
        total += run_n(plan["impls"]) * (plan["model_warmup"] + 1 + plan["model_repeats"])
    if "train" in cases:
        total += plan["train"].steps * (1 + run_n([i for i in plan["impls"] if i in OURS]))
    if "mixed" in cases:
        n = sum(1 for i in plan["impls"] if i in MIXED_IMPLS and i != "peft" and not plan["mixed_reasons"].get(i))
        total += 2 * n * len(plan["mixed_adapters"]) * (plan["mixed_warmup"] + 1 + plan["mixed_repeats"])
    return max(total, 1)


def _train_row(s: dict, case: str, r: int, tokens: int, ctx: RunCtx) -> dict:
    return {
        "case": case, "kind": "train", "impl": s["impl"], "dtype": "fp32", "tokens": tokens, "r": r,
        "shape": "", "available": True, "reason": None, "fwd_ms": None, "bwd_ms": None, "fwdbwd_ms": None,
        "step_ms": s["step_ms"], "tokens_per_s": s["tokens_per_s"], "saved_bytes": None, "peak_bytes": None,
        "gpu_fwdbwd_ms": None, "gpu_note": "not measured for training runs",
        "peak_kind": ctx.peak_kind, "timing": "time.perf_counter around each synchronized step",
        "adapter": {"type": "vera", "r": r}, "repeats": s["repeats"], "spread": s["spread"],
        "ratio_vs_peft": {}, "ratio_vs_base": {}, "adapters": None, "fwd_nograd_ms": None,
    }


# ---------------------------------------------------------------------------------------------- run
def run(argv: Optional[Sequence[str]] = None, *, print_table: bool = True) -> dict:
    """Run the benchmark with command-line style options; print the table (stdout) and return the results object.

        from vera_kernels.bench import run
        results = run(["--device", "cuda", "--model", "llama-1b", "--quick"])

    Raises BenchUsageError on a bad option.
    """
    t_start = time.perf_counter()
    args = parse_args(argv)
    plan = make_plan(args)
    dev = plan["device"]
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    old_threads = torch.get_num_threads()
    threads = plan["threads"]
    if threads:
        torch.set_num_threads(threads)
    timing = (CudaTimer.method if dev.type == "cuda" else CpuTimer.method)
    peak_kind = CudaPeak.kind if dev.type == "cuda" else CpuPeak.kind
    machine = machine_info(dev, timing)
    print(f"vera_kernels.bench on {machine['gpu'] or machine['cpu']} ({threads_text(machine['threads'])}"
          f"{', the CPU default: --threads N to change' if plan['threads_from'] == 'default' else ''}); "
          f"torch {torch.__version__}", file=sys.stderr, flush=True)
    cases = list(args.cases)
    progress = make_progress(_estimate(plan, cases), enabled=not args.no_progress)
    ctx = RunCtx(dev, args.seed, plan["time_cap"], P.MIN_ROUNDS, progress.advance, peak_kind, timing,
                 graph=not args.no_graph)
    rows: list[dict] = []
    training, training_skipped = None, None
    dequant, dequant_skipped = None, None
    # Everything alive now (modules of torch, transformers, peft ...) moves to gc's permanent generation, so the
    # collections between cases scan only what the benchmark creates (a full collection costs ~0.3 s otherwise).
    from .impls import import_peft

    import_peft()
    gc.collect()
    gc.freeze()
    rng_devices = [dev.index] if dev.type == "cuda" else []
    try:
        # the caller's RNG state, warning filters and thread count are left as they were
        with warnings.catch_warnings(), torch.random.fork_rng(devices=rng_devices):
            warnings.simplefilter("ignore")
            torch.manual_seed(args.seed)
            if "layer" in cases:
                impls = [i for i in plan["impls"] if i in LAYER_IMPLS]
                for dtype in plan["layer_dtypes"]:
                    for tokens, r in plan["points"]:
                        progress.describe(f"layers {dtype} {tokens} tokens r={r}")
                        rows += layer_cases(plan["shapes"], tokens, r, dtype, impls, plan["reasons"],
                                            plan["layer_warmup"], plan["layer_repeats"], ctx)
            if "model" in cases:
                pr = plan["model"]
                progress.describe(f"model {pr.name} {plan['model_dtype']}")
                rows += model_case(pr, plan["model_dtype"], plan["r"][0], plan["impls"], plan["reasons"],
                                   plan["model_warmup"], plan["model_repeats"], ctx)
            if "train" in cases:
                ours = [i for i in plan["impls"] if i in OURS and plan["reasons"].get(i) is None]
                if "peft" not in plan["impls"]:
                    training_skipped = "peft not among --backends"
                elif plan["reasons"].get("peft"):
                    training_skipped = plan["reasons"]["peft"]
                elif not ours:
                    training_skipped = "none of our backends can run here"
                else:
                    progress.describe(f"training run ({plan['train'].steps} steps)")
                    tr = plan["train"]
                    summaries, training, errors = training_run(tr, dev, ["peft"] + ours, plan["r"][0], args.seed,
                                                               progress.advance)
                    case = f"train {tr.model.name}"
                    rows += [_train_row(s, case, plan["r"][0], tr.model.tokens, ctx) for s in summaries]
                    for impl, err in errors.items():
                        row = _train_row({"impl": impl, "step_ms": None, "tokens_per_s": None, "repeats": 0,
                                          "spread": {}}, case, plan["r"][0], tr.model.tokens, ctx)
                        row.update(available=False, reason=err)
                        rows.append(row)
                    if training is None and not training_skipped:
                        training_skipped = errors.get("peft", "PEFT's run failed")
            if "mixed" in cases:
                mp = plan["mixed"]
                progress.describe(f"mixed-adapter batches {mp.name} {plan['model_dtype']}")
                rows += mixed_case(mp, plan["mixed_adapters"], plan["model_dtype"], plan["r"][0], plan["impls"],
                                   plan["mixed_reasons"], plan["mixed_warmup"], plan["mixed_repeats"], ctx)
            if "dequant" in cases:
                progress.describe("dequantization vs bitsandbytes")
                dequant, dequant_skipped = _dequant_case(dev, args.quick)
    finally:
        progress.close()
        free_memory(dev)
        gc.unfreeze()
        if threads:
            torch.set_num_threads(old_threads)
    machine["loadavg"]["end"] = loadavg()
    add_ratios(rows)
    results = {
        "schema": SCHEMA,
        "machine": machine,
        "config": {
            "argv": list(argv) if argv is not None else sys.argv[1:],
            "device": str(dev), "dtypes": plan["layer_dtypes"], "model_dtype": plan["model_dtype"],
            "r": plan["r"], "tokens": plan["tokens"], "shapes": [f"{a}x{b}" for a, b in plan["shapes"]],
            "model": plan["model"].name, "model_description": plan["model"].describe(),
            "backends": plan["impls"], "cases": cases, "quick": bool(args.quick), "seed": args.seed,
            "threads": machine["threads"], "threads_from": plan["threads_from"],
            "repeats": {"layer": plan["layer_repeats"], "model": plan["model_repeats"],
                        "mixed": plan["mixed_repeats"]},
            "warmup": {"layer": plan["layer_warmup"], "model": plan["model_warmup"], "mixed": plan["mixed_warmup"]},
            "time_cap_s": plan["time_cap"], "train_steps": plan["train"].steps,
            "unavailable": {k: v for k, v in plan["reasons"].items() if v},
            "mixed": _mixed_config(plan, args.seed) if "mixed" in cases else None,
        },
        "results": rows,
        "training": training,
        "training_skipped": training_skipped if "train" in cases else "not requested",
        "dequant": dequant,
        "dequant_skipped": dequant_skipped if "dequant" in cases else "not requested",
        "checks": None,
        "wall_s": None,
    }
    results["checks"] = goal_checks(rows, dev.type, results["config"])
    results["wall_s"] = time.perf_counter() - t_start
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1, allow_nan=False)
    if args.csv:
        write_csv(results, args.csv)
    if args.plot:
        write_plot(results, args.plot)
    if print_table:
        print(format_table(results), flush=True)
    return results


def _mixed_config(plan: dict, seed: int) -> dict:
    mp = plan["mixed"]
    counts = plan["mixed_adapters"]
    return {
        "model": mp.describe(), "rows": mp.batch, "seq": mp.seq, "tokens": mp.tokens, "adapters": counts,
        "adapters_loaded": max(counts), "vera_r": plan["r"][0], "lora_r": mp.lora_r,
        "targets": "every linear layer (q, k, v, o, gate, up, down)",
        "assignment": f"adapter i % n for row i, rows shuffled (torch.randperm, seed {seed + 7})",
        "rows_per_adapter": {str(k): sorted(set(mixed_assignment(k, mp.batch, seed).count(f"a{i}")
                                                for i in range(k))) for k in counts},
        "mode": MIXED_MODE,
        "call": "model(input_ids, adapter_names=names) for every implementation (ours: the same as "
                "vk.adapter_batch; one distinct name takes the plain single-adapter path)",
        "fwd_nograd": "forward under torch.no_grad, logits", "fwdbwd": "forward + backward of the LM loss "
                      "(gradients of every adapter in the batch), no optimizer",
    }


def _dequant_case(dev, quick: bool):
    """(rows, None) or (None, reason): our bitsandbytes dequantization (native extension) against bitsandbytes'."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:
        return None, f"bitsandbytes is not importable ({type(exc).__name__})"
    from .dequant import run as run_dequant

    if quick:
        sizes, repeats = ((1024, 1024),), 3
    elif dev.type == "cuda":
        sizes, repeats = ((4096, 4096), (11008, 4096)), 10
    else:
        sizes, repeats = ((4096, 4096),), 5
    try:
        return run_dequant(dev, sizes, repeats), None
    except Exception as exc:  # a broken native build must not hide the rest of the benchmark
        return None, f"{type(exc).__name__}: {exc}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        run(argv)
    except BenchUsageError as exc:
        print(f"python -m vera_kernels.bench: error: {exc}\n(see --help)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
