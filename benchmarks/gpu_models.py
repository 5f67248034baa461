"""The models gpu_bench.py and the benches built on it run, and their limits: random-weight bf16
Llamas of given shapes (``SHAPES``: Llama-3.2-1B's and Llama-3.1-8B's) loaded into ours and
transformers' from one state (``build``); the GPU's ceilings measured here (``ceilings``); the
bytes a decode step must read (``decode_bytes``) and the FLOPs of a prefill (``prefill_flops``);
sequences laid out in a cache as a step would find them (``make_seqs``)."""

from __future__ import annotations

from typing import Any

import torch

from kvrelay.benchmarks.gpu_timing import cuda_ms
from kvrelay.workers.engine.sequence import Sequence
from kvrelay.workers.model.config import ModelConfig
from kvrelay.workers.model.llama import LlamaModel
from kvrelay.workers.types import SamplingParams

SHAPES: dict[str, dict[str, Any]] = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
}  # fmt: skip
VOCAB, BS, CTX, DECODE_BATCHES, PREFILL_LENS = 128256, 16, 1024, (1, 8, 32, 128), (1024, 8192)
GREEDY = SamplingParams(max_tokens=1 << 20, temperature=0.0, ignore_eos=True)


def ceilings() -> tuple[float, float]:
    """(copy GB/s counting read + write, bf16 matmul TFLOP/s)."""
    n = 1 << 30  # 2 GiB of bf16
    a = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    ms = cuda_ms(lambda: b.copy_(a), iters=20)
    bw = 2 * a.numel() * 2 / ms / 1e6
    m = 8192
    x = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    ms = cuda_ms(lambda: x @ y, iters=10)
    return bw, 2 * m**3 / ms / 1e9


def hf_config(shape: dict[str, Any]) -> Any:
    """transformers' LlamaConfig of a shape (SHAPES) with this bench's vocabulary."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, max_position_embeddings=16384, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, **shape)  # fmt: skip


def build(shape: dict[str, Any]) -> tuple[Any, LlamaModel, ModelConfig]:
    from transformers import AutoModelForCausalLM

    cfg = hf_config(shape)
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    config = ModelConfig.from_hf(cfg.to_dict())
    ours = LlamaModel(config, dtype=torch.bfloat16, device="cuda")
    state = hf.state_dict()
    ours.load_hf_weights(state.get)
    return hf, ours.eval(), config


def decode_bytes(model: LlamaModel, config: ModelConfig, batch: int) -> int:
    """Bytes one decode step must read: every layer weight, the final norm, the LM head, the
    batch's embedding rows (the whole table when tied: it is the head), and the KV of CTX
    tokens per sequence."""
    layers = sum(p.numel() * p.element_size() for p in model.layers.parameters())
    head = model.embed if model.lm_head is None else model.lm_head
    rows = 0 if model.lm_head is None else batch * config.hidden_size * 2
    kv = batch * CTX * config.num_layers * 2 * config.num_kv_heads * config.head_dim * 2
    return layers + model.norm.numel() * 2 + head.numel() * 2 + rows + kv


def prefill_flops(model: LlamaModel, config: ModelConfig, tokens: int) -> float:
    matmul = sum(p.numel() for n, p in model.layers.named_parameters() if n.endswith("weight")
                 and p.dim() == 2)  # fmt: skip
    attn = 4 * config.num_heads * config.head_dim * tokens * (tokens + 1) / 2 * config.num_layers
    return 2 * matmul * tokens + attn + 2 * config.hidden_size * VOCAB


def make_seqs(batch: int, ctx: int, first_block: int, new_tokens: int) -> list[Sequence]:
    """Sequences holding ``ctx`` tokens in the cache, the next ``new_tokens`` to compute."""
    g = torch.Generator().manual_seed(batch)
    seqs, block = [], first_block
    for i in range(batch):
        ids = torch.randint(3, VOCAB, (ctx + new_tokens - 1,), generator=g).tolist()
        seq = Sequence(f"b{batch}-{i}", ids[: max(1, len(ids) - 1)], GREEDY,
                       output_ids=ids[max(1, len(ids) - 1):])  # fmt: skip
        nblocks = -(-(ctx + new_tokens - 1) // BS)
        seq.block_ids = list(range(block, block + nblocks))
        block += nblocks
        seq.num_computed = ctx - 1 if new_tokens == 1 else 0
        seqs.append(seq)
    return seqs
