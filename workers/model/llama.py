"""Llama-family decoder (Llama 2/3.x, Mistral, Qwen2/2.5, SmolLM2, TinyLlama) in plain torch.

The engine packs every scheduled token of every sequence into one flat batch of T tokens and
describes where each sequence's KV lives with an :class:`AttentionMetadata`; each layer writes
the new K/V into the paged cache through ``kvrelay.kernels`` and attends over it, so prefill,
chunked prefill and decode are the same forward::

    input_ids [T] ─ embed ─▶ [T, hidden] ─▶ L × (attention + SwiGLU MLP) ─▶ norm ─▶ [T, hidden]
    compute_logits([N, hidden]) ─ lm_head ─▶ [N, vocab] float32

Numerics follow transformers: RMSNorm in float32 then cast back; the RoPE table is computed in
float32 and cast to the compute dtype; q/k/v and gate/up are fused into one matmul each at load
time (fewer, larger GEMMs on CPU), which does not change results.

The projections go through ``kernels.linear`` (``F.linear``; with KVRELAY_GEMV=1 a split-K
GEMV at small batch on CUDA, kernels/triton_gemv.py) and the elementwise work between them
through the fused ops of ``kvrelay.kernels`` (torch compositions on CPU, one Triton kernel each
on CUDA; kernels/fused.py): a layer's residual add is fused with the RMSNorm that follows it, so
the residual stream is carried as (stream, pending delta) from layer to layer::

    (x, delta) ─ add_rms_norm ─ qkv ─ rope_write_kv ─ attention ─ o ─ add_rms_norm ─ gate_up
        ─ silu_mul ─ down ─▶ (x', delta')        final: add_rms_norm(delta, x, norm)

With ``KVRELAY_L2_PREFETCH`` set, small-batch CUDA decode steps also read weights into L2 on a
side stream ahead of the GEMMs that use them (opt-in; workers/model/prefetch.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from kvrelay import kernels
from kvrelay.workers.model.config import ModelConfig, ModelLoadError
from kvrelay.workers.model.prefetch import PrefetchPlan, WeightPrefetch


class SparseHook(Protocol):
    """What a layer asks of opt-in sparse attention (workers/model/sparse_attention.py's
    SparseAttention); a protocol here so that the model does not import it (no import circle)."""

    def handles(self, is_decode: bool) -> bool: ...

    def decode(
        self, layer: int, query: torch.Tensor, kv_cache: torch.Tensor,
        attn: AttentionMetadata, scale: float,
    ) -> torch.Tensor: ...  # fmt: skip

    def prefill(
        self, layer: int, query: torch.Tensor, kv_cache: torch.Tensor,
        attn: AttentionMetadata, scale: float,
    ) -> torch.Tensor: ...  # fmt: skip


@dataclass(slots=True)
class AttentionMetadata:
    """Where the T packed tokens of B sequences live in the paged KV cache."""

    slot_mapping: torch.Tensor  # [T] int64: block_id * block_size + offset, -1 = do not write
    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int32, tokens in the cache per sequence, new ones included
    query_start_loc: torch.Tensor  # [B + 1] int32, sequence i owns rows [i]:[i+1] of the batch
    is_decode: bool  # every sequence has exactly one new token (T == B)
    sparse: SparseHook | None = None  # opt-in sparse attention; None: dense (exact)


def kv_cache_shape(
    config: ModelConfig, num_blocks: int, block_size: int
) -> tuple[int, int, int, int, int, int]:
    """[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim] (kernels/reference.py)."""
    return (num_blocks, config.num_layers, 2, block_size, config.num_kv_heads, config.head_dim)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """[head_dim / 2] float32 inverse frequencies, scaled exactly as transformers does."""
    dim = config.head_dim
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    )
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class _Alloc:
    """Uninitialised parameters of one dtype/device: the loader overwrites every one of them
    (it checks it saw them all), so no random init is paid for."""

    def __init__(self, dtype: torch.dtype, device: torch.device | str) -> None:
        self.dtype, self.device = dtype, device

    def __call__(self, *shape: int) -> nn.Parameter:
        tensor = torch.empty(*shape, dtype=self.dtype, device=self.device)
        return nn.Parameter(tensor, requires_grad=False)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, _param: _Alloc) -> None:
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.eps = c.rms_norm_eps
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_size, self.kv_size = c.q_size, c.kv_size
        self.scale = c.head_dim**-0.5
        self.input_norm = _param(c.hidden_size)
        self.post_attn_norm = _param(c.hidden_size)
        self.qkv_weight = _param(c.q_size + 2 * c.kv_size, c.hidden_size)  # [q; k; v] rows
        self.qkv_bias = _param(c.q_size + 2 * c.kv_size) if c.qkv_bias else None
        self.o_weight = _param(c.hidden_size, c.q_size)
        self.o_bias = _param(c.hidden_size) if c.o_bias else None
        self.gate_up_weight = _param(2 * c.intermediate_size, c.hidden_size)  # [gate; up] rows
        self.down_weight = _param(c.hidden_size, c.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden] residual stream
        delta: torch.Tensor | None,  # [T, hidden] previous layer's MLP output, not yet added
        positions: torch.Tensor,  # [T] int64
        rope: tuple[torch.Tensor, torch.Tensor],  # fp32 cos, sin tables [max_pos, D]
        kv_cache: torch.Tensor,  # [num_blocks, L, 2, bs, Hkv, D]
        attn: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (stream after attention, this layer's MLP output)
        """One decoder layer; the stream it ends with is ``x' + delta'`` (the caller's next
        add_rms_norm adds them, fused with the norm that reads the sum). The three parts are
        separate so that prefill graphs (workers/engine/prefill_graphs.py) can run attention
        over their own padded metadata between them."""
        q, x = self.pre_attention(x, delta, positions, rope, kv_cache, attn.slot_mapping)
        return self.post_attention(self.attention(q, kv_cache, attn), x)

    def pre_attention(
        self,
        x: torch.Tensor,  # [T, hidden]
        delta: torch.Tensor | None,  # [T, hidden] or None (layer 0)
        positions: torch.Tensor,  # [T] int64
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,  # [T] int64, -1 = do not write
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (q [T, H, D], stream [T, hidden])
        """Input norm, qkv, RoPE; rotated K and V written to the cache."""
        if delta is None:
            h = kernels.rms_norm(x, self.input_norm, self.eps)
        else:
            h, x = kernels.add_rms_norm(delta, x, self.input_norm, self.eps)
        qkv = kernels.linear(h, self.qkv_weight, self.qkv_bias)  # [T, q + 2 kv]
        # q, k rotated in place in qkv; rotated K and V written to the cache
        q = kernels.rope_write_kv(
            qkv, *rope, positions, kv_cache, self.layer_idx, slot_mapping, self.num_heads
        )  # [T, H, D]
        return q, x

    def attention(
        self, q: torch.Tensor, kv_cache: torch.Tensor, attn: AttentionMetadata
    ) -> torch.Tensor:  # [T, H, D]
        sparse = attn.sparse
        if sparse is not None and sparse.handles(attn.is_decode):
            run = sparse.decode if attn.is_decode else sparse.prefill
            return run(self.layer_idx, q, kv_cache, attn, self.scale)
        if attn.is_decode:
            return kernels.paged_decode_attention(
                q, kv_cache, self.layer_idx, attn.block_tables, attn.context_lens, self.scale
            )
        return kernels.paged_prefill_attention(
            q,
            kv_cache,
            self.layer_idx,
            attn.block_tables,
            attn.query_start_loc,
            attn.context_lens,
            self.scale,
        )

    def post_attention(
        self,
        o: torch.Tensor,  # [T, H, D] or [T, H * D] attention output
        x: torch.Tensor,  # [T, hidden] stream
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (stream after attention, this layer's MLP output)
        """o projection, residual add + post-attention norm, SwiGLU MLP."""
        o = kernels.linear(o.reshape(x.shape[0], self.q_size), self.o_weight, self.o_bias)
        h, x = kernels.add_rms_norm(o, x, self.post_attn_norm, self.eps)
        up = kernels.silu_mul(kernels.linear(h, self.gate_up_weight))  # [T, inter]
        return x, kernels.linear(up, self.down_weight)


class LlamaModel(nn.Module):
    rope_cos: torch.Tensor  # [max_pos, D] float32 buffer
    rope_sin: torch.Tensor

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        self.config = config
        _param = _Alloc(dtype, device)
        self.embed = _param(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, _param) for i in range(config.num_layers)
        )
        self.norm = _param(config.hidden_size)
        self.lm_head = None if config.tie_word_embeddings else _param(*self.embed.shape)
        freqs = torch.outer(
            torch.arange(config.max_position_embeddings).float(), rope_inv_freq(config)
        )  # [max_pos, D/2] float32, as transformers' position * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1).to(device)  # [max_pos, D]
        self.register_buffer("rope_cos", emb.cos(), persistent=False)
        self.register_buffer("rope_sin", emb.sin(), persistent=False)
        # opt-in weight prefetch into L2 at small-batch decode (workers/model/prefetch.py)
        plan = PrefetchPlan.from_env()
        self.prefetch = WeightPrefetch(plan) if plan is not None else None

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64, position of each token in its sequence
        kv_cache: torch.Tensor,  # [num_blocks, L, 2, bs, Hkv, D]
        attn: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden], final norm applied
        x = self.embed_tokens(input_ids)
        delta: torch.Tensor | None = None
        rope = (self.rope_cos, self.rope_sin)
        pf = self.prefetch
        if pf is not None and not pf.applies(x, attn.is_decode, attn.sparse is not None):
            pf = None
        for i, layer in enumerate(self.layers):
            if pf is not None:  # weights this layer and the next read later, into L2
                pf.issue(pf.plan.at_layer(cast(list[DecoderLayer], self.layers), i))
            x, delta = layer(x, delta, positions, rope, kv_cache, attn)
        if pf is not None:
            pf.join(x.device)
        return self.final_norm(x, delta)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        return F.embedding(input_ids, self.embed)

    def final_norm(self, x: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        """The last layer's stream plus its pending MLP output (None: no layers), normed."""
        eps = self.config.rms_norm_eps
        if delta is None:
            return kernels.rms_norm(x, self.norm, eps)
        return kernels.add_rms_norm(delta, x, self.norm, eps).out

    @torch.inference_mode()
    def compute_logits(
        self, hidden: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:  # [N, hidden] -> [N, V] fp32
        """``out``: an fp32 ``[N, V]`` tensor to write them into (the decode graphs' buffer
        of their batch size), the conversion's copy instead of a new tensor."""
        head = self.embed if self.lm_head is None else self.lm_head
        logits = kernels.linear(hidden, head)
        return logits.float() if out is None else out.copy_(logits)

    @torch.inference_mode()
    def load_hf_weights(self, get: Callable[[str], torch.Tensor | None]) -> None:
        """Fill every parameter from transformers-named tensors (``get(name)`` is None when the
        checkpoint lacks it), fusing q/k/v and gate/up. Raises ModelLoadError naming a missing
        tensor or a wrong shape; a failed load leaves the model unusable, never half-right."""
        c = self.config

        def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            tensor = get(name)
            if tensor is None:
                raise ModelLoadError(f"checkpoint is missing tensor {name!r}")
            if tuple(tensor.shape) != shape:
                raise ModelLoadError(
                    f"tensor {name!r} has shape {tuple(tensor.shape)}, config implies {shape}"
                )
            return tensor

        h, inter = c.hidden_size, c.intermediate_size
        self.embed.copy_(take("model.embed_tokens.weight", (c.vocab_size, h)))
        self.norm.copy_(take("model.norm.weight", (h,)))
        if self.lm_head is not None:
            self.lm_head.copy_(take("lm_head.weight", (c.vocab_size, h)))
        for i, layer in enumerate(self.layers):
            assert isinstance(layer, DecoderLayer)
            p = f"model.layers.{i}."
            attn, mlp = p + "self_attn.", p + "mlp."
            layer.input_norm.copy_(take(p + "input_layernorm.weight", (h,)))
            layer.post_attn_norm.copy_(take(p + "post_attention_layernorm.weight", (h,)))
            sizes = {"q": c.q_size, "k": c.kv_size, "v": c.kv_size}
            layer.qkv_weight.copy_(
                torch.cat([take(f"{attn}{n}_proj.weight", (s, h)) for n, s in sizes.items()])
            )
            if layer.qkv_bias is not None:
                layer.qkv_bias.copy_(
                    torch.cat([take(f"{attn}{n}_proj.bias", (s,)) for n, s in sizes.items()])
                )
            layer.o_weight.copy_(take(attn + "o_proj.weight", (h, c.q_size)))
            if layer.o_bias is not None:
                layer.o_bias.copy_(take(attn + "o_proj.bias", (h,)))
            layer.gate_up_weight.copy_(
                torch.cat(
                    [
                        take(mlp + "gate_proj.weight", (inter, h)),
                        take(mlp + "up_proj.weight", (inter, h)),
                    ]
                )
            )
            layer.down_weight.copy_(take(mlp + "down_proj.weight", (h, inter)))
