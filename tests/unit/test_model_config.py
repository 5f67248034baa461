"""ModelConfig parsing: both rope formats, GQA/head_dim derivation, and clear errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kvrelay.workers.model.config import ModelConfig, ModelLoadError, RopeScaling, parse_dtype
from kvrelay.workers.model.llama import kv_cache_shape, rope_inv_freq


def llama(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }
    raw.update(overrides)
    return raw


LLAMA3 = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def test_llama_defaults_and_derived_fields() -> None:
    c = ModelConfig.from_hf(llama())
    assert (c.head_dim, c.num_kv_heads, c.q_size, c.kv_size) == (8, 2, 64, 16)
    assert c.rope_theta == 10000.0 and c.rope_scaling is None
    assert not c.tie_word_embeddings and not c.qkv_bias and not c.o_bias
    assert c.eos_token_ids == (2,) and c.torch_dtype == "bfloat16"
    assert kv_cache_shape(c, 10, 16) == (10, 2, 2, 16, 2, 8)


def test_rope_read_from_both_formats_identically() -> None:
    new = ModelConfig.from_hf(
        llama(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3})
    )
    old = ModelConfig.from_hf(llama(rope_theta=500000.0, rope_scaling={"type": "llama3", **LLAMA3}))
    assert new == old
    assert new.rope_theta == 500000.0
    assert new.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    linear = ModelConfig.from_hf(llama(rope_scaling={"rope_type": "linear", "factor": 2.0}))
    assert linear.rope_scaling == RopeScaling("linear", 2.0)


def test_llama3_inv_freq_keeps_high_and_slows_low_frequencies() -> None:
    # exact equality with transformers is asserted through logits in
    # tests/integration/test_model_vs_transformers.py (llama3 checkpoints)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3}
    scaled = rope_inv_freq(ModelConfig.from_hf(llama(head_dim=64, rope_parameters=rope)))
    plain = rope_inv_freq(ModelConfig.from_hf(llama(head_dim=64, rope_theta=500000.0)))
    assert scaled.shape == (32,) and scaled.dtype == torch.float32
    assert scaled[0] == plain[0]  # wavelength 2*pi < 8192/4: untouched
    assert torch.allclose(scaled[-1], plain[-1] / 8.0)  # longest wavelength: divided by factor
    assert bool((scaled <= plain).all())


def test_qwen2_has_qkv_bias_and_list_eos_and_explicit_head_dim() -> None:
    c = ModelConfig.from_hf(
        llama(
            architectures=["Qwen2ForCausalLM"],
            model_type="qwen2",
            eos_token_id=[2, 5],
            head_dim=32,
            sliding_window=64,
            use_sliding_window=False,
        )
    )
    assert c.qkv_bias and not c.o_bias and c.head_dim == 32 and c.eos_token_ids == (2, 5)
    assert c.sliding_window is None and c.max_context == 256
    bias = ModelConfig.from_hf(llama(attention_bias=True))
    assert bias.qkv_bias and bias.o_bias


def test_mistral_sliding_window_caps_context() -> None:
    c = ModelConfig.from_hf(
        llama(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=128)
    )
    assert c.max_context == 128 and c.num_kv_heads == 2


def test_single_kv_head() -> None:
    assert ModelConfig.from_hf(llama(num_key_value_heads=1)).num_kv_heads == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "unsupported model_type"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "unsupported architectures"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "unsupported rope scaling type 'yarn'"),
        ({"rope_scaling": {"type": "llama3", "factor": 8.0}}, "missing 'low_freq_factor'"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
        ({"hidden_size": 60}, "not divisible by num_attention_heads"),
        ({"num_hidden_layers": None}, "missing 'num_hidden_layers'"),
        ({"vocab_size": -3}, "vocab_size must be a positive integer"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"torch_dtype": "float8"}, "torch_dtype"),
        ({"rope_theta": "big"}, "rope_theta"),
    ],
)
def test_bad_configs_name_the_problem(overrides: dict[str, Any], message: str) -> None:
    raw = llama(**overrides)
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ModelLoadError, match=message):
        ModelConfig.from_hf(raw)


def test_parse_dtype() -> None:
    assert parse_dtype("bfloat16") is torch.bfloat16
    assert parse_dtype(torch.float16) is torch.float16
    with pytest.raises(ModelLoadError):
        parse_dtype(torch.int8)
