"""Behaviour PEFT users rely on beyond the numbers: task types, modules_to_save rules, trainability in every state,
all-linear on a patched model, warnings, load_adapter's is_trainable, PEFT's helper functions and its error words.
Where we match PEFT, PEFT 0.21 runs in the same test on the same tiny model and its behaviour is pinned beside ours."""

from __future__ import annotations

import copy
import json
import re
import warnings

import peft
import pytest
import torch
from peft import PeftModel

import vera_kernels as vk
from helpers import (find_projections, logits, set_random_lambdas, snapshot, assert_unchanged,
                     strip_peft, tiny_bert_cls, tiny_llama, tiny_llama_cls, tiny_roberta_cls, token_ids,
                     trainable_names)

CLS_BUILDERS = {"bert": tiny_bert_cls, "roberta": tiny_roberta_cls, "llama": tiny_llama_cls}
CLS_TARGETS = {"bert": ["query", "value"], "roberta": ["query", "value"], "llama": ["q_proj", "v_proj"]}
LLAMA = dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"], projection_prng_key=3)


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def caught(fn, *args, **kwargs) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [str(w.message) for w in record]


def pair(base, **config):
    """(PEFT model, ours) from copies of ``base`` with the same RNG state; each side its own peft.VeraConfig."""
    torch.manual_seed(1)
    pm = quiet(peft.get_peft_model, copy.deepcopy(base), peft.VeraConfig(**config))
    torch.manual_seed(1)
    om = quiet(vk.patch_model, copy.deepcopy(base), peft.VeraConfig(**config), backend="reference")
    return pm, om


def adapted_layers(model, adapter: str = "default") -> set[str]:
    """Module paths (without PEFT's prefix) of the layers that hold ``adapter``'s lambdas."""
    suffix = ".vera_lambda_d." + adapter
    return {strip_peft(n)[: -len(suffix)] for n, _ in model.named_parameters() if n.endswith(suffix)}


def train_steps(model, ids, labels, steps: int = 3) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    model.eval()


# ---------------------------------------------------------------------------------------------- 1. task_type
@pytest.mark.parametrize("arch", sorted(CLS_BUILDERS))
def test_seq_cls_trains_the_head_as_peft(arch):
    """task_type="SEQ_CLS" adds PEFT's head names to modules_to_save and trains the head: the same trainable tensors
    as PEFT (10 on BERT, 12 on RoBERTa), the same config, and after a few SGD steps the same logits."""
    base = CLS_BUILDERS[arch](0)
    pm, om = pair(base, r=4, target_modules=CLS_TARGETS[arch], task_type="SEQ_CLS")
    head = "score" if arch == "llama" else "classifier"
    assert trainable_names(om) == trainable_names(pm)
    assert any(n.startswith(f"{head}.modules_to_save.default.") for n in trainable_names(om))
    assert len(trainable_names(om)) == {"bert": 10, "roberta": 12, "llama": 9}[arch]
    cfg = vk.get_adapter_config(om)
    assert cfg.task_type == "SEQ_CLS" == pm.peft_config["default"].task_type
    assert cfg.modules_to_save == pm.peft_config["default"].modules_to_save == ["classifier", "score"]

    ids = token_ids(3, vocab=128)
    ids[:, 0] = 5  # never all padding (llama pools the last non-pad token)
    labels = torch.tensor([0, 2])
    train_steps(pm, ids, labels)
    train_steps(om, ids, labels)
    out = logits(om, ids)
    assert not torch.allclose(out, logits(base, ids))
    assert torch.equal(out, logits(pm, ids))  # the reference backend is PEFT's math, bit for bit


@pytest.mark.parametrize("task_type", ["TOKEN_CLS", "QUESTION_ANS", "CAUSAL_LM"])
def test_other_task_types_as_peft(task_type):
    """TOKEN_CLS trains `classifier`/`score` and QUESTION_ANS `qa_outputs`, as PEFT's model classes; CAUSAL_LM none."""
    if task_type == "QUESTION_ANS":
        from transformers import BertConfig, BertForQuestionAnswering

        torch.manual_seed(0)
        base = BertForQuestionAnswering(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                   intermediate_size=44, vocab_size=128)).eval()
    else:
        base = tiny_llama(0) if task_type == "CAUSAL_LM" else tiny_bert_cls(0)
    target = ["q_proj"] if task_type == "CAUSAL_LM" else ["query"]
    pm, om = pair(base, r=4, target_modules=target, task_type=task_type)
    assert trainable_names(om) == trainable_names(pm)
    assert vk.get_adapter_config(om).modules_to_save == pm.peft_config["default"].modules_to_save
    heads = {n.split(".")[0] for n in trainable_names(om) if ".modules_to_save." in n}
    assert heads == {"TOKEN_CLS": {"classifier"}, "QUESTION_ANS": {"qa_outputs"}, "CAUSAL_LM": set()}[task_type]


def test_task_type_accepted_in_every_form():
    """vk.VeraConfig takes PEFT's TaskType or its string, and a peft.VeraConfig's task_type is read; a value PEFT
    refuses is refused with PEFT's words."""
    assert vk.VeraConfig(task_type=peft.TaskType.SEQ_CLS).task_type == "SEQ_CLS"
    assert type(vk.VeraConfig(task_type=peft.TaskType.SEQ_CLS).task_type) is str
    assert vk.VeraConfig.from_any(peft.VeraConfig(task_type="TOKEN_CLS")).task_type == "TOKEN_CLS"
    assert vk.VeraConfig.from_any({"task_type": "CAUSAL_LM"}).task_type == "CAUSAL_LM"
    with pytest.raises(ValueError) as peft_err:
        peft.VeraConfig(task_type="SEQ_CLASSIFICATION")
    with pytest.raises(ValueError) as ours:
        vk.VeraConfig(task_type="SEQ_CLASSIFICATION")
    assert str(ours.value) == str(peft_err.value)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_all_linear_leaves_the_classification_head_out(arch):
    """all-linear with SEQ_CLS adapts what PEFT adapts: every linear layer but the head (which is trained whole)."""
    base = CLS_BUILDERS[arch](0)
    pm, om = pair(base, r=4, target_modules="all-linear", task_type="SEQ_CLS")
    ours = {n for n, m in om.named_modules() if isinstance(m, vk.VeraLinear)}
    assert ours == adapted_layers(pm)
    assert not any(n.startswith("classifier") for n in ours)
    assert trainable_names(om) == trainable_names(pm)


def test_seq_cls_checkpoint_both_ways(tmp_path):
    """save_adapter writes task_type; PEFT loads our file as a sequence-classification model, head included."""
    base = tiny_bert_cls(0)
    om = quiet(vk.patch_model, copy.deepcopy(base), vk.VeraConfig(r=4, task_type="SEQ_CLS"), backend="reference")
    set_random_lambdas(om, 2)
    with torch.no_grad():
        om.classifier.modules_to_save["default"].weight.mul_(-3.0)
    vk.save_adapter(om, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["task_type"] == "SEQ_CLS" and written["modules_to_save"] == ["classifier", "score"]
    loaded = quiet(PeftModel.from_pretrained, copy.deepcopy(base), tmp_path)
    assert type(loaded).__name__ == "PeftModelForSequenceClassification"
    ids = token_ids(4)
    torch.testing.assert_close(logits(loaded, ids), logits(om, ids), rtol=0, atol=0)


def test_a_later_adapter_on_a_classification_model_gets_its_own_head():
    """PEFT's PeftModelForSequenceClassification appends the head to every adapter it adds, whatever that adapter's
    config says: each adapter trains its own copy of the head."""
    base = tiny_bert_cls(0)
    pm, om = pair(base, r=4, task_type="SEQ_CLS")
    quiet(pm.add_adapter, "b", peft.VeraConfig(r=4))
    quiet(vk.add_adapter, om, "b", peft.VeraConfig(r=4))
    assert list(om.classifier.modules_to_save) == list(pm.base_model.model.classifier.modules_to_save) == \
        ["default", "b"]
    assert vk.get_adapter_config(om, "b").modules_to_save == pm.peft_config["b"].modules_to_save


def test_seq_cls_on_a_model_without_a_head_warns():
    """Better than PEFT (silent): SEQ_CLS on a model with neither `classifier` nor `score` trains no head; say so."""
    _, messages = caught(vk.patch_model, tiny_llama(0), vk.VeraConfig(**LLAMA, task_type="SEQ_CLS"))
    assert any("no head is trained" in m for m in messages), messages


# ---------------------------------------------------------------------------------------------- 2. PEFT's seq-cls files
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_peft_seq_cls_checkpoint_loads(arch, tmp_path):
    """PEFT writes modules_to_save ["classifier", "score"] for every classification model; one of them matches
    nothing. load_adapter accepts that (the checkpoint's tensors are still checked key by key)."""
    base = CLS_BUILDERS[arch](0)
    pm, _ = pair(base, r=4, target_modules=CLS_TARGETS[arch], task_type="SEQ_CLS")
    set_random_lambdas(pm, 3)
    pm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["classifier", "score"]
    om = quiet(vk.load_adapter, copy.deepcopy(base), tmp_path, backend="reference")
    ids = token_ids(5)
    ids[:, 0] = 5
    assert torch.equal(logits(om, ids), logits(pm, ids))


def test_user_modules_to_save_stay_strict():
    """What a user passes to patch_model is still checked: an entry that matches nothing is an error."""
    base = tiny_bert_cls(0)
    before = snapshot(base)
    with pytest.raises(ValueError, match="score"):
        vk.patch_model(base, vk.VeraConfig(r=4, modules_to_save=["score"]))
    assert_unchanged(base, before)


# ---------------------------------------------------------------------------------------------- 3. shared heads
def test_two_active_adapters_sharing_a_modules_to_save_module_refused():
    """Which adapter's copy of lm_head should run? PEFT raises a ValueError; so do we, before anything changes.
    Adapters that do not share a module can be active together, on both sides."""
    pm, om = pair(tiny_llama(0), **LLAMA, modules_to_save=["lm_head"])
    quiet(pm.add_adapter, "b", peft.VeraConfig(**LLAMA, modules_to_save=["lm_head"]))
    quiet(vk.add_adapter, om, "b", peft.VeraConfig(**LLAMA, modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match="Only one adapter can be set at a time"):
        pm.base_model.set_adapter(["default", "b"])
    before = snapshot(om)
    with pytest.raises(ValueError, match="Only one adapter can be set at a time for modules_to_save module 'lm_head'"):
        vk.set_adapter(om, ["default", "b"])
    assert_unchanged(om, before)

    pm, om = pair(tiny_llama(0), **LLAMA, modules_to_save=["lm_head"])
    quiet(pm.add_adapter, "c", peft.VeraConfig(**LLAMA))
    quiet(vk.add_adapter, om, "c", peft.VeraConfig(**LLAMA))
    pm.base_model.set_adapter(["default", "c"])
    vk.set_adapter(om, ["default", "c"])
    assert trainable_names(om) == trainable_names(pm)


# ---------------------------------------------------------------------------------------------- 4. disable_adapter
def test_nothing_trainable_inside_disable_adapter(tmp_path):
    """Inside disable_adapter no adapter tensor is trainable (PEFT's rule); on exit every flag is as it was, a
    frozen (inference-loaded) adapter included. bias != "none" gives PEFT's warning."""
    pm, om = pair(tiny_bert_cls(0), r=4, modules_to_save=["classifier"], bias="vera_only")
    trained = trainable_names(om)
    assert trained == trainable_names(pm)
    with warnings.catch_warnings(record=True) as peft_warnings:
        warnings.simplefilter("always")
        with pm.disable_adapter():
            peft_inside = trainable_names(pm)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with vk.disable_adapter(om):
            om_inside = trainable_names(om)
    our_warnings = [str(w.message) for w in record]
    assert om_inside == peft_inside
    assert not any(".vera_lambda_" in n or ".modules_to_save." in n for n in om_inside)
    assert trainable_names(om) == trained
    bias_words = "Careful, disabling adapter layers with bias configured to be 'vera_only'"
    assert any(bias_words in str(w.message) for w in peft_warnings)
    assert any(bias_words in m for m in our_warnings)

    vk.save_adapter(om, tmp_path)
    frozen = quiet(vk.load_adapter, tiny_bert_cls(0), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bias warning again
        with vk.disable_adapter(frozen):
            assert trainable_names(frozen) == set()
    assert trainable_names(frozen) == set()


# ---------------------------------------------------------------------------------------------- 5. all-linear again
def test_add_adapter_all_linear_on_a_patched_model():
    """A second all-linear adapter adapts the same layers as the first (an adapted layer is still a linear layer of
    the model; its base_layer is not a layer of its own), as PEFT does."""
    pm, om = pair(tiny_llama(0), r=4, target_modules="all-linear")
    first = adapted_layers(om)
    assert first == adapted_layers(pm) and len(first) == 14
    quiet(pm.add_adapter, "b", peft.VeraConfig(r=4, target_modules="all-linear"))
    quiet(vk.add_adapter, om, "b", peft.VeraConfig(r=4, target_modules="all-linear"))
    assert adapted_layers(om, "b") == adapted_layers(pm, "b") == first
    assert {n for n, m in om.named_modules() if isinstance(m, vk.VeraLinear)} == first  # none nested


# ---------------------------------------------------------------------------------------------- 6. warnings
def test_merge_when_already_merged_warns():
    pm, om = pair(tiny_llama(0), **LLAMA)
    quiet(pm.add_adapter, "b", peft.VeraConfig(**LLAMA))
    quiet(vk.add_adapter, om, "b", peft.VeraConfig(**LLAMA))
    pm.base_model.merge_adapter()
    vk.merge_adapter(om)
    _, peft_messages = caught(pm.base_model.merge_adapter)
    _, ours = caught(vk.merge_adapter, om)
    assert "All adapters are already merged, nothing to do." in peft_messages
    assert ours == ["All adapters are already merged, nothing to do."]
    _, peft_messages = caught(pm.base_model.merge_adapter, ["default", "b"])
    _, ours = caught(vk.merge_adapter, om, ["default", "b"])
    words = "Already following adapters were merged default. You are now additionally merging b."
    assert words in peft_messages and ours == [words]


def test_unknown_keys_in_adapter_config_warn(tmp_path):
    """A key neither PEFT nor we know (a newer PEFT's field) is ignored, with PEFT's warning; loading goes on."""
    pm, om = pair(tiny_llama(0), **LLAMA)
    set_random_lambdas(pm, 4)
    pm.save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    conf["vera_future_option"] = 7
    (tmp_path / "adapter_config.json").write_text(json.dumps(conf))
    loaded, peft_messages = caught(PeftModel.from_pretrained, tiny_llama(0), tmp_path)
    ours, our_messages = caught(vk.load_adapter, tiny_llama(0), tmp_path, backend="reference")
    words = "Unexpected keyword arguments ['vera_future_option'] for class VeraConfig, these are ignored."
    assert any(words in m for m in peft_messages) and any(words in m for m in our_messages), our_messages
    ids = token_ids(6)
    assert torch.equal(logits(ours, ids), logits(loaded, ids))
    _, none = caught(vk.VeraConfig.from_any, {k: v for k, v in conf.items() if k != "vera_future_option"})
    assert not any("Unexpected" in m for m in none)  # PEFT's own keys (peft_version, auto_mapping, ...) are known


# ---------------------------------------------------------------------------------------------- 7. is_trainable
@pytest.mark.parametrize("is_trainable", [False, True])
def test_load_adapter_is_trainable_as_peft(is_trainable, tmp_path):
    """load_adapter defaults to inference as PeftModel.from_pretrained: adapter frozen, model in eval mode;
    is_trainable=True gives get_peft_model's trainable set and leaves train mode. A second adapter loaded into a
    patched model: frozen by default, trainable (though not active) with is_trainable=True, as PEFT's load_adapter.
    One difference: loaded for inference, nothing is trainable here, where PEFT leaves the biases of bias="all" /
    "vera_only" trainable."""
    base = tiny_bert_cls(0)
    pm, _ = pair(base, r=4, modules_to_save=["classifier"], bias="vera_only")
    pm.save_pretrained(tmp_path / "a")
    peft_loaded = quiet(PeftModel.from_pretrained, copy.deepcopy(base).train(), tmp_path / "a",
                        is_trainable=is_trainable)
    ours = quiet(vk.load_adapter, copy.deepcopy(base).train(), tmp_path / "a", is_trainable=is_trainable)
    biases = {n for n in trainable_names(pm) if n.endswith("base_layer.bias")}
    assert len(biases) == 4
    if is_trainable:
        assert trainable_names(ours) == trainable_names(peft_loaded) == trainable_names(pm)
    else:
        assert trainable_names(ours) == set() and trainable_names(peft_loaded) == biases
    assert all(m.training == is_trainable for m in ours.modules())
    assert all(m.training == is_trainable for m in peft_loaded.modules())

    pm2, om2 = pair(base, r=4, modules_to_save=["classifier"])
    pm2.train()
    om2.train()
    quiet(pm2.load_adapter, tmp_path / "a", "b", is_trainable=is_trainable)
    quiet(vk.load_adapter, om2, tmp_path / "a", "b", is_trainable=is_trainable)
    assert trainable_names(om2) == trainable_names(pm2)
    assert any(n.endswith(".b") for n in trainable_names(om2)) == is_trainable
    assert all(m.training == is_trainable for m in om2.modules())


# ---------------------------------------------------------------------------------------------- 8. half bases
def test_bf16_base_keeps_float32_adapter_values():
    """A deliberate difference (README): on a base that is bf16 when patched, PEFT rounds the shared projections and
    the initial lambdas to bf16 (lambda_d = 0.10009765625); we keep the paper's float32 values (0.1)."""
    base = tiny_llama(0)
    pm, om = pair(base.to(torch.bfloat16), **LLAMA)
    peft_d = pm.base_model.model.model.layers[0].self_attn.q_proj.vera_lambda_d["default"]
    our_d = om.model.layers[0].self_attn.q_proj.vera_lambda_d["default"]
    assert peft_d.dtype == our_d.dtype == torch.float32
    assert peft_d[0].item() == 0.10009765625
    assert our_d[0].item() == torch.tensor(0.1).item()
    _, fp32 = pair(tiny_llama(0), **LLAMA)
    assert torch.equal(find_projections(om).vera_A, find_projections(fp32).vera_A)
    peft_A = pm.base_model.vera_A["default"]
    assert torch.equal(peft_A, find_projections(om).vera_A.bfloat16().float())


# ---------------------------------------------------------------------------------------------- 9. PEFT's functions
def test_trainable_parameter_counts_as_peft(capsys):
    pm, om = pair(tiny_roberta_cls(0), r=4, modules_to_save=["classifier"])
    assert vk.get_nb_trainable_parameters(om) == pm.get_nb_trainable_parameters()
    pm.print_trainable_parameters()
    peft_line = capsys.readouterr().out
    vk.print_trainable_parameters(om)
    assert capsys.readouterr().out == peft_line
    assert re.fullmatch(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}\n", peft_line)


@pytest.mark.parametrize("adapter_names", [None, ["b"]])
def test_merge_and_unload_as_peft(adapter_names):
    """vk.merge_and_unload gives PEFT's merge_and_unload model: plain modules, merged weights, trained heads."""
    pm, om = pair(tiny_llama(0), **LLAMA, modules_to_save=["lm_head"], init_weights=False)
    quiet(pm.add_adapter, "b", peft.VeraConfig(**LLAMA, init_weights=False))
    quiet(vk.add_adapter, om, "b", peft.VeraConfig(**LLAMA, init_weights=False))
    set_random_lambdas(pm, 7)
    set_random_lambdas(om, 7)
    with torch.no_grad():
        for m in (pm.base_model.model, om):
            m.lm_head.modules_to_save["default"].weight.mul_(2.0)
    ids = token_ids(7)
    peft_plain = pm.merge_and_unload(safe_merge=True, adapter_names=adapter_names)
    ours = vk.merge_and_unload(om, safe_merge=True, adapter_names=adapter_names)
    assert ours is om
    assert [type(m) for m in ours.modules()] == [type(m) for m in peft_plain.modules()]
    assert not hasattr(ours, "_vera_kernels_state")
    out = logits(ours, ids)
    torch.testing.assert_close(out, logits(peft_plain, ids), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, logits(tiny_llama(0), ids))


# ---------------------------------------------------------------------------------------------- 10. error words
def _messages(fn_peft, fn_ours) -> tuple[str, str]:
    with pytest.raises(ValueError) as p:
        quiet(fn_peft)
    with pytest.raises(ValueError) as o:
        quiet(fn_ours)
    return str(p.value), str(o.value)


def _pm_om():
    return pair(tiny_llama(0), **LLAMA)


ERROR_CASES = {
    "duplicate adapter": lambda pm, om: (lambda: pm.add_adapter("default", peft.VeraConfig(**LLAMA)),
                                         lambda: vk.add_adapter(om, "default", peft.VeraConfig(**LLAMA))),
    "set unknown adapter": lambda pm, om: (lambda: pm.set_adapter("nope"), lambda: vk.set_adapter(om, "nope")),
    "delete unknown adapter": lambda pm, om: (lambda: pm.delete_adapter("nope"),
                                              lambda: vk.delete_adapter(om, "nope")),
    "higher r": lambda pm, om: (lambda: pm.add_adapter("hi", peft.VeraConfig(**{**LLAMA, "r": 8})),
                                lambda: vk.add_adapter(om, "hi", peft.VeraConfig(**{**LLAMA, "r": 8}))),
    "no target matches": lambda pm, om: (
        lambda: peft.get_peft_model(tiny_llama(0), peft.VeraConfig(**{**LLAMA, "target_modules": ["nope"]})),
        lambda: vk.patch_model(tiny_llama(0), peft.VeraConfig(**{**LLAMA, "target_modules": ["nope"]}))),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_error_messages_use_peft_words(case):
    """Where PEFT's message names the problem, ours says the same words (up to PEFT's advice after a ';'), so a
    search for either finds the same answers; ours may add what it found."""
    pm, om = _pm_om()
    peft_msg, ours = _messages(*ERROR_CASES[case](pm, om))
    assert peft_msg.split(";")[0] in ours, (peft_msg, ours)


def test_delete_merged_adapter_words():
    pm, om = _pm_om()
    for m, add, merge in ((pm, pm.add_adapter, pm.base_model.merge_adapter),
                          (om, lambda n, c: vk.add_adapter(om, n, c), lambda names: vk.merge_adapter(om, names))):
        quiet(add, "b", peft.VeraConfig(**LLAMA))
        merge(["b"])
    peft_msg, ours = _messages(lambda: pm.delete_adapter("b"), lambda: vk.delete_adapter(om, "b"))
    assert ours == peft_msg == "Cannot delete adapter(s) ['b'] while they are merged. Please unmerge them first."


def test_messages_name_the_field(tmp_path):
    """A save_projection mismatch says save_projection; a checkpoint whose stored projections do not fit the ones
    the model shares gives both pairs of shapes."""
    _, om = _pm_om()
    with pytest.raises(ValueError, match=r"save_projection=False for this adapter, True for the model's adapters"):
        vk.add_adapter(om, "sp", vk.VeraConfig(**LLAMA, save_projection=False))
    other = quiet(peft.get_peft_model, tiny_llama(0), peft.VeraConfig(**{**LLAMA, "target_modules": ["o_proj"]}))
    other.save_pretrained(tmp_path)
    before = snapshot(om)
    with pytest.raises(ValueError, match=re.escape("vera_A (4, 40) / vera_B (40, 4) differ from the projections "
                                                   "this model's adapters already share, vera_A (4, 52) / vera_B "
                                                   "(40, 4)")):
        quiet(vk.load_adapter, om, tmp_path, "o")
    assert_unchanged(om, before)
