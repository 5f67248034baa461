"""The load generator's long prompts fit the default model's context under its real tokenizer
(SmolLM2's, also the GPU run's): after ``fit_context`` a synthetic prompt + its output never
exceed the context, so the server has no reason to refuse one with a 400."""

from __future__ import annotations

import numpy as np

from kvrelay.benchmarks.loadgen_workload import fit_context, synth_prompt, synthetic_workload
from kvrelay.workers.model.source import load_tokenizer


def test_fitted_long_prompts_fit_the_context_under_the_real_tokenizer() -> None:
    config, tok, _ = load_tokenizer(None)
    ctx = config.max_context
    arr = synthetic_workload(
        400, 0, rate=64.0, max_prompt_tokens=ctx, max_output_tokens=128,
        long_fraction=0.5, long_prompt_range=(ctx - 64, ctx), long_output_tokens=16,
    )  # fmt: skip
    cut = fit_context(arr, ctx)
    rng = np.random.default_rng(0)
    # the longest prompts, with the run's index and with a 7-digit one (the lead word's worst)
    longest = sorted(range(len(cut)), key=lambda i: -cut[i].prompt_tokens - cut[i].output_tokens)
    room = []
    for i in longest[:12]:
        a = cut[i]
        for index in (i, 9_999_999):
            n = len(tok.encode(synth_prompt(a.prompt_tokens, index, rng)))
            assert n >= a.prompt_tokens  # the lead word costs tokens, never saves them
            room.append(ctx - n - a.output_tokens)
    assert min(room) >= 0
    assert min(room) < 8  # the cut is tight: it does not throw the context away
