"""pytest-benchmark cases for the model-level comparison of `python -m vera_kernels.bench` (NOT part of CI).

    PYTHONPATH=. .venv/bin/python -m pytest bench/test_bench_model.py --benchmark-only --benchmark-group-by=group

One training step (forward + backward + AdamW) of a Llama-shaped model built from a LlamaConfig with random weights
(the "tiny" preset on CPU, "llama-1b" on GPU) with every linear layer targeted: the frozen base (floor), PEFT's
VeRA, PEFT's LoRA r=16, and our reference / torch / triton backends. `extra_info` holds tokens per step and the
bytes autograd saves. Rounds run back to back (no alternation): for ratios use the CLI.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from vera_kernels.bench import impls as I
from vera_kernels.bench import presets as P
from vera_kernels.bench.measure import SavedBytesCounter, module_storage_ptrs, storage_ptrs

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEV.type == "cpu":
    torch.set_num_threads(2)
PRESET = P.MODEL_PRESETS["tiny" if DEV.type == "cpu" else "llama-1b"]
DTYPE = torch.float32 if DEV.type == "cpu" else torch.bfloat16
R = 256
IMPLS = ["base", "peft", "peft-lora", "reference", "torch", "triton"]
ROUNDS = 8 if DEV.type == "cpu" else 20

_master: list = []


def _model():
    if not _master:
        _master.append(I.build_llama(PRESET, DTYPE, DEV, seed=0))
    return _master[0]


@pytest.mark.parametrize("impl", IMPLS)
def test_model_train_step(benchmark, impl):
    reason = I.unavailable_reason(impl, DEV, explicit=False)
    if reason:
        pytest.skip(reason)
    model = I.make_variant(impl, _model(), P.LLAMA_TARGETS, R, lora_r=PRESET.lora_r)
    if impl == "base":
        I.require_grad_from_embeddings(model)
    params = I.trainable(model)
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    gen = torch.Generator(device="cpu").manual_seed(2)
    batches = [torch.randint(0, PRESET.vocab, (PRESET.batch, PRESET.seq), generator=gen).to(DEV) for _ in range(3)]
    turn = itertools.cycle(range(3))

    def step():
        ids = batches[next(turn)]
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        if opt is not None:
            opt.step()
        if DEV.type == "cuda":
            torch.cuda.synchronize()

    counter = SavedBytesCounter()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        loss = model(input_ids=batches[0], labels=batches[0]).loss
    saved = counter.bytes(module_storage_ptrs(model) | storage_ptrs(batches))
    loss.backward()
    del loss
    benchmark.group = f"model {PRESET.name} {str(DTYPE).replace('torch.', '')} {PRESET.tokens} tokens VeRA r={R}"
    benchmark.extra_info.update(impl=impl, saved_bytes=saved, tokens=PRESET.tokens)
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=2, iterations=1)
