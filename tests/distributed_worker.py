"""One rank of tests/test_distributed.py: trains a patched tiny Llama under each wrapper in turn (DDP, FSDP2 per block
with and without a bf16 MixedPrecisionPolicy, FSDP1, accelerate MULTI_CPU) on its half of each global batch, saves the
adapter with vk.save_adapter (every rank calls, rank 0 writes), restores it into a fresh wrapped model
(vk.checkpoint.restore_adapter, Trainer's resume path) and writes what it saw for the test to check."""

from __future__ import annotations

import datetime
import os
import traceback
import warnings

import torch
import torch.distributed as dist

CFG = dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False, projection_prng_key=5)
STEPS, PER_RANK, LENGTH, LR = 3, 2, 6, 20.0
SCENARIOS = ["ddp", "fsdp2", "fsdp2-bf16", "fsdp1", "accelerate"]


def global_batch(step: int, world: int) -> torch.Tensor:
    return torch.randint(0, 128, (PER_RANK * world, LENGTH), generator=torch.Generator().manual_seed(100 + step))


def fresh_model():
    import vera_kernels as vk
    from helpers import tiny_llama

    torch.manual_seed(1)
    return vk.patch_model(tiny_llama(0), CFG, backend="torch")


def train(model, batches, rank_rows=slice(None), backward=None):
    """SGD on the lambdas (Adam would amplify rounding where a gradient is near zero); per-rank rows of each batch."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for ids in batches:
        ids = ids[rank_rows]
        loss = model(input_ids=ids, labels=ids).loss
        (backward or torch.Tensor.backward)(loss)
        opt.step()
        opt.zero_grad()
    return model


def wrap(kind: str, model):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    if kind == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if kind.startswith("fsdp2"):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if "bf16" in kind else \
            MixedPrecisionPolicy()
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    if kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        # frozen and trainable parameters in one unit need use_orig_params=True (as for PEFT)
        return FSDP(model, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}), use_orig_params=True,
                    device_id=torch.device("cpu"))
    raise ValueError(kind)


def scenario(kind: str, rank: int, world: int, out: str) -> None:
    import vera_kernels as vk
    from vera_kernels.checkpoint import restore_adapter

    batches = [global_batch(s, world) for s in range(STEPS)]
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    folder = os.path.join(out, kind)
    if kind == "accelerate":
        from accelerate import Accelerator
        from accelerate.utils import DistributedType

        acc = Accelerator(cpu=True)
        assert acc.distributed_type == DistributedType.MULTI_CPU and acc.num_processes == world, acc.state
        model = fresh_model()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
        wrapped, opt = acc.prepare(model, opt)
        for ids in batches:
            loss = wrapped(input_ids=ids[rows], labels=ids[rows]).loss
            acc.backward(loss)
            opt.step()
            opt.zero_grad()
        acc.wait_for_everyone()
        vk.save_adapter(wrapped, folder)  # the DDP-wrapped model accelerate hands back
        vk.save_adapter(acc.unwrap_model(wrapped), folder + "-unwrapped", is_main_process=acc.is_main_process)
        state = vk.get_vera_state_dict(wrapped)
    else:
        wrapped = train(wrap(kind, fresh_model()), batches, rows)
        vk.save_adapter(wrapped, folder)
        state = vk.get_vera_state_dict(wrapped)
        dist.barrier()
        # Trainer's resume: the checkpoint copied into a fresh wrapped model's adapter, in place
        other = wrap(kind, fresh_model())
        if kind != "ddp":  # FSDP: one step so the parameters are in their steady (sharded) state
            train(other, batches[:1], rows)
        params = [id(p) for p in other.parameters()]
        restore_adapter(other, folder)
        assert [id(p) for p in other.parameters()] == params
        restored = vk.get_vera_state_dict(other)
        assert restored.keys() == state.keys()
        for k in state:
            assert torch.equal(restored[k], state[k]), f"{kind}: restore_adapter: {k} differs"
    if rank == 0:
        torch.save(state, os.path.join(out, f"{kind}.pt"))


def main(rank: int, world: int, port: int, out: str) -> None:
    warnings.simplefilter("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        for kind in SCENARIOS:
            try:
                scenario(kind, rank, world, out)
            except Exception:
                with open(os.path.join(out, f"{kind}.rank{rank}.error"), "w") as f:
                    f.write(traceback.format_exc())
                raise
            dist.barrier()
    finally:
        dist.destroy_process_group()
