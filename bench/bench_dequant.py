"""Dequantization throughput of vera_kernels' native extension against bitsandbytes (see
vera_kernels/bench/dequant.py); the same numbers appear in ``python -m vera_kernels.bench``'s "dequant" case.

    python bench/bench_dequant.py [--device cpu|cuda] [--sizes 4096x4096,11008x4096] [--repeats 10]
                                  [--formats nf4,nf4-nested,fp4,int8] [--out-dtypes bf16,fp32] [--torch-fallback]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python bench/bench_dequant.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vera_kernels.bench.dequant import DEFAULT_FORMATS, DEFAULT_SIZES, _DTYPE_NAMES, format_table, run  # noqa: E402
from vera_kernels.quant import dequant as D  # noqa: E402


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        r, c = item.lower().split("x")
        out.append((int(r), int(c)))
    return out


def machine_description(device="cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch threads={torch.get_num_threads()} (torch {torch.__version__})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default=",".join(f"{r}x{c}" for r, c in DEFAULT_SIZES))
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--formats", default=",".join(DEFAULT_FORMATS))
    ap.add_argument("--out-dtypes", default="bf16,fp32")
    ap.add_argument("--torch-fallback", action="store_true", help="also time the pure-PyTorch implementation")
    args = ap.parse_args(argv)
    names = {v: k for k, v in _DTYPE_NAMES.items()}
    out_dtypes = [names[x] for x in args.out_dtypes.split(",")]
    impls = ("vera-native", "vera-torch") if args.torch_fallback else ("vera-native",)
    print(f"machine: {machine_description(args.device)}")
    print(f"native : {D.native_status()}")
    results = run(args.device, _parse_sizes(args.sizes), args.repeats, args.formats.split(","), out_dtypes, impls)
    print(format_table(results))
    return 0 if all(r["bitexact_vs_bnb"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
