"""Derived numbers (ratios, goal checks) and the outputs: the text table, CSV and the PNG plot."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

from .presets import MIXED_PRESETS

RATIO_KEYS = ("fwd_ms", "bwd_ms", "fwdbwd_ms", "step_ms", "tokens_per_s", "saved_bytes", "peak_bytes",
              "gpu_fwdbwd_ms", "fwd_nograd_ms")
# denominators: ratio_vs_<name> = this row's metric / that implementation's metric, same case
YARDSTICKS = {"peft": "ratio_vs_peft", "base": "ratio_vs_base", "peft-lora": "ratio_vs_peft_lora"}
LORA_KINDS = ("model", "mixed")  # the kinds whose rows carry ratio_vs_peft_lora
# mixed-adapter rows also carry ratio_vs_one_adapter: this row / the same implementation's row with one adapter on
# every row (same dtype, tokens, r, shape): what mixing adapters costs
ONE_ADAPTER = "ratio_vs_one_adapter"


def group_key(row: dict) -> tuple:
    return (row["kind"], row["case"], row["dtype"], row["tokens"], row["r"])


def ratio(a, b) -> Optional[float]:
    if a is None or b is None:
        return None
    a, b = float(a), float(b)
    if b == 0 or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def _ratios(row: dict, den: Optional[dict]) -> dict:
    out = {}
    if row.get("available") and den is not None and den.get("available"):
        for k in RATIO_KEYS:
            v = ratio(row.get(k), den.get(k))
            if v is not None:
                out[k] = v
    return out


def one_adapter_key(row: dict) -> tuple:
    """The key of the row a mixed-adapter row's ratio_vs_one_adapter divides by (its adapters count set to 1)."""
    return (row["kind"], row["impl"], row["dtype"], row["tokens"], row["r"], row["shape"])


def one_adapter_rows(rows: list[dict]) -> dict:
    return {one_adapter_key(x): x for x in rows if x["kind"] == "mixed" and x.get("adapters") == 1}


def add_ratios(rows: list[dict]) -> None:
    """Fill ratio_vs_peft / ratio_vs_base (and ratio_vs_peft_lora on model and mixed rows, ratio_vs_one_adapter on
    mixed rows) from numbers of the same case."""
    groups: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        groups.setdefault(group_key(row), {})[row["impl"]] = row
    ones = one_adapter_rows(rows)
    for row in rows:
        members = groups[group_key(row)]
        for impl, field in YARDSTICKS.items():
            if impl == "peft-lora" and row["kind"] not in LORA_KINDS:
                continue
            row[field] = _ratios(row, members.get(impl))
        if row["kind"] == "mixed":
            row[ONE_ADAPTER] = _ratios(row, ones.get(one_adapter_key(row)))


# ---------------------------------------------------------------------------------------------- goal checks
NOISY = 0.10  # a time whose half interquartile range exceeds this fraction of its median is flagged as noisy


def rel_spread(row: Optional[dict], key: str) -> Optional[float]:
    """Half the interquartile range of a timing, relative to its median."""
    if not row or not row.get(key):
        return None
    s = row.get("spread", {}).get(key)
    if not s or s.get("q1") is None:
        return None
    return (s["q3"] - s["q1"]) / 2 / row[key]


@dataclass(frozen=True)
class Goal:
    """A target this project set itself, checked on every row of the case it is stated at. Every ratio is ours /
    theirs (time or bytes: below 1 = faster or less), like the tables'. ``limit`` None: reported, not checked."""

    goal: str  # the goal in words: what the report prints
    device: str  # the device type it is stated for
    kind: str
    impl: str
    dtypes: tuple
    shapes: Optional[tuple]  # layer shapes "INxOUT" (None: any)
    tokens: Optional[int]  # None: any
    r: Optional[int]  # None: any
    metric: str  # "ratio_vs_peft.fwdbwd_ms" (a ratio field and key) or a row key
    limit: Union[float, Callable[[dict], float], None]
    noise: tuple = ()  # (timing key, yardstick impl or ONE_ADAPTER): the spreads behind a time ratio
    adapters: Optional[int] = None  # mixed-adapter rows: the number of distinct adapters in the batch

    def where(self) -> str:
        """The stated case in words."""
        parts = [self.impl, f"{self.kind} " + (" and ".join(self.shapes) if self.shapes else "(any)"),
                 "/".join(self.dtypes)]
        if self.tokens:
            parts.append(f"{self.tokens} tokens")
        if self.r:
            parts.append(f"r={self.r}")
        if self.adapters:
            parts.append(f"{self.adapters} adapters over the batch's rows, / the same with 1")
        return ", ".join(parts)

    def matches(self, row: dict) -> bool:
        return (row["kind"] == self.kind and row["impl"] == self.impl and row["dtype"] in self.dtypes
                and (self.shapes is None or row["shape"] in self.shapes)
                and (self.tokens is None or row["tokens"] == self.tokens) and (self.r is None or row["r"] == self.r)
                and (self.adapters is None or row.get("adapters") == self.adapters))

    def value(self, row: dict) -> Optional[float]:
        field, _, key = self.metric.rpartition(".")
        return (row.get(field) or {}).get(key) if field else row.get(key)


_CPU_LAYERS = ("2048x2048", "2048x5632")
_GPU_LAYERS = ("4096x4096", "4096x11008")
GOALS = (
    # CPU, the memory-lean torch backend against PEFT's VeRA at 1024 tokens, r=256
    Goal("layer fwd+bwd / PEFT <= 0.95x", "cpu", "layer", "torch", ("fp32",), _CPU_LAYERS, 1024, 256,
         "ratio_vs_peft.fwdbwd_ms", 0.95, ("fwdbwd_ms", "peft")),
    Goal("layer fwd+bwd / PEFT <= 0.75x", "cpu", "layer", "torch", ("bf16",), _CPU_LAYERS, 1024, 256,
         "ratio_vs_peft.fwdbwd_ms", 0.75, ("fwdbwd_ms", "peft")),
    Goal("layer saved activations / PEFT <= 0.25x", "cpu", "layer", "torch", ("fp32", "bf16"), _CPU_LAYERS, 1024,
         256, "ratio_vs_peft.saved_bytes", 0.25),
    # GPU, the triton backend in bf16 (every token count and r of the run)
    Goal("layer fwd+bwd / frozen base <= 1.20x", "cuda", "layer", "triton", ("bf16",), _GPU_LAYERS, None, None,
         "ratio_vs_base.fwdbwd_ms", 1.20, ("fwdbwd_ms", "base")),
    Goal("layer fwd+bwd / PEFT <= 0.33x (3x faster)", "cuda", "layer", "triton", ("bf16",), _GPU_LAYERS, None, None,
         "ratio_vs_peft.fwdbwd_ms", 1 / 3, ("fwdbwd_ms", "peft")),
    Goal("layer saved activations <= tokens x r x 2 bytes", "cuda", "layer", "triton", ("bf16",), _GPU_LAYERS, None,
         None, "saved_bytes", lambda row: row["tokens"] * row["r"] * 2),
    # GPU, a training step of the whole model (tokens per step equal, so a step-time ratio is 1 / the tokens/s one)
    Goal("model step / PEFT VeRA <= 0.67x (1.5x its tokens/s)", "cuda", "model", "triton", ("bf16", "fp16", "fp32"),
         None, None, None, "ratio_vs_peft.step_ms", 1 / 1.5, ("step_ms", "peft")),
    Goal("model step / PEFT LoRA r=16 <= 1.00x", "cuda", "model", "triton", ("bf16", "fp16", "fp32"), None, None,
         None, "ratio_vs_peft_lora.step_ms", 1.0, ("step_ms", "peft-lora")),
    Goal("model peak memory / PEFT VeRA (reported)", "cuda", "model", "triton", ("bf16", "fp16", "fp32"), None, None,
         None, "ratio_vs_peft.peak_bytes", None),
    # the host-free view: the same fwd+bwd as GPU time (CUDA-graph replay), for telling a host-bound step (Python and
    # launch overhead) from a GPU-bound one; informational, the goal is on the eager step
    Goal("model GPU-only fwd+bwd / PEFT VeRA (CUDA graph, reported)", "cuda", "model", "triton",
         ("bf16", "fp16", "fp32"), None, None, None, "ratio_vs_peft.gpu_fwdbwd_ms", None),
) + tuple(
    # mixed-adapter batches (issue 13): 64 distinct adapters over the batch's rows cost what one adapter on every row
    # costs, within 15%: forward alone (no grad) and forward + backward, at the mixed case's default model and batch
    # (--quick's is too small: per-call overhead). The torch backend on either device (it has the per-row lambda
    # gathers; triton runs one adapter per call)
    Goal(f"mixed 64/1 adapters <= 1.15x ({what})", dev, "mixed", "torch", (dtype,), (MIXED_PRESETS[dev].shape(),),
         None, None, f"{ONE_ADAPTER}.{key}", 1.15, (key, ONE_ADAPTER), adapters=64)
    for dev, dtype in (("cpu", "fp32"), ("cuda", "bf16"))
    for what, key in (("fwd, no grad", "fwd_nograd_ms"), ("fwd+bwd", "fwdbwd_ms"))
)


def _not_measured_reason(goal: Goal, config: dict) -> str:
    """Why this run has no row for ``goal``'s case, as the option that would measure it."""
    if goal.kind not in config.get("cases", [goal.kind]):
        return f"no {goal.kind} case in this run (--cases)"
    if goal.impl not in config.get("backends", [goal.impl]):
        return f"{goal.impl} is not among --backends"
    if config.get("quick"):
        return "--quick measures smaller cases; run without --quick to check it"
    return "this run's --shapes/--tokens/--r/--dtype do not include that case"


def goal_checks(rows: list[dict], device_type: str, config: Optional[dict] = None) -> list[dict]:
    """One check per goal of ``device_type`` and row of its stated case; a goal whose case this run did not measure
    gets one check with value None, ok None and the reason. Time-ratio checks carry the larger relative spread of
    the two timings they divide ("noisy" above 10%)."""
    groups: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        groups.setdefault(group_key(row), {})[row["impl"]] = row
    ones = one_adapter_rows(rows)
    out = []
    for goal in GOALS:
        if goal.device != device_type:
            continue
        base = {"goal": goal.goal, "where": goal.where(), "metric": goal.metric,
                "op": "<=" if goal.limit is not None else None}
        matched = [row for row in rows if goal.matches(row)]
        for row in matched:
            value = goal.value(row)
            limit = goal.limit(row) if callable(goal.limit) else goal.limit
            spread = None
            if goal.noise:
                key, den = goal.noise
                den_row = (ones.get(one_adapter_key(row)) if den == ONE_ADAPTER
                           else groups[group_key(row)].get(den))
                vals = [rel_spread(row, key), rel_spread(den_row, key)]
                vals = [v for v in vals if v is not None]
                spread = max(vals) if vals else None
            noisy = spread is not None and spread > NOISY
            reason = None
            if value is None and not row.get("available"):
                reason = row.get("reason")
            elif value is None and "gpu_" in goal.metric and row.get("gpu_note"):
                reason = row["gpu_note"]
            elif value is None:
                den = dict({v: k for k, v in YARDSTICKS.items()}, **{ONE_ADAPTER: "1-adapter"}).get(
                    goal.metric.rpartition(".")[0])
                reason = f"no measured {den} row to divide by in this run" if den else "not measured for this row"
            out.append(dict(base, case=row["case"], kind=row["kind"], impl=row["impl"], dtype=row["dtype"],
                            tokens=row["tokens"], r=row["r"], value=value, threshold=limit,
                            ok=None if value is None or limit is None else value <= limit, reason=reason,
                            spread=spread, noisy=noisy,
                            note=f"noisy: a timing behind this ratio varies by ±{spread * 100:.0f}%; rerun on a "
                                 "quiet machine" if noisy else ""))
        if not matched:
            out.append(dict(base, case=None, kind=goal.kind, impl=goal.impl, dtype="/".join(goal.dtypes),
                            tokens=goal.tokens, r=goal.r, value=None,
                            threshold=None if callable(goal.limit) else goal.limit, ok=None,
                            reason="not measured: " + _not_measured_reason(goal, config or {}), spread=None,
                            noisy=False, note=""))
    return out


# ---------------------------------------------------------------------------------------------- the table
def _f(x, nd=1, unit="") -> str:
    if x is None:
        return "-"
    if abs(x) >= 1e5:
        return f"{x:,.0f}{unit}"
    return f"{x:.{nd}f}{unit}"


def _mib(b) -> str:
    if b is None:
        return "-"
    v = b / 2**20
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:,.0f}"


def _x(r) -> str:
    if r is None:
        return "-"
    return f"{r:.3f}x" if r < 0.1 else f"{r:.2f}x"


def _clip(text, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _iqr_pct(row, key) -> str:
    s = row.get("spread", {}).get(key)
    med = row.get(key)
    if not s or not med or s.get("q1") is None:
        return ""
    return f"±{(s['q3'] - s['q1']) / 2 / med * 100:.1f}%"


def _render(headers: list[str], body: list[list[str]], align: str) -> list[str]:
    full = [r for r in body if len(r) == len(headers)]
    widths = [max([len(h)] + [len(r[i]) for r in full]) for i, h in enumerate(headers)]
    def line(cells):
        parts = []
        for i, c in enumerate(cells):
            parts.append(c.ljust(widths[i]) if align[i] == "l" else c.rjust(widths[i]))
        return "  ".join(parts).rstrip()
    out = [line(headers), line(["-" * w for w in widths])]
    for r in body:
        if len(r) == 2 and len(headers) > 2:  # an n/a row: impl + reason spanning the rest
            out.append(f"{r[0].ljust(widths[0])}  {r[1]}")
        else:
            out.append(line(r))
    return out


def machine_line(m: dict) -> str:
    v = m.get("versions", {})
    if m.get("device") == "cuda":
        dev = f"GPU {m.get('gpu')} (CUDA {m.get('cuda')}, {_mib(m.get('gpu_memory_bytes'))} MiB)"
    else:
        flags = ", ".join(m.get("cpu_flags", [])) or "no AVX-512/AMX"
        dev = f"CPU {m.get('cpu')} ({m.get('cpu_count')} logical cores; {flags})"
        if m.get("cpu_bf16_branch"):
            dev += f" | torch backend's bf16 branch in {m['cpu_bf16_branch']}"
    vs = " | ".join(f"{k} {v[k] if v.get(k) else 'not installed'}" for k in
                    ("torch", "triton", "transformers", "peft", "vera_kernels"))
    return f"{dev} | {threads_text(m.get('threads'))} | {vs} | python {m.get('python')}"


def threads_text(n) -> str:
    return f"{n} torch thread" + ("" if n == 1 else "s")


RATIO_CONVENTION = ("every ratio is ours / theirs, in the tables, the goals and the plot: time or bytes / the "
                    "yardstick's, below 1 = faster or less")


def format_table(results: dict) -> str:
    """The human-readable report of a results object (what run() prints)."""
    m, cfg, rows = results["machine"], results["config"], results["results"]
    L = ["", "vera_kernels benchmark", "  machine: " + machine_line(m)]
    L.append(f"  timing:  {m.get('timing')}; each number is the median of the timed rounds "
             f"(implementations alternated, inputs rotated); ± is half the interquartile range.")
    if any(x.get("gpu_fwdbwd_ms") for x in rows):
        L.append("           GPU fwd+bwd: the same forward+backward captured in a CUDA graph and replayed (GPU time only,"
                 " host overhead excluded: what CUDA graphs or a faster host would give).")
    peak = "CUDA max_memory_allocated growth" if m.get("device") == "cuda" else "peak RSS growth"
    L.append(f"  memory:  saved = bytes of the storages autograd keeps for backward (parameters, buffers, cached "
             f"projection casts and inputs excluded); peak = {peak} over one training step.")
    L.append(f"  config:  device {cfg['device']}, dtypes {','.join(cfg['dtypes'])}, r {cfg['r']}, tokens "
             f"{cfg['tokens']}, model {cfg['model']}, cases {','.join(cfg['cases'])}"
             f"{', quick' if cfg.get('quick') else ''}; seed {cfg['seed']}")
    L.append(f"  threads: {threads_text(cfg.get('threads'))}" + {
        "default": " (the CPU default: one thread keeps ratios stable when other processes share the cores; "
                   "--threads N to change)",
        "--threads": " (--threads)",
    }.get(cfg.get("threads_from"), " (torch's default)"))
    L.append(f"  ratios:  {RATIO_CONVENTION}.")
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["kind"] in ("layer", "model"):
            groups.setdefault(group_key(row), []).append(row)
    for key, members in groups.items():
        kind, case, dtype, tokens, r = key
        reps = max((x.get("repeats") or 0) for x in members)
        tkey = "fwdbwd_ms" if kind == "layer" else "step_ms"
        tname = "fwd+bwd" if kind == "layer" else "step"
        if kind == "layer":
            head = (f"{case} (in x out) | {dtype} | {tokens} tokens | r={r} | x requires grad, weight frozen; "
                    f"step = fwd+bwd+AdamW on the layer's trainable params | {reps} rounds")
        else:
            head = (f"{case}: {members[0]['shape']} | {dtype} | {tokens} tokens/step | VeRA r={r}, all 7 linear "
                    f"targets | step = fwd+bwd+AdamW | {reps} rounds")
        L += ["", head]
        headers = ["impl", "fwd ms", "bwd ms", "fwd+bwd ms", "step ms", "tokens/s", "saved MiB", "peak MiB",
                   f"{tname}/PEFT", f"{tname}/base", "saved/PEFT", "peak/PEFT"]
        lora = kind == "model" and any(x["impl"] == "peft-lora" and x["available"] for x in members)
        if lora:
            headers.append("step/LoRA")
        gpu = any(x.get("gpu_fwdbwd_ms") for x in members)
        if gpu:
            headers += ["GPU fwd+bwd ms", "GPU/PEFT", "GPU/base"]
        body = []
        for x in members:
            name = x["impl"] + (f" r={x['adapter']['r']}" if x["impl"] == "peft-lora" else "")
            if not x["available"]:
                body.append([name, f"n/a ({x['reason']})"])  # whole: a hint's last step is often the one that matters
                continue
            rp, rb = x["ratio_vs_peft"], x["ratio_vs_base"]
            cells = [name, _f(x["fwd_ms"], 2), _f(x["bwd_ms"], 2),
                     _f(x["fwdbwd_ms"], 2) + (" " + _iqr_pct(x, "fwdbwd_ms") if kind == "layer" else ""),
                     _f(x["step_ms"], 2) + (" " + _iqr_pct(x, "step_ms") if kind == "model" else ""),
                     _f(x["tokens_per_s"], 0), _mib(x["saved_bytes"]), _mib(x["peak_bytes"]),
                     _x(rp.get(tkey)), _x(rb.get(tkey)), _x(rp.get("saved_bytes")), _x(rp.get("peak_bytes"))]
            if lora:
                cells.append(_x(x.get("ratio_vs_peft_lora", {}).get("step_ms")))
            if gpu:
                cells += ([_f(x["gpu_fwdbwd_ms"], 3), _x(rp.get("gpu_fwdbwd_ms")), _x(rb.get("gpu_fwdbwd_ms"))]
                          if x.get("gpu_fwdbwd_ms") else [f"n/a ({_clip(x.get('gpu_note') or '', 60)})", "", ""])
            body.append(cells)
        L += ["  " + s for s in _render(headers, body, "l" + "r" * (len(headers) - 1))]
        if kind == "layer":
            L.append(f"  ratios: {tname} time / PEFT's (below 1 = faster than PEFT), / frozen base's; "
                     f"saved and peak bytes / PEFT's.")
        else:
            L.append("  ratios: step time / PEFT VeRA's and / the frozen base's (forward+backward through the "
                     "activations, no optimizer)" + ("; step/LoRA = step time / PEFT LoRA's." if lora else "."))
    L += format_mixed(results)
    tr = results.get("training")
    if tr:
        L += ["", f"training run: {tr['model']} | fp32 | {tr['steps']} AdamW steps, lr {tr['lr']} | "
                  f"{tr['tokens_per_step']} tokens/step | VeRA r={tr['r']}, same seed, weights and data, no dropout"]
        others = [n for n in tr["impls"] if n != "peft"]
        headers = ["step", "peft loss"] + [f"{n} loss" for n in others] + [f"|{n} - peft|" for n in others]
        body = []
        for s in range(len(tr["loss"]["peft"])):
            cells = [str(s + 1), f"{tr['loss']['peft'][s]:.6f}"]
            cells += [f"{tr['loss'][n][s]:.6f}" if s < len(tr["loss"][n]) else "-" for n in others]
            cells += [f"{tr['abs_diff_vs_peft'][n][s]:.1e}" if s < len(tr["abs_diff_vs_peft"][n]) else "-"
                      for n in others]
            body.append(cells)
        L += ["  " + s for s in _render(headers, body, "r" * len(headers))]
        for n in others:
            mx, rel = tr["max_abs_diff_vs_peft"][n], tr["max_rel_diff_vs_peft"][n]
            L.append(f"  {n}: max |loss - peft| over {len(tr['loss'][n])} steps = {mx:.2e} (relative {rel:.2e})")
        trows = {x["impl"]: x for x in rows if x["kind"] == "train"}
        parts = []
        for n in tr["impls"]:
            x = trows.get(n)
            if x and x.get("step_ms"):
                rp = x.get("ratio_vs_peft", {}).get("step_ms")
                parts.append(f"{n} {x['step_ms']:.2f} ms {_iqr_pct(x, 'step_ms')}"
                             + (f" ({_x(rp)} PEFT's)" if rp is not None and n != "peft" else ""))
        L.append(f"  median step time (steps {tr['timed_from_step']}..{tr['steps']}): " + "; ".join(parts))
    elif results.get("training_skipped"):
        L += ["", f"training run: n/a ({results['training_skipped']})"]
    if results.get("dequant"):
        from .dequant import format_table as dequant_table

        L += ["", "dequantization of bitsandbytes weights (GB/s of output; ms/bnb = time / bitsandbytes' time; every "
                  "case bit-exact vs bitsandbytes unless marked NO):", dequant_table(results["dequant"])]
    elif results.get("dequant_skipped") and results["dequant_skipped"] != "not requested":
        L += ["", f"dequantization: n/a ({results['dequant_skipped']})"]
    L += format_goals(results.get("checks") or [], m.get("device"))
    timed = [(x, k) for x in rows if x.get("available") for k in ("fwdbwd_ms", "step_ms") if x.get(k)]
    noisy = [(x, k) for x, k in timed if (rel_spread(x, k) or 0) > NOISY]
    if noisy:
        L.append(f"\nwarning: {len(noisy)} of {len(timed)} timings vary by more than ±{NOISY * 100:.0f}% "
                 f"(half the interquartile range over the median): the machine was busy during this run "
                 f"(load average {m.get('loadavg', {}).get('end')} at the end on {m.get('cpu_count')} logical cores); "
                 f"rerun for stable ratios.")
    if results.get("wall_s") is not None:
        L.append(f"\nwall time {results['wall_s']:.1f} s")
    return "\n".join(L) + "\n"


def format_mixed(results: dict) -> list[str]:
    """The mixed-adapter section: one block per (dtype, tokens, r), a line per implementation and adapter count."""
    rows = [x for x in results["results"] if x["kind"] == "mixed"]
    if not rows:
        return []
    mc = results["config"].get("mixed") or {}
    blocks: dict[tuple, list[dict]] = {}
    for x in rows:
        blocks.setdefault((x["dtype"], x["tokens"], x["r"], x["shape"]), []).append(x)
    L = []
    for (dtype, tokens, r, shape), members in blocks.items():
        reps = max((x.get("repeats") or 0) for x in members)
        lora = [x for x in members if x["impl"] == "peft-lora"]
        lora_r = lora[0]["adapter"]["r"] if lora else mc.get("lora_r")
        L += ["", f"mixed-adapter batches: {shape} | {dtype} | {mc.get('rows', '?')} rows x {mc.get('seq', '?')} tokens "
                  f"| VeRA r={r}, PEFT LoRA r={lora_r}, every linear layer | {mc.get('adapters_loaded', '?')} adapters "
                  f"loaded, row i runs adapter i % n, rows shuffled | {mc.get('mode', 'eval mode')} | {reps} rounds",
              "  fwd no-grad: forward under torch.no_grad; fwd, bwd, fwd+bwd: forward + backward of the LM loss (the "
              "gradients of every adapter in the batch), no optimizer; each call model(ids, adapter_names=names)"]
        headers = ["impl", "adapters", "fwd no-grad ms", "fwd ms", "bwd ms", "fwd+bwd ms", "saved MiB", "peak MiB",
                   "no-grad/1", "fwd+bwd/1", "no-grad/LoRA", "fwd+bwd/LoRA"]
        body = []
        by_impl: dict[str, list[dict]] = {}
        for x in members:
            by_impl.setdefault(x["impl"], []).append(x)
        for impl, xs in by_impl.items():
            name = impl + (f" r={xs[0]['adapter']['r']}" if impl == "peft-lora" else "")
            reasons = {x["reason"] for x in xs if not x["available"]}
            if len(reasons) == 1 and not any(x["available"] for x in xs):
                body.append([name, f"n/a ({reasons.pop()})"])
                continue
            for x in sorted(xs, key=lambda x: x["adapters"] or 0):
                if not x["available"]:
                    body.append([f"{name} ({x['adapters']} adapters)", f"n/a ({x['reason']})"])
                    continue
                one, lr = x.get(ONE_ADAPTER) or {}, x.get("ratio_vs_peft_lora") or {}
                body.append([name, str(x["adapters"]), _f(x["fwd_nograd_ms"], 2) + " " + _iqr_pct(x, "fwd_nograd_ms"),
                             _f(x["fwd_ms"], 2), _f(x["bwd_ms"], 2),
                             _f(x["fwdbwd_ms"], 2) + " " + _iqr_pct(x, "fwdbwd_ms"), _mib(x["saved_bytes"]),
                             _mib(x["peak_bytes"]), _x(one.get("fwd_nograd_ms")), _x(one.get("fwdbwd_ms")),
                             _x(lr.get("fwd_nograd_ms")), _x(lr.get("fwdbwd_ms"))])
        L += ["  " + s for s in _render(headers, body, "l" + "r" * (len(headers) - 1))]
        L.append("  ratios: /1 = this time / the same implementation's with one adapter on every row; /LoRA = this "
                 "time / PEFT LoRA's at the same adapter count.")
        top = max((x["adapters"] or 0) for x in members)
        parts = []
        for impl, xs in by_impl.items():
            x = next((x for x in xs if x["adapters"] == top and x["available"]), None)
            one = (x or {}).get(ONE_ADAPTER) or {}
            if one.get("fwdbwd_ms") is not None:
                parts.append(f"{impl} {_x(one.get('fwd_nograd_ms'))} fwd no-grad, {_x(one.get('fwdbwd_ms'))} fwd+bwd")
        if parts and top > 1:
            L.append(f"  {top} adapters / 1: " + "; ".join(parts))
    return L


def format_goals(checks: list[dict], device_type: Optional[str]) -> list[str]:
    """The goals block: the checks measured in this run, then the goals this run did not measure and why."""
    if not checks:
        return []
    which = "GPU: the triton backend" if device_type == "cuda" else "CPU: the torch backend"
    if device_type == "cuda" and any(c.get("kind") == "mixed" for c in checks):
        which += ", mixed-adapter batches: the torch backend"
    L = ["", f"goals ({which}; the targets this project set itself, checked where this run measured their case):"]
    measured = [c for c in checks if c.get("case") is not None]
    missing = [c for c in checks if c.get("case") is None]
    if measured:
        headers = ["goal", "case", "impl", "dtype", "tokens", "r", "measured", "status"]
        body = []
        for c in measured:
            v = c["value"]
            meas = "n/a" if v is None else f"{int(v):,} B" if c["metric"] == "saved_bytes" else _x(v)
            status = "info" if c["threshold"] is None else "n/a" if c["ok"] is None else (
                "PASS" if c["ok"] else "MISS")
            if c.get("noisy") and c["ok"] is not None:
                status += f" (noisy ±{c['spread'] * 100:.0f}%)"
            if c["metric"] == "saved_bytes" and c["threshold"] is not None:
                status += f" (limit {int(c['threshold']):,} B)"
            body.append([c["goal"], c["case"], c["impl"], c["dtype"], str(c["tokens"]), str(c["r"]), meas, status])
        L += ["  " + s for s in _render(headers, body, "llllrrrl")]
        reasons = sorted({(c["impl"], c["reason"]) for c in measured if c["value"] is None and c.get("reason")})
        for impl, reason in reasons:
            L.append(f"  n/a: {impl}: {reason}")
    if missing:
        L.append("  not measured in this run" + (" (none of the goals' cases was)" if not measured else "") + ":")
        for c in missing:
            L.append(f"    {c['goal']}  [{c['where']}]: {c['reason'].removeprefix('not measured: ')}")
    return L


# ---------------------------------------------------------------------------------------------- CSV
CSV_FIELDS = ["case", "kind", "impl", "dtype", "tokens", "r", "adapter_type", "adapter_r", "shape", "available",
              "reason", "fwd_ms", "bwd_ms", "fwdbwd_ms", "step_ms", "step_ms_q1", "step_ms_q3", "fwdbwd_ms_q1",
              "fwdbwd_ms_q3", "tokens_per_s", "saved_bytes", "peak_bytes", "peak_kind", "repeats", "gpu_fwdbwd_ms",
              "gpu_note", "adapters", "fwd_nograd_ms", "fwd_nograd_ms_q1", "fwd_nograd_ms_q3"]
# the dequantization rows (kind "dequant", case "dequant <format>", dtype = the output dtype) fill these instead
DEQUANT_CSV_FIELDS = ["median_ms", "gbps", "bitexact_vs_bnb", "ratio_vs_bnb.median_ms"]


def csv_rows(results: dict) -> list[list]:
    """The CSV as lists of cells, header first: one line per result row, then one per dequantization row."""
    ratio_fields = list(YARDSTICKS.values()) + [ONE_ADAPTER]
    ratio_cols = [f"{f}.{k}" for f in ratio_fields for k in RATIO_KEYS]
    header = CSV_FIELDS + ratio_cols + DEQUANT_CSV_FIELDS
    out = [header]
    for x in results["results"]:
        sp = x.get("spread", {})
        flat = dict(x)
        flat["adapter_type"] = (x.get("adapter") or {}).get("type")
        flat["adapter_r"] = (x.get("adapter") or {}).get("r")
        for k in ("step_ms", "fwdbwd_ms", "fwd_nograd_ms"):
            flat[f"{k}_q1"] = sp.get(k, {}).get("q1")
            flat[f"{k}_q3"] = sp.get(k, {}).get("q3")
        for f in ratio_fields:
            for k in RATIO_KEYS:
                flat[f"{f}.{k}"] = (x.get(f) or {}).get(k)
        out.append([flat.get(k) for k in header])
    for d in results.get("dequant") or []:
        flat = dict(d, case=f"dequant {d['format']}", kind="dequant", dtype=d["out_dtype"],
                    shape="x".join(map(str, d["shape"])), available=True)
        flat["ratio_vs_bnb.median_ms"] = d["ratio_vs_bnb"]
        out.append([flat.get(k) for k in header])
    return [["" if v is None else v for v in line] for line in out]


def write_csv(results: dict, path: str) -> None:
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(csv_rows(results))


# ---------------------------------------------------------------------------------------------- plot
PLOT_COLORS = {"base": "#8c8c8c", "peft-lora": "#9467bd", "reference": "#1f77b4", "torch": "#ff7f0e",
               "triton": "#2ca02c"}
# (row title, metric of a layer row, metric of a model row)
PLOT_METRICS = (("time / PEFT's", "fwdbwd_ms", "step_ms"), ("saved activations / PEFT's", "saved_bytes", "saved_bytes"),
                ("peak memory / PEFT's", "peak_bytes", "peak_bytes"))


def _plot_groups(rows: list[dict], kind: str) -> list[tuple[str, dict]]:
    """(x label, impl -> row) per measured case of ``kind``, in run order; PEFT itself is the line at 1."""
    groups: dict[tuple, dict] = {}
    for row in rows:
        if row["kind"] == kind and row["impl"] != "peft":
            groups.setdefault(group_key(row), {})[row["impl"]] = row
    out = []
    for (_, case, dtype, tokens, r), members in groups.items():
        name = case.split(" ", 1)[-1]
        out.append((f"{name}\n{dtype}, {tokens} tok, r={r}", members))
    return out


def make_figure(results: dict):
    """The plot as a matplotlib Figure: bars of what this run measured, ours / PEFT's VeRA (below 1 = faster or less
    memory), for every layer case (left) and the model case (right): time, saved activations and peak memory."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = results["results"]
    cols = []
    for kind in ("layer", "model"):
        groups = _plot_groups(rows, kind)
        shown = [i for i in PLOT_COLORS if any(members.get(i, {}).get("available") for _, members in groups)]
        cols.append((kind, groups, shown))
    widths = [max(1.0, len(groups) * 0.35 * max(1, len(shown))) for _, groups, shown in cols]
    fig, axes = plt.subplots(len(PLOT_METRICS), 2, figsize=(min(22.0, 4 + 1.2 * sum(widths)), 10.5),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    m, cfg = results["machine"], results["config"]
    fig.suptitle(f"vera_kernels vs PEFT's VeRA, measured in one run: ours / PEFT's (below 1 = faster or less "
                 f"memory)\n{m.get('gpu') or m.get('cpu')} | {threads_text(cfg.get('threads'))} | torch "
                 f"{m.get('versions', {}).get('torch')}", fontsize=10)
    # an implementation that could not run anywhere in the plot gets no bars, but a line saying why
    na = {}
    for row in rows:
        if row["kind"] in ("layer", "model") and not row["available"] and row["impl"] != "peft" and not any(
                row["impl"] in shown for _, _, shown in cols):
            na.setdefault(row["impl"], row["reason"])
    labelled: set = set()
    for col, (kind, groups, impls) in enumerate(cols):
        width = 0.8 / max(1, len(impls))
        for row_i, (title, layer_key, model_key) in enumerate(PLOT_METRICS):
            ax = axes[row_i][col]
            key = layer_key if kind == "layer" else model_key
            if not groups:
                ax.text(0.5, 0.5, f"no {kind} case in this run", ha="center", va="center", transform=ax.transAxes)
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            top = 1.0
            for g, (_, members) in enumerate(groups):
                for k, impl in enumerate(impls):
                    x = g + (k - (len(impls) - 1) / 2) * width
                    row = members.get(impl)
                    if row is None:
                        continue
                    v = row.get("ratio_vs_peft", {}).get(key) if row.get("available") else None
                    if v is None:
                        ax.text(x, 0.02, "n/a", ha="center", va="bottom", fontsize=6, rotation=90,
                                transform=ax.get_xaxis_transform())
                        continue
                    ax.bar(x, v, width, color=PLOT_COLORS[impl], label=None if impl in labelled else impl)
                    labelled.add(impl)
                    ax.text(x, v, _x(v).rstrip("x"), ha="center", va="bottom", fontsize=6)
                    top = max(top, v)
            ax.axhline(1.0, color="black", lw=0.8, ls="--")
            ax.set_ylim(0, top * 1.18)
            ax.set_xticks(range(len(groups)))
            ax.set_xticklabels([label for label, _ in groups], fontsize=7)
            ax.grid(True, axis="y", alpha=0.3)
            what = "fwd+bwd" if kind == "layer" else "training step"
            ax.set_title(f"{kind}: " + (title.replace("time", f"{what} time") if row_i == 0 else title), fontsize=9)
            if col == 0:
                ax.set_ylabel("ours / PEFT's")
    handles: dict = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    handles["PEFT VeRA = 1"] = axes[0][0].axhline(1.0, color="black", lw=0.8, ls="--")
    fig.legend(list(handles.values()), list(handles), loc="lower center", bbox_to_anchor=(0.5, 0.025),
               ncol=len(handles), fontsize=8)
    if na:
        fig.text(0.5, 0.005, "not shown: " + "; ".join(f"{i}: n/a ({reason})" for i, reason in na.items()),
                 ha="center", va="bottom", fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def write_plot(results: dict, path: str) -> None:
    """Write make_figure(results) as a PNG."""
    import matplotlib.pyplot as plt

    fig = make_figure(results)
    fig.savefig(path, dpi=110)
    plt.close(fig)
