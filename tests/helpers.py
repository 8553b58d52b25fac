"""Shared test helpers: tiny transformers models, PEFT name mapping, the float64 VeRA formula, dtype-aware
comparisons, and a snapshot of everything a failing call must leave untouched."""

from __future__ import annotations

import copy
import importlib.util
import warnings
import zlib
from typing import Optional

import torch

import vera_kernels as vk

# ---------------------------------------------------------------------------------------------- backends
HAS_TRITON_BACKEND = importlib.util.find_spec("vera_kernels.ops.vera_triton") is not None
# Op-level backends (extend here when a backend lands).
BACKENDS = ["reference", "torch"] + (["triton"] if HAS_TRITON_BACKEND else [])
# Model-level parity runs every backend too; triton goes through the (slow) interpreter on CPU, so model-level
# triton cases are kept to the main parity test only.
MODEL_BACKENDS = ["reference", "torch"]

PEFT_PREFIX = "base_model.model."


def strip_peft(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


# ---------------------------------------------------------------------------------------------- tiny models
def tiny_llama(seed: int = 0, **overrides):
    """A 2-layer Llama with odd sizes: q/o 40->40, k/v 40->20, gate/up 40->52, down 52->40 (untied lm_head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(hidden_size=40, intermediate_size=52, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    kw.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**kw)).eval()


def tiny_gpt2(seed: int = 0, random_biases: bool = True, **overrides):
    """A 2-layer GPT-2 (Conv1D layers: c_attn 36->108, c_proj 36->36, c_fc 36->144, mlp.c_proj 144->36).

    Dropouts are off (GPT-2 has dropout in train mode) and the biases, zero at init, are made random so bias
    handling can fail a test."""
    from transformers import GPT2Config, GPT2LMHeadModel

    kw = dict(n_embd=36, n_layer=2, n_head=4, vocab_size=128, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
              attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**kw)).eval()
    if random_biases:
        gen = torch.Generator().manual_seed(seed + 1000)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(".bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def _seq_cls(config_cls, model_cls, seed: int, overrides: dict, **kw):
    kw.update(num_labels=3, vocab_size=128, max_position_embeddings=64)
    kw.update(overrides)
    torch.manual_seed(seed)
    return model_cls(config_cls(**kw)).eval()


def tiny_bert_cls(seed: int = 0, **overrides):
    """A 2-layer BertForSequenceClassification (hidden 32, intermediate 44, 3 labels; head: `classifier`, a Linear)."""
    from transformers import BertConfig, BertForSequenceClassification

    return _seq_cls(BertConfig, BertForSequenceClassification, seed, overrides, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=44, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0)


def tiny_roberta_cls(seed: int = 0, **overrides):
    """A 2-layer RobertaForSequenceClassification (head: `classifier`, a module holding `dense` and `out_proj`)."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    return _seq_cls(RobertaConfig, RobertaForSequenceClassification, seed, overrides, hidden_size=32,
                    num_hidden_layers=2, num_attention_heads=4, intermediate_size=44, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0, pad_token_id=1)


def tiny_llama_cls(seed: int = 0, **overrides):
    """tiny_llama's sizes as LlamaForSequenceClassification (head: `score`, a Linear without bias)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    return _seq_cls(LlamaConfig, LlamaForSequenceClassification, seed, overrides, hidden_size=40, intermediate_size=52,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
# Targets that give layers of different in/out sizes (so A/B slicing matters).
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}


def quiet(fn, *args, **kw):
    """fn(*args, **kw) with warnings silenced (transformers' and PEFT's chatter in training tests)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


def save_nf4_llama(path) -> str:
    """Save a tiny Llama (hidden 64, intermediate 128) to ``path`` for loading as a bitsandbytes nf4 model."""
    quiet(tiny_llama(0, hidden_size=64, intermediate_size=128).save_pretrained, path)
    return str(path)


def trainer_base_model(kind: str, nf4_path=None):
    """The base model of the Trainer/TRL tests: the tiny Llama ("plain") or the one in ``nf4_path`` loaded in 4 bits
    (nf4, float32 compute) on the CPU ("nf4")."""
    if kind == "plain":
        return tiny_llama(0)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return quiet(AutoModelForCausalLM.from_pretrained, nf4_path, quantization_config=q, device_map="cpu",
                 dtype=torch.float32)


def token_ids(seed: int = 0, batch: int = 2, length: int = 7, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def make_pair(arch: str, config_kwargs: dict, backend: str = "reference", seed: int = 0, lambda_seed: int = 1,
              base=None):
    """(base model, PEFT model, our patched model) built from the same base with the same RNG state, so that
    init_weights=False lambdas are equal. Each side gets its own config object (PEFT mutates its config)."""
    import peft

    base = BUILDERS[arch](seed) if base is None else base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(lambda_seed)
        pm = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(**config_kwargs))
        torch.manual_seed(lambda_seed)
        om = vk.patch_model(copy.deepcopy(base), peft.VeraConfig(**config_kwargs), backend=backend)
    return base, pm, om


def find_projections(model) -> "vk.VeraProjections":
    return next(m for m in model.modules() if isinstance(m, vk.VeraProjections))


def peft_projections(peft_model, adapter: str = "default"):
    return peft_model.base_model.vera_A[adapter], peft_model.base_model.vera_B[adapter]


def trainable_names(model) -> set[str]:
    return {strip_peft(n) for n, p in model.named_parameters() if p.requires_grad}


def lambda_params(model) -> dict[str, torch.nn.Parameter]:
    return {strip_peft(n): p for n, p in model.named_parameters() if ".vera_lambda_" in n}


def set_random_lambdas(model, seed: int = 0, adapter: Optional[str] = None) -> None:
    """Every lambda gets random values that depend only on (seed, its name without PEFT's prefix): applied to a PEFT
    model and ours, both get the same values. lambda_b is kept away from 0 (some checks divide by it)."""
    with torch.no_grad():
        for name, p in lambda_params(model).items():
            if adapter is not None and not name.endswith("." + adapter):
                continue
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            v = torch.randn(p.shape, generator=gen)
            if ".vera_lambda_b." in name:
                v = v.sign() * (0.5 + v.abs())
            p.copy_(v)


def random_output_weights(shape, seed: int = 123) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def logits(model, ids) -> torch.Tensor:
    out = model(ids).logits
    assert torch.isfinite(out).all()
    return out


# ---------------------------------------------------------------------------------------------- the formula
from vera_kernels.ops.reference import vera_formula  # noqa: E402,F401  (the yardstick lives with the op)


def f64_leaf(t: Optional[torch.Tensor], requires_grad: bool = True) -> Optional[torch.Tensor]:
    if t is None:
        return None
    return t.detach().to(torch.float64).requires_grad_(requires_grad)


# ---------------------------------------------------------------------------------------------- comparisons
# (dtype, atol, rtol, C): an op's error vs float64 must be <= C * (a plain PyTorch implementation's error in that
# dtype vs float64) + atol + rtol * |reference|. For fp32/fp64 the plain error is tiny and atol/rtol dominate.
DTYPE_ROWS = [
    (torch.float32, 2e-5, 2e-5, 4.0),
    (torch.float16, 2e-3, 2e-3, 4.0),
    (torch.bfloat16, 1e-2, 1e-2, 4.0),
]
TOL = {row[0]: row[1:] for row in DTYPE_ROWS}
TOL[torch.float64] = (1e-5, 1e-5, 4.0)  # lambdas and projections are float32: float32 accuracy is the bar


def assert_close_f64(actual: torch.Tensor, ref64: torch.Tensor, plain: Optional[torch.Tensor], dtype: torch.dtype,
                     what: str = "") -> None:
    """``actual`` is within the dtype's tolerance of the float64 reference ``ref64``, judged against ``plain`` (the
    same quantity computed by plain PyTorch in ``dtype``)."""
    assert actual is not None, f"{what}: missing (None)"
    assert tuple(actual.shape) == tuple(ref64.shape), f"{what}: shape {tuple(actual.shape)} vs {tuple(ref64.shape)}"
    assert torch.isfinite(ref64).all(), f"{what}: non-finite reference"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    atol, rtol, C = TOL[dtype]
    err = (actual.detach().to(torch.float64) - ref64.detach()).abs()
    plain_err = 0.0
    if plain is not None and plain.numel():
        assert torch.isfinite(plain).all()
        plain_err = (plain.detach().to(torch.float64) - ref64.detach()).abs().max().item()
    bound = atol + rtol * ref64.detach().abs() + C * plain_err
    bad = err > bound
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{what} ({dtype}): max err {err.max().item():.3g}, plain-{dtype} err {plain_err:.3g}; first bad element "
            f"{i}: got {actual.flatten()[i].item()!r}, want {ref64.flatten()[i].item()!r}"
        )


def assert_tensors_equal(a: dict, b: dict, what: str = "") -> None:
    assert set(a) == set(b), f"{what}: key sets differ: only left {sorted(set(a) - set(b))[:5]}, only right " \
                             f"{sorted(set(b) - set(a))[:5]}"
    for k in a:
        assert a[k].dtype == b[k].dtype, f"{what}: {k} dtype {a[k].dtype} vs {b[k].dtype}"
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


# ---------------------------------------------------------------------------------------------- snapshots
def _vera_state(model):
    from vera_kernels.model import get_state

    state = get_state(model)
    if state is None:
        return None
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, vk.VeraLinear):
            layers.append((name, sorted(m.r.items()), sorted(m.vera_dropout.items()), list(m.active_adapters),
                           list(m.merged_adapters), m.disable_adapters, m.backend))
        elif isinstance(m, vk.ModulesToSave):
            layers.append((name, list(m.modules_to_save), m.active_adapter, m.disable_adapters))
    configs = {n: vk.get_adapter_config(model, n) for n in vk.adapter_names(model)}
    return dict(adapters=vk.adapter_names(model), active=vk.active_adapters(model), configs=configs, layers=layers,
                projections_id=id(state.projections))


def snapshot(model) -> dict:
    """Everything a failing call must leave unchanged: module tree, every tensor, requires_grad, VeRA state."""
    return dict(
        modules=[(n, type(m)) for n, m in model.named_modules()],
        state_dict={k: v.detach().clone() for k, v in model.state_dict().items()},
        buffers={k: v.detach().clone() for k, v in model.named_buffers()},  # non-persistent ones (projections) too
        params={k: (id(p), p.dtype, p.device) for k, p in model.named_parameters()},
        requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
        training=[m.training for m in model.modules()],
        vera=_vera_state(model),
    )


def assert_unchanged(model, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"], "module tree changed"
    assert after["params"] == before["params"], "parameters were replaced or cast"
    assert after["requires_grad"] == before["requires_grad"], "requires_grad flags changed"
    assert after["training"] == before["training"], "train/eval flags changed"
    assert after["vera"] == before["vera"], f"VeRA state changed: {before['vera']} -> {after['vera']}"
    for key in ("state_dict", "buffers"):
        a, b = before[key], after[key]
        assert set(a) == set(b), f"{key} keys changed: {sorted(set(a) ^ set(b))[:5]}"
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{key}[{k}] changed"
