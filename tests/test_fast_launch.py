"""The fast Triton launch path (vera_kernels/ops/triton_launch.py): it launches what Triton's own launch would.

The compiled-kernel checks need Triton's real JIT, not the interpreter these tests run under, so they run in
tests/fast_launch_check.py (see its docstring), under the installed triton and the GPU image's triton 3.6: every
launch the backend makes at GPU shapes, with variants in each thing Triton specialises on, picks Triton's kernel;
a key blind to any one of those things picks a wrong one; hooks, instrumentation, a patched run, the switch and an
unknown launcher take Triton's launch; a really compiled sm_90 kernel goes through the fast path. Here: the
interpreter path (the normal launch, outputs unchanged) and the switch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from test_triton_compile import GPU_IMAGE_TRITON  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "fast_launch_check.py"
# every component of the key the check can show necessary (keyword types are kept too; see the check's MUTATIONS)
KEY_COMPONENTS = {"dtype", "alignment", "int_one", "int_div16", "int_width", "float", "none", "kw_values", "device",
                  "debug"}


def _compiled_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if k != "VERA_KERNELS_FAST_LAUNCH"}
    env.update(TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), **extra)
    return env


@pytest.mark.parametrize("triton_version", [None, GPU_IMAGE_TRITON], ids=["installed", f"triton-{GPU_IMAGE_TRITON}"])
def test_fast_path_launches_what_triton_launches(tmp_path, triton_version):
    out = tmp_path / "fast.json"
    version = ["--triton", triton_version] if triton_version else []
    res = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out), *version], capture_output=True, text=True,
                         env=_compiled_env(tmp_path), cwd=ROOT, timeout=900, check=False)
    assert res.returncode == 0 and out.exists(), res.stdout[-3000:] + res.stderr[-5000:]
    r = json.loads(out.read_text())
    report = json.dumps(r, indent=1)[:6000]
    if triton_version:
        assert r["triton"] == triton_version, report
    assert r["supported"] and r["launches"] >= 50, report

    sel = r["selection"]
    for name in ("sm_90", "sm_90 again", "sm_80", "debug"):
        assert sel[name]["calls"] > 0 and sel[name]["wrong_kernel"] == 0 and sel[name]["wrong_args"] == 0, report
    assert sel["sm_90"]["calls"] >= 50 * r["launches"], report  # the variants were made
    assert sel["sm_90 again"]["fast"] == sel["sm_90 again"]["calls"], report  # every one of them was kept
    assert sel["triton_kernels"] > sel["sm_90"]["calls"] // 2, report  # and most are distinct kernels to Triton

    # a key blind to any component picks a wrong kernel somewhere among those calls
    assert set(r["mutations"]) == KEY_COMPONENTS, report

    # bound launches (triton_launch.bind): every backend launch binds; fresh tensors of the same dtypes and
    # alignments take the bound launcher call, any other tensor falls back; all pick Triton's kernel and arguments
    b = r["bound"]
    assert b["unbindable"] == 0 and b["kept_tensors"] == 0 and b["same"] == r["launches"], report
    assert b["wrong_kernel"] == 0 and b["wrong_args"] == 0, report
    assert b["took_bound"] == b["same"] and b["fell_back"] == b["variant"] > 0, report
    assert r["bound, blind"]["wrong_kernel"] > 0, report  # without its per-slot check a bound launch goes wrong
    # the launch plans (up backward, dropout down forward and backward) launch what their unplanned paths launch,
    # and keep no tensor alive
    p = r["plans"]
    assert p["signatures"] == p["planned"] == p["same_launches"] == 16, report
    assert p["misaligned_same"] == p["misaligned"] == 8 and p["alive_after"] == 0, report
    # the C++ nodes' launches (up backward, dropout down forward and backward) replayed from C++ (LaunchReplay)
    # launch what the Python plans launch; a misaligned input, a launch hook, the switch off, another float32 matmul
    # precision each take the Python path instead
    rp = r["replays"]
    assert rp["native"], report  # CI builds the C++ module (tests/test_native_up.py)
    assert rp["signatures"] == rp["replayed"] == rp["same_launches"] == 16, report
    assert rp["misaligned_same"] == rp["misaligned"] == 8 and rp["refused_same"] == rp["refused"] == 20, report
    assert all(n > 0 for n in r["mutations"].values()), report

    fb = r["fallbacks"]
    assert fb["cached"] and fb["cached again"] and not fb["first call (compiles)"], report
    for name in ("launch enter hook", "launch exit hook", "pre-run hook", "instrumentation mode", "switched off",
                 "patched run", "unknown launcher, first", "unknown launcher, again"):
        assert fb[name] is False, (name, report)
    assert fb["launch enter hook called"] == 1 and fb["patched run called"] == 1, report
    assert fb["unknown launcher kept"] == 0, report

    rows = r["compiled"]["launches"]
    assert [row["fast"] for row in rows] == [False, True, False, True], report
    assert all(row["same"] and row["compiled"] for row in rows), report
    # the misaligned pointer got a kernel of its own
    assert rows[0]["kernel"] == rows[1]["kernel"] != rows[2]["kernel"] == rows[3]["kernel"], report
    assert r["compiled"]["launchers known"] and all(r["compiled"]["launchers known"].values()), report


def test_the_environment_switch(tmp_path, monkeypatch):
    from vera_kernels.ops import triton_launch as tl

    for value, expected in ((None, True), ("1", True), ("0", False)):
        if value is None:
            monkeypatch.delenv(tl.ENV_FAST_LAUNCH, raising=False)
        else:
            monkeypatch.setenv(tl.ENV_FAST_LAUNCH, value)
        assert tl._enabled_from_env() is expected
    monkeypatch.setenv(tl.ENV_FAST_LAUNCH, "yes")
    with pytest.raises(ValueError, match="VERA_KERNELS_FAST_LAUNCH='yes'"):
        tl._enabled_from_env()
    # and the variable reaches the module where the fast path reads it (at import, in a fresh process)
    code = "from vera_kernels.ops import triton_launch as tl; print(tl.ENABLED, tl._SUPPORTED)"
    for value, expected in (("0", "False True"), ("1", "True True")):
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                             env=_compiled_env(tmp_path, VERA_KERNELS_FAST_LAUNCH=value), check=False)
        assert res.returncode == 0 and res.stdout.split() == expected.split(), res.stdout + res.stderr[-2000:]


def test_interpreter_takes_the_normal_launch_with_outputs_unchanged():
    from vera_kernels.backends import triton_interpreter_on

    if not triton_interpreter_on():
        pytest.skip("runs under TRITON_INTERPRET=1 (the CPU tests' mode)")
    vt = pytest.importorskip("vera_kernels.ops.vera_triton")
    from vera_kernels.ops import triton_launch as tl

    fn = vt._scale_projection_kernel
    g = torch.Generator().manual_seed(3)
    B = torch.randn(37, 9, generator=g)
    lb, ld = torch.randn(37, generator=g), torch.randn(9, generator=g)
    args = lambda out: (B, lb, ld, out, out, out, 37, 9, B.stride(0), B.stride(1), 0, 0)  # noqa: E731
    kwargs = dict(HAS_LD=True, HAS_DLB=False, BLOCK_O=16, BLOCK_R=16)
    direct, launched = torch.full((37, 9), float("nan")), torch.full((37, 9), float("nan"))
    fn[(3,)](*args(direct), **kwargs)
    tl.launch(fn, (3,), *args(launched), **kwargs)
    torch.testing.assert_close(launched, B * lb[:, None] * ld[None, :], rtol=1e-6, atol=1e-6)
    assert torch.equal(launched, direct)
    assert tl.cached_kernels(fn) == {}  # nothing compiled, nothing kept
    # the backend's own launcher, through launch(): the same mask as the kernel launched directly
    mask = vt.dropout_keep_mask(1234, (70, 33), 0.3, torch.device("cpu"))
    ref = torch.empty((70, 33), dtype=torch.int8)
    vt._dropout_mask_kernel[(2, 3)](ref, 70, 33, torch.tensor(1234), 0.3, ROW_GROUP_LOG2=vt._row_group_log2(33),
                                    BLOCK_M=64, BLOCK_N=16)
    assert torch.equal(mask, ref.bool()) and 0 < mask.float().mean() < 1
