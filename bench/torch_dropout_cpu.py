"""The torch backend's adapter dropout on the CPU: one layer's fwd+bwd for PEFT's VeRA, the torch backend (its C++
down node, whose dropout is one fused pass: csrc/vera_up.cpp dropout_apply) and the torch backend with the Python
down node (vera_torch.VeraDownFunction: the mask as int64 tensor ops), alternated round by round, medians.

    python bench/torch_dropout_cpu.py [--tokens 1024] [--in-features 2048] [--out-features 2048] [--r 256]
                                      [--dropout 0.1] [--repeats 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--in-features", type=int, default=2048)
    ap.add_argument("--out-features", type=int, default=2048)
    ap.add_argument("--r", type=int, default=256)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from vera_kernels.bench import impls as I
    from vera_kernels.ops import vera_torch as VT

    master = I.LayerStack([(args.in_features, args.out_features)], torch.float32, torch.device("cpu"), seed=0)
    variants = {"peft": "peft", "torch": "torch", "torch (Python mask)": "torch"}
    mods = {k: I.inner_module(I.make_variant(b, master, ["l0"], args.r, dropout=args.dropout).train(), b, "l0")
            for k, b in variants.items()}
    x = torch.randn(args.tokens, args.in_features, requires_grad=True)
    g = torch.randn(args.tokens, args.out_features)
    native_down, python_down = VT.apply_down, VT._apply(VT.VeraDownFunction)

    def step(k):
        VT.apply_down = python_down if k == "torch (Python mask)" else native_down
        try:
            t0 = time.perf_counter()
            mods[k](x).backward(g)
            return time.perf_counter() - t0
        finally:
            VT.apply_down = native_down

    times = {k: [] for k in mods}
    for k in mods:
        step(k)  # warm-up (the C++ build, first allocations)
    for _ in range(args.repeats):
        for k in mods:
            times[k].append(step(k))
    peft = statistics.median(times["peft"])
    print(f"one layer fwd+bwd, {args.tokens} tokens, {args.in_features}->{args.out_features}, r={args.r}, "
          f"dropout {args.dropout}, fp32, {args.threads} thread(s), medians of {args.repeats} alternated rounds")
    for k, v in times.items():
        m = statistics.median(v)
        print(f"  {k:<20} {m * 1e3:9.1f} ms   x PEFT {m / peft:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
