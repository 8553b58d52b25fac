"""`make gpu-carry`: a trimmed copy of the installed bitsandbytes in .gpu_carry/site, for GPU machines without it.

The GPU image has no bitsandbytes and no package registry, so `make gpu-check` cannot time our CUDA dequantization
against bitsandbytes' there unless a copy travels with the checkout. This copies the package (Python files, its
dist-info) with only the native libraries a CUDA 13 torch loads (about 10 MB of the wheel's 125 MB, under the device
tool's carry limit). gpu-check puts .gpu_carry/site on its dequantization worker's path when the folder exists; run
the device command with carry [".gpu_carry"].

    python bench/gpu_carry.py [--cuda-prefix cuda13] [--dest .gpu_carry/site]
"""

from __future__ import annotations

import argparse
import shutil
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEST = ROOT / ".gpu_carry" / "site"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cuda-prefix", default="cuda13", help="keep libbitsandbytes_<prefix>*.so (and the CPU one)")
    ap.add_argument("--dest", type=Path, default=DEST)
    args = ap.parse_args(argv)
    dest = args.dest.resolve()
    import bitsandbytes

    src = Path(bitsandbytes.__file__).parent
    keep = (f"libbitsandbytes_{args.cuda_prefix}", "libbitsandbytes_cpu")

    def ignore(_folder, names):
        return [n for n in names if n == "__pycache__" or (n.endswith(".so") and not n.startswith(keep))]

    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest / "bitsandbytes", ignore=ignore)
    dist = metadata.distribution("bitsandbytes")
    info = Path(dist._path)  # the .dist-info folder (importlib.metadata.version("bitsandbytes") reads it)
    shutil.copytree(info, dest / info.name)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    libs = sorted(p.name for p in (dest / "bitsandbytes").glob("*.so"))
    print(f"gpu-carry: bitsandbytes {bitsandbytes.__version__} -> {dest} "
          f"({size / 2**20:.1f} MiB; {', '.join(libs)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
