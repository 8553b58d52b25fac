"""`python -m vera_kernels.bench`: option handling, a --quick CPU run, and the JSON it writes (schema, and ratios that
agree with the raw times of the same output)."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from vera_kernels.bench import BenchUsageError, format_table, main, run, validate_results

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


# ---------------------------------------------------------------------------------------------- a quick run
@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    paths = {"json": str(d / "out.json"), "csv": str(d / "out.csv"), "plot": str(d / "out.png")}
    # one thread: a functional check, robust on a busy shared runner
    argv = ["--device", "cpu", "--quick", "--threads", "1", "--no-progress",
            "--json", paths["json"], "--csv", paths["csv"]]
    if HAS_MPL:
        argv += ["--plot", paths["plot"]]
    results = run(argv, print_table=False)
    with open(paths["json"]) as fh:
        loaded = json.load(fh)
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
    # the memory-lean backend keeps only h = x A^T (tokens x r) for backward
    for r in layer:
        if r["impl"] == "torch":
            elem = {"fp32": 4, "bf16": 2}[r["dtype"]]
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


def test_csv_and_plot_written(quick):
    _, res, paths = quick
    with open(paths["csv"]) as fh:
        lines = fh.read().strip().splitlines()
    assert lines[0].startswith("case,kind,impl,dtype,tokens,r")
    assert len(lines) == 1 + len(res["results"])
    if HAS_MPL:
        with open(paths["plot"], "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


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
