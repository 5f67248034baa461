"""kvrelay's model against transformers on the same weights (fp32, 1e-4 relative): random-weight
Llama / Qwen2 / Mistral checkpoints of several shapes, run through the paged KV cache the way the
engine runs them: a batched, chunked prefill (two sequences, one split over two steps), then
batched decode steps. The reference is transformers' full-sequence forward."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from kvrelay.workers.model.loader import load_model


def reference_logits(path: Path, seqs: list[list[int]], dtype: Any = torch.float32) -> list[Any]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.inference_mode():
        return [hf(torch.tensor([s])).logits[0].float() for s in seqs]


def random_seqs(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(49152) for _ in range(n)] for n in lengths]


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
SHAPES = {
    "llama-gqa2-untied": ("llama", {}, {}),
    "llama-mqa-tied-llama3rope": (
        "llama",
        {"num_key_value_heads": 1, "tie_word_embeddings": True, "rope_parameters": LLAMA3_ROPE},
        {},
    ),
    "llama-llama3rope-legacy-config-sharded": (
        "llama",
        {"num_attention_heads": 8, "num_key_value_heads": 4, "rope_parameters": LLAMA3_ROPE},
        {"legacy_rope": True, "shard": True},
    ),
    "llama-mha-headdim-linear-rope-bias": (
        "llama",
        {
            "num_key_value_heads": 4,
            "head_dim": 32,
            "attention_bias": True,
            "num_hidden_layers": 3,
            "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        },
        {"legacy_rope": True},
    ),
    "qwen2-gqa3-untied": (
        "qwen2",
        {"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2},
        {},
    ),
    "qwen2-mqa-tied": ("qwen2", {"num_key_value_heads": 1, "tie_word_embeddings": True}, {}),
    "mistral-gqa4": (
        "mistral",
        {"hidden_size": 128, "num_attention_heads": 8, "num_key_value_heads": 2},
        {},
    ),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_logits_match_transformers(
    name: str, make_checkpoint: Any, run_paged: Any, assert_close_rel: Any
) -> None:
    model_type, overrides, options = SHAPES[name]
    ckpt = make_checkpoint(model_type, **overrides, **options)
    seqs = random_seqs([21, 9, 14], seed=len(name))
    loaded = load_model(ckpt.path)
    assert loaded.config.model_type == model_type
    ours = run_paged(loaded.model, seqs, decode_steps=4)
    for o, r in zip(ours, reference_logits(ckpt.path, seqs), strict=True):
        assert_close_rel(o, r)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_stays_close_to_fp32(
    dtype: torch.dtype, make_checkpoint: Any, run_paged: Any, assert_close_rel: Any
) -> None:
    ckpt = make_checkpoint("llama", initializer_range=0.02, seed=7)
    seqs = random_seqs([17, 6], seed=3)
    fp32 = run_paged(load_model(ckpt.path).model, seqs, decode_steps=3)
    half_model = load_model(ckpt.path, dtype=dtype).model
    assert half_model.embed.dtype == dtype
    half = run_paged(half_model, seqs, decode_steps=3)
    ref_half = reference_logits(ckpt.path, seqs, dtype=dtype)
    for h, f, r in zip(half, fp32, ref_half, strict=True):
        assert h.dtype == torch.float32 and torch.isfinite(h).all()
        assert_close_rel(h, f, tol=3e-2)  # half rounding, not a wrong formula
        assert_close_rel(h, r, tol=3e-2)
