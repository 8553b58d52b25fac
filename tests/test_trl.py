"""TRL's SFTTrainer with a patched model and no line beyond patch_model (issue 14): plain and bitsandbytes nf4.

* the loss curve equals PEFT's VeRA through the same SFTTrainer setup (SFTConfig's defaults: gradient checkpointing,
  TRL's fused LM head and its own loss; a text dataset tokenized by SFTTrainer), bit for bit with backend="reference",
  within 1e-6 with backend="torch";
* on a quantized base, SFTTrainer casts every trainable parameter to bf16 (QLoRA's recipe): our lambdas are cast as
  PEFT's would be, and still train: every lambda changes, the loss stays within 1e-3 of PEFT's run with float32
  lambdas and the lambdas within STEPS + 1 bf16 roundings of its (PEFT's VeRA itself fails on bf16 lambdas);
* the checkpoint folder holds a PEFT adapter that PeftModel.from_pretrained loads with the trained lambdas.
"""

from __future__ import annotations


import peft
import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

import vera_kernels as vk
from helpers import assert_tensors_equal, quiet, save_nf4_llama, trainer_base_model

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

CFG = dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False, projection_prng_key=3)
STEPS, VOCAB = 4, 128


def tokenizer():
    """A word-level tokenizer over tiny_llama's 128 ids, built offline: "<pad>" 0, "<eos>" 1, "w2".."w127"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def text_dataset(n: int = 8):
    """Lines of 3 to 9 words: batches need padding, which SFTTrainer's collator masks out of the loss."""
    gen = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(n):
        length = int(torch.randint(3, 10, (1,), generator=gen))
        lines.append(" ".join(f"w{int(i)}" for i in torch.randint(2, VOCAB, (length,), generator=gen)))
    return datasets.Dataset.from_dict({"text": lines})


def sft(model, out):
    """A short SFTTrainer run (SFTConfig's defaults otherwise, bf16 off: a CPU run); per-step losses, trainer."""
    from transformers import TrainerCallback

    losses = []

    class Log(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    args = trl.SFTConfig(str(out), per_device_train_batch_size=2, max_steps=STEPS, learning_rate=1e-2,
                         logging_steps=1, save_strategy="steps", save_steps=STEPS, report_to=[], use_cpu=True,
                         bf16=False, disable_tqdm=True, seed=0, data_seed=0, log_level="error", dataset_num_proc=None)
    trainer = quiet(trl.SFTTrainer, model=model, args=args, train_dataset=text_dataset(),
                    processing_class=tokenizer(), callbacks=[Log()])
    quiet(trainer.train)
    return losses, trainer


@pytest.fixture(scope="module")
def nf4_base(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    return save_nf4_llama(tmp_path_factory.mktemp("llama"))


def lambdas(model) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "vera_lambda" in k}


@pytest.mark.parametrize("kind,backend", [("plain", "reference"), ("plain", "torch"), ("nf4", "reference")])
def test_sft_trainer_matches_peft(kind, backend, tmp_path, request):
    nf4 = request.getfixturevalue("nf4_base") if kind == "nf4" else None
    torch.manual_seed(1)
    peft_base = trainer_base_model(kind, nf4)
    pm = quiet(peft.get_peft_model, peft_base, peft.VeraConfig(**CFG))
    if kind == "nf4":
        # PEFT's VeRA cannot run SFTTrainer's QLoRA cast: bf16 lambdas against its float32 vera_A raise "expected m1
        # and m2 to have the same dtype" in the first forward. Its reference run keeps float32 lambdas (the mark
        # SFTTrainer reads is hidden from it; transformers' own quantization check reads hf_quantizer).
        peft_base.is_loaded_in_4bit = False
    want, _ = sft(pm, tmp_path / "peft")
    torch.manual_seed(1)
    om = vk.patch_model(trainer_base_model(kind, nf4), CFG, backend=backend)
    before = lambdas(om)
    got, trainer = sft(om, tmp_path / "ours")
    assert len(got) == STEPS and all(torch.isfinite(torch.tensor(got)))
    after = lambdas(om)
    assert all(not torch.equal(after[k], before[k]) for k in after), "some lambda did not train"
    ours_sd = vk.get_vera_state_dict(om)
    peft_sd = {k: v.detach() for k, v in get_peft_model_state_dict(pm).items()}
    if kind == "plain" and backend == "reference":
        assert got == want, "loss curve differs from PEFT's"
        assert_tensors_equal(ours_sd, peft_sd, "vs PEFT")
    elif kind == "plain":
        assert max(abs(g - w) for g, w in zip(got, want)) <= 1e-6, (got, want)
        for k, v in peft_sd.items():
            torch.testing.assert_close(ours_sd[k], v, rtol=0, atol=1e-6, msg=k)
    else:
        # SFTTrainer cast our lambdas to bf16 and AdamW steps them there: each step rounds them (bf16: 8 significant
        # bits), so they stay within STEPS + 1 roundings of PEFT's float32 ones; the loss within bf16's tolerance.
        assert {v.dtype for v in after.values()} == {torch.bfloat16}
        assert max(abs(g - w) for g, w in zip(got, want)) < 1e-3, (got, want)
        for k, v in peft_sd.items():
            if "vera_lambda" in k:
                err = (ours_sd[k].float() - v).abs()
                assert bool((err <= (STEPS + 1) * 2.0 ** -8 * v.abs()).all()), (k, float(err.max()))
    ck = tmp_path / "ours" / f"checkpoint-{STEPS}"
    saved = load_file(ck / "adapter_model.safetensors")
    assert_tensors_equal(saved, ours_sd, "checkpoint")
    loaded = quiet(PeftModel.from_pretrained, trainer_base_model(kind, nf4), ck)
    assert_tensors_equal({k: v.detach().to(saved[k].dtype) for k, v in get_peft_model_state_dict(loaded).items()},
                         saved, "PEFT-loaded")
