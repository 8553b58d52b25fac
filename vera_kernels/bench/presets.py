"""What the benchmark runs by default: layer suites per device, model presets, the training-run model.

Everything here is data; ``cli.py`` turns options into a plan from it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

# Every linear layer of a Llama block: the benchmark targets them all (PEFT's VeRA and LoRA, and ours).
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPE_ALIASES = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
}


@dataclass(frozen=True)
class LayerSuite:
    """Layer-level cases: every (in, out) shape lives in ONE module, so VeRA's shared A/B are sized
    (r, max in) and (max out, r) as PEFT would size them for that module; each layer is then timed on its own."""

    shapes: tuple[tuple[int, int], ...]
    tokens: tuple[int, ...]  # first value is the primary one; the others are swept at the primary r
    r: tuple[int, ...]  # first value is the primary one; the others are swept at the primary tokens
    dtypes: tuple[str, ...]
    repeats: int
    warmup: int


@dataclass(frozen=True)
class ModelPreset:
    """A Llama-shaped model built from a transformers LlamaConfig with random weights (nothing is downloaded)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int
    repeats: int
    warmup: int
    lora_r: int = 16
    note: str = ""

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def shape(self) -> str:
        """The rows' ``shape`` field: the model's sizes and batch x sequence."""
        return (f"h{self.hidden} i{self.intermediate} L{self.layers} H{self.heads}/{self.kv_heads} V{self.vocab} "
                f"{self.batch}x{self.seq}")

    def describe(self) -> str:
        return (f"{self.name}: Llama, hidden {self.hidden}, intermediate {self.intermediate}, {self.layers} layers, "
                f"{self.heads} heads ({self.kv_heads} kv), vocab {self.vocab}, batch {self.batch} x seq {self.seq}")


@dataclass(frozen=True)
class TrainPreset:
    """The short training run: ours against PEFT, same seed, same fixed synthetic data, float32."""

    model: ModelPreset
    steps: int
    lr: float
    n_batches: int  # the fixed dataset: this many batches, cycled


# ---------------------------------------------------------------------------------------------- layer suites
# Issue 2 (CPU): 1024 tokens, r=256, 2048x2048 and 2048x5632, fp32 and bf16, 2 threads.
CPU_LAYERS = LayerSuite(shapes=((2048, 2048), (2048, 5632)), tokens=(1024,), r=(256,), dtypes=("fp32", "bf16"),
                        repeats=21, warmup=2)
CPU_LAYERS_QUICK = LayerSuite(shapes=((512, 512), (512, 1376)), tokens=(256,), r=(64,), dtypes=("fp32", "bf16"),
                              repeats=3, warmup=1)
# Issue 3 (GPU, bf16): 4096x4096 and 4096x11008 at 8192 tokens and r=256, plus r=64, r=1024 and 512 tokens.
CUDA_LAYERS = LayerSuite(shapes=((4096, 4096), (4096, 11008)), tokens=(8192, 512), r=(256, 64, 1024),
                         dtypes=("bf16",), repeats=20, warmup=3)
CUDA_LAYERS_QUICK = replace(CUDA_LAYERS, repeats=7, warmup=2)


def layer_suite(device_type: str, quick: bool) -> LayerSuite:
    if device_type == "cuda":
        return CUDA_LAYERS_QUICK if quick else CUDA_LAYERS
    return CPU_LAYERS_QUICK if quick else CPU_LAYERS


# ---------------------------------------------------------------------------------------------- model presets
MODEL_PRESETS: dict[str, ModelPreset] = {
    # CPU: a few seconds per implementation at 2 threads.
    "tiny": ModelPreset("tiny", hidden=512, intermediate=1376, layers=4, heads=8, kv_heads=8, vocab=4096,
                        batch=2, seq=256, repeats=9, warmup=2, note="CPU preset"),
    # GPU: TinyLlama-1.1B's shape (hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 kv heads, vocab 32000).
    "llama-1b": ModelPreset("llama-1b", hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4,
                            vocab=32000, batch=1, seq=2048, repeats=10, warmup=3, note="GPU preset, ~1.1B params"),
    # GPU: a few decoder layers of Llama-7B's shape.
    "llama-7b-layers": ModelPreset("llama-7b-layers", hidden=4096, intermediate=11008, layers=4, heads=32,
                                   kv_heads=32, vocab=32000, batch=1, seq=2048, repeats=10, warmup=3,
                                   note="GPU preset, 4 layers of Llama-7B shape"),
}
# --quick shrinks the CPU preset; GPU presets keep their shapes (the goals are stated at those shapes), fewer repeats.
TINY_QUICK = ModelPreset("tiny", hidden=256, intermediate=688, layers=2, heads=4, kv_heads=4, vocab=1024,
                         batch=2, seq=64, repeats=3, warmup=1, note="CPU preset (quick)")


def model_preset(name: str, quick: bool) -> ModelPreset:
    preset = MODEL_PRESETS[name]
    if quick:
        if name == "tiny":
            return TINY_QUICK
        return replace(preset, repeats=5, warmup=2)
    return preset


TRAIN_MODEL = ModelPreset("train-tiny", hidden=256, intermediate=688, layers=2, heads=4, kv_heads=4, vocab=512,
                          batch=4, seq=64, repeats=0, warmup=0)
TRAIN = TrainPreset(TRAIN_MODEL, steps=30, lr=5e-3, n_batches=4)
TRAIN_QUICK = TrainPreset(TRAIN_MODEL, steps=8, lr=5e-3, n_batches=4)

# Per-case wall-clock cap (seconds) on the timed rounds: after at least MIN_ROUNDS rounds, a case stops early
# once it has used this much time, so no preset can run away on a slow or busy machine.
CASE_TIME_CAP_S = {"cpu": 30.0, "cuda": 15.0}
MIN_ROUNDS = 3


# ---------------------------------------------------------------------------------------------- mixed-adapter batches
# ``--cases mixed``: one batch of ``batch`` rows whose rows run 1, 8 or 64 distinct adapters (vk.adapter_batch /
# PEFT LoRA's adapter_names), every linear layer targeted. The model holds MIXED_ADAPTERS[-1] adapters throughout;
# only the rows' assignment changes between the counts. Small sequences: what matters is the per-row adapter work.
MIXED_ADAPTERS = (1, 8, 64)
MIXED_PRESETS = {
    "cpu": ModelPreset("mixed-cpu", hidden=512, intermediate=1376, layers=2, heads=8, kv_heads=8, vocab=1024,
                       batch=64, seq=8, repeats=7, warmup=2, note="CPU preset, 64 rows x 8 tokens"),
    "cuda": ModelPreset("mixed-gpu", hidden=2048, intermediate=5632, layers=4, heads=32, kv_heads=4, vocab=32000,
                        batch=64, seq=128, repeats=10, warmup=3, note="GPU preset, TinyLlama's width, 4 layers, "
                        "64 rows x 128 tokens"),
}
MIXED_QUICK = {
    "cpu": ModelPreset("mixed-cpu-quick", hidden=128, intermediate=344, layers=1, heads=4, kv_heads=4, vocab=256,
                       batch=64, seq=4, repeats=3, warmup=1, note="CPU preset (quick), 64 rows x 4 tokens"),
    "cuda": replace(MIXED_PRESETS["cuda"], repeats=5, warmup=2),
}


def mixed_preset(device_type: str, quick: bool) -> ModelPreset:
    key = "cuda" if device_type == "cuda" else "cpu"
    return (MIXED_QUICK if quick else MIXED_PRESETS)[key]
