"""The short training run: PEFT's VeRA and our backends train the same small Llama (same frozen weights, same
projections, same lambdas at init, same fixed synthetic data, float32, no dropout) side by side, one step each in
turn; the loss curves must agree step for step, and the step times say who is faster."""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from . import impls as I
from .measure import free_memory, summarize
from .presets import LLAMA_TARGETS

WARM_STEPS = 2  # the first steps (lazy inits) are not timed


def synthetic_batches(vocab: int, batch: int, seq: int, n: int, seed: int) -> list[torch.Tensor]:
    """A fixed, learnable dataset: each token is followed by one of two successors from a random table."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    succ = torch.randint(0, vocab, (vocab, 2), generator=gen)
    out = []
    for _ in range(n):
        seqs = torch.empty(batch, seq, dtype=torch.long)
        seqs[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
        pick = torch.randint(0, 2, (batch, seq), generator=gen)
        for t in range(1, seq):
            seqs[:, t] = succ[seqs[:, t - 1], pick[:, t]]
        out.append(seqs)
    return out


def training_run(preset, device: torch.device, impls: list[str], r: int, seed: int,
                 tick: Callable[[int], None]) -> tuple[list[dict], Optional[dict], dict]:
    """Returns (per-impl summaries, the training section, errors by impl). ``impls`` starts with "peft"."""
    mp = preset.model
    master = I.build_llama(mp, torch.float32, device, seed)
    data = [b.to(device) for b in synthetic_batches(mp.vocab, mp.batch, mp.seq, preset.n_batches, seed + 3)]
    models, opts, errors = {}, {}, {}
    for impl in impls:
        try:
            models[impl] = I.make_variant(impl, master, LLAMA_TARGETS, r)
            opts[impl] = torch.optim.AdamW(I.trainable(models[impl]), lr=preset.lr)
        except Exception as exc:
            errors[impl] = f"could not build: {type(exc).__name__}: {exc}"[:160]
    names = list(models)
    losses = {n: [] for n in names}
    times = {n: [] for n in names}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for step in range(preset.steps):
        batch = data[step % len(data)]
        order = names[step % len(names):] + names[: step % len(names)] if names else []
        for n in order:
            if n in errors:
                tick(1)
                continue
            model, opt = models[n], opts[n]
            try:
                opt.zero_grad(set_to_none=True)
                sync()
                t0 = time.perf_counter()
                loss = model(input_ids=batch, labels=batch).loss
                loss.backward()
                opt.step()
                sync()
                t1 = time.perf_counter()
            except Exception as exc:
                errors[n] = f"{type(exc).__name__}: {exc}"[:160]
                tick(1)
                continue
            losses[n].append(float(loss.detach()))
            if step >= WARM_STEPS:
                times[n].append((t1 - t0) * 1e3)
            tick(1)
    del models, opts, master
    free_memory(device)

    done = [n for n in names if n not in errors]
    summaries = []
    for n in done:
        s = summarize(times[n])
        summaries.append({"impl": n, "step_ms": s["median"], "spread": {"step_ms": {k: s[k] for k in
                                                                                     ("q1", "q3", "min", "max")}},
                          "repeats": s["n"], "tokens_per_s": mp.tokens / (s["median"] / 1e3) if s["median"] else None})
    section = None
    if "peft" in done:
        ref = losses["peft"]
        section = {
            "model": mp.describe(), "dtype": "fp32", "steps": preset.steps, "lr": preset.lr, "optimizer": "AdamW",
            "tokens_per_step": mp.tokens, "seed": seed, "r": r, "n_batches": preset.n_batches,
            "data": "fixed synthetic sequences (each token followed by one of two successors from a random table)",
            "timed_from_step": WARM_STEPS + 1,
            "impls": done, "loss": {n: losses[n] for n in done},
            "abs_diff_vs_peft": {}, "max_abs_diff_vs_peft": {}, "max_rel_diff_vs_peft": {},
            "step_ms": {n: summarize(times[n])["median"] for n in done},
        }
        for n in done:
            if n == "peft":
                continue
            d = [abs(a - b) for a, b in zip(losses[n], ref)]
            section["abs_diff_vs_peft"][n] = d
            section["max_abs_diff_vs_peft"][n] = max(d) if d else None
            section["max_rel_diff_vs_peft"][n] = max(abs(a - b) / max(abs(b), 1e-12)
                                                     for a, b in zip(losses[n], ref)) if d else None
    return summaries, section, errors
