"""Host (CPU) time of one adapted layer's forward+backward, per implementation, measured without a GPU.

A training step whose layers are small (llama-1b at batch 1 on an H100, or any 512-token step) is bound by the host:
Python, dispatch and kernel launches, not GPU time. This measures that side on tiny CPU tensors, where the device
work costs next to nothing (torch ops run their tiny CPU kernels), for the frozen base, PEFT's VeRA and our backends.
The triton backend launches as it would on a GPU (vera_kernels/ops/triton_launch.py's fast path; Triton's
JITFunction.run for the first call of each kind, or all of them with VERA_KERNELS_FAST_LAUNCH=0) with every kernel
compiled for sm_90 by a stand-in driver (the one tests/triton_compile_check.py uses) and only the final launcher call
replaced by a counter. What is left out: the driver's launch itself (cuLaunchKernel, a few us on bare metal, more in
a VM), for every implementation alike; the table counts the launches so that cost can be added (device kernels =
non-view, non-allocating aten ops + Triton launches).

``--model tiny-llama`` times a whole training step instead (forward, loss, backward) of a small Llama (2 layers,
hidden 64, every linear of every block adapted, 2 x 8 tokens) for the frozen base, PEFT's VeRA, PEFT's LoRA r=16
and our backends, with the device kernels and Triton launches of one step: what a host-bound step of a real model
pays, sharing of h between sibling layers included.

Only ratios within one run mean anything; implementations are alternated round by round, medians reported.

    python bench/host_overhead.py [--tokens 16] [--in-features 64] [--out-features 64] [--r 16] [--repeats 300]
    python bench/host_overhead.py --model tiny-llama [--r 16] [--repeats 50]
    python bench/host_overhead.py --dropout 0.1 [--model tiny-llama]   (adapter dropout, training mode)

With dropout, the torch backend's row is the CPU's, not a CUDA step's stand-in: its down node (csrc/vera_up.cpp)
drops a CPU tensor in one fused C++ pass, and a CUDA tensor with ~40 int64 aten ops per mask (on CUDA "auto" runs the
triton backend's in-kernel mask instead).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

IMPLS = ("base", "peft", "reference", "torch", "triton")
MODEL_IMPLS = ("base", "peft", "peft-lora", "reference", "torch", "triton")
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_to_copy_noop"}


class _KernelCounter(TorchDispatchMode):
    """Counts aten ops that would launch a device kernel: not views, not bare allocations."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.__name__.split(".")[0] not in _NO_KERNEL:
            self.count += 1
        return func(*args, **(kwargs or {}))


class TritonLaunchStub:
    """Makes Triton launch on CPU tensors without a GPU: a driver naming sm_90 (kernels really compile), the
    launcher call replaced by a counter, and the triton backend allowed on CPU tensors. Undone on exit."""

    def __init__(self):
        self.launches = 0

    def __enter__(self):
        from triton.compiler.compiler import CompiledKernel
        from triton.runtime import driver
        from triton_compile_check import _TargetOnlyDriver

        from vera_kernels import backends

        stub = self

        def count(gridX, gridY, gridZ, stream, function, *args):  # a launcher's parameters (triton_launch checks them)
            stub.launches += 1

        self._saved = [(CompiledKernel, "run", CompiledKernel.__dict__["run"]),
                       (CompiledKernel, "_init_handles", CompiledKernel.__dict__["_init_handles"]),
                       (backends, "triton_unavailable_reason", backends.triton_unavailable_reason)]
        CompiledKernel.run = property(lambda self: count)
        CompiledKernel._init_handles = lambda self: None
        backends.triton_unavailable_reason = lambda device: None
        self._driver = driver
        driver.set_active(_TargetOnlyDriver(90))
        return self

    def __exit__(self, *exc):
        for owner, name, value in self._saved:
            setattr(owner, name, value)
        self._driver.set_active(None)
        return False


def build(impl: str, fin: int, fout: int, r: int, dropout: float = 0.0) -> torch.nn.Module:
    from vera_kernels.bench import impls as I

    master = I.LayerStack([(fin, fout)], torch.float32, torch.device("cpu"), seed=0)
    return I.make_variant(impl, master, ["l0"], r, dropout=dropout).train()


def measure(tokens: int, fin: int, fout: int, r: int, repeats: int, impls=IMPLS, dropout: float = 0.0) -> list[dict]:
    """One row per implementation: median host us of forward + backward (x requires grad), kernels per call."""
    torch.manual_seed(0)
    with TritonLaunchStub() as stub:
        layers = {impl: build(impl, fin, fout, r, dropout) for impl in impls}
        calls = {impl: _layer_call(layers[impl], impl) for impl in impls}
        x = torch.randn(tokens, fin, requires_grad=True)
        gy = torch.randn(tokens, fout)  # a dense upstream gradient, as a next layer would pass

        def step(impl):
            calls[impl](x).backward(gy)

        return _alternate(step, impls, repeats, stub)


def tiny_llama(r: int):
    """The model case: a 2-layer Llama (hidden 64, intermediate 160, 4 heads) with random weights, frozen."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=256, max_position_embeddings=64, use_cache=False,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.requires_grad_(False)
    return model.train()


def measure_model(r: int, repeats: int, impls=MODEL_IMPLS, batch: int = 2, seq: int = 8,
                  dropout: float = 0.0) -> list[dict]:
    """One row per implementation: median host us of one training step (forward, loss, backward) of the tiny
    Llama with every linear adapted; the base's backward runs from its embeddings' output (requires grad)."""
    from vera_kernels.bench import impls as I

    with TritonLaunchStub() as stub:
        master = tiny_llama(r)
        models = {impl: I.make_variant(impl, master, LLAMA_TARGETS, r, lora_r=16, dropout=dropout).train()
                  for impl in impls}
        if "base" in models:
            I.require_grad_from_embeddings(models["base"])
        ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(1))

        def step(impl):
            models[impl](input_ids=ids).logits.float().square().mean().backward()

        return _alternate(step, impls, repeats, stub)


def _alternate(step, impls, repeats: int, stub) -> list[dict]:
    """Counts one call's kernels and launches per implementation, then times ``repeats`` alternated rounds."""
    counts = {}
    for impl in impls:
        step(impl)  # compiles (triton) and creates the .grad tensors
        before = stub.launches
        with _KernelCounter() as kc:
            step(impl)
        counts[impl] = (kc.count, stub.launches - before)
    times = {impl: [] for impl in impls}
    for _ in range(max(1, repeats // 10)):
        for impl in impls:
            step(impl)
    for _ in range(repeats):
        for impl in impls:  # alternate A, B, C, ... every round
            t0 = time.perf_counter()
            step(impl)
            times[impl].append(time.perf_counter() - t0)
    base = statistics.median(times["base"]) if "base" in times else None
    peft = statistics.median(times["peft"]) if "peft" in times else None
    rows = []
    for impl in impls:
        med = statistics.median(times[impl])
        rows.append(dict(impl=impl, us=med * 1e6, x_base=med / base if base else None,
                         x_peft=med / peft if peft else None, aten_kernels=counts[impl][0],
                         triton_launches=counts[impl][1]))
    return rows


def _layer_call(variant, impl):
    from vera_kernels.bench import impls as I

    return I.inner_module(variant, impl, "l0")


def format_table(rows: list[dict], header: str, what: str = "fwd+bwd us") -> str:
    out = [header, f"{'impl':<10} {what:>10} {'x base':>7} {'x PEFT':>7} {'aten kernels':>12} "
                   f"{'triton launches':>15}"]
    for r in rows:
        xb = f"{r['x_base']:.2f}" if r["x_base"] else "-"
        xp = f"{r['x_peft']:.2f}" if r["x_peft"] else "-"
        out.append(f"{r['impl']:<10} {r['us']:>10.1f} {xb:>7} {xp:>7} {r['aten_kernels']:>12} "
                   f"{r['triton_launches']:>15}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--in-features", type=int, default=64)
    ap.add_argument("--out-features", type=int, default=64)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--impls", help=f"comma-separated (default {','.join(IMPLS)}; with --model also peft-lora)")
    ap.add_argument("--model", choices=["tiny-llama"], help="time a whole training step of this model instead")
    ap.add_argument("--dropout", type=float, default=0.0,
                    help="adapter dropout (PEFT's vera_dropout / lora_dropout, ours): the triton backend's fused-mask "
                         "down node, the torch backend's counter-based mask (on CPU tensors one fused C++ pass, "
                         "not aten ops: a CUDA step runs ~40 aten ops per mask there)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        ap.error("unset TRITON_INTERPRET: this measures Triton's compiled-kernel launch path, not the interpreter")
    import triton

    torch.set_num_threads(1)
    # the stubbed launches leave their outputs unwritten; CPU matmuls on whatever bits are there must not hit the
    # (100x slower) denormal path
    torch.set_flush_denormal(True)
    versions = f"triton {triton.__version__}, torch {torch.__version__}; medians of {args.repeats} alternated rounds"
    with contextlib.redirect_stderr(sys.stdout):
        if args.model:
            impls = tuple(args.impls.split(",")) if args.impls else MODEL_IMPLS
            rows = measure_model(args.r, args.repeats, impls, dropout=args.dropout)
            header = (f"host time per training step of a 2-layer Llama (hidden 64, every linear adapted, 2x8 tokens, "
                      f"r={args.r}; LoRA r=16; dropout {args.dropout}; {versions})")
            table = format_table(rows, header, "step us")
        else:
            impls = tuple(args.impls.split(",")) if args.impls else IMPLS
            rows = measure(args.tokens, args.in_features, args.out_features, args.r, args.repeats, impls,
                           dropout=args.dropout)
            header = (f"host time per adapted-layer call (fwd+bwd, CPU tensors {args.tokens}x{args.in_features}->"
                      f"{args.out_features}, r={args.r}; dropout {args.dropout}; {versions})")
            table = format_table(rows, header)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(header=header, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
