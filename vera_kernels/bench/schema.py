"""validate_results(results) -> list of problems (empty when the object follows the documented schema and its
derived numbers agree with its raw ones). Used by the tests; handy for anyone consuming the JSON."""

from __future__ import annotations

import math

from .impls import IMPLS
from .report import LORA_KINDS, ONE_ADAPTER, RATIO_KEYS, YARDSTICKS, group_key, one_adapter_key, one_adapter_rows

NUM = (int, float)
ROW_KEYS = {
    "case": str, "kind": str, "impl": str, "dtype": str, "tokens": int, "r": (int, type(None)), "shape": str,
    "available": bool, "reason": (str, type(None)), "fwd_ms": (float, type(None)), "bwd_ms": (float, type(None)),
    "fwdbwd_ms": (float, type(None)), "step_ms": (float, type(None)), "tokens_per_s": (float, type(None)),
    "saved_bytes": (int, type(None)), "peak_bytes": (int, type(None)), "peak_kind": str, "timing": str,
    "adapter": dict, "repeats": int, "spread": dict, "ratio_vs_peft": dict, "ratio_vs_base": dict,
    "gpu_fwdbwd_ms": (float, type(None)), "gpu_note": (str, type(None)),
    "adapters": (int, type(None)), "fwd_nograd_ms": (float, type(None)),
}
KINDS = ("layer", "model", "train", "mixed")
MACHINE_KEYS = {"device": str, "cpu": str, "cpu_count": (int, type(None)), "threads": int, "gpu": (str, type(None)),
                "python": str, "timing": str, "versions": dict}
CONFIG_KEYS = {"device": str, "dtypes": list, "model_dtype": str, "r": list, "tokens": list, "shapes": list,
               "model": str, "backends": list, "cases": list, "quick": bool, "seed": int, "threads": int, "threads_from": str,
               "repeats": dict, "warmup": dict, "time_cap_s": NUM, "train_steps": int, "unavailable": dict,
               "argv": list}


def _close(a, b, rel=1e-9) -> bool:
    return a == b or abs(a - b) <= rel * max(abs(a), abs(b))


def _types(obj: dict, spec: dict, where: str, errs: list) -> None:
    for k, t in spec.items():
        if k not in obj:
            errs.append(f"{where}: missing key {k!r}")
        elif not isinstance(obj[k], t) or (t in (int, NUM) and isinstance(obj[k], bool)):
            errs.append(f"{where}.{k}: {type(obj[k]).__name__} is not {t}")


def validate_results(res: dict) -> list[str]:
    errs: list[str] = []
    if not isinstance(res, dict):
        return ["results object is not a dict"]
    for k in ("schema", "machine", "config", "results", "training", "checks", "wall_s"):
        if k not in res:
            errs.append(f"missing top-level key {k!r}")
    if errs:
        return errs
    if not str(res["schema"]).startswith("vera_kernels.bench/"):
        errs.append(f"schema {res['schema']!r}")
    _types(res["machine"], MACHINE_KEYS, "machine", errs)
    _types(res["config"], CONFIG_KEYS, "config", errs)
    if res["machine"].get("device") not in ("cpu", "cuda"):
        errs.append(f"machine.device {res['machine'].get('device')!r}")
    if not isinstance(res["wall_s"], NUM) or res["wall_s"] <= 0:
        errs.append("wall_s must be a positive number")
    rows = res["results"]
    if not isinstance(rows, list):
        return errs + ["results is not a list"]
    groups: dict = {}
    for n, row in enumerate(rows):
        w = f"results[{n}]"
        if not isinstance(row, dict):
            errs.append(f"{w} is not a dict")
            continue
        _types(row, ROW_KEYS, w, errs)
        if any(k not in row for k in ROW_KEYS):
            continue
        if row["kind"] not in KINDS:
            errs.append(f"{w}.kind {row['kind']!r}")
        if row["impl"] not in IMPLS:
            errs.append(f"{w}.impl {row['impl']!r}")
        if row["dtype"] not in ("fp32", "bf16", "fp16"):
            errs.append(f"{w}.dtype {row['dtype']!r}")
        mixed = row["kind"] == "mixed"
        if mixed and (not isinstance(row["adapters"], int) or row["adapters"] < 1):
            errs.append(f"{w}: a mixed row needs a positive adapters count")
        if not mixed and (row["adapters"] is not None or row["fwd_nograd_ms"] is not None):
            errs.append(f"{w}: adapters / fwd_nograd_ms are for mixed rows only")
        if row["available"]:
            if row["reason"] is not None:
                errs.append(f"{w}: available but has a reason")
            if mixed:  # no optimizer: fwd, bwd, fwd+bwd and the no-grad forward
                if row["step_ms"] is not None or row["tokens_per_s"] is not None or row["repeats"] < 1:
                    errs.append(f"{w}: a mixed row has no step_ms / tokens_per_s and needs repeats")
            elif row["step_ms"] is None or not row["step_ms"] > 0 or row["repeats"] < 1:
                errs.append(f"{w}: available but no positive step_ms / repeats")
            times = (("fwd_ms", "bwd_ms", "fwdbwd_ms", "fwd_nograd_ms") if mixed else
                     ("fwd_ms", "bwd_ms", "fwdbwd_ms", "step_ms") if row["kind"] != "train" else ("step_ms",))
            for k in times:
                v = row[k]
                if not isinstance(v, float) or not (v > 0 and math.isfinite(v)):
                    errs.append(f"{w}.{k}: {v!r} is not a positive finite float")
                    continue
                sp = row["spread"].get(k)
                if not isinstance(sp, dict) or any(not isinstance(sp.get(q), NUM) for q in ("q1", "q3", "min", "max")):
                    errs.append(f"{w}.spread.{k} missing q1/q3/min/max")
                elif not (sp["min"] <= sp["q1"] <= v <= sp["q3"] <= sp["max"]):
                    errs.append(f"{w}.spread.{k}: not min <= q1 <= median <= q3 <= max")
            if row["kind"] != "train":
                if row["fwdbwd_ms"] and row["step_ms"] and row["step_ms"] < row["fwdbwd_ms"] * 0.5:
                    errs.append(f"{w}: step_ms much smaller than fwdbwd_ms")
                for k in ("saved_bytes",):
                    if not isinstance(row[k], int) or row[k] < 0:
                        errs.append(f"{w}.{k}: {row[k]!r} is not a non-negative int")
            g = row["gpu_fwdbwd_ms"]
            if g is not None and not (isinstance(g, float) and g > 0 and math.isfinite(g)):
                errs.append(f"{w}.gpu_fwdbwd_ms: {g!r} is not a positive finite float")
            if g is None and row["kind"] != "train" and not row["gpu_note"]:
                errs.append(f"{w}: gpu_fwdbwd_ms missing without a gpu_note")
            if row["step_ms"] and row["tokens_per_s"] is not None and not _close(
                    row["tokens_per_s"], row["tokens"] / (row["step_ms"] / 1e3), 1e-9):
                errs.append(f"{w}: tokens_per_s != tokens / step time")
        else:
            if not row["reason"]:
                errs.append(f"{w}: unavailable without a reason")
            if any(row[k] is not None for k in ("fwd_ms", "bwd_ms", "fwdbwd_ms", "step_ms", "fwd_nograd_ms")):
                errs.append(f"{w}: unavailable but has times")
        groups.setdefault(group_key(row), {})[row["impl"]] = row
    # ratios must be the quotient of the raw numbers of the same case (mixed rows: and of the same implementation's
    # one-adapter row)
    good = [r for r in rows if isinstance(r, dict) and all(k in r for k in ROW_KEYS)]
    ones = one_adapter_rows(good)
    for row in good:
        members = groups[group_key(row)]
        fields = list(YARDSTICKS.items()) + ([(None, ONE_ADAPTER)] if row["kind"] == "mixed" else [])
        for impl, field in fields:
            ratios = row.get(field)
            if ratios is None:
                if field != "ratio_vs_peft_lora" or row["kind"] in LORA_KINDS:
                    errs.append(f"{row['case']}/{row['impl']}: missing {field}")
                continue
            if not isinstance(ratios, dict):
                errs.append(f"{row['case']}/{row['impl']}: {field} is not a dict")
                continue
            den = ones.get(one_adapter_key(row)) if impl is None else members.get(impl)
            for k, v in ratios.items():
                if k not in RATIO_KEYS or not isinstance(v, float):
                    errs.append(f"{row['case']}/{row['impl']}: {field}.{k}={v!r}")
                    continue
                if den is None or not den["available"] or not row["available"]:
                    errs.append(f"{row['case']}/{row['impl']}: {field}.{k} without both rows measured")
                    continue
                if not _close(v, row[k] / den[k], 1e-9):
                    errs.append(f"{row['case']}/{row['impl']}: {field}.{k}={v} but {row[k]}/{den[k]}")
    # training section
    tr = res["training"]
    if tr is not None:
        if not isinstance(tr, dict):
            errs.append("training is not a dict or null")
        else:
            for k in ("steps", "impls", "loss", "abs_diff_vs_peft", "max_abs_diff_vs_peft", "max_rel_diff_vs_peft",
                      "step_ms"):
                if k not in tr:
                    errs.append(f"training: missing {k!r}")
            if not errs:
                if "peft" not in tr["impls"]:
                    errs.append("training: peft not among impls")
                for n in tr["impls"]:
                    curve = tr["loss"].get(n)
                    if not isinstance(curve, list) or len(curve) != tr["steps"] or not all(
                            isinstance(v, float) and math.isfinite(v) for v in curve):
                        errs.append(f"training.loss.{n}: not {tr['steps']} finite floats")
                        continue
                    if n == "peft":
                        continue
                    d = tr["abs_diff_vs_peft"].get(n) or []
                    if len(d) != len(curve) or any(not _close(a, abs(b - c), 1e-12) and abs(a - abs(b - c)) > 1e-15
                                                   for a, b, c in zip(d, curve, tr["loss"]["peft"])):
                        errs.append(f"training.abs_diff_vs_peft.{n} does not match the loss curves")
                    elif not _close(tr["max_abs_diff_vs_peft"][n], max(d), 1e-12):
                        errs.append(f"training.max_abs_diff_vs_peft.{n} != max of the diffs")
    dq = res.get("dequant")
    if dq is not None:
        if not isinstance(dq, list):
            errs.append("dequant is not a list or null")
        else:
            bnb = {}
            for d in dq:
                if not isinstance(d, dict) or any(k not in d for k in ("format", "shape", "out_dtype", "impl",
                                                                       "median_ms", "gbps", "ratio_vs_bnb",
                                                                       "bitexact_vs_bnb")):
                    errs.append(f"dequant row {d!r} lacks keys")
                    continue
                if d["impl"] == "bitsandbytes":
                    bnb[(d["format"], tuple(d["shape"]), d["out_dtype"])] = d["median_ms"]
            for d in dq:
                if isinstance(d, dict) and "median_ms" in d:
                    ref = bnb.get((d["format"], tuple(d["shape"]), d["out_dtype"]))
                    if ref is None or not _close(d["ratio_vs_bnb"], d["median_ms"] / ref, 1e-9):
                        errs.append(f"dequant {d['format']}/{d['impl']}: ratio_vs_bnb is not this time / bnb's time")
    if not isinstance(res["checks"], list):
        errs.append("checks is not a list")
    else:
        for c in res["checks"]:
            missing = [k for k in ("goal", "where", "case", "impl", "metric", "value", "threshold", "ok", "reason")
                       if k not in c]
            if missing:
                errs.append(f"check missing {missing}")
            elif c["value"] is None and not c["reason"]:
                errs.append(f"check {c['goal']!r}: no value and no reason")
            elif c["ok"] is not None and c["ok"] != (c["value"] <= c["threshold"]):
                errs.append(f"check {c['goal']!r}: ok does not follow from value and threshold")
    return errs
