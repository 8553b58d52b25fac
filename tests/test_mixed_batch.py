"""Mixed-adapter batches (vk.adapter_batch, adapter_names=): every row equals its adapter run alone.

Forward: each row of a mixed batch against the same row of a whole-batch run with only that row's adapter active
(or the base model for "__base__"). Backward: each adapter's lambda gradients against the gradient of a
single-adapter run whose loss counts only that adapter's rows. For Llama (nn.Linear) and GPT-2 (Conv1D), with
"__base__" rows, repeated and interleaved adapters, one adapter only, adapters with no rows, and an adapter that only
some layers have. Plus: dropout per adapter, quantized bases, modules_to_save heads, generate (greedy and beams),
any leading dimensions, determinism, the errors (raised before anything runs), and PEFT's own (silent) behaviour.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import vera_kernels as vk
from helpers import assert_unchanged, lambda_params, set_random_lambdas, snapshot, tiny_gpt2, tiny_llama, \
    tiny_llama_cls, token_ids

BACKENDS = ["reference", "torch"]
# adapter "c" is on fewer layers than "a" and "b": its rows get the base output on the others
ARCHS = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj", "up_proj"], ["q_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], ["c_attn"]),
}
NAME_CASES = {
    "interleaved": ["a", "b", "__base__", "a", "c"],
    "one-adapter": ["b", "b", "b"],
    "zero-row-adapters": ["a", "__base__", "a"],
    "all-base": ["__base__", "__base__"],
    "each-once": ["c", "b", "a"],
}
# (rtol, atol) of a mixed row against the single-adapter run: the reference computes the very same ops per row;
# the torch backend gathers the lambdas per row instead of folding them into R (float32 rounding differences)
TOL = {"reference": (1e-6, 1e-6), "torch": (2e-5, 2e-5), "triton": (2e-5, 2e-5)}


def build(arch: str, backend: str, dropout=(0.0, 0.0, 0.0)):
    make, targets, c_targets = ARCHS[arch]
    model = make(0)
    for i, (name, tm) in enumerate([("a", targets), ("b", targets), ("c", c_targets)]):
        cfg = vk.VeraConfig(r=6, target_modules=tm, init_weights=False, vera_dropout=dropout[i])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if i == 0:
                vk.patch_model(model, cfg, name, backend=backend)
            else:
                vk.add_adapter(model, name, cfg)
    set_random_lambdas(model, seed=3)
    return model


def run_single(model, name, ids):
    if name == "__base__":
        with vk.disable_adapter(model):
            return model(ids).logits
    vk.set_adapter(model, name)
    return model(ids).logits


def all_trainable(model):
    for p in lambda_params(model).values():
        p.requires_grad_(True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("case", list(NAME_CASES))
def test_rows_equal_single_adapter_runs(arch, backend, case):
    check_rows(arch, backend, NAME_CASES[case])


def check_rows(arch, backend, names):
    model = build(arch, backend)
    ids = token_ids(1, batch=len(names), length=6)
    with torch.no_grad():
        singles = {n: run_single(model, n, ids) for n in set(names)}
        vk.set_adapter(model, "a")
        with vk.adapter_batch(model, names):
            mixed = model(ids).logits
        by_kwarg = model(ids, adapter_names=names).logits
        after = model(ids).logits  # the keyword's plan ends with the call: the active adapter again
    rtol, atol = TOL[backend]
    for i, n in enumerate(names):
        torch.testing.assert_close(mixed[i], singles[n][i], rtol=rtol, atol=atol, msg=f"row {i} ({n})")
        torch.testing.assert_close(by_kwarg[i], singles[n][i], rtol=rtol, atol=atol, msg=f"row {i} ({n}) kwarg")
    torch.testing.assert_close(after, singles["a"] if "a" in singles else run_single(model, "a", ids), rtol=rtol,
                               atol=atol)
    if len(set(names)) > 1:  # the rows really differ: a test that ran one adapter everywhere would fail
        a, b = names[0], next(n for n in names if n != names[0])
        assert (singles[a] - singles[b]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("case", ["interleaved", "zero-row-adapters", "each-once"])
def test_lambda_gradients_are_sums_over_own_rows(arch, backend, case):
    """One backward on a mixed batch gives every adapter the gradient of its own rows: the gradient of a
    single-adapter run whose loss counts only those rows. Adapters with no rows get none."""
    check_gradients(arch, backend, NAME_CASES[case])


def check_gradients(arch, backend, names):
    model = build(arch, backend).train()
    ids = token_ids(2, batch=len(names), length=5)
    weights = torch.randn(len(names), 5, model.config.vocab_size, generator=torch.Generator().manual_seed(9))
    params = lambda_params(model)

    all_trainable(model)
    with vk.adapter_batch(model, names):
        (model(ids).logits * weights).sum().backward()
    mixed = {k: (p.grad.clone() if p.grad is not None else None) for k, p in params.items()}
    for p in params.values():
        p.grad = None

    rtol, atol = TOL[backend]
    for adapter in ("a", "b", "c"):
        rows = [i for i, n in enumerate(names) if n == adapter]
        mine = {k: g for k, g in mixed.items() if k.endswith("." + adapter)}
        if not rows:
            assert all(g is None or not g.any() for g in mine.values()), f"{adapter} has no rows but got gradients"
            continue
        vk.set_adapter(model, adapter)
        (model(ids).logits[rows] * weights[rows]).sum().backward()
        for k, g in mine.items():
            want = params[k].grad
            assert want is not None and want.abs().max() > 0
            assert g is not None, f"{k}: no gradient in the mixed batch"
            # float32 sums over tokens in another order (per row, then per adapter): judged against the gradient's scale
            err, scale = (g - want).abs().max().item(), want.abs().max().item()
            assert err <= max(rtol, 1e-5) * 10 * scale, f"{k}: max err {err:.3g} against a gradient of scale {scale:.3g}"
        for p in params.values():
            p.grad = None


@pytest.mark.parametrize("arch", list(ARCHS))
def test_triton_backend_rows_and_gradients(arch):
    """The triton backend's mixed up node (kernels through the interpreter) in a whole model: forward rows and
    lambda gradients, as for the other backends (one interleaved case: the interpreter is slow)."""
    pytest.importorskip("triton")
    check_rows(arch, "triton", NAME_CASES["interleaved"])
    check_gradients(arch, "triton", NAME_CASES["interleaved"])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixed_backward_is_deterministic(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    model = build("llama", backend).train()
    all_trainable(model)
    names = NAME_CASES["interleaved"]
    ids = token_ids(3, batch=len(names), length=6)
    grads = []
    for _ in range(2):
        with vk.adapter_batch(model, names):
            model(ids).logits.pow(2).mean().backward()
        grads.append({k: p.grad.clone() for k, p in lambda_params(model).items() if p.grad is not None})
        model.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        assert torch.equal(grads[0][k], grads[1][k]), k


def _fc_model(in_f=11, out_f=13, dropouts=(0.0, 0.5)):
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc=nn.Linear(in_f, out_f)))
    for i, p in enumerate(dropouts):
        cfg = vk.VeraConfig(r=5, target_modules=["fc"], init_weights=False, vera_dropout=p)
        (vk.patch_model(model, cfg, "ab"[i], backend="torch") if i == 0 else vk.add_adapter(model, "ab"[i], cfg))
    set_random_lambdas(model, seed=4)
    return model


def test_dropout_applies_per_adapter_on_its_rows():
    """Training: each adapter's own vera_dropout on its rows (a: none, b: 0.5), each row as that adapter alone with
    the same seed (the torch backend's mask is a function of the seed and the element's position)."""
    model = _fc_model().train()
    x = torch.randn(4, 3, 11)
    names = ["b", "a", "b", "__base__"]
    torch.manual_seed(5)
    with vk.adapter_batch(model, names):
        mixed = model(x)
    singles = {}
    for n in ("a", "b"):
        vk.set_adapter(model, n)
        torch.manual_seed(5)
        singles[n] = model(x)
    with vk.disable_adapter(model):
        singles["__base__"] = model(x)
    for i, n in enumerate(names):
        torch.testing.assert_close(mixed[i], singles[n][i], msg=f"row {i} ({n})")
    vk.set_adapter(model, "b")
    model.eval()
    with torch.no_grad():  # dropout was really on for b's rows
        assert (model(x) - singles["b"]).abs().max() > 1e-3


def test_any_leading_dimensions():
    model = _fc_model(dropouts=(0.0, 0.0)).eval()
    x = torch.randn(3, 2, 4, 11)
    names = ["a", "b", "a"]
    with torch.no_grad(), vk.adapter_batch(model, names):
        mixed = model(x)
    assert mixed.shape == (3, 2, 4, 13)
    for i, n in enumerate(names):
        vk.set_adapter(model, n)
        with torch.no_grad():
            torch.testing.assert_close(mixed[i], model(x)[i], rtol=2e-5, atol=2e-5)


def test_modules_to_save_run_per_row():
    """A classification head in modules_to_save (task_type SEQ_CLS): each row through its adapter's copy."""
    model = tiny_llama_cls(0)
    for i, n in enumerate(["a", "b"]):
        cfg = vk.VeraConfig(r=6, target_modules=["q_proj", "v_proj"], init_weights=False, task_type="SEQ_CLS")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (vk.patch_model(model, cfg, n, backend="torch") if i == 0 else vk.add_adapter(model, n, cfg))
    set_random_lambdas(model, seed=6)
    with torch.no_grad():
        for n in ("a", "b"):  # the heads differ per adapter
            model.score.modules_to_save[n].weight.normal_()
    ids = token_ids(4, batch=4, length=6)
    names = ["b", "__base__", "a", "b"]
    with torch.no_grad():
        singles = {n: run_single(model, n, ids) for n in set(names)}
        mixed = model(ids, adapter_names=names).logits
    for i, n in enumerate(names):
        torch.testing.assert_close(mixed[i], singles[n][i], rtol=2e-5, atol=2e-5, msg=f"row {i} ({n})")


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_keeps_each_rows_adapter(num_beams):
    model = build("llama", "torch")
    names = ["b", "a", "__base__"]
    ids = token_ids(5, batch=3, length=4)
    kw = dict(max_new_tokens=4, do_sample=False, num_beams=num_beams, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mixed = model.generate(ids, adapter_names=names, **kw)
        singles = {}
        for n in set(names):
            if n == "__base__":
                with vk.disable_adapter(model):
                    singles[n] = model.generate(ids, **kw)
            else:
                vk.set_adapter(model, n)
                singles[n] = model.generate(ids, **kw)
    for i, n in enumerate(names):
        assert torch.equal(mixed[i], singles[n][i]), f"row {i} ({n}): {mixed[i].tolist()} vs {singles[n][i].tolist()}"
    assert len({tuple(s[0].tolist()) for s in singles.values()}) > 1 or len({tuple(s[1].tolist())
                                                                             for s in singles.values()}) > 1


def test_quantized_base_rows_equal_single_adapter_runs(tmp_path):
    pytest.importorskip("bitsandbytes")
    from helpers import save_nf4_llama, trainer_base_model

    model = trainer_base_model("nf4", save_nf4_llama(tmp_path / "nf4"))
    for i, n in enumerate(["a", "b"]):
        cfg = vk.VeraConfig(r=6, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (vk.patch_model(model, cfg, n, backend="torch") if i == 0 else vk.add_adapter(model, n, cfg))
    set_random_lambdas(model, seed=7)
    model.eval()
    names = ["a", "b", "__base__", "b"]
    ids = token_ids(6, batch=4, length=5)
    with torch.no_grad():
        singles = {n: run_single(model, n, ids) for n in set(names)}
        with vk.adapter_batch(model, names):
            mixed = model(ids).logits
    for i, n in enumerate(names):
        torch.testing.assert_close(mixed[i], singles[n][i], rtol=2e-5, atol=2e-5, msg=f"row {i} ({n})")


# ---------------------------------------------------------------------------------------------- errors
def test_bad_names_raise_before_anything_runs():
    model = build("llama", "torch")
    ids = token_ids(0, batch=3, length=4)
    before = snapshot(model)
    with torch.no_grad():
        normal = model(ids).logits
    with pytest.raises(ValueError, match="non-existing adapter.*zzz"):
        with vk.adapter_batch(model, ["a", "zzz", "b"]):
            pytest.fail("the block ran")
    with pytest.raises(ValueError, match="non-existing adapter.*zzz"):
        model(ids, adapter_names=["a", "zzz", "b"])
    with pytest.raises(TypeError, match="expected a list of str"):
        with vk.adapter_batch(model, "a"):
            pytest.fail("the block ran")
    with pytest.raises(ValueError, match="Length of `adapter_names`"):  # PEFT's words
        model(ids, adapter_names=["a", "b"])
    with pytest.raises(ValueError, match="2 adapter names were given for a batch of 3 rows"):
        with vk.adapter_batch(model, ["a", "b"]):
            model(ids)
    with pytest.raises(ValueError, match="empty"):
        model(ids, adapter_names=[])
    assert_unchanged(model, before)
    with torch.no_grad():  # nothing left behind: plans, hooks' stack
        assert torch.equal(model(ids).logits, normal)
    assert all(m._row_adapters is None for m in model.modules() if isinstance(m, (vk.VeraLinear, vk.ModulesToSave)))


def test_merged_adapters_are_refused():
    model = build("llama", "torch")
    ids = token_ids(0, batch=2, length=4)
    vk.merge_adapter(model, ["a"])
    with pytest.raises(ValueError, match="merged adapters"):
        with vk.adapter_batch(model, ["a", "b"]):
            pytest.fail("the block ran")
    with pytest.raises(ValueError, match="merged adapters"):
        model(ids, adapter_names=["a", "b"])
    vk.unmerge_adapter(model)
    with torch.no_grad(), vk.adapter_batch(model, ["a", "b"]):
        vk.merge_adapter(model, ["a"])  # merged inside the block: the layers refuse too
        with pytest.raises(ValueError, match="merged adapters"):
            model(ids)
        vk.unmerge_adapter(model)


def test_unpatch_removes_the_keyword_hooks():
    model = build("llama", "torch")
    assert "generate" in model.__dict__ and model._forward_pre_hooks
    vk.unpatch_model(model)
    assert "generate" not in model.__dict__
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_blocks_nest_and_restore():
    model = build("llama", "torch")
    ids = token_ids(0, batch=2, length=4)
    with torch.no_grad():
        singles = {n: run_single(model, n, ids) for n in ("a", "b")}
        with vk.adapter_batch(model, ["a", "a"]):
            with vk.adapter_batch(model, ["b", "a"]):
                inner = model(ids).logits
            outer = model(ids).logits
    torch.testing.assert_close(inner[0], singles["b"][0], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(outer[0], singles["a"][0], rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------------------------------------- PEFT
def test_peft_vera_ignores_adapter_names_silently():
    """Pinned (peft 0.21.2): PEFT's VeRA runs the active adapter on every row whatever adapter_names says. If this
    fails, PEFT changed: update the README's comparison (and check that our rows still match PEFT's)."""
    import peft

    torch.manual_seed(0)
    model = tiny_llama(0)
    cfg = dict(r=6, target_modules=["q_proj", "v_proj"], init_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.VeraConfig(**cfg), adapter_name="a")
        pm.add_adapter("b", peft.VeraConfig(**cfg))
    set_random_lambdas(pm, seed=8)
    pm.eval()
    ids = token_ids(0, batch=2, length=5)
    with torch.no_grad():
        pm.set_adapter("b")
        only_b = pm(ids).logits
        pm.set_adapter("a")
        only_a = pm(ids).logits
        mixed = pm(ids, adapter_names=["a", "b"]).logits
    assert (only_a[1] - only_b[1]).abs().max() > 1e-3
    torch.testing.assert_close(mixed[1], only_a[1], msg="PEFT's VeRA now honours adapter_names per row")


def test_pickled_and_copied_models_keep_adapter_names():
    """torch.save / deepcopy of a patched model: the copy's generate and forward take adapter_names, for the copy."""
    import copy
    import io

    model = build("llama", "torch")
    names = ["b", "a"]
    ids = token_ids(7, batch=2, length=4)
    kw = dict(max_new_tokens=3, do_sample=False, num_beams=2, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = model.generate(ids, adapter_names=names, **kw)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        for copied in (torch.load(buf, weights_only=False), copy.deepcopy(model)):
            assert copied.generate.__self__ is copied
            assert torch.equal(copied.generate(ids, adapter_names=names, **kw), want)
            with torch.no_grad():
                torch.testing.assert_close(copied(ids, adapter_names=names).logits,
                                           model(ids, adapter_names=names).logits)
