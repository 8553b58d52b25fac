"""Derived numbers (ratios, goal checks) and the outputs: the text table, CSV and the PNG plot."""

from __future__ import annotations

import csv
import math
from typing import Optional

RATIO_KEYS = ("fwd_ms", "bwd_ms", "fwdbwd_ms", "step_ms", "tokens_per_s", "saved_bytes", "peak_bytes",
              "gpu_fwdbwd_ms")
# denominators: ratio_vs_<name> = this row's metric / that implementation's metric, same case
YARDSTICKS = {"peft": "ratio_vs_peft", "base": "ratio_vs_base", "peft-lora": "ratio_vs_peft_lora"}


def group_key(row: dict) -> tuple:
    return (row["kind"], row["case"], row["dtype"], row["tokens"], row["r"])


def ratio(a, b) -> Optional[float]:
    if a is None or b is None:
        return None
    a, b = float(a), float(b)
    if b == 0 or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def add_ratios(rows: list[dict]) -> None:
    """Fill ratio_vs_peft / ratio_vs_base (and ratio_vs_peft_lora on model rows) from numbers of the same case."""
    groups: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        groups.setdefault(group_key(row), {})[row["impl"]] = row
    for row in rows:
        members = groups[group_key(row)]
        for impl, field in YARDSTICKS.items():
            if impl == "peft-lora" and row["kind"] != "model":
                continue
            den = members.get(impl)
            out = {}
            if row.get("available") and den is not None and den.get("available"):
                for k in RATIO_KEYS:
                    v = ratio(row.get(k), den.get(k))
                    if v is not None:
                        out[k] = v
            row[field] = out


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


def _check(issue, row, what, metric, value, op, threshold, goal_text, spread=None):
    ok = None
    if value is not None and threshold is not None:
        ok = value <= threshold if op == "<=" else value >= threshold
    noisy = spread is not None and spread > NOISY
    return {
        "issue": issue, "case": row["case"], "kind": row["kind"], "impl": row["impl"], "dtype": row["dtype"],
        "tokens": row["tokens"], "r": row["r"], "what": what, "metric": metric, "value": value, "op": op,
        "threshold": threshold, "goal": goal_text, "ok": ok,
        "reason": None if row.get("available") else row.get("reason"),
        "spread": spread, "noisy": noisy,
        "note": f"noisy: a timing behind this ratio varies by ±{spread * 100:.0f}%; rerun on a quiet machine"
        if noisy else "",
    }


def goal_checks(rows: list[dict], device_type: str) -> list[dict]:
    """The acceptance goals of issues 2 (CPU, torch backend) and 3 (GPU, triton backend), at their stated cases.
    Time-ratio checks carry the larger relative spread of the two timings they divide ("noisy" above 10%)."""
    groups: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        groups.setdefault(group_key(row), {})[row["impl"]] = row

    def spread(row, key, *dens):
        vals = [rel_spread(row, key)] + [rel_spread(groups[group_key(row)].get(d), key) for d in dens]
        vals = [v for v in vals if v is not None]
        return max(vals) if vals else None

    out = []
    for row in rows:
        rp, rb = row.get("ratio_vs_peft", {}), row.get("ratio_vs_base", {})
        if (device_type == "cpu" and row["kind"] == "layer" and row["impl"] == "torch"
                and row["shape"] in ("2048x2048", "2048x5632") and row["tokens"] == 1024 and row["r"] == 256
                and row["dtype"] in ("fp32", "bf16")):
            lim = 0.95 if row["dtype"] == "fp32" else 0.75
            out.append(_check("2", row, "fwd+bwd time vs PEFT", "ratio_vs_peft.fwdbwd_ms", rp.get("fwdbwd_ms"),
                              "<=", lim, f"<= {lim}x", spread(row, "fwdbwd_ms", "peft")))
            out.append(_check("2", row, "saved activations vs PEFT", "ratio_vs_peft.saved_bytes",
                              rp.get("saved_bytes"), "<=", 0.25, "<= 0.25x"))
        if (device_type == "cuda" and row["kind"] == "layer" and row["impl"] == "triton" and row["dtype"] == "bf16"
                and row["shape"] in ("4096x4096", "4096x11008")):
            out.append(_check("3", row, "fwd+bwd time vs frozen base", "ratio_vs_base.fwdbwd_ms",
                              rb.get("fwdbwd_ms"), "<=", 1.20, "<= 1.20x", spread(row, "fwdbwd_ms", "base")))
            sp = 1 / rp["fwdbwd_ms"] if rp.get("fwdbwd_ms") else None
            out.append(_check("3", row, "fwd+bwd speedup over PEFT", "1 / ratio_vs_peft.fwdbwd_ms", sp, ">=", 3.0,
                              ">= 3x", spread(row, "fwdbwd_ms", "peft")))
            lim = row["tokens"] * row["r"] * 2
            out.append(_check("3", row, "saved activation bytes", "saved_bytes", row.get("saved_bytes"), "<=",
                              lim, f"<= tokens*r*2 = {lim}"))
        if device_type == "cuda" and row["kind"] == "model" and row["impl"] == "triton":
            out.append(_check("3", row, "training tokens/s vs PEFT VeRA", "ratio_vs_peft.tokens_per_s",
                              rp.get("tokens_per_s"), ">=", 1.5, ">= 1.5x", spread(row, "step_ms", "peft")))
            out.append(_check("3", row, "training tokens/s vs PEFT LoRA r=16",
                              "ratio_vs_peft_lora.tokens_per_s", row.get("ratio_vs_peft_lora", {}).get("tokens_per_s"),
                              ">=", 1.0, ">= 1.0x (on par)", spread(row, "step_ms", "peft-lora")))
            out.append(_check("3", row, "peak memory vs PEFT VeRA", "ratio_vs_peft.peak_bytes",
                              rp.get("peak_bytes"), "<=", None, "reported"))
            # the host-free view: the same fwd+bwd as GPU time (CUDA-graph replay), for telling a host-bound step
            # (Python and launch overhead) from a GPU-bound one; informational, the goal is on eager tokens/s
            g = rp.get("gpu_fwdbwd_ms")
            out.append(_check("3", row, "GPU-only fwd+bwd speedup over PEFT VeRA (CUDA graph)",
                              "1 / ratio_vs_peft.gpu_fwdbwd_ms", 1 / g if g else None, ">=", None, "reported"))
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
    vs = " | ".join(f"{k} {v[k] if v.get(k) else 'not installed'}" for k in
                    ("torch", "triton", "transformers", "peft", "vera_kernels"))
    return f"{dev} | {m.get('threads')} torch threads | {vs} | python {m.get('python')}"


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
            headers.append("tok/s vs LoRA")
        gpu = any(x.get("gpu_fwdbwd_ms") for x in members)
        if gpu:
            headers += ["GPU fwd+bwd ms", "GPU/PEFT", "GPU/base"]
        body = []
        for x in members:
            name = x["impl"] + (f" r={x['adapter']['r']}" if x["impl"] == "peft-lora" else "")
            if not x["available"]:
                body.append([name, f"n/a ({_clip(x['reason'], 150)})"])
                continue
            rp, rb = x["ratio_vs_peft"], x["ratio_vs_base"]
            cells = [name, _f(x["fwd_ms"], 2), _f(x["bwd_ms"], 2),
                     _f(x["fwdbwd_ms"], 2) + (" " + _iqr_pct(x, "fwdbwd_ms") if kind == "layer" else ""),
                     _f(x["step_ms"], 2) + (" " + _iqr_pct(x, "step_ms") if kind == "model" else ""),
                     _f(x["tokens_per_s"], 0), _mib(x["saved_bytes"]), _mib(x["peak_bytes"]),
                     _x(rp.get(tkey)), _x(rb.get(tkey)), _x(rp.get("saved_bytes")), _x(rp.get("peak_bytes"))]
            if lora:
                cells.append(_x(x.get("ratio_vs_peft_lora", {}).get("tokens_per_s")))
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
                     "activations, no optimizer)" + ("; tok/s vs LoRA = tokens/s / PEFT LoRA's." if lora else "."))
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

        L += ["", "dequantization of bitsandbytes weights (GB/s of output; every case bit-exact vs bitsandbytes "
                  "unless marked NO):", dequant_table(results["dequant"])]
    elif results.get("dequant_skipped") and results["dequant_skipped"] != "not requested":
        L += ["", f"dequantization: n/a ({results['dequant_skipped']})"]
    checks = results.get("checks") or []
    if checks:
        L += ["", "goals (acceptance criteria of issues 2 and 3, measured in this run):"]
        headers = ["issue", "case", "impl", "dtype", "tokens", "r", "what", "measured", "goal", "status"]
        body = []
        for c in checks:
            v = c["value"]
            if v is None:
                meas = "n/a" + (f" ({_clip(c['reason'], 40)})" if c.get("reason") else "")
            elif c["metric"] == "saved_bytes":
                meas = f"{int(v):,} B"
            else:
                meas = _x(v)
            status = "n/a" if c["ok"] is None and c["threshold"] is not None else (
                "info" if c["threshold"] is None else ("PASS" if c["ok"] else "MISS"))
            if c.get("noisy") and c["ok"] is not None:
                status += f" (noisy ±{c['spread'] * 100:.0f}%)"
            body.append([c["issue"], c["case"], c["impl"], c["dtype"], str(c["tokens"]), str(c["r"]), c["what"],
                         meas, c["goal"], status])
        L += ["  " + s for s in _render(headers, body, "llllrrlrll")]
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


# ---------------------------------------------------------------------------------------------- CSV
CSV_FIELDS = ["case", "kind", "impl", "dtype", "tokens", "r", "adapter_type", "adapter_r", "shape", "available",
              "reason", "fwd_ms", "bwd_ms", "fwdbwd_ms", "step_ms", "step_ms_q1", "step_ms_q3", "fwdbwd_ms_q1",
              "fwdbwd_ms_q3", "tokens_per_s", "saved_bytes", "peak_bytes", "peak_kind", "repeats", "gpu_fwdbwd_ms",
              "gpu_note"]


def write_csv(results: dict, path: str) -> None:
    rows = results["results"]
    ratio_cols = [f"{f}.{k}" for f in YARDSTICKS.values() for k in RATIO_KEYS]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_FIELDS + ratio_cols)
        for x in rows:
            sp = x.get("spread", {})
            flat = dict(x)
            flat["adapter_type"] = (x.get("adapter") or {}).get("type")
            flat["adapter_r"] = (x.get("adapter") or {}).get("r")
            for k in ("step_ms", "fwdbwd_ms"):
                flat[f"{k}_q1"] = sp.get(k, {}).get("q1")
                flat[f"{k}_q3"] = sp.get(k, {}).get("q3")
            vals = [flat.get(k) for k in CSV_FIELDS]
            vals += [(x.get(f) or {}).get(k) for f in YARDSTICKS.values() for k in RATIO_KEYS]
            w.writerow(["" if v is None else v for v in vals])


# ---------------------------------------------------------------------------------------------- plot
def write_plot(results: dict, path: str) -> None:
    """PNG: speedup over PEFT (fwd+bwd) and saved-bytes ratio to PEFT, against tokens and against r (layer cases;
    one line per implementation, layer shape and dtype)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = [x for x in results["results"] if x["kind"] == "layer" and x["available"] and x["impl"] not in
            ("peft", "base") and x["ratio_vs_peft"].get("fwdbwd_ms")]
    cfg = results["config"]
    t0 = cfg["tokens"][0] if cfg["tokens"] else None
    r0 = cfg["r"][0] if cfg["r"] else None
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    m = results["machine"]
    fig.suptitle(f"vera_kernels vs PEFT VeRA, layer level ({m.get('gpu') or m.get('cpu')})", fontsize=11)
    series: dict[tuple, list[dict]] = {}
    for x in rows:
        series.setdefault((x["impl"], x["shape"], x["dtype"]), []).append(x)
    for (impl, shape, dtype), xs in sorted(series.items()):
        label = f"{impl} {shape} {dtype}"
        by_t = sorted((x for x in xs if x["r"] == r0), key=lambda x: x["tokens"])
        by_r = sorted((x for x in xs if x["tokens"] == t0), key=lambda x: x["r"])
        for col, pts, xkey in ((0, by_t, "tokens"), (1, by_r, "r")):
            if not pts:
                continue
            axes[0][col].plot([p[xkey] for p in pts], [1 / p["ratio_vs_peft"]["fwdbwd_ms"] for p in pts], "o-",
                              label=label)
            sv = [(p[xkey], p["ratio_vs_peft"].get("saved_bytes")) for p in pts]
            sv = [(a, b) for a, b in sv if b is not None]
            if sv:
                axes[1][col].plot([a for a, _ in sv], [b for _, b in sv], "o-", label=label)
    axes[0][0].set_title(f"fwd+bwd speedup over PEFT vs tokens (r={r0})")
    axes[0][1].set_title(f"fwd+bwd speedup over PEFT vs r ({t0} tokens)")
    axes[1][0].set_title(f"saved activations / PEFT vs tokens (r={r0})")
    axes[1][1].set_title(f"saved activations / PEFT vs r ({t0} tokens)")
    for ax in axes.flat:
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    for ax in axes[0]:
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_ylabel("x faster than PEFT")
    for ax in axes[1]:
        ax.set_ylabel("bytes / PEFT's")
    axes[1][0].set_xlabel("tokens")
    axes[1][1].set_xlabel("r")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
