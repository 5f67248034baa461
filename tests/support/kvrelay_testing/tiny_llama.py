"""A tiny random fp32 Llama (or Qwen2-style, with q/k/v and o biases) for tests that compare
two forward paths of one model: its weights are seeded, its norms near 1."""

from __future__ import annotations

import torch

from kvrelay.workers.model.config import ModelConfig
from kvrelay.workers.model.llama import LlamaModel

VOCAB = 97


def tiny_llama(bias: bool = False, layers: int = 2) -> LlamaModel:
    config = ModelConfig(
        model_type="qwen2" if bias else "llama", vocab_size=VOCAB, hidden_size=32,
        intermediate_size=64, num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=8,
        rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=4096,
        tie_word_embeddings=False, qkv_bias=bias, o_bias=bias, bos_token_id=None,
        eos_token_ids=(), torch_dtype="float32",
    )  # fmt: skip
    model = LlamaModel(config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if "norm" not in name else 0.05))
            if "norm" in name:
                p.add_(1.0)
    return model
