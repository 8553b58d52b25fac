"""What machine a run measured: CPU/GPU names, core and thread counts, library versions."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Optional

import torch

_FLAGS = {"avx512f": "AVX-512", "avx512_bf16": "AVX512-bf16", "amx_bf16": "AMX-bf16", "amx_tile": "AMX-tile"}


def _cpuinfo() -> tuple[str, list[str]]:
    name, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = [v for k, v in _FLAGS.items() if k in have]
                    break
    except OSError:
        pass
    return name or "unknown CPU", flags


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def loadavg() -> Optional[list]:
    """The 1, 5 and 15 minute load averages (other processes competing for the cores show up here)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info(device: torch.device, timing: str) -> dict:
    import vera_kernels

    cpu, flags = _cpuinfo()
    info = {
        "device": device.type,
        "cpu": cpu,
        "cpu_flags": flags,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu": None,
        "gpu_memory_bytes": None,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "timing": timing,
        "versions": {
            "torch": torch.__version__,
            "triton": _version("triton"),
            "transformers": _version("transformers"),
            "peft": _version("peft"),
            "vera_kernels": getattr(vera_kernels, "__version__", None),
        },
    }
    from vera_kernels._dtypes import adapter_compute_dtype

    # the torch backend's branch dtype for a bf16 model on this CPU (bf16 where the CPU multiplies it natively)
    info["cpu_bf16_branch"] = str(adapter_compute_dtype("torch", torch.bfloat16, "cpu")).replace("torch.", "")
    info["loadavg"] = {"start": loadavg(), "end": None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_bytes"] = int(props.total_memory)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
    return info
