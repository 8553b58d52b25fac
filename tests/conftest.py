"""Shared test setup. Triton runs on the CPU through its interpreter; it must be on before triton is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
