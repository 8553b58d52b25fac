"""`python -m vera_kernels.bench`: option handling, a --quick CPU run, and the JSON it writes (schema, and ratios that
agree with the raw times of the same output)."""

from __future__ import annotations

import contextlib
import copy
import csv
import importlib.util
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from vera_kernels.bench import BenchUsageError, format_table, main, run, validate_results
from vera_kernels.bench.cli import make_plan, parse_args
from vera_kernels.bench.report import GOALS, add_ratios, goal_checks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_PEFT = importlib.util.find_spec("peft") is not None
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


# ---------------------------------------------------------------------------------------------- options
BAD = [
    (["--r", "0"], "--r"),
    (["--r", "abc"], "--r"),
    (["--r", "64,64"], "duplicate"),
    (["--tokens", "-5"], "--tokens"),
    (["--tokens", ""], "--tokens"),
    (["--dtype", "fp8"], "--dtype"),
    (["--model", "gpt-5"], "--model"),
    (["--backends", "torch,cuda-magic"], "--backends"),
    (["--cases", "layer,nope"], "--cases"),
    (["--repeats", "0"], "--repeats"),
    (["--warmup", "0"], "--warmup"),
    (["--threads", "0"], "--threads"),
    (["--train-steps", "1"], "--train-steps"),
    (["--time-cap", "-1"], "--time-cap"),
    (["--device", "tpu"], "device"),
    (["--shapes", "2048by5632"], "--shapes"),
    (["--json", "/nonexistent-dir/x/out.json"], "--json"),
    (["--csv", "/nonexistent-dir/x/out.csv"], "--csv"),
    (["--plot", "/nonexistent-dir/x/out.png"], "--plot"),
    (["--frobnicate"], "unrecognized"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=[" ".join(a) or "empty" for a, _ in BAD])
def test_bad_values_exit_nonzero_with_a_clear_message(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and needle in err
    assert "Traceback" not in err
    with pytest.raises(BenchUsageError):
        run(argv, print_table=False)


def test_json_path_that_is_a_directory_is_refused(tmp_path, capsys):
    assert main(["--json", str(tmp_path)]) == 2
    assert "--json" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_cuda(capsys):
    assert main(["--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--device", "--dtype", "--r", "--tokens", "--model", "--backends", "--repeats", "--json", "--csv",
                "--plot", "--quick", "llama-1b", "llama-7b-layers", "tiny"):
        assert opt in out


def test_module_entry_point_bad_value():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "vera_kernels.bench", "--r", "-3"], capture_output=True, text=True,
                       env=env, cwd=REPO, timeout=120)
    assert p.returncode == 2
    assert "--r" in p.stderr and "error:" in p.stderr and "Traceback" not in p.stderr


def test_cpu_defaults_are_the_goals_cases_on_one_thread():
    """`make bench` on a CPU: the case the CPU goals are stated at, on one torch thread (two threads per process on a
    shared 2-core machine made the ratios swing by tens of percent)."""
    plan = make_plan(parse_args(["--device", "cpu"]))
    assert plan["threads"] == 1 and plan["threads_from"] == "default"
    assert plan["shapes"] == [(2048, 2048), (2048, 5632)] and plan["tokens"] == [1024] and plan["r"] == [256]
    assert plan["layer_dtypes"] == ["fp32", "bf16"] and plan["model"].name == "tiny"
    assert "triton" in plan["reasons"] and "TRITON_INTERPRET=1" in plan["reasons"]["triton"]
    plan = make_plan(parse_args(["--device", "cpu", "--threads", "2"]))
    assert plan["threads"] == 2 and plan["threads_from"] == "--threads"


# ---------------------------------------------------------------------------------------------- a quick run
@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    paths = {"json": str(d / "out.json"), "csv": str(d / "out.csv"), "plot": str(d / "out.png")}
    # the default thread count: what `make bench` uses
    argv = ["--device", "cpu", "--quick", "--no-progress", "--json", paths["json"], "--csv", paths["csv"]]
    if HAS_MPL:
        argv += ["--plot", paths["plot"]]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        results = run(argv, print_table=False)
    with open(paths["json"]) as fh:
        loaded = json.load(fh)
    paths["stderr"] = err.getvalue()
    return results, loaded, paths


def test_quick_run_json_schema(quick):
    results, loaded, _ = quick
    assert validate_results(loaded) == []
    assert loaded == json.loads(json.dumps(results))  # the file is the returned object
    m, cfg = loaded["machine"], loaded["config"]
    assert m["device"] == "cpu" and m["threads"] >= 1 and m["versions"]["torch"] == torch.__version__
    assert cfg["quick"] is True and cfg["cases"] == ["layer", "model", "train", "dequant"]
    assert isinstance(loaded["wall_s"], float)


def test_quick_run_dequant_section(quick):
    """The dequantization table: every format, our native extension and bitsandbytes, bit-exact, ratios derived."""
    _, res, _ = quick
    pytest.importorskip("bitsandbytes")
    dq = res["dequant"]
    assert dq, res.get("dequant_skipped")
    assert {d["format"] for d in dq} == {"nf4", "nf4-nested", "fp4", "int8"}
    assert {d["impl"] for d in dq} == {"vera-native", "bitsandbytes"}
    for d in dq:
        assert d["bitexact_vs_bnb"], d
        assert d["median_ms"] > 0 and d["gbps"] > 0


def test_quick_run_has_every_case_and_implementation(quick):
    _, res, _ = quick
    rows = res["results"]
    kinds = {r["kind"] for r in rows}
    assert kinds == ({"layer", "model", "train"} if HAS_PEFT else {"layer", "model"})
    layer = [r for r in rows if r["kind"] == "layer"]
    assert {r["dtype"] for r in layer} == {"fp32", "bf16"}
    assert {r["impl"] for r in layer} == {"base", "peft", "reference", "torch", "triton"}
    assert len({r["case"] for r in layer}) == 2
    for r in rows:
        if r["impl"] == "triton":  # never timed on the CPU unless named in --backends
            assert r["available"] is False and r["reason"]
        if r["impl"] in ("base", "reference", "torch") or (r["impl"] == "peft" and HAS_PEFT):
            assert r["available"], r
    for r in layer:
        if r["available"]:
            assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0 and r["step_ms"] >= r["fwdbwd_ms"] * 0.999
            assert isinstance(r["saved_bytes"], int)
    # the memory-lean backend keeps only h = x A^T (tokens x r) for backward, in the branch's compute dtype (on the
    # CPU the torch backend computes a bf16 model's branch in float32 unless the CPU has native bf16:
    # _dtypes.adapter_compute_dtype)
    from vera_kernels._dtypes import adapter_compute_dtype

    for r in layer:
        if r["impl"] == "torch":
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[r["dtype"]]
            elem = torch.empty((), dtype=adapter_compute_dtype("torch", dtype, "cpu")).element_size()
            assert r["saved_bytes"] <= r["tokens"] * r["r"] * elem
    model = [r for r in rows if r["kind"] == "model"]
    assert {r["impl"] for r in model} == {"base", "peft", "peft-lora", "reference", "torch", "triton"}


def _rows_by_group(rows):
    out = {}
    for r in rows:
        out.setdefault((r["kind"], r["case"], r["dtype"], r["tokens"], r["r"]), {})[r["impl"]] = r
    return out


def test_ratios_agree_with_raw_times(quick):
    _, res, _ = quick
    groups = _rows_by_group(res["results"])
    checked = 0
    for members in groups.values():
        for r in members.values():
            for field, den_impl in (("ratio_vs_peft", "peft"), ("ratio_vs_base", "base")):
                den = members.get(den_impl)
                for key, val in r[field].items():
                    assert den is not None and den["available"] and r["available"]
                    assert math.isclose(val, r[key] / den[key], rel_tol=1e-9), (r["case"], r["impl"], key)
                    checked += 1
                if r["available"] and den is not None and den["available"] and HAS_PEFT:
                    for key in ("step_ms",):
                        assert key in r[field]
            if r["available"] and r["step_ms"]:
                assert math.isclose(r["tokens_per_s"], r["tokens"] / (r["step_ms"] / 1e3), rel_tol=1e-9)
    assert checked > 20
    # the yardsticks against themselves are exactly 1
    for members in groups.values():
        for impl, field in (("peft", "ratio_vs_peft"), ("base", "ratio_vs_base")):
            if impl in members and members[impl]["available"]:
                assert members[impl][field]["step_ms"] == 1.0


def test_validator_catches_a_wrong_ratio(quick):
    _, res, _ = quick
    bad = copy.deepcopy(res)
    row = next(r for r in bad["results"] if r["ratio_vs_base"].get("step_ms") and r["impl"] != "base")
    row["ratio_vs_base"]["step_ms"] *= 1.5
    assert any("ratio_vs_base.step_ms" in e for e in validate_results(bad))
    bad = copy.deepcopy(res)
    del bad["results"][0]["fwd_ms"]
    assert validate_results(bad)


@pytest.mark.skipif(not HAS_PEFT, reason="the training comparison needs peft")
def test_training_loss_matches_peft(quick):
    _, res, _ = quick
    tr = res["training"]
    assert tr is not None and tr["impls"][0] == "peft" and "torch" in tr["impls"]
    assert all(len(tr["loss"][n]) == tr["steps"] for n in tr["impls"])
    for n in tr["impls"][1:]:
        assert tr["max_rel_diff_vs_peft"][n] < 1e-4, (n, tr["max_rel_diff_vs_peft"][n])


def test_csv_has_every_row_of_the_json_dequant_included(quick):
    _, res, paths = quick
    with open(paths["csv"], newline="") as fh:
        lines = list(csv.DictReader(fh))
    assert list(lines[0])[:6] == ["case", "kind", "impl", "dtype", "tokens", "r"]
    dq = res["dequant"] or []
    assert len(lines) == len(res["results"]) + len(dq)
    for line, row in zip(lines, res["results"]):
        assert (line["case"], line["impl"], line["dtype"]) == (row["case"], row["impl"], row["dtype"])
        if row["available"] and row["kind"] != "train":
            assert float(line["fwdbwd_ms"]) == row["fwdbwd_ms"]
    if importlib.util.find_spec("bitsandbytes") is not None:
        assert dq, res.get("dequant_skipped")
    got = [x for x in lines if x["kind"] == "dequant"]
    assert len(got) == len(dq)
    bnb = {(d["format"], d["out_dtype"]): d["median_ms"] for d in dq if d["impl"] == "bitsandbytes"}
    for line, d in zip(got, dq):
        assert (line["case"], line["impl"], line["dtype"]) == (f"dequant {d['format']}", d["impl"], d["out_dtype"])
        assert float(line["median_ms"]) == d["median_ms"] and float(line["gbps"]) == d["gbps"] > 0
        assert line["bitexact_vs_bnb"] == "True"
        # ours / theirs, as every other ratio
        assert math.isclose(float(line["ratio_vs_bnb.median_ms"]), d["median_ms"] / bnb[(d["format"], d["out_dtype"])],
                            rel_tol=1e-9)


@pytest.mark.skipif(not HAS_MPL, reason="the plot needs matplotlib")
def test_plot_of_a_default_shaped_run_shows_every_measured_ratio(quick):
    """One token count and one r, as a default run: the plot has a bar for every ratio measured, ours / PEFT's
    (no inverted speedups), for the layer cases and the model case, time, saved activations and peak memory."""
    import matplotlib.pyplot as plt

    from vera_kernels.bench.report import make_figure

    _, res, paths = quick
    with open(paths["plot"], "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    fig = make_figure(res)
    try:
        axes = fig.axes
        assert len(axes) == 6  # time, saved, peak (rows) x layer, model (columns)
        text = " ".join(t.get_text() for ax in axes for t in [ax.title, ax.yaxis.label]) + fig._suptitle.get_text()
        assert "faster than PEFT" not in text and "ours / PEFT's" in text
        for col, kind in enumerate(("layer", "model")):
            for row_i, keys in enumerate((("fwdbwd_ms", "step_ms"), ("saved_bytes",) * 2, ("peak_bytes",) * 2)):
                key = keys[0] if kind == "layer" else keys[1]
                heights = sorted(p.get_height() for p in axes[row_i * 2 + col].patches)
                want = sorted(r["ratio_vs_peft"][key] for r in res["results"] if r["kind"] == kind
                              and r["available"] and r["impl"] != "peft" and key in r["ratio_vs_peft"])
                assert want and heights == pytest.approx(want, rel=1e-12), (kind, key)
        assert any("triton" in t.get_text() and "TRITON_INTERPRET=1" in t.get_text() for t in fig.texts)
    finally:
        plt.close(fig)


def test_threads_in_the_header(quick):
    results, _, paths = quick
    assert results["config"]["threads"] == 1 and results["config"]["threads_from"] == "default"
    assert "1 torch thread, the CPU default" in paths["stderr"]
    assert "threads: 1 torch thread (the CPU default" in format_table(results)


def test_quick_run_lists_the_goals_and_why_they_were_not_measured(quick):
    _, res, _ = quick
    cpu_goals = [g for g in GOALS if g.device == "cpu"]
    assert len(res["checks"]) == len(cpu_goals)
    for c in res["checks"]:
        # the default run has no mixed-adapter case (--cases mixed asks for it): those goals say so
        why = "no mixed case in this run (--cases)" if c["kind"] == "mixed" else "--quick"
        assert c["case"] is None and c["value"] is None and c["ok"] is None and why in c["reason"]
    text = format_table(res)
    block = text[text.index("goals ("):]
    assert "issue" not in block
    for g in cpu_goals:
        assert g.goal in block and g.where() in block
    assert "layer fwd+bwd / PEFT <= 0.95x" in block and "2048x2048 and 2048x5632" in block
    assert "--quick measures smaller cases" in block


def _as_case(rows, shape_of, **fields):
    """Rows of a quick run relabelled as another case (shape names, dtype, tokens, r), ratios recomputed."""
    out = []
    for r in copy.deepcopy(rows):
        if r["kind"] != "layer":
            continue
        r["shape"] = shape_of[r["shape"]]
        r["case"] = "layer " + r["shape"]
        r.update(fields)
        out.append(r)
    add_ratios(out)
    return out


def test_goals_are_checked_as_ours_over_theirs(quick):
    _, res, _ = quick
    # the CPU goals' case
    rows = _as_case(res["results"], {"512x512": "2048x2048", "512x1376": "2048x5632"}, tokens=1024, r=256)
    checks = goal_checks(rows, "cpu", res["config"])
    measured = [c for c in checks if c["case"]]
    assert {c["goal"] for c in measured} == {g.goal for g in GOALS if g.device == "cpu" and g.kind == "layer"}
    assert len(measured) == 8  # 2 shapes x (fp32, bf16, 2 x saved)
    assert {c["kind"] for c in checks if c["case"] is None} == {"mixed"}  # no mixed rows in this list
    torch_rows = {(r["case"], r["dtype"]): r for r in rows if r["impl"] == "torch"}
    for c in measured:
        row = torch_rows[(c["case"], c["dtype"])]
        key = "fwdbwd_ms" if "fwd+bwd" in c["goal"] else "saved_bytes"
        assert c["value"] == row["ratio_vs_peft"][key] and c["ok"] == (c["value"] <= c["threshold"])
    assert {c["threshold"] for c in measured if "fwd+bwd" in c["goal"]} == {0.95, 0.75}
    # the GPU goals' case, the torch rows standing in for triton's
    rows = [r for r in _as_case(res["results"], {"512x512": "4096x4096", "512x1376": "4096x11008"}, tokens=8192,
                                r=256) if r["impl"] != "triton"]
    for r in rows:
        if r["impl"] == "torch":
            r["impl"] = "triton"
    checks = goal_checks(rows, "cuda", res["config"])
    speed = [c for c in checks if c["goal"].startswith("layer fwd+bwd / PEFT")]
    assert len(speed) == len([r for r in rows if r["impl"] == "triton" and r["dtype"] == "bf16"]) > 0
    for c in speed:
        row = next(r for r in rows if r["impl"] == "triton" and (r["case"], r["dtype"]) == (c["case"], c["dtype"]))
        assert c["value"] == row["ratio_vs_peft"]["fwdbwd_ms"]  # not its inverse
        assert c["threshold"] == pytest.approx(1 / 3) and c["ok"] == (c["value"] <= 1 / 3)
    saved = [c for c in checks if c["metric"] == "saved_bytes"]
    assert saved and all(c["threshold"] == 8192 * 256 * 2 for c in saved)
    model = [c for c in checks if c["kind"] == "model"]
    assert model and all(c["case"] is None and c["reason"] for c in model)  # no model rows in this list
    text = format_table(dict(res, results=rows, checks=checks, machine=dict(res["machine"], device="cuda")))
    assert "layer fwd+bwd / frozen base <= 1.20x" in text and "model step / PEFT VeRA <= 0.67x" in text


def test_na_reasons_are_shown_whole(quick):
    _, res, _ = quick
    text = format_table(res)
    triton = next(r for r in res["results"] if r["impl"] == "triton")
    assert "TRITON_INTERPRET=1" in triton["reason"] and f"n/a ({triton['reason']})" in text
    sim = copy.deepcopy(res)
    long = ("the triton backend runs on CUDA tensors (got a cpu tensor); on the CPU it runs only through Triton's "
            "interpreter: set TRITON_INTERPRET=1 before importing triton")
    for r in sim["results"]:
        if r["impl"] == "triton":
            r["reason"] = long
    assert f"n/a ({long})" in format_table(sim)


def test_one_ratio_convention_in_the_tables(quick):
    _, res, _ = quick
    text = format_table(res)
    assert "ours / theirs" in text
    assert "tok/s vs LoRA" not in text and "step/LoRA" in text
    model = {r["impl"]: r for r in res["results"] if r["kind"] == "model"}
    if HAS_PEFT:
        assert model["torch"]["ratio_vs_peft_lora"]["step_ms"] == model["torch"]["step_ms"] / model["peft-lora"]["step_ms"]
    if res["dequant"]:
        assert "ms/bnb" in text and "x bnb" not in text
        bad = copy.deepcopy(res)
        bad["dequant"][0]["ratio_vs_bnb"] = 1 / bad["dequant"][0]["ratio_vs_bnb"] + 1
        assert any("ratio_vs_bnb" in e for e in validate_results(bad))


def test_table_shows_machine_ratios_and_na(quick):
    _, res, _ = quick
    text = format_table(res)
    assert "vera_kernels benchmark" in text
    assert res["machine"]["cpu"] in text and f"torch {torch.__version__}" in text
    assert "n/a (" in text  # triton on the CPU
    assert "fwd+bwd/PEFT" in text and "saved/PEFT" in text
    if HAS_PEFT:
        assert "training run" in text and "max |loss - peft|" in text


def test_gpu_only_column_on_cpu_is_null_with_a_note(quick):
    _, res, _ = quick
    for row in res["results"]:
        assert row["gpu_fwdbwd_ms"] is None
        if row["available"] and row["kind"] != "train":
            assert row["gpu_note"] == "CUDA only"
    assert "GPU fwd+bwd" not in format_table(res)


def test_gpu_only_column_renders_and_its_ratios_validate(quick):
    """What a CUDA run adds (CUDA-graph replay times), simulated on the CPU results: ratios derived, schema
    valid, columns shown; a wrong one is caught."""
    from vera_kernels.bench.report import add_ratios

    _, res, _ = quick
    sim = copy.deepcopy(res)
    for n, row in enumerate(sim["results"]):
        if row["available"] and row["kind"] != "train":
            row["gpu_fwdbwd_ms"], row["gpu_note"] = 0.5 + n * 0.01, None
    add_ratios(sim["results"])
    assert validate_results(sim) == []
    text = format_table(sim)
    assert "GPU fwd+bwd ms" in text and "GPU/PEFT" in text and "CUDA graph" in text
    row = next(r for r in sim["results"] if r["ratio_vs_base"].get("gpu_fwdbwd_ms") and r["impl"] != "base")
    row["ratio_vs_base"]["gpu_fwdbwd_ms"] *= 2
    assert any("gpu_fwdbwd_ms" in e for e in validate_results(sim))
    bad = copy.deepcopy(sim)
    next(r for r in bad["results"] if r["gpu_fwdbwd_ms"])["gpu_fwdbwd_ms"] = -1.0
    assert any("gpu_fwdbwd_ms" in e for e in validate_results(bad))
